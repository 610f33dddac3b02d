// Layout ops (kernels/layout.wgsl): permute / transpose, slice, concat, all materializing, on
// any dtype (bits are copied, never converted). They share one strided N-d box copy:
//
//   dst[dstBase + Σ c_k·dstStride_k] = src[srcBase + Σ c_k·srcStride_k]   for c in the box
//
// A box is simplified first (size-1 dims dropped, dims that are contiguous on both sides merged),
// so e.g. a head transpose [L, H, Dh] -> [H, L, Dh] becomes a 3-d box whose inner run of Dh
// elements is copied with vec4 loads. Contiguous copies go through copyBufferToBuffer.
//
// Big tensors: a box whose source or destination span exceeds the binding limit
// (e.caps.maxBinding, or attrs.maxBindingBytes in tests) is split, along the dim that contributes
// the largest span, into boxes that fit; each binds windows of the two buffers (window.ts).

import { defineOp } from './registry.ts';
import { bindingLimit, elemWindow, windowSlack } from './window.ts';
import type { Engine } from '../runtime/engine.ts';
import { Tensor, numelOf, shapeStr, hostArrayFor, type Shape } from '../tensor/tensor.ts';
import { dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

// =====================================================================================
// Shape helpers (gridRows: also gather)
// =====================================================================================

/** Contiguous (row-major) strides of a shape, in elements. */
export function stridesOf(shape: Shape): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i]!;
  }
  return s;
}

/** A 2-D dispatch grid of `x` workgroups by `rows`, with rows folded into y/z (≤ 65535 each). */
export function gridRows(x: number, rows: number): [number, number, number] {
  if (x > 65535) throw new ShapeError(`[layout] ${x} workgroups along x exceed 65535`);
  if (rows <= 65535) return [x, rows, 1];
  const z = Math.ceil(rows / 65535);
  const y = Math.ceil(rows / z);
  return [x, y, z];
}

// =====================================================================================
// Strided box copy
// =====================================================================================

interface Box {
  shape: number[];
  src: number[];
  dst: number[];
  /** element offsets of the box origin inside the source / destination tensors */
  srcBase: number;
  dstBase: number;
}

const WG = 256;
/** box rows per invocation (kernels/layout.wgsl RB) */
const RB = 8;
const MAX_DIMS = 6;
/** lanes per row of the box before the dispatch switches from 1 inner dim to several */
const MIN_INNER = 64;

function simplify(b: Box): Box {
  const shape: number[] = [];
  const src: number[] = [];
  const dst: number[] = [];
  for (let k = 0; k < b.shape.length; k++) {
    if (b.shape[k] === 1) continue;
    const n = shape.length;
    if (n > 0 && src[n - 1] === b.src[k]! * b.shape[k]! && dst[n - 1] === b.dst[k]! * b.shape[k]!) {
      // dim k continues the previous one on both sides: merge
      shape[n - 1]! *= b.shape[k]!;
      src[n - 1] = b.src[k]!;
      dst[n - 1] = b.dst[k]!;
      continue;
    }
    shape.push(b.shape[k]!);
    src.push(b.src[k]!);
    dst.push(b.dst[k]!);
  }
  return { shape, src, dst, srcBase: b.srcBase, dstBase: b.dstBase };
}

function span(shape: number[], strides: number[]): number {
  let s = 1;
  for (let k = 0; k < shape.length; k++) s += (shape[k]! - 1) * strides[k]!;
  return s;
}

/** Split a box into boxes whose spans fit `limitElems` and whose innermost run fits the grid. */
function splitBox(b: Box, limitElems: number, maxInner: number, out: Box[]): void {
  const n = b.shape.length;
  let dim: number;
  let step: number;
  if (n > MAX_DIMS) {
    // too many dims for the kernel: one box per index of the outermost dim
    dim = 0;
    step = 1;
  } else if (n > 0 && b.shape[n - 1]! > maxInner) {
    dim = n - 1;
    step = maxInner;
  } else if (span(b.shape, b.src) > limitElems || span(b.shape, b.dst) > limitElems) {
    // halve the dim contributing the largest span on either side
    dim = -1;
    let best = -1;
    for (let k = 0; k < n; k++) {
      const c = (b.shape[k]! - 1) * Math.max(b.src[k]!, b.dst[k]!);
      if (b.shape[k]! > 1 && c > best) {
        best = c;
        dim = k;
      }
    }
    if (dim < 0) throw new ShapeError(`[layout] cannot split a box of ${shapeStr(b.shape)} to fit ${limitElems} elements per binding`);
    step = Math.ceil(b.shape[dim]! / 2);
  } else {
    out.push(b);
    return;
  }
  const len = b.shape[dim]!;
  for (let s0 = 0; s0 < len; s0 += step) {
    const shape = [...b.shape];
    shape[dim] = Math.min(step, len - s0);
    splitBox(simplify({ shape, src: b.src, dst: b.dst, srcBase: b.srcBase + s0 * b.src[dim]!, dstBase: b.dstBase + s0 * b.dst[dim]! }), limitElems, maxInner, out);
  }
}

