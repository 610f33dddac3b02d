// MagCache (Ma et al., 2025), as its Wan integrations do it:
// Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py `magcache_forward` (lines 276-311),
// `nearest_interp` (27-34), its setup (895-919) and its calibration `magcache_calibration`
// (163-175); for Wan 2.2's two experts MagCache4Wan2.2/magcache_generate.py (lines 294-303).
//
// What it uses, exactly:
// - `mag_ratios`: per forward (interleaved cond, uncond; two leading 1.0 pads), the mean over
//   tokens of |r_cnt| / |r_cnt-2| (L2 norm over the hidden dim of the blocks' residual
//   r = x - ori_x, against the same stream's previous forward), from an uncached calibration run
//   (lines 165-170: `(residual_x.norm(dim=-1) / residual_cache[cnt%2].norm(dim=-1)).mean()`,
//   rounded to 5 decimals). When the run's steps differ from the calibration's, each stream's
//   list is resampled with `nearest_interp` (np.round: half to even) — lines 914-919.
// - per forward with `cnt >= int(num_steps * retention_ratio)` (num_steps = 2 x steps):
//   accumulated_ratio *= mag_ratios[cnt]; accumulated_steps += 1;
//   accumulated_err += |1 - accumulated_ratio|; skip (reuse the stream's cached residual) while
//   accumulated_err < magcache_thresh and accumulated_steps <= K, else compute and zero all three
//   (lines 279-292). Before the retention point every forward computes and nothing accumulates.
//   No step is forced at the end.
// - defaults: magcache_thresh 0.12 (Wan 2.1, line 747) / 0.04 (Wan 2.2, its line 551),
//   retention_ratio 0.2, magcache_K 2.
// - Wan 2.2 (two experts, one `cnt` over the whole run): no MagCache while
//   cnt < int(split * retention_ratio), or split <= cnt <= (num_steps - split) * retention_ratio + split
//   (split = 2 x the high-noise expert's steps) — MagCache4Wan2.2 lines 296-300 (t2v).
//   This engine resets a cache's state at the expert switch (the reference keeps its accumulators);
//   its retention rule and ratio indices are the reference's.
//
// cond and uncond keep separate state (`cnt % 2`) and use different ratios, so they can decide
// differently at a step: the pipeline then runs the blocks for the one row that computes and adds
// the cached residual to the other (the DiT hook's row split), which keeps every stream's decisions
// exactly the reference's (test/step-cache.test.ts replays them).

import type { Engine } from '../../runtime/engine.ts';
import { HiddenStepCache, forwardCount } from './hidden.ts';
import type { StepInfo } from './types.ts';

/** The reference's `nearest_interp` (lines 27-34): np.round is round-half-to-even. */
export function nearestInterp(src: readonly number[], target: number): number[] {
  const n = src.length;
  if (target === 1) return [src[n - 1]!];
  const scale = (n - 1) / (target - 1);
  return Array.from({ length: target }, (_, i) => src[roundHalfEven(i * scale)]!);
}

export function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d < 0.5) return f;
  if (d > 0.5) return f + 1;
  return f % 2 === 0 ? f : f + 1;
}

/** mag_ratios (interleaved, length 2 x calibration steps) for a run of `steps`, as lines 914-919 resample them. */
export function ratiosForSteps(magRatios: readonly number[], steps: number): number[] {
  if (magRatios.length === 2 * steps) return [...magRatios];
  const cond = nearestInterp(magRatios.filter((_, i) => i % 2 === 0), steps);
  const uncond = nearestInterp(magRatios.filter((_, i) => i % 2 === 1), steps);
  return cond.flatMap((c, i) => [c, uncond[i]!]);
}

/**
 * Does the reference apply MagCache at forward `cnt` (global over the run; `forwards` = 2 x steps)?
 * `split`: forwards of the first expert in a two-expert run (null: one DiT). `retainForwards`
 * replaces int(forwards x ratio) for one-DiT runs when warm-up steps are set explicitly.
 */
export function magcacheApplies(cnt: number, forwards: number, ratio: number, split: number | null, retainForwards?: number): boolean {
  if (split === null) return cnt >= (retainForwards ?? Math.trunc(forwards * ratio));
  // MagCache4Wan2.2 lines 299-300 (t2v)
  if (cnt < Math.trunc(split * ratio)) return false;
  if (cnt <= (forwards - split) * ratio + split && cnt >= split) return false;
  return true;
}

export interface MagCacheParams {
  threshold: number;
  K: number;
}

/** One stream's state (the reference's accumulated_ratio/steps/err[cnt % 2]); returns skip_forward. */
export class MagCacheStream {
  accRatio = 1.0;
  accSteps = 0;
  accErr = 0.0;
  constructor(readonly p: MagCacheParams) {}
  decide(applies: boolean, ratio: number, canSkip = true): boolean {
    if (!applies) return false;
    this.accRatio = this.accRatio * ratio;
    this.accSteps += 1;
    this.accErr += Math.abs(1 - this.accRatio);
    // (canSkip false: nothing cached after the expert switch, computed as in the compute branch)
    if (this.accErr < this.p.threshold && this.accSteps <= this.p.K && canSkip) return true;
    this.accErr = 0;
    this.accSteps = 0;
    this.accRatio = 1.0;
    return false;
  }
}

export interface MagCacheOptions {
  /** interleaved ratios for this run's steps (after ratiosForSteps) */
  ratios: number[];
  threshold: number;
  K: number;
  retentionRatio: number;
  /** warm-up steps given explicitly (one-DiT runs): forwards cnt < 2 x this compute; null = retention_ratio */
  warmupSteps: number | null;
  source: string;
  calibrationSteps: number;
}

