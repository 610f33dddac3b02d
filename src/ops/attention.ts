// Fused scaled-dot-product attention. Flash-style: online softmax over blocks of keys, the L×L
// score matrix never exists.
//
//   q [B, Lq, H, Dh], k/v [B, Lk, H, Dh]  (f32 or f16; a Linear's [B, L, H*Dh] output reshaped)
//   out[b, i, h, :] = sum_j softmax_j(scale * q·k + bias)[j] * v[b, j, h, :]     [B, Lq, H, Dh]
//   bias (f32): 'full' [H, Lq, Lk], or 'relative' [H, Lq + Lk - 1] with
//               score(h, i, j) += bias[h, j - i + Lq - 1]   (T5: one small table per layer)
//   keyMask [B, Lk] i32: 0 = masked. A query with no attendable key gets zeros.
//
// Kernels (attentionKernel() picks one, the adapter's part from variants.ts): 'ubo'
// (kernels/attention.wgsl flash_ubo + pack_kv) on llvmpipe without a bias; 'subgroup' (flash) on
// other adapters with subgroups, and with a bias; 'portable' (kernels/softmax.wgsl
// attention_portable) without subgroups or when Dh % 4 != 0.
//
// Tensors above the adapter's binding limit (Wan 480p: q/k/v [1, 32760, 12, 128] f32 = 201 MB) are
// split: per batch, per query chunk, per head (full bias only) and per key chunk; each dispatch binds
// windows of the big buffers (window.ts), and key chunks are chained through the online-softmax
// state (unnormalized accumulator + running max and sum).

