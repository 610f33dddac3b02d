// A VRAM budget that places: the fastest placement whose predicted peak RESERVED bytes (what the
// device really holds: the caching allocator's buffers, live and cached) fits the budget.
//
// Candidates, fastest first (each later one trades time for memory):
//   level 0 → level 1 (tiled decode, CFG passes one after the other, chunked FFN/attention)
//   → level 2 (text encoder off the GPU) → level 3 with K of the N DiT blocks resident (K from N−1
//   down to 0: every streamed block costs an upload per step) → level 3 with smaller VAE tiles.
// The peak is linear in K (a resident block adds its bytes to the denoise phase and nothing else),
// so K comes from two plans (K = 0 and K = 1) and is checked with a third, not searched.

import type { Settings } from '../config/schema.ts';
import { ConfigError, OutOfMemoryError, fmtBytes } from '../util/errors.ts';
import { planRun, type PlanOptions, type RunPlan } from './plan.ts';
import type { ModelShapes } from './shapes.ts';

export interface BudgetChoice {
  plan: RunPlan;
  /** the settings with the chosen placement applied (level, resident blocks, tiles, ...) */
  settings: Settings;
  /** one line per candidate tried: what it needed, and why it was taken or passed over */
  reasons: string[];
}

/** The settings of one candidate placement. */
function withPlacement(s: Settings, p: { level: 0 | 1 | 2 | 3; residentBlocks?: number; tileSize?: number; bothExperts?: boolean }): Settings {
  const load = {
    ...s.load,
    lowMemLevel: p.level,
    // two-expert models: both experts resident is a level-0 candidate of its own (no swap)
    expertsResident: p.bothExperts ? ('both' as const) : ('active' as const),
    // the budget decides what the level's flags would: 'auto' lets the level speak
    offloadTextEncoder: 'auto' as const,
    offloadDit: 'auto' as const,
    offloadVae: 'auto' as const,
    vaeTiling: 'auto' as const,
    cfgSequential: 'auto' as const,
    residentBlocks: p.residentBlocks ?? 0,
    vaeTileSize: p.tileSize ?? s.load.vaeTileSize,
  };
  return { ...s, load };
}

const TILE_FALLBACKS = [32, 16, 8];

// Plans are pure functions of (model, settings, options): the hardware table asks for the same
// candidates at every VRAM size, so walks are remembered per model object.
const memo = new WeakMap<ModelShapes, Map<string, Promise<RunPlan>>>();
function planRunCached(model: ModelShapes, s: Settings, opts: PlanOptions): Promise<RunPlan> {
  let m = memo.get(model);
  if (!m) memo.set(model, (m = new Map()));
  const key = JSON.stringify([s.load, s.request, opts]);
  let p = m.get(key);
  if (!p) {
    p = planRun(model, s, opts);
    m.set(key, p);
    // a failed walk (out of memory under a limit) is not remembered as a result
    p.catch(() => m!.delete(key));
  }
  return p;
}

/**
 * A plan's peaks on its fullest device: rank 0's run peak, or with context parallelism any further
 * device's (its denoise and decode); infer.vram_budget is per device.
 */
export function fullestDevice(plan: RunPlan): { peakBytes: number; peakReservedBytes: number } {
  const others = (plan.devices ?? []).slice(1);
  return { peakBytes: Math.max(plan.peakBytes, ...others.map((d) => d.peakBytes)), peakReservedBytes: Math.max(plan.peakReservedBytes, ...others.map((d) => d.peakReservedBytes)) };
}

