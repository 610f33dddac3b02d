// The generation service end to end on the demo model: a real redis-server (free port), the API
// and one in-process worker. Submit → progress events (SSE) → MP4 / GIF / sidecar; a batch with
// the model loaded once and per-request memory peaks; cancelling an active job stops it and stores
// nothing; the memory-snapshot timeline; the queue and metrics.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startService, type Service } from '../src/service/server.ts';
import { startRedis, type TestRedis } from './helpers/service.ts';

let redis: TestRedis;
let svc: Service;
const logs: string[] = [];
const PROMPT = 'a red circle moving right on a black background';
/** the demo at its smallest useful settings: 64x64, 9 frames, 3 steps */
const FAST = { 'infer.num_inference_steps': 3 };

beforeAll(async () => {
  redis = await startRedis();
  svc = await startService({ port: 0, redisUrl: redis.url, inProcessWorker: true, workerOptions: { name: 'inproc', heartbeatMs: 500 }, log: (l) => logs.push(l) });
});

afterAll(async () => {
  await svc?.close();
  await redis?.stop();
});

async function post(path: string, body: unknown): Promise<any> {
  const r = await fetch(svc.url + path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  expect(r.status, await r.clone().text()).toBe(202);
  return r.json();
}
const get = async (path: string): Promise<any> => (await fetch(svc.url + path)).json();

async function waitState(id: string, states: string[], timeoutMs = 90_000): Promise<any> {
  const t0 = Date.now();
  for (;;) {
    const s = await get(`/v1/videos/${id}`);
    if (states.includes(s.state)) return s;
    if (Date.now() - t0 > timeoutMs) throw new Error(`video ${id} still ${s.state} after ${timeoutMs} ms: ${JSON.stringify(s)}\n${logs.join('\n')}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Read an SSE stream to its end: the events in order. */
async function readEvents(id: string): Promise<Array<{ event: string; data: any }>> {
  const r = await fetch(`${svc.url}/v1/videos/${id}/events`);
  expect(r.headers.get('content-type')).toMatch(/text\/event-stream/);
  const text = await r.text(); // the server ends the stream at a final state
  return text
    .split('\n\n')
    .filter((b) => b.startsWith('event:'))
    .map((b) => {
      const [e, d] = b.split('\n');
      return { event: e!.slice(7), data: JSON.parse(d!.slice(6)) };
    });
}

const isMp4 = (b: Uint8Array) => b.length > 1000 && Buffer.from(b.subarray(4, 8)).toString('latin1') === 'ftyp';

describe('generation service (demo model, real Redis, in-process worker)', () => {
  it('submit → progress (SSE) → MP4, GIF preview and sidecar', async () => {
    const { id, state } = await post('/v1/videos', { prompt: PROMPT, 'infer.seed': 5, ...FAST });
    expect(state).toBe('queued');
    const events = await readEvents(id);
    const names = events.map((e) => e.event);
    expect(names[0]).toBe('state');
    expect(names.at(-1)).toBe('done');
    const steps = events.filter((e) => e.data.progress.phase === 'denoise').map((e) => e.data.progress.step);
    expect(steps.length).toBeGreaterThan(0);
    expect(Math.max(...steps)).toBeLessThanOrEqual(3);
    const done = events.at(-1)!.data;
    expect(done).toMatchObject({ id, state: 'completed', progress: { phase: 'done', step: 3, steps: 3 }, worker: 'inproc', error: null, attempts: 1, resumed_from_latents: false });
    expect(done.memory.peak_allocated_bytes).toBeGreaterThan(0);
    expect(done.memory.peak_reserved_bytes).toBeGreaterThanOrEqual(done.memory.peak_allocated_bytes);
    const mp4 = await fetch(svc.url + done.links.content);
    expect(mp4.headers.get('content-type')).toBe('video/mp4');
    expect(isMp4(new Uint8Array(await mp4.arrayBuffer()))).toBe(true);
    const range = await fetch(svc.url + done.links.content, { headers: { range: 'bytes=0-99' } });
    expect(range.status).toBe(206);
    expect((await range.arrayBuffer()).byteLength).toBe(100);
    const gif = await fetch(svc.url + done.links.preview);
    expect(gif.headers.get('content-type')).toBe('image/gif');
    expect(Buffer.from(await gif.arrayBuffer()).subarray(0, 6).toString('latin1')).toBe('GIF89a');
    const side = await get(done.links.sidecar);
    expect(side.config['infer.seed']).toBe(5);
    expect(side.config['infer.num_inference_steps']).toBe(3);
    expect(side.service).toMatchObject({ id, worker: 'inproc' });
    // the per-request peak is logged
    expect(logs.some((l) => l.includes(`${id} done`) && /peak allocated .*peaks reset/.test(l))).toBe(true);
    // an events stream opened after the end gets the final event at once
    expect((await readEvents(id)).map((e) => e.event)).toEqual(['done']);
    expect((await fetch(`${svc.url}/v1/videos/${id}/memory-snapshot`)).status).toBe(404);
  });

  it('a batch: every prompt done by the loaded pipeline, the same seed gives the same video, peaks per request', async () => {
    const prompts = [PROMPT, 'a blue square moving left on a gray background', PROMPT];
    const b = await post('/v1/batches', { prompts, 'infer.seed': 9, ...FAST });
    expect(b.videos).toHaveLength(3);
    for (const v of b.videos) await waitState(v, ['completed', 'failed']);
    const batch = await get(`/v1/batches/${b.id}`);
    expect(batch.state).toBe('completed');
    expect(batch.counts.completed).toBe(3);
    expect(batch.videos.map((v: any) => v.prompt)).toEqual(prompts);
    const bytes = await Promise.all(b.videos.map(async (v: string) => Buffer.from(await (await fetch(`${svc.url}/v1/videos/${v}/content`)).arrayBuffer())));
    expect(bytes[0]!.equals(bytes[2]!)).toBe(true); // the same prompt and seed: the same video
    expect(bytes[0]!.equals(bytes[1]!)).toBe(false);
    // peaks are per request (reset between them): equal for equal requests up to the text encoder's
    // per-length relative-bias tables (a few hundred bytes each at the demo's size, kept on the GPU for
    // the 4 most recent prompt lengths: request 3 holds request 2's too), not growing with the requests
    const peaks = batch.videos.map((v: any) => v.memory.peak_allocated_bytes);
    expect(Math.abs(peaks[2] - peaks[0])).toBeLessThanOrEqual(4096);
    // the prompt embeddings came from the cache for the repeated prompt (the sidecar's encode time is tiny)
    const side = await get(`/v1/videos/${b.videos[2]}/sidecar`);
    expect(side.timings_ms?.encode ?? side.timings?.encode ?? 0).toBeLessThan(1000);
  });

  it('cancelling an active job stops the generation and stores nothing; the worker goes on', async () => {
    const { id } = await post('/v1/videos', { prompt: PROMPT, 'infer.num_inference_steps': 400 });
    const t0 = Date.now();
    for (;;) {
      const s = await get(`/v1/videos/${id}`);
      if (s.state === 'active' && s.progress.phase === 'denoise' && s.progress.step >= 2) break;
      if (Date.now() - t0 > 60_000) throw new Error(`never reached step 2: ${JSON.stringify(s)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    const del = await fetch(`${svc.url}/v1/videos/${id}`, { method: 'DELETE' });
    expect(await del.json()).toEqual({ id, state: 'cancelled' });
    const tc = Date.now();
    // the worker stops within a few steps and takes the next job
    const next = await post('/v1/videos', { prompt: PROMPT, ...FAST });
    const n = await waitState(next.id, ['completed', 'failed'], 60_000);
    expect(n.state).toBe('completed');
    expect(Date.now() - tc).toBeLessThan(40_000); // 400 steps would take minutes
    const s = await get(`/v1/videos/${id}`);
    expect(s.state).toBe('cancelled');
    expect(s.progress.step).toBeLessThan(400);
    expect((await fetch(`${svc.url}/v1/videos/${id}/content`)).status).toBe(409);
    expect(logs.some((l) => l.includes(`${id} cancelled: stopped in phase`))).toBe(true);
    const keys = (await fetch(`${svc.url}/v1/queue`).then((r) => r.json())) as any;
    expect(keys.counts.cancelled).toBeGreaterThanOrEqual(1);
  });

  it('a memory snapshot of one request: the HTML timeline with its owners', async () => {
    const { id } = await post('/v1/videos', { prompt: PROMPT, ...FAST, 'report.memory_snapshot': true });
    const s = await waitState(id, ['completed', 'failed']);
    expect(s.state).toBe('completed');
    expect(s.links.memory_snapshot).toBe(`/v1/videos/${id}/memory-snapshot`);
    const r = await fetch(svc.url + s.links.memory_snapshot);
    expect(r.headers.get('content-type')).toMatch(/text\/html/);
    const html = await r.text();
    expect(html).toContain('<svg');
    // the owners legend: this request's allocations (activations, latents, the decode), by owner
    expect(html).toMatch(/<h2>Owners \(peak live bytes\)<\/h2><table><tr>/);
    expect(html).not.toContain('No events were recorded');
    // the worker's weights, loaded before the job, are in it too (the recording starts with what is held)
    expect(html).toMatch(/<td>(dit|text_encoder|vae)[.<]/);
  });

  it('queue, workers and metrics reflect the work done', async () => {
    const q = await get('/v1/queue');
    expect(q.counts.completed).toBeGreaterThanOrEqual(5);
    expect(q.workers).toHaveLength(1);
    expect(q.workers[0]).toMatchObject({ id: 'inproc', state: 'idle', job: null });
    expect(q.workers[0].jobs_done).toBeGreaterThanOrEqual(5);
    expect(q.workers[0].memory.allocated_bytes).toBeGreaterThan(0);
    const m = await (await fetch(`${svc.url}/metrics`)).text();
    const count = Number(/^sd_request_peak_allocated_bytes_count (\d+)$/m.exec(m)?.[1]);
    expect(count).toBeGreaterThanOrEqual(5);
    expect(Number(/^sd_step_seconds_count (\d+)$/m.exec(m)?.[1])).toBeGreaterThanOrEqual(15);
    expect(m).toMatch(/^sd_worker_allocated_bytes\{worker="inproc"\} \d+$/m);
  });
});
