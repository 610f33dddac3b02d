// The residency manager (src/pipeline/residency.ts) with more blocks than slots: a chain of linear
// blocks run streamed (acquire i, prefetch i+1, run, release) over several passes must give exactly
// what the same blocks give resident, through both upload paths (staging ring, writeBuffer), and
// the slots are reused: no GPU allocation per block. Partial residency (blocks 0..k-1 kept on the
// GPU) on a small random Wan DiT gives the same output for every k, uploads only the streamed
// blocks and holds exactly k more block images; the meta mode (the memory planner's) makes the
// same device allocations as the real one.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { Engine } from '../src/runtime/engine.ts';
import { Linear } from '../src/nn/layers.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import { dtypeSize } from '../src/tensor/dtype.ts';
import { Rng } from '../src/util/rng.ts';
import { StreamedBlocks, blockImageLayout } from '../src/pipeline/residency.ts';
import { RESIDENT, type BlockResidency } from '../src/nn/residency.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../src/models/wan_dit/model.ts';
import { parseTransformerConfig } from '../src/io/model-folder.ts';
import { randomizeModule, WAN_1_3B_TRANSFORMER } from '../src/tools/random-model.ts';

let e: Engine;
beforeAll(async () => {
  e = await Engine.create();
});
afterAll(() => e?.destroy());

const D = 67; // odd: images are padded to the storage alignment
const N_BLOCKS = 5;

function makeBlocks(seed: number): Linear[] {
  const rng = new Rng(seed);
  return Array.from({ length: N_BLOCKS }, () => {
    const l = new Linear(D, D);
    const w = rng.fillNormal(new Float32Array(D * D), 1 / Math.sqrt(D));
    l.weight.value = Tensor.fromValues(w, [D, D], 'bf16');
    l.bias!.value = Tensor.cpu(rng.fillNormal(new Float32Array(D), 0.1), [D], 'f32');
    return l;
  });
}

async function runChain(blocks: Linear[], x0: Float32Array, passes: number, res: StreamedBlocks | null): Promise<Float32Array[]> {
  const outs: Float32Array[] = [];
  for (let p = 0; p < passes; p++) {
    let x = e.fromHost(x0, [3, D], 'f32');
    if (res) await res.acquire(0);
    for (let i = 0; i < blocks.length; i++) {
      if (res && i + 1 < blocks.length) res.prefetch(i + 1);
      const y = blocks[i]!.forward(x, 'gelu');
      x.dispose();
      x = y;
      res?.release(i);
      if (res && i + 1 < blocks.length) await res.acquire(i + 1);
    }
    outs.push((await x.toArray()) as Float32Array);
    x.dispose();
  }
  return outs;
}

