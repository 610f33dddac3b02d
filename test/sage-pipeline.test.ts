// infer.attention=sage end to end on the demo model: the video stays close to sdpa's (PSNR), at
// memory levels 0 and 3 (streamed DiT, tiled VAE) and with step caching; the sidecar records the
// attention kind; the CLI flag and the config key reach the pipeline; bad values are one-line errors.
import { describe, it, expect } from 'vitest';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { getEngine } from './helpers/gpu.ts';
import { WanPipeline, type GenerateResult } from '../src/pipeline/wan-pipeline.ts';
import { sidecar } from '../src/pipeline/report.ts';
import { psnr } from '../src/tools/video-metrics.ts';
import { parseArgs } from '../src/cli/args.ts';

const HERE = dirname(fileURLToPath(import.meta.url));
const DEMO = join(HERE, '..', 'weights', 'demo');
const PROMPT = 'a red circle moving up on a black background';
/** lowest PSNR of a sage video against the sdpa one (measured: docs/precision.md "Quantized attention") */
const MIN_PSNR_DB = 30;

describe('infer.attention=sage in the pipeline', () => {
  it('levels 0 and 3, with and without step caching: close to sdpa; the sidecar records the kind', async () => {
    const e = await getEngine();
    const run = async (attention: 'sdpa' | 'sage', lowMemLevel: 0 | 3, mode: 'off' | 'flex') => {
      const p = await WanPipeline.fromPretrained(DEMO, { engine: e, promptCache: false, attention, lowMemLevel, ...(lowMemLevel === 3 ? { textEncoderDevice: 'gpu-stream' as const } : {}) });
      try {
        const r = await p.generate({ prompt: PROMPT, seed: 7, mode, numInferenceSteps: 8 });
        const side = sidecar({ settings: r.settings, pipe: p, videoPath: null, videoShape: r.videoShape, latentsPath: null, result: r }) as { attention: { kind: string; pv?: string }; config: Record<string, unknown> };
        return { r, side };
      } finally {
        p.dispose();
      }
    };
    const ref: Record<string, GenerateResult> = {};
    for (const mode of ['off', 'flex'] as const) {
      const { r, side } = await run('sdpa', 0, mode);
      expect(side.attention).toEqual({ kind: 'sdpa' });
      ref[mode] = r;
    }
    for (const [level, mode] of [[0, 'off'], [3, 'off'], [0, 'flex']] as const) {
      const { r, side } = await run('sage', level, mode);
      expect(side.attention.kind).toBe('sage');
      expect(side.attention.pv).toBe(e.caps.shaderF16 ? 'f16' : 'f32');
      expect(side.config['infer.attention']).toBe('sage');
      expect(r.video.every(Number.isFinite)).toBe(true);
      const db = psnr(r.video, ref[mode]!.video, r.videoShape);
      expect(db, `level ${level} cache ${mode}: PSNR ${db.toFixed(2)} dB`).toBeGreaterThanOrEqual(MIN_PSNR_DB);
      expect(db).toBeLessThan(Infinity); // really the other kernel
      if (mode === 'flex') expect(r.cache?.computedSteps.length).toBeLessThan(r.settings.request.numInferenceSteps);
    }
  }, 300_000);

  it('--attention maps to infer.attention; bad values are one-line errors', () => {
    expect(parseArgs(['a prompt', '--attention', 'sage'])!.settings.load.attention).toBe('sage');
    expect(parseArgs(['a prompt', 'infer.attention=sage'])!.settings.load.attention).toBe('sage');
    expect(parseArgs(['a prompt'])!.settings.load.attention).toBe('sdpa');
    expect(() => parseArgs(['a prompt', '--attention', 'int8'])).toThrow(/infer.attention must be one of sdpa, sage/);
  });
});
