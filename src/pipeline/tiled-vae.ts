// Spatially tiled VAE decode (memory level >= 1). The latent is cut into tiles with overlaps of at
// least 25 % of the tile; each tile is decoded frame by frame with its own causal cache (so GPU
// memory is bounded by the tile, not the frame), and tiles are blended with linear ramps across
// every overlap (weights sum to 1 everywhere). With the default halo (the tiled stages' receptive
// radius) every tile equals the untiled decode, so the blend mixes equal values: tiling is exact.
// Tile size 0 (the default, `infer.vae_tile_size=0`) sizes the tiles from a working-set estimate:
// the least work whose largest tile needs no more memory than the whole-frame stages (planAutoTiles).

import type { Engine, MetaSpan } from '../runtime/engine.ts';
import type { Tensor } from '../tensor/tensor.ts';
import { WanVaeDecoder, CausalCache, sliceFrames, concatTime } from '../models/wan_vae/model.ts';
import { countNonFinite } from '../ops/finite.ts';

/** Tiles along one axis: tile i covers latent pixels [starts[i], starts[i] + lens[i]). */
export interface AxisPlan {
  starts: number[];
  lens: number[];
}

/**
 * Where the tiles go along one axis, by the work they cost. Constraints: tiles of at most `tile`
 * latent pixels covering [0, size), each overlap with a neighbour >= ceil(overlapFrac × the longer
 * of the two) (and >= 1). Cost of a tile: the latent pixels it decodes, i.e. the tile plus `halo`
 * on each side that is inside the image, rounded up to `quantum` (the x axis: the 3×3 conv kernels
 * cost whole 64-column workgroups, so a 72-px-wide region costs as much as 128 px). The plan with
 * the least total cost wins, then the fewest tiles, then the fewest decoded pixels. Tiles may differ
 * in length: on a 16-px axis with tiles of 8, halo 1 and quantum 8, the tiles [0,7) [5,11) [9,16)
 * decode [0,8) [4,12) [8,16), 3 × 64 px, where three equal tiles of 7 would decode 64 + 72 + 64 px
 * (4 workgroups per row instead of 3). Exact dynamic programming over (start, length); beyond
 * ~3e7 steps (very long axes with very large tiles) it falls back to equal tiles spread evenly.
 */
export function planTiles(size: number, tile: number, overlapFrac: number, halo = 0, quantum = 1, dpLimit = 3e7): AxisPlan {
  if (!(size >= 1) || !(tile >= 1)) throw new Error(`[vae] cannot tile ${size} latent pixels with tiles of ${tile}`);
  if (size <= tile) return { starts: [0], lens: [size] };
  const key = `${size},${tile},${overlapFrac},${halo},${quantum},${dpLimit}`;
  let plan = tilePlans.get(key);
  if (!plan) {
    plan = planTilesUncached(size, tile, overlapFrac, halo, quantum, dpLimit);
    if (tilePlans.size >= 4096) tilePlans.clear();
    tilePlans.set(key, plan);
  }
  // a copy: callers own their plan
  return { starts: [...plan.starts], lens: [...plan.lens] };
}

/** planTiles' results (a pure function of its arguments; the planner asks the same ones many times) */
const tilePlans = new Map<string, AxisPlan>();

