// Test helpers for the generation service: a real redis-server on a free port (no persistence, a
// temporary folder) and worker processes (`npm run worker` equivalents) a test can SIGKILL.

import { spawn, type ChildProcess } from 'node:child_process';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startLocalRedis } from '../../src/service/redis.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface TestRedis {
  url: string;
  port: number;
  stop(): Promise<void>;
  kill(): void;
}

/** redis-server on a free port (or `port`: to bring one back on the same port after a kill). */
export async function startRedis(port?: number): Promise<TestRedis> {
  const r = await startLocalRedis({ port });
  return { url: r.url, port: r.port, stop: () => r.stop(), kill: () => r.kill() };
}

export interface WorkerProcess {
  child: ChildProcess;
  /** everything it printed (stdout + stderr) */
  output(): string;
  /** resolves when it printed `worker NAME ready` */
  ready: Promise<void>;
  /** resolves with its exit code or signal */
  exited: Promise<number | string | null>;
  kill(signal?: NodeJS.Signals): void;
}

/** A child `npm run worker` (node --import tsx src/cli/worker.ts) on `redisUrl` with `extraArgs`. */
export function spawnWorker(redisUrl: string, extraArgs: string[] = []): WorkerProcess {
  const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'src/cli/worker.ts'), ...extraArgs], {
    cwd: ROOT,
    env: { ...process.env, REDIS_URL: redisUrl },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let onReady: () => void = () => {};
  let onFail: (e: Error) => void = () => {};
  const ready = new Promise<void>((res, rej) => {
    onReady = res;
    onFail = rej;
  });
  const take = (d: Buffer) => {
    out += d.toString();
    if (/worker \S+ ready/.test(out)) onReady();
  };
  child.stdout!.on('data', take);
  child.stderr!.on('data', take);
  const exited = new Promise<number | string | null>((res) =>
    child.once('exit', (code, sig) => {
      onFail(new Error(`the worker exited (${code ?? sig}) before it was ready:\n${out.slice(-2000)}`));
      res(code ?? sig);
    }),
  );
  return {
    child,
    output: () => out,
    ready,
    exited,
    kill(signal: NodeJS.Signals = 'SIGKILL') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    },
  };
}
