// The residency manager for streamed blocks (level 3, and the text encoder's 'gpu-stream' mode).
//
// Each block's parameters are packed once, at load time, into one host "block image" (an
// ArrayBuffer in the checkpoint dtype, every tensor at an offset aligned to the device's storage
// alignment: blockImageLayout). On the GPU there is a ring of `numSlots` (2 by default) buffers,
// each one block image large, allocated once and reused for every block: nothing is allocated per
// block. Uploading a block copies its image through a reused ring of mapped staging buffers
// (allocator-owned, counted as staging, not device memory) into a slot (measured 2x faster than
// `queue.writeBuffer` here: `npm run bench:upload`), after which the block's Params point at tensor
// views of that slot (`viewBytes`); each Param's `streamHost` holds its view of the host image. The
// code that runs the blocks says what it needs, explicitly:
//
//     await res.acquire(i); res.prefetch(i + 1); run(i); res.release(i);
//
// prefetch(i+1) submits the work encoded so far and copies block i+1 into the other slot while
// the GPU computes block i; acquire(i+1) then finds it there. Time spent uploading and the part
// of it that overlapped GPU work are recorded for `--profile`.
//
// Partial residency (`resident: k`): a GPU with room for more than two blocks keeps blocks 0..k-1
// for good, each in its own buffer holding its image, uploaded once when the device side is
// allocated; only the other blocks go through the slots, so a denoising step uploads n - k blocks
// instead of n. Meta mode (`meta: true`) is for the memory planner, which runs the model on a fake
// device: the same layout, the same device allocations in the same order, no host image and no
// bytes moved.
//
// Groups (Wan 2.2's two experts): one StreamedBlocks holds the block images of several models of
// the same shape (`groups: [40, 40]`) and ONE set of slots and staging buffers. Only the active
// group runs (`setGroup(g)`, `group(g)` gives that model's forward a BlockResidency with its own
// block numbers); its first `resident` blocks hold resident buffers, which a switch frees before the
// other group's are allocated and uploaded, so the GPU never holds both groups' resident blocks.
//
// Chunked staging (disk mode by default, `chunkedStaging`): when the whole-block ring (one block image
// per slot) would be larger than stagingChunks.count (4) buffers of stagingChunks.bytes (64 MiB), the
// ring is those chunk buffers instead, and a block goes up chunk by chunk (read into a mapped chunk,
// unmapped, copied to its offset in the slot). At 14B shapes (670 MiB blocks) the ring holds 256 MiB
// instead of 1.3 GiB: on a software adapter mapped buffers are host RAM, and on any machine they are
// pinned memory. Smaller blocks (1.3B: two of 84 MiB = 168 MiB) keep the whole-block ring.

import type { Engine } from '../runtime/engine.ts';
import type { Module, Param } from '../nn/module.ts';
import { Tensor } from '../tensor/tensor.ts';
import type { StagingBlock } from '../memory/allocator.ts';
import type { BlockResidency } from '../nn/residency.ts';
import type { DiskImage, DiskWeights } from './disk-weights.ts';

/**
 * The layout of a block image: the tensors in order, each at an offset aligned to `align`, the
 * image rounded up to whole 4-byte words (GPU buffers and copies are sized in words). Both modes
 * pack with it, so the planner's meta run and the real run size every buffer alike.
 */
export function blockImageLayout(tensors: ReadonlyArray<{ readonly nbytes: number }>, align: number): { offsets: number[]; size: number } {
  const offsets: number[] = [];
  let off = 0;
  for (const t of tensors) {
    off = Math.ceil(off / align) * align;
    offsets.push(off);
    off += t.nbytes;
  }
  return { offsets, size: Math.ceil(off / 4) * 4 };
}

/** The block image layout StreamedBlocks uses on this engine for each block (what disk images must match). */
export function streamLayouts(e: Engine, blocks: Module[]): Array<{ params: Param[]; offsets: number[]; size: number }> {
  const align = Math.max(e.caps.storageAlign, 256);
  return blocks.map((b) => {
    const params = b.namedParams().map(([, p]) => p);
    return { params, ...blockImageLayout(params.map((p) => p.t), align) };
  });
}

interface Entry {
  param: Param;
  offset: number;
}

