// PSNR and SSIM of videos (src/tools/video-metrics.ts): known values (identical, a constant offset,
// hand-computed small cases) and the separable SSIM against a direct per-window reference.
import { describe, expect, it } from 'vitest';
import { gaussian1d, luma, psnr, ssim, ssimImage, type VideoShape } from '../src/tools/video-metrics.ts';
import { Rng } from '../src/util/rng.ts';

const rand = (n: number, seed: number, lo = -1, hi = 1) => {
  const r = new Rng(seed);
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = lo + (hi - lo) * r.next();
  return v;
};

/** a gray video (R = G = B) whose frame t, pixel (y, x) is f(t, y, x), in [-1, 1] units */
const gray = (T: number, H: number, W: number, f: (t: number, y: number, x: number) => number) => {
  const v = new Float32Array(3 * T * H * W);
  for (let c = 0; c < 3; c++) for (let t = 0; t < T; t++) for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) v[c * T * H * W + t * H * W + y * W + x] = f(t, y, x);
  return v;
};

/** SSIM written out the long way: every 11x11 window fully inside the frame, weighted sums in the window */
function ssimReference(x: Float64Array, y: Float64Array, H: number, W: number): number {
  const w: number[][] = [];
  let tot = 0;
  for (let i = 0; i < 11; i++) {
    w.push([]);
    for (let j = 0; j < 11; j++) {
      const v = Math.exp(-((i - 5) ** 2 + (j - 5) ** 2) / (2 * 1.5 * 1.5));
      w[i]!.push(v);
      tot += v;
    }
  }
  const C1 = 0.01 ** 2;
  const C2 = 0.03 ** 2;
  let sum = 0;
  let count = 0;
  for (let y0 = 0; y0 + 11 <= H; y0++)
    for (let x0 = 0; x0 + 11 <= W; x0++) {
      let mx = 0, my = 0;
      for (let i = 0; i < 11; i++)
        for (let j = 0; j < 11; j++) {
          const k = (y0 + i) * W + x0 + j;
          mx += (w[i]![j]! / tot) * x[k]!;
          my += (w[i]![j]! / tot) * y[k]!;
        }
      let vx = 0, vy = 0, cxy = 0;
      for (let i = 0; i < 11; i++)
        for (let j = 0; j < 11; j++) {
          const k = (y0 + i) * W + x0 + j;
          const ww = w[i]![j]! / tot;
          vx += ww * (x[k]! - mx) ** 2;
          vy += ww * (y[k]! - my) ** 2;
          cxy += ww * (x[k]! - mx) * (y[k]! - my);
        }
      sum += ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2));
      count++;
    }
  return sum / count;
}

