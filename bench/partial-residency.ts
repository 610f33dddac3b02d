// `node --expose-gc --import tsx bench/partial-residency.ts [-- --json FILE] [--resident 0,10,20,30] [--rounds 3]
//   [--model DIR] [--height 128] [--width 128] [--frames 5] [--text-len 512]`
// Level 3 with some DiT blocks kept resident (StreamedBlocks' `resident` option, issue 18): for each
// resident count, one denoising step with CFG (cond and uncond batched, B = 2, as the pipeline runs
// it) on the Wan 2.1 1.3B-shaped random model (the folder bench/memory.ts generates into
// .cache/bench-models, 3.4 GB, once), round-robin over the counts so slow drifts of this shared
// machine hit every count alike; medians reported. The DiT is loaded as level 3 loads it (block
// weights in host memory, the rest on the GPU) and driven directly, so only the DiT is measured.
//
// What is timed, per count and round, on a fresh ring (as each level-3 request finds it: the decode
// gave its GPU memory back): "resident upload s", allocating the ring and uploading the resident
// blocks (once per request); then "step s", one denoising step (latents in, forward, prediction
// read back): every step of a request costs that, the first one plus the resident uploads, which
// overlap its first blocks. Peak allocated is over the step (resident blocks, slots, non-block
// weights, the embedded context and the step's activations).
import { writeFileSync, mkdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Engine } from '../src/runtime/engine.ts';
import { openModelFolder } from '../src/io/model-folder.ts';
import { loadModuleFrom } from '../src/nn/load.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../src/models/wan_dit/model.ts';
import { StreamedBlocks } from '../src/pipeline/residency.ts';
import { randomModelFolder, WAN_1_3B_TRANSFORMER, WAN_VAE, umt5XxlConfig } from '../src/tools/random-model.ts';
import { fmtBytes } from '../src/util/errors.ts';
import { Rng } from '../src/util/rng.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const arg = (n: string) => {
  const i = process.argv.indexOf(n);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
const MiB = 2 ** 20;

interface Run {
  round: number;
  resident: number;
  resident_upload_seconds: number;
  step_seconds: number;
  peak_allocated_bytes: number;
  peak_reserved_bytes: number;
  uploads: number;
  upload_bytes: number;
  /** main-thread upload ms of the step, and the part acquire() waited for */
  upload_ms: number;
  exposed_ms: number;
}

const median = (v: number[]) => {
  const a = [...v].sort((x, y) => x - y);
  return a.length % 2 ? a[(a.length - 1) / 2]! : (a[a.length / 2 - 1]! + a[a.length / 2]!) / 2;
};

