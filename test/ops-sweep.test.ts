// Every registered op, on the GPU against its CPU reference, on seeded odd shapes (1, 33, 65,
// zero-size, non-multiples of the kernels' tiles) and each dtype that applies. The registry is the
// list: an op registered without samples here fails this file. The per-family test files keep
// their special cases (binding splits, forced variants, goldens).
import { describe, it, expect } from 'vitest';
import { getEngine, expectClose, Rng } from './helpers/gpu.ts';
import { opRegistry } from '../src/ops/registry.ts';
import '../src/ops/elementwise.ts';
import '../src/ops/norm.ts';
import '../src/ops/softmax.ts';
import '../src/ops/rope.ts';
import '../src/ops/gather.ts';
import '../src/ops/upsample.ts';
import '../src/ops/layout.ts';
import '../src/ops/matmul.ts';
import '../src/ops/attention.ts';
import '../src/ops/conv.ts';
import '../src/ops/finite.ts';
import { Tensor, numelOf, type Shape } from '../src/tensor/tensor.ts';
import type { DType } from '../src/tensor/dtype.ts';

// 'await': lavapipe compiles each new pipeline at its first dispatch (seconds); the wait predictor
// would learn that as kernel time
const engine = () => getEngine({ waitMode: 'await' });

/**
 * The sweep's dtypes: 'f32' everything f32; 'f16' activations (and their outputs) f16, skipped
 * without shader-f16; 'bf16' weights/tables bf16 (ops without weights have no bf16 samples).
 */
type Mode = 'f32' | 'f16' | 'bf16';
const MODES: Mode[] = ['f32', 'f16', 'bf16'];

/** |gpu - cpu| <= atol + rtol |cpu|, scaled by sqrt(k) for a k-long reduction (summation order differs). */
const TOL: Record<Mode, { atol: number; rtol: number }> = {
  f32: { atol: 1e-5, rtol: 1e-5 },
  f16: { atol: 2e-3, rtol: 2e-3 },
  bf16: { atol: 1e-4, rtol: 1e-4 },
};

interface Sample {
  what: string;
  inputs: Record<string, Tensor | undefined>;
  attrs: unknown;
  /** reduction length (dot products): the tolerance grows like sqrt(k) */
  k?: number;
}

/** Seeded normal values (times `std`, plus `offset`) as a CPU tensor of `dtype`. */
function rnd(r: Rng, shape: Shape, dtype: DType = 'f32', std = 1, offset = 0): Tensor {
  const v = new Float32Array(numelOf(shape));
  for (let i = 0; i < v.length; i++) v[i] = offset + r.normal() * std;
  return Tensor.fromValues(v, shape, dtype);
}

/** A weight [out, ...fanIn dims] scaled by 1/sqrt(fan-in), so outputs stay O(1). */
function wt(r: Rng, shape: Shape, dtype: DType): Tensor {
  const fanIn = shape.slice(1).reduce((a, b) => a * b, 1);
  return rnd(r, shape, dtype, 1 / Math.sqrt(Math.max(1, fanIn)));
}

const act = (m: Mode): DType => (m === 'f16' ? 'f16' : 'f32');
const wdt = (m: Mode): DType => m;

