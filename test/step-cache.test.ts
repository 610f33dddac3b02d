// Step caching (src/pipeline/cache/): each published method's decisions against a straight port
// of its reference loop (written here from the reference files, not from our code), on a recorded
// demo-model trajectory (test/fixtures/cache/demo-trajectory.json, make-trajectory.ts) and on
// synthetic ones; then the methods in the pipeline: `off` is bit-identical to the uncached path,
// skipping works at levels 0 and 3 (level 3: the saved uploads, counted), with both samplers,
// Wan 2.2's expert switch resets the state, missing calibration is a one-line ConfigError, and the
// settings are checked.
import { describe, it, expect } from 'vitest';
import { readFileSync, writeFileSync, mkdtempSync, cpSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { tmpdir } from 'node:os';
import { fileURLToPath } from 'node:url';
import { getEngine } from './helpers/gpu.ts';
import { tinyModelWithTokenizer } from './helpers/models.ts';
import { loadGolden } from './helpers/golden.ts';
import { WanPipeline, type GenerateRequest, type GenerateResult, type ProgressEvent, type WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { TeaCache, TeaCacheStream, TEACACHE_WAN21, poly1d } from '../src/pipeline/cache/teacache.ts';
import { MagCache, MAGCACHE_WAN, nearestInterp, roundHalfEven, ratiosForSteps } from '../src/pipeline/cache/magcache.ts';
import { EasyCache } from '../src/pipeline/cache/easycache.ts';
import { FlexDecider, damping, logSnr } from '../src/pipeline/cache/flex.ts';
import { polyfit, fitMagCache } from '../src/pipeline/cache/calibrate.ts';
import { readCacheCalibration } from '../src/pipeline/cache/index.ts';
import type { StepInfo, CacheSignals } from '../src/pipeline/cache/types.ts';
import type { DitStepCache, DitStepPlan } from '../src/models/wan_dit/model.ts';
import { sidecar, profileText } from '../src/pipeline/report.ts';
import { settingsForModel, overridesLayer } from '../src/config/settings.ts';
import { ConfigError } from '../src/util/errors.ts';
import { Rng } from '../src/util/rng.ts';
import { RESIDENT, type BlockResidency } from '../src/nn/residency.ts';
import type { Engine } from '../src/runtime/engine.ts';
import type { Tensor } from '../src/tensor/tensor.ts';

const HERE = dirname(fileURLToPath(import.meta.url));
const DEMO = join(HERE, '..', 'weights', 'demo');
interface FixtureStep {
  step: number;
  timestep: number;
  eRelL1: number | null;
  e0RelL1: number | null;
  magRatio: Array<number | null>;
  sample: { x: number[]; out: number[][] };
}
const TRAJ = JSON.parse(readFileSync(join(HERE, 'fixtures', 'cache', 'demo-trajectory.json'), 'utf8')) as { rows: number; steps: FixtureStep[] };
const NOENGINE = null as unknown as Engine;

// ------------------------------------------------------------------ reference ports
// Each is a transliteration of the reference's per-forward loop, `cnt` counting forwards (cond
// even, uncond odd), state in `self`.

const absMean = (a: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i]!);
  return s / a.length;
};
const absMeanDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i]! - b[i]!);
  return s / a.length;
};
const polyRef = (c: readonly number[], x: number) => c.reduce((y, k) => y * x + k, 0); // np.poly1d

/**
 * ali-vilab/TeaCache TeaCache4Wan2.1/teacache_generate.py: teacache_forward lines 519-550 and
 * 579-581, with the t2v setup of lines 871-894. `inputs[f]` is forward f's modulated input
 * (e or e0). Returns should_calc per forward.
 */
function teacacheRef(inputs: Float32Array[], sampleSteps: number, useRetSteps: boolean, coefficients: readonly number[], thresh: number): boolean[] {
  const self = {
    cnt: 0,
    num_steps: sampleSteps * 2,
    teacache_thresh: thresh,
    accumulated_rel_l1_distance_even: 0,
    accumulated_rel_l1_distance_odd: 0,
    previous_e0_even: null as Float32Array | null,
    previous_e0_odd: null as Float32Array | null,
    ret_steps: useRetSteps ? 5 * 2 : 1 * 2,
    cutoff_steps: useRetSteps ? sampleSteps * 2 : sampleSteps * 2 - 2,
  };
  const out: boolean[] = [];
  for (const modulated_inp of inputs) {
    let should_calc: boolean;
    if (self.cnt % 2 === 0) {
      if (self.cnt < self.ret_steps || self.cnt >= self.cutoff_steps) {
        should_calc = true;
        self.accumulated_rel_l1_distance_even = 0;
      } else {
        self.accumulated_rel_l1_distance_even += polyRef(coefficients, absMeanDiff(modulated_inp, self.previous_e0_even!) / absMean(self.previous_e0_even!));
        if (self.accumulated_rel_l1_distance_even < self.teacache_thresh) should_calc = false;
        else {
          should_calc = true;
          self.accumulated_rel_l1_distance_even = 0;
        }
      }
      self.previous_e0_even = modulated_inp;
    } else {
      if (self.cnt < self.ret_steps || self.cnt >= self.cutoff_steps) {
        should_calc = true;
        self.accumulated_rel_l1_distance_odd = 0;
      } else {
        self.accumulated_rel_l1_distance_odd += polyRef(coefficients, absMeanDiff(modulated_inp, self.previous_e0_odd!) / absMean(self.previous_e0_odd!));
        if (self.accumulated_rel_l1_distance_odd < self.teacache_thresh) should_calc = false;
        else {
          should_calc = true;
          self.accumulated_rel_l1_distance_odd = 0;
        }
      }
      self.previous_e0_odd = modulated_inp;
    }
    out.push(should_calc);
    self.cnt += 1;
    if (self.cnt >= self.num_steps) self.cnt = 0;
  }
  return out;
}

