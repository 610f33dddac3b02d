// `npm run bench:serve [-- --jobs 20 --workers 2 --cli-runs 20 --model weights/demo --steps N --no-screenshot]`
//
// The generation service under load, on this machine: a local redis-server, the API
// (startService, no in-process worker) and N worker processes (`npm run worker`, default 2), each
// keeping one pipeline loaded; 20 jobs submitted at once on the demo model. Measured:
//   - throughput in videos/min, against one `npm run generate` process per video (same prompts,
//     seeds and settings, one after the other, as the CLI is used today), in the same run: half of
//     the CLI runs before the service round and half after, so drift of this shared machine falls
//     on both sides alike;
//   - latency from submit to completed (p50/p95; the service's own timestamps), split into the
//     wait in the queue and the run on a worker;
//   - each worker's RSS (/proc) and GPU reserved bytes (its heartbeat) after each of its jobs, and
//     each job's peak allocated/reserved: flat across jobs, or growing?
// Writes docs/service-load.json and docs/service-load.md, and (with chromium installed, unless
// --no-screenshot) docs/images/service-page.png: the web page after the run, showing a finished
// video, the queue counts and both workers' memory.
//
// A heavy measurement (minutes of both cores): never part of the tests.

import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir, cpus, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startLocalRedis } from '../src/service/redis.ts';
import { startService } from '../src/service/server.ts';
import { fmtBytes } from '../src/util/errors.ts';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}
function posInt(name: string, dflt: number): number {
  const v = Number(arg(name, String(dflt)));
  if (!Number.isInteger(v) || v < 1) {
    console.error(`error: [bench:serve] --${name} must be a positive integer, got ${arg(name, '')}`);
    process.exit(2);
  }
  return v;
}

const JOBS = posInt('jobs', 20);
const WORKERS = posInt('workers', 2);
const CLI_RUNS = posInt('cli-runs', JOBS);
const MODEL = arg('model', 'weights/demo');
const STEPS = arg('steps', '');
const OUT = arg('out', join(ROOT, 'docs', 'service-load'));
const SCREENSHOT = !process.argv.includes('--no-screenshot');
const CHROMIUM = process.env.SD_CHROMIUM || '/usr/bin/chromium';

// the demo model's vocabulary (README): every job its own prompt and seed, the same for the CLI
const COLORS = ['red', 'green', 'blue', 'yellow', 'white'];
const SHAPES = ['circle', 'square', 'triangle'];
const DIRS = ['left', 'right', 'up', 'down'];
const BGS = ['black', 'gray', 'dark blue'];
const prompts = Array.from({ length: Math.max(JOBS, CLI_RUNS) }, (_, i) => ({
  prompt: `a ${COLORS[i % 5]} ${SHAPES[i % 3]} moving ${DIRS[i % 4]} on a ${BGS[(i >> 2) % 3]} background`,
  seed: i + 1,
}));

const mib = (b: number) => b / 2 ** 20;
const sec = (ms: number) => ms / 1000;
function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  if (!s.length) return NaN;
  const pos = (s.length - 1) * q; // linear interpolation between closest ranks
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return s[lo]! + (s[hi]! - s[lo]!) * (pos - lo);
}
/** least-squares slope of ys over 0..n-1 (per job) */
function slope(ys: number[]): number {
  const n = ys.length;
  if (n < 2) return 0;
  const mx = (n - 1) / 2;
  const my = ys.reduce((a, b) => a + b, 0) / n;
  let num = 0;
  let den = 0;
  ys.forEach((y, x) => {
    num += (x - mx) * (y - my);
    den += (x - mx) ** 2;
  });
  return num / den;
}
function rssOf(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : NaN;
  } catch {
    return NaN;
  }
}

const f1 = (x: number) => (Number.isFinite(x) ? x.toFixed(1) : '–');
const f2 = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : '–');

// `--render FILE.json`: write FILE.md again from a saved run (the text changed, not the measurement)
const RENDER = arg('render', '');
if (RENDER) {
  const saved = JSON.parse(readFileSync(RENDER, 'utf8')) as { summary: Summary };
  writeFileSync(RENDER.replace(/\.json$/, '') + '.md', renderMd(saved.summary));
  console.log(`wrote ${RENDER.replace(/\.json$/, '')}.md`);
  process.exit(0);
}