interface BlockImage {
  /** the image (the params' host copies are views of it), as bytes for the uploads; null in meta and disk modes */
  bytes: Uint8Array | null;
  /** disk mode: where the image's bytes are read from, per use */
  disk: { weights: DiskWeights; image: DiskImage } | null;
  /** bytes of the image (blockImageLayout's size), in both modes */
  size: number;
  entries: Entry[];
}

/** One buffer of the staging ring; a ring is replaced, not reused, when the device side is allocated again. */
interface StagingBuffer {
  block: StagingBlock;
  mapped: boolean;
  /** the upload using this buffer (one at a time) */
  busy: Promise<void> | null;
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
  /** disk mode (infer.weights_source=disk): block images read from disk, their bytes and wall ms */
  diskReads?: number;
  diskBytes?: number;
  diskReadMs?: number;
  /** disk read ms while acquire() was waiting for that block (the part not hidden behind compute) */
  diskExposedMs?: number;
}

/**
 * Chunked staging: the size of one staging buffer (a multiple of 4), and how many the ring has.
 * Read when a StreamedBlocks is built; tests shrink `bytes` to put small models through the chunks.
 */
export const stagingChunks = { bytes: 64 * 1024 * 1024, count: 4 };

export interface StreamedBlocksOptions {
  /** GPU slots the streamed blocks take turns in (2: the next block uploads while one computes) */
  numSlots?: number;
  /** false: allocate the device side at the first acquire()/prefetch() (see releaseDevice) */
  allocateNow?: boolean;
  /**
   * Blocks 0..resident-1 stay on the GPU while the device side exists: one buffer each holding its
   * image, uploaded once when the device side is allocated; acquire/prefetch/release do nothing for
   * them. Clamped to [0, blocks]. The slots serve the other blocks, and are not allocated when every
   * block is resident.
   */
  resident?: number;
  /** memory tag of block i's weights (default `${owner}.${i}`): resident buffers are tagged when allocated */
  ownerOf?: (i: number) => string;
  /**
   * Sizes of consecutive block groups (models sharing the ring; default one group of every block).
   * `resident` counts per group: blocks 0..resident-1 OF THE ACTIVE GROUP stay on the GPU.
   */
  groups?: number[];
  /**
   * For the memory planner's fake device: the params hold Tensor.meta placeholders, no host image
   * is allocated and an upload moves no bytes, while every device allocation (resident buffers,
   * slots, staging ring) and every param view is made as in the real mode, in the same order.
   */
  meta?: boolean;
  /**
   * Disk mode (infer.weights_source=disk): the params hold meta placeholders with `Param.disk`
   * references, and block i's image is read per use from `images[i]` (pipeline/disk-weights.ts)
   * straight into the mapped staging buffer: no host image at all. `weights[i]` reads it (a group
   * per model may have its own files).
   */
  disk?: { weights: DiskWeights[]; images: DiskImage[] };
  /**
   * Upload blocks through a ring of stagingChunks.count chunk-sized staging buffers when that ring is
   * smaller than one whole block per slot (default: in disk mode). The planner passes the same choice
   * in meta mode.
   */
  chunkedStaging?: boolean;
  /**
   * Another StreamedBlocks' host images, one per block in this instance's order (imageBytes), each
   * of this layout's size: the params view them and nothing is packed, so several devices stream
   * the same host copy of the weights (context parallelism, src/parallel/pipeline-cp.ts). The params
   * may be meta placeholders (shape and dtype are all the layout needs).
   */
  sharedImages?: Uint8Array[];
}

export class StreamedBlocks implements BlockResidency {
  readonly numSlots: number;
  /** blocks 0..resident-1 (of the active group) stay on the GPU (clamped to the smallest group) */
  readonly resident: number;
  /** first block of each group, and one past the last */
  private readonly groupStart: number[];
  private active = 0;
  readonly meta: boolean;
  private readonly ownerOf: ((i: number) => string) | null;
  private readonly images: BlockImage[] = [];
  private readonly residentTensors: Tensor[] = []; // block start + j (j < resident) of the active group -> its buffer
  private readonly slotTensors: Tensor[] = [];
  private readonly slotOf: number[] = []; // block -> slot or -1
  private readonly blockIn: number[] = []; // slot -> block or -1
  /** per block: the buffer its params view, or will view once its upload lands (null: host) */
  private readonly holder: Array<Tensor | null> = [];
  private readonly views: Tensor[][] = []; // per block: param views currently set
  private readonly slotBytes: number;
  /** bytes of one staging buffer (a whole block image, or a chunk) */
  private readonly stagingBytes: number;
  /** staging buffers in the ring */
  private readonly stagingCount: number;
  private device = false;
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
  private staging: StagingBuffer[] = [];
  private stagingNext = 0;
  private readonly inflight: Array<Promise<void> | null> = [];

