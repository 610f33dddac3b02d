// Attention that also returns each query row's log-sum-exp, and the exact merge of two such partial
// attentions over disjoint key sets: what ring attention (src/parallel/ring.ts) needs to combine the
// attention of its queries over K/V chunks that arrive one at a time from other devices.
//
//   attention_lse:   q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] (f32 | f16)  →  partial f32 [B, Lq, H, Dh + 1]
//                    [..., :Dh] = softmax_j(scale·q·k_j) v_j   (normalized, as `attention`)
//                    [..., Dh]  = ln Σ_j exp(scale·q·k_j)       (NEG_LSE = -1e30 when Lk = 0; o = 0)
//   attention_merge: partials a, b over disjoint key sets  →  their attention over the union
//                    m = max(lse_a, lse_b); w = exp(lse - m); o = (w_a o_a + w_b o_b) / (w_a + w_b);
//                    lse = m + ln(w_a + w_b).  `final`: only o, [B, Lq, H, Dh] in `out` (f32 | f16).
//
// One tensor carries output and LSE because an op returns one tensor (registry.ts); the LSE rides
// as element Dh of each (row, head), and the last merge of a ring drops it.
//
// The GPU's heavy part is the fused attention's own kernels (kernels/attention.wgsl flash_ubo +
// pack_kv on llvmpipe, flash on adapters with subgroups, softmax.wgsl attention_portable without
// subgroups or for head dims that are not a multiple of 4 — chosen by attentionKernel as for
// `attention`), dispatched here without FLAG_FINAL so they stop before normalizing and leave the
// unnormalized accumulator and the online-softmax state (m, l) in scratch; `lse_finish`
// (kernels/attention_lse.wgsl) turns those into the partial. So the LSE attention is exactly as
// fast as the fused one plus one elementwise pass, and shares its compiled pipelines. Queries go in
// chunks of whole rows and keys in chained chunks when the tensors exceed one binding (as in
// attention.ts); no bias and no key mask (ring attention needs neither: its chunks hold no padding).
// CPU twins: src/ops/cpu/attention_lse.ts.

