// The common shape of the methods that cache the blocks' residual in the DiT's hidden space
// (TeaCache, MagCache, flex): every step runs the forward with a hook; at the hook's `plan` the
// method decides per CFG row whether the row runs the blocks (its decision logic lives in its own
// file, as host code over numbers); rows that run have their residual stored at `finish`, rows
// that do not get the cached residual added to the stream before the head.

import type { Engine } from '../../runtime/engine.ts';
import type { Tensor } from '../../tensor/tensor.ts';
import type { DitStepCache } from '../../models/wan_dit/model.ts';
import { HiddenResiduals, hostValues } from './residual.ts';
import type { CacheMode, StepCache, StepInfo, StepLog, StepPlan } from './types.ts';

/** The step's time signals, read from the GPU only when a method asks (a readback waits for the GPU). */
export interface TimeSignals {
  /** Wan's e [1, D]: the time embedding */
  e(): Promise<Float32Array>;
  /** Wan's e0 [6, D]: the time projection (the blocks' modulation before their own table) */
  e0(): Promise<Float32Array>;
}

export abstract class HiddenStepCache implements StepCache {
  readonly log: StepLog[] = [];
  protected readonly res: HiddenResiduals;
  abstract readonly describe: Record<string, unknown>;

  constructor(
    protected readonly engine: Engine,
    readonly mode: CacheMode,
    depth: 1 | 2 = 1,
  ) {
    this.res = new HiddenResiduals(engine, depth);
  }

  /**
   * per row: true = run the blocks. Called once per step, in step order. `cached`: a residual is
   * there to reuse (false at the first step and after a reset: a method must compute then, and
   * does what its compute branch does).
   */
  protected abstract decide(s: StepInfo, sig: TimeSignals, cached: boolean): Promise<boolean[]>;
  /** forget the method's own state (the residuals are handled here) */
  protected abstract resetState(): void;
  /** sees each new residual [B, L, D] and the previous one before it is stored (flex's rate) */
  protected inspect?(s: StepInfo, res: Tensor, last: Tensor | null, ran: boolean[]): Promise<void>;
  /** the residual a skipped row gets (default: its latest); `owned` ones are freed after use */
  protected residualFor(_s: StepInfo): { t: Tensor; owned: boolean } {
    return { t: this.res.last!, owned: false };
  }

  async beginStep(s: StepInfo): Promise<StepPlan> {
    const hook: DitStepCache = {
      plan: async ({ hs, e, e0, blocks }) => {
        const sig: TimeSignals = { e: () => hostValues(e), e0: () => hostValues(e0) };
        const run = await this.decide(s, sig, this.res.last !== null);
        if (!this.res.last && !run.every(Boolean)) throw new Error(`[step cache] ${this.mode} skipped a row with nothing cached`);
        const any = run.some(Boolean);
        if (any) this.res.keepInput(hs);
        this.log.push({ step: s.step + 1, ran: [...run], blocks: any ? blocks : 0 });
        return { rows: run, blocks };
      },
      finish: async (hs, plan) => {
        const ran = plan.rows;
        if (ran.some(Boolean)) await this.res.store(hs, ran, this.inspect ? (r, l) => this.inspect!(s, r, l, ran) : undefined);
        const skip = ran.map((r) => !r);
        if (skip.some(Boolean)) {
          const r = this.residualFor(s);
          this.res.apply(hs, skip, r.t);
          if (r.owned) r.t.dispose();
        }
      },
    };
    return { kind: 'forward', hook };
  }

  async endStep(_s: StepInfo, _pred: Float32Array): Promise<void> {}

  reset(): void {
    this.res.reset();
    this.resetState();
  }

  dispose(): void {
    this.res.reset();
  }
}

/** The reference's forward counter `cnt` of a row's forward (cond even, uncond odd) at a segment-local step. */
export function forwardCount(localStep: number, row: number): number {
  return 2 * localStep + row;
}