/** Encode dst[box] = src[box] (raw bits). */
function boxCopy(e: Engine, name: string, src: Tensor, dst: Tensor, box: Box, limit: number): void {
  if (box.shape.some((d) => d === 0)) return;
  const elt = dtypeSize(src.dtype);
  const b = simplify(box);
  // contiguous on both sides: a plain buffer copy (no binding limit)
  if (b.shape.length <= 1 && (b.shape.length === 0 || (b.src[0] === 1 && b.dst[0] === 1))) {
    const n = b.shape[0] ?? 1;
    const so = src.byteOffset + b.srcBase * elt;
    const dO = dst.byteOffset + b.dstBase * elt;
    if (so % 4 === 0 && dO % 4 === 0 && (n * elt) % 4 === 0) {
      e.copyBuffer(src.buffer, so, dst.buffer, dO, n * elt);
      return;
    }
  }
  const limitElems = Math.floor((limit - windowSlack(e)) / elt);
  if (limitElems < 1) throw new ShapeError(`[${name}] binding limit ${limit} too small`);
  const boxes: Box[] = [];
  splitBox(b, limitElems, 65535 * WG, boxes);
  for (const sb of boxes) encodeBox(e, name, src, dst, sb, elt);
}

function encodeBox(e: Engine, name: string, src: Tensor, dst: Tensor, b0: Box, elt: number): void {
  let b = b0;
  const sw = elemWindow(e, src, b.srcBase, b.srcBase + span(b.shape, b.src), name);
  const dw = elemWindow(e, dst, b.dstBase, b.dstBase + span(b.shape, b.dst), name);
  let srcOff = sw.off;
  let dstOff = dw.off;
  // choose the unit: 16-bit -> words when every run is even; words -> vec4 when 4-aligned
  let unit: 'half' | 'w1' | 'w4' = elt === 2 ? 'half' : 'w1';
  const n = b.shape.length;
  const innerContig = n > 0 && b.src[n - 1] === 1 && b.dst[n - 1] === 1;
  const scaleBy = (f: number) => {
    const shape = [...b.shape];
    shape[n - 1] = shape[n - 1]! / f;
    b = { shape, src: b.src.map((s, k) => (k === n - 1 ? 1 : s / f)), dst: b.dst.map((s, k) => (k === n - 1 ? 1 : s / f)), srcBase: 0, dstBase: 0 };
    srcOff /= f;
    dstOff /= f;
  };
  const divisible = (f: number) =>
    innerContig && b.shape[n - 1]! % f === 0 && srcOff % f === 0 && dstOff % f === 0 && b.src.every((s, k) => k === n - 1 || s % f === 0) && b.dst.every((s, k) => k === n - 1 || s % f === 0);
  if (unit === 'half' && divisible(2)) {
    scaleBy(2);
    unit = 'w1';
  }
  if (unit === 'w1' && divisible(4)) {
    scaleBy(4);
    unit = 'w4';
  }
  // pad to 6 dims (leading size-1 dims)
  const pad = MAX_DIMS - b.shape.length;
  const shape = [...new Array(pad).fill(1), ...b.shape];
  const ss = [...new Array(pad).fill(0), ...b.src];
  const ts = [...new Array(pad).fill(0), ...b.dst];
  let ni = 1;
  let inner = shape[MAX_DIMS - 1]!;
  while (ni < b.shape.length && inner < MIN_INNER && inner * shape[MAX_DIMS - 1 - ni]! <= 65535 * 64) {
    inner *= shape[MAX_DIMS - 1 - ni]!;
    ni++;
  }
  const rows = numelOf(shape) / inner;
  const wg = inner >= 256 ? WG : 64;
  const entry = unit === 'w4' ? 'copy_w4' : unit === 'w1' ? 'copy_w1' : 'copy_half';
  const mk = (parity: number) => {
    const p: Record<string, number> = { src_base: srcOff, dst_base: dstOff, ni, inner, parity, rows, nd: Math.max(1, b.shape.length) };
    for (let k = 0; k < MAX_DIMS; k++) {
      p[`o${k}`] = shape[k]!; // box sizes, source and destination strides, 1 / size
      p[`s${k}`] = ss[k]!;
      p[`t${k}`] = ts[k]!;
      p[`r${k}`] = 1 / shape[k]!;
    }
    return p;
  };
  for (const parity of unit === 'half' ? [0, 1] : [0]) {
    e.dispatch({
      kernel: { family: 'layout', entry, constants: { WG: wg, RB }, layout: ['read', 'write'] },
      name,
      params: mk(parity),
      bindings: [sw.binding, dw.binding],
      workgroups: gridRows(Math.ceil(inner / wg), Math.ceil(rows / RB)),
    });
  }
}

