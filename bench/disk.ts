// `npm run bench:disk [-- --json FILE] [--only 14b|1.3b] [--repeat N] [--t5-layers N] [--no-md] [--generate-only] [--from-json FILE]`
//
// Weights streamed from disk (issue 22): Wan 2.1 14B on a machine with less RAM than the model.
// (a) A model folder with the real Wan 2.1 T2V-14B shapes (40 blocks, dim 5120, ffn 13824, 40 heads; the
//     real VAE; UMT5-XXL shapes cut to --t5-layers encoder layers, 1 by default as bench:memory) and
//     deterministic random bf16 weights, generated at run time by the streaming writer
//     (src/tools/random-model.ts: bounded memory, the transformer in 5 GB shards with an index, as the
//     real download) into .cache/bench-models/<id>/ (~29 GB, never committed; delete it freely), run at
//     level 3 with infer.weights_source=disk.
// (b) bench:memory's 1.3B-shaped folder (the same spec, so the same cached folder) at level 3 with
//     weights_source=memory and =disk (page cache warm: one disk run first that is not reported), --repeat
//     N rounds interleaved memory / disk for medians.
// One denoising step + decode at 128x128, 5 frames, text_len 512. Each case runs in a CHILD process, so
// that peak host RSS is per case: the child's own maxRSS (getrusage) and, where /usr/bin/time exists,
// `/usr/bin/time -v`'s "Maximum resident set size". lavapipe's GPU memory is memfd shared memory (Shmem
// of /proc/meminfo), reported beside RSS. Writes docs/disk-streaming.md.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync, rmSync, mkdtempSync, readdirSync, statSync, type Dirent } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { shmemBytes } from '../src/device/maps.ts';
import { WanPipeline, type ProgressEvent } from '../src/pipeline/wan-pipeline.ts';
import { randomModelFolder, WAN_1_3B_TRANSFORMER, WAN_14B_TRANSFORMER, WAN_VAE, umt5XxlConfig, type RandomModelSpec } from '../src/tools/random-model.ts';
import { fmtBytes } from '../src/util/errors.ts';
import { KEYS } from '../src/config/schema.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const THIS = fileURLToPath(import.meta.url);
const arg = (n: string) => {
  const i = process.argv.indexOf(n);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
const CACHE = join(ROOT, '.cache', 'bench-models');
const TOK = join(ROOT, 'test', 'fixtures', 'tokenizer', 'legacy');
const SHARD_BYTES = 5e9;
const SIZE = { height: 128, width: 128, numFrames: 5, numInferenceSteps: 1 };

/** bench:memory's 1.3B spec, exactly (the same cached folder) */
const spec13 = (teLayers: number): RandomModelSpec => ({ transformer: WAN_1_3B_TRANSFORMER, vae: WAN_VAE, textEncoder: umt5XxlConfig(teLayers), dtype: 'bf16', seed: 1234, tokenizerDir: TOK });
/** the 14B-shaped folder: the streaming writer, the transformer in 5 GB shards */
const spec14 = (teLayers: number): RandomModelSpec => ({
  transformer: WAN_14B_TRANSFORMER,
  vae: WAN_VAE,
  textEncoder: umt5XxlConfig(teLayers),
  dtype: 'bf16',
  seed: 1234,
  tokenizerDir: TOK,
  streamed: { shardBytes: SHARD_BYTES },
});

type Source = 'memory' | 'disk';
interface Io {
  /** bytes the process read through read() and friends (page cache hits included) */
  rchar: number;
  /** bytes the process caused to be fetched from storage (page cache misses) */
  read_bytes: number;
}

export interface Row {
  model: string;
  source: Source;
  /** 1.3B disk: the first (page cache warm-up) run is not reported; round of --repeat */
  round?: number;
  /** the child's getrusage maxRSS (bytes) */
  peak_rss_bytes: number;
  /** /usr/bin/time -v "Maximum resident set size" (bytes; absent without /usr/bin/time) */
  time_max_rss_bytes?: number;
  /** /usr/bin/time -v "File system inputs" (512-byte blocks read from storage) x 512 */
  time_fs_input_bytes?: number;
  /** /usr/bin/time -v wall clock of the whole child (s) */
  time_wall_seconds?: number;
  /** largest GPU allocated bytes (tensors live) over the run, and reserved (buffers held) */
  peak_allocated_bytes: number;
  peak_reserved_bytes: number;
  /** wall time of generate (encode + denoise + decode), s */
  seconds: number;
  /** load = fromPretrained; encode, denoise, decode from the result's timings */
  phase_seconds: Record<string, number>;
  /** /proc/self/io deltas over load and over generate, and per generate phase */
  io_load: Io;
  io_generate: Io;
  io_phase: Record<string, Io>;
  /** GenerateResult.uploads (level 3's block streaming; with disk: diskReads, diskBytes, diskReadMs, diskExposedMs) */
  uploads: Record<string, number> | null;
  /** system Shmem (lavapipe's GPU memory is memfd shared memory): before load, and the largest sampled during the run (bytes) */
  shmem_before_bytes: number;
  shmem_peak_bytes: number;
  /** largest sampled process.memoryUsage() fields (bytes) */
  heap_used_peak_bytes: number;
  array_buffers_peak_bytes: number;
  external_peak_bytes: number;
  /** largest sampled RssAnon / RssFile / RssShmem of /proc/self/status (bytes): what the RSS is made of (lavapipe's mapped GPU memory is RssShmem) */
  rss_anon_peak_bytes?: number;
  rss_file_peak_bytes?: number;
  rss_shmem_peak_bytes?: number;
  /** largest sampled RssAnon + RssFile: the process's own memory, without lavapipe's mapped GPU memory (bytes) */
  rss_own_peak_bytes?: number;
  /** largest sampled staging bytes (level 3's ring of mapped upload buffers: host memory on a real GPU, shmem on lavapipe), and reserved + staging */
  staging_peak_bytes?: number;
  reserved_plus_staging_peak_bytes?: number;
  /** per phase (load, encode, denoise, decode): the largest sampled RSS parts and JS memory (bytes) */
  phase_peaks?: Record<string, { rss: number; anon: number; shmem: number; array_buffers: number; external: number; staging: number; reserved: number }>;
  /** RSS sampled at the end of each phase (bytes) */
  rss_by_phase: Record<string, number>;
  /** pipe.hostWeightBytes(): host memory holding weights, by component */
  host_weight_bytes: Record<string, number>;
  /** sizes: one DiT block, the DiT's non-block weights (bytes) */
  dit_block_bytes: number;
  dit_nonblock_bytes: number;
  /** the folder's size on disk (bytes) */
  folder_bytes?: number;
  adapter?: string;
  /** sha256 of the decoded video (Float32Array bytes): memory and disk must agree */
  video_sha256?: string;
}

// ---------------------------------------------------------------- child: one case

interface ChildArgs {
  dir: string;
  model: string;
  source: Source;
  out: string;
}

function procIo(): Io {
  try {
    const t = readFileSync('/proc/self/io', 'utf8');
    const g = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(t)?.[1] ?? 0);
    return { rchar: g('rchar'), read_bytes: g('read_bytes') };
  } catch {
    return { rchar: 0, read_bytes: 0 };
  }
}
const ioDelta = (a: Io, b: Io): Io => ({ rchar: b.rchar - a.rchar, read_bytes: b.read_bytes - a.read_bytes });

