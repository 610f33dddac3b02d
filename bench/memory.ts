// `npm run bench:memory [-- --json FILE] [--models tiny,1.3b] [--levels 0,1,2,3] [--no-md]`
// Runs memory levels 0-3 in one process on (a) the tiny golden model and (b) a model with the real
// Wan 2.1 T2V-1.3B shapes (30 blocks, dim 1536, ffn 8960; the real VAE; a UMT5-XXL-shaped encoder
// shrunk in depth; deterministic random bf16 weights generated at run time into .cache/, never
// committed), one denoising step at a small resolution, and writes docs/memory-levels.md.
import { writeFileSync, mkdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Engine } from '../src/runtime/engine.ts';
import { WanPipeline } from '../src/pipeline/wan-pipeline.ts';
import { randomModelFolder, WAN_1_3B_TRANSFORMER, WAN_VAE, umt5XxlConfig } from '../src/tools/random-model.ts';
import { tinyModelWithTokenizer } from '../test/helpers/models.ts';
import { fmtBytes } from '../src/util/errors.ts';
import { releaseMatmulWorkspace } from '../src/ops/matmul.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const arg = (n: string) => {
  const i = process.argv.indexOf(n);
  return i >= 0 ? process.argv[i + 1] : undefined;
};

interface Row {
  model: string;
  level: number;
  peak_allocated_bytes: number;
  peak_reserved_bytes: number;
  seconds: number;
  ratio_to_level0: number;
  phase_seconds: Record<string, number>;
  phase_peak_allocated: Record<string, number>;
  gpu_weight_bytes: Record<string, number>;
  uploads: { uploads: number; bytes: number; uploadMs: number; stallMs: number; prefetched: number } | null;
  /** bytes of one DiT block's weights and of the DiT's non-block weights (embedders, head) */
  dit_block_bytes: number;
  dit_nonblock_bytes: number;
}

interface Case {
  name: string;
  dir: () => Promise<string>;
  config: Record<string, unknown>;
  blockBytes?: number;
}