// ---- CPU side: the same box copy on typed arrays (plain loops, independent of the kernel) ----

function cpuBoxCopy(src: ArrayLike<number>, dst: { [i: number]: number }, box: Box): void {
  const { shape, src: ss, dst: ds } = box;
  const n = numelOf(shape);
  if (n === 0) return;
  const r = shape.length;
  const idx = new Array<number>(r).fill(0);
  let so = box.srcBase;
  let dO = box.dstBase;
  for (let i = 0; i < n; i++) {
    dst[dO] = src[so]!;
    // increment the multi-index (last dim fastest)
    for (let k = r - 1; k >= 0; k--) {
      idx[k]!++;
      so += ss[k]!;
      dO += ds[k]!;
      if (idx[k]! < shape[k]!) break;
      so -= ss[k]! * shape[k]!;
      dO -= ds[k]! * shape[k]!;
      idx[k] = 0;
    }
  }
}

function cpuOut(x: Tensor, shape: Shape): Tensor {
  return new Tensor({ shape, dtype: x.dtype, data: hostArrayFor(x.dtype, numelOf(shape)) });
}

function normDim(op: string, dim: number, rank: number): number {
  const d = dim < 0 ? dim + rank : dim;
  if (!Number.isInteger(d) || d < 0 || d >= rank) throw new ShapeError(`[${op}] dim ${dim} out of range for rank ${rank}`);
  return d;
}

// =====================================================================================
// permute / transpose
// =====================================================================================

export interface PermuteAttrs {
  dims: number[];
  /** tests only: plan as if the binding limit were this many bytes */
  maxBindingBytes?: number;
}

function permuteBox(x: Tensor, dims: number[]): { shape: number[]; box: Box } {
  const st = stridesOf(x.shape);
  const shape = dims.map((d) => x.shape[d]!);
  return { shape, box: { shape, src: dims.map((d) => st[d]!), dst: stridesOf(shape), srcBase: 0, dstBase: 0 } };
}

export const permuteOp = defineOp<{ x: Tensor }, PermuteAttrs>({
  name: 'permute',
  family: 'layout',
  check({ x }, { dims }) {
    if (x.rank > MAX_DIMS) throw new ShapeError(`[permute] rank ${x.rank} > ${MAX_DIMS} is not supported; reshape (merge dims) first`);
    const seen = new Set<number>();
    if (!Array.isArray(dims) || dims.length !== x.rank || !dims.every((d) => Number.isInteger(d) && d >= 0 && d < x.rank && !seen.has(d) && (seen.add(d), true))) {
      throw new ShapeError(`[permute] dims ${JSON.stringify(dims)} is not a permutation of 0..${x.rank - 1} for ${x}`);
    }
  },
  gpu(e, { x }, a) {
    const { shape, box } = permuteBox(x, a.dims);
    const y = e.empty(shape, x.dtype);
    boxCopy(e, 'permute', x, y, box, bindingLimit(e, a.maxBindingBytes));
    return y;
  },
  cpu({ x }, a) {
    const { shape, box } = permuteBox(x, a.dims);
    const y = cpuOut(x, shape);
    cpuBoxCopy(x.data!, y.data!, box);
    return y;
  },
  flops: () => 0,
  bytes: ({ x }) => 2 * x.nbytes,
});

