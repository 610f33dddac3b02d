// The GPU engine: device + caching allocator + pipeline cache + command encoding + sync points.
//
// Execution model. Ops encode dispatches into one open command encoder (one compute pass, or one
// pass per dispatch when profiling); nothing is submitted until a flush. Flushes happen at sync
// points (reads, `sync()`), before every upload (so `queue.writeBuffer` can never overtake
// unsubmitted reads of a reused buffer), and every `maxDispatchesPerSubmit` dispatches. Every
// dispatch's `Params` (given by field name, packed against the WGSL struct parsed once per pipeline:
// runtime/params.ts) go into one CPU-side staging block that is written to a uniform arena with a
// single `writeBuffer` right before the submit; queue order makes reusing the arena safe.

import { mapHeadroom } from '../device/maps.ts';
import { createGpu, type GpuContext, type GpuOptions } from '../device/gpu.ts';
import { adapterName, type AdapterCaps } from '../device/caps.ts';
import { WaitPredictor, sleep } from '../device/wait.ts';
import { CachingAllocator, type AllocatorOptions } from '../memory/allocator.ts';
import { kernelSource, kernelLine, specialize, kernelKey, moduleKey, type KernelSpec } from './kernels.ts';
import { Tensor, GpuStorage, numelOf, type HostArray, type Shape, type TensorDevice } from '../tensor/tensor.ts';
import { type DType, dtypeSize } from '../tensor/dtype.ts';
import { KernelProfile } from './profiler.ts';
import { parseParamLayout, packParams, type ParamLayout, type ParamValues } from './params.ts';
import { GpuError, OutOfMemoryError, ShapeError } from '../util/errors.ts';

export interface EngineOptions extends GpuOptions, AllocatorOptions {
  /** 'predict' (default): sleep for the predicted GPU time before awaiting; 'await': await at once. */
  waitMode?: 'predict' | 'await';
  /** record per-kernel GPU time with timestamp queries */
  profile?: boolean;
  maxDispatchesPerSubmit?: number;
}

export interface BufferBinding {
  buffer: GPUBuffer;
  offset: number;
  size: number;
}

export interface Dispatch {
  kernel: KernelSpec;
  /** name in profiles and error messages (default `family.entry`) */
  name?: string;
  /** the entry point's `Params` uniform by field name (see runtime/params.ts; `_` fields default to 0) */
  params?: ParamValues;
  /** storage bindings 1..n, matching kernel.layout */
  bindings: Array<Tensor | BufferBinding>;
  workgroups: readonly [number, number?, number?];
}

interface PipelineEntry {
  pipeline: GPUComputePipeline;
  /** the entry point's Params layout (null: it binds none); an Error is thrown at its first dispatch */
  params: ParamLayout | null | Error;
}

const PARAM_SLOT = 256;
const ARENA_SLOTS = 4096;
const QUERY_PAIRS = 1024;
/** dispatches the engine lets queue before throttle() waits (see throttle) */
const MAX_IN_FLIGHT = 20_000;

/** Engine.metaSpanStart's mark */
export interface MetaSpanMark {
  sig: string;
  dispatches: number;
  idle: number;
  /** dispatches in flight (submitted and not waited for, plus encoded) at the start */
  inFlight: number;
  throttles: number;
}

/** A recorded span of meta work (Engine.metaSpanEnd), repeatable by Engine.metaRepeat. */
export interface MetaSpan {
  /** the allocator's state before it (Allocator.stateSignature) */
  sig: string;
  /** the cached buffers it leaves when they differ from those it found (null: a cycle, the same state after) */
  cacheOut: number[] | null;
  dispatches: number;
  /** its outermost ops' work, in order */
  ops: Array<[string, number, number]>;
  /** the op of its last dispatch */
  lastAt: string;
  /** the queue waits inside it (throttle) */
  idles: number;
  /** throttle() checks inside it (waits or not) */
  throttles: number;
  /** with waits inside: the dispatches in flight it starts from (it repeats only from there), its highest, and where it ends */
  inFlight: number;
  peak: number;
  peakAt: string;
  end: [pending: number, encoded: number];
}

export class Engine implements TensorDevice {
  readonly gpu: GpuContext;
  readonly device: GPUDevice;
  readonly allocator: CachingAllocator;
  readonly profile = new KernelProfile();
  readonly predictor = new WaitPredictor();
  waitMode: 'predict' | 'await';
  profiling: boolean;
  maxDispatchesPerSubmit: number;

  private readonly pipelines = new Map<string, PipelineEntry>();
  /** spec object → its pipeline (a spec must not be mutated after its first dispatch) */
  private readonly pipelineBySpec = new WeakMap<KernelSpec, PipelineEntry>();
  private readonly modules = new Map<string, { module: GPUShaderModule; code: string }>();
  private readonly bgLayouts = new Map<string, GPUBindGroupLayout>();
  private readonly pipelineLayouts = new Map<string, GPUPipelineLayout>();
  private readonly scopeErrors: Array<Promise<{ name: string; error: GPUError | null }>> = [];
  private readonly oomChecks: Array<Promise<{ bytes: number; owner: string; phase: string; error: GPUError | null }>> = [];

  private encoder: GPUCommandEncoder | null = null;
  private pass: GPUComputePassEncoder | null = null;
  private readonly arena: GPUBuffer;
  private readonly paramStage = new Uint8Array(PARAM_SLOT * ARENA_SLOTS);
  private readonly paramView = new DataView(this.paramStage.buffer);
  private paramSlots = 0;
  private dispatchesInEncoder = 0;
  private readonly recentKernels: string[] = [];