describe('StreamedBlocks', () => {
  for (const path of ['staging', 'writeBuffer'] as const) {
    it(`${N_BLOCKS} blocks through 2 slots (${path}): same output as resident, slots reused`, async () => {
      const x0 = new Rng(9).fillNormal(new Float32Array(3 * D));
      // resident reference
      const ref = makeBlocks(4);
      for (const b of ref) for (const [, p] of b.namedParams()) p.value = p.value!.toGpu(e);
      const want = await runChain(ref, x0, 1, null);
      for (const b of ref) for (const [, p] of b.namedParams()) p.value!.dispose();

      const blocks = makeBlocks(4);
      const res = new StreamedBlocks(e, blocks, 'test.slot', { ownerOf: (i) => `test.blocks.${i}` });
      res.uploadPath = path;
      const before = e.allocator.stats();
      const got = await runChain(blocks, x0, 3, res);
      for (const g of got) expect(Array.from(g)).toEqual(Array.from(want[0]!));
      expect(res.stats.uploads).toBe(3 * N_BLOCKS); // every pass re-streams every block (5 > 2 slots)
      expect(res.stats.prefetched).toBe(3 * (N_BLOCKS - 1));
      expect(res.stats.bytes).toBe(3 * N_BLOCKS * res.slotSize);
      // the two slots were allocated by the constructor; streaming allocates no weight memory
      const after = e.allocator.stats();
      expect(after.reserved).toBeLessThanOrEqual(before.reserved + 1024 * 1024);
      res.dispose();
      // host params are back
      for (const b of blocks) expect(b.weight.t.device).toBe('cpu');
    });
  }

  it('releaseDevice frees the slots and keeps the host images; the next acquire brings the ring back (same output, no re-pack)', async () => {
    const x0 = new Rng(9).fillNormal(new Float32Array(3 * D));
    const blocks = makeBlocks(4);
    const res = new StreamedBlocks(e, blocks, 'test.slot');
    const images = () => blocks.map((b) => (b.weight.t.data as Uint16Array).buffer);
    const packed = images();
    const out1 = await runChain(blocks, x0, 1, res);
    const live = () => e.allocator.liveBlockList().filter((b) => b.owner.startsWith('test.')).length;
    expect(live()).toBe(2);
    res.releaseDevice();
    expect(res.onDevice).toBe(false);
    expect(live()).toBe(0);
    for (const b of blocks) expect(b.weight.t.device).toBe('cpu');
    res.resetStats();
    const out2 = await runChain(blocks, x0, 1, res);
    expect(res.onDevice).toBe(true);
    expect(live()).toBe(2);
    expect(res.stats.uploads).toBe(N_BLOCKS);
    expect(Array.from(out2[0]!)).toEqual(Array.from(out1[0]!));
    res.releaseDevice();
    const again = images();
    for (let i = 0; i < blocks.length; i++) expect(again[i]).toBe(packed[i]);
    res.dispose();
  });

  it('a second ring over the same blocks (the next generate at level 3) lets the first ring\'s host images go', async () => {
    const x0 = new Rng(9).fillNormal(new Float32Array(3 * D));
    const blocks = makeBlocks(4);
    const buffers = () => blocks.map((b) => (b.weight.t.data as Uint16Array).buffer);
    const r1 = new StreamedBlocks(e, blocks, 'test.slot');
    const first = buffers();
    const out1 = await runChain(blocks, x0, 1, r1);
    r1.dispose();
    const r2 = new StreamedBlocks(e, blocks, 'test.slot');
    const out2 = await runChain(blocks, x0, 1, r2);
    r2.dispose();
    expect(Array.from(out2[0]!)).toEqual(Array.from(out1[0]!));
    // after the second ring the params view its images, not the first ring's (which nothing may hold:
    // a stale reference kept a second 2.6 GiB copy of the 1.3B DiT alive per generate)
    const second = buffers();
    for (let i = 0; i < blocks.length; i++) expect(second[i]).not.toBe(first[i]);
    for (const b of blocks) for (const [, p] of b.namedParams()) expect(p.streamHost).toBeNull();
  });

  it('the staging ring is allocator-owned: counted as staging (not device memory) under the ring\'s owner, freed by releaseDevice and dispose', async () => {
    const x0 = new Rng(9).fillNormal(new Float32Array(3 * D));
    const blocks = makeBlocks(4);
    const a = e.allocator;
    const base = a.memoryStaging();
    const ours = () => a.liveStagingList().filter((b) => b.owner.startsWith('test.ring.'));
    const res = new StreamedBlocks(e, blocks, 'test.ring');
    expect(ours().map((b) => b.owner)).toEqual(['test.ring.staging.0', 'test.ring.staging.1']);
    expect(a.memoryStaging() - base).toBe(2 * res.slotSize);
    // the device memory is the two slots alone
    expect(a.liveBlockList().filter((b) => b.owner.startsWith('test.ring.')).reduce((n, b) => n + b.requested, 0)).toBe(2 * res.slotSize);
    await runChain(blocks, x0, 1, res);
    expect(a.memoryStaging() - base).toBe(2 * res.slotSize);
    res.releaseDevice();
    expect(ours()).toEqual([]);
    expect(a.memoryStaging()).toBe(base);
    await runChain(blocks, x0, 1, res); // the ring comes back with the slots
    expect(a.memoryStaging() - base).toBe(2 * res.slotSize);
    res.dispose();
    expect(a.memoryStaging()).toBe(base);
    for (const b of blocks) for (const [, p] of b.namedParams()) {
      expect(p.streamHost).toBeNull();
      expect(p.t.device).toBe('cpu');
    }
  });

  it('meta mode (fake data: no host image, no bytes moved) allocates exactly what the real mode does, in the same order, with the same param views', async () => {
    const a = e.allocator;
    // an acquire/prefetch/release sequence as the models drive it, two passes, then a release of
    // the device side and a pass that brings it back; what the params view after each acquire is logged
    async function drive(res: StreamedBlocks, blocks: Linear[], log: string[]): Promise<void> {
      const seen = (i: number) => {
        for (const [k, p] of blocks[i]!.namedParams()) log.push(`${i}.${k} ${p.t.device} ${p.t.dtype} [${p.t.shape}] @${p.t.byteOffset} in ${p.t.storage?.block?.owner}`);
      };
      for (let pass = 0; pass < 3; pass++) {
        await res.acquire(0);
        seen(0);
        for (let i = 0; i < N_BLOCKS; i++) {
          if (i + 1 < N_BLOCKS) res.prefetch(i + 1);
          res.release(i);
          if (i + 1 < N_BLOCKS) {
            await res.acquire(i + 1);
            seen(i + 1);
          }
        }
        if (pass === 1) res.releaseDevice();
      }
    }
    const metaBlocks = (): Linear[] =>
      makeBlocks(4).map((b) => {
        for (const [, p] of b.namedParams()) p.value = Tensor.meta(p.t.shape, p.t.dtype);
        return b;
      });
    for (const resident of [0, 2, N_BLOCKS]) {
      const runs = [];
      for (const meta of [false, true]) {
        const blocks = meta ? metaBlocks() : makeBlocks(4);
        a.emptyCache(); // no cached buffer from earlier tests: both modes start from the same pool
        a.startRecording();
        const res = new StreamedBlocks(e, blocks, 'test.meta.slot', { resident, meta, ownerOf: (i) => `test.meta.${i}` });
        const staging = a.liveStagingList().filter((b) => b.owner.startsWith('test.meta.')).map((b) => `${b.owner} ${b.size}`);
        const log: string[] = [];
        await drive(res, blocks, log);
        const stats = { ...res.stats };
        const layout = { slot: res.slotSize, host: res.hostBytes, blocks: blocks.map((_, i) => res.blockBytes(i)) };
        res.dispose();
        const events = a.stopRecording().map((ev) => `${ev.action} ${ev.bytes} ${ev.owner}`);
        if (meta) for (const b of blocks) for (const [, p] of b.namedParams()) expect(p.t.isMeta).toBe(true);
        runs.push({ events, staging, log, stats, layout });
      }
      const [real, meta] = runs as [(typeof runs)[0], (typeof runs)[0]];
      expect(real.events.length).toBeGreaterThan(0);
      expect(meta.events).toEqual(real.events);
      expect(meta.staging).toEqual(real.staging);
      expect(meta.log).toEqual(real.log);
      expect(meta.layout).toEqual(real.layout);
      expect({ ...meta.stats, uploadMs: 0, stallMs: 0, exposedMs: 0 }).toEqual({ ...real.stats, uploadMs: 0, stallMs: 0, exposedMs: 0 });
      expect(meta.stats.uploadMs).toBe(0); // no bytes were copied
    }
  });

  it('a real StreamedBlocks refuses meta placeholders; resident is clamped to [0, blocks]', () => {
    const blocks = makeBlocks(4);
    blocks[2]!.weight.value = Tensor.meta([D, D], 'bf16');
    expect(() => new StreamedBlocks(e, blocks, 'test.slot', { allocateNow: false })).toThrow(/meta placeholder/);
    for (const [asked, got] of [[99, N_BLOCKS], [-3, 0]] as const) {
      const res = new StreamedBlocks(e, makeBlocks(4), 'test.slot', { allocateNow: false, resident: asked });
      expect(res.resident).toBe(got);
      res.dispose();
    }
  });
});

