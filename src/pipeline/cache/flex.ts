// flex: this engine's own step cache (first version; the cache benchmark tunes it). It combines
// what the published methods each look at alone:
//
// - the TIMESTEP signal (TeaCache's): the rel-L1 change of Wan's time embedding (e, or e0 with
//   infer.cache.use_ret_steps) from step to step, rescaled by the model's TeaCache polynomial when
//   it has one (built in or calibrated), raw otherwise, accumulated since the last computed step;
// - the OBSERVED residual drift (MagCache/EasyCache's view, measured at run time): between the last
//   two computed steps j < k, rho = |r_k - r_j| / |r_j| / (t_j - t_k) (L2 over both CFG rows, per
//   unit of timestep), accumulated as rho x (t_prev - t) per step since the last computed one.
//
// A step is skipped only while BOTH accumulators stay under the threshold, at most max_skips in a
// row, after the warm-up and never at the last step. A skipped step does not reuse r_k as is: the
// residual is extrapolated linearly in the timestep from the last two computed ones,
// r = r_k + gamma lambda (r_k - r_j), lambda = (t_k - t) / (t_j - t_k) (capped at 1), which removes
// the first-order drift that plain reuse carries (gamma = infer.cache.extrapolation, 1 by default;
// 0 reuses r_k). All of it is pair-level (both CFG rows together).
//
// Knobs (infer.cache.*): threshold (default 0.1), warmup_steps (default: retention_ratio of the
// steps, at least 2 so that two residuals exist), max_skips (default 2), use_ret_steps,
// extrapolation. Measured on the demo (4 prompts, seed 3, 20 steps): at threshold 0.2 mean 12
// forwards and 32.4 dB PSNR against the uncached video with gamma 1, 11.25 and 30.3 dB with 0;
// another seed favoured reuse: the extrapolation is not yet shown to pay (the cache benchmark's job).

import type { Engine } from '../../runtime/engine.ts';
import type { Tensor } from '../../tensor/tensor.ts';
import { binary } from '../../ops/elementwise.ts';
import { HiddenStepCache, type TimeSignals } from './hidden.ts';
import { relL1, rowSums, tokenSumSq } from './residual.ts';
import { poly1d } from './teacache.ts';
import type { StepInfo } from './types.ts';

export interface FlexParams {
  threshold: number;
  /** steps always computed at the start of a segment */
  warmupSteps: number;
  maxSkips: number;
  /** TeaCache polynomial for the timestep signal (null: the raw rel-L1) */
  coefficients: readonly number[] | null;
}

/**
 * The decision state (host numbers only). Per step: `decide(localStep, forced, t, tRel)`; after a
 * computed step: `computed(t, drift)` with drift = |r_k - r_j| / |r_j| against the previous
 * computed residual (null for the first).
 */
export class FlexDecider {
  accT = 0;
  accR = 0;
  skips = 0;
  /** timesteps of the last two computed steps (k, then j) */
  tK: number | null = null;
  tJ: number | null = null;
  /** residual drift per unit timestep between them */
  rate: number | null = null;
  private tPrev: number | null = null;
  computedDev = false;
  constructor(readonly p: FlexParams) {}

  /** `forced`: the last step, or nothing cached (after the expert switch) */
  decide(localStep: number, forced: boolean, t: number, tRel: number | null): boolean {
    const dt = this.tPrev === null ? 0 : Math.abs(this.tPrev - t);
    this.tPrev = t;
    let calc: boolean;
    if (localStep < this.p.warmupSteps || forced || tRel === null || this.rate === null) calc = true;
    else {
      this.accT += this.p.coefficients ? poly1d(this.p.coefficients, tRel) : tRel;
      this.accR += this.rate * dt;
      calc = !(this.accT < this.p.threshold && this.accR < this.p.threshold && this.skips < this.p.maxSkips);
    }
    if (calc) {
      this.accT = 0;
      this.accR = 0;
      this.skips = 0;
    } else this.skips++;
    return calc;
  }

  computed(t: number, drift: number | null): void {
    if (drift !== null && this.tK !== null && this.tK !== t) this.rate = drift / Math.abs(this.tK - t);
    this.tJ = this.tK;
    this.tK = t;
  }

  /** lambda of the extrapolation r_k + lambda (r_k - r_j) at timestep t (null: reuse r_k) */
  lambda(t: number): number | null {
    if (this.tK === null || this.tJ === null || this.tJ === this.tK) return null;
    return Math.min(1, Math.max(0, (this.tK - t) / (this.tJ - this.tK)));
  }
}