/** RssAnon, RssFile, RssShmem of /proc/self/status in bytes (zeros where there is none) */
function rssParts(): { anon: number; file: number; shmem: number } {
  try {
    const t = readFileSync('/proc/self/status', 'utf8');
    const g = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(t)?.[1] ?? 0) * 1024;
    return { anon: g('RssAnon'), file: g('RssFile'), shmem: g('RssShmem') };
  } catch {
    return { anon: 0, file: 0, shmem: 0 };
  }
}


async function child(a: ChildArgs): Promise<void> {
  const shmemBefore = shmemBytes();
  const peaks = { shmem: shmemBefore, heap: 0, ab: 0, ext: 0, anon: 0, file: 0, rshm: 0, own: 0, staging: 0, resStaging: 0 };
  let engine: { allocator: { stats(): { reserved: number; stagingBytes: number } } } | null = null;
  const phasePeaks: NonNullable<Row['phase_peaks']> = {};
  let curPhase = 'load';
  const sample = () => {
    const p = rssParts();
    peaks.own = Math.max(peaks.own, p.anon + p.file);
    const pp = (phasePeaks[curPhase] ??= { rss: 0, anon: 0, shmem: 0, array_buffers: 0, external: 0, staging: 0, reserved: 0 });
    pp.rss = Math.max(pp.rss, p.anon + p.file + p.shmem);
    pp.anon = Math.max(pp.anon, p.anon);
    pp.shmem = Math.max(pp.shmem, p.shmem);
    const mu = process.memoryUsage();
    pp.array_buffers = Math.max(pp.array_buffers, mu.arrayBuffers);
    pp.external = Math.max(pp.external, mu.external);
    if (engine) {
      const st = engine.allocator.stats();
      pp.staging = Math.max(pp.staging, st.stagingBytes);
      pp.reserved = Math.max(pp.reserved, st.reserved);
    }
    if (engine) {
      const st = engine.allocator.stats();
      peaks.staging = Math.max(peaks.staging, st.stagingBytes);
      peaks.resStaging = Math.max(peaks.resStaging, st.reserved + st.stagingBytes);
    }
    peaks.anon = Math.max(peaks.anon, p.anon);
    peaks.file = Math.max(peaks.file, p.file);
    peaks.rshm = Math.max(peaks.rshm, p.shmem);
    const m = process.memoryUsage();
    peaks.heap = Math.max(peaks.heap, m.heapUsed);
    peaks.ab = Math.max(peaks.ab, m.arrayBuffers);
    peaks.ext = Math.max(peaks.ext, m.external);
    peaks.shmem = Math.max(peaks.shmem, shmemBytes());
  };
  const timer = setInterval(sample, 100);
  const rssByPhase: Record<string, number> = {};
  const ioPhase: Record<string, Io> = {};
  let ioAt = procIo();
  const onPhase = (p: string) => {
    sample();
    const now = procIo();
    if (curPhase !== 'load') {
      ioPhase[curPhase] = ioDelta(ioAt, now);
      rssByPhase[curPhase] = process.memoryUsage.rss();
    }
    curPhase = p;
    ioAt = now;
  };
  // weights_source is passed explicitly (its default is auto); a tree without the key runs memory only
  const hasKey = KEYS.some((k) => k.key === 'infer.weights_source');
  if (!hasKey && a.source !== 'memory') throw new Error('infer.weights_source is not in this tree (src/config/schema.ts): only --source memory can run');
  const io0 = procIo();
  const t0 = performance.now();
  const pipe = await WanPipeline.fromPretrained(a.dir, {
    lowMemLevel: 3,
    promptCache: false,
    profile: false,
    textLen: 512,
    vaeTileOverlap: 0.25,
    config: hasKey ? { 'infer.weights_source': a.source } : {},
    defaults: SIZE,
  });
  const loadS = (performance.now() - t0) / 1000;
  engine = pipe.engine;
  const io1 = procIo();
  rssByPhase.load = process.memoryUsage.rss();
  sample();
  const t1 = performance.now();
  ioAt = io1;
  const r = await pipe.generate({
    prompt: 'a red circle moving right on a black background',
    negativePrompt: 'blurry',
    seed: 1,
    onProgress: (ev: ProgressEvent) => {
      if (ev.type === 'phase') onPhase(ev.phase);
      if (process.argv.includes('--verbose') && ev.type !== 'memory') console.log(`    ${JSON.stringify(ev).slice(0, 160)}`);
    },
  });
  const secs = (performance.now() - t1) / 1000;
  onPhase('end');
  const io2 = procIo();
  clearInterval(timer);
  delete phasePeaks.end;
  const blocks = pipe.dit.blocks.items;
  const row: Row = {
    model: a.model,
    source: a.source,
    peak_rss_bytes: process.resourceUsage().maxRSS * 1024,
    peak_allocated_bytes: Math.max(r.memory.peakAllocated, ...Object.values(r.memory.perPhase).map((p) => p.peakAllocated)),
    peak_reserved_bytes: Math.max(r.memory.peakReserved, ...Object.values(r.memory.perPhase).map((p) => p.peakReserved)),
    seconds: secs,
    phase_seconds: { load: loadS, ...Object.fromEntries(Object.entries(r.timingsMs).map(([k, v]) => [k, v / 1000])) },
    io_load: ioDelta(io0, io1),
    io_generate: ioDelta(io1, io2),
    io_phase: ioPhase,
    uploads: (r.uploads as Record<string, number> | undefined) ?? null,
    shmem_before_bytes: shmemBefore,
    shmem_peak_bytes: peaks.shmem,
    heap_used_peak_bytes: peaks.heap,
    array_buffers_peak_bytes: peaks.ab,
    external_peak_bytes: peaks.ext,
    rss_anon_peak_bytes: peaks.anon,
    rss_file_peak_bytes: peaks.file,
    rss_shmem_peak_bytes: peaks.rshm,
    rss_own_peak_bytes: peaks.own,
    staging_peak_bytes: peaks.staging,
    reserved_plus_staging_peak_bytes: peaks.resStaging,
    rss_by_phase: rssByPhase,
    phase_peaks: phasePeaks,
    host_weight_bytes: pipe.hostWeightBytes(),
    dit_block_bytes: blocks[0]!.paramBytes(),
    dit_nonblock_bytes: pipe.dit.paramBytes() - blocks.reduce((x, b) => x + b.paramBytes(), 0),
    adapter: pipe.engine.adapterName,
    video_sha256: createHash('sha256').update(new Uint8Array(r.video.buffer, r.video.byteOffset, r.video.byteLength)).digest('hex'),
  };
  pipe.dispose();
  writeFileSync(a.out, JSON.stringify(row));
}

