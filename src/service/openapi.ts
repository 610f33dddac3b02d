// The OpenAPI 3.1 description of the service, built from the settings schema (the request keys,
// their types, ranges and docs come from src/config/schema.ts). Served at /openapi.json and kept in
// the tree as docs/openapi.json: `node --import tsx src/service/openapi.ts --write` regenerates it
// (test/service-api.test.ts fails when the file is stale).

import { writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SPEC_BY_KEY, type KeySpec } from '../config/schema.ts';
import { REQUEST_KEYS, MAX_BATCH, MAX_PROMPT_CHARS } from './api-schema.ts';

function keySchema(k: KeySpec): Record<string, unknown> {
  const t = k.type;
  const base = { description: k.doc, default: k.default };
  switch (t.kind) {
    case 'int':
      return { ...base, type: 'integer', ...(t.min !== undefined ? { minimum: t.min } : {}), ...(t.max !== undefined ? { maximum: t.max } : {}), ...(t.step ? { description: `${k.doc}; ${t.step.what}` } : {}) };
    case 'float':
      return { ...base, type: 'number', ...(t.min !== undefined ? { minimum: t.min } : {}), ...(t.max !== undefined ? { maximum: t.max } : {}) };
    case 'bool':
      return { ...base, type: 'boolean' };
    case 'enum':
      return { ...base, type: 'string', enum: [...t.values] };
    default:
      return { ...base, type: 'string' };
  }
}

function settingsProperties(): Record<string, unknown> {
  const props: Record<string, unknown> = {};
  for (const key of REQUEST_KEYS) {
    if (key === 'report.memory_snapshot') props[key] = { type: 'boolean', default: false, description: 'record the GPU allocation history of this request: its HTML timeline at /v1/videos/{id}/memory-snapshot' };
    else props[key] = keySchema(SPEC_BY_KEY.get(key)!);
  }
  return props;
}

const err = (description: string) => ({ description, content: { 'application/json': { schema: { $ref: '#/components/schemas/Error' } } } });
const idParam = { name: 'id', in: 'path', required: true, schema: { type: 'string', pattern: '^v_[0-9a-z]+$' } };

