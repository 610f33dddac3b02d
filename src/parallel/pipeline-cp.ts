// The pipeline's side of context parallelism (infer.diffusion.cp_size / cp_devices): which
// settings it runs with, the extra devices and their DiT copies, where each device keeps the DiT's
// blocks (a full copy, its shard, or streamed: cpBlockPlacement), and freeing them.

import type { AdapterEntry } from '../device/gpu.ts';
import { Engine } from '../runtime/engine.ts';
import { WanTransformer3DModel } from '../models/wan_dit/model.ts';
import type { BlockResidency } from '../nn/residency.ts';
import { StreamedBlocks } from '../pipeline/residency.ts';
import { ConfigError } from '../util/errors.ts';
import { ContextParallelDit, type CpRank } from './cp-dit.ts';

/**
 * Adapters dawn.node can reach by name: adapter k is reached by its full name only when no earlier
 * adapter's name contains it (dawn.node takes the first adapter whose name contains the one asked
 * for: two adapters of the same name, e.g. two identical GPUs, cannot both be opened).
 */
export function reachableAdapters(all: AdapterEntry[]): boolean[] {
  return all.map((a, k) => !all.slice(0, k).some((b) => b.name.includes(a.name)));
}

/**
 * The adapter of each of the n devices (a name substring for Engine.create; '' = the default
 * adapter), from infer.diffusion.cp_devices: adapter names (substrings) or indices into `list()`
 * (listAdapters: the order dawn.node searches them), one per device. Empty: device.adapter for every
 * device when it is set; else the first n hardware adapters when n of them can be opened by name,
 * else n devices on the default adapter (with a note when identical adapters are the reason).
 */
export async function resolveCpAdapters(n: number, cpDevices: string, adapter: string, list: () => Promise<AdapterEntry[]>): Promise<{ adapters: string[]; note: string | null }> {
  const entries = cpDevices
    .split(',')
    .map((x) => x.trim())
    .filter((x) => x.length > 0);
  if (entries.length === 0) {
    if (adapter) return { adapters: Array.from({ length: n }, () => adapter), note: null };
    const all = await list();
    const ok = reachableAdapters(all);
    const hw = all.filter((a) => !a.software);
    const open = all.filter((a, k) => !a.software && ok[k]);
    if (open.length >= n) return { adapters: open.slice(0, n).map((a) => a.name), note: null };
    const note =
      hw.length >= n
        ? `infer.diffusion.cp_devices is empty and this machine has ${hw.length} GPU adapters, but dawn.node opens adapters by name and ${hw.length - open.length} of them share a name with an earlier one (${[...new Set(hw.map((a) => `'${a.name}'`))].join(', ')}): all ${n} devices run on the first adapter (they split the activations, not the GPUs' memory)`
        : null;
    return { adapters: Array.from({ length: n }, () => ''), note };
  }
  if (entries.length !== n) {
    throw new ConfigError(`infer.diffusion.cp_devices names ${entries.length} adapter(s) (${entries.join(', ')}) but the run uses ${n} devices (infer.diffusion.cp_size, or 2 with cfg_parallel): give one adapter name or index per device, or leave cp_devices empty`);
  }
  let all: AdapterEntry[] | null = null;
  const out: string[] = [];
  for (const x of entries) {
    if (!/^\d+$/.test(x)) {
      out.push(x);
      continue;
    }
    all ??= await list();
    const k = Number(x);
    const names = all.map((a, i) => `${i} '${a.name}' (${a.backend})`).join(', ');
    if (k >= all.length) throw new ConfigError(`infer.diffusion.cp_devices: adapter index ${k} does not exist; this machine has ${all.length}: ${names}`);
    if (!reachableAdapters(all)[k]) {
      const first = all.findIndex((b) => b.name.includes(all![k]!.name));
      throw new ConfigError(
        `infer.diffusion.cp_devices: adapter ${k} '${all[k]!.name}' cannot be opened: dawn.node opens adapters by name (the first whose name contains it), and adapter ${first} '${all[first]!.name}' matches it first; use index ${first} for every device on it, or a machine whose GPUs have distinct names (${names})`,
      );
    }
    out.push(all[k]!.name);
  }
  return { adapters: out, note: null };
}

