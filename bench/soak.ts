// `npm run bench:soak [-- --runs 50 --model DIR --out docs/soak.json]`
// Generations back to back in ONE process on ONE engine, alternating memory levels 0 and 3 (each
// its own pipeline: load, sample, decode, dispose), recording after each: the GPU bytes the
// allocator still holds (allocated after dispose must be 0; reserved is the engine's cache), the
// process RSS and the V8 heap (after a GC). Leaks show as a slope after the warm-up; the table in
// docs/reliability.md comes from here. Also checks every video is bit-identical to the first of its level.

import { writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { Engine } from '../src/runtime/engine.ts';
import { WanPipeline } from '../src/pipeline/wan-pipeline.ts';
import { settingsForModel } from '../src/config/settings.ts';
import { fmtBytes } from '../src/util/errors.ts';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}

const runs = Number(arg('runs', '50'));
const model = arg('model', 'weights/demo');
const out = arg('out', '');
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) console.error('note: run with node --expose-gc (npm run bench:soak does) for heap figures after a full GC');

interface Row {
  run: number;
  level: number;
  ms: number;
  allocatedAfterDispose: number;
  leftOwners: Record<string, number>;
  reserved: number;
  rss: number;
  heapUsed: number;
  external: number;
  videoHash: string;
}

const engine = await Engine.create();
const rows: Row[] = [];
const firstHash = new Map<number, string>();
let mismatches = 0;
const t00 = performance.now();
for (let i = 0; i < runs; i++) {
  const level = i % 2 === 0 ? 0 : 3;
  const s = settingsForModel(model, {});
  s.load.lowMemLevel = level;
  s.request.prompt = 'a red circle moving right on a black background';
  s.request.seed = 7;
  const t0 = performance.now();
  const pipe = await WanPipeline.fromSettings(s, { engine });
  const r = await pipe.generate({ prompt: s.request.prompt });
  pipe.dispose();
  const ms = performance.now() - t0;
  await engine.sync();
  gc?.();
  const st = engine.allocator.stats();
  const left = Object.fromEntries(engine.allocator.allocatedByOwner(3));
  const m = process.memoryUsage();
  const hash = createHash('sha256').update(new Uint8Array(r.video.buffer, r.video.byteOffset, r.video.byteLength)).digest('hex').slice(0, 16);
  if (!firstHash.has(level)) firstHash.set(level, hash);
  else if (firstHash.get(level) !== hash) mismatches++;
  const row: Row = { run: i + 1, level, ms, allocatedAfterDispose: st.allocated, leftOwners: left, reserved: st.reserved, rss: m.rss, heapUsed: m.heapUsed, external: m.external, videoHash: hash };
  rows.push(row);
  console.log(
    `${String(i + 1).padStart(3)} level ${level}  ${(ms / 1000).toFixed(2)} s  allocated after dispose ${fmtBytes(st.allocated)}${st.allocated ? ` (${Object.entries(left).map(([k, v]) => `${k} ${fmtBytes(v)}`).join(', ')})` : ''}  reserved ${fmtBytes(st.reserved)}  RSS ${fmtBytes(m.rss)}  heap ${fmtBytes(m.heapUsed)}  video ${hash}`,
  );
}
engine.allocator.emptyCache();
engine.destroy();

// flat after warm-up: compare the mean of the second quarter with the mean of the last quarter
const q = Math.max(1, Math.floor(rows.length / 4));
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
const drift = (k: 'rss' | 'reserved' | 'heapUsed') => mean(rows.slice(-q).map((r) => r[k])) - mean(rows.slice(q, 2 * q).map((r) => r[k]));
const summary = {
  runs,
  model,
  adapter: engine.adapterName,
  total_s: (performance.now() - t00) / 1000,
  max_allocated_after_dispose: Math.max(...rows.map((r) => r.allocatedAfterDispose)),
  reserved_first_last: [rows[0]?.reserved, rows.at(-1)?.reserved],
  rss_first_last: [rows[0]?.rss, rows.at(-1)?.rss],
  drift_after_warmup_bytes: { rss: drift('rss'), reserved: drift('reserved'), heap: drift('heapUsed') },
  video_mismatches: mismatches,
};
console.log(JSON.stringify(summary, null, 2));
if (out) writeFileSync(out, JSON.stringify({ summary, rows }, null, 2) + '\n');
