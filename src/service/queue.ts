// The service's state in Redis, shared by the API and the workers (which may run on other machines:
// Redis is the only thing they share).
//
//   BullMQ queue `<prefix>` (default "sd-videos")   the jobs: waiting/active/completed/failed, retries, stalled-job recovery
//   sd:video:<id>          hash  the video's record: prompt, settings, times, worker, progress, memory, error, cancelled
//   sd:video:<id>:<file>   string the results (mp4, gif, json sidecar, snapshot html) and the saved latents, with a TTL
//   sd:batch:<id>          hash  a batch: its videos
//   sd:worker:<name>       string a worker's heartbeat (JSON, expires when the worker stops beating)
//   sd:workers             set   the names of workers seen
//   sd:metrics             hash  counters for /metrics (histogram buckets of peak memory and step time)

import { randomBytes } from 'node:crypto';
import type { Redis } from 'ioredis';
import { Queue, type Job } from 'bullmq';

export const QUEUE_NAME = 'sd-videos';
export const KEY = {
  video: (id: string) => `sd:video:${id}`,
  file: (id: string, name: FileName) => `sd:video:${id}:${name}`,
  batch: (id: string) => `sd:batch:${id}`,
  worker: (name: string) => `sd:worker:${name}`,
  workers: 'sd:workers',
  metrics: 'sd:metrics',
} as const;

export type FileName = 'mp4' | 'gif' | 'sidecar' | 'snapshot' | 'latents';
export const FILE_NAMES: readonly FileName[] = ['mp4', 'gif', 'sidecar', 'snapshot', 'latents'];

export type VideoState = 'queued' | 'active' | 'completed' | 'failed' | 'cancelled';

/** What a job carries (BullMQ job data). */
export interface JobData {
  id: string;
  prompt: string;
  settings: Record<string, unknown>;
  memorySnapshot: boolean;
  batch: string | null;
}

export function newId(kind: 'v' | 'b'): string {
  return `${kind}_${Date.now().toString(36)}${randomBytes(6).toString('hex')}`;
}

/** An id as a route may carry it (anything else is a 404 without touching Redis). */
export const ID_PATTERN = /^[vb]_[0-9a-z]{6,40}$/;

/** Prometheus histogram buckets: bytes (peak GPU memory per request) and seconds (per denoising step). */
export const BYTE_BUCKETS = [2 ** 20, 16 * 2 ** 20, 64 * 2 ** 20, 256 * 2 ** 20, 2 ** 30, 4 * 2 ** 30, 16 * 2 ** 30, 64 * 2 ** 30];
export const STEP_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

export interface WorkerInfo {
  id: string;
  host: string;
  model: string;
  state: 'idle' | 'busy';
  job: string | null;
  memory: { allocated_bytes: number; reserved_bytes: number; peak_allocated_bytes: number };
  jobs_done: number;
  last_seen: string;
}

export interface VideoStatus {
  id: string;
  state: VideoState;
  prompt: string;
  batch: string | null;
  progress: { phase: string; step: number; steps: number };
  eta_seconds: number | null;
  created_at: string | null;
  started_at: string | null;
  finished_at: string | null;
  worker: string | null;
  attempts: number;
  resumed_from_latents: boolean;
  memory: { peak_allocated_bytes: number; peak_reserved_bytes: number } | null;
  error: string | null;
  settings: Record<string, unknown>;
  links: { content: string; preview: string; sidecar: string; memory_snapshot: string | null; events: string };
}

function num(v: string | undefined | null): number | null {
  if (v === undefined || v === null || v === '') return null;
  const n = Number(v);
  return Number.isFinite(n) ? n : null;
}

function json<T>(v: string | undefined | null, fallback: T): T {
  if (!v) return fallback;
  try {
    return JSON.parse(v) as T;
  } catch {
    return fallback;
  }
}