/** General N-d permute (rank ≤ 6), materializing: y.shape[k] = x.shape[dims[k]]. */
export function permute(x: Tensor, dims: number[]): Tensor {
  return permuteOp({ x }, { dims });
}

/** Swap two dims (materializing). Negative dims count from the end. */
export function transpose(x: Tensor, d0: number, d1: number): Tensor {
  const a = normDim('transpose', d0, x.rank);
  const b = normDim('transpose', d1, x.rank);
  const dims = x.shape.map((_, i) => i);
  dims[a] = b;
  dims[b] = a;
  return permuteOp({ x }, { dims });
}

// =====================================================================================
// slice
// =====================================================================================

export interface SliceAttrs {
  dim: number;
  start: number;
  end: number;
  maxBindingBytes?: number;
}

function sliceBox(x: Tensor, a: SliceAttrs): { shape: number[]; box: Box } {
  const d = normDim('slice', a.dim, x.rank);
  const st = stridesOf(x.shape);
  const shape = [...x.shape];
  shape[d] = a.end - a.start;
  return { shape, box: { shape, src: st, dst: stridesOf(shape), srcBase: a.start * st[d]!, dstBase: 0 } };
}

export const sliceOp = defineOp<{ x: Tensor }, SliceAttrs>({
  name: 'slice',
  family: 'layout',
  check({ x }, a) {
    const d = normDim('slice', a.dim, x.rank);
    const n = x.shape[d]!;
    if (!Number.isInteger(a.start) || !Number.isInteger(a.end) || a.start < 0 || a.end < a.start || a.end > n) {
      throw new ShapeError(`[slice] range [${a.start}, ${a.end}) is not inside [0, ${n}] of dim ${a.dim} of ${x}`);
    }
  },
  gpu(e, { x }, a) {
    const { shape, box } = sliceBox(x, a);
    const y = e.empty(shape, x.dtype);
    boxCopy(e, 'slice', x, y, box, bindingLimit(e, a.maxBindingBytes));
    return y;
  },
  cpu({ x }, a) {
    const { shape, box } = sliceBox(x, a);
    const y = cpuOut(x, shape);
    cpuBoxCopy(x.data!, y.data!, box);
    return y;
  },
  flops: () => 0,
  bytes: ({ x }, a) => 2 * sliceBox(x, a).shape.reduce((p, v) => p * v, 1) * dtypeSize(x.dtype),
});

/**
 * Elements [start, end) along `dim` of `x` written straight into `dst` from element `dstBase` on,
 * with `dst`'s strides `dstStrides` (its own contiguous layout by default): slice without the
 * intermediate tensor, for a destination that is a region of a larger tensor (the context-parallel
 * exchange's own part: src/parallel/exchange.ts). Same engine and dtype; GPU tensors only.
 */
export function sliceInto(x: Tensor, dim: number, start: number, end: number, dst: Tensor, dstBase: number, dstStrides?: number[]): void {
  const e = x.gpuDevice as unknown as Engine | null;
  if (!e || (dst.gpuDevice as unknown) !== e) throw new ShapeError('[slice] sliceInto needs both tensors on the same GPU engine');
  if (dst.dtype !== x.dtype) throw new ShapeError(`[slice] sliceInto: the destination is ${dst.dtype}, the source ${x.dtype}`);
  const n = x.shape[normDim('slice', dim, x.rank)]!;
  if (!Number.isInteger(start) || !Number.isInteger(end) || start < 0 || end < start || end > n) throw new ShapeError(`[slice] range [${start}, ${end}) is not inside [0, ${n}] of dim ${dim} of ${x}`);
  const { shape, box } = sliceBox(x, { dim, start, end });
  const ds = dstStrides ?? stridesOf(shape);
  const last = shape.reduce((a, n, k) => a + (n - 1) * ds[k]!, dstBase);
  if (shape.some((n) => n === 0)) return;
  if (dstBase < 0 || last >= dst.numel) throw new ShapeError(`[slice] sliceInto: the box ${shapeStr(shape)} at ${dstBase} does not fit ${dst}`);
  boxCopy(e, 'slice', x, dst, { ...box, dst: ds, dstBase }, bindingLimit(e));
}

