// The residency manager for streamed blocks (level 3, and the text encoder's 'gpu-stream' mode).
//
// Each block's parameters are packed once, at load time, into one host "block image" (an
// ArrayBuffer in the checkpoint dtype, every tensor at an offset aligned to the device's storage
// alignment). On the GPU there is a ring of `slots` (2 by default) buffers, each one block
// image large, allocated once and reused for every block: nothing is allocated per block.
// Uploading a block copies its image through a reused ring of mapped staging buffers (allocator-owned,
// counted as staging, not device memory) into a slot (measured 2x faster than `queue.writeBuffer`
// here: `npm run bench:upload`), after which the block's Params point at tensor views of that slot
// (`viewBytes`); each Param's `streamHost` holds its view of the host image. The code that runs the
// blocks says what it needs, explicitly:
//
//     await res.acquire(i); res.prefetch(i + 1); run(i); res.release(i);
//
// prefetch(i+1) submits the work encoded so far and copies block i+1 into the other slot while
// the GPU computes block i; acquire(i+1) then finds it there. Time spent uploading and the part
// of it that overlapped GPU work are recorded for `--profile`.

import type { Engine } from '../runtime/engine.ts';
import type { Module, Param } from '../nn/module.ts';
import { Tensor } from '../tensor/tensor.ts';
import type { StagingBlock } from '../memory/allocator.ts';
import type { BlockResidency } from '../nn/residency.ts';

interface Entry {
  param: Param;
  offset: number;
}

interface BlockImage {
  /** the image (the params' host copies are views of it), as bytes for the uploads */
  bytes: Uint8Array;
  entries: Entry[];
}

export interface UploadStats {
  uploads: number;
  bytes: number;
  /** main-thread ms spent in uploads */
  uploadMs: number;
  /** ms acquire() waited for uploads that were not done in time (0 with prefetch on lavapipe) */
  stallMs: number;
  /** uploads issued by prefetch (overlapping the previous block's GPU work) */
  prefetched: number;
  /** main-thread upload ms spent while acquire() was waiting for that block (not hidden) */
  exposedMs: number;
}

export class StreamedBlocks implements BlockResidency {
  private readonly images: BlockImage[] = [];
  private readonly slotTensors: Tensor[] = [];
  private readonly slotOf: number[] = []; // block -> slot or -1
  private readonly blockIn: number[] = []; // slot -> block or -1
  private readonly views: Tensor[][] = []; // per block: param views currently set
  private readonly slotBytes: number;
  readonly stats: UploadStats = { uploads: 0, bytes: 0, uploadMs: 0, stallMs: 0, prefetched: 0, exposedMs: 0 };
  private readonly waitingFor = new Set<number>();
  /** set false to measure streaming without prefetch */
  prefetchEnabled = true;
  /**
   * 'staging': a ring of mapped staging buffers (WebGPU's pinned memory), reused for every upload;
   * 'writeBuffer': queue.writeBuffer of the host image. `npm run bench:upload`: the ring moves a
   * 1.3B block (84 MiB) in 0.49x the time of writeBuffer on lavapipe (docs/memory-levels.md).
   */
  uploadPath: 'staging' | 'writeBuffer' = 'staging';
  private readonly staging: StagingBlock[] = [];
  private readonly stagingMapped: boolean[] = [];
  private readonly stagingBusy: Array<Promise<void> | null> = [];
  private stagingNext = 0;
  private readonly inflight: Array<Promise<void> | null> = [];