async function main() {
  const models = (arg('--models') ?? 'tiny,1.3b').split(',');
  const levels = (arg('--levels') ?? '0,1,2,3').split(',').map(Number);
  const cacheRoot = join(ROOT, '.cache', 'bench-models');
  const tokDir = join(ROOT, 'test', 'fixtures', 'tokenizer', 'legacy');
  const cases: Case[] = [];
  if (models.includes('tiny'))
    cases.push({
      name: 'tiny (golden)',
      dir: async () => tinyModelWithTokenizer(),
      config: { 'infer.height': 64, 'infer.width': 64, 'infer.num_frames': 9, 'infer.num_inference_steps': 1, 'infer.text_len': 16, 'infer.vae_tile_size': 4, 'infer.vae_tile_overlap': 0.25 },
    });
  const teLayers = Number(arg('--t5-layers') ?? 1);
  if (models.includes('1.3b'))
    cases.push({
      name: `Wan2.1-1.3B shapes (UMT5-XXL x${teLayers} layer)`,
      dir: () =>
        randomModelFolder(cacheRoot, { transformer: WAN_1_3B_TRANSFORMER, vae: WAN_VAE, textEncoder: umt5XxlConfig(teLayers), dtype: 'bf16', seed: 1234, tokenizerDir: tokDir }, (s) => console.log(`  ${s}`)),
      config: {
        'infer.height': Number(arg('--height') ?? 128),
        'infer.width': Number(arg('--width') ?? 128),
        'infer.num_frames': 5,
        'infer.num_inference_steps': 1,
        'infer.text_len': 512,
        'infer.vae_tile_size': 8,
        'infer.vae_tile_overlap': 0.25,
      },
    });
  const e = await Engine.create();
  console.log(`adapter: ${e.adapterName}`);
  const rows: Row[] = [];
  const notes: string[] = [];
  try {
    for (const c of cases) {
      console.log(`== ${c.name}`);
      const dir = await c.dir();
      let base = 0;
      for (const level of levels) {
        releaseMatmulWorkspace(e);
        e.allocator.emptyCache();
        e.allocator.resetPeakMemoryStats();
        const t0 = performance.now();
        const pipe = await WanPipeline.fromPretrained(dir, { engine: e, lowMemLevel: level as 0 | 1 | 2 | 3, promptCache: false, config: c.config, profile: false });
        const tLoad = performance.now() - t0;
        const t1 = performance.now();
        const r = await pipe.generate({ prompt: 'a red circle moving right on a black background', negativePrompt: 'blurry', seed: 1 });
        const secs = (performance.now() - t1) / 1000;
        const st = e.allocator.stats();
        const gpuWeights: Record<string, number> = {};
        for (const [k, v] of e.allocator.allocatedByOwner(1)) gpuWeights[k] = v;
        // weights of each component as placed for the denoise phase
        const row: Row = {
          model: c.name,
          level,
          peak_allocated_bytes: st.peakAllocated,
          peak_reserved_bytes: st.peakReserved,
          seconds: secs,
          ratio_to_level0: 0,
          phase_seconds: Object.fromEntries(Object.entries(r.timingsMs).map(([k, v]) => [k, v / 1000])),
          phase_peak_allocated: Object.fromEntries(Object.entries(r.memory.perPhase).map(([k, v]) => [k, v.peakAllocated])),
          gpu_weight_bytes: Object.fromEntries(Object.entries(r.memory.perPhase.denoise?.byComponent ?? {})),
          uploads: r.uploads ?? null,
          dit_block_bytes: pipe.dit.blocks.items[0]!.paramBytes(),
          dit_nonblock_bytes: pipe.dit.paramBytes() - pipe.dit.blocks.items.reduce((a, b) => a + b.paramBytes(), 0),
        };
        if (level === levels[0]) base = secs;
        row.ratio_to_level0 = secs / base;
        rows.push(row);
        console.log(
          `  level ${level}: peak allocated ${fmtBytes(row.peak_allocated_bytes)}, reserved ${fmtBytes(row.peak_reserved_bytes)}, ${secs.toFixed(1)} s (x${row.ratio_to_level0.toFixed(2)}; load ${(tLoad / 1000).toFixed(1)} s) phases ${JSON.stringify(Object.fromEntries(Object.entries(row.phase_seconds).map(([k, v]) => [k, +v.toFixed(1)])))} ` +
            `denoise components ${JSON.stringify(Object.fromEntries(Object.entries(row.gpu_weight_bytes).map(([k, v]) => [k, fmtBytes(v)])))}`,
        );
        if (level === 3 && c.name.startsWith('Wan')) {
          const blocks = pipe.dit.blocks.items;
          const blockBytes = blocks[0]!.paramBytes();
          const nonBlock = pipe.dit.paramBytes() - blocks.reduce((a, b) => a + b.paramBytes(), 0);
          notes.push(`${c.name}: one DiT block ${fmtBytes(blockBytes)} (bf16), non-block DiT weights ${fmtBytes(nonBlock)}`);
          (c as Case).blockBytes = blockBytes;
        }
        pipe.dispose();
      }
    }
  } finally {
    releaseMatmulWorkspace(e);
    e.destroy();
  }
  const json = arg('--json');
  if (json) {
    mkdirSync(dirname(resolve(json)), { recursive: true });
    writeFileSync(json, JSON.stringify(rows, null, 2));
    console.log(`wrote ${json}`);
  }
  if (!process.argv.includes('--no-md')) {
    const md = [
      `| model | level | peak allocated | peak reserved | GPU weights during denoise | encode s | denoise s | decode s | total s | × level 0 |`,
      `|---|---:|---:|---:|---|---:|---:|---:|---:|---:|`,
      ...rows.map(
        (r) =>
          `| ${r.model} | ${r.level} | ${fmtBytes(r.peak_allocated_bytes)} | ${fmtBytes(r.peak_reserved_bytes)} | ${Object.entries(r.gpu_weight_bytes)
            .map(([k, v]) => `${k} ${fmtBytes(v)}`)
            .join(', ')} | ${(r.phase_seconds.encode ?? 0).toFixed(1)} | ${(r.phase_seconds.denoise ?? 0).toFixed(1)} | ${(r.phase_seconds.decode ?? 0).toFixed(1)} | ${r.seconds.toFixed(1)} | ${r.ratio_to_level0.toFixed(2)} |`,
      ),
    ].join('\n');
    const out = join(ROOT, 'docs', 'memory-levels.table.md');
    writeFileSync(out, `<!-- written by npm run bench:memory on ${new Date().toISOString()}; adapter ${e.adapterName} -->\n${md}\n\n${notes.map((n) => `- ${n}`).join('\n')}\n`);
    console.log(`wrote ${out}`);
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
