import { describe, it, expect } from 'vitest';
import { CachingAllocator, sizeClass, type BufferFactory } from '../src/memory/allocator.ts';
import { takeSnapshot, renderSnapshotHtml } from '../src/memory/snapshot.ts';
import { OutOfMemoryError } from '../src/util/errors.ts';
import { getEngine } from './helpers/gpu.ts';

/** A fake device that counts live bytes (device and staging apart), so the allocator's figures can be checked exactly. */
function fakeFactory() {
  let live = 0;
  let created = 0;
  const staging = new Set<GPUBuffer>();
  const f: BufferFactory & { live(): number; created(): number; staging(): number } = {
    create(size) {
      live += size;
      created++;
      return { size, destroy() {} } as unknown as GPUBuffer;
    },
    createStaging(size) {
      const b = { size, destroy() {} } as unknown as GPUBuffer;
      staging.add(b);
      return b;
    },
    destroy(b) {
      if (!staging.delete(b)) live -= b.size;
    },
    live: () => live,
    created: () => created,
    staging: () => [...staging].reduce((n, b) => n + b.size, 0),
  };
  return f;
}

describe('size classes', () => {
  it('are >= the request, 256-aligned, and waste at most 1/16 above 4 KiB', () => {
    for (const n of [0, 1, 255, 256, 257, 1000, 4096, 4097, 1e5, 1234567, 5e7]) {
      const c = sizeClass(n);
      expect(c).toBeGreaterThanOrEqual(n);
      expect(c % 256).toBe(0);
      if (n > 4096) expect(c / n).toBeLessThanOrEqual(1 + 1 / 16 + 1e-9);
    }
    // exact (256-aligned) above the threshold
    expect(sizeClass(100 * 2 ** 20 + 1)).toBe(100 * 2 ** 20 + 256);
  });
});

