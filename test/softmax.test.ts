import { describe, it, expect } from 'vitest';
import { getEngine, expectClose, TOL, Rng } from './helpers/gpu.ts';
import { softmax } from '../src/ops/softmax.ts';
import { Tensor, numelOf } from '../src/tensor/tensor.ts';
import type { DType } from '../src/tensor/dtype.ts';

const engine = () => getEngine({ waitMode: 'await' });

function rand(rng: Rng, shape: number[], std: number, dt: DType = 'f32'): Tensor {
  const v = new Float32Array(numelOf(shape));
  for (let i = 0; i < v.length; i++) v[i] = rng.normal() * std;
  return Tensor.fromValues(v, shape, dt);
}

async function check(x: Tensor, kernel: 'rows' | 'wide' | undefined, out: DType | undefined, what: string) {
  const e = await engine();
  const ref = softmax(x, { out });
  const y = softmax(x.toGpu(e), { kernel, out });
  expect(y.shape).toEqual(x.shape);
  expect(y.dtype).toBe(out ?? x.dtype);
  expectClose(await y.toArray(), ref.hostValues(), TOL[(out ?? x.dtype) as 'f32' | 'f16'], what);
  y.dispose();
}

describe('softmax', () => {
  const rng = new Rng(11);
  for (const [shape, kernel] of [
    [[1], undefined],
    [[5, 1], 'rows'],
    [[3, 33], 'rows'],
    [[3, 33], 'wide'],
    [[2, 7, 65], undefined],
    [[4, 1025], 'wide'],
    [[4, 1025], 'rows'],
    [[2, 70001], undefined],
    [[3000, 33], undefined], // many rows: an invocation per row
    [[0, 17], undefined],
    [[4, 0], undefined],
  ] as Array<[number[], 'rows' | 'wide' | undefined]>) {
    it(`[${shape.join(', ')}] ${kernel ?? 'auto'}`, async () => {
      await check(rand(rng, shape, 3), kernel, undefined, `softmax [${shape}]`);
    });
  }

  it('large magnitudes stay finite (max subtraction)', async () => {
    const x = Tensor.fromValues([1000, 1001, 999, -1000, 88, 89, 90, 91], [2, 4]);
    await check(x, 'rows', undefined, 'large rows');
    await check(x, 'wide', undefined, 'large wide');
    const e = await engine();
    const y = await softmax(x.toGpu(e)).toArray();
    expect(y[0]! + y[1]! + y[2]! + y[3]!).toBeCloseTo(1, 6);
  });

  it('-inf entries get 0, a row of all -inf gives zeros', async () => {
    const x = Tensor.fromValues([0, -Infinity, 1, -Infinity, -Infinity, -Infinity, -Infinity, -Infinity], [2, 4]);
    for (const k of ['rows', 'wide'] as const) {
      const e = await engine();
      const y = await softmax(x.toGpu(e), { kernel: k }).toArray();
      expect(y[1]).toBe(0);
      expect(y[0]! + y[2]!).toBeCloseTo(1, 6);
      expect(Array.from(y.slice(4))).toEqual([0, 0, 0, 0]);
    }
    expect(Array.from(softmax(x).hostValues().slice(4))).toEqual([0, 0, 0, 0]);
  });

  it('f16 in and out', async () => {
    const e = await engine();
    if (!e.caps.shaderF16) return; // adapter without shader-f16: f16 tensors are rejected
    await check(rand(rng, [7, 65], 2, 'f16'), 'rows', undefined, 'f16 rows');
    await check(rand(rng, [3, 1025], 2, 'f16'), 'wide', 'f32', 'f16 -> f32 wide');
    await check(rand(rng, [3, 33], 2, 'f32'), undefined, 'f16', 'f32 -> f16');
  });

  it('rejects scalars and integer tensors', () => {
    expect(() => softmax(Tensor.cpuZeros([]))).toThrow(/\[softmax\] x must have at least one dim/);
    expect(() => softmax(Tensor.cpuZeros([3], 'i32'))).toThrow(/\[softmax\] activations must be f32 or f16, got i32/);
  });
});
