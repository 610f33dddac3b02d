// Quantized ("SageAttention"-style) fused attention: `infer.attention=sage`.
//
//   q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] (f32 or f16)  ->  out [B, Lq, H, Dh]
//   out[b, i, h] = sum_j softmax_j(scale * q·k)[j] v[b, j, h]   computed as
//   K smoothed (minus its mean over the keys, per batch, head and channel: softmax unchanged),
//   Q and K quantized to int8 per block of 64 rows (scale = max|x| / 127, round half to even),
//   Q·Kᵀ with dot4I8Packed on packed words (exact i32), f32 online softmax, P·V in f16 where the
//   adapter has shader-f16 (attrs.pv: 'auto' | 'f16' | 'f32').
//
// Self-attention only: no bias (T5 relative bias) and no key mask. Callers with either use the
// exact `attention` op (the UMT5 encoder and the DiT cross-attention always do).
//
// Per (batch, head): sage_kmean sums the head's keys, sage_quant packs K (and copies V to v_t)
// and Q into per-head workspaces ([rows, Dh / 4] u32, per-block scales) that are reused head
// after head, and sage_flash runs over chunks of queries. Big q / k / v / out are bound as
// windows of whole token rows (window.ts): a chunk of rows per dispatch, so Wan 480p shapes
// (q [1, 32760, 40, 128] f32 = 671 MB) work under a 128 MiB binding limit. The workspaces hold
// one head: Lq·Dh + Lk·Dh bytes of int8, Lk·Dh of V (2 or 4 bytes each) and the f32 accumulator
// of one query chunk; each must fit one binding.
//
// Kernels: kernels/attention_sage.wgsl. CPU reference (also the CPU device's implementation):
// cpu/attention_sage.ts.

