import { describe, it, expect } from 'vitest';
import { getEngine as getSharedEngine, randTensor, Rng } from './helpers/gpu.ts';
import { permute, permuteOp, transpose, slice, sliceOp, sliceInto, concat, stridesOf } from '../src/ops/layout.ts';
import { Tensor, numelOf } from '../src/tensor/tensor.ts';
import type { DType } from '../src/tensor/dtype.ts';

// 'await' waits: lavapipe JIT-compiles each new pipeline at its first dispatch (0.5-7 s here),
// which would otherwise teach the engine's wait predictor absurd sleeps for the next tiny submits.
const getEngine = () => getSharedEngine({ waitMode: 'await' });

// Layout ops copy bits: GPU and CPU must agree exactly, for every dtype.

function randAny(rng: Rng, shape: number[], dtype: DType): Tensor {
  if (dtype === 'i32') return Tensor.cpu(Int32Array.from({ length: numelOf(shape) }, () => rng.int(2000) - 1000), shape, 'i32');
  return randTensor(rng, shape, dtype);
}

function rawOf(t: Tensor): ArrayLike<number> {
  return t.data!;
}

async function sameBits(gpuOut: Tensor, cpuOut: Tensor, what: string): Promise<void> {
  expect(gpuOut.shape, what).toEqual(cpuOut.shape);
  expect(gpuOut.dtype, what).toBe(cpuOut.dtype);
  const g = await gpuOut.toCpu();
  const a = rawOf(g);
  const b = rawOf(cpuOut);
  expect(a.length, what).toBe(b.length);
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i] && !(Number.isNaN(a[i]) && Number.isNaN(b[i]))) throw new Error(`${what}: element ${i} is ${a[i]}, want ${b[i]}`);
  }
}

/** Independent reference for permute: explicit multi-index arithmetic. */
function naivePermute(x: Tensor, dims: number[]): number[] {
  const xs = stridesOf(x.shape);
  const shape = dims.map((d) => x.shape[d]!);
  const n = numelOf(shape);
  const out: number[] = [];
  const data = x.data!;
  for (let i = 0; i < n; i++) {
    let rem = i;
    let src = 0;
    for (let k = shape.length - 1; k >= 0; k--) {
      const c = rem % shape[k]!;
      rem = Math.floor(rem / shape[k]!);
      src += c * xs[dims[k]!]!;
    }
    out.push(data[src]!);
  }
  return out;
}

