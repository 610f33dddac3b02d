// Shared test helpers: one Engine per test file, seeded inputs, tolerance table, comparisons.
import { afterAll } from 'vitest';
import { Engine, type EngineOptions } from '../../src/runtime/engine.ts';
import { Tensor, numelOf, type Shape } from '../../src/tensor/tensor.ts';
import type { DType } from '../../src/tensor/dtype.ts';
import { Rng } from '../../src/util/rng.ts';

let enginePromise: Promise<Engine> | null = null;

/** The file's engine (created once, destroyed after the file's tests). */
export function getEngine(opts: EngineOptions = {}): Promise<Engine> {
  if (!enginePromise) {
    enginePromise = Engine.create(opts);
    afterAll(async () => {
      const e = await enginePromise!;
      e.destroy();
      enginePromise = null;
    });
  }
  return enginePromise;
}

/** Per-dtype tolerances for comparing a kernel with its CPU reference (|a-b| <= atol + rtol*|b|). */
export const TOL: Record<'f32' | 'f16' | 'bf16', { atol: number; rtol: number }> = {
  f32: { atol: 1e-5, rtol: 1e-5 },
  f16: { atol: 2e-3, rtol: 2e-3 },
  bf16: { atol: 1e-2, rtol: 1e-2 },
};

export function randTensor(rng: Rng, shape: Shape, dtype: DType = 'f32', scale = 1): Tensor {
  const n = numelOf(shape);
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = rng.normal() * scale;
  return Tensor.fromValues(v, shape, dtype);
}

interface CompareResult {
  maxAbs: number;
  maxRel: number;
  worst: number;
  ok: boolean;
}

function compare(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: { atol: number; rtol: number }): CompareResult {
  if (actual.length !== expected.length) throw new Error(`length ${actual.length} != ${expected.length}`);
  let maxAbs = 0;
  let maxRel = 0;
  let worst = -1;
  let ok = true;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!;
    const b = expected[i]!;
    if (Number.isNaN(a) !== Number.isNaN(b)) {
      ok = false;
      worst = i;
      maxAbs = Infinity;
      continue;
    }
    if (a === b) continue; // also equal infinities
    const d = Math.abs(a - b);
    const r = d / Math.max(Math.abs(b), 1e-30);
    if (d > maxAbs) {
      maxAbs = d;
      worst = i;
    }
    if (r > maxRel) maxRel = r;
    if (!(d <= tol.atol + tol.rtol * Math.abs(b))) ok = false;
  }
  return { maxAbs, maxRel, worst, ok };
}

export function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: { atol: number; rtol: number }, what = ''): void {
  const r = compare(actual, expected, tol);
  if (!r.ok) {
    throw new Error(
      `${what} mismatch: max abs ${r.maxAbs.toExponential(3)}, max rel ${r.maxRel.toExponential(3)} at ${r.worst} (got ${actual[r.worst]}, want ${expected[r.worst]}); tol atol=${tol.atol} rtol=${tol.rtol}`,
    );
  }
}

export { Rng };
