// What lives where, per component and phase, from `infer.diffusion.low_mem_level` and the
// fine-grained flags that override it (either way).
//
// | level | text encoder                 | DiT                                   | VAE decoder                     |
// |-------|------------------------------|---------------------------------------|---------------------------------|
// | 0     | resident on the GPU          | resident                              | resident, whole-frame decode    |
// | 1     | resident                     | resident                              | resident, spatially tiled       |
// | 2     | never on the GPU (CPU device | resident                              | tiled                           |
// |       | or streamed block by block)  |                                       |                                 |
// | 3     | as level 2                   | host memory, streamed one block at a  | tiled; weights on the GPU only  |
// |       |                              | time with the next block prefetched   | during decode                   |
//
// Context parallelism (infer.diffusion.cp_size > 1) at level 2 takes the VAE's level 3 rules (weights
// on the GPU for the decode only, the lean whole-frame stem): docs/context-parallel.md.

import type { LoadSettings } from '../config/schema.ts';
import type { CachingAllocator } from '../memory/allocator.ts';
import type { WeightDtype } from '../nn/load.ts';
import { ConfigError } from '../util/errors.ts';
import { autoFfnChunkTokens, autoAttnChunkTokens } from '../models/wan_dit/model.ts';
import type { WanVaeDecoder } from '../models/wan_vae/model.ts';
import { leanStemStages, STEM_STAGES } from './tiled-vae.ts';

export interface MemoryPlan {
  level: 0 | 1 | 2 | 3;
  /** 'gpu': resident; 'cpu': runs on the CPU device; 'gpu-stream': host weights streamed per block */
  textEncoder: 'gpu' | 'cpu' | 'gpu-stream';
  /** 'resident' or 'stream' (per-block upload with prefetch) */
  dit: 'resident' | 'stream';
  /** 'resident' (loaded with the model) or 'on-demand' (uploaded for the decode phase, freed after) */
  vae: 'resident' | 'on-demand';
  vaeTiling: boolean;
  /** the largest tile in latent pixels; 0 = auto (src/pipeline/tiled-vae.ts planAutoTiles) */
  tileSize: number;
  /** overlap as a fraction of the tile */
  tileOverlap: number;
  /** decoder stages run on whole frames before tiling; -1 = auto (tiled-vae.ts STEM_STAGES) */
  stemStages: number;
  activationOffload: boolean;
  /** with dit 'stream': blocks 0..residentBlocks-1 stay on the GPU, the rest go through the ring */
  residentBlocks: number;
  /** cond and uncond one after the other inside each DiT block (one upload per block, half the activations) */
  cfgSequential: boolean;
  /** tokens per DiT FFN chunk; 0 = auto (ffnChunkFor) */
  ffnChunkTokens: number;
  /** query tokens per self-attention chunk; 0 = auto (attnChunkFor) */
  attnChunkTokens: number;
  /** devices the DiT's tokens are split over (infer.diffusion.cp_size; 1 with cfg_parallel, whose devices run the one-device forward) */
  cpSize: number;
}

const flag = (v: boolean | 'auto', auto: boolean): boolean => (v === 'auto' ? auto : v);

const LEVELS = [0, 1, 2, 3] as const;

export function memoryPlan(s: LoadSettings): MemoryPlan {
  // the schema bounds the level to 0..3; this narrows the number to the plan's literal type
  const level = LEVELS[s.lowMemLevel]!;
  const cp = s.cfgParallel ? 1 : s.cpSize;
  // context parallelism at level >= 2 is run for each device's memory: the VAE's weights would be
  // rank 0's alone through the denoise (the one imbalance between the devices), so they come to the
  // GPU for the decode only, as at level 3 (an upload of 0.27 GiB per request at 1.3B)
  const lowCp = cp > 1 && level >= 2;
  if (s.vaeTileSize > 0 && s.vaeTileSize < 4) throw new ConfigError(`infer.vae_tile_size=${s.vaeTileSize}: tiles need at least 4 latent pixels (or 0 for auto)`);
  return {
    level,
    textEncoder: flag(s.offloadTextEncoder, level >= 2) ? s.textEncoderDevice : 'gpu',
    dit: flag(s.offloadDit, level >= 3) ? 'stream' : 'resident',
    vae: flag(s.offloadVae, level >= 3 || lowCp) ? 'on-demand' : 'resident',
    vaeTiling: flag(s.vaeTiling, level >= 1),
    tileSize: s.vaeTileSize,
    tileOverlap: s.vaeTileOverlap,
    stemStages: s.vaeStemStages,
    activationOffload: s.activationOffload,
    residentBlocks: s.residentBlocks,
    cfgSequential: flag(s.cfgSequential, level >= 1),
    ffnChunkTokens: s.ffnChunkTokens,
    attnChunkTokens: s.attnChunkTokens,
    cpSize: cp,
  };
}

// The placement rules below are shared by the pipeline (wan-pipeline.ts) and the memory planner
// (src/plan/plan.ts), so a plan and a run cannot disagree about where a weight lives.

/** Where a DiT weight goes at load: blocks stay in host memory when the DiT is streamed. */
export function ditPlacement(plan: MemoryPlan, isBlockKey: (key: string) => boolean): (key: string) => 'device' | 'host' {
  const stream = plan.dit === 'stream';
  return (k) => (stream && isBlockKey(k) ? 'host' : 'device');
}