function planTilesUncached(size: number, tile: number, overlapFrac: number, halo: number, quantum: number, dpLimit: number): AxisPlan {
  const T = Math.min(tile, size);
  if (size * T * T * T > dpLimit) return evenPlan(size, T, overlapFrac);
  // state (a, len): best plan covering [0, a + len) whose last tile is [a, a + len); the region
  // (halo included), its workgroup-rounded cost and the least overlap are tabulated once
  const idx = (a: number, len: number) => a * (T + 1) + len;
  const n = size * (T + 1);
  const rawT = new Float64Array(n);
  const costT = new Float64Array(n);
  for (let a = 0; a < size; a++)
    for (let len = 1; len <= T && a + len <= size; len++) {
      const r = regionOf(size, a, len, halo);
      rawT[idx(a, len)] = r;
      costT[idx(a, len)] = Math.ceil(r / quantum) * quantum;
    }
  const ovT = new Int32Array((T + 1) * (T + 1));
  for (let l1 = 1; l1 <= T; l1++) for (let l2 = 1; l2 <= T; l2++) ovT[l1 * (T + 1) + l2] = minOverlap(overlapFrac, Math.max(l1, l2));
  const bestC = new Float64Array(n).fill(Infinity);
  const bestN = new Int32Array(n);
  const bestR = new Float64Array(n);
  const parent = new Int32Array(n).fill(-1);
  const better = (c: number, k: number, r: number, i: number) =>
    c < bestC[i]! || (c === bestC[i]! && (k < bestN[i]! || (k === bestN[i]! && r < bestR[i]!)));
  for (let len = 1; len <= T; len++) {
    const i = idx(0, len);
    bestC[i] = costT[i]!;
    bestN[i] = 1;
    bestR[i] = rawT[i]!;
  }
  let final = -1;
  for (let a = 0; a < size; a++) {
    for (let len = 1; len <= T && a + len <= size; len++) {
      const i = idx(a, len);
      if (a > 0) {
        const ci = costT[i]!;
        const ri = rawT[i]!;
        const ovRow = len * (T + 1);
        // previous tile [a2, b2) with a2 < a < b2 < a + len
        for (let o = 1; o < len; o++) {
          const b2 = a + o;
          for (let len2 = o + 1; len2 <= T; len2++) {
            const a2 = b2 - len2;
            if (a2 < 0) break;
            if (o < ovT[ovRow + len2]!) continue;
            const j = a2 * (T + 1) + len2;
            const cj = bestC[j]!;
            if (cj === Infinity) continue;
            const c = cj + ci;
            const k = bestN[j]! + 1;
            const r = bestR[j]! + ri;
            if (c < bestC[i]! || (c === bestC[i]! && (k < bestN[i]! || (k === bestN[i]! && r < bestR[i]!)))) {
              bestC[i] = c;
              bestN[i] = k;
              bestR[i] = r;
              parent[i] = j;
            }
          }
        }
      }
      if (a + len === size && bestC[i] !== Infinity && (final < 0 || better(bestC[i]!, bestN[i]!, bestR[i]!, final))) final = i;
    }
  }
  if (final < 0) return evenPlan(size, T, overlapFrac);
  const starts: number[] = [];
  const lens: number[] = [];
  for (let i = final; i >= 0; i = parent[i]!) {
    starts.unshift(Math.floor(i / (T + 1)));
    lens.unshift(i % (T + 1));
  }
  return { starts, lens };
}

/** Latent pixels a tile decodes along one axis: the tile plus the halo inside the image. */
function regionOf(size: number, start: number, len: number, halo: number): number {
  return Math.min(size, start + len + halo) - Math.max(0, start - halo);
}

/** the smallest tile auto tiling considers (latent px; the least `infer.vae_tile_size` too) */
const MIN_AUTO_TILE = 4;

export interface AutoTilePlan {
  py: AxisPlan;
  px: AxisPlan;
  /** estimated peak activation bytes of the whole-frame stages (the budget) and of the largest tile */
  stemBytes: number;
  tileBytes: number;
}

/**
 * `infer.vae_tile_size = 0` (auto): the tiles that cost the least decoded work while the largest
 * tile's estimated working set stays within the whole-frame stages' (WanVaeDecoder.workingSetBytes).
 * The whole-frame stages run anyway, so their peak is the decode's floor; tiles smaller than that buy
 * no memory and cost time (on the 1.3B VAE at 16×16 latent, 8-px tiles peak at 84 MiB under a
 * 166 MiB stem). Each axis is planned for every tile size (planTiles), the pairs are scored by their
 * work (rows × workgroup-rounded columns, halo included), ties go to fewer tiles. If no pair fits
 * (a stem too small to matter), the pair with the smallest tiles (>= 4 px) wins.
 */
