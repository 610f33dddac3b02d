import { describe, it, expect } from 'vitest';
import { getEngine, expectClose, TOL, Rng } from './helpers/gpu.ts';
import { attention, attentionKernel, type AttentionAttrs, type BiasMode } from '../src/ops/attention.ts';
import { Engine } from '../src/runtime/engine.ts';
import { Tensor, numelOf } from '../src/tensor/tensor.ts';
import type { DType } from '../src/tensor/dtype.ts';

// 'await': the wait predictor learns from the first dispatches of each new pipeline, whose time
// includes llvmpipe's JIT compile; in this file that made it over-sleep by seconds.
const engine = () => getEngine({ waitMode: 'await' });

interface Case {
  name: string;
  B: number;
  Lq: number;
  Lk: number;
  H: number;
  Dh: number;
  bias?: BiasMode;
  /** 'random': ~30 % of keys masked, and batch 1 (if any) fully masked (its rows must be zeros) */
  mask?: boolean;
  dt?: DType;
  out?: DType;
  /** binding limit for the split path (bytes) */
  limit?: number;
  kernel?: AttentionAttrs['kernel'];
  /** multiplier of q·k; default 1/sqrt(Dh) */
  scale?: number;
  /** std of q (T5-like scale 1 needs small q for a non-degenerate softmax) */
  qStd?: number;
  /** expected kernel under 'auto' */
  expect?: 'subgroup' | 'portable';
}

function rand(rng: Rng, shape: number[], std: number, dt: DType): Tensor {
  const v = new Float32Array(numelOf(shape));
  for (let i = 0; i < v.length; i++) v[i] = rng.normal() * std;
  return Tensor.fromValues(v, shape, dt);
}

function makeInputs(rng: Rng, c: Case) {
  const dt = c.dt ?? 'f32';
  const q = rand(rng, [c.B, c.Lq, c.H, c.Dh], c.qStd ?? 1, dt);
  const k = rand(rng, [c.B, c.Lk, c.H, c.Dh], 1, dt);
  const v = rand(rng, [c.B, c.Lk, c.H, c.Dh], 1, dt);
  let bias: Tensor | undefined;
  if (c.bias === 'full') bias = rand(rng, [c.H, c.Lq, c.Lk], 1, 'f32');
  if (c.bias === 'relative') bias = rand(rng, [c.H, c.Lq + c.Lk - 1], 1, 'f32');
  let keyMask: Tensor | undefined;
  if (c.mask) {
    const m = new Int32Array(c.B * c.Lk);
    for (let i = 0; i < m.length; i++) m[i] = rng.next() < 0.7 ? 1 : 0;
    m[0] = 1; // batch 0 has at least one key
    if (c.B > 1) m.fill(0, c.Lk, 2 * c.Lk);
    keyMask = Tensor.cpu(m, [c.B, c.Lk], 'i32');
  }
  return { q, k, v, bias, keyMask };
}

async function runCase(e: Engine, rng: Rng, c: Case) {
  const inp = makeInputs(rng, c);
  const attrs: AttentionAttrs = { scale: c.scale ?? 1 / Math.sqrt(c.Dh), biasMode: c.bias, out: c.out, maxBindingBytes: c.limit, kernel: c.kernel };
  if (c.expect) expect(attentionKernel(e, c.Dh, c.kernel, !!c.bias)).toBe(c.expect);
  const ref = attention(inp, attrs);
  const g = Object.fromEntries(Object.entries(inp).map(([n, t]) => [n, t?.toGpu(e)])) as typeof inp;
  const dispatches = e.dispatchCount;
  const out = attention(g, attrs);
  const n = e.dispatchCount - dispatches;
  expect(out.shape).toEqual([c.B, c.Lq, c.H, c.Dh]);
  expect(out.dtype).toBe(c.out ?? c.dt ?? 'f32');
  const got = await out.toArray();
  const want = ref.hostValues();
  expectClose(got, want, TOL[(c.out ?? c.dt ?? 'f32') as 'f32' | 'f16'], c.name);
  if (c.mask && c.B > 1) {
    // batch 1 has no attendable key: its rows are exactly zero
    const row = c.Lq * c.H * c.Dh;
    for (let i = row; i < 2 * row; i++) if (got[i] !== 0) throw new Error(`${c.name}: fully masked row not zero at ${i}: ${got[i]}`);
  }
  out.dispose();
  for (const t of Object.values(g)) t?.dispose();
  return n;
}

