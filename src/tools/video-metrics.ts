// How close is one video to another? PSNR and SSIM of videos [3, T, H, W] in [-1, 1] (the
// pipeline's output layout), for comparing a cached generation with the uncached one
// (bench/cache.ts, docs/caching.md).
//
// * PSNR over the whole video (all channels, frames and pixels): 10 log10(range^2 / MSE) with
//   range 2 (the values span [-1, 1]) — the same number as PSNR on [0, 1] images with peak 1.
//   Identical videos give +Infinity.
// * SSIM (Wang, Bovik, Sheikh, Simoncelli 2004, the reference `ssim.m`): per frame, on luma
//   Y = 0.299 R + 0.587 G + 0.114 B (BT.601) mapped to [0, 1] (data range L = 1), an 11x11
//   Gaussian window with sigma 1.5 (normalized to sum 1), K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2,
//   C2 = (K2 L)^2, statistics over the windows that lie fully inside the frame ('valid', as
//   `filter2(w, img, 'valid')` in ssim.m), averaged over the windows of a frame, then over frames.
//   The local (co)variances are the Gaussian-weighted ones (E_w[xy] - E_w[x] E_w[y]), as in ssim.m.
//   The filtering is separable (rows, then columns); test/video-metrics.test.ts checks it against a
//   direct per-window loop.

export type VideoShape = readonly [number, number, number, number];

const K1 = 0.01;
const K2 = 0.03;
const WIN = 11;
const SIGMA = 1.5;

function checkPair(a: Float32Array, b: Float32Array, shape: VideoShape, what: string): void {
  const [C, T, H, W] = shape;
  if (C !== 3) throw new Error(`[${what}] expected a video [3, T, H, W], got [${shape.join(', ')}]`);
  const n = C * T * H * W;
  if (a.length !== n || b.length !== n) throw new Error(`[${what}] videos of ${a.length} and ${b.length} values do not fit the shape [${shape.join(', ')}] (${n} values)`);
}

/** mean squared error of two videos (any layout, same length) */
export function mse(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) throw new Error(`[mse] lengths differ: ${a.length} vs ${b.length}`);
  let s = 0;
  for (let i = 0; i < a.length; i++) {
    const d = a[i]! - b[i]!;
    s += d * d;
  }
  return a.length ? s / a.length : 0;
}

/** PSNR in dB of video `a` against reference `b`, both [3, T, H, W] in [-1, 1]; +Infinity when identical */
export function psnr(a: Float32Array, b: Float32Array, shape: VideoShape): number {
  checkPair(a, b, shape, 'psnr');
  const m = mse(a, b);
  return m === 0 ? Infinity : 10 * Math.log10(4 / m);
}

/** the normalized 1-D Gaussian (the 2-D window is its outer product) */
export function gaussian1d(size = WIN, sigma = SIGMA): Float64Array {
  const g = new Float64Array(size);
  const c = (size - 1) / 2;
  let s = 0;
  for (let i = 0; i < size; i++) s += g[i] = Math.exp(-((i - c) ** 2) / (2 * sigma * sigma));
  for (let i = 0; i < size; i++) g[i]! /= s;
  return g;
}

/** luma in [0, 1] of frame t of a video [3, T, H, W] in [-1, 1]: [H, W] */
export function luma(video: Float32Array, shape: VideoShape, t: number): Float64Array {
  const [, T, H, W] = shape;
  const plane = T * H * W;
  const out = new Float64Array(H * W);
  const o = t * H * W;
  for (let i = 0; i < H * W; i++) {
    const r = video[o + i]!;
    const g = video[plane + o + i]!;
    const b = video[2 * plane + o + i]!;
    out[i] = (0.299 * r + 0.587 * g + 0.114 * b + 1) / 2;
  }
  return out;
}

/** 'valid' separable filtering of img [H, W] with g ⊗ g: [H - k + 1, W - k + 1] */
function filterValid(img: Float64Array, H: number, W: number, g: Float64Array): Float64Array {
  const k = g.length;
  const Ho = H - k + 1;
  const Wo = W - k + 1;
  const rows = new Float64Array(H * Wo); // [H, Wo]: filtered along x
  for (let y = 0; y < H; y++)
    for (let x = 0; x < Wo; x++) {
      let s = 0;
      for (let j = 0; j < k; j++) s += g[j]! * img[y * W + x + j]!;
      rows[y * Wo + x] = s;
    }
  const out = new Float64Array(Ho * Wo); // [Ho, Wo]: then along y
  for (let y = 0; y < Ho; y++)
    for (let x = 0; x < Wo; x++) {
      let s = 0;
      for (let i = 0; i < k; i++) s += g[i]! * rows[(y + i) * Wo + x]!;
      out[y * Wo + x] = s;
    }
  return out;
}

/** mean SSIM of two grayscale images [H, W] with values in [0, dataRange] */
export function ssimImage(x: Float64Array, y: Float64Array, H: number, W: number, dataRange = 1): number {
  if (H < WIN || W < WIN) throw new Error(`[ssim] frames must be at least ${WIN}x${WIN} (the Gaussian window), got ${H}x${W}`);
  const g = gaussian1d();
  const C1 = (K1 * dataRange) ** 2;
  const C2 = (K2 * dataRange) ** 2;
  const n = H * W;
  const xx = new Float64Array(n);
  const yy = new Float64Array(n);
  const xy = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    xx[i] = x[i]! * x[i]!;
    yy[i] = y[i]! * y[i]!;
    xy[i] = x[i]! * y[i]!;
  }
  const mx = filterValid(x, H, W, g);
  const my = filterValid(y, H, W, g);
  const sxx = filterValid(xx, H, W, g);
  const syy = filterValid(yy, H, W, g);
  const sxy = filterValid(xy, H, W, g);
  let s = 0;
  for (let i = 0; i < mx.length; i++) {
    const a = mx[i]!;
    const b = my[i]!;
    const vx = sxx[i]! - a * a;
    const vy = syy[i]! - b * b;
    const cxy = sxy[i]! - a * b;
    s += ((2 * a * b + C1) * (2 * cxy + C2)) / ((a * a + b * b + C1) * (vx + vy + C2));
  }
  return s / mx.length;
}

/** SSIM of video `a` against `b`, both [3, T, H, W] in [-1, 1]: per frame on luma, averaged over frames */
export function ssim(a: Float32Array, b: Float32Array, shape: VideoShape): number {
  checkPair(a, b, shape, 'ssim');
  const [, T, H, W] = shape;
  let s = 0;
  for (let t = 0; t < T; t++) s += ssimImage(luma(a, shape, t), luma(b, shape, t), H, W);
  return T ? s / T : 1;
}

/** both metrics of `a` against the reference `b` */
export function videoMetrics(a: Float32Array, b: Float32Array, shape: VideoShape): { psnr: number; ssim: number; mse: number } {
  return { psnr: psnr(a, b, shape), ssim: ssim(a, b, shape), mse: mse(a, b) };
}