  /**
   * blocks: the modules whose params are streamed (params must hold host tensors now; in meta
   * mode host tensors or Tensor.meta placeholders). owner: memory tag of the slots (e.g. 'dit.blocks.slot').
   */
  constructor(
    private readonly e: Engine,
    blocks: Module[],
    readonly owner: string,
    opts: StreamedBlocksOptions = {},
  ) {
    this.numSlots = opts.numSlots ?? 2;
    const groups = opts.groups ?? [blocks.length];
    if (groups.reduce((a, b) => a + b, 0) !== blocks.length || groups.some((g) => !(g >= 0))) throw new Error(`[residency] groups [${groups.join(', ')}] do not add up to the ${blocks.length} blocks`);
    this.groupStart = [0];
    for (const g of groups) this.groupStart.push(this.groupStart[this.groupStart.length - 1]! + g);
    this.resident = Math.min(Math.max(0, Math.floor(opts.resident ?? 0)), Math.min(...groups));
    this.meta = opts.meta ?? false;
    this.ownerOf = opts.ownerOf ?? null;
    const disk = opts.disk ?? null;
    if (disk && disk.images.length !== blocks.length) throw new Error(`[residency] ${disk.images.length} disk images for ${blocks.length} blocks`);
    const align = Math.max(e.caps.storageAlign, 256);
    const shared = this.meta || disk ? null : (opts.sharedImages ?? null);
    if (shared && shared.length !== blocks.length) throw new Error(`[residency] ${shared.length} shared images for ${blocks.length} blocks`);
    for (const b of blocks) {
      const params = b.namedParams().map(([, p]) => p);
      for (const p of params) {
        if (p.t.device !== 'cpu') throw new Error(`[residency] ${p.fullKey} must be in host memory to be streamed`);
        if (!this.meta && !disk && !shared && p.t.isMeta) throw new Error(`[residency] ${p.fullKey} is a meta placeholder: only a meta or disk StreamedBlocks can stream it`);
      }
      const { offsets, size } = blockImageLayout(params.map((p) => p.t), align);
      const entries = params.map((param, k) => ({ param, offset: offsets[k]! }));
      let bytes: Uint8Array | null = null;
      const bi = this.images.length;
      const given = shared?.[bi];
      if (given) {
        if (given.byteLength !== size || given.byteOffset % 4 !== 0) throw new Error(`[residency] block ${bi}: a shared image of ${given.byteLength} bytes, this layout needs ${size}`);
        const image = Tensor.cpu(new Uint32Array(given.buffer, given.byteOffset, size / 4), [size / 4], 'u32');
        for (const { param, offset } of entries) param.value = param.streamHost = image.viewBytes(offset, param.t.shape, param.t.dtype);
        this.images.push({ bytes: given, size, entries, disk: null });
        this.slotOf.push(-1);
        this.holder.push(null);
        this.views.push([]);
        this.inflight.push(null);
        continue;
      }
      const diskImage = disk ? { weights: disk.weights[bi] ?? disk.weights[0]!, image: disk.images[bi]! } : null;
      if (diskImage && diskImage.image.size !== size) throw new Error(`[residency] block ${bi}: disk image of ${diskImage.image.size} bytes, layout ${size}`);
      if (this.meta || diskImage) {
        // (disk mode: a param kept in host memory, e.g. UMT5's tiny relative-bias table, keeps its host tensor)
        for (const { param } of entries) param.value = param.streamHost = diskImage && !param.disk && param.t.data ? param.t : Tensor.meta(param.t.shape, param.t.dtype);
      } else {
        const words = new Uint32Array(size / 4);
        const image = Tensor.cpu(words, [words.length], 'u32');
        bytes = new Uint8Array(words.buffer);
        for (const { param, offset } of entries) {
          const t = param.t;
          const d = t.data!;
          bytes.set(new Uint8Array(d.buffer, d.byteOffset, d.byteLength), offset);
          // the param now views the image: host memory holds each weight once (and a previous ring's
          // image, which a stale streamHost would keep alive, is let go)
          param.value = param.streamHost = image.viewBytes(offset, t.shape, t.dtype);
        }
      }
      this.images.push({ bytes, size, entries, disk: diskImage });
      this.slotOf.push(-1);
      this.holder.push(null);
      this.views.push([]);
      this.inflight.push(null);
    }
    const sizes = this.images.map((img) => img.size);
    // a slot holds any group's streamed blocks
    this.slotBytes = Math.max(0, ...groups.flatMap((_, g) => sizes.slice(this.groupStart[g]! + this.resident, this.groupStart[g + 1]!)));
    // the staging ring carries the resident blocks' uploads too
    const largest = Math.max(0, ...sizes);
    // chunked when the whole-block ring (one block per slot) would be larger than the chunk ring
    if ((opts.chunkedStaging ?? disk !== null) && largest * this.numSlots > stagingChunks.bytes * stagingChunks.count) {
      if (stagingChunks.bytes % 4 !== 0 || !(stagingChunks.count >= 1)) throw new Error(`[residency] staging chunks of ${stagingChunks.bytes} bytes x ${stagingChunks.count}`);
      this.stagingBytes = stagingChunks.bytes;
      this.stagingCount = stagingChunks.count;
    } else {
      this.stagingBytes = largest;
      this.stagingCount = this.numSlots;
    }
    if (opts.allocateNow ?? true) this.allocateDevice();
  }

