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
  /** context parallelism: the residuals of ranks 1..N-1 (their rows, on their engines; rank 0's are `res`) */
  private readonly rankRes: HiddenResiduals[] = [];
  abstract readonly describe: Record<string, unknown>;

  constructor(
    protected readonly engine: Engine,
    readonly mode: CacheMode,
    private readonly depth: 1 | 2 = 1,
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
  protected residualFor(_s: StepInfo, res: HiddenResiduals = this.res): { t: Tensor; owned: boolean } {
    return { t: res.last!, owned: false };
  }

  /** The step's decision (once per step): which rows run; logged. */
  private async decideStep(s: StepInfo, e: Tensor, e0: Tensor, blocks: number): Promise<boolean[]> {
    const sig: TimeSignals = { e: () => hostValues(e), e0: () => hostValues(e0) };
    const run = await this.decide(s, sig, this.res.last !== null);
    if (!this.res.last && !run.every(Boolean)) throw new Error(`[step cache] ${this.mode} skipped a row with nothing cached`);
    this.log.push({ step: s.step + 1, ran: [...run], blocks: run.some(Boolean) ? blocks : 0 });
    return run;
  }

  /** After the blocks: store the residual of the rows that ran, add the cached one to the rows that did not. */
  private async finishRows(s: StepInfo, res: HiddenResiduals, hs: Tensor, ran: boolean[], inspect: boolean): Promise<void> {
    if (ran.some(Boolean)) await res.store(hs, ran, inspect && this.inspect ? (r, l) => this.inspect!(s, r, l, ran) : undefined);
    const skip = ran.map((r) => !r);
    if (skip.some(Boolean)) {
      const r = this.residualFor(s, res);
      res.apply(hs, skip, r.t);
      if (r.owned) r.t.dispose();
    }
  }

  async beginStep(s: StepInfo): Promise<StepPlan> {
    const hook: DitStepCache = {
      plan: async ({ hs, e, e0, blocks }) => {
        const run = await this.decideStep(s, e, e0, blocks);
        if (run.some(Boolean)) this.res.keepInput(hs);
        return { rows: run, blocks };
      },
      finish: (hs, plan) => this.finishRows(s, this.res, hs, plan.rows, true),
    };
    return { kind: 'forward', hook, cpHooks: (engines) => this.cpHooks(s, engines) };
  }

  /**
   * Context parallelism (src/parallel/cp-dit.ts): one hook per rank, over that rank's rows of the
   * stream [B, Lr, D] on its own engine, each rank keeping the residuals of its own rows (every
   * piece is per token, so the rows' residuals are those of the one-device stream). Rank 0 (this
   * cache's engine) decides at its `plan`, from its e / e0 (the same on every rank); the others take
   * its decision. The context-parallel forward runs every row through the blocks even when the plan
   * skips some (MagCache's split steps): those rows are put back to their input at `finish` before
   * the cached residual is added, which is what the one-device forward computes for them.
   */
  cpHooks(s: StepInfo, engines: Engine[]): DitStepCache[] {
    if (engines[0] !== this.engine) throw new Error('[step cache] rank 0 of a context-parallel forward must run on the step cache\'s engine');
    let decided: boolean[] | null = null;
    return engines.map((e, r) => {
      const res = r === 0 ? this.res : (this.rankRes[r - 1] ??= new HiddenResiduals(e, this.depth));
      return {
        plan: async ({ hs, e: emb, e0, blocks }) => {
          if (r === 0) decided = await this.decideStep(s, emb, e0, blocks);
          if (!decided) throw new Error('[step cache] rank 0 plans first in a context-parallel forward');
          if (decided.some(Boolean)) res.keepInput(hs);
          return { rows: [...decided], blocks };
        },
        finish: async (hs, plan) => {
          if (plan.rows.some(Boolean) && !plan.rows.every(Boolean)) res.restoreSkipped(hs, plan.rows);
          // (inspect: flex's per-step bookkeeping, once per step)
          await this.finishRows(s, res, hs, plan.rows, r === 0);
        },
      };
    });
  }

  async endStep(_s: StepInfo, _pred: Float32Array): Promise<void> {}

  reset(): void {
    this.res.reset();
    for (const r of this.rankRes) r.reset();
    this.resetState();
  }

  dispose(): void {
    this.res.reset();
    for (const r of this.rankRes) r.reset();
  }
}

/** The reference's forward counter `cnt` of a row's forward (cond even, uncond odd) at a segment-local step. */
export function forwardCount(localStep: number, row: number): number {
  return 2 * localStep + row;
}
