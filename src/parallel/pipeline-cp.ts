// The pipeline's side of context parallelism (infer.diffusion.cp_size / cp_devices): which
// settings it runs with, the extra devices and their DiT copies, and freeing them.

import { Engine } from '../runtime/engine.ts';
import { WanTransformer3DModel } from '../models/wan_dit/model.ts';
import { ConfigError } from '../util/errors.ts';
import { ContextParallelDit } from './cp-dit.ts';

/**
 * The adapter name substring of each of the cp_size devices: cp_devices split at commas (exactly
 * cp_size entries), or device.adapter (or '' = Dawn's default) for every device.
 */
export function cpAdapters(cpSize: number, cpDevices: string, adapter: string): string[] {
  const list = cpDevices
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
  if (list.length === 0) return Array.from({ length: cpSize }, () => adapter);
  if (list.length !== cpSize) {
    throw new ConfigError(`infer.diffusion.cp_devices names ${list.length} adapter(s) (${list.join(', ')}) but infer.diffusion.cp_size is ${cpSize}: give one adapter name per device, or leave cp_devices empty`);
  }
  return list;
}

/** What context parallelism does not run with yet: a one-line refusal naming it (null: fine). */
export function cpUnsupported(o: { cpSize: number; cfgParallel?: boolean; ditStreamed: boolean; twoExperts: boolean; activationOffload: boolean; cacheMode?: string }): string | null {
  if (o.cfgParallel && o.cpSize > 1) return `infer.diffusion.cfg_parallel=true and infer.diffusion.cp_size=${o.cpSize} do not combine yet (not built: docs/context-parallel.md); use one of them`;
  if (o.cpSize <= 1 && !o.cfgParallel) return null;
  const key = o.cfgParallel ? 'infer.diffusion.cfg_parallel=true' : `infer.diffusion.cp_size=${o.cpSize}`;
  const fix1 = o.cfgParallel ? 'cfg_parallel=false' : 'cp_size=1';
  const why = (what: string, fix: string) => `${key} does not run ${what} yet (not built: docs/context-parallel.md); ${fix.replace('cp_size=1', fix1)}`;
  if (o.ditStreamed) return why('with the DiT streamed (low_mem_level 3 or infer.offload_dit=true)', 'use low_mem_level 0..2 with infer.offload_dit=auto/false, or cp_size=1');
  if (o.twoExperts) return why('two-expert models (Wan 2.2 A14B)', 'use cp_size=1');
  if (o.activationOffload) return why('with infer.activation_offload=true', 'set it to false, or cp_size=1');
  if (o.cacheMode && o.cacheMode !== 'off') return why(`with step caching (infer.cache.mode=${o.cacheMode})`, 'use infer.cache.mode=off, or cp_size=1');
  return null;
}

/**
 * Ranks 1..N-1 of a context-parallel run: a new engine on each adapter (rank 0 is the pipeline's
 * own engine and DiT) and a DiT copy loaded onto it by `load`. On failure everything created is freed.
 */
export async function createContextParallel(o: {
  engine0: Engine;
  dit0: WanTransformer3DModel;
  adapters: string[];
  backend: string;
  limitBytes?: number;
  load: (dit: WanTransformer3DModel, engine: Engine) => Promise<void>;
}): Promise<ContextParallelDit> {
  const made: Array<{ engine: Engine; dit: WanTransformer3DModel }> = [];
  try {
    for (let r = 1; r < o.adapters.length; r++) {
      const engine = await Engine.create({ backend: o.backend || undefined, adapter: o.adapters[r] || undefined, limitBytes: o.limitBytes });
      const dit = new WanTransformer3DModel({ ...o.dit0.dims });
      made.push({ engine, dit });
      await o.load(dit, engine);
    }
    return new ContextParallelDit([{ engine: o.engine0, dit: o.dit0 }, ...made]);
  } catch (e) {
    for (const m of made) {
      m.dit.disposeParams();
      m.engine.destroy();
    }
    throw e;
  }
}

/** Free ranks 1..N-1 (their DiT copies and engines); rank 0 belongs to the pipeline. */
export function disposeContextParallel(cp: { ranks: ContextParallelDit['ranks'] }): void {
  for (const r of cp.ranks.slice(1)) {
    r.dit.disposeParams();
    r.engine.destroy();
  }
}