// A small Wan DiT (5 blocks: more than the 2 slots) with random bf16 weights; the blocks' weights in
// host memory as level 3 loads them, the rest on the GPU.
const N_DIT = 5;
const SMALL_DIT = { ...WAN_1_3B_TRANSFORMER, num_layers: N_DIT, num_attention_heads: 2, attention_head_dim: 16, ffn_dim: 64, freq_dim: 32, in_channels: 4, out_channels: 4, text_dim: 24, rope_max_seq_len: 64 };

function smallDit(streamBlocks: boolean): WanTransformer3DModel {
  const dit = new WanTransformer3DModel(ditDimsFromConfig(parseTransformerConfig(SMALL_DIT)));
  randomizeModule(dit, 21, null, 'bf16');
  for (const [k, p] of dit.namedParams()) if (!(streamBlocks && dit.isBlockKey(k))) p.value = e.keep(p.t.toGpu(e, `tdit.${k}`));
  return dit;
}

async function ditForward(dit: WanTransformer3DModel, residency: BlockResidency): Promise<Float32Array> {
  const rng = new Rng(5);
  // B = 2: the conditional and unconditional passes of CFG, batched as the pipeline runs them
  const x = e.fromHost(rng.fillNormal(new Float32Array(2 * 4 * 2 * 8 * 8)), [2, 4, 2, 8, 8], 'f32');
  const ctxEmb = e.keep(e.scope(() => dit.embedText(e.fromHost(rng.fillNormal(new Float32Array(2 * 6 * 24)), [2, 6, 24], 'f32'))));
  const out = await dit.forward(x, 500, ctxEmb, { residency });
  const v = (await out.toArray()) as Float32Array;
  for (const t of [x, ctxEmb, out]) t.dispose();
  return v;
}