  // submitted, not yet waited for
  private pendingWork = 0;
  private pendingDispatches = 0;
  private pendingSince = 0;
  /** a new pipeline was created for work not yet waited for: its compile time is not kernel time */
  private pendingCompiled = false;
  private lastPredicted = 0;

  // timestamp queries
  private querySet: GPUQuerySet | null = null;
  private queryResolve: GPUBuffer | null = null;
  /** per timestamp pair: the kernel's name and the op whose call encoded it */
  private queryNames: Array<[string, string | null]> = [];
  private readonly profileReads: Array<Promise<void>> = [];
  private readonly profilePending: Array<{ buf: GPUBuffer; names: Array<[string, string | null]> }> = [];
  /** the op whose GPU implementation is encoding now (outermost; see runOp) */
  private currentOp: string | null = null;

  private readonly stagingPool: GPUBuffer[] = [];
  private readonly scopes: Array<Set<Tensor>> = [];
  private destroyed = false;
  /** total dispatches encoded (for tests and stats) */
  dispatchCount = 0;
  submitCount = 0;
  /**
   * The most dispatches queued at once (submitted and not yet waited for, plus encoded): what
   * lavapipe's memory mappings scale with (see throttle). The planner reads it from a meta run,
   * and the preflight refuses a run whose count the device cannot hold.
   */
  maxInFlight = 0;
  /** the op that was encoding when maxInFlight was reached */
  maxInFlightAt = '';

  static async create(opts: EngineOptions = {}): Promise<Engine> {
    const gpu = await createGpu(opts);
    return new Engine(gpu, opts);
  }

  /**
   * An engine over a device that holds no memory and runs nothing (the memory planner's: see
   * src/plan/meta-gpu.ts): the allocator counts exactly as on a real device, reads give zeros.
   */
  static meta(gpu: GpuContext, opts: AllocatorOptions = {}): Engine {
    const e = new Engine(gpu, { ...opts, waitMode: 'await', profile: false });
    e.isMeta = true;
    return e;
  }

  /** true for Engine.meta (uploads may skip their data) */
  isMeta = false;
  /** meta walks: repeat recorded spans (metaRepeat); false walks everything (tests compare the two) */
  metaRepeats = true;
  /** meta walks: the outermost ops of the span being recorded (metaSpanStart) */
  private metaOps: Array<[string, number, number]> | null = null;
  /** times the queue was waited idle (a sync with work pending) */
  private idleCount = 0;
  /** throttle() calls (a meta span with none inside cannot wait inside whatever is in flight) */
  private throttleChecks = 0;
  private lastDispatchAt = '';
  /** the most dispatches in flight since metaSpanStart, and the op at that point */
  private spanPeak = 0;
  private spanPeakAt = '';

  /**
   * Meta walks (the planner's): start recording a span of work — a DiT block — so that later
   * identical spans can be repeated without walking them (metaRepeat). A 14B step is 40 identical
   * blocks; a planner's walk of 2 steps is ~10^5..10^6 meta dispatches, most of them repeats.
   */
  metaSpanStart(): MetaSpanMark {
    this.metaOps = [];
    const inFlight = this.pendingDispatches + this.dispatchesInEncoder;
    this.spanPeak = inFlight;
    this.spanPeakAt = this.lastDispatchAt;
    return { sig: this.allocator.stateSignature(), dispatches: this.dispatchCount, idle: this.idleCount, inFlight, throttles: this.throttleChecks };
  }

  /**
   * The recorded span, or null when it cannot be repeated exactly: it left other live allocations
   * than it found. (It may leave other buffers cached — a tile after the cache was emptied fills
   * it —: a repeat then sets the cache to what it left.)
   */
  metaSpanEnd(mark: MetaSpanMark): MetaSpan | null {
    const ops = this.metaOps ?? [];
    this.metaOps = null;
    const a = this.allocator;
    const sigOut = a.stateSignature();
    if (sigOut !== mark.sig && `${a.liveSignature()}|` !== mark.sig.slice(0, mark.sig.indexOf('|') + 1)) return null;
    return {
      sig: mark.sig,
      cacheOut: sigOut === mark.sig ? null : a.cachedSizes(),
      dispatches: this.dispatchCount - mark.dispatches,
      ops,
      lastAt: this.lastDispatchAt,
      idles: this.idleCount - mark.idle,
      throttles: this.throttleChecks - mark.throttles,
      inFlight: mark.inFlight,
      peak: this.spanPeak,
      peakAt: this.spanPeakAt,
      end: [this.pendingDispatches, this.dispatchesInEncoder],
    };
  }

