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

import type { LoadSettings } from '../config/schema.ts';
import { ConfigError } from '../util/errors.ts';

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
  activationOffload: boolean;
  /** with dit 'stream': blocks 0..residentBlocks-1 stay on the GPU, the rest go through the ring */
  residentBlocks: number;
  /** cond and uncond one after the other inside each DiT block (one upload per block, half the activations) */
  cfgSequential: boolean;
  /** tokens per DiT FFN chunk; 0 = auto (ffnChunkFor) */
  ffnChunkTokens: number;
  /** query tokens per self-attention chunk; 0 = auto (attnChunkFor) */
  attnChunkTokens: number;
}

const flag = (v: boolean | 'auto', auto: boolean): boolean => (v === 'auto' ? auto : v);

const LEVELS = [0, 1, 2, 3] as const;

export function memoryPlan(s: LoadSettings): MemoryPlan {
  // the schema bounds the level to 0..3; this narrows the number to the plan's literal type
  const level = LEVELS[s.lowMemLevel]!;
  if (s.vaeTileSize > 0 && s.vaeTileSize < 4) throw new ConfigError(`infer.vae_tile_size=${s.vaeTileSize}: tiles need at least 4 latent pixels (or 0 for auto)`);
  return {
    level,
    textEncoder: flag(s.offloadTextEncoder, level >= 2) ? s.textEncoderDevice : 'gpu',
    dit: flag(s.offloadDit, level >= 3) ? 'stream' : 'resident',
    vae: flag(s.offloadVae, level >= 3) ? 'on-demand' : 'resident',
    vaeTiling: flag(s.vaeTiling, level >= 1),
    tileSize: s.vaeTileSize,
    tileOverlap: s.vaeTileOverlap,
    activationOffload: s.activationOffload,
    residentBlocks: s.residentBlocks,
    cfgSequential: flag(s.cfgSequential, level >= 1),
    ffnChunkTokens: s.ffnChunkTokens,
    attnChunkTokens: s.attnChunkTokens,
  };
}
