// Ring attention (src/parallel/ring.ts, docs/context-parallel.md "Ring attention"):
// - attention_lse (the fused attention's kernels without the final normalization + lse_finish) and
//   attention_merge (kernels/attention_lse.wgsl) against their CPU twins on seeded odd sizes (token
//   counts that are no multiple of the tiles, head dims 128, 64, 16 and 6, one key, no keys, f16,
//   binding splits), for each of the fused attention's kernels;
// - the attention of N key chunks merged = the fused `attention` on the whole key set (<= 1e-5);
// - the context-parallel DiT forward with the ring (forced, and chosen by 'auto' when the heads do not
//   divide N) over N = 2 and 3 devices on one adapter = the one-device forward (<= 1e-5), with the
//   bytes through the host equal to ringForwardBytes;
// - the pipeline: cp_size=3 and 2 with cp_attention=ring give the video of cp_size=1 (<= 1e-5).
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { expectClose, TOL } from './helpers/gpu.ts';
import { randomCpDit, cpInputs, oneDeviceForward, cpForward, maxAbsDiff, type CpCase } from './helpers/cp.ts';
import { Engine } from '../src/runtime/engine.ts';
import { Tensor, numelOf } from '../src/tensor/tensor.ts';
import type { DType } from '../src/tensor/dtype.ts';
import { Rng } from '../src/util/rng.ts';
import { attention, attentionKernel, type AttentionKernel } from '../src/ops/attention.ts';
import { attentionLse, attentionMerge, NEG_LSE, splitPartial } from '../src/ops/attention_lse.ts';
import { attentionLseHost, attentionMergeHost } from '../src/ops/cpu/attention_lse.ts';
import type { WanTransformer3DModel } from '../src/models/wan_dit/model.ts';
import { ContextParallelDit, cpForwardBytes } from '../src/parallel/cp-dit.ts';
import { ringForwardBytes, useRing, ringAttention } from '../src/parallel/ring.ts';
import { HostExchange } from '../src/parallel/exchange.ts';
import { tinyModelWithTokenizer } from './helpers/models.ts';
import { WanPipeline, type GenerateResult, type WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { applyLayers, defaultSettings, overridesLayer } from '../src/config/settings.ts';

const engines: Engine[] = [];
beforeAll(async () => {
  // 'await': lavapipe compiles each new pipeline at its first dispatch
  for (let i = 0; i < 3; i++) engines.push(await Engine.create({ waitMode: 'await' }));
});
afterAll(() => {
  for (const e of engines) e.destroy();
});

function rand(rng: Rng, shape: number[], dt: DType = 'f32', std = 1): Tensor {
  const v = new Float32Array(numelOf(shape));
  for (let i = 0; i < v.length; i++) v[i] = rng.normal() * std;
  return Tensor.fromValues(v, shape, dt);
}

async function host(t: Tensor): Promise<Float32Array> {
  return (await t.toFloat32()) as Float32Array;
}

/** keys/values rows [j0, j1) of [B, L, H, Dh] host values */
function keyRows(x: Float32Array, B: number, L: number, rowLen: number, j0: number, j1: number): Float32Array {
  const out = new Float32Array(B * (j1 - j0) * rowLen);
  for (let b = 0; b < B; b++) out.set(x.subarray((b * L + j0) * rowLen, (b * L + j1) * rowLen), b * (j1 - j0) * rowLen);
  return out;
}

interface LseCase {
  B: number;
  Lq: number;
  Lk: number;
  H: number;
  Dh: number;
  dt?: DType;
  kernel?: AttentionKernel;
  limit?: number;
}

const LSE_CASES: LseCase[] = [
  { B: 1, Lq: 33, Lk: 65, H: 2, Dh: 128 }, // Wan's head dim, auto kernel
  { B: 1, Lq: 33, Lk: 65, H: 2, Dh: 128, kernel: 'subgroup' },
  { B: 1, Lq: 33, Lk: 65, H: 2, Dh: 128, kernel: 'portable' },
  { B: 2, Lq: 65, Lk: 130, H: 3, Dh: 64 },
  { B: 2, Lq: 7, Lk: 1, H: 3, Dh: 16 }, // one key
  { B: 2, Lq: 17, Lk: 33, H: 1, Dh: 6 }, // head dim no multiple of 4: portable
  { B: 1, Lq: 1, Lk: 257, H: 2, Dh: 16, kernel: 'subgroup' },
  { B: 2, Lq: 40, Lk: 70, H: 2, Dh: 16, limit: 4096 }, // binding splits: query and key chunks (ubo)
  { B: 2, Lq: 40, Lk: 70, H: 2, Dh: 16, limit: 4096, kernel: 'subgroup' },
  { B: 2, Lq: 40, Lk: 70, H: 2, Dh: 8, limit: 2048, kernel: 'portable' },
  { B: 2, Lq: 33, Lk: 65, H: 3, Dh: 128, dt: 'f16' },
];

describe('attention_lse (src/ops/attention_lse.ts) against its CPU twin', () => {
  for (const c of LSE_CASES) {
    it(`B${c.B} Lq${c.Lq} Lk${c.Lk} H${c.H} Dh${c.Dh} ${c.dt ?? 'f32'}${c.kernel ? ` ${c.kernel}` : ''}${c.limit ? ` limit ${c.limit}` : ''}`, async () => {
      const e = engines[0]!;
      const dt = c.dt ?? 'f32';
      if (dt === 'f16' && !e.caps.shaderF16) return;
      const rng = new Rng(c.Lq * 131 + c.Lk + c.Dh);
      const q = rand(rng, [c.B, c.Lq, c.H, c.Dh], dt);
      const k = rand(rng, [c.B, c.Lk, c.H, c.Dh], dt);
      const v = rand(rng, [c.B, c.Lk, c.H, c.Dh], dt);
      const attrs = { scale: 1 / Math.sqrt(c.Dh), kernel: c.kernel, maxBindingBytes: c.limit };
      const want = attentionLse({ q, k, v }, attrs); // the CPU twin (CPU tensors)
      expect(want.shape).toEqual([c.B, c.Lq, c.H, c.Dh + 1]);
      const got = attentionLse({ q: q.toGpu(e), k: k.toGpu(e), v: v.toGpu(e) }, attrs);
      expect(got.dtype).toBe('f32');
      const tol = dt === 'f16' ? { atol: 1e-4, rtol: 1e-4 } : TOL.f32; // f16 inputs, f32 math on both sides
      const g = splitPartial(await host(got), c.Dh);
      const w = splitPartial(want.data as Float32Array, c.Dh);
      expectClose(g.o, w.o, tol, 'output');
      expectClose(g.lse, w.lse, tol, 'lse');
      // the output part equals the fused attention's
      const fused = attention({ q: q.toGpu(e), k: k.toGpu(e), v: v.toGpu(e) }, { scale: attrs.scale, out: 'f32' });
      expectClose(g.o, await host(fused), TOL.f32, 'vs fused attention');
      if (!c.kernel) expect(['ubo', 'subgroup', 'portable']).toContain(attentionKernel(e, c.Dh));
    });
  }

  it('no keys: output 0, lse NEG_LSE; zero-size queries: an empty partial', async () => {
    const e = engines[0]!;
    const rng = new Rng(2);
    const q = rand(rng, [2, 5, 3, 16]).toGpu(e);
    const k0 = e.zeros([2, 0, 3, 16]);
    const p = splitPartial(await host(attentionLse({ q, k: k0, v: k0 }, { scale: 0.25 })), 16);
    expect(Array.from(p.o).every((x) => x === 0)).toBe(true);
    expect(Array.from(p.lse).every((x) => x === Math.fround(NEG_LSE))).toBe(true);
    const cpu = splitPartial(attentionLseHost(new Float32Array(2 * 5 * 3 * 16), new Float32Array(0), new Float32Array(0), { B: 2, Lq: 5, Lk: 0, H: 3, Dh: 16 }, 0.25), 16);
    expect(cpu.lse[0]).toBe(Math.fround(NEG_LSE));
    const qe = e.zeros([2, 0, 3, 16]);
    const kk = rand(rng, [2, 4, 3, 16]).toGpu(e);
    expect(attentionLse({ q: qe, k: kk, v: kk }, { scale: 0.25 }).shape).toEqual([2, 0, 3, 17]);
  });

  it('bad inputs get one-line errors naming the op', () => {
    const e = engines[0]!;
    const q = e.zeros([1, 4, 2, 8]);
    expect(() => attentionLse({ q, k: e.zeros([1, 4, 3, 8]), v: e.zeros([1, 4, 3, 8]) }, { scale: 1 })).toThrow(/\[attention_lse\] k \[1, 4, 3, 8\] does not match q/);
    expect(() => attentionLse({ q: e.zeros([4, 2, 8]), k: q, v: q }, { scale: 1 })).toThrow(/\[attention_lse\] q must be \[B, L, H, Dh\]/);
    expect(() => attentionLse({ q, k: q, v: q }, { scale: NaN })).toThrow(/\[attention_lse\] scale must be a finite number/);
    const a = e.zeros([1, 4, 2, 9]);
    expect(() => attentionMerge({ a, b: e.zeros([1, 4, 2, 8]) }, undefined)).toThrow(/\[attention_merge\] a \[1, 4, 2, 9\] and b \[1, 4, 2, 8\] must have the same shape/);
    expect(() => attentionMerge({ a, b: q }, undefined)).toThrow(/same shape/);
    expect(() => attentionMerge({ a: q.reshape([1, 4, 16]) as Tensor, b: a }, undefined)).toThrow(/\[attention_merge\] a must be an attention_lse partial/);
    expect(() => attentionMerge({ a, b: a }, { out: 'f16' })).toThrow(/out 'f16' needs final: true/);
  });
});

describe('attention_merge: N key chunks merged = attention over all keys', () => {
  const cases = [
    { B: 2, Lq: 33, Lk: 70, H: 3, Dh: 16, cuts: [24, 47] }, // 24 / 23 / 23
    { B: 1, Lq: 65, Lk: 129, H: 2, Dh: 128, cuts: [65] },
    { B: 2, Lq: 9, Lk: 11, H: 2, Dh: 6, cuts: [0, 5, 6, 11] }, // an empty chunk, a one-key chunk
    { B: 1, Lq: 20, Lk: 45, H: 4, Dh: 16, cuts: [9, 18, 27, 36], limit: 1024 }, // 5 chunks, merge in windows
  ];
  for (const c of cases) {
    it(`B${c.B} Lq${c.Lq} Lk${c.Lk} H${c.H} Dh${c.Dh}, chunks at ${c.cuts.join('/')}${c.limit ? `, limit ${c.limit}` : ''}`, async () => {
      const e = engines[0]!;
      const rng = new Rng(c.Lk);
      const qh = rand(rng, [c.B, c.Lq, c.H, c.Dh]);
      const kh = rand(rng, [c.B, c.Lk, c.H, c.Dh]);
      const vh = rand(rng, [c.B, c.Lk, c.H, c.Dh]);
      const scale = 1 / Math.sqrt(c.Dh);
      const q = qh.toGpu(e);
      const fused = await host(attention({ q, k: kh.toGpu(e), v: vh.toGpu(e) }, { scale }));
      const edges = [0, ...c.cuts, c.Lk];
      const row = c.H * c.Dh;
      let state: Tensor | null = null;
      let stateHost: Float32Array | null = null;
      for (let x = 0; x + 1 < edges.length; x++) {
        const [j0, j1] = [edges[x]!, edges[x + 1]!];
        const kc = keyRows(kh.data as Float32Array, c.B, c.Lk, row, j0, j1);
        const vc = keyRows(vh.data as Float32Array, c.B, c.Lk, row, j0, j1);
        const part = attentionLse({ q, k: e.fromHost(kc, [c.B, j1 - j0, c.H, c.Dh], 'f32'), v: e.fromHost(vc, [c.B, j1 - j0, c.H, c.Dh], 'f32') }, { scale });
        const partHost = attentionLseHost(qh.data as Float32Array, kc, vc, { B: c.B, Lq: c.Lq, Lk: j1 - j0, H: c.H, Dh: c.Dh }, scale);
        const last = x + 2 === edges.length;
        if (!state) {
          state = part;
          stateHost = partHost;
          continue;
        }
        const merged: Tensor = attentionMerge({ a: state, b: part }, { final: last, maxBindingBytes: c.limit });
        const mergedHost = attentionMergeHost(stateHost!, partHost, c.Dh, last);
        // the GPU merge against the CPU twin on the same partials
        const cpuOfGpu = attentionMergeHost(await host(state), await host(part), c.Dh, last);
        expectClose(await host(merged), cpuOfGpu, TOL.f32, `merge ${x}`);
        state.dispose();
        part.dispose();
        state = merged;
        stateHost = mergedHost;
      }
      expect(state!.shape).toEqual([c.B, c.Lq, c.H, c.Dh]);
      expectClose(await host(state!), fused, TOL.f32, 'merged GPU vs fused attention');
      expectClose(stateHost!, fused, TOL.f32, 'merged CPU vs fused attention');
    });
  }

  it('the final merge writes f16 when asked', async () => {
    const e = engines[0]!;
    if (!e.caps.shaderF16) return;
    const rng = new Rng(4);
    const q = rand(rng, [1, 9, 2, 16]);
    const a = attentionLse({ q, k: rand(rng, [1, 5, 2, 16]), v: rand(rng, [1, 5, 2, 16]) }, { scale: 0.25 });
    const b = attentionLse({ q, k: rand(rng, [1, 7, 2, 16]), v: rand(rng, [1, 7, 2, 16]) }, { scale: 0.25 });
    const want = attentionMerge({ a, b }, { final: true, out: 'f16' });
    const got = attentionMerge({ a: a.toGpu(e), b: b.toGpu(e) }, { final: true, out: 'f16' });
    expect(got.dtype).toBe('f16');
    expectClose(await host(got), await host(want), TOL.f16, 'f16 merge');
  });
});

// ---------------------------------------------------------------- the CP forward

const randomDit = randomCpDit;
const inputs = cpInputs;
type Inputs = CpCase;
const oneDevice = (m: WanTransformer3DModel, c: Inputs) => oneDeviceForward(engines[0]!, m, c);

const parallel = async (cp: ContextParallelDit, c: Inputs, attention: 'auto' | 'ulysses' | 'ring') => (await cpForward(cp, c, { attention })).out;

describe('ContextParallelDit with ring attention: N devices equal one device', () => {
  it('which attention runs: auto = ring exactly when the heads do not divide N; sage keeps Ulysses; bad modes named', () => {
    expect(useRing('auto', 2, 12)).toBe(false);
    expect(useRing('auto', 5, 12)).toBe(true);
    expect(useRing(undefined, 3, 2)).toBe(true);
    expect(useRing('auto', 1, 3)).toBe(false);
    expect(useRing('ring', 2, 12)).toBe(true);
    expect(useRing('ring', 1, 12)).toBe(false);
    expect(useRing('ulysses', 5, 12)).toBe(false);
    expect(useRing('auto', 5, 12, 'sage')).toBe(false);
    expect(() => useRing('ring', 2, 12, 'sage')).toThrow(/cp_attention=ring runs exact attention, not infer.attention=sage/);
    expect(() => useRing('rings' as 'ring', 2, 12)).toThrow(/attention must be one of auto, ulysses, ring \(infer.diffusion.cp_attention\), got 'rings'/);
  });

  for (const heads of [2, 3]) {
    it(`random Wan DiT with ${heads} heads, N = 2 and 3, L = 70 tokens, ring forced and auto: max |diff| <= 1e-5; host bytes as ringForwardBytes`, async () => {
      const cfg = { num_layers: 2, num_attention_heads: heads, attention_head_dim: 16, ffn_dim: 80, freq_dim: 32, in_channels: 4, out_channels: 4, text_dim: 24, rope_max_seq_len: 64 };
      const ref = randomDit(engines[0]!, cfg);
      const c = inputs(ref, 2, 10, 14, 6); // f, h, w = 2, 5, 7: L = 70 (rows 35/35, 24/23/23)
      const want = await oneDevice(ref, c);
      for (const N of [2, 3]) {
        const ranks = engines.slice(0, N).map((e, r) => ({ engine: e, dit: r === 0 ? ref : randomDit(e, cfg) }));
        const cp = new ContextParallelDit(ranks);
        const D = heads * 16;
        const p = { B: 2, L: 70, D, heads, blocks: 2, actBytes: 4, latentElems: c.x.length, tokenRow: 4 * 2 * 2, headRow: 4 * 2 * 2, ranks: N };
        for (const mode of ['ring', 'auto'] as const) {
          const got = await parallel(cp, c, mode);
          expect(maxAbsDiff(got, want), `N=${N} heads=${heads} ${mode}`).toBeLessThanOrEqual(1e-5);
          const ring = mode === 'ring' || heads % N !== 0;
          const bytes = ring ? ringForwardBytes(p) : cpForwardBytes(p);
          expect(cp.exchange.stats.bytesDown, `${mode} down`).toBe(bytes.down);
          expect(cp.exchange.stats.bytesUp, `${mode} up`).toBe(bytes.up);
          expect(cp.exchange.stats.bytesLocal, `${mode} local`).toBe(bytes.local);
          // the ring: N - 1 passes per block; Ulysses: q, k, v all-to-all + the way back; + the head's gather
          expect(cp.exchange.stats.exchanges).toBe(2 * (ring ? N - 1 : 4) + 1);
        }
        // the formula: per block and rank (N-1)·2·B·(L/N)·D elements up, the attention output stays
        const r = ringForwardBytes(p);
        const rest = cpForwardBytes({ ...p, blocks: 0 });
        expect(r.up - rest.up).toBe(2 * (N - 1) * 2 * 2 * 70 * D * 4);
        expect(r.down - rest.down).toBe(2 * 2 * 2 * 70 * D * 4);
        for (const rk of ranks.slice(1)) rk.dit.disposeParams();
      }
      ref.disposeParams();
    });
  }

  it('Wan head dim 128 with 3 heads over N = 2 (uneven rows 26/25), ring vs Ulysses vs one device', async () => {
    const cfg = { num_layers: 1, num_attention_heads: 3, attention_head_dim: 128, ffn_dim: 96, freq_dim: 32, in_channels: 4, out_channels: 4, text_dim: 24, rope_max_seq_len: 64 };
    const ranks = engines.slice(0, 2).map((e) => ({ engine: e, dit: randomDit(e, cfg) }));
    const c = inputs(ranks[0]!.dit, 3, 6, 34, 7); // f, h, w = 3, 3, 17: L = 51
    const want = await oneDevice(ranks[0]!.dit, c);
    const cp = new ContextParallelDit(ranks);
    expect(maxAbsDiff(await parallel(cp, c, 'ring'), want)).toBeLessThanOrEqual(1e-5);
    expect(maxAbsDiff(await parallel(cp, c, 'ulysses'), want)).toBeLessThanOrEqual(1e-5);
    for (const r of ranks) r.dit.disposeParams();
  });

  it('ringAttention alone: bad inputs are named', async () => {
    const ex = new HostExchange(engines.slice(0, 2));
    const a = engines[0]!.zeros([1, 3, 2, 8]);
    const b = engines[1]!.zeros([1, 3, 3, 8]);
    await expect(ringAttention(ex, [a, b], [a, b], [a, b], { scale: 1, out: 'f32' })).rejects.toThrow(/\[cp_ring\] rank 1's q f32 \[1, 3, 3, 8\] does not match rank 0's q/);
    await expect(ringAttention(ex, [a], [a], [a], { scale: 1, out: 'f32' })).rejects.toThrow(/needs q, k and v of each of the 2 ranks/);
    a.dispose();
    b.dispose();
  });
});

describe('WanPipeline with infer.diffusion.cp_attention', () => {
  const MODEL = tinyModelWithTokenizer();
  async function gen(opts: WanPipelineOptions): Promise<GenerateResult> {
    const pipe = await WanPipeline.fromPretrained(MODEL, { engine: engines[0]!, promptCache: false, ...opts });
    try {
      return await pipe.generate({ prompt: 'a red circle moving right', negativePrompt: 'blurry', seed: 7, numInferenceSteps: 2 });
    } finally {
      pipe.dispose();
    }
  }

  it('cp_size = 3 (2 heads: auto picks the ring) and cp_size = 2 with cp_attention=ring give the video of cp_size = 1 (<= 1e-5)', async () => {
    const base = await gen({ lowMemLevel: 2 });
    for (const [cpSize, cpAttention] of [
      [3, 'auto'],
      [2, 'ring'],
    ] as const) {
      const r = await gen({ lowMemLevel: 2, cpSize, cpAttention });
      expect(maxAbsDiff(r.latents.data, base.latents.data), `cp_size=${cpSize} ${cpAttention} latents`).toBeLessThanOrEqual(1e-5);
      expect(maxAbsDiff(r.video, base.video), `cp_size=${cpSize} ${cpAttention} video`).toBeLessThanOrEqual(1e-5);
      expect(r.memory.devices!.length).toBe(cpSize);
    }
  });

  it('cp_attention=ring with infer.attention=sage is refused at load with one line', async () => {
    await expect(gen({ cpSize: 2, cpAttention: 'ring', attention: 'sage' })).rejects.toThrow(/^infer.diffusion.cp_attention=ring runs exact attention, not infer.attention=sage; use cp_attention=auto or ulysses/);
  });

  it('infer.diffusion.cp_attention takes auto, ulysses or ring', () => {
    const s = (o: string[]) => applyLayers(defaultSettings(), [overridesLayer(o)]);
    expect(s(['infer.diffusion.cp_attention=ring']).load.cpAttention).toBe('ring');
    expect(s([]).load.cpAttention).toBe('auto');
    expect(() => s(['infer.diffusion.cp_attention=all2all'])).toThrow(/cp_attention.*one of auto, ulysses, ring/);
  });
});
