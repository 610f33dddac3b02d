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

import type { FlatConfig } from '../config/config.ts';
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
}

function flag(v: unknown, auto: boolean): boolean {
  return v === 'auto' || v === undefined || v === null ? auto : Boolean(v);
}

export function memoryPlan(cfg: FlatConfig): MemoryPlan {
  const level = Number(cfg['infer.diffusion.low_mem_level'] ?? 0) as 0 | 1 | 2 | 3;
  const offTe = flag(cfg['infer.offload_text_encoder'], level >= 2);
  const offDit = flag(cfg['infer.offload_dit'], level >= 3);
  const offVae = flag(cfg['infer.offload_vae'], level >= 3);
  const tiling = flag(cfg['infer.vae_tiling'], level >= 1);
  const teDev = String(cfg['infer.text_encoder_device'] ?? 'cpu') as 'cpu' | 'gpu-stream';
  const tileSize = Number(cfg['infer.vae_tile_size'] ?? 0);
  if (tileSize > 0 && tileSize < 4) throw new ConfigError(`infer.vae_tile_size=${tileSize}: tiles need at least 4 latent pixels (or 0 for auto)`);
  return {
    level,
    textEncoder: offTe ? teDev : 'gpu',
    dit: offDit ? 'stream' : 'resident',
    vae: offVae ? 'on-demand' : 'resident',
    vaeTiling: tiling,
    tileSize,
    tileOverlap: Number(cfg['infer.vae_tile_overlap'] ?? 0.25),
    activationOffload: Boolean(cfg['infer.activation_offload'] ?? false),
  };
}
