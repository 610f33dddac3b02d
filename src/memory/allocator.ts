// The caching allocator: owns every GPU buffer of the engine.
//
// WebGPU reports no memory use, so these counters *are* the engine's VRAM figures:
//   allocated = sum of the bytes requested by live allocations (what tensors hold), exact;
//   reserved  = sum of the sizes of the GPUBuffers held from the device (live + cached), exact.
// Freed blocks go back to a pool keyed by size class and are reused by later allocations of the
// same class; `emptyCache()` destroys the cached ones. Allocations larger than `exactAbove`
// (default 64 MiB) are not rounded to a class beyond 256 B alignment, because rounding a
// 1 GiB weight up by 6 % would waste more than most activations need; such a request takes a cached
// block up to 25 % larger when no exact one is free (takeLarger). At the limit, cached buffers are
// given back largest first until the new one fits (releaseCached), so `reserved` never crosses it.
//
// Safety of reuse: WebGPU orders all queue work, so a buffer freed after a kernel that reads it
// was *encoded* can be handed to a later kernel in the same command stream. The only hazard is
// `queue.writeBuffer` into a reused buffer while unsubmitted commands still read it; the engine
// flushes before every upload for that reason.
//
// Staging (upload) buffers are owned here too, with owner tags, but counted apart: `staging` bytes
// are host-visible MAP_WRITE | COPY_SRC memory. On a discrete GPU that memory is system RAM the copy
// engine reads (CUDA's pinned host buffers, which torch.cuda.memory_allocated/reserved do not
// count either), so it does not use the device memory that `limitBytes` protects, and the memory
// plans, which budget device memory, stay what they are. It is neither pooled nor in the history:
// its users keep it for long (a streaming ring) and free it explicitly.

import { OutOfMemoryError, fmtBytes } from '../util/errors.ts';

export interface BufferFactory {
  create(size: number, label: string): GPUBuffer;
  /** a host-visible upload buffer (MAP_WRITE | COPY_SRC), mapped at creation */
  createStaging(size: number, label: string): GPUBuffer;
  destroy(buffer: GPUBuffer): void;
}

/** A host-visible upload buffer from allocStaging (not device memory: see the header). */
export interface StagingBlock {
  readonly id: number;
  readonly buffer: GPUBuffer;
  /** bytes of the buffer */
  readonly size: number;
  readonly owner: string;
  live: boolean;
}

export interface Block {
  readonly id: number;
  readonly buffer: GPUBuffer;
  /** bytes held from the device (the size class) */
  readonly size: number;
  /** bytes asked for */
  requested: number;
  owner: string;
  phase: string;
  live: boolean;
}

export type MemoryAction = 'alloc' | 'free' | 'segment_alloc' | 'segment_free';

export interface MemoryEvent {
  /** ms since recording started */
  t: number;
  action: MemoryAction;
  /** requested bytes for alloc/free; buffer size for segment_* */
  bytes: number;
  id: number;
  owner: string;
  phase: string;
  /** counters right after the event */
  allocated: number;
  reserved: number;
}

export interface AllocatorOptions {
  /** budget in bytes for reserved memory; exceeding it throws OutOfMemoryError (after emptying the cache). */
  limitBytes?: number;
  /** allocations above this many bytes get their own exact-size buffer (rounded to 256 B). */
  exactAbove?: number;
  /** advice appended to out-of-memory errors (the pipeline knows which level or tile size would fit). */
  oomAdvice?: (requested: number) => string;
}

export interface MemoryStats {
  allocated: number;
  reserved: number;
  peakAllocated: number;
  peakReserved: number;
  numAllocs: number;
  numFrees: number;
  numSegments: number;
  cachedBytes: number;
  /** host-visible upload buffers held (not in allocated/reserved, not limited: see the header) */
  stagingBytes: number;
  peakStagingBytes: number;
}

const ALIGN = 256;
/** a cached large block serves a request up to this factor smaller (takeLarger) */
const LARGE_SLACK = 1.25;

