// The engine's side of the one prepared GPU run (tools/gpu/run.sh; docs/gpu-run.md), also runnable
// here on lavapipe at small sizes: `npx tsx tools/gpu/checks.ts --tokens 1024 --rounds 1`.
//
// At Wan 2.1 1.3B shapes (D 1536, 12 heads of 128, ffn 8960, random bf16 weights), L tokens
// (default 32,760: 480p, 81 frames), medians of --rounds after a warm-up:
//   device   the adapter and what the device got (shader-f16, subgroups, subgroup-matrix configs)
//            with the toggles issue 26 names (allow_unsafe_apis, vulkan_enable_f16_on_nvidia)
//   matmul   linear [L, 1536] x [8960, 1536]^T (bf16 weights), f32 and f16 activations: TFLOP/s
//   attention  fused attention [1, L, 12, 128], f32 and f16; sage (INT8 QK^T, issue 23) on both
//   block    a one-layer Wan DiT forward (patch embedding, 1 block, head; B = 2 as CFG runs it,
//            a 512-row text context, the level 1-2 bounds: CFG passes in turn, FFN chunks),
//            f32 and f16 activations: ms and TFLOP/s (the block is > 99.8 % of its FLOPs)
//   cp       the same forward over 2 devices on this adapter (context parallelism, issue 24: the
//            exchange path on real hardware): ms, exchange ms, max |diff| to one device
// One JSON object per line on stdout, and the lines in --out FILE when given.
import { writeFileSync } from 'node:fs';
import { Engine } from '../../src/runtime/engine.ts';
import { WanTransformer3DModel, ditDimsFromConfig, autoFfnChunkTokens } from '../../src/models/wan_dit/model.ts';
import { parseTransformerConfig } from '../../src/io/model-folder.ts';
import { randomizeModule, WAN_1_3B_TRANSFORMER } from '../../src/tools/random-model.ts';
import { Rng } from '../../src/util/rng.ts';
import { linear } from '../../src/ops/matmul.ts';
import { attention } from '../../src/ops/attention.ts';
import { sageAttention } from '../../src/ops/attention_sage.ts';
import { ContextParallelDit } from '../../src/parallel/cp-dit.ts';
import type { Tensor } from '../../src/tensor/tensor.ts';
import { cast } from '../../src/ops/elementwise.ts';

const arg = (n: string, d: string) => {
  const i = process.argv.indexOf(n);
  return i >= 0 ? process.argv[i + 1]! : d;
};
const L = Number(arg('--tokens', '32760'));
const rounds = Number(arg('--rounds', '3'));
const only = arg('--only', 'device,matmul,attention,block,cp').split(',');
const outFile = process.argv.includes('--out') ? arg('--out', '') : null;
if (!(Number.isInteger(L) && L >= 64)) throw new Error(`--tokens: a whole number >= 64, got ${L}`);
const TOGGLES = 'enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia';
const lines: string[] = [];
const emit = (o: Record<string, unknown>) => {
  const s = JSON.stringify(o);
  lines.push(s);
  console.log(s);
  if (outFile) writeFileSync(outFile, lines.join('\n') + '\n');
};
const median = (v: number[]) => [...v].sort((a, b) => a - b)[v.length >> 1]!;

const e = await Engine.create({ dawnFlags: [TOGGLES] });
const hasF16 = e.caps.shaderF16;
const acts: Array<'f32' | 'f16'> = hasF16 ? ['f32', 'f16'] : ['f32'];

/** median ms of `run` over the rounds after one warm-up; the work is awaited on the GPU each time */
async function time(run: () => Tensor | Promise<Tensor>): Promise<number> {
  const ts: number[] = [];
  for (let i = 0; i <= rounds; i++) {
    const t0 = performance.now();
    const t = await run();
    await e.sync();
    const ms = performance.now() - t0;
    t.dispose();
    if (i > 0) ts.push(ms);
  }
  return median(ts);
}

if (only.includes('device')) {
  const c = e.caps;
  emit({ check: 'device', adapter: e.adapterName, description: c.description, shaderF16: c.shaderF16, subgroups: c.subgroups ? [c.subgroupMinSize, c.subgroupMaxSize] : null, timestampQuery: c.timestampQuery, subgroupMatrixConfigs: c.subgroupMatrixConfigs, maxBinding: c.maxBinding, maxBufferSize: e.limits.maxBufferSize, toggles: TOGGLES });
}

const rng = new Rng(7);
const D = 1536;
const H = 12;
const Dh = 128;
const FFN = 8960;

if (only.includes('matmul')) {
  // random bf16 weights (the top half of normal f32 values, std 0.02)
  const wf = rng.fillNormal(new Float32Array(FFN * D)).map((v) => v * 0.02);
  const wu = new Uint32Array(wf.buffer);
  const w = e.fromHost(Uint16Array.from(wu, (u) => u >>> 16), [FFN, D], 'bf16', 'weights');
  for (const act of acts) {
    const x = e.scope(() => cast(e.fromHost(rng.fillNormal(new Float32Array(L * D)), [L, D], 'f32', 'input'), act));
    const ms = await time(() => e.scope(() => linear(x, w, { out: act })));
    emit({ check: 'matmul', act, shape: `[${L}, ${D}] x [${FFN}, ${D}]^T bf16`, ms, tflops: (2 * L * D * FFN) / (ms / 1e3) / 1e12 });
    x.dispose();
  }
  w.dispose();
}

