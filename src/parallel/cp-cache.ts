// Step caching (infer.cache.*, src/pipeline/cache/) inside a context-parallel forward: the glue
// between ContextParallelDit.forward and the per-rank hooks of a step cache (HiddenStepCache.cpHooks).
//
// The methods that cache in the hidden space (TeaCache, MagCache, flex) decide from numbers that
// do not depend on the token split (Wan's e / e0, which every rank computes alike, or calibrated
// ratios), and keep the blocks' residual r = (stream after the blocks) - (stream before) per token
// row: each rank keeps the residual of its own rows on its own device, so nothing extra crosses the
// host. Rank 0's hook decides; the others follow. EasyCache skips the whole forward on the host
// (no hook), so it needs nothing here.

import type { DitStepCache, DitStepPlan } from '../models/wan_dit/model.ts';
import type { Tensor } from '../tensor/tensor.ts';
import { ShapeError } from '../util/errors.ts';

/** What the forward's ranks hand the hooks: their rows of the stream [B, Lr, D] and the step's time embeddings. */
export interface CpCacheRank {
  hs: Tensor;
  emb: Tensor;
  e0: Tensor;
}

/**
 * Ask every rank's hook (rank 0 first: it decides) which rows run how many leading blocks. Returns
 * the plan (null: no step cache) and the blocks the forward runs: all rows run them (rows the plan
 * skips are put back to their input by the hooks' finish), 0 when no row runs.
 */
export async function cpStepPlan(hooks: DitStepCache[] | undefined, ranks: CpCacheRank[], B: number, blocks: number): Promise<{ plan: DitStepPlan | null; blocks: number }> {
  if (!hooks) return { plan: null, blocks };
  if (hooks.length !== ranks.length) throw new ShapeError(`[cp_dit] stepCache needs one hook per rank (${ranks.length}), got ${hooks.length}`);
  const plans: DitStepPlan[] = [];
  for (const [r, h] of hooks.entries()) plans.push(await h.plan({ hs: ranks[r]!.hs, e: ranks[r]!.emb, e0: ranks[r]!.e0, blocks }));
  const p = plans[0]!;
  if (p.rows.length !== B || !(Number.isInteger(p.blocks) && p.blocks >= 0 && p.blocks <= blocks)) {
    throw new ShapeError(`[cp_dit] step cache plan must give ${B} rows and 0..${blocks} blocks, got ${p.rows.length} rows and ${p.blocks} blocks`);
  }
  if (plans.some((q) => q.blocks !== p.blocks || q.rows.join() !== p.rows.join())) throw new ShapeError('[cp_dit] the ranks\' step cache hooks planned differently; rank 0 decides for all');
  return { plan: p, blocks: p.rows.some(Boolean) ? p.blocks : 0 };
}

/** After the blocks: every rank's hook completes its rows of the stream (in place) before the head. */
export async function cpStepFinish(hooks: DitStepCache[] | undefined, ranks: CpCacheRank[], plan: DitStepPlan | null): Promise<void> {
  if (!hooks || !plan) return;
  for (const [r, h] of hooks.entries()) await h.finish(ranks[r]!.hs, plan);
}
