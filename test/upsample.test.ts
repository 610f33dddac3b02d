import { describe, it, expect } from 'vitest';
import { getEngine as sharedEngine, randTensor, expectClose, Rng } from './helpers/gpu.ts';
import { upsampleNearest2x } from '../src/ops/upsample.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import type { DType } from '../src/tensor/dtype.ts';

const getEngine = () => sharedEngine({ waitMode: 'await' });
const rng = new Rng(77);

/** Direct definition: y[..., i, j] = x[..., floor(i / 2), floor(j / 2)]. */
function naive(x: Tensor): Float32Array {
  const s = x.shape;
  const H = s[s.length - 2]!;
  const W = s[s.length - 1]!;
  const planes = H * W === 0 ? 0 : x.numel / (H * W);
  const v = x.hostValues();
  const out = new Float32Array(planes * 4 * H * W);
  let o = 0;
  for (let p = 0; p < planes; p++) for (let i = 0; i < 2 * H; i++) for (let j = 0; j < 2 * W; j++) out[o++] = v[p * H * W + Math.floor(i / 2) * W + Math.floor(j / 2)]!;
  return out;
}

async function check(shape: number[], dt: DType = 'f32', maxBindingBytes?: number): Promise<number> {
  const e = await getEngine();
  const x = randTensor(rng, shape, dt);
  const ref = upsampleNearest2x(x);
  const want = [...shape.slice(0, -2), 2 * shape[shape.length - 2]!, 2 * shape[shape.length - 1]!];
  expect(ref.shape).toEqual(want);
  expectClose(ref.hostValues(), naive(x), { atol: 0, rtol: 0 }, 'cpu reference');
  const xg = x.toGpu(e);
  const before = e.dispatchCount;
  const y = upsampleNearest2x(xg, { maxBindingBytes });
  const n = e.dispatchCount - before;
  expect(y.shape).toEqual(want);
  expect(y.dtype).toBe(dt);
  expectClose(await y.toArray(), ref.hostValues(), { atol: 0, rtol: 0 }, `upsample ${JSON.stringify(shape)}`);
  y.dispose();
  xg.dispose();
  return n;
}

describe('upsample_nearest2x', () => {
  for (const shape of [[1, 1], [3, 17], [2, 3, 33, 1], [1, 16, 17, 33], [4, 3, 1, 1025], [2, 5, 3, 65, 7], [0, 3, 5, 5], [2, 0, 4]]) {
    it(`x ${JSON.stringify(shape)}`, async () => {
      await check(shape);
    });
  }
  it('many elements (folded 1-D grid)', async () => {
    await check([3, 300, 301]);
  });
  it('f16 activations', async () => {
    const e = await getEngine();
    if (!e.caps.shaderF16) return; // adapter without shader-f16: f16 activations are not offered
    await check([2, 3, 17, 33], 'f16');
  });
  it('split over planes when a binding is small', async () => {
    expect(await check([7, 5, 9, 11], 'f32', 4096)).toBeGreaterThan(1);
  });
  it('a plane larger than one binding is refused with a clear message', async () => {
    const e = await getEngine();
    const x = Tensor.cpuZeros([1, 40, 40]).toGpu(e);
    expect(() => upsampleNearest2x(x, { maxBindingBytes: 4096 })).toThrow(/\[upsample_nearest2x\] one output plane \(80x80/);
  });
  it('rank < 2 is refused', () => {
    expect(() => upsampleNearest2x(Tensor.cpuZeros([5]))).toThrow(/\[upsample_nearest2x\] x must have rank >= 2/);
  });
});