/**
 * Size class of an allocation: at least 256 B, then 16 classes per power of two
 * (waste at most 1/16 = 6.25 %), exact-size (256-aligned) above `exactAbove`.
 */
export function sizeClass(bytes: number, exactAbove = 64 * 2 ** 20): number {
  if (bytes <= ALIGN) return ALIGN;
  const aligned = Math.ceil(bytes / ALIGN) * ALIGN;
  if (aligned > exactAbove) return aligned;
  const p = Math.floor(Math.log2(aligned));
  const step = Math.max(ALIGN, 2 ** (p - 4));
  return Math.ceil(aligned / step) * step;
}

export class CachingAllocator {
  private readonly factory: BufferFactory;
  private readonly pools = new Map<number, Block[]>();
  private readonly liveBlocks = new Map<number, Block>();
  /** the sum of the live blocks' ids (with their count: a cheap identity of the live set) */
  private liveIdSum = 0;
  private readonly liveStaging = new Map<number, StagingBlock>();
  private staging = 0;
  private peakStaging = 0;
  private nextId = 1;
  private allocated = 0;
  private reserved = 0;
  private peakAllocated = 0;
  private peakReserved = 0;
  private numAllocs = 0;
  private numFrees = 0;
  private numSegments = 0;
  private ownerStack: string[] = [];
  phase = 'idle';
  limitBytes: number;
  /** the device's largest buffer (maxBufferSize): a larger request is refused before the driver sees it */
  maxBufferBytes = Infinity;
  exactAbove: number;
  oomAdvice: (requested: number) => string;
  private recording: { t0: number; events: MemoryEvent[]; max: number; dropped: number } | null = null;

  constructor(factory: BufferFactory, opts: AllocatorOptions = {}) {
    this.factory = factory;
    this.limitBytes = opts.limitBytes ?? Infinity;
    this.exactAbove = opts.exactAbove ?? 64 * 2 ** 20;
    this.oomAdvice =
      opts.oomAdvice ??
      (() =>
        'Raise infer.diffusion.low_mem_level (1: tiled VAE decode, 2: text encoder off the GPU, 3: DiT streamed block by block), lower the resolution or frame count, or raise the memory budget.');
  }

  get currentOwner(): string {
    return this.ownerStack[this.ownerStack.length - 1] ?? 'activation';
  }

  /** true while some code has set an owner tag (withOwner / pushOwner) */
  get hasOwner(): boolean {
    return this.ownerStack.length > 0;
  }

  /** Run `fn` with `owner` as the tag of the allocations it makes (nested: innermost wins). */
  withOwner<T>(owner: string, fn: () => T): T {
    this.ownerStack.push(owner);
    try {
      return fn();
    } finally {
      this.ownerStack.pop();
    }
  }

  pushOwner(owner: string): void {
    this.ownerStack.push(owner);
  }
  popOwner(): void {
    this.ownerStack.pop();
  }

