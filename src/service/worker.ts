// A service worker: one pipeline loaded once (its model, memory level or budget from its config),
// taking jobs from the BullMQ queue in Redis. Any number of them, on any number of machines, share
// one queue; a worker that dies mid-job loses its lock and BullMQ's stalled-job check gives the job
// to another. The latents are stored in Redis before the decode, so a retried job whose denoise had
// finished only decodes. Per request: the GPU peaks are reset before it and logged after it (the
// reference's "log peak memory per request, reset the peak after each").

import { mkdtempSync, readFileSync, readdirSync, rmSync, copyFileSync, mkdirSync } from 'node:fs';
import { pidAlive, registerTemp, unregisterTemp } from '../io/cleanup.ts';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker, UnrecoverableError, type Job } from 'bullmq';
import { dottedLayer, resolveSettings } from '../config/settings.ts';
import { WanPipeline, type GenerateResult, type Latents, type ProgressEvent } from '../pipeline/wan-pipeline.ts';
import { outputPaths, writeVideoOutputs } from '../pipeline/outputs.ts';
import { runPeaks, sidecar } from '../pipeline/report.ts';
import { takeSnapshot, renderSnapshotHtml } from '../memory/snapshot.ts';
import { InterruptedError, fmtBytes } from '../util/errors.ts';
import { describe as describeError } from '../cli/fail.ts';
import { resolveModelDir } from '../cli/args.ts';
import { connectRedis } from './redis.ts';
import { KEY, QUEUE_NAME, BYTE_BUCKETS, STEP_BUCKETS, type FileName, type JobData, type WorkerInfo } from './queue.ts';
import { requestFields } from './api-schema.ts';


export interface WorkerOptions {
  redisUrl: string;
  /** model folder (default: the config's `model`, else the embedded demo model) */
  model?: string;
  /** load-time settings by dotted key (`infer.diffusion.low_mem_level`, `infer.vram_budget`, ...); request keys set this worker's defaults */
  config?: Record<string, unknown>;
  /** a YAML config file (as the CLI's --config) below `config` */
  configFile?: string;
  /** this worker's name in /v1/queue and the logs (default host-pid) */
  name?: string;
  /** BullMQ lock: a job whose worker stops renewing its lock for this long is stalled (default 30000 ms) */
  lockDurationMs?: number;
  /** how often workers look for stalled jobs (default 30000 ms) */
  stalledIntervalMs?: number;
  /** how many times a job may stall before it fails (default 2) */
  maxStalledCount?: number;
  /** how long results stay in Redis (default 24 h) */
  resultTtlSeconds?: number;
  /** largest result file stored in Redis (default 256 MiB): a bigger one fails the job with a clear error */
  maxResultBytes?: number;
  /** also copy every result to this folder (a shared disk, if the operator has one): <dir>/<id>.mp4, .gif, .json */
  outputDir?: string;
  /** heartbeat period (default 2000 ms) */
  heartbeatMs?: number;
  /** tests: wait this long after storing the latents, before decoding (so a test can kill the worker there) */
  pauseAfterLatentsMs?: number;
  queueName?: string;
  log?: (line: string) => void;
}

export interface ServiceWorker {
  name: string;
  pipe: WanPipeline;
  close(): Promise<void>;
}

const FILE_TYPES: Record<Exclude<FileName, 'latents'>, string> = { mp4: '.mp4', gif: '.gif', sidecar: '.json', snapshot: '.memory.html' };