/** BullMQ's state → the API's. */
function mapState(s: string | null): VideoState | null {
  switch (s) {
    case 'waiting':
    case 'delayed':
    case 'prioritized':
    case 'waiting-children':
      return 'queued';
    case 'active':
      return 'active';
    case 'completed':
      return 'completed';
    case 'failed':
      return 'failed';
    default:
      return null;
  }
}

/** The queue and records as the API sees them. */
export class ServiceQueue {
  readonly queue: Queue<JobData>;
  constructor(
    readonly redis: Redis,
    /** a client whose commands wait for a reconnect (BullMQ's) */
    blocking: Redis,
    readonly opts: { resultTtlSeconds: number; queueName?: string },
  ) {
    this.queue = new Queue<JobData>(opts.queueName ?? QUEUE_NAME, { connection: blocking });
    this.queue.on('error', () => {}); // connection errors: the clients log them once; the API answers 503
  }

  async submit(reqs: Array<Omit<JobData, 'id'>>): Promise<string[]> {
    const now = new Date().toISOString();
    const ttl = this.opts.resultTtlSeconds;
    const jobs = reqs.map((r) => ({ ...r, id: newId('v') }));
    const m = this.redis.multi();
    for (const j of jobs) {
      m.hset(KEY.video(j.id), { prompt: j.prompt, settings: JSON.stringify(j.settings), memory_snapshot: j.memorySnapshot ? '1' : '0', batch: j.batch ?? '', created_at: now });
      m.expire(KEY.video(j.id), ttl);
    }
    await m.exec();
    await this.queue.addBulk(
      jobs.map((j) => ({
        name: 'video',
        data: j,
        opts: { jobId: j.id, attempts: 1, removeOnComplete: { age: ttl }, removeOnFail: { age: ttl } },
      })),
    );
    return jobs.map((j) => j.id);
  }

  async status(id: string, base = ''): Promise<VideoStatus | null> {
    const [rec, job] = await Promise.all([this.redis.hgetall(KEY.video(id)), this.queue.getJob(id) as Promise<Job<JobData> | undefined>]);
    if (!rec || Object.keys(rec).length === 0) return null;
    let state: VideoState;
    if (rec.cancelled === '1') state = 'cancelled';
    else {
      const bull = job ? mapState(await job.getState()) : null;
      // the record's final state wins over BullMQ's 'active' in the moment between storing the results and completing the job
      if (rec.state === 'completed' || rec.state === 'failed') state = rec.state;
      else state = bull ?? (rec.state as VideoState | undefined) ?? 'queued';
    }
    const prog = json<{ phase?: string; step?: number; steps?: number }>(rec.progress, {});
    const l = `${base}/v1/videos/${id}`;
    return {
      id,
      state,
      prompt: rec.prompt ?? '',
      batch: rec.batch || null,
      progress: { phase: state === 'queued' ? 'queued' : state === 'completed' ? 'done' : (prog.phase ?? 'queued'), step: prog.step ?? 0, steps: prog.steps ?? 0 },
      eta_seconds: state === 'active' ? num(rec.eta_seconds) : state === 'queued' ? null : 0,
      created_at: rec.created_at || null,
      started_at: rec.started_at || null,
      finished_at: rec.finished_at || null,
      worker: rec.worker || null,
      attempts: Number(rec.attempts ?? 0),
      resumed_from_latents: rec.resumed_from_latents === '1',
      memory: rec.memory ? json(rec.memory, null) : null,
      error: state === 'failed' ? rec.error || (job?.failedReason ?? 'failed') : state === 'cancelled' ? 'cancelled by a DELETE request' : null,
      settings: json(rec.settings, {}),
      links: { content: `${l}/content`, preview: `${l}/preview`, sidecar: `${l}/sidecar`, memory_snapshot: rec.memory_snapshot === '1' ? `${l}/memory-snapshot` : null, events: `${l}/events` },
    };
  }

