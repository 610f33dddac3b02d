// The quantized (SageAttention-style) attention: the WGSL kernels against the CPU reference of the
// same quantized math (tight tolerances), and against exact attention (the accuracy metrics:
// cosine >= 0.999, relative L1 <= 0.03) on odd shapes, the split paths, f16 / f32 P·V, and errors.
import { describe, it, expect } from 'vitest';
import { getEngine, expectClose, Rng } from './helpers/gpu.ts';
import { SAGE_OWNER, sageAttention, sagePv, sageWorkspaceBytes, type SageAttentionAttrs } from '../src/ops/attention_sage.ts';
import { attention } from '../src/ops/attention.ts';
import { attentionAccuracy, kernelSum, roundHalfEven, sageAttentionRef, sageQuantize, type SagePv } from '../src/ops/cpu/attention_sage.ts';
import { Tensor, numelOf } from '../src/tensor/tensor.ts';
import type { DType } from '../src/tensor/dtype.ts';

const engine = () => getEngine({ waitMode: 'await' });

function rand(rng: Rng, shape: number[], std: number, dt: DType = 'f32', offset = 0): Tensor {
  const v = new Float32Array(numelOf(shape));
  for (let i = 0; i < v.length; i++) v[i] = offset + rng.normal() * std;
  return Tensor.fromValues(v, shape, dt);
}

interface Case {
  name: string;
  B: number;
  Lq: number;
  Lk: number;
  H: number;
  Dh: number;
  dt?: DType;
  out?: DType;
  pv?: SagePv;
  limit?: number;
  /** a per-channel offset of k (what smoothing removes) */
  kOffset?: number;
}

const CASES: Case[] = [
  { name: 'Lq33 Lk65 H2 Dh64', B: 1, Lq: 33, Lk: 65, H: 2, Dh: 64 },
  { name: 'B2 Lq1 Lk1 H3 Dh4', B: 2, Lq: 1, Lk: 1, H: 3, Dh: 4 },
  { name: 'B2 Lq70 Lk130 H3 Dh128 (Wan head dim), k offset 3', B: 2, Lq: 70, Lk: 130, H: 3, Dh: 128, kOffset: 3 },
  { name: 'Lq65 Lk33 H1 Dh384 (VAE mid attention head dim)', B: 1, Lq: 65, Lk: 33, H: 1, Dh: 384 },
  { name: 'Lq129 Lk17 H2 Dh36 (odd word count)', B: 1, Lq: 129, Lk: 17, H: 2, Dh: 36 },
  { name: 'split: B2 Lq200 Lk150 H2 Dh32, 24 KiB bindings', B: 2, Lq: 200, Lk: 150, H: 2, Dh: 32, limit: 24576 },
  { name: 'pv f32: Lq33 Lk65 H2 Dh64', B: 1, Lq: 33, Lk: 65, H: 2, Dh: 64, pv: 'f32' },
  // V rows read from storage (the staged V tile would not fit 32 KiB of workgroup memory)
  { name: 'pv f32: Lq20 Lk40 H1 Dh512 (V not staged)', B: 1, Lq: 20, Lk: 40, H: 1, Dh: 512, pv: 'f32' },
  { name: 'f16 in, f16 out: B2 Lq33 Lk70 H2 Dh64', B: 2, Lq: 33, Lk: 70, H: 2, Dh: 64, dt: 'f16' },
  { name: 'f32 in, f16 out: Lq40 Lk40 H1 Dh128', B: 1, Lq: 40, Lk: 40, H: 1, Dh: 128, out: 'f16' },
];