  alloc(bytes: number, owner: string = this.currentOwner): Block {
    if (!(bytes >= 0) || !Number.isFinite(bytes)) throw new RangeError(`[allocator] invalid size ${bytes}`);
    const cls = sizeClass(bytes, this.exactAbove);
    let block = this.pools.get(cls)?.pop() ?? (cls > this.exactAbove ? this.takeLarger(cls) : undefined);
    if (!block) {
      if (cls > this.maxBufferBytes) {
        throw new OutOfMemoryError(
          { phase: this.phase, owner, requestedBytes: bytes, allocatedBytes: this.allocated, reservedBytes: this.reserved, limitBytes: this.limitBytes },
          `One tensor of ${fmtBytes(bytes)} is larger than the device's largest buffer (maxBufferSize ${fmtBytes(this.maxBufferBytes)}): lower the resolution or frame count, or raise infer.diffusion.low_mem_level (tiled decode, chunked attention and FFN).`,
        );
      }
      if (this.reserved + cls > this.limitBytes) {
        this.releaseCached(this.reserved + cls - this.limitBytes);
        if (this.reserved + cls > this.limitBytes) {
          throw new OutOfMemoryError(
            {
              phase: this.phase,
              owner,
              requestedBytes: bytes,
              allocatedBytes: this.allocated,
              reservedBytes: this.reserved,
              limitBytes: this.limitBytes,
            },
            this.oomAdvice(bytes),
          );
        }
      }
      const buffer = this.factory.create(cls, owner);
      block = { id: this.nextId++, buffer, size: cls, requested: 0, owner, phase: this.phase, live: false };
      this.reserved += cls;
      this.numSegments++;
      if (this.reserved > this.peakReserved) this.peakReserved = this.reserved;
      this.record('segment_alloc', cls, block.id, owner);
    }
    block.requested = bytes;
    block.owner = owner;
    block.phase = this.phase;
    block.live = true;
    this.liveBlocks.set(block.id, block);
    this.liveIdSum += block.id;
    this.allocated += bytes;
    this.numAllocs++;
    if (this.allocated > this.peakAllocated) this.peakAllocated = this.allocated;
    this.record('alloc', bytes, block.id, owner);
    return block;
  }

  /**
   * A cached exact-size block at most LARGE_SLACK larger than `cls` (the smallest such): real-size
   * runs allocate many near-equal large tensors (the last of a run of token chunks, a tile at the
   * image's edge), and without this each distinct size kept its own buffers in the cache
   * (Wan 14B 720p, level 3: 16 GiB reserved for a 8.7 GiB peak, src/plan/ walk).
   */
  private takeLarger(cls: number): Block | undefined {
    let best = 0;
    for (const [size, pool] of this.pools) if (pool.length > 0 && size > cls && size <= cls * LARGE_SLACK && (best === 0 || size < best)) best = size;
    return best ? this.pools.get(best)!.pop() : undefined;
  }

  /**
   * Destroy cached (free) buffers, the largest first, until at least `bytes` are given back or the
   * cache is empty: a run held under a limit keeps the rest of its cache.
   */
  releaseCached(bytes: number): void {
    const sizes = [...this.pools.keys()].filter((k) => this.pools.get(k)!.length > 0).sort((a, b) => b - a);
    let freed = 0;
    for (const size of sizes) {
      const pool = this.pools.get(size)!;
      while (pool.length > 0 && freed < bytes) {
        const b = pool.pop()!;
        this.factory.destroy(b.buffer);
        this.reserved -= b.size;
        freed += b.size;
        this.record('segment_free', b.size, b.id, b.owner);
      }
      if (freed >= bytes) break;
    }
  }

  free(block: Block): void {
    if (!block.live) throw new Error(`[allocator] double free of block ${block.id} (${block.owner})`);
    block.live = false;
    this.liveBlocks.delete(block.id);
    this.liveIdSum -= block.id;
    this.allocated -= block.requested;
    this.numFrees++;
    this.record('free', block.requested, block.id, block.owner);
    let pool = this.pools.get(block.size);
    if (!pool) this.pools.set(block.size, (pool = []));
    pool.push(block);
  }

  /**
   * Re-tag a live block (a reused slot now holding other data, e.g. DiT block 7's weights): records
   * a free under the old owner and an alloc under the new one, so timelines show what the memory
   * holds; allocated/reserved are unchanged.
   */
  retag(block: Block, owner: string, bytes: number = block.requested): void {
    if (!block.live) throw new Error(`[allocator] retag of a free block ${block.id}`);
    this.allocated -= block.requested;
    this.record('free', block.requested, block.id, block.owner);
    block.owner = owner;
    block.phase = this.phase;
    block.requested = bytes;
    this.allocated += bytes;
    if (this.allocated > this.peakAllocated) this.peakAllocated = this.allocated;
    this.record('alloc', bytes, block.id, owner);
  }

