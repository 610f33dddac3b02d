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

import { FlowSampler, type FlowScheduleOptions, type StepResult } from './flow-schedule.ts';

const f = Math.fround;

export class FlowEulerScheduler extends FlowSampler<'euler'> {
  constructor(opts: FlowScheduleOptions) {
    // Euler is first order on every step and has no corrector
    super('euler', opts, (steps) => Array.from({ length: steps }, (_, i) => ({ step: i, corrector: null, predictor: 1 })));
  }

  protected advance(v: Float32Array, sample: Float32Array): StepResult {
    const k = this.stepIndex;
    const sigma = this.sigmas[k]!;
    const dt = f(this.sigmas[k + 1]! - sigma); // f32 (sigma_next − sigma)
    const n = sample.length;
    const out = new Float32Array(n);
    const x0 = new Float32Array(n);
    for (let j = 0; j < n; j++) {
      out[j] = sample[j]! + f(dt * v[j]!);
      x0[j] = sample[j]! - f(sigma * v[j]!);
    }
    return { next: out, x0, info: { step: k, corrector: null, predictor: 1 } };
  }
}
