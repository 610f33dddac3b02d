// What a request to the service may ask for, checked by the settings schema the CLI uses
// (src/config/schema.ts + settings.ts): the same type/range checks and "did you mean" suggestions.
// Only per-request keys are accepted; load-time keys (model, memory level, precision, device) are
// fixed when a worker loads its pipeline and belong to the worker's config.

import { promptsOfText } from '../config/prompts-file.ts';
import { KEYS, SPEC_BY_KEY } from '../config/schema.ts';
import { dottedLayer, overridesLayer, type Layer } from '../config/settings.ts';
import { show, showKey } from '../config/coerce.ts';
import { ConfigError } from '../util/errors.ts';

/** Keys outside the `request` group a request may still set. */
const EXTRA_KEYS = new Set(['infer.fps', 'report.memory_snapshot']);

/** The dotted keys a request may set (the OpenAPI description lists them). */
export const REQUEST_KEYS: readonly string[] = KEYS.filter((k) => (k.group === 'request' || EXTRA_KEYS.has(k.key)) && k.key !== 'prompt').map((k) => k.key);

/** Default bound of a request: width x height x frames (832x480x81 = 32.3 M pixels; 1280x720x81 = 74.6 M). */
export const DEFAULT_MAX_PIXELS = 1280 * 720 * 81;

/** Longest prompt accepted (characters; Wan's encoder reads 512 tokens). */
export const MAX_PROMPT_CHARS = 4000;

/** Most prompts in one batch. */
export const MAX_BATCH = 256;

export interface VideoRequest {
  prompt: string;
  /** the request's settings by dotted key (checked values), without `prompt` */
  settings: Record<string, unknown>;
  /** `report.memory_snapshot`: record the GPU allocation history of this request */
  memorySnapshot: boolean;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function checkPrompt(p: unknown, name: string): string {
  if (p === undefined || p === null) throw new ConfigError(`'${name}' is missing: send {"prompt": "a red circle moving right on a black background"}`);
  if (typeof p !== 'string') throw new ConfigError(`'${name}' must be a string, got ${show(p, 40)}`);
  if (!p.trim()) throw new ConfigError(`'${name}' is empty: give the text of the video to make`);
  if (p.length > MAX_PROMPT_CHARS) throw new ConfigError(`'${name}' has ${p.length} characters, more than the ${MAX_PROMPT_CHARS} accepted; shorten it`);
  return p;
}

/**
 * The settings of `body` other than `skip` keys: checked through the schema (dottedLayer: unknown
 * keys get the closest valid one), load-time keys refused, the size bounded by `maxPixels`.
 */
function checkSettings(body: Record<string, unknown>, skip: ReadonlySet<string>, maxPixels: number): { settings: Record<string, unknown>; memorySnapshot: boolean } {
  const rest: Record<string, unknown> = {};
  let memorySnapshot = false;
  for (const [k, v] of Object.entries(body)) {
    if (skip.has(k)) continue;
    // report.memory_snapshot is a file path on the CLI; the service stores the timeline itself, so true/false (a path is taken as true)
    if (k === 'report.memory_snapshot' || (k === 'report' && isObject(v) && 'memory_snapshot' in v && Object.keys(v).length === 1)) {
      const s = k === 'report' ? (v as Record<string, unknown>).memory_snapshot : v;
      if (typeof s === 'boolean') memorySnapshot = s;
      else if (typeof s === 'string') memorySnapshot = s.length > 0;
      else throw new ConfigError(`'report.memory_snapshot' must be true or false, got ${show(s, 40)}`);
      continue;
    }
    rest[k] = v;
  }
  return checkLayer(dottedLayer(rest, ' in the request body'), memorySnapshot, maxPixels);
}

function checkLayer(layer: Layer, memorySnapshot: boolean, maxPixels: number): { settings: Record<string, unknown>; memorySnapshot: boolean } {
  const settings: Record<string, unknown> = {};
  for (const [key, v] of layer.values) {
    const spec = SPEC_BY_KEY.get(key)!;
    if (key === 'prompt') continue;
    if (spec.group === 'load')
      throw new ConfigError(`${showKey(key)} is fixed when a worker loads its pipeline, not per request: set it in the worker's config (npm run worker -- ${key}=...) and remove it from the request`);
    if (!(spec.group === 'request' || EXTRA_KEYS.has(key)))
      throw new ConfigError(`${showKey(key)} is not a request setting: the service stores each video's files itself (fetch them from /v1/videos/{id}/content, /preview, /sidecar); remove it from the request`);
    settings[key] = v;
  }
  const w = (settings['infer.width'] as number | undefined) ?? 0;
  const h = (settings['infer.height'] as number | undefined) ?? 0;
  const f = (settings['infer.num_frames'] as number | undefined) ?? 0;
  const px = Math.max(w, 16) * Math.max(h, 16) * Math.max(f, 1);
  if ((w || h || f) && px > maxPixels)
    throw new ConfigError(
      `the requested video (${w || 'default'} x ${h || 'default'} x ${f || 'default'} frames) has ${px} pixels, more than this service's bound of ${maxPixels} (serve --max-pixels); ask for fewer frames or a smaller size`,
    );
  return { settings, memorySnapshot };
}

/** POST /v1/videos: `{ prompt, ...settings }` (flat dotted keys or nested objects). Throws a one-line ConfigError. */
export function parseVideoRequest(body: unknown, maxPixels = DEFAULT_MAX_PIXELS): VideoRequest {
  if (!isObject(body)) throw new ConfigError(`the request body must be a JSON object such as {"prompt": "a red circle moving right on a black background"}, got ${show(body, 40)}`);
  const prompt = checkPrompt(body.prompt, 'prompt');
  return { prompt, ...checkSettings(body, new Set(['prompt']), maxPixels) };
}

export interface BatchRequest {
  prompts: string[];
  settings: Record<string, unknown>;
  memorySnapshot: boolean;
}

/** POST /v1/batches: `{ prompts: [...], ...shared settings }`. */
export function parseBatchRequest(body: unknown, maxPixels = DEFAULT_MAX_PIXELS): BatchRequest {
  if (!isObject(body)) throw new ConfigError(`the request body must be a JSON object such as {"prompts": ["a red circle moving right on a black background"]}, got ${show(body, 40)}`);
  if ('prompt' in body) throw new ConfigError(`a batch takes 'prompts' (a list), not 'prompt': send {"prompts": [...]} or POST one video to /v1/videos`);
  const ps = body.prompts;
  if (!Array.isArray(ps)) throw new ConfigError(`'prompts' must be a list of strings, got ${show(ps, 40)}`);
  if (ps.length === 0) throw new ConfigError(`'prompts' is empty: give at least one prompt`);
  if (ps.length > MAX_BATCH) throw new ConfigError(`'prompts' has ${ps.length} entries, more than the ${MAX_BATCH} accepted in one batch; split it`);
  const prompts = ps.map((p, i) => checkPrompt(p, `prompts[${i}]`));
  return { prompts, ...checkSettings(body, new Set(['prompts']), maxPixels) };
}

/** Request settings by dotted key → `GenerateRequest` fields (camelCase of the schema). */
export function requestFields(settings: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, v] of Object.entries(settings)) {
    const spec = SPEC_BY_KEY.get(key);
    if (spec && spec.group === 'request') out[spec.field] = v;
  }
  return out;
}

