// Spatially tiled VAE decode (memory level >= 1). The latent is cut into tiles with overlaps of at
// least 25 % of the tile; each tile is decoded frame by frame with its own causal cache (so GPU
// memory is bounded by the tile, not the frame), and tiles are blended with linear ramps across
// every overlap (weights sum to 1 everywhere: no seams; docs/memory-levels.md has the PSNR).

import type { Engine } from '../runtime/engine.ts';
import { WanVaeDecoder, CausalCache, sliceFrames, concatTime } from '../models/wan_vae/model.ts';

/**
 * Where the tiles go along one axis: the fewest tiles of at most `tile` latent pixels that cover
 * [0, size) with every overlap >= ceil(overlapFrac * len), then the shortest tile length that still
 * does (less recomputed work), spread evenly. E.g. size 16, tile 8, 25 %: three 7-pixel tiles at
 * 0, 4, 9 (overlaps 3 and 2) instead of 8-pixel tiles at 0, 6, 8.
 */
export function tilePlan(size: number, tile: number, overlapFrac: number): { starts: number[]; len: number } {
  if (size <= tile) return { starts: [0], len: size };
  const ovOf = (t: number) => Math.max(1, Math.ceil(overlapFrac * t));
  for (let n = 2; ; n++) {
    for (let t = Math.max(2, Math.ceil(size / n)); t <= tile; t++) {
      if (n * t - (n - 1) * ovOf(t) < size) continue;
      const starts = Array.from({ length: n }, (_, i) => Math.floor((i * (size - t)) / (n - 1)));
      return { starts, len: t };
    }
    if (n > size) throw new Error(`[vae] cannot tile ${size} latent pixels with tiles of ${tile} and ${overlapFrac * 100}% overlap`);
  }
}

/** Linear blend weights of one tile along one axis (video pixels). */
function axisWeights(start: number, end: number, prevEnd: number | null, nextStart: number | null): Float32Array {
  const n = end - start;
  const w = new Float32Array(n).fill(1);
  if (prevEnd !== null && prevEnd > start) {
    const ov = prevEnd - start;
    for (let i = 0; i < ov; i++) w[i]! *= (i + 0.5) / ov;
  }
  if (nextStart !== null && nextStart < end) {
    const ov = end - nextStart;
    for (let i = 0; i < ov; i++) w[n - ov + i]! *= 1 - (i + 0.5) / ov;
  }
  return w;
}

/**
 * Latent pixels of context decoded around each tile and cropped away (TiledDecodeOptions.halo).
 * Measured (tile 8, 25 % overlap, PSNR vs untiled): random base_dim-24 VAE 26.8 / 34.0 / 42.6 dB at
 * halo 0 / 1 / 2; the trained demo VAE at 128 px 44.9 / 61.8 / 74.2 dB. 2 keeps the random (worst)
 * case above 40 dB.
 */
export const DEFAULT_HALO = 2;

/**
 * Up blocks run on whole frames before tiling (see decodeTiled). Measured side by side (random VAE,
 * latent [16, 2, 16, 16], tiles of 8, lavapipe): tiled / whole-frame decode time 4.28 -> 3.40
 * (base_dim 24) and 4.99 -> 3.24 (base_dim 48) going from 0 to 2; PSNR vs untiled 42.6 -> 120 dB and
 * 44.6 -> 124 dB (the 2-px halo now covers the tiled stages' receptive field almost exactly).
 */
export const STEM_UP_BLOCKS = 2;

export interface TiledDecodeOptions {
  /** tile size in latent pixels */
  tile: number;
  /** overlap fraction of the tile (>= 0.25: linear blend across every overlap) */
  overlap: number;
  /**
   * extra latent pixels decoded around each tile and cropped away (context for the convolutions
   * at the tile border); default DEFAULT_HALO
   */
  halo?: number;
  framesPerChunk?: number;
  onTile?: (done: number, total: number) => void;
}

/**
 * Tiled decode. The latent-resolution stem of the decoder (post_quant_conv, conv_in, mid block with
 * its per-frame *global* attention) runs on the whole latent frame by frame: it is small (C×H×W at
 * latent resolution) and a global attention cannot be tiled without changing it. The upsampling
 * part, where the memory goes (channels × 64·H·W per frame), runs tile by tile with a halo of
 * context and its own causal cache, and the tiles are blended linearly across their overlaps.
 */