/** What context parallelism does not run with yet: a one-line refusal naming it (null: fine). */
export function cpUnsupported(o: { cpSize: number; cfgParallel?: boolean; ditStreamed: boolean; twoExperts: boolean; activationOffload: boolean; cacheMode?: string; diskStreamed?: boolean }): string | null {
  if (o.cfgParallel && o.cpSize > 1) return `infer.diffusion.cfg_parallel=true and infer.diffusion.cp_size=${o.cpSize} do not combine yet (not built: docs/context-parallel.md); use one of them`;
  if (o.cpSize <= 1 && !o.cfgParallel) return null;
  const key = o.cfgParallel ? 'infer.diffusion.cfg_parallel=true' : `infer.diffusion.cp_size=${o.cpSize}`;
  const fix1 = o.cfgParallel ? 'cfg_parallel=false' : 'cp_size=1';
  const why = (what: string, fix: string) => `${key} does not run ${what} yet (not built: docs/context-parallel.md); ${fix.replace('cp_size=1', fix1)}`;
  // (cp_size > 1 streams each device's blocks from one host copy: cpBlockPlacement)
  if (o.ditStreamed && o.cfgParallel) return why('with the DiT streamed (low_mem_level 3 or infer.offload_dit=true)', 'use low_mem_level 0..2 with infer.offload_dit=auto/false, or cp_size=1');
  if (o.diskStreamed) return why('with the DiT blocks read from disk (infer.weights_source=disk)', 'use infer.weights_source=memory, infer.diffusion.cp_shard_weights=false at levels 0..2, or cp_size=1');
  if (o.twoExperts) return why('two-expert models (Wan 2.2 A14B)', 'use cp_size=1');
  if (o.activationOffload) return why('with infer.activation_offload=true', 'set it to false, or cp_size=1');
  if (o.cfgParallel && o.cacheMode && o.cacheMode !== 'off') return why(`with step caching (infer.cache.mode=${o.cacheMode})`, 'use infer.cache.mode=off, or cp_size=1');
  return null;
}

/**
 * Where each device of a context-parallel run keeps the DiT's blocks:
 *   - the DiT streamed (level 3, infer.offload_dit=true): every device streams its blocks through
 *     its own two-slot ring from ONE host copy, keeping `resident_blocks` of them resident;
 *   - levels 0-2 with infer.diffusion.cp_shard_weights on (auto: level >= 2): each device keeps its
 *     shard, ceil(blocks / N) blocks, resident and streams the others from the host copy, so the
 *     weights on a device are ~1/N of the blocks plus two slots instead of a full copy;
 *   - otherwise a full copy per device (stream: false).
 */
export function cpBlockPlacement(o: { cpSize: number; level: number; ditStreamed: boolean; shard: boolean | 'auto'; residentBlocks: number; numBlocks: number }): { stream: boolean; resident: number } {
  if (o.cpSize <= 1) return { stream: o.ditStreamed, resident: o.residentBlocks };
  if (o.ditStreamed) return { stream: true, resident: Math.min(o.residentBlocks, o.numBlocks) };
  const shard = o.shard === 'auto' ? o.level >= 2 : o.shard;
  return shard ? { stream: true, resident: Math.ceil(o.numBlocks / o.cpSize) } : { stream: false, resident: o.numBlocks };
}

/**
 * The order of rank r's blocks in its ring: its resident blocks first, then the streamed ones in
 * run order (so consecutive streamed blocks take the ring's slots in turn). The resident ones are
 * the first `resident` of r, r + N, r + 2N, ..., then r + 1, r + 1 + N, ...: with resident =
 * ceil(blocks / N) every block is resident on one device (its shard) and, at each block, the
 * other N - 1 devices upload it: the uploads are balanced over the ranks and spread evenly over the
 * blocks (a prefix shard would upload nothing for the first blocks and on every device after).
 */
export function cpBlockOrder(blocks: number, ranks: number, r: number, resident: number): number[] {
  const seq = Array.from({ length: blocks }, (_, i) => i).sort((a, b) => ((a - r + blocks * ranks) % ranks) - ((b - r + blocks * ranks) % ranks) || a - b);
  const keep = seq.slice(0, Math.min(resident, blocks));
  const kept = new Set(keep);
  return [...keep, ...seq.filter((i) => !kept.has(i)).sort((a, b) => a - b)];
}

/** A ring's BlockResidency in model block numbers: block i is ring entry pos[i]; prefetch brings the next block that is not resident. */
class RankResidency implements BlockResidency {
  private readonly pos: number[];
  constructor(
    private readonly ring: StreamedBlocks,
    order: number[],
  ) {
    this.pos = [];
    order.forEach((blk, j) => (this.pos[blk] = j));
  }
  acquire(i: number): Promise<void> {
    return this.ring.acquire(this.pos[i]!);
  }
  prefetch(i: number): void {
    for (let j = i; j < this.pos.length; j++) {
      if (this.pos[j]! >= this.ring.resident) {
        this.ring.prefetch(this.pos[j]!);
        return;
      }
    }
  }
  release(i: number): void {
    this.ring.release(this.pos[i]!);
  }
}