describe('StreamedBlocks: partial residency on a Wan DiT', () => {
  const ownerOf = (i: number) => `tdit.blocks.${i}`;
  const ours = () => e.allocator.liveBlockList().filter((b) => b.owner.startsWith('tdit.blocks.')).map((b) => b.owner).sort();
  let want: Float32Array;
  let dit: WanTransformer3DModel;
  let blockBytes: number;
  beforeAll(async () => {
    const ref = smallDit(false);
    want = await ditForward(ref, RESIDENT);
    ref.disposeParams();
    dit = smallDit(true);
    // one block's image, from the layout of its params' shapes and dtypes
    const params = dit.blocks.at(0).namedParams().map(([, p]) => ({ nbytes: p.shape.reduce((a, b) => a * b, 1) * dtypeSize(p.t.dtype) }));
    blockBytes = blockImageLayout(params, Math.max(e.caps.storageAlign, 256)).size;
  });

  it(`resident = 0, 1, 2, n-1, n blocks: bit-identical to RESIDENT; only streamed blocks upload; the peak grows by exactly the resident images`, async () => {
    let peak0 = 0;
    const weights0 = 2 * blockBytes; // the two slots
    for (const resident of [0, 1, 2, N_DIT - 1, N_DIT]) {
      const res = new StreamedBlocks(e, dit.blocks.items, 'tdit.blocks.slot', { resident, ownerOf });
      for (let i = 0; i < N_DIT; i++) expect(res.blockBytes(i)).toBe(blockBytes);
      const slots = Math.min(2, N_DIT - resident);
      // the resident blocks' buffers and the slots, nothing else
      expect(ours()).toEqual([...Array.from({ length: resident }, (_, i) => ownerOf(i)), ...Array.from({ length: slots }, (_, s) => `tdit.blocks.slot.${s}`)].sort());
      const first = await ditForward(dit, res);
      expect(res.stats.uploads).toBe(N_DIT); // each resident block once, each streamed block once
      res.resetStats();
      e.allocator.resetPeakMemoryStats();
      const second = await ditForward(dit, res);
      const peak = e.allocator.maxMemoryAllocated();
      expect(Array.from(first)).toEqual(Array.from(want));
      expect(Array.from(second)).toEqual(Array.from(want));
      // a step re-uploads the streamed blocks, except those still in their slot from the step before:
      // with m streamed blocks through 2 slots in ring order, streamed block k (< 2) stays when it was
      // the last in its slot (k >= m - 2): all of them for m <= 2, one of 3, none of 4 or more
      const streamed = N_DIT - resident;
      const kept = Math.min(streamed, Math.max(0, 2 * 2 - streamed));
      expect(res.stats.uploads).toBe(streamed - kept);
      // every streamed upload overlaps the previous block's compute (the first streamed block's behind
      // the last resident one's), except block 0's when no block is resident
      expect(res.stats.prefetched).toBe(res.stats.uploads - (resident === 0 ? 1 : 0));
      expect(res.stats.bytes).toBe(res.stats.uploads * blockBytes);
      const weights = resident * blockBytes + slots * blockBytes;
      if (resident === 0) peak0 = peak;
      expect(peak - peak0).toBe(weights - weights0);
      if (streamed >= 2) expect(peak - peak0).toBe(resident * blockBytes);
      if (resident === N_DIT) expect(e.allocator.liveStagingList().filter((b) => b.owner.startsWith('tdit.'))).toEqual([]); // no slots, so no staging once uploaded
      res.dispose();
      expect(ours()).toEqual([]);
    }
  });

  it('releaseDevice frees the resident blocks too; the next forward re-uploads them and gives the same output', async () => {
    const res = new StreamedBlocks(e, dit.blocks.items, 'tdit.blocks.slot', { resident: 2, ownerOf });
    expect(Array.from(await ditForward(dit, res))).toEqual(Array.from(want));
    res.releaseDevice();
    expect(res.onDevice).toBe(false);
    expect(ours()).toEqual([]);
    for (const b of dit.blocks.items) for (const [, p] of b.namedParams()) expect(p.t.device).toBe('cpu');
    res.resetStats();
    expect(Array.from(await ditForward(dit, res))).toEqual(Array.from(want));
    expect(res.stats.uploads).toBe(N_DIT); // 2 resident again + 3 streamed
    expect(ours()).toEqual(['tdit.blocks.0', 'tdit.blocks.1', 'tdit.blocks.3', 'tdit.blocks.4']); // resident + the slots, tagged by their last occupants
    res.dispose();
  });
});


