// Several worker processes on one queue (a real redis-server on a free port): two workers share 6
// jobs; a worker SIGKILLed mid-denoise has its job finished by the other (BullMQ's stalled-job
// check; no partial file is ever served); a worker killed after storing the latents has its job
// only decoded by the next one.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { Redis } from 'ioredis';
import { startService, type Service } from '../src/service/server.ts';
import { startRedis, spawnWorker, type TestRedis, type WorkerProcess } from './helpers/service.ts';

let redis: TestRedis;
let svc: Service;
let rc: Redis;
const workers: WorkerProcess[] = [];
const PROMPT = 'a red circle moving right on a black background';
/** short locks so a dead worker's job is found stalled within seconds */
const FAST_LOCKS = ['--lock-ms', '4000', '--stalled-ms', '1000'];

beforeAll(async () => {
  redis = await startRedis();
  rc = new Redis(redis.url);
  svc = await startService({ port: 0, redisUrl: redis.url, inProcessWorker: false, log: () => {} });
});

afterAll(async () => {
  for (const w of workers) w.kill('SIGKILL');
  await Promise.all(workers.map((w) => w.exited));
  rc?.disconnect();
  await svc?.close();
  await redis?.stop();
});

function worker(name: string, extra: string[] = []): WorkerProcess {
  const w = spawnWorker(redis.url, ['--name', name, ...FAST_LOCKS, ...extra]);
  workers.push(w);
  return w;
}

async function post(body: unknown): Promise<string> {
  const r = await fetch(`${svc.url}/v1/videos`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  expect(r.status).toBe(202);
  return ((await r.json()) as { id: string }).id;
}
const status = async (id: string): Promise<any> => (await fetch(`${svc.url}/v1/videos/${id}`)).json();

async function until<T>(what: string, f: () => Promise<T | null | undefined | false>, timeoutMs = 90_000): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}\n${workers.map((w) => w.output().slice(-1500)).join('\n---\n')}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const isMp4 = (b: Buffer) => b.length > 1000 && b.subarray(4, 8).toString('latin1') === 'ftyp';

describe('service workers (separate processes, one Redis)', () => {
  it('two workers share a queue of 6 jobs', async () => {
    const a = worker('wa');
    const b = worker('wb');
    await Promise.all([a.ready, b.ready]);
    const ids: string[] = [];
    for (let i = 0; i < 6; i++) ids.push(await post({ prompt: PROMPT, 'infer.seed': i, 'infer.num_inference_steps': 2, 'infer.num_frames': 5 }));
    const done = await until('6 completed videos', async () => {
      const s = await Promise.all(ids.map(status));
      return s.every((x) => x.state === 'completed' || x.state === 'failed') ? s : null;
    });
    expect(done.map((s) => s.state)).toEqual(Array(6).fill('completed'));
    const by = new Set(done.map((s) => s.worker));
    expect([...by].sort()).toEqual(['wa', 'wb']);
    const q = (await (await fetch(`${svc.url}/v1/queue`)).json()) as any;
    expect(q.workers.map((w: any) => w.id)).toEqual(['wa', 'wb']);
    expect(q.workers.reduce((n: number, w: any) => n + w.jobs_done, 0)).toBeGreaterThanOrEqual(6);
  });

  it('a worker SIGKILLed mid-job: the other finishes the job, no partial file is served', async () => {
    const id = await post({ prompt: PROMPT, 'infer.seed': 11, 'infer.num_inference_steps': 30 });
    const first = await until('the job to reach step 3', async () => {
      const s = await status(id);
      return s.state === 'active' && s.progress.phase === 'denoise' && s.progress.step >= 3 ? s : null;
    });
    const victim = workers.find((w) => w.output().includes(`worker ${first.worker} ready`))!;
    victim.kill('SIGKILL');
    await victim.exited;
    // while nobody holds it: no file
    const c = await fetch(`${svc.url}/v1/videos/${id}/content`);
    expect(c.status).toBe(409);
    const end = await until('the job to finish on the other worker', async () => {
      const s = await status(id);
      const r = await fetch(`${svc.url}/v1/videos/${id}/content`);
      // content is either refused (not completed) or the whole MP4
      if (r.status === 200) expect(isMp4(Buffer.from(await r.arrayBuffer()))).toBe(true);
      else {
        expect(r.status).toBe(409);
        await r.arrayBuffer();
      }
      return s.state === 'completed' || s.state === 'failed' ? s : null;
    });
    expect(end.state).toBe('completed');
    expect(end.worker).not.toBe(first.worker);
    expect(end.attempts).toBe(2);
    expect(end.resumed_from_latents).toBe(false);
    const side = (await (await fetch(`${svc.url}/v1/videos/${id}/sidecar`)).json()) as any;
    expect(side.service.worker).toBe(end.worker);
  });

  it('a worker killed after storing the latents: the next one only decodes', async () => {
    // the survivor of the last test stops (SIGTERM: it finishes nothing, it is idle), a pausing one takes the job
    const survivor = workers.find((w) => w.child.exitCode === null && w.child.signalCode === null)!;
    survivor.kill('SIGTERM');
    await survivor.exited;
    const p = worker('wpause', ['--pause-after-latents-ms', '60000']);
    await p.ready;
    const id = await post({ prompt: PROMPT, 'infer.seed': 12, 'infer.num_inference_steps': 2, 'infer.num_frames': 5 });
    await until('the job to be taken', async () => (await status(id)).state === 'active');
    const r = worker('wresume'); // starts while the first one denoises and waits
    await until('the latents to be stored', async () => (await rc.hget(`sd:video:${id}`, 'latents_saved')) === '1');
    expect((await rc.getBuffer(`sd:video:${id}:latents`))!.byteLength).toBeGreaterThan(0);
    await r.ready;
    expect((await status(id)).worker).toBe('wpause');
    p.kill('SIGKILL');
    await p.exited;
    const end = await until('the decode-only retry', async () => {
      const s = await status(id);
      return s.state === 'completed' || s.state === 'failed' ? s : null;
    });
    expect(end).toMatchObject({ state: 'completed', worker: 'wresume', attempts: 2, resumed_from_latents: true });
    expect(r.output()).toContain(`${id}: latents saved by an earlier attempt: decoding only`);
    expect(isMp4(Buffer.from(await (await fetch(`${svc.url}/v1/videos/${id}/content`)).arrayBuffer()))).toBe(true);
    // the latents are dropped once the video is stored
    expect(await rc.exists(`sd:video:${id}:latents`)).toBe(0);
    // the job folders the SIGKILLed workers left were removed by the workers started after them
    const killed = workers.filter((w) => w.child.signalCode === 'SIGKILL' && w !== p).map((w) => w.child.pid);
    expect(killed.length).toBe(1);
    expect(readdirSync(tmpdir()).filter((f) => killed.some((pid) => f.startsWith(`sd-job-${pid}-`)))).toEqual([]);
  });
});
