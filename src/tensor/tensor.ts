// Tensor = shape + dtype + a view of storage, in PyTorch dimension order (row-major, last dim
// contiguous). Tensors are always contiguous; views (reshape, slice along dim 0, a typed view of a
// byte range: viewBytes) are cheap and share storage by reference count. Anything else (permute,
// strided slices) is an op. GPU storage belongs to a TensorDevice (the runtime's Engine).
//
// A tensor lives on the GPU (storage = a block of the caching allocator) or on the CPU device
// (storage = a typed array: Float32Array for f32, Uint16Array of raw bits for f16/bf16,
// Int32Array / Uint32Array for ints).

import type { Block } from '../memory/allocator.ts';
import { type DType, dtypeSize, decode, encode } from './dtype.ts';
import { ShapeError } from '../util/errors.ts';

export type HostArray = Float32Array | Uint16Array | Int32Array | Uint32Array;

export type Shape = readonly number[];

export function numelOf(shape: Shape): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

function checkShape(shape: Shape, what = 'tensor'): void {
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0) throw new ShapeError(`[${what}] invalid shape [${shape.join(', ')}]: dimensions must be integers >= 0`);
  }
}

export function shapeStr(shape: Shape): string {
  return `[${shape.join(', ')}]`;
}

/**
 * What GPU tensors need from the device that made them: the runtime's Engine implements it (the
 * tensor layer sits below the runtime and does not import it; `engineOf(t)` in runtime/engine.ts
 * gives the Engine back to code above).
 */
export interface TensorDevice {
  /** the allocator that owns the storage blocks (a block goes back when its last view is disposed) */
  readonly allocator: { free(block: Block): void };
  /** a new GPU tensor joins the innermost scope; a disposed one leaves it */
  track(t: Tensor): void;
  untrack(t: Tensor): void;
  /** the tensor's bytes, read back to the host */
  read(t: Tensor): Promise<Uint8Array>;
  /** upload host data (raw words for f16/bf16) into a new GPU tensor */
  fromHost(data: HostArray, shape: Shape, dtype: DType, owner?: string): Tensor;
}

/** Storage shared between a GPU tensor and its views. */
export class GpuStorage {
  refs = 1;
  constructor(
    readonly device: TensorDevice,
    public block: Block | null,
  ) {}
  get buffer(): GPUBuffer {
    if (!this.block) throw new Error('[tensor] use of a disposed tensor');
    return this.block.buffer;
  }
  release(): void {
    if (--this.refs === 0 && this.block) {
      this.device.allocator.free(this.block);
      this.block = null;
    }
  }
}

/** A typed array of `n` elements of `dtype` over `buffer` at `byteOffset` (no copy). */
function hostView(dtype: DType, buffer: ArrayBufferLike, byteOffset: number, n: number): HostArray {
  switch (dtype) {
    case 'f32':
      return new Float32Array(buffer, byteOffset, n);
    case 'f16':
    case 'bf16':
      return new Uint16Array(buffer, byteOffset, n);
    case 'i32':
      return new Int32Array(buffer, byteOffset, n);
    case 'u32':
      return new Uint32Array(buffer, byteOffset, n);
  }
}

function hostArrayFor(dtype: DType, n: number): HostArray {
  switch (dtype) {
    case 'f32':
      return new Float32Array(n);
    case 'f16':
    case 'bf16':
      return new Uint16Array(n);
    case 'i32':
      return new Int32Array(n);
    case 'u32':
      return new Uint32Array(n);
  }
}

export class Tensor {
  readonly shape: Shape;
  readonly dtype: DType;
  /** GPU storage (null for CPU tensors) */
  readonly storage: GpuStorage | null;
  /** byte offset of element 0 inside the GPU buffer */
  readonly byteOffset: number;
  /** CPU data (null for GPU tensors) */
  readonly data: HostArray | null;
  private disposed = false;

  constructor(init: { shape: Shape; dtype: DType; storage?: GpuStorage; byteOffset?: number; data?: HostArray }) {
    checkShape(init.shape);
    this.shape = Object.freeze([...init.shape]);
    this.dtype = init.dtype;
    this.storage = init.storage ?? null;
    this.byteOffset = init.byteOffset ?? 0;
    this.data = init.data ?? null;
    if (this.storage) this.storage.device.track(this);
  }

  // ---- construction on the CPU device ----