  /**
   * The GPU side, always in this order (the meta mode's accounting relies on it): one buffer per
   * resident block, then the slots, each with its staging buffer; then the resident blocks' uploads
   * start. With every block resident there are no slots, and the staging ring goes once those
   * uploads are done (nothing else is uploaded until releaseDevice).
   */
  private allocateDevice(): void {
    const { e, owner } = this;
    this.device = true;
    this.allocateResident();
    const slots = Math.min(this.numSlots, this.maxStreamed());
    const ring: StagingBuffer[] = [];
    for (let s = 0; s < Math.max(this.numSlots, this.stagingCount); s++) {
      if (s < slots) {
        this.slotTensors.push(e.keep(e.empty([this.slotBytes / 4], 'u32', `${owner}.${s}`)));
        this.blockIn.push(-1);
      }
      // host-visible, mapped at creation: counted as staging, not against the GPU budget (allocator.ts)
      if (s < this.stagingCount) ring.push({ block: e.allocator.allocStaging(this.stagingBytes, `${owner}.staging.${s}`), mapped: true, busy: null });
    }
    this.staging = ring;
    this.stagingNext = 0;
    this.uploadResident();
  }

  /** streamed (non-resident) blocks of the largest group: what the slots serve */
  private maxStreamed(): number {
    let m = 0;
    for (let g = 0; g + 1 < this.groupStart.length; g++) m = Math.max(m, this.groupStart[g + 1]! - this.groupStart[g]! - this.resident);
    return m;
  }

  /** one buffer per resident block of the active group */
  private allocateResident(): void {
    const start = this.groupStart[this.active]!;
    for (let j = 0; j < this.resident; j++) this.residentTensors.push(this.e.keep(this.e.empty([this.images[start + j]!.size / 4], 'u32', this.blockOwner(start + j))));
  }

  /**
   * Start the active group's resident uploads. With no slots (every block resident) the staging
   * ring is only needed for them: it goes once they are done (and comes back for a group switch).
   */
  private uploadResident(): void {
    const start = this.groupStart[this.active]!;
    const uploads: Promise<void>[] = [];
    for (let j = 0; j < this.resident; j++) {
      const task = this.startUpload(start + j);
      void task.catch(() => {}); // errors surface in acquire(i)
      uploads.push(task);
    }
    if (this.slotTensors.length === 0) {
      const ring = this.staging;
      void Promise.allSettled(uploads).then(() => {
        if (this.staging === ring) this.freeStaging();
      });
    }
  }

