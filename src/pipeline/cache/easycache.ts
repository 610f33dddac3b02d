// EasyCache (Zhou et al., 2025), as its Wan 2.1 integration does it:
// H-EmbodVis/EasyCache, EasyCache4Wan2.1/easycache_generate.py `easycache_forward`
// (lines 486-640) and its setup (lines 956-975, t2v).
//
// What it uses, exactly (runtime-adaptive, no calibration):
// - it caches END TO END in latent space: the whole DiT forward (patch embedding, blocks, head) is
//   skipped and the prediction is `raw_input + cache`, with cache = output - raw_input of the
//   stream's last computed forward (lines 541, 553, 630, 635). raw_input is the latent x_t.
// - the decision is made at the cond (even) forward and holds for the pair (line 489
//   `should_calc_current_pair`); the uncond forward follows it.
// - after `ret_steps` = 10*2 forwards and before `cutoff_steps` = steps*2 - 2 (lines 974-975:
//   the first 10 steps and the last step always computed), with a transformation rate k known:
//   acc += k · mean|x_t - x_prev| / mean|out_last|, where x_prev is the previous STEP's input
//   (updated every step, line 530) and out_last the last computed cond output; skip while
//   acc < thresh, else compute and zero acc (lines 499-521).
// - k, after each computed cond forward that has a previous computed one:
//   k = mean|out - out_last| / mean|x_now - x_lastcomputed| (lines 609-625: `prev_prev_raw_input`
//   is the input of the last computed step, `previous_raw_input` already the current one).
// - thresh: argparse default 0.05 (line 799).
// Host arithmetic here is float64 (the reference accumulates a float32 0-d tensor): decisions
// can differ only where the accumulator lands within float32 rounding of the threshold.
// Nothing runs on the GPU for a skipped step: at level 3 nothing is uploaded.

import { meanAbs, meanAbsDiff } from './residual.ts';
import type { CacheMode, StepCache, StepInfo, StepLog, StepPlan } from './types.ts';

export interface EasyCacheOptions {
  threshold: number;
  /** steps always computed at the start (the reference: 10) */
  warmupSteps: number;
  /** most consecutive skipped steps (Infinity: the reference) */
  maxSkips: number;
  /** the number of DiT blocks (for the log) */
  blocks: number;
}

/**
 * The reference's state, over host arrays: the cond stream's inputs and outputs and each stream's
 * cache (output - input). One instance per request (and per expert segment).
 */
export class EasyCacheState {
  acc = 0;
  k: number | null = null;
  prevIn: Float32Array | null = null;
  prevPrevIn: Float32Array | null = null;
  prevOut: Float32Array | null = null;
  /** per row: output - input of its last computed forward */
  cache: Float32Array[] | null = null;
  skips = 0;
  constructor(readonly o: { threshold: number; retSteps: number; cutoffSteps: number; maxSkips: number }) {}

  /** The cond forward's decision at forward count cnt (lines 491-530): should_calc_current_pair. */
  decide(cnt: number, x: Float32Array): boolean {
    let calc: boolean;
    if (cnt < this.o.retSteps || cnt >= this.o.cutoffSteps) {
      calc = true;
      this.acc = 0;
    } else if (this.prevIn && this.prevOut) {
      const inChange = meanAbsDiff(x, this.prevIn);
      if (this.k !== null) {
        const outNorm = meanAbs(this.prevOut);
        this.acc += this.k * (inChange / outNorm);
        if (this.acc < this.o.threshold) calc = false;
        else {
          calc = true;
          this.acc = 0;
        }
      } else calc = true;
    } else calc = true;
    // infer.cache.max_skips (not in the reference)
    if (!calc && this.skips >= this.o.maxSkips) {
      calc = true;
      this.acc = 0;
    }
    if (!calc && !this.cache) calc = true; // nothing cached (lines 533-534: `previous_raw_output` must exist)
    this.skips = calc ? 0 : this.skips + 1;
    this.prevIn = Float32Array.from(x);
    return calc;
  }

  /** A computed step's outputs (per row, [C, F, H, W] each) — lines 607-635. */
  update(x: Float32Array, outs: Float32Array[]): void {
    const out = outs[0]!;
    if (this.prevOut && this.prevPrevIn) {
      const outChange = meanAbsDiff(out, this.prevOut);
      const inChange = meanAbsDiff(this.prevIn!, this.prevPrevIn);
      this.k = outChange / inChange;
    }
    this.prevPrevIn = this.prevIn;
    this.prevOut = Float32Array.from(out);
    this.cache = outs.map((o) => {
      const c = new Float32Array(o.length);
      for (let i = 0; i < o.length; i++) c[i] = o[i]! - x[i]!;
      return c;
    });
  }

  /** A skipped step's prediction per row: x + cache (lines 541, 553). */
  predict(x: Float32Array): Float32Array[] {
    return this.cache!.map((c) => {
      const p = new Float32Array(c.length);
      for (let i = 0; i < c.length; i++) p[i] = x[i]! + c[i]!;
      return p;
    });
  }
}

export class EasyCache implements StepCache {
  readonly mode: CacheMode = 'easycache';
  readonly log: StepLog[] = [];
  readonly describe: Record<string, unknown>;
  private state: EasyCacheState | null = null;

  constructor(readonly o: EasyCacheOptions) {
    this.describe = { threshold: o.threshold, warmup_steps: o.warmupSteps, max_skips: Number.isFinite(o.maxSkips) ? o.maxSkips : -1, last_step_computed: true, calibration: 'none (runtime-adaptive)' };
  }

  private stateFor(s: StepInfo): EasyCacheState {
    const localSteps = s.steps - s.segStart;
    return (this.state ??= new EasyCacheState({ threshold: this.o.threshold, retSteps: 2 * this.o.warmupSteps, cutoffSteps: 2 * localSteps - 2, maxSkips: this.o.maxSkips }));
  }

  async beginStep(s: StepInfo): Promise<StepPlan> {
    const st = this.stateFor(s);
    const calc = st.decide(2 * (s.step - s.segStart), s.latent);
    this.log.push({ step: s.step + 1, ran: Array(s.rows).fill(calc), blocks: calc ? this.o.blocks : 0 });
    if (calc) return { kind: 'forward', hook: null };
    const preds = st.predict(s.latent);
    const n = s.latent.length;
    const pred = new Float32Array(s.rows * n);
    preds.forEach((p, r) => pred.set(p, r * n));
    return { kind: 'skip', pred };
  }

  async endStep(s: StepInfo, pred: Float32Array): Promise<void> {
    const n = s.latent.length;
    const outs = Array.from({ length: s.rows }, (_, r) => pred.subarray(r * n, (r + 1) * n));
    this.stateFor(s).update(s.latent, outs);
  }

  reset(): void {
    this.state = null;
  }

  dispose(): void {
    this.state = null;
  }
}