async function main() {
  const counts = (arg('--resident') ?? '0,10,20,30').split(',').map(Number);
  const rounds = Math.max(1, Number(arg('--rounds') ?? 3));
  const height = Number(arg('--height') ?? 128);
  const width = Number(arg('--width') ?? 128);
  const frames = Number(arg('--frames') ?? 5);
  const textLen = Number(arg('--text-len') ?? 512);
  // the same spec as bench/memory.ts, so both reuse one generated folder
  const dir =
    arg('--model') ??
    (await randomModelFolder(
      join(ROOT, '.cache', 'bench-models'),
      { transformer: WAN_1_3B_TRANSFORMER, vae: WAN_VAE, textEncoder: umt5XxlConfig(1), dtype: 'bf16', seed: 1234, tokenizerDir: join(ROOT, 'test', 'fixtures', 'tokenizer', 'legacy') },
      (s) => console.log(`  ${s}`),
    ));
  const e = await Engine.create();
  const adapter = e.adapterName;
  console.log(`adapter: ${adapter}; model ${dir}; ${height}x${width}, ${frames} frames, text_len ${textLen}, CFG batched (B = 2); ${rounds} rounds`);
  const folder = await openModelFolder(dir);
  const dit = new WanTransformer3DModel(ditDimsFromConfig(folder.transformer.config));
  const t0 = performance.now();
  await loadModuleFrom(dit, folder.transformer, { engine: e, owner: 'dit', placement: (k) => (dit.isBlockKey(k) ? 'host' : 'device') });
  console.log(`DiT loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s: ${dit.blocks.length} blocks in host memory`);

  const { inChannels: C, textDim } = dit.dims;
  const F = (frames - 1) / 4 + 1;
  const lh = height / 8;
  const lw = width / 8;
  const rng = new Rng(1);
  const latent = rng.fillNormal(new Float32Array(2 * C * F * lh * lw));
  // a random prompt context stands in for the text encoder's output (the DiT's cost does not depend on it)
  const ctxEmb = e.keep(e.scope(() => dit.embedText(e.fromHost(rng.fillNormal(new Float32Array(2 * textLen * textDim)), [2, textLen, textDim], 'f32'))));
  const gc = (globalThis as { gc?: () => void }).gc;
  const runs: Run[] = [];
  const json = arg('--json');
  try {
    for (let round = 0; round < rounds; round++) {
      for (const asked of counts) {
        e.allocator.emptyCache();
        // a new ring re-packs the host images (untimed): the previous one went with dispose
        const ring = new StreamedBlocks(e, dit.blocks.items, 'dit.blocks.slot', { resident: asked, allocateNow: false, ownerOf: (i) => `dit.blocks.${i}` });
        const resident = ring.resident;
        let t = performance.now();
        // the first acquire allocates the ring and starts every resident upload (none: the step allocates it)
        for (let i = 0; i < resident; i++) await ring.acquire(i);
        await e.sync();
        const uploadS = (performance.now() - t) / 1000;
        ring.resetStats();
        e.allocator.resetPeakMemoryStats();
        t = performance.now();
        const x = e.fromHost(latent, [2, C, F, lh, lw], 'f32');
        const out = await dit.forward(x, 999, ctxEmb, { residency: ring });
        x.dispose();
        await out.toArray();
        out.dispose();
        const stepS = (performance.now() - t) / 1000;
        const st = e.allocator.stats();
        const run: Run = {
          round,
          resident,
          resident_upload_seconds: uploadS,
          step_seconds: stepS,
          peak_allocated_bytes: st.peakAllocated,
          peak_reserved_bytes: st.peakReserved,
          uploads: ring.stats.uploads,
          upload_bytes: ring.stats.bytes,
          upload_ms: ring.stats.uploadMs,
          exposed_ms: ring.stats.exposedMs,
        };
        runs.push(run);
        console.log(
          `round ${round + 1} resident ${resident}: step ${stepS.toFixed(2)} s, resident upload ${uploadS.toFixed(1)} s, peak allocated ${fmtBytes(run.peak_allocated_bytes)} ` +
            `(reserved ${fmtBytes(run.peak_reserved_bytes)}), ${run.uploads} uploads (${(run.upload_bytes / MiB).toFixed(0)} MiB, ${run.upload_ms.toFixed(0)} ms main thread, ${run.exposed_ms.toFixed(0)} ms exposed)`,
        );
        ring.dispose();
        // the old ring's host images are ArrayBuffers only a V8 collection frees (run with --expose-gc)
        gc?.();
        if (json) writeFileSync(resolve(json), JSON.stringify({ runs }, null, 2)); // in case a later run dies
      }
    }
  } finally {
    ctxEmb.dispose();
    e.destroy();
  }

  const rows = [...new Set(runs.map((r) => r.resident))].map((resident) => {
    const rs = runs.filter((r) => r.resident === resident);
    return {
      resident,
      step_seconds_median: median(rs.map((r) => r.step_seconds)),
      step_seconds: rs.map((r) => r.step_seconds),
      resident_upload_seconds_median: median(rs.map((r) => r.resident_upload_seconds)),
      peak_allocated_bytes: Math.max(...rs.map((r) => r.peak_allocated_bytes)),
      peak_reserved_bytes: Math.max(...rs.map((r) => r.peak_reserved_bytes)),
      uploads_per_step: median(rs.map((r) => r.uploads)),
      upload_bytes_per_step: median(rs.map((r) => r.upload_bytes)),
    };
  });
  const base = rows[0]!.step_seconds_median;
  console.log(`\n| resident blocks | step s (median) | × ${rows[0]!.resident} resident | per round | resident upload s (once per request) | peak allocated | uploads / step | upload MiB / step |`);
  console.log('|---:|---:|---:|---|---:|---:|---:|---:|');
  for (const r of rows) {
    console.log(
      `| ${r.resident} | ${r.step_seconds_median.toFixed(2)} | ${(r.step_seconds_median / base).toFixed(2)} | ${r.step_seconds.map((s) => s.toFixed(1)).join(' / ')} | ` +
        `${r.resident_upload_seconds_median.toFixed(1)} | ${fmtBytes(r.peak_allocated_bytes)} | ${r.uploads_per_step} | ${(r.upload_bytes_per_step / MiB).toFixed(0)} |`,
    );
  }
  if (json) {
    mkdirSync(dirname(resolve(json)), { recursive: true });
    writeFileSync(resolve(json), JSON.stringify({ adapter, date: new Date().toISOString(), model: dir, height, width, frames, textLen, batch: 2, rounds, rows, runs }, null, 2));
    console.log(`wrote ${json}`);
  }
}

await main();
