// Waiting for the GPU without burning a core.
//
// dawn.node delivers GPU promises by re-scheduling `setImmediate(ProcessEvents)` for as long as any
// promise is pending (google/dawn src/dawn/node/binding/AsyncRunner.cpp), so `await
// mapAsync(...)` right after a submit spins the main thread. On a 2-core machine running lavapipe
// that spinning core is taken from the GPU's own worker threads (measured: 931 ms vs 775 ms for
// one kernel). The engine therefore sleeps (a plain timer: the event loop blocks in epoll) for
// the time it predicts the submitted work needs, and only then creates the promise.
//
// The prediction is a per-engine linear model  ms ≈ a·Mwork + b·dispatches, with work =
// flops + bytes of the ops submitted, fitted online by exponentially-forgetting least squares on
// the waits that were not over-slept. Over-slept waits (the promise resolved at once) only
// shrink the model, so it converges to sleeping slightly less than the true time.

export class WaitPredictor {
  // normal equations of weighted least squares for [a, b]
  private sxx = 0;
  private sxy = 0;
  private syy = 0;
  private sxt = 0;
  private syt = 0;
  private n = 0;
  private readonly forget: number;
  /** fraction of the predicted time actually slept (leave room for noise) */
  sleepFraction = 0.85;
  /** don't bother sleeping below this (ms) */
  minSleepMs = 1;

  constructor(forget = 0.97) {
    this.forget = forget;
  }

  /** predicted ms for `work` (flops + bytes) over `dispatches` dispatches; 0 until calibrated */
  predict(work: number, dispatches: number): number {
    if (this.n < 2) return 0;
    const [a, b] = this.coeffs();
    return Math.max(0, a * (work / 1e6) + b * dispatches);
  }

  coeffs(): [number, number] {
    const det = this.sxx * this.syy - this.sxy * this.sxy;
    if (Math.abs(det) < 1e-12 * Math.max(1, this.sxx * this.syy)) {
      // degenerate (all observations proportional): fit a alone
      const a = this.sxx > 0 ? this.sxt / this.sxx : 0;
      return [Math.max(0, a), 0];
    }
    let a = (this.sxt * this.syy - this.syt * this.sxy) / det;
    let b = (this.syt * this.sxx - this.sxt * this.sxy) / det;
    if (a < 0 || b < 0) {
      // keep the model physical: refit with one coefficient
      if (a < 0) {
        a = 0;
        b = this.syy > 0 ? Math.max(0, this.syt / this.syy) : 0;
      } else {
        b = 0;
        a = this.sxx > 0 ? Math.max(0, this.sxt / this.sxx) : 0;
      }
    }
    return [a, b];
  }

  /** largest submit-to-done time observed (caps the sleep: a wrong model must never stall a run) */
  maxObservedMs = 0;

  /** How long to sleep before awaiting work predicted to take `predicted` ms. */
  sleepFor(predicted: number): number {
    return Math.min(predicted * this.sleepFraction, this.maxObservedMs * 2 + 10);
  }

  /**
   * An await that resolved at once: we slept at least as long as the work took, so `predicted`
   * was too high by an unknown amount. Halve it for this shape of work (the model then converges
   * from above quickly; under-predictions are measured exactly and pull it back up).
   */
  observeOversleep(work: number, dispatches: number, predicted: number): void {
    this.observe(work, dispatches, predicted * 0.5);
  }

  /** record that `work`/`dispatches` took `ms` from submit to completion */
  observe(work: number, dispatches: number, ms: number): void {
    const x = work / 1e6;
    const y = dispatches;
    const f = this.forget;
    this.maxObservedMs = Math.max(this.maxObservedMs, ms);
    this.sxx = this.sxx * f + x * x;
    this.sxy = this.sxy * f + x * y;
    this.syy = this.syy * f + y * y;
    this.sxt = this.sxt * f + x * ms;
    this.syt = this.syt * f + y * ms;
    this.n++;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
