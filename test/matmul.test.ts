import { describe, it, expect } from 'vitest';
import { getEngine, randTensor, expectClose, TOL, Rng } from './helpers/gpu.ts';
import { linear, matmul, linearOp, type Act, type MatmulVariant } from '../src/ops/matmul.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import type { DType } from '../src/tensor/dtype.ts';

// The wait predictor would learn lavapipe's first-dispatch shader compiles (seconds) as kernel time
// and over-sleep afterwards; tests wait on the GPU directly.
const engine = () => getEngine({ waitMode: 'await' });

/**
 * Tolerance for a K-long f32 dot product. Inputs are N(0,1) and weights N(0,1/K), so outputs and
 * partial sums are O(1) and the accumulated rounding error grows like sqrt(K) * eps (the GPU and
 * the CPU reference sum in different orders). TOL.f32 is scaled by sqrt(K); an f16 output adds
 * one f16 rounding (TOL.f16, not scaled).
 */
function tolFor(K: number, out: DType): { atol: number; rtol: number } {
  const s = Math.sqrt(Math.max(K, 1));
  const extra = out === 'f16' ? TOL.f16 : { atol: 0, rtol: 0 };
  return { atol: TOL.f32.atol * s + extra.atol, rtol: TOL.f32.rtol * s + extra.rtol };
}

function weight(rng: Rng, N: number, K: number, dt: DType): Tensor {
  return randTensor(rng, [N, K], dt, 1 / Math.sqrt(Math.max(K, 1)));
}

interface LinCase {
  xShape: number[];
  N: number;
  wdt: DType;
  bias?: DType;
  act?: Act;
  xdt?: DType;
  out?: DType;
  variant?: MatmulVariant;
  maxBindingBytes?: number;
  packBudgetBytes?: number;
}

async function checkLinear(rng: Rng, c: LinCase): Promise<{ dispatches: number }> {
  const e = await engine();
  const K = c.xShape[c.xShape.length - 1]!;
  const x = randTensor(rng, c.xShape, c.xdt ?? 'f32');
  const w = weight(rng, c.N, K, c.wdt);
  const b = c.bias ? randTensor(rng, [c.N], c.bias) : undefined;
  const knobs = { variant: c.variant, maxBindingBytes: c.maxBindingBytes, packBudgetBytes: c.packBudgetBytes };
  const ref = linear(x, w, { bias: b, act: c.act, out: c.out });
  const xg = x.toGpu(e);
  const wg = w.toGpu(e);
  const bg = b?.toGpu(e);
  const d0 = e.dispatchCount;
  const y = linear(xg, wg, { bias: bg, act: c.act, out: c.out, ...knobs });
  const dispatches = e.dispatchCount - d0;
  expect(y.shape).toEqual(ref.shape);
  expect(y.dtype).toBe(ref.dtype);
  expectClose(await y.toArray(), ref.hostValues(), tolFor(K, ref.dtype), `linear ${JSON.stringify(c)}`);
  for (const t of [y, xg, wg, bg]) t?.dispose();
  return { dispatches };
}

