// The generation service's HTTP API, on Node's own `http` (no framework: the API is a dozen routes,
// Node's server streams SSE and binary bodies as they are, and nothing new has to be installed or
// audited). Jobs go to a BullMQ queue in Redis (queue.ts); workers (worker.ts) take them. With no
// Redis URL it starts a local redis-server and one in-process worker: `npm run serve` then one
// `curl` makes a video.

import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { readFileSync, existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { timingSafeEqual } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { QueueEvents } from 'bullmq';
import type { Redis } from 'ioredis';
import { ConfigError, SmartDiffusionError } from '../util/errors.ts';
import { describe as describeError } from '../cli/fail.ts';
import { connectRedis, isRedisDown, RedisDownError, startLocalRedis, redactUrl, type LocalRedis } from './redis.ts';
import { ServiceQueue, QUEUE_NAME, ID_PATTERN, BYTE_BUCKETS, STEP_BUCKETS, type FileName, type VideoStatus } from './queue.ts';
import { parseBatchRequest, parseBatchText, parseVideoRequest, DEFAULT_MAX_PIXELS, MAX_PROMPTS_TEXT } from './api-schema.ts';
import { openApiText } from './openapi.ts';
import { startWorker, type ServiceWorker, type WorkerOptions } from './worker.ts';

const WEB_DIR = join(dirname(fileURLToPath(import.meta.url)), 'web');

export interface ServiceOptions {
  /** 0 = a free port (default 8080) */
  port?: number;
  /** default 127.0.0.1; anything else needs an API key */
  host?: string;
  /** none: start a local redis-server (temporary, no persistence) */
  redisUrl?: string;
  /** run one worker in this process (default: true when the service started its own Redis) */
  inProcessWorker?: boolean;
  workerOptions?: Partial<WorkerOptions>;
  /** every /v1 route then needs `Authorization: Bearer <key>` */
  apiKey?: string;
  /** the in-process worker also copies results here */
  outputDir?: string;
  /** largest request body (default 64 KiB) */
  maxBodyBytes?: number;
  /** largest width x height x frames a request may ask for */
  maxPixels?: number;
  /** how long records and results stay in Redis (default 24 h) */
  resultTtlSeconds?: number;
  /** how long an API call waits for Redis before answering 503 (default 3000 ms) */
  redisTimeoutMs?: number;
  log?: (line: string) => void;
  queueName?: string;
}

export interface Service {
  url: string;
  port: number;
  redisUrl: string;
  /** the in-process worker, if any */
  worker: ServiceWorker | null;
  close(): Promise<void>;
}

/** An HTTP error with its status (the body is `{ error }`). */
class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

const LOCAL_HOSTS = new Set(['127.0.0.1', 'localhost', '::1']);

const CONTENT: Record<string, { name: FileName; type: string }> = {
  content: { name: 'mp4', type: 'video/mp4' },
  preview: { name: 'gif', type: 'image/gif' },
  sidecar: { name: 'sidecar', type: 'application/json' },
  'memory-snapshot': { name: 'snapshot', type: 'text/html; charset=utf-8' },
};

const WEB_TYPES: Record<string, string> = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8', '.svg': 'image/svg+xml', '.png': 'image/png', '.ico': 'image/x-icon' };

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.headersSent) {
    res.end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store', ...headers });
  res.end(text);
}

function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const len = Number(req.headers['content-length'] ?? NaN);
  if (Number.isFinite(len) && len > limit) return Promise.reject(new HttpError(413, `the request body has ${len} bytes, more than the ${limit} accepted (serve --max-body-kb); send only the prompt and settings`));
  return new Promise((res, rej) => {
    const parts: Buffer[] = [];
    let n = 0;
    let over = false;
    req.on('data', (c: Buffer) => {
      if (over) return;
      n += c.length;
      if (n > limit) {
        over = true;
        rej(new HttpError(413, `the request body is larger than the ${limit} bytes accepted (serve --max-body-kb); send only the prompt and settings`));
        return;
      }
      parts.push(c);
    });
    req.on('end', () => {
      if (!over) res(Buffer.concat(parts));
    });
    req.on('error', rej);
  });
}