/** The command an npm script runs (`node --import tsx src/cli/x.ts`), to spawn it without npm in between:
 *  its pid is then the process whose RSS is read, and npm's own start is not charged to the CLI. */
function scriptCommand(name: string): { cmd: string; args: string[] } {
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
  const line = pkg.scripts[name];
  if (!line) throw new Error(`package.json has no "${name}" script`);
  const parts = line.trim().split(/\s+/);
  if (parts[0] !== 'node') throw new Error(`the "${name}" script does not start with node: ${line}`);
  return { cmd: process.execPath, args: parts.slice(1) };
}

const children = new Set<ChildProcess>();
function killChildren() {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
}
process.on('exit', killChildren);
for (const sig of ['SIGINT', 'SIGTERM'] as const)
  process.on(sig, () => {
    killChildren();
    process.exit(130);
  });

// ---------------------------------------------------------------- the CLI, one process per video

const cliCache = mkdtempSync(join(tmpdir(), 'sd-bench-cli-cache-'));
const cliOut = mkdtempSync(join(tmpdir(), 'sd-bench-cli-out-'));

function cliRun(i: number): Promise<number> {
  const p = prompts[i]!;
  const gen = scriptCommand('generate');
  const args = [...gen.args, p.prompt, '--model', MODEL, '--seed', String(p.seed), '--quiet', '-o', join(cliOut, `cli-${i}.mp4`), `infer.prompt_cache_dir=${cliCache}`];
  if (STEPS) args.push('--steps', STEPS);
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const c = spawn(gen.cmd, args, { cwd: ROOT, stdio: ['ignore', 'ignore', 'pipe'] });
    children.add(c);
    let err = '';
    c.stderr!.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
    c.on('exit', (code) => {
      children.delete(c);
      if (code === 0) resolve(performance.now() - t0);
      else reject(new Error(`npm run generate (video ${i}) exited ${code}: ${err.trim().split('\n').pop()}`));
    });
  });
}

/** Per CLI run, from its sidecar: the pipeline's own phases (ms); the rest of the process's wall time is
 *  Node's start, the TypeScript load, the GPU device and the preflight. */
const cliPhases: Array<Record<string, number>> = [];

async function cliRound(from: number, to: number, ms: number[]): Promise<void> {
  for (let i = from; i < to; i++) {
    const t = await cliRun(i);
    ms.push(t);
    try {
      const side = JSON.parse(readFileSync(join(cliOut, `cli-${i}.json`), 'utf8')) as { timings_ms: Record<string, number> };
      cliPhases.push(side.timings_ms);
    } catch {
      throw new Error(`npm run generate (video ${i}) wrote no readable sidecar ${join(cliOut, `cli-${i}.json`)}`);
    }
    console.log(`  CLI ${String(i + 1).padStart(2)}/${CLI_RUNS}  ${sec(t).toFixed(2)} s  "${prompts[i]!.prompt}"`);
  }
}

// ---------------------------------------------------------------- the service

interface WorkerProc {
  name: string;
  child: ChildProcess;
  after: Array<{ job: string; done_s: number; rss_bytes: number; reserved_bytes: number | null }>;
  log: string[];
}

interface QueueBody {
  counts: Record<string, number>;
  workers: Array<{ id: string; state: string; jobs_done: number; memory: { allocated_bytes: number; reserved_bytes: number; peak_allocated_bytes: number } }>;
}

async function getJson<T>(url: string): Promise<T> {
  const r = await fetch(url);
  const t = await r.text();
  if (!r.ok) throw new Error(`GET ${url}: HTTP ${r.status} ${t.slice(0, 200)}`);
  return JSON.parse(t) as T;
}

