// One op registry. Each op has: input checks (shapes, dtypes, device limits) that throw
// `[name] ...` errors, a WGSL implementation (encodes dispatches on an Engine), a plain-loop CPU
// reference (which is also the CPU device's implementation), and flops/bytes. `defineOp` returns
// the callable op; it runs on the device of its inputs. The flops and bytes are the truth about an
// op's work: every GPU call adds them to the engine's pending work (the wait predictor's input)
// and, when profiling, to the op's row of the profile; benchmarks read them too.
// test/ops-sweep.test.ts iterates `opRegistry` (every op against its CPU reference).

import { Tensor } from '../tensor/tensor.ts';
import { engineOf, type Engine } from '../runtime/engine.ts';
import { ShapeError } from '../util/errors.ts';

export type OpInputs = Record<string, Tensor | undefined>;

export interface OpDef<I extends OpInputs, A> {
  name: string;
  /** kernel family (`kernels/<family>.wgsl`, `src/ops/<family>.ts`); the op sweep test groups by it */
  family: string;
  /** throws ShapeError `[name] ...` on bad inputs (shared by both devices) */
  check(inputs: I, attrs: A): void;
  gpu(e: Engine, inputs: I, attrs: A): Tensor;
  cpu(inputs: I, attrs: A): Tensor;
  flops(inputs: I, attrs: A): number;
  /** bytes read + written */
  bytes(inputs: I, attrs: A): number;
}

export type Op<I extends OpInputs, A> = ((inputs: I, attrs: A) => Tensor) & { def: OpDef<I, A> };

/** Every defined op by name (the callable; its definition is `.def`). */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export const opRegistry = new Map<string, Op<any, any>>();

export function defineOp<I extends OpInputs, A>(def: OpDef<I, A>): Op<I, A> {
  if (opRegistry.has(def.name)) throw new Error(`[registry] op ${def.name} defined twice`);
  const run = (inputs: I, attrs: A): Tensor => {
    let engine: Engine | null = null;
    let sawCpu = false;
    for (const [k, t] of Object.entries(inputs)) {
      if (!t) continue;
      if (!(t instanceof Tensor)) throw new ShapeError(`[${def.name}] input '${k}' is not a Tensor`);
      t.assertLive();
      const te = engineOf(t);
      if (te) {
        if (engine && engine !== te) throw new ShapeError(`[${def.name}] inputs live on different engines`);
        engine = te;
      } else sawCpu = true;
    }
    if (engine && sawCpu) {
      const where = Object.entries(inputs)
        .filter(([, t]) => t)
        .map(([k, t]) => `${k}: ${t!.device}`)
        .join(', ');
      throw new ShapeError(`[${def.name}] inputs are on different devices (${where}); move them with toGpu()/toCpu()`);
    }
    def.check(inputs, attrs);
    if (!engine) return def.cpu(inputs, attrs);
    const e = engine;
    return e.runOp(def.name, def.flops(inputs, attrs), def.bytes(inputs, attrs), () => def.gpu(e, inputs, attrs));
  };
  const op = Object.assign(run, { def });
  opRegistry.set(def.name, op);
  return op;
}

// ---- helpers shared by op implementations ----

export function expectRank(op: string, what: string, t: Tensor, ranks: number[]): void {
  if (!ranks.includes(t.rank)) throw new ShapeError(`[${op}] ${what} must have rank ${ranks.join(' or ')}, got ${t} `);
}

export function expectDtype(op: string, what: string, t: Tensor, dtypes: readonly string[]): void {
  if (!dtypes.includes(t.dtype)) throw new ShapeError(`[${op}] ${what} must be ${dtypes.join('/')}, got ${t.dtype}`);
}

/**
 * A 1-D grid of `n` workgroups folded into x/y so no dimension exceeds `maxPerDim` (65535 by
 * default). Kernels recover the linear id as `wid.x + wid.y * nwg.x`.
 */
export function grid1d(n: number, maxPerDim = 65535): [number, number, number] {
  if (n <= maxPerDim) return [n, 1, 1];
  const y = Math.ceil(n / maxPerDim);
  const x = Math.ceil(n / y);
  return [x, y, 1];
}
