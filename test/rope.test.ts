import { describe, it, expect } from 'vitest';
import { getEngine as getSharedEngine, randTensor, expectClose, TOL, Rng } from './helpers/gpu.ts';
import { rope, ropeOp } from '../src/ops/rope.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import { loadGolden } from './helpers/golden.ts';

// 'await' waits: see test/norm.test.ts (lavapipe's first-dispatch JIT confuses the wait predictor).
const getEngine = () => getSharedEngine({ waitMode: 'await' });

type Inputs = Record<string, Tensor>;

async function gpuVsCpu(run: (inp: Inputs) => Tensor, inputs: Inputs, tol: { atol: number; rtol: number }, what: string): Promise<number> {
  const e = await getEngine();
  const cpu = run(inputs);
  const gpuIn: Inputs = Object.fromEntries(Object.entries(inputs).map(([k, t]) => [k, t.toGpu(e)]));
  const before = e.dispatchCount;
  const out = run(gpuIn);
  const n = e.dispatchCount - before;
  expect(out.shape).toEqual(cpu.shape);
  expect(out.dtype).toBe(cpu.dtype);
  expectClose(await out.toArray(), cpu.hostValues(), tol, what);
  out.dispose();
  for (const t of Object.values(gpuIn)) t.dispose();
  return n;
}

/** cos/sin tables [L, P] of random angles */
function tables(rng: Rng, L: number, P: number): { cos: Tensor; sin: Tensor } {
  const c = new Float32Array(L * P);
  const s = new Float32Array(L * P);
  for (let i = 0; i < c.length; i++) {
    const a = rng.uniform(-Math.PI, Math.PI);
    c[i] = Math.cos(a);
    s[i] = Math.sin(a);
  }
  return { cos: Tensor.cpu(c, [L, P]), sin: Tensor.cpu(s, [L, P]) };
}

describe('rope', () => {
  const rng = new Rng(31);
  for (const [B, L, H, Dh] of [[1, 1, 1, 2], [1, 33, 3, 6], [2, 65, 2, 10], [1, 7, 12, 128], [1, 1025, 1, 64], [2, 5, 5, 34]]) {
    it(`[${B}, ${L}, ${H}, ${Dh}]`, async () => {
      const x = randTensor(rng, [B!, L!, H!, Dh!]);
      const { cos, sin } = tables(rng, L!, Dh! / 2);
      await gpuVsCpu((i) => rope({ x: i.x!, cos: i.cos!, sin: i.sin! }), { x, cos, sin }, TOL.f32, 'rope');
    });
  }
  it('CPU reference rotates adjacent pairs (2i, 2i+1) by the per-token angle, same for every head', () => {
    const x = Tensor.fromValues([1, 0, 0, 1, 2, 3, 4, 5], [1, 1, 2, 4]); // 2 heads, 2 pairs
    const cos = Tensor.fromValues([0, Math.cos(0.5)], [1, 2]);
    const sin = Tensor.fromValues([1, Math.sin(0.5)], [1, 2]);
    const y = rope({ x, cos, sin }).hostValues();
    const c = Math.cos(0.5), s = Math.sin(0.5);
    // head 0: pair 0 (1, 0) rotated by 90° -> (0, 1); pair 1 (0, 1) by 0.5 -> (-s, c)
    // head 1: pair 0 (2, 3) -> (-3, 2); pair 1 (4, 5) -> (4c - 5s, 4s + 5c)
    expectClose(y, [0, 1, -s, c, -3, 2, 4 * c - 5 * s, 4 * s + 5 * c], { atol: 1e-6, rtol: 1e-6 }, 'rope by hand');
  });
  it('the golden RoPE tables of the tiny DiT rotate like Wan (norm preserved per pair)', async () => {
    const g = loadGolden();
    const cosG = g.get('dit.rope_cos');
    const sinG = g.get('dit.rope_sin');
    const [L, P] = cosG.shape as [number, number];
    const cos = Tensor.cpu(cosG.data as Float32Array, [L, P]);
    const sin = Tensor.cpu(sinG.data as Float32Array, [L, P]);
    const x = randTensor(rng, [1, L, 2, 2 * P]);
    await gpuVsCpu((i) => rope({ x: i.x!, cos: i.cos!, sin: i.sin! }), { x, cos, sin }, TOL.f32, 'rope golden tables');
    const y = rope({ x, cos, sin }).hostValues();
    const xv = x.hostValues();
    for (let k = 0; k < xv.length; k += 2) expect(Math.hypot(y[k]!, y[k + 1]!)).toBeCloseTo(Math.hypot(xv[k]!, xv[k + 1]!), 5);
  });
  it('f16 activations', async () => {
    const e = await getEngine();
    if (!e.caps.shaderF16) return;
    const x = randTensor(rng, [2, 9, 3, 16], 'f16');
    const { cos, sin } = tables(rng, 9, 8);
    await gpuVsCpu((i) => rope({ x: i.x!, cos: i.cos!, sin: i.sin! }), { x, cos, sin }, TOL.f16, 'rope f16');
    await gpuVsCpu((i) => rope({ x: i.x!, cos: i.cos!, sin: i.sin! }, { out: 'f32' }), { x, cos, sin }, TOL.f32, 'rope f16 -> f32');
  });
  it('zero-size and the split path', async () => {
    const e = await getEngine();
    const z = rope({ x: Tensor.cpuZeros([1, 0, 2, 4]).toGpu(e), cos: Tensor.cpuZeros([0, 2]).toGpu(e), sin: Tensor.cpuZeros([0, 2]).toGpu(e) });
    expect(z.shape).toEqual([1, 0, 2, 4]);
    const x = randTensor(rng, [2, 33, 3, 10]);
    const { cos, sin } = tables(rng, 33, 5);
    const n = await gpuVsCpu((i) => ropeOp({ x: i.x!, cos: i.cos!, sin: i.sin! }, { maxBindingBytes: 1024 }), { x, cos, sin }, TOL.f32, 'rope split');
    expect(n).toBeGreaterThan(4);
  });
  it('errors name the op', () => {
    const x = Tensor.cpuZeros([1, 4, 2, 8]);
    expect(() => rope({ x, cos: Tensor.cpuZeros([4, 3]), sin: Tensor.cpuZeros([4, 4]) })).toThrow(/\[rope\] cos \[4, 3\] must be \[L, Dh\/2\] = \[4, 4\]/);
    expect(() => rope({ x: Tensor.cpuZeros([1, 4, 2, 7]), cos: Tensor.cpuZeros([4, 3]), sin: Tensor.cpuZeros([4, 3]) })).toThrow(/\[rope\] head dim 7 must be even/);
    expect(() => rope({ x: Tensor.cpuZeros([4, 8]), cos: Tensor.cpuZeros([4, 4]), sin: Tensor.cpuZeros([4, 4]) })).toThrow(/\[rope\] x must be \[B, L, H, Dh\]/);
  });
});