  /** the active group (0 when there is one) */
  get activeGroup(): number {
    return this.active;
  }

  /** number of groups */
  get groupCount(): number {
    return this.groupStart.length - 1;
  }

  /**
   * Make group g the one that runs. The previous group's blocks leave the slots (their params point at
   * their host images again) and its resident buffers are freed BEFORE the new group's are allocated
   * and their uploads started: the GPU holds one group's resident blocks at a time. The slots and the
   * staging ring stay (one ring for every group). Without a device side, only the choice is recorded.
   */
  setGroup(g: number): void {
    if (!(g >= 0 && g < this.groupCount)) throw new Error(`[residency] group ${g} of ${this.groupCount}`);
    if (g === this.active) return;
    const [a, b] = [this.groupStart[this.active]!, this.groupStart[this.active + 1]!];
    if (this.device) for (let i = a; i < b; i++) if (this.holder[i]) this.detach(i);
    for (let i = a; i < b; i++) this.inflight[i] = null;
    for (const t of this.residentTensors) t.dispose();
    this.residentTensors.length = 0;
    this.active = g;
    if (!this.device) return;
    this.allocateResident();
    if (this.resident > 0 && this.staging.length === 0) {
      const ring: StagingBuffer[] = [];
      for (let s = 0; s < this.stagingCount; s++) ring.push({ block: this.e.allocator.allocStaging(this.stagingBytes, `${this.owner}.staging.${s}`), mapped: true, busy: null });
      this.staging = ring;
      this.stagingNext = 0;
    }
    this.uploadResident();
  }

  /** group g's blocks as a BlockResidency numbered from 0 (what that model's forward is given) */
  group(g: number): BlockResidency {
    const start = this.groupStart[g]!;
    const n = this.groupStart[g + 1]! - start;
    const check = (i: number) => {
      if (g !== this.active) throw new Error(`[residency] group ${g} is not active (group ${this.active} is): call setGroup(${g}) first`);
      return start + i;
    };
    return {
      acquire: async (i) => this.acquire(check(i)),
      prefetch: (i) => {
        if (i < n) this.prefetch(check(i));
      },
      release: (i) => this.release(check(i)),
    };
  }

  /** block i is resident (its own buffer) in the active group */
  private isResident(i: number): boolean {
    const j = i - this.groupStart[this.active]!;
    return j >= 0 && j < this.resident;
  }

  private freeStaging(): void {
    for (const s of this.staging) this.e.allocator.freeStaging(s.block);
    this.staging = [];
  }

  /** true while the device side (resident buffers, slots, staging) exists (see releaseDevice) */
  get onDevice(): boolean {
    return this.device;
  }

  /**
   * Give the GPU side back (resident buffers, slots and staging; the params point at their host
   * images again) and keep the host images: the next acquire() or prefetch() allocates it again and
   * re-uploads the resident blocks. Level 3 does this for the decode phase, so the VAE has the DiT's
   * memory; re-packing the images instead would copy every block's weights again (2.8 GB for the
   * 1.3B DiT) on each request.
   */
  releaseDevice(): void {
    if (!this.device) return;
    for (let i = 0; i < this.images.length; i++) if (this.holder[i]) this.detach(i);
    this.inflight.fill(null);
    for (const t of this.residentTensors) t.dispose();
    this.residentTensors.length = 0;
    for (const t of this.slotTensors) t.dispose();
    this.slotTensors.length = 0;
    this.blockIn.length = 0;
    this.freeStaging();
    this.device = false;
  }

  /** Zero the upload statistics (per request). */
  resetStats(): void {
    Object.assign(this.stats, { uploads: 0, bytes: 0, uploadMs: 0, stallMs: 0, prefetched: 0, exposedMs: 0 });
    if (this.images.some((img) => img.disk)) Object.assign(this.stats, { diskReads: 0, diskBytes: 0, diskReadMs: 0, diskExposedMs: 0 });
  }

  /** owner tag of block i's weights (e.g. 'dit.blocks.7') */
  blockOwner(i: number): string {
    return this.ownerOf?.(i) ?? `${this.owner}.${i}`;
  }

  /** bytes of one GPU slot (the largest streamed block's image; 0 when every block is resident) */
  get slotSize(): number {
    return this.slotBytes;
  }