import { defineOp, grid1d } from './registry.ts';
import { actAlias, cpuTensor, f32 } from './common.ts';
import { bindingLimit, elemWindow, windowSlack } from './window.ts';
import { SAGE_KB, SAGE_QB, sageAttentionRef, type SagePv } from './cpu/attention_sage.ts';
import type { BufferBinding, Engine } from '../runtime/engine.ts';
import type { Aliases } from '../runtime/kernels.ts';
import { Tensor, shapeStr } from '../tensor/tensor.ts';
import { type DType, dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

export interface SageAttentionAttrs {
  /** multiplier of q·k (Wan: 1/sqrt(Dh)) */
  scale: number;
  /** output dtype (default: q's) */
  out?: DType;
  /** precision of the P·V products: 'auto' = f16 where the adapter has shader-f16, else f32 */
  pv?: 'auto' | SagePv;
  /** tests only: treat this many bytes as the binding limit (exercises the chunked paths) */
  maxBindingBytes?: number;
}

export type SageAttentionInputs = { q: Tensor; k: Tensor; v: Tensor; bias?: Tensor; keyMask?: Tensor };

/** head dims the kernel takes (a multiple of 4; the workgroup tile of 16 packed key rows must fit) */
export const SAGE_MAX_DH = 1024;

/** Workspace tag of the per-head buffers (the planner counts them under it). */
export const SAGE_OWNER = 'attention.sage';

function dims(q: Tensor, k: Tensor) {
  return { B: q.shape[0]!, Lq: q.shape[1]!, H: q.shape[2]!, Dh: q.shape[3]!, Lk: k.shape[1]! };
}

/** The P·V precision that runs: 'f16' where the engine has shader-f16 (or when asked), else 'f32'. */
export function sagePv(hasF16: boolean, want: SageAttentionAttrs['pv'] = 'auto'): SagePv {
  if (want === 'f16') {
    if (!hasF16) throw new ShapeError(`[attention_sage] pv 'f16' needs the adapter feature 'shader-f16', which this adapter lacks; use pv 'auto' or 'f32'`);
    return 'f16';
  }
  if (want === 'f32') return 'f32';
  return hasF16 ? 'f16' : 'f32';
}

/**
 * Bytes of the per-head workspaces one sage_attention call holds at its peak (for the planner):
 * packed Q and K, the V copy, the block scales, the K sum and one query chunk's f32 accumulator
 * (at most all Lq rows).
 */
export function sageWorkspaceBytes(Lq: number, Lk: number, Dh: number, pvBytes: number): number {
  const nb = (n: number) => Math.max(4, Math.ceil(n / SAGE_QB)) * 4;
  return Lq * Dh + Lk * Dh + Lk * Dh * pvBytes + nb(Lq) + nb(Lk) + Dh * 4 + Lq * Dh * 4;
}

export const sageAttention = defineOp<SageAttentionInputs, SageAttentionAttrs>({
  name: 'attention_sage',
  family: 'attention_sage',
  check({ q, k, v, bias, keyMask }, a) {
    if (bias) throw new ShapeError(`[attention_sage] takes no bias (T5 relative or full): the quantized path is for self-attention; call attention() (infer.attention=sdpa) for this layer`);
    if (keyMask) throw new ShapeError(`[attention_sage] takes no key mask: the quantized path is for self-attention; call attention() (infer.attention=sdpa) for this layer`);
    for (const [t, n] of [[q, 'q'], [k, 'k'], [v, 'v']] as const) {
      if (t.rank !== 4) throw new ShapeError(`[attention_sage] ${n} must be [B, L, H, Dh] (rank 4), got ${shapeStr(t.shape)}; reshape a [B, L, H*Dh] projection with .reshape([B, L, H, Dh])`);
      actAlias('attention_sage', t.dtype);
      if (t.numel >= 2 ** 32) throw new ShapeError(`[attention_sage] ${n} ${shapeStr(t.shape)} has 2^32 or more elements (the kernels index in u32); split the batch`);
    }
    if (k.dtype !== q.dtype || v.dtype !== q.dtype) throw new ShapeError(`[attention_sage] q, k and v must have the same dtype, got ${q.dtype}, ${k.dtype}, ${v.dtype}; cast them first`);
    const { B, H, Dh } = dims(q, k);
    if (k.shape[0] !== B || k.shape[2] !== H || k.shape[3] !== Dh) {
      throw new ShapeError(`[attention_sage] k ${shapeStr(k.shape)} does not match q ${shapeStr(q.shape)}: want [${B}, Lk, ${H}, ${Dh}]`);
    }
    if (v.shape.some((d, i) => d !== k.shape[i])) throw new ShapeError(`[attention_sage] v ${shapeStr(v.shape)} must have k's shape ${shapeStr(k.shape)}`);
    if (Dh % 4 !== 0 || Dh > SAGE_MAX_DH) {
      throw new ShapeError(`[attention_sage] head dim ${Dh} is not supported (a multiple of 4 up to ${SAGE_MAX_DH}: four int8 per packed word); use infer.attention=sdpa`);
    }
    if (typeof a.scale !== 'number' || !Number.isFinite(a.scale)) throw new ShapeError(`[attention_sage] scale must be a finite number (Wan: 1/sqrt(head_dim)), got ${a.scale}`);
    actAlias('attention_sage', a.out ?? q.dtype);
    const pv = a.pv ?? 'auto';
    if (pv !== 'auto' && pv !== 'f16' && pv !== 'f32') throw new ShapeError(`[attention_sage] pv must be 'auto', 'f16' or 'f32', got '${pv}'`);
    if (a.maxBindingBytes !== undefined && !(a.maxBindingBytes >= 1024)) throw new ShapeError(`[attention_sage] maxBindingBytes must be at least 1024, got ${a.maxBindingBytes}`);
  },
  gpu: sageGpu,
  cpu: ({ q, k, v }, a) => {
    const d = dims(q, k);
    const out = sageAttentionRef(f32(q), f32(k), f32(v), d, a.scale, a.pv === 'f16' ? 'f16' : 'f32');
    return cpuTensor(out, [d.B, d.Lq, d.H, d.Dh], a.out ?? q.dtype);
  },
  flops({ q, k }) {
    const { B, Lq, H, Dh, Lk } = dims(q, k);
    return 4 * B * H * Lq * Lk * Dh;
  },
  bytes({ q, k, v }, a) {
    return q.nbytes + k.nbytes + v.nbytes + q.numel * dtypeSize(a.out ?? q.dtype);
  },
});

interface Win {
  binding: BufferBinding;
  /** full-tensor index (in vec4 units) of the first bound vec4 */
  base: number;
}

function win(e: Engine, t: Tensor, start: number, end: number, limit: number, what: string): Win {
  const align = e.caps.storageAlign;
  if (t.byteOffset % align !== 0) throw new ShapeError(`[attention_sage] ${what} ${t} is a view at byte offset ${t.byteOffset}, not a multiple of ${align}; clone it first`);
  const w = elemWindow(e, t, start, end, 'attention_sage', { limit, granule: 16 });
  return { binding: w.binding, base: (start - w.off) / 4 };
}

function sageGpu(e: Engine, { q, k, v }: SageAttentionInputs, a: SageAttentionAttrs): Tensor {
  const { B, Lq, H, Dh, Lk } = dims(q, k);
  const outDt = a.out ?? q.dtype;
  const inT = actAlias('attention_sage', q.dtype, e);
  const oT = actAlias('attention_sage', outDt, e);
  const pv = sagePv(e.caps.shaderF16, a.pv);
  const out = e.empty([B, Lq, H, Dh], outDt);
  if (out.numel === 0) return out;
  const dh4 = Dh / 4;
  const limit = bindingLimit(e, a.maxBindingBytes);
  const usable = limit - windowSlack(e, 16);
  const es = dtypeSize(q.dtype);
  const pvBytes = pv === 'f16' ? 2 : 4;
  const rowIn = H * Dh * es; // one token row of q / k / v (all heads)
  const rowOut = H * Dh * dtypeSize(outDt);
  // rows per chunk of the input windows: whole quantization blocks
  const PC = Math.floor(usable / rowIn / SAGE_QB) * SAGE_QB;
  if (PC < SAGE_QB) throw new ShapeError(`[attention_sage] ${SAGE_QB} token rows of ${H} heads x ${Dh} (${SAGE_QB * rowIn} bytes) are above the binding limit ${limit}; use infer.attention=sdpa`);
  for (const [n, bytes] of [['packed q', Lq * Dh], ['packed k', Lk * Dh], ['the V copy', Lk * Dh * pvBytes]] as const) {
    if (bytes > usable) throw new ShapeError(`[attention_sage] ${n} of one head (${bytes} bytes) is above the binding limit ${limit}; use infer.attention=sdpa for ${Math.max(Lq, Lk)} tokens`);
  }
  // queries per flash dispatch: the output window (all heads of those rows) and the accumulator
  const QC = Math.max(64, Math.floor(Math.min(usable / rowOut, usable / (Dh * 4)) / 64) * 64);
  if (64 * rowOut > usable) throw new ShapeError(`[attention_sage] 64 output rows of ${H} heads x ${Dh} are above the binding limit ${limit}`);
  const smem = (SAGE_KB * dh4 + SAGE_KB) * 4;
  // V rows of each key block staged in workgroup memory when it fits (else read from storage)
  const vStage = smem + SAGE_KB * Dh * pvBytes <= e.limits.maxComputeWorkgroupStorageSize;
  if (smem > e.limits.maxComputeWorkgroupStorageSize) {
    throw new ShapeError(`[attention_sage] head dim ${Dh} needs ${smem} bytes of workgroup memory, above this adapter's ${e.limits.maxComputeWorkgroupStorageSize}; use infer.attention=sdpa`);
  }

  const tmp: Tensor[] = [];
  const ws = (n: number, dt: DType) => {
    const t = e.empty([Math.max(n, 4)], dt, SAGE_OWNER);
    tmp.push(t);
    return t;
  };
  const qd = ws(Lq * dh4, 'u32');
  const kd = ws(Lk * dh4, 'u32');
  const vd = ws(Lk * Dh, pv);
  const qs = ws(Math.ceil(Lq / SAGE_QB), 'f32');
  const ks = ws(Math.ceil(Lk / SAGE_QB), 'f32');
  const ksum = ws(Dh, 'f32');
  const acc = ws(Math.min(QC, Lq) * Dh, 'f32');
  const dumR = ws(4, q.dtype);
  const dumV = ws(8, pv);
  const whole = (t: Tensor): BufferBinding => e.binding(t, 'attention_sage');
  const quantK = { family: 'attention_sage', entry: 'sage_quant', aliases: { in_t: inT, v_t: pv } as Aliases, layout: ['read', 'read', 'read', 'write', 'write', 'write'] as const };
  const invN = Lk > 0 ? Math.fround(1 / Lk) : 0;

  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      // K: sum over keys, then smoothed int8 K and the V copy
      for (let j0 = 0; j0 < Lk; j0 += PC) {
        const n = Math.min(PC, Lk - j0);
        const r0 = b * Lk + j0;
        const kW = win(e, k, r0 * H * Dh, (r0 + n) * H * Dh, limit, 'k');
        e.dispatch({
          kernel: { family: 'attention_sage', entry: 'sage_kmean', aliases: { in_t: inT }, layout: ['read', 'write'] },
          name: 'attention_sage.kmean',
          params: { n, H, dh4, row0: r0, h, k_base: kW.base, first: j0 === 0 ? 1 : 0 },
          bindings: [kW.binding, whole(ksum)],
          workgroups: grid1d(dh4),
        });
      }
      for (let j0 = 0; j0 < Lk; j0 += PC) {
        const n = Math.min(PC, Lk - j0);
        const r0 = b * Lk + j0;
        const kW = win(e, k, r0 * H * Dh, (r0 + n) * H * Dh, limit, 'k');
        const vW = win(e, v, r0 * H * Dh, (r0 + n) * H * Dh, limit, 'v');
        e.dispatch({
          kernel: { ...quantK, layout: [...quantK.layout] },
          name: 'attention_sage.quant',
          params: { n, H, dh4, row0: r0, h, src_base: kW.base, v_base: vW.base, dst_row0: j0, blk0: j0 / SAGE_QB, smooth_k: 1, mul: 1, inv_n: invN },
          bindings: [kW.binding, vW.binding, whole(ksum), whole(kd), whole(vd), whole(ks)],
          workgroups: grid1d(Math.ceil(n / SAGE_QB)),
        });
      }
      // Q: int8 with the softmax scale (and log2 e) folded into its block scales
      for (let i0 = 0; i0 < Lq; i0 += PC) {
        const n = Math.min(PC, Lq - i0);
        const r0 = b * Lq + i0;
        const qW = win(e, q, r0 * H * Dh, (r0 + n) * H * Dh, limit, 'q');
        e.dispatch({
          kernel: { ...quantK, layout: [...quantK.layout] },
          name: 'attention_sage.quant',
          params: { n, H, dh4, row0: r0, h, src_base: qW.base, v_base: 0, dst_row0: i0, blk0: i0 / SAGE_QB, smooth_k: 0, mul: a.scale * Math.LOG2E, inv_n: 0 },
          bindings: [qW.binding, whole(dumR), whole(ksum), whole(qd), whole(dumV), whole(qs)],
          workgroups: grid1d(Math.ceil(n / SAGE_QB)),
        });
      }
      for (let i0 = 0; i0 < Lq; i0 += QC) {
        const nq = Math.min(QC, Lq - i0);
        const rA = b * Lq + i0;
        const ow = elemWindow(e, out, rA * H * Dh, (rA + nq) * H * Dh, 'attention_sage', { limit });
        e.dispatch({
          kernel: {
            family: 'attention_sage',
            entry: 'sage_flash',
            constants: { DH4: dh4, KT: SAGE_KB * dh4, VT: vStage ? SAGE_KB * dh4 : 1, VSTAGE: vStage ? 1 : 0 },
            aliases: { v_t: pv, o_t: oT },
            layout: ['read', 'read', 'read', 'read', 'read', 'write', 'write'],
          },
          name: 'attention_sage.flash',
          params: { Lq, Lk, H, dh4, b, h, i0, nq, o_base: rA * H * Dh - ow.off },
          bindings: [whole(qd), whole(qs), whole(kd), whole(ks), whole(vd), whole(acc), ow.binding],
          workgroups: grid1d(Math.ceil(nq / 64)),
        });
      }
    }
  }
  for (const t of tmp) t.dispose();
  return out;
}