  /**
   * Account a recorded span again instead of walking it — the same op work (onOpWork), dispatches
   * and dispatches in flight as walking it would — when the allocator is in the state the span was
   * recorded from (then its allocations would repeat exactly and leave that state again, so no peak
   * can differ). A span with queue waits inside (throttle: where they fall depends on the
   * dispatches in flight) repeats only from the count it was recorded from. Returns false (nothing
   * done) otherwise: walk it.
   */
  metaRepeat(span: MetaSpan): boolean {
    if (!this.isMeta || !this.metaRepeats || this.allocator.stateSignature() !== span.sig) return false;
    const inFlight = this.pendingDispatches + this.dispatchesInEncoder;
    if (span.idles > 0 && inFlight !== span.inFlight) return false;
    // no wait inside it, but from more dispatches in flight a throttle inside it could fire: walk it
    if (span.idles === 0 && span.throttles > 0 && inFlight + span.dispatches > this.throttleAt) return false;
    for (const [op, flops, bytes] of span.ops) {
      this.pendingWork += flops + bytes;
      this.onOpWork?.(op, flops, bytes);
    }
    if (span.cacheOut) this.allocator.replaceCachedForMeta(span.cacheOut);
    if (span.dispatches === 0) return true;
    this.dispatchCount += span.dispatches;
    this.lastDispatchAt = span.lastAt;
    let peak: number;
    let peakAt: string;
    if (span.idles === 0) {
      // no wait inside: its dispatches add to those in flight, the highest count at its end
      this.dispatchesInEncoder += span.dispatches;
      peak = inFlight + span.dispatches;
      peakAt = span.lastAt;
    } else {
      // the same waits at the same points: it ends where the recorded one ended
      this.flush();
      this.idleCount += span.idles;
      this.pendingWork = 0;
      [this.pendingDispatches, this.dispatchesInEncoder] = span.end;
      peak = span.peak;
      peakAt = span.peakAt;
    }
    if (this.dispatchesInEncoder > 0) this.encoder ??= this.device.createCommandEncoder();
    this.noteInFlight(peak, peakAt);
    if (this.dispatchesInEncoder >= this.maxDispatchesPerSubmit) this.flush();
    return true;
  }
  /** called with every outermost op's registry work (the planner's cost model listens here) */
  onOpWork: ((op: string, flops: number, bytes: number) => void) | null = null;

  /**
   * throttle() waits past this many queued dispatches: MAX_IN_FLIGHT on a GPU; on a software adapter
   * at most a third of the process's mapping headroom (device/maps.ts), so a lowered
   * vm.max_map_count still leaves room for the largest run of dispatches between two waits
   */
  readonly throttleAt: number;

  private constructor(gpu: GpuContext, opts: EngineOptions) {
    this.gpu = gpu;
    this.throttleAt = gpu.caps.adapterClass === 'gpu' ? MAX_IN_FLIGHT : Math.max(1000, Math.min(MAX_IN_FLIGHT, Math.floor(mapHeadroom() / 3)));
    this.device = gpu.device;
    this.waitMode = opts.waitMode ?? 'predict';
    this.profiling = (opts.profile ?? false) && gpu.caps.timestampQuery;
    this.maxDispatchesPerSubmit = opts.maxDispatchesPerSubmit ?? 512;
    const device = this.device;
    this.allocator = new CachingAllocator(
      {
        create: (size, label) => {
          device.pushErrorScope('out-of-memory');
          // UNIFORM too: kernels may bind packed operands as uniform buffers (matmul on lavapipe)
          const buffer = device.createBuffer({ size, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST, label });
          const owner = label;
          const phase = this.allocator?.phase ?? 'idle';
          this.oomChecks.push(device.popErrorScope().then((error) => ({ bytes: size, owner, phase, error })));
          return buffer;
        },
        createStaging: (size, label) => device.createBuffer({ size, usage: GPUBufferUsage.MAP_WRITE | GPUBufferUsage.COPY_SRC, mappedAtCreation: true, label }),
        // encoded-but-unsubmitted dispatches may still bind a cached buffer: submit them first
        destroy: (b) => {
          if (this.encoder) this.flush();
          b.destroy();
        },
      },
      opts,
    );
    this.allocator.maxBufferBytes = gpu.limits.maxBufferSize;
    this.arena = device.createBuffer({ size: PARAM_SLOT * ARENA_SLOTS, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST, label: 'params-arena' });
  }

  /** what the adapter can do: class, features, subgroup sizes, binding limits (device/caps.ts) */
  get caps(): AdapterCaps {
    return this.gpu.caps;
  }
  get limits(): GPUSupportedLimits {
    return this.gpu.limits;
  }
  get adapterName(): string {
    return adapterName(this.gpu.caps);
  }

  // ---------------------------------------------------------------- tensors

  /** An uninitialized GPU tensor. */
  empty(shape: Shape, dtype: DType = 'f32', owner?: string): Tensor {
    const n = numelOf(shape);
    const bytes = n * dtypeSize(dtype);
    const block = this.allocator.alloc(bytes, owner);
    return new Tensor({ shape, dtype, storage: new GpuStorage(this, block) });
  }

  /** Upload host data (raw words for f16/bf16) into a new GPU tensor. */
  fromHost(data: HostArray | Uint8Array, shape: Shape, dtype: DType, owner?: string): Tensor {
    const t = this.empty(shape, dtype, owner);
    this.write(t, data);
    return t;
  }

  /** Upload f32 values (converted to `dtype`). */
  fromValues(values: ArrayLike<number>, shape: Shape, dtype: DType = 'f32', owner?: string): Tensor {
    return Tensor.fromValues(values, shape, dtype).toGpu(this, owner);
  }

  zeros(shape: Shape, dtype: DType = 'f32', owner?: string): Tensor {
    const t = this.empty(shape, dtype, owner);
    this.fill(t, 0);
    return t;
  }

