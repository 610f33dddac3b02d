import { describe, it, expect } from 'vitest';
import { getEngine, randTensor, expectClose, TOL, Rng } from './helpers/gpu.ts';
import { unary, binary, modulate, gatedResidual, type UnaryKind, type BinaryKind } from '../src/ops/elementwise.ts';
import { Tensor } from '../src/tensor/tensor.ts';

// 4100 and 70004 take the vec4 kernels (multiples of 4, partial last row of the view); the rest the scalar ones
const SIZES = [0, 1, 33, 65, 1025, 4100, 70001, 70004];

async function gpuVsCpu(run: (inp: Record<string, Tensor>) => Tensor, inputs: Record<string, Tensor>, tol: { atol: number; rtol: number }, what: string) {
  const e = await getEngine();
  const cpu = run(inputs);
  const gpuIn = Object.fromEntries(Object.entries(inputs).map(([k, t]) => [k, t.toGpu(e)]));
  const out = run(gpuIn);
  expect(out.shape).toEqual(cpu.shape);
  expect(out.dtype).toBe(cpu.dtype);
  expectClose(await out.toArray(), cpu.hostValues(), tol, what);
  out.dispose();
  for (const t of Object.values(gpuIn)) t.dispose();
}

describe('elementwise', () => {
  const rng = new Rng(1);
  for (const kind of ['copy', 'silu', 'gelu', 'affine', 'clamp'] as UnaryKind[]) {
    for (const n of SIZES) {
      it(`unary ${kind} n=${n}`, async () => {
        const x = randTensor(rng, [n], 'f32', 4);
        await gpuVsCpu((i) => unary({ x: i.x! }, { kind, alpha: kind === 'clamp' ? -1 : 0.5, beta: kind === 'clamp' ? 1 : 0.25 }), { x }, { atol: 2e-6, rtol: 2e-6 }, `unary ${kind}`);
      });
    }
  }
  it('unary gelu/silu at extreme inputs stays finite', async () => {
    const x = Tensor.fromValues([-1e4, -100, -20, 0, 20, 100, 1e4], [7]);
    await gpuVsCpu((i) => unary({ x: i.x! }, { kind: 'gelu' }), { x }, { atol: 1e-6, rtol: 1e-6 }, 'gelu extreme');
    await gpuVsCpu((i) => unary({ x: i.x! }, { kind: 'silu' }), { x }, { atol: 1e-6, rtol: 1e-6 }, 'silu extreme');
  });
  it('cast f32 -> f16 -> f32 rounds like the host', async () => {
    const e = await getEngine();
    if (!e.caps.shaderF16) return; // adapter without shader-f16: cast path not available
    const x = randTensor(rng, [1025], 'f32', 10);
    await gpuVsCpu((i) => unary({ x: i.x! }, { kind: 'copy', out: 'f16' }), { x }, { atol: 0, rtol: 0 }, 'cast f16');
  });
  for (const kind of ['add', 'sub', 'mul', 'div', 'axpy', 'lerp'] as BinaryKind[]) {
    for (const [as, bs] of [
      [[33, 65], [33, 65]],
      [[5, 7, 9], [9]],
      [[4, 3, 5, 6], [4, 1, 1, 1]],
      [[4, 3, 5, 6], [3, 5, 1]],
      [[1025], [1]],
      [[0, 7], [7]],
      // vec4 kernels: full, col (period 8, 32), row ([4,1,1]: one value per 96 elements), scalar
      [[6, 8], [6, 8]],
      [[6, 8], [8]],
      [[2, 4, 8], [4, 8]],
      [[4, 8, 12], [4, 1, 1]],
      [[4, 6, 5, 8], [6, 1, 1]],
      [[64], [1]],
    ] as number[][][]) {
      it(`binary ${kind} ${JSON.stringify(as)} op ${JSON.stringify(bs)}`, async () => {
        const a = randTensor(rng, as!);
        const b = kind === 'div' ? Tensor.fromValues(Array.from({ length: bs!.reduce((x, y) => x * y, 1) }, () => 0.5 + rng.next()), bs!) : randTensor(rng, bs!);
        await gpuVsCpu((i) => binary({ a: i.a!, b: i.b! }, { kind, alpha: 0.75 }), { a, b }, TOL.f32, `binary ${kind}`);
      });
    }
  }
  it('binary rejects non-broadcastable shapes with the op name', () => {
    const a = Tensor.cpuZeros([4, 5]);
    const b = Tensor.cpuZeros([4]);
    expect(() => binary({ a, b }, { kind: 'add' })).toThrow(/\[binary\] cannot broadcast \[4\] to \[4, 5\]/);
  });
  for (const [L, D] of [[1, 1], [33, 65], [48, 128], [7, 1025], [3, 1536], [1030, 24]]) {
    it(`modulate and gated residual [${L}, ${D}]`, async () => {
      const x = randTensor(rng, [L!, D!]);
      const shift = randTensor(rng, [D!]);
      const scale = randTensor(rng, [1, D!]);
      await gpuVsCpu((i) => modulate({ x: i.x!, shift: i.shift!, scale: i.scale! }, {}), { x, shift, scale }, TOL.f32, 'modulate');
      const r = randTensor(rng, [L!, D!]);
      await gpuVsCpu((i) => gatedResidual({ x: i.x!, r: i.r!, gate: i.gate! }, {}), { x, r, gate: shift }, TOL.f32, 'gated_residual');
    });
  }
  it('modulate / gated residual with other broadcasts (per-row [L, D], [1, D], scalar-per-row [L, 1])', async () => {
    const x = randTensor(rng, [2, 6, 16]);
    for (const ms of [[6, 16], [2, 6, 16], [1, 16], [16], [2, 6, 1]]) {
      const shift = randTensor(rng, ms);
      const scale = randTensor(rng, ms);
      await gpuVsCpu((i) => modulate({ x: i.x!, shift: i.shift!, scale: i.scale! }, {}), { x, shift, scale }, TOL.f32, `modulate ${JSON.stringify(ms)}`);
      const r = randTensor(rng, [2, 6, 16]);
      await gpuVsCpu((i) => gatedResidual({ x: i.x!, r: i.r!, gate: i.gate! }, {}), { x, r, gate: scale }, TOL.f32, `gated ${JSON.stringify(ms)}`);
    }
    // shift per column, scale per row: the vec4 kernel cannot mix them; the scalar one runs
    await gpuVsCpu((i) => modulate({ x: i.x!, shift: i.shift!, scale: i.scale! }, {}), { x, shift: randTensor(rng, [16]), scale: randTensor(rng, [2, 6, 1]) }, TOL.f32, 'modulate mixed');
  });
  it('f16 through the vec4 kernels', async () => {
    const e = await getEngine();
    if (!e.caps.shaderF16) return;
    const x = randTensor(rng, [4100], 'f32', 10);
    await gpuVsCpu((i) => unary({ x: i.x! }, { kind: 'copy', out: 'f16' }), { x }, { atol: 0, rtol: 0 }, 'cast f16 vec4');
    const h = randTensor(rng, [12, 64], 'f16');
    const shift = randTensor(rng, [64], 'f16');
    const scale = randTensor(rng, [64]);
    await gpuVsCpu((i) => modulate({ x: i.x!, shift: i.shift!, scale: i.scale! }, {}), { x: h, shift, scale }, TOL.f16, 'modulate f16');
  });
  it('split path: a small binding limit splits the vec4 kernels into row ranges', async () => {
    const e = await getEngine();
    const count = async (f: () => Promise<void>) => {
      const before = e.dispatchCount;
      await f();
      return e.dispatchCount - before;
    };
    const x = randTensor(rng, [40, 96]);
    const n1 = await count(() => gpuVsCpu((i) => unary({ x: i.x! }, { kind: 'gelu', maxBindingBytes: 1024 }), { x }, { atol: 2e-6, rtol: 2e-6 }, 'split unary'));
    expect(n1).toBeGreaterThan(3);
    for (const bs of [[40, 96], [96], [40, 1], [1]]) {
      const b = randTensor(rng, bs);
      await gpuVsCpu((i) => binary({ a: i.a!, b: i.b! }, { kind: 'sub', maxBindingBytes: 1024 }), { a: x, b }, TOL.f32, `split binary ${JSON.stringify(bs)}`);
    }
    // row mode with a row offset per chunk: [4, 8, 12] + [4, 1, 1] (one value per 96 elements)
    await gpuVsCpu((i) => binary({ a: i.a!, b: i.b! }, { kind: 'mul', maxBindingBytes: 512 }), { a: randTensor(rng, [4, 8, 12]), b: randTensor(rng, [4, 1, 1]) }, TOL.f32, 'split binary row');
    const shift = randTensor(rng, [96]);
    const scale = randTensor(rng, [96]);
    await gpuVsCpu((i) => modulate({ x: i.x!, shift: i.shift!, scale: i.scale! }, { maxBindingBytes: 1024 }), { x, shift, scale }, TOL.f32, 'split modulate');
    const r = randTensor(rng, [40, 96]);
    await gpuVsCpu((i) => gatedResidual({ x: i.x!, r: i.r!, gate: i.gate! }, { maxBindingBytes: 1024 }), { x, r, gate: scale }, TOL.f32, 'split gated');
  });
  it('mixed devices are rejected', async () => {
    const e = await getEngine();
    const a = randTensor(rng, [4]).toGpu(e);
    const b = randTensor(rng, [4]);
    expect(() => binary({ a, b }, { kind: 'add' })).toThrow(/different devices/);
    a.dispose();
  });
});
