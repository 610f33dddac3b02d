// Redis for the generation service: connections that never crash the process (an 'error' listener
// on every client; ioredis reconnects by itself), and the embedded default's local redis-server
// (a free port, a temporary folder, no persistence, killed when the process exits).

import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis, type RedisOptions } from 'ioredis';
import { registerChild, registerTemp, unregisterTemp } from '../io/cleanup.ts';
import { ConfigError, SmartDiffusionError } from '../util/errors.ts';

/** Redis is unreachable (down, restarting, wrong URL): the API answers 503. */
export class RedisDownError extends SmartDiffusionError {
  constructor(message: string) {
    super('REDIS_DOWN', message);
  }
}

/** A free TCP port on 127.0.0.1 (the OS picks one; it is closed again before returning). */
export function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const s = createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const addr = s.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      s.close(() => resolvePort(port));
    });
  });
}

/** Check a REDIS_URL before connecting: redis:// or rediss:// with a host. */
export function checkRedisUrl(url: string): void {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new ConfigError(`REDIS_URL ${JSON.stringify(url.slice(0, 100))} is not a URL; give one such as redis://127.0.0.1:6379`);
  }
  if (u.protocol !== 'redis:' && u.protocol !== 'rediss:') throw new ConfigError(`REDIS_URL must start with redis:// or rediss://, got ${JSON.stringify(url.slice(0, 100))}`);
}

/**
 * A client for `url`. `role` 'api': commands fail at once while Redis is unreachable (no offline
 * queue: the API answers 503 instead of hanging); 'blocking' (BullMQ workers, queue events):
 * commands wait for the reconnect, as BullMQ requires (maxRetriesPerRequest null). Either way it
 * reconnects forever with a capped back-off, and its 'error' events are logged at most once per
 * outage, never thrown.
 */
export function connectRedis(url: string, role: 'api' | 'blocking', log: (line: string) => void = () => {}): Redis {
  checkRedisUrl(url);
  const opts: RedisOptions = {
    lazyConnect: false,
    maxRetriesPerRequest: role === 'api' ? 1 : null,
    enableOfflineQueue: role !== 'api',
    connectTimeout: 3000,
    retryStrategy: (times) => Math.min(100 * times, 1000),
  };
  const r = new Redis(url, opts);
  let down = false;
  r.on('error', (e: Error) => {
    if (!down) log(`redis ${redactUrl(url)}: ${e.message.split('\n')[0]} (reconnecting)`);
    down = true;
  });
  r.on('ready', () => {
    if (down) log(`redis ${redactUrl(url)}: connected again`);
    down = false;
  });
  return r;
}

/** The URL without its password (for logs). */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '(bad url)';
  }
}

/** Errors that mean "Redis is not reachable right now" (as opposed to a bug or a bad request). */
export function isRedisDown(e: unknown): boolean {
  if (e instanceof RedisDownError) return true;
  const m = e instanceof Error ? e.message : String(e);
  const code = (e as NodeJS.ErrnoException | null)?.code ?? '';
  return (
    /Stream isn't writeable|enableOfflineQueue|Connection is closed|connect ECONNREFUSED|ECONNRESET|Reached the max retries per request|Command timed out|Connection in subscriber mode|EPIPE|ETIMEDOUT|getaddrinfo|redis is down/i.test(m) ||
    ['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT'].includes(code)
  );
}

export interface LocalRedis {
  url: string;
  port: number;
  /** stop it (SIGTERM, then SIGKILL after 2 s) and remove its folder */
  stop(): Promise<void>;
  /** SIGKILL at once (a crash, for tests) */
  kill(): void;
  child: ChildProcess;
}

/** Where redis-server is, or a one-line ConfigError saying how to install it. */
export function redisServerPath(): string {
  const fromEnv = process.env.REDIS_SERVER;
  if (fromEnv) return fromEnv;
  for (const p of ['/usr/bin/redis-server', '/usr/local/bin/redis-server', '/opt/homebrew/bin/redis-server']) {
    try {
      execFileSync(p, ['--version'], { stdio: 'ignore', timeout: 5000 });
      return p;
    } catch {
      /* not there */
    }
  }
  try {
    execFileSync('redis-server', ['--version'], { stdio: 'ignore', timeout: 5000 });
    return 'redis-server';
  } catch {
    throw new ConfigError('redis-server is not installed: run ./setup.sh (as root it installs it: apt-get install redis-server), or set REDIS_URL to a running Redis');
  }
}

/**
 * Start redis-server on `port` (default: a free one) in a temporary folder, with persistence off
 * (no RDB snapshots, no AOF): the embedded default's queue lives as long as the service. Resolves
 * when it accepts connections; the child is killed when this process exits.
 */
export async function startLocalRedis(opts: { port?: number; log?: (line: string) => void } = {}): Promise<LocalRedis> {
  const bin = redisServerPath();
  const port = opts.port ?? (await freePort());
  const dir = mkdtempSync(join(tmpdir(), 'sd-redis-'));
  registerTemp(dir);
  const child = spawn(bin, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir, '--protected-mode', 'yes', '--loglevel', 'warning'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  registerChild(child);
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-2000)));
  child.stderr!.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-2000)));
  const url = `redis://127.0.0.1:${port}`;
  const exited = new Promise<void>((res) => child.once('exit', () => res()));
  // ready when it answers PING
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      rmSync(dir, { recursive: true, force: true });
      throw new ConfigError(`redis-server exited at start (port ${port}): ${out.trim().split('\n').pop() ?? ''}; is the port taken? set REDIS_URL to a running Redis instead`);
    }
    const probe = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, enableOfflineQueue: false, retryStrategy: () => null, connectTimeout: 500 });
    probe.on('error', () => {});
    try {
      await probe.connect();
      if ((await probe.ping()) === 'PONG') {
        probe.disconnect();
        break;
      }
    } catch {
      /* not yet */
    }
    probe.disconnect();
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new ConfigError(`redis-server did not accept connections on port ${port} within 10 s: ${out.trim().split('\n').pop() ?? ''}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  opts.log?.(`started redis-server on ${url} (no persistence, folder ${dir})`);
  const cleanup = () => {
    rmSync(dir, { recursive: true, force: true });
    unregisterTemp(dir);
  };
  return {
    url,
    port,
    child,
    kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        const t = setTimeout(() => child.kill('SIGKILL'), 2000);
        await exited;
        clearTimeout(t);
      }
      cleanup();
    },
  };
}