// ---------------------------------------------------------------- parent

const TIME = '/usr/bin/time';

/** Run one case in a child process (wrapped in /usr/bin/time -v when it exists); its row. */
async function runCase(dir: string, model: string, source: Source, verbose: boolean): Promise<Row> {
  const tmp = mkdtempSync(join(tmpdir(), 'bench-disk-'));
  const out = join(tmp, 'row.json');
  const timeOut = join(tmp, 'time.txt');
  const nodeArgs = ['--expose-gc', '--import', 'tsx', THIS, '--child', JSON.stringify({ dir, model, source, out } satisfies ChildArgs), ...(verbose ? ['--verbose'] : [])];
  const useTime = existsSync(TIME);
  const [cmd, args] = useTime ? [TIME, ['-v', '-o', timeOut, process.execPath, ...nodeArgs]] : [process.execPath, nodeArgs];
  const code = await new Promise<number | null>((res, rej) => {
    const p = spawn(cmd, args, { stdio: 'inherit', cwd: ROOT });
    p.on('error', rej);
    p.on('exit', (c, sig) => res(sig ? -1 : c));
  });
  const timeText = useTime && existsSync(timeOut) ? readFileSync(timeOut, 'utf8') : '';
  if (code !== 0 || !existsSync(out)) {
    rmSync(tmp, { recursive: true, force: true });
    throw new Error(`${model} ${source}: the child exited with ${code}${timeText ? `\n${timeText}` : ''}`);
  }
  const row = JSON.parse(readFileSync(out, 'utf8')) as Row;
  if (timeText) {
    const g = (re: RegExp) => re.exec(timeText)?.[1];
    const maxRss = g(/Maximum resident set size \(kbytes\):\s*(\d+)/);
    if (maxRss) row.time_max_rss_bytes = Number(maxRss) * 1024;
    const fsIn = g(/File system inputs:\s*(\d+)/);
    if (fsIn) row.time_fs_input_bytes = Number(fsIn) * 512;
    const wall = g(/Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*([\d:.]+)/);
    if (wall) row.time_wall_seconds = wall.split(':').reduce((acc, v) => acc * 60 + Number(v), 0);
  }
  rmSync(tmp, { recursive: true, force: true });
  return row;
}

