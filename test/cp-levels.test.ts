// Context parallelism with the memory levels (src/parallel/cp-dit.ts, pipeline-cp.ts): the level 1-2
// activation bounds inside the CP forward (CFG rows in turn, attention / FFN row chunks) against the
// one-device forward with the same bounds; each device streaming its own blocks from one host copy
// (level 3, and the weight shard of cp_shard_weights) against the resident forward, with the bytes
// each device uploads; the pipeline at levels 2 and 3 with cp_size 2 and 3 against cp_size 1; and
// the memory planner's per-device peaks against a real run's (within 1 %).
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { Engine } from '../src/runtime/engine.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../src/models/wan_dit/model.ts';
import { parseTransformerConfig } from '../src/io/model-folder.ts';
import { randomizeModule, WAN_1_3B_TRANSFORMER } from '../src/tools/random-model.ts';
import { ContextParallelDit, type CpRank } from '../src/parallel/cp-dit.ts';
import { cpBlockOrder, cpBlockPlacement, cpRankRing, cpUnsupported } from '../src/parallel/pipeline-cp.ts';
import { WanPipeline, type GenerateResult, type WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { planRun } from '../src/plan/plan.ts';
import { shapesFromFolder } from '../src/plan/shapes.ts';
import { specFromCaps } from '../src/plan/meta-gpu.ts';
import { encodePrompt, loadTokenizer } from '../src/io/tokenizer.ts';
import { tinyModelWithTokenizer } from './helpers/models.ts';
import { cpInputs, oneDeviceForward, cpForward, maxAbsDiff, type CpCase } from './helpers/cp.ts';
import { releaseMatmulWorkspace } from '../src/ops/matmul.ts';

const engines: Engine[] = [];
beforeAll(async () => {
  for (let i = 0; i < 3; i++) engines.push(await Engine.create());
});
afterAll(() => {
  for (const e of engines) e.destroy();
});

const CFG = { num_layers: 4, attention_head_dim: 16, ffn_dim: 80, freq_dim: 32, in_channels: 4, out_channels: 4, text_dim: 24, rope_max_seq_len: 64 };

/** A random Wan DiT (the same weights for the same seed); blocks on the host when `hostBlocks` (streamed), everything else on `e`. */
function randomDit(e: Engine, heads: number, hostBlocks = false, layers = CFG.num_layers): WanTransformer3DModel {
  const m = new WanTransformer3DModel(ditDimsFromConfig(parseTransformerConfig({ ...WAN_1_3B_TRANSFORMER, ...CFG, num_layers: layers, num_attention_heads: heads })));
  randomizeModule(m, 41, null, 'bf16');
  for (const [k, p] of m.namedParams()) if (!(hostBlocks && m.isBlockKey(k))) p.value = e.keep(p.t.toGpu(e, `dit.${k}`));
  return m;
}

const inputs = cpInputs;
type Case = CpCase;

type Bounds = { cfgSequential?: boolean; attnChunkTokens?: number; ffnChunkTokens?: number };

const oneDevice = (m: WanTransformer3DModel, c: Case, b: Bounds = {}) => oneDeviceForward(engines[0]!, m, c, b);

/** A CP forward; also each rank's peak allocated bytes above what it held before. */
const parallel = (cp: ContextParallelDit, c: Case, b: Bounds = {}) => cpForward(cp, c, b);

describe('levels 1-2 inside the CP forward: CFG rows in turn, attention and FFN chunks', () => {
  for (const heads of [2, 3]) {
    it(`${heads} heads, N = 2 and 3, L = 180: the bounded CP forward equals the bounded one-device forward (<= 1e-5) with a smaller per-device peak than unbounded CP`, async () => {
      const ref = randomDit(engines[0]!, heads);
      const c = inputs(ref, 4, 10, 18, 6); // f, h, w = 4, 5, 9: L = 180 (rows 90/90, 60/60/60)
      const bounds: Bounds = { cfgSequential: true, attnChunkTokens: 32, ffnChunkTokens: 40 };
      const want = await oneDevice(ref, c, bounds);
      expect(maxAbsDiff(await oneDevice(ref, c), want)).toBeLessThanOrEqual(1e-5);
      for (const N of [2, 3]) {
        const ranks = engines.slice(0, N).map((e, r) => ({ engine: e, dit: r === 0 ? ref : randomDit(e, heads) }));
        const cp = new ContextParallelDit(ranks);
        const whole = await parallel(cp, c);
        const bounded = await parallel(cp, c, bounds);
        expect(maxAbsDiff(bounded.out, want), `N=${N} bounded`).toBeLessThanOrEqual(1e-5);
        expect(maxAbsDiff(whole.out, want), `N=${N} unbounded`).toBeLessThanOrEqual(1e-5);
        // every rank holds less at its peak with the bounds (the all-to-alls move one CFG row at a time)
        bounded.peaks.forEach((p, r) => expect(p, `N=${N} rank ${r}: bounded ${p} vs unbounded ${whole.peaks[r]}`).toBeLessThan(whole.peaks[r]!));
        // one all-to-all round per CFG row: 2 x (3 + 1) per block, and the head's gather
        cp.exchange.resetStats();
        await parallel(cp, c, { cfgSequential: true });
        expect(cp.exchange.stats.exchanges).toBe(CFG.num_layers * 2 * 4 + 1);
        for (const r of ranks.slice(1)) r.dit.disposeParams();
      }
      ref.disposeParams();
    });
  }

  it('a bad chunk size is refused with one line', async () => {
    const m = randomDit(engines[0]!, 2, false, 1);
    const cp = new ContextParallelDit([{ engine: engines[0]!, dit: m }]);
    const c = inputs(m, 1, 8, 8, 3);
    await expect(parallel(cp, c, { attnChunkTokens: -1 })).rejects.toThrow(/^\[cp_dit\] attnChunkTokens must be an integer >= 0 \(0 = whole\), got -1$/);
    m.disposeParams();
  });
});

describe('each device streams its own blocks from one host copy (level 3, the weight shard)', () => {
  it('cpBlockOrder: the resident shard interleaved over the ranks, then the streamed blocks in run order', () => {
    expect(cpBlockOrder(6, 2, 0, 3)).toEqual([0, 2, 4, 1, 3, 5]);
    expect(cpBlockOrder(6, 2, 1, 3)).toEqual([1, 3, 5, 0, 2, 4]);
    expect(cpBlockOrder(5, 3, 2, 2)).toEqual([2, 0, 1, 3, 4]);
    expect(cpBlockOrder(4, 2, 1, 0)).toEqual([0, 1, 2, 3]);
    // every block resident on exactly one device when resident = ceil(blocks / N) and N divides blocks
    const owners = new Map<number, number>();
    for (let r = 0; r < 3; r++) for (const b of cpBlockOrder(30, 3, r, 10).slice(0, 10)) owners.set(b, (owners.get(b) ?? 0) + 1);
    expect([...owners.values()].every((v) => v === 1) && owners.size === 30).toBe(true);
    expect(cpBlockPlacement({ cpSize: 2, level: 2, ditStreamed: false, shard: 'auto', residentBlocks: 0, numBlocks: 30 })).toEqual({ stream: true, resident: 15 });
    expect(cpBlockPlacement({ cpSize: 3, level: 1, ditStreamed: false, shard: 'auto', residentBlocks: 0, numBlocks: 30 })).toEqual({ stream: false, resident: 30 });
    expect(cpBlockPlacement({ cpSize: 3, level: 1, ditStreamed: false, shard: true, residentBlocks: 0, numBlocks: 30 })).toEqual({ stream: true, resident: 10 });
    expect(cpBlockPlacement({ cpSize: 2, level: 2, ditStreamed: false, shard: false, residentBlocks: 0, numBlocks: 30 })).toEqual({ stream: false, resident: 30 });
    expect(cpBlockPlacement({ cpSize: 2, level: 3, ditStreamed: true, shard: 'auto', residentBlocks: 4, numBlocks: 30 })).toEqual({ stream: true, resident: 4 });
  });

  for (const [heads, resident] of [
    [3, 0],
    [2, 2],
  ] as const) {
    // (4 - resident streamed blocks, an even count: each takes its own slot in turn, so with more
    // than the 2 slots every one is uploaded once per forward; with 2, they stay in the slots)
    it(`${heads} heads, ${resident} resident block(s) per device, N = 2 and 3: equals the resident one-device forward (<= 1e-5); each device uploads its streamed blocks once per forward from the shared host images`, async () => {
      const ref = randomDit(engines[0]!, heads);
      const c = inputs(ref, 2, 10, 14, 6); // L = 70
      const want = await oneDevice(ref, c, { cfgSequential: true, ffnChunkTokens: 32 });
      for (const N of [2, 3]) {
        const ranks: CpRank[] = [];
        const rings: Array<ReturnType<typeof cpRankRing>> = [];
        for (let r = 0; r < N; r++) {
          const e = engines[r]!;
          const dit = randomDit(e, heads, true);
          const shared = r === 0 ? undefined : (i: number) => rings[0]!.ring.imageBytes(rings[0]!.order.indexOf(i))!;
          const rr = cpRankRing(e, dit, r, N, resident, { sharedImages: shared });
          rings.push(rr);
          ranks.push({ engine: e, dit, ring: rr.ring, residency: rr.residency });
        }
        // ranks 1.. view rank 0's host images: one host copy of the blocks
        const img0 = rings[0]!.ring.imageBytes(0)!;
        expect(rings[1]!.ring.imageBytes(rings[1]!.order.indexOf(rings[0]!.order[0]!))!.buffer).toBe(img0.buffer);
        const cp = new ContextParallelDit(ranks);
        // the resident blocks' uploads (started with the rings) done first
        for (const rr of rings) for (let j = 0; j < resident; j++) await rr.ring.acquire(j);
        for (let round = 0; round < 2; round++) {
          cp.resetUploadStats();
          const got = await parallel(cp, c, { cfgSequential: true, ffnChunkTokens: 32 });
          expect(maxAbsDiff(got.out, want), `N=${N} round ${round}`).toBeLessThanOrEqual(1e-5);
          const streamed = CFG.num_layers - resident;
          const uploads = round === 0 || streamed > 2 ? streamed : 0;
          cp.uploadBytes().forEach((b, r) => expect(b, `rank ${r} round ${round}`).toBe(uploads * rings[r]!.ring.blockBytes(resident)));
        }
        for (const r of ranks) {
          r.ring!.dispose();
          r.dit.disposeParams();
        }
      }
      ref.disposeParams();
    });
  }
});

describe('WanPipeline with cp_size at levels 2 and 3', () => {
  const TINY = tinyModelWithTokenizer({ num_inference_steps: 2 });
  async function gen(model: string, opts: WanPipelineOptions): Promise<GenerateResult> {
    const pipe = await WanPipeline.fromPretrained(model, { engine: engines[0]!, promptCache: false, ...opts });
    try {
      return await pipe.generate({ prompt: 'a red circle moving right', negativePrompt: 'blurry', seed: 7 });
    } finally {
      pipe.dispose();
    }
  }

  for (const [name, model] of [['tiny (2 heads, 2 blocks)', TINY]] as const) {
    it(`${name}: level 3 with cp_size 2 and 3, and level 2 sharded and not: the latents and video of cp_size 1 (<= 1e-5)`, async () => {
      for (const level of [3, 2]) {
        const base = await gen(model, { lowMemLevel: level });
        const variants: WanPipelineOptions[] = level === 3 ? [{ cpSize: 2 }, { cpSize: 3 }, { cpSize: 2, residentBlocks: 1 }] : [{ cpSize: 2 }, { cpSize: 2, config: { 'infer.diffusion.cp_shard_weights': false } }];
        for (const v of variants) {
          const r = await gen(model, { lowMemLevel: level, ...v });
          const what = `level ${level} ${JSON.stringify(v)}`;
          expect(maxAbsDiff(r.latents.data, base.latents.data), `${what} latents`).toBeLessThanOrEqual(1e-5);
          expect(maxAbsDiff(r.video, base.video), `${what} video`).toBeLessThanOrEqual(1e-5);
          expect(r.memory.devices!.length).toBe(v.cpSize);
          const streamed = level === 3 || !v.config;
          // rank 0's ring is the pipeline's streamed blocks: its uploads are reported, and every device's
          if (streamed) {
            expect(r.uploads, what).toBeDefined();
            for (const d of r.memory.devices!) expect(d.uploaded_bytes, what).toBeGreaterThan(0);
          } else {
            expect(r.uploads, what).toBeUndefined();
            for (const d of r.memory.devices!) expect(d.uploaded_bytes, what).toBeUndefined();
          }
        }
      }
    });
  }

  it('what still does not combine is refused with one line', () => {
    expect(cpUnsupported({ cpSize: 2, ditStreamed: true, twoExperts: false, activationOffload: false })).toBeNull();
    expect(cpUnsupported({ cpSize: 2, ditStreamed: true, twoExperts: false, activationOffload: false, diskStreamed: true })).toMatch(/^infer.diffusion.cp_size=2 does not run with the DiT blocks read from disk \(infer.weights_source=disk\) yet .*use infer.weights_source=memory/);
    expect(cpUnsupported({ cpSize: 1, cfgParallel: true, ditStreamed: true, twoExperts: false, activationOffload: false })).toMatch(/^infer.diffusion.cfg_parallel=true does not run with the DiT streamed/);
  });

  describe('the memory planner knows cp_size: per-device peaks within 1 % of a real run', () => {
    // (whole-frame decode: a tiled one spreads its tiles over the devices, and the run's
    // memory.devices then holds each device's peak over denoise and decode; the plan's entries are
    // the denoise peaks)
    for (const opts of [
      { lowMemLevel: 2, cpSize: 2, vaeTiling: false },
      { lowMemLevel: 3, cpSize: 3, vaeTiling: false },
      { lowMemLevel: 1, cpSize: 2, vaeTiling: false, config: { 'infer.attn_chunk_tokens': 32, 'infer.ffn_chunk_tokens': 32 } },
      // a tiled decode spread over the devices: each further device's entry is the larger of its
      // denoise and decode peaks (its head weights and its tiles), planned as the run does it
      { lowMemLevel: 2, cpSize: 2, config: { 'infer.vae_tile_size': 4 } },
      { lowMemLevel: 1, cpSize: 3, config: { 'infer.vae_tile_size': 4 } },
    ] as WanPipelineOptions[]) {
      it(JSON.stringify(opts), async () => {
        const model = TINY;
        // (as test/plan.test.ts measures: no matmul workspace or cached buffers left by earlier tests)
        releaseMatmulWorkspace(engines[0]!);
        engines[0]!.allocator.emptyCache();
        const pipe = await WanPipeline.fromPretrained(model, { engine: engines[0]!, promptCache: false, ...opts, defaults: { height: 128, width: 128, numFrames: 9 } });
        let real: GenerateResult;
        const prompt = 'a red circle moving right';
        try {
          real = await pipe.generate({ prompt, negativePrompt: 'blurry', seed: 7 });
        } finally {
          pipe.dispose();
        }
        const settings = { ...pipe.settings, request: { ...pipe.settings.request, prompt, negativePrompt: 'blurry' } };
        const shapes = await shapesFromFolder(model);
        const tok = await loadTokenizer(shapes.tokenizerDir!);
        const n = (t: string) => encodePrompt(tok, t, settings.load.textLen).length;
        const e = engines[0]!;
        const plan = await planRun(shapes, settings, { device: specFromCaps(e.caps, e.limits), promptTokens: [n(prompt), n('blurry')] });
        expect(plan.devices!.length).toBe(opts.cpSize);
        real.memory.devices!.forEach((d, k) => {
          const p = plan.devices![k]!;
          expect(Math.abs(p.peakBytes / d.peak_allocated_bytes - 1), `device ${k} allocated: planned ${p.peakBytes}, measured ${d.peak_allocated_bytes}`).toBeLessThanOrEqual(0.01);
          expect(Math.abs(p.peakReservedBytes / d.peak_reserved_bytes - 1), `device ${k} reserved: planned ${p.peakReservedBytes}, measured ${d.peak_reserved_bytes}`).toBeLessThanOrEqual(0.01);
        });
      });
    }
  });
});