export async function decodeTiled(
  e: Engine,
  vae: WanVaeDecoder,
  z: Float32Array,
  shape: [number, number, number, number],
  opts: TiledDecodeOptions,
): Promise<{ video: Float32Array; shape: [number, number, number, number]; tiles: number }> {
  const [C, F, H, W] = shape;
  const py = tilePlan(H, opts.tile, opts.overlap);
  const px = tilePlan(W, opts.tile, opts.overlap);
  const halo = Math.max(0, opts.halo ?? DEFAULT_HALO);
  const ys = py.starts;
  const xs = px.starts;
  const th = py.len;
  const tw = px.len;
  const chunks = WanVaeDecoder.chunks(F, Math.max(1, opts.framesPerChunk ?? 1));
  // 1. stem on whole frames, kept in host memory: [Cm, Tc, H·su, W·su] per chunk. The stem includes the
  // first up blocks (STEM_UP_BLOCKS): they run at low resolution, where a narrow tile would leave the
  // conv kernels' 64-column tiles mostly empty and their memory is small; only the high-resolution
  // stages, where the memory goes, are tiled.
  const stemUp = Math.max(0, Math.min(STEM_UP_BLOCKS, vae.up_blocks.length - 1));
  const su = vae.upScale(stemUp);
  const Hs = H * su;
  const Ws = W * su;
  const zr = vae.denormalize(z, C);
  const stemCache = new CausalCache();
  const stems: Array<{ data: Float32Array; Cm: number; Tc: number }> = [];
  try {
    for (const [f0, f1] of chunks) {
      const x = e.fromHost(sliceFrames(zr, C, F, H, W, f0, f1), [1, C, f1 - f0, H, W], 'f32', 'activation');
      const h = await vae.stem(x, stemCache, undefined, { upBlocks: stemUp, first: f0 === 0 });
      x.dispose();
      stems.push({ data: (await h.toArray()) as Float32Array, Cm: h.size(1), Tc: h.size(2) });
      h.dispose();
    }
  } finally {
    stemCache.dispose();
  }
  // 2. head per tile (with halo), blended
  let out: Float64Array | null = null;
  let wsum: Float64Array | null = null;
  let T = 0;
  let sf = 8;
  let Ho = 0;
  let Wo = 0;
  const total = ys.length * xs.length;
  let done = 0;
  for (let yi = 0; yi < ys.length; yi++) {
    for (let xi = 0; xi < xs.length; xi++) {
      const y0 = ys[yi]!;
      const x0 = xs[xi]!;
      const ry0 = Math.max(0, y0 - halo);
      const ry1 = Math.min(H, y0 + th + halo);
      const rx0 = Math.max(0, x0 - halo);
      const rx1 = Math.min(W, x0 + tw + halo);
      const rh = ry1 - ry0;
      const rw = rx1 - rx0;
      const cache = new CausalCache();
      const parts: Float32Array[] = [];
      let outC = 3;
      let hh = 0;
      let ww = 0;
      try {
        for (let k = 0; k < chunks.length; k++) {
          const { data, Cm, Tc } = stems[k]!;
          const ch = rh * su;
          const cw = rw * su;
          const crop = new Float32Array(Cm * Tc * ch * cw);
          for (let c = 0; c < Cm * Tc; c++)
            for (let y = 0; y < ch; y++) {
              const src = (c * Hs + ry0 * su + y) * Ws + rx0 * su;
              crop.set(data.subarray(src, src + cw), (c * ch + y) * cw);
            }
          const hc = e.fromHost(crop, [1, Cm, Tc, ch, cw], 'f32', 'activation');
          const o = await vae.head(hc, cache, k === 0, undefined, stemUp);
          hc.dispose();
          outC = o.size(1);
          hh = o.size(3);
          ww = o.size(4);
          parts.push((await o.toArray()) as Float32Array);
          o.dispose();
        }
      } finally {
        cache.dispose();
      }
      const Tt = parts.reduce((a, p) => a + p.length / (outC * hh * ww), 0);
      const raw = concatTime(parts, outC, Tt, hh * ww);
      if (!out) {
        T = Tt;
        sf = hh / rh;
        Ho = H * sf;
        Wo = W * sf;
        out = new Float64Array(3 * T * Ho * Wo);
        wsum = new Float64Array(Ho * Wo);
      }
      const wy = axisWeights(y0 * sf, (y0 + th) * sf, yi > 0 ? (ys[yi - 1]! + th) * sf : null, yi + 1 < ys.length ? ys[yi + 1]! * sf : null);
      const wx = axisWeights(x0 * sf, (x0 + tw) * sf, xi > 0 ? (xs[xi - 1]! + tw) * sf : null, xi + 1 < xs.length ? xs[xi + 1]! * sf : null);
      const oy0 = (y0 - ry0) * sf;
      const ox0 = (x0 - rx0) * sf;
      for (let y = 0; y < th * sf; y++) {
        const oy = y0 * sf + y;
        for (let x = 0; x < tw * sf; x++) {
          const w = wy[y]! * wx[x]!;
          const ox = x0 * sf + x;
          wsum![oy * Wo + ox]! += w;
          for (let c = 0; c < 3; c++)
            for (let t = 0; t < T; t++) out[((c * T + t) * Ho + oy) * Wo + ox]! += w * raw[((c * T + t) * hh + oy0 + y) * ww + ox0 + x]!;
        }
      }
      done++;
      opts.onTile?.(done, total);
    }
  }
  const video = new Float32Array(out!.length);
  const hw = Ho * Wo;
  for (let i = 0; i < video.length; i++) video[i] = Math.min(1, Math.max(-1, out![i]! / wsum![i % hw]!));
  return { video, shape: [3, T, Ho, Wo], tiles: total };
}