describe('StreamedBlocks groups (Wan 2.2: two experts share one ring)', () => {
  /** a chain through a group's view of the ring */
  async function runGroup(blocks: Linear[], x0: Float32Array, res: BlockResidency): Promise<Float32Array> {
    let x = e.fromHost(x0, [3, D], 'f32');
    await res.acquire(0);
    for (let i = 0; i < blocks.length; i++) {
      res.prefetch(i + 1);
      const y = blocks[i]!.forward(x, 'gelu');
      x.dispose();
      x = y;
      res.release(i);
      if (i + 1 < blocks.length) await res.acquire(i + 1);
    }
    const out = (await x.toArray()) as Float32Array;
    x.dispose();
    return out;
  }

  for (const resident of [0, 2]) {
    it(`two groups over one ring (${resident} resident per group): each gives its blocks' result, switching frees the resident buffers first, the slots stay`, async () => {
      const a = makeBlocks(11);
      const b = makeBlocks(12);
      const x0 = new Rng(3).fillNormal(new Float32Array(3 * D));
      // references: each chain resident
      const refOf = async (blocks: Linear[]) => {
        const gpu = blocks.map((l) => [l.weight.t, l.bias!.t]);
        for (const l of blocks) {
          l.weight.value = l.weight.t.toGpu(e);
          l.bias!.value = l.bias!.t.toGpu(e);
        }
        const out = (await runChain(blocks, x0, 1, null))[0]!;
        blocks.forEach((l, i) => {
          l.weight.value!.dispose();
          l.bias!.value!.dispose();
          [l.weight.value, l.bias!.value] = gpu[i]!;
        });
        return out;
      };
      const refA = await refOf(a);
      const refB = await refOf(b);
      const ring = new StreamedBlocks(e, [...a, ...b], 'test.slot', { groups: [N_BLOCKS, N_BLOCKS], resident });
      try {
        const slotBytes = ring.slotSize;
        const live = () => e.allocator.liveBlockList().filter((x) => x.owner.startsWith('test.')).length;
        const afterAlloc = live();
        expect(afterAlloc).toBe(2 + resident); // two slots + this group's resident buffers
        expect(await runGroup(a, x0, ring.group(0))).toEqual(refA);
        // group 1's view refuses to run while group 0 is active
        await expect(ring.group(1).acquire(0)).rejects.toThrow(/group 1 is not active/);
        ring.setGroup(1);
        // group 0's params are back on their host images; still two slots plus group 1's resident buffers
        expect(a.every((l) => l.weight.t.device === 'cpu')).toBe(true);
        expect(live()).toBe(2 + resident);
        expect(ring.slotSize).toBe(slotBytes);
        expect(await runGroup(b, x0, ring.group(1))).toEqual(refB);
        ring.setGroup(0);
        expect(await runGroup(a, x0, ring.group(0))).toEqual(refA);
        // both groups' images, each once
        const img = blockImageLayout(a[0]!.namedParams().map(([, p]) => p.t), Math.max(e.caps.storageAlign, 256)).size;
        expect(ring.hostBytes).toBe(2 * N_BLOCKS * img);
      } finally {
        ring.dispose();
      }
    });
  }

  it('groups must add up to the blocks', () => {
    expect(() => new StreamedBlocks(e, makeBlocks(1), 'test.slot', { groups: [2, 2], allocateNow: false })).toThrow(/do not add up to the 5 blocks/);
  });
});
