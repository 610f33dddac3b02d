// Flow-matching samplers for Wan 2.1 (host-side, f32 semantics) and the CFG combine.
//   'unipc': Wan's FlowUniPCMultistepScheduler (bh2, order 2, predict_x0) — the official default.
//   'euler': first-order flow Euler on the same sigma schedule.
// See docs/schedulers.md.

import { FlowUniPCScheduler } from './flow-unipc.ts';
import { FlowEulerScheduler } from './flow-euler.ts';
import { ConfigError, ShapeError } from '../util/errors.ts';

export { FlowUniPCScheduler, wanFlowSchedule, unipcOrders, type FlowSchedule, type FlowScheduleOptions } from './flow-unipc.ts';
export { FlowEulerScheduler } from './flow-euler.ts';

export type SchedulerKind = 'unipc' | 'euler';

/** Solver orders used at one step (corrector null where none ran). */
export interface StepInfo {
  step: number;
  corrector: number | null;
  predictor: number;
}

export interface FlowScheduler {
  readonly kind: SchedulerKind;
  /** integers the model receives (Wan: int64(s·1000) truncation) [N] */
  readonly timesteps: Int32Array;
  /** float32 sigmas [N+1], last 0 */
  readonly sigmas: Float32Array;
  readonly steps: number;
  /** the solver orders each step uses */
  readonly orders: readonly StepInfo[];
  /**
   * One step: v = guided flow prediction for `sample` at step i (steps must be called in order
   * 0..N−1); returns the next sample (a new array; inputs are not modified).
   */
  step(v: Float32Array, i: number, sample: Float32Array): Float32Array;
  /** x0 = sample − σ_i·v of the last step (for tests/previews); null before the first step */
  lastX0(): Float32Array | null;
  /** orders actually used by the last step */
  lastStepInfo(): StepInfo | null;
  /** forget the solver history; the next call is step 0 */
  reset(): void;
}

export interface SchedulerOptions {
  steps: number;
  /** flow shift (Wan: sample_shift; diffusers scheduler_config.json: flow_shift) */
  shift: number;
  numTrainTimesteps?: number;
}

export function createScheduler(kind: SchedulerKind, opts: SchedulerOptions): FlowScheduler {
  switch (kind) {
    case 'unipc':
      return new FlowUniPCScheduler(opts);
    case 'euler':
      return new FlowEulerScheduler(opts);
    default:
      throw new ConfigError(`[scheduler] unknown sampler '${String(kind)}'; use 'unipc' or 'euler'`);
  }
}

/**
 * Classifier-free guidance as Wan computes it, in f32:
 * uncond + g·(cond − uncond) (each op rounded to f32; g is cast to f32 like a torch scalar).
 */
export function cfgCombine(uncond: Float32Array, cond: Float32Array, g: number): Float32Array {
  if (uncond.length !== cond.length) {
    throw new ShapeError(`[cfg] cond has ${cond.length} values but uncond has ${uncond.length}; both predictions must be for the same latent`);
  }
  const f = Math.fround;
  const gf = f(g);
  const n = cond.length;
  const out = new Float32Array(n);
  for (let j = 0; j < n; j++) out[j] = uncond[j]! + f(gf * f(cond[j]! - uncond[j]!));
  return out;
}