  /** A CPU tensor over `data` (not copied). f16/bf16 take raw 16-bit words. */
  static cpu(data: HostArray, shape: Shape, dtype?: DType): Tensor {
    const dt = dtype ?? (data instanceof Float32Array ? 'f32' : data instanceof Int32Array ? 'i32' : data instanceof Uint32Array ? 'u32' : 'bf16');
    const n = numelOf(shape);
    if (data.length !== n) throw new ShapeError(`[tensor] ${data.length} values do not fill shape ${shapeStr(shape)} (${n} elements)`);
    return new Tensor({ shape, dtype: dt, data });
  }

  /** A CPU tensor from numbers, stored as `dtype` (rounded for f16/bf16). */
  static fromValues(values: ArrayLike<number>, shape: Shape, dtype: DType = 'f32'): Tensor {
    const n = numelOf(shape);
    if (values.length !== n) throw new ShapeError(`[tensor] ${values.length} values do not fill shape ${shapeStr(shape)} (${n} elements)`);
    const bytes = encode(dtype, values);
    const arr = hostArrayFor(dtype, n);
    new Uint8Array(arr.buffer).set(bytes);
    return new Tensor({ shape, dtype, data: arr });
  }

  /**
   * A host placeholder with a shape and dtype but no data (the memory planner's stand-in for a
   * weight in host memory: src/plan/). Its `device` is 'cpu'; reading its values throws.
   */
  static meta(shape: Shape, dtype: DType): Tensor {
    return new Tensor({ shape, dtype });
  }

  /** true for a placeholder from Tensor.meta (neither GPU storage nor host data) */
  get isMeta(): boolean {
    return !this.storage && !this.data;
  }

  static cpuZeros(shape: Shape, dtype: DType = 'f32'): Tensor {
    return new Tensor({ shape, dtype, data: hostArrayFor(dtype, numelOf(shape)) });
  }

  // ---- properties ----

  get device(): 'gpu' | 'cpu' {
    return this.storage ? 'gpu' : 'cpu';
  }
  /** the device of a GPU tensor (null on the CPU device); code above the runtime uses engineOf(t) */
  get gpuDevice(): TensorDevice | null {
    return this.storage?.device ?? null;
  }
  get numel(): number {
    return numelOf(this.shape);
  }
  get nbytes(): number {
    return this.numel * dtypeSize(this.dtype);
  }
  get rank(): number {
    return this.shape.length;
  }
  get isDisposed(): boolean {
    return this.disposed;
  }
  size(dim: number): number {
    const d = dim < 0 ? this.shape.length + dim : dim;
    const v = this.shape[d];
    if (v === undefined) throw new ShapeError(`[tensor] dim ${dim} out of range for shape ${shapeStr(this.shape)}`);
    return v;
  }
  toString(): string {
    return `Tensor(${this.device}, ${this.dtype}, ${shapeStr(this.shape)})`;
  }

  /** The GPU buffer (throws for CPU or disposed tensors). */
  get buffer(): GPUBuffer {
    if (!this.storage) throw new Error(`[tensor] ${this} has no GPU buffer`);
    if (this.disposed) throw new Error(`[tensor] use of a disposed tensor ${this}`);
    return this.storage.buffer;
  }

  /** Values as f32 (floats) or ints, from a CPU tensor (sync). */
  hostValues(): Float32Array | Int32Array | Uint32Array {
    if (!this.data) throw new Error(`[tensor] ${this} is on the GPU: use await t.toArray()`);
    if (this.data instanceof Uint16Array) {
      return decode(this.dtype, new Uint8Array(this.data.buffer, this.data.byteOffset, this.data.byteLength), this.numel);
    }
    return this.data as Float32Array | Int32Array | Uint32Array;
  }

  /** Read values to the host (f32 for float dtypes). */
  async toArray(): Promise<Float32Array | Int32Array | Uint32Array> {
    if (this.data) return this.hostValues().slice();
    const bytes = await this.storage!.device.read(this);
    return decode(this.dtype, bytes, this.numel);
  }

  /** Values as a Float32Array (ints converted). */
  async toFloat32(): Promise<Float32Array> {
    const v = await this.toArray();
    return v instanceof Float32Array ? v : Float32Array.from(v);
  }

  /** Copy to the CPU device. */
  async toCpu(): Promise<Tensor> {
    if (this.data) return this;
    const bytes = await this.storage!.device.read(this);
    const arr = hostArrayFor(this.dtype, this.numel);
    new Uint8Array(arr.buffer).set(bytes.subarray(0, this.nbytes));
    return new Tensor({ shape: this.shape, dtype: this.dtype, data: arr });
  }