/** Load the pipeline, then take jobs until closed. */
export async function startWorker(opts: WorkerOptions): Promise<ServiceWorker> {
  const log = opts.log ?? ((l: string) => process.stderr.write(`${l}\n`));
  const name = opts.name ?? `${hostname()}-${process.pid}`;
  const ttl = opts.resultTtlSeconds ?? 24 * 3600;
  const maxResult = opts.maxResultBytes ?? 256 * 2 ** 20;
  const hbMs = opts.heartbeatMs ?? 2000;
  const config = { ...(opts.config ?? {}) };
  if (opts.model) config.model = opts.model;
  const settings = resolveSettings({ configFile: opts.configFile ?? null, layers: [dottedLayer(config, ' in the worker config')], resolveModel: resolveModelDir });
  // job folders of workers on this machine that were killed (SIGKILL leaves them behind)
  for (const f of readdirSync(tmpdir())) {
    const m = /^sd-job-(\d+)-/.exec(f);
    if (m && !pidAlive(Number(m[1]))) rmSync(join(tmpdir(), f), { recursive: true, force: true });
  }
  const redis = connectRedis(opts.redisUrl, 'blocking', (l) => log(`[${name}] ${l}`));
  const t0 = performance.now();
  const pipe = await WanPipeline.fromSettings(settings);
  log(`[${name}] loaded ${settings.load.model} (level ${pipe.plan.level}) in ${((performance.now() - t0) / 1000).toFixed(1)} s; waiting for jobs`);

  let current: string | null = null;
  let jobsDone = 0;
  const heartbeat = async () => {
    const s = pipe.engine.allocator.stats();
    const info: WorkerInfo = {
      id: name,
      host: hostname(),
      model: settings.load.model,
      state: current ? 'busy' : 'idle',
      job: current,
      memory: { allocated_bytes: s.allocated, reserved_bytes: s.reserved, peak_allocated_bytes: s.peakAllocated },
      jobs_done: jobsDone,
      last_seen: new Date().toISOString(),
    };
    await redis
      .multi()
      .set(KEY.worker(name), JSON.stringify(info), 'PX', Math.max(3 * hbMs, 5000))
      .sadd(KEY.workers, name)
      .exec();
  };
  const beat = () => void heartbeat().catch(() => {});
  const hbTimer = setInterval(beat, hbMs);
  hbTimer.unref();
  beat();

  const processJob = async (job: Job<JobData>): Promise<{ id: string }> => {
    const d = job.data;
    const id = d.id;
    const vkey = KEY.video(id);
    const rec = await redis.hgetall(vkey);
    if (!rec.prompt) throw new UnrecoverableError(`the record of ${id} expired before a worker took it`);
    if (rec.cancelled === '1') throw new UnrecoverableError('cancelled');
    if (rec.state === 'completed' && (await redis.exists(KEY.file(id, 'mp4')))) return { id }; // stored by a worker that died before completing the job
    current = id;
    beat();
    const started = new Date().toISOString();
    await redis.multi().hset(vkey, { state: 'active', worker: name, started_at: started, progress: JSON.stringify({ phase: 'encode', step: 0, steps: 0 }) }).hincrby(vkey, 'attempts', 1).exec();
    const abort = new AbortController();
    const poll = setInterval(() => {
      redis.hget(vkey, 'cancelled').then(
        (c) => {
          if (c === '1') abort.abort();
        },
        () => {},
      );
    }, 250);
    const tmp = mkdtempSync(join(tmpdir(), `sd-job-${process.pid}-${id}-`));
    registerTemp(tmp);
    const alloc = pipe.engine.allocator;
    const stepTimes: number[] = [];
    let lastEl = 0;
    let lastWrite = 0;
    let steps = 0;
    let phase = 'encode';
    const writeProgress = (p: Record<string, unknown>, eta: number | null, force = false) => {
      const now = performance.now();
      if (!force && now - lastWrite < 200) return;
      lastWrite = now;
      void job.updateProgress(p).catch(() => {});
      void redis.hset(vkey, { progress: JSON.stringify(p), eta_seconds: eta === null ? '' : eta.toFixed(1) }).catch(() => {});
    };
    const onProgress = (ev: ProgressEvent) => {
      if (ev.type === 'phase') {
        phase = ev.phase;
        writeProgress({ phase, step: phase === 'denoise' ? 0 : steps, steps }, null, true);
      } else if (ev.type === 'step') {
        steps = ev.total;
        stepTimes.push((ev.elapsedMs - lastEl) / 1000);
        lastEl = ev.elapsedMs;
        writeProgress({ phase: 'denoise', step: ev.step, steps: ev.total }, ev.etaMs / 1000, ev.step === ev.total);
      }
    };
    try {
      // (live: the timeline starts with the weights this worker loaded before the job)
      if (d.memorySnapshot) alloc.startRecording(undefined, { live: true });
      alloc.resetPeakMemoryStats();
      const fields = requestFields(d.settings);
      const req = { prompt: d.prompt, ...fields, onProgress, signal: abort.signal };
      const effective = pipe.resolveRequest(req);
      if (typeof d.settings['infer.fps'] === 'number') effective.output.fps = d.settings['infer.fps'];
      const result: Partial<GenerateResult> = { timingsMs: {} };
      let latents: Latents;
      const saved = await redis.getBuffer(KEY.file(id, 'latents'));
      const savedShape = rec.latents_shape ? (JSON.parse(rec.latents_shape) as Latents['shape']) : null;
      let resumed = false;
      if (saved && savedShape && saved.byteLength === savedShape.reduce((a, b) => a * b, 4)) {
        // an earlier attempt finished the denoise: decode only
        const data = new Float32Array(saved.byteLength / 4);
        new Uint8Array(data.buffer).set(saved);
        latents = { data, shape: savedShape };
        resumed = true;
        await redis.hset(vkey, 'resumed_from_latents', '1');
        log(`[${name}] ${id}: latents saved by an earlier attempt: decoding only`);
      } else {
        latents = await pipe.sample(req, result);
        const buf = Buffer.from(latents.data.buffer, latents.data.byteOffset, latents.data.byteLength);
        await redis.multi().set(KEY.file(id, 'latents'), buf, 'EX', ttl).hset(vkey, { latents_shape: JSON.stringify(latents.shape), latents_saved: '1' }).exec();
        // tests: a first attempt waits here so the test can kill the worker between the denoise and the decode
        if (opts.pauseAfterLatentsMs && Number(rec.attempts ?? 0) === 0) await new Promise((r) => setTimeout(r, opts.pauseAfterLatentsMs));
      }
      if (abort.signal.aborted) throw new InterruptedError('cancelled');
      const dec = await pipe.decode(latents, { onProgress, signal: abort.signal, result });
      if (abort.signal.aborted) throw new InterruptedError('cancelled');
      writeProgress({ phase: 'write', step: steps, steps }, 0, true);
      const paths = outputPaths(join(tmp, `${id}.mp4`));
      await writeVideoOutputs(paths, dec.video, dec.shape, { mp4: true, preview: true, frames: false, fps: effective.output.fps, signal: abort.signal });
      const memory = result.memory ?? { perPhase: {}, perStep: [], peakAllocated: 0, peakReserved: 0 };
      const peaks = runPeaks(memory);
      const run = { timingsMs: result.timingsMs ?? {}, memory, uploads: result.uploads, experts: result.experts, cache: result.cache };
      const side = { ...sidecar({ settings: effective, pipe, videoPath: `${id}.mp4`, videoShape: dec.shape, latentsPath: null, result: run }), service: { id, worker: name, batch: d.batch, resumed_from_latents: resumed } };
      const files: Array<[FileName, Buffer]> = [
        ['mp4', readFileSync(paths.video)],
        ['gif', readFileSync(paths.preview)],
        ['sidecar', Buffer.from(JSON.stringify(side, null, 2) + '\n')],
      ];
      if (d.memorySnapshot) files.push(['snapshot', Buffer.from(renderSnapshotHtml(takeSnapshot(alloc, pipe.engine.adapterName), { title: `GPU memory: ${d.prompt.slice(0, 60)} (${id}, level ${pipe.plan.level})` }))]);
      for (const [f, b] of files)
        if (b.byteLength > maxResult) throw new UnrecoverableError(`the ${f} of ${id} has ${fmtBytes(b.byteLength)}, more than the ${fmtBytes(maxResult)} a worker stores in Redis (worker --max-result-mb); raise it, or ask for a smaller video`);
      if (abort.signal.aborted) throw new InterruptedError('cancelled');
      // everything at once: a result is either whole and 'completed', or absent
      const m = redis.multi();
      for (const [f, b] of files) m.set(KEY.file(id, f), b, 'EX', ttl);
      const mem = { peak_allocated_bytes: peaks.allocated, peak_reserved_bytes: peaks.reserved };
      m.hset(vkey, { state: 'completed', finished_at: new Date().toISOString(), memory: JSON.stringify(mem), eta_seconds: '0', progress: JSON.stringify({ phase: 'done', step: steps, steps }) });
      m.del(KEY.file(id, 'latents'));
      m.hincrby(KEY.metrics, 'completed', 1);
      for (const b of BYTE_BUCKETS) if (peaks.allocated <= b) m.hincrby(KEY.metrics, `peak_bucket_${b}`, 1);
      m.hincrby(KEY.metrics, 'peak_count', 1);
      m.hincrbyfloat(KEY.metrics, 'peak_sum', peaks.allocated);
      for (const t of stepTimes) for (const b of STEP_BUCKETS) if (t <= b) m.hincrby(KEY.metrics, `step_bucket_${b}`, 1);
      m.hincrby(KEY.metrics, 'step_count', stepTimes.length);
      m.hincrbyfloat(KEY.metrics, 'step_sum', stepTimes.reduce((a, b) => a + b, 0));
      await m.exec();
      if (opts.outputDir) {
        mkdirSync(opts.outputDir, { recursive: true });
        copyFileSync(paths.video, join(opts.outputDir, `${id}.mp4`));
        copyFileSync(paths.preview, join(opts.outputDir, `${id}.gif`));
      }
      jobsDone++;
      const secs = (Date.parse(new Date().toISOString()) - Date.parse(started)) / 1000;
      log(`[${name}] ${id} done in ${secs.toFixed(1)} s${resumed ? ' (decode only)' : ''}: peak allocated ${fmtBytes(peaks.allocated)}, peak reserved ${fmtBytes(peaks.reserved)} (peaks reset before the next request)`);
      return { id };
    } catch (e) {
      if (abort.signal.aborted || (await redis.hget(vkey, 'cancelled').catch(() => null)) === '1') {
        await redis
          .multi()
          .del(...(['mp4', 'gif', 'sidecar', 'snapshot', 'latents'] as const).map((f) => KEY.file(id, f)))
          .hincrby(KEY.metrics, 'cancelled_active', 1)
          .exec()
          .catch(() => {});
        log(`[${name}] ${id} cancelled: stopped in phase ${phase}, nothing stored`);
        throw new UnrecoverableError('cancelled');
      }
      const line = e instanceof UnrecoverableError ? e.message : describeError(e).line;
      await redis.hset(vkey, { state: 'failed', error: line, finished_at: new Date().toISOString() }).catch(() => {});
      await redis.hincrby(KEY.metrics, 'failed', 1).catch(() => {});
      log(`[${name}] ${id} failed: ${line}`);
      throw new UnrecoverableError(line);
    } finally {
      clearInterval(poll);
      if (d.memorySnapshot) alloc.stopRecording();
      alloc.resetPeakMemoryStats();
      rmSync(tmp, { recursive: true, force: true });
      unregisterTemp(tmp);
      current = null;
      beat();
    }
  };

  const wconn = connectRedis(opts.redisUrl, 'blocking', (l) => log(`[${name}] queue: ${l}`));
  const worker = new Worker<JobData, { id: string }>(opts.queueName ?? QUEUE_NAME, processJob, {
    connection: wconn,
    concurrency: 1,
    lockDuration: opts.lockDurationMs ?? 30_000,
    stalledInterval: opts.stalledIntervalMs ?? 30_000,
    maxStalledCount: opts.maxStalledCount ?? 2,
    name,
  });
  // BullMQ repeats a connection error on every retry: said once per distinct message and minute
  let lastErr = '';
  let lastErrAt = 0;
  worker.on('error', (e) => {
    const m = e.message.split('\n')[0]!;
    if (m === lastErr && Date.now() - lastErrAt < 60_000) return;
    lastErr = m;
    lastErrAt = Date.now();
    log(`[${name}] queue error: ${m}`);
  });
  worker.on('stalled', (jobId) => log(`[${name}] job ${jobId} stalled (its worker stopped renewing the lock): back in the queue`));

  let closed = false;
  return {
    name,
    pipe,
    async close() {
      if (closed) return;
      closed = true;
      clearInterval(hbTimer);
      // with Redis reachable: finish the running job, then stop; without: stop now (the job's lock
      // expires and another worker takes it), never wait forever for a Redis that is gone
      const graceful = wconn.status === 'ready';
      await Promise.race([worker.close(!graceful).catch(() => {}), ...(graceful ? [] : [new Promise((r) => setTimeout(r, 3000))])]);
      await redis.multi().del(KEY.worker(name)).srem(KEY.workers, name).exec().catch(() => {});
      redis.disconnect();
      wconn.disconnect();
      pipe.dispose();
    },
  };
}
