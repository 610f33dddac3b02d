// Context parallelism's memory rules (docs/context-parallel.md, "The per-device memory target"):
// - at level >= 2 with cp_size > 1 the VAE's weights come to the GPU for the decode only, and the
//   decode takes level 3's lean whole-frame stem (memoryPlan, decodeSplitFor);
// - the auto activation chunks follow the tokens one device holds (ditRunOptions);
// - a consumed all-to-all (HostExchange.exchange { consume }) lets the sources go before the
//   destinations are made: the same bytes land, with a lower peak on the sources' devices.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { settingsForModel } from '../src/config/settings.ts';
import type { WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { memoryPlan, ditRunOptions, decodeSplitFor, LEVEL3_DECODE_BYTES } from '../src/pipeline/memory-plan.ts';
import { leanStemStages } from '../src/pipeline/tiled-vae.ts';
import { autoAttnChunkTokens, autoFfnChunkTokens } from '../src/models/wan_dit/model.ts';
import { WanVaeDecoder, vaeDimsFromConfig } from '../src/models/wan_vae/model.ts';
import { PRESETS } from '../src/plan/shapes.ts';
import { fullestDevice } from '../src/plan/budget.ts';
import type { RunPlan } from '../src/plan/plan.ts';
import { Engine } from '../src/runtime/engine.ts';
import { Rng } from '../src/util/rng.ts';
import { HostExchange, splitRanges, rowsToHeadsShuffle, sliceRows, rowsToHeads, type A2aGeometry } from '../src/parallel/exchange.ts';

const plan = (o: WanPipelineOptions) => memoryPlan(settingsForModel('wan2.1-t2v-1.3b', o).load);

describe('memory rules with cp_size > 1', () => {
  it('the VAE is on the GPU for the decode only at level >= 2 with cp_size > 1 (auto), resident otherwise; the setting wins', () => {
    expect(plan({ lowMemLevel: 2 }).vae).toBe('resident');
    expect(plan({ lowMemLevel: 2, cpSize: 2 }).vae).toBe('on-demand');
    expect(plan({ lowMemLevel: 2, cpSize: 3 }).vae).toBe('on-demand');
    expect(plan({ lowMemLevel: 1, cpSize: 2 }).vae).toBe('resident');
    expect(plan({ lowMemLevel: 3 }).vae).toBe('on-demand');
    expect(plan({ lowMemLevel: 2, cpSize: 2, offloadVae: false }).vae).toBe('resident');
    // cfg_parallel's devices each run the one-device forward: not context parallel
    const cfgp = plan({ lowMemLevel: 2, config: { 'infer.diffusion.cfg_parallel': true } });
    expect(cfgp.cpSize).toBe(1);
    expect(cfgp.vae).toBe('resident');
    expect(plan({ lowMemLevel: 2, cpSize: 2 }).cpSize).toBe(2);
  });

  it('the decode takes the lean whole-frame stem at level 2 with cp_size > 1 (1.3B VAE, 480p and a small size)', () => {
    const vae = new WanVaeDecoder(vaeDimsFromConfig(PRESETS['wan2.1-t2v-1.3b']!().vae));
    // 480p latents: the default stem (5 stages) needs more than the bound, so fewer stages and the bound for the tiles
    const lean = leanStemStages(vae, 60, 104, LEVEL3_DECODE_BYTES);
    expect(lean).toBeLessThan(5);
    expect(decodeSplitFor(plan({ lowMemLevel: 2 }), vae, 60, 104)).toEqual({ stemStages: undefined });
    expect(decodeSplitFor(plan({ lowMemLevel: 2, cpSize: 2 }), vae, 60, 104)).toEqual({ stemStages: lean, tileBytes: LEVEL3_DECODE_BYTES });
    expect(decodeSplitFor(plan({ lowMemLevel: 3 }), vae, 60, 104)).toEqual(decodeSplitFor(plan({ lowMemLevel: 2, cpSize: 2 }), vae, 60, 104));
    expect(decodeSplitFor(plan({ lowMemLevel: 1, cpSize: 2 }), vae, 60, 104)).toEqual({ stemStages: undefined });
    // a small video: the default stem fits the bound, so the decoder's defaults stay
    expect(decodeSplitFor(plan({ lowMemLevel: 2, cpSize: 2 }), vae, 16, 16)).toEqual({ stemStages: undefined });
    // an explicit stem wins
    expect(decodeSplitFor(plan({ lowMemLevel: 2, cpSize: 2, config: { 'infer.vae_stem_stages': 4 } }), vae, 60, 104).stemStages).toBe(4);
  });

  it('infer.vram_budget is per device: a plan is judged by its fullest device', () => {
    const dev = (peakBytes: number, peakReservedBytes: number) => ({ adapter: 'x', peakBytes, peakReservedBytes, streamBytesPerStep: 0 });
    const p = (devices?: ReturnType<typeof dev>[]) => ({ peakBytes: 100, peakReservedBytes: 150, devices }) as unknown as RunPlan;
    expect(fullestDevice(p())).toEqual({ peakBytes: 100, peakReservedBytes: 150 });
    // (devices[0] is rank 0's denoise: its run peak is the plan's own)
    expect(fullestDevice(p([dev(90, 500), dev(80, 120)]))).toEqual({ peakBytes: 100, peakReservedBytes: 150 });
    expect(fullestDevice(p([dev(90, 100), dev(130, 140), dev(80, 170)]))).toEqual({ peakBytes: 130, peakReservedBytes: 170 });
  });

  it('the auto chunks follow the tokens one device holds; explicit chunks stay', () => {
    const dims = { numHeads: 12, headDim: 128, ffnDim: 8960 };
    const L = 32760;
    const one = ditRunOptions(plan({ lowMemLevel: 2 }), dims, L);
    expect(one).toEqual({ cfgSequential: true, ffnChunkTokens: autoFfnChunkTokens(L, 1536, 8960), attnChunkTokens: autoAttnChunkTokens(L) });
    for (const N of [2, 3]) {
      const Lr = Math.ceil(L / N);
      expect(ditRunOptions(plan({ lowMemLevel: 2, cpSize: N }), dims, L)).toEqual({ cfgSequential: true, ffnChunkTokens: autoFfnChunkTokens(Lr, 1536, 8960), attnChunkTokens: autoAttnChunkTokens(Lr) });
    }
    // a device's rows at or under 8192 tokens: its attention is not chunked
    expect(ditRunOptions(plan({ lowMemLevel: 2, cpSize: 4 }), dims, L).attnChunkTokens).toBe(0);
    expect(ditRunOptions(plan({ lowMemLevel: 2, cpSize: 2, config: { 'infer.attn_chunk_tokens': 1000, 'infer.ffn_chunk_tokens': 500 } }), dims, L)).toEqual({ cfgSequential: true, ffnChunkTokens: 500, attnChunkTokens: 1000 });
  });
});

describe('HostExchange: a consumed all-to-all', () => {
  const engines: Engine[] = [];
  beforeAll(async () => {
    for (let i = 0; i < 3; i++) engines.push(await Engine.create());
  });
  afterAll(() => {
    for (const e of engines) e.destroy();
  });

  for (const [N, B, L, H, Dh] of [
    [2, 2, 37, 4, 8],
    [3, 1, 29, 3, 4],
    [3, 2, 31, 2, 4], // rank 2 holds rows and no heads
  ] as const) {
    it(`N=${N} B=${B} L=${L} H=${H}: the same heads land, the sources are disposed, each source device's peak no higher (the mapped path) and lower when its heads are a large part`, async () => {
      const g: A2aGeometry = { B, rows: splitRanges(L, N), heads: splitRanges(H, N), Dh, elemBytes: 4 };
      const full = new Uint8Array(new Rng(3).fillNormal(new Float32Array(B * L * H * Dh)).buffer);
      const host = g.rows.map(([r0, r1]) => sliceRows(full, B, L, r0, r1, H * Dh * 4));
      const want = rowsToHeads(host, g);
      const shapes = g.heads.map(([a, b]) => (b > a ? [B, L, b - a, Dh] : null));
      const run = async (consume: boolean) => {
        const es = engines.slice(0, N);
        const ex = new HostExchange(es);
        const src = g.rows.map(([r0, r1], r) => es[r]!.fromHost(host[r]!, [B, r1 - r0, H, Dh], 'f32', 'test'));
        for (const e of es) e.allocator.resetPeakMemoryStats();
        const base = es.map((e) => e.allocator.memoryAllocated());
        const out = await ex.exchange(src, rowsToHeadsShuffle(g), shapes, 'f32', 'test', { consume });
        const peaks = es.map((e, r) => e.allocator.maxMemoryAllocated() - base[r]!);
        const bytes = await Promise.all(out.map(async (t, s) => (t ? Array.from(await es[s]!.read(t)) : [])));
        expect(src.every((t) => t.isDisposed)).toBe(consume);
        for (const t of [...out, ...(consume ? [] : src)]) t?.dispose();
        ex.releaseStaging();
        return { bytes, peaks, mapped: ex.stats.mapped };
      };
      const kept = await run(false);
      const eaten = await run(true);
      expect(eaten.mapped).toBe(1);
      eaten.bytes.forEach((b, s) => expect(b, `heads of rank ${s}`).toEqual(Array.from(want[s]!)));
      expect(eaten.bytes).toEqual(kept.bytes);
      eaten.peaks.forEach((p, r) => expect(p, `rank ${r}`).toBeLessThanOrEqual(kept.peaks[r]!));
      // (rank 0 holds heads: with consume its source is gone before its heads are made)
      expect(eaten.peaks[0]!).toBeLessThan(kept.peaks[0]!);
    });
  }

  it('the copy path consumes too', async () => {
    const N = 2;
    const g: A2aGeometry = { B: 1, rows: splitRanges(9, N), heads: splitRanges(2, N), Dh: 4, elemBytes: 4 };
    const ex = new HostExchange(engines.slice(0, N), { path: 'copy' });
    const src = g.rows.map(([r0, r1], r) => engines[r]!.fromHost(new Float32Array((r1 - r0) * 8).fill(r + 1), [1, r1 - r0, 2, 4], 'f32', 'test'));
    const out = await ex.exchange(src, rowsToHeadsShuffle(g), g.heads.map(([a, b]) => [1, 9, b - a, 4]), 'f32', 'test', { consume: true });
    expect(src.every((t) => t.isDisposed)).toBe(true);
    expect(ex.stats.mapped).toBe(0);
    for (const t of out) t?.dispose();
  });
});
