import { describe, it, expect } from 'vitest';
import { getEngine as getSharedEngine, randTensor, expectClose, TOL, Rng } from './helpers/gpu.ts';
import { layerNorm, rmsNorm, channelL2Norm, channelL2NormOp, type RowImpl } from '../src/ops/norm.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import type { DType } from '../src/tensor/dtype.ts';

// 'await' waits: lavapipe JIT-compiles each new pipeline at its first dispatch (0.5-7 s here),
// which would otherwise teach the engine's wait predictor absurd sleeps for the next tiny submits.
const getEngine = () => getSharedEngine({ waitMode: 'await' });

type Inputs = Record<string, Tensor | undefined>;

async function gpuVsCpu(run: (inp: Inputs) => Tensor, inputs: Inputs, tol: { atol: number; rtol: number }, what: string): Promise<number> {
  const e = await getEngine();
  const cpu = run(inputs);
  const gpuIn: Inputs = Object.fromEntries(Object.entries(inputs).map(([k, t]) => [k, t?.toGpu(e)]));
  const before = e.dispatchCount;
  const out = run(gpuIn);
  const dispatches = e.dispatchCount - before;
  expect(out.shape, what).toEqual(cpu.shape);
  expect(out.dtype, what).toBe(cpu.dtype);
  expectClose(await out.toArray(), cpu.hostValues(), tol, what);
  out.dispose();
  for (const [k, t] of Object.entries(gpuIn)) if (t && t !== inputs[k]) t.dispose();
  return dispatches;
}

const IMPLS: RowImpl[] = ['thread', 'wg'];

