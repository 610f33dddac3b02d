// `npm run bench:cp -- --memory [--tokens 256] [--layers 4] [--rounds 1] [--plan-only]` — the memory side of
// context parallelism (src/parallel/): per-device peaks at level 2 against one device, and issue
// 24's target (per-device peak at N = 2 <= 0.6 x the single-device level-2 peak, Wan 1.3B shapes).
//
// 1. Measured here, 1.3B-shaped blocks (random bf16 weights, f32 activations, B = 2, a 512-row
//    text context, `--layers` blocks, `--tokens` tokens): one device at level 2 (every weight
//    resident, the level-2 activation bounds of ditRunOptions) against context parallelism over
//    N = 2 devices at level 2, with a full weight copy per device (cp_shard_weights=false) and with
//    the weight shard (cp_shard_weights=auto: each device keeps ceil(blocks / 2) blocks and streams
//    the others from one host copy). Per device: peak allocated bytes over two forwards (two denoise
//    steps; weights, inputs and text context included), bytes uploaded per forward, wall ms (median
//    of --rounds); every CP output within 1e-5 of the one-device one. Then the memory planner
//    (planRun, this adapter's limits) for the same model shapes, size and settings: its device-1
//    denoise peak next to the measured one (device 1 holds only the DiT's part; device 0 also holds
//    the pipeline's VAE, so it is not compared here: test/cp-levels.test.ts compares every device of
//    real pipeline runs).
// 2. The planner at Wan 2.1 1.3B, 832x480, 81 frames (32,760 tokens), CFG, on a generic discrete
//    GPU (src/plan/meta-gpu.ts GENERIC_GPU): single device at levels 2 and 3 against cp_size = 2 at
//    level 2 (shard and full copy) and level 3: each device's denoise and run peaks, the target's
//    ratio. A real 480p run is impossible on lavapipe (CPU time); the planner is exact on every
//    measured grid row (docs/plan-accuracy.md) and per device (test/cp-levels.test.ts).
//    `--plan-only` prints this part alone (seconds).
import { Engine } from '../src/runtime/engine.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../src/models/wan_dit/model.ts';
import { parseTransformerConfig, parseT5Config } from '../src/io/model-folder.ts';
import { randomizeModule, WAN_1_3B_TRANSFORMER, umt5XxlConfig } from '../src/tools/random-model.ts';
import { releaseMatmulWorkspace } from '../src/ops/matmul.ts';
import { Rng } from '../src/util/rng.ts';
import { ContextParallelDit, type CpRank } from '../src/parallel/cp-dit.ts';
import { cpBlockPlacement, cpRankRing } from '../src/parallel/pipeline-cp.ts';
import { memoryPlan, ditRunOptions } from '../src/pipeline/memory-plan.ts';
import { settingsForModel } from '../src/config/settings.ts';
import type { WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { planRun, type RunPlan } from '../src/plan/plan.ts';
import { PRESETS } from '../src/plan/shapes.ts';
import { specFromCaps, GENERIC_GPU } from '../src/plan/meta-gpu.ts';
import type { Tensor } from '../src/tensor/tensor.ts';

const TEXT_LEN = 512;
const MiB = (b: number) => (b / 2 ** 20).toFixed(1);
const GiB = (b: number) => (b / 2 ** 30).toFixed(2);
const median = (v: number[]) => {
  const s = [...v].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

/** Settings for the 1.3B preset (a preset needs no folder) at a size, with pipeline options. */
function settingsAt(width: number, height: number, numFrames: number, o: WanPipelineOptions) {
  return settingsForModel('wan2.1-t2v-1.3b', { textLen: TEXT_LEN, ...o, defaults: { width, height, numFrames, numInferenceSteps: 2, guidanceScale: 5 } });
}

export async function memoryBench(o: { tokens: number; layers: number; rounds: number; planOnly?: boolean }): Promise<void> {
  if (!o.planOnly) await measured(o);
  await target480();
}

/** Part 1: the measured rows and the planner's device-1 check. */
async function measured(o: { tokens: number; layers: number; rounds: number }): Promise<void> {
  const { tokens: L, layers, rounds } = o;
  if (L % 256) throw new Error(`--tokens: a multiple of 256 (one 256x256 latent frame is 256 tokens), got ${L}`);
  const engines = [await Engine.create(), await Engine.create()];
  const e0 = engines[0]!;
  const cfg = { ...WAN_1_3B_TRANSFORMER, num_layers: layers };
  const make = (e: Engine, hostBlocks: boolean) => {
    const m = new WanTransformer3DModel(ditDimsFromConfig(parseTransformerConfig(cfg)));
    randomizeModule(m, 1234, null, 'bf16');
    for (const [k, p] of m.namedParams()) if (!(hostBlocks && m.isBlockKey(k))) p.value = e.keep(p.t.toGpu(e, `dit.${k}`));
    return m;
  };
  const dims = ditDimsFromConfig(parseTransformerConfig(cfg));
  const D = dims.numHeads * dims.headDim;
  const F = L / 256;
  const shape: [number, number, number, number, number] = [2, dims.inChannels, F, 32, 32];
  const rng = new Rng(5);
  const xHost = rng.fillNormal(new Float32Array(2 * dims.inChannels * F * 32 * 32));
  const ctxHost = rng.fillNormal(new Float32Array(2 * TEXT_LEN * dims.textDim)).map((v) => v * 0.1);
  const bounds = ditRunOptions(memoryPlan(settingsAt(256, 256, 1, { lowMemLevel: 2 }).load), dims, L);
  // (with cp_size 2 the auto chunk sizes follow a device's rows: ditRunOptions)
  const cpBounds = ditRunOptions(memoryPlan(settingsAt(256, 256, 1, { lowMemLevel: 2, cpSize: 2 }).load), dims, L);
  console.log(`\n## memory: ${layers} block(s) of Wan 1.3B shapes, L ${L} tokens, B = 2, text ${TEXT_LEN} rows; level-2 bounds ${JSON.stringify(bounds)}; adapter ${e0.adapterName}`);

  interface Row {
    name: string;
    peaks: number[];
    uploaded: number[];
    ms: number[];
    out: Float32Array;
  }
  const rows: Row[] = [];
  /** two forwards (two steps) after a reset of the peaks; the output of the last */
  const run = async (name: string, fwd: (x: Tensor) => Promise<Tensor>, devs: Engine[], uploaded: () => number[]) => {
    const ms: number[] = [];
    let out: Float32Array = new Float32Array(0);
    let peaks: number[] = [];
    let up: number[] = [];
    for (let round = 0; round < rounds; round++) {
      for (const e of devs) {
        releaseMatmulWorkspace(e);
        await e.sync();
        e.allocator.resetPeakMemoryStats();
      }
      const t0 = performance.now();
      for (let step = 0; step < 2; step++) {
        const x = e0.fromHost(xHost, shape, 'f32');
        const y = await fwd(x);
        out = (await y.toArray()) as Float32Array;
        y.dispose();
        x.dispose();
        // bytes uploaded by the second forward (the first also fills slots that start empty)
        if (step === 0) uploaded();
      }
      ms.push((performance.now() - t0) / 2);
      up = uploaded();
      peaks = devs.map((e) => e.allocator.maxMemoryAllocated());
    }
    rows.push({ name, peaks, uploaded: up, ms, out });
  };

  // one device, level 2: every weight resident
  {
    const m = make(e0, false);
    const ctx = e0.keep(e0.scope(() => m.embedText(e0.fromHost(ctxHost, [2, TEXT_LEN, dims.textDim], 'f32'))));
    await run('one device, level 2', (x) => m.forward(x, 500, ctx, bounds), [e0], () => [0]);
    ctx.dispose();
    m.disposeParams();
  }
  // N = 2, level 2: a full copy per device, then the shard
  for (const shard of [false, true]) {
    const place = cpBlockPlacement({ cpSize: 2, level: 2, ditStreamed: false, shard, residentBlocks: 0, numBlocks: layers });
    const ranks: CpRank[] = [];
    let images: ((i: number) => Uint8Array) | undefined;
    for (let r = 0; r < 2; r++) {
      const e = engines[r]!;
      const dit = make(e, place.stream);
      const rank: CpRank = { engine: e, dit };
      if (place.stream) {
        const rr = cpRankRing(e, dit, r, 2, place.resident, { sharedImages: images });
        if (r === 0) images = (i) => rr.ring.imageBytes(rr.order.indexOf(i))!;
        rank.ring = rr.ring;
        rank.residency = rr.residency;
      }
      ranks.push(rank);
    }
    const cp = new ContextParallelDit(ranks);
    const ctx0 = e0.scope(() => ranks[0]!.dit.embedText(e0.fromHost(ctxHost, [2, TEXT_LEN, dims.textDim], 'f32')));
    const ctx = await cp.replicate(ctx0);
    await run(
      `context parallel N = 2, level 2, ${shard ? `weight shard (${place.resident} of ${layers} blocks resident per device)` : 'full weight copy per device'}`,
      (x) => cp.forward(x, 500, ctx, cpBounds),
      engines,
      () => {
        const u = cp.uploadBytes();
        cp.resetUploadStats();
        return u;
      },
    );
    for (const t of ctx) t.dispose();
    for (const r of ranks) {
      r.ring?.dispose();
      r.dit.disposeParams();
    }
  }
  const ref = rows[0]!.out;
  for (const r of rows.slice(1)) {
    let d = 0;
    for (let i = 0; i < ref.length; i++) d = Math.max(d, Math.abs(r.out[i]! - ref[i]!));
    if (d > 1e-5) throw new Error(`${r.name}: max |diff| ${d} against one device (> 1e-5)`);
  }

  // the planner for the same shapes and settings (a full pipeline: device 1 holds only the DiT's part)
  const shapes = { ...PRESETS['wan2.1-t2v-1.3b']!(), transformer: parseTransformerConfig(cfg), textEncoder: parseT5Config(umt5XxlConfig(1)) };
  const spec = specFromCaps(e0.caps, e0.limits);
  const planned: Array<RunPlan | null> = [null];
  for (const shard of [false, true]) planned.push(await planRun(shapes, settingsAt(256, 256, 4 * F - 3, { lowMemLevel: 2, cpSize: 2, config: { 'infer.diffusion.cp_shard_weights': shard } }), { device: spec, promptTokens: [TEXT_LEN, TEXT_LEN] }));
  console.log('\n| variant | peak allocated per device, measured (MiB) | device 1 planned (MiB) | planned / measured | uploaded per step per device (MiB) | wall ms per forward (median) |');
  console.log('|---|---|---|---|---|---|');
  rows.forEach((r, k) => {
    const p = planned[k];
    const d1 = p?.devices?.[1]?.denoisePeakBytes;
    console.log(`| ${r.name} | ${r.peaks.map(MiB).join(' / ')} | ${d1 !== undefined ? MiB(d1) : '-'} | ${d1 !== undefined ? (d1 / r.peaks[1]!).toFixed(4) : '-'} | ${r.uploaded.map(MiB).join(' / ')} | ${median(r.ms).toFixed(0)} |`);
  });
  for (const e of engines) e.destroy();
}

/** Part 2: the target at Wan 1.3B 480p (the planner on a generic discrete GPU). */
async function target480(): Promise<void> {
  console.log('\n## memory target: Wan 2.1 1.3B, 832x480, 81 frames (32,760 tokens), CFG, planned on a generic discrete GPU');
  const at480 = (opts: WanPipelineOptions) => planRun(PRESETS['wan2.1-t2v-1.3b']!(), settingsAt(832, 480, 81, opts), { device: GENERIC_GPU });
  const cases: Array<[string, WanPipelineOptions]> = [
    ['one device, level 2', { lowMemLevel: 2 }],
    ['one device, level 2, VAE on the GPU for the decode only (infer.offload_vae=true)', { lowMemLevel: 2, offloadVae: true }],
    ['one device, level 3', { lowMemLevel: 3 }],
    ['cp_size 2, level 2 (defaults: weight shard, VAE for the decode only, lean decode stem, chunks per device)', { lowMemLevel: 2, cpSize: 2 }],
    ['cp_size 2, level 2, VAE resident (infer.offload_vae=false)', { lowMemLevel: 2, cpSize: 2, offloadVae: false }],
    ['cp_size 2, level 2, full copy (cp_shard_weights=false)', { lowMemLevel: 2, cpSize: 2, config: { 'infer.diffusion.cp_shard_weights': false } }],
    ['cp_size 2, level 3', { lowMemLevel: 3, cpSize: 2 }],
  ];
  let single = 0;
  let singleDenoise = 0;
  let singleOff = 0;
  let singleOffDenoise = 0;
  console.log('\n| run | denoise peak per device (GiB) | run peak per device (GiB) | largest denoise peak / one device level 2 | largest run peak / one device level 2 | largest denoise peak / one device level 2 with its VAE off the GPU | largest run peak / the same | streamed per step per device (MiB) | plan ms |');
  console.log('|---|---|---|---|---|---|---|---|---|');
  for (const [name, opts] of cases) {
    const t0 = performance.now();
    const p = await at480(opts);
    const ms = performance.now() - t0;
    // per device: rank 0 runs every phase (its run peak is the plan's); the others the denoise and their decode tiles
    const den = p.devices ? p.devices.map((d) => d.denoisePeakBytes) : [p.phases.denoise.peakBytes];
    const runPeak = p.devices ? p.devices.map((d, k) => (k === 0 ? p.peakBytes : d.peakBytes)) : [p.peakBytes];
    if (name === 'one device, level 2') {
      single = p.peakBytes;
      singleDenoise = p.phases.denoise.peakBytes;
    }
    if (name.startsWith('one device, level 2, VAE')) {
      singleOff = p.peakBytes;
      singleOffDenoise = p.phases.denoise.peakBytes;
    }
    const stream = p.devices ? p.devices.map((d) => MiB(d.streamBytesPerStep)).join(' / ') : MiB(p.streamBytesPerStep);
    const r = (a: number, b: number) => (b ? (a / b).toFixed(3) : '-');
    console.log(`| ${name} | ${den.map(GiB).join(' / ')} | ${runPeak.map(GiB).join(' / ')} | ${r(Math.max(...den), singleDenoise)} | ${r(Math.max(...runPeak), single)} | ${r(Math.max(...den), singleOffDenoise)} | ${r(Math.max(...runPeak), singleOff)} | ${stream} | ${ms.toFixed(0)} |`);
  }
}
