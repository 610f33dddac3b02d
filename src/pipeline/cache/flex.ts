// flex: this engine's own step cache. It decides WHEN to skip from the timestep signal, and what to
// put in the place of a skipped forward from the residuals it OBSERVED at the last two computed steps.
//
// - Decision (TeaCache's rule, the same accumulator): the rel-L1 change of Wan's time embedding e
//   (or e0 with infer.cache.use_ret_steps) from step to step, rescaled by the model's TeaCache
//   polynomial when it has one (built in or calibrated), raw otherwise, is accumulated since the
//   last computed step; the step is skipped while the sum stays under the threshold, at most
//   max_skips in a row, after warmup_steps, and never at the last step (the largest sigma step:
//   0.21 of the schedule's 1.0 at 20 steps, shift 5).
// - A skipped step's residual (blocks' output - input, all CFG rows) is EXTRAPOLATED from the last
//   two computed ones r_j, r_k (steps j < k), damped:
//       r = r_k + c (r_k - r_j),  c = gamma · alpha(k - j) · (L(t) - L(t_k)) / (L(t_k) - L(t_j))
//   L = log-SNR of the flow schedule, log((1 - sigma) / sigma) with sigma = t / 1000: the DiT's output
//   changes at a roughly even pace in L (on the demo 0.2-0.6 of its norm per unit of L over all 20
//   steps, while per unit of sigma it changes 20-30x faster at the first steps than at the last), so L is
//   the coordinate in which a straight line fits. alpha(g) = ALPHA · min(1, (BASE_STEPS / g)^2): a
//   slope taken from two steps g apart predicts worse the larger g is (the trajectory bends), so far
//   apart computed steps are trusted less. gamma = infer.cache.extrapolation (default 1; 0 = plain reuse).
//
// Why damped, and these numbers (demo model, 20 steps, PSNR of the video against the uncached one;
// more in docs/caching.md, written by bench/cache.ts): on TeaCache's 10-forward schedule, 6 pairs,
// plain reuse gave 40.4 dB; the first version's undamped line in the timestep 33.8 (capped at 1:
// 34.9); damped lines in log-SNR 42.8 / 43.3 / 42.2 / 41.3 dB for a flat 0.3 / 0.4 / 0.5 / 0.7.
// Offline, on recorded uncached runs, the least-squares best damping for predicting the next output
// was 0.76 / 0.71 / 0.61 for slopes taken 1 / 2 / 3 steps apart (1 step ahead), 0.34 for 3 apart /
// 3 ahead. At 6 forwards (computed steps 4-5 apart) a flat 0.4 lost 3-6 dB against reuse and a flat
// 0.1 gained 1.9 dB (3 pairs): hence the fall-off. On 10 other pairs (seeds 7000+): reuse 35.7,
// flat 0.4 37.8, this rule 37.6 dB at 10 forwards; 31.5 / 32.0 / 31.9 at 8.

import type { Engine } from '../../runtime/engine.ts';
import type { Tensor } from '../../tensor/tensor.ts';
import { binary } from '../../ops/elementwise.ts';
import { HiddenStepCache, type TimeSignals } from './hidden.ts';
import { relL1, type HiddenResiduals } from './residual.ts';
import { poly1d } from './teacache.ts';
import type { StepInfo } from './types.ts';

/** damping of the extrapolation when the last two computed steps are at most BASE_STEPS apart */
export const ALPHA = 0.4;
/** computed steps farther apart than this: the damping falls as (BASE_STEPS / gap)^2 */
export const BASE_STEPS = 2.5;

/** log-SNR of the flow schedule at timestep t (sigma = t / 1000, clamped to [1e-4, 1 - 1e-4]) */
export function logSnr(t: number): number {
  const s = Math.min(1 - 1e-4, Math.max(1e-4, t / 1000));
  return Math.log((1 - s) / s);
}

/** alpha(g): the damping for a slope taken from computed steps g apart */
export function damping(gap: number): number {
  return ALPHA * Math.min(1, (BASE_STEPS / gap) ** 2);
}

export interface FlexParams {
  threshold: number;
  /** steps always computed at the start of a segment */
  warmupSteps: number;
  maxSkips: number;
  /** TeaCache polynomial for the timestep signal (null: the raw rel-L1) */
  coefficients: readonly number[] | null;
}