function spawnWorker(name: string, redisUrl: string, svcCache: string, t0: () => number, latestReserved: Map<string, number>): WorkerProc {
  const wk = scriptCommand('worker');
  const args = [...wk.args, '--name', name, '--model', MODEL, `infer.prompt_cache_dir=${svcCache}`];
  const child = spawn(wk.cmd, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, REDIS_URL: redisUrl } });
  children.add(child);
  const w: WorkerProc = { name, child, after: [], log: [] };
  let buf = '';
  const onData = (d: Buffer) => {
    buf += d.toString();
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      w.log.push(line);
      // "[name] <id> done in 3.1 s: peak allocated ..." — the job's results are stored; read the process's RSS now
      const m = /^\[[^\]]+\] (\S+) done in /.exec(line);
      if (m) w.after.push({ job: m[1]!, done_s: sec(t0()), rss_bytes: rssOf(child.pid!), reserved_bytes: latestReserved.get(name) ?? null });
    }
  };
  child.stdout!.on('data', onData);
  child.stderr!.on('data', onData);
  child.on('exit', () => children.delete(child));
  return w;
}

async function serviceRound() {
  const redis = await startLocalRedis();
  const svcCache = mkdtempSync(join(tmpdir(), 'sd-bench-svc-cache-'));
  const svc = await startService({ port: 0, host: '127.0.0.1', redisUrl: redis.url, inProcessWorker: false });
  const base = svc.url.replace(/\/$/, '');
  const tStart = performance.now();
  const latestReserved = new Map<string, number>();
  const workers: WorkerProc[] = [];
  try {
    for (let k = 0; k < WORKERS; k++) workers.push(spawnWorker(`bench-w${k + 1}`, redis.url, svcCache, () => performance.now() - tStart, latestReserved));
    // every worker loaded and idle before the jobs go in (load time is not throughput)
    const loadDeadline = performance.now() + 300_000;
    for (;;) {
      const q = await getJson<QueueBody>(`${base}/v1/queue`);
      if (q.workers.filter((w) => w.state === 'idle').length >= WORKERS) break;
      for (const w of workers)
        if (w.child.exitCode !== null) throw new Error(`worker ${w.name} exited ${w.child.exitCode} while loading: ${w.log.slice(-3).join(' | ')}`);
      if (performance.now() > loadDeadline) throw new Error(`the workers did not report idle within 300 s: ${workers.map((w) => w.log.slice(-2).join(' | ')).join(' ;; ')}`);
      await new Promise((r) => setTimeout(r, 250));
    }
    const loadedS = sec(performance.now() - tStart);
    console.log(`  ${WORKERS} workers loaded in ${loadedS.toFixed(1)} s; submitting ${JOBS} jobs`);
    const idleRss = workers.map((w) => rssOf(w.child.pid!));

    const t0 = performance.now();
    const ids: string[] = [];
    for (let i = 0; i < JOBS; i++) {
      const p = prompts[i]!;
      const body: Record<string, unknown> = { prompt: p.prompt, 'infer.seed': p.seed };
      if (STEPS) body['infer.num_inference_steps'] = Number(STEPS);
      const r = await fetch(`${base}/v1/videos`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
      const j = (await r.json()) as { id?: string; error?: string };
      if (r.status !== 202 || !j.id) throw new Error(`POST /v1/videos answered ${r.status}: ${j.error ?? JSON.stringify(j)}`);
      ids.push(j.id);
    }
    const submitS = sec(performance.now() - t0);
    // follow: the queue (workers' heartbeats: reserved bytes) and the jobs' states, every 250 ms
    const deadline = performance.now() + 30 * 60_000;
    let last = '';
    for (;;) {
      const q = await getJson<QueueBody>(`${base}/v1/queue`);
      for (const w of q.workers) latestReserved.set(w.id, w.memory.reserved_bytes);
      const c = q.counts;
      const line = `queued ${c.queued} active ${c.active} completed ${c.completed} failed ${c.failed}`;
      if (line !== last) console.log(`  ${sec(performance.now() - t0).toFixed(1).padStart(6)} s  ${line}`);
      last = line;
      if ((c.failed ?? 0) > 0) throw new Error(`a job failed: ${line}; worker logs: ${workers.map((w) => w.log.filter((l) => /failed/.test(l)).join(' | ')).join(' ;; ')}`);
      if ((c.completed ?? 0) >= JOBS) break;
      for (const w of workers) if (w.child.exitCode !== null) throw new Error(`worker ${w.name} exited ${w.child.exitCode}: ${w.log.slice(-3).join(' | ')}`);
      if (performance.now() > deadline) throw new Error(`not done within 30 min: ${line}`);
      await new Promise((r) => setTimeout(r, 250));
    }
    const wallS = sec(performance.now() - t0);
    // a last heartbeat after the final jobs (workers beat every 2 s)
    await new Promise((r) => setTimeout(r, 2500));
    const qEnd = await getJson<QueueBody>(`${base}/v1/queue`);
    const jobs = await Promise.all(
      ids.map((id) =>
        getJson<{ id: string; state: string; created_at: string; started_at: string; finished_at: string; worker: string; memory: { peak_allocated_bytes: number; peak_reserved_bytes: number } }>(`${base}/v1/videos/${id}`),
      ),
    );
    // spot check: the results are real MP4s
    const mp4 = Buffer.from(await (await fetch(`${base}/v1/videos/${ids[0]}/content`)).arrayBuffer());
    if (mp4.subarray(4, 8).toString() !== 'ftyp') throw new Error('the first video is not an MP4');
    let shot: string | null = null;
    if (SCREENSHOT) shot = await screenshot(base, ids[0]!);
    return { loadedS, submitS, wallS, jobs, workers, idleRss, qEnd, shot };
  } finally {
    for (const w of workers) if (w.child.exitCode === null) w.child.kill('SIGTERM');
    await Promise.all(workers.map((w) => (w.child.exitCode === null ? new Promise((r) => w.child.once('exit', r)) : null)));
    await svc.close();
    await redis.stop();
    rmSync(svcCache, { recursive: true, force: true });
  }
}

/** The page after the run: the first video finished and playing, the queue, both workers' memory. */
async function screenshot(base: string, id: string): Promise<string | null> {
  if (!existsSync(CHROMIUM)) {
    console.log(`  (no screenshot: no Chromium at ${CHROMIUM})`);
    return null;
  }
  const { chromium } = await import('playwright-core');
  const profile = mkdtempSync(join(tmpdir(), 'sd-bench-chromium-'));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1200, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = ctx.pages()[0] ?? (await ctx.newPage());
    await page.goto(`${base}/#video=${encodeURIComponent(id)}`);
    await page.waitForFunction(`(() => { const v = document.getElementById('job-video'); return v && v.readyState >= 2 && v.played.length > 0; })()`, null, { timeout: 30_000 });
    await page.waitForFunction(`document.querySelectorAll('#workers tr[data-worker]').length >= ${WORKERS}`, null, { timeout: 15_000 });
    await page.waitForTimeout(500);
    const path = join(ROOT, 'docs', 'images', 'service-page.png');
    mkdirSync(dirname(path), { recursive: true });
    await page.screenshot({ path, fullPage: true });
    return path;
  } finally {
    await ctx.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- run: CLI half, service, CLI half

console.log(`bench:serve: ${JOBS} jobs on ${WORKERS} workers vs ${CLI_RUNS} CLI runs; model ${MODEL}; ${cpus().length} CPU cores`);
const cliMs: number[] = [];
const half = Math.floor(CLI_RUNS / 2);
let svcRes: Awaited<ReturnType<typeof serviceRound>>;
try {
  console.log(`CLI runs 1-${half} (npm run generate, one process per video):`);
  await cliRound(0, half, cliMs);
  console.log(`service: ${WORKERS} worker processes, ${JOBS} jobs queued at once:`);
  svcRes = await serviceRound();
  console.log(`CLI runs ${half + 1}-${CLI_RUNS}:`);
  await cliRound(half, CLI_RUNS, cliMs);
} finally {
  rmSync(cliCache, { recursive: true, force: true });
  rmSync(cliOut, { recursive: true, force: true });
}

// ---------------------------------------------------------------- figures

const { jobs, workers, wallS, loadedS, submitS, idleRss, qEnd, shot } = svcRes!;
const ms = (t: string) => Date.parse(t);
const latency = jobs.map((j) => sec(ms(j.finished_at) - ms(j.created_at)));
const wait = jobs.map((j) => sec(ms(j.started_at) - ms(j.created_at)));
const run = jobs.map((j) => sec(ms(j.finished_at) - ms(j.started_at)));
const cliTotalS = sec(cliMs.reduce((a, b) => a + b, 0));
const cliPerMin = (CLI_RUNS / cliTotalS) * 60;
const svcPerMin = (JOBS / wallS) * 60;
const perWorker = workers.map((w, k) => {
  const mine = jobs.filter((j) => j.worker === w.name);
  const rss = w.after.map((a) => a.rss_bytes).filter(Number.isFinite);
  const res = w.after.map((a) => a.reserved_bytes).filter((x): x is number => typeof x === 'number');
  const peaks = w.after.map((a) => mine.find((j) => j.id === a.job)?.memory.peak_reserved_bytes).filter((x): x is number => typeof x === 'number');
  const hb = qEnd.workers.find((x) => x.id === w.name);
  return {
    name: w.name,
    jobs: mine.length,
    idle_rss_bytes: idleRss[k],
    after_each_job: w.after.map((a) => ({ ...a, peak_allocated_bytes: mine.find((j) => j.id === a.job)?.memory.peak_allocated_bytes ?? null, peak_reserved_bytes: mine.find((j) => j.id === a.job)?.memory.peak_reserved_bytes ?? null })),
    rss_first_last: [rss[0] ?? null, rss.at(-1) ?? null],
    rss_slope_bytes_per_job_after_first: slope(rss.slice(1)),
    heartbeat_reserved_first_last: [res[0] ?? null, res.at(-1) ?? null],
    peak_reserved_min_max: peaks.length ? [Math.min(...peaks), Math.max(...peaks)] : [null, null],
    reserved_at_end_bytes: hb?.memory.reserved_bytes ?? null,
  };
});

const date = new Date().toISOString();
const summary = {
  date,
  cores: cpus().length,
  machine: `${cpus().length} CPU cores (${cpus()[0]?.model ?? '?'}), ${fmtBytes(totalmem())} RAM, no GPU: WebGPU on Mesa lavapipe`,
  model: MODEL,
  settings: STEPS ? `the model's defaults, ${STEPS} steps` : "the model's defaults (demo: 64x64, 9 frames, 20 steps, guidance 3.5)",
  jobs: JOBS,
  workers: WORKERS,
  cli_runs: CLI_RUNS,
  service: {
    workers_loaded_s: loadedS,
    submit_s: submitS,
    wall_s: wallS,
    videos_per_min: svcPerMin,
    latency_s: { p50: quantile(latency, 0.5), p95: quantile(latency, 0.95), min: Math.min(...latency), max: Math.max(...latency) },
    queue_wait_s: { p50: quantile(wait, 0.5), p95: quantile(wait, 0.95) },
    run_s: { p50: quantile(run, 0.5), p95: quantile(run, 0.95), min: Math.min(...run), max: Math.max(...run) },
  },
  cli: {
    total_s: cliTotalS,
    videos_per_min: cliPerMin,
    per_video_s: { p50: quantile(cliMs.map(sec), 0.5), min: Math.min(...cliMs.map(sec)), max: Math.max(...cliMs.map(sec)) },
    first_half_p50_s: quantile(cliMs.slice(0, half).map(sec), 0.5),
    second_half_p50_s: quantile(cliMs.slice(half).map(sec), 0.5),
  },
  cli_phases_p50_s: Object.fromEntries(
    ['load', 'encode', 'denoise', 'decode', 'write'].map((k) => [k, quantile(cliPhases.map((p) => sec(p[k] ?? 0)), 0.5)]),
  ) as Record<string, number>,
  cli_outside_pipeline_p50_s: quantile(
    cliMs.map((t, i) => sec(t - ['load', 'encode', 'denoise', 'decode', 'write'].reduce((a, k) => a + (cliPhases[i]?.[k] ?? 0), 0))),
    0.5,
  ),
  throughput_ratio: svcPerMin / cliPerMin,
  per_worker: perWorker,
  screenshot: shot ? 'docs/images/service-page.png' : null,
};
type Summary = typeof summary;
writeFileSync(`${OUT}.json`, JSON.stringify({ summary, jobs, cli_ms: cliMs }, null, 2) + '\n');

writeFileSync(`${OUT}.md`, renderMd(summary));
console.log(`\nservice ${f1(svcPerMin)} videos/min vs CLI ${f1(cliPerMin)} videos/min (${f2(summary.throughput_ratio)}x); latency p50 ${f2(summary.service.latency_s.p50)} s p95 ${f2(summary.service.latency_s.p95)} s`);
for (const w of perWorker) console.log(`${w.name}: ${w.jobs} jobs, RSS ${w.after_each_job.map((a) => f1(mib(a.rss_bytes))).join(' ')} MiB; slope ${f2(mib(w.rss_slope_bytes_per_job_after_first))} MiB/job`);
console.log(`wrote ${OUT}.md, ${OUT}.json${shot ? `, ${shot}` : ''}`);
process.exit(0);

function renderMd(summary: Summary): string {
  const rowsW = summary.per_worker
    .map((w) => {
      const rss = w.after_each_job.map((a) => f1(mib(a.rss_bytes))).join(' · ');
      const res = w.after_each_job.map((a) => (a.reserved_bytes === null ? '–' : f1(mib(a.reserved_bytes)))).join(' · ');
      const pk = w.after_each_job.map((a) => (a.peak_reserved_bytes === null ? '–' : f1(mib(a.peak_reserved_bytes)))).join(' · ');
      return `| ${w.name} | ${w.jobs} | ${f1(mib(w.idle_rss_bytes ?? NaN))} | ${rss} | ${f2(mib(w.rss_slope_bytes_per_job_after_first))} | ${res} | ${pk} |`;
    })
    .join('\n');
  const range = (xs: Array<number | null>) => {
    const v = xs.filter((x): x is number => typeof x === 'number');
    if (!v.length) return 'not reported';
    const lo = Math.min(...v);
    const hi = Math.max(...v);
    if (lo === hi) return `${f1(mib(lo))} MiB after every job`;
    return `${f1(mib(lo))}–${f1(mib(hi))} MiB (${lo.toLocaleString('en-US')}–${hi.toLocaleString('en-US')} bytes)`;
  };
  const verdicts = summary.per_worker
    .map((w) => {
      const rss = w.after_each_job.map((a) => a.rss_bytes).filter(Number.isFinite);
      return (
        `- ${w.name} (${w.jobs} jobs): GPU reserved ${range(w.after_each_job.map((a) => a.reserved_bytes))}; each job's peak reserved ${range(w.after_each_job.map((a) => a.peak_reserved_bytes))}; ` +
        `RSS ${f1(mib(rss[0] ?? NaN))} MiB after its first job, ${f1(mib(rss.at(-1) ?? NaN))} MiB after its last ` +
        `(${(rss.at(-1)! - rss[0]!) >= 0 ? '+' : ''}${f1(mib((rss.at(-1) ?? NaN) - (rss[0] ?? NaN)))} MiB; least-squares slope after the first job ${f2(mib(w.rss_slope_bytes_per_job_after_first))} MiB/job)` +
        (rss.length >= 8
          ? (() => {
              // after warm-up: the second half of its jobs
              const h = rss.slice(Math.floor(rss.length / 2));
              return `; over its last ${h.length} jobs RSS ${f1(mib(Math.min(...h)))}–${f1(mib(Math.max(...h)))} MiB, slope ${f2(mib(slope(h)))} MiB/job.`;
            })()
          : '.')
      );
    })
    .join('\n');
  return `# Service load: \`npm run bench:serve\`

Measured ${summary.date.slice(0, 10)} on the development machine (${summary.machine}). The machine was shared with
other work while it ran, so the times carry its noise; the ratio below comes from one run with both sides
measured in it (half the CLI runs before the service round, half after).

What ran: a local redis-server, the API (\`startService\`, no in-process worker) and ${summary.workers} worker processes
(the command of \`npm run worker\`), each with the model (\`${summary.model}\`) loaded once; then ${summary.jobs} jobs submitted at
once (\`POST /v1/videos\`, ${summary.settings}; every job its own prompt and seed). Against it: one
\`npm run generate\` process per video (the script's command, \`node --import tsx src/cli/generate.ts\`, without npm's
own start) for ${summary.cli_runs} videos with the same prompts, seeds and settings, one after the other (how the CLI makes
videos today). Reproduce: \`npm run bench:serve\` (about ${Math.ceil((summary.service.wall_s + summary.cli.total_s + summary.service.workers_loaded_s) / 60)} min here; writes this file,
docs/service-load.json and docs/images/service-page.png).

## Throughput

| | videos | wall s | videos/min |
|---|---:|---:|---:|
| service, ${summary.workers} workers | ${summary.jobs} | ${f1(summary.service.wall_s)} | **${f1(summary.service.videos_per_min)}** |
| CLI, one \`npm run generate\` per video | ${summary.cli_runs} | ${f1(summary.cli.total_s)} | ${f1(summary.cli.videos_per_min)} |

The service made **${f2(summary.throughput_ratio)}×** the videos per minute of one CLI process per video.
A CLI run took ${f2(summary.cli.per_video_s.p50)} s (median; ${f2(summary.cli.per_video_s.min)}–${f2(summary.cli.per_video_s.max)}; first half ${f2(summary.cli.first_half_p50_s)} s, second half
${f2(summary.cli.second_half_p50_s)} s). Its sidecars split that (medians): model load ${f2(summary.cli_phases_p50_s.load!)} s, encode ${f2(summary.cli_phases_p50_s.encode!)} s,
denoise ${f2(summary.cli_phases_p50_s.denoise!)} s, decode ${f2(summary.cli_phases_p50_s.decode!)} s, write ${f2(summary.cli_phases_p50_s.write!)} s, and ${f2(summary.cli_outside_pipeline_p50_s)} s outside the pipeline (Node's
start, the TypeScript load, the GPU device, the preflight). A worker pays the start and the load once (the
${summary.workers} workers were loaded in ${f1(summary.service.workers_loaded_s)} s, before the jobs were submitted: not counted above). On a worker a
job ran in ${f2(summary.service.run_s.p50)} s (median; ${f2(summary.service.run_s.min)}–${f2(summary.service.run_s.max)}), with ${summary.workers} workers sharing this machine's ${summary.cores} cores.

## Latency (submit → completed, the service's timestamps)

| | p50 s | p95 s |
|---|---:|---:|
| submit → completed | ${f2(summary.service.latency_s.p50)} | ${f2(summary.service.latency_s.p95)} |
| waiting in the queue | ${f2(summary.service.queue_wait_s.p50)} | ${f2(summary.service.queue_wait_s.p95)} |
| running on a worker | ${f2(summary.service.run_s.p50)} | ${f2(summary.service.run_s.p95)} |

All ${summary.jobs} jobs were queued at once (in ${f2(summary.service.submit_s)} s): the latency is the run plus the wait for a free
worker, which grows down the queue.

## Worker memory across jobs

After each job (when the worker logs it done): the worker process's RSS (\`/proc/<pid>/status\`; on lavapipe it
includes the "GPU" memory, which is host memory), its engine's GPU reserved bytes (its latest heartbeat in
\`/v1/queue\`) and the job's own peak reserved (the worker resets the peak between requests), in MiB, in the
order the worker ran them.

| worker | jobs | RSS idle, MiB | RSS after each job, MiB | RSS slope after the first job, MiB/job | GPU reserved (heartbeat), MiB | job's peak reserved, MiB |
|---|---:|---:|---|---:|---|---|
${rowsW}

${verdicts}

A few jobs per worker show the warm-up, not the steady state: RSS climbs over a worker's first ~50 jobs and is
then flat. The long run (100 jobs per worker) is [service-soak.md](service-soak.md)
(\`npm run bench:serve -- --jobs 200 --cli-runs 1 --no-screenshot --out docs/service-soak\`).

Raw figures: [service-load.json](service-load.json).
`;
}