describe('caching allocator accounting', () => {
  it('allocated counts requested bytes exactly; reserved counts buffers held', () => {
    const f = fakeFactory();
    const a = new CachingAllocator(f);
    const b1 = a.alloc(1000, 'w1');
    const b2 = a.alloc(3000, 'w2');
    expect(a.memoryAllocated()).toBe(4000);
    expect(a.memoryReserved()).toBe(sizeClass(1000) + sizeClass(3000));
    expect(a.memoryReserved()).toBe(f.live());
    a.free(b1);
    expect(a.memoryAllocated()).toBe(3000);
    expect(a.memoryReserved()).toBe(f.live()); // cached, still held
    // same class is reused without a new buffer
    const before = f.created();
    const b3 = a.alloc(999, 'w3');
    expect(f.created()).toBe(before);
    expect(b3.buffer).toBe(b1.buffer);
    expect(a.memoryAllocated()).toBe(3999);
    a.free(b2);
    a.free(b3);
    expect(a.memoryAllocated()).toBe(0);
    a.emptyCache();
    expect(a.memoryReserved()).toBe(0);
    expect(f.live()).toBe(0);
  });

  it('tracks peaks and resets them to the current values', () => {
    const a = new CachingAllocator(fakeFactory());
    const x = a.alloc(10_000);
    const y = a.alloc(20_000);
    a.free(y);
    expect(a.maxMemoryAllocated()).toBe(30_000);
    expect(a.maxMemoryReserved()).toBe(sizeClass(10_000) + sizeClass(20_000));
    a.resetPeakMemoryStats();
    expect(a.maxMemoryAllocated()).toBe(10_000);
    expect(a.maxMemoryReserved()).toBe(a.memoryReserved());
    a.emptyCache();
    a.resetPeakMemoryStats();
    expect(a.maxMemoryReserved()).toBe(sizeClass(10_000));
    a.free(x);
  });

  it('rejects double free', () => {
    const a = new CachingAllocator(fakeFactory());
    const x = a.alloc(10);
    a.free(x);
    expect(() => a.free(x)).toThrow(/double free/);
  });

  it('records every alloc/free with bytes, owner, phase and counters', () => {
    const a = new CachingAllocator(fakeFactory());
    a.startRecording();
    a.phase = 'denoise';
    const w = a.withOwner('dit.blocks.7.ffn.net.0.proj', () => a.alloc(5000));
    const act = a.alloc(700);
    a.free(act);
    a.phase = 'decode';
    a.free(w);
    a.emptyCache();
    const ev = a.stopRecording();
    expect(ev.map((e) => e.action)).toEqual(['segment_alloc', 'alloc', 'segment_alloc', 'alloc', 'free', 'free', 'segment_free', 'segment_free']);
    expect(ev[1]).toMatchObject({ action: 'alloc', bytes: 5000, owner: 'dit.blocks.7.ffn.net.0.proj', phase: 'denoise', allocated: 5000 });
    expect(ev[3]).toMatchObject({ action: 'alloc', bytes: 700, owner: 'activation', allocated: 5700 });
    expect(ev[5]).toMatchObject({ action: 'free', bytes: 5000, phase: 'decode', allocated: 0 });
    expect(ev[7]!.reserved).toBe(0);
    for (let i = 1; i < ev.length; i++) expect(ev[i]!.t).toBeGreaterThanOrEqual(ev[i - 1]!.t);
  });

  it("startRecording({ live: true }) begins with what is held already (a worker's weights loaded before the job), totals climbing to today's", () => {
    const a = new CachingAllocator(fakeFactory());
    a.phase = 'load';
    a.alloc(5000, 'dit.blocks.0');
    const tmp = a.alloc(700, 'activation');
    a.free(tmp); // cached, not live
    a.startRecording(undefined, { live: true });
    a.phase = 'denoise';
    const x = a.alloc(300, 'activation.linear');
    const ev = a.stopRecording();
    expect(ev.slice(0, 3).map((e) => [e.action, e.owner, e.t])).toEqual([
      ['segment_alloc', 'dit.blocks.0', 0],
      ['alloc', 'dit.blocks.0', 0],
      ['segment_alloc', 'activation', 0],
    ]);
    expect(ev[1]).toMatchObject({ bytes: 5000, phase: 'load', allocated: 5000 });
    // the job's own events carry on from the same totals
    const last = ev[ev.length - 1]!;
    expect(last).toMatchObject({ action: 'alloc', bytes: 300, allocated: 5300 });
    expect(last.reserved).toBe(a.memoryReserved());
    a.free(x);
    // without live: nothing before the first event
    a.startRecording();
    expect(a.events()).toHaveLength(0);
  });

  it('groups live bytes by owner prefix', () => {
    const a = new CachingAllocator(fakeFactory());
    a.alloc(100, 'dit.blocks.0.attn1.to_q');
    a.alloc(200, 'dit.blocks.0.ffn');
    a.alloc(50, 'dit.blocks.1.ffn');
    a.alloc(7, 'vae.decoder.conv_in');
    const g = a.allocatedByOwner(3);
    expect(g.get('dit.blocks.0')).toBe(300);
    expect(g.get('dit.blocks.1')).toBe(50);
    expect(a.allocatedByOwner(1).get('dit')).toBe(350);
  });

  it('throws a clear OutOfMemoryError at the budget, after emptying the cache', () => {
    const f = fakeFactory();
    const a = new CachingAllocator(f, { limitBytes: 64 * 1024 });
    a.phase = 'decode';
    const x = a.alloc(40_000, 'vae');
    a.free(x); // cached: 40 KB held
    const y = a.alloc(60_000, 'vae.big'); // needs the cache emptied first
    expect(a.memoryReserved()).toBe(sizeClass(60_000));
    let err: unknown;
    try {
      a.alloc(10_000, 'vae.more');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(OutOfMemoryError);
    const m = (err as Error).message;
    expect(m).toMatch(/phase 'decode'/);
    expect(m).toMatch(/9\.8 KiB requested for 'vae\.more'/);
    expect(m).toMatch(/low_mem_level/);
    a.free(y);
  });

  it('owns staging buffers with owner tags, counted apart from device memory and the budget', () => {
    const f = fakeFactory();
    const a = new CachingAllocator(f, { limitBytes: 4096 });
    const s0 = a.allocStaging(3000, 'dit.blocks.slot.staging.0');
    const s1 = a.allocStaging(3001, 'dit.blocks.slot.staging.1'); // rounded up to 4 bytes
    expect(s1.size).toBe(3004);
    expect(f.staging()).toBe(6004);
    expect(a.memoryStaging()).toBe(6004);
    // not device memory: allocated/reserved unchanged, and the 4 KiB budget still has room
    expect(a.memoryReserved()).toBe(0);
    a.free(a.alloc(4000, 'activation'));
    expect(a.stats()).toMatchObject({ stagingBytes: 6004, peakStagingBytes: 6004, allocated: 0 });
    expect(takeSnapshot(a).staging.map((b) => b.owner)).toEqual(['dit.blocks.slot.staging.0', 'dit.blocks.slot.staging.1']);
    a.freeStaging(s0);
    expect(() => a.freeStaging(s0)).toThrow(/double free of staging buffer/);
    a.freeStaging(s1);
    expect(f.staging()).toBe(0);
    expect(a.stats()).toMatchObject({ stagingBytes: 0, peakStagingBytes: 6004 });
    expect(a.liveStagingList()).toEqual([]);
  });

  it('renders a snapshot as HTML with owners and phases', () => {
    const a = new CachingAllocator(fakeFactory());
    a.startRecording();
    a.phase = 'encode';
    const t = a.alloc(1000, 'text_encoder.encoder.block.0.layer.0');
    a.free(t);
    a.phase = 'denoise';
    for (let i = 0; i < 3; i++) {
      const b = a.alloc(5000, `dit.blocks.${i}.ffn`);
      a.free(b);
    }
    const snap = takeSnapshot(a, 'fake');
    expect(JSON.parse(JSON.stringify(snap)).events.length).toBe(snap.events.length);
    const html = renderSnapshotHtml(snap);
    expect(html).toMatch(/<svg/);
    expect(html).toMatch(/dit\.blocks\.2/);
    expect(html).toMatch(/text_encoder\.encoder\.block/);
    expect(html).toMatch(/phase denoise/);
  });
});

describe('allocator on the real device', () => {
  it('engine tensors account exact bytes, views share storage, dispose frees', async () => {
    const e = await getEngine();
    const a = e.allocator;
    const base = a.memoryAllocated();
    const t = e.empty([3, 5, 7], 'f32');
    expect(a.memoryAllocated() - base).toBe(3 * 5 * 7 * 4);
    const h = e.empty([33], 'bf16');
    expect(a.memoryAllocated() - base).toBe(3 * 5 * 7 * 4 + 66);
    const v = t.narrow0(1, 2);
    t.dispose();
    expect(a.memoryAllocated() - base).toBe(3 * 5 * 7 * 4 + 66); // the view keeps it alive
    v.dispose();
    h.dispose();
    expect(a.memoryAllocated()).toBe(base);
  });

  it('scope() frees what it does not return', async () => {
    const e = await getEngine();
    const base = e.allocator.memoryAllocated();
    const kept = e.scope(() => {
      e.empty([100]);
      e.empty([200]);
      return { out: e.empty([300]) };
    });
    expect(e.allocator.memoryAllocated() - base).toBe(1200);
    kept.out.dispose();
    expect(e.allocator.memoryAllocated()).toBe(base);
  });
});

describe('large blocks and the limit', () => {
  const MiB = 2 ** 20;
  it('a large request takes a cached block up to 25 % larger, never a smaller one or one far larger', () => {
    const f = fakeFactory();
    const a = new CachingAllocator(f);
    a.free(a.alloc(100 * MiB));
    const b = a.alloc(90 * MiB); // 100 <= 1.25 × 90: reused
    expect(f.created()).toBe(1);
    expect(b.size).toBe(100 * MiB);
    expect(a.stats().allocated).toBe(90 * MiB);
    a.free(b);
    a.alloc(70 * MiB); // 100 > 1.25 × 70: a new buffer
    expect(f.created()).toBe(2);
    a.alloc(110 * MiB); // nothing cached fits
    expect(f.created()).toBe(3);
  });
  it('at the limit, gives cached buffers back largest first, only as many as the new one needs', () => {
    const f = fakeFactory();
    const a = new CachingAllocator(f, { limitBytes: 400 * MiB });
    const x = [a.alloc(200 * MiB), a.alloc(100 * MiB), a.alloc(80 * MiB)];
    for (const b of x) a.free(b);
    expect(a.stats().reserved).toBe(380 * MiB);
    a.alloc(150 * MiB); // needs 130 MiB back: the 200 MiB buffer goes, the other two stay cached
    expect(a.stats().reserved).toBe(330 * MiB);
    expect(a.stats().cachedBytes).toBe(180 * MiB);
    expect(() => a.alloc(300 * MiB)).toThrow(OutOfMemoryError);
    expect(a.stats().reserved).toBeLessThanOrEqual(400 * MiB);
  });
});
