// The service's HTTP API without a GPU: request validation (the CLI's schema, 4xx with one clear
// JSON line), the API key, the OpenAPI file, and Redis going away (503, no crash, recovery). A real
// redis-server on a free port; no worker here (test/service.test.ts runs jobs).

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { request } from 'node:http';
import { startService, type Service } from '../src/service/server.ts';
import { openApiText, OPENAPI_PATH } from '../src/service/openapi.ts';
import { parseServiceArgs } from '../src/service/cli-args.ts';
import { startRedis, type TestRedis } from './helpers/service.ts';

let redis: TestRedis;
let svc: Service;
const logs: string[] = [];

beforeAll(async () => {
  redis = await startRedis();
  svc = await startService({ port: 0, redisUrl: redis.url, inProcessWorker: false, log: (l) => logs.push(l), redisTimeoutMs: 1500 });
});

afterAll(async () => {
  await svc?.close();
  await redis?.stop();
});

async function call(method: string, path: string, body?: unknown, headers: Record<string, string> = {}, base = svc.url): Promise<{ status: number; json: any; text: string; headers: Headers }> {
  const r = await fetch(base + path, {
    method,
    headers: body === undefined ? headers : { 'content-type': 'application/json', ...headers },
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await r.text();
  let json: any = null;
  try {
    json = JSON.parse(text);
  } catch {
    /* not JSON */
  }
  return { status: r.status, json, text, headers: r.headers };
}

/** a 4xx whose body is `{ error: one line }` mentioning `needle` */
function expectError(r: { status: number; json: any }, status: number, needle: RegExp): void {
  expect(r.status, JSON.stringify(r.json)).toBe(status);
  expect(Object.keys(r.json)).toEqual(['error']);
  expect(r.json.error).not.toContain('\n');
  expect(r.json.error).toMatch(needle);
}

describe('service API: bad requests get a 4xx and one clear JSON line', () => {
  it('missing, empty or mistyped prompt', async () => {
    expectError(await call('POST', '/v1/videos', {}), 400, /'prompt' is missing/);
    expectError(await call('POST', '/v1/videos', { prompt: '   ' }), 400, /'prompt' is empty/);
    expectError(await call('POST', '/v1/videos', { prompt: 7 }), 400, /'prompt' must be a string, got 7/);
    expectError(await call('POST', '/v1/videos', ['a']), 400, /must be a JSON object/);
  });

  it('wrong types and out-of-range values, checked by the CLI schema', async () => {
    expectError(await call('POST', '/v1/videos', { prompt: 'a', 'infer.num_inference_steps': 'many' }), 400, /infer\.num_inference_steps/);
    expectError(await call('POST', '/v1/videos', { prompt: 'a', infer: { seed: -1 } }), 400, /infer\.seed/);
    expectError(await call('POST', '/v1/videos', { prompt: 'a', 'infer.guidance_scale': true }), 400, /infer\.guidance_scale/);
    expectError(await call('POST', '/v1/videos', { prompt: 'a', 'report.memory_snapshot': 3 }), 400, /report\.memory_snapshot' must be true or false/);
  });

  it('impossible sizes', async () => {
    expectError(await call('POST', '/v1/videos', { prompt: 'a', 'infer.height': 100 }), 400, /infer\.height.*multiple of 16/);
    expectError(await call('POST', '/v1/videos', { prompt: 'a', 'infer.num_frames': 10 }), 400, /infer\.num_frames.*4k\+1/);
    expectError(await call('POST', '/v1/videos', { prompt: 'a', 'infer.width': 99999 }), 400, /infer\.width/);
    expectError(await call('POST', '/v1/videos', { prompt: 'a', 'infer.width': 4096, 'infer.height': 4096, 'infer.num_frames': 1025 }), 400, /more than this service's bound .*--max-pixels/);
  });

  it('unknown keys get the closest valid one; load-time and output keys are refused with the reason', async () => {
    expectError(await call('POST', '/v1/videos', { prompt: 'a', 'infer.num_inference_step': 4 }), 400, /unknown config key 'infer\.num_inference_step' in the request body; did you mean 'infer\.num_inference_steps'/);
    expectError(await call('POST', '/v1/videos', { prompt: 'a', infer: { sed: 4 } }), 400, /did you mean 'infer\.seed'/);
    expectError(await call('POST', '/v1/videos', { prompt: 'a', 'infer.diffusion.low_mem_level': 2 }), 400, /fixed when a worker loads its pipeline.*npm run worker -- infer\.diffusion\.low_mem_level=/);
    expectError(await call('POST', '/v1/videos', { prompt: 'a', model: '/etc' }), 400, /'model' is fixed when a worker loads/);
    expectError(await call('POST', '/v1/videos', { prompt: 'a', 'output.path': '/tmp/x.mp4' }), 400, /not a request setting/);
  });

  it('bodies: not JSON, empty, wrong content type, huge', async () => {
    expectError(await call('POST', '/v1/videos', '{"prompt": '), 400, /not valid JSON/);
    expectError(await call('POST', '/v1/videos', ''), 400, /body is empty/);
    expectError(await call('POST', '/v1/videos', 'prompt=a', { 'content-type': 'application/x-www-form-urlencoded' }), 415, /must be JSON/);
    const huge = JSON.stringify({ prompt: 'a'.repeat(200_000) });
    expectError(await call('POST', '/v1/videos', huge), 413, /more than the 65536 accepted/);
    // chunked (no content-length): cut off while streaming
    const status = await new Promise<number>((res, rej) => {
      const u = new URL(svc.url);
      const r = request({ host: u.hostname, port: u.port, path: '/v1/videos', method: 'POST', headers: { 'content-type': 'application/json', 'transfer-encoding': 'chunked' } }, (resp) => {
        resp.resume();
        res(resp.statusCode ?? 0);
      });
      r.on('error', rej);
      for (let i = 0; i < 40; i++) r.write('x'.repeat(4096));
      r.end();
    });
    expect(status).toBe(413);
    expectError(await call('POST', '/v1/videos', { prompt: 'x'.repeat(5000) }), 400, /more than the 4000 accepted/);
  });

  it('batches: a list of prompts', async () => {
    expectError(await call('POST', '/v1/batches', { prompts: 'a' }), 400, /'prompts' must be a list/);
    expectError(await call('POST', '/v1/batches', { prompts: [] }), 400, /'prompts' is empty/);
    expectError(await call('POST', '/v1/batches', { prompts: ['a', 3] }), 400, /'prompts\[1\]' must be a string/);
    expectError(await call('POST', '/v1/batches', { prompt: 'a' }), 400, /takes 'prompts'/);
  });

  it('a prompts file as a batch: text/plain, one prompt per line, settings in the query string', async () => {
    const text = '# two videos\na red circle moving right on a black background\n\na blue square moving left on a gray background\n';
    const r = await call('POST', '/v1/batches?infer.seed=4&infer.num_inference_steps=3', text, { 'content-type': 'text/plain' });
    expect(r.status).toBe(202);
    expect(r.json.videos).toHaveLength(2);
    const b = await call('GET', `/v1/batches/${r.json.id}`);
    expect(b.json.videos.map((v: any) => v.prompt)).toEqual(['a red circle moving right on a black background', 'a blue square moving left on a gray background']);
    expect(b.json.videos[1].settings).toEqual({ 'infer.seed': 4, 'infer.num_inference_steps': 3 });
    for (const v of r.json.videos) await call('DELETE', `/v1/videos/${v}`);
    expect((await call('GET', `/v1/batches/${r.json.id}`)).json.state).toBe('cancelled');
    expectError(await call('POST', '/v1/batches?infer.sed=4', 'a', { 'content-type': 'text/plain' }), 400, /in the query string; did you mean 'infer\.seed'/);
    expectError(await call('POST', '/v1/batches?infer.seed=x', 'a', { 'content-type': 'text/plain' }), 400, /infer\.seed/);
    expectError(await call('POST', '/v1/batches?infer.diffusion.low_mem_level=1', 'a', { 'content-type': 'text/plain' }), 400, /fixed when a worker loads/);
    expectError(await call('POST', '/v1/batches', '# nothing\n\n', { 'content-type': 'text/plain' }), 400, /prompts file is empty/);
  });

  it('unknown ids, routes and methods', async () => {
    expectError(await call('GET', '/v1/videos/v_doesnotexist1'), 404, /no video "v_doesnotexist1"/);
    expectError(await call('GET', '/v1/videos/..%2f..%2fetc'), 404, /no video/);
    expectError(await call('GET', '/v1/videos/v_doesnotexist1/content'), 404, /no video/);
    expectError(await call('DELETE', '/v1/videos/v_doesnotexist1'), 404, /no video/);
    expectError(await call('GET', '/v1/batches/b_doesnotexist1'), 404, /no batch/);
    expectError(await call('GET', '/v1/nothing'), 404, /no route/);
    expectError(await call('PUT', '/v1/videos'), 405, /use POST/);
    expectError(await call('GET', '/web/..%2fserver.ts'), 404, /no such page/);
  });

  it('a queued video: state, cancel, then 409 on a second cancel and on its content', async () => {
    const r = await call('POST', '/v1/videos', { prompt: 'a red circle moving right on a black background', 'infer.seed': 3, 'report.memory_snapshot': true });
    expect(r.status).toBe(202);
    expect(r.json.state).toBe('queued');
    const s = await call('GET', `/v1/videos/${r.json.id}`);
    expect(s.json).toMatchObject({ id: r.json.id, state: 'queued', progress: { phase: 'queued' }, settings: { 'infer.seed': 3 }, memory: null, error: null });
    expect(s.json.links.memory_snapshot).toBe(`/v1/videos/${r.json.id}/memory-snapshot`);
    expectError(await call('GET', `/v1/videos/${r.json.id}/content`), 409, /is queued: its files exist once its state is completed/);
    expect((await call('DELETE', `/v1/videos/${r.json.id}`)).json).toEqual({ id: r.json.id, state: 'cancelled' });
    expect((await call('GET', `/v1/videos/${r.json.id}`)).json.state).toBe('cancelled');
    expectError(await call('DELETE', `/v1/videos/${r.json.id}`), 409, /already cancelled/);
    const q = await call('GET', '/v1/queue');
    expect(q.json.counts.queued).toBe(0);
    expect(q.json.counts.cancelled).toBeGreaterThanOrEqual(1);
  });

  it('the OpenAPI description is served and docs/openapi.json is current', async () => {
    const r = await call('GET', '/openapi.json');
    expect(r.status).toBe(200);
    expect(r.json.openapi).toBe('3.1.0');
    expect(Object.keys(r.json.paths)).toEqual(expect.arrayContaining(['/v1/videos', '/v1/videos/{id}', '/v1/videos/{id}/content', '/v1/videos/{id}/events', '/v1/batches', '/v1/queue', '/healthz', '/metrics']));
    expect(r.json.components.schemas.VideoRequest.properties['infer.num_inference_steps'].maximum).toBe(1000);
    expect(readFileSync(OPENAPI_PATH, 'utf8'), 'docs/openapi.json is stale: node --import tsx src/service/openapi.ts --write').toBe(openApiText());
  });

  it('metrics are Prometheus text', async () => {
    const r = await call('GET', '/metrics');
    expect(r.status).toBe(200);
    expect(r.headers.get('content-type')).toMatch(/text\/plain/);
    expect(r.text).toMatch(/^sd_queue_depth \d+$/m);
    expect(r.text).toMatch(/^sd_jobs\{state="cancelled"\} \d+$/m);
    expect(r.text).toMatch(/^# TYPE sd_request_peak_allocated_bytes histogram$/m);
    expect(r.text).toMatch(/^sd_step_seconds_bucket\{le="\+Inf"\} \d+$/m);
  });
});

describe('service API: key and binding', () => {
  it('an API key guards /v1 (not /healthz); a public address without one is refused', async () => {
    await expect(startService({ port: 0, host: '0.0.0.0', redisUrl: redis.url, inProcessWorker: false })).rejects.toThrow(/needs an API key: pass --api-key/);
    const keyed = await startService({ port: 0, redisUrl: redis.url, inProcessWorker: false, apiKey: 's3cret', log: () => {} });
    try {
      expectError(await call('GET', '/v1/queue', undefined, {}, keyed.url), 401, /Authorization: Bearer/);
      expectError(await call('GET', '/v1/queue', undefined, { authorization: 'Bearer nope' }, keyed.url), 401, /wrong API key/);
      expect((await call('GET', '/v1/queue', undefined, { authorization: 'Bearer s3cret' }, keyed.url)).status).toBe(200);
      expect((await call('GET', '/healthz', undefined, {}, keyed.url)).status).toBe(200);
    } finally {
      await keyed.close();
    }
  });

  it('command lines: options checked, key=value through the schema', () => {
    expect(parseServiceArgs(['--port', '9000', 'infer.diffusion.low_mem_level=2'], 'serve', {})).toMatchObject({ port: 9000, worker: { config: { 'infer.diffusion.low_mem_level': 2 } } });
    expect(() => parseServiceArgs(['--port', 'x'], 'serve', {})).toThrow(/--port must be an integer/);
    expect(() => parseServiceArgs(['infer.low_mem=2'], 'worker', {})).toThrow(/did you mean/);
    expect(() => parseServiceArgs([], 'worker', { REDIS_URL: 'http://x' })).toThrow(/must start with redis:\/\//);
    expect(parseServiceArgs([], 'worker', { REDIS_URL: 'redis://h:1', SMART_DIFFUSION_API_KEY: 'k' })).toMatchObject({ redisUrl: 'redis://h:1', apiKey: 'k' });
    expect(() => parseServiceArgs(['--bogus'], 'serve', {})).toThrow(/unknown option/);
  });
});

describe('service API: Redis going away', () => {
  it('answers 503 with a JSON line, does not crash, and recovers when Redis returns', async () => {
    const r2 = await startRedis();
    const port = r2.port;
    const s2 = await startService({ port: 0, redisUrl: r2.url, inProcessWorker: false, log: () => {}, redisTimeoutMs: 1000 });
    let back: TestRedis | null = null;
    try {
      expect((await call('GET', '/healthz', undefined, {}, s2.url)).status).toBe(200);
      r2.kill();
      await new Promise((r) => setTimeout(r, 300));
      const h = await call('GET', '/healthz', undefined, {}, s2.url);
      expect(h.status).toBe(503);
      expect(h.json).toEqual({ ok: false, redis: 'down' });
      const t0 = Date.now();
      expectError(await call('POST', '/v1/videos', { prompt: 'a' }, {}, s2.url), 503, /Redis\) is unreachable/);
      expectError(await call('GET', '/v1/queue', undefined, {}, s2.url), 503, /unreachable/);
      expectError(await call('GET', '/v1/videos/v_abcdefabcdef', undefined, {}, s2.url), 503, /unreachable/);
      expect(Date.now() - t0).toBeLessThan(5000); // no hang
      expect((await call('GET', '/metrics', undefined, {}, s2.url)).text).toMatch(/^sd_redis_up 0$/m);
      // bad requests are still refused as such
      expectError(await call('POST', '/v1/videos', {}, {}, s2.url), 400, /'prompt' is missing/);
      back = await startRedis(port);
      await expect.poll(async () => (await call('GET', '/healthz', undefined, {}, s2.url)).status, { timeout: 15_000, interval: 200 }).toBe(200);
      const ok = await call('POST', '/v1/videos', { prompt: 'a red circle moving right on a black background' }, {}, s2.url);
      expect(ok.status).toBe(202);
      expect((await call('GET', `/v1/videos/${ok.json.id}`, undefined, {}, s2.url)).json.state).toBe('queued');
    } finally {
      await s2.close();
      await back?.stop();
      await r2.stop();
    }
  });
});