/** MagCache4Wan2.1/magcache_generate.py nearest_interp, lines 27-34 (np.round: half to even) */
function nearestInterpRef(src: readonly number[], target: number): number[] {
  const n = src.length;
  if (target === 1) return [src[n - 1]!];
  const scale = (n - 1) / (target - 1);
  return Array.from({ length: target }, (_, i) => {
    const v = i * scale;
    const f = Math.floor(v);
    const r = v - f === 0.5 ? (f % 2 === 0 ? f : f + 1) : Math.round(v);
    return src[r]!;
  });
}

/**
 * MagCache4Wan2.1/magcache_generate.py magcache_forward lines 276-311 with the setup of 895-919;
 * with `split` (forwards of the first expert), MagCache4Wan2.2's retention rule (lines 294-303,
 * t2v). `resetAtSplit`: this engine's documented change (state and cache cleared at the switch;
 * a stream with nothing cached computes). Returns skip_forward per forward.
 */
function magcacheRef(magRatios: readonly number[], sampleSteps: number, o: { thresh: number; K: number; retention: number; split?: number; resetAtSplit?: boolean }): boolean[] {
  let mag_ratios = [...magRatios];
  if (mag_ratios.length !== sampleSteps * 2) {
    const con = nearestInterpRef(mag_ratios.filter((_, i) => i % 2 === 0), sampleSteps);
    const ucon = nearestInterpRef(mag_ratios.filter((_, i) => i % 2 === 1), sampleSteps);
    mag_ratios = con.flatMap((c, i) => [c, ucon[i]!]);
  }
  const self = { cnt: 0, num_steps: sampleSteps * 2, accumulated_ratio: [1.0, 1.0], accumulated_steps: [0, 0], accumulated_err: [0.0, 0.0], residual_cache: [false, false] };
  const out: boolean[] = [];
  for (let f = 0; f < self.num_steps; f++) {
    const c = self.cnt;
    if (o.resetAtSplit && c === o.split) {
      self.accumulated_ratio = [1.0, 1.0];
      self.accumulated_steps = [0, 0];
      self.accumulated_err = [0.0, 0.0];
      self.residual_cache = [false, false];
    }
    let use_magcache = true;
    if (o.split !== undefined) {
      if (c < Math.trunc(o.split * o.retention) || (c <= (self.num_steps - o.split) * o.retention + o.split && c >= o.split)) use_magcache = false;
    } else if (c < Math.trunc(self.num_steps * o.retention)) use_magcache = false;
    let skip_forward = false;
    if (use_magcache) {
      const cur_mag_ratio = mag_ratios[c]!;
      self.accumulated_ratio[c % 2] = self.accumulated_ratio[c % 2]! * cur_mag_ratio;
      self.accumulated_steps[c % 2] += 1;
      const cur_skip_err = Math.abs(1 - self.accumulated_ratio[c % 2]!);
      self.accumulated_err[c % 2] += cur_skip_err;
      if (self.accumulated_err[c % 2]! < o.thresh && self.accumulated_steps[c % 2]! <= o.K && (!o.resetAtSplit || self.residual_cache[c % 2])) skip_forward = true;
      else {
        self.accumulated_err[c % 2] = 0;
        self.accumulated_steps[c % 2] = 0;
        self.accumulated_ratio[c % 2] = 1.0;
      }
    }
    self.residual_cache[c % 2] = true;
    out.push(skip_forward);
    self.cnt += 1;
    if (self.cnt >= self.num_steps) self.cnt = 0;
  }
  return out;
}

/**
 * H-EmbodVis/EasyCache EasyCache4Wan2.1/easycache_generate.py easycache_forward lines 486-640,
 * setup 956-975 (ret_steps 10*2, cutoff_steps steps*2 - 2). The model's outputs are the recorded
 * ones; skipped forwards return raw_input + cache. Returns per forward: computed?, and the output.
 */
function easycacheRef(xs: Float32Array[], outs: Float32Array[][], sampleSteps: number, thresh: number, retSteps = 10 * 2): { calc: boolean[]; preds: Float32Array[] } {
  const self = {
    cnt: 0,
    num_steps: sampleSteps * 2,
    thresh,
    ret_steps: retSteps,
    cutoff_steps: sampleSteps * 2 - 2,
    k: null as number | null,
    accumulated_error_even: 0,
    should_calc_current_pair: true,
    previous_raw_input_even: null as Float32Array | null,
    previous_raw_output_even: null as Float32Array | null,
    previous_raw_output_odd: null as Float32Array | null,
    prev_prev_raw_input_even: null as Float32Array | null,
    cache_even: null as Float32Array | null,
    cache_odd: null as Float32Array | null,
  };
  const sub = (a: Float32Array, b: Float32Array) => a.map((v, i) => v - b[i]!);
  const addf = (a: Float32Array, b: Float32Array) => a.map((v, i) => v + b[i]!);
  const calc: boolean[] = [];
  const preds: Float32Array[] = [];
  const forward = (raw_input: Float32Array, modelOut: Float32Array): Float32Array => {
    const is_even = self.cnt % 2 === 0;
    if (is_even) {
      if (self.cnt < self.ret_steps || self.cnt >= self.cutoff_steps) {
        self.should_calc_current_pair = true;
        self.accumulated_error_even = 0;
      } else if (self.previous_raw_input_even !== null && self.previous_raw_output_even !== null) {
        const raw_input_change = absMeanDiff(raw_input, self.previous_raw_input_even);
        if (self.k !== null) {
          const output_norm = absMean(self.previous_raw_output_even);
          const pred_change = self.k * (raw_input_change / output_norm);
          self.accumulated_error_even += pred_change;
          if (self.accumulated_error_even < self.thresh) self.should_calc_current_pair = false;
          else {
            self.should_calc_current_pair = true;
            self.accumulated_error_even = 0;
          }
        } else self.should_calc_current_pair = true;
      } else self.should_calc_current_pair = true;
      self.previous_raw_input_even = raw_input;
    }
    if (is_even && !self.should_calc_current_pair && self.previous_raw_output_even !== null) {
      self.cnt += 1;
      if (self.cnt >= self.num_steps) self.cnt = 0;
      calc.push(false);
      return addf(raw_input, self.cache_even!);
    } else if (!is_even && !self.should_calc_current_pair && self.previous_raw_output_odd !== null) {
      self.cnt += 1;
      if (self.cnt >= self.num_steps) self.cnt = 0;
      calc.push(false);
      return addf(raw_input, self.cache_odd!);
    }
    const output = modelOut;
    if (is_even) {
      if (self.previous_raw_output_even !== null) {
        const output_change = absMeanDiff(output, self.previous_raw_output_even);
        if (self.prev_prev_raw_input_even !== null) {
          const input_change = absMeanDiff(self.previous_raw_input_even!, self.prev_prev_raw_input_even);
          self.k = output_change / input_change;
        }
      }
      self.prev_prev_raw_input_even = self.previous_raw_input_even;
      self.previous_raw_output_even = output;
      self.cache_even = sub(output, raw_input);
    } else {
      self.previous_raw_output_odd = output;
      self.cache_odd = sub(output, raw_input);
    }
    self.cnt += 1;
    if (self.cnt >= self.num_steps) self.cnt = 0;
    calc.push(true);
    return output;
  };
  xs.forEach((x, s) => {
    preds.push(forward(x, outs[s]![0]!));
    preds.push(forward(x, outs[s]![1]!));
  });
  return { calc, preds };
}

