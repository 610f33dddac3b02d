// The command lines of `npm run serve` and `npm run worker`: service switches, then the worker's
// pipeline settings as the CLI spells them (--model, --config, key=value: checked by the schema).

import { overridesLayer } from '../config/settings.ts';
import { ConfigError } from '../util/errors.ts';
import { checkRedisUrl } from './redis.ts';
import type { WorkerOptions } from './worker.ts';

export interface ServiceArgs {
  port?: number;
  host?: string;
  apiKey?: string;
  redisUrl?: string;
  noWorker: boolean;
  inProcessWorker: boolean;
  outputDir?: string;
  maxBodyBytes?: number;
  maxPixels?: number;
  resultTtlSeconds?: number;
  worker: Partial<WorkerOptions>;
}

interface Sw {
  names: string[];
  arg?: string;
  doc: string;
  only?: 'serve' | 'worker';
  set: (a: ServiceArgs, v: string) => void;
}

function int(name: string, v: string, min: number, max: number): number {
  const n = Number(v);
  if (!/^\d+$/.test(v) || n < min || n > max) throw new ConfigError(`${name} must be an integer in ${min}..${max}, got ${JSON.stringify(v.slice(0, 40))}`);
  return n;
}

const SWITCHES: Sw[] = [
  { names: ['--port'], arg: 'N', only: 'serve', doc: 'HTTP port (default 8080; 0 = a free one)', set: (a, v) => (a.port = int('--port', v, 0, 65535)) },
  { names: ['--host'], arg: 'HOST', only: 'serve', doc: 'address to bind (default 127.0.0.1; anything else needs --api-key)', set: (a, v) => (a.host = v) },
  { names: ['--api-key'], arg: 'KEY', only: 'serve', doc: 'require Authorization: Bearer KEY on /v1 (or SMART_DIFFUSION_API_KEY)', set: (a, v) => (a.apiKey = v) },
  { names: ['--redis-url'], arg: 'URL', doc: 'the queue\'s Redis (or REDIS_URL); serve without it starts a local redis-server', set: (a, v) => (a.redisUrl = v) },
  { names: ['--no-worker'], only: 'serve', doc: 'no in-process worker (the default with REDIS_URL)', set: (a) => (a.noWorker = true) },
  { names: ['--worker'], only: 'serve', doc: 'one in-process worker even with REDIS_URL', set: (a) => (a.inProcessWorker = true) },
  { names: ['--output-dir'], arg: 'DIR', doc: 'also copy each result (ID.mp4, ID.gif) to DIR (a shared disk, if there is one)', set: (a, v) => (a.outputDir = v) },
  { names: ['--max-body-kb'], arg: 'N', only: 'serve', doc: 'largest request body (default 64)', set: (a, v) => (a.maxBodyBytes = int('--max-body-kb', v, 1, 1 << 20) * 1024) },
  { names: ['--max-pixels'], arg: 'N', only: 'serve', doc: 'largest width x height x frames a request may ask for (default 74649600 = 1280x720x81)', set: (a, v) => (a.maxPixels = int('--max-pixels', v, 1, 2 ** 40)) },
  { names: ['--result-ttl-hours'], arg: 'H', doc: 'how long records and results stay in Redis (default 24)', set: (a, v) => (a.resultTtlSeconds = int('--result-ttl-hours', v, 1, 24 * 365) * 3600) },
  { names: ['-m', '--model'], arg: 'DIR', doc: 'the worker\'s model folder (default weights/demo)', set: (a, v) => (a.worker.model = v) },
  { names: ['-c', '--config'], arg: 'FILE', doc: 'the worker\'s YAML config (as npm run generate --config)', set: (a, v) => (a.worker.configFile = v) },
  { names: ['--name'], arg: 'NAME', only: 'worker', doc: 'this worker\'s name in /v1/queue (default host-pid)', set: (a, v) => (a.worker.name = v) },
  { names: ['--lock-ms'], arg: 'MS', doc: 'BullMQ lock duration: a job whose worker is silent this long is stalled and retried (default 30000)', set: (a, v) => (a.worker.lockDurationMs = int('--lock-ms', v, 500, 3_600_000)) },
  { names: ['--stalled-ms'], arg: 'MS', doc: 'how often to look for stalled jobs (default 30000)', set: (a, v) => (a.worker.stalledIntervalMs = int('--stalled-ms', v, 200, 3_600_000)) },
  { names: ['--max-result-mb'], arg: 'N', doc: 'largest result file stored in Redis (default 256)', set: (a, v) => (a.worker.maxResultBytes = int('--max-result-mb', v, 1, 1 << 20) * 2 ** 20) },
  { names: ['--pause-after-latents-ms'], arg: 'MS', doc: 'tests: wait after storing the latents, before the decode', set: (a, v) => (a.worker.pauseAfterLatentsMs = int('--pause-after-latents-ms', v, 0, 3_600_000)) },
];

export function serviceUsage(cmd: 'serve' | 'worker'): string {
  const head =
    cmd === 'serve'
      ? 'usage: npm run serve -- [options] [key=value ...]\n\nThe generation service\'s HTTP API (docs/service.md). Without REDIS_URL it starts a local redis-server and one\nin-process worker; key=value settings are that worker\'s (e.g. infer.diffusion.low_mem_level=2).\n'
      : 'usage: REDIS_URL=redis://HOST:6379 npm run worker -- [options] [key=value ...]\n\nA worker: loads its pipeline once and takes video jobs from the queue (docs/service.md). key=value settings\nare its load-time settings (model, memory level, budget, precision) and its request defaults.\n';
  const lines = SWITCHES.filter((s) => !s.only || s.only === cmd).map((s) => `  ${`${s.names.join(', ')}${s.arg ? ` ${s.arg}` : ''}`.padEnd(30)}${s.doc}`);
  return `${head}\noptions:\n${lines.join('\n')}\n  ${'-h, --help'.padEnd(30)}this help\n`;
}

/** null for --help. */
export function parseServiceArgs(argv: readonly string[], cmd: 'serve' | 'worker', env: NodeJS.ProcessEnv = process.env): ServiceArgs | null {
  const a: ServiceArgs = { noWorker: false, inProcessWorker: false, worker: {} };
  const overrides: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const x = argv[i]!;
    if (x === '-h' || x === '--help') return null;
    if (x === '--debug') continue;
    const s = SWITCHES.find((w) => w.names.includes(x) && (!w.only || w.only === cmd));
    if (!s) {
      if (/^[A-Za-z_][\w.]*=/.test(x)) {
        overrides.push(x);
        continue;
      }
      throw new ConfigError(`unknown option ${JSON.stringify(x.slice(0, 60))} for npm run ${cmd} (see --help)`);
    }
    let v = '';
    if (s.arg) {
      const next = argv[++i];
      if (next === undefined || (next.startsWith('--') && next.length > 2)) throw new ConfigError(`option ${x} needs a value (e.g. ${x} ${s.arg})`);
      v = next;
    }
    s.set(a, v);
  }
  a.redisUrl ??= env.REDIS_URL || undefined;
  if (a.redisUrl) checkRedisUrl(a.redisUrl);
  a.apiKey ??= env.SMART_DIFFUSION_API_KEY || undefined;
  if (overrides.length) {
    // checked now (unknown keys get the closest valid one), passed on by dotted key
    const layer = overridesLayer(overrides, ' on the command line');
    a.worker.config = Object.fromEntries(layer.values);
  }
  return a;
}
