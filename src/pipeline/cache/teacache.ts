// TeaCache (Liu et al., CVPR 2025), as its Wan 2.1 integration does it:
// ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py, `teacache_forward` (lines 519-568)
// and its setup in `generate` (lines 867-894, t2v).
//
// What it uses, exactly:
// - the "modulated input" is Wan's time embedding `e` [B, dim] (use_ret_steps = false) or its
//   time projection `e0` [B, 6, dim] (use_ret_steps = true) — line 520
//   `modulated_inp = e0 if self.use_ref_steps else e`. Both depend on the timestep only, so the
//   cond and uncond forwards of a step see the same value.
// - per forward: rel-L1 = mean|inp - prev| / mean|prev| against the previous forward OF THE SAME
//   STREAM (cond = even `cnt`, uncond = odd), rescaled by np.poly1d(coefficients) and accumulated;
//   below `teacache_thresh` the forward is skipped (the stream's cached residual
//   `x - ori_x` of the blocks is added instead), otherwise computed and the accumulator zeroed
//   (lines 522-550). `previous_e0_*` is updated at every forward, skipped or not (535, 550).
// - `cnt` counts forwards (two per step) from 0; `cnt < ret_steps` or `cnt >= cutoff_steps`
//   always computes (and zeroes the accumulator): use_ret_steps -> ret_steps = 5*2,
//   cutoff_steps = steps*2 (the last step is NOT forced); otherwise ret_steps = 1*2,
//   cutoff_steps = steps*2 - 2 (the first and the last step computed) — lines 881-894.
// - coefficients (t2v): 1.3B [2.39676752e+03, ...] (e) / [-5.21862437e+04, ...] (e0); 14B
//   [-5784.54975374, ...] (e) / [-3.03318725e+05, ...] (e0) — lines 883-892, chosen there by the
//   checkpoint folder's name, here by the DiT's shape (index.ts).
// - threshold: argparse default 0.2 (line 737); the README's 1.3B command uses 0.08.
// - no limit on consecutive skips in the reference; infer.cache.max_skips adds one (off by default).
//
// Our CFG forward is batched (row 0 cond, row 1 uncond). Each row keeps the reference's own stream
// state (`cnt` = 2·step + row); since both rows see the same e / e0, their decisions are the same
// at every step (test/step-cache.test.ts checks the per-stream masks against the reference loop),
// and the pipeline's split of a batch (one row runs) never happens for TeaCache in practice.

import type { Engine } from '../../runtime/engine.ts';
import { HiddenStepCache, forwardCount, type TimeSignals } from './hidden.ts';
import { relL1 } from './residual.ts';
import type { StepInfo } from './types.ts';

/** Official Wan 2.1 T2V rescale polynomials (teacache_generate.py lines 883-892), np.poly1d order. */
export const TEACACHE_WAN21: Record<'1.3B' | '14B', { e: number[]; e0: number[] }> = {
  '1.3B': {
    e: [2.39676752e3, -1.31110545e3, 2.01331979e2, -8.29855975, 1.37887774e-1],
    e0: [-5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1, -4.99875664e-2],
  },
  '14B': {
    e: [-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404],
    e0: [-3.03318725e5, 4.90537029e4, -2.65530556e3, 5.87365115e1, -3.15583525e-1],
  },
};

/** np.poly1d(c)(x): c[0]·x^n + ... + c[n] (Horner, float64) */
export function poly1d(c: readonly number[], x: number): number {
  let y = 0;
  for (const k of c) y = y * x + k;
  return y;
}

export interface TeaCacheParams {
  coefficients: readonly number[];
  threshold: number;
  /** forwards always computed at the start (the reference's ret_steps: 2 or 10) */
  retSteps: number;
  /** forwards from which every forward is computed (the reference's cutoff_steps) */
  cutoffSteps: number;
  /** most consecutive skips of a stream (Infinity: the reference) */
  maxSkips: number;
}

/**
 * One stream's decision state (the reference's `accumulated_rel_l1_distance_even/odd`), in the
 * order of its lines 524-534. `rel` is the rel-L1 of this forward's modulated input against the
 * stream's previous one (unused while forced). Returns should_calc.
 */
export class TeaCacheStream {
  acc = 0;
  skips = 0;
  constructor(readonly p: TeaCacheParams) {}
  decide(cnt: number, rel: number | null, canSkip = true): boolean {
    let calc: boolean;
    if (cnt < this.p.retSteps || cnt >= this.p.cutoffSteps || rel === null) {
      calc = true;
      this.acc = 0;
    } else {
      this.acc += poly1d(this.p.coefficients, rel);
      if (this.acc < this.p.threshold) calc = false;
      else {
        calc = true;
        this.acc = 0;
      }
    }
    // infer.cache.max_skips (not in the reference), or nothing cached (after the Wan 2.2 expert
    // switch): computed as in the reference's compute branch
    if (!calc && (this.skips >= this.p.maxSkips || !canSkip)) {
      calc = true;
      this.acc = 0;
    }
    this.skips = calc ? 0 : this.skips + 1;
    return calc;
  }
}

export interface TeaCacheOptions {
  coefficients: readonly number[];
  useRetSteps: boolean;
  threshold: number;
  /** warm-up steps (the reference: 1, or 5 with use_ret_steps) */
  warmupSteps: number;
  /** is the last step forced (the reference: only without use_ret_steps) */
  lastStepComputed: boolean;
  maxSkips: number;
  source: string;
}

export class TeaCache extends HiddenStepCache {
  private streams: TeaCacheStream[] = [];
  private prevInp: Float32Array | null = null;
  readonly describe: Record<string, unknown>;

  constructor(
    engine: Engine,
    readonly o: TeaCacheOptions,
  ) {
    super(engine, 'teacache');
    this.describe = {
      threshold: o.threshold,
      warmup_steps: o.warmupSteps,
      max_skips: Number.isFinite(o.maxSkips) ? o.maxSkips : -1,
      use_ret_steps: o.useRetSteps,
      modulated_input: o.useRetSteps ? 'e0' : 'e',
      last_step_computed: o.lastStepComputed,
      coefficients: [...o.coefficients],
      calibration: o.source,
    };
  }

  /** the reference's parameters in this segment's forward counts */
  params(s: StepInfo): TeaCacheParams {
    const localSteps = s.steps - s.segStart;
    return {
      coefficients: this.o.coefficients,
      threshold: this.o.threshold,
      retSteps: 2 * this.o.warmupSteps,
      cutoffSteps: this.o.lastStepComputed ? 2 * localSteps - 2 : 2 * localSteps,
      maxSkips: this.o.maxSkips,
    };
  }

  protected async decide(s: StepInfo, sig: TimeSignals, cached: boolean): Promise<boolean[]> {
    if (this.streams.length === 0) this.streams = Array.from({ length: s.rows }, () => new TeaCacheStream(this.params(s)));
    const inp = this.o.useRetSteps ? await sig.e0() : await sig.e();
    const rel = this.prevInp ? relL1(inp, this.prevInp) : null;
    this.prevInp = inp;
    const local = s.step - s.segStart;
    return this.streams.map((st, row) => st.decide(forwardCount(local, row), rel, cached));
  }

  protected resetState(): void {
    this.streams = [];
    this.prevInp = null;
  }
}
