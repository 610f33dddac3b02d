// `npm run bench:memory [-- --json FILE] [--models tiny,1.3b] [--levels 0,1,2,3,3s,3n] [--repeat N] [--no-md] [--shared-device] [--verbose]`
// `npm run bench:memory -- --models a14b-shaped [--dit-layers 2]`: Wan 2.2 A14B's two experts (random bf16 weights
// with the A14B shapes, depth cut to --dit-layers per expert), levels 0b (both experts resident), 0, 1, 2, 3;
// 6 steps with the official shift 12 and boundary 0.875 (4 high-noise steps, then the swap); writes docs/memory-a14b.md
// (level `Ns`: level N with the text encoder streamed block by block through the GPU,
// `infer.text_encoder_device=gpu-stream`, instead of the CPU device; level `Nn`: level N with VAE tiling off)
// Runs memory levels 0-3 in one process on (a) the tiny golden model and (b) a model with the real
// Wan 2.1 T2V-1.3B shapes (30 blocks, dim 1536, ffn 8960; the real VAE; a UMT5-XXL-shaped encoder
// shrunk in depth; deterministic random bf16 weights generated at run time into .cache/, never
// committed), one denoising step at a small resolution, and writes docs/memory-levels.md.
import { writeFileSync, mkdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { shmemBytes } from '../src/device/maps.ts';
import { Engine } from '../src/runtime/engine.ts';
import { WanPipeline, type WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { randomModelFolder, WAN_1_3B_TRANSFORMER, WAN_14B_TRANSFORMER, WAN_VAE, umt5XxlConfig } from '../src/tools/random-model.ts';
import { tinyModelWithTokenizer } from '../test/helpers/models.ts';
import { fmtBytes } from '../src/util/errors.ts';
import { releaseMatmulWorkspace } from '../src/ops/matmul.ts';
import { planRun } from '../src/plan/plan.ts';
import { PRESETS } from '../src/plan/shapes.ts';
import { defaultSettings } from '../src/config/settings.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const arg = (n: string) => {
  const i = process.argv.indexOf(n);
  return i >= 0 ? process.argv[i + 1] : undefined;
};

interface Row {
  model: string;
  level: number;
  /** 'te-gpu-stream': the text encoder streamed through the GPU instead of the CPU device; 'untiled': VAE tiling off */
  variant?: string;
  /** process resident set after the level, and the process's max so far (bytes) */
  rss_bytes?: number;
  rss_before_dispose_bytes?: number;
  /** system-wide Shmem of /proc/meminfo (lavapipe's memfd-backed GPU memory) before / after dispose */
  shmem_before_dispose_bytes?: number;
  shmem_bytes?: number;
  max_rss_bytes?: number;
  peak_allocated_bytes: number;
  peak_reserved_bytes: number;
  /** wall time of one request (generate: encode + denoise + decode) */
  seconds: number;
  /** WanPipeline.fromPretrained: weights read, converted and placed (GPU or host copies) */
  load_seconds?: number;
  ratio_to_level0: number;
  phase_seconds: Record<string, number>;
  phase_peak_allocated: Record<string, number>;
  gpu_weight_bytes: Record<string, number>;
  uploads: { uploads: number; bytes: number; uploadMs: number; stallMs: number; prefetched: number; exposedMs?: number } | null;
  /** bytes of one DiT block's weights and of the DiT's non-block weights (embedders, head) */
  dit_block_bytes: number;
  dit_nonblock_bytes: number;
  /** two-expert models: 'both' resident or only the 'active' one */
  experts_resident?: 'active' | 'both';
  /** two-expert models: the swaps of the request (step, ms) */
  swaps?: Array<{ step: number; from: string; to: string; ms: number }>;
  /** host memory holding weights, by component (pipe.hostWeightBytes()) */
  host_weight_bytes?: Record<string, number>;
}

interface Case {
  name: string;
  dir: () => Promise<string>;
  options: WanPipelineOptions;
  blockBytes?: number;
}

async function main() {
  const fromJson = arg('--from-json');
  if (fromJson && process.argv.includes('--a14b')) {
    // re-render docs/memory-a14b.md from a run's rows (`--json` of `--models a14b-shaped`)
    const rows = JSON.parse(readFileSync(fromJson, 'utf8')) as Row[];
    writeFileSync(join(ROOT, 'docs', 'memory-a14b.md'), await renderExpertsDoc(rows, String(arg('--adapter') ?? 'see the run log'), Number(arg('--dit-layers') ?? 2), arg('--date')));
    console.log('wrote docs/memory-a14b.md');
    return;
  }
  if (fromJson) {
    const j = JSON.parse(readFileSync(fromJson, 'utf8')) as { adapter: string; date: string; rows: Row[] } | Row[];
    const rows = Array.isArray(j) ? j : j.rows;
    writeFileSync(join(ROOT, 'docs', 'memory-levels.md'), renderDoc(rows, Array.isArray(j) ? String(arg('--adapter') ?? 'see the run log') : j.adapter, Array.isArray(j) ? arg('--date') : j.date, arg('--note') ?? ''));
    console.log('wrote docs/memory-levels.md');
    return;
  }
  const models = (arg('--models') ?? 'tiny,1.3b').split(',');
  // 3s: level 3 with the text encoder streamed through the GPU; 3n: level 3 with VAE tiling off
  const a14b = models.length === 1 && models[0] === 'a14b-shaped';
  const levels = (arg('--levels') ?? (a14b ? '0b,0,1,2,3' : '0,1,2,3,3s,3n')).split(',').map((v) => ({ level: parseInt(v, 10) as 0 | 1 | 2 | 3, stream: v.endsWith('s'), untiled: v.endsWith('n'), both: v.endsWith('b'), tag: v.replace(/^\d/, '') }));
  if (levels.some((l) => !(l.level >= 0 && l.level <= 3) || !/^\d[snb]?$/.test(`${l.level}${l.tag}`)))
    throw new Error(`--levels: expected levels 0..3, optionally with s (text encoder streamed), n (VAE tiling off) or b (two-expert models: both resident), got ${arg('--levels')}`);
  // --repeat N: the level list N times over (round-robin, so slow drifts of a shared machine hit every
  // level alike); the summary gives each level's median time and the ratio of medians to level 0
  const repeat = Math.max(1, Number(arg('--repeat') ?? 1));
  const cacheRoot = join(ROOT, '.cache', 'bench-models');
  const tokDir = join(ROOT, 'test', 'fixtures', 'tokenizer', 'legacy');
  const cases: Case[] = [];
  if (models.includes('tiny'))
    cases.push({
      name: 'tiny (golden)',
      dir: async () => tinyModelWithTokenizer(),
      options: { textLen: 16, vaeTileOverlap: 0.25, defaults: { height: 128, width: 128, numFrames: 9, numInferenceSteps: 1 } },
    });
  const teLayers = Number(arg('--t5-layers') ?? 1);
  if (models.includes('1.3b'))
    cases.push({
      name: `Wan2.1-1.3B shapes (UMT5-XXL x${teLayers} layer)`,
      dir: () =>
        randomModelFolder(cacheRoot, { transformer: WAN_1_3B_TRANSFORMER, vae: WAN_VAE, textEncoder: umt5XxlConfig(teLayers), dtype: 'bf16', seed: 1234, tokenizerDir: tokDir }, (s) => console.log(`  ${s}`)),
      options: {
        textLen: 512,
        vaeTileOverlap: 0.25,
        defaults: { height: Number(arg('--height') ?? 128), width: Number(arg('--width') ?? 128), numFrames: 5, numInferenceSteps: 1 },
      },
    });
  if (models.includes('a14b-shaped')) {
    const layers = Number(arg('--dit-layers') ?? 2);
    cases.push({
      name: `Wan2.2-A14B shapes, 2 experts x ${layers} blocks (UMT5-XXL x${teLayers} layer)`,
      dir: () =>
        randomModelFolder(cacheRoot, { transformer: { ...WAN_14B_TRANSFORMER, num_layers: layers }, vae: WAN_VAE, textEncoder: umt5XxlConfig(teLayers), dtype: 'bf16', seed: 1234, tokenizerDir: tokDir, experts: 2 }, (s) =>
          console.log(`  ${s}`),
        ),
      // the official recipe (guidance 4 / 3, shift 12, boundary 0.875) over 6 steps: 4 high-noise steps, the swap, 2 low-noise steps
      options: { textLen: 512, vaeTileOverlap: 0.25, defaults: { height: Number(arg('--height') ?? 128), width: Number(arg('--width') ?? 128), numFrames: 5, numInferenceSteps: 6 } },
    });
  }
  // A fresh GPU device per level (default; --shared-device: one device for all levels). On lavapipe
  // (Mesa 25.0.7) a 1.3B run of level 0 then level 1 on one device dies with SIGSEGV in lavapipe's
  // queue thread during level 1's tiled decode (gdb: libvulkan_lvp.so, no JS frame); each level alone
  // completes. Separate devices in the one process also give each level the same clean start.
  const sharedDevice = process.argv.includes('--shared-device');
  let e = await Engine.create();
  const adapterName = e.adapterName;
  console.log(`adapter: ${adapterName}${sharedDevice ? '' : ' (a fresh device per level)'}`);
  const rows: Row[] = [];
  const notes: string[] = [];
  try {
    for (const c of cases) {
      console.log(`== ${c.name}`);
      const dir = await c.dir();
      let base = 0;
      for (let round = 0; round < repeat; round++) for (const { level, stream, untiled, both, tag } of levels) {
        releaseMatmulWorkspace(e);
        e.allocator.emptyCache();
        e.allocator.resetPeakMemoryStats();
        const t0 = performance.now();
        const pipe = await WanPipeline.fromPretrained(dir, {
          ...c.options,
          engine: e,
          lowMemLevel: level,
          promptCache: false,
          profile: false,
          ...(stream ? { textEncoderDevice: 'gpu-stream' as const } : {}),
          ...(untiled ? { vaeTiling: false } : {}),
          ...(both ? { expertsResident: 'both' as const } : {}),
        });
        const tLoad = performance.now() - t0;
        const t1 = performance.now();
        const verbose = process.argv.includes('--verbose');
        const r = await pipe.generate({
          prompt: 'a red circle moving right on a black background',
          negativePrompt: 'blurry',
          seed: 1,
          ...(verbose ? { onProgress: (ev: unknown) => console.log(`    ${JSON.stringify(ev).slice(0, 160)}`) } : {}),
        });
        const secs = (performance.now() - t1) / 1000;
        const st = e.allocator.stats();
        const gpuWeights: Record<string, number> = {};
        for (const [k, v] of e.allocator.allocatedByOwner(1)) gpuWeights[k] = v;
        // weights of each component as placed for the denoise phase
        const row: Row = {
          model: c.name,
          level,
          ...(stream ? { variant: 'te-gpu-stream' } : untiled ? { variant: 'untiled' } : {}),
          // the pipeline resets the peaks at each phase: the run's peak is the largest phase peak
          peak_allocated_bytes: Math.max(st.peakAllocated, ...Object.values(r.memory.perPhase).map((p) => p.peakAllocated)),
          peak_reserved_bytes: Math.max(st.peakReserved, ...Object.values(r.memory.perPhase).map((p) => p.peakReserved)),
          seconds: secs,
          load_seconds: tLoad / 1000,
          ratio_to_level0: 0,
          phase_seconds: Object.fromEntries(Object.entries(r.timingsMs).map(([k, v]) => [k, v / 1000])),
          phase_peak_allocated: Object.fromEntries(Object.entries(r.memory.perPhase).map(([k, v]) => [k, v.peakAllocated])),
          gpu_weight_bytes: Object.fromEntries(Object.entries(r.memory.perPhase.denoise?.byComponent ?? {})),
          uploads: r.uploads ?? null,
          dit_block_bytes: pipe.dit.blocks.items[0]!.paramBytes(),
          dit_nonblock_bytes: pipe.dit.paramBytes() - pipe.dit.blocks.items.reduce((a, b) => a + b.paramBytes(), 0),
          ...(repeat > 1 ? { round } : {}),
          ...(r.experts ? { experts_resident: r.experts.resident, swaps: r.experts.swaps } : {}),
          host_weight_bytes: pipe.hostWeightBytes(),
        };
        if (level === levels[0]!.level && tag === levels[0]!.tag) base = secs;
        row.ratio_to_level0 = secs / base;
        rows.push(row);
        console.log(
          `  level ${level}${tag}: peak allocated ${fmtBytes(row.peak_allocated_bytes)}, reserved ${fmtBytes(row.peak_reserved_bytes)}, ${secs.toFixed(1)} s (x${row.ratio_to_level0.toFixed(2)}; load ${(tLoad / 1000).toFixed(1)} s) phases ${JSON.stringify(Object.fromEntries(Object.entries(row.phase_seconds).map(([k, v]) => [k, +v.toFixed(1)])))} ` +
            `denoise components ${JSON.stringify(Object.fromEntries(Object.entries(row.gpu_weight_bytes).map(([k, v]) => [k, fmtBytes(v)])))}`,
        );
        if (level === 3 && c.name.startsWith('Wan')) {
          const blocks = pipe.dit.blocks.items;
          const blockBytes = blocks[0]!.paramBytes();
          const nonBlock = pipe.dit.paramBytes() - blocks.reduce((a, b) => a + b.paramBytes(), 0);
          notes.push(`${c.name}: one DiT block ${fmtBytes(blockBytes)} (bf16), non-block DiT weights ${fmtBytes(nonBlock)}`);
          (c as Case).blockBytes = blockBytes;
        }
        row.rss_before_dispose_bytes = process.memoryUsage().rss;
        row.shmem_before_dispose_bytes = shmemBytes();
        pipe.dispose();
        if (!sharedDevice) {
          releaseMatmulWorkspace(e);
          e.destroy();
        }
        // Free what the level held before the next level starts (npm run bench:memory passes
        // --expose-gc; host weight images are ArrayBuffers that only a V8 collection frees). lavapipe backs
        // GPU memory with memfd pages, counted as system shared memory, not as the process's RSS: the
        // kernel's OOM report when a 2026-11-27 run died in its 6th level showed 15 GB of shmem beside
        // 9 GB of RSS, because each device came with its own Dawn instance, which kept the destroyed
        // device's memory. src/device/gpu.ts now reuses one instance and the next device reuses the memory;
        // the log shows shmem per level so that a regression is visible.
        const gc = (globalThis as { gc?: () => void }).gc;
        if (gc) {
          gc();
          await new Promise((r) => setTimeout(r, 100));
          gc();
        }
        row.rss_bytes = process.memoryUsage().rss;
        row.shmem_bytes = shmemBytes();
        if (!sharedDevice) e = await Engine.create();
        row.max_rss_bytes = process.resourceUsage().maxRSS * 1024;
        console.log(
          `  host memory after level ${level}${tag}: rss ${fmtBytes(row.rss_before_dispose_bytes)} before dispose, ${fmtBytes(row.rss_bytes)} after dispose${gc ? ' + gc' : ''}, ` +
            `max rss ${fmtBytes(row.max_rss_bytes)}; system shared memory (lavapipe's GPU memory) ${fmtBytes(row.shmem_before_dispose_bytes ?? 0)} -> ${fmtBytes(row.shmem_bytes ?? 0)}`,
        );
        // rows so far, in case a later level dies (e.g. killed for host memory)
        const json = arg('--json');
        if (json) writeFileSync(resolve(json), JSON.stringify(rows, null, 2));
      }
    }
  } finally {
    releaseMatmulWorkspace(e);
    e.destroy();
  }
  if (repeat > 1) {
    const med = (v: number[]) => {
      const a = [...v].sort((x, y) => x - y);
      return a.length % 2 ? a[(a.length - 1) / 2]! : (a[a.length / 2 - 1]! + a[a.length / 2]!) / 2;
    };
    console.log(`medians over ${repeat} rounds:`);
    for (const c of cases) {
      const of = (r: Row) => `${r.level}${r.variant === 'te-gpu-stream' ? 's' : r.variant === 'untiled' ? 'n' : ''}`;
      const mine = rows.filter((r) => r.model === c.name);
      const keys = [...new Set(mine.map(of))];
      const baseMed = med(mine.filter((r) => of(r) === keys[0]).map((r) => r.seconds));
      for (const k of keys) {
        const rs = mine.filter((r) => of(r) === k);
        const phases = Object.fromEntries(Object.keys(rs[0]!.phase_seconds).map((ph) => [ph, +med(rs.map((r) => r.phase_seconds[ph] ?? 0)).toFixed(1)]));
        console.log(
          `  ${c.name} level ${k}: total ${rs.map((r) => r.seconds.toFixed(1)).join(' / ')} s, median ${med(rs.map((r) => r.seconds)).toFixed(1)} s ` +
            `(x${(med(rs.map((r) => r.seconds)) / baseMed).toFixed(2)} level ${keys[0]}'s median; per-round ratios ${rs.map((r) => r.ratio_to_level0.toFixed(2)).join(' / ')}); median phases ${JSON.stringify(phases)}`,
        );
      }
    }
  }
  const json = arg('--json');
  if (json) {
    mkdirSync(dirname(resolve(json)), { recursive: true });
    writeFileSync(json, JSON.stringify(rows, null, 2));
    console.log(`wrote ${json}`);
  }
  if (!process.argv.includes('--no-md')) {
    if (a14b) {
      writeFileSync(join(ROOT, 'docs', 'memory-a14b.md'), await renderExpertsDoc(rows, adapterName, Number(arg('--dit-layers') ?? 2)));
      console.log('wrote docs/memory-a14b.md');
    } else writeDoc(rows, adapterName);
  }
}

/** docs/memory-a14b.md: Wan 2.2 A14B's model pool per level (peaks, where each expert is, the swap) */
async function renderExpertsDoc(rows: Row[], adapter: string, layers: number, date = new Date().toISOString()): Promise<string> {
  const mb = (v: number | undefined) => (v ? fmtBytes(v) : '-');
  const table = [
    '| level | experts on the GPU | peak allocated | peak reserved | GPU weights during denoise | host weights (dit + dit_2 / other) | swap s | load s | denoise s | decode s | total s |',
    '|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|',
    ...rows.map((r) => {
      const gw = Object.entries(r.gpu_weight_bytes).filter(([k]) => k === 'dit' || k === 'dit_2' || k === 'text_encoder' || k === 'vae').map(([k, v]) => `${k} ${fmtBytes(v)}`).join(', ') || '-';
      const h = r.host_weight_bytes ?? {};
      const swap = (r.swaps ?? []).reduce((a, w) => a + w.ms, 0) / 1000;
      return `| ${r.level} | ${r.experts_resident === 'both' ? 'both' : 'the active one'} | ${fmtBytes(r.peak_allocated_bytes)} | ${fmtBytes(r.peak_reserved_bytes)} | ${gw} | ${mb((h.dit ?? 0) + (h.dit_2 ?? 0))} / ${mb((h.text_encoder ?? 0) + (h.vae ?? 0))} | ${(r.swaps ?? []).length ? swap.toFixed(2) : 'none'} | ${f1(r.load_seconds)} | ${f1(r.phase_seconds.denoise)} | ${f1(r.phase_seconds.decode)} | ${r.seconds.toFixed(1)} |`;
    }),
  ];
  const one = rows[0];
  return [
    '# Wan 2.2 A14B: the two experts per memory level',
    '',
    `<!-- generated by \`npm run bench:memory -- --models a14b-shaped --dit-layers ${layers}\` (bench/memory.ts) -->`,
    '',
    `Measured ${date.slice(0, 10)} on ${adapter}. Two experts with the Wan 2.2 T2V-A14B shapes (each the Wan 2.1 14B DiT: dim 5120, 40 heads, ffn 13824)`,
    `but ${layers} blocks each instead of 40 (random bf16 weights generated into .cache/; the full depth needs 2 × 28 GB of host memory, this machine has 24 GiB),`,
    'the real VAE, UMT5-XXL shapes cut to 1 encoder layer; 128×128, 5 frames, text_len 512, 6 steps with the official shift 12, boundary 0.875 and guidance 4.0 / 3.0:',
    'steps 1–4 run transformer/ (high noise), the swap happens before step 5, steps 5–6 run transformer_2/ (low noise).',
    one ? `One block of one expert is ${fmtBytes(one.dit_block_bytes)}, its non-block weights (embedders, time projection, head) ${fmtBytes(one.dit_nonblock_bytes)}.` : '',
    '',
    ...table,
    '',
    '- **experts on the GPU**: `infer.experts_resident=both` (level 0 only) keeps both on the GPU and never swaps; otherwise only the running expert is there and',
    "  the other waits in host memory. A swap frees the running expert's GPU copies first, then uploads the other's (test/pipeline-wan22.test.ts checks the order",
    "  in the allocator's event record and that the swap step peaks no higher than the others).",
    '- **swap s**: wall time of the swap (uploads finished) inside the denoise; `--profile` prints it per request (`expert_swap` in the phase times). At levels 0–2',
    '  it moves a whole expert; at level 3 only the non-block weights (the blocks stream through the one ring of slots anyway, and the ring is reused across the switch).',
    '- **host weights**: host memory holding weights, each buffer counted once (`pipe.hostWeightBytes()`, also printed by `--memory-stats` and written to the sidecar).',
    '  Both experts are in host memory at every level but `both` (each once: at level 3 their blocks are the block images the ring streams from).',
    `- At ${layers} blocks per expert level 3's two slots hold as many blocks as an expert has, so its GPU weights equal level 0's here; the`,
    '  ring pays at full depth (2 slots of 40 blocks), below.',
    '',
    '## Full depth, predicted',
    '',
    'The real Wan2.2-T2V-A14B (two experts of 40 blocks, UMT5-XXL, bf16) cannot be loaded on this machine; the memory planner',
    '(src/plan/, the run\'s own code walked on a device that holds no memory, within 1 % of real runs on every phase in',
    'test/plan.test.ts, two-expert cases included) predicts it. 832×480, 81 frames, 40 steps, CFG (`npm run plan -- --model wan2.2-t2v-a14b',
    'infer.diffusion.low_mem_level=N`):',
    '',
    ...(await fullDepthTable()),
    '',
  ].join('\n');
}

/** The planner's predictions for the real A14B per level (480p, 81 frames, the official recipe) */
async function fullDepthTable(): Promise<string[]> {
  const shapes = PRESETS['wan2.2-t2v-a14b']!();
  const out = ['| level | experts on the GPU | peak allocated | peak reserved | host RAM (of it: the two experts) |', '|---|---|---:|---:|---:|'];
  for (const [level, both] of [[0, true], [0, false], [1, false], [2, false], [3, false]] as const) {
    const s = defaultSettings();
    s.request = { ...s.request, width: 832, height: 480, numFrames: 81, numInferenceSteps: 40, guidanceScale: 4, guidanceScale2: 3, shift: 12 };
    s.load = { ...s.load, lowMemLevel: level, expertsResident: both ? 'both' : 'active', textLen: 512 };
    const p = await planRun(shapes, s);
    out.push(`| ${level} | ${both ? 'both' : 'the active one'} | ${fmtBytes(p.peakBytes)} | ${fmtBytes(p.peakReservedBytes)} | ${fmtBytes(p.hostBytes)} (${fmtBytes(p.hostByPart['dit weights'] ?? 0)}) |`);
  }
  return out;
}

const INTRO = `Levels (\`infer.diffusion.low_mem_level\`, src/pipeline/memory-plan.ts): 0 everything resident; 1 + spatially
tiled VAE decode; 2 + the text encoder never on the GPU (CPU device); 3 + DiT blocks streamed from host memory
(bf16) into two reused GPU slots with the next block prefetched, VAE weights on the GPU only while decoding.
"3 (text encoder streamed)" is level 3 with \`infer.text_encoder_device=gpu-stream\`: the encoder's blocks
go through the GPU one at a time (only the prompt's embedding rows are gathered on the host) instead of
running on the CPU device; "3 (VAE tiling off)" is level 3 with \`infer.vae_tiling=false\`, to separate what
streaming and the CPU-device encoder cost from what tiling costs. All levels produce the same video (test/pipeline.test.ts). All levels run in one
process, each on a fresh GPU device (see bench/memory.ts for the lavapipe crash that made this the default); "peak allocated" is the largest sum of live tensor bytes,
"peak reserved" the largest sum of GPU buffers held by the caching allocator (what the GPU actually gave us).
On lavapipe "GPU memory" is host memory too, but memfd pages counted as system shared memory, not in the
process's RSS: the host RSS column does not include it (the run log prints both).

Workloads: (a) the tiny golden model (128×128, 9 frames, text_len 16, one step, the same tiling as (b)); (b) random bf16
weights with the exact Wan 2.1 T2V-1.3B shapes (30 blocks, dim 1536, ffn 8960, 12 heads; the real VAE;
UMT5-XXL shapes with the encoder cut to 1 layer), 128×128, 5 frames, text_len 512, one denoising step
with CFG, auto tiles (\`infer.vae_tile_size=0\`, the default: the least work whose largest tile's working set
is within the whole-frame stages'; on the 16×16 latent three full-height tiles [0,7) [5,11) [9,16) across,
≥ 25 % overlap) and a 1-px halo, which makes the tiles exact. Reproduce: \`npm run bench:memory -- --json rows.json\` (the 1.3B folder, 3.4 GB, is generated
once into .cache/ and reused; run it alone: it needs up to ~16 GB of host memory, RSS plus lavapipe's shared memory). Times on this shared 2-core
lavapipe machine are noisy; the ratios are from one process.`;

const OUTRO = `## Reading it

- **Where the bytes go.** Level 0's peak is the DiT + text encoder + VAE weights plus the largest phase's
  activations. Level 1 lowers the decode phase (the VAE's upsampling activations are bounded by the tile, not
  the frame). Level 2 removes the text encoder's weights from the GPU (only the prompt's context rows are uploaded).
  Level 3 replaces the DiT's 30 resident blocks with two block slots and keeps the VAE off the GPU until
  decoding. Every model forward frees each block's intermediates when the block returns (DiT, UMT5, VAE
  decoder sub-blocks); before that fix the 1.3B denoise kept all 30 blocks' intermediates alive (735 tensors,
  1.67 GiB at 128 tokens) and the level-3 peak was 1.89 GiB.
- **Time.** With one denoising step at 128×128, decode weighs about half as much as denoising. Level 1+ pays
  for tiling: the stages below the video's resolution (up blocks 0–1 and up block 2's resnets) run on whole
  frames, and the output-resolution stages (up block 2's upsampler, up block 3, conv_out) run per tile with a
  1-latent-px halo, which is their exact receptive radius (tiled = untiled, bit for bit), the ≥ 25 % overlaps
  computed twice. The tiles are sized from a working-set model of the decoder: no tile needs more memory
  than the whole-frame stages already do (166.7 MiB here; an 8-px tile would need 84 MiB and cost 2.25× the
  pixels in the tiled stages), so on the 16×16 latent the tiles decode [0,8) [4,12) [8,16) across and the
  full height, 1.5× the pixels of a whole-frame decode in the tiled stages (2.25× with 8-px tiles, the
  previous table's setting). At 128×128 with one step the denoise phase itself varies ±10 %
  from run to run on this machine, as much as the whole target: the level-3/level-0 time ratio is only
  meaningful as a median over repeated runs (\`--repeat N\`, quoted in the note above); the "VAE tiling
  off" row measures everything else level 3 does. The text encoder runs only the prompt's tokens (not all text_len = 512
  positions: the same context as the official masked run, golden-checked), so the CPU-device encoder (level
  2+, JS kernels on worker threads reading its bf16 weights in place from shared memory) costs seconds, not
  minutes. The DiT streaming itself is measured by the denoise-phase ratio and the upload figures above.
- **A request reads no weight file at any level.** \`fromPretrained\` ("load s") makes every copy: the GPU-resident
  weights, and the host copies of the CPU-device text encoder, the streamed DiT blocks (packed once into
  per-block images) and, at level 3, the VAE (uploaded for each decode, freed after it). Between the denoise
  and the decode the DiT's slot ring gives its GPU memory back and keeps its host images; the next request's
  first acquire() allocates the two slots again. (Until 2026-11-28 the ring was rebuilt after each decode,
  re-packing 2.8 GB of block images into fresh host memory inside the request, and the VAE and the text
  encoder were read from their files inside it: level 3's decode took 1.75× level 0's, its encode 2×.)
- Per-phase and per-step numbers for any run: \`npm run generate -- --memory-stats\`; the allocation timeline
  (per-block uploads and frees at level 3, no text-encoder bytes at level ≥ 2): \`--memory-snapshot FILE\`;
  kernel and upload/compute profile: \`--profile\`.`;

const WEIGHT_OWNERS = ['dit', 'text_encoder', 'vae'];
const weightBytes = (r: Row) => WEIGHT_OWNERS.reduce((a, k) => a + (r.gpu_weight_bytes[k] ?? 0), 0);
const f1 = (v: number | undefined) => (v ?? 0).toFixed(1);
const levelLabel = (r: Row) => `${r.level}${r.variant === 'te-gpu-stream' ? ' (text encoder streamed)' : r.variant === 'untiled' ? ' (VAE tiling off)' : ''}`;

/** docs/memory-levels.md from the measured rows (also `--from-json FILE` to re-render a run). */
function renderDoc(rows: Row[], adapter: string, date = new Date().toISOString(), note = ''): string {
  const table = [
    `| model | level | peak allocated | peak reserved | GPU weights during denoise | load s | encode s | denoise s | decode s | total s | × level 0 |`,
    `|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|`,
    ...rows.map(
      (r) =>
        `| ${r.model} | ${levelLabel(r)} | ${fmtBytes(r.peak_allocated_bytes)} | ${fmtBytes(r.peak_reserved_bytes)} | ${WEIGHT_OWNERS.filter((k) => r.gpu_weight_bytes[k])
          .map((k) => `${k} ${fmtBytes(r.gpu_weight_bytes[k]!)}`)
          .join(', ') || '-'} | ${r.load_seconds !== undefined ? f1(r.load_seconds) : '-'} | ${f1(r.phase_seconds.encode)} | ${f1(r.phase_seconds.denoise)} | ${f1(r.phase_seconds.decode)} | ${r.seconds.toFixed(1)} | ${r.ratio_to_level0.toFixed(2)} |`,
    ),
  ];
  const phases = [
    `| model | level | encode peak | denoise peak | decode peak | host RSS at the end / after dispose + GC (process max) |`,
    `|---|---:|---:|---:|---:|---:|`,
    ...rows.map(
      (r) =>
        `| ${r.model} | ${levelLabel(r)} | ${['encode', 'denoise', 'decode'].map((k) => (r.phase_peak_allocated[k] !== undefined ? fmtBytes(r.phase_peak_allocated[k]!) : 'not recorded')).join(' | ')} | ${r.rss_bytes ? `${r.rss_before_dispose_bytes ? `${fmtBytes(r.rss_before_dispose_bytes)} / ` : ''}${fmtBytes(r.rss_bytes)} (${fmtBytes(r.max_rss_bytes ?? 0)})` : '-'} |`,
    ),
  ];
  const checks: string[] = [];
  for (const model of [...new Set(rows.map((r) => r.model))]) {
    const rs = rows.filter((r) => r.model === model && !r.variant).sort((a, b) => a.level - b.level);
    const l3s = rows.find((r) => r.model === model && r.level === 3 && r.variant === 'te-gpu-stream');
    const l3n = rows.find((r) => r.model === model && r.level === 3 && r.variant === 'untiled');
    const lines: string[] = [];
    for (let i = 1; i < rs.length; i++) {
      const a = rs[i - 1]!, b = rs[i]!;
      lines.push(`level ${b.level} peak ${fmtBytes(b.peak_allocated_bytes)} ${b.peak_allocated_bytes < a.peak_allocated_bytes ? '<' : '**not <**'} level ${a.level} ${fmtBytes(a.peak_allocated_bytes)}`);
    }
    const l0 = rs.find((r) => r.level === 0);
    const l3 = rs.find((r) => r.level === 3);
    if (l0 && l3) {
      const act = (l0.phase_peak_allocated.denoise ?? 0) - weightBytes(l0);
      const bound = 2 * l3.dit_block_bytes + l3.dit_nonblock_bytes + act;
      const d3 = l3.phase_peak_allocated.denoise ?? 0;
      lines.push(
        `level-3 bound: 2 DiT blocks (${fmtBytes(2 * l3.dit_block_bytes)}) + non-block DiT weights (${fmtBytes(l3.dit_nonblock_bytes)}) + the denoise activation working set ` +
          `measured at level 0 (denoise peak − resident weights = ${fmtBytes(act)}) = ${fmtBytes(bound)}; level-3 denoise peak ${fmtBytes(d3)} = ${(d3 / bound).toFixed(2)} × bound ` +
          `(${d3 <= 1.1 * bound ? 'within' : '**over**'} 1.1 ×); level-3 peak over the whole run ${fmtBytes(l3.peak_allocated_bytes)} = ${(l3.peak_allocated_bytes / bound).toFixed(2)} × bound ` +
          `(${l3.peak_allocated_bytes <= 1.1 * bound ? 'within' : '**over**'} 1.1 ×; the run's peak phase is ${Object.entries(l3.phase_peak_allocated).sort((x, y) => y[1] - x[1])[0]?.[0]})`,
      );
      const ph = (k: string) => ((l3.phase_seconds[k] ?? 0) / Math.max(1e-9, l0.phase_seconds[k] ?? 0)).toFixed(2);
      lines.push(`time, level 3 / level 0: total ${l3.ratio_to_level0.toFixed(2)} (target ≤ 1.10: ${l3.ratio_to_level0 <= 1.1 ? 'met' : '**not met**'}); per phase: encode ${ph('encode')}, denoise ${ph('denoise')}, decode ${ph('decode')}`);
      if (l3s) {
        const phs = (k: string) => ((l3s.phase_seconds[k] ?? 0) / Math.max(1e-9, l0.phase_seconds[k] ?? 0)).toFixed(2);
        lines.push(
          `time, level 3 with the text encoder streamed through the GPU / level 0: total ${l3s.ratio_to_level0.toFixed(2)} (target ≤ 1.10: ${l3s.ratio_to_level0 <= 1.1 ? 'met' : '**not met**'}); ` +
            `per phase: encode ${phs('encode')}, denoise ${phs('denoise')}, decode ${phs('decode')}; peak ${fmtBytes(l3s.peak_allocated_bytes)}`,
        );
      }
      if (l3n) {
        const phn = (k: string) => ((l3n.phase_seconds[k] ?? 0) / Math.max(1e-9, l0.phase_seconds[k] ?? 0)).toFixed(2);
        lines.push(
          `time, level 3 with VAE tiling off (what streaming and the CPU-device text encoder cost; tiling is level 1's trade of time for decode memory) / level 0: ` +
            `total ${l3n.ratio_to_level0.toFixed(2)} (${l3n.ratio_to_level0 <= 1.1 ? 'within' : '**over**'} 1.10); per phase: encode ${phn('encode')}, denoise ${phn('denoise')}, decode ${phn('decode')}; ` +
            `peak ${fmtBytes(l3n.peak_allocated_bytes)} (decode peak ${fmtBytes(l3n.phase_peak_allocated.decode ?? 0)} untiled vs ${fmtBytes(l3.phase_peak_allocated.decode ?? 0)} tiled)`,
        );
      }
      if (l3.uploads) {
        const u = l3.uploads;
        const den = (l3.phase_seconds.denoise ?? 0) * 1000;
        lines.push(
          `level-3 streaming: ${u.uploads} block uploads (${fmtBytes(u.bytes)}), ${u.prefetched} of them prefetched while the previous block computed; ${u.uploadMs.toFixed(0)} ms main-thread upload time ` +
            `(${((100 * u.uploadMs) / Math.max(1, den)).toFixed(1)} % of the denoise phase), of which ${(u.uploadMs - (u.exposedMs ?? u.stallMs)).toFixed(0)} ms overlapped GPU work ` +
            `(${(100 * (1 - (u.exposedMs ?? u.stallMs) / Math.max(1e-9, u.uploadMs))).toFixed(0)} % ran ahead of need); acquire() waited ${u.stallMs.toFixed(0)} ms in all, ` +
            `which is mostly the GPU finishing the previous block's kernels (on lavapipe the main thread waits on the same cores that compute): the end-to-end cost of streaming is the denoise-phase ratio above`,
        );
      }
    }
    if (rs[0]) lines.push(`one DiT block ${fmtBytes(rs[0].dit_block_bytes)}, non-block DiT weights ${fmtBytes(rs[0].dit_nonblock_bytes)}`);
    checks.push(`**${model}**\n\n${lines.map((l) => `- ${l}`).join('\n')}`);
  }
  return [
    `# Memory levels, measured`,
    '',
    `<!-- generated by \`npm run bench:memory\` (bench/memory.ts); edit the text there, not here -->`,
    `Written by \`npm run bench:memory\` on ${date.slice(0, 10)}; adapter: ${adapter}.`,
    '',
    INTRO,
    '',
    ...(note ? [note, ''] : []),
    '## Per level',
    '',
    table.join('\n'),
    '',
    'Peak allocated bytes per phase:',
    '',
    phases.join('\n'),
    '',
    '## Targets and what the numbers say',
    '',
    checks.join('\n\n'),
    '',
    OUTRO,
    '',
  ].join('\n');
}

function writeDoc(rows: Row[], adapter: string) {
  const out = join(ROOT, 'docs', 'memory-levels.md');
  writeFileSync(out, renderDoc(rows, adapter));
  console.log(`wrote ${out}`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
