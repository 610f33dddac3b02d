// Wan's flow sigma schedule, shared by both samplers (flow-unipc.ts, flow-euler.ts), so that they
// see the same timesteps and can be compared. Float64 numpy math, as the reference computes it.
// Also the step bookkeeping both samplers share (FlowSampler).

import type { FlowScheduler, SchedulerKind, StepInfo } from './types.ts';
import { ConfigError, ShapeError, SmartDiffusionError } from '../util/errors.ts';

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

function checkScheduleOptions(op: string, o: FlowScheduleOptions): Required<FlowScheduleOptions> {
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

/** What a sampler's step computes; FlowSampler keeps x0 and info for lastX0 / lastStepInfo. */
export interface StepResult {
  next: Float32Array;
  x0: Float32Array;
  info: StepInfo;
}

/**
 * The part of a flow sampler that is not its solver: Wan's schedule for the options, the checks
 * of a step call (`[kind] ...` errors: steps in order, none past the last, v the sample's size),
 * and the last step's x0 and orders. A sampler implements `advance` (step `stepIndex`, its inputs
 * checked) and extends `reset` with its solver state.
 */
export abstract class FlowSampler<K extends SchedulerKind> implements FlowScheduler {
  readonly timesteps: Int32Array;
  readonly sigmas: Float32Array;
  readonly steps: number;
  readonly orders: readonly StepInfo[];

  /** the step the next `step` call must be; advance runs with it still at that step */
  protected stepIndex = 0;
  private x0: Float32Array | null = null;
  private info: StepInfo | null = null;

  /** `orders`: the solver orders each of `steps` steps will use */
  constructor(readonly kind: K, opts: FlowScheduleOptions, orders: (steps: number) => StepInfo[]) {
    const o = checkScheduleOptions(kind, opts);
    const s = wanFlowSchedule(o);
    this.timesteps = s.timesteps;
    this.sigmas = s.sigmas;
    this.steps = o.steps;
    this.orders = orders(o.steps);
  }

  protected abstract advance(v: Float32Array, sample: Float32Array): StepResult;

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
    const tag = `[${this.kind}]`;
    if (i !== k) {
      throw new SmartDiffusionError(
        'BAD_STEP',
        `${tag} step(${i}) called but the scheduler is at step ${k} of ${this.steps}; call the steps in order 0..${this.steps - 1}, or reset() to start over`,
      );
    }
    if (k >= this.steps) throw new SmartDiffusionError('BAD_STEP', `${tag} all ${this.steps} steps are done; call reset() to start over`);
    if (v.length !== sample.length) {
      throw new ShapeError(`${tag} model output has ${v.length} values but the sample has ${sample.length}; pass the guided prediction for this sample`);
    }
    const r = this.advance(v, sample);
    this.stepIndex++;
    this.x0 = r.x0;
    this.info = r.info;
    return r.next;
  }
}