import { defineOp, grid1d } from './registry.ts';
import { actAlias, cpuTensor, f32 } from './common.ts';
import { bindingLimit, elemWindow, windowSlack } from './window.ts';
import { attentionKernel, dims, window, uboWindows, flashUboKernel, uboKeyWindows, FLAG_STATE_IN, SG_WG, SG_QPL, SG_KB, PORTABLE_WG, UBO_WG, UBO_QPL, UBO_BYTES, type AttentionKernel, type Window } from './attention.ts';
import { attentionLseHost, attentionMergeHost } from './cpu/attention_lse.ts';
import type { BufferBinding, Engine } from '../runtime/engine.ts';
import type { Aliases } from '../runtime/kernels.ts';
import { Tensor, shapeStr } from '../tensor/tensor.ts';
import { type DType, dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

export { NEG_LSE, splitPartial } from './cpu/attention_lse.ts';

export interface AttentionLseAttrs {
  /** multiplier of q·k (Wan: 1/sqrt(Dh)) */
  scale: number;
  /** tests only: treat this many bytes as the binding limit (exercises the split paths cheaply) */
  maxBindingBytes?: number;
  /** tests / benchmarks: force one of the fused attention's kernels (see attentionKernel) */
  kernel?: 'auto' | AttentionKernel;
}

export type AttentionLseInputs = { q: Tensor; k: Tensor; v: Tensor };

export interface AttentionMergeAttrs {
  /** the last merge: write only the output [B, Lq, H, Dh] (no LSE), in `out` */
  final?: boolean;
  /** output dtype with `final` (default f32; f16 needs shader-f16); a partial is always f32 */
  out?: DType;
  /** tests only: treat this many bytes as the binding limit */
  maxBindingBytes?: number;
}

export type AttentionMergeInputs = { a: Tensor; b: Tensor };

const WG = 256; // lse_finish / lse_merge

export const attentionLse = defineOp<AttentionLseInputs, AttentionLseAttrs>({
  name: 'attention_lse',
  family: 'attention_lse',
  check({ q, k, v }, a) {
    for (const [t, n] of [[q, 'q'], [k, 'k'], [v, 'v']] as const) {
      if (t.rank !== 4) throw new ShapeError(`[attention_lse] ${n} must be [B, L, H, Dh] (rank 4), got ${shapeStr(t.shape)}`);
      actAlias('attention_lse', t.dtype);
      if (t.numel >= 2 ** 32) throw new ShapeError(`[attention_lse] ${n} ${shapeStr(t.shape)} has 2^32 or more elements (the kernels index in u32); split the batch`);
    }
    if (k.dtype !== q.dtype || v.dtype !== q.dtype) throw new ShapeError(`[attention_lse] q, k and v must have the same dtype, got ${q.dtype}, ${k.dtype}, ${v.dtype}; cast them first`);
    const { B, Lq, H, Dh } = dims(q, k);
    if (Dh < 1) throw new ShapeError(`[attention_lse] head dim must be >= 1, got ${shapeStr(q.shape)}`);
    if (k.shape[0] !== B || k.shape[2] !== H || k.shape[3] !== Dh) throw new ShapeError(`[attention_lse] k ${shapeStr(k.shape)} does not match q ${shapeStr(q.shape)}: want [${B}, Lk, ${H}, ${Dh}]`);
    if (v.shape.some((d, i) => d !== k.shape[i])) throw new ShapeError(`[attention_lse] v ${shapeStr(v.shape)} must have k's shape ${shapeStr(k.shape)}`);
    if (typeof a?.scale !== 'number' || !Number.isFinite(a.scale)) throw new ShapeError(`[attention_lse] scale must be a finite number (Wan: 1/sqrt(head_dim)), got ${a?.scale}`);
    if (B * Lq * H * (Dh + 1) >= 2 ** 32) throw new ShapeError(`[attention_lse] the output [${B}, ${Lq}, ${H}, ${Dh + 1}] has 2^32 or more elements; split the batch`);
    if (a.maxBindingBytes !== undefined && !(a.maxBindingBytes >= 1024)) throw new ShapeError(`[attention_lse] maxBindingBytes must be at least 1024, got ${a.maxBindingBytes}`);
  },
  gpu: lseGpu,
  cpu({ q, k, v }, a) {
    const d = dims(q, k);
    return Tensor.cpu(attentionLseHost(f32(q), f32(k), f32(v), d, a.scale), [d.B, d.Lq, d.H, d.Dh + 1], 'f32');
  },
  flops({ q, k }) {
    const { B, Lq, H, Dh, Lk } = dims(q, k);
    return 4 * B * H * Lq * Lk * Dh;
  },
  bytes({ q, k, v }) {
    const { B, Lq, H, Dh } = dims(q, k);
    return q.nbytes + k.nbytes + v.nbytes + B * Lq * H * (Dh + 1) * 4;
  },
});

export const attentionMerge = defineOp<AttentionMergeInputs, AttentionMergeAttrs | undefined>({
  name: 'attention_merge',
  family: 'attention_lse',
  check({ a, b }, at) {
    for (const [t, n] of [[a, 'a'], [b, 'b']] as const) {
      if (t.rank !== 4 || t.dtype !== 'f32' || t.shape[3]! < 2) {
        throw new ShapeError(`[attention_merge] ${n} must be an attention_lse partial, f32 [B, Lq, H, Dh + 1], got ${t.dtype} ${shapeStr(t.shape)}`);
      }
    }
    if (a.shape.some((d, i) => d !== b.shape[i])) throw new ShapeError(`[attention_merge] a ${shapeStr(a.shape)} and b ${shapeStr(b.shape)} must have the same shape (the same queries over two key sets)`);
    if (a.numel >= 2 ** 32) throw new ShapeError(`[attention_merge] a ${shapeStr(a.shape)} has 2^32 or more elements; split the batch`);
    const out = at?.out ?? 'f32';
    if (out !== 'f32' && !at?.final) throw new ShapeError(`[attention_merge] a partial is f32; out '${out}' needs final: true`);
    actAlias('attention_merge', out);
    if (at?.maxBindingBytes !== undefined && !(at.maxBindingBytes >= 1024)) throw new ShapeError(`[attention_merge] maxBindingBytes must be at least 1024, got ${at.maxBindingBytes}`);
  },
  gpu: mergeGpu,
  cpu({ a, b }, at) {
    const [B, Lq, H, W] = a.shape as [number, number, number, number];
    const final = !!at?.final;
    const o = attentionMergeHost(f32(a), f32(b), W - 1, final);
    return cpuTensor(o, [B, Lq, H, final ? W - 1 : W], final ? (at?.out ?? 'f32') : 'f32');
  },
  flops({ a }, at) {
    const W = a.shape[3]!;
    const rows = a.numel / W;
    return rows * (8 + 3 * (W - 1) + (at?.final ? 0 : 2));
  },
  bytes({ a, b }, at) {
    const W = a.shape[3]!;
    const rows = a.numel / W;
    return a.nbytes + b.nbytes + (at?.final ? rows * (W - 1) * dtypeSize(at.out ?? 'f32') : a.nbytes);
  },
});

// ---------------------------------------------------------------- GPU

/** the fused attention's window (attention.ts), its errors named attention_lse */
const win = (e: Engine, t: Tensor, start: number, end: number, unit: number, what: string): Window => window(e, t, start, end, unit, what, 'attention_lse');

/** One query chunk: batches [b0, b0 + nb), rows [i0, i0 + nq) of each (nb > 1 only with i0 = 0, nq = Lq). */
interface QChunk {
  b0: number;
  nb: number;
  i0: number;
  nq: number;
}

function lseGpu(e: Engine, { q, k, v }: AttentionLseInputs, a: AttentionLseAttrs): Tensor {
  const { B, Lq, H, Dh, Lk } = dims(q, k);
  actAlias('attention_lse', q.dtype, e);
  const W = Dh + 1;
  const out = e.empty([B, Lq, H, W], 'f32');
  if (out.numel === 0) return out;
  const limit = bindingLimit(e, a.maxBindingBytes);
  const usable = limit - windowSlack(e, 16);
  const es = dtypeSize(q.dtype);
  const rowQ = H * Dh * es; // one token row (all heads) of q / k / v
  const rowMax = Math.max(rowQ, H * Dh * 4, H * W * 4); // q, the f32 accumulator, the output
  if (rowMax > usable) throw new ShapeError(`[attention_lse] one token row of ${H} heads x ${Dh} is above the binding limit ${limit}`);
  const tmp: Tensor[] = [];
  const scratch = (n: number, dt: DType) => {
    const t = e.empty([Math.max(n, 4)], dt, 'attention_lse.scratch');
    tmp.push(t);
    return t;
  };
  const whole = (t: Tensor): BufferBinding => e.binding(t, 'attention_lse');
  const finish = (rowA: number, nrows: number, acc: Tensor | null, ml: Tensor | null) => {
    const n = nrows * H; // state rows
    const ow = elemWindow(e, out, rowA * H * W, (rowA + nrows) * H * W, 'attention_lse', { limit });
    const dum = acc && ml ? null : scratch(4, 'f32');
    e.dispatch({
      kernel: { family: 'attention_lse', entry: 'lse_finish', constants: { WG }, aliases: {}, layout: ['read', 'read', 'write'] },
      name: 'attention_lse.finish',
      params: { n, dh: Dh, o_off: ow.off, empty: acc ? 0 : 1 },
      bindings: [whole(acc ?? dum!), whole(ml ?? dum!), ow.binding],
      workgroups: grid1d(Math.ceil((n * W) / WG)),
    });
  };

  if (Lk === 0) {
    // no keys: every row is o = 0, lse = NEG_LSE (chunks of whole rows of the output)
    const per = Math.max(1, Math.floor(usable / (H * W * 4)));
    for (let r = 0; r < B * Lq; r += per) finish(r, Math.min(per, B * Lq - r), null, null);
    for (const t of tmp) t.dispose();
    return out;
  }

  const kern = attentionKernel(e, Dh, a.kernel, false);
  const wholeQ = B * Lq * rowMax <= usable;
  const wholeK = B * Lk * rowQ <= usable;
  const QC = wholeQ ? Lq : Math.max(1, Math.floor(usable / rowMax));
  const chunks: QChunk[] = [];
  if (wholeQ && (kern === 'ubo' || wholeK)) chunks.push({ b0: 0, nb: B, i0: 0, nq: Lq });
  else for (let b = 0; b < B; b++) for (let i0 = 0; i0 < Lq; i0 += QC) chunks.push({ b0: b, nb: 1, i0, nq: Math.min(QC, Lq - i0) });
  const maxRows = Math.max(...chunks.map((c) => c.nb * c.nq));
  const accT = scratch(maxRows * H * Dh, 'f32');
  const mlT = scratch(maxRows * H * 2, 'f32');
  const dumR = scratch(4, 'i32');
  const dumO = scratch(4, 'f32');
  const aliases: Aliases = { in_t: actAlias('attention_lse', q.dtype, e) };

  if (kern === 'ubo') {
    const dh4 = Dh / 4;
    const { KPB, NKW } = uboWindows(Dh, e.limits.minUniformBufferOffsetAlignment, 'attention_lse');
    const KPD = KPB * NKW; // keys per dispatch
    const nWin = Math.max(1, Math.ceil(Lk / KPD));
    const PC = Math.max(1, Math.min(Lk, Math.floor(usable / rowQ))); // keys per pack dispatch
    const wsFloats = nWin * KPD * Dh + UBO_BYTES / 4;
    const kp = scratch(wsFloats, 'f32');
    const vp = scratch(wsFloats, 'f32');
    for (const c of chunks) {
      const rowA = c.b0 * Lq + c.i0; // the chunk's first row: acc / ml row 0
      for (let b = c.b0; b < c.b0 + c.nb; b++) {
        const rowQ0 = b * Lq + c.i0;
        const qW = win(e, q, rowQ0 * H * Dh, (rowQ0 + c.nq) * H * Dh, 4, 'q');
        const qtiles = Math.ceil(c.nq / (UBO_WG * UBO_QPL));
        for (let h = 0; h < H; h++) {
          // pack K and V of (b, h) into [Lk, Dh] f32 rows
          for (let j0 = 0; j0 < Lk; j0 += PC) {
            const n = Math.min(PC, Lk - j0);
            const kW = win(e, k, (b * Lk + j0) * H * Dh, (b * Lk + j0 + n) * H * Dh, 4, 'k');
            const vW = win(e, v, (b * Lk + j0) * H * Dh, (b * Lk + j0 + n) * H * Dh, 4, 'v');
            const kd = win(e, kp, j0 * Dh, (j0 + n) * Dh, 4, 'workspace');
            const vd = win(e, vp, j0 * Dh, (j0 + n) * Dh, 4, 'workspace');
            e.dispatch({
              kernel: { family: 'attention', entry: 'pack_kv', aliases, layout: ['read', 'read', 'write', 'write'] },
              name: 'attention_lse.pack_kv',
              params: { Lk, H, dh4, b, h, j0, n, k_base: kW.base, v_base: vW.base, dst_base: kd.base },
              bindings: [kW.binding, vW.binding, kd.binding, vd.binding],
              workgroups: grid1d(Math.ceil((n * dh4) / 64)),
            });
          }
          for (let w = 0; w < nWin; w++) {
            const j0 = w * KPD;
            const j1 = Math.min(Lk, j0 + KPD);
            e.dispatch({
              kernel: flashUboKernel(NKW, aliases),
              name: 'attention_lse.flash_ubo',
              params: {
                Lq, Lk, H, Dh,
                b0: b, nh: 1, h0: h, i0: c.i0,
                nq: c.nq, qtiles, ngroups: qtiles, j0,
                j1, q_base: qW.base, k_base: KPB, v_base: 0,
                s_row0: rowA * H, o_base: 0, bias_base: 0, acc_base: rowA * H * dh4,
                scale: a.scale * Math.LOG2E, bias_scale: Math.LOG2E, flags: w > 0 ? FLAG_STATE_IN : 0,
              },
              bindings: [qW.binding, ...uboKeyWindows(kp, j0, j1, KPB, Dh), ...uboKeyWindows(vp, j0, j1, KPB, Dh), whole(dumR), whole(dumO), whole(accT), whole(mlT)],
              workgroups: grid1d(qtiles),
            });
          }
        }
      }
      finish(rowA, c.nb * c.nq, accT, mlT);
    }
  } else {
    const portable = kern === 'portable';
    const unit = portable ? 1 : 4;
    const qpw = portable ? PORTABLE_WG : SG_WG * SG_QPL;
    let KC = wholeK ? Lk : Math.max(1, Math.floor(usable / rowQ));
    if (KC < Lk && KC > SG_KB) KC -= KC % SG_KB;
    const nKeyChunks = Math.max(1, Math.ceil(Lk / KC));
    if (portable) aliases.o_t = 'f32';
    for (const c of chunks) {
      const grouped = c.nb > 1; // all batches in one dispatch (only with the whole of K bound)
      const rowA = c.b0 * Lq + c.i0;
      const rowB = (c.b0 + c.nb - 1) * Lq + c.i0 + c.nq;
      const qW = win(e, q, rowA * H * Dh, rowB * H * Dh, unit, 'q');
      const qtiles = Math.ceil(c.nq / qpw);
      const keyChunks = grouped ? 1 : nKeyChunks;
      for (let kc = 0; kc < keyChunks; kc++) {
        const j0 = grouped ? 0 : kc * KC;
        const j1 = grouped ? Lk : Math.min(Lk, j0 + KC);
        const kA = c.b0 * Lk + j0;
        const kB = (c.b0 + c.nb - 1) * Lk + j1;
        const kW = win(e, k, kA * H * Dh, kB * H * Dh, unit, 'k');
        const vW = win(e, v, kA * H * Dh, kB * H * Dh, unit, 'v');
        e.dispatch({
          kernel: {
            family: portable ? 'softmax' : 'attention',
            entry: portable ? 'attention_portable' : 'flash',
            constants: { [portable ? 'AWG' : 'WG']: portable ? PORTABLE_WG : SG_WG },
            aliases,
            layout: ['read', 'read', 'read', 'read', 'read', 'write', 'write', 'write'],
          },
          name: `attention_lse.${portable ? 'portable' : 'flash'}`,
          params: {
            Lq, Lk, H, Dh,
            b0: c.b0, nh: H, h0: 0, i0: c.i0,
            nq: c.nq, qtiles, ngroups: c.nb * H * qtiles, j0,
            j1, q_base: qW.base, k_base: kW.base, v_base: vW.base,
            s_row0: rowA * H, o_base: 0, bias_base: 0, acc_base: (rowA * H * Dh) / unit,
            scale: a.scale * Math.LOG2E, bias_scale: Math.LOG2E, flags: kc > 0 ? FLAG_STATE_IN : 0,
          },
          bindings: [qW.binding, kW.binding, vW.binding, whole(dumR), whole(dumR), whole(dumO), whole(accT), whole(mlT)],
          workgroups: grid1d(c.nb * H * qtiles),
        });
      }
      finish(rowA, c.nb * c.nq, accT, mlT);
    }
  }
  for (const t of tmp) t.dispose();
  return out;
}

function mergeGpu(e: Engine, { a, b }: AttentionMergeInputs, at: AttentionMergeAttrs | undefined): Tensor {
  const [B, Lq, H, W] = a.shape as [number, number, number, number];
  const Dh = W - 1;
  const final = !!at?.final;
  const outDt = final ? (at?.out ?? 'f32') : 'f32';
  const o_t = actAlias('attention_merge', outDt, e);
  const Wo = final ? Dh : W;
  const out = e.empty([B, Lq, H, Wo], outDt);
  if (out.numel === 0) return out;
  const limit = bindingLimit(e, at?.maxBindingBytes);
  const per = Math.floor((limit - windowSlack(e)) / (W * 4)); // state rows per dispatch
  if (per < 1) throw new ShapeError(`[attention_merge] one state row of ${W} floats is above the binding limit ${limit}`);
  const rows = B * Lq * H;
  for (let s0 = 0; s0 < rows; s0 += per) {
    const n = Math.min(per, rows - s0);
    const aw = elemWindow(e, a, s0 * W, (s0 + n) * W, 'attention_merge', { limit });
    const bw = elemWindow(e, b, s0 * W, (s0 + n) * W, 'attention_merge', { limit });
    const ow = elemWindow(e, out, s0 * Wo, (s0 + n) * Wo, 'attention_merge', { limit });
    e.dispatch({
      kernel: { family: 'attention_lse', entry: 'lse_merge', constants: { WG }, aliases: { o_t }, layout: ['read', 'read', 'write'] },
      name: 'attention_merge',
      params: { n, dh: Dh, a_off: aw.off, b_off: bw.off, o_off: ow.off, fin: final ? 1 : 0 },
      bindings: [aw.binding, bw.binding, ow.binding],
      workgroups: grid1d(Math.ceil((n * Wo) / WG)),
    });
  }
  return out;
}
