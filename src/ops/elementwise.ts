// Elementwise ops (kernels/elementwise.wgsl): unary activations and casts, broadcasting binary ops,
// Wan's modulation x*(1+scale)+shift and the gated residual x + r*gate.

import { defineOp, grid1d } from './registry.ts';
import { actAlias, broadcastMap, broadcastIndexer, cpuTensor, f32 } from './common.ts';
import type { Engine, BufferBinding } from '../runtime/engine.ts';
import type { Aliases } from '../runtime/kernels.ts';
import { bindingLimit, elemWindow, rowChunks, windowSlack, type Window } from './window.ts';
import { Tensor, shapeStr } from '../tensor/tensor.ts';
import { type DType, dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

const WG = 256;
/** rows per invocation in the vec4 kernels */
const R = 8;

// ---- the vec4 plan: view the output as [rows, cols4] vec4s (kernels/elementwise.wgsl, "*4") ----

type Mode = 0 | 1 | 2; // full, col (varies along the row), row (one scalar per row group)

interface Plan4 {
  n4: number;
  cols4: number;
  rows: number;
  modes: Mode[];
  /** per operand: col mode: period in vec4s; row mode: rows per group */
  p: number[];
  /** per operand: row mode: number of groups before wrapping */
  q: number[];
  /** workgroup size (lanes along the columns) */
  wg: number;
}

function gcd(a: number, b: number): number {
  while (b) [a, b] = [b, a % b];
  return a;
}

/** columns (in vec4s) a row of the view aims for when the broadcast leaves the choice free */
const TARGET_COLS4 = 1024;

/**
 * Choose the [rows, cols4] vec4 view for the vec4 kernels, or null when the scalar kernels must
 * run (element count or broadcast period not a multiple of 4). `ops` are the broadcast maps
 * (`index = (i / div) % mod`) of the non-leading operands. Element i = 4 * (r * cols4 + c) + k:
 *  - full operand: same index;
 *  - col operand (div 1, period mod): vec4 c % (mod/4), valid when cols4 is a multiple of mod/4;
 *  - row operand (div > 1, or a scalar): one value per row group, valid when div is a multiple
 *    of the row length.
 */
function plan4(n: number, ops: Array<{ div: number; mod: number }>, maxCols4 = Infinity): Plan4 | null {
  if (n % 4 !== 0 || n === 0) return null;
  const n4 = n / 4;
  const kind = ops.map(({ div, mod }) => (div === 1 && mod === n ? 'full' : mod === 1 ? 'scalar' : div === 1 ? 'col' : 'row'));
  let period = 0; // lcm of the col periods (elements)
  for (let k = 0; k < ops.length; k++) {
    if (kind[k] !== 'col') continue;
    const m = ops[k]!.mod;
    if (m % 4 !== 0) return null;
    period = period === 0 ? m : (period / gcd(period, m)) * m;
  }
  let rowDiv = 0; // gcd of the row operands' divs (elements)
  for (let k = 0; k < ops.length; k++) if (kind[k] === 'row') rowDiv = gcd(rowDiv, ops[k]!.div);
  let cols4: number;
  if (rowDiv !== 0) {
    // rows must not straddle a row operand's groups: cols divides every div
    if (period !== 0 && rowDiv % period !== 0) return null;
    let cols = period !== 0 ? period : rowDiv;
    if (cols % 4 !== 0) return null;
    // widen the row while it still divides the divs and stays small
    while (cols * 2 <= Math.min(TARGET_COLS4, maxCols4) * 4 && rowDiv % (cols * 2) === 0 && (period === 0 || (cols * 2) % period === 0)) cols *= 2;
    cols4 = cols / 4;
  } else if (period !== 0) {
    const p4 = period / 4;
    cols4 = p4 * Math.max(1, Math.floor(Math.min(TARGET_COLS4, maxCols4) / p4));
  } else {
    cols4 = Math.max(1, Math.min(n4, TARGET_COLS4, maxCols4));
  }
  const modes: Mode[] = [];
  const p: number[] = [];
  const q: number[] = [];
  for (let k = 0; k < ops.length; k++) {
    const { div, mod } = ops[k]!;
    if (kind[k] === 'full') modes.push(0), p.push(1), q.push(1);
    else if (kind[k] === 'col') modes.push(1), p.push(mod / 4), q.push(1);
    else if (kind[k] === 'scalar') modes.push(2), p.push(1), q.push(1);
    else modes.push(2), p.push(div / (cols4 * 4)), q.push(mod);
  }
  return { n4, cols4, rows: Math.ceil(n4 / cols4), modes, p, q, wg: WG };
}

/** The widest view row (in vec4s) whose windows still fit the binding limit. */
function maxCols4(e: Engine, maxBindingBytes: number | undefined, ts: Tensor[]): number {
  const elt = Math.max(...ts.map((t) => dtypeSize(t.dtype)));
  return Math.max(1, Math.floor((bindingLimit(e, maxBindingBytes) - windowSlack(e)) / (4 * elt)));
}

/** x: column blocks; y/z: blocks of R rows, folded to stay within 65535 per dimension */
function grid4(pl: Plan4, rows: number): [number, number, number] {
  const x = Math.ceil(pl.cols4 / pl.wg);
  const blocks = Math.ceil(rows / R);
  if (blocks <= 65535) return [x, blocks, 1];
  const z = Math.ceil(blocks / 65535);
  return [x, Math.ceil(blocks / z), z];
}

/**
 * Encode a vec4 kernel over the plan's [rows, cols4] view. `lead` (a / x) and the output are
 * full-shaped; `ops` are the other operands with their plan modes. Tensors too big for one
 * binding are split into row ranges (one dispatch each, windows of the full-shaped operands;
 * col/row-mode operands are bound whole).
 */
function dispatch4(
  e: Engine,
  op: string,
  kernel: { entry: string; constants: Record<string, number>; aliases: Aliases; layout: Array<'read' | 'write'> },
  pl: Plan4,
  lead: Tensor,
  ops: Tensor[],
  y: Tensor,
  alpha: number,
  beta: number,
  opCode: number,
  maxBindingBytes: number | undefined,
): void {
  const limit = bindingLimit(e, maxBindingBytes);
  const cols = pl.cols4 * 4;
  const full = [lead, ...ops.filter((_, k) => pl.modes[k] === 0), y];
  const chunks = rowChunks(e, op, pl.rows, full.map((t) => cols * dtypeSize(t.dtype)), limit);
  const vecOff = (w: Window, what: Tensor): number => {
    if (w.off % 4 !== 0) throw new ShapeError(`[${op}] ${what} is a view at an offset that is not a multiple of 4 elements; clone it`);
    return w.off / 4;
  };
  const n = pl.n4 * 4;
  for (const [r0, r1] of chunks) {
    const e0 = r0 * cols;
    const e1 = Math.min(r1 * cols, n);
    const win = (t: Tensor, mode: Mode | 'lead'): { b: BufferBinding; off: number } => {
      if (mode === 'lead' || mode === 0) {
        const w = elemWindow(e, t, e0, e1, op);
        return { b: w.binding, off: vecOff(w, t) };
      }
      const w = elemWindow(e, t, 0, t.numel, op);
      return { b: w.binding, off: mode === 1 ? vecOff(w, t) : w.off };
    };
    const wl = win(lead, 'lead');
    const wo = ops.map((t, k) => win(t, pl.modes[k]!));
    const wy = win(y, 'lead');
    const params = {
      n4: (e1 - e0) / 4,
      cols4: pl.cols4,
      b_p: pl.p[0] ?? 1,
      b_q: pl.q[0] ?? 1,
      c_p: pl.p[1] ?? 1,
      c_q: pl.q[1] ?? 1,
      alpha,
      beta,
      a_off: wl.off,
      b_off: wo[0]?.off ?? 0,
      c_off: wo[1]?.off ?? 0,
      y_off: wy.off,
      r0,
      op: opCode,
    };
    e.dispatch({
      kernel: { family: 'elementwise', ...kernel },
      name: op,
      params,
      bindings: [wl.b, ...wo.map((w) => w.b), wy.b],
      workgroups: grid4(pl, r1 - r0),
    });
  }
}

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
  /** tests only: plan as if the binding limit were this many bytes (vec4 kernels split rows) */
  maxBindingBytes?: number;
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
    const pl = plan4(n, [], maxCols4(e, a.maxBindingBytes, [x, y]));
    if (pl) {
      const kernel = {
        entry: 'unary4',
        constants: { WG: pl.wg, R },
        aliases: { a_t: actAlias('unary', x.dtype, e), y_t: actAlias('unary', outDt, e) },
        layout: ['read', 'write'] as Array<'read' | 'write'>,
      };
      dispatch4(e, `unary.${a.kind}`, kernel, pl, x, [], y, a.alpha ?? 1, a.beta ?? 0, UNARY_CODE[a.kind], a.maxBindingBytes);
      return y;
    }
    e.dispatch({
      kernel: {
        family: 'elementwise',
        entry: 'unary',
        constants: { WG },
        aliases: { a_t: actAlias('unary', x.dtype, e), y_t: actAlias('unary', outDt, e) },
        layout: ['read', 'write'],
      },
      name: `unary.${a.kind}`,
      params: { n, b_div: 1, b_mod: 1, c_div: 1, c_mod: 1, alpha: a.alpha ?? 1, beta: a.beta ?? 0, op: UNARY_CODE[a.kind] },
      bindings: [x, y],
      workgroups: grid1d(Math.ceil(n / WG)),
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
  flops: ({ x }, a) => x.numel * (a.kind === 'gelu' ? 12 : a.kind === 'silu' ? 4 : a.kind === 'copy' ? 0 : 2),
  bytes: ({ x }, a) => x.numel * (dtypeSize(x.dtype) + dtypeSize(a.out ?? x.dtype)),
});

export const cast = (x: Tensor, out: DType) => unary({ x }, { kind: 'copy', out });
export const affine = (x: Tensor, alpha: number, beta = 0) => unary({ x }, { kind: 'affine', alpha, beta });

// ---------------------------------------------------------------- binary

export type BinaryKind = 'add' | 'sub' | 'mul' | 'div' | 'axpy' | 'lerp';
const BINARY_CODE: Record<BinaryKind, number> = { add: 0, sub: 1, mul: 2, div: 3, axpy: 4, lerp: 5 };

export interface BinaryAttrs {
  kind: BinaryKind;
  /** axpy: a + alpha*b; lerp: a + alpha*(b - a) (classifier-free guidance: uncond + g*(cond - uncond)) */
  alpha?: number;
  out?: DType;
  /** tests only: plan as if the binding limit were this many bytes (vec4 kernels split rows) */
  maxBindingBytes?: number;
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
    const pl = plan4(n, [{ div, mod }], maxCols4(e, at.maxBindingBytes, [a, b, y]));
    if (pl) {
      const row = pl.modes[0] === 2;
      const kernel = {
        entry: row ? 'binary4_row' : 'binary4',
        constants: (row ? { WG: pl.wg, R } : { WG: pl.wg, R, B_MODE: pl.modes[0]! }) as Record<string, number>,
        aliases: { a_t: actAlias('binary', a.dtype, e), b_t: actAlias('binary', b.dtype, e), y_t: actAlias('binary', outDt, e) },
        layout: ['read', 'read', 'write'] as Array<'read' | 'write'>,
      };
      dispatch4(e, `binary.${at.kind}`, kernel, pl, a, [b], y, at.alpha ?? 1, 0, BINARY_CODE[at.kind], at.maxBindingBytes);
      return y;
    }
    e.dispatch({
      kernel: {
        family: 'elementwise',
        entry: 'binary',
        constants: { WG },
        aliases: { a_t: actAlias('binary', a.dtype, e), b_t: actAlias('binary', b.dtype, e), y_t: actAlias('binary', outDt, e) },
        layout: ['read', 'read', 'write'],
      },
      name: `binary.${at.kind}`,
      params: { n, b_div: div, b_mod: mod, c_div: 1, c_mod: 1, alpha: at.alpha ?? 1, beta: 0, op: BINARY_CODE[at.kind] },
      bindings: [a, b, y],
      workgroups: grid1d(Math.ceil(n / WG)),
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
  bytes: ({ a, b }, at) => a.nbytes + b.nbytes + a.numel * dtypeSize(at.out ?? a.dtype),
});

export const add = (a: Tensor, b: Tensor) => binary({ a, b }, { kind: 'add' });
export const mul = (a: Tensor, b: Tensor) => binary({ a, b }, { kind: 'mul' });

// ---------------------------------------------------------------- modulate / gated residual

function rowBroadcast(op: string, x: Tensor, v: Tensor, what: string): { div: number; mod: number } {
  try {
    return broadcastMap(op, x.shape, v.shape);
  } catch {
    throw new ShapeError(`[${op}] ${what} ${shapeStr(v.shape)} does not broadcast to x ${shapeStr(x.shape)}`);
  }
}

interface TernaryAttrs {
  out?: DType;
  /** tests only: plan as if the binding limit were this many bytes (vec4 kernels split rows) */
  maxBindingBytes?: number;
}

/** Kernel entries of the two ternary ops: [scalar, vec4] (kernels/elementwise.wgsl `ternary`, `ternary4`). */
const TERNARY_ENTRY = { modulate: ['modulate', 'modulate4'], gated_residual: ['gated_residual', 'gated4'] } as const;

/**
 * The GPU body of modulate and gated_residual: y = f(x, b, c), x and y full-shaped, b and c read
 * through their broadcast maps (gated_residual's r is full: `{ div: 1, mod: n }`). The vec4
 * kernels take full and col-mode operands only; a row-mode one runs the scalar kernel.
 */
function ternaryGpu(
  e: Engine,
  op: keyof typeof TERNARY_ENTRY,
  x: Tensor,
  [b, c]: readonly [Tensor, Tensor],
  [bm, cm]: readonly [{ div: number; mod: number }, { div: number; mod: number }],
  at: TernaryAttrs,
): Tensor {
  const outDt = at.out ?? x.dtype;
  const y = e.empty(x.shape, outDt);
  const n = x.numel;
  const [entry, entry4] = TERNARY_ENTRY[op];
  const aliases = { a_t: actAlias(op, x.dtype, e), b_t: actAlias(op, b.dtype, e), c_t: actAlias(op, c.dtype, e), y_t: actAlias(op, outDt, e) };
  const layout: Array<'read' | 'write'> = ['read', 'read', 'read', 'write'];
  const pl = plan4(n, [bm, cm], maxCols4(e, at.maxBindingBytes, [x, b, c, y]));
  if (pl && !pl.modes.includes(2)) {
    const kernel = { entry: entry4, constants: { WG: pl.wg, R, B_MODE: pl.modes[0]!, C_MODE: pl.modes[1]! }, aliases, layout };
    dispatch4(e, op, kernel, pl, x, [b, c], y, 1, 0, 0, at.maxBindingBytes);
    return y;
  }
  e.dispatch({
    kernel: { family: 'elementwise', entry, constants: { WG }, aliases, layout },
    name: op,
    params: { n, b_div: bm.div, b_mod: bm.mod, c_div: cm.div, c_mod: cm.mod, alpha: 0, beta: 0, op: 0 },
    bindings: [x, b, c, y],
    workgroups: grid1d(Math.ceil(n / WG)),
  });
  return y;
}

/** y = x * (1 + scale) + shift  (Wan's adaLN modulation; shift/scale broadcast, usually [D]). */
export const modulate = defineOp<{ x: Tensor; shift: Tensor; scale: Tensor }, TernaryAttrs>({
  name: 'modulate',
  family: 'elementwise',
  check({ x, shift, scale }) {
    for (const t of [x, shift, scale]) actAlias('modulate', t.dtype);
    rowBroadcast('modulate', x, shift, 'shift');
    rowBroadcast('modulate', x, scale, 'scale');
  },
  gpu(e, { x, shift, scale }, at) {
    const maps = [rowBroadcast('modulate', x, shift, 'shift'), rowBroadcast('modulate', x, scale, 'scale')] as const;
    return ternaryGpu(e, 'modulate', x, [shift, scale], maps, at);
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
  bytes: ({ x, shift, scale }, at) => x.nbytes + shift.nbytes + scale.nbytes + x.numel * dtypeSize(at.out ?? x.dtype),
});

/** y = x + r * gate  (gated residual; gate broadcast, usually [D]). */
export const gatedResidual = defineOp<{ x: Tensor; r: Tensor; gate: Tensor }, TernaryAttrs>({
  name: 'gated_residual',
  family: 'elementwise',
  check({ x, r, gate }) {
    for (const t of [x, r, gate]) actAlias('gated_residual', t.dtype);
    if (x.numel !== r.numel) throw new ShapeError(`[gated_residual] r ${shapeStr(r.shape)} must match x ${shapeStr(x.shape)}`);
    rowBroadcast('gated_residual', x, gate, 'gate');
  },
  gpu(e, { x, r, gate }, at) {
    const maps = [{ div: 1, mod: x.numel }, rowBroadcast('gated_residual', x, gate, 'gate')] as const;
    return ternaryGpu(e, 'gated_residual', x, [r, gate], maps, at);
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
  bytes: ({ x, r, gate }, at) => x.nbytes + r.nbytes + gate.nbytes + x.numel * dtypeSize(at.out ?? x.dtype),
});