// ------------------------------------------------------------------ driving our methods on recorded numbers

const stepInfo = (step: number, steps: number, extra: Partial<StepInfo> = {}): StepInfo => ({
  step,
  steps,
  segment: 0,
  segStart: 0,
  segSteps: steps,
  firstSegSteps: steps,
  segments: 1,
  timestep: 1000 - step,
  rows: 2,
  latent: new Float32Array(1),
  ...extra,
});
type Decider = { decide(s: StepInfo, sig: unknown, cached: boolean): Promise<boolean[]> };
/** per forward (cond, uncond interleaved): does our method compute it */
async function ourMask(m: TeaCache | MagCache, steps: number, inputs?: Float32Array[], info?: (i: number) => Partial<StepInfo>): Promise<boolean[]> {
  const out: boolean[] = [];
  for (let i = 0; i < steps; i++) {
    const sig = { e: async () => inputs![i]!, e0: async () => inputs![i]! };
    out.push(...(await (m as unknown as Decider).decide(stepInfo(i, steps, info?.(i)), sig, i > 0)));
  }
  return out;
}
/** modulated inputs whose step-to-step rel-L1 is close to `rels` (per-element jitter from `rng`) */
function inputsFor(rels: Array<number | null>, rng: Rng | null, D = 16): Float32Array[] {
  let cur = Float32Array.from({ length: D }, (_, i) => 0.5 + (i % 5) * 0.3);
  return rels.map((r) => {
    if (r !== null) cur = cur.map((v) => v * (1 + r * (rng ? 1 + 0.6 * (rng.next() * 2 - 1) : 1)));
    return cur;
  });
}
const twice = <T,>(a: T[]) => a.flatMap((v) => [v, v]);
const teaOpts = (coefficients: readonly number[], useRetSteps: boolean, threshold: number) => ({ coefficients, useRetSteps, threshold, warmupSteps: useRetSteps ? 5 : 1, lastStepComputed: !useRetSteps, maxSkips: Infinity, source: 'test' });
const demoCal = readCacheCalibration(DEMO);