/** Most bytes of a prompts file posted as text/plain (one prompt per line). */
export const MAX_PROMPTS_TEXT = 256 * 1024;

/**
 * POST /v1/batches with a prompts file as the body (Content-Type: text/plain): one prompt per line,
 * blank lines and lines starting with # skipped; the shared settings as query parameters
 * (`?infer.seed=3&infer.num_inference_steps=4`, parsed per the key's type as the CLI's key=value).
 */
export function parseBatchText(text: string, query: URLSearchParams, maxPixels = DEFAULT_MAX_PIXELS): BatchRequest {
  const prompts = promptsOfText(text);
  if (prompts.length === 0) throw new ConfigError('the prompts file is empty: one prompt per line (lines starting with # are comments)');
  if (prompts.length > MAX_BATCH) throw new ConfigError(`the prompts file has ${prompts.length} prompts, more than the ${MAX_BATCH} accepted in one batch; split it`);
  prompts.forEach((p, i) => checkPrompt(p, `line ${i + 1} of the prompts file`));
  let memorySnapshot = false;
  const overrides: string[] = [];
  for (const [k, v] of query) {
    if (k === 'report.memory_snapshot') {
      if (v !== 'true' && v !== 'false') throw new ConfigError(`'report.memory_snapshot' must be true or false, got ${show(v, 40)}`);
      memorySnapshot = v === 'true';
    } else overrides.push(`${k}=${v}`);
  }
  return { prompts, ...checkLayer(overridesLayer(overrides, ' in the query string'), memorySnapshot, maxPixels) };
}