export function planAutoTiles(
  vae: WanVaeDecoder,
  H: number,
  W: number,
  F: number,
  opts: { stemStages: number; halo: number; overlap: number; quantumX: number; framesPerChunk: number; tileBytes?: number },
): AutoTilePlan {
  const kinds = new Map<string, [number, boolean]>();
  for (const [f0, f1] of WanVaeDecoder.chunks(Math.max(1, F), Math.max(1, opts.framesPerChunk))) kinds.set(`${f1 - f0},${f0 === 0}`, [f1 - f0, f0 === 0]);
  let stemBytes = 0;
  let perPx = 0; // head bytes per latent px² of region (every term is proportional to the area)
  for (const [t, first] of kinds.values()) {
    stemBytes = Math.max(stemBytes, vae.workingSetBytes('stem', H, W, opts.stemStages, t, first));
    perPx = Math.max(perPx, vae.workingSetBytes('head', 1, 1, opts.stemStages, t, first));
  }
  const axis = (size: number, quantum: number) => {
    const out: Array<{ plan: AxisPlan; region: number; cost: number }> = [];
    const seen = new Set<string>();
    for (let t = size; t >= Math.min(size, MIN_AUTO_TILE); t--) {
      const plan = planTiles(size, t, opts.overlap, opts.halo, quantum, 3e6);
      const key = plan.starts.join(',') + '/' + plan.lens.join(',');
      if (seen.has(key)) continue;
      seen.add(key);
      const regions = plan.starts.map((a, i) => regionOf(size, a, plan.lens[i]!, opts.halo));
      out.push({ plan, region: Math.max(...regions), cost: regions.reduce((c, r) => c + Math.ceil(r / quantum) * quantum, 0) });
    }
    return out;
  };
  const ys = axis(H, 1);
  const xs = axis(W, opts.quantumX);
  let best: { y: (typeof ys)[0]; x: (typeof xs)[0]; bytes: number; cost: number; n: number; fits: boolean } | null = null;
  for (const y of ys)
    for (const x of xs) {
      const bytes = perPx * y.region * x.region;
      const fits = bytes <= Math.max(stemBytes, opts.tileBytes ?? 0);
      const cost = y.cost * x.cost;
      const n = y.plan.starts.length * x.plan.starts.length;
      const better = !best || (fits && !best.fits) || (fits === best.fits && (fits ? cost < best.cost || (cost === best.cost && n < best.n) : bytes < best.bytes));
      if (better) best = { y, x, bytes, cost, n, fits };
    }
  return { py: best!.y.plan, px: best!.x.plan, stemBytes, tileBytes: best!.bytes };
}

/** The least overlap (latent px) a tile of `len` needs with a neighbour: overlapFrac of it, at least 1. */
function minOverlap(overlapFrac: number, len: number): number {
  return Math.max(1, Math.ceil(overlapFrac * len - 1e-9));
}

