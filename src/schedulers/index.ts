// Flow-matching samplers for Wan 2.1 (host-side, f32 semantics) and the CFG combine.
//   'unipc': Wan's FlowUniPCMultistepScheduler (bh2, order 2, predict_x0) — the official default.
//   'euler': first-order flow Euler on the same sigma schedule.
// See docs/schedulers.md.

import { FlowUniPCScheduler } from './flow-unipc.ts';
import { FlowEulerScheduler } from './flow-euler.ts';
import type { FlowScheduleOptions } from './flow-schedule.ts';
import type { FlowScheduler, SchedulerKind } from './types.ts';
import { ConfigError, ShapeError } from '../util/errors.ts';

export function createScheduler(kind: SchedulerKind, opts: FlowScheduleOptions): FlowScheduler {
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
