// Tiled VAE decode on a larger VAE config than the tiny golden one (base_dim 24, a non-square
// 12x16 latent cut into 8-pixel tiles): equal to the untiled decode (so >= 40 dB PSNR, no seam).
import { describe, it, expect } from 'vitest';
import { getEngine, Rng } from './helpers/gpu.ts';
import { WanVaeDecoder, vaeDimsFromConfig, CausalCache, sliceFrames } from '../src/models/wan_vae/model.ts';
import { decodeTiled, planAutoTiles, planTiles, STEM_STAGES } from '../src/pipeline/tiled-vae.ts';
import { randomizeModule, WAN_VAE } from '../src/tools/random-model.ts';
import { parseVaeConfig } from '../src/io/model-folder.ts';

function psnr(a: Float32Array, b: Float32Array): number {
  let se = 0;
  for (let i = 0; i < a.length; i++) se += (a[i]! - b[i]!) ** 2;
  return se === 0 ? Infinity : 10 * Math.log10(4 / (se / a.length));
}

describe('tiled VAE decode, larger config', () => {
  it('base_dim 24, latent [16, 2, 12, 16], 8-pixel tiles with 25% overlap: PSNR >= 40 dB', { timeout: 600_000 }, async () => {
    const e = await getEngine();
    const vae = new WanVaeDecoder(vaeDimsFromConfig(parseVaeConfig({ ...WAN_VAE, base_dim: 24 })));
    randomizeModule(vae, 77, e);
    const shape: [number, number, number, number] = [16, 2, 12, 16];
    const z = new Rng(5).fillNormal(new Float32Array(shape.reduce((a, b) => a * b, 1)));
    const full = await vae.decode(e, z, shape);
    const tiled = await decodeTiled(e, vae, z, shape, { tile: 8, overlap: 0.25 });
    expect(tiled.tiles).toBe(6);
    expect(tiled.shape).toEqual(full.shape);
    const p = psnr(tiled.video, full.video);
    expect(p).toBeGreaterThanOrEqual(40);
    // the default halo covers the tiled stage's receptive field: the same numbers as the untiled decode
    let maxErr = 0;
    for (let i = 0; i < full.video.length; i++) maxErr = Math.max(maxErr, Math.abs(tiled.video[i]! - full.video[i]!));
    expect(maxErr).toBeLessThanOrEqual(1e-6);
    // and the decode is not trivial (a flat video would pass any PSNR)
    let lo = Infinity;
    let hi = -Infinity;
    for (const v of full.video) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
    expect(hi - lo).toBeGreaterThan(0.1);
    vae.disposeParams();
    console.log(`tiled vs untiled PSNR ${p.toFixed(1)} dB`);
  });

  it('working-set estimate vs the allocator; auto tiles: exact, within the stem\'s peak, least work', { timeout: 600_000 }, async () => {
    const e = await getEngine();
    const vae = new WanVaeDecoder(vaeDimsFromConfig(parseVaeConfig({ ...WAN_VAE, base_dim: 24 })));
    randomizeModule(vae, 78, e);
    const shape: [number, number, number, number] = [16, 3, 12, 16];
    const [C, F, H, W] = shape;
    const z = new Rng(6).fillNormal(new Float32Array(C * F * H * W));
    const zr = vae.denormalize(z, C);
    const chunks = WanVaeDecoder.chunks(F, 1);
    const MiB = (b: number) => (b / 2 ** 20).toFixed(2);
    // the stem on whole frames, measured per call above what was live before it
    const base = e.allocator.memoryAllocated();
    let stemPeak = 0;
    const cache = new CausalCache();
    for (const [f0, f1] of chunks) {
      e.allocator.resetPeakMemoryStats();
      const x = e.fromHost(sliceFrames(zr, C, F, H, W, f0, f1), [1, C, f1 - f0, H, W], 'f32', 'activation');
      const h = await vae.stem(x, cache, undefined, { stages: STEM_STAGES, first: f0 === 0 });
      await e.sync();
      stemPeak = Math.max(stemPeak, e.allocator.maxMemoryAllocated() - base);
      x.dispose();
      h.dispose();
    }
    cache.dispose();
    const stemEst = Math.max(...chunks.map(([f0, f1]) => vae.workingSetBytes('stem', H, W, STEM_STAGES, f1 - f0, f0 === 0)));
    // the head on a 5×7 latent region (its input made up: only the shapes matter)
    const [rh, rw] = [5, 7];
    const su = vae.stageScale(STEM_STAGES);
    const cm = 48;
    let headPeak = 0;
    const hcache = new CausalCache();
    for (const [f0] of chunks) {
      const tc = f0 === 0 ? 1 : 4;
      e.allocator.resetPeakMemoryStats();
      const x = e.fromHost(new Rng(f0).fillNormal(new Float32Array(cm * tc * rh * su * rw * su)), [1, cm, tc, rh * su, rw * su], 'f32', 'activation');
      const o = await vae.head(x, hcache, f0 === 0, undefined, STEM_STAGES);
      await e.sync();
      headPeak = Math.max(headPeak, e.allocator.maxMemoryAllocated() - base);
      x.dispose();
      o.dispose();
    }
    hcache.dispose();
    const headEst = vae.workingSetBytes('head', rh, rw, STEM_STAGES, 1, false);
    console.log(`working set, measured / estimated: stem ${MiB(stemPeak)} / ${MiB(stemEst)} MiB, head ${rh}x${rw} ${MiB(headPeak)} / ${MiB(headEst)} MiB`);
    expect(stemEst / stemPeak).toBeGreaterThan(0.9);
    expect(stemEst / stemPeak).toBeLessThan(1.1);
    expect(headEst / headPeak).toBeGreaterThan(0.9);
    expect(headEst / headPeak).toBeLessThan(1.1);
    // auto tiles: the untiled video, and no tile above the stem's working set
    const full = await vae.decode(e, z, shape);
    e.allocator.resetPeakMemoryStats();
    const tiled = await decodeTiled(e, vae, z, shape, { tile: 0, overlap: 0.25 });
    const tiledPeak = e.allocator.maxMemoryAllocated() - base;
    expect(tiled.tiles).toBeGreaterThan(1);
    let maxErr = 0;
    for (let i = 0; i < full.video.length; i++) maxErr = Math.max(maxErr, Math.abs(tiled.video[i]! - full.video[i]!));
    expect(maxErr).toBeLessThanOrEqual(1e-6);
    console.log(`auto: ${tiled.tiles} tiles, decode peak ${MiB(tiledPeak)} MiB, stem ${MiB(stemPeak)} MiB`);
    expect(tiledPeak).toBeLessThanOrEqual(stemPeak * 1.05);
    vae.disposeParams();
  });

  it('auto plan = the least work among every pair of per-axis plans whose tile fits the stem (seeded sizes)', () => {
    const vae = new WanVaeDecoder(vaeDimsFromConfig(parseVaeConfig({ ...WAN_VAE })));
    const rng = new Rng(11);
    let fitted = 0;
    for (let k = 0; k < 12; k++) {
      const H = 4 + Math.floor(rng.next() * 29);
      const W = 4 + Math.floor(rng.next() * 29);
      const F = 1 + Math.floor(rng.next() * 4);
      const opts = { stemStages: STEM_STAGES, halo: 1, overlap: 0.25, quantumX: 8, framesPerChunk: 1 };
      const auto = planAutoTiles(vae, H, W, F, opts);
      const perPx = Math.max(vae.workingSetBytes('head', 1, 1, STEM_STAGES, 1, true), F > 1 ? vae.workingSetBytes('head', 1, 1, STEM_STAGES, 1, false) : 0);
      const region = (size: number, p: { starts: number[]; lens: number[] }) => p.starts.map((a, i) => Math.min(size, a + p.lens[i]! + 1) - Math.max(0, a - 1));
      const cost = (size: number, p: { starts: number[]; lens: number[] }, q: number) => region(size, p).reduce((c, r) => c + Math.ceil(r / q) * q, 0);
      const tileBytes = perPx * Math.max(...region(H, auto.py)) * Math.max(...region(W, auto.px));
      expect(tileBytes).toBeCloseTo(auto.tileBytes, 0);
      const autoCost = cost(H, auto.py, 1) * cost(W, auto.px, 8);
      let bestFit = Infinity;
      for (let ty = Math.min(H, 4); ty <= H; ty++)
        for (let tx = Math.min(W, 4); tx <= W; tx++) {
          let py;
          let px;
          try {
            py = planTiles(H, ty, 0.25, 1, 1, 3e6);
            px = planTiles(W, tx, 0.25, 1, 8, 3e6);
          } catch {
            continue;
          }
          if (perPx * Math.max(...region(H, py)) * Math.max(...region(W, px)) <= auto.stemBytes) bestFit = Math.min(bestFit, cost(H, py, 1) * cost(W, px, 8));
        }
      if (bestFit < Infinity) {
        expect(auto.tileBytes).toBeLessThanOrEqual(auto.stemBytes);
        expect(autoCost).toBe(bestFit);
        fitted++;
      }
    }
    expect(fitted).toBeGreaterThan(6);
  });
});