describe('attention_sage', () => {
  const rng = new Rng(23);

  it('CPU reference: round half to even, block scales, smoothing removes a per-channel offset', () => {
    expect([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999, 2.5001].map(roundHalfEven)).toEqual([0, 2, 2, -0, -2, -2, 2, 3]);
    // one block: scale = max|x| / 127, the max maps to ±127
    const x = Float32Array.from([1, -2, 0.5, 4, 0, 0.015748031, -4, 3]);
    const qz = sageQuantize(x, 0, 4, 2, 4, 1);
    expect(qz.scales[0]).toBeCloseTo(4 / 127, 7);
    expect(Array.from(qz.data)).toEqual([32, -64, 16, 127, 0, 0, -127, 95]);
    // 65 rows: two blocks with their own scales
    const y = new Float32Array(65 * 4).fill(1);
    y[64 * 4] = 10;
    const qy = sageQuantize(y, 0, 4, 65, 4, 2);
    expect(qy.scales.length).toBe(2);
    expect(qy.scales[0]).toBeCloseTo((1 / 127) * 2, 7);
    expect(qy.scales[1]).toBeCloseTo((10 / 127) * 2, 6);
    expect(kernelSum(Float32Array.from([1, 2, 3, 4, 5]), 0, 1, 5)).toBe(15);
    // smoothing: scores shift by q·mean per query, softmax is unchanged, so a large offset on k
    // barely changes the quantized output (naive int8 of k + 30 loses most of k's resolution)
    const d = { B: 1, Lq: 8, Lk: 40, H: 1, Dh: 16 };
    const q = rand(rng, [1, 8, 1, 16], 1).hostValues();
    const k = rand(rng, [1, 40, 1, 16], 1).hostValues() as Float32Array;
    const v = rand(rng, [1, 40, 1, 16], 1).hostValues();
    const k2 = k.map((t, i) => t + 30 * Math.sin(i % 16));
    const a = sageAttentionRef(q, k, v, d, 0.25, 'f32');
    const b = sageAttentionRef(q, k2, v, d, 0.25, 'f32');
    const exact = attention({ q: Tensor.cpu(Float32Array.from(q), [1, 8, 1, 16]), k: Tensor.cpu(k, [1, 40, 1, 16]), v: Tensor.cpu(Float32Array.from(v), [1, 40, 1, 16]) }, { scale: 0.25 });
    expect(attentionAccuracy(a, exact.hostValues()).cos).toBeGreaterThan(0.999);
    expect(attentionAccuracy(b, exact.hostValues()).cos).toBeGreaterThan(0.999);
  });

  for (const c of CASES) {
    it(c.name, async () => {
      const e = await engine();
      const dt = c.dt ?? 'f32';
      if ((dt === 'f16' || c.out === 'f16' || c.pv === 'f16') && !e.caps.shaderF16) return;
      const q = rand(rng, [c.B, c.Lq, c.H, c.Dh], 1, dt);
      const k = rand(rng, [c.B, c.Lk, c.H, c.Dh], 1, dt, c.kOffset ?? 0);
      const v = rand(rng, [c.B, c.Lk, c.H, c.Dh], 1, dt);
      const scale = 1 / Math.sqrt(c.Dh);
      const attrs: SageAttentionAttrs = { scale, out: c.out, pv: c.pv, maxBindingBytes: c.limit };
      const pv = sagePv(e.caps.shaderF16, c.pv);
      const ref = sageAttentionRef(q.hostValues(), k.hostValues(), v.hostValues(), c, scale, pv);
      const n0 = e.dispatchCount;
      const o = sageAttention({ q: q.toGpu(e), k: k.toGpu(e), v: v.toGpu(e) }, attrs);
      const dispatches = e.dispatchCount - n0;
      expect(o.shape).toEqual([c.B, c.Lq, c.H, c.Dh]);
      expect(o.dtype).toBe(c.out ?? dt);
      const got = await o.toArray();
      const f16out = (c.out ?? dt) === 'f16';
      // against the quantized reference: only exp2 / fma / the last bits of the K mean differ
      const tol = f16out ? { atol: 2e-3, rtol: 2e-3 } : pv === 'f16' ? { atol: 3e-4, rtol: 2e-3 } : { atol: 2e-5, rtol: 1e-4 };
      expectClose(got, ref, tol, c.name);
      // against exact attention: the accuracy targets
      const exact = attention({ q, k, v }, { scale });
      const acc = attentionAccuracy(got, exact.hostValues());
      expect(acc.cos, `${c.name} cos`).toBeGreaterThanOrEqual(0.999);
      expect(acc.relL1, `${c.name} relL1`).toBeLessThanOrEqual(0.03);
      if (c.limit) expect(dispatches).toBeGreaterThan(c.B * c.H * 4); // really chunked
      // the CPU device runs the same quantized math
      const cpu = sageAttention({ q, k, v }, { ...attrs, pv });
      expectClose(cpu.hostValues(), ref, { atol: f16out ? 2e-3 : 1e-6, rtol: f16out ? 2e-3 : 1e-6 }, `${c.name} cpu`);
      o.dispose();
    });
  }

  it('workspaces are tagged attention.sage (the planner counts them) and freed; their bytes match sageWorkspaceBytes', async () => {
    const e = await engine();
    const [Lq, Lk, H, Dh] = [100, 130, 2, 64];
    const t = { q: rand(rng, [1, Lq, H, Dh], 1).toGpu(e), k: rand(rng, [1, Lk, H, Dh], 1).toGpu(e), v: rand(rng, [1, Lk, H, Dh], 1).toGpu(e) };
    e.allocator.startRecording();
    const o = sageAttention(t, { scale: 0.125 });
    const ev = e.allocator.stopRecording();
    const ws = ev.filter((x) => x.action === 'alloc' && x.owner === SAGE_OWNER);
    expect(ws.length).toBeGreaterThanOrEqual(7);
    const frees = ev.filter((x) => x.action === 'free' && x.owner === SAGE_OWNER);
    expect(frees.length).toBe(ws.length);
    const pvBytes = sagePv(e.caps.shaderF16) === 'f16' ? 2 : 4;
    const sum = ws.reduce((a, x) => a + x.bytes, 0);
    expect(sum).toBeGreaterThanOrEqual(sageWorkspaceBytes(Lq, Lk, Dh, pvBytes) - 64);
    expect(sum).toBeLessThanOrEqual(sageWorkspaceBytes(Lq, Lk, Dh, pvBytes) + 256);
    o.dispose();
    for (const x of Object.values(t)) x.dispose();
  });

  it('zero sizes; zero keys give zeros', async () => {
    const e = await engine();
    for (const [B, Lq, Lk, H] of [[1, 0, 5, 2], [0, 3, 5, 2], [1, 3, 5, 0]]) {
      const q = Tensor.cpuZeros([B!, Lq!, H!, 64]);
      const k = Tensor.cpuZeros([B!, Lk!, H!, 64]);
      const o = sageAttention({ q: q.toGpu(e), k: k.toGpu(e), v: k.toGpu(e) }, { scale: 0.125 });
      expect(o.shape).toEqual([B, Lq, H, 64]);
      expect((await o.toArray()).length).toBe(0);
    }
    const q = rand(rng, [2, 5, 2, 64], 1);
    const k = Tensor.cpuZeros([2, 0, 2, 64]);
    const o = sageAttention({ q: q.toGpu(e), k: k.toGpu(e), v: k.toGpu(e) }, { scale: 0.125 });
    expect(Array.from(await o.toArray()).every((x) => x === 0)).toBe(true);
    expect(Array.from(sageAttention({ q, k, v: k }, { scale: 0.125 }).hostValues()).every((x) => x === 0)).toBe(true);
  });

  it('refuses bias, key mask, unsupported head dims and bad attrs with [attention_sage] messages', async () => {
    const z = (shape: number[], dt: DType = 'f32') => Tensor.cpuZeros(shape, dt);
    const q = z([1, 4, 2, 8]);
    const k = z([1, 6, 2, 8]);
    const run = (i: Partial<{ q: Tensor; k: Tensor; v: Tensor; bias: Tensor; keyMask: Tensor }>, a: Partial<SageAttentionAttrs> = {}) => () =>
      sageAttention({ q, k, v: k, ...i } as { q: Tensor; k: Tensor; v: Tensor }, { scale: 1, ...a });
    expect(run({ bias: z([2, 9]) })).toThrow(/\[attention_sage\] takes no bias .* call attention\(\) \(infer.attention=sdpa\)/);
    expect(run({ keyMask: z([1, 6], 'i32') })).toThrow(/\[attention_sage\] takes no key mask/);
    expect(run({ q: z([1, 4, 2, 6]), k: z([1, 6, 2, 6]), v: z([1, 6, 2, 6]) })).toThrow(/\[attention_sage\] head dim 6 is not supported .* use infer.attention=sdpa/);
    expect(run({ q: z([4, 2, 8]) })).toThrow(/\[attention_sage\] q must be \[B, L, H, Dh\]/);
    expect(run({ v: z([1, 5, 2, 8]) })).toThrow(/\[attention_sage\] v \[1, 5, 2, 8\] must have k's shape/);
    expect(run({}, { scale: NaN })).toThrow(/\[attention_sage\] scale must be a finite number/);
    expect(run({}, { pv: 'bf16' as never })).toThrow(/\[attention_sage\] pv must be 'auto', 'f16' or 'f32'/);
    expect(() => sagePv(false, 'f16')).toThrow(/\[attention_sage\] pv 'f16' needs the adapter feature 'shader-f16'/);
    expect(sagePv(false)).toBe('f32');
    expect(sagePv(true)).toBe('f16');
    const e = await engine();
    expect(() => sageAttention({ q: z([1, 64, 2, 128]).toGpu(e), k: z([1, 64, 2, 128]).toGpu(e), v: z([1, 64, 2, 128]).toGpu(e) }, { scale: 1, maxBindingBytes: 4096 })).toThrow(
      /\[attention_sage\] 64 token rows of 2 heads x 128 .* above the binding limit/,
    );
  });
});