  /** bytes of block i's image: what one upload moves, and what a resident block holds on the GPU */
  blockBytes(i: number): number {
    return this.images[i]!.size;
  }

  /** block i's host image (null in meta and disk modes): what another device's StreamedBlocks may share (sharedImages) */
  imageBytes(i: number): Uint8Array | null {
    return this.images[i]!.bytes;
  }

  /** host bytes held by the block images (in meta mode: what the real mode would hold; 0 in disk mode) */
  get hostBytes(): number {
    return this.images.reduce((a, b) => a + (b.disk ? 0 : b.size), 0);
  }

  /**
   * Start copying block i's image into its buffer: its resident buffer, or the next slot. The
   * bookkeeping (which block is where, memory tags, the slot's previous occupant's params back to
   * host) happens now; acquire(i) awaits the returned task.
   */
  private startUpload(i: number): Promise<void> {
    let target: Tensor;
    if (this.isResident(i)) target = this.residentTensors[i - this.groupStart[this.active]!]!;
    else {
      const slot = this.freeSlot(i);
      const prev = this.blockIn[slot]!;
      if (prev >= 0) this.detach(prev);
      target = this.slotTensors[slot]!;
      this.slotOf[i] = slot;
      this.blockIn[slot] = i;
      // the slot now holds block i: memory timelines show it under that block's name
      const blk = target.storage!.block;
      if (blk) this.e.allocator.retag(blk, this.blockOwner(i), this.images[i]!.size);
    }
    this.holder[i] = target;
    const task = this.copyIn(i, target).finally(() => {
      if (this.inflight[i] === task) this.inflight[i] = null;
    });
    this.inflight[i] = task;
    return task;
  }

  private account(i: number, ms: number): void {
    this.stats.uploadMs += ms;
    if (this.waitingFor.has(i)) this.stats.exposedMs += ms;
  }

  private async copyIn(i: number, target: Tensor): Promise<void> {
    const img = this.images[i]!;
    if (img.bytes || img.disk) await this.write(i, img.bytes, target);
    // superseded while waiting (releaseDevice, or another upload into its slot): the buffer is not its
    if (this.holder[i] !== target) return;
    // point the block's params at views of the buffer
    const views: Tensor[] = [];
    for (const { param, offset } of img.entries) {
      const host = param.streamHost!;
      const v = this.e.keep(target.viewBytes(offset, host.shape, host.dtype));
      views.push(v);
      param.value = v;
    }
    this.views[i] = views;
    this.stats.uploads++;
    this.stats.bytes += img.size;
  }

  /**
   * Move the image's bytes into `target`. Staging path: wait until staging buffer k is mappable
   * again (its previous copy finished long ago: Dawn resolves a map at the buffer's last use, not at
   * the end of the queue), copy the image into its mapping on the main thread, unmap, and queue
   * `copyBufferToBuffer` behind the work encoded so far (which includes a slot's previous reader).
   * Nothing is copied once the block has been moved off `target` while waiting.
   */
  private async write(i: number, imageBytes: Uint8Array | null, target: Tensor): Promise<void> {
    const dev = this.e.device;
    const img = this.images[i]!;
    const n = img.size;
    if (this.uploadPath === 'writeBuffer') {
      const bytes = imageBytes ?? new Uint8Array(n);
      if (!imageBytes) await this.readDisk(i, bytes);
      if (this.holder[i] !== target) return;
      const t0 = performance.now();
      this.e.flush();
      dev.queue.writeBuffer(target.buffer, 0, bytes.buffer, bytes.byteOffset, n);
      this.account(i, performance.now() - t0);
      return;
    }
    // whole image in one staging buffer, or (chunked staging) chunk by chunk through the ring
    for (let lo = 0; lo < n; lo += this.stagingBytes) {
      const done = await this.writeChunk(i, imageBytes, target, lo, Math.min(n, lo + this.stagingBytes));
      if (!done) return;
    }
  }

