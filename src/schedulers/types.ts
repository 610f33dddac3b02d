// The contract every flow sampler implements (index.ts creates them by kind).

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