import { defineOp, grid1d } from './registry.ts';
import { actAlias, cpuTensor, f32 } from './common.ts';
import { bindingLimit, elemWindow } from './window.ts';
import { meets, variantFor } from './variants.ts';
import type { BufferBinding, Engine } from '../runtime/engine.ts';
import type { Aliases, BindingKind } from '../runtime/kernels.ts';
import { Tensor, shapeStr } from '../tensor/tensor.ts';
import { type DType, dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

export type BiasMode = 'full' | 'relative';

export interface AttentionAttrs {
  /** multiplier of q·k (Wan: 1/sqrt(Dh); T5: 1) */
  scale: number;
  /** how `bias` is laid out (default 'full') */
  biasMode?: BiasMode;
  /** output dtype (default: q's) */
  out?: DType;
  /** tests only: treat this many bytes as the binding limit (exercises the split path cheaply) */
  maxBindingBytes?: number;
  /** tests / benchmarks: force a kernel (see attentionKernel) */
  kernel?: 'auto' | AttentionKernel;
}

export type AttentionInputs = { q: Tensor; k: Tensor; v: Tensor; bias?: Tensor; keyMask?: Tensor };

// 'subgroup' / 'portable' geometry: must match kernels/attention.wgsl flash (QPL, KB)
// (the geometry, the flags, dims, window and uboWindows are shared with attention_lse.ts, which
// dispatches these kernels without their final normalization)
export const SG_WG = 32;
export const SG_QPL = 4;
export const SG_KB = 32;
export const PORTABLE_WG = 64;
// Params.flags bits (kernels/attention.wgsl, kernels/softmax.wgsl)
const FLAG_MASK = 1;
const FLAG_BIAS_FULL = 2;
const FLAG_BIAS_REL = 4;
export const FLAG_STATE_IN = 8;
const FLAG_FINAL = 16;
const FLAG_ACC_IS_OUT = 32;

export function dims(q: Tensor, k: Tensor) {
  return { B: q.shape[0]!, Lq: q.shape[1]!, H: q.shape[2]!, Dh: q.shape[3]!, Lk: k.shape[1]! };
}

export type AttentionKernel = 'ubo' | 'subgroup' | 'portable';

/** head dims the 'ubo' kernel takes: at least 16 keys per 64 KiB uniform window */
const UBO_MAX_DH = 1024;

/**
 * Which kernel runs on this engine for head dim Dh. 'auto': the adapter's choice from
 * variants.ts ('ubo' on llvmpipe, 'subgroup' elsewhere, 'portable' without subgroups of at least
 * 8 lanes), then the shape: 'ubo' only without a bias and for Dh <= 1024 (else 'subgroup'), and
 * 'portable' for head dims that are not a multiple of 4.
 */
export function attentionKernel(e: Engine, Dh: number, want: AttentionAttrs['kernel'] = 'auto', hasBias = false): AttentionKernel {
  const vec4Dh = Dh % 4 === 0;
  if (want === 'portable') return 'portable';
  if (want === 'subgroup' || want === 'ubo') {
    if (!meets(e.caps, 'subgroups8')) throw new ShapeError(`[attention] the ${want} kernel needs the 'subgroups' feature with subgroups of at least 8 lanes; this adapter has ${e.caps.subgroups ? `min size ${e.caps.subgroupMinSize}` : 'none'}`);
    if (!vec4Dh) throw new ShapeError(`[attention] the ${want} kernel needs a head dim that is a multiple of 4, got ${Dh}`);
    if (want === 'ubo' && hasBias) throw new ShapeError(`[attention] the 'ubo' kernel takes no bias; use 'subgroup' or 'portable'`);
    if (want === 'ubo' && Dh > UBO_MAX_DH) throw new ShapeError(`[attention] the 'ubo' kernel takes head dims up to ${UBO_MAX_DH}, got ${Dh}`);
    return want;
  }
  const v = variantFor(e.caps, 'attention');
  if (v === 'portable' || !vec4Dh) return 'portable';
  return v === 'ubo' && !hasBias && Dh <= UBO_MAX_DH ? 'ubo' : 'subgroup';
}

export interface Window {
  binding: BufferBinding;
  /** first bound element of the full tensor, in units of `unit` elements */
  base: number;
}

/**
 * Bind elements [start, end) of `t` (plus whatever the alignment pulls in before `start`).
 * `base` is the index, in units of `unit` elements, of the first bound element (the kernels
 * index whole vec4s from it, so `t` itself must start at an aligned offset).
 */
export function window(e: Engine, t: Tensor, start: number, end: number, unit: number, what: string, op = 'attention'): Window {
  const align = e.caps.storageAlign;
  if (t.byteOffset % align !== 0) {
    throw new ShapeError(`[${op}] ${what} ${t} is a view at byte offset ${t.byteOffset}, not a multiple of ${align}; clone it first`);
  }
  const w = elemWindow(e, t, start, end, op);
  return { binding: w.binding, base: (start - w.off) / unit };
}

function fitsU32(op: string, what: string, t: Tensor): void {
  if (t.numel >= 2 ** 32) throw new ShapeError(`[${op}] ${what} ${shapeStr(t.shape)} has 2^32 or more elements (the kernels index in u32); split the batch`);
}

export const attention = defineOp<AttentionInputs, AttentionAttrs>({
  name: 'attention',
  family: 'attention',
  check({ q, k, v, bias, keyMask }, a) {
    for (const [t, n] of [[q, 'q'], [k, 'k'], [v, 'v']] as const) {
      if (t.rank !== 4) throw new ShapeError(`[attention] ${n} must be [B, L, H, Dh] (rank 4), got ${shapeStr(t.shape)}; reshape a [B, L, H*Dh] projection with .reshape([B, L, H, Dh])`);
      actAlias('attention', t.dtype);
      fitsU32('attention', n, t);
    }
    if (k.dtype !== q.dtype || v.dtype !== q.dtype) throw new ShapeError(`[attention] q, k and v must have the same dtype, got ${q.dtype}, ${k.dtype}, ${v.dtype}; cast them first`);
    const { B, Lq, H, Dh, Lk } = dims(q, k);
    if (k.shape[0] !== B || k.shape[2] !== H || k.shape[3] !== Dh) {
      throw new ShapeError(`[attention] k ${shapeStr(k.shape)} does not match q ${shapeStr(q.shape)}: want [${B}, Lk, ${H}, ${Dh}]`);
    }
    if (v.shape.some((d, i) => d !== k.shape[i])) throw new ShapeError(`[attention] v ${shapeStr(v.shape)} must have k's shape ${shapeStr(k.shape)}`);
    if (typeof a.scale !== 'number' || !Number.isFinite(a.scale)) throw new ShapeError(`[attention] scale must be a finite number (Wan: 1/sqrt(head_dim), T5: 1), got ${a.scale}`);
    actAlias('attention', a.out ?? q.dtype);
    const mode = a.biasMode ?? 'full';
    if (mode !== 'full' && mode !== 'relative') throw new ShapeError(`[attention] biasMode must be 'full' or 'relative', got '${mode}'`);
    if (bias) {
      if (bias.dtype !== 'f32') throw new ShapeError(`[attention] bias must be f32, got ${bias.dtype}`);
      const want = mode === 'full' ? [H, Lq, Lk] : [H, Lq + Lk - 1];
      if (bias.rank !== want.length || bias.shape.some((d, i) => d !== want[i])) {
        throw new ShapeError(
          `[attention] ${mode} bias must be ${shapeStr(want)} (${mode === 'full' ? '[H, Lq, Lk]' : '[H, Lq + Lk - 1], index j - i + Lq - 1'}), got ${shapeStr(bias.shape)}`,
        );
      }
      fitsU32('attention', 'bias', bias);
    } else if (a.biasMode) {
      throw new ShapeError(`[attention] biasMode '${a.biasMode}' given without a bias tensor`);
    }
    if (keyMask) {
      if (keyMask.dtype !== 'i32' && keyMask.dtype !== 'u32') throw new ShapeError(`[attention] keyMask must be i32 (nonzero = attend), got ${keyMask.dtype}`);
      if (keyMask.rank !== 2 || keyMask.shape[0] !== B || keyMask.shape[1] !== Lk) {
        throw new ShapeError(`[attention] keyMask must be [B, Lk] = [${B}, ${Lk}], got ${shapeStr(keyMask.shape)}`);
      }
    }
    if (a.maxBindingBytes !== undefined && !(a.maxBindingBytes >= 1024)) throw new ShapeError(`[attention] maxBindingBytes must be at least 1024, got ${a.maxBindingBytes}`);
  },
  gpu: attentionGpu,
  cpu: attentionCpu,
  flops({ q, k }) {
    const { B, Lq, H, Dh, Lk } = dims(q, k);
    return 4 * B * H * Lq * Lk * Dh;
  },
  bytes({ q, k, v, bias, keyMask }, a) {
    return q.nbytes + k.nbytes + v.nbytes + q.numel * dtypeSize(a.out ?? q.dtype) + (bias?.nbytes ?? 0) + (keyMask?.nbytes ?? 0);
  },
});

function attentionGpu(e: Engine, { q, k, v, bias, keyMask }: AttentionInputs, a: AttentionAttrs): Tensor {
  const { B, Lq, H, Dh, Lk } = dims(q, k);
  const outDt = a.out ?? q.dtype;
  // f16 tensors need shader-f16 on the engine (the subgroup kernels could pack f16 output without
  // it, but an f16 tensor is of no use to the other ops there)
  actAlias('attention', q.dtype, e);
  actAlias('attention', outDt, e);
  const out = e.empty([B, Lq, H, Dh], outDt);
  if (out.numel === 0) return out;
  const kern = attentionKernel(e, Dh, a.kernel, !!bias);
  if (kern === 'ubo') {
    attentionUbo(e, { q, k, v, keyMask }, a, out);
    return out;
  }
  const portable = kern === 'portable';
  const unit = portable ? 1 : 4; // elements per index of the q/k/v/acc bindings
  const wg = portable ? PORTABLE_WG : SG_WG;
  const qpw = portable ? PORTABLE_WG : SG_WG * SG_QPL; // queries per workgroup
  const mode = bias ? (a.biasMode ?? 'full') : null;
  const limit = bindingLimit(e, a.maxBindingBytes);
  const align = e.caps.storageAlign;
  const usable = limit - align; // a window start may be pulled back by up to align - 1 bytes
  const es = dtypeSize(q.dtype);
  const accIsOut = outDt === 'f32';
  const rowQ = H * Dh * es; // bytes of one token row (all heads) of q / k / v
  const rowO = H * Dh * dtypeSize(outDt);
  const rowS = H * Dh * 4; // f32 accumulator
  const rowMax = Math.max(rowQ, rowO, accIsOut ? 0 : rowS);

  for (const [t, n] of [[keyMask, 'keyMask'], [mode === 'relative' ? bias : undefined, 'relative bias']] as const) {
    if (t && t.nbytes > limit) throw new ShapeError(`[attention] ${n} ${shapeStr(t.shape)} is ${t.nbytes} bytes, above the binding limit ${limit}`);
  }
  if (rowQ > usable || rowO > usable || rowS > usable) throw new ShapeError(`[attention] one token row of ${H} heads x ${Dh} is above the binding limit ${limit}`);

  // ---- plan: batch groups, query chunks, head groups, key chunks
  const wholeQ = B * Lq * rowMax <= usable;
  const wholeK = B * Lk * rowQ <= usable;
  let QC = wholeQ ? Lq : Math.max(1, Math.floor(usable / rowMax));
  let KC = wholeK ? Lk : Math.max(1, Math.floor(usable / rowQ));
  if (KC < Lk && KC > SG_KB) KC -= KC % SG_KB; // whole blocks of keys per chunk
  let perHead = false;
  if (mode === 'full') {
    const perHeadBytes = Lq * Lk * 4;
    if (H * perHeadBytes > usable || QC < Lq) {
      perHead = true;
      if (perHeadBytes > usable) QC = Math.min(QC, Math.max(1, Math.floor(usable / (Lk * 4))));
      if (Lk * 4 > usable) throw new ShapeError(`[attention] one bias row of ${Lk} keys is above the binding limit ${limit}; use a relative bias or fewer keys`);
    }
  }
  const groupBatches = QC === Lq && KC >= Lk && wholeQ && wholeK;
  const nKeyChunks = Math.max(1, Math.ceil(Lk / KC));
  const chained = nKeyChunks > 1;

  // ---- scratch: accumulator (unless it is the output) and the (m, l) state for chained key chunks
  const tmp: Tensor[] = [];
  const scratch = (n: number, dt: DType) => {
    const t = e.empty([Math.max(n, 4)], dt, 'attention.scratch');
    tmp.push(t);
    return t;
  };
  const rowsPerDispatch = groupBatches ? B * Lq : QC;
  const accT = accIsOut ? null : scratch(rowsPerDispatch * H * Dh, 'f32');
  const mlT = chained ? scratch(rowsPerDispatch * H * 2, 'f32') : null;
  const dumR = scratch(4, 'f32');
  const dumO = scratch(4, 'f32');
  const dumML = mlT ? null : scratch(4, 'f32');

  // the subgroup kernel writes an f32 output through st_acc and an f16 one as packed words: only
  // the input dtype makes another module there
  const aliases: Aliases = { in_t: actAlias('attention', q.dtype, e) };
  if (portable) aliases.o_t = actAlias('attention', outDt, e);
  const layout = ['read', 'read', 'read', 'read', 'read', 'write', 'write', 'write'] as const;
  const flags =
    (keyMask ? FLAG_MASK : 0) | (mode === 'full' ? FLAG_BIAS_FULL : 0) | (mode === 'relative' ? FLAG_BIAS_REL : 0) | (accIsOut ? FLAG_ACC_IS_OUT : 0);
  const whole = (t: Tensor): BufferBinding => e.binding(t, 'attention');

  const batchGroups: Array<[number, number]> = groupBatches ? [[0, B]] : Array.from({ length: B }, (_, b) => [b, 1] as [number, number]);
  const headGroups: Array<[number, number]> = perHead ? Array.from({ length: H }, (_, h) => [h, 1] as [number, number]) : [[0, H]];
  for (const [b0, nb] of batchGroups) {
    for (let i0 = 0; i0 < Lq; i0 += QC) {
      const nq = Math.min(QC, Lq - i0);
      const rowA = b0 * Lq + i0; // first query row of the dispatch (full tensor)
      const rowB = (b0 + nb - 1) * Lq + i0 + nq; // one past the last
      const qW = window(e, q, rowA * H * Dh, rowB * H * Dh, unit, 'q');
      const oW = window(e, out, rowA * H * Dh, rowB * H * Dh, unit, 'output');
      for (const [h0, nh] of headGroups) {
        let biasW: Window | null = null;
        if (bias && mode === 'full' && (perHead || !groupBatches)) {
          biasW = perHead
            ? window(e, bias, (h0 * Lq + i0) * Lk, (h0 * Lq + i0 + nq) * Lk, 1, 'bias')
            : window(e, bias, 0, bias.numel, 1, 'bias');
        }
        for (let c = 0; c < nKeyChunks; c++) {
          const j0 = c * KC;
          const j1 = Math.min(Lk, j0 + KC);
          const kA = b0 * Lk + (groupBatches ? 0 : j0);
          const kB = (b0 + nb - 1) * Lk + (groupBatches ? Lk : j1);
          const kW = window(e, k, kA * H * Dh, Math.max(kB, kA) * H * Dh, unit, 'k');
          const vW = window(e, v, kA * H * Dh, Math.max(kB, kA) * H * Dh, unit, 'v');
          const accW: Window = accIsOut ? oW : { binding: whole(accT!), base: rowA * H * Dh / unit };
          const qtiles = Math.ceil(nq / qpw);
          const ngroups = nb * nh * qtiles;
          const p = {
            Lq, Lk, H, Dh,
            b0, nh, h0, i0,
            nq, qtiles, ngroups, j0: groupBatches ? 0 : j0,
            j1: groupBatches ? Lk : j1, q_base: qW.base, k_base: kW.base, v_base: vW.base,
            s_row0: rowA * H, o_base: oW.base * unit, bias_base: biasW?.base ?? 0, acc_base: accW.base,
            scale: a.scale * Math.LOG2E, bias_scale: Math.LOG2E,
            flags: flags | (c > 0 ? FLAG_STATE_IN : 0) | (c === nKeyChunks - 1 ? FLAG_FINAL : 0),
          };
          e.dispatch({
            kernel: {
              family: portable ? 'softmax' : 'attention',
              entry: portable ? 'attention_portable' : 'flash',
              constants: { [portable ? 'AWG' : 'WG']: wg },
              aliases,
              layout: [...layout],
            },
            name: `attention.${portable ? 'portable' : 'flash'}`,
            params: p,
            bindings: [
              qW.binding,
              kW.binding,
              vW.binding,
              bias ? (biasW ? biasW.binding : whole(bias)) : whole(dumR),
              keyMask ? whole(keyMask) : whole(dumR),
              accIsOut ? whole(dumO) : oW.binding,
              accW.binding,
              whole(mlT ?? dumML!),
            ],
            workgroups: grid1d(ngroups),
          });
        }
      }
    }
  }
  for (const t of tmp) t.dispose();
  return out;
}

// ---------------------------------------------------------------- 'ubo' (llvmpipe)

export const UBO_WG = 8;
export const UBO_QPL = 4;
export const UBO_BYTES = 65536;

/**
 * Keys per 64 KiB uniform window (KPB, a multiple of 8 so a round of 8 keys stays in one window,
 * with window offsets aligned for uniform bindings) and windows per dispatch (NKW <= 4): enough
 * to fill the kernel's 128-key block when one window holds fewer (head dims above 128).
 */
/**
 * flash_ubo's kernel: bindings q, 4 key windows, 4 value windows (uboKeyWindows), key mask,
 * output, accumulator, m/l state.
 */
export function flashUboKernel(NKW: number, aliases: Aliases) {
  return {
    family: 'attention',
    entry: 'flash_ubo',
    constants: { WG: UBO_WG, NKW },
    aliases,
    layout: ['read', 'uniform', 'uniform', 'uniform', 'uniform', 'uniform', 'uniform', 'uniform', 'uniform', 'read', 'write', 'write', 'write'] as BindingKind[],
  };
}

/** A dispatch's 4 uniform windows of packed keys (or values) t: keys j0 + x·KPB ..; windows past the last key (j1) repeat window 0. */
export function uboKeyWindows(t: Tensor, j0: number, j1: number, KPB: number, Dh: number): BufferBinding[] {
  return [0, 1, 2, 3].map((x) => ({ buffer: t.buffer, offset: t.byteOffset + (j0 + (j0 + x * KPB < j1 ? x : 0) * KPB) * Dh * 4, size: UBO_BYTES }));
}

export function uboWindows(Dh: number, uAlign: number, op = 'attention'): { KPB: number; NKW: number } {
  let KPB = Math.floor(UBO_BYTES / (Dh * 4 * 8)) * 8;
  if (KPB < 128) {
    // prefer a divisor of 128 that 4 windows can cover (Dh 384: 4 x 32 rather than 3.2 x 40)
    for (const d of [64, 32, 16, 8]) if (d <= KPB && 128 / d <= 4) { KPB = d; break; }
  }
  while (KPB > 8 && (KPB * Dh * 4) % uAlign !== 0) KPB -= 8;
  if (KPB < 8 || (KPB * Dh * 4) % uAlign !== 0) throw new ShapeError(`[${op}] head dim ${Dh} leaves no aligned uniform window of 8 keys; use the 'subgroup' kernel`);
  return { KPB, NKW: Math.min(4, Math.max(1, Math.ceil(128 / KPB))) };
}

/**
 * flash_ubo: per (batch, head), K and V are packed into f32 [keys, Dh] workspaces, then each
 * window of KPB keys (one 64 KiB uniform binding each for K and V) is one dispatch over all
 * queries; windows are chained through the (m, l) state, the accumulator stays in st_acc.
 */
function attentionUbo(e: Engine, { q, k, v, keyMask }: AttentionInputs, a: AttentionAttrs, out: Tensor): void {
  const { B, Lq, H, Dh, Lk } = dims(q, k);
  const outDt = out.dtype;
  const limit = bindingLimit(e, a.maxBindingBytes);
  const align = e.caps.storageAlign;
  const usable = limit - align;
  const es = dtypeSize(q.dtype);
  const accIsOut = outDt === 'f32';
  const dh4 = Dh / 4;
  const rowQ = H * Dh * es;
  const rowMax = Math.max(rowQ, H * Dh * dtypeSize(outDt), accIsOut ? 0 : H * Dh * 4);
  if (rowMax > usable) throw new ShapeError(`[attention] one token row of ${H} heads x ${Dh} is above the binding limit ${limit}`);
  if (keyMask && keyMask.nbytes > limit) throw new ShapeError(`[attention] keyMask ${shapeStr(keyMask.shape)} is above the binding limit ${limit}`);
  const { KPB, NKW } = uboWindows(Dh, e.limits.minUniformBufferOffsetAlignment);
  const KPD = KPB * NKW; // keys per dispatch
  const nWin = Math.max(1, Math.ceil(Lk / KPD)); // dispatches per (batch, head, query chunk)
  const QC = Math.max(1, Math.min(Lq, Math.floor(usable / rowMax)));
  const PC = Math.max(1, Math.min(Lk, Math.floor(usable / rowQ))); // keys per pack dispatch (k/v windows)

  const tmp: Tensor[] = [];
  const scratch = (n: number, dt: DType) => {
    const t = e.empty([Math.max(n, 4)], dt, 'attention.scratch');
    tmp.push(t);
    return t;
  };
  const wsFloats = nWin * KPD * Dh + UBO_BYTES / 4;
  const kp = scratch(wsFloats, 'f32');
  const vp = scratch(wsFloats, 'f32');
  const accT = accIsOut ? null : scratch(QC * H * Dh, 'f32');
  const mlT = nWin > 1 ? scratch(QC * H * 2, 'f32') : scratch(4, 'f32');
  const dumR = scratch(4, 'i32');
  const dumO = scratch(4, 'f32');
  const whole = (t: Tensor): BufferBinding => e.binding(t, 'attention');
  const aliases: Aliases = { in_t: actAlias('attention', q.dtype, e) };
  const baseFlags = (keyMask ? FLAG_MASK : 0) | (accIsOut ? FLAG_ACC_IS_OUT : 0);

  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      // pack K and V of (b, h): rows 0 .. Lk - 1 of kp / vp
      for (let j0 = 0; j0 < Lk; j0 += PC) {
        const n = Math.min(PC, Lk - j0);
        const kW = window(e, k, (b * Lk + j0) * H * Dh, (b * Lk + j0 + n) * H * Dh, 4, 'k');
        const vW = window(e, v, (b * Lk + j0) * H * Dh, (b * Lk + j0 + n) * H * Dh, 4, 'v');
        const kd = window(e, kp, j0 * Dh, (j0 + n) * Dh, 4, 'workspace');
        const vd = window(e, vp, j0 * Dh, (j0 + n) * Dh, 4, 'workspace');
        const pp = { Lk, H, dh4, b, h, j0, n, k_base: kW.base, v_base: vW.base, dst_base: kd.base };
        if (kd.base !== vd.base) throw new Error('[attention] internal: pack windows differ');
        e.dispatch({
          kernel: { family: 'attention', entry: 'pack_kv', aliases, layout: ['read', 'read', 'write', 'write'] },
          name: 'attention.pack_kv',
          params: pp,
          bindings: [kW.binding, vW.binding, kd.binding, vd.binding],
          workgroups: grid1d(Math.ceil((n * dh4) / 64)),
        });
      }
      for (let i0 = 0; i0 < Lq; i0 += QC) {
        const nq = Math.min(QC, Lq - i0);
        const rowA = b * Lq + i0;
        const qW = window(e, q, rowA * H * Dh, (rowA + nq) * H * Dh, 4, 'q');
        const oW = window(e, out, rowA * H * Dh, (rowA + nq) * H * Dh, 4, 'output');
        const accW: Window = accIsOut ? oW : { binding: whole(accT!), base: (rowA * H * Dh) / 4 };
        const qtiles = Math.ceil(nq / (UBO_WG * UBO_QPL));
        for (let w = 0; w < nWin; w++) {
          const j0 = w * KPD;
          const j1 = Math.min(Lk, j0 + KPD);
          const flags = baseFlags | (w > 0 ? FLAG_STATE_IN : 0) | (w === nWin - 1 ? FLAG_FINAL : 0);
          const p = {
            Lq, Lk, H, Dh,
            b0: b, nh: 1, h0: h, i0,
            nq, qtiles, ngroups: qtiles, j0,
            j1, q_base: qW.base, k_base: KPB, v_base: 0,
            s_row0: rowA * H, o_base: oW.base * 4, bias_base: 0, acc_base: accW.base,
            scale: a.scale * Math.LOG2E, bias_scale: Math.LOG2E, flags,
          };
          e.dispatch({
            kernel: flashUboKernel(NKW, aliases),
            name: 'attention.flash_ubo',
            params: p,
            bindings: [
              qW.binding,
              ...uboKeyWindows(kp, j0, j1, KPB, Dh),
              ...uboKeyWindows(vp, j0, j1, KPB, Dh),
              keyMask ? whole(keyMask) : whole(dumR),
              accIsOut ? whole(dumO) : oW.binding,
              accW.binding,
              whole(mlT),
            ],
            workgroups: grid1d(qtiles),
          });
        }
      }
    }
  }
  for (const t of tmp) t.dispose();
}