  /** Overwrite a GPU tensor with host bytes (length must match). */
  write(t: Tensor, data: HostArray | Uint8Array): void {
    const bytes = data instanceof Uint8Array ? data : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    if (bytes.byteLength !== t.nbytes) throw new ShapeError(`[upload] ${bytes.byteLength} bytes for ${t} (${t.nbytes} bytes)`);
    if (t.nbytes === 0) return;
    // unsubmitted commands may still read this (reused) buffer: submit them first
    this.flush();
    const off = t.byteOffset;
    if (off % 4 !== 0) throw new ShapeError(`[upload] ${t} starts at byte ${off}, not a multiple of 4`);
    if (bytes.byteLength % 4 === 0 && bytes.byteOffset % 4 === 0) {
      this.device.queue.writeBuffer(t.buffer, off, bytes.buffer, bytes.byteOffset, bytes.byteLength);
    } else {
      const padded = new Uint8Array(Math.ceil(bytes.byteLength / 4) * 4);
      padded.set(bytes);
      if (padded.byteLength > bytes.byteLength) {
        // keep the bytes after the tensor's end (a neighbouring view may own them): only whole
        // tensors of odd 16-bit length reach here, and those own their block.
      }
      this.device.queue.writeBuffer(t.buffer, off, padded.buffer, 0, padded.byteLength);
    }
  }

  /** Fill a tensor with a constant (f32 tensors: float; others: raw 32-bit pattern per 4 bytes). */
  fill(t: Tensor, value: number): void {
    if (t.nbytes === 0) return;
    if (value === 0) {
      this.endPass();
      const size = Math.ceil(t.nbytes / 4) * 4;
      this.enc().clearBuffer(t.buffer, t.byteOffset, Math.min(size, t.buffer.size - t.byteOffset));
      return;
    }
    const n = t.numel;
    if (t.dtype !== 'f32') throw new ShapeError(`[fill] non-zero fill needs f32, got ${t.dtype}`);
    this.write(t, new Float32Array(n).fill(value));
  }

  /** Copy bytes between GPU buffers (offsets and size multiples of 4). */
  copyBuffer(src: GPUBuffer, srcOffset: number, dst: GPUBuffer, dstOffset: number, size: number): void {
    if (size === 0) return;
    this.endPass();
    this.enc().copyBufferToBuffer(src, srcOffset, dst, dstOffset, size);
  }

  /** A new tensor with the same contents (GPU copy). */
  clone(t: Tensor, owner?: string): Tensor {
    const out = this.empty(t.shape, t.dtype, owner);
    const size = Math.ceil(t.nbytes / 4) * 4;
    if (t.byteOffset % 4 !== 0) throw new ShapeError(`[clone] ${t} starts at byte ${t.byteOffset}, not a multiple of 4`);
    this.copyBuffer(t.buffer, t.byteOffset, out.buffer, 0, Math.min(size, t.buffer.size - t.byteOffset));
    return out;
  }

  /**
   * `v` itself when it can be bound as it is (a view whose byte offset is a multiple of
   * storageAlign), else a copy, and `v` is disposed: rows of a table or weight as an op input.
   */
  bindable(v: Tensor): Tensor {
    if (v.byteOffset % this.caps.storageAlign === 0) return v;
    const c = this.clone(v);
    v.dispose();
    return c;
  }

  /** Storage binding for a tensor (checks alignment and the per-binding size limit). */
  binding(t: Tensor, what = 'tensor'): BufferBinding {
    t.assertLive();
    const buffer = t.buffer;
    if (t.byteOffset % this.caps.storageAlign !== 0) {
      throw new ShapeError(`[${what}] ${t} is a view at byte offset ${t.byteOffset}, not a multiple of ${this.caps.storageAlign}; clone it first`);
    }
    const size = Math.min(Math.max(4, Math.ceil(t.nbytes / 4) * 4), buffer.size - t.byteOffset);
    if (size > this.caps.maxBinding) {
      throw new ShapeError(
        `[${what}] ${t} is ${size} bytes, above this adapter's maxStorageBufferBindingSize (${this.caps.maxBinding}); the op must split it`,
      );
    }
    return { buffer, offset: t.byteOffset, size };
  }

  // ---------------------------------------------------------------- scopes

  /** Run `fn`; GPU tensors it creates are disposed afterwards unless returned (found in the result). */
  scope<T>(fn: () => T): T {
    this.scopes.push(new Set());
    let result: T;
    try {
      result = fn();
    } catch (e) {
      this.endScope(undefined);
      throw e;
    }
    if (result instanceof Promise) throw new Error('[scope] use scopeAsync for async functions');
    this.endScope(result);
    return result;
  }

  async scopeAsync<T>(fn: () => Promise<T>): Promise<T> {
    this.scopes.push(new Set());
    let result: T;
    try {
      result = await fn();
    } catch (e) {
      this.endScope(undefined);
      throw e;
    }
    this.endScope(result);
    return result;
  }

  /** Exclude tensors from every enclosing scope (they must be disposed by hand). */
  keep<T extends Tensor | Tensor[]>(t: T): T {
    for (const x of Array.isArray(t) ? t : [t]) for (const s of this.scopes) s.delete(x);
    return t;
  }

  /** @internal called by the Tensor constructor */
  track(t: Tensor): void {
    this.scopes[this.scopes.length - 1]?.add(t);
  }
  /** @internal */
  untrack(t: Tensor): void {
    this.scopes[this.scopes.length - 1]?.delete(t);
  }

  private endScope(result: unknown): void {
    const mine = this.scopes.pop()!;
    const keep = new Set<Tensor>();
    collectTensors(result, keep, 0);
    const parent = this.scopes[this.scopes.length - 1];
    for (const t of mine) {
      if (keep.has(t)) parent?.add(t);
      else t.dispose();
    }
  }