function duBytes(dir: string): number {
  // apparent size of every file (the folder is written densely: apparent = on disk)
  let n = 0;
  const walk = (d: string) => {
    for (const e of readdirSyncSafe(d)) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) n += statSize(p);
    }
  };
  walk(dir);
  return n;
}
const readdirSyncSafe = (d: string): Dirent[] => {
  try {
    return readdirSync(d, { withFileTypes: true });
  } catch {
    return [];
  }
};
const statSize = (p: string) => {
  try {
    return statSync(p).size;
  } catch {
    return 0;
  }
};

const med = (v: number[]) => {
  const a = [...v].sort((x, y) => x - y);
  return a.length === 0 ? NaN : a.length % 2 ? a[(a.length - 1) / 2]! : (a[a.length / 2 - 1]! + a[a.length / 2]!) / 2;
};

async function main() {
  if (process.argv.includes('--child')) return child(JSON.parse(arg('--child')!) as ChildArgs);
  const fromJson = arg('--from-json');
  if (fromJson) {
    const j = JSON.parse(readFileSync(fromJson, 'utf8')) as { date: string; rows: Row[]; gen?: GenInfo; repeat: number; teLayers: number };
    writeFileSync(join(ROOT, 'docs', 'disk-streaming.md'), renderDoc(j.rows, j.date, j.gen ?? {}, j.repeat, j.teLayers));
    console.log('wrote docs/disk-streaming.md');
    return;
  }
  const only = arg('--only');
  if (only && only !== '14b' && only !== '1.3b') throw new Error(`--only: 14b or 1.3b, got ${only}`);
  const repeat = Math.max(1, Number(arg('--repeat') ?? 1));
  const teLayers = Number(arg('--t5-layers') ?? 1);
  const verbose = process.argv.includes('--verbose');
  const log = (s: string) => console.log(`  ${s}`);
  const rows: Row[] = [];
  const gen: GenInfo = {};
  const jsonPath = arg('--json');
  const save = () => {
    if (!jsonPath) return;
    mkdirSync(dirname(resolve(jsonPath)), { recursive: true });
    writeFileSync(resolve(jsonPath), JSON.stringify(rows, null, 2));
  };
  const date = new Date().toISOString();

  let dir14: string | null = null;
  let dir13: string | null = null;
  if (only !== '1.3b') {
    console.log('== the Wan 2.1 14B-shaped folder (streaming writer, 5 GB shards)');
    const t0 = performance.now();
    dir14 = await randomModelFolder(CACHE, spec14(teLayers), log);
    gen.dir14 = dir14;
    gen.seconds14 = (performance.now() - t0) / 1000;
    gen.bytes14 = duBytes(dir14);
    console.log(`  ${dir14}: ${fmtBytes(gen.bytes14)} (${gen.seconds14.toFixed(0)} s, 0 when it was already there)`);
  }
  if (only !== '14b') {
    console.log("== the Wan 2.1 1.3B-shaped folder (bench:memory's)");
    dir13 = await randomModelFolder(CACHE, spec13(teLayers), log);
    gen.dir13 = dir13;
    gen.bytes13 = duBytes(dir13);
    console.log(`  ${dir13}: ${fmtBytes(gen.bytes13)}`);
  }
  if (process.argv.includes('--generate-only')) return;

  const show = (r: Row) =>
    console.log(
      `  ${r.model} ${r.source}${r.round !== undefined ? ` (round ${r.round})` : ''}: peak RSS ${fmtBytes(r.peak_rss_bytes)}` +
        `${r.time_max_rss_bytes ? ` (time -v ${fmtBytes(r.time_max_rss_bytes)})` : ''} [${rssSplit(r)}], heap ${fmtBytes(r.heap_used_peak_bytes)}, arrayBuffers ${fmtBytes(r.array_buffers_peak_bytes)}, host weights ${JSON.stringify(Object.fromEntries(Object.entries(r.host_weight_bytes).map(([k, v]) => [k, fmtBytes(v)])))}, Shmem peak ${fmtBytes(r.shmem_peak_bytes)} (before ${fmtBytes(r.shmem_before_bytes)}), ` +
        `GPU peak allocated ${fmtBytes(r.peak_allocated_bytes)}, generate ${r.seconds.toFixed(1)} s, phases ${JSON.stringify(Object.fromEntries(Object.entries(r.phase_seconds).map(([k, v]) => [k, +v.toFixed(1)])))}, ` +
        `read during generate ${fmtBytes(r.io_generate.rchar)} (from storage ${fmtBytes(r.io_generate.read_bytes)}), uploads ${JSON.stringify(r.uploads)}`,
    );
  if (dir14) {
    console.log('== 14B shapes, level 3, weights_source=disk');
    const r = await runCase(dir14, 'Wan2.1-14B shapes', 'disk', verbose);
    r.folder_bytes = gen.bytes14;
    rows.push(r);
    show(r);
    save();
  }
  if (dir13) {
    console.log(`== 1.3B shapes, level 3: memory vs disk, ${repeat} round(s) interleaved (one disk run first to warm the page cache, not reported)`);
    const warm = await runCase(dir13, 'Wan2.1-1.3B shapes', 'disk', verbose);
    console.log(`  warm-up disk run: ${warm.seconds.toFixed(1)} s, read from storage ${fmtBytes(warm.io_generate.read_bytes + warm.io_load.read_bytes)}`);
    for (let round = 0; round < repeat; round++) {
      for (const source of (round % 2 ? ['disk', 'memory'] : ['memory', 'disk']) as Source[]) {
        const r = await runCase(dir13, 'Wan2.1-1.3B shapes', source, verbose);
        r.folder_bytes = gen.bytes13;
        if (repeat > 1) r.round = round;
        rows.push(r);
        show(r);
        save();
      }
    }
  }
  save();
  if (jsonPath) {
    writeFileSync(resolve(jsonPath).replace(/\.json$/, '') + '.full.json', JSON.stringify({ date, rows, gen, repeat, teLayers }, null, 2));
    console.log(`wrote ${jsonPath} (+ .full.json for --from-json)`);
  }
  if (!process.argv.includes('--no-md')) {
    writeFileSync(join(ROOT, 'docs', 'disk-streaming.md'), renderDoc(rows, date, gen, repeat, teLayers));
    console.log('wrote docs/disk-streaming.md');
  }
}

