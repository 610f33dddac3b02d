// Tiled VAE decode on a larger VAE config than the tiny golden one (base_dim 24, a non-square
// 12x16 latent cut into 8-pixel tiles): equal to the untiled decode (so >= 40 dB PSNR, no seam).
import { describe, it, expect } from 'vitest';
import { getEngine, Rng } from './helpers/gpu.ts';
import { WanVaeDecoder, vaeDimsFromConfig } from '../src/models/wan_vae/model.ts';
import { decodeTiled } from '../src/pipeline/tiled-vae.ts';
import { randomizeModule, WAN_VAE } from '../src/tools/random-model.ts';

function psnr(a: Float32Array, b: Float32Array): number {
  let se = 0;
  for (let i = 0; i < a.length; i++) se += (a[i]! - b[i]!) ** 2;
  return se === 0 ? Infinity : 10 * Math.log10(4 / (se / a.length));
}

describe('tiled VAE decode, larger config', () => {
  it('base_dim 24, latent [16, 2, 12, 16], 8-pixel tiles with 25% overlap: PSNR >= 40 dB', { timeout: 600_000 }, async () => {
    const e = await getEngine();
    const vae = new WanVaeDecoder(vaeDimsFromConfig({ ...WAN_VAE, base_dim: 24 }));
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
});
