// Context parallelism composed with step caching and with the tiled VAE decode (src/parallel/
// cp-cache.ts, HiddenStepCache.cpHooks, tiled-vae.ts `devices`): on the tiny model (2 heads, so
// cp_size=3 leaves a device without heads), with cp_size = 2 and 3 the same steps are computed,
// skipped and split as with cp_size = 1 and the same settings, and the latents and the video match
// to <= 1e-5; the tiled decode spread over the devices gives the one-device video and reports one
// peak per device.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { Engine } from '../src/runtime/engine.ts';
import { maxAbsDiff } from './helpers/cp.ts';
import { tinyModelWithTokenizer } from './helpers/models.ts';
import { WanPipeline, type GenerateRequest, type GenerateResult, type WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { decodeTiled, headParamKeys, vaeHeadCopies } from '../src/pipeline/tiled-vae.ts';
import { WanVaeDecoder } from '../src/models/wan_vae/model.ts';
import { vaeDimsFromConfig } from '../src/models/wan_vae/model.ts';
import { openModelFolder } from '../src/io/model-folder.ts';
import { loadModule } from '../src/nn/load.ts';
import { TINY } from './helpers/golden.ts';
import { Rng } from '../src/util/rng.ts';

let engine: Engine;
beforeAll(async () => {
  engine = await Engine.create();
});
afterAll(() => engine.destroy());

// the tiny model has no calibration: any polynomial / ratios serve (as test/step-cache.test.ts); the
// MagCache ratios differ between cond (0.995) and uncond (0.93), so the rows decide apart at some steps
const MODEL = tinyModelWithTokenizer({
  num_inference_steps: 8,
  cache: { teacache: { coefficients: [0, 0, 0, 0.1, 0] }, magcache: { mag_ratios: Array.from({ length: 16 }, (_, i) => (i % 2 ? 0.93 : 0.995)) } },
});

async function gen(opts: WanPipelineOptions, req: Partial<GenerateRequest> = {}): Promise<GenerateResult> {
  const pipe = await WanPipeline.fromPretrained(MODEL, { engine, promptCache: false, ...opts });
  try {
    return await pipe.generate({ prompt: 'a red circle moving right', negativePrompt: 'blurry', seed: 7, ...req });
  } finally {
    pipe.dispose();
  }
}

describe('step caching with infer.diffusion.cp_size > 1', () => {
  const modes: Array<[string, Partial<GenerateRequest>, number[]]> = [
    ['teacache', { mode: 'teacache', threshold: 0.3 }, [2, 3]],
    ['magcache (cond and uncond decide apart)', { mode: 'magcache' }, [2, 3]],
    ['flex', { mode: 'flex', threshold: 0.5 }, [2]],
    ['easycache', { mode: 'easycache', warmupSteps: 2, threshold: 3 }, [2]],
  ];
  for (const [name, req, sizes] of modes) {
    it(`${name}: cp_size ${sizes.join(', ')} compute, skip and split the steps of cp_size = 1; latents and video <= 1e-5`, async () => {
      const base = await gen({}, req);
      const c0 = base.cache!;
      expect(c0.skippedSteps.length + c0.splitSteps.length, 'the settings make the cache act').toBeGreaterThan(0);
      if (req.mode === 'magcache') expect(c0.splitSteps.length, 'MagCache splits some steps').toBeGreaterThan(0);
      for (const cpSize of sizes) {
        const r = await gen({ cpSize }, req);
        const c = r.cache!;
        expect(c.computedSteps, `cp_size=${cpSize}`).toEqual(c0.computedSteps);
        expect(c.skippedSteps).toEqual(c0.skippedSteps);
        expect(c.splitSteps).toEqual(c0.splitSteps);
        expect(maxAbsDiff(r.latents.data, base.latents.data), `cp_size=${cpSize} latents`).toBeLessThanOrEqual(1e-5);
        expect(maxAbsDiff(r.video, base.video), `cp_size=${cpSize} video`).toBeLessThanOrEqual(1e-5);
        expect(r.memory.devices!.length).toBe(cpSize);
      }
    });
  }

  it('level 3 (each device streams its blocks): TeaCache with cp_size 2 skips the steps of cp_size 1 at level 3; latents and video <= 1e-5', async () => {
    const req: Partial<GenerateRequest> = { mode: 'teacache', threshold: 0.3, numInferenceSteps: 6 };
    const base = await gen({ lowMemLevel: 3 }, req);
    expect(base.cache!.skippedSteps.length).toBeGreaterThan(0);
    const r = await gen({ lowMemLevel: 3, cpSize: 2 }, req);
    expect(r.cache!.computedSteps).toEqual(base.cache!.computedSteps);
    expect(maxAbsDiff(r.latents.data, base.latents.data)).toBeLessThanOrEqual(1e-5);
    expect(maxAbsDiff(r.video, base.video)).toBeLessThanOrEqual(1e-5);
  });

  it('recording cache signals (calibration) is refused with cp_size > 1 in one line', async () => {
    await expect(gen({ cpSize: 2 }, { recordCacheSignals: true })).rejects.toThrow(/^recording cache signals \(calibration\) needs the whole residual stream on one device/);
  });
});

describe('tiled VAE decode spread over the devices', () => {
  it('decodeTiled with 1 and 2 further devices: the video of one device, bit for bit; only the head weights are copied', async () => {
    const f = await openModelFolder(TINY);
    const vae = new WanVaeDecoder(vaeDimsFromConfig(f.vae.config));
    const ck = await f.vae.open();
    try {
      await loadModule(vae, ck, { engine, owner: 'vae' });
    } finally {
      await ck.close();
    }
    const others = [await Engine.create(), await Engine.create()];
    try {
      const shape: [number, number, number, number] = [vae.dims.zDim, 2, 9, 11]; // odd latent sizes
      const z = new Rng(3).fillNormal(new Float32Array(shape.reduce((a, b) => a * b, 1)));
      const one = await decodeTiled(engine, vae, z, shape, { tile: 4, overlap: 0.25 });
      expect(one.tiles).toBeGreaterThan(3);
      const keys = headParamKeys(vae);
      expect(keys.length).toBeGreaterThan(0);
      expect(keys.length).toBeLessThan(vae.namedParams().length);
      expect(keys.some((k) => k.startsWith('decoder.mid_block'))).toBe(false);
      for (const n of [1, 2]) {
        const devs = await vaeHeadCopies(vae, others.slice(0, n));
        try {
          const tilesOn: number[] = [];
          const got = await decodeTiled(engine, vae, z, shape, { tile: 4, overlap: 0.25, devices: devs, checkFinite: true, onTile: (d) => tilesOn.push(d) });
          expect(tilesOn).toEqual(Array.from({ length: one.tiles }, (_, i) => i + 1));
          expect(got.shape).toEqual(one.shape);
          expect(got.nonFinite).toBe(0);
          expect(maxAbsDiff(got.video, one.video), `${n} further device(s)`).toBe(0);
          for (const d of devs) expect(d.engine.allocator.maxMemoryAllocated()).toBeGreaterThan(d.vae.paramBytes());
        } finally {
          for (const d of devs) d.vae.disposeParams();
        }
      }
    } finally {
      vae.disposeParams();
      for (const e of others) e.destroy();
    }
  });

  it('the pipeline at level 1 with 4-px tiles: cp_size 2 and 3 give the video of cp_size 1; memory.devices has each device\'s peak, decode included', async () => {
    const opts: WanPipelineOptions = { lowMemLevel: 1, vaeTileSize: 4 };
    const base = await gen(opts, { numInferenceSteps: 2 });
    for (const cpSize of [2, 3]) {
      const r = await gen({ ...opts, cpSize }, { numInferenceSteps: 2 });
      expect(maxAbsDiff(r.latents.data, base.latents.data), `cp_size=${cpSize} latents`).toBeLessThanOrEqual(1e-5);
      expect(maxAbsDiff(r.video, base.video), `cp_size=${cpSize} video`).toBeLessThanOrEqual(1e-5);
      const devs = r.memory.devices!;
      expect(devs.length).toBe(cpSize);
      expect(devs[0]!.peak_allocated_bytes).toBeGreaterThanOrEqual(r.memory.perPhase.decode!.peakAllocated);
      for (const d of devs) expect(d.peak_reserved_bytes).toBeGreaterThanOrEqual(d.peak_allocated_bytes);
    }
  });
});