export interface FlexOptions extends FlexParams {
  useRetSteps: boolean;
  source: string;
  /** gamma: the extrapolation is r_k + gamma·lambda (r_k - r_j); 0 = reuse r_k as it is (infer.cache.extrapolation) */
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
    };
  }

  // ---- DEV (experiments; removed before commit)
  private dev = JSON.parse(process.env.FLEX_DEV ?? '{}') as { schedule?: number[]; recon?: string; sigmaGap?: number; dump?: string; basis?: string; alpha?: number; sched?: string; acc?: string; warm?: number; maxSkips?: number; rhoRows?: string; cap?: number; rb?: string; am?: string };
  private hist: Array<{ t: number; x: Float32Array; pred: Float32Array; step: number }> = [];
  private lastComputedStep = 0;
  private B(step: number, t: number): number { if ((this.dev.rb ?? 'idx') === 'idx') return step; const sg = Math.min(t / 1000, 0.9999); return Math.log((1 - sg) / sg); }
  private lastComputedT: number | null = null;
  private rho: number | null = null;
  private devRel: number | null = null;
  private accA = 0;
  private skipsA = 0;
  private devCalc(s: StepInfo, cached: boolean): boolean | null {
    if (this.dev.schedule) return !cached || this.dev.schedule.includes(s.step + 1);
    if (this.dev.sched === 'tea') {
      const local = s.step - s.segStart;
      const rel = this.devRel;
      let calc: boolean;
      if (!cached || local < (this.dev.warm ?? 1) || s.step === s.steps - 1 || rel === null) calc = true;
      else {
        this.accA += this.o.coefficients ? poly1d(this.o.coefficients, rel) : rel;
        calc = !(this.accA < this.o.threshold && this.skipsA < (this.dev.maxSkips ?? Infinity));
      }
      if (calc) { this.accA = 0; this.skipsA = 0; } else this.skipsA++;
      return calc;
    }
    if (this.dev.sched === 'adapt') {
      const L = (x: number) => { const sg = Math.min(x / 1000, 0.9999); return Math.log((1 - sg) / sg); };
      const local = s.step - s.segStart;
      let calc: boolean;
      if (!cached || local < (this.dev.warm ?? 2) || s.step === s.steps - 1 || this.rho === null || this.lastComputedT === null) calc = true;
      else {
        void L;
        const dist = this.rho * (this.B(s.step, s.timestep) - this.B(this.lastComputedStep, this.lastComputedT));
        const add = this.dev.acc === 'dist' ? dist : dist;
        this.accA = this.dev.acc === 'dist' ? dist : this.accA + add;
        calc = !(this.accA < this.o.threshold && this.skipsA < (this.dev.maxSkips ?? this.o.maxSkips));
      }
      if (calc) { this.accA = 0; this.skipsA = 0; } else this.skipsA++;
      return calc;
    }
    if (this.dev.sigmaGap !== undefined) {
      if (!cached || this.lastComputedT === null || s.step === s.steps - 1) return true;
      // next step's sigma gap from the last computed
      return (this.lastComputedT - s.timestep) / 1000 >= this.dev.sigmaGap;
    }
    return null;
  }
  override async beginStep(s: StepInfo) {
    const recon = this.dev.recon ?? 'lincap';
    if (recon.startsWith('out-') && this.hist.length >= 1) {
      const calc = this.devCalc(s, true);
      if (calc === false) {
        this.log.push({ step: s.step + 1, ran: Array(s.rows).fill(false), blocks: 0 });
        return { kind: 'skip' as const, pred: this.outRecon(s, recon.slice(4)) };
      }
    }
    return super.beginStep(s);
  }
  private devLam(t: number, tK: number, tJ: number): number {
    const a = this.dev.alpha ?? 1;
    const basis = this.dev.basis ?? 't';
    const L = (x: number) => { const sg = Math.min(x / 1000, 0.9999); return Math.log((1 - sg) / sg); };
    if (basis === 't') return a * (tK - t) / (tJ - tK);
    if (basis === 'lsnr') return Math.min(this.dev.cap ?? Infinity, a * (L(t) - L(tK)) / (L(tK) - L(tJ)));
    throw new Error('basis');
  }
  private outRecon(s: StepInfo, how: string): Float32Array {
    const n = s.latent.length;
    const k = this.hist[this.hist.length - 1]!;
    const j = this.hist.length >= 2 ? this.hist[this.hist.length - 2]! : null;
    const sg = s.timestep / 1000;
    const lam = j ? this.devLam(s.timestep, k.t, j.t) : 0;
    const out = new Float32Array(s.rows * n);
    const x = s.latent;
    for (let r = 0; r < s.rows; r++) {
      const o = r * n;
      for (let i = 0; i < n; i++) {
        const vk = k.pred[o + i]!;
        const vj = j ? j.pred[o + i]! : vk;
        let v: number;
        if (how === 'vreuse') v = vk;
        else if (how === 'vlin') v = vk + lam * (vk - vj);
        else if (how === 'easy') v = x[i]! + (vk - k.x[i]!);
        else if (how === 'x0reuse') v = (x[i]! - (k.x[i]! - (k.t / 1000) * vk)) / sg;
        else if (how === 'x0lin') {
          const x0k = k.x[i]! - (k.t / 1000) * vk;
          const x0j = j ? j.x[i]! - (j.t / 1000) * vj : x0k;
          v = (x[i]! - (x0k + lam * (x0k - x0j))) / sg;
        } else throw new Error(`FLEX_DEV recon ${how}`);
        out[o + i] = v;
      }
    }
    return out;
  }
  override async endStep(s: StepInfo, pred: Float32Array): Promise<void> {
    const l = this.log[this.log.length - 1];
    if (this.dev.dump) {
      const { appendFileSync } = await import('node:fs');
      appendFileSync(this.dev.dump, JSON.stringify({ step: s.step + 1, t: s.timestep, x: Array.from(s.latent), pred: Array.from(pred) }) + '\n');
    }
    if (l && l.ran.every(Boolean)) {
      const prevH = this.hist[this.hist.length - 1];
      if (prevH) {
        const L = (x: number) => { const sg = Math.min(x / 1000, 0.9999); return Math.log((1 - sg) / sg); };
        let num = 0, den = 0;
        for (let i = 0; i < pred.length; i++) { const d = pred[i]! - prevH.pred[i]!; num += d * d; den += pred[i]! * pred[i]!; }
        void L;
        this.rho = Math.sqrt(num / den) / Math.abs(this.B(s.step, s.timestep) - this.B(prevH.step, prevH.t));
      }
      this.hist.push({ t: s.timestep, x: Float32Array.from(s.latent), pred: Float32Array.from(pred), step: s.step });
      this.lastComputedStep = s.step;
      if (this.hist.length > 3) this.hist.shift();
      this.lastComputedT = s.timestep;
    }
  }

  protected async decide(s: StepInfo, sig: TimeSignals, cached: boolean): Promise<boolean[]> {
    if (this.dev.sched === 'tea') {
      const inp = await sig.e();
      this.devRel = this.prevInp ? relL1(inp, this.prevInp) : null;
      this.prevInp = inp;
    }
    const dc = this.devCalc(s, cached);
    if (dc !== null) {
      if (dc) this.lastComputedT = s.timestep;
      this.d.computedDev = true;
      return Array(s.rows).fill(dc);
    }
    const inp = this.o.useRetSteps ? await sig.e0() : await sig.e();
    const rel = this.prevInp ? relL1(inp, this.prevInp) : null;
    this.prevInp = inp;
    const calc = this.d.decide(s.step - s.segStart, s.step === s.steps - 1 || !cached, s.timestep, rel);
    return Array(s.rows).fill(calc);
  }

  private kStep = 0;
  private jStep = 0;
  protected override async inspect(s: StepInfo, res: Tensor, last: Tensor | null): Promise<void> {
    this.jStep = this.kStep;
    this.kStep = s.step;
    let drift: number | null = null;
    if (last) {
      const diff = binary({ a: res, b: last }, { kind: 'sub' });
      // both sums in one wait
      const [num, den] = await Promise.all([tokenSumSq(this.engine, diff), tokenSumSq(this.engine, last)]);
      diff.dispose();
      drift = Math.sqrt(rowSums(num, 1)[0]! / rowSums(den, 1)[0]!);
    }
    this.d.computed(s.timestep, drift);
  }

  protected override residualFor(s: StepInfo): { t: Tensor; owned: boolean } {
    const lam = this.d.lambda(s.timestep);
    const { last, prev } = this.res;
    const recon = this.dev.recon ?? 'lincap';
    if (recon === 'reuse' || recon.startsWith('out-')) return { t: last!, owned: false };
    if (recon === 'lin' && prev && this.d.tJ !== null && this.d.tK !== null) {
      let l = this.devLam(s.timestep, this.d.tK, this.d.tJ);
      const base = this.kStep - this.jStep;
      if (this.dev.am === 'div') l /= base;
      if (this.dev.am === 'div2') l /= base * base;
      if (this.dev.am === 'sqrt') l /= Math.sqrt(base);
      return { t: binary({ a: prev, b: last! }, { kind: 'lerp', alpha: 1 + l }), owned: true };
    }
    const g = lam === null ? 0 : this.o.extrapolation * lam;
    if (g === 0 || !prev) return { t: last!, owned: false };
    // prev + (1 + g)(last - prev) = last + g (last - prev)
    return { t: binary({ a: prev, b: last! }, { kind: 'lerp', alpha: 1 + g }), owned: true };
  }

  protected resetState(): void {
    this.d = new FlexDecider(this.o);
    this.prevInp = null;
  }
}
