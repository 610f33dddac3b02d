// Recording the signals the methods decide on, from an uncached run (every step computed):
// GenerateRequest.recordCacheSignals. `npm run calibrate-cache` fits TeaCache's polynomial and
// MagCache's ratios from them (calibrate.ts); the replay tests feed them to the methods.
//
// Per step, per CFG row where it differs: the rel-L1 change of Wan's e and e0 (TeaCache's x), of
// the DiT output (TeaCache's y: the reference fits np.polyfit(x, y, 4) over all steps, see
// ali-vilab/TeaCache issue #2), MagCache's magnitude ratio (mean over tokens of the residual's
// per-token L2 norm against the previous step's, MagCache4Wan2.1 `magcache_calibration` lines
// 165-170), the residual's rel-L2 change (flex), and EasyCache's raw quantities (mean |x_t - x_prev|
// of the input latents, mean |out|).

import type { Engine } from '../../runtime/engine.ts';
import type { DitStepCache } from '../../models/wan_dit/model.ts';
import { ConfigError } from '../../util/errors.ts';
import type { Tensor } from '../../tensor/tensor.ts';
import { binary } from '../../ops/elementwise.ts';
import { HiddenStepCache, type TimeSignals } from './hidden.ts';
import { meanAbs, meanAbsDiff, relL1, rowSums, tokenSumSq } from './residual.ts';
import type { CacheSignalStep, CacheSignals, StepInfo } from './types.ts';

export interface RecordOptions {
  /** also keep every `sampleStride`-th element of each step's input latents and output rows (replay fixtures) */
  sampleStride?: number;
}

export interface SampledStep extends CacheSignalStep {
  sample?: { x: number[]; out: number[][] };
}

export class SignalRecorder extends HiddenStepCache {
  readonly describe: Record<string, unknown> = { recording: true };
  readonly signals: CacheSignals = { steps: [], rows: 0 };
  private prevE: Float32Array | null = null;
  private prevE0: Float32Array | null = null;
  private prevSegment = -1;
  private prevPred: Float32Array | null = null;
  private prevLatent: Float32Array | null = null;
  private prevTokenNorms: Float64Array | null = null;
  private cur: SampledStep | null = null;

  constructor(
    engine: Engine,
    private readonly opts: RecordOptions = {},
  ) {
    super(engine, 'off');
  }

  /** the signals are sums over the whole residual stream: not recorded from a context-parallel forward's row shares */
  override cpHooks(): DitStepCache[] {
    throw new ConfigError('recording cache signals (calibration) needs the whole residual stream on one device: run it with infer.diffusion.cp_size=1');
  }

  protected async decide(s: StepInfo, sig: TimeSignals): Promise<boolean[]> {
    const e = await sig.e();
    const e0 = await sig.e0();
    const same = s.segment === this.prevSegment;
    this.signals.rows = s.rows;
    this.cur = {
      step: s.step + 1,
      timestep: s.timestep,
      segment: s.segment,
      eRelL1: same && this.prevE ? relL1(e, this.prevE) : null,
      e0RelL1: same && this.prevE0 ? relL1(e0, this.prevE0) : null,
      outRelL1: [],
      magRatio: [],
      resRelL2: [],
      inputMeanAbsChange: this.prevLatent ? meanAbsDiff(s.latent, this.prevLatent) : null,
      outMeanAbs: [],
    };
    this.prevE = e;
    this.prevE0 = e0;
    this.prevSegment = s.segment;
    return Array(s.rows).fill(true);
  }

  protected override async inspect(s: StepInfo, res: Tensor, last: Tensor | null): Promise<void> {
    const rows = s.rows;
    const ss = await tokenSumSq(this.engine, res); // [B·L]
    const norms = Float64Array.from(ss, Math.sqrt);
    const L = norms.length / rows;
    const c = this.cur!;
    for (let b = 0; b < rows; b++) {
      if (!this.prevTokenNorms) {
        c.magRatio.push(null);
        continue;
      }
      let sum = 0;
      for (let i = b * L; i < (b + 1) * L; i++) sum += norms[i]! / this.prevTokenNorms[i]!;
      c.magRatio.push(sum / L);
    }
    this.prevTokenNorms = norms;
    if (last) {
      const diff = binary({ a: res, b: last }, { kind: 'sub' });
      const num = rowSums(await tokenSumSq(this.engine, diff), rows);
      diff.dispose();
      const den = rowSums(await tokenSumSq(this.engine, last), rows);
      c.resRelL2 = num.map((n, b) => Math.sqrt(n / den[b]!));
    } else c.resRelL2 = Array(rows).fill(null);
  }

  override async endStep(s: StepInfo, pred: Float32Array): Promise<void> {
    const c = this.cur!;
    const n = s.latent.length;
    const same = this.prevPred !== null && c.eRelL1 !== null;
    for (let b = 0; b < s.rows; b++) {
      c.outRelL1.push(same ? relL1(pred, this.prevPred!, b * n, (b + 1) * n) : null);
      c.outMeanAbs.push(meanAbs(pred, b * n, (b + 1) * n));
    }
    const k = this.opts.sampleStride;
    if (k) {
      const pick = (a: Float32Array, off: number) => Array.from({ length: Math.ceil(n / k) }, (_, i) => a[off + i * k]!);
      c.sample = { x: pick(s.latent, 0), out: Array.from({ length: s.rows }, (_, b) => pick(pred, b * n)) };
    }
    this.signals.steps.push(c);
    this.prevPred = Float32Array.from(pred);
    this.prevLatent = Float32Array.from(s.latent);
    this.cur = null;
  }

  /** the recorder keeps measuring across the expert switch (the e / output pairs across it are left out) */
  override reset(): void {}

  protected resetState(): void {}
}