/** Elements [start, end) along `dim` (a materializing copy; negative dim counts from the end). */
export function slice(x: Tensor, dim: number, start: number, end: number): Tensor {
  return sliceOp({ x }, { dim, start, end });
}

// =====================================================================================
// concat
// =====================================================================================

/** inputs per registered concat call; longer lists are concatenated in groups */
export const CONCAT_MAX = 8;

export interface ConcatAttrs {
  dim: number;
  maxBindingBytes?: number;
}

type ConcatInputs = { x0: Tensor; x1?: Tensor; x2?: Tensor; x3?: Tensor; x4?: Tensor; x5?: Tensor; x6?: Tensor; x7?: Tensor };

function concatList(inp: ConcatInputs): Tensor[] {
  const xs: Tensor[] = [];
  for (let i = 0; i < CONCAT_MAX; i++) {
    const t = (inp as Record<string, Tensor | undefined>)[`x${i}`];
    if (t) xs.push(t);
  }
  return xs;
}

function concatPlan(xs: Tensor[], dim: number): { shape: number[]; boxes: Box[] } {
  const d = normDim('concat', dim, xs[0]!.rank);
  const shape = [...xs[0]!.shape];
  shape[d] = xs.reduce((s, t) => s + t.shape[d]!, 0);
  const ost = stridesOf(shape);
  let off = 0;
  const boxes = xs.map((t) => {
    const b: Box = { shape: [...t.shape], src: stridesOf(t.shape), dst: ost, srcBase: 0, dstBase: off * ost[d]! };
    off += t.shape[d]!;
    return b;
  });
  return { shape, boxes };
}

export const concatOp = defineOp<ConcatInputs, ConcatAttrs>({
  name: 'concat',
  family: 'layout',
  check(inp, a) {
    const xs = concatList(inp);
    if (xs.length === 0) throw new ShapeError('[concat] needs at least one tensor');
    const x0 = xs[0]!;
    const d = normDim('concat', a.dim, x0.rank);
    for (const [i, t] of xs.entries()) {
      if (t.dtype !== x0.dtype) throw new ShapeError(`[concat] tensor ${i} is ${t.dtype}, tensor 0 is ${x0.dtype}; cast first`);
      if (t.rank !== x0.rank || t.shape.some((s, k) => k !== d && s !== x0.shape[k])) {
        throw new ShapeError(`[concat] tensor ${i} ${shapeStr(t.shape)} does not match tensor 0 ${shapeStr(x0.shape)} outside dim ${a.dim}`);
      }
    }
  },
  gpu(e, inp, a) {
    const xs = concatList(inp);
    const { shape, boxes } = concatPlan(xs, a.dim);
    const y = e.empty(shape, xs[0]!.dtype);
    const limit = bindingLimit(e, a.maxBindingBytes);
    xs.forEach((t, i) => boxCopy(e, 'concat', t, y, boxes[i]!, limit));
    return y;
  },
  cpu(inp, a) {
    const xs = concatList(inp);
    const { shape, boxes } = concatPlan(xs, a.dim);
    const y = cpuOut(xs[0]!, shape);
    xs.forEach((t, i) => cpuBoxCopy(t.data!, y.data!, boxes[i]!));
    return y;
  },
  flops: () => 0,
  bytes: (inp) => 2 * concatList(inp).reduce((s, t) => s + t.nbytes, 0),
});

/** Concatenate along `dim` (negative counts from the end). Any number of tensors. */
export function concat(xs: Tensor[], dim: number, attrs: { maxBindingBytes?: number } = {}): Tensor {
  if (xs.length === 0) throw new ShapeError('[concat] needs at least one tensor');
  if (xs.length <= CONCAT_MAX) {
    const inp = Object.fromEntries(xs.map((t, i) => [`x${i}`, t])) as ConcatInputs;
    return concatOp(inp, { dim, ...attrs });
  }
  // groups of CONCAT_MAX: concat each group, then the partial results
  const parts: Tensor[] = [];
  for (let i = 0; i < xs.length; i += CONCAT_MAX) parts.push(concat(xs.slice(i, i + CONCAT_MAX), dim, attrs));
  const out = concat(parts, dim, attrs);
  for (const p of parts) p.dispose();
  return out;
}