  /**
   * blocks: the modules whose params are streamed (params must hold host tensors now).
   * owner: memory tag of the slots (e.g. 'dit.blocks.slot').
   */
  constructor(
    private readonly e: Engine,
    blocks: Module[],
    readonly owner: string,
    readonly numSlots = 2,
    /** false: allocate the slots at the first acquire()/prefetch() (see releaseDevice) */
    allocateNow = true,
  ) {
    const align = Math.max(e.caps.storageAlign, 256);
    let maxBytes = 0;
    for (const b of blocks) {
      const entries: Entry[] = [];
      let off = 0;
      for (const [, p] of b.namedParams()) {
        const t = p.t;
        if (t.device !== 'cpu') throw new Error(`[residency] ${p.fullKey} must be in host memory to be streamed`);
        off = Math.ceil(off / align) * align;
        entries.push({ param: p, offset: off });
        off += t.nbytes;
      }
      const size = Math.ceil(off / 4) * 4;
      const words = new Uint32Array(size / 4);
      const image = Tensor.cpu(words, [words.length], 'u32');
      const bytes = new Uint8Array(words.buffer);
      for (const { param, offset } of entries) {
        const t = param.t;
        const d = t.data!;
        bytes.set(new Uint8Array(d.buffer, d.byteOffset, d.byteLength), offset);
        // the param now views the image: host memory holds each weight once (and a previous ring's
        // image, which a stale streamHost would keep alive, is let go)
        param.value = param.streamHost = image.viewBytes(offset, t.shape, t.dtype);
      }
      this.images.push({ bytes, entries });
      maxBytes = Math.max(maxBytes, size);
      this.slotOf.push(-1);
      this.views.push([]);
    }
    this.slotBytes = maxBytes;
    for (let i = 0; i < blocks.length; i++) this.inflight.push(null);
    if (allocateNow) this.allocateDevice();
  }

  /** the GPU side: the slot ring and the staging ring */
  private allocateDevice(): void {
    const { e, owner, slotBytes } = this;
    for (let s = 0; s < this.numSlots; s++) {
      this.slotTensors.push(e.keep(e.empty([slotBytes / 4], 'u32', `${owner}.${s}`)));
      this.blockIn.push(-1);
      // host-visible, mapped at creation: counted as staging, not against the GPU budget (allocator.ts)
      this.staging.push(e.allocator.allocStaging(slotBytes, `${owner}.staging.${s}`));
      this.stagingMapped.push(true);
      this.stagingBusy.push(null);
    }
    this.stagingNext = 0;
  }

  /** true while the slots and staging buffers exist (see releaseDevice) */
  get onDevice(): boolean {
    return this.slotTensors.length > 0;
  }

  /**
   * Give the GPU side back (slots and staging; the params point at their host images again) and
   * keep the host images: the next acquire() or prefetch() allocates the ring again. Level 3 does
   * this for the decode phase, so the VAE has the DiT's slots; re-packing the images instead would
   * copy every block's weights again (2.8 GB for the 1.3B DiT) on each request.
   */
  releaseDevice(): void {
    if (!this.onDevice) return;
    for (let i = 0; i < this.images.length; i++) if (this.slotOf[i]! >= 0) this.detach(i);
    this.inflight.fill(null);
    for (const t of this.slotTensors) t.dispose();
    this.slotTensors.length = 0;
    this.blockIn.length = 0;
    for (const b of this.staging) this.e.allocator.freeStaging(b);
    this.staging.length = 0;
    this.stagingMapped.length = 0;
    this.stagingBusy.length = 0;
  }

  /** Zero the upload statistics (per request). */
  resetStats(): void {
    Object.assign(this.stats, { uploads: 0, bytes: 0, uploadMs: 0, stallMs: 0, prefetched: 0, exposedMs: 0 });
  }

  /** owner tag of block i's weights (e.g. 'dit.blocks.7') */
  blockOwner(i: number): string {
    return this.ownerOf?.(i) ?? `${this.owner}.${i}`;
  }

  /** optional naming of blocks for memory tags */
  ownerOf: ((i: number) => string) | null = null;

  /** bytes of one GPU slot */
  get slotSize(): number {
    return this.slotBytes;
  }

  /** host bytes held by the block images */
  get hostBytes(): number {
    return this.images.reduce((a, b) => a + b.bytes.byteLength, 0);
  }

  /**
   * Start copying block i's image into `slot`. The bookkeeping (which block is where, memory tags,
   * the previous occupant's params back to host) happens now; the bytes go through the staging
   * ring: wait until staging buffer k is mappable again (its previous copy finished long ago:
   * Dawn resolves a map at the buffer's last use, not at the end of the queue), copy the image into
   * its mapping on the main thread, unmap, and queue `copyBufferToBuffer` behind the work encoded so
   * far (which includes the slot's previous reader). acquire(i) awaits the returned task.
   */
  private startUpload(i: number, slot: number): Promise<void> {
    const img = this.images[i]!;
    const prev = this.blockIn[slot]!;
    if (prev >= 0) this.detach(prev);
    const slotT = this.slotTensors[slot]!;
    this.slotOf[i] = slot;
    this.blockIn[slot] = i;
    // the slot now holds block i: memory timelines show it under that block's name
    const blk = slotT.storage!.block;
    if (blk) this.e.allocator.retag(blk, `${this.blockOwner(i)}`, img.bytes.byteLength);
    const task = this.copyIn(i, slot).finally(() => {
      if (this.inflight[i] === task) this.inflight[i] = null;
    });
    this.inflight[i] = task;
    return task;
  }