describe('video metrics', () => {
  it('identical videos: PSNR +Infinity, SSIM 1', () => {
    const shape: VideoShape = [3, 2, 16, 16];
    const v = rand(3 * 2 * 16 * 16, 1);
    expect(psnr(v, Float32Array.from(v), shape)).toBe(Infinity);
    expect(ssim(v, Float32Array.from(v), shape)).toBeCloseTo(1, 12);
  });

  it('a constant offset: PSNR 10 log10(4 / d^2); SSIM of constant frames is the luminance term', () => {
    const shape: VideoShape = [3, 3, 12, 13];
    const a = rand(3 * 3 * 12 * 13, 2, -0.8, 0.8);
    const b = a.map((x) => x + 0.1);
    // MSE = 0.01 in [-1, 1] units: 10 log10(4 / 0.01) = 26.0206 dB
    expect(psnr(b, a, shape)).toBeCloseTo(10 * Math.log10(400), 4);
    expect(psnr(b, a, shape)).toBeCloseTo(26.0206, 3);
    // constant luma 0.3 vs 0.35 ([-1, 1] values -0.4 and -0.3): no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    const x = gray(2, 11, 11, () => -0.4);
    const y = gray(2, 11, 11, () => -0.3);
    const want = (2 * 0.3 * 0.35 + 1e-4) / (0.3 ** 2 + 0.35 ** 2 + 1e-4); // 0.98824
    expect(ssim(x, y, [3, 2, 11, 11])).toBeCloseTo(want, 6);
    expect(want).toBeCloseTo(0.98824, 5);
    // an offset of a textured video: the structure terms are exactly 1, SSIM only loses the luminance term
    const s = ssim(b, a, shape);
    expect(s).toBeGreaterThan(0.9);
    expect(s).toBeLessThan(1);
  });

  it('hand-computed small cases', () => {
    // PSNR of a [3, 1, 1, 2] video against zeros: squared errors .01 .01 .04 0 .09 .01, MSE .16/6
    const a = new Float32Array([0.1, -0.1, 0.2, 0, 0.3, 0.1]);
    expect(psnr(a, new Float32Array(6), [3, 1, 1, 2])).toBeCloseTo(10 * Math.log10(4 / (0.16 / 6)), 4); // 21.7609 dB
    expect(psnr(a, new Float32Array(6), [3, 1, 1, 2])).toBeCloseTo(21.7609, 3);
    // SSIM of one 11x11 window: x constant at luma 0.5; y = 0.5 + 0.1 s, s = +1 on rows 0-4, 0 on row 5,
    // -1 on rows 6-10. By symmetry mean(y) = 0.5, var(x) = cov = 0, var(y) = 0.01 (1 - g5) where g5 is
    // the 1-D Gaussian's centre weight (row 5 holds g5 of the 2-D mass). SSIM = C2 / (var(y) + C2).
    const g5 = 1 / (1 + 2 * [1, 4, 9, 16, 25].reduce((s, d2) => s + Math.exp(-d2 / 4.5), 0));
    expect(g5).toBeCloseTo(0.266012, 5);
    expect(gaussian1d()[5]).toBeCloseTo(g5, 12);
    const want = 0.0009 / (0.01 * (1 - g5) + 0.0009); // 0.109225
    expect(want).toBeCloseTo(0.109225, 5);
    const x = gray(1, 11, 11, () => 0);
    const y = gray(1, 11, 11, (_t, r) => (r < 5 ? 0.2 : r > 5 ? -0.2 : 0));
    expect(ssim(x, y, [3, 1, 11, 11])).toBeCloseTo(want, 6);
    expect(ssim(y, x, [3, 1, 11, 11])).toBeCloseTo(want, 6); // symmetric
  });

  it('luma is BT.601 of RGB mapped to [0, 1]', () => {
    const v = new Float32Array([1, -1, 0]); // [3, 1, 1, 1]: R 1, G 0, B 0.5 in [0, 1]
    expect(luma(v, [3, 1, 1, 1], 0)[0]).toBeCloseTo(0.299 + 0.114 * 0.5, 6);
  });

  it('separable SSIM matches the per-window reference on random and related images', () => {
    for (const [H, W, seed] of [[11, 11, 3], [16, 20, 4], [23, 17, 5]] as const) {
      const x = Float64Array.from(rand(H * W, seed, 0, 1));
      const noise = rand(H * W, seed + 100, -0.1, 0.1);
      const y = x.map((v, i) => Math.min(1, Math.max(0, 0.8 * v + 0.1 + noise[i]!)));
      const r = rand(H * W, seed + 200, 0, 1);
      const z = Float64Array.from(r);
      expect(ssimImage(x, y, H, W)).toBeCloseTo(ssimReference(x, y, H, W), 10);
      expect(ssimImage(x, z, H, W)).toBeCloseTo(ssimReference(x, z, H, W), 10);
    }
    // a video's SSIM is the mean of its frames' luma SSIMs
    const shape: VideoShape = [3, 3, 14, 15];
    const a = rand(3 * 3 * 14 * 15, 9);
    const b = a.map((v, i) => Math.max(-1, Math.min(1, v + 0.3 * Math.sin(i))));
    let want = 0;
    for (let t = 0; t < 3; t++) want += ssimReference(luma(a, shape, t), luma(b, shape, t), 14, 15) / 3;
    expect(ssim(a, b, shape)).toBeCloseTo(want, 10);
  });

  it('rejects bad shapes and frames smaller than the window', () => {
    expect(() => psnr(new Float32Array(4), new Float32Array(4), [1, 1, 2, 2])).toThrow(/\[psnr\] expected a video \[3, T, H, W\]/);
    expect(() => psnr(new Float32Array(12), new Float32Array(11), [3, 1, 2, 2])).toThrow(/\[psnr\]/);
    expect(() => ssim(new Float32Array(300), new Float32Array(300), [3, 1, 10, 10])).toThrow(/at least 11x11/);
  });
});