/**
 * infer.weights_source=disk: what the plan keeps in host memory between uses is read from its file
 * per use instead. `offGpu(key)` says which of the host-placed keys are streamed or swapped per use
 * (the blocks; every key of Wan 2.2's experts); the rest stays as placed.
 */
export function onDisk(place: (key: string) => 'device' | 'host', disk: boolean, perUse: (key: string) => boolean): (key: string) => 'device' | 'host' | 'disk' {
  if (!disk) return place;
  return (k) => {
    const p = place(k);
    return p === 'host' && perUse(k) ? 'disk' : p;
  };
}

/**
 * How the text encoder loads in a mode: on the GPU at all (engine), in which dtype (the CPU device
 * computes in the file's dtype), and where each weight goes (its block weights stay in host memory
 * for 'gpu-stream'; the CPU device keeps everything on the host).
 */
export function textEncoderLoad(
  mode: MemoryPlan['textEncoder'],
  weightDtype: WeightDtype,
  te: { isDeviceKey(k: string): boolean; isBlockKey(k: string): boolean },
): { onGpu: boolean; weightDtype: WeightDtype; placement: (key: string) => 'device' | 'host' } {
  return {
    onGpu: mode !== 'cpu',
    weightDtype: mode === 'cpu' ? 'checkpoint' : weightDtype,
    placement: (k) => (mode !== 'cpu' && te.isDeviceKey(k) && !(mode === 'gpu-stream' && te.isBlockKey(k)) ? 'device' : 'host'),
  };
}

/**
 * The allocator at a phase boundary: low-memory levels give the previous phase's cached buffers
 * back (as torch.cuda.empty_cache() between stages), so `reserved` follows the phase that runs now.
 */
export function enterPhase(allocator: CachingAllocator, plan: MemoryPlan, phase: string): void {
  allocator.phase = phase;
  if (plan.level >= 1 && (phase === 'denoise' || phase === 'decode')) allocator.emptyCache();
}

/** an FFN intermediate below this is not chunked by the auto rule */
const MIN_CHUNKED_BYTES = 64 * 2 ** 20;

/**
 * The DiT forward's activation bounds for a run of L tokens (a 0 in the settings = auto, resolved
 * here). With context parallelism the auto sizes follow the tokens one device holds (ceil(L / N)):
 * the rules bound a chunk's intermediates relative to the residual stream, and a device's stream is
 * its rows (so its intermediates are 1/N of one device's, as its stream is).
 */
export function ditRunOptions(plan: MemoryPlan, dims: { numHeads: number; headDim: number; ffnDim: number }, tokens: number): { cfgSequential: boolean; ffnChunkTokens: number; attnChunkTokens: number } {
  const D = dims.numHeads * dims.headDim;
  const L = Math.ceil(tokens / Math.max(1, plan.cpSize));
  // the bounds come with the CFG passes in turn (level >= 1, or infer.cfg_sequential=true); an
  // explicit chunk size applies at any level
  const bounded = plan.cfgSequential;
  // (auto chunks only where the FFN intermediate is worth bounding: below 64 MiB chunking buys
  // nothing but more dispatches)
  const ffn = plan.ffnChunkTokens || (bounded && L * dims.ffnDim * 4 > MIN_CHUNKED_BYTES ? autoFfnChunkTokens(L, D, dims.ffnDim) : 0);
  return {
    cfgSequential: plan.cfgSequential,
    ffnChunkTokens: ffn >= L ? 0 : ffn,
    attnChunkTokens: plan.attnChunkTokens || (bounded ? autoAttnChunkTokens(L) : 0),
  };
}

/**
 * Level 3's bound on a tiled decode's working set: where the default whole-frame stages would need
 * more, fewer stages run on whole frames (leanStemStages) and auto tiles may use up to the bound.
 * At 1.5 GiB the decode stays below what the denoise needs at real sizes: Wan 1.3B 480p, 81 frames
 * 1.5 GiB with 3 whole-frame stages (1.7× the default decode's flops; the default split needs
 * 4.3 GiB), 14B 720p 2.5 GiB (src/plan/ walks).
 */
export const LEVEL3_DECODE_BYTES = 1.5 * 2 ** 30;

/** How a tiled decode is split: whole-frame stages and the auto tiles' memory bound (undefined: the decoder's defaults). */
export function decodeSplitFor(plan: MemoryPlan, vae: WanVaeDecoder, H: number, W: number): { stemStages?: number; tileBytes?: number } {
  const explicit = plan.stemStages >= 0 ? plan.stemStages : undefined;
  // (context parallelism at level 2 too: the whole-frame stages run on rank 0 alone while the tiles
  // spread over the devices, so a leaner stem both bounds rank 0's decode and moves work to where it
  // is split N ways)
  if (plan.level < 3 && !(plan.cpSize > 1 && plan.level >= 2)) return { stemStages: explicit };
  // level 3: as level 1 while the default whole-frame stages fit the bound; beyond it, fewer
  // whole-frame stages and tiles up to the bound (never more memory than level 1 would use)
  const lean = leanStemStages(vae, H, W, LEVEL3_DECODE_BYTES);
  if (lean >= Math.min(STEM_STAGES, vae.numStages - 1)) return { stemStages: explicit };
  return { stemStages: explicit ?? lean, tileBytes: LEVEL3_DECODE_BYTES };
}