describe('linear', () => {
  const rng = new Rng(7);
  // M x K x N mixes of 1, 33, 65, 1025 and sizes that are not multiples of any tile, through both
  // implementations ('ubo' is lavapipe's; 'tiled' is the portable one), every weight dtype, with
  // and without bias, every activation.
  const shapes: Array<[number, number, number]> = [
    [1, 1, 1],
    [1, 65, 33],
    [33, 65, 1],
    [33, 1025, 65],
    [65, 33, 1025],
    [1025, 65, 33],
    [65, 1025, 130],
    [200, 300, 270],
  ];
  const wdts: DType[] = ['f32', 'f16', 'bf16'];
  const acts: Act[] = ['none', 'gelu', 'silu'];
  let i = 0;
  for (const variant of ['tiled', 'ubo'] as const) {
    for (const [M, K, N] of shapes) {
      const wdt = wdts[i % 3]!;
      const act = acts[Math.floor(i / 3) % 3]!;
      const bias = i % 2 === 0 ? (wdts[(i >> 1) % 3] as DType) : undefined;
      i++;
      it(`${variant} M${M} K${K} N${N} w ${wdt} bias ${bias ?? '-'} act ${act}`, async () => {
        await checkLinear(rng, { xShape: [M, K], N, wdt, bias, act, variant });
      });
    }
    for (const wdt of wdts) {
      for (const act of acts) {
        it(`${variant} every dtype x act: w ${wdt} act ${act} with bias`, async () => {
          await checkLinear(rng, { xShape: [70, 520], N: 300, wdt, bias: 'f32', act, variant });
        });
      }
    }
  }

  it('auto picks a working variant for small and large M; leading dims are kept', async () => {
    await checkLinear(rng, { xShape: [2, 3, 17], N: 40, wdt: 'bf16', bias: 'bf16', act: 'gelu' });
    await checkLinear(rng, { xShape: [2, 48, 64], N: 300, wdt: 'bf16', act: 'silu' });
  });

  it('zero-size M gives an empty output; K = 0 gives act(bias)', async () => {
    const e = await engine();
    for (const variant of ['auto', 'tiled'] as const) {
      const w = weight(rng, 5, 7, 'bf16').toGpu(e);
      const y = linear(e.zeros([0, 7]), w, { variant });
      expect(y.shape).toEqual([0, 5]);
      expect((await y.toArray()).length).toBe(0);
      const b = randTensor(rng, [5], 'f32');
      const xk = Tensor.cpuZeros([3, 0]);
      const ref = linear(xk, Tensor.cpuZeros([5, 0], 'bf16'), { bias: b, act: 'gelu' });
      const yk = linear(e.zeros([3, 0]), e.zeros([5, 0], 'bf16'), { bias: b.toGpu(e), act: 'gelu', variant });
      expect(yk.shape).toEqual([3, 5]);
      expectClose(await yk.toArray(), ref.hostValues(), TOL.f32, 'K = 0');
      const none = linear(e.zeros([3, 0]), e.zeros([5, 0], 'f32'), { variant });
      expect(Array.from(await none.toArray())).toEqual(new Array(15).fill(0));
      const n0 = linear(e.zeros([3, 7]), e.zeros([0, 7]), { variant });
      expect(n0.shape).toEqual([3, 0]);
    }
  });

  it('f16 activations and f16 output', async () => {
    const e = await engine();
    if (!e.caps.shaderF16) return; // adapter without shader-f16: f16 tensors are rejected (tested below)
    for (const variant of ['tiled', 'ubo'] as const) {
      // K <= 256: one K chunk (f16 stored directly); K > 256: f32 accumulator + cast
      await checkLinear(rng, { xShape: [40, 200], N: 70, wdt: 'f16', xdt: 'f16', bias: 'f16', act: 'gelu', variant });
      await checkLinear(rng, { xShape: [40, 600], N: 70, wdt: 'bf16', xdt: 'f16', variant });
      await checkLinear(rng, { xShape: [40, 600], N: 70, wdt: 'f32', xdt: 'f32', out: 'f16', bias: 'f32', variant });
      await checkLinear(rng, { xShape: [40, 600], N: 70, wdt: 'bf16', xdt: 'f16', out: 'f32', variant });
    }
  });

  it('split path: operands and outputs larger than the binding limit (simulated small limit)', async () => {
    // tiled: a 4 KiB limit splits M, N and the output into many windows
    let r = await checkLinear(rng, { xShape: [300, 70], N: 90, wdt: 'bf16', bias: 'f16', act: 'silu', variant: 'tiled', maxBindingBytes: 4096 });
    expect(r.dispatches).toBeGreaterThan(20);
    r = await checkLinear(rng, { xShape: [3, 500], N: 77, wdt: 'f32', variant: 'tiled', maxBindingBytes: 2048 });
    expect(r.dispatches).toBeGreaterThan(10);
    // ubo: a 320 KiB limit and 256 KiB packing buffers: M and N chunks, several pack dispatches
    // per operand, output windows of two row blocks
    r = await checkLinear(rng, { xShape: [300, 700], N: 600, wdt: 'bf16', bias: 'f32', act: 'gelu', variant: 'ubo', maxBindingBytes: 320 * 1024, packBudgetBytes: 256 * 1024 });
    expect(r.dispatches).toBeGreaterThan(30);
    r = await checkLinear(rng, { xShape: [130, 520], N: 200, wdt: 'f32', variant: 'ubo', maxBindingBytes: 200 * 1024, packBudgetBytes: 192 * 1024 });
    expect(r.dispatches).toBeGreaterThan(10);
  });

  it('a weight above the real 128 MiB binding limit (bf16 [16400, 4096], 134 MB)', async () => {
    const e = await engine();
    const N = 16400;
    const K = 4096;
    expect(N * K * 2).toBeGreaterThan(e.caps.maxBinding);
    // deterministic cheap values (random fills of 67M values would dominate the test time)
    const bits = new Uint16Array(N * K);
    const f = new Float32Array(1);
    const u = new Uint32Array(f.buffer);
    for (let n = 0; n < N; n++) {
      for (let k = 0; k < K; k++) {
        f[0] = (((n * 7 + k * 13) % 61) - 30) / 512;
        bits[n * K + k] = u[0]! >>> 16;
      }
    }
    const wg = e.fromHost(bits, [N, K], 'bf16');
    // columns checked against the CPU reference (a full reference would take tens of seconds)
    const cols = [0, 1, 8191, 8192, 12345, N - 1];
    const wSub = new Uint16Array(cols.length * K);
    cols.forEach((n, i) => wSub.set(bits.subarray(n * K, n * K + K), i * K));
    const wRef = Tensor.cpu(wSub, [cols.length, K], 'bf16');
    for (const [M, variant] of [[3, 'tiled'], [40, 'ubo']] as const) {
      const x = randTensor(rng, [M, K], 'f32');
      const ref = linearOp.def.cpu({ x, w: wRef }, {}).hostValues();
      const xg = x.toGpu(e);
      const y = linear(xg, wg, { variant });
      const got = await y.toArray();
      const want = new Float32Array(M * cols.length);
      const have = new Float32Array(M * cols.length);
      for (let m = 0; m < M; m++) {
        cols.forEach((n, i) => {
          want[m * cols.length + i] = ref[m * cols.length + i]!;
          have[m * cols.length + i] = got[m * N + n]!;
        });
      }
      // weights here are O(0.06) rather than N(0,1/K): outputs ~ 2 instead of 1
      expectClose(have, want, { atol: 2 * tolFor(K, 'f32').atol, rtol: tolFor(K, 'f32').rtol }, `128 MiB weight ${variant}`);
      y.dispose();
      xg.dispose();
    }
    wg.dispose();
  });

  it('rejects mismatched shapes with [linear] messages naming the shapes', () => {
    const x = Tensor.cpuZeros([4, 5]);
    expect(() => linear(x, Tensor.cpuZeros([3, 6]))).toThrow(/\[linear\] x \[4, 5\] has 5 input features but weight \[3, 6\] expects 6/);
    expect(() => linear(x, Tensor.cpuZeros([3, 5, 1]))).toThrow(/\[linear\] weight must be \[N, K\]/);
    expect(() => linear(x, Tensor.cpuZeros([3, 5]), { bias: Tensor.cpuZeros([4]) })).toThrow(/\[linear\] bias \[4\] must be \[3\]/);
    expect(() => linear(Tensor.cpuZeros([4, 5], 'i32'), Tensor.cpuZeros([3, 5]))).toThrow(/\[linear\] x must be f32\/f16, got i32/);
    expect(() => linear(x, Tensor.cpuZeros([3, 5]), { act: 'relu' as Act })).toThrow(/\[linear\] unknown act 'relu'/);
  });
});

