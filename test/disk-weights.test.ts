// Weights read from disk per use (infer.weights_source=disk, src/pipeline/disk-weights.ts): the same
// video as `memory` at every place it applies (level 3's streamed DiT, level 2's CPU text encoder,
// the text encoder streamed through the GPU, Wan 2.2's experts at levels 0 and 3), nothing of them
// held in host memory, every block image read per use (and counted), converted blocks served from
// the on-disk image cache, a file changed under a running pipeline refused, `auto`'s rule, the
// planner's host accounting.
import { describe, it, expect } from 'vitest';
import { cpSync, mkdtempSync, writeFileSync, appendFileSync, readdirSync, statSync, utimesSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { getEngine } from './helpers/gpu.ts';
import { tinyModelWithTokenizer } from './helpers/models.ts';
import { WanPipeline, resolveWeightsSource, type GenerateResult, type WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { settingsForModel } from '../src/config/settings.ts';
import { openModelFolder } from '../src/io/model-folder.ts';
import { planRun } from '../src/plan/plan.ts';
import { shapesFromFolder } from '../src/plan/shapes.ts';
import { profileText } from '../src/pipeline/report.ts';
import { stagingChunks } from '../src/pipeline/residency.ts';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const FIX = join(ROOT, 'test', 'fixtures');

function copyOf(src: string): string {
  const d = mkdtempSync(join(tmpdir(), 'sd-disk-'));
  cpSync(src, d, { recursive: true });
  return d;
}
const DEMO = copyOf(join(ROOT, 'weights', 'demo'));
const TINY = tinyModelWithTokenizer();
const WAN22 = (() => {
  const d = copyOf(join(FIX, 'golden', 'wan22-tiny'));
  cpSync(join(FIX, 'tokenizer', 'legacy'), join(d, 'tokenizer'), { recursive: true });
  writeFileSync(join(d, 'smart_diffusion.json'), JSON.stringify({ text_len: 16, height: 64, width: 64, num_frames: 9, num_inference_steps: 6 }));
  return d;
})();

async function run(model: string, opts: WanPipelineOptions, source: 'memory' | 'disk', steps = 3): Promise<{ r: GenerateResult; host: Record<string, number>; disk: ReturnType<WanPipeline['diskReadStats']>; pipe: WanPipeline }> {
  const e = await getEngine();
  const pipe = await WanPipeline.fromPretrained(model, { engine: e, promptCache: false, ...opts, config: { ...(opts.config ?? {}), 'infer.weights_source': source } });
  try {
    const r = await pipe.generate({ prompt: 'a red circle moving right', seed: 5, numInferenceSteps: steps });
    return { r, host: pipe.hostWeightBytes(), disk: pipe.diskReadStats(), pipe };
  } finally {
    pipe.dispose();
  }
}

describe('weights_source=disk gives the same video as memory', () => {
  const cases: Array<[string, string, WanPipelineOptions]> = [
    ['demo level 3 (DiT streamed, text encoder on the CPU device)', DEMO, { lowMemLevel: 3 }],
    ['demo level 3, text encoder streamed through the GPU', DEMO, { lowMemLevel: 3, textEncoderDevice: 'gpu-stream' }],
    ['tiny level 2 (CPU text encoder)', TINY, { lowMemLevel: 2 }],
    ['tiny level 3, 1 block resident', TINY, { lowMemLevel: 3, residentBlocks: 1 }],
    ['wan22 level 0 (the inactive expert on disk)', WAN22, { lowMemLevel: 0 }],
    ['wan22 level 3 (both experts streamed from disk)', WAN22, { lowMemLevel: 3 }],
  ];
  for (const [name, model, opts] of cases) {
    it(name, async () => {
      const steps = model === WAN22 ? 6 : 3;
      const mem = await run(model, opts, 'memory', steps);
      const dsk = await run(model, opts, 'disk', steps);
      expect(dsk.pipe.settings.load.weightsSource).toBe('disk');
      expect(Array.from(dsk.r.video)).toEqual(Array.from(mem.r.video));
      // nothing of the DiT's streamed / swapped weights waits in host memory
      const level = opts.lowMemLevel!;
      if (level === 3 || model === WAN22) {
        expect(dsk.host.dit ?? 0).toBe(0);
        expect(dsk.host.dit_2 ?? 0).toBe(0);
        expect(mem.host.dit).toBeGreaterThan(0);
      }
      if (level >= 2) {
        expect(dsk.host.text_encoder ?? 0).toBeLessThan(mem.host.text_encoder ?? 0);
        // only the small non-block weights stay in host memory (relative-bias embeddings, the final
        // norm): the token table's rows are read per prompt, the blocks per use
        const te = dsk.pipe.textEncoder;
        const kept = te.namedParams().filter(([, p]) => !p.disk).reduce((a, [, p]) => a + 4 * p.shape.reduce((x, y) => x * y, 1), 0);
        expect(dsk.host.text_encoder ?? 0).toBeLessThanOrEqual(kept);
        expect(kept).toBeLessThan(0.05 * (mem.host.text_encoder ?? 0));
        expect(te.shared.disk).toBeTruthy();
      }
      // level 3: every streamed block image came from disk, per use
      if (level === 3) {
        const u = dsk.r.uploads!;
        // (resident blocks are read once, when the device side is allocated, before the request's counts)
        expect(u.diskReads).toBe(u.uploads);
        expect(u.diskBytes).toBeGreaterThan(0);
        expect(u.diskReadMs).toBeGreaterThan(0);
        // --profile: read time against compute, and how much of it was hidden
        expect(profileText(dsk.pipe, dsk.r)).toMatch(/read from disk: \d+ block images, .* ms of reads .*\n.* ms of reading ran before the loop needed the block, .* ms while it waited for that block/);
      }
      expect(Object.keys(dsk.disk).length).toBeGreaterThan(0);
    });
  }
});

describe('weights_source=disk: converted blocks, faults, auto, the plan', () => {
  it('blocks whose dtype changes (f32 file, bf16 weights) are converted once into the image cache and read from it in one piece', async () => {
    const cacheDir = mkdtempSync(join(tmpdir(), 'sd-blockcache-'));
    const opts: WanPipelineOptions = { lowMemLevel: 3, weightDtype: 'bf16', config: { 'infer.weights_cache_dir': cacheDir } };
    const mem = await run(TINY, opts, 'memory');
    const dsk = await run(TINY, opts, 'disk');
    expect(Array.from(dsk.r.video)).toEqual(Array.from(mem.r.video));
    const folders = readdirSync(cacheDir);
    expect(folders.length).toBe(1);
    const files = readdirSync(join(cacheDir, folders[0]!)).sort();
    expect(files).toEqual(['block-0.img', 'block-1.img']);
    const mtime = statSync(join(cacheDir, folders[0]!, 'block-0.img')).mtimeMs;
    // a second pipeline reuses the images (not rewritten)
    const again = await run(TINY, opts, 'disk');
    expect(Array.from(again.r.video)).toEqual(Array.from(mem.r.video));
    expect(statSync(join(cacheDir, folders[0]!, 'block-0.img')).mtimeMs).toBe(mtime);
    rmSync(cacheDir, { recursive: true, force: true });
  });

  it('chunked staging: blocks larger than a staging chunk go up in pieces through a small ring (straight, converted and cached images alike): same video, and the plan counts the ring', async () => {
    const saved = { ...stagingChunks };
    // 4,100 bytes: not a multiple of the image alignment, so tensors straddle the chunks
    Object.assign(stagingChunks, { bytes: 4100, count: 3 });
    const cacheDir = mkdtempSync(join(tmpdir(), 'sd-blockcache-'));
    try {
      const cases: Array<[string, WanPipelineOptions]> = [
        [DEMO, { lowMemLevel: 3 }],
        [TINY, { lowMemLevel: 3 }],
        [TINY, { lowMemLevel: 3, weightDtype: 'bf16', config: { 'infer.weights_cache_dir': cacheDir } }],
        [TINY, { lowMemLevel: 2, textEncoderDevice: 'gpu-stream' }],
      ];
      for (const [model, opts] of cases) {
        Object.assign(stagingChunks, saved);
        const mem = await run(model, opts, 'memory');
        Object.assign(stagingChunks, { bytes: 4100, count: 3 });
        const dsk = await run(model, opts, 'disk');
        expect(Array.from(dsk.r.video)).toEqual(Array.from(mem.r.video));
        if (opts.lowMemLevel === 3) expect(dsk.r.uploads!.diskReads).toBe(dsk.r.uploads!.uploads);
      }
      const shapes = await shapesFromFolder(DEMO);
      const plan = await planRun(shapes, settingsForModel(DEMO, { lowMemLevel: 3, config: { 'infer.weights_source': 'disk' } }));
      expect(plan.hostByPart['staging ring']).toBe(3 * 4100);
    } finally {
      Object.assign(stagingChunks, saved);
      rmSync(cacheDir, { recursive: true, force: true });
    }
  });

  it('a weight file changed or truncated under a running pipeline is a one-line error naming it, never garbage', async () => {
    const e = await getEngine();
    for (const change of ['append', 'touch'] as const) {
      const model = copyOf(TINY);
      const pipe = await WanPipeline.fromPretrained(model, { engine: e, promptCache: false, lowMemLevel: 3, config: { 'infer.weights_source': 'disk' } });
      try {
        await pipe.generate({ prompt: 'x', numInferenceSteps: 1 });
        const f = join(model, 'transformer', 'diffusion_pytorch_model.safetensors');
        if (change === 'append') appendFileSync(f, Buffer.from([0]));
        else utimesSync(f, new Date(), new Date(Date.now() + 5000));
        const err = await pipe.generate({ prompt: 'x', numInferenceSteps: 1 }).then(() => null, (x: Error) => x);
        expect(err?.message).toMatch(/^\[disk\] .*diffusion_pytorch_model\.safetensors: the transformer weights changed under the running pipeline \((its size went from|it was modified at)/);
        expect(err?.message.includes('\n')).toBe(false);
      } finally {
        pipe.dispose();
      }
    }
  });

  it("auto: disk when the weights kept off the GPU would not fit in 80 % of the available RAM, memory otherwise (and whenever nothing is kept off the GPU)", async () => {
    const folder = await openModelFolder(DEMO);
    const s3 = settingsForModel(DEMO, { lowMemLevel: 3 });
    expect((await resolveWeightsSource(folder, s3, 1e12)).source).toBe('memory');
    const small = await resolveWeightsSource(folder, s3, 1e6);
    expect(small.source).toBe('disk');
    expect(small.note).toMatch(/^infer.weights_source=auto: disk \(the weights kept off the GPU need .* more than 80 % of the .* available\)/);
    expect((await resolveWeightsSource(folder, settingsForModel(DEMO, { lowMemLevel: 0 }), 1e6)).source).toBe('memory');
    expect((await resolveWeightsSource(folder, settingsForModel(DEMO, { lowMemLevel: 3, config: { 'infer.weights_source': 'memory' } }), 1e6)).source).toBe('memory');
  });

  it('the planner counts no host bytes for weights read from disk', async () => {
    const shapes = await shapesFromFolder(DEMO);
    const mem = await planRun(shapes, settingsForModel(DEMO, { lowMemLevel: 3, config: { 'infer.weights_source': 'memory' } }));
    const dsk = await planRun(shapes, settingsForModel(DEMO, { lowMemLevel: 3, config: { 'infer.weights_source': 'disk' } }));
    expect(mem.hostByPart['dit weights']).toBeGreaterThan(0);
    expect(dsk.hostByPart['dit weights']).toBe(0);
    expect(dsk.hostByPart['text encoder weights']).toBeLessThan(mem.hostByPart['text encoder weights']!);
    expect(dsk.peakBytes).toBe(mem.peakBytes);
  });
});
