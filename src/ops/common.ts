// Helpers shared by op wrappers: dtype -> WGSL storage alias, broadcasting, CPU output building.

import { Tensor, numelOf, shapeStr, type Shape } from '../tensor/tensor.ts';
import type { DType } from '../tensor/dtype.ts';
import type { Engine } from '../runtime/engine.ts';
import { ShapeError } from '../util/errors.ts';

/** WGSL storage type for an activation dtype (f32, or f16 when the adapter has shader-f16). */
export function actAlias(op: string, dt: DType, e?: Engine): 'f32' | 'f16' {
  if (dt === 'f32') return 'f32';
  if (dt === 'f16') {
    if (e && !e.caps.shaderF16) throw new ShapeError(`[${op}] f16 tensors need the adapter feature 'shader-f16', which this adapter lacks; use f32`);
    return 'f16';
  }
  throw new ShapeError(`[${op}] activations must be f32 or f16, got ${dt}`);
}

/**
 * Restricted broadcast of `b` onto `a`: the dims of `b` that are not 1 (after right-aligning)
 * must form one contiguous run of `a`'s dims with equal sizes. Returns the kernel's index
 * mapping `bIndex = (i / div) % mod`.
 */
export function broadcastMap(op: string, aShape: Shape, bShape: Shape): { div: number; mod: number } {
  const nb = numelOf(bShape);
  const na = numelOf(aShape);
  if (nb === na && bShape.length <= aShape.length && numelOf(bShape) === numelOf(aShape)) {
    // same element count: only valid if it is the same shape up to leading/trailing ones
    const strip = (s: Shape) => s.filter((d) => d !== 1);
    const sa = strip(aShape);
    const sb = strip(bShape);
    if (sa.length === sb.length && sa.every((d, i) => d === sb[i])) return { div: 1, mod: Math.max(1, nb) };
  }
  if (nb === 1) return { div: 1, mod: 1 };
  if (bShape.length > aShape.length) throw new ShapeError(`[${op}] cannot broadcast ${shapeStr(bShape)} to ${shapeStr(aShape)}`);
  const pad = aShape.length - bShape.length;
  const b = [...new Array(pad).fill(1), ...bShape];
  let s = -1;
  let e = -1;
  for (let i = 0; i < aShape.length; i++) {
    if (b[i] === 1 && aShape[i] !== 1) continue;
    if (b[i] !== aShape[i]) throw new ShapeError(`[${op}] cannot broadcast ${shapeStr(bShape)} to ${shapeStr(aShape)}`);
    if (aShape[i] === 1) continue;
    if (s < 0) s = i;
    else if (e !== i) throw new ShapeError(`[${op}] broadcast of ${shapeStr(bShape)} to ${shapeStr(aShape)} is not one contiguous block of dims; reshape first`);
    e = i + 1;
  }
  if (s < 0) return { div: 1, mod: 1 };
  return { div: numelOf(aShape.slice(e)), mod: numelOf(aShape.slice(s, e)) };
}

/** Generic numpy-style broadcast index (CPU reference side): index into b for flat index i of a. */
export function broadcastIndexer(aShape: Shape, bShape: Shape): (i: number) => number {
  const pad = aShape.length - bShape.length;
  const b = [...new Array(Math.max(0, pad)).fill(1), ...bShape];
  const strides: number[] = new Array(aShape.length).fill(0);
  let acc = 1;
  for (let i = aShape.length - 1; i >= 0; i--) {
    strides[i] = b[i] === 1 ? 0 : acc;
    acc *= b[i]!;
  }
  const dims = [...aShape];
  return (flat: number) => {
    let idx = 0;
    let rem = flat;
    for (let i = dims.length - 1; i >= 0; i--) {
      const d = dims[i]!;
      const c = rem % d;
      rem = (rem - c) / d;
      idx += c * strides[i]!;
    }
    return idx;
  };
}

/** A CPU tensor of `dtype` from f32 values (rounded to f16/bf16 as storing would). */
export function cpuTensor(values: Float32Array, shape: Shape, dtype: DType): Tensor {
  if (dtype === 'f32') return Tensor.cpu(values, shape, 'f32');
  return Tensor.fromValues(values, shape, dtype);
}

/** CPU tensor values as f32 (copy-free for f32). */
export function f32(t: Tensor): Float32Array {
  const v = t.hostValues();
  return v instanceof Float32Array ? v : Float32Array.from(v);
}