// 'auto' picks 'ubo' on llvmpipe when there is no bias and 'subgroup' with a bias (elsewhere
// 'subgroup'); every kernel is also forced on some cases.
const CASES: Case[] = [
  { name: 'Lq33 Lk65 H2 Dh64', B: 1, Lq: 33, Lk: 65, H: 2, Dh: 64 },
  { name: 'B2 Lq65 Lk33 H1 Dh128 full bias', B: 2, Lq: 65, Lk: 33, H: 1, Dh: 128, bias: 'full', expect: 'subgroup' },
  { name: 'Lq1 Lk1 H12 Dh64', B: 1, Lq: 1, Lk: 1, H: 12, Dh: 64 },
  { name: 'B2 Lq33 Lk65 H12 Dh128 (Wan heads)', B: 2, Lq: 33, Lk: 65, H: 12, Dh: 128 },
  // T5: no scaling, per-layer relative bias table, padded keys masked
  { name: 'B2 Lq33 Lk33 H2 Dh64 T5: scale 1, relative bias, key mask', B: 2, Lq: 33, Lk: 33, H: 2, Dh: 64, bias: 'relative', mask: true, scale: 1, qStd: 0.2 },
  { name: 'Lq65 Lk33 H1 Dh384 (Wan VAE mid attention)', B: 1, Lq: 65, Lk: 33, H: 1, Dh: 384 },
  { name: 'Lq1025 Lk65 H1 Dh64', B: 1, Lq: 1025, Lk: 65, H: 1, Dh: 64 },
  { name: 'B2 Lq1 Lk65 H2 Dh64 full bias + mask', B: 2, Lq: 1, Lk: 65, H: 2, Dh: 64, bias: 'full', mask: true },
  { name: 'B2 Lq33 Lk65 H2 Dh32 key mask', B: 2, Lq: 33, Lk: 65, H: 2, Dh: 32, mask: true },
  // head dims that are not a multiple of 4 run on the portable kernel
  { name: 'Lq33 Lk17 H2 Dh22 (head dim not a multiple of 4)', B: 1, Lq: 33, Lk: 17, H: 2, Dh: 22, expect: 'portable' },
  { name: 'B2 Lq9 Lk5 H3 Dh7 (odd head dim) relative bias + mask', B: 2, Lq: 9, Lk: 5, H: 3, Dh: 7, bias: 'relative', mask: true, expect: 'portable' },
  // split path: a small binding limit forces query chunks, per-head full-bias windows and key
  // chunks chained through the online-softmax state
  { name: 'split: B2 Lq65 Lk70 H2 Dh64 full bias + mask, 4 KiB bindings', B: 2, Lq: 65, Lk: 70, H: 2, Dh: 64, bias: 'full', mask: true, limit: 4096 },
  { name: 'split: B2 Lq40 Lk37 H3 Dh32 relative bias, 2 KiB bindings', B: 2, Lq: 40, Lk: 37, H: 3, Dh: 32, bias: 'relative', limit: 2048 },
  // the 'subgroup' kernel without a bias (on llvmpipe 'auto' would pick 'ubo')
  { name: 'subgroup: B2 Lq33 Lk65 H3 Dh64 mask', B: 2, Lq: 33, Lk: 65, H: 3, Dh: 64, mask: true, kernel: 'subgroup' },
  { name: 'subgroup: Lq65 Lk33 H1 Dh384', B: 1, Lq: 65, Lk: 33, H: 1, Dh: 384, kernel: 'subgroup' },
  { name: 'subgroup split: B2 Lq65 Lk70 H2 Dh64, 4 KiB bindings', B: 2, Lq: 65, Lk: 70, H: 2, Dh: 64, limit: 4096, kernel: 'subgroup' },
  // the 'ubo' kernel: several 64 KiB key windows per (batch, head) chained through (m, l)
  { name: 'ubo: B2 Lq70 Lk300 H2 Dh128 mask (3 key windows)', B: 2, Lq: 70, Lk: 300, H: 2, Dh: 128, mask: true, kernel: 'ubo' },
  { name: 'ubo: Lq40 Lk300 H1 Dh384 (4 windows of 32 keys per dispatch, 3 dispatches)', B: 1, Lq: 40, Lk: 300, H: 1, Dh: 384, kernel: 'ubo' },
  { name: 'ubo split: B2 Lq65 Lk70 H2 Dh64 mask, 4 KiB bindings', B: 2, Lq: 65, Lk: 70, H: 2, Dh: 64, mask: true, limit: 4096, kernel: 'ubo' },
  // the portable kernel on every feature
  { name: 'portable: B2 Lq33 Lk40 H3 Dh32 full bias', B: 2, Lq: 33, Lk: 40, H: 3, Dh: 32, bias: 'full', kernel: 'portable' },
  { name: 'portable: B2 Lq65 Lk33 H1 Dh128 relative bias + mask', B: 2, Lq: 65, Lk: 33, H: 1, Dh: 128, bias: 'relative', mask: true, kernel: 'portable' },
  { name: 'portable split: B2 Lq33 Lk40 H3 Dh32 full bias + mask, 2 KiB', B: 2, Lq: 33, Lk: 40, H: 3, Dh: 32, bias: 'full', mask: true, kernel: 'portable', limit: 2048 },
];