/** Equal tiles: the fewest of at most `tile` pixels with every overlap >= ceil(overlapFrac × len), spread evenly. */
function evenPlan(size: number, tile: number, overlapFrac: number): AxisPlan {
  const ovOf = (t: number) => minOverlap(overlapFrac, t);
  for (let n = 2; n <= size; n++) {
    for (let t = Math.max(2, Math.ceil(size / n)); t <= tile; t++) {
      if (n * t - (n - 1) * ovOf(t) < size) continue;
      const starts = Array.from({ length: n }, (_, i) => Math.floor((i * (size - t)) / (n - 1)));
      return { starts, lens: starts.map(() => t) };
    }
  }
  throw new Error(`[vae] cannot tile ${size} latent pixels with tiles of ${tile} and ${overlapFrac * 100}% overlap`);
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
 * Up-block stages run on whole frames before tiling (WanVaeDecoder.runStages: stage 2i = up block i's
 * resnets, 2i + 1 its upsampler). 5 on the Wan 2.1 VAE: everything below the video's resolution runs on
 * whole frames; up block 2's upsampler (whose nearest ×2 produces the first output-resolution tensor),
 * up block 3, norm_out and conv_out run per tile. Their receptive radius is exactly 1 latent px
 * (8 convs at 8×), so the default halo of 1 makes every tile equal to the untiled decode.
 * Measured side by side on lavapipe, 2026-11-28 (random weights, 2 latent frames, tiles of 8 / 32,
 * 25 % overlap; time and peak activation bytes of the tiled decode relative to the untiled one):
 *
 * | split (whole-frame stages) | halo | 1.3B VAE, 16×16 latent: time, peak | base_dim 24, 60×104 latent: time, peak |
 * |---|---:|---|---|
 * | 4 (up blocks 0–1)            | 2 | 3.41×, 157 / 347 MiB (124.7 dB) | — |
 * | 4 (up blocks 0–1)            | 3 | —                         | 1.05×, 595 / 2114 MiB |
 * | 5 (+ up block 2's resnets)   | 1 | 1.30×, 167 / 347 MiB (exact) | 1.11×, 1016 / 2114 MiB |
 * | 6 (+ up block 2)             | 1 | 1.16–1.49×, 185 / 347 MiB (exact) | 0.81×, 1125 / 2114 MiB |
 *
 * 4 is the most frugal at large frames (it also tiles up block 2, whose whole-frame tensors are
 * a quarter of the output resolution's) and the slowest on small ones (a 3-px halo at 4× scale on
 * 8-px tiles); 5 keeps the output-resolution stages (where the memory grows with the video) tiled.
 * Pass `stemStages` to choose.
 */
export const STEM_STAGES = 5;

/**
 * The most whole-frame stages (≤ STEM_STAGES) whose working set stays within `capBytes` — the
 * low-memory choice: at 1.3B 480p the 5-stage stem alone needs 4.3 GiB (its causal caches hold two
 * 384-channel frames at a quarter of the video's resolution per conv), 3 stages 1.5 GiB for 1.7× the
 * decode's flops (planner walk, src/plan/). At least 1 (the mid block's global attention is per frame).
 */
export function leanStemStages(vae: WanVaeDecoder, H: number, W: number, capBytes: number): number {
  const top = Math.min(STEM_STAGES, vae.numStages - 1);
  for (let s = top; s > 1; s--) if (vae.workingSetBytes('stem', H, W, s, 1, false) <= capBytes) return s;
  return 1;
}

/** A device that decodes tiles: its engine and a decoder whose head weights live there. */
export interface TileDevice {
  engine: Engine;
  vae: WanVaeDecoder;
}

/**
 * Keys of the weights the tiles' decode uses (decodeTiled's head from `stemStages` on, clamped as
 * decodeTiled clamps it): up-block stage 2i = up_blocks.i.resnets, 2i + 1 = its upsampler, then
 * norm_out and conv_out. The stem's weights stay on the device that runs the stem.
 */
export function headParamKeys(vae: WanVaeDecoder, stemStages?: number): string[] {
  const from = Math.max(0, Math.min(stemStages ?? STEM_STAGES, vae.numStages - 1));
  return vae
    .namedParams()
    .map(([k]) => k)
    .filter((k) => {
      const m = /^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\./.exec(k);
      if (m) return 2 * Number(m[1]) + (m[2] === 'upsamplers' ? 1 : 0) >= from;
      return k.startsWith('decoder.norm_out.') || k.startsWith('decoder.conv_out.');
    });
}

/**
 * A decoder on `engines[i]` for each engine, holding copies of `vae`'s head weights (headParamKeys;
 * read once from wherever they are, uploaded to each): decodeTiled's `devices`. Free with disposeParams.
 */
export async function vaeHeadCopies(vae: WanVaeDecoder, engines: Engine[], stemStages?: number, owner = 'vae'): Promise<TileDevice[]> {
  const keys = new Set(headParamKeys(vae, stemStages));
  const copies = engines.map((engine) => ({ engine, vae: new WanVaeDecoder(vae.dims) }));
  const byKey = copies.map((c) => new Map(c.vae.namedParams()));
  try {
    for (const [k, p] of vae.namedParams()) {
      if (!keys.has(k)) continue;
      const host = await p.t.toCpu();
      copies.forEach((c, i) => {
        byKey[i]!.get(k)!.value = c.engine.keep(host.toGpu(c.engine, `${owner}.${k}`));
      });
    }
  } catch (err) {
    for (const c of copies) c.vae.disposeParams();
    throw err;
  }
  return copies;
}

export interface TiledDecodeOptions {
  /** the largest tile in latent pixels; 0: auto (planAutoTiles) */
  tile: number;
  /** overlap fraction of the tile (>= 0.25: linear blend across every overlap) */
  overlap: number;
  /**
   * extra latent pixels decoded around each tile and cropped away (context for the convolutions
   * at the tile border); default: the tiled stages' receptive radius rounded up
   * (WanVaeDecoder.headRadius), which makes every tile equal to the untiled decode
   */
  halo?: number;
  framesPerChunk?: number;
  /** up-block stages run on whole frames before tiling (WanVaeDecoder.runStages); default STEM_STAGES */
  stemStages?: number;
  /** auto tiles may use this many bytes even when the whole-frame stages need less (a lean stem: leanStemStages) */
  tileBytes?: number;
  onTile?: (done: number, total: number) => void;
  /**
   * further devices that decode a share of the tiles (context parallelism, rank 0 = the engine given):
   * each with a decoder holding at least the head's weights (vaeHeadCopy); the video is the same
   */
  devices?: TileDevice[];
  /**
   * count NaN/±Inf in every tile's decoder output on the GPU, before its readback (one dispatch per
   * tile and chunk, the counts chained on the GPU and read once at the end): `nonFinite` in the result
   */
  checkFinite?: boolean;
}

/**
 * Tiled decode. The latent-resolution stem of the decoder (post_quant_conv, conv_in, mid block with
 * its per-frame *global* attention) runs on the whole latent frame by frame: it is small (C×H×W at
 * latent resolution) and a global attention cannot be tiled without changing it; so do the next
 * up-block stages (STEM_STAGES). The output-resolution part, where the memory goes (channels ×
 * 64·H·W per frame), runs tile by tile with a halo of context and its own causal cache, and the
 * tiles are blended linearly across their overlaps.
 */
export async function decodeTiled(
  e: Engine,
  vae: WanVaeDecoder,
  z: Float32Array,
  shape: [number, number, number, number],
  opts: TiledDecodeOptions,
): Promise<{ video: Float32Array; shape: [number, number, number, number]; tiles: number; hostBytes: number; stemBytes: number[]; nonFinite: number; checked: number }> {
  const [C, F, H, W] = shape;
  // 1. stem on whole frames, kept in host memory: [Cm, Tc, H·su, W·su] per chunk. The stem includes the
  // up-block stages below the output resolution (STEM_STAGES): tiling them would recompute a wide halo
  // at a low resolution, where narrow tiles also leave the conv kernels' 64-column workgroups half empty.
  const stemStages = Math.max(0, Math.min(opts.stemStages ?? STEM_STAGES, vae.numStages - 1));
  const halo = Math.max(0, opts.halo ?? Math.ceil(vae.headRadius(stemStages) - 1e-9));
  // rows cost what they hold; columns cost whole workgroups of the output-resolution convs
  const quantumX = vae.columnQuantum;
  const auto = opts.tile > 0 ? null : planAutoTiles(vae, H, W, F, { stemStages, halo, overlap: opts.overlap, quantumX, framesPerChunk: opts.framesPerChunk ?? 1, tileBytes: opts.tileBytes });
  const py = auto ? auto.py : planTiles(H, opts.tile, opts.overlap, halo, 1);
  const px = auto ? auto.px : planTiles(W, opts.tile, opts.overlap, halo, quantumX);
  const ys = py.starts;
  const xs = px.starts;
  const chunks = WanVaeDecoder.chunks(F, Math.max(1, opts.framesPerChunk ?? 1));
  const su = vae.stageScale(stemStages);
  const Hs = H * su;
  const Ws = W * su;
  const zr = vae.denormalize(z, C);
  const stemCache = new CausalCache();
  const stems: Array<{ data: Float32Array; Cm: number; Tc: number }> = [];
  // the memory planner's meta engine (src/plan/) moves no data: the host-side crops, reads and
  // blending are skipped there and their host bytes counted from the shapes
  const meta = e.isMeta;
  const stemBytes: number[] = [];
  try {
    for (const [f0, f1] of chunks) {
      const x = e.fromHost(sliceFrames(zr, C, F, H, W, f0, f1), [1, C, f1 - f0, H, W], 'f32', 'activation');
      const h = await vae.stem(x, stemCache, undefined, { stages: stemStages, first: f0 === 0 });
      x.dispose();
      stems.push({ data: meta ? new Float32Array(0) : ((await h.toArray()) as Float32Array), Cm: h.size(1), Tc: h.size(2) });
      stemBytes.push(h.nbytes);
      h.dispose();
    }
  } finally {
    stemCache.dispose();
  }
  // Cached buffers of one shape serve no other: the tiles' regions differ in size (edge tiles, the
  // planner's uneven lengths), so without this each new region size would add its whole working
  // set to `reserved` (1.3B 480p, auto tiles: 17 GiB reserved for a 4.3 GiB peak). The cache is given
  // back after the stem and whenever the next region's size differs from the last one's.
  e.allocator.emptyCache();
  // 2. head per tile (with halo), blended in tile order. With `devices` (context parallelism) the
  // tiles are dealt round-robin over the devices (rank 0 = e included); each tile's decode is the same
  // work on any device, and the blend takes them in the one-device order, so the video is the same.
  // (assigned by blendTile, in the workers below: declared so that no narrowing to null sticks)
  let out = null as Float64Array | null;
  let wsum = null as Float64Array | null;
  let T = 0;
  let sf = 8;
  let Ho = 0;
  let Wo = 0;
  const order: Array<[number, number]> = [];
  for (let yi = 0; yi < ys.length; yi++) for (let xi = 0; xi < xs.length; xi++) order.push([yi, xi]);
  const total = order.length;
  let done = 0;
  // the running non-finite count (u32 [1] on each device's GPU) and the elements it covers
  const bad = new Map<Engine, Tensor>();
  let checked = 0;
  const lastRegion = new Map<Engine, string>();
  const tileSpans = new Map<Engine, Map<string, Array<{ span: MetaSpan; out: { outC: number; hh: number; ww: number; tileT: number } }>>>();
  type TileOut = { parts: Float32Array[]; outC: number; hh: number; ww: number; tileT: number; ry0: number; rx0: number; rh: number };
  const runTile = async (dev: TileDevice, k: number): Promise<TileOut> => {
    const de = dev.engine;
    const [yi, xi] = order[k]!;
    const y0 = ys[yi]!;
    const x0 = xs[xi]!;
    const th = py.lens[yi]!;
    const tw = px.lens[xi]!;
    const ry0 = Math.max(0, y0 - halo);
    const ry1 = Math.min(H, y0 + th + halo);
    const rx0 = Math.max(0, x0 - halo);
    const rx1 = Math.min(W, x0 + tw + halo);
    const rh = ry1 - ry0;
    const rw = rx1 - rx0;
    if (`${rh}x${rw}` !== lastRegion.get(de)) de.allocator.emptyCache();
    lastRegion.set(de, `${rh}x${rw}`);
    // the planner's meta walk: a tile of a region size already walked from this allocator state is
    // accounted, not walked (Engine.metaRepeat; its allocations would repeat exactly)
    const spanKey = `${rh}x${rw}`;
    // (a region size has a span from the emptied cache and one from its own warm cache: both kept)
    for (const known of meta ? (tileSpans.get(de)?.get(spanKey) ?? []) : []) if (de.metaRepeat(known.span)) return { parts: [], ...known.out, ry0, rx0, rh };
    const mark = meta ? de.metaSpanStart() : null;
    const cache = new CausalCache();
    const parts: Float32Array[] = [];
    let tileT = 0;
    let outC = 3;
    let hh = 0;
    let ww = 0;
    try {
      for (let c = 0; c < chunks.length; c++) {
        const { data, Cm, Tc } = stems[c]!;
        const ch = rh * su;
        const cw = rw * su;
        let hc: Tensor;
        if (meta) hc = de.empty([1, Cm, Tc, ch, cw], 'f32', 'activation');
        else {
          const crop = new Float32Array(Cm * Tc * ch * cw);
          for (let q = 0; q < Cm * Tc; q++)
            for (let y = 0; y < ch; y++) {
              const src = (q * Hs + ry0 * su + y) * Ws + rx0 * su;
              crop.set(data.subarray(src, src + cw), (q * ch + y) * cw);
            }
          hc = de.fromHost(crop, [1, Cm, Tc, ch, cw], 'f32', 'activation');
        }
        const o = await dev.vae.head(hc, cache, c === 0, undefined, stemStages);
        hc.dispose();
        outC = o.size(1);
        hh = o.size(3);
        ww = o.size(4);
        if (opts.checkFinite && !meta) {
          const prev = bad.get(de);
          const next = countNonFinite(o, prev);
          prev?.dispose();
          bad.set(de, next);
          checked += o.numel;
        }
        if (meta) tileT += o.size(2);
        else parts.push((await o.toArray()) as Float32Array);
        o.dispose();
      }
    } finally {
      cache.dispose();
    }
    const span = mark ? de.metaSpanEnd(mark) : null;
    if (span) {
      if (!tileSpans.has(de)) tileSpans.set(de, new Map());
      const list = tileSpans.get(de)!.get(spanKey) ?? [];
      if (list.length >= 4) list.shift();
      list.push({ span, out: { outC, hh, ww, tileT } });
      tileSpans.get(de)!.set(spanKey, list);
    }
    return { parts, outC, hh, ww, tileT, ry0, rx0, rh };
  };
  const blendTile = (k: number, r: TileOut) => {
    const [yi, xi] = order[k]!;
    const y0 = ys[yi]!;
    const x0 = xs[xi]!;
    const th = py.lens[yi]!;
    const tw = px.lens[xi]!;
    const { parts, outC, hh, ww, ry0, rx0, rh } = r;
    if (meta) {
      T = r.tileT;
      sf = hh / rh;
      Ho = H * sf;
      Wo = W * sf;
      done++;
      return;
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
    const wy = axisWeights(y0 * sf, (y0 + th) * sf, yi > 0 ? (ys[yi - 1]! + py.lens[yi - 1]!) * sf : null, yi + 1 < ys.length ? ys[yi + 1]! * sf : null);
    const wx = axisWeights(x0 * sf, (x0 + tw) * sf, xi > 0 ? (xs[xi - 1]! + px.lens[xi - 1]!) * sf : null, xi + 1 < xs.length ? xs[xi + 1]! * sf : null);
    const oy0 = (y0 - ry0) * sf;
    const ox0 = (x0 - rx0) * sf;
    for (let y = 0; y < th * sf; y++) {
      const oy = y0 * sf + y;
      for (let x = 0; x < tw * sf; x++) {
        const w = wy[y]! * wx[x]!;
        const ox = x0 * sf + x;
        wsum![oy * Wo + ox]! += w;
        for (let c = 0; c < 3; c++)
          for (let t = 0; t < T; t++) out![((c * T + t) * Ho + oy) * Wo + ox]! += w * raw[((c * T + t) * hh + oy0 + y) * ww + ox0 + x]!;
      }
    }
    done++;
    opts.onTile?.(done, total);
  };
  // one worker per device; device w decodes tiles w, w + W, w + 2W, ... (a fixed share, not the next
  // free tile: which tiles a device decodes, and so its memory peak, must not depend on timing, so
  // the planner's meta walk, src/plan/plan.ts, gives every device the same tiles as the run);
  // finished tiles wait until their turn in the blend
  const workers: TileDevice[] = [{ engine: e, vae }, ...(opts.devices ?? [])];
  let nextBlend = 0;
  const ready = new Map<number, TileOut>();
  let failed = false;
  const settled = await Promise.allSettled(
    workers.map(async (dev, w) => {
      for (let k = w; !failed && k < total; k += workers.length) {
        try {
          ready.set(k, await runTile(dev, k));
          while (!failed && ready.has(nextBlend)) {
            const r = ready.get(nextBlend)!;
            ready.delete(nextBlend);
            blendTile(nextBlend++, r);
          }
        } catch (err) {
          failed = true;
          throw err;
        }
      }
    }),
  );
  const err = settled.find((x): x is PromiseRejectedResult => x.status === 'rejected');
  if (err) {
    for (const b of bad.values()) b.dispose();
    throw err.reason;
  }
  // host memory at the blend's end: the stems, the f64 accumulators and the video (the planner's count)
  const hostBytes = tiledDecodeHostBytes(stemBytes, T, Ho, Wo);
  if (meta) return { video: new Float32Array(0), shape: [3, T, Ho, Wo], tiles: total, hostBytes, stemBytes, nonFinite: 0, checked: 0 };
  let nonFinite = 0;
  for (const b of bad.values()) {
    nonFinite += (await b.toArray())[0]!;
    b.dispose();
  }
  const video = new Float32Array(out!.length);
  const hw = Ho * Wo;
  for (let i = 0; i < video.length; i++) video[i] = Math.min(1, Math.max(-1, out![i]! / wsum![i % hw]!));
  return { video, shape: [3, T, Ho, Wo], tiles: total, hostBytes, stemBytes, nonFinite, checked };
}

/** Host bytes at the end of a tiled decode: the stems kept per chunk, the f64 accumulators and the f32 video. */
export function tiledDecodeHostBytes(stemBytes: readonly number[], T: number, Ho: number, Wo: number): number {
  return stemBytes.reduce((a, b) => a + b, 0) + 3 * T * Ho * Wo * (8 + 4) + Ho * Wo * 8;
}