function shuffle(rng: Rng, n: number): number[] {
  const a = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

describe('layout: permute', () => {
  const rng = new Rng(7);
  const shapes: number[][] = [
    [1, 1],
    [33, 65],
    [65, 1025],
    [3, 5, 7],
    [2, 33, 4],
    [4, 1, 6, 5],
    [2, 3, 5, 7, 3],
    [2, 3, 2, 5, 2, 3],
  ];
  for (const dtype of ['f32', 'f16', 'bf16', 'i32'] as DType[]) {
    for (const shape of shapes) {
      it(`${dtype} ${JSON.stringify(shape)} random permutations`, async () => {
        const e = await getEngine();
        const x = randAny(rng, shape, dtype);
        const xg = x.toGpu(e);
        for (let t = 0; t < 3; t++) {
          const dims = shuffle(rng, shape.length);
          const ref = permute(x, dims);
          await sameBits(permute(xg, dims), ref, `permute ${dtype} ${JSON.stringify(shape)} ${JSON.stringify(dims)}`);
          if (t === 0) expect(Array.from(rawOf(ref))).toEqual(naivePermute(x, dims));
        }
        xg.dispose();
      });
    }
  }
  it('DiT patchify / unpatchify permutes ([C,F,H/2,2,W/2,2] style) and a head transpose', async () => {
    const e = await getEngine();
    const C = 16, F = 3, h = 5, w = 7, B = 1;
    const cases: Array<[number[], number[]]> = [
      [[C, F, h, 2, w, 2], [1, 2, 4, 0, 3, 5]], // [F, h, w, C, 2, 2]: tokens with (c, p, q) features
      [[B * C, F, h, 2, w, 2], [0, 1, 2, 4, 3, 5]], // the model's patchify step 1
      [[B, C, F * h * w, 4], [0, 2, 1, 3]], // step 2
      [[B, F * h, w, 2, 2, C], [0, 5, 1, 3, 2, 4]], // unpatchify (p, q, c fastest) -> [B, C, f·h, 2, w, 2]
      [[45, 12, 128], [1, 0, 2]], // [L, H, Dh] -> [H, L, Dh]
      [[45, 12, 64], [1, 2, 0]],
    ];
    for (const [shape, dims] of cases) {
      for (const dtype of ['f32', 'f16'] as DType[]) {
        const x = randAny(rng, shape, dtype);
        const xg = x.toGpu(e);
        await sameBits(permute(xg, dims), permute(x, dims), `permute ${JSON.stringify(shape)} ${JSON.stringify(dims)}`);
        xg.dispose();
      }
    }
  });
  it('transpose with negative dims, zero-size and identity permutes', async () => {
    const e = await getEngine();
    const x = randTensor(rng, [4, 33, 5]);
    const xg = x.toGpu(e);
    await sameBits(transpose(xg, -1, 0), transpose(x, 2, 0), 'transpose');
    expect(transpose(x, -1, 0).shape).toEqual([5, 33, 4]);
    await sameBits(permute(xg, [0, 1, 2]), x, 'identity');
    const z = Tensor.cpuZeros([3, 0, 5]);
    const zg = z.toGpu(e);
    const p = permute(zg, [2, 1, 0]);
    expect(p.shape).toEqual([5, 0, 3]);
    expect((await p.toArray()).length).toBe(0);
    xg.dispose();
  });
  it('split path: a small binding limit gives identical results (f32, f16 odd, VAE-like 5-d)', async () => {
    const e = await getEngine();
    const cases: Array<[number[], number[], DType]> = [
      [[2, 12, 4, 10, 12], [0, 2, 1, 3, 4], 'f32'], // [B, C, T, H, W] -> [B, T, C, H, W]
      [[33, 65], [1, 0], 'f32'],
      [[7, 9, 11], [2, 0, 1], 'f16'],
      [[3, 5, 17], [1, 0, 2], 'bf16'],
      [[6, 8, 16], [1, 0, 2], 'f32'],
    ];
    for (const [shape, dims, dtype] of cases) {
      const x = randAny(rng, shape, dtype);
      const xg = x.toGpu(e);
      const before = e.dispatchCount;
      const y = permuteOp({ x: xg }, { dims, maxBindingBytes: 1024 });
      expect(e.dispatchCount - before, 'split into several dispatches').toBeGreaterThan(1);
      await sameBits(y, permute(x, dims), `split permute ${JSON.stringify(shape)} ${dtype}`);
      xg.dispose();
    }
  });
  it('errors name the op', () => {
    const x = Tensor.cpuZeros([2, 3]);
    expect(() => permute(x, [0, 0])).toThrow(/\[permute\] dims \[0,0\] is not a permutation/);
    expect(() => permute(x, [1])).toThrow(/\[permute\]/);
    expect(() => permute(Tensor.cpuZeros([1, 1, 1, 1, 1, 1, 1]), [0, 1, 2, 3, 4, 5, 6])).toThrow(/\[permute\] rank 7/);
    expect(() => transpose(x, 0, 2)).toThrow(/\[transpose\] dim 2 out of range/);
  });
});

describe('layout: slice and concat', () => {
  const rng = new Rng(11);
  for (const dtype of ['f32', 'f16', 'i32'] as DType[]) {
    for (const shape of [[33], [5, 65], [3, 7, 5], [2, 3, 5, 9]]) {
      it(`slice and concat ${dtype} ${JSON.stringify(shape)} on every dim`, async () => {
        const e = await getEngine();
        const x = randAny(rng, shape, dtype);
        const xg = x.toGpu(e);
        for (let d = 0; d < shape.length; d++) {
          const n = shape[d]!;
          for (const [s0, s1] of [[0, n], [1, n], [0, 1], [Math.floor(n / 3), Math.floor((2 * n) / 3) + 1], [n, n]]) {
            await sameBits(slice(xg, d, s0!, s1!), slice(x, d, s0!, s1!), `slice ${dtype} dim ${d} [${s0}, ${s1})`);
          }
          // concat three parts of different lengths along d (one of them possibly empty)
          const a = randAny(rng, shape.map((s, k) => (k === d ? 1 : s)), dtype);
          const b = randAny(rng, shape.map((s, k) => (k === d ? 3 : s)), dtype);
          const ag = a.toGpu(e);
          const bg = b.toGpu(e);
          await sameBits(concat([ag, xg, bg], d), concat([a, x, b], d), `concat ${dtype} dim ${d}`);
          await sameBits(concat([xg, ag], d - shape.length), concat([x, a], d), `concat ${dtype} dim ${d - shape.length}`);
          ag.dispose();
          bg.dispose();
        }
        xg.dispose();
      });
    }
  }
  it('sliceInto writes the slice into a region of a larger tensor (strided destination), the rest untouched', async () => {
    const e = await getEngine();
    const r = new Rng(17);
    for (const dtype of ['f32', 'f16'] as DType[]) {
      // [B, Lr, H, Dh] rows of heads [h0, h1) into rows [r0, r0 + Lr) of [B, L, Hs, Dh] (the exchange's own part)
      for (const [B, Lr, H, Dh, h0, h1, L, r0] of [
        [2, 5, 3, 4, 1, 3, 11, 4],
        [1, 7, 2, 6, 0, 1, 7, 0],
        [3, 3, 5, 3, 2, 5, 9, 6],
      ] as const) {
        const x = randAny(r, [B, Lr, H, Dh], dtype);
        const Hs = h1 - h0;
        const base = randAny(r, [B, L, Hs, Dh], dtype);
        const xg = x.toGpu(e);
        const dg = base.toGpu(e);
        sliceInto(xg, 2, h0, h1, dg, r0 * Hs * Dh, [L * Hs * Dh, Hs * Dh, Dh, 1]);
        const got = Array.from(rawOf(await dg.toCpu()));
        const want = Array.from(rawOf(base));
        const sl = rawOf(slice(x, 2, h0, h1));
        for (let b = 0; b < B; b++) for (let i = 0; i < Lr * Hs * Dh; i++) want[(b * L + r0) * Hs * Dh + i] = sl[b * Lr * Hs * Dh + i]!;
        expect(got, `${dtype} ${[B, Lr, H, Dh, h0, h1, L, r0]}`).toEqual(want);
        // contiguous destination (the default strides): the plain slice
        const d2 = e.empty([B, Lr, Hs, Dh], dtype);
        sliceInto(xg, 2, h0, h1, d2, 0);
        await sameBits(d2, slice(x, 2, h0, h1), `sliceInto ${dtype} contiguous`);
        for (const t of [xg, dg, d2]) t.dispose();
      }
    }
    const a = e.empty([2, 3], 'f32');
    const small = e.empty([2], 'f32');
    expect(() => sliceInto(a, 1, 0, 2, small, 0)).toThrow(/^\[slice\] sliceInto: the box \[2, 2\] at 0 does not fit/);
    expect(() => sliceInto(a, 1, 2, 4, small, 0)).toThrow(/^\[slice\] range \[2, 4\) is not inside/);
    expect(() => sliceInto(a, 1, 0, 1, e.empty([2], 'f16'), 0)).toThrow(/^\[slice\] sliceInto: the destination is f16, the source f32/);
    a.dispose();
    small.dispose();
  });

  it('concat of many tensors (grouped), with an empty one, and the CPU reference is right', async () => {
    const e = await getEngine();
    const parts = Array.from({ length: 11 }, (_, i) => randTensor(rng, [2, i % 3, 3]));
    const gp = parts.map((t) => t.toGpu(e));
    const ref = concat(parts, 1);
    const total = parts.reduce((s, p) => s + p.shape[1]!, 0);
    expect(ref.shape).toEqual([2, total, 3]);
    // independent check: row r of the result is the parts' rows laid side by side
    const v = ref.hostValues();
    let col = 0;
    for (const p of parts) {
      const pv = p.hostValues();
      const len = p.shape[1]!;
      for (let r = 0; r < 2; r++) for (let j = 0; j < len * 3; j++) expect(v[r * total * 3 + col * 3 + j]).toBe(pv[r * len * 3 + j]);
      col += len;
    }
    await sameBits(concat(gp, 1), ref, 'concat 11');
    for (const t of gp) t.dispose();
  });
  it('split path for slice and concat with a small binding limit', async () => {
    const e = await getEngine();
    for (const dtype of ['f32', 'f16'] as DType[]) {
      const x = randAny(rng, [3, 9, 13, 5], dtype);
      const xg = x.toGpu(e);
      const before = e.dispatchCount;
      const y = sliceOp({ x: xg }, { dim: 2, start: 3, end: 12, maxBindingBytes: 512 });
      expect(e.dispatchCount - before).toBeGreaterThan(1);
      await sameBits(y, slice(x, 2, 3, 12), `split slice ${dtype}`);
      const z = concat([xg, y], 2, { maxBindingBytes: 512 });
      await sameBits(z, concat([x, slice(x, 2, 3, 12)], 2), `split concat ${dtype}`);
      xg.dispose();
    }
  });
  it('errors name the op', () => {
    const x = Tensor.cpuZeros([2, 3]);
    expect(() => slice(x, 1, 2, 4)).toThrow(/\[slice\] range \[2, 4\) is not inside \[0, 3\]/);
    expect(() => slice(x, 2, 0, 1)).toThrow(/\[slice\] dim 2 out of range/);
    expect(() => concat([x, Tensor.cpuZeros([3, 3])], 1)).toThrow(/\[concat\] tensor 1 \[3, 3\] does not match/);
    expect(() => concat([x, Tensor.cpuZeros([2, 3], 'f16')], 0)).toThrow(/\[concat\] tensor 1 is f16/);
    expect(() => concat([], 0)).toThrow(/\[concat\] needs at least one tensor/);
  });
});
