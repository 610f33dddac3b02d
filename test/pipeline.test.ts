// The text-to-video pipeline on the tiny golden model: every memory level and flag combination
// gives the same video (tiling held fixed), placements are what the plan says, the prompt cache
// works, and tiled decode is seamless (PSNR >= 40 dB vs untiled).
import { describe, it, expect } from 'vitest';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { getEngine, Rng } from './helpers/gpu.ts';
import { tinyModelWithTokenizer } from './helpers/models.ts';
import { WanPipeline, type GenerateResult, type WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { decodeTiled, planTiles } from '../src/pipeline/tiled-vae.ts';
import { encodePrompt } from '../src/io/tokenizer.ts';
import { Tensor } from '../src/tensor/tensor.ts';

const MODEL = tinyModelWithTokenizer();
const CACHE = mkdtempSync(join(tmpdir(), 'sd-pcache-'));
const PROMPT = 'a red circle moving right';

async function run(opts: WanPipelineOptions, steps = 2): Promise<{ r: GenerateResult; teOnGpu: number; ditSlots: boolean }> {
  const e = await getEngine();
  const pipe = await WanPipeline.fromPretrained(MODEL, { engine: e, promptCacheDir: CACHE, promptCache: false, ...opts });
  try {
    const r = await pipe.generate({ prompt: PROMPT, negativePrompt: 'blurry', seed: 7, numInferenceSteps: steps });
    const own = e.allocator.allocatedByOwner(1);
    return { r, teOnGpu: own.get('text_encoder') ?? 0, ditSlots: e.allocator.liveBlockList().some((b) => b.owner.startsWith('dit.blocks.') && !b.owner.includes('.attn')) };
  } finally {
    pipe.dispose();
  }
}

function maxDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

function psnr(a: Float32Array, b: Float32Array): number {
  // videos in [-1, 1]: peak-to-peak 2
  let se = 0;
  for (let i = 0; i < a.length; i++) se += (a[i]! - b[i]!) ** 2;
  const mse = se / a.length;
  return mse === 0 ? Infinity : 10 * Math.log10(4 / mse);
}

describe('pipeline on the tiny model', () => {
  it('levels 0-3 and flag combinations produce the same video (same kernels; tiled decode is exact)', async () => {
    const base = await run({ lowMemLevel: 0 });
    expect(base.r.videoShape).toEqual([3, 9, 64, 64]);
    expect(base.r.latents.shape).toEqual([16, 3, 8, 8]);
    // text encoder on the GPU (resident or streamed block by block): bit-identical
    const exact: WanPipelineOptions[] = [
      { lowMemLevel: 1, vaeTiling: false },
      { lowMemLevel: 2, vaeTiling: false, textEncoderDevice: 'gpu-stream' },
      { lowMemLevel: 3, vaeTiling: false, textEncoderDevice: 'gpu-stream' },
      { lowMemLevel: 3, vaeTiling: false, textEncoderDevice: 'gpu-stream', offloadVae: false },
      { lowMemLevel: 0, offloadDit: true },
      { lowMemLevel: 0, offloadVae: true },
      { lowMemLevel: 3, offloadDit: false, offloadTextEncoder: false, vaeTiling: false },
      { lowMemLevel: 1, vaeTiling: true, vaeTileSize: 8 }, // one tile covers the 8x8 latent
      // 3x3 tiles on the 8x8 latent: the halo covers the tiled stages' receptive field, so tiles are exact
      { lowMemLevel: 1, vaeTileSize: 4 },
      { lowMemLevel: 1 }, // auto tiles (vae_tile_size 0): sized by the working-set estimate
      { lowMemLevel: 3, vaeTileSize: 4, vaeTileOverlap: 0.5, textEncoderDevice: 'gpu-stream' },
      { lowMemLevel: 3, vaeTiling: false, textEncoderDevice: 'gpu-stream', activationOffload: true },
    ];
    for (const v of exact) {
      const o = await run(v);
      expect({ v, latent: maxDiff(o.r.latents.data, base.r.latents.data) }).toEqual({ v, latent: 0 });
      expect({ v, video: maxDiff(o.r.video, base.r.video) }).toEqual({ v, video: 0 });
    }
    // text encoder on the CPU device: the only difference is float summation order in the encoder
    // (context within 2e-6 abs of the GPU's, measured 1.7e-6 on |x| <= 3.4); everything after it runs
    // the same kernels
    for (const v of [{ lowMemLevel: 2, vaeTiling: false }, { lowMemLevel: 3, vaeTiling: false }, { lowMemLevel: 0, offloadTextEncoder: true }] as WanPipelineOptions[]) {
      const o = await run(v);
      expect(maxDiff(o.r.latents.data, base.r.latents.data)).toBeLessThan(1e-4);
      expect(maxDiff(o.r.video, base.r.video)).toBeLessThan(1e-4);
    }
    const e = await getEngine();
    const ctxs: Float32Array[] = [];
    for (const v of [{ lowMemLevel: 0 }, { lowMemLevel: 2 }] as WanPipelineOptions[]) {
      const p = await WanPipeline.fromPretrained(MODEL, { engine: e, promptCache: false, ...v });
      ctxs.push(await p.encodePrompt(PROMPT));
      p.dispose();
    }
    expect(maxDiff(ctxs[0]!, ctxs[1]!)).toBeLessThan(2e-6);
  });

  it('placements follow the plan: level 2 keeps the text encoder off the GPU, level 3 streams DiT blocks', async () => {
    const l0 = await run({ lowMemLevel: 0 }, 1);
    expect(l0.teOnGpu).toBeGreaterThan(0);
    const l2 = await run({ lowMemLevel: 2 }, 1);
    expect(l2.teOnGpu).toBe(0);
    const l3 = await run({ lowMemLevel: 3 }, 1);
    expect(l3.teOnGpu).toBe(0);
    expect(l3.r.uploads!.uploads).toBeGreaterThanOrEqual(2); // 2 blocks per forward, B=2 batched
    expect(l3.r.uploads!.prefetched).toBeGreaterThanOrEqual(1);
    // the denoise peak falls when the DiT blocks are streamed
    expect(l3.r.memory.perPhase.denoise!.peakAllocated).toBeLessThan(l0.r.memory.perPhase.denoise!.peakAllocated);
  });

  for (const ted of ['cpu', 'gpu-stream'] as const) it(`level 3 (text encoder: ${ted}) serves request after request from host copies: no weight file read in a request, same video each time, nothing left on the GPU between phases`, async () => {
    const e = await getEngine();
    const pipe = await WanPipeline.fromPretrained(MODEL, { engine: e, promptCache: false, lowMemLevel: 3, textEncoderDevice: ted });
    try {
      const outs: GenerateResult[] = [];
      for (let k = 0; k < 2; k++) {
        const loads: string[] = [];
        const r = await pipe.generate({
          prompt: PROMPT,
          negativePrompt: 'blurry',
          seed: 7,
          numInferenceSteps: 1,
          onProgress: (ev) => {
            if (ev.type === 'load') loads.push(ev.component);
          },
        });
        // text encoder (CPU device) and VAE host copies were made by fromPretrained
        expect(loads).toEqual([]);
        expect(r.uploads!.uploads).toBeGreaterThanOrEqual(2); // per-request statistics
        outs.push(r);
        // after the decode: neither the VAE nor the DiT ring holds GPU memory
        const own = e.allocator.allocatedByOwner(1);
        expect(own.get('vae') ?? 0).toBe(0);
        expect(e.allocator.liveBlockList().filter((b) => b.owner.startsWith('dit.blocks.') || b.owner.startsWith('text_encoder.encoder.block.'))).toEqual([]);
      }
      expect(outs[1]!.uploads!.uploads).toBe(outs[0]!.uploads!.uploads);
      expect(outs[1]!.uploads!.bytes).toBe(outs[0]!.uploads!.bytes);
      // the CPU device's weights live in shared memory: its worker threads read them without a copy
      if (ted === 'cpu') expect(pipe.textEncoder.blocks.at(0).wi0.weight.t.data!.buffer).toBeInstanceOf(SharedArrayBuffer);
      expect(maxDiff(outs[1]!.video, outs[0]!.video)).toBe(0);
    } finally {
      pipe.dispose();
    }
  });

  it('level 3: an out-of-memory decode names the fix and leaves no VAE weights on the GPU; the next decode works', async () => {
    const e = await getEngine();
    const pipe = await WanPipeline.fromPretrained(MODEL, { engine: e, promptCache: false, lowMemLevel: 3 });
    const limit = e.allocator.limitBytes;
    try {
      const lat = await pipe.sample({ prompt: PROMPT, negativePrompt: 'blurry', seed: 7, numInferenceSteps: 1 });
      e.allocator.emptyCache();
      // room for a part of the tiny VAE's 7.9 MiB of weights only
      e.allocator.limitBytes = e.allocator.stats().allocated + 2 * 2 ** 20;
      await expect(pipe.decode(lat)).rejects.toThrow(/out of memory|memory_limit|budget/i);
      expect(e.allocator.allocatedByOwner(1).get('vae') ?? 0).toBe(0);
      e.allocator.limitBytes = limit;
      const v = await pipe.decode(lat);
      expect(v.shape).toEqual([3, 9, 64, 64]);
      expect(e.allocator.allocatedByOwner(1).get('vae') ?? 0).toBe(0);
    } finally {
      e.allocator.limitBytes = limit;
      pipe.dispose();
    }
  });

  it('the prompt cache makes the second encode free (another pipeline, the same cache folder)', async () => {
    const e = await getEngine();
    const dir = mkdtempSync(join(tmpdir(), 'sd-pc-'));
    const open = () => WanPipeline.fromPretrained(MODEL, { engine: e, promptCacheDir: dir, promptCache: true, lowMemLevel: 2 });
    const p1 = await open();
    let a: Float32Array;
    try {
      a = await p1.encodePrompt('a green square moving up');
      expect((p1 as unknown as { promptCache: { hits: number; misses: number } }).promptCache.misses).toBe(1);
      expect(p1.textEncoderRuns).toBe(1);
    } finally {
      p1.dispose();
    }
    const p2 = await open();
    try {
      const b = await p2.encodePrompt('a green square moving up');
      expect((p2 as unknown as { promptCache: { hits: number } }).promptCache.hits).toBe(1);
      expect(p2.textEncoderRuns).toBe(0);
      expect(maxDiff(a, b)).toBe(0);
    } finally {
      p2.dispose();
    }
  });

  it('a pipeline serving many requests encodes each prompt once (a batch shares its negative prompt), prompt cache or not', async () => {
    const e = await getEngine();
    const pipe = await WanPipeline.fromPretrained(MODEL, { engine: e, promptCache: false, lowMemLevel: 2 });
    try {
      const r1 = await pipe.generate({ prompt: 'a red circle moving right', negativePrompt: 'blurry', seed: 2, numInferenceSteps: 1 });
      expect(pipe.textEncoderRuns).toBe(2);
      await pipe.generate({ prompt: 'a blue square moving left', negativePrompt: 'blurry', seed: 2, numInferenceSteps: 1 });
      expect(pipe.textEncoderRuns).toBe(3);
      const r3 = await pipe.generate({ prompt: 'a red circle moving right', negativePrompt: 'blurry', seed: 2, numInferenceSteps: 1 });
      expect(pipe.textEncoderRuns).toBe(3);
      expect(maxDiff(r1.video, r3.video)).toBe(0);
      // the memo holds a few prompts: older ones are encoded again
      for (const p of ['p1', 'p2', 'p3', 'p4', 'p5']) await pipe.encodePrompt(p);
      const before = pipe.textEncoderRuns;
      await pipe.encodePrompt('blurry');
      expect(pipe.textEncoderRuns).toBe(before + 1);
    } finally {
      pipe.dispose();
    }
  });

  it('prompts run at their own length: the context equals a full text_len run, and per-length bias tables stay bounded', async () => {
    const e = await getEngine();
    const pipe = await WanPipeline.fromPretrained(MODEL, { engine: e, promptCache: false, lowMemLevel: 0 });
    try {
      const textLen = pipe.settings.load.textLen;
      const te = pipe.textEncoder;
      const d = te.dims.dModel;
      const prompts = ['a', 'a green square', 'a green square moving up', 'a red circle moving left on a gray background', 'up', 'a blue', 'a white triangle moving down'];
      for (const p of prompts) {
        const got = await pipe.encodePrompt(p);
        // the official form: all text_len positions, padded keys masked, first `length` rows kept
        const enc = encodePrompt(pipe.tokenizer!, p, textLen);
        const out = await te.forward(e, Tensor.cpu(enc.ids, [1, textLen], 'i32'), Tensor.cpu(enc.mask, [1, textLen], 'i32'));
        const full = (await out.toArray()) as Float32Array;
        out.dispose();
        const want = new Float32Array(textLen * d);
        want.set(full.subarray(0, enc.length * d));
        expect(maxDiff(got, want)).toBeLessThan(1e-5);
      }
      expect((te as unknown as { relTables: Map<string, unknown> }).relTables.size).toBeLessThanOrEqual(4);
    } finally {
      pipe.dispose();
    }
  });

  it('tile plans: cover the axis with >= 25% overlaps, least decoded work (brute force on small axes)', () => {
    const check = (size: number, tile: number, frac: number, halo: number, q: number) => {
      const { starts, lens } = planTiles(size, tile, frac, halo, q);
      expect(starts[0]).toBe(0);
      expect(starts.at(-1)! + lens.at(-1)!).toBe(size);
      for (let i = 0; i < starts.length; i++) {
        expect(lens[i]).toBeLessThanOrEqual(tile);
        if (i === 0) continue;
        expect(starts[i]).toBeGreaterThan(starts[i - 1]!);
        const ov = starts[i - 1]! + lens[i - 1]! - starts[i]!;
        expect(ov).toBeGreaterThanOrEqual(Math.max(1, Math.ceil(frac * Math.max(lens[i]!, lens[i - 1]!) - 1e-9)));
        expect(starts[i]! + lens[i]!).toBeGreaterThan(starts[i - 1]! + lens[i - 1]!);
      }
      return { starts, lens };
    };
    const cost = (size: number, halo: number, q: number, starts: number[], lens: number[]) =>
      starts.reduce((a, s, i) => a + Math.ceil((Math.min(size, s + lens[i]! + halo) - Math.max(0, s - halo)) / q) * q, 0);
    // every valid plan, by exhaustive search
    const brute = (size: number, tile: number, frac: number, halo: number, q: number): number => {
      let best = Infinity;
      const rec = (a: number, len: number, c: number) => {
        const tc = c + Math.ceil((Math.min(size, a + len + halo) - Math.max(0, a - halo)) / q) * q;
        if (tc >= best) return;
        if (a + len === size) return void (best = tc);
        for (let a2 = a + 1; a2 < a + len; a2++)
          for (let l2 = a + len - a2 + 1; l2 <= tile && a2 + l2 <= size; l2++)
            if (a + len - a2 >= Math.max(1, Math.ceil(frac * Math.max(len, l2) - 1e-9))) rec(a2, l2, tc);
      };
      for (let l = 1; l <= Math.min(tile, size); l++) rec(0, l, 0);
      return best;
    };
    const rng = new Rng(11);
    for (let k = 0; k < 40; k++) {
      const size = 5 + rng.int(14);
      const tile = 3 + rng.int(6);
      const frac = [0.25, 0.3, 0.5][k % 3]!;
      const halo = k % 3;
      const q = [1, 4, 8][Math.floor(k / 3) % 3]!;
      if (size <= tile) continue;
      const p = check(size, tile, frac, halo, q);
      expect(cost(size, halo, q, p.starts, p.lens), JSON.stringify({ size, tile, frac, halo, q, p })).toBe(brute(size, tile, frac, halo, q));
    }
    expect(planTiles(12, 16, 0.25, 1, 8)).toEqual({ starts: [0], lens: [12] });
    // the x axis of the bench (16 latent px, tiles of 8, 1-px halo, 64-column conv workgroups = 8 latent px):
    // regions [0,8) [4,12) [8,16), three workgroups per row, where equal 7-px tiles would decode 8 + 9 + 8 (four)
    expect(planTiles(16, 8, 0.25, 1, 8)).toEqual({ starts: [0, 5, 9], lens: [7, 6, 7] });
    for (const [size, tile] of [[60, 32], [104, 32], [90, 32], [160, 64], [13, 5]] as const) check(size, tile, 0.25, 1, 8);
    // long axes with large tiles take the even fallback; still valid
    check(400, 300, 0.25, 1, 8);
  });

  it('tiled decode matches the untiled decode exactly (the halo covers the receptive field), no seam', async () => {
    const e = await getEngine();
    const pipe = await WanPipeline.fromPretrained(MODEL, { engine: e, promptCache: false, lowMemLevel: 0 });
    try {
      const r = await pipe.sample({ prompt: PROMPT, seed: 3, numInferenceSteps: 2 });
      const full = await pipe.vae.decode(e, r.data, r.shape);
      // 4-pixel tiles on an 8x8 latent: 9 tiles, overlaps >= 50 %, the halo from the head's receptive radius
      const tiled = await decodeTiled(e, pipe.vae, r.data, r.shape, { tile: 4, overlap: 0.5 });
      expect(tiled.tiles).toBe(9);
      expect(tiled.shape).toEqual(full.shape);
      const p = psnr(tiled.video, full.video);
      expect(p).toBeGreaterThanOrEqual(40);
      let maxErr = 0;
      for (let i = 0; i < full.video.length; i++) maxErr = Math.max(maxErr, Math.abs(tiled.video[i]! - full.video[i]!));
      expect(maxErr).toBeLessThanOrEqual(1e-6);
      // seam check: the error across tile borders is no larger than inside tiles
      const [, T, H, W] = full.shape;
      const seam = (video: Float32Array) => {
        const colErr = new Float64Array(W);
        for (let c = 0; c < 3; c++)
          for (let t = 0; t < T; t++)
            for (let y = 0; y < H; y++)
              for (let x = 0; x < W; x++) {
                const i = ((c * T + t) * H + y) * W + x;
                colErr[x]! += Math.abs(video[i]! - full.video[i]!);
              }
        const jumps = [];
        for (let x = 1; x < W; x++) jumps.push(Math.abs(colErr[x]! - colErr[x - 1]!));
        const meanErr = colErr.reduce((a, b) => a + b, 0) / W;
        return { maxJump: Math.max(...jumps), meanErr };
      };
      const s1 = seam(tiled.video);
      expect(s1.maxJump).toBeLessThan(4 * s1.meanErr + 1e-3);
      // the check can fail: without the halo the tile borders differ from the untiled decode
      const noHalo = await decodeTiled(e, pipe.vae, r.data, r.shape, { tile: 4, overlap: 0.5, halo: 0 });
      const s0 = seam(noHalo.video);
      console.log(`seam check: halo 0 max column jump ${s0.maxJump.toExponential(2)} (mean column error ${s0.meanErr.toExponential(2)}), PSNR ${psnr(noHalo.video, full.video).toFixed(1)} dB`);
      expect(s0.maxJump).toBeGreaterThan(2 * s0.meanErr);
    } finally {
      pipe.dispose();
    }
  });
});