  /** Copy to the GPU of `engine` (a no-op for a GPU tensor of that engine). */
  toGpu(engine: TensorDevice, owner?: string): Tensor {
    if (this.storage) {
      if (this.storage.device !== engine) throw new Error('[tensor] tensor belongs to another engine');
      return this;
    }
    return engine.fromHost(this.data!, this.shape, this.dtype, owner);
  }

  // ---- views ----

  /** Reshape (a view). One dimension may be -1. */
  reshape(shape: readonly number[]): Tensor {
    const s = [...shape];
    const neg = s.indexOf(-1);
    if (neg >= 0) {
      const rest = s.reduce((a, d, i) => (i === neg ? a : a * d), 1);
      if (rest === 0 || this.numel % rest !== 0) throw new ShapeError(`[reshape] cannot reshape ${shapeStr(this.shape)} to ${shapeStr(shape)}`);
      s[neg] = this.numel / rest;
    }
    if (numelOf(s) !== this.numel) throw new ShapeError(`[reshape] cannot reshape ${shapeStr(this.shape)} (${this.numel} elements) to ${shapeStr(shape)}`);
    return this.viewAt(s, 0);
  }

  /** Rows [start, end) along dim 0 (a view). */
  narrow0(start: number, end: number): Tensor {
    const d0 = this.shape[0];
    if (d0 === undefined) throw new ShapeError('[narrow0] scalar tensor');
    if (!(0 <= start && start <= end && end <= d0)) throw new ShapeError(`[narrow0] range [${start}, ${end}) out of [0, ${d0})`);
    const rowElems = this.numel / (d0 || 1);
    return this.viewAt([end - start, ...this.shape.slice(1)], start * rowElems);
  }

  /** Element `i` along dim 0 (a view without that dim). */
  select0(i: number): Tensor {
    return this.narrow0(i, i + 1).reshape(this.shape.slice(1));
  }

  /**
   * The bytes [byteOffset, byteOffset + its size) of this tensor, seen as a tensor of `shape` and
   * `dtype` (a view sharing the storage, like torch's `untyped_storage()[a:b].view(dtype)`): how a
   * packed buffer (a block image, a GPU slot holding several weights) hands out its parts. The
   * offset must keep elements aligned to their size, and the view must end inside this tensor.
   */
  viewBytes(byteOffset: number, shape: Shape, dtype: DType): Tensor {
    checkShape(shape, 'viewBytes');
    const size = dtypeSize(dtype);
    const nbytes = numelOf(shape) * size;
    if (!Number.isInteger(byteOffset) || byteOffset < 0) throw new ShapeError(`[viewBytes] byte offset ${byteOffset} of ${this} must be an integer >= 0`);
    const at = (this.data ? this.data.byteOffset : this.byteOffset) + byteOffset;
    if (at % size !== 0) throw new ShapeError(`[viewBytes] a ${dtype} view of ${this} at byte offset ${byteOffset} starts at storage byte ${at}, not a multiple of ${size}; align the offset`);
    if (byteOffset + nbytes > this.nbytes) {
      throw new ShapeError(`[viewBytes] a ${dtype} view ${shapeStr(shape)} (${nbytes} bytes) at byte offset ${byteOffset} runs past the end of ${this} (${this.nbytes} bytes)`);
    }
    return this.viewOf(shape, dtype, byteOffset);
  }

  private viewAt(shape: readonly number[], elemOffset: number): Tensor {
    return this.viewOf(shape, this.dtype, elemOffset * dtypeSize(this.dtype));
  }

  /** a view at `byteOffset` bytes into this tensor (checked by the callers) */
  private viewOf(shape: Shape, dtype: DType, byteOffset: number): Tensor {
    this.assertLive();
    if (this.storage) {
      this.storage.refs++;
      return new Tensor({ shape, dtype, storage: this.storage, byteOffset: this.byteOffset + byteOffset });
    }
    const d = this.data!;
    return new Tensor({ shape, dtype, data: hostView(dtype, d.buffer, d.byteOffset + byteOffset, numelOf(shape)) });
  }

  assertLive(): void {
    if (this.disposed) throw new Error(`[tensor] use of a disposed tensor ${this}`);
  }

  /** Give the memory back (GPU: to the allocator once no view uses it). Idempotent. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    if (this.storage) {
      this.storage.device.untrack(this);
      this.storage.release();
    }
  }
}

export { hostArrayFor };