  /**
   * A host-visible upload buffer of `bytes` (rounded up to 4), mapped at creation, tagged `owner`
   * (e.g. 'dit.blocks.slot.staging.0'). Counted in `stagingBytes`, not against the budget.
   */
  allocStaging(bytes: number, owner: string = this.currentOwner): StagingBlock {
    if (!(bytes > 0) || !Number.isFinite(bytes)) throw new RangeError(`[allocator] invalid staging size ${bytes}`);
    const size = Math.ceil(bytes / 4) * 4;
    const block: StagingBlock = { id: this.nextId++, buffer: this.factory.createStaging(size, owner), size, owner, live: true };
    this.liveStaging.set(block.id, block);
    this.staging += size;
    if (this.staging > this.peakStaging) this.peakStaging = this.staging;
    return block;
  }

  /** Destroy a staging buffer (after the copies that read it were encoded: WebGPU orders them first). */
  freeStaging(block: StagingBlock): void {
    if (!block.live) throw new Error(`[allocator] double free of staging buffer ${block.id} (${block.owner})`);
    block.live = false;
    this.liveStaging.delete(block.id);
    this.staging -= block.size;
    this.factory.destroy(block.buffer);
  }

  /** Host-visible upload bytes held (see allocStaging). */
  memoryStaging(): number {
    return this.staging;
  }

  liveStagingList(): StagingBlock[] {
    return [...this.liveStaging.values()];
  }

  /** Destroy every cached (free) buffer: reserved drops to what live allocations hold. */
  emptyCache(): void {
    for (const [, pool] of this.pools) {
      for (const b of pool) {
        this.factory.destroy(b.buffer);
        this.reserved -= b.size;
        this.record('segment_free', b.size, b.id, b.owner);
      }
    }
    this.pools.clear();
  }

  memoryAllocated(): number {
    return this.allocated;
  }
  memoryReserved(): number {
    return this.reserved;
  }
  maxMemoryAllocated(): number {
    return this.peakAllocated;
  }
  maxMemoryReserved(): number {
    return this.peakReserved;
  }
  resetPeakMemoryStats(): void {
    this.peakAllocated = this.allocated;
    this.peakReserved = this.reserved;
    this.peakStaging = this.staging;
  }

  /**
   * The state every later allocation depends on, as a string: live, reserved and staging bytes and
   * the cached buffers (count per size). Two equal signatures serve the same request sequence
   * alike: a meta walk repeats a DiT block without walking it only from the state it was walked
   * from (Engine.metaRepeat).
   */
  stateSignature(): string {
    return `${this.liveSignature()}|${this.cacheSignature()}`;
  }

  /** The live side of stateSignature: live and staging bytes, the live blocks (count, id sum), the limit. */
  liveSignature(): string {
    return `${this.allocated},${this.staging},${this.limitBytes},${this.liveBlocks.size},${this.liveIdSum}`;
  }

  /** The cache side of stateSignature: reserved bytes and the cached buffers (count per size). */
  cacheSignature(): string {
    const sizes = [...this.pools.keys()].sort((a, b) => a - b);
    let s = `${this.reserved}:`;
    for (const k of sizes) {
      const n = this.pools.get(k)!.length;
      if (n > 0) s += `${k}x${n},`;
    }
    return s;
  }

  /** The cached (free) buffers' sizes, ascending. */
  cachedSizes(): number[] {
    const out: number[] = [];
    for (const k of [...this.pools.keys()].sort((a, b) => a - b)) for (let i = 0; i < this.pools.get(k)!.length; i++) out.push(k);
    return out;
  }