const F16_CASES: Case[] = [
  { name: 'f16 in, f16 out: B2 Lq33 Lk65 H2 Dh64 full bias', B: 2, Lq: 33, Lk: 65, H: 2, Dh: 64, dt: 'f16', bias: 'full' },
  { name: 'f16 in, f32 out: B2 Lq65 Lk33 H2 Dh128 mask', B: 2, Lq: 65, Lk: 33, H: 2, Dh: 128, dt: 'f16', out: 'f32', mask: true },
  { name: 'f16 in, f16 out: Lq65 Lk140 H2 Dh128 (ubo, 2 key windows)', B: 1, Lq: 65, Lk: 140, H: 2, Dh: 128, dt: 'f16', kernel: 'ubo' },
  { name: 'f32 in, f16 out: split 4 KiB (scratch accumulator)', B: 2, Lq: 65, Lk: 70, H: 2, Dh: 64, out: 'f16', limit: 4096 },
  { name: 'f32 in, f16 out: subgroup', B: 2, Lq: 33, Lk: 40, H: 2, Dh: 64, out: 'f16', kernel: 'subgroup' },
  { name: 'f16 portable: Lq33 Lk17 H2 Dh22', B: 1, Lq: 33, Lk: 17, H: 2, Dh: 22, dt: 'f16' },
];

