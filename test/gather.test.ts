import { describe, it, expect } from 'vitest';
import { getEngine as getSharedEngine, randTensor, expectClose, TOL, Rng } from './helpers/gpu.ts';
import { embedding, embeddingOp } from '../src/ops/gather.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import type { DType } from '../src/tensor/dtype.ts';

// 'await' waits: see test/norm.test.ts (lavapipe's first-dispatch JIT confuses the wait predictor).
const getEngine = () => getSharedEngine({ waitMode: 'await' });

function ids(rng: Rng, n: number, V: number): Tensor {
  return Tensor.cpu(Int32Array.from({ length: n }, () => rng.int(V)), [n], 'i32');
}

async function check(idsT: Tensor, table: Tensor, attrs: Parameters<typeof embeddingOp>[1], what: string): Promise<number> {
  const e = await getEngine();
  const ref = embeddingOp({ ids: idsT, table }, attrs);
  const gi = idsT.toGpu(e);
  const gt = table.toGpu(e);
  const before = e.dispatchCount;
  const out = embeddingOp({ ids: gi, table: gt }, attrs);
  const n = e.dispatchCount - before;
  expect(out.shape).toEqual(ref.shape);
  expect(out.dtype).toBe(ref.dtype);
  expectClose(await out.toArray(), ref.hostValues(), attrs?.out === 'f16' ? TOL.f16 : { atol: 0, rtol: 0 }, what);
  for (const t of [gi, gt, out]) t.dispose();
  return n;
}

describe('embedding', () => {
  const rng = new Rng(41);
  for (const dt of ['f32', 'f16', 'bf16'] as DType[]) {
    for (const [N, V, D] of [[1, 1, 1], [33, 65, 7], [65, 33, 1025], [5, 1000, 64]]) {
      it(`${dt} table [${V}, ${D}], ${N} ids`, async () => {
        await check(ids(rng, N!, V!), randTensor(rng, [V!, D!], dt), undefined, `embedding ${dt}`);
      });
    }
  }
  it('CPU reference picks rows exactly and keeps the ids shape', () => {
    const table = Tensor.fromValues([0, 1, 10, 11, 20, 21], [3, 2], 'bf16');
    const y = embedding({ ids: Tensor.cpu(Int32Array.from([2, 0, 2, 1]), [2, 2], 'i32'), table });
    expect(y.shape).toEqual([2, 2, 2]);
    expect(Array.from(y.hostValues())).toEqual([20, 21, 0, 1, 20, 21, 10, 11]);
  });
  it('f16 output, zero-size, and out-of-range ids (CPU throws, GPU writes zeros)', async () => {
    const e = await getEngine();
    if (e.caps.shaderF16) await check(ids(rng, 9, 20), randTensor(rng, [20, 33], 'bf16'), { out: 'f16' }, 'embedding -> f16');
    const z = embedding({ ids: Tensor.cpu(new Int32Array(0), [0], 'i32').toGpu(e), table: randTensor(rng, [4, 3]).toGpu(e) });
    expect(z.shape).toEqual([0, 3]);
    const bad = Tensor.cpu(Int32Array.from([1, 7, -1, 0]), [4], 'i32');
    const table = randTensor(rng, [5, 3], 'bf16');
    expect(() => embedding({ ids: bad, table })).toThrow(/\[embedding\] id 7 at position 1 is out of range for a table of 5 rows/);
    const y = await embedding({ ids: bad.toGpu(e), table: table.toGpu(e) }).toArray();
    const tv = table.hostValues();
    expect(Array.from(y)).toEqual([...tv.slice(3, 6), 0, 0, 0, 0, 0, 0, ...tv.slice(0, 3)]);
  });
  it('split path: table and ids in windows (a 2-GiB UMT5 table does not fit one binding)', async () => {
    const idsT = ids(rng, 40, 300);
    idsT.data![3] = 299;
    idsT.data![4] = 0;
    const n = await check(idsT, randTensor(rng, [300, 17], 'bf16'), { maxBindingBytes: 1024 }, 'embedding split');
    expect(n).toBeGreaterThan(10);
  });
  it('errors name the op', () => {
    const t = Tensor.cpuZeros([4, 3]);
    expect(() => embedding({ ids: Tensor.cpuZeros([2]), table: t })).toThrow(/\[embedding\] ids must be i32/);
    expect(() => embedding({ ids: Tensor.cpu(Int32Array.from([0]), [1], 'i32'), table: Tensor.cpuZeros([12]) })).toThrow(/\[embedding\] table must be \[V, D\]/);
    expect(() => embedding({ ids: Tensor.cpu(Int32Array.from([0]), [1], 'i32'), table: Tensor.cpuZeros([4, 3], 'i32') })).toThrow(/\[embedding\] table must be f32\/f16\/bf16/);
  });
});