/** Choose the fastest placement that fits `budget` bytes; throws ConfigError when none does. */
export async function choosePlacement(model: ModelShapes, settings: Settings, budget: number, opts: PlanOptions = {}): Promise<BudgetChoice> {
  const reasons: string[] = [];
  const tryOne = async (label: string, s: Settings): Promise<RunPlan | null> => {
    const plan = await planRunCached(model, s, opts);
    const full = fullestDevice(plan);
    const per = plan.devices && plan.devices.length > 1 ? ' on the fullest device' : '';
    const need = `peak allocated ${fmtBytes(full.peakBytes)}, reserved ${fmtBytes(full.peakReservedBytes)}${per}`;
    if (full.peakReservedBytes <= budget) {
      reasons.push(`${label}: ${need} — fits, chosen`);
      return plan;
    }
    if (full.peakBytes > budget) {
      reasons.push(`${label}: ${need} — too big`);
      return null;
    }
    // the live tensors fit and only cached buffers cross the budget: the run's allocator gives its
    // cache back before crossing its limit, so walk the run again under that limit
    try {
      const limited = await planRunCached(model, s, { ...opts, limitBytes: budget });
      reasons.push(`${label}: ${need} unlimited; under the budget the allocator gives cached buffers back (reserved ${fmtBytes(fullestDevice(limited).peakReservedBytes)}) — fits, chosen`);
      return limited;
    } catch (e) {
      if (!(e instanceof OutOfMemoryError)) throw e;
      reasons.push(`${label}: ${need} — does not fit even with the cache given back (${e.message.split('.')[0]})`);
      return null;
    }
  };
  if (model.experts > 1) {
    // fastest for Wan 2.2: both experts on the GPU, no swap at the boundary
    const s = withPlacement(settings, { level: 0, bothExperts: true });
    const p = await tryOne('level 0, both experts resident', s);
    if (p) return { plan: p, settings: s, reasons };
  }
  for (const level of [0, 1, 2] as const) {
    const s = withPlacement(settings, { level });
    const p = await tryOne(model.experts > 1 ? `level ${level}, the active expert resident` : `level ${level}`, s);
    if (p) return { plan: p, settings: s, reasons };
  }
  // level 3: as many resident blocks as fit
  const s0 = withPlacement(settings, { level: 3, residentBlocks: 0 });
  const p0 = await planRunCached(model, s0, opts);
  const n = p0.placement.numBlocks;
  const s1 = withPlacement(settings, { level: 3, residentBlocks: 1 });
  const p1 = await planRunCached(model, s1, opts);
  const perBlock = Math.max(1, fullestDevice(p1).peakReservedBytes - fullestDevice(p0).peakReservedBytes);
  let k = Math.max(0, Math.min(n, Math.floor((budget - fullestDevice(p0).peakReservedBytes) / perBlock)));
  while (k > 0) {
    const s = withPlacement(settings, { level: 3, residentBlocks: k });
    const p = await tryOne(`level 3, ${k} of ${n} DiT blocks resident`, s);
    if (p) return { plan: p, settings: s, reasons };
    k--; // the linear estimate was optimistic (reserved rounds to size classes): one fewer
  }
  const p = await tryOne(`level 3, all ${n} DiT blocks streamed`, s0);
  if (p) return { plan: p, settings: s0, reasons };
  for (const tile of TILE_FALLBACKS) {
    const s = withPlacement(settings, { level: 3, residentBlocks: 0, tileSize: tile });
    const pt = await tryOne(`level 3, all blocks streamed, VAE tiles of ${tile}`, s);
    if (pt) return { plan: pt, settings: s, reasons };
  }
  throw await budgetError(model, settings, budget, opts);
}

/** The smallest placement's needs: the least memory this model and size can run in. */
export async function smallestPlan(model: ModelShapes, settings: Settings, opts: PlanOptions = {}): Promise<RunPlan> {
  return planRunCached(model, withPlacement(settings, { level: 3, residentBlocks: 0, tileSize: TILE_FALLBACKS[TILE_FALLBACKS.length - 1] }), opts);
}

/** Whether the smallest placement runs under `budget` (with the cache given back as needed). */
async function fitsAt(model: ModelShapes, settings: Settings, budget: number, opts: PlanOptions): Promise<boolean> {
  const p = fullestDevice(await smallestPlan(model, settings, opts));
  if (p.peakReservedBytes <= budget) return true;
  if (p.peakBytes > budget) return false;
  try {
    await smallestPlan(model, settings, { ...opts, limitBytes: budget });
    return true;
  } catch (e) {
    if (e instanceof OutOfMemoryError) return false;
    throw e;
  }
}

/** The largest 16:9 size (multiples of 16, at the request's frame count) whose smallest placement fits `budget`; null if none. */
export async function largestSizeFor(model: ModelShapes, settings: Settings, budget: number, opts: PlanOptions = {}): Promise<{ width: number; height: number } | null> {
  const fits = async (w: number) => {
    const h = Math.max(16, Math.round((w * 9) / 16 / 16) * 16);
    const s = { ...settings, request: { ...settings.request, width: w, height: h } };
    return (await fitsAt(model, s, budget, opts)) ? { width: w, height: h } : null;
  };
  let lo = 1; // widths 16·lo
  let hi = 256; // 4096 px
  if (!(await fits(16 * lo))) return null;
  let best = await fits(16 * lo);
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    const r = await fits(16 * mid);
    if (r) {
      lo = mid;
      best = r;
    } else hi = mid - 1;
  }
  return best;
}

/** The smallest budget the smallest placement runs under (to 1 %), by walking it under limits. */
export async function smallestBudget(model: ModelShapes, settings: Settings, opts: PlanOptions = {}): Promise<number> {
  const p = fullestDevice(await smallestPlan(model, settings, opts));
  let lo = p.peakBytes; // the live tensors alone: no limit below this can work
  let hi = p.peakReservedBytes; // works: nothing had to be given back
  while (hi - lo > 0.01 * hi) {
    const mid = Math.round((lo + hi) / 2);
    if (await fitsAt(model, settings, mid, opts)) hi = mid;
    else lo = mid;
  }
  return hi;
}

async function budgetError(model: ModelShapes, settings: Settings, budget: number, opts: PlanOptions): Promise<ConfigError> {
  const r = settings.request;
  const least = await smallestBudget(model, settings, opts);
  const size = await largestSizeFor(model, settings, budget, opts);
  return new ConfigError(
    `infer.vram_budget=${fmtBytes(budget)} cannot hold ${r.width}x${r.height}, ${r.numFrames} frames of ${model.name}: ` +
      `the smallest placement (level 3, every DiT block streamed, VAE tiles of ${TILE_FALLBACKS[TILE_FALLBACKS.length - 1]}) needs a budget of at least ${fmtBytes(least)}. ` +
      (size ? `The largest 16:9 size that fits this budget at ${r.numFrames} frames is ${size.width}x${size.height}.` : `No size fits this budget at ${r.numFrames} frames; raise the budget or lower the frame count.`),
  );
}