describe('layerNorm', () => {
  const rng = new Rng(21);
  for (const impl of IMPLS) {
    for (const [rows, D] of [[1, 1], [7, 33], [33, 65], [5, 1025], [300, 16], [2, 5120]]) {
      it(`${impl} [${rows}, ${D}]: plain, affine, modulated, affine+modulated`, async () => {
        const x = randTensor(rng, [rows!, D!], 'f32', 2);
        const weight = randTensor(rng, [D!]);
        const bias = randTensor(rng, [D!]);
        const shift = randTensor(rng, [D!]);
        const scale = randTensor(rng, [D!], 'f32', 0.5);
        const eps = 1e-6;
        await gpuVsCpu((i) => layerNorm({ x: i.x! }, { eps, impl }), { x }, TOL.f32, 'ln plain');
        await gpuVsCpu((i) => layerNorm({ x: i.x!, weight: i.weight, bias: i.bias }, { eps, impl }), { x, weight, bias }, TOL.f32, 'ln affine');
        await gpuVsCpu((i) => layerNorm({ x: i.x!, weight: i.weight }, { eps, impl }), { x, weight }, TOL.f32, 'ln weight only');
        await gpuVsCpu((i) => layerNorm({ x: i.x!, shift: i.shift, scale: i.scale }, { eps, impl }), { x, shift, scale }, TOL.f32, 'ln modulated');
        await gpuVsCpu(
          (i) => layerNorm({ x: i.x!, weight: i.weight, bias: i.bias, shift: i.shift, scale: i.scale }, { eps, impl }),
          { x, weight, bias, shift, scale },
          TOL.f32,
          'ln affine+modulated',
        );
      });
    }
  }
  it('the CPU reference normalizes (mean 0, biased variance 1) and matches a hand computation', () => {
    const x = Tensor.fromValues([1, 2, 3, 4, -1, 0, 0, 1], [2, 4]);
    const y = layerNorm({ x }, { eps: 0 }).hostValues();
    // row 0: mean 2.5, biased var 1.25
    const r = 1 / Math.sqrt(1.25);
    expectClose(y.slice(0, 4), [-1.5 * r, -0.5 * r, 0.5 * r, 1.5 * r], { atol: 1e-6, rtol: 1e-6 }, 'row 0');
    // row 1: mean 0, var 0.5
    const r1 = 1 / Math.sqrt(0.5);
    expectClose(y.slice(4), [-r1, 0, 0, r1], { atol: 1e-6, rtol: 1e-6 }, 'row 1');
  });
  it('weights in f16 and bf16 (checkpoint dtypes) and modulation in bf16', async () => {
    for (const wdt of ['f16', 'bf16'] as DType[]) {
      for (const D of [33, 1536]) {
        const x = randTensor(rng, [9, D], 'f32');
        const weight = randTensor(rng, [D], wdt);
        const bias = randTensor(rng, [D], wdt);
        const shift = randTensor(rng, [1, D], wdt);
        const scale = randTensor(rng, [1, D], wdt, 0.5);
        await gpuVsCpu((i) => layerNorm({ x: i.x!, weight: i.weight, bias: i.bias }, { eps: 1e-5 }), { x, weight, bias }, TOL.f32, `ln ${wdt} affine`);
        await gpuVsCpu((i) => layerNorm({ x: i.x!, shift: i.shift, scale: i.scale }, { eps: 1e-5 }), { x, shift, scale }, TOL.f32, `ln ${wdt} mod`);
      }
    }
  });
  it('modulation broadcasts: [D], [1, D], per row [B, L, D], per batch [B, 1, D]', async () => {
    const B = 2, L = 5, D = 12;
    const x = randTensor(rng, [B, L, D]);
    for (const ms of [[D], [1, D], [B, L, D], [L, D], [B, 1, D], [1, 1, D]]) {
      const shift = randTensor(rng, ms);
      const scale = randTensor(rng, ms, 'f32', 0.3);
      await gpuVsCpu((i) => layerNorm({ x: i.x!, shift: i.shift, scale: i.scale }, { eps: 1e-6 }), { x, shift, scale }, TOL.f32, `mod ${JSON.stringify(ms)}`);
    }
    // the per-batch case by hand: batch 1 uses row 1 of the modulation
    const shift = randTensor(rng, [B, 1, D]);
    const scale = randTensor(rng, [B, 1, D]);
    const y = layerNorm({ x, shift, scale }, { eps: 1e-6 }).hostValues();
    const plain = layerNorm({ x }, { eps: 1e-6 }).hostValues();
    const sv = shift.hostValues();
    const cv = scale.hostValues();
    const i = (1 * L + 3) * D + 7;
    expect(y[i]).toBeCloseTo(plain[i]! * (1 + cv[D + 7]!) + sv[D + 7]!, 5);
  });
  it('variance survives a large mean (no E[x²]-E[x]² cancellation)', async () => {
    // f32 inputs around 300 with std 1. Tolerance: the mean accumulated in f32 (Welford/Chan, as
    // PyTorch's CUDA kernel does) is off by ~1e-4 here, which shifts every output by that much;
    // a naive E[x²]-E[x]² in f32 would be off by ~1e-2 (x² ~ 9e4, ulp 0.008).
    const D = 4096;
    const v = new Float32Array(4 * D);
    for (let k = 0; k < v.length; k++) v[k] = 300 + rng.normal();
    const x = Tensor.cpu(v, [4, D]);
    for (const impl of IMPLS) await gpuVsCpu((i) => layerNorm({ x: i.x! }, { eps: 1e-6, impl }), { x }, { atol: 1e-3, rtol: 1e-4 }, `offset ${impl}`);
  });
  it('f16 activations in, f16 or f32 out', async () => {
    const e = await getEngine();
    if (!e.caps.shaderF16) return; // adapter without shader-f16: f16 path unavailable
    for (const D of [33, 1025]) {
      const x = randTensor(rng, [6, D], 'f16');
      const weight = randTensor(rng, [D], 'bf16');
      const shift = randTensor(rng, [D]);
      const scale = randTensor(rng, [D], 'f32', 0.3);
      await gpuVsCpu((i) => layerNorm({ x: i.x!, weight: i.weight, shift: i.shift, scale: i.scale }, { eps: 1e-6 }), { x, weight, shift, scale }, TOL.f16, 'ln f16');
      await gpuVsCpu((i) => layerNorm({ x: i.x! }, { eps: 1e-6, out: 'f32' }), { x }, TOL.f32, 'ln f16 -> f32');
      await gpuVsCpu((i) => rmsNorm({ x: i.x!, weight: i.weight! }, { eps: 1e-6 }), { x, weight }, TOL.f16, 'rms f16');
    }
  });
  it('zero-size inputs', async () => {
    const e = await getEngine();
    for (const shape of [[0, 33], [3, 0], [0]]) {
      const x = Tensor.cpuZeros(shape).toGpu(e);
      const y = layerNorm({ x }, { eps: 1e-6 });
      expect(y.shape).toEqual(shape);
      expect((await y.toArray()).length).toBe(0);
    }
  });
  it('split path: a small binding limit gives the same result (broadcast and per-row modulation)', async () => {
    const rows = 37, D = 65;
    const x = randTensor(rng, [rows, D]);
    const weight = randTensor(rng, [D], 'bf16');
    const shift = randTensor(rng, [D]);
    const scale = randTensor(rng, [D]);
    const shiftR = randTensor(rng, [rows, D]);
    const scaleR = randTensor(rng, [rows, D]);
    for (const impl of IMPLS) {
      const n1 = await gpuVsCpu((i) => layerNorm({ x: i.x!, weight: i.weight, shift: i.shift, scale: i.scale }, { eps: 1e-6, impl, maxBindingBytes: 2048 }), { x, weight, shift, scale }, TOL.f32, 'split ln');
      expect(n1).toBeGreaterThan(3);
      const n2 = await gpuVsCpu((i) => layerNorm({ x: i.x!, shift: i.shift, scale: i.scale }, { eps: 1e-6, impl, maxBindingBytes: 1024 }), { x, shift: shiftR, scale: scaleR }, TOL.f32, 'split ln per-row mod');
      expect(n2).toBeGreaterThan(3);
      const n3 = await gpuVsCpu((i) => rmsNorm({ x: i.x!, weight: i.weight! }, { eps: 1e-6, impl, maxBindingBytes: 1024 }), { x, weight }, TOL.f32, 'split rms');
      expect(n3).toBeGreaterThan(3);
    }
  });
  it('errors name the op and the fix', () => {
    const x = Tensor.cpuZeros([4, 8]);
    expect(() => layerNorm({ x, weight: Tensor.cpuZeros([7]) }, { eps: 1e-6 })).toThrow(/\[layer_norm\] weight \[7\] must have 8 elements/);
    expect(() => layerNorm({ x, shift: Tensor.cpuZeros([8]) }, { eps: 1e-6 })).toThrow(/\[layer_norm\] modulation needs both shift and scale/);
    expect(() => layerNorm({ x, shift: Tensor.cpuZeros([3, 8]), scale: Tensor.cpuZeros([3, 8]) }, { eps: 1e-6 })).toThrow(/\[layer_norm\] shift \[3, 8\] does not broadcast/);
    expect(() => layerNorm({ x, shift: Tensor.cpuZeros([4]), scale: Tensor.cpuZeros([4]) }, { eps: 1e-6 })).toThrow(/\[layer_norm\] shift \[4\] must end in x's last dim 8/);
    expect(() => layerNorm({ x: Tensor.cpuZeros([4, 8], 'i32') }, { eps: 1e-6 })).toThrow(/\[layer_norm\] activations must be f32 or f16/);
    expect(() => rmsNorm({ x, weight: Tensor.cpuZeros([8], 'i32') }, { eps: 1e-6 })).toThrow(/\[rms_norm\] weight must be f32\/f16\/bf16/);
    expect(() => layerNorm({ x }, { eps: -1 })).toThrow(/\[layer_norm\] eps must be a number >= 0/);
  });
});

describe('rmsNorm', () => {
  const rng = new Rng(22);
  for (const impl of IMPLS) {
    for (const [rows, D] of [[1, 1], [7, 33], [33, 65], [5, 1025], [3, 4096]]) {
      it(`${impl} [${rows}, ${D}] with f32 / bf16 weights`, async () => {
        const x = randTensor(rng, [rows!, D!], 'f32', 3);
        for (const wdt of ['f32', 'bf16'] as DType[]) {
          const weight = randTensor(rng, [D!], wdt);
          await gpuVsCpu((i) => rmsNorm({ x: i.x!, weight: i.weight! }, { eps: 1e-6, impl }), { x, weight }, TOL.f32, `rms ${wdt}`);
        }
      });
    }
  }
  it('CPU reference by hand', () => {
    const x = Tensor.fromValues([3, 4], [1, 2]);
    const y = rmsNorm({ x, weight: Tensor.fromValues([1, 2], [2]) }, { eps: 0 }).hostValues();
    const r = 1 / Math.sqrt(12.5);
    expectClose(y, [3 * r, 8 * r], { atol: 1e-6, rtol: 1e-6 }, 'rms by hand');
  });
});

describe('channelL2Norm', () => {
  const rng = new Rng(23);
  for (const shape of [[1, 1, 1], [1, 4, 3, 5, 7], [2, 33, 65], [1, 96, 2, 6, 10], [2, 3, 1025]]) {
    it(`[${shape.join(', ')}] with gamma [C], [C,1,1,1], [C,1,1] in f32 / bf16`, async () => {
      const C = shape[1]!;
      const x = randTensor(rng, shape);
      for (const [gs, gdt] of [[[C], 'f32'], [[C, 1, 1, 1], 'bf16'], [[C, 1, 1], 'f16']] as Array<[number[], DType]>) {
        const gamma = randTensor(rng, gs, gdt);
        await gpuVsCpu((i) => channelL2Norm({ x: i.x!, gamma: i.gamma! }), { x, gamma }, TOL.f32, `l2 ${JSON.stringify(shape)} ${gdt}`);
      }
    });
  }
  it('CPU reference: unit gamma gives per-position norm sqrt(C); zeros stay zero (eps)', () => {
    const C = 5, S = 7;
    const x = randTensor(rng, [1, C, S]);
    const y = channelL2Norm({ x, gamma: Tensor.fromValues(new Array(C).fill(1), [C]) }).hostValues();
    for (let s = 0; s < S; s++) {
      let q = 0;
      for (let c = 0; c < C; c++) q += y[c * S + s]! ** 2;
      expect(Math.sqrt(q)).toBeCloseTo(Math.sqrt(C), 5);
    }
    const z = channelL2Norm({ x: Tensor.cpuZeros([1, 3, 2]), gamma: Tensor.fromValues([1, 1, 1], [3]) }).hostValues();
    expect(Array.from(z)).toEqual([0, 0, 0, 0, 0, 0]);
  });
  it('zeros and eps on the GPU (no NaN)', async () => {
    const x = Tensor.cpuZeros([1, 4, 9]);
    const gamma = randTensor(rng, [4]);
    await gpuVsCpu((i) => channelL2Norm({ x: i.x!, gamma: i.gamma! }, { eps: 1e-12 }), { x, gamma }, TOL.f32, 'l2 zeros');
  });
  it('f16 activations', async () => {
    const e = await getEngine();
    if (!e.caps.shaderF16) return;
    const x = randTensor(rng, [1, 16, 3, 33], 'f16');
    const gamma = randTensor(rng, [16, 1, 1, 1], 'bf16');
    await gpuVsCpu((i) => channelL2Norm({ x: i.x!, gamma: i.gamma! }), { x, gamma }, TOL.f16, 'l2 f16');
    await gpuVsCpu((i) => channelL2Norm({ x: i.x!, gamma: i.gamma! }, { out: 'f32' }), { x, gamma }, TOL.f32, 'l2 f16 -> f32');
  });
  it('zero-size', async () => {
    const e = await getEngine();
    const y = channelL2Norm({ x: Tensor.cpuZeros([1, 4, 0, 5]).toGpu(e), gamma: Tensor.cpuZeros([4]).toGpu(e) });
    expect(y.shape).toEqual([1, 4, 0, 5]);
  });
  it('split path: channel groups, and position ranges when one plane is too big', async () => {
    const x = randTensor(rng, [2, 24, 3, 7, 5]); // S = 105 positions, planes of 420 bytes
    const gamma = randTensor(rng, [24, 1, 1, 1]);
    const groups = await gpuVsCpu((i) => channelL2NormOp({ x: i.x!, gamma: i.gamma! }, { maxBindingBytes: 2048 }), { x, gamma }, TOL.f32, 'l2 split groups');
    expect(groups).toBeGreaterThan(8);
    const x2 = randTensor(rng, [1, 5, 301]);
    const planes = await gpuVsCpu((i) => channelL2NormOp({ x: i.x!, gamma: i.gamma! }, { maxBindingBytes: 512 }), { x: x2, gamma: randTensor(rng, [5]) }, TOL.f32, 'l2 split planes');
    expect(planes).toBeGreaterThan(10);
  });
  it('errors name the op', () => {
    const x = Tensor.cpuZeros([1, 4, 3]);
    expect(() => channelL2Norm({ x, gamma: Tensor.cpuZeros([3]) })).toThrow(/\[channel_l2_norm\] gamma \[3\] must have C = 4 elements/);
    expect(() => channelL2Norm({ x: Tensor.cpuZeros([4]), gamma: Tensor.cpuZeros([4]) })).toThrow(/\[channel_l2_norm\] x must be \[B, C, \.\.\.\]/);
  });
});