  /**
   * Bytes [lo, hi) of block i's image through the next staging buffer into `target` at lo; false
   * when the block was moved off `target` meanwhile (the rest is not copied).
   */
  private async writeChunk(i: number, imageBytes: Uint8Array | null, target: Tensor, lo: number, hi: number): Promise<boolean> {
    const dev = this.e.device;
    const len = hi - lo;
    const ring = this.staging;
    const k = this.stagingNext;
    this.stagingNext = (k + 1) % ring.length;
    const sb = ring[k]!;
    const st = sb.block.buffer;
    // one staging buffer is used by one upload at a time
    while (sb.busy) await sb.busy;
    let release!: () => void;
    sb.busy = new Promise<void>((r) => (release = r));
    try {
      if (this.holder[i] !== target) return false;
      if (!sb.mapped) {
        await st.mapAsync(GPUMapMode.WRITE, 0, this.stagingBytes);
        sb.mapped = true;
      }
      if (this.holder[i] !== target) return false;
      // disk mode: the block's tensors are read from the files straight into the mapped buffer
      // (the reads run on the thread pool while the GPU works on the blocks before this one)
      if (!imageBytes) {
        await this.readDisk(i, new Uint8Array(st.getMappedRange(0, this.stagingBytes)), lo, hi);
        // moved off `target` while reading: the slot is another block's now (its own upload copies in)
        if (this.holder[i] !== target) {
          st.unmap();
          sb.mapped = false;
          return false;
        }
      }
      const t0 = performance.now();
      if (imageBytes) new Uint8Array(st.getMappedRange(0, this.stagingBytes)).set(imageBytes.subarray(lo, hi));
      st.unmap();
      sb.mapped = false;
      this.e.flush(); // the slot's previous reader goes first
      const enc = dev.createCommandEncoder({ label: `upload ${this.blockOwner(i)}` });
      enc.copyBufferToBuffer(st, 0, target.buffer, lo, len);
      dev.queue.submit([enc.finish()]);
      this.account(i, performance.now() - t0);
      return true;
    } finally {
      sb.busy = null;
      release();
    }
  }

  /**
   * disk mode: bytes [lo, hi) of block i's image (default: all of it) from its files into `dst`
   * (statistics per block; exposed = while acquire waited)
   */
  private async readDisk(i: number, dst: Uint8Array, lo = 0, hi = this.images[i]!.size): Promise<void> {
    const d = this.images[i]!.disk!;
    const t0 = performance.now();
    const bytes = await d.weights.fill(dst, d.image, lo, hi);
    const ms = performance.now() - t0;
    const s = this.stats;
    if (lo === 0) s.diskReads = (s.diskReads ?? 0) + 1;
    s.diskBytes = (s.diskBytes ?? 0) + bytes;
    s.diskReadMs = (s.diskReadMs ?? 0) + ms;
    if (this.waitingFor.has(i)) s.diskExposedMs = (s.diskExposedMs ?? 0) + ms;
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
    this.holder[i] = null;
  }

  async acquire(i: number): Promise<void> {
    if (!this.device) this.allocateDevice();
    const pending = this.inflight[i];
    if (!pending && this.holder[i]) return;
    const t0 = performance.now();
    this.waitingFor.add(i);
    try {
      await (pending ?? this.startUpload(i));
    } finally {
      this.waitingFor.delete(i);
    }
    this.stats.stallMs += performance.now() - t0;
  }

  prefetch(i: number): void {
    if (!this.prefetchEnabled || i >= this.images.length) return;
    if (!this.device) this.allocateDevice();
    if (this.holder[i]) return; // resident, or in its slot (or on its way) already
    void this.startUpload(i).catch(() => {}); // errors surface in acquire(i)
    this.stats.prefetched++;
  }

  release(_i: number): void {
    // the slot stays valid until another block is uploaded into it (its reader is then submitted first)
  }

  private freeSlot(i: number): number {
    // the slot not holding the block in use: ring order by streamed-block index within its group
    let g = 0;
    while (i >= this.groupStart[g + 1]!) g++;
    return (i - this.groupStart[g]! - this.resident) % this.slotTensors.length;
  }

  /** Give the GPU side back and restore host params. */
  dispose(): void {
    this.releaseDevice();
    // the params own their host tensors (views of the images) again; nothing else here keeps them
    for (const img of this.images) for (const { param } of img.entries) param.streamHost = null;
    this.images.length = 0;
    this.inflight.fill(null);
  }
}