interface GenInfo {
  dir14?: string;
  seconds14?: number;
  bytes14?: number;
  dir13?: string;
  bytes13?: number;
  /** a separate same-video check on the 1.3B shapes (rows of another run, hashes only) */
  same13?: { date: string; rows: Array<{ source: string; video_sha256: string }>; note: string };
}

const GiB = 2 ** 30;
/** 'anon X / file Y / shmem Z' of the sampled RSS parts */
const rssSplit = (r: Row) => (r.rss_anon_peak_bytes !== undefined ? `anon ${fmtBytes(r.rss_anon_peak_bytes)} / file ${fmtBytes(r.rss_file_peak_bytes ?? 0)} / shmem ${fmtBytes(r.rss_shmem_peak_bytes ?? 0)}` : '-');
const f1 = (v: number | undefined) => (v === undefined || Number.isNaN(v) ? '-' : v.toFixed(1));
const mbps = (bytes: number, s: number) => (s > 0 && bytes > 0 ? `${(bytes / 1e6 / s).toFixed(0)} MB/s` : '-');

/** ', written in N s (... MB/s, writer max RSS ...) on DATE' from the folder's random-model.json, or '' */
function writtenNote(dir?: string): string {
  try {
    const w = (JSON.parse(readFileSync(join(dir!, 'random-model.json'), 'utf8')) as { written?: { date: string; seconds: number; tensorBytes: number; processMaxRssBytes: number } }).written;
    if (!w) return '';
    return `, written in ${w.seconds.toFixed(0)} s (${(w.tensorBytes / 1e6 / w.seconds).toFixed(0)} MB/s; the writing process's peak RSS ${fmtBytes(w.processMaxRssBytes)}) on ${w.date.slice(0, 10)}`;
  } catch {
    return '';
  }
}

function phaseTable(r: Row): string[] {
  const pp = r.phase_peaks ?? {};
  return [
    '| phase | RSS | RssAnon | RssShmem | ArrayBuffers | GPU reserved | staging | read (from storage) |',
    '|---|---:|---:|---:|---:|---:|---:|---:|',
    ...Object.entries(pp).map(
      ([ph, p]) =>
        `| ${ph} | ${fmtBytes(p.rss)} | ${fmtBytes(p.anon)} | ${fmtBytes(p.shmem)} | ${fmtBytes(p.array_buffers)} | ${fmtBytes(p.reserved)} | ${fmtBytes(p.staging)} | ` +
        `${ph === 'load' ? `${fmtBytes(r.io_load.rchar)} (${fmtBytes(r.io_load.read_bytes)})` : r.io_phase[ph] ? `${fmtBytes(r.io_phase[ph]!.rchar)} (${fmtBytes(r.io_phase[ph]!.read_bytes)})` : '-'} |`,
    ),
  ];
}