  private account(i: number, ms: number): void {
    this.stats.uploadMs += ms;
    if (this.waitingFor.has(i)) this.stats.exposedMs += ms;
  }

  private async copyIn(i: number, slot: number): Promise<void> {
    const img = this.images[i]!;
    const slotT = this.slotTensors[slot]!;
    const dev = this.e.device;
    const n = img.bytes.byteLength;
    if (this.uploadPath === 'staging') {
      const k = this.stagingNext;
      this.stagingNext = (k + 1) % this.staging.length;
      const st = this.staging[k]!.buffer;
      // one staging buffer is used by one upload at a time
      while (this.stagingBusy[k]) await this.stagingBusy[k];
      let release!: () => void;
      this.stagingBusy[k] = new Promise<void>((r) => (release = r));
      try {
        if (!this.stagingMapped[k]) {
          await st.mapAsync(GPUMapMode.WRITE, 0, this.slotBytes);
          this.stagingMapped[k] = true;
        }
        if (this.blockIn[slot] !== i) return; // superseded while waiting (dispose or another upload)
        const t0 = performance.now();
        new Uint8Array(st.getMappedRange(0, this.slotBytes)).set(img.bytes);
        st.unmap();
        this.stagingMapped[k] = false;
        this.e.flush(); // the slot's previous reader goes first
        const enc = dev.createCommandEncoder({ label: `upload ${this.blockOwner(i)}` });
        enc.copyBufferToBuffer(st, 0, slotT.buffer, 0, n);
        dev.queue.submit([enc.finish()]);
        this.account(i, performance.now() - t0);
      } finally {
        this.stagingBusy[k] = null;
        release();
      }
    } else {
      const t0 = performance.now();
      this.e.flush();
      dev.queue.writeBuffer(slotT.buffer, 0, img.bytes.buffer, img.bytes.byteOffset, n);
      this.account(i, performance.now() - t0);
    }
    // point the block's params at views of the slot
    const views: Tensor[] = [];
    for (const { param, offset } of img.entries) {
      const host = param.streamHost!;
      const v = this.e.keep(slotT.viewBytes(offset, host.shape, host.dtype));
      views.push(v);
      param.value = v;
    }
    this.views[i] = views;
    this.stats.uploads++;
    this.stats.bytes += n;
  }

  /** params of block i back to their host tensors; views dropped */
  private detach(i: number): void {
    const img = this.images[i]!;
    for (const { param } of img.entries) param.value = param.streamHost;
    for (const v of this.views[i]!) v.dispose();
    this.views[i] = [];
    const s = this.slotOf[i]!;
    if (s >= 0 && this.blockIn[s] === i) this.blockIn[s] = -1;
    this.slotOf[i] = -1;
  }

  async acquire(i: number): Promise<void> {
    if (!this.onDevice) this.allocateDevice();
    const pending = this.inflight[i];
    if (!pending && this.slotOf[i]! >= 0) return;
    const t0 = performance.now();
    this.waitingFor.add(i);
    try {
      await (pending ?? this.startUpload(i, this.freeSlot(i)));
    } finally {
      this.waitingFor.delete(i);
    }
    this.stats.stallMs += performance.now() - t0;
  }

  prefetch(i: number): void {
    if (!this.prefetchEnabled || i >= this.images.length || this.slotOf[i]! >= 0) return;
    if (!this.onDevice) this.allocateDevice();
    void this.startUpload(i, this.freeSlot(i)).catch(() => {}); // errors surface in acquire(i)
    this.stats.prefetched++;
  }

  release(_i: number): void {
    // the slot stays valid until another block is uploaded into it (its reader is then submitted first)
  }

  private freeSlot(i: number): number {
    // the slot not holding the block in use: ring order by block index
    return i % this.numSlots;
  }

  /** Give the slots back and restore host params. */
  dispose(): void {
    this.releaseDevice();
    // the params own their host tensors (views of the images) again; nothing else here keeps them
    for (const img of this.images) for (const { param } of img.entries) param.streamHost = null;
    this.images.length = 0;
    this.inflight.fill(null);
  }
}
