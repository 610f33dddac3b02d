// Context parallelism (src/parallel/): the host all-to-all against a plain per-element reference,
// and the sequence-parallel DiT forward over N = 2 and 3 WebGPU devices (several devices on the one
// adapter) against the one-device WanTransformer3DModel.forward: small random Wan DiTs whose head
// count divides N and does not (H = 2, 3; H = 2 with N = 3 leaves rank 2 without heads), token
// counts that are no multiple of N, B = 2 (CFG), and the tiny golden model; max |diff| <= 1e-5, and
// the bytes moved through the host equal the formula.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { Engine } from '../src/runtime/engine.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../src/models/wan_dit/model.ts';
import { openModelFolder } from '../src/io/model-folder.ts';
import { Rng } from '../src/util/rng.ts';
import { loadModule } from '../src/nn/load.ts';
import { ContextParallelDit, cpForwardBytes } from '../src/parallel/cp-dit.ts';
import { splitRanges, rowsToHeads, headsToRows, gatherRows, sliceRows } from '../src/parallel/exchange.ts';
import { TINY } from './helpers/golden.ts';
import { randomCpDit, cpInputs, oneDeviceForward, cpForward, maxAbsDiff, type CpCase } from './helpers/cp.ts';
import { tinyModelWithTokenizer } from './helpers/models.ts';
import { WanPipeline, type GenerateResult, type WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { resolveCpAdapters, reachableAdapters } from '../src/parallel/pipeline-cp.ts';
import { listAdapters, type AdapterEntry } from '../src/device/gpu.ts';

describe('host all-to-all (src/parallel/exchange.ts)', () => {
  it('splitRanges covers n in contiguous runs, the first n % parts one longer', () => {
    expect(splitRanges(7, 3)).toEqual([[0, 3], [3, 5], [5, 7]]);
    expect(splitRanges(2, 3)).toEqual([[0, 1], [1, 2], [2, 2]]);
    expect(splitRanges(6, 1)).toEqual([[0, 6]]);
  });

  it('rowsToHeads / headsToRows match a per-element reference and invert each other (uneven rows and heads)', () => {
    const rng = new Rng(3);
    for (const [B, L, H, Dh, N, es] of [
      [2, 7, 3, 5, 2, 4],
      [1, 10, 2, 4, 3, 2],
      [3, 5, 5, 1, 3, 4],
    ] as const) {
      const rows = splitRanges(L, N);
      const heads = splitRanges(H, N);
      const g = { B, rows, heads, Dh, elemBytes: es };
      const full = new Uint8Array(B * L * H * Dh * es).map(() => Math.floor(rng.next() * 256));
      const parts = rows.map(([r0, r1]) => sliceRows(full, B, L, r0, r1, H * Dh * es));
      const byHead = rowsToHeads(parts, g);
      heads.forEach(([h0, h1], s) => {
        const Hs = h1 - h0;
        expect(byHead[s]!.byteLength).toBe(B * L * Hs * Dh * es);
        for (let b = 0; b < B; b++)
          for (let l = 0; l < L; l++)
            for (let hh = 0; hh < Hs; hh++)
              for (let x = 0; x < Dh * es; x++) expect(byHead[s]![((b * L + l) * Hs + hh) * Dh * es + x]).toBe(full[((b * L + l) * H + h0 + hh) * Dh * es + x]);
      });
      const back = headsToRows(byHead, g);
      back.forEach((p, r) => expect(Array.from(p)).toEqual(Array.from(parts[r]!)));
      expect(Array.from(gatherRows(parts, rows, B, H * Dh * es))).toEqual(Array.from(full));
    }
  });

  it('a rank that sends the wrong byte count is named', () => {
    const g = { B: 1, rows: splitRanges(4, 2), heads: splitRanges(2, 2), Dh: 1, elemBytes: 4 };
    expect(() => rowsToHeads([new Uint8Array(16), new Uint8Array(12)], g)).toThrow(/\[cp_exchange\] rank 1 sent 12 bytes, expected 16/);
  });
});

// ranks 0..2; rank 0's engine also runs the one-device reference
const engines: Engine[] = [];
beforeAll(async () => {
  for (let i = 0; i < 3; i++) engines.push(await Engine.create());
});
afterAll(() => {
  for (const e of engines) e.destroy();
});

const randomDit = randomCpDit;
const inputs = cpInputs;
type Case = CpCase;
const oneDevice = (m: WanTransformer3DModel, c: Case) => oneDeviceForward(engines[0]!, m, c);

const parallel = async (cp: ContextParallelDit, c: Case, ffnChunkTokens = 0) => (await cpForward(cp, c, { ffnChunkTokens })).out;

describe('ContextParallelDit: N devices equal one device', () => {
  for (const heads of [2, 3]) {
    it(`random Wan DiT with ${heads} heads, N = 1, 2, 3, L = 70 tokens: max |diff| <= 1e-5; host bytes as the formula`, async () => {
      const cfg = { num_layers: 2, num_attention_heads: heads, attention_head_dim: 16, ffn_dim: 80, freq_dim: 32, in_channels: 4, out_channels: 4, text_dim: 24, rope_max_seq_len: 64 };
      const ref = randomDit(engines[0]!, cfg);
      const c = inputs(ref, 2, 10, 14, 6); // f, h, w = 2, 5, 7: L = 70 (rows 35/35, 24/23/23)
      const want = await oneDevice(ref, c);
      for (const N of [1, 2, 3]) {
        const ranks = engines.slice(0, N).map((e, r) => ({ engine: e, dit: r === 0 ? ref : randomDit(e, cfg) }));
        const cp = new ContextParallelDit(ranks);
        const got = await parallel(cp, c);
        const d = maxAbsDiff(got, want);
        expect(d, `N=${N} heads=${heads}`).toBeLessThanOrEqual(1e-5);
        const D = heads * 16;
        const bytes = cpForwardBytes({ B: 2, L: 70, D, heads, blocks: 2, actBytes: 4, latentElems: c.x.length, tokenRow: 4 * 2 * 2, headRow: 4 * 2 * 2, ranks: N });
        expect(cp.exchange.stats.bytesDown).toBe(bytes.down);
        expect(cp.exchange.stats.bytesUp).toBe(bytes.up);
        // (a rank's own part of each exchange stays on its GPU: with N = 1 nothing but the latents and tokens crosses the host)
        expect(cp.exchange.stats.bytesLocal).toBe(bytes.local);
        const viaHost = cpForwardBytes({ B: 2, L: 70, D, heads, blocks: 2, actBytes: 4, latentElems: c.x.length, tokenRow: 4 * 2 * 2, headRow: 4 * 2 * 2, ranks: N, path: 'copy' });
        expect(bytes.down + bytes.local).toBe(viaHost.down);
        expect(bytes.up + bytes.local).toBe(viaHost.up);
        // two all-to-all of q, k, v + one back per block, and the head's gather
        expect(cp.exchange.stats.exchanges).toBe(2 * 4 + 1);
        for (const r of ranks.slice(1)) r.dit.disposeParams();
      }
      ref.disposeParams();
    });
  }

  it('FFN chunks on each rank give the same result', async () => {
    const cfg = { num_layers: 1, num_attention_heads: 3, attention_head_dim: 16, ffn_dim: 80, freq_dim: 32, in_channels: 4, out_channels: 4, text_dim: 24, rope_max_seq_len: 64 };
    const ranks = engines.slice(0, 2).map((e) => ({ engine: e, dit: randomDit(e, cfg) }));
    const c = inputs(ranks[0]!.dit, 1, 10, 14, 5); // L = 35
    const want = await oneDevice(ranks[0]!.dit, c);
    const cp = new ContextParallelDit(ranks);
    expect(maxAbsDiff(await parallel(cp, c, 16), want)).toBeLessThanOrEqual(1e-5);
    for (const r of ranks) r.dit.disposeParams();
  });

  it('the tiny golden model (2 heads of 64) at 64x64x9 latents [2, 16, 3, 8, 8], N = 2 and 3', async () => {
    const f = await openModelFolder(TINY);
    const dits: WanTransformer3DModel[] = [];
    for (const e of engines) {
      const m = new WanTransformer3DModel(ditDimsFromConfig(f.transformer.config));
      const ck = await f.transformer.open();
      try {
        await loadModule(m, ck, { engine: e, owner: 'dit' });
      } finally {
        await ck.close();
      }
      dits.push(m);
    }
    const c = inputs(dits[0]!, 3, 8, 8, 16); // L = 3·4·4 = 48
    const want = await oneDevice(dits[0]!, c);
    for (const N of [2, 3]) {
      const cp = new ContextParallelDit(engines.slice(0, N).map((e, r) => ({ engine: e, dit: dits[r]! })));
      cp.resetPeaks();
      expect(maxAbsDiff(await parallel(cp, c), want), `N=${N}`).toBeLessThanOrEqual(1e-5);
      const peaks = cp.devicePeaks();
      expect(peaks.length).toBe(N);
      for (const p of peaks) expect(p.peak_allocated_bytes).toBeGreaterThan(0);
    }
    for (const m of dits) m.disposeParams();
  });

  it('bad setups are refused with one-line errors', async () => {
    const cfg = { num_layers: 1, num_attention_heads: 2, attention_head_dim: 16, ffn_dim: 64, freq_dim: 32, in_channels: 4, out_channels: 4, text_dim: 24, rope_max_seq_len: 64 };
    const a = randomDit(engines[0]!, cfg);
    const b = randomDit(engines[1]!, { ...cfg, num_attention_heads: 3 });
    expect(() => new ContextParallelDit([{ engine: engines[0]!, dit: a }, { engine: engines[1]!, dit: b }])).toThrow(/\[cp_dit\] rank 1's DiT has other dims/);
    expect(() => new ContextParallelDit([{ engine: engines[0]!, dit: a }, { engine: engines[0]!, dit: a }])).toThrow(/its own engine/);
    const cp = new ContextParallelDit([{ engine: engines[0]!, dit: a }]);
    const x = engines[0]!.zeros([1, 4, 1, 2, 2]);
    const ctx = engines[0]!.zeros([1, 3, 32]);
    await expect(cp.forward(x, 1, [ctx, ctx])).rejects.toThrow(/embedded text on each of the 1 ranks/);
    const cp3 = new ContextParallelDit(engines.map((e) => ({ engine: e, dit: e === engines[0] ? a : randomDit(e, cfg) })));
    const ctx3 = await cp3.replicate(ctx);
    await expect(cp3.forward(x, 1, ctx3)).rejects.toThrow(/1 tokens cannot be split over cp_size=3/);
    for (const t of [x, ...ctx3]) t.dispose();
    for (const r of cp3.ranks) r.dit.disposeParams();
    b.disposeParams();
  });
});

describe('WanPipeline with infer.diffusion.cp_size', () => {
  const MODEL = tinyModelWithTokenizer();
  async function gen(opts: WanPipelineOptions, req: Record<string, unknown> = {}): Promise<GenerateResult> {
    const pipe = await WanPipeline.fromPretrained(MODEL, { engine: engines[0]!, promptCache: false, ...opts });
    try {
      return await pipe.generate({ prompt: 'a red circle moving right', negativePrompt: 'blurry', seed: 7, numInferenceSteps: 2, ...req });
    } finally {
      pipe.dispose();
    }
  }

  it('cp_size = 2 and 3 give the video and latents of cp_size = 1 (<= 1e-5); memory.devices has one entry per device', async () => {
    const base = await gen({ lowMemLevel: 2 });
    expect(base.memory.devices).toBeUndefined();
    for (const cpSize of [2, 3]) {
      const r = await gen({ lowMemLevel: 2, cpSize });
      expect(maxAbsDiff(r.latents.data, base.latents.data), `cp_size=${cpSize} latents`).toBeLessThanOrEqual(1e-5);
      expect(maxAbsDiff(r.video, base.video), `cp_size=${cpSize} video`).toBeLessThanOrEqual(1e-5);
      const devs = r.memory.devices!;
      expect(devs.length).toBe(cpSize);
      for (const d of devs) {
        expect(d.peak_allocated_bytes).toBeGreaterThan(0);
        expect(d.peak_reserved_bytes).toBeGreaterThanOrEqual(d.peak_allocated_bytes);
        expect(d.adapter).toBe(engines[0]!.adapterName);
      }
    }
  });

  it('cfg_parallel = true (cond on device 0, uncond on device 1) gives the video of one device, at levels 0 and 2', async () => {
    for (const lowMemLevel of [0, 2]) {
      const base = await gen({ lowMemLevel });
      const r = await gen({ lowMemLevel, cfgParallel: true });
      expect(maxAbsDiff(r.latents.data, base.latents.data), `level ${lowMemLevel} latents`).toBeLessThanOrEqual(1e-5);
      expect(maxAbsDiff(r.video, base.video), `level ${lowMemLevel} video`).toBeLessThanOrEqual(1e-5);
      expect(r.memory.devices!.length).toBe(2);
      for (const d of r.memory.devices!) expect(d.peak_allocated_bytes).toBeGreaterThan(0);
    }
  });

  it('what is not built yet is refused with one line naming it', async () => {
    // (level 3 with cp_size > 1 runs: test/cp-levels.test.ts)
    // (step caching runs with cp_size > 1: test/cp-compose.test.ts; not with cfg_parallel)
    await expect(gen({ cfgParallel: true }, { mode: 'flex' })).rejects.toThrow(/^infer.diffusion.cfg_parallel=true does not run with step caching \(infer.cache.mode=flex\) yet/);
    await expect(gen({ cpSize: 2, cpDevices: 'llvmpipe' })).rejects.toThrow(/^infer.diffusion.cp_devices names 1 adapter\(s\) \(llvmpipe\) but the run uses 2 devices/);
    await expect(gen({ cpSize: 2, cpDevices: '0,5' })).rejects.toThrow(/^infer.diffusion.cp_devices: adapter index 5 does not exist; this machine has \d+: 0 '/);
    await expect(gen({ cpSize: 2, cfgParallel: true })).rejects.toThrow(/^infer.diffusion.cfg_parallel=true and infer.diffusion.cp_size=2 do not combine yet/);
    await expect(gen({ lowMemLevel: 3, cfgParallel: true })).rejects.toThrow(/^infer.diffusion.cfg_parallel=true does not run with the DiT streamed .*or cfg_parallel=false$/);
  });
});

describe('cp_devices: adapter names and indices (resolveCpAdapters)', () => {
  const hw = (name: string): AdapterEntry => ({ backend: 'vulkan', name, software: false });
  const sw: AdapterEntry = { backend: 'vulkan', name: 'llvmpipe (LLVM 15.0.6, 256 bits)', software: true };
  const never = async (): Promise<AdapterEntry[]> => {
    throw new Error('listed without need');
  };
  const of = (all: AdapterEntry[]) => async () => all;

  it('names pass through; device.adapter for every device; a count that is not cp_size is refused', async () => {
    expect(await resolveCpAdapters(2, ' a, b ', 'x', never)).toEqual({ adapters: ['a', 'b'], note: null });
    expect(await resolveCpAdapters(3, '', 'x', never)).toEqual({ adapters: ['x', 'x', 'x'], note: null });
    await expect(resolveCpAdapters(3, 'a,b', '', never)).rejects.toThrow(/^infer.diffusion.cp_devices names 2 adapter\(s\) \(a, b\) but the run uses 3 devices/);
  });

  it('empty: the first N GPU adapters when N can be opened, else N devices on the default one (a note for identical GPUs)', async () => {
    expect(await resolveCpAdapters(2, '', '', of([sw]))).toEqual({ adapters: ['', ''], note: null });
    expect(await resolveCpAdapters(2, '', '', of([hw('NVIDIA RTX 4090'), sw, hw('AMD Radeon RX 7900 XTX')]))).toEqual({ adapters: ['NVIDIA RTX 4090', 'AMD Radeon RX 7900 XTX'], note: null });
    expect(await resolveCpAdapters(3, '', '', of([hw('NVIDIA RTX 4090'), hw('AMD Radeon RX 7900 XTX')]))).toEqual({ adapters: ['', '', ''], note: null });
    const same = await resolveCpAdapters(2, '', '', of([hw('NVIDIA H100 80GB HBM3'), hw('NVIDIA H100 80GB HBM3')]));
    expect(same.adapters).toEqual(['', '']);
    expect(same.note).toMatch(/^infer.diffusion.cp_devices is empty and this machine has 2 GPU adapters, but dawn.node opens adapters by name and 1 of them share a name .*'NVIDIA H100 80GB HBM3'.*all 2 devices run on the first adapter/);
  });

  it('indices map to the adapters dawn.node lists, mixed with names; unknown and unreachable indices are refused in one line', async () => {
    const two = of([hw('GPU A'), hw('GPU B')]);
    expect((await resolveCpAdapters(2, '0,1', '', two)).adapters).toEqual(['GPU A', 'GPU B']);
    expect((await resolveCpAdapters(3, '1, 1, llvmpipe', '', two)).adapters).toEqual(['GPU B', 'GPU B', 'llvmpipe']);
    await expect(resolveCpAdapters(2, '0,2', '', two)).rejects.toThrow(/^infer.diffusion.cp_devices: adapter index 2 does not exist; this machine has 2: 0 'GPU A' \(vulkan\), 1 'GPU B' \(vulkan\)$/);
    // identical names, and a name inside an earlier adapter's name: only the first can be opened
    await expect(resolveCpAdapters(2, '0,1', '', of([hw('H100'), hw('H100')]))).rejects.toThrow(/^infer.diffusion.cp_devices: adapter 1 'H100' cannot be opened: dawn.node opens adapters by name .*adapter 0 'H100' matches it first; use index 0/);
    expect(reachableAdapters([hw('GPU A2'), hw('GPU A'), hw('GPU B')])).toEqual([true, false, true]);
  });

  it('listAdapters lists what this machine has, and an index opens that adapter', async () => {
    const all = await listAdapters();
    expect(all.length).toBeGreaterThan(0);
    for (const a of all) expect(a.name.length).toBeGreaterThan(0);
    const r = await resolveCpAdapters(2, '0,0', '', () => listAdapters());
    expect(r.adapters).toEqual([all[0]!.name, all[0]!.name]);
    const e = await Engine.create({ adapter: r.adapters[0] });
    e.destroy();
  });
});