  // ---------------------------------------------------------------- kernels

  private moduleFor(spec: KernelSpec): { module: GPUShaderModule; code: string } {
    const key = moduleKey(spec);
    let m = this.modules.get(key);
    if (!m) {
      const code = specialize(spec.family, kernelSource(spec.family), spec.aliases);
      m = { module: this.device.createShaderModule({ code, label: `${spec.family}.wgsl` }), code };
      this.modules.set(key, m);
    }
    return m;
  }

  private layoutFor(layout: KernelSpec['layout']): GPUPipelineLayout {
    const key = layout.join(',');
    let pl = this.pipelineLayouts.get(key);
    if (!pl) {
      const entries: GPUBindGroupLayoutEntry[] = [{ binding: 0, visibility: GPUShaderStage.COMPUTE, buffer: { type: 'uniform' } }];
      layout.forEach((k, i) =>
        entries.push({
          binding: i + 1,
          visibility: GPUShaderStage.COMPUTE,
          buffer: { type: k === 'read' ? 'read-only-storage' : k === 'uniform' ? 'uniform' : 'storage' },
        }),
      );
      const bgl = this.device.createBindGroupLayout({ entries, label: `layout(${key})` });
      this.bgLayouts.set(key, bgl);
      pl = this.device.createPipelineLayout({ bindGroupLayouts: [bgl] });
      this.pipelineLayouts.set(key, pl);
    }
    return pl;
  }

  /** The compute pipeline for a kernel spec (cached by a key derived from the spec). */
  pipeline(spec: KernelSpec): GPUComputePipeline {
    return this.pipelineEntry(spec).pipeline;
  }

  private pipelineEntry(spec: KernelSpec): PipelineEntry {
    // an op that reuses one spec object for its dispatches (matmul's tile loop) skips the key
    const known = this.pipelineBySpec.get(spec);
    if (known) return known;
    const p = this.pipelineForKey(spec);
    this.pipelineBySpec.set(spec, p);
    return p;
  }

  private pipelineForKey(spec: KernelSpec): PipelineEntry {
    const key = kernelKey(spec);
    let p = this.pipelines.get(key);
    if (!p) {
      const name = `${spec.family}.${spec.entry}`;
      this.device.pushErrorScope('validation');
      const { module, code } = this.moduleFor(spec);
      const pipeline = this.device.createComputePipeline({
        layout: this.layoutFor(spec.layout),
        compute: { module, entryPoint: spec.entry, constants: spec.constants ?? {} },
        label: name,
      });
      this.scopeErrors.push(
        this.device.popErrorScope().then(async (error) => {
          if (!error) return { name, error };
          let detail = '';
          try {
            const info = await module.getCompilationInfo();
            detail = info.messages.map((m) => `  ${m.type} ${kernelLine(spec.family, m.lineNum)}:${m.linePos} ${m.message}`).join('\n');
          } catch {
            /* ignore */
          }
          return { name, error: detail ? ({ message: `${error.message}\n${detail}` } as GPUError) : error };
        }),
      );
      let params: PipelineEntry['params'];
      try {
        params = parseParamLayout(code, spec.entry);
        if (params && params.size > PARAM_SLOT) params = new Error(`[${name}] params: struct ${params.struct} is ${params.size} bytes, above the ${PARAM_SLOT}-byte arena slot`);
      } catch (e) {
        params = new Error(`[${name}] ${(e as Error).message}`);
      }
      p = { pipeline, params };
      this.pipelines.set(key, p);
      // lavapipe compiles at the first dispatch (0.5-7 s): keep that out of the wait predictor
      this.pendingCompiled = true;
    }
    return p;
  }

  /** Pre-create the pipeline and report WGSL errors now (tests use this). */
  async compile(spec: KernelSpec): Promise<void> {
    this.pipeline(spec);
    await this.checkErrors();
  }

  private enc(): GPUCommandEncoder {
    if (!this.encoder) this.encoder = this.device.createCommandEncoder();
    return this.encoder;
  }

  private endPass(): void {
    if (this.pass) {
      this.pass.end();
      this.pass = null;
    }
  }

  /**
   * Run an op's GPU implementation (called by the op registry): its registry flops + bytes are the
   * work the wait predictor sees, and when profiling, the GPU time of its dispatches is the op's.
   * An op built from other ops counts once, as itself.
   */
  runOp<T>(op: string, flops: number, bytes: number, encode: () => T): T {
    if (this.currentOp !== null) return encode();
    this.pendingWork += flops + bytes;
    this.onOpWork?.(op, flops, bytes);
    this.metaOps?.push([op, flops, bytes]);
    if (this.profiling) this.profile.addOp(op, flops, bytes);
    this.currentOp = op;
    // an op's outputs and workspaces, unless the caller tagged them, are `activation.<op>`: memory
    // snapshots and the planner's per-owner breakdown (src/plan/) show which op holds what
    const tag = !this.allocator.hasOwner;
    if (tag) this.allocator.pushOwner(`activation.${op}`);
    try {
      return encode();
    } finally {
      if (tag) this.allocator.popOwner();
      this.currentOp = null;
    }
  }