/** Per op: its samples for a sweep dtype ([] where that dtype means nothing for the op). */
const SAMPLES: Record<string, (r: Rng, m: Mode) => Sample[]> = {
  count_nonfinite(r, m) {
    const shapes: Shape[] = m === 'f32' ? [[1], [33], [65, 3], [1025], [0, 5]] : [[33], [65, 3]];
    return shapes.map((s) => {
      const v = new Float32Array(numelOf(s)).map(() => r.normal() * 1e3);
      for (let i = 3; i < v.length; i += 7) v[i] = i % 2 ? NaN : -Infinity;
      return { what: `[${s}]`, inputs: { x: Tensor.fromValues(v, s, m) }, attrs: undefined };
    });
  },
  unary(r, m) {
    if (m === 'bf16') return [];
    const a = act(m);
    const kinds = ['gelu', 'silu', 'affine', 'clamp', 'copy'] as const;
    const shapes: Shape[] = m === 'f32' ? [[1], [33], [65, 3], [4, 64], [0, 5]] : [[33], [4, 64]];
    const out: Sample[] = shapes.map((s, i) => ({ what: `${kinds[i % kinds.length]} [${s}]`, inputs: { x: rnd(r, s, a) }, attrs: { kind: kinds[i % kinds.length], alpha: -0.5, beta: 0.75 } }));
    if (m === 'f16') out.push({ what: 'cast f32 -> f16 [65]', inputs: { x: rnd(r, [65]) }, attrs: { kind: 'copy', out: 'f16' } });
    return out;
  },
  binary(r, m) {
    if (m === 'bf16') return [];
    const a = act(m);
    const cases: Array<[string, Shape, Shape, number]> =
      m === 'f32'
        ? [
            ['add', [33], [33], 1],
            ['sub', [5, 65], [65], 1],
            ['mul', [3, 33, 4], [33, 1], 1],
            ['div', [7, 9], [9], 1],
            ['axpy', [4, 64], [64], 0.3],
            ['lerp', [2, 33], [2, 33], 1.7],
            ['add', [0, 4], [4], 1],
          ]
        : [
            ['add', [5, 65], [65], 1],
            ['lerp', [4, 64], [4, 64], 1.7],
          ];
    // div: a divisor in [1, 3)
    return cases.map(([kind, as, bs, alpha]) => ({ what: `${kind} [${as}] [${bs}]`, inputs: { a: rnd(r, as, a), b: rnd(r, bs, a, kind === 'div' ? 0.3 : 1, kind === 'div' ? 2 : 0) }, attrs: { kind, alpha } }));
  },
  modulate(r, m) {
    if (m === 'bf16') return [];
    const a = act(m);
    const cases: Array<[Shape, number]> = m === 'f32' ? [[[65, 33], 33], [[2, 7, 64], 64], [[1, 1], 1], [[0, 8], 8]] : [[[2, 7, 64], 64], [[5, 33], 33]];
    return cases.map(([xs, d]) => ({ what: `x [${xs}] shift/scale [${d}]`, inputs: { x: rnd(r, xs, a), shift: rnd(r, [d], a), scale: rnd(r, [d], a) }, attrs: {} }));
  },
  gated_residual(r, m) {
    if (m === 'bf16') return [];
    const a = act(m);
    const cases: Array<[Shape, number]> = m === 'f32' ? [[[65, 33], 33], [[2, 7, 64], 64], [[1, 1], 1], [[0, 8], 8]] : [[[2, 7, 64], 64], [[5, 33], 33]];
    return cases.map(([xs, d]) => ({ what: `x [${xs}] gate [${d}]`, inputs: { x: rnd(r, xs, a), r: rnd(r, xs, a), gate: rnd(r, [d], a) }, attrs: {} }));
  },
  layer_norm(r, m) {
    const a = act(m);
    const w = m === 'bf16' ? 'bf16' : 'f32';
    const out: Sample[] = [
      { what: 'x [33, 65] weight + bias', inputs: { x: rnd(r, [33, 65], a, 2, 1), weight: rnd(r, [65], w), bias: rnd(r, [65], w) }, attrs: { eps: 1e-6 }, k: 65 },
      { what: 'x [5, 33] shift/scale [33]', inputs: { x: rnd(r, [5, 33], a), shift: rnd(r, [33], a), scale: rnd(r, [33], a) }, attrs: { eps: 1e-6 }, k: 33 },
    ];
    if (m === 'f32') out.push({ what: 'x [1, 1]', inputs: { x: rnd(r, [1, 1]) }, attrs: { eps: 1e-6 } }, { what: 'x [0, 8]', inputs: { x: rnd(r, [0, 8]) }, attrs: { eps: 1e-6 } });
    return out;
  },
  rms_norm(r, m) {
    const a = act(m);
    const w = m === 'bf16' ? 'bf16' : 'f32';
    const out: Sample[] = [{ what: 'x [33, 65]', inputs: { x: rnd(r, [33, 65], a), weight: rnd(r, [65], w) }, attrs: { eps: 1e-6 }, k: 65 }];
    if (m === 'f32') out.push({ what: 'x [1, 33]', inputs: { x: rnd(r, [1, 33]), weight: rnd(r, [33], w) }, attrs: { eps: 1e-6 }, k: 33 }, { what: 'x [0, 4]', inputs: { x: rnd(r, [0, 4]), weight: rnd(r, [4]) }, attrs: { eps: 1e-6 } });
    return out;
  },
  channel_l2_norm(r, m) {
    const a = act(m);
    const g = m === 'bf16' ? 'bf16' : 'f32';
    const out: Sample[] = [{ what: 'x [2, 33, 5] gamma [33]', inputs: { x: rnd(r, [2, 33, 5], a), gamma: rnd(r, [33], g) }, attrs: {}, k: 33 }];
    if (m === 'f32') {
      out.push(
        { what: 'x [1, 3, 2, 5, 7] gamma [3, 1, 1, 1]', inputs: { x: rnd(r, [1, 3, 2, 5, 7]), gamma: rnd(r, [3, 1, 1, 1]) }, attrs: {}, k: 3 },
        { what: 'x [1, 65, 1] gamma [65, 1, 1]', inputs: { x: rnd(r, [1, 65, 1]), gamma: rnd(r, [65, 1, 1]) }, attrs: {}, k: 65 },
      );
    }
    return out;
  },
  softmax(r, m) {
    if (m === 'bf16') return [];
    const a = act(m);
    const shapes: Shape[] = m === 'f32' ? [[1, 1], [33, 65], [3, 2, 33], [2100, 3], [0, 5]] : [[33, 65]];
    return shapes.map((s) => ({ what: `[${s}]`, inputs: { x: rnd(r, s, a, 3) }, attrs: {}, k: s[s.length - 1] }));
  },
  rope(r, m) {
    if (m === 'bf16') return [];
    const a = act(m);
    const shapes: Array<[number, number, number, number]> = m === 'f32' ? [[1, 33, 3, 10], [2, 5, 1, 2], [0, 3, 1, 4]] : [[1, 33, 3, 10]];
    return shapes.map(([B, L, H, Dh]) => {
      const ang = rnd(r, [L, Dh / 2], 'f32', 3).hostValues();
      const cos = Tensor.fromValues(Array.from(ang, Math.cos), [L, Dh / 2], 'f32');
      const sin = Tensor.fromValues(Array.from(ang, Math.sin), [L, Dh / 2], 'f32');
      return { what: `x [${[B, L, H, Dh]}]`, inputs: { x: rnd(r, [B, L, H, Dh], a), cos, sin }, attrs: undefined };
    });
  },
  embedding(r, m) {
    const ids = (shape: Shape, V: number) => Tensor.fromValues(Array.from({ length: numelOf(shape) }, () => Math.floor(r.next() * V)), shape, 'i32');
    if (m !== 'f32') return [{ what: `${m} table [65, 33]`, inputs: { ids: ids([33], 65), table: rnd(r, [65, 33], wdt(m)) }, attrs: m === 'f16' ? { out: 'f16' } : undefined }];
    return [
      { what: 'ids [33] table [65, 33]', inputs: { ids: ids([33], 65), table: rnd(r, [65, 33]) }, attrs: undefined },
      { what: 'ids [2, 5] table [1, 7]', inputs: { ids: ids([2, 5], 1), table: rnd(r, [1, 7]) }, attrs: undefined },
      { what: 'ids [0] table [3, 4]', inputs: { ids: ids([0], 3), table: rnd(r, [3, 4]) }, attrs: undefined },
    ];
  },
  upsample_nearest2x(r, m) {
    if (m === 'bf16') return [];
    const shapes: Shape[] = m === 'f32' ? [[1, 3, 5, 7], [33, 1], [2, 1, 3, 65], [0, 2, 2]] : [[2, 3, 5, 7]];
    return shapes.map((s) => ({ what: `[${s}]`, inputs: { x: rnd(r, s, act(m)) }, attrs: {} }));
  },
  permute(r, m) {
    if (m === 'bf16') return [];
    const cases: Array<[Shape, number[]]> =
      m === 'f32'
        ? [
            [[3, 33, 5], [2, 0, 1]],
            [[1, 65], [1, 0]],
            [[2, 3, 1, 5, 1, 7], [5, 4, 3, 2, 1, 0]],
            [[0, 3], [1, 0]],
          ]
        : [
            [[3, 33, 5], [1, 0, 2]],
            [[5, 7], [1, 0]],
          ];
    return cases.map(([s, dims]) => ({ what: `[${s}] dims [${dims}]`, inputs: { x: rnd(r, s, act(m)) }, attrs: { dims } }));
  },
  slice(r, m) {
    if (m === 'bf16') return [];
    const cases: Array<[Shape, number, number, number]> =
      m === 'f32'
        ? [
            [[5, 33, 3], 1, 7, 30],
            [[65], 0, 0, 65],
            [[4, 9], -1, 1, 8],
            [[5, 3], 0, 2, 2],
          ]
        : [
            [[5, 33, 3], 2, 1, 2],
            [[7, 9], 0, 1, 6],
          ];
    return cases.map(([s, dim, start, end]) => ({ what: `[${s}] dim ${dim} [${start}, ${end})`, inputs: { x: rnd(r, s, act(m)) }, attrs: { dim, start, end } }));
  },
  concat(r, m) {
    if (m === 'bf16') return [];
    const a = act(m);
    const out: Sample[] = [{ what: '[2, 3, 5] [2, 1, 5] [2, 33, 5] dim 1', inputs: { x0: rnd(r, [2, 3, 5], a), x1: rnd(r, [2, 1, 5], a), x2: rnd(r, [2, 33, 5], a) }, attrs: { dim: 1 } }];
    if (m === 'f32') out.push({ what: '[1] [65] [0] dim 0', inputs: { x0: rnd(r, [1]), x1: rnd(r, [65]), x2: rnd(r, [0]) }, attrs: { dim: 0 } });
    return out;
  },
  // f16 mode: f16 operands, f32 output. An f16 output is one more 64-KiB-uniform GEMM pipeline,
  // ~30 s of lavapipe compile time; test/matmul.test.ts covers it.
  linear(r, m) {
    const a = act(m);
    const w = m === 'f32' ? 'f32' : wdt(m);
    const out: Sample[] = [
      { what: `x [33, 65] w [17, 65] ${w} + bias`, inputs: { x: rnd(r, [33, 65], a), w: wt(r, [17, 65], w), bias: rnd(r, [17], w) }, attrs: { out: 'f32' }, k: 65 },
      { what: `x [2, 5, 33] w [65, 33] ${w} gelu`, inputs: { x: rnd(r, [2, 5, 33], a), w: wt(r, [65, 33], w) }, attrs: { act: 'gelu', out: 'f32' }, k: 33 },
    ];
    if (m === 'f32') {
      out.push(
        { what: 'x [1, 1] w [1, 1] silu + bias', inputs: { x: rnd(r, [1, 1]), w: wt(r, [1, 1], 'f32'), bias: rnd(r, [1]) }, attrs: { act: 'silu' }, k: 1 },
        { what: 'x [0, 33] w [4, 33]', inputs: { x: rnd(r, [0, 33]), w: wt(r, [4, 33], 'f32') }, attrs: {}, k: 33 },
      );
    }
    return out;
  },
  matmul(r, m) {
    if (m === 'bf16') return [];
    const a = act(m);
    const out: Sample[] = [{ what: 'a [33, 65] b [65, 17]', inputs: { a: rnd(r, [33, 65], a), b: wt(r, [65, 17], a) }, attrs: { out: 'f32' }, k: 65 }];
    if (m === 'f32') {
      out.push(
        { what: 'a [2, 5, 33] b [2, 33, 7]', inputs: { a: rnd(r, [2, 5, 33]), b: rnd(r, [2, 33, 7], 'f32', 0.2) }, attrs: {}, k: 33 },
        { what: 'transB a [3, 9, 33] b [3, 17, 33]', inputs: { a: rnd(r, [3, 9, 33]), b: rnd(r, [3, 17, 33], 'f32', 0.2) }, attrs: { transB: true }, k: 33 },
      );
    }
    return out;
  },
  attention(r, m) {
    if (m === 'bf16') return [];
    const a = act(m);
    const qkv = (B: number, Lq: number, Lk: number, H: number, Dh: number) => ({ q: rnd(r, [B, Lq, H, Dh], a), k: rnd(r, [B, Lk, H, Dh], a), v: rnd(r, [B, Lk, H, Dh], a) });
    const mask = (B: number, Lk: number) => Tensor.fromValues(Array.from({ length: B * Lk }, (_, i) => (i % Lk === 0 || r.next() < 0.7 ? 1 : 0)), [B, Lk], 'i32');
    const out: Sample[] = [{ what: 'B1 Lq33 Lk65 H2 Dh16', inputs: qkv(1, 33, 65, 2, 16), attrs: { scale: 0.25 } }];
    if (m === 'f32') {
      out.push(
        { what: 'B2 Lq9 Lk5 H3 Dh7 relative bias + mask', inputs: { ...qkv(2, 9, 5, 3, 7), bias: rnd(r, [3, 13]), keyMask: mask(2, 5) }, attrs: { scale: 1 / Math.sqrt(7), biasMode: 'relative' } },
        { what: 'B1 Lq1 Lk33 H2 Dh8 full bias', inputs: { ...qkv(1, 1, 33, 2, 8), bias: rnd(r, [2, 1, 33]) }, attrs: { scale: 1 / Math.sqrt(8) } },
      );
    }
    return out;
  },
  conv3d(r, m) {
    const a = act(m);
    const w = m === 'f32' ? 'f32' : wdt(m);
    const out: Sample[] = [
      { what: `causal 3x3x3 x [1, 3, 3, 5, 7] w ${w} + bias`, inputs: { x: rnd(r, [1, 3, 3, 5, 7], a), w: wt(r, [4, 3, 3, 3, 3], w), b: rnd(r, [4], w) }, attrs: { padding: [2, 0, 1, 1] }, k: 81 },
      { what: `1x1x1 x [1, 33, 2, 3, 5] w ${w}`, inputs: { x: rnd(r, [1, 33, 2, 3, 5], a), w: wt(r, [5, 33, 1, 1, 1], w) }, attrs: { padding: [0, 0, 0, 0] }, k: 33 },
    ];
    if (m === 'f32') {
      out.push({ what: 'stride [1, 2, 2] 1x3x3 x [2, 2, 1, 9, 9]', inputs: { x: rnd(r, [2, 2, 1, 9, 9]), w: wt(r, [3, 2, 1, 3, 3], 'f32') }, attrs: { padding: [0, 0, 1, 1], stride: [1, 2, 2] }, k: 18 });
    }
    return out;
  },
  conv2d(r, m) {
    const a = act(m);
    const w = m === 'f32' ? 'f32' : wdt(m);
    const out: Sample[] = [{ what: `3x3 x [1, 3, 9, 11] w ${w} + bias`, inputs: { x: rnd(r, [1, 3, 9, 11], a), w: wt(r, [4, 3, 3, 3], w), b: rnd(r, [4], w) }, attrs: { padding: [1, 1] }, k: 27 }];
    if (m === 'f32') out.push({ what: '1x1 stride 2 x [2, 5, 5, 4]', inputs: { x: rnd(r, [2, 5, 5, 4]), w: wt(r, [3, 5, 1, 1], 'f32') }, attrs: { padding: [0, 0], stride: [2, 2] }, k: 5 });
    return out;
  },
};