  /**
   * Meta walks only (Engine.metaRepeat of a span that left other buffers cached than it found): the
   * cache becomes buffers of exactly these sizes, reserved following. No events are recorded (the
   * walked span's events already hold every peak the repeat would reach).
   */
  replaceCachedForMeta(sizes: readonly number[]): void {
    for (const [, pool] of this.pools) {
      for (const b of pool) {
        this.factory.destroy(b.buffer);
        this.reserved -= b.size;
      }
    }
    this.pools.clear();
    for (const size of sizes) {
      const block: Block = { id: this.nextId++, buffer: this.factory.create(size, 'cache'), size, requested: 0, owner: 'cache', phase: this.phase, live: false };
      let pool = this.pools.get(size);
      if (!pool) this.pools.set(size, (pool = []));
      pool.push(block);
      this.reserved += size;
      this.numSegments++;
    }
    if (this.reserved > this.peakReserved) this.peakReserved = this.reserved;
  }

  stats(): MemoryStats {
    let cached = 0;
    for (const [, pool] of this.pools) for (const b of pool) cached += b.size;
    return {
      allocated: this.allocated,
      reserved: this.reserved,
      peakAllocated: this.peakAllocated,
      peakReserved: this.peakReserved,
      numAllocs: this.numAllocs,
      numFrees: this.numFrees,
      numSegments: this.numSegments,
      cachedBytes: cached,
      stagingBytes: this.staging,
      peakStagingBytes: this.peakStaging,
    };
  }

  /** Live bytes grouped by owner tag truncated to `depth` dot-separated parts (e.g. depth 2: `dit.blocks`). */
  allocatedByOwner(depth = Infinity): Map<string, number> {
    const out = new Map<string, number>();
    for (const b of this.liveBlocks.values()) {
      const key = ownerGroup(b.owner, depth);
      out.set(key, (out.get(key) ?? 0) + b.requested);
    }
    return out;
  }

  liveBlockList(): Block[] {
    return [...this.liveBlocks.values()];
  }

  // ---- history ----

  /**
   * Start recording every alloc/free (keeps at most `maxEvents`, then counts the dropped ones).
   * `live: true` begins the history with what the device holds already (a long-lived pipeline's
   * weights: each cached or live segment and each live block as an event at t = 0, the running
   * totals climbing to today's), so a timeline started after load still shows them.
   */
  startRecording(maxEvents = 1_000_000, opts: { live?: boolean } = {}): void {
    const r = { t0: performance.now(), events: [] as MemoryEvent[], max: maxEvents, dropped: 0 };
    this.recording = r;
    if (!opts.live) return;
    let allocated = 0;
    let reserved = 0;
    const push = (action: MemoryAction, bytes: number, id: number, owner: string, phase: string) =>
      r.events.push({ t: 0, action, bytes, id, owner, phase, allocated, reserved });
    for (const b of this.liveBlocks.values()) {
      reserved += b.size;
      push('segment_alloc', b.size, b.id, b.owner, b.phase);
      allocated += b.requested;
      push('alloc', b.requested, b.id, b.owner, b.phase);
    }
    for (const [, pool] of this.pools) {
      for (const b of pool) {
        reserved += b.size;
        push('segment_alloc', b.size, b.id, b.owner, b.phase);
      }
    }
  }

  stopRecording(): MemoryEvent[] {
    const ev = this.recording?.events ?? [];
    this.recording = null;
    return ev;
  }

  get isRecording(): boolean {
    return this.recording !== null;
  }

  events(): readonly MemoryEvent[] {
    return this.recording?.events ?? [];
  }

  droppedEvents(): number {
    return this.recording?.dropped ?? 0;
  }

  private record(action: MemoryAction, bytes: number, id: number, owner: string): void {
    const r = this.recording;
    if (!r) return;
    if (r.events.length >= r.max) {
      r.dropped++;
      return;
    }
    r.events.push({
      t: performance.now() - r.t0,
      action,
      bytes,
      id,
      owner,
      phase: this.phase,
      allocated: this.allocated,
      reserved: this.reserved,
    });
  }
}

export function ownerGroup(owner: string, depth: number): string {
  if (!Number.isFinite(depth)) return owner;
  return owner.split('.').slice(0, depth).join('.');
}