if (only.includes('attention')) {
  const flops = 4 * L * L * D;
  for (const act of acts) {
    const mk = () => e.scope(() => cast(e.fromHost(rng.fillNormal(new Float32Array(L * D)), [1, L, H, Dh], 'f32', 'input'), act));
    const [q, k, v] = [mk(), mk(), mk()];
    const scale = 1 / Math.sqrt(Dh);
    const sdpa = await time(() => e.scope(() => attention({ q, k, v }, { scale })));
    emit({ check: 'attention', kind: 'sdpa', act, shape: `[1, ${L}, ${H}, ${Dh}]`, ms: sdpa, tflops: flops / (sdpa / 1e3) / 1e12 });
    const sage = await time(() => e.scope(() => sageAttention({ q, k, v }, { scale })));
    emit({ check: 'attention', kind: 'sage', act, shape: `[1, ${L}, ${H}, ${Dh}]`, ms: sage, tflops: flops / (sage / 1e3) / 1e12, vsSdpa: sdpa / sage });
    for (const t of [q, k, v]) t.dispose();
  }
}

// the one-layer forward: latents [2, 16, F, h, w] with F·(h/2)·(w/2) = L (480p: 21 x 30 x 52)
const grid = L === 32760 ? { F: 21, h: 60, w: 104 } : { F: L / 256, h: 32, w: 32 };
if ((only.includes('block') || only.includes('cp')) && !Number.isInteger(grid.F)) throw new Error(`--tokens: 32760 or a multiple of 256 for the block and cp checks, got ${L}`);
const TEXT = 512;
const blockFlops = (() => {
  const B = 2;
  const mm = B * (2 * L * D * D * 4 + 2 * L * D * D * 2 + 2 * L * D * FFN * 2) + B * 2 * TEXT * D * D * 2;
  const at = B * (4 * L * L * D + 4 * L * TEXT * D);
  return mm + at;
})();
if (only.includes('block') || only.includes('cp')) {
  const cfg = { ...WAN_1_3B_TRANSFORMER, num_layers: 1 };
  const mk = (eng: Engine) => {
    const m = new WanTransformer3DModel(ditDimsFromConfig(parseTransformerConfig(cfg)));
    randomizeModule(m, 1234, eng, 'bf16');
    return m;
  };
  const m = mk(e);
  const xHost = rng.fillNormal(new Float32Array(2 * 16 * grid.F * grid.h * grid.w));
  const ctxHost = rng.fillNormal(new Float32Array(2 * TEXT * m.dims.textDim)).map((v) => v * 0.1);
  const ctx = e.keep(e.scope(() => m.embedText(e.fromHost(ctxHost, [2, TEXT, m.dims.textDim], 'f32'))));
  const bounds = { cfgSequential: true, ffnChunkTokens: autoFfnChunkTokens(L, D, FFN) };
  const shape = [2, 16, grid.F, grid.h, grid.w];
  let ref: Float32Array | null = null;
  if (only.includes('block')) {
    for (const act of acts) {
      m.dims.activationDtype = act;
      const ms = await time(async () => {
        const x = e.fromHost(xHost, shape, 'f32');
        const o = await m.forward(x, 500, ctx, bounds);
        x.dispose();
        return o;
      });
      emit({ check: 'block', act, tokens: L, ms, tflops: blockFlops / (ms / 1e3) / 1e12, peakAllocatedMiB: e.allocator.maxMemoryAllocated() / 2 ** 20 });
    }
    m.dims.activationDtype = 'f32';
  }
  if (only.includes('cp')) {
    const x = e.fromHost(xHost, shape, 'f32');
    const one = await m.forward(x, 500, ctx, bounds);
    ref = (await one.toArray()) as Float32Array;
    one.dispose();
    const e1 = await Engine.create({ dawnFlags: [TOGGLES] });
    const m1 = mk(e1);
    const cp = new ContextParallelDit([
      { engine: e, dit: m },
      { engine: e1, dit: m1 },
    ]);
    const ctxs = await cp.replicate(ctx);
    const ts: number[] = [];
    const xs: number[] = [];
    let diff = 0;
    for (let i = 0; i <= rounds; i++) {
      cp.exchange.resetStats();
      const t0 = performance.now();
      const o = await cp.forward(x, 500, ctxs, { ...bounds, ffnChunkTokens: autoFfnChunkTokens(Math.ceil(L / 2), D, FFN) });
      const got = (await o.toArray()) as Float32Array;
      const ms = performance.now() - t0;
      o.dispose();
      if (i > 0) {
        ts.push(ms);
        xs.push(cp.exchange.stats.exchangeMs);
      }
      diff = 0;
      for (let j = 0; j < got.length; j++) diff = Math.max(diff, Math.abs(got[j]! - ref[j]!));
    }
    emit({ check: 'cp', devices: 2, tokens: L, ms: median(ts), exchangeMs: median(xs), bytesDown: cp.exchange.stats.bytesDown, bytesUp: cp.exchange.stats.bytesUp, bytesLocal: cp.exchange.stats.bytesLocal, maxAbsDiff: diff });
    x.dispose();
    for (const t of ctxs.slice(1)) t.dispose();
    m1.disposeParams();
    e1.destroy();
  }
  ctx.dispose();
  m.disposeParams();
}
e.destroy();