describe('step cache decisions replay the references', () => {
  it('TeaCache: per-stream masks equal the reference loop (demo trajectory, official and demo coefficients, both variants; synthetic)', async () => {
    const steps = TRAJ.steps.length;
    const cases: Array<[string, Array<number | null>, readonly number[], boolean]> = [
      ['demo e, demo polynomial', TRAJ.steps.map((s) => s.eRelL1), demoCal!.teacache!.coefficients!, false],
      ['demo e0, demo polynomial', TRAJ.steps.map((s) => s.e0RelL1), demoCal!.teacache!.coefficients_ret_steps!, true],
      ['demo e, official 1.3B e polynomial', TRAJ.steps.map((s) => s.eRelL1), TEACACHE_WAN21['1.3B'].e, false],
      ['demo e0, official 14B e0 polynomial', TRAJ.steps.map((s) => s.e0RelL1), TEACACHE_WAN21['14B'].e0, true],
    ];
    let skipped = 0;
    for (const [name, rels, coef, ret] of cases) {
      for (const rng of [null, new Rng(3)]) {
        const inputs = inputsFor(rels, rng);
        for (const th of [0.02, 0.05, 0.08, 0.2, 0.5]) {
          const ref = teacacheRef(twice(inputs), steps, ret, coef, th);
          const ours = await ourMask(new TeaCache(NOENGINE, teaOpts(coef, ret, th)), steps, inputs);
          expect({ name, th, mask: ours }).toEqual({ name, th, mask: ref });
          skipped += ref.filter((c) => !c).length;
        }
      }
    }
    expect(skipped).toBeGreaterThan(40); // the cases do skip
    // 50 synthetic steps with the official polynomials at the README's thresholds
    const rng = new Rng(11);
    const rels = [null, ...Array.from({ length: 49 }, (_, i) => 0.02 + 0.08 * Math.abs(Math.sin(i / 7)) * rng.next())];
    for (const [coef, ret, th] of [[TEACACHE_WAN21['1.3B'].e, false, 0.08], [TEACACHE_WAN21['1.3B'].e0, true, 0.1], [TEACACHE_WAN21['14B'].e, false, 0.2], [TEACACHE_WAN21['14B'].e0, true, 0.2]] as const) {
      const inputs = inputsFor(rels, rng);
      expect(await ourMask(new TeaCache(NOENGINE, teaOpts(coef, ret, th)), 50, inputs)).toEqual(teacacheRef(twice(inputs), 50, ret, coef, th));
    }
  });

  it('MagCache: nearest_interp, per-stream masks incl. CFG splits and the Wan 2.2 retention rule equal the reference loop', async () => {
    expect([0.5, 1.5, 2.5, 3.5, 2.4999, 2.5001].map(roundHalfEven)).toEqual([0, 2, 2, 4, 2, 3]);
    for (const [n, t] of [[50, 20], [50, 13], [20, 50], [20, 7], [40, 1], [25, 25]]) {
      const src = Array.from({ length: n }, (_, i) => i * 1.5);
      expect(nearestInterp(src, t)).toEqual(nearestInterpRef(src, t));
    }
    expect(MAGCACHE_WAN['wan21-1.3B'].ratios).toHaveLength(100);
    expect(MAGCACHE_WAN['wan21-14B'].ratios).toHaveLength(100);
    expect(MAGCACHE_WAN['wan22-A14B'].ratios).toHaveLength(80);
    const run = async (ratios: readonly number[], steps: number, thresh: number, K: number) =>
      ourMask(new MagCache(NOENGINE, { ratios: ratiosForSteps(ratios, steps), threshold: thresh, K, retentionRatio: 0.2, warmupSteps: null, source: 'test', calibrationSteps: ratios.length / 2 }), steps);
    // synthetic ratios with cond and uncond apart, so that the streams decide differently
    const rng = new Rng(5);
    const synth = [1, 1, ...Array.from({ length: 58 }, (_, i) => 1 - 0.004 * (i / 2) * (i % 2 ? 1.6 : 1) - 0.01 * rng.next())];
    let splits = 0;
    let skips = 0;
    const cases: Array<[string, number[], number]> = [
      ['demo (calibrated)', demoCal!.magcache!.mag_ratios, 20],
      ['demo at 13 steps (interpolated)', demoCal!.magcache!.mag_ratios, 13],
      ['official 1.3B, 50 steps', MAGCACHE_WAN['wan21-1.3B'].ratios, 50],
      ['official 14B, 30 steps', MAGCACHE_WAN['wan21-14B'].ratios, 30],
      ['synthetic, cond/uncond apart', synth, 30],
    ];
    for (const [name, ratios, steps] of cases) {
      for (const [th, K] of [[0.04, 2], [0.12, 2], [0.3, 4], [0.12, 1]] as const) {
        const ref = magcacheRef(ratios, steps, { thresh: th, K, retention: 0.2 }).map((s) => !s);
        const ours = await run(ratios, steps, th, K);
        expect({ name, th, K, mask: ours }).toEqual({ name, th, K, mask: ref });
        for (let i = 0; i < ref.length; i += 2) if (ref[i] !== ref[i + 1]) splits++;
        skips += ref.filter((c) => !c).length;
      }
    }
    expect(splits).toBeGreaterThan(0); // some steps split the CFG batch
    expect(skips).toBeGreaterThan(100);
    // Wan 2.2 A14B, 40 steps, the switch after 14 steps: the reference's two retention windows;
    // with our reset at the switch (a stream with nothing cached computes)
    for (const [th, K] of [[0.04, 2], [0.1, 3]] as const) {
      const split = 28;
      const ref = magcacheRef(MAGCACHE_WAN['wan22-A14B'].ratios, 40, { thresh: th, K, retention: 0.2, split, resetAtSplit: true }).map((s) => !s);
      const m = new MagCache(NOENGINE, { ratios: MAGCACHE_WAN['wan22-A14B'].ratios, threshold: th, K, retentionRatio: 0.2, warmupSteps: null, source: 'test', calibrationSteps: 40 });
      const ours: boolean[] = [];
      for (let i = 0; i < 40; i++) {
        if (i === 14) m.reset();
        const info = stepInfo(i, 40, { segments: 2, firstSegSteps: 14, segment: i < 14 ? 0 : 1, segStart: i < 14 ? 0 : 14 });
        ours.push(...(await (m as unknown as Decider).decide(info, null, i !== 0 && i !== 14)));
      }
      expect(ours).toEqual(ref);
      expect(ours.slice(28, 30)).toEqual([true, true]); // the first step after the switch computes
      // the reference itself (no reset) differs at most right after its window, where it reuses the other expert's residual
      const pure = magcacheRef(MAGCACHE_WAN['wan22-A14B'].ratios, 40, { thresh: th, K, retention: 0.2, split }).map((s) => !s);
      expect(pure.slice(0, 28)).toEqual(ref.slice(0, 28));
    }
  });

  it('EasyCache: masks and the skipped steps\' predictions equal the reference loop (demo trajectory; synthetic)', async () => {
    const replay = async (xs: Float32Array[], outs: Float32Array[][], th: number, warm: number) => {
      const steps = xs.length;
      const ec = new EasyCache({ threshold: th, warmupSteps: warm, maxSkips: Infinity, blocks: 4 });
      const mask: boolean[] = [];
      const preds: Float32Array[] = [];
      for (let i = 0; i < steps; i++) {
        const info = stepInfo(i, steps, { latent: xs[i]! });
        const p = await ec.beginStep(info);
        if (p.kind === 'skip') {
          mask.push(false, false);
          const n = xs[i]!.length;
          preds.push(p.pred.slice(0, n), p.pred.slice(n));
        } else {
          mask.push(true, true);
          const pred = new Float32Array(2 * xs[i]!.length);
          pred.set(outs[i]![0]!, 0);
          pred.set(outs[i]![1]!, xs[i]!.length);
          await ec.endStep(info, pred);
          preds.push(outs[i]![0]!, outs[i]![1]!);
        }
      }
      return { mask, preds };
    };
    const xs = TRAJ.steps.map((s) => Float32Array.from(s.sample.x));
    const outs = TRAJ.steps.map((s) => s.sample.out.map((o) => Float32Array.from(o)));
    let skipped = 0;
    for (const [th, warm] of [[0.05, 10], [0.1, 10], [0.2, 3], [0.5, 2], [0.02, 5]] as const) {
      const ref = easycacheRef(xs, outs, xs.length, th, 2 * warm);
      const ours = await replay(xs, outs, th, warm);
      expect({ th, warm, mask: ours.mask }).toEqual({ th, warm, mask: ref.calc });
      ours.preds.forEach((p, f) => expect(Array.from(p)).toEqual(Array.from(ref.preds[f]!)));
      skipped += ref.calc.filter((c) => !c).length;
    }
    expect(skipped).toBeGreaterThan(10);
    // synthetic: 40 steps of a smooth trajectory with noise
    const rng = new Rng(9);
    const n = 64;
    let x = Float32Array.from({ length: n }, () => rng.normal());
    const sx: Float32Array[] = [];
    const so: Float32Array[][] = [];
    for (let s = 0; s < 40; s++) {
      sx.push(x);
      const o = x.map((v, i) => 0.8 * v + Math.sin(s / 6 + i) + 0.02 * rng.normal());
      so.push([o, o.map((v) => 0.9 * v + 0.01 * rng.normal())]);
      x = x.map((v, i) => v - 0.05 * o[i]!);
    }
    for (const th of [0.03, 0.1, 0.3]) {
      const ref = easycacheRef(sx, so, 40, th);
      expect((await replay(sx, so, th, 10)).mask).toEqual(ref.calc);
    }
  });

  it("flex: TeaCache's rule for the decision; the damped log-SNR extrapolation coefficient", () => {
    const ts = [1000, 950, 900, 850, 800, 750, 700, 650, 600, 550];
    const drive = (d: FlexDecider, tRel: number) =>
      ts.map((t, i) => {
        const c = d.decide(i, i === ts.length - 1, t, i === 0 ? null : tRel);
        if (c) d.computed(t);
        return c;
      });
    const p = { threshold: 0.1, warmupSteps: 1, maxSkips: Infinity, coefficients: null };
    // raw signal 0.04 per step: 0.04 and 0.08 stay under 0.1, 0.12 computes; the last step always computes
    expect(drive(new FlexDecider(p), 0.04)).toEqual([true, false, false, true, false, false, true, false, false, true]);
    expect(drive(new FlexDecider({ ...p, maxSkips: 1 }), 0.04)).toEqual([true, false, true, false, true, false, true, false, true, true]);
    expect(drive(new FlexDecider({ ...p, warmupSteps: 3 }), 0.04)).toEqual([true, true, true, false, false, true, false, false, true, true]);
    // the rescaled signal (0.2 per step >= 0.1) computes every step
    expect(drive(new FlexDecider({ ...p, coefficients: [0, 0, 0, 0, 0.2] }), 0.04).every(Boolean)).toBe(true);
    // computed steps 6 (t 700) and 9 (t 550), 3 apart: c = 0.4 (2.5 / 3)^2 (L(500) - L(550)) / (L(550) - L(700))
    const d = new FlexDecider(p);
    drive(d, 0.04);
    expect(d.coefficient(500, 1)).toBeCloseTo((0.4 * (2.5 / 3) ** 2 * (logSnr(500) - logSnr(550))) / (logSnr(550) - logSnr(700)), 12);
    expect(d.coefficient(500, 0.5)).toBeCloseTo(0.5 * d.coefficient(500, 1), 12);
    expect(d.coefficient(500, 0)).toBe(0);
    expect(new FlexDecider(p).coefficient(500, 1)).toBe(0); // fewer than two computed steps: reuse
    expect(damping(1)).toBe(0.4);
    expect(damping(2.5)).toBe(0.4);
    expect(damping(5)).toBeCloseTo(0.1, 12);
    expect(logSnr(500)).toBeCloseTo(0, 12);
  });

  it('calibration fits: polyfit recovers a quartic; MagCache ratios average the runs (5 decimals, 1.0 pads)', () => {
    const c = [1200, -300, 25, -0.5, 0.01];
    const x = Array.from({ length: 60 }, (_, i) => 0.005 + i * 0.004);
    const fit = polyfit(x, x.map((v) => poly1d(c, v)), 4);
    fit.forEach((v, i) => expect(Math.abs(v - c[i]!)).toBeLessThan(1e-6 * Math.max(1, Math.abs(c[i]!))));
    const run = (m: number[][]): CacheSignals => ({ rows: 2, steps: m.map((r, k) => ({ step: k + 1, timestep: 0, segment: 0, eRelL1: null, e0RelL1: null, outRelL1: [], magRatio: k ? r : [null, null], resRelL2: [], inputMeanAbsChange: null, outMeanAbs: [] })) });
    const f = fitMagCache([run([[0, 0], [0.9, 0.8], [0.95, 0.97]]), run([[0, 0], [0.8, 0.9], [0.950004, 0.97]])]);
    expect(f).toEqual({ steps: 3, mag_ratios: [1, 1, 0.85, 0.85, 0.95, 0.97] });
  });
});