function renderDoc(rows: Row[], date: string, gen: GenInfo, repeat: number, teLayers: number): string {
  const rel = (p?: string) => (p ? p.replace(`${ROOT}/`, '') : '(not generated in this run)');
  const r14 = rows.find((r) => r.model.includes('14B') && r.source === 'disk');
  const mem = rows.filter((r) => r.model.includes('1.3B') && r.source === 'memory');
  const dsk = rows.filter((r) => r.model.includes('1.3B') && r.source === 'disk');
  const diskRead = (r: Row) => {
    const u = r.uploads ?? {};
    if (u.diskBytes !== undefined) {
      const hidden = u.diskReadMs ? 1 - (u.diskExposedMs ?? 0) / u.diskReadMs : NaN;
      return `${fmtBytes(u.diskBytes)} in ${u.diskReads} reads, ${(u.diskReadMs! / 1000).toFixed(1)} s (${mbps(u.diskBytes, u.diskReadMs! / 1000)}), ${Number.isNaN(hidden) ? '-' : `${(100 * hidden).toFixed(0)} %`} hidden`;
    }
    return '-';
  };
  const table = [
    '| model | source | peak RSS (child) | peak RSS (`time -v`) | RSS parts, largest sampled | Shmem peak (before) | peak GPU allocated | load s | encode s | denoise s | decode s | generate s | read during generate (from storage) | disk reads (pipeline stats) |',
    '|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|',
    ...rows.map(
      (r) =>
        `| ${r.model}${r.round !== undefined ? ` #${r.round + 1}` : ''} | ${r.source} | ${fmtBytes(r.peak_rss_bytes)} | ${r.time_max_rss_bytes ? fmtBytes(r.time_max_rss_bytes) : '-'} | ${rssSplit(r)} | ${fmtBytes(r.shmem_peak_bytes)} (${fmtBytes(r.shmem_before_bytes)}) | ${fmtBytes(r.peak_allocated_bytes)} | ` +
        `${f1(r.phase_seconds.load)} | ${f1(r.phase_seconds.encode)} | ${f1(r.phase_seconds.denoise)} | ${f1(r.phase_seconds.decode)} | ${r.seconds.toFixed(1)} | ${fmtBytes(r.io_generate.rchar)} (${fmtBytes(r.io_generate.read_bytes)}) | ${diskRead(r)} |`,
    ),
  ];
  const targets: string[] = [];
  if (r14) {
    const rss = Math.max(r14.peak_rss_bytes, r14.time_max_rss_bytes ?? 0);
    const hostW = Object.values(r14.host_weight_bytes).reduce((a, b) => a + b, 0);
    const shm = r14.rss_shmem_peak_bytes ?? 0;
    const staging = r14.staging_peak_bytes ?? 0;
    const own = r14.rss_own_peak_bytes ?? 0;
    targets.push(
      `- **14B-shaped, level 3, \`disk\`: peak host RSS ≤ 4 GiB, and it completes here.** It completed (generate ${r14.seconds.toFixed(0)} s, denoise ${f1(r14.phase_seconds.denoise)} s). ` +
        `Peak RSS ${fmtBytes(rss)} (the child's maxRSS${r14.time_max_rss_bytes ? ' and `/usr/bin/time -v` agree' : ''}): **${rss <= 4 * GiB ? 'met' : 'not met'}**, ` +
        `with ${gen.bytes14 ? fmtBytes(gen.bytes14) : 'about 27 GiB'} of weights on disk (\`memory\` would need ~26 GiB of host memory for the blocks alone).`,
      `  - What the RSS is made of (largest samples of /proc/self/status, every 100 ms): **RssShmem ${fmtBytes(shm)}**: lavapipe's GPU memory, memfd pages mapped into ` +
        `the process, so on this machine the GPU's memory is part of RSS: GPU buffers reserved (peak) ${fmtBytes(r14.peak_reserved_bytes)} + level 3's staging ring ${fmtBytes(staging)} ` +
        `(the mapped upload buffers: ${staging > 2 * 670 * 2 ** 20 ? 'two of one block each' : 'chunked, a ring of 4 × 64 MiB (src/pipeline/residency.ts)'}) = ${fmtBytes(r14.peak_reserved_bytes + staging)}, the rest lavapipe's own; **RssAnon ${fmtBytes(r14.rss_anon_peak_bytes ?? 0)}**, of it ` +
        `ArrayBuffers up to ${fmtBytes(r14.array_buffers_peak_bytes)} (the host weights: ${Object.entries(r14.host_weight_bytes).map(([k, v]) => `${k} ${fmtBytes(v)}`).join(', ')}), ` +
        `the JS heap ${fmtBytes(r14.heap_used_peak_bytes)}; RssFile ${fmtBytes(r14.rss_file_peak_bytes ?? 0)}. Per phase below.`,
      `  - Without lavapipe's GPU memory, what the process holds itself (RssAnon + RssFile, largest sample): ${fmtBytes(own)}. On a GPU, where the slots and activations ` +
        `are device memory, host RSS would be about that plus the staging ring (pinned host memory): ~${fmtBytes(own + staging)} (an estimate from these parts, not measured on a GPU).`,
    );
    const pk = Object.entries(r14.phase_peaks ?? {}).sort((a, b) => b[1].rss - a[1].rss)[0];
    if (pk) {
      const [ph, p] = pk;
      const lag = p.shmem - (p.reserved + p.staging);
      targets.push(
        `  - The largest RSS sample is in the ${ph} phase (${fmtBytes(p.rss)}: RssAnon ${fmtBytes(p.anon)}, RssShmem ${fmtBytes(p.shmem)})` +
          (lag > 512 * 2 ** 20
            ? `, where the engine held at most ${fmtBytes(p.reserved)} of GPU buffers and ${fmtBytes(p.staging)} of staging: ${fmtBytes(lag)} of lavapipe memory was still mapped after the engine ` +
              "had freed it (the previous phase's slots, staging ring and activations). Dawn destroys freed buffers only when later queue work has completed (measured " +
              'separately: a freed 700 MiB buffer stayed in RssShmem, even after `emptyCache` and an idle queue, until a few more submissions, then went), so two phases\' GPU memory overlap at the switch.'
            : '.'),
      );
    }
    if (r14.array_buffers_peak_bytes - hostW > 256 * 2 ** 20) {
      const enc = r14.phase_peaks?.encode;
      targets.push(
        `  - ${fmtBytes(r14.array_buffers_peak_bytes - hostW)} of ArrayBuffers beyond the host weights were live at the peak${enc ? ` (encode phase: up to ${fmtBytes(enc.array_buffers)})` : ''}. ` +
          "They are the CPU text encoder's read buffers: with `weights_source=disk` each UMT5 layer is read per use into one of two reused sets of " +
          'SharedArrayBuffers (DiskHostBlocks in src/pipeline/disk-weights.ts: the next layer is read while one computes), one layer (~386 MiB at UMT5-XXL shapes, bf16) each. ' +
          '(Until 2026-12-06 each encode allocated fresh buffers, and the CPU workers\' heaps kept ~375 MiB more alive per encode.)',
      );
    }
    const d = r14.phase_seconds.denoise ?? 0;
    const u = r14.uploads ?? {};
    targets.push(
      `- 14B reads: ${fmtBytes(r14.io_generate.rchar)} read during generate (${fmtBytes(r14.io_generate.read_bytes)} of it from storage; \`time -v\` file system inputs ` +
        `${r14.time_fs_input_bytes ? fmtBytes(r14.time_fs_input_bytes) : '-'} for the whole child), ${mbps(r14.io_phase.denoise?.rchar ?? 0, d)} averaged over the denoise phase` +
        (u.diskBytes !== undefined ? `; the pipeline's own count: ${diskRead(r14)}, i.e. the reads ran at that rate while they ran and the denoise is bound by compute` : '') +
        ((r14.staging_peak_bytes ?? 0) <= 512 * 2 ** 20 && (r14.dit_block_bytes ?? 0) > 512 * 2 ** 20
          ? '. The chunked staging ring (4 × 64 MiB) holds only 256 MiB of the next block, so only that much of its read runs ahead while the current block computes; the rest is read when the block is needed ' +
            '(with two whole-block staging buffers, 1.3 GiB, the earlier run on 2026-12-06 hid 75 % of the reads and peaked at 5.21 GiB RSS). The exposed reads are ' +
            `${(((u.diskExposedMs ?? 0) / 1000 / Math.max(1e-9, d)) * 100).toFixed(0)} % of the denoise time here`
          : '') +
        `. ${r14.dit_block_bytes ? `One block is ${fmtBytes(r14.dit_block_bytes)}, the DiT's non-block weights ${fmtBytes(r14.dit_nonblock_bytes)} (on the GPU).` : ''}`,
    );
  }
  if (mem.length && dsk.length) {
    const mDen = med(mem.map((r) => r.phase_seconds.denoise ?? 0));
    const dDen = med(dsk.map((r) => r.phase_seconds.denoise ?? 0));
    const mTot = med(mem.map((r) => r.seconds));
    const dTot = med(dsk.map((r) => r.seconds));
    const ratio = dDen / mDen;
    const perRound = mem.map((m, i) => (dsk[i] ? ((dsk[i]!.phase_seconds.denoise ?? 0) / (m.phase_seconds.denoise ?? 1)).toFixed(2) : '-')).join(' / ');
    targets.push(
      `- **1.3B-shaped, page cache warm: \`disk\` denoise time ≤ 1.10 × \`memory\`.** ${mem.length > 1 ? `Medians of ${mem.length} interleaved rounds` : 'One round'}: denoise ${dDen.toFixed(1)} s (disk) / ${mDen.toFixed(1)} s (memory) = ` +
        `**${ratio.toFixed(2)}×: ${ratio <= 1.1 ? 'met' : 'not met'}**${mem.length > 1 ? ` (per-round ratios ${perRound})` : ''}; whole request (generate) ${dTot.toFixed(1)} / ${mTot.toFixed(1)} s = ${(dTot / mTot).toFixed(2)}×. ` +
        `Peak RSS ${fmtBytes(med(dsk.map((r) => r.peak_rss_bytes)))} (disk) vs ${fmtBytes(med(mem.map((r) => r.peak_rss_bytes)))} (memory); load ${f1(med(dsk.map((r) => r.phase_seconds.load ?? 0)))} vs ${f1(med(mem.map((r) => r.phase_seconds.load ?? 0)))} s.`,
    );
    const own = [...mem, ...dsk].filter((r) => r.video_sha256) as Array<{ source: string; video_sha256: string }>;
    const check = own.length ? { rows: own, when: 'these runs' } : gen.same13 ? { rows: gen.same13.rows, when: `a separate run on ${gen.same13.date.slice(0, 10)} (${gen.same13.note})` } : null;
    if (check) {
      const hashes = new Set(check.rows.map((r) => r.video_sha256));
      const n = (src: string) => check.rows.filter((r) => r.source === src).length;
      targets.push(
        `- **Same video** (1.3B shapes): the decoded video's sha256 over ${check.rows.length} runs (${n('memory')} memory, ${n('disk')} disk; ${check.when}): ` +
          (hashes.size === 1 ? `all identical (\`${[...hashes][0]!.slice(0, 16)}…\`).` : `**${hashes.size} different hashes**: disk and memory disagree.`),
      );
    }
  }
  return [
    '# Weights streamed from disk, measured',
    '',
    '<!-- generated by `npm run bench:disk` (bench/disk.ts); edit the text there, not here -->',
    `Written by \`npm run bench:disk\` on ${date.slice(0, 10)}; adapter: ${rows[0]?.adapter ?? '?'}. Machine: 2 vCPUs, 24 GiB RAM (shared with other jobs), no GPU (lavapipe).`,
    '',
    '`infer.weights_source=disk` keeps the weights that wait off the GPU (level 3\'s streamed DiT blocks) in their files and reads',
    'each block per use straight into the GPU staging ring, the next read overlapping the current block\'s compute; `memory` (the',
    'level-3 behaviour before) reads them into host memory at load. This page shows the 14B-shaped model running on a machine',
    'with less RAM than the model, and what `disk` costs against `memory` where both fit.',
    '',
    '## What was run',
    '',
    `- **Wan 2.1 14B shapes**: 40 blocks, dim 5120, 40 heads, ffn 13824 (the real Wan2.1-T2V-14B transformer config), the real Wan 2.1 VAE,`,
    `  UMT5-XXL shapes with the encoder cut to ${teLayers} layer${teLayers === 1 ? '' : 's'} (as bench:memory; the full encoder is 10.6 GiB and is not what this page measures),`,
    '  deterministic random bf16 weights. Written by the streaming writer of src/tools/random-model.ts (`spec.streamed`): the header',
    '  first, then each tensor generated in 16 MiB chunks while the previous chunk is written, so it never holds more than two chunks;',
    '  the transformer in 5 GB shards with a `diffusion_pytorch_model.safetensors.index.json`, like the real download, so the sharded',
    '  reader is what runs. The values come from a seeded quantile table of N(0, std²) (src/tools/random-model.ts explains it): random',
    '  benchmark data, not a model.',
    `  Folder: \`${rel(gen.dir14)}\`${gen.bytes14 ? `, ${fmtBytes(gen.bytes14)} (${(gen.bytes14 / 1e9).toFixed(1)} GB)` : ''}${writtenNote(gen.dir14)}.`,
    `- **Wan 2.1 1.3B shapes**: bench:memory's folder (the same spec, so the same cache entry): \`${rel(gen.dir13)}\`${gen.bytes13 ? `, ${fmtBytes(gen.bytes13)}` : ''}.`,
    '- Every case: level 3 (`infer.diffusion.low_mem_level=3`), one denoising step with CFG + decode, 128×128, 5 frames, text_len 512,',
    '  seed 1, prompt cache off; `WanPipeline.fromPretrained(dir, { lowMemLevel: 3, config: { \'infer.weights_source\': source }, ... })`.',
    `- Each case in its own child process, so peak RSS is that case's: the child's \`process.resourceUsage().maxRSS\` and \`/usr/bin/time -v\`'s`,
    '  "Maximum resident set size" around the whole child (node start, load, generate, dispose). On lavapipe GPU memory is memfd',
    '  shared memory: the pages the process maps count in its RSS (RssShmem; the table splits RSS into RssAnon / RssFile / RssShmem,',
    '  each the largest sample, every 100 ms), and system-wide in /proc/meminfo\'s Shmem (other jobs\' shared memory is in it too:',
    '  the table gives its largest sample and its value before the case started).',
    '- Reads: /proc/self/io of the child over the generate call — `rchar` (every byte read, page cache hits included) and, in',
    '  parentheses, `read_bytes` (bytes fetched from storage: page cache misses); "disk reads" is the pipeline\'s own count',
    '  (`GenerateResult.uploads.diskBytes`, `diskReadMs`, and the part of the read time that acquire() did not wait for).',
    `- 1.3B pair: one \`disk\` run first to warm the page cache (not reported), then ${repeat} round${repeat > 1 ? 's' : ''} of \`memory\` and \`disk\`${repeat > 1 ? ', alternating which goes first' : ''}.`,
    '',
    '## Results',
    '',
    ...table,
    '',
    '## Targets',
    '',
    ...(targets.length ? targets : ['- (no case ran)']),
    '',
    ...(r14?.phase_peaks ? ['Per phase, 14B-shaped `disk` (largest samples; RSS = RssAnon + RssFile + RssShmem):', '', ...phaseTable(r14), ''] : []),
    '## Reproduce',
    '',
    '```sh',
    'npm run bench:disk                          # both models; writes this page',
    'npm run bench:disk -- --only 14b            # the 14B-shaped case alone',
    'npm run bench:disk -- --only 1.3b --repeat 5 --json rows.json   # the memory/disk ratio as medians of 5 interleaved rounds',
    'npm run bench:disk -- --generate-only       # only write the model folders',
    'npm run bench:disk -- --from-json rows.full.json               # re-render this page from a run',
    '```',
    '',
    'The first run writes the 14B-shaped folder (about 29 GB; it needs that much free disk and ~160 MB of RAM,',
    'and resumes shard by shard if interrupted: complete shards are kept, `.complete` is written last). It is reused afterwards.',
    'Run it alone: the 14B case streams ~28 GB from disk per denoising step, and lavapipe uses both cores.',
    '',
    '## Deleting the generated models',
    '',
    'Everything generated is under `.cache/bench-models/` (ignored by git). Each folder is one spec (its name is a hash of the spec); delete',
    'any of them, or all: `rm -rf .cache/bench-models` (bench:memory, bench:plan and bench:disk generate what they need again).',
    `The 14B-shaped folder alone: \`rm -rf ${rel(gen.dir14)}\`.`,
    '',
  ].join('\n');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
