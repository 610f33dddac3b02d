// Binding windows: how every op binds part of an operand larger than one storage binding.
//
// A window covers elements [start, end) of a tensor; it starts at the byte offset at or below the
// first element that is a multiple of the adapter's storageAlign, and the kernel gets the element
// offset of `start` inside it. Ops plan their splits with `bindingLimit` (the adapter's
// maxBinding, or a smaller `maxBindingBytes` that tests pass to run the split paths on small
// shapes) minus `windowSlack`.

import type { Engine, BufferBinding } from '../runtime/engine.ts';
import type { Tensor } from '../tensor/tensor.ts';
import { dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

/** The per-binding byte limit an op plans with: the adapter's, or a smaller test override (`maxBindingBytes`). */
export function bindingLimit(e: Engine, override?: number): number {
  const real = e.caps.maxBinding;
  if (override === undefined) return Math.floor(real / 4) * 4;
  if (!(override >= 64)) throw new ShapeError(`[binding] maxBindingBytes must be >= 64 bytes, got ${override}`);
  return Math.floor(Math.min(real, override) / 4) * 4;
}

/** Bytes a window may need beyond its elements (start rounded down to the alignment, end up to `granule`). */
export function windowSlack(e: Engine, granule: 4 | 16 = 4): number {
  return e.caps.storageAlign + granule;
}

export interface Window {
  binding: BufferBinding;
  /** element offset of `start` inside the window */
  off: number;
}

export interface WindowOptions {
  /** the limit the op planned with (default: the adapter's) */
  limit?: number;
  /** the window's size is rounded up to this many bytes (16: kernels that read vec4 rows) */
  granule?: 4 | 16;
}

/** A binding covering elements [start, end) of tensor `t` (in units of its dtype). */
export function elemWindow(e: Engine, t: Tensor, start: number, end: number, what: string, opts: WindowOptions = {}): Window {
  t.assertLive();
  const elt = dtypeSize(t.dtype);
  const align = e.caps.storageAlign;
  const granule = opts.granule ?? 4;
  const limit = opts.limit ?? e.caps.maxBinding;
  const startByte = t.byteOffset + start * elt;
  const base = Math.floor(startByte / align) * align;
  if ((startByte - base) % elt !== 0) throw new ShapeError(`[${what}] ${t} starts at byte ${t.byteOffset}, not a multiple of its element size`);
  const endByte = t.byteOffset + Math.max(end, start + 1) * elt;
  const buffer = t.buffer;
  const size = Math.min(Math.ceil((endByte - base) / granule) * granule, buffer.size - base);
  if (size > limit) {
    throw new ShapeError(`[${what}] internal: a window of ${size} bytes of ${t} exceeds the binding limit ${limit}; this is a bug in the op's split, please report the shape`);
  }
  return { binding: { buffer, offset: base, size: Math.max(4, size) }, off: (startByte - base) / elt };
}

/**
 * Split `rows` rows into ranges [r0, r1) such that, for every operand, rows·rowBytes plus the
 * window slack fits in `limit` bytes. Throws `[op]` when a single row does not fit.
 */
export function rowChunks(e: Engine, op: string, rows: number, rowBytes: number[], limit: number): Array<[number, number]> {
  const maxRow = Math.max(1, ...rowBytes);
  const room = limit - windowSlack(e);
  const per = Math.floor(room / maxRow);
  if (per < 1) {
    throw new ShapeError(`[${op}] one row is ${maxRow} bytes, above the ${limit}-byte binding limit of this device; such rows cannot be split by rows`);
  }
  const out: Array<[number, number]> = [];
  for (let r = 0; r < rows; r += per) out.push([r, Math.min(rows, r + per)]);
  return out;
}
