// Flow-matching Euler sampler on Wan's sigma schedule, host-side, f32 semantics.
//
// Step rule: diffusers FlowMatchEulerDiscreteScheduler.step (huggingface/diffusers,
// schedulers/scheduling_flow_match_euler_discrete.py):
//   prev_sample = sample + (sigma_next − sigma) · model_output
// with sigma, sigma_next float32 (0-dim tensors) and every op rounded to f32.
// Sigma schedule and timesteps: exactly Wan's UniPC schedule (wanFlowSchedule: linspace(0.999, 0)
// with shift, int64 truncation), NOT diffusers' Euler schedule (linspace(1, 1/T) with the timesteps
// kept as floats), so the Euler and UniPC samplers see the same timesteps and can be compared.
// Wan 2.1 itself ships no Euler sampler for T2V (its alternatives are 'unipc' and 'dpm++').

import type { FlowScheduler, StepInfo } from './types.ts';
import { checkScheduleOptions, wanFlowSchedule, type FlowScheduleOptions } from './flow-schedule.ts';
import { ShapeError, SmartDiffusionError } from '../util/errors.ts';

const f = Math.fround;

export class FlowEulerScheduler implements FlowScheduler {
  readonly kind = 'euler' as const;
  readonly timesteps: Int32Array;
  readonly sigmas: Float32Array;
  readonly steps: number;
  /** Euler is first order on every step and has no corrector */
  readonly orders: readonly StepInfo[];

  private stepIndex = 0;
  private x0: Float32Array | null = null;
  private info: StepInfo | null = null;

  constructor(opts: FlowScheduleOptions) {
    const o = checkScheduleOptions('euler', opts);
    const s = wanFlowSchedule(o);
    this.timesteps = s.timesteps;
    this.sigmas = s.sigmas;
    this.steps = o.steps;
    this.orders = Array.from({ length: o.steps }, (_, i) => ({ step: i, corrector: null, predictor: 1 }));
  }

  reset(): void {
    this.stepIndex = 0;
    this.x0 = null;
    this.info = null;
  }

  lastX0(): Float32Array | null {
    return this.x0;
  }

  lastStepInfo(): StepInfo | null {
    return this.info;
  }

  step(v: Float32Array, i: number, sample: Float32Array): Float32Array {
    const k = this.stepIndex;
    if (i !== k) {
      throw new SmartDiffusionError(
        'BAD_STEP',
        `[euler] step(${i}) called but the scheduler is at step ${k} of ${this.steps}; call the steps in order 0..${this.steps - 1}, or reset() to start over`,
      );
    }
    if (k >= this.steps) throw new SmartDiffusionError('BAD_STEP', `[euler] all ${this.steps} steps are done; call reset() to start over`);
    if (v.length !== sample.length) {
      throw new ShapeError(`[euler] model output has ${v.length} values but the sample has ${sample.length}; pass the guided prediction for this sample`);
    }
    const sigma = this.sigmas[k]!;
    const dt = f(this.sigmas[k + 1]! - sigma); // f32 (sigma_next − sigma)
    const n = sample.length;
    const out = new Float32Array(n);
    const x0 = new Float32Array(n);
    for (let j = 0; j < n; j++) {
      out[j] = sample[j]! + f(dt * v[j]!);
      x0[j] = sample[j]! - f(sigma * v[j]!);
    }
    this.x0 = x0;
    this.info = { step: k, corrector: null, predictor: 1 };
    this.stepIndex++;
    return out;
  }
}