export function openApiDocument(): Record<string, unknown> {
  const settings = settingsProperties();
  const fileGet = (summary: string, type: string) => ({
    get: {
      summary,
      parameters: [idParam],
      responses: { 200: { description: summary, content: { [type]: { schema: { type: 'string', format: 'binary' } } } }, 404: err('no such video (or it expired)'), 409: err('the video is not completed (yet): its state is in the message'), 410: err('the result expired from the store') },
    },
  });
  return {
    openapi: '3.1.0',
    info: {
      title: 'smart-diffusion generation service',
      version: '1',
      description:
        'Text-to-video jobs on a BullMQ queue in Redis, run by workers that keep one pipeline loaded (docs/service.md). Request settings are the CLI\'s config keys (npm run generate -- --help); load-time keys (model, memory level, precision) belong to the worker\'s config and are refused here. Every /v1 route needs `Authorization: Bearer <key>` when the service has an API key.',
    },
    components: {
      securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } },
      schemas: {
        Error: { type: 'object', required: ['error'], properties: { error: { type: 'string', description: 'one line naming the field and the fix' } } },
        VideoRequest: { type: 'object', required: ['prompt'], additionalProperties: false, properties: { prompt: { type: 'string', minLength: 1, maxLength: MAX_PROMPT_CHARS }, ...settings }, description: 'flat dotted keys, or the same nested ({"infer": {"seed": 7}})' },
        BatchRequest: { type: 'object', required: ['prompts'], additionalProperties: false, properties: { prompts: { type: 'array', minItems: 1, maxItems: MAX_BATCH, items: { type: 'string', minLength: 1 } }, ...settings } },
        State: { type: 'string', enum: ['queued', 'active', 'completed', 'failed', 'cancelled'] },
        Video: {
          type: 'object',
          properties: {
            id: { type: 'string' },
            state: { $ref: '#/components/schemas/State' },
            prompt: { type: 'string' },
            batch: { type: ['string', 'null'] },
            progress: { type: 'object', properties: { phase: { type: 'string', description: 'queued, encode, denoise, decode, write, done' }, step: { type: 'integer' }, steps: { type: 'integer' } } },
            eta_seconds: { type: ['number', 'null'] },
            created_at: { type: ['string', 'null'], format: 'date-time' },
            started_at: { type: ['string', 'null'], format: 'date-time' },
            finished_at: { type: ['string', 'null'], format: 'date-time' },
            worker: { type: ['string', 'null'] },
            attempts: { type: 'integer', description: 'how many times a worker started it (> 1 after a worker died mid-job)' },
            resumed_from_latents: { type: 'boolean', description: 'a retried job whose denoise had finished: only decoded' },
            memory: { type: ['object', 'null'], properties: { peak_allocated_bytes: { type: 'integer' }, peak_reserved_bytes: { type: 'integer' } } },
            error: { type: ['string', 'null'] },
            settings: { type: 'object', description: 'the settings the request set, by dotted key' },
            links: { type: 'object', properties: { content: { type: 'string' }, preview: { type: 'string' }, sidecar: { type: 'string' }, memory_snapshot: { type: ['string', 'null'] }, events: { type: 'string' } } },
          },
        },
        Worker: {
          type: 'object',
          properties: {
            id: { type: 'string' },
            host: { type: 'string' },
            model: { type: 'string' },
            state: { type: 'string', enum: ['idle', 'busy'] },
            job: { type: ['string', 'null'] },
            memory: { type: 'object', properties: { allocated_bytes: { type: 'integer' }, reserved_bytes: { type: 'integer' }, peak_allocated_bytes: { type: 'integer' } } },
            jobs_done: { type: 'integer' },
            last_seen: { type: 'string', format: 'date-time' },
          },
        },
        Counts: { type: 'object', properties: { queued: { type: 'integer' }, active: { type: 'integer' }, completed: { type: 'integer' }, failed: { type: 'integer' }, cancelled: { type: 'integer' } } },
      },
    },
    security: [{ bearer: [] }],
    paths: {
      '/v1/videos': {
        post: {
          summary: 'queue one video',
          requestBody: { required: true, content: { 'application/json': { schema: { $ref: '#/components/schemas/VideoRequest' } } } },
          responses: {
            202: { description: 'queued', content: { 'application/json': { schema: { type: 'object', properties: { id: { type: 'string' }, state: { const: 'queued' } } } } } },
            400: err('a missing or empty prompt, a wrong type, an unknown key (with the closest valid one), a load-time key, a size out of range or over the service bound'),
            401: err('missing or wrong API key'),
            413: err('body larger than the bound (serve --max-body-kb)'),
            415: err('the body is not JSON'),
            503: err('Redis is unreachable: retry later'),
          },
        },
      },
      '/v1/videos/{id}': {
        get: { summary: 'a video\'s state, progress, ETA and memory', parameters: [idParam], responses: { 200: { description: 'the video', content: { 'application/json': { schema: { $ref: '#/components/schemas/Video' } } } }, 404: err('no such video (or it expired)'), 503: err('Redis is unreachable') } },
        delete: {
          summary: 'cancel a queued or active video (an active one stops at its next denoising step, decode chunk or file; nothing is stored)',
          parameters: [idParam],
          responses: { 200: { description: 'cancelled', content: { 'application/json': { schema: { type: 'object', properties: { id: { type: 'string' }, state: { const: 'cancelled' } } } } } }, 404: err('no such video'), 409: err('the video already finished (completed or failed)') },
        },
      },
      '/v1/videos/{id}/content': fileGet('the MP4 (H.264); Range requests are honoured', 'video/mp4'),
      '/v1/videos/{id}/preview': fileGet('the animated GIF preview', 'image/gif'),
      '/v1/videos/{id}/sidecar': fileGet('the JSON sidecar (settings, seed, model, timings, memory peaks), as the CLI writes it', 'application/json'),
      '/v1/videos/{id}/memory-snapshot': fileGet('the HTML timeline of GPU memory by owner (requests with report.memory_snapshot: true)', 'text/html'),
      '/v1/videos/{id}/events': {
        get: {
          summary: 'server-sent events: `state` (on connect and on each change), `progress` (each step), then `done` (completed), `error` (failed) or `state` with state cancelled, after which the stream ends; each data line is the Video object',
          parameters: [idParam],
          responses: { 200: { description: 'an event stream', content: { 'text/event-stream': { schema: { type: 'string' } } } }, 404: err('no such video') },
        },
      },
      '/v1/batches': {
        post: {
          summary: 'queue several prompts with shared settings (one job each; workers keep their model loaded; prompt embeddings are cached)',
          requestBody: {
            required: true,
            content: {
              'application/json': { schema: { $ref: '#/components/schemas/BatchRequest' } },
              'text/plain': { schema: { type: 'string', description: 'a prompts file: one prompt per line (blank lines and # comments skipped); the shared settings as query parameters, e.g. ?infer.seed=3&infer.num_inference_steps=4' } },
            },
          },
          responses: { 202: { description: 'queued', content: { 'application/json': { schema: { type: 'object', properties: { id: { type: 'string' }, videos: { type: 'array', items: { type: 'string' } } } } } } }, 400: err('bad prompts or settings'), 503: err('Redis is unreachable') },
        },
      },
      '/v1/batches/{id}': {
        get: {
          summary: 'a batch: its state (active while any video is) and its videos',
          parameters: [{ ...idParam, schema: { type: 'string', pattern: '^b_[0-9a-z]+$' } }],
          responses: { 200: { description: 'the batch', content: { 'application/json': { schema: { type: 'object', properties: { id: { type: 'string' }, state: { $ref: '#/components/schemas/State' }, counts: { $ref: '#/components/schemas/Counts' }, videos: { type: 'array', items: { $ref: '#/components/schemas/Video' } } } } } } }, 404: err('no such batch') },
        },
      },
      '/v1/queue': {
        get: {
          summary: 'jobs by state and the live workers (heartbeats) with their GPU memory',
          responses: { 200: { description: 'the queue', content: { 'application/json': { schema: { type: 'object', properties: { counts: { $ref: '#/components/schemas/Counts' }, workers: { type: 'array', items: { $ref: '#/components/schemas/Worker' } } } } } } }, 503: err('Redis is unreachable') },
        },
      },
      '/healthz': {
        get: {
          summary: 'liveness and Redis reachability (no API key needed)',
          security: [],
          responses: { 200: { description: '{"ok": true, "redis": "up"}' }, 503: { description: '{"ok": false, "redis": "down"}' } },
        },
      },
      '/metrics': { get: { summary: 'Prometheus text: queue depth, jobs by state, per-request peak GPU memory and step time histograms, workers\' memory (no API key needed)', security: [], responses: { 200: { description: 'text/plain; version=0.0.4' } } } },
      '/openapi.json': { get: { summary: 'this document', security: [], responses: { 200: { description: 'OpenAPI 3.1' } } } },
    },
  };
}

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const OPENAPI_PATH = join(ROOT, 'docs', 'openapi.json');

export function openApiText(): string {
  return JSON.stringify(openApiDocument(), null, 2) + '\n';
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url) && process.argv.includes('--write')) {
  writeFileSync(OPENAPI_PATH, openApiText());
  process.stdout.write(`wrote ${OPENAPI_PATH}\n`);
}