describe('attention', () => {
  const rng = new Rng(7);
  for (const c of CASES) {
    it(c.name, async () => {
      const e = await engine();
      const n = await runCase(e, rng, c);
      if (c.limit) expect(n).toBeGreaterThan(4); // really split
      else if (attentionKernel(e, c.Dh, c.kernel, !!c.bias) !== 'ubo') expect(n).toBe(1);
    });
  }
  for (const c of F16_CASES) {
    it(c.name, async () => {
      const e = await engine();
      if (!e.caps.shaderF16) return; // adapter without shader-f16: f16 tensors are rejected (tested below)
      await runCase(e, rng, c);
    });
  }

  it('zero-size query length, batch, heads; zero keys give zeros', async () => {
    const e = await engine();
    for (const [B, Lq, Lk, H] of [[1, 0, 5, 2], [0, 3, 5, 2], [1, 3, 5, 0]]) {
      const q = Tensor.cpuZeros([B!, Lq!, H!, 64]).toGpu(e);
      const k = Tensor.cpuZeros([B!, Lk!, H!, 64]).toGpu(e);
      const o = attention({ q, k, v: k }, { scale: 0.125 });
      expect(o.shape).toEqual([B, Lq, H, 64]);
      expect((await o.toArray()).length).toBe(0);
      expect(attention({ q: await q.toCpu(), k: await k.toCpu(), v: await k.toCpu() }, { scale: 0.125 }).shape).toEqual([B, Lq, H, 64]);
    }
    const q = rand(rng, [2, 5, 2, 64], 1, 'f32');
    const k = Tensor.cpuZeros([2, 0, 2, 64]);
    const o = attention({ q: q.toGpu(e), k: k.toGpu(e), v: k.toGpu(e) }, { scale: 0.125 });
    expect(Array.from(await o.toArray()).every((x) => x === 0)).toBe(true);
    expect(Array.from(attention({ q, k, v: k }, { scale: 0.125 }).hostValues()).every((x) => x === 0)).toBe(true);
  });

  it('known answers: one key returns v; equal scores return the mean of v', async () => {
    const e = await engine();
    const v = rand(rng, [1, 1, 2, 64], 1, 'f32');
    const q = rand(rng, [1, 3, 2, 64], 1, 'f32');
    const k = rand(rng, [1, 1, 2, 64], 1, 'f32');
    const o = await attention({ q: q.toGpu(e), k: k.toGpu(e), v: v.toGpu(e) }, { scale: 0.125 }).toArray();
    const vv = v.hostValues();
    for (let i = 0; i < 3; i++) for (let x = 0; x < 128; x++) expect(o[i * 128 + x]).toBeCloseTo(vv[x]!, 6);
    // k = 0: every score is 0, the output is the mean of v over the keys
    const v2 = rand(rng, [1, 40, 1, 8], 1, 'f32');
    const o2 = await attention({ q: rand(rng, [1, 2, 1, 8], 1, 'f32').toGpu(e), k: Tensor.cpuZeros([1, 40, 1, 8]).toGpu(e), v: v2.toGpu(e) }, { scale: 1 }).toArray();
    const v2v = v2.hostValues();
    for (let d = 0; d < 8; d++) {
      let mean = 0;
      for (let j = 0; j < 40; j++) mean += v2v[j * 8 + d]! / 40;
      expect(o2[d]).toBeCloseTo(mean, 5);
      expect(o2[8 + d]).toBeCloseTo(mean, 5);
    }
  });

  it('an adapter without subgroups runs the portable kernel', async () => {
    const e2 = await Engine.create({ waitMode: 'await', disableFeatures: ['subgroups'] });
    try {
      expect(e2.caps.subgroups).toBe(false);
      expect(attentionKernel(e2, 64)).toBe('portable');
      expect(() => attentionKernel(e2, 64, 'subgroup')).toThrow(/\[attention\] the subgroup kernel needs the 'subgroups' feature/);
      expect(() => attentionKernel(e2, 64, 'ubo')).toThrow(/\[attention\] the ubo kernel needs the 'subgroups' feature/);
      await runCase(e2, rng, { name: 'no subgroups: B2 Lq33 Lk40 H2 Dh64 relative bias + mask', B: 2, Lq: 33, Lk: 40, H: 2, Dh: 64, bias: 'relative', mask: true });
    } finally {
      e2.destroy();
    }
  });

  it('rejects bad shapes and dtypes with [attention] messages', async () => {
    const z = (shape: number[], dt: DType = 'f32') => Tensor.cpuZeros(shape, dt);
    const q = z([1, 4, 2, 8]);
    const k = z([1, 6, 2, 8]);
    const run = (i: Partial<{ q: Tensor; k: Tensor; v: Tensor; bias: Tensor; keyMask: Tensor }>, a: Partial<AttentionAttrs> = {}) => () =>
      attention({ q, k, v: k, ...i } as { q: Tensor; k: Tensor; v: Tensor }, { scale: 1, ...a });
    expect(run({ q: z([4, 2, 8]) })).toThrow(/\[attention\] q must be \[B, L, H, Dh\] \(rank 4\), got \[4, 2, 8\]/);
    expect(run({ k: z([1, 6, 3, 8]) })).toThrow(/\[attention\] k \[1, 6, 3, 8\] does not match q \[1, 4, 2, 8\]: want \[1, Lk, 2, 8\]/);
    expect(run({ k: z([2, 6, 2, 8]), v: z([2, 6, 2, 8]) })).toThrow(/\[attention\] k \[2, 6, 2, 8\] does not match q/);
    expect(run({ v: z([1, 5, 2, 8]) })).toThrow(/\[attention\] v \[1, 5, 2, 8\] must have k's shape \[1, 6, 2, 8\]/);
    expect(run({ k: z([1, 6, 2, 8], 'f16'), v: z([1, 6, 2, 8], 'f16') })).toThrow(/\[attention\] q, k and v must have the same dtype, got f32, f16, f16/);
    expect(run({ q: z([1, 4, 2, 8], 'bf16') })).toThrow(/\[attention\] activations must be f32 or f16, got bf16/);
    expect(run({ bias: z([2, 4, 5]) })).toThrow(/\[attention\] full bias must be \[2, 4, 6\]/);
    expect(run({ bias: z([2, 10]) }, { biasMode: 'relative' })).toThrow(/\[attention\] relative bias must be \[2, 9\]/);
    expect(run({ bias: z([2, 4, 6], 'f16') })).toThrow(/\[attention\] bias must be f32, got f16/);
    expect(run({}, { biasMode: 'relative' })).toThrow(/\[attention\] biasMode 'relative' given without a bias tensor/);
    expect(run({ keyMask: z([1, 6], 'f32') })).toThrow(/\[attention\] keyMask must be i32/);
    expect(run({ keyMask: z([1, 4], 'i32') })).toThrow(/\[attention\] keyMask must be \[B, Lk\] = \[1, 6\], got \[1, 4\]/);
    expect(run({}, { scale: NaN })).toThrow(/\[attention\] scale must be a finite number/);
    const e = await engine();
    expect(() => attention({ q: q.toGpu(e), k, v: k }, { scale: 1 })).toThrow(/\[attention\] inputs are on different devices/);
    if (!e.caps.shaderF16) {
      expect(() => attention({ q: z([1, 4, 2, 8], 'f16').toGpu(e), k: z([1, 6, 2, 8], 'f16').toGpu(e), v: z([1, 6, 2, 8], 'f16').toGpu(e) }, { scale: 1 })).toThrow(
        /shader-f16/,
      );
    }
  });
});
