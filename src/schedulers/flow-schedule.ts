// Wan's flow sigma schedule, shared by both samplers (flow-unipc.ts, flow-euler.ts), so that they
// see the same timesteps and can be compared. Float64 numpy math, as the reference computes it.

import { ConfigError } from '../util/errors.ts';

const f = Math.fround;

export interface FlowScheduleOptions {
  steps: number;
  /** flow shift (Wan: sample_shift; diffusers scheduler_config.json: flow_shift) */
  shift: number;
  numTrainTimesteps?: number;
}

export interface FlowSchedule {
  /** integers the model receives: int64(s·T) truncation of the f64 shifted sigmas [N] */
  timesteps: Int32Array;
  /** float32([s, 0]) [N+1] */
  sigmas: Float32Array;
}

export function checkScheduleOptions(op: string, o: FlowScheduleOptions): Required<FlowScheduleOptions> {
  const T = o.numTrainTimesteps ?? 1000;
  if (!Number.isInteger(o.steps) || o.steps < 1) throw new ConfigError(`[${op}] steps must be an integer >= 1, got ${o.steps}`);
  if (!Number.isFinite(o.shift) || o.shift <= 0) throw new ConfigError(`[${op}] shift must be a finite number > 0, got ${o.shift}`);
  if (!Number.isInteger(T) || T < 2) throw new ConfigError(`[${op}] numTrainTimesteps must be an integer >= 2, got ${T}`);
  return { steps: o.steps, shift: o.shift, numTrainTimesteps: T };
}

/**
 * Wan's flow sigma schedule (FlowUniPCMultistepScheduler.__init__ with shift=1, then
 * set_timesteps(N, shift)):
 *   sigma_max = float32(1 − 1/T) (0.999 for T = 1000; `.item()` widens it to f64), sigma_min = 0;
 *   s = linspace(sigma_max, 0, N+1)[:-1]                 (numpy f64: s_k = k·step + start)
 *   s = shift·s / (1 + (shift−1)·s)                      (f64)
 *   timesteps = int64(s·T)                               (truncation)
 *   sigmas = float32([s, 0])
 */
export function wanFlowSchedule(opts: FlowScheduleOptions): FlowSchedule {
  const { steps: N, shift, numTrainTimesteps: T } = checkScheduleOptions('flow_schedule', opts);
  // __init__: alphas = linspace(1, 1/T, T)[::-1]; sigmas = float32(1 − alphas); linspace's last
  // element is exactly `stop`, so sigmas[0] = float32(1 − 1/T) and sigmas[-1] = 1 − 1 = 0.
  // (The __init__ shift is 1 in Wan's generate(), an exact identity.)
  const sigmaMax = f(1 - 1 / T);
  const sigmaMin = 0;
  // numpy.linspace(start, stop, num=N+1): step = (stop − start)/N; y_k = k·step + start.
  const step = (sigmaMin - sigmaMax) / N;
  const timesteps = new Int32Array(N);
  const sigmas = new Float32Array(N + 1);
  for (let k = 0; k < N; k++) {
    const s0 = k * step + sigmaMax;
    const s = (shift * s0) / (1 + (shift - 1) * s0);
    timesteps[k] = Math.trunc(s * T);
    sigmas[k] = s;
  }
  sigmas[N] = 0;
  return { timesteps, sigmas };
}