describe('matmul', () => {
  const rng = new Rng(11);
  async function checkMatmul(aShape: number[], bShape: number[], opts: { transB?: boolean; variant?: MatmulVariant; dt?: DType; out?: DType; maxBindingBytes?: number } = {}) {
    const e = await engine();
    const dt = opts.dt ?? 'f32';
    const K = aShape[aShape.length - 1]!;
    const a = randTensor(rng, aShape, dt);
    const b = randTensor(rng, bShape, dt, 1 / Math.sqrt(Math.max(K, 1)));
    const ref = matmul(a, b, { transB: opts.transB, out: opts.out });
    const ag = a.toGpu(e);
    const bg = b.toGpu(e);
    const y = matmul(ag, bg, { transB: opts.transB, out: opts.out, variant: opts.variant, maxBindingBytes: opts.maxBindingBytes });
    expect(y.shape).toEqual(ref.shape);
    expectClose(await y.toArray(), ref.hostValues(), tolFor(K, ref.dtype), `matmul ${JSON.stringify([aShape, bShape, opts])}`);
    for (const t of [y, ag, bg]) t.dispose();
  }
  for (const variant of ['tiled', 'ubo'] as const) {
    it(`${variant}: batched, with and without transB, broadcast of a 2-D operand`, async () => {
      await checkMatmul([3, 33, 65], [3, 65, 47], { variant });
      await checkMatmul([3, 33, 65], [3, 47, 65], { variant, transB: true });
      await checkMatmul([2, 70, 300], [300, 33], { variant });
      await checkMatmul([65, 33], [4, 33, 1], { variant });
      await checkMatmul([1, 1025], [1025, 65], { variant: variant === 'ubo' ? 'auto' : variant });
    });
  }
  it('f16 operands', async () => {
    const e = await engine();
    if (!e.caps.shaderF16) return;
    await checkMatmul([2, 40, 300], [2, 300, 50], { dt: 'f16', variant: 'tiled' });
    await checkMatmul([2, 40, 300], [2, 50, 300], { dt: 'f16', transB: true, variant: 'ubo', out: 'f32' });
  });
  it('split path: a right operand [K, N] above the binding limit is split along K', async () => {
    await checkMatmul([40, 300], [300, 50], { variant: 'tiled', maxBindingBytes: 8192 });
    await checkMatmul([2, 40, 600], [2, 600, 130], { variant: 'ubo', maxBindingBytes: 200 * 1024 });
  });
  it('rejects mismatched K with a [matmul] message naming the shapes', () => {
    expect(() => matmul(Tensor.cpuZeros([2, 3, 4]), Tensor.cpuZeros([2, 5, 6]))).toThrow(/\[matmul\] a \[2, 3, 4\] has K=4 but b \[B\?, K, N\] \[2, 5, 6\] has K=5/);
    expect(() => matmul(Tensor.cpuZeros([2, 3, 4]), Tensor.cpuZeros([3, 4, 6]))).toThrow(/\[matmul\] batch sizes differ/);
  });
});