/** Exact softmax attention on the CPU (f64 accumulation). Also the CPU device's implementation. */
function attentionCpu({ q, k, v, bias, keyMask }: AttentionInputs, a: AttentionAttrs): Tensor {
  const { B, Lq, H, Dh, Lk } = dims(q, k);
  const qv = f32(q);
  const kv = f32(k);
  const vv = f32(v);
  const bv = bias ? f32(bias) : null;
  const mv = keyMask ? keyMask.hostValues() : null;
  const rel = (a.biasMode ?? 'full') === 'relative';
  const scale = a.scale;
  const out = new Float32Array(B * Lq * H * Dh);
  const kh = new Float32Array(Lk * Dh); // one head's keys, contiguous [Lk, Dh]
  const vh = new Float32Array(Lk * Dh);
  const s = new Float64Array(Lk);
  const acc = new Float64Array(Dh);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      for (let j = 0; j < Lk; j++) {
        const src = ((b * Lk + j) * H + h) * Dh;
        kh.set(kv.subarray(src, src + Dh), j * Dh);
        vh.set(vv.subarray(src, src + Dh), j * Dh);
      }
      for (let i = 0; i < Lq; i++) {
        const qo = ((b * Lq + i) * H + h) * Dh;
        const bo = bv ? (rel ? h * (Lq + Lk - 1) + Lq - 1 - i : (h * Lq + i) * Lk) : 0;
        // scores s[j] = scale * q·k_j + bias, 4 keys at a time (q[d] loaded once per 4 products)
        let j = 0;
        for (; j + 4 <= Lk; j += 4) {
          const k0 = j * Dh;
          const k1 = k0 + Dh;
          const k2 = k1 + Dh;
          const k3 = k2 + Dh;
          let d0 = 0;
          let d1 = 0;
          let d2 = 0;
          let d3 = 0;
          for (let d = 0; d < Dh; d++) {
            const x = qv[qo + d]!;
            d0 += x * kh[k0 + d]!;
            d1 += x * kh[k1 + d]!;
            d2 += x * kh[k2 + d]!;
            d3 += x * kh[k3 + d]!;
          }
          s[j] = d0 * scale;
          s[j + 1] = d1 * scale;
          s[j + 2] = d2 * scale;
          s[j + 3] = d3 * scale;
        }
        for (; j < Lk; j++) {
          let dot = 0;
          const ko = j * Dh;
          for (let d = 0; d < Dh; d++) dot += qv[qo + d]! * kh[ko + d]!;
          s[j] = dot * scale;
        }
        let m = -Infinity;
        for (let jj = 0; jj < Lk; jj++) {
          let x = s[jj]!;
          if (bv) x += bv[bo + jj]!;
          if (mv && mv[b * Lk + jj] === 0) x = -Infinity;
          s[jj] = x;
          if (x > m) m = x;
        }
        if (m === -Infinity) continue; // nothing to attend (all masked, or Lk == 0): zeros
        let sum = 0;
        for (let jj = 0; jj < Lk; jj++) {
          const p = Math.exp(s[jj]! - m); // exp(-inf) = 0 for masked keys
          s[jj] = p;
          sum += p;
        }
        // acc = P V, 4 keys at a time (acc[d] loaded and stored once per 4 keys)
        acc.fill(0);
        j = 0;
        for (; j + 4 <= Lk; j += 4) {
          const p0 = s[j]!;
          const p1 = s[j + 1]!;
          const p2 = s[j + 2]!;
          const p3 = s[j + 3]!;
          const v0 = j * Dh;
          const v1 = v0 + Dh;
          const v2 = v1 + Dh;
          const v3 = v2 + Dh;
          for (let d = 0; d < Dh; d++) acc[d] += p0 * vh[v0 + d]! + p1 * vh[v1 + d]! + p2 * vh[v2 + d]! + p3 * vh[v3 + d]!;
        }
        for (; j < Lk; j++) {
          const p = s[j]!;
          const vo = j * Dh;
          for (let d = 0; d < Dh; d++) acc[d] += p * vh[vo + d]!;
        }
        const inv = 1 / sum;
        for (let d = 0; d < Dh; d++) out[qo + d] = acc[d]! * inv;
      }
    }
  }
  return cpuTensor(out, [B, Lq, H, Dh], a.out ?? q.dtype);
}