  /** Cancel a queued or active video; a finished (or already cancelled) one stays as it is: `changed` false. */
  async cancel(id: string): Promise<{ state: VideoState; changed: boolean } | null> {
    const s = await this.status(id);
    if (!s) return null;
    if (s.state === 'completed' || s.state === 'failed' || s.state === 'cancelled') return { state: s.state, changed: false };
    // the flag first: a worker polls it between steps and stops; a waiting job is removed outright
    await this.redis.multi().hset(KEY.video(id), { cancelled: '1', finished_at: new Date().toISOString() }).hincrby(KEY.metrics, 'cancelled', 1).exec();
    const job = await this.queue.getJob(id);
    if (job) await job.remove().catch(() => {}); // locked (active): the worker's abort ends it
    await this.redis.del(...FILE_NAMES.map((f) => KEY.file(id, f)));
    return { state: 'cancelled', changed: true };
  }

  async file(id: string, name: FileName): Promise<Buffer | null> {
    return this.redis.getBuffer(KEY.file(id, name));
  }

  async counts(): Promise<Record<VideoState, number>> {
    const c = await this.queue.getJobCounts('waiting', 'delayed', 'prioritized', 'active', 'completed', 'failed');
    return {
      queued: (c.waiting ?? 0) + (c.delayed ?? 0) + (c.prioritized ?? 0),
      active: c.active ?? 0,
      completed: c.completed ?? 0,
      // a cancelled active job ends as a BullMQ failure: counted apart
      failed: Math.max(0, (c.failed ?? 0) - Number((await this.redis.hget(KEY.metrics, 'cancelled_active')) ?? 0)),
      cancelled: Number((await this.redis.hget(KEY.metrics, 'cancelled')) ?? 0),
    };
  }

  async workers(): Promise<WorkerInfo[]> {
    const names = await this.redis.smembers(KEY.workers);
    if (names.length === 0) return [];
    const vals = await this.redis.mget(...names.map((n) => KEY.worker(n)));
    const gone = names.filter((_, i) => vals[i] === null);
    if (gone.length) await this.redis.srem(KEY.workers, ...gone);
    return vals.filter((v): v is string => v !== null).map((v) => JSON.parse(v) as WorkerInfo).sort((a, b) => a.id.localeCompare(b.id));
  }

  async createBatch(prompts: string[], settings: Record<string, unknown>, memorySnapshot: boolean): Promise<{ id: string; videos: string[] }> {
    const id = newId('b');
    const videos = await this.submit(prompts.map((prompt) => ({ prompt, settings, memorySnapshot, batch: id })));
    await this.redis.multi().hset(KEY.batch(id), { videos: JSON.stringify(videos), created_at: new Date().toISOString(), settings: JSON.stringify(settings) }).expire(KEY.batch(id), this.opts.resultTtlSeconds).exec();
    return { id, videos };
  }

  async batch(id: string, base = ''): Promise<{ id: string; created_at: string; state: VideoState; counts: Record<VideoState, number>; videos: VideoStatus[] } | null> {
    const rec = await this.redis.hgetall(KEY.batch(id));
    if (!rec || !rec.videos) return null;
    const ids = json<string[]>(rec.videos, []);
    const videos = (await Promise.all(ids.map((v) => this.status(v, base)))).filter((v): v is VideoStatus => v !== null);
    const counts: Record<VideoState, number> = { queued: 0, active: 0, completed: 0, failed: 0, cancelled: 0 };
    for (const v of videos) counts[v.state]++;
    const state: VideoState = counts.active ? 'active' : counts.queued ? 'queued' : counts.failed ? 'failed' : counts.completed ? 'completed' : 'cancelled';
    return { id, created_at: rec.created_at ?? '', state, counts, videos };
  }

  async metricsHash(): Promise<Record<string, string>> {
    return this.redis.hgetall(KEY.metrics);
  }

  async close(): Promise<void> {
    await this.queue.close().catch(() => {});
  }
}