async function readJson(req: IncomingMessage, limit: number): Promise<unknown> {
  const ct = String(req.headers['content-type'] ?? '');
  if (ct && !/json/i.test(ct)) throw new HttpError(415, `the body must be JSON (Content-Type: application/json), got Content-Type ${JSON.stringify(ct.slice(0, 60))}`);
  const buf = await readBody(req, limit);
  if (buf.length === 0) throw new HttpError(400, 'the request body is empty: send JSON such as {"prompt": "a red circle moving right on a black background"}');
  try {
    return JSON.parse(buf.toString('utf8'));
  } catch (e) {
    throw new HttpError(400, `the request body is not valid JSON (${(e as Error).message.split('\n')[0]!.slice(0, 120)}); send e.g. {"prompt": "a red circle moving right on a black background"}`);
  }
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([
    p,
    new Promise<T>((_, rej) => {
      t = setTimeout(() => rej(new RedisDownError(`Redis did not answer within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(t));
}

function keyMatches(header: string | undefined, key: string): boolean {
  const m = /^Bearer\s+(.+)$/i.exec(header ?? '');
  if (!m) return false;
  const a = Buffer.from(m[1]!.trim());
  const b = Buffer.from(key);
  return a.length === b.length && timingSafeEqual(a, b);
}

function prometheus(counts: Record<string, number>, workers: Awaited<ReturnType<ServiceQueue['workers']>>, h: Record<string, string>): string {
  const L: string[] = [];
  const metric = (name: string, type: string, help: string) => L.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
  metric('sd_redis_up', 'gauge', 'whether Redis answered');
  L.push('sd_redis_up 1');
  metric('sd_queue_depth', 'gauge', 'videos waiting for a worker');
  L.push(`sd_queue_depth ${counts.queued ?? 0}`);
  metric('sd_jobs', 'gauge', 'videos by state (completed and failed ones are kept for the result TTL)');
  for (const [s, n] of Object.entries(counts)) L.push(`sd_jobs{state="${s}"} ${n}`);
  metric('sd_workers', 'gauge', 'workers with a live heartbeat');
  L.push(`sd_workers ${workers.length}`);
  const esc = (s: string) => s.replace(/["\\\n]/g, (c) => (c === '\n' ? '\\n' : `\\${c}`));
  metric('sd_worker_busy', 'gauge', 'whether the worker is running a job');
  for (const w of workers) L.push(`sd_worker_busy{worker="${esc(w.id)}"} ${w.state === 'busy' ? 1 : 0}`);
  metric('sd_worker_allocated_bytes', 'gauge', "GPU bytes the worker's allocator holds for tensors now");
  for (const w of workers) L.push(`sd_worker_allocated_bytes{worker="${esc(w.id)}"} ${w.memory.allocated_bytes}`);
  metric('sd_worker_reserved_bytes', 'gauge', "GPU bytes the worker's allocator has reserved from the device now");
  for (const w of workers) L.push(`sd_worker_reserved_bytes{worker="${esc(w.id)}"} ${w.memory.reserved_bytes}`);
  metric('sd_worker_jobs_done', 'counter', 'videos the worker completed since it started');
  for (const w of workers) L.push(`sd_worker_jobs_done{worker="${esc(w.id)}"} ${w.jobs_done}`);
  const hist = (name: string, help: string, prefix: string, buckets: number[]) => {
    metric(name, 'histogram', help);
    for (const b of buckets) L.push(`${name}_bucket{le="${b}"} ${Number(h[`${prefix}_bucket_${b}`] ?? 0)}`);
    L.push(`${name}_bucket{le="+Inf"} ${Number(h[`${prefix}_count`] ?? 0)}`);
    L.push(`${name}_sum ${Number(h[`${prefix}_sum`] ?? 0)}`);
    L.push(`${name}_count ${Number(h[`${prefix}_count`] ?? 0)}`);
  };
  hist('sd_request_peak_allocated_bytes', 'peak GPU bytes allocated per completed request (peaks reset between requests)', 'peak', BYTE_BUCKETS);
  hist('sd_step_seconds', 'wall time of one denoising step', 'step', STEP_BUCKETS);
  return L.join('\n') + '\n';
}

/** Start the API (and, by default with no Redis URL, a local Redis and one in-process worker). */
export async function startService(opts: ServiceOptions = {}): Promise<Service> {
  const log = opts.log ?? ((l: string) => process.stderr.write(`${l}\n`));
  const host = opts.host ?? '127.0.0.1';
  const apiKey = opts.apiKey || undefined;
  if (!LOCAL_HOSTS.has(host) && !apiKey) throw new ConfigError(`serving on ${host} (not localhost) needs an API key: pass --api-key KEY or set SMART_DIFFUSION_API_KEY`);
  const maxBody = opts.maxBodyBytes ?? 64 * 1024;
  const maxPixels = opts.maxPixels ?? DEFAULT_MAX_PIXELS;
  const ttl = opts.resultTtlSeconds ?? 24 * 3600;
  const redisTimeout = opts.redisTimeoutMs ?? 3000;
  let local: LocalRedis | null = null;
  let redisUrl = opts.redisUrl;
  if (!redisUrl) {
    local = await startLocalRedis({ log });
    redisUrl = local.url;
  }
  const api: Redis = connectRedis(redisUrl, 'api', log);
  // wait a moment for the first connection (the API answers 503 until there is one)
  await new Promise<void>((res) => {
    if (api.status === 'ready') return res();
    const t = setTimeout(() => {
      log(`redis ${redactUrl(redisUrl!)} is not reachable yet: the API answers 503 until it is`);
      res();
    }, 5000);
    api.once('ready', () => {
      clearTimeout(t);
      res();
    });
  });
  const sq = new ServiceQueue(api, api, { resultTtlSeconds: ttl, queueName: opts.queueName });
  const eventsConn = connectRedis(redisUrl, 'blocking');
  const qe = new QueueEvents(opts.queueName ?? QUEUE_NAME, { connection: eventsConn });
  qe.on('error', () => {});
  const bus = new EventEmitter();
  bus.setMaxListeners(0);
  for (const ev of ['active', 'progress', 'completed', 'failed', 'removed', 'waiting', 'stalled'] as const) qe.on(ev as 'active', (a: { jobId: string }) => bus.emit(a.jobId, ev));

  let worker: ServiceWorker | null = null;
  const sockets = new Set<ServerResponse>();

  const redisCall = <T>(p: () => Promise<T>): Promise<T> => {
    if (api.status !== 'ready') return Promise.reject(new RedisDownError('Redis is unreachable'));
    return withTimeout(p(), redisTimeout);
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://x');
    const path = url.pathname;
    const method = req.method ?? 'GET';
    const base = '';
    // ---- open routes
    if (path === '/healthz') {
      const up = await redisCall(() => api.ping()).then(
        () => true,
        () => false,
      );
      return sendJson(res, up ? 200 : 503, { ok: up, redis: up ? 'up' : 'down' });
    }
    if (path === '/openapi.json') {
      const t = openApiText();
      res.writeHead(200, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(t) });
      return void res.end(t);
    }
    if (path === '/metrics') {
      let text: string;
      try {
        const [counts, workers, h] = await redisCall(() => Promise.all([sq.counts(), sq.workers(), sq.metricsHash()]));
        text = prometheus(counts, workers, h);
      } catch {
        text = '# HELP sd_redis_up whether Redis answered\n# TYPE sd_redis_up gauge\nsd_redis_up 0\n';
      }
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' });
      return void res.end(text);
    }
    if (method === 'GET' && (path === '/' || path.startsWith('/web/'))) {
      const file = path === '/' ? 'index.html' : path.slice(5);
      if (!/^[A-Za-z0-9_-][A-Za-z0-9._-]*$/.test(file)) throw new HttpError(404, `no such page ${path}`);
      const p = join(WEB_DIR, file);
      if (!existsSync(p)) throw new HttpError(404, path === '/' ? 'the web page is not installed (src/service/web/index.html); the API is at /v1 (see /openapi.json)' : `no such page ${path}`);
      const body = readFileSync(p);
      const ext = file.slice(file.lastIndexOf('.'));
      res.writeHead(200, { 'content-type': WEB_TYPES[ext] ?? 'application/octet-stream', 'content-length': body.length, 'cache-control': 'no-cache' });
      return void res.end(body);
    }
    if (!path.startsWith('/v1/')) throw new HttpError(404, `no route ${method} ${path}; the API is described at /openapi.json`);
    if (apiKey && !keyMatches(req.headers.authorization, apiKey)) throw new HttpError(401, 'missing or wrong API key: send the header Authorization: Bearer <key> (the key the service was started with)');

    const parts = path.split('/').filter(Boolean); // ['v1', 'videos', id, sub]
    const [, coll, id, sub] = parts;
    const allow = (m: string[]) => {
      if (!m.includes(method)) throw new HttpError(405, `${method} is not allowed on ${path}; use ${m.join(' or ')}`);
    };
    if (coll === 'videos' && !id) {
      allow(['POST']);
      const body = await readJson(req, maxBody);
      const v = parseVideoRequest(body, maxPixels);
      const [vid] = await redisCall(() => sq.submit([{ prompt: v.prompt, settings: v.settings, memorySnapshot: v.memorySnapshot, batch: null }]));
      return sendJson(res, 202, { id: vid, state: 'queued' }, { location: `/v1/videos/${vid}` });
    }
    if (coll === 'batches' && !id) {
      allow(['POST']);
      // a prompts file (text/plain, one per line; settings in the query string) or JSON
      const b = /^text\/plain/i.test(String(req.headers['content-type'] ?? ''))
        ? parseBatchText((await readBody(req, Math.max(maxBody, MAX_PROMPTS_TEXT))).toString('utf8'), url.searchParams, maxPixels)
        : parseBatchRequest(await readJson(req, maxBody), maxPixels);
      const r = await redisCall(() => sq.createBatch(b.prompts, b.settings, b.memorySnapshot));
      return sendJson(res, 202, r, { location: `/v1/batches/${r.id}` });
    }
    if (coll === 'queue' && !id) {
      allow(['GET']);
      const [counts, workers] = await redisCall(() => Promise.all([sq.counts(), sq.workers()]));
      return sendJson(res, 200, { counts, workers });
    }
    if (coll === 'batches' && id && !sub) {
      allow(['GET']);
      const b = ID_PATTERN.test(id) ? await redisCall(() => sq.batch(id, base)) : null;
      if (!b) throw new HttpError(404, `no batch ${JSON.stringify(id.slice(0, 60))} (unknown, or older than the result TTL)`);
      return sendJson(res, 200, b);
    }
    if (coll !== 'videos' || !id || parts.length > 4) throw new HttpError(404, `no route ${method} ${path}; the API is described at /openapi.json`);
    const notFound = () => new HttpError(404, `no video ${JSON.stringify(id.slice(0, 60))} (unknown, or older than the result TTL)`);
    if (!ID_PATTERN.test(id)) throw notFound();
    if (!sub) {
      allow(['GET', 'DELETE']);
      if (method === 'DELETE') {
        const st = await redisCall(() => sq.cancel(id));
        if (!st) throw notFound();
        if (!st.changed) throw new HttpError(409, `video ${id} is already ${st.state}; only a queued or active video can be cancelled`);
        return sendJson(res, 200, { id, state: 'cancelled' });
      }
      const s = await redisCall(() => sq.status(id, base));
      if (!s) throw notFound();
      return sendJson(res, 200, s);
    }
    allow(['GET']);
    if (sub === 'events') return events(req, res, id, notFound);
    const c = CONTENT[sub];
    if (!c) throw new HttpError(404, `no route ${path}; a video has /content, /preview, /sidecar, /memory-snapshot and /events`);
    const s = await redisCall(() => sq.status(id, base));
    if (!s) throw notFound();
    if (s.state !== 'completed') throw new HttpError(409, `video ${id} is ${s.state}${s.state === 'active' ? ` (${s.progress.phase} ${s.progress.step}/${s.progress.steps})` : ''}: its files exist once its state is completed (GET /v1/videos/${id}, or follow /v1/videos/${id}/events)`);
    if (c.name === 'snapshot' && !s.links.memory_snapshot) throw new HttpError(404, `video ${id} has no memory snapshot: ask for one with "report.memory_snapshot": true in the request`);
    const buf = await redisCall(() => sq.file(id, c.name));
    if (!buf) throw new HttpError(410, `the ${sub} of video ${id} is no longer stored (results expire after the TTL); generate it again`);
    return sendFile(req, res, buf, c.type, `${id}${c.name === 'mp4' ? '.mp4' : c.name === 'gif' ? '.gif' : c.name === 'sidecar' ? '.json' : '.memory.html'}`);
  };

  const sendFile = (req: IncomingMessage, res: ServerResponse, buf: Buffer, type: string, filename: string) => {
    const headers: Record<string, string | number> = { 'content-type': type, 'accept-ranges': 'bytes', 'content-disposition': `inline; filename="${filename}"`, 'cache-control': 'private, max-age=3600' };
    const m = /^bytes=(\d*)-(\d*)$/.exec(String(req.headers.range ?? ''));
    if (m && (m[1] || m[2])) {
      let start = m[1] ? Number(m[1]) : buf.length - Number(m[2]);
      let end = m[1] && m[2] ? Number(m[2]) : buf.length - 1;
      start = Math.max(0, start);
      end = Math.min(end, buf.length - 1);
      if (start > end) {
        res.writeHead(416, { 'content-range': `bytes */${buf.length}` });
        return void res.end();
      }
      res.writeHead(206, { ...headers, 'content-range': `bytes ${start}-${end}/${buf.length}`, 'content-length': end - start + 1 });
      return void res.end(buf.subarray(start, end + 1));
    }
    res.writeHead(200, { ...headers, 'content-length': buf.length });
    res.end(buf);
  };

  const events = async (req: IncomingMessage, res: ServerResponse, id: string, notFound: () => HttpError) => {
    const first = await redisCall(() => sq.status(id));
    if (!first) throw notFound();
    res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store', connection: 'keep-alive', 'x-accel-buffering': 'no' });
    sockets.add(res);
    const send = (event: string, data: unknown) => res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
    let last = first;
    let ended = false;
    const terminal = (s: VideoStatus) => s.state === 'completed' || s.state === 'failed' || s.state === 'cancelled';
    const finish = (s: VideoStatus) => {
      send(s.state === 'completed' ? 'done' : s.state === 'failed' ? 'error' : 'state', s);
      end();
    };
    let busy = false;
    const check = async () => {
      if (ended || busy) return;
      busy = true;
      try {
        const s = await redisCall(() => sq.status(id));
        if (!s || ended) return;
        if (terminal(s)) return finish(s);
        if (s.state !== last.state) send('state', s);
        else if (s.progress.step !== last.progress.step || s.progress.phase !== last.progress.phase) send('progress', s);
        last = s;
      } catch {
        /* Redis away: the stream waits (a comment keeps it open) */
      } finally {
        busy = false;
      }
    };
    const onBus = () => void check();
    const poll = setInterval(() => void check(), 1000);
    const keepAlive = setInterval(() => res.write(': keep-alive\n\n'), 15_000);
    const end = () => {
      if (ended) return;
      ended = true;
      clearInterval(poll);
      clearInterval(keepAlive);
      bus.off(id, onBus);
      sockets.delete(res);
      res.end();
    };
    bus.on(id, onBus);
    req.on('close', end);
    if (terminal(first)) return finish(first);
    send('state', first);
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((e: unknown) => {
      let status = 500;
      let msg: string;
      if (e instanceof HttpError) {
        status = e.status;
        msg = e.message;
      } else if (isRedisDown(e)) {
        status = 503;
        msg = 'the queue store (Redis) is unreachable right now; retry in a few seconds (GET /healthz says when it is back)';
      } else if (e instanceof ConfigError || (e instanceof SmartDiffusionError && e.code === 'BAD_SHAPE')) {
        status = 400;
        msg = e.message;
      } else {
        msg = describeError(e).line;
        log(`error: ${req.method} ${req.url}: ${msg}`);
      }
      if (status === 413) res.setHeader('connection', 'close');
      sendJson(res, status, { error: msg }, status === 503 ? { 'retry-after': '5' } : {});
      if (status === 413) req.resume();
    });
  });
  server.requestTimeout = 60_000;
  server.headersTimeout = 20_000;
  await new Promise<void>((res, rej) => {
    server.once('error', (e: NodeJS.ErrnoException) =>
      rej(e.code === 'EADDRINUSE' ? new ConfigError(`port ${opts.port ?? 8080} on ${host} is already in use; pass another --port (0 picks a free one)`) : e.code === 'EACCES' ? new ConfigError(`port ${opts.port} needs privileges; pass a port above 1023`) : e),
    );
    server.listen(opts.port ?? 8080, host, () => res());
  });
  const addr = server.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  const url = `http://${host.includes(':') ? `[${host}]` : host}:${port}`;

  const closeAll = async () => {
    for (const s of sockets) s.end();
    sockets.clear();
    await new Promise<void>((r) => server.close(() => r()));
    server.closeAllConnections?.();
    if (worker) await worker.close();
    await qe.close().catch(() => {});
    eventsConn.disconnect();
    await sq.close();
    api.disconnect();
    if (local) await local.stop();
  };

  try {
    if (opts.inProcessWorker ?? Boolean(local)) {
      worker = await startWorker({ ...(opts.workerOptions ?? {}), redisUrl, outputDir: opts.outputDir ?? opts.workerOptions?.outputDir, resultTtlSeconds: ttl, log, queueName: opts.queueName });
    }
  } catch (e) {
    await closeAll().catch(() => {});
    throw e;
  }
  log(`serving on ${url} (queue in ${redactUrl(redisUrl)}${local ? ', started here' : ''}; ${worker ? 'one in-process worker' : 'no in-process worker: start some with npm run worker'}${apiKey ? '; API key required on /v1' : ''})`);
  let closing: Promise<void> | null = null;
  return {
    url,
    port,
    redisUrl,
    worker,
    close: () => (closing ??= closeAll()),
  };
}
