// Normalization ops (kernels/norm.wgsl): LayerNorm (+affine, +fused Wan modulation), RMSNorm,
// and the Wan VAE channel L2 norm.
//
// dtypes: x f32 or f16 (shader-f16); output f32 by default for f32 x (attrs.out may pick f16).
// weight / bias / shift / scale / gamma may be f32, f16 or bf16: they are bound as u32 words and
// widened in the kernel (checkpoint bf16 weights need no conversion pass). Math is f32.
//
// Big activations: x (and y, and per-row modulation) are split into row ranges whose windows
// fit the binding limit (window.ts: rowChunks / elemWindow); channelL2Norm splits by
// channel groups (and by positions when one channel plane alone is too big).

import { defineOp, grid1d, expectDtype } from './registry.ts';
import { actAlias, broadcastMap } from './common.ts';
import { bindingLimit, elemWindow, rowChunks, windowSlack, type Window } from './window.ts';
import { variantFor } from './variants.ts';
import type { Engine } from '../runtime/engine.ts';
import { Tensor, numelOf, shapeStr } from '../tensor/tensor.ts';
import { type DType, dtypeCode, dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

const PARAM_DTYPES = ['f32', 'f16', 'bf16'] as const;

/** Which row schedule the row norms use ('auto': one invocation per row on CPU adapters, a workgroup per row on GPUs). */
export type RowImpl = 'auto' | 'thread' | 'wg';

export interface RowNormAttrs {
  eps: number;
  out?: DType;
  /** tests/benchmarks: force a row schedule */
  impl?: RowImpl;
  /** tests only: plan as if the binding limit were this many bytes */
  maxBindingBytes?: number;
}

const THREAD_WG = 64;
const ROW_WG = 64;

function pickImpl(e: Engine, impl: RowImpl | undefined): 'thread' | 'wg' {
  if (impl === 'thread' || impl === 'wg') return impl;
  return variantFor(e.caps, 'rowNorm');
}

function outDtype(op: string, x: Tensor, out: DType | undefined): DType {
  const o = out ?? x.dtype;
  actAlias(op, o);
  return o;
}

/** Broadcast map of a modulation tensor [..., D] over the rows of x [..., D]: row index -> (r / div) % mod. */
function modRowMap(op: string, x: Tensor, m: Tensor, what: string): { div: number; mod: number } {
  const D = x.shape[x.rank - 1]!;
  if (m.rank === 0 || m.shape[m.rank - 1] !== D) {
    throw new ShapeError(`[${op}] ${what} ${shapeStr(m.shape)} must end in x's last dim ${D} (x ${shapeStr(x.shape)}); e.g. [${D}]`);
  }
  const lead = x.shape.slice(0, -1);
  let mlead = m.shape.slice(0, -1);
  while (mlead.length > 0 && mlead[0] === 1 && mlead.length > lead.length) mlead = mlead.slice(1);
  try {
    return broadcastMap(op, lead.length ? lead : [1], mlead.length ? mlead : [1]);
  } catch {
    throw new ShapeError(`[${op}] ${what} ${shapeStr(m.shape)} does not broadcast over the rows of x ${shapeStr(x.shape)}`);
  }
}

type RowNormInputs = {
  x: Tensor;
  weight?: Tensor;
  bias?: Tensor;
  shift?: Tensor;
  scale?: Tensor;
};

function checkRowNorm(op: string, inp: RowNormInputs, a: RowNormAttrs): void {
  const { x } = inp;
  actAlias(op, x.dtype);
  outDtype(op, x, a.out);
  if (x.rank < 1) throw new ShapeError(`[${op}] x must have at least 1 dim, got a scalar`);
  if (typeof a.eps !== 'number' || !(a.eps >= 0)) throw new ShapeError(`[${op}] eps must be a number >= 0, got ${a.eps}`);
  const D = x.shape[x.rank - 1]!;
  for (const k of ['weight', 'bias'] as const) {
    const t = inp[k];
    if (!t) continue;
    expectDtype(op, k, t, PARAM_DTYPES);
    if (t.numel !== D || t.shape[t.rank - 1] !== D) throw new ShapeError(`[${op}] ${k} ${shapeStr(t.shape)} must have ${D} elements (x's last dim), e.g. [${D}]`);
  }
  if (inp.weight && inp.bias && inp.weight.dtype !== inp.bias.dtype) {
    throw new ShapeError(`[${op}] weight (${inp.weight.dtype}) and bias (${inp.bias.dtype}) must have the same dtype`);
  }
  if (!!inp.shift !== !!inp.scale) throw new ShapeError(`[${op}] modulation needs both shift and scale (got only ${inp.shift ? 'shift' : 'scale'})`);
  if (inp.shift && inp.scale) {
    expectDtype(op, 'shift', inp.shift, PARAM_DTYPES);
    expectDtype(op, 'scale', inp.scale, PARAM_DTYPES);
    if (inp.shift.dtype !== inp.scale.dtype) throw new ShapeError(`[${op}] shift (${inp.shift.dtype}) and scale (${inp.scale.dtype}) must have the same dtype`);
    if (inp.shift.numel !== inp.scale.numel || inp.shift.rank !== inp.scale.rank || inp.shift.shape.some((d, i) => d !== inp.scale!.shape[i])) {
      throw new ShapeError(`[${op}] shift ${shapeStr(inp.shift.shape)} and scale ${shapeStr(inp.scale.shape)} must have the same shape`);
    }
    modRowMap(op, x, inp.shift, 'shift');
  }
}

/** Shared GPU encoder of LayerNorm (norm 0) and RMSNorm (norm 1). */
function rowNormGpu(e: Engine, op: string, norm: 0 | 1, inp: RowNormInputs, a: RowNormAttrs): Tensor {
  const { x, weight, bias, shift, scale } = inp;
  const outDt = outDtype(op, x, a.out);
  const y = e.empty(x.shape, outDt);
  const D = x.shape[x.rank - 1]!;
  const rows = D === 0 ? 0 : x.numel / D;
  if (rows === 0) return y;
  const impl = pickImpl(e, a.impl);
  const limit = bindingLimit(e, a.maxBindingBytes);
  const hasMod = !!(shift && scale);
  const mmap = hasMod ? modRowMap(op, x, shift!, 'shift') : { div: 1, mod: 1 };
  // per-row modulation (same row count as x) is windowed with x; broadcast modulation is bound whole
  const modPerRow = hasMod && mmap.div === 1 && mmap.mod === rows;
  const rowBytes = [D * dtypeSize(x.dtype), D * dtypeSize(outDt)];
  if (modPerRow) rowBytes.push(D * dtypeSize(shift!.dtype));
  const whole = (t: Tensor | undefined, what: string): Window | null => {
    if (!t) return null;
    if (t.nbytes + windowSlack(e) > limit) throw new ShapeError(`[${op}] ${what} ${t} is larger than the binding limit (${limit} bytes)`);
    return elemWindow(e, t, 0, t.numel, op);
  };
  const wW = whole(weight, 'weight');
  const bW = whole(bias, 'bias');
  const sWhole = hasMod && !modPerRow ? whole(shift, 'shift') : null;
  const cWhole = hasMod && !modPerRow ? whole(scale, 'scale') : null;
  const kernel = {
    family: 'norm',
    entry: impl === 'thread' ? 'row_thread' : 'row_wg',
    constants: { WG: impl === 'thread' ? THREAD_WG : ROW_WG, NORM: norm },
    aliases: { x_t: actAlias(op, x.dtype, e), y_t: actAlias(op, outDt, e) },
    layout: ['read', 'read', 'read', 'read', 'read', 'write'] as Array<'read' | 'write'>,
  };
  const wd = weight ?? bias;
  const flags = (weight ? 1 : 0) | (bias ? 2 : 0) | (hasMod ? 4 : 0) | ((wd ? dtypeCode(wd.dtype) : 0) << 8) | ((hasMod ? dtypeCode(shift!.dtype) : 0) << 10);
  for (const [r0, r1] of rowChunks(e, op, rows, rowBytes, limit)) {
    const n = r1 - r0;
    const xw = elemWindow(e, x, r0 * D, r1 * D, op);
    const yw = elemWindow(e, y, r0 * D, r1 * D, op);
    let sw = sWhole;
    let cw = cWhole;
    let mRow0 = r0;
    if (modPerRow) {
      sw = elemWindow(e, shift!, r0 * D, r1 * D, op);
      cw = elemWindow(e, scale!, r0 * D, r1 * D, op);
      mRow0 = 0;
    }
    // the modulation windows of one dispatch share one element offset
    const mOff = sw ? sw.off : 0;
    if (sw && cw && sw.off !== cw.off) throw new ShapeError(`[${op}] shift and scale views are aligned differently; clone one of them`);
    const params = {
      rows: n,
      d: D,
      x_off: xw.off,
      y_off: yw.off,
      m_row0: mRow0,
      m_div: modPerRow ? 1 : mmap.div,
      m_mod: modPerRow ? n : mmap.mod,
      m_off: mOff,
      eps: a.eps,
      w_off: wW?.off ?? 0,
      b_off: bW?.off ?? 0,
      flags,
    };
    const dummy = xw.binding;
    e.dispatch({
      kernel,
      name: `${op}.${impl}`,
      params,
      bindings: [xw.binding, wW?.binding ?? dummy, bW?.binding ?? dummy, sw?.binding ?? dummy, cw?.binding ?? dummy, yw.binding],
      workgroups: impl === 'thread' ? grid1d(Math.ceil(n / THREAD_WG)) : grid1d(n),
    });
  }
  return y;
}

// ---- CPU references: plain loops, f64 accumulation ----

function vals(t: Tensor | undefined): Float32Array | null {
  if (!t) return null;
  const v = t.hostValues();
  return v instanceof Float32Array ? v : Float32Array.from(v);
}

function rowNormCpu(op: string, norm: 0 | 1, inp: RowNormInputs, a: RowNormAttrs): Tensor {
  const { x } = inp;
  const outDt = outDtype(op, x, a.out);
  const D = x.shape[x.rank - 1]!;
  const rows = D === 0 ? 0 : x.numel / D;
  const xv = vals(x)!;
  const w = vals(inp.weight);
  const b = vals(inp.bias);
  const sh = vals(inp.shift);
  const sc = vals(inp.scale);
  const mmap = sh ? modRowMap(op, x, inp.shift!, 'shift') : { div: 1, mod: 1 };
  const out = new Float32Array(x.numel);
  for (let r = 0; r < rows; r++) {
    const o = r * D;
    let mean = 0;
    if (norm === 0) {
      let s = 0;
      for (let j = 0; j < D; j++) s += xv[o + j]!;
      mean = s / D;
    }
    let q = 0;
    for (let j = 0; j < D; j++) {
      const d = xv[o + j]! - mean;
      q += d * d;
    }
    const rstd = 1 / Math.sqrt(q / D + a.eps);
    const mo = (Math.floor(r / mmap.div) % mmap.mod) * D;
    for (let j = 0; j < D; j++) {
      let v = (xv[o + j]! - mean) * rstd;
      if (w) v *= w[j]!;
      if (b) v += b[j]!;
      if (sh && sc) v = v * (1 + sc[mo + j]!) + sh[mo + j]!;
      out[o + j] = v;
    }
  }
  return Tensor.fromValues(out, x.shape, outDt);
}

function rowBytes(x: Tensor, out: DType | undefined): number {
  return x.numel * (dtypeSize(x.dtype) + dtypeSize(out ?? x.dtype));
}

// =====================================================================================
// LayerNorm
// =====================================================================================

/**
 * LayerNorm over the last dim D: (x - mean) / sqrt(var + eps) [* weight + bias], biased variance
 * (PyTorch). With shift/scale (broadcast over the rows, usually [D]): y = LN(x) * (1 + scale) + shift,
 * Wan's norm1/norm2 + modulation in one pass.
 */
export const layerNorm = defineOp<RowNormInputs, RowNormAttrs>({
  name: 'layer_norm',
  family: 'norm',
  check: (inp, a) => checkRowNorm('layer_norm', inp, a),
  gpu: (e, inp, a) => rowNormGpu(e, 'layer_norm', 0, inp, a),
  cpu: (inp, a) => rowNormCpu('layer_norm', 0, inp, a),
  flops: ({ x, weight, bias, shift }) => x.numel * (7 + (weight ? 1 : 0) + (bias ? 1 : 0) + (shift ? 3 : 0)),
  bytes: ({ x, weight, bias, shift }, a) => rowBytes(x, a.out) + (weight?.nbytes ?? 0) + (bias?.nbytes ?? 0) + (shift ? 2 * shift.nbytes : 0),
});

// =====================================================================================
// RMSNorm
// =====================================================================================

/** RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * weight (T5 layer norm; Wan q/k norm over the full D). */
export const rmsNorm = defineOp<{ x: Tensor; weight: Tensor }, RowNormAttrs>({
  name: 'rms_norm',
  family: 'norm',
  check(inp, a) {
    if (!inp.weight) throw new ShapeError('[rms_norm] weight is required');
    checkRowNorm('rms_norm', inp, a);
  },
  gpu: (e, inp, a) => rowNormGpu(e, 'rms_norm', 1, inp, a),
  cpu: (inp, a) => rowNormCpu('rms_norm', 1, inp, a),
  flops: ({ x }) => x.numel * 5,
  bytes: ({ x, weight }, a) => rowBytes(x, a.out) + weight.nbytes,
});

// =====================================================================================
// channel L2 norm (Wan VAE RMS_norm)
// =====================================================================================

export interface ChannelL2Attrs {
  /** lower bound of the norm (F.normalize's eps), default 1e-12 */
  eps?: number;
  out?: DType;
  /** tests only: plan as if the binding limit were this many bytes */
  maxBindingBytes?: number;
}

const L2_WG = 64;

function l2Dims(x: Tensor): { B: number; C: number; S: number } {
  const B = x.shape[0]!;
  const C = x.shape[1]!;
  const S = numelOf(x.shape.slice(2));
  return { B, C, S };
}

/** A chunk of channelL2Norm: batch b, channels [c0, c0+nc), positions [s0, s0+ns). */
interface L2Chunk {
  b: number;
  c0: number;
  nc: number;
  s0: number;
  ns: number;
}

function l2Chunks(e: Engine, x: Tensor, outDt: DType, limit: number): L2Chunk[] {
  const { B, C, S } = l2Dims(x);
  const elt = Math.max(dtypeSize(x.dtype), dtypeSize(outDt));
  const room = Math.floor((limit - windowSlack(e)) / elt); // elements per window
  const chunks: L2Chunk[] = [];
  for (let b = 0; b < B; b++) {
    if (S <= room) {
      // whole planes: nc channels span (nc - 1) * S + S elements
      const per = Math.max(1, Math.floor(room / S));
      for (let c0 = 0; c0 < C; c0 += per) chunks.push({ b, c0, nc: Math.min(per, C - c0), s0: 0, ns: S });
    } else {
      // one channel plane alone is too big: one channel at a time, position ranges
      for (let c0 = 0; c0 < C; c0++) for (let s0 = 0; s0 < S; s0 += room) chunks.push({ b, c0, nc: 1, s0, ns: Math.min(room, S - s0) });
    }
  }
  return chunks;
}

/**
 * Wan VAE RMS_norm over dim 1 of channel-first x [B, C, ...spatial]:
 * y = x / max(||x||_2 over C, eps) * sqrt(C) * gamma[c]   (F.normalize(x, dim=1) * C**0.5 * gamma).
 * gamma: [C], [C,1,1] or [C,1,1,1] (any shape with C elements), f32/f16/bf16.
 */
export const channelL2NormOp = defineOp<{ x: Tensor; gamma: Tensor }, ChannelL2Attrs | undefined>({
  name: 'channel_l2_norm',
  family: 'norm',
  check({ x, gamma }, a) {
    actAlias('channel_l2_norm', x.dtype);
    outDtype('channel_l2_norm', x, a?.out);
    if (x.rank < 2) throw new ShapeError(`[channel_l2_norm] x must be [B, C, ...], got ${x}`);
    expectDtype('channel_l2_norm', 'gamma', gamma, PARAM_DTYPES);
    const C = x.shape[1]!;
    if (gamma.numel !== C || gamma.shape[0] !== C) {
      throw new ShapeError(`[channel_l2_norm] gamma ${shapeStr(gamma.shape)} must have C = ${C} elements ([C], [C,1,1] or [C,1,1,1]) for x ${shapeStr(x.shape)}`);
    }
    if (a?.eps !== undefined && !(a.eps >= 0)) throw new ShapeError(`[channel_l2_norm] eps must be >= 0, got ${a.eps}`);
  },
  gpu(e, { x, gamma }, a) {
    const outDt = outDtype('channel_l2_norm', x, a?.out);
    const y = e.empty(x.shape, outDt);
    const { B, C, S } = l2Dims(x);
    if (x.numel === 0) return y;
    const limit = bindingLimit(e, a?.maxBindingBytes);
    const ss = e.empty([B * S], 'f32'); // per-position sums of squares
    if (gamma.nbytes + windowSlack(e) > limit) throw new ShapeError(`[channel_l2_norm] gamma ${gamma} is larger than the binding limit`);
    const gw = elemWindow(e, gamma, 0, gamma.numel, 'channel_l2_norm');
    if (gw.off !== 0) throw new ShapeError(`[channel_l2_norm] gamma ${gamma} is a view at an unaligned offset; clone it`);
    const chunks = l2Chunks(e, x, outDt, limit);
    const aliases = { x_t: actAlias('channel_l2_norm', x.dtype, e), y_t: actAlias('channel_l2_norm', outDt, e) };
    const ssWin = (c: L2Chunk) => elemWindow(e, ss, c.b * S + c.s0, c.b * S + c.s0 + c.ns, 'channel_l2_norm');
    const params = (c: L2Chunk, xoff: number, yoff: number, ssoff: number, acc: number) =>
      ({ ns: c.ns, nc: c.nc, s_stride: S, x_off: xoff, y_off: yoff, ss_off: ssoff, c0: c.c0, accumulate: acc, scale: Math.sqrt(C), eps: a?.eps ?? 1e-12 });
    const range = (c: L2Chunk): [number, number] => {
      const start = (c.b * C + c.c0) * S + c.s0;
      return [start, start + (c.nc - 1) * S + c.ns];
    };
    // pass 1: sum of squares over all channels, per position
    for (const c of chunks) {
      const [s, t] = range(c);
      const xw = elemWindow(e, x, s, t, 'channel_l2_norm');
      const sw = ssWin(c);
      e.dispatch({
        kernel: { family: 'norm', entry: 'l2_sumsq', constants: { WG: L2_WG }, aliases, layout: ['read', 'write'] },
        name: 'channel_l2_norm.sumsq',
        params: params(c, xw.off, 0, sw.off, c.c0 === 0 ? 0 : 1),
        bindings: [xw.binding, sw.binding],
        workgroups: grid1d(Math.ceil(c.ns / L2_WG)),
      });
    }
    // pass 2: scale
    for (const c of chunks) {
      const [s, t] = range(c);
      const xw = elemWindow(e, x, s, t, 'channel_l2_norm');
      const yw = elemWindow(e, y, s, t, 'channel_l2_norm');
      const sw = ssWin(c);
      e.dispatch({
        kernel: { family: 'norm', entry: 'l2_apply', constants: { WG: L2_WG, W_DTYPE: dtypeCode(gamma.dtype) }, aliases, layout: ['read', 'read', 'read', 'write'] },
        name: 'channel_l2_norm.apply',
        params: params(c, xw.off, yw.off, sw.off, 0),
        bindings: [xw.binding, sw.binding, gw.binding, yw.binding],
        workgroups: grid1d(Math.ceil(c.ns / L2_WG)),
      });
    }
    ss.dispose();
    return y;
  },
  cpu({ x, gamma }, a) {
    const outDt = outDtype('channel_l2_norm', x, a?.out);
    const { B, C, S } = l2Dims(x);
    const xv = vals(x)!;
    const g = vals(gamma)!;
    const eps = a?.eps ?? 1e-12;
    const out = new Float32Array(x.numel);
    const sq = new Float64Array(S);
    const sc = Math.sqrt(C);
    for (let b = 0; b < B; b++) {
      const base = b * C * S;
      sq.fill(0);
      for (let c = 0; c < C; c++) {
        const o = base + c * S;
        for (let s = 0; s < S; s++) sq[s] += xv[o + s]! * xv[o + s]!;
      }
      for (let s = 0; s < S; s++) sq[s] = sc / Math.max(Math.sqrt(sq[s]!), eps);
      for (let c = 0; c < C; c++) {
        const o = base + c * S;
        const gc = g[c]!;
        for (let s = 0; s < S; s++) out[o + s] = xv[o + s]! * sq[s]! * gc;
      }
    }
    return Tensor.fromValues(out, x.shape, outDt);
  },
  flops: ({ x }) => x.numel * 5,
  bytes: ({ x }, a) => x.numel * (2 * dtypeSize(x.dtype) + dtypeSize(a?.out ?? x.dtype)),
});

/** channelL2Norm with optional attrs (the registered op is `channelL2NormOp`). */
export const channelL2Norm = Object.assign((inputs: { x: Tensor; gamma: Tensor }, attrs?: ChannelL2Attrs): Tensor => channelL2NormOp(inputs, attrs), {
  def: channelL2NormOp.def,
});