  /**
   * Wait for the GPU when more than `throttleAt` dispatches were submitted since the last wait.
   * Long loops (the DiT's blocks) call it between iterations: lavapipe keeps memory mappings for the
   * work it has queued, and a 1.3B-shaped step at 8,192 tokens or more (85,000 dispatches before
   * the read-back) crossed the kernel's 65,530-mapping limit and died with SIGSEGV in Dawn's
   * descriptor-pool allocation. On a GPU the wait costs one idle gap per 20,000 dispatches.
   */
  async throttle(): Promise<void> {
    this.throttleChecks++;
    if (this.pendingDispatches + this.dispatchesInEncoder > this.throttleAt) await this.sync();
  }

  /** Add work (flops + bytes) not encoded through an op, e.g. a benchmark's bare kernel. */
  addWork(work: number): void {
    this.pendingWork += work;
  }

  /** Encode one dispatch. Zero-sized grids are skipped. */
  dispatch(d: Dispatch): void {
    const [x, y = 1, z = 1] = d.workgroups;
    const name = d.name ?? `${d.kernel.family}.${d.kernel.entry}`;
    if (x === 0 || y === 0 || z === 0) return;
    const maxWg = this.limits.maxComputeWorkgroupsPerDimension;
    if (x > maxWg || y > maxWg || z > maxWg) {
      throw new ShapeError(`[${name}] grid ${x}x${y}x${z} exceeds ${maxWg} workgroups per dimension; the op must tile its dispatch`);
    }
    if (d.bindings.length !== d.kernel.layout.length) {
      throw new Error(`[${name}] ${d.bindings.length} bindings for a layout of ${d.kernel.layout.length}`);
    }
    if (this.destroyed) throw new Error('[engine] used after destroy()');
    if (this.isMeta) return this.metaDispatch(d, name);
    const { pipeline, params: layout } = this.pipelineEntry(d.kernel);
    if (layout instanceof Error) throw layout;
    if (!layout && d.params && Object.keys(d.params).length > 0) {
      throw new Error(`[${d.kernel.family}.${d.kernel.entry}] params: the entry point binds no Params uniform at @group(0) @binding(0)`);
    }
    if (this.paramSlots >= ARENA_SLOTS) this.flush();
    const slot = this.paramSlots;
    if (layout) {
      try {
        packParams(layout, d.params ?? {}, this.paramView, slot * PARAM_SLOT);
      } catch (e) {
        // a mismatch between the op's call and the WGSL struct: a bug, never a silent garbage kernel
        throw new Error(`[${d.kernel.family}.${d.kernel.entry}] ${(e as Error).message}`);
      }
    }
    this.paramSlots++;
    const entries: GPUBindGroupEntry[] = [{ binding: 0, resource: { buffer: this.arena, offset: slot * PARAM_SLOT, size: layout ? layout.size : 16 } }];
    d.bindings.forEach((b, i) => {
      const r = b instanceof Tensor ? this.binding(b, name) : b;
      entries.push({ binding: i + 1, resource: { buffer: r.buffer, offset: r.offset, size: r.size } });
    });
    const bindGroup = this.device.createBindGroup({ layout: this.bgLayouts.get(d.kernel.layout.join(','))!, entries });
    let pass: GPUComputePassEncoder;
    if (this.profiling) {
      this.endPass();
      if (!this.querySet) {
        this.querySet = this.device.createQuerySet({ type: 'timestamp', count: QUERY_PAIRS * 2 });
        this.queryResolve = this.device.createBuffer({ size: QUERY_PAIRS * 16, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
      }
      if (this.queryNames.length >= QUERY_PAIRS) this.flush();
      const q = this.queryNames.length;
      this.queryNames.push([name, this.currentOp]);
      pass = this.enc().beginComputePass({ timestampWrites: { querySet: this.querySet, beginningOfPassWriteIndex: 2 * q, endOfPassWriteIndex: 2 * q + 1 } });
      this.pass = pass;
    } else {
      if (!this.pass) this.pass = this.enc().beginComputePass();
      pass = this.pass;
    }
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    pass.dispatchWorkgroups(x, y, z);
    if (this.profiling) this.endPass();
    this.dispatchCount++;
    this.dispatchesInEncoder++;
    if (this.pendingDispatches + this.dispatchesInEncoder > this.maxInFlight) {
      this.maxInFlight = this.pendingDispatches + this.dispatchesInEncoder;
      this.maxInFlightAt = this.currentOp ?? name;
    }
    this.recentKernels.push(name);
    if (this.recentKernels.length > 16) this.recentKernels.shift();
    if (this.dispatchesInEncoder >= this.maxDispatchesPerSubmit) this.flush();
  }

  /**
   * A dispatch on the planner's meta device (Engine.meta): what a real dispatch checks that depends
   * on sizes (the binding windows against the device's limits) and what the planner reads (dispatch
   * counts, the dispatches in flight, submissions at the same points as a real run); no pipeline,
   * no params, no bind group — nothing that allocates or that a real run would not also check
   * (a WGSL or params mismatch is a bug every real run of the op reports). This is most of a
   * planner's walk: ~10^6 dispatches at 14B 720p.
   */
  private metaDispatch(d: Dispatch, name: string): void {
    if (this.paramSlots >= ARENA_SLOTS) this.flush();
    for (const b of d.bindings) if (b instanceof Tensor) this.binding(b, name);
    this.metaDispatches(1, name);
  }

  /**
   * `n` dispatches of `name` on the meta device, counted as `n` dispatch() calls whose bindings are
   * plain buffer ranges (nothing to check) would count them: for an op's inner loop that only
   * repeats one kernel over tiles (matmul's), which the planner's walk would otherwise spend most
   * of its time and garbage on.
   */
  metaDispatches(n: number, name: string): void {
    if (!this.isMeta) throw new Error('[engine] metaDispatches is for the meta device');
    if (n <= 0) return;
    this.encoder ??= this.device.createCommandEncoder();
    this.paramSlots = Math.min(ARENA_SLOTS, this.paramSlots + n);
    this.dispatchCount += n;
    this.dispatchesInEncoder += n;
    this.lastDispatchAt = this.currentOp ?? name;
    this.noteInFlight(this.pendingDispatches + this.dispatchesInEncoder, this.lastDispatchAt);
    if (this.dispatchesInEncoder >= this.maxDispatchesPerSubmit) this.flush();
  }

  /** a count of dispatches in flight reached at `at`: the span's and the run's highest (meta walks) */
  private noteInFlight(inFlight: number, at: string): void {
    if (inFlight > this.spanPeak) {
      this.spanPeak = inFlight;
      this.spanPeakAt = at;
    }
    if (inFlight > this.maxInFlight) {
      this.maxInFlight = inFlight;
      this.maxInFlightAt = at;
    }
  }

  /** Submit everything encoded so far. */
  flush(): void {
    if (!this.encoder) return;
    this.endPass();
    const enc = this.encoder;
    let profileRead: { buf: GPUBuffer; names: Array<[string, string | null]> } | null = null;
    if (this.profiling && this.queryNames.length > 0) {
      const n = this.queryNames.length;
      enc.resolveQuerySet(this.querySet!, 0, 2 * n, this.queryResolve!, 0);
      const buf = this.device.createBuffer({ size: n * 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
      enc.copyBufferToBuffer(this.queryResolve!, 0, buf, 0, n * 16);
      profileRead = { buf, names: this.queryNames };
      this.queryNames = [];
    }
    if (this.paramSlots > 0) {
      this.device.queue.writeBuffer(this.arena, 0, this.paramStage.buffer, 0, this.paramSlots * PARAM_SLOT);
    }
    this.device.queue.submit([enc.finish()]);
    this.submitCount++;
    if (this.pendingDispatches === 0) this.pendingSince = performance.now();
    this.pendingDispatches += this.dispatchesInEncoder;
    this.encoder = null;
    this.paramSlots = 0;
    this.dispatchesInEncoder = 0;
    // timestamps are mapped at the next sync point, after its sleep: a pending mapAsync here would
    // make dawn.node busy-poll the main thread for the whole GPU run
    if (profileRead) this.profilePending.push(profileRead);
  }

  private readProfiles(): Promise<void> {
    const pend = this.profilePending.splice(0);
    for (const { buf, names } of pend) {
      this.profileReads.push(
        buf.mapAsync(GPUMapMode.READ).then(() => {
          const ts = new BigInt64Array(buf.getMappedRange());
          for (let i = 0; i < names.length; i++) {
            const ns = Number(ts[2 * i + 1]! - ts[2 * i]!);
            this.profile.add(names[i]![0], Math.max(0, ns) / 1e6, names[i]![1]);
          }
          buf.unmap();
          buf.destroy();
        }),
      );
    }
    return Promise.all(this.profileReads.splice(0)).then(() => {});
  }

  /** Sleep for the predicted remaining GPU time of submitted work (see device/wait.ts). */
  private async sleepPredicted(): Promise<void> {
    // (the meta device runs nothing: a planner's walk must not sleep the predicted GPU time)
    if (this.isMeta || this.waitMode !== 'predict' || this.pendingDispatches === 0) return;
    const predicted = this.predictor.predict(this.pendingWork, this.pendingDispatches);
    this.lastPredicted = predicted;
    const remaining = this.predictor.sleepFor(predicted) - (performance.now() - this.pendingSince);
    if (remaining >= this.predictor.minSleepMs) await sleep(remaining);
  }

  private observeDone(tAwaitStart: number, learn = true): void {
    if (this.pendingDispatches === 0) return;
    const now = performance.now();
    const total = now - this.pendingSince;
    const awaited = now - tAwaitStart;
    // an await that returned at once means we over-slept: the true time is below `total`
    if (!this.pendingCompiled && learn) {
      if (awaited < 0.3 && this.lastPredicted > 0) this.predictor.observeOversleep(this.pendingWork, this.pendingDispatches, this.lastPredicted);
      else this.predictor.observe(this.pendingWork, this.pendingDispatches, total);
    }
    this.lastPredicted = 0;
    this.pendingCompiled = false;
    this.pendingWork = 0;
    this.pendingDispatches = 0;
    this.idleCount++;
  }

  /**
   * Let Dawn give back the memory of buffers destroyed so far (`allocator.emptyCache()`, a freed
   * ring). Dawn deallocates a destroyed buffer only at a device tick after the work that used it has
   * completed, and it ticks on submissions: measured on lavapipe, two 512 MiB buffers stayed mapped
   * (RssShmem) after destroy(), onSubmittedWorkDone and 500 ms idle, and went at the second empty
   * submission after it. Without this the next phase's buffers come on top of the last phase's
   * (14B-shaped level 3: 2.8 GiB still mapped at the start of decode, docs/disk-streaming.md).
   */
  async settleFrees(): Promise<void> {
    this.flush();
    for (let i = 0; i < 2; i++) {
      this.device.queue.submit([this.device.createCommandEncoder({ label: 'settle frees' }).finish()]);
      await this.device.queue.onSubmittedWorkDone();
    }
  }

  /** Wait until all submitted work is done; throws GPU errors (naming the kernels) and OOMs. */
  async sync(opts: { sleep?: boolean } = {}): Promise<void> {
    this.flush();
    // sleep: false when the caller has slept its own estimate already (the pipeline's per-block
    // waits): that wait's time (its sleep, or a spin that slows lavapipe) is not the GPU's, so the
    // predictor does not learn from it either
    if (opts.sleep !== false) await this.sleepPredicted();
    const t = performance.now();
    await this.device.queue.onSubmittedWorkDone();
    this.observeDone(t, opts.sleep !== false);
    await this.readProfiles();
    await this.checkErrors();
  }

  /** Read a GPU tensor's bytes to the host. */
  async read(t: Tensor): Promise<Uint8Array> {
    t.assertLive();
    const n = t.nbytes;
    if (this.isMeta) return new Uint8Array(n); // no data on the meta device: zeros
    if (n === 0) {
      await this.checkErrors();
      return new Uint8Array(0);
    }
    const start = Math.floor(t.byteOffset / 4) * 4;
    const end = Math.min(Math.ceil((t.byteOffset + n) / 4) * 4, t.buffer.size);
    const size = end - start;
    const staging = this.takeStaging(size);
    this.endPass();
    this.enc().copyBufferToBuffer(t.buffer, start, staging, 0, size);
    this.flush();
    await this.sleepPredicted();
    const t0 = performance.now();
    try {
      await staging.mapAsync(GPUMapMode.READ, 0, size);
    } catch (e) {
      await this.checkErrors();
      throw new GpuError(`[read] mapping ${t} for reading failed: ${(e as Error).message}`, { cause: e });
    }
    this.observeDone(t0);
    const out = new Uint8Array(n);
    out.set(new Uint8Array(staging.getMappedRange(0, size), t.byteOffset - start, n));
    staging.unmap();
    this.stagingPool.push(staging);
    await this.readProfiles();
    await this.checkErrors();
    return out;
  }

  private takeStaging(size: number): GPUBuffer {
    const i = this.stagingPool.findIndex((b) => b.size >= size && b.size <= size * 2);
    if (i >= 0) return this.stagingPool.splice(i, 1)[0]!;
    if (this.stagingPool.length > 4) this.stagingPool.shift()!.destroy();
    return this.device.createBuffer({ size: Math.ceil(size / 256) * 256, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST, label: 'readback' });
  }

  /** Throw the first GPU error since the last check, naming the kernel(s). */
  async checkErrors(): Promise<void> {
    const scoped = await Promise.all(this.scopeErrors.splice(0));
    const bad = scoped.find((s) => s.error);
    if (bad) throw new GpuError(`[${bad.name}] kernel failed to compile or validate: ${bad.error!.message}`);
    const ooms = await Promise.all(this.oomChecks.splice(0));
    const oom = ooms.find((o) => o.error);
    if (oom) {
      throw new OutOfMemoryError(
        {
          phase: oom.phase,
          owner: oom.owner,
          requestedBytes: oom.bytes,
          allocatedBytes: this.allocator.memoryAllocated(),
          reservedBytes: this.allocator.memoryReserved(),
          limitBytes: this.allocator.limitBytes,
        },
        `The device itself ran out of memory (${oom.error!.message}). ` + this.allocator.oomAdvice(oom.bytes),
      );
    }
    const errs = this.gpu.takeErrors();
    if (errs.length > 0) {
      const e = errs[0]!;
      const kernels = this.recentKernels.join(', ');
      if (e.kind === 'out-of-memory') {
        throw new OutOfMemoryError(
          {
            phase: this.allocator.phase,
            owner: 'unknown',
            requestedBytes: 0,
            allocatedBytes: this.allocator.memoryAllocated(),
            reservedBytes: this.allocator.memoryReserved(),
            limitBytes: this.allocator.limitBytes,
          },
          `The device reported: ${e.message}. ` + this.allocator.oomAdvice(0),
        );
      }
      throw new GpuError(`GPU ${e.kind} error near kernels [${kernels}]: ${e.message}${errs.length > 1 ? ` (+${errs.length - 1} more)` : ''}`);
    }
  }

  /** Give back the device. The engine cannot be used afterwards; Node can exit. */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    try {
      this.flush();
    } catch {
      /* the device may be lost already */
    }
    this.gpu.destroy();
    this.pipelines.clear();
    this.modules.clear();
  }

  get isDestroyed(): boolean {
    return this.destroyed;
  }
}

/** The engine a GPU tensor lives on (null for a CPU tensor). */
export function engineOf(t: Tensor): Engine | null {
  const d = t.gpuDevice;
  if (d && !(d instanceof Engine)) throw new Error(`[engine] ${t} lives on a device that is not an Engine`);
  return d;
}

function collectTensors(v: unknown, out: Set<Tensor>, depth: number): void {
  if (depth > 4 || v === null || v === undefined) return;
  if (v instanceof Tensor) {
    out.add(v);
    return;
  }
  if (Array.isArray(v)) {
    for (const x of v) collectTensors(x, out, depth + 1);
    return;
  }
  if (v instanceof Map) {
    for (const x of v.values()) collectTensors(x, out, depth + 1);
    return;
  }
  if (typeof v === 'object' && Object.getPrototypeOf(v) === Object.prototype) {
    for (const x of Object.values(v as Record<string, unknown>)) collectTensors(x, out, depth + 1);
  }
}