/** A fixed seed per (op, dtype): FNV-1a of the label. */
function seedOf(label: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < label.length; i++) h = Math.imul(h ^ label.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

// the registry's families, each with its ops (describe blocks follow kernels/<family>.wgsl)
const families = new Map<string, string[]>();
for (const { def } of opRegistry.values()) families.set(def.family, [...(families.get(def.family) ?? []), def.name]);

it('every registered op has samples (add them to SAMPLES when registering an op)', () => {
  const missing = [...opRegistry.keys()].filter((n) => !SAMPLES[n]);
  expect(missing, `ops without samples: ${missing.join(', ')}`).toEqual([]);
  expect(Object.keys(SAMPLES).filter((n) => !opRegistry.has(n))).toEqual([]);
});

for (const [family, ops] of families) {
  describe(family, () => {
    for (const name of ops) {
      const gen = SAMPLES[name];
      if (!gen) continue; // failed above
      for (const mode of MODES) {
        // seeded CPU inputs (cheap to build here; a dtype without samples gets no test)
        const samples = gen(new Rng(seedOf(`${name} ${mode}`)), mode);
        if (samples.length === 0) continue;
        it(`${name} ${mode}: ${samples.length} shape${samples.length === 1 ? '' : 's'}`, async ({ skip }) => {
          const e = await engine();
          if (mode === 'f16' && !e.caps.shaderF16) skip('no shader-f16');
          const op = opRegistry.get(name)!;
          for (const s of samples) {
            // the op runs on the device of its inputs: CPU tensors give the reference
            const run = (inputs: Record<string, Tensor | undefined>): Tensor => op(inputs, s.attrs);
            const ref = run(s.inputs);
            const gpuIn = Object.fromEntries(Object.entries(s.inputs).map(([k, t]) => [k, t?.toGpu(e)]));
            const out = run(gpuIn);
            const what = `${name} ${mode} ${s.what}`;
            expect(out.shape, what).toEqual(ref.shape);
            expect(out.dtype, what).toBe(ref.dtype);
            const f = Math.sqrt(Math.max(1, s.k ?? 1));
            const tol = { atol: TOL[mode].atol * f, rtol: TOL[mode].rtol * f };
            expectClose(await out.toArray(), ref.hostValues(), tol, what);
            out.dispose();
            for (const t of Object.values(gpuIn)) t?.dispose();
          }
        });
      }
    }
  });
}