export class MagCache extends HiddenStepCache {
  private streams: MagCacheStream[] = [];
  readonly describe: Record<string, unknown>;

  constructor(
    engine: Engine,
    readonly o: MagCacheOptions,
  ) {
    super(engine, 'magcache');
    this.describe = {
      threshold: o.threshold,
      max_skips: o.K,
      retention_ratio: o.retentionRatio,
      ...(o.warmupSteps !== null ? { warmup_steps: o.warmupSteps } : {}),
      calibration: o.source,
      calibration_steps: o.calibrationSteps,
    };
  }

  protected async decide(s: StepInfo, _sig: unknown, cached: boolean): Promise<boolean[]> {
    if (this.streams.length === 0) this.streams = Array.from({ length: s.rows }, () => new MagCacheStream({ threshold: this.o.threshold, K: this.o.K }));
    const forwards = 2 * s.steps;
    const split = s.segments > 1 ? 2 * s.firstSegSteps : null;
    return this.streams.map((st, row) => {
      const cnt = forwardCount(s.step, row); // global: the reference's one counter over the run
      const applies = magcacheApplies(cnt, forwards, this.o.retentionRatio, split, this.o.warmupSteps !== null && split === null ? 2 * this.o.warmupSteps : undefined);
      return !st.decide(applies, this.o.ratios[cnt] ?? 1, cached);
    });
  }

  protected resetState(): void {
    this.streams = [];
  }
}

// Official ratios (T2V, calibrated at 50 steps; MagCache4Wan2.1 lines 910-912, MagCache4Wan2.2
// line 695), with the two leading 1.0 pads of the reference.
const pad = (r: number[]) => [1.0, 1.0, ...r];
export const MAGCACHE_WAN: Record<'wan21-1.3B' | 'wan21-14B' | 'wan22-A14B', { ratios: number[]; threshold: number }> = {
  'wan21-14B': {
    threshold: 0.12,
    ratios: pad([
      1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966, 0.99658, 0.99482, 0.99476, 0.99467, 0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533, 0.99545,
      0.99468, 0.99465, 0.99438, 0.99434, 0.99516, 0.99517, 0.99384, 0.9938, 0.99404, 0.99401, 0.99517, 0.99516, 0.99409, 0.99408, 0.99428, 0.99426, 0.99347, 0.99343, 0.99418, 0.99416,
      0.99271, 0.99269, 0.99313, 0.99311, 0.99215, 0.99215, 0.99218, 0.99215, 0.99216, 0.99217, 0.99163, 0.99161, 0.99138, 0.99135, 0.98982, 0.9898, 0.98996, 0.98995, 0.9887, 0.98866,
      0.98772, 0.9877, 0.98767, 0.98765, 0.98573, 0.9857, 0.98501, 0.98498, 0.9838, 0.98376, 0.98177, 0.98173, 0.98037, 0.98035, 0.97678, 0.97677, 0.97546, 0.97543, 0.97184, 0.97183,
      0.96711, 0.96708, 0.96349, 0.96345, 0.95629, 0.95625, 0.94926, 0.94929, 0.93964, 0.93961, 0.92511, 0.92504, 0.90693, 0.90678, 0.8796, 0.87945, 0.86111, 0.86189,
    ]),
  },
  'wan21-1.3B': {
    threshold: 0.12,
    ratios: pad([
      1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634, 0.99685, 0.99567, 0.99586, 0.99416, 0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511, 0.99506,
      0.99535, 0.99531, 0.99552, 0.99549, 0.99541, 0.99539, 0.9954, 0.99536, 0.99489, 0.99485, 0.99518, 0.99514, 0.99484, 0.99478, 0.99481, 0.99479, 0.99415, 0.99413, 0.99419, 0.99416,
      0.99396, 0.99393, 0.99388, 0.99386, 0.99349, 0.99349, 0.99309, 0.99304, 0.9927, 0.9927, 0.99228, 0.99226, 0.99171, 0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005, 0.99003,
      0.98944, 0.98942, 0.98849, 0.98849, 0.98758, 0.98757, 0.98644, 0.98643, 0.98504, 0.98503, 0.9836, 0.98359, 0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718, 0.9741, 0.97411,
      0.97003, 0.97002, 0.96538, 0.96541, 0.9593, 0.95933, 0.95086, 0.95089, 0.94013, 0.94019, 0.92402, 0.92414, 0.90241, 0.9026, 0.86821, 0.86868, 0.81838, 0.81939,
    ]),
  },
  'wan22-A14B': {
    threshold: 0.04,
    ratios: pad([
      1.00124, 1.00155, 0.99822, 0.99851, 0.99696, 0.99687, 0.99703, 0.99732, 0.9966, 0.99679, 0.99602, 0.99658, 0.99578, 0.99664, 0.99484, 0.9949, 0.99633, 0.996, 0.99659, 0.99683,
      0.99534, 0.99549, 0.99584, 0.99577, 0.99681, 0.99694, 0.99563, 0.99554, 0.9944, 0.99473, 0.99594, 0.9964, 0.99466, 0.99461, 0.99453, 0.99481, 0.99389, 0.99365, 0.99391, 0.99406,
      0.99354, 0.99361, 0.99283, 0.99278, 0.99268, 0.99263, 0.99057, 0.99091, 0.99125, 0.99126, 0.65523, 0.65252, 0.98808, 0.98852, 0.98765, 0.98736, 0.9851, 0.98535, 0.98311, 0.98339,
      0.9805, 0.9806, 0.97776, 0.97771, 0.97278, 0.97286, 0.96731, 0.96728, 0.95857, 0.95855, 0.94385, 0.94385, 0.92118, 0.921, 0.88108, 0.88076, 0.80263, 0.80181,
    ]),
  },
};