// ------------------------------------------------------------------ in the pipeline

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}
const PROMPT = 'a red circle moving right on a black background';

/** the reference TeaCache cond-stream steps (1-based) computed for recorded e rel-L1s */
function teacacheRefSteps(rels: Array<number | null>, coef: readonly number[], th: number): number[] {
  const calc = teacacheRef(twice(inputsFor(rels, null)), rels.length, false, coef, th);
  return calc.filter((_, f) => f % 2 === 0).flatMap((c, s) => (c ? [s + 1] : []));
}

/** encode + denoise only (no decode): the result's latents and records */
async function sampleOnly(pipe: WanPipeline, req: GenerateRequest): Promise<GenerateResult> {
  const r: Partial<GenerateResult> = {};
  const latents = await pipe.sample(req, r);
  return { ...(r as GenerateResult), latents };
}

describe('step caching in the pipeline', () => {
  it('demo, levels 0 and 3: off is the uncached path bit for bit; every mode skips; decisions and results do not depend on the level; level 3 uploads nothing for a skipped step', async () => {
    const e = await getEngine();
    const results: Record<string, GenerateResult> = {};
    const events: ProgressEvent[] = [];
    const p0 = await WanPipeline.fromPretrained(DEMO, { engine: e, promptCache: false, vaeTiling: false });
    try {
      const req: GenerateRequest = { prompt: PROMPT, seed: 7 };
      results.plain = await p0.generate(req);
      results.off = await p0.generate({ ...req, mode: 'off' });
      // the recording run goes through the hook (every row, every block, residuals cloned and measured)
      results.rec = await sampleOnly(p0, { ...req, recordCacheSignals: true });
      for (const mode of ['teacache', 'magcache', 'easycache', 'flex'] as const) results[mode] = await sampleOnly(p0, { ...req, mode, onProgress: mode === 'teacache' ? (ev) => events.push(ev) : undefined });
      expect(maxDiff(results.off!.video, results.plain!.video)).toBe(0);
      for (const k of ['off', 'rec']) expect(maxDiff(results[k]!.latents.data, results.plain!.latents.data)).toBe(0);
      expect(results.plain!.cache).toBeUndefined();
      expect(results.rec!.cacheSignals!.steps).toHaveLength(20);
      // TeaCache: the steps the reference loop computes for this model's e (recorded) and polynomial, at the default 0.2
      const rels = results.rec!.cacheSignals!.steps.map((s) => s.eRelL1);
      expect(results.teacache!.cache!.computedSteps).toEqual(teacacheRefSteps(rels, demoCal!.teacache!.coefficients!, 0.2));
      // MagCache: the reference loop on the calibrated ratios at 0.12, K 2
      const mref = magcacheRef(demoCal!.magcache!.mag_ratios, 20, { thresh: 0.12, K: 2, retention: 0.2 });
      expect(results.magcache!.cache!.computedSteps).toEqual(mref.filter((_, f) => f % 2 === 0).flatMap((s, i) => (!s || !mref[2 * i + 1] ? [i + 1] : [])));
      // MagCache at 0.05: cond and uncond disagree at some steps; only the computing row runs the blocks
      const split = await sampleOnly(p0, { ...req, mode: 'magcache', threshold: 0.05 });
      const sref = magcacheRef(demoCal!.magcache!.mag_ratios, 20, { thresh: 0.05, K: 2, retention: 0.2 }).map((skip) => !skip);
      const steps1 = (f: (c: boolean, u: boolean) => boolean) => Array.from({ length: 20 }, (_, i) => i + 1).filter((st) => f(sref[2 * st - 2]!, sref[2 * st - 1]!));
      expect(split.cache!.splitSteps).toEqual(steps1((c, u) => c !== u));
      expect(split.cache!.splitSteps.length).toBeGreaterThan(0);
      expect(split.cache!.computedSteps).toEqual(steps1((c, u) => c || u));
      for (const mode of ['teacache', 'magcache', 'easycache', 'flex']) {
        const c = results[mode]!.cache!;
        expect(c.mode).toBe(mode);
        expect(c.forwards).toBe(c.computedSteps.length);
        expect(c.skippedSteps.length).toBeGreaterThan(0);
        expect(c.computedSteps[0]).toBe(1);
        expect([...c.computedSteps, ...c.skippedSteps].sort((a, b) => a - b)).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
        expect(maxDiff(results[mode]!.latents.data, results.plain!.latents.data)).toBeGreaterThan(0);
      }
      // progress events say which steps came from the cache
      const st = events.filter((ev) => ev.type === 'step') as Array<Extract<ProgressEvent, { type: 'step' }>>;
      expect(st.filter((ev) => ev.cached).map((ev) => ev.step)).toEqual(results.teacache!.cache!.skippedSteps);
      // the sidecar lists the computed steps; --profile reports the skipped forwards
      const side = sidecar({ settings: results.teacache!.settings, pipe: p0, videoPath: null, videoShape: [3, 9, 64, 64], latentsPath: null, result: results.teacache! }) as { cache: { computed_steps: number[]; forwards: number } };
      expect(side.cache.computed_steps).toEqual(results.teacache!.cache!.computedSteps);
      expect((sidecar({ settings: results.plain!.settings, pipe: p0, videoPath: null, videoShape: [3, 9, 64, 64], latentsPath: null, result: results.plain! }) as { cache: unknown }).cache).toBeNull();
      expect(profileText(p0, results.teacache!)).toMatch(new RegExp(`step cache \\(teacache\\): ${side.cache.forwards} DiT forwards for 20 steps, ${20 - side.cache.forwards} skipped`));
    } finally {
      p0.dispose();
    }
    // level 3 (the text encoder streamed through the GPU: the same floats as level 0)
    const p3 = await WanPipeline.fromPretrained(DEMO, { engine: e, promptCache: false, vaeTiling: false, lowMemLevel: 3, textEncoderDevice: 'gpu-stream' });
    try {
      const off3 = await sampleOnly(p3, { prompt: PROMPT, seed: 7 });
      expect(maxDiff(off3.latents.data, results.plain!.latents.data)).toBe(0);
      const perForward = off3.uploads!.bytes / 20;
      for (const mode of ['teacache', 'easycache'] as const) {
        const r3 = await sampleOnly(p3, { prompt: PROMPT, seed: 7, mode });
        expect(r3.cache!.computedSteps).toEqual(results[mode]!.cache!.computedSteps);
        expect(maxDiff(r3.latents.data, results[mode]!.latents.data)).toBe(0);
        // each skipped step uploads none of the 4 streamed blocks
        const skipped = r3.cache!.skippedSteps.length;
        expect(off3.uploads!.bytes - r3.uploads!.bytes).toBe(skipped * perForward);
        expect(r3.cache!.savedUploadBytes).toBe(skipped * perForward);
        expect(r3.uploads!.uploads).toBe(4 * r3.cache!.forwards);
      }
    } finally {
      p3.dispose();
    }
  });

  it('the DiT hook: rows split off (one CFG row runs, the other takes a residual) and leading blocks only; skipped blocks are not uploaded', async () => {
    const e = await getEngine();
    const pipe = await WanPipeline.fromPretrained(DEMO, { engine: e, promptCache: false, lowMemLevel: 3, textEncoderDevice: 'gpu-stream' });
    try {
      const dit = pipe.dit;
      const rng = new Rng(4);
      const x = e.fromHost(Float32Array.from({ length: 2 * 16 * 3 * 8 * 8 }, () => rng.normal()), [2, 16, 3, 8, 8], 'f32');
      const ctx = e.keep(dit.embedText(e.fromHost(Float32Array.from({ length: 2 * 16 * 64 }, () => rng.normal()), [2, 16, 64], 'f32')));
      const streamed = (pipe as unknown as { streamed: BlockResidency & { stats: { uploads: number; bytes: number } } }).streamed;
      let residual: Float32Array | null = null;
      let x0: Tensor | null = null;
      // a hook that records the full residual, then one that replays it for row 1 while row 0 runs
      const recordHook: DitStepCache = {
        plan: async ({ hs }) => {
          x0 = e.keep(e.clone(hs));
          return { rows: [true, true], blocks: 4 };
        },
        finish: async (hs) => {
          const a = (await hs.toArray()) as Float32Array;
          const b = (await x0!.toArray()) as Float32Array;
          residual = a.map((v, i) => v - b[i]!);
          x0!.dispose();
        },
      };
      const full = (await (await dit.forward(x, 500, ctx, { residency: streamed!, stepCache: recordHook })).toArray()) as Float32Array;
      const plain = (await (await dit.forward(x, 500, ctx, { residency: streamed! })).toArray()) as Float32Array;
      expect(maxDiff(full, plain)).toBe(0); // a hook that runs everything changes nothing
      const splitHook: DitStepCache = {
        plan: async () => ({ rows: [true, false], blocks: 4 }),
        finish: async (hs: Tensor, plan: DitStepPlan) => {
          expect(plan.rows).toEqual([true, false]);
          const res = e.fromHost(residual!, hs.shape, 'f32');
          const a = (await hs.toArray()) as Float32Array;
          const r = (await res.toArray()) as Float32Array;
          const n = a.length / 2;
          for (let i = n; i < 2 * n; i++) a[i] = a[i]! + r[i]!;
          e.write(hs, a);
          res.dispose();
        },
      };
      const split = (await (await dit.forward(x, 500, ctx, { residency: streamed!, stepCache: splitHook })).toArray()) as Float32Array;
      // row 0 ran alone (B = 1: other matmul row counts, f32 rounding); row 1 = its input + the recorded residual
      expect(maxDiff(split, full)).toBeLessThan(1e-4);
      // leading blocks only: 1 of 4 streamed blocks is acquired
      const u0 = { ...streamed!.stats };
      const one: DitStepCache = { plan: async () => ({ rows: [true, true], blocks: 1 }), finish: async () => {} };
      await (await dit.forward(x, 500, ctx, { residency: streamed!, stepCache: one })).toArray();
      const u1 = { ...streamed!.stats };
      const none: DitStepCache = { plan: async () => ({ rows: [false, false], blocks: 4 }), finish: async () => {} };
      await (await dit.forward(x, 500, ctx, { residency: streamed!, stepCache: none })).toArray();
      expect(streamed!.stats.uploads - u1.uploads).toBe(0);
      expect(u1.uploads - u0.uploads).toBeLessThanOrEqual(1);
      expect(u1.bytes - u0.bytes).toBeLessThanOrEqual(streamed!.stats.bytes / Math.max(1, streamed!.stats.uploads) + 1);
      // resident weights: a bad plan is refused
      await expect(dit.forward(x, 500, ctx, { residency: RESIDENT, stepCache: { plan: async () => ({ rows: [true], blocks: 4 }), finish: async () => {} } })).rejects.toThrow(/2 rows/);
      x.dispose();
      ctx.dispose();
    } finally {
      pipe.dispose();
    }
  });

  it('tiny model: both samplers skip as the reference decides for their own timesteps; a mode needing calibration the model lacks is a one-line ConfigError', async () => {
    const e = await getEngine();
    // the tiny model has no calibration: write one (any polynomial serves the check; its random
    // weights move e by ~100 % a step, so 0.1 x rel-L1 skips about two steps in three)
    const coef = [0, 0, 0, 0.1, 0];
    const cal = tinyModelWithTokenizer({ num_inference_steps: 8, cache: { teacache: { coefficients: coef }, magcache: { mag_ratios: Array(16).fill(0.99) } } });
    for (const sampler of ['unipc', 'euler'] as const) {
      const pipe = await WanPipeline.fromPretrained(cal, { engine: e, promptCache: false });
      try {
        const rec: Partial<GenerateResult> = {};
        await pipe.sample({ prompt: PROMPT, sampler, recordCacheSignals: true }, rec);
        const r = await sampleOnly(pipe, { prompt: PROMPT, sampler, mode: 'teacache', threshold: 0.3 });
        expect(r.cache!.computedSteps).toEqual(teacacheRefSteps(rec.cacheSignals!.steps.map((s) => s.eRelL1), coef, 0.3));
        expect(r.cache!.skippedSteps.length).toBeGreaterThan(0);
        const m = await sampleOnly(pipe, { prompt: PROMPT, sampler, mode: 'magcache' });
        expect(m.cache!.skippedSteps.length).toBeGreaterThan(0);
        // EasyCache decides on the latents, which the sampler changes
        const ez = await sampleOnly(pipe, { prompt: PROMPT, sampler, mode: 'easycache', warmupSteps: 2, threshold: 0.5 });
        expect(ez.cache!.skippedSteps.length).toBeGreaterThan(0);
      } finally {
        pipe.dispose();
      }
    }
    // no calibration
    const bare = tinyModelWithTokenizer();
    const pipe = await WanPipeline.fromPretrained(bare, { engine: e, promptCache: false });
    try {
      for (const [mode, what] of [['teacache', /TeaCache's rescale polynomial/], ['magcache', /MagCache's magnitude ratios/]] as const) {
        const err = await sampleOnly(pipe, { prompt: PROMPT, mode }).catch((x: unknown) => x);
        expect(err).toBeInstanceOf(ConfigError);
        expect((err as Error).message).toMatch(what);
        expect((err as Error).message).toContain(`npm run calibrate-cache -- --model ${bare}`);
        expect((err as Error).message.split('\n')).toHaveLength(1);
      }
      // use_ret_steps needs the e0 polynomial
      const calE = tinyModelWithTokenizer({ cache: { teacache: { coefficients: coef } } });
      const p2 = await WanPipeline.fromPretrained(calE, { engine: e, promptCache: false });
      await expect(sampleOnly(p2, { prompt: PROMPT, mode: 'teacache', useRetSteps: true })).rejects.toThrow(/coefficients_ret_steps/);
      p2.dispose();
      // the runtime-adaptive ones need nothing
      for (const mode of ['easycache', 'flex'] as const) expect((await sampleOnly(pipe, { prompt: PROMPT, mode, numInferenceSteps: 4 })).cache!.mode).toBe(mode);
      // recording is for uncached runs
      await expect(pipe.sample({ prompt: PROMPT, mode: 'teacache', recordCacheSignals: true })).rejects.toThrow(ConfigError);
    } finally {
      pipe.dispose();
    }
    // a malformed calibration names the file and the fix
    const badDir = tinyModelWithTokenizer({ cache: { magcache: { mag_ratios: [1, 'x'] } } });
    expect(() => readCacheCalibration(badDir)).toThrow(/cache\.magcache\.mag_ratios.*calibrate-cache/);
  });

  it('Wan 2.2 two experts: the state is reset at the expert switch (the first step after it is computed)', async () => {
    const FIX = join(HERE, 'fixtures');
    const CASE = join(FIX, 'golden', 'wan22-tiny');
    const G = loadGolden(CASE);
    const dir = mkdtempSync(join(tmpdir(), 'sd-cache-wan22-'));
    cpSync(CASE, dir, { recursive: true });
    cpSync(join(FIX, 'tokenizer', 'legacy'), join(dir, 'tokenizer'), { recursive: true });
    // TeaCache: a constant 0.01 per step never reaches 0.2, so only forced steps compute;
    // MagCache: ratios of 1 (no error): up to K = 2 skips in a row
    const cache = { teacache: { coefficients: [0, 0, 0, 0, 0.01] }, magcache: { mag_ratios: Array(12).fill(1) } };
    writeFileSync(join(dir, 'smart_diffusion.json'), JSON.stringify({ text_len: 16, height: 64, width: 64, num_frames: 9, num_inference_steps: 6, fps: 8, cache }));
    const e = await getEngine();
    const f32 = (n: string) => G.get(n).data as Float32Array;
    const noise = G.get('sample.noise');
    const req: GenerateRequest = { prompt: 'x', promptEmbeds: f32('t5.prompt.context'), negativePromptEmbeds: f32('t5.negative.context'), latents: { data: noise.data as Float32Array, shape: noise.shape as [number, number, number, number] } };
    for (const opts of [{ lowMemLevel: 0 }, { lowMemLevel: 3 }] as WanPipelineOptions[]) {
      const pipe = await WanPipeline.fromPretrained(dir, { engine: e, promptCache: false, ...opts });
      try {
        const t = await sampleOnly(pipe, { ...req, mode: 'teacache' });
        // experts [H H H H L L]: step 1 (warm-up), step 5 (after the switch: warm-up again), step 6 (last)
        expect(t.experts!.schedule.map((s) => s.expert)).toEqual(['transformer', 'transformer', 'transformer', 'transformer', 'transformer_2', 'transformer_2']);
        expect(t.cache!.computedSteps).toEqual([1, 5, 6]);
        // MagCache (Wan 2.2 rule: forward 8 = step 5's cond is in the second retention window; its
        // uncond is past it but has nothing cached after the reset): [C S S C C S]
        const m = await sampleOnly(pipe, { ...req, mode: 'magcache' });
        expect(m.cache!.computedSteps).toEqual([1, 4, 5]);
        expect(m.cache!.splitSteps).toEqual([]);
        expect(m.cache!.settings.threshold).toBe(0.04); // MagCache4Wan2.2's default
      } finally {
        pipe.dispose();
      }
    }
  });

  it('settings: the infer.cache.* keys are checked', () => {
    const dir = tinyModelWithTokenizer();
    const s = settingsForModel(dir, { config: { 'infer.cache.mode': 'magcache', 'infer.cache.threshold': 0.2, 'infer.cache.max_skips': 3 } });
    expect([s.request.mode, s.request.threshold, s.request.maxSkips, s.request.warmupSteps, s.request.useRetSteps, s.request.retentionRatio]).toEqual(['magcache', 0.2, 3, -1, false, 0.2]);
    expect(() => overridesLayer(['infer.cache.mode=fastest'])).toThrow(/off, teacache, magcache, easycache, flex|off\|teacache/);
    expect(() => overridesLayer(['infer.cache.threshold=-1'])).toThrow(ConfigError);
    expect(() => overridesLayer(['infer.cache.warmup_steps=-2'])).toThrow(ConfigError);
    expect(() => overridesLayer(['infer.cache.retention_ratio=1.5'])).toThrow(ConfigError);
    expect(overridesLayer(['infer.cache.mode=off']).values.get('infer.cache.mode')).toBe('off');
  });
});