/**
 * The decision and extrapolation state (host numbers only). Per step: `decide(localStep, forced, t,
 * tRel)`; after a computed step: `computed(t)` (the step of the last `decide`); for a skipped step:
 * `coefficient(t, gamma)`.
 */
export class FlexDecider {
  acc = 0;
  skips = 0;
  /** step index and timestep of the last two computed steps (k, then j) */
  kStep: number | null = null;
  tK: number | null = null;
  jStep: number | null = null;
  tJ: number | null = null;
  private step = 0;
  constructor(readonly p: FlexParams) {}

  /** `forced`: the last step, or nothing cached (the first step, after the expert switch); tRel: rel-L1 of e against the previous step's (null at the first) */
  decide(localStep: number, forced: boolean, _t: number, tRel: number | null): boolean {
    this.step = localStep;
    let calc: boolean;
    if (localStep < this.p.warmupSteps || forced || tRel === null) calc = true;
    else {
      this.acc += this.p.coefficients ? poly1d(this.p.coefficients, tRel) : tRel;
      calc = !(this.acc < this.p.threshold && this.skips < this.p.maxSkips);
    }
    if (calc) {
      this.acc = 0;
      this.skips = 0;
    } else this.skips++;
    return calc;
  }

  /** the step of the last `decide` was computed, at timestep t */
  computed(t: number, _unused?: unknown): void {
    this.jStep = this.kStep;
    this.tJ = this.tK;
    this.kStep = this.step;
    this.tK = t;
  }

  /** c of r_k + c (r_k - r_j) at timestep t (0: reuse r_k; also while fewer than two steps were computed) */
  coefficient(t: number, gamma: number): number {
    if (this.tK === null || this.tJ === null || this.kStep === null || this.jStep === null || gamma === 0) return 0;
    const base = logSnr(this.tK) - logSnr(this.tJ);
    if (!(base > 0)) return 0;
    return gamma * damping(this.kStep - this.jStep) * ((logSnr(t) - logSnr(this.tK)) / base);
  }
}

export interface FlexOptions extends FlexParams {
  useRetSteps: boolean;
  source: string;
  /** gamma: scales the damped extrapolation (infer.cache.extrapolation; 1 = as tuned, 0 = reuse r_k as it is) */
  extrapolation: number;
}

export class Flex extends HiddenStepCache {
  private d: FlexDecider;
  private prevInp: Float32Array | null = null;
  readonly describe: Record<string, unknown>;

  constructor(
    engine: Engine,
    readonly o: FlexOptions,
  ) {
    super(engine, 'flex', 2);
    this.d = new FlexDecider(o);
    this.describe = {
      threshold: o.threshold,
      warmup_steps: o.warmupSteps,
      max_skips: Number.isFinite(o.maxSkips) ? o.maxSkips : -1,
      use_ret_steps: o.useRetSteps,
      timestep_signal: o.coefficients ? `TeaCache-rescaled rel-L1 of ${o.useRetSteps ? 'e0' : 'e'}` : `raw rel-L1 of ${o.useRetSteps ? 'e0' : 'e'}`,
      calibration: o.source,
      extrapolation: o.extrapolation,
      residual: `extrapolated in log-SNR from the last two computed steps, damped ${ALPHA} x min(1, (${BASE_STEPS} / gap)^2)`,
    };
  }

  protected async decide(s: StepInfo, sig: TimeSignals, cached: boolean): Promise<boolean[]> {
    const inp = this.o.useRetSteps ? await sig.e0() : await sig.e();
    const rel = this.prevInp ? relL1(inp, this.prevInp) : null;
    this.prevInp = inp;
    const calc = this.d.decide(s.step - s.segStart, s.step === s.steps - 1 || !cached, s.timestep, rel);
    return Array(s.rows).fill(calc);
  }

  protected override async inspect(s: StepInfo): Promise<void> {
    this.d.computed(s.timestep);
  }

  protected override residualFor(s: StepInfo, res: HiddenResiduals = this.res): { t: Tensor; owned: boolean } {
    const { last, prev } = res;
    const c = prev ? this.d.coefficient(s.timestep, this.o.extrapolation) : 0;
    if (c === 0) return { t: last!, owned: false };
    // prev + (1 + c)(last - prev) = last + c (last - prev)
    return { t: binary({ a: prev!, b: last! }, { kind: 'lerp', alpha: 1 + c }), owned: true };
  }

  protected resetState(): void {
    this.d = new FlexDecider(this.o);
    this.prevInp = null;
  }
}
