// Elementwise ops (kernels/elementwise.wgsl): unary activations and casts, broadcasting binary ops,
// Wan's modulation x*(1+scale)+shift and the gated residual x + r*gate.

import { defineOp, grid1d } from './registry.ts';
import { actAlias, broadcastMap, broadcastIndexer, cpuTensor, f32 } from './common.ts';
import { Params } from '../runtime/params.ts';
import type { Engine } from '../runtime/engine.ts';
import { Tensor, shapeStr } from '../tensor/tensor.ts';
import { type DType, dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

const WG = 256;

// ---- scalar math shared by the CPU references (f32 rounding happens at the store) ----

export function geluTanh(x: number): number {
  return 0.5 * x * (1 + Math.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}
export function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

// ---------------------------------------------------------------- unary

export type UnaryKind = 'copy' | 'silu' | 'gelu' | 'affine' | 'clamp';
const UNARY_CODE: Record<UnaryKind, number> = { copy: 0, silu: 1, gelu: 2, affine: 3, clamp: 4 };

export interface UnaryAttrs {
  kind: UnaryKind;
  /** affine: alpha*x + beta; clamp: [alpha, beta] */
  alpha?: number;
  beta?: number;
  /** output dtype (default: input's) — 'copy' with another dtype is a cast */
  out?: DType;
}

export const unary = defineOp<{ x: Tensor }, UnaryAttrs>({
  name: 'unary',
  family: 'elementwise',
  check({ x }, a) {
    actAlias('unary', x.dtype);
    actAlias('unary', a.out ?? x.dtype);
    if (!(a.kind in UNARY_CODE)) throw new ShapeError(`[unary] unknown kind '${a.kind}'`);
  },
  gpu(e, { x }, a) {
    const outDt = a.out ?? x.dtype;
    const y = e.empty(x.shape, outDt);
    const n = x.numel;
    e.dispatch({
      kernel: {
        family: 'elementwise',
        entry: 'unary',
        constants: { WG, OP: UNARY_CODE[a.kind] },
        aliases: { a_t: actAlias('unary', x.dtype, e), y_t: actAlias('unary', outDt, e) },
        layout: ['read', 'write'],
      },
      name: `unary.${a.kind}`,
      params: new Params().u32(n).u32(1).u32(1).u32(1).u32(1).f32(a.alpha ?? 1).f32(a.beta ?? 0).u32(0).bytes(),
      bindings: [x, y],
      workgroups: grid1d(Math.ceil(n / WG)),
      work: n * (dtypeSize(x.dtype) + dtypeSize(outDt)),
    });
    return y;
  },
  cpu({ x }, a) {
    const v = f32(x);
    const out = new Float32Array(v.length);
    const al = a.alpha ?? 1;
    const be = a.beta ?? 0;
    for (let i = 0; i < v.length; i++) {
      const t = v[i]!;
      out[i] =
        a.kind === 'silu' ? silu(t) : a.kind === 'gelu' ? geluTanh(t) : a.kind === 'affine' ? al * t + be : a.kind === 'clamp' ? Math.min(Math.max(t, al), be) : t;
    }
    return cpuTensor(out, x.shape, a.out ?? x.dtype);
  },
  flops: ({ x }, a) => x.numel * (a.kind === 'gelu' ? 12 : a.kind === 'silu' ? 4 : 1),
  bytes: ({ x }, a) => x.numel * (dtypeSize(x.dtype) + dtypeSize(a.out ?? x.dtype)),
});

export const silu_ = (x: Tensor) => unary({ x }, { kind: 'silu' });
export const gelu = (x: Tensor) => unary({ x }, { kind: 'gelu' });
export const cast = (x: Tensor, out: DType) => unary({ x }, { kind: 'copy', out });
export const affine = (x: Tensor, alpha: number, beta = 0) => unary({ x }, { kind: 'affine', alpha, beta });
export const clamp = (x: Tensor, lo: number, hi: number) => unary({ x }, { kind: 'clamp', alpha: lo, beta: hi });

// ---------------------------------------------------------------- binary

export type BinaryKind = 'add' | 'sub' | 'mul' | 'div' | 'axpy' | 'lerp';
const BINARY_CODE: Record<BinaryKind, number> = { add: 0, sub: 1, mul: 2, div: 3, axpy: 4, lerp: 5 };

export interface BinaryAttrs {
  kind: BinaryKind;
  /** axpy: a + alpha*b; lerp: a + alpha*(b - a) (classifier-free guidance: uncond + g*(cond - uncond)) */
  alpha?: number;
  out?: DType;
}

export const binary = defineOp<{ a: Tensor; b: Tensor }, BinaryAttrs>({
  name: 'binary',
  family: 'elementwise',
  check({ a, b }, at) {
    actAlias('binary', a.dtype);
    actAlias('binary', b.dtype);
    if (!(at.kind in BINARY_CODE)) throw new ShapeError(`[binary] unknown kind '${at.kind}'`);
    broadcastMap('binary', a.shape, b.shape);
  },
  gpu(e, { a, b }, at) {
    const outDt = at.out ?? a.dtype;
    const { div, mod } = broadcastMap('binary', a.shape, b.shape);
    const y = e.empty(a.shape, outDt);
    const n = a.numel;
    e.dispatch({
      kernel: {
        family: 'elementwise',
        entry: 'binary',
        constants: { WG, OP: BINARY_CODE[at.kind] },
        aliases: { a_t: actAlias('binary', a.dtype, e), b_t: actAlias('binary', b.dtype, e), y_t: actAlias('binary', outDt, e) },
        layout: ['read', 'read', 'write'],
      },
      name: `binary.${at.kind}`,
      params: new Params().u32(n).u32(div).u32(mod).u32(1).u32(1).f32(at.alpha ?? 1).f32(0).u32(0).bytes(),
      bindings: [a, b, y],
      workgroups: grid1d(Math.ceil(n / WG)),
      work: n * 3 * 4,
    });
    return y;
  },
  cpu({ a, b }, at) {
    const av = f32(a);
    const bv = f32(b);
    const bi = broadcastIndexer(a.shape, b.shape);
    const out = new Float32Array(av.length);
    const al = at.alpha ?? 1;
    for (let i = 0; i < av.length; i++) {
      const x = av[i]!;
      const z = bv[bi(i)]!;
      switch (at.kind) {
        case 'add':
          out[i] = x + z;
          break;
        case 'sub':
          out[i] = x - z;
          break;
        case 'mul':
          out[i] = x * z;
          break;
        case 'div':
          out[i] = x / z;
          break;
        case 'axpy':
          out[i] = x + al * z;
          break;
        case 'lerp':
          out[i] = x + al * (z - x);
          break;
      }
    }
    return cpuTensor(out, a.shape, at.out ?? a.dtype);
  },
  flops: ({ a }) => a.numel * 2,
  bytes: ({ a, b }) => a.numel * 2 * dtypeSize(a.dtype) + b.nbytes,
});

export const add = (a: Tensor, b: Tensor) => binary({ a, b }, { kind: 'add' });
export const sub = (a: Tensor, b: Tensor) => binary({ a, b }, { kind: 'sub' });
export const mul = (a: Tensor, b: Tensor) => binary({ a, b }, { kind: 'mul' });
export const div = (a: Tensor, b: Tensor) => binary({ a, b }, { kind: 'div' });
/** a + alpha*b */
export const axpy = (a: Tensor, b: Tensor, alpha: number) => binary({ a, b }, { kind: 'axpy', alpha });
/** a + alpha*(b - a); CFG: lerp(uncond, cond, guidance) */
export const lerp = (a: Tensor, b: Tensor, alpha: number) => binary({ a, b }, { kind: 'lerp', alpha });

// ---------------------------------------------------------------- modulate / gated residual

function rowBroadcast(op: string, x: Tensor, v: Tensor, what: string): { div: number; mod: number } {
  try {
    return broadcastMap(op, x.shape, v.shape);
  } catch {
    throw new ShapeError(`[${op}] ${what} ${shapeStr(v.shape)} does not broadcast to x ${shapeStr(x.shape)}`);
  }
}

/** y = x * (1 + scale) + shift  (Wan's adaLN modulation; shift/scale broadcast, usually [D]). */
export const modulate = defineOp<{ x: Tensor; shift: Tensor; scale: Tensor }, { out?: DType }>({
  name: 'modulate',
  family: 'elementwise',
  check({ x, shift, scale }) {
    for (const t of [x, shift, scale]) actAlias('modulate', t.dtype);
    rowBroadcast('modulate', x, shift, 'shift');
    rowBroadcast('modulate', x, scale, 'scale');
  },
  gpu(e, { x, shift, scale }, at) {
    const outDt = at.out ?? x.dtype;
    const b = rowBroadcast('modulate', x, shift, 'shift');
    const c = rowBroadcast('modulate', x, scale, 'scale');
    const y = e.empty(x.shape, outDt);
    const n = x.numel;
    e.dispatch({
      kernel: {
        family: 'elementwise',
        entry: 'modulate',
        constants: { WG },
        aliases: { a_t: actAlias('modulate', x.dtype, e), b_t: actAlias('modulate', shift.dtype, e), c_t: actAlias('modulate', scale.dtype, e), y_t: actAlias('modulate', outDt, e) },
        layout: ['read', 'read', 'read', 'write'],
      },
      name: 'modulate',
      params: new Params().u32(n).u32(b.div).u32(b.mod).u32(c.div).u32(c.mod).f32(0).f32(0).u32(0).bytes(),
      bindings: [x, shift, scale, y],
      workgroups: grid1d(Math.ceil(n / WG)),
      work: n * 2 * 4,
    });
    return y;
  },
  cpu({ x, shift, scale }, at) {
    const xv = f32(x);
    const sh = f32(shift);
    const sc = f32(scale);
    const bi = broadcastIndexer(x.shape, shift.shape);
    const ci = broadcastIndexer(x.shape, scale.shape);
    const out = new Float32Array(xv.length);
    for (let i = 0; i < xv.length; i++) out[i] = xv[i]! * (1 + sc[ci(i)]!) + sh[bi(i)]!;
    return cpuTensor(out, x.shape, at.out ?? x.dtype);
  },
  flops: ({ x }) => x.numel * 3,
  bytes: ({ x }) => x.numel * 2 * dtypeSize(x.dtype),
});

/** y = x + r * gate  (gated residual; gate broadcast, usually [D]). */
export const gatedResidual = defineOp<{ x: Tensor; r: Tensor; gate: Tensor }, { out?: DType }>({
  name: 'gated_residual',
  family: 'elementwise',
  check({ x, r, gate }) {
    for (const t of [x, r, gate]) actAlias('gated_residual', t.dtype);
    if (x.numel !== r.numel) throw new ShapeError(`[gated_residual] r ${shapeStr(r.shape)} must match x ${shapeStr(x.shape)}`);
    rowBroadcast('gated_residual', x, gate, 'gate');
  },
  gpu(e: Engine, { x, r, gate }, at) {
    const outDt = at.out ?? x.dtype;
    const c = rowBroadcast('gated_residual', x, gate, 'gate');
    const y = e.empty(x.shape, outDt);
    const n = x.numel;
    e.dispatch({
      kernel: {
        family: 'elementwise',
        entry: 'gated_residual',
        constants: { WG },
        aliases: { a_t: actAlias('gated_residual', x.dtype, e), b_t: actAlias('gated_residual', r.dtype, e), c_t: actAlias('gated_residual', gate.dtype, e), y_t: actAlias('gated_residual', outDt, e) },
        layout: ['read', 'read', 'read', 'write'],
      },
      name: 'gated_residual',
      params: new Params().u32(n).u32(1).u32(1).u32(c.div).u32(c.mod).f32(0).f32(0).u32(0).bytes(),
      bindings: [x, r, gate, y],
      workgroups: grid1d(Math.ceil(n / WG)),
      work: n * 3 * 4,
    });
    return y;
  },
  cpu({ x, r, gate }, at) {
    const xv = f32(x);
    const rv = f32(r);
    const gv = f32(gate);
    const gi = broadcastIndexer(x.shape, gate.shape);
    const out = new Float32Array(xv.length);
    for (let i = 0; i < xv.length; i++) out[i] = xv[i]! + rv[i]! * gv[gi(i)]!;
    return cpuTensor(out, x.shape, at.out ?? x.dtype);
  },
  flops: ({ x }) => x.numel * 2,
  bytes: ({ x }) => x.numel * 3 * dtypeSize(x.dtype),
});