/**
 * Rank r's streaming ring over its DiT's blocks (their params in host memory, or meta placeholders
 * with `sharedImages` / `meta`), in cpBlockOrder, and the residency the CP forward drives it with.
 * sharedImages(i): model block i's host image (another rank's ring's), so the host holds one copy.
 */
export function cpRankRing(engine: Engine, dit: WanTransformer3DModel, r: number, ranks: number, resident: number, o: { meta?: boolean; sharedImages?: (block: number) => Uint8Array } = {}): { ring: StreamedBlocks; residency: BlockResidency; order: number[] } {
  const n = dit.blocks.length;
  const order = cpBlockOrder(n, ranks, r, resident);
  const ring = new StreamedBlocks(
    engine,
    order.map((i) => dit.blocks.at(i)),
    'dit.blocks.slot',
    { resident, ownerOf: (j) => `dit.blocks.${order[j]}`, meta: o.meta, sharedImages: o.sharedImages ? order.map((i) => o.sharedImages!(i)) : undefined },
  );
  return { ring, residency: new RankResidency(ring, order), order };
}

/**
 * The devices of a context-parallel run: rank 0 is the pipeline's engine and DiT, ranks 1..N-1 a
 * new engine on each adapter with a DiT copy loaded by `load` (placement per key: 'device', or
 * 'disk' = not read, a meta placeholder, for streamed blocks). With `stream` (cpBlockPlacement),
 * rank 0's DiT blocks must be in host memory: rank 0's ring packs them once, and every other rank's
 * ring streams from the same host images (its block params are not read). On failure everything
 * created is freed.
 */
export async function createContextParallel(o: {
  engine0: Engine;
  dit0: WanTransformer3DModel;
  adapters: string[];
  backend: string;
  limitBytes?: number;
  load: (dit: WanTransformer3DModel, engine: Engine, placement: (key: string) => 'device' | 'disk') => Promise<void>;
  stream?: { resident: number };
}): Promise<ContextParallelDit> {
  const N = o.adapters.length;
  const made: CpRank[] = [];
  let rank0: CpRank = { engine: o.engine0, dit: o.dit0 };
  try {
    let images: ((block: number) => Uint8Array) | undefined;
    if (o.stream) {
      const r0 = cpRankRing(o.engine0, o.dit0, 0, N, o.stream.resident);
      rank0 = { engine: o.engine0, dit: o.dit0, ring: r0.ring, residency: r0.residency };
      const pos0: number[] = [];
      r0.order.forEach((blk, j) => (pos0[blk] = j));
      images = (i) => {
        const b = r0.ring.imageBytes(pos0[i]!);
        if (!b) throw new ConfigError('[cp] rank 0\'s streamed blocks have no host image to share (infer.weights_source=disk is not supported with cp_size > 1 and streamed blocks)');
        return b;
      };
    }
    for (let r = 1; r < N; r++) {
      const engine = await Engine.create({ backend: o.backend || undefined, adapter: o.adapters[r] || undefined, limitBytes: o.limitBytes });
      const dit = new WanTransformer3DModel({ ...o.dit0.dims });
      const rank: CpRank = { engine, dit };
      made.push(rank);
      await o.load(dit, engine, (k) => (images && dit.isBlockKey(k) ? 'disk' : 'device'));
      if (images) {
        const rr = cpRankRing(engine, dit, r, N, o.stream!.resident, { sharedImages: images });
        rank.ring = rr.ring;
        rank.residency = rr.residency;
      }
    }
    return new ContextParallelDit([rank0, ...made]);
  } catch (e) {
    for (const m of made) {
      m.ring?.dispose();
      m.dit.disposeParams();
      m.engine.destroy();
    }
    rank0.ring?.dispose();
    throw e;
  }
}

/** Free ranks 1..N-1 (their rings, DiT copies and engines); rank 0 (its DiT and ring) belongs to the pipeline. */
export function disposeContextParallel(cp: { ranks: ContextParallelDit['ranks'] }): void {
  for (const r of cp.ranks.slice(1)) {
    r.ring?.dispose();
    r.dit.disposeParams();
    r.engine.destroy();
  }
}
