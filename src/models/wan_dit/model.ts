// Wan 2.1 DiT (diffusers `WanTransformer3DModel`), text-to-video.
// Field names follow the diffusers checkpoint keys (`blocks.N.attn1.to_q`, `ffn.net.0.proj`,
// `scale_shift_table`, `condition_embedder.time_embedder.linear_1`, ...).
// Conventions (../shared/golden/README.md): patchify (1,2,2) with token order (f, h, w); timestep
// sinusoid [cos | sin] in float64; modulation order shift/scale/gate (msa), shift/scale/gate (ffn);
// q/k RMSNorm across the full D before RoPE; RoPE on adjacent pairs with [t | h | w] splits;
// cross-attention over all text_len rows, ungated; head uses e (not e0); unpatchify c-fastest.

import { Module, ModuleList, Param, Container, ParamHolder } from '../../nn/module.ts';
import { Linear, LayerNorm, RMSNorm } from '../../nn/layers.ts';
import { RESIDENT, type BlockResidency } from '../../nn/residency.ts';
import type { Tracer } from '../../nn/trace.ts';
import type { TransformerConfig } from '../../io/model-folder.ts';
import { Tensor } from '../../tensor/tensor.ts';
import { engineOf, type Engine, type MetaSpan } from '../../runtime/engine.ts';
import { attention } from '../../ops/attention.ts';
import { sageAttention } from '../../ops/attention_sage.ts';
import { rope } from '../../ops/rope.ts';
import { permute } from '../../ops/layout.ts';
import { linear } from '../../ops/matmul.ts';
import { layerNorm } from '../../ops/norm.ts';
import { add, gatedResidual, unary } from '../../ops/elementwise.ts';
import { timestepSinusoid, ropeTables } from './host.ts';
import { ShapeError } from '../../util/errors.ts';
import { type DType, dtypeSize } from '../../tensor/dtype.ts';
import { rmsNorm } from '../../ops/norm.ts';

export interface WanDitDims {
  patchSize: [number, number, number];
  numHeads: number;
  headDim: number;
  inChannels: number;
  outChannels: number;
  textDim: number;
  freqDim: number;
  ffnDim: number;
  numLayers: number;
  crossAttnNorm: boolean;
  eps: number;
  ropeMaxSeqLen: number;
  /**
   * Precision policy: dtype of the matmul outputs inside attention and FFN and of the attention
   * itself ('f16' needs shader-f16). Norm statistics, modulation, RoPE math, the residual stream
   * and the time embedding stay f32, as in the reference.
   */
  activationDtype?: 'f32' | 'f16';
  /** self-attention kernel (infer.attention): exact 'sdpa' (default) or quantized 'sage'; cross-attention is always exact */
  attention?: 'sdpa' | 'sage';
}

/** Dims from a parsed transformer/config.json (io/model-folder.ts checks the keys and fills defaults). */
export function ditDimsFromConfig(c: TransformerConfig): WanDitDims {
  const ps = c.patch_size;
  return {
    patchSize: [ps[0], ps[1], ps[2]],
    numHeads: c.num_attention_heads,
    headDim: c.attention_head_dim,
    inChannels: c.in_channels,
    outChannels: c.out_channels,
    textDim: c.text_dim,
    freqDim: c.freq_dim,
    ffnDim: c.ffn_dim,
    numLayers: c.num_layers,
    crossAttnNorm: c.cross_attn_norm,
    eps: c.eps,
    ropeMaxSeqLen: c.rope_max_seq_len,
  };
}

class WanAttention extends Module {
  readonly to_q: Linear;
  readonly to_k: Linear;
  readonly to_v: Linear;
  readonly to_out: ModuleList<Linear>;
  readonly norm_q: RMSNorm;
  readonly norm_k: RMSNorm;
  constructor(
    readonly dim: number,
    readonly heads: number,
    eps: number,
  ) {
    super();
    this.to_q = this.child('to_q', new Linear(dim, dim));
    this.to_k = this.child('to_k', new Linear(dim, dim));
    this.to_v = this.child('to_v', new Linear(dim, dim));
    this.to_out = this.child('to_out', new ModuleList([new Linear(dim, dim)]));
    this.norm_q = this.child('norm_q', new RMSNorm(dim, eps));
    this.norm_k = this.child('norm_k', new RMSNorm(dim, eps));
  }

  // The pieces of attention, so that a block can run them on row chunks. Every piece works per
  // token row (the q/k RMSNorm spans the full D of one token), so rows computed in chunks equal the
  // rows of the whole. act: dtype of the projections' outputs and of the attention.

  /** q [B, L, H, Dh] of x [B, L, D]: projection, RMSNorm across the full D (f32 statistics), RoPE with tables [L, Dh/2] */
  query(x: Tensor, ropeCs: RopeRows | null, act: DType): Tensor {
    return this.normed(this.to_q, this.norm_q, x, ropeCs, act);
  }
  /** k [B, L, H, Dh] of x (or of the text context, without RoPE) */
  key(x: Tensor, ropeCs: RopeRows | null, act: DType): Tensor {
    return this.normed(this.to_k, this.norm_k, x, ropeCs, act);
  }
  /** v [B, L, H, Dh] */
  value(x: Tensor, act: DType): Tensor {
    const [B, L] = x.shape as [number, number];
    const p = this.to_v.forward(x, 'none', act);
    const v = p.reshape([B, L, this.heads, this.dim / this.heads]);
    p.dispose();
    return v;
  }
  /** attention of q [B, Lq, H, Dh] over k, v [B, Lk, H, Dh], then the output projection: [B, Lq, D] f32; q is freed */
  attend(q: Tensor, k: Tensor, v: Tensor, kind: 'sdpa' | 'sage' = 'sdpa'): Tensor {
    const [B, Lq] = q.shape as [number, number];
    const scale = 1 / Math.sqrt(this.dim / this.heads);
    const o = kind === 'sage' ? sageAttention({ q, k, v }, { scale }) : attention({ q, k, v }, { scale });
    q.dispose();
    const flat = o.reshape([B, Lq, this.dim]);
    o.dispose();
    const y = this.to_out.at(0).forward(flat, 'none', 'f32');
    flat.dispose();
    return y;
  }

  private normed(lin: Linear, norm: RMSNorm, x: Tensor, ropeCs: RopeRows | null, act: DType): Tensor {
    const [B, L] = x.shape as [number, number];
    const p = lin.forward(x, 'none', act);
    const n = rmsNorm({ x: p, weight: norm.weight.t }, { eps: norm.eps, out: act });
    p.dispose();
    const h = n.reshape([B, L, this.heads, this.dim / this.heads]);
    n.dispose();
    if (!ropeCs) return h;
    const r = rope({ x: h, cos: ropeCs.cos, sin: ropeCs.sin });
    h.dispose();
    return r;
  }
}

/** RoPE tables for a run of token rows: [rows, Dh/2] each */
interface RopeRows {
  cos: Tensor;
  sin: Tensor;
}

class FeedForward extends Module {
  readonly proj: Linear;
  readonly down: Linear;
  constructor(dim: number, ffn: number) {
    super();
    // keys: ffn.net.0.proj.{weight,bias}, ffn.net.2.{weight,bias}
    const net = this.child('net', new Container());
    this.proj = net.add('0', new Container()).add('proj', new Linear(dim, ffn));
    this.down = net.add('2', new Linear(ffn, dim));
  }
  /** x [..., D] → [..., D] f32; x is freed once the [..., ffn] intermediate is encoded */
  forward(x: Tensor, act: DType = 'f32'): Tensor {
    const mid = this.proj.forward(x, 'gelu', act);
    x.dispose();
    const y = this.down.forward(mid, 'none', 'f32');
    mid.dispose();
    return y;
  }
}

/**
 * How a block bounds its working set (DitForwardOptions, resolved by WanTransformer3DModel.forward).
 * Chunks are token rows; 0 = whole.
 */
interface BlockBounds {
  sequential: boolean;
  ffnChunk: number;
  attnChunk: number;
}

const UNBOUNDED: BlockBounds = { sequential: false, ffnChunk: 0, attnChunk: 0 };

/**
 * The fewest token rows a bounded matmul call gets. The matmul picks its kernel by row count
 * (ops/matmul.ts UBO_MIN_M: on llvmpipe the 'ubo' kernel from 32 rows, the tiled one below), and
 * the two sum over K in different orders (elsewhere every call runs the tiled kernel, whose sums do
 * not depend on the row count). Chunks and per-batch-element calls of at least 32 rows therefore
 * run the kernel of the whole-stream call (which has at least as many rows), and the bounded
 * forward stays bit-identical; smaller chunks are raised to this, a shorter last chunk joins the
 * one before it, and a stream of fewer tokens runs unbounded.
 */
export const MIN_CALL_ROWS = 32;

/** Row ranges [r0, r1) covering `rows` in chunks of `chunk` rows (0: one range), none below MIN_CALL_ROWS unless it is all. */
export function rowRanges(rows: number, chunk: number): Array<[number, number]> {
  const c = chunk > 0 ? Math.max(chunk, MIN_CALL_ROWS) : rows;
  const out: Array<[number, number]> = [];
  for (let r = 0; r < rows; r += c) out.push([r, Math.min(rows, r + c)]);
  const last = out[out.length - 1];
  if (out.length > 1 && last && last[1] - last[0] < MIN_CALL_ROWS) {
    out.pop();
    out[out.length - 1]![1] = rows;
  }
  return out;
}

/**
 * Copy `src` into `dst` starting `byteOffset` bytes into it, and free `src`: how a chunk's result
 * lands in the residual stream (x += ... in place) or in a whole-sequence k / v. Safe right after
 * encoding: the queue orders the copy after the kernels that wrote src and before later readers.
 */
function putBytes(e: Engine, dst: Tensor, byteOffset: number, src: Tensor): void {
  e.copyBuffer(src.buffer, src.byteOffset, dst.buffer, dst.byteOffset + byteOffset, src.nbytes);
  src.dispose();
}

/** Batch elements [b0, b0 + n) of t as a tensor attention can bind (a view when aligned, else a copy). */
function batchRows(e: Engine, t: Tensor, b0: number, n: number): Tensor {
  return e.bindable(t.narrow0(b0, b0 + n));
}

function layerNormMod(x: Tensor, shift: Tensor, scale: Tensor, eps: number): Tensor {
  return layerNorm({ x, shift, scale }, { eps });
}

class WanBlock extends Module {
  readonly scale_shift_table: Param;
  readonly attn1: WanAttention;
  readonly attn2: WanAttention;
  readonly norm2: LayerNorm;
  readonly ffn: FeedForward;
  constructor(readonly dims: WanDitDims) {
    super();
    const D = dims.numHeads * dims.headDim;
    this.scale_shift_table = this.param('scale_shift_table', [1, 6, D], 'f32');
    this.attn1 = this.child('attn1', new WanAttention(D, dims.numHeads, dims.eps));
    this.attn2 = this.child('attn2', new WanAttention(D, dims.numHeads, dims.eps));
    // diffusers norm2 = Wan norm3: the affine LayerNorm before cross-attention
    this.norm2 = this.child('norm2', new LayerNorm(D, dims.eps, dims.crossAttnNorm));
    this.ffn = this.child('ffn', new FeedForward(D, dims.ffnDim));
  }

  /**
   * x [B, L, D] residual stream, updated in place; e0 [6, D] time projection; ctx [B, Lt, D]
   * embedded text; RoPE tables [L, Dh/2]. With `bounds`, batch elements run one after the other
   * and the attentions and the FFN over row chunks; every intermediate is freed once its last
   * reader is encoded. A trace sees whole-stream intermediates, so traced runs pass UNBOUNDED.
   */
  async forward(x: Tensor, e0: Tensor, ctx: Tensor, ropeCs: RopeRows, bounds: BlockBounds, trace?: Tracer, tag = ''): Promise<void> {
    const e = engineOf(x)!;
    const [B, L, D] = x.shape as [number, number, number];
    const act = this.dims.activationDtype ?? 'f32';
    // m = scale_shift_table[0] + e0, chunked: shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn
    const m = add(this.scale_shift_table.t.reshape([6, D]), e0); // [6, D]
    const mod = Array.from({ length: 6 }, (_, k) => e.bindable(m.select0(k)));
    // cross-attention k / v of all batch elements in one call each, whatever the grouping below:
    // their matmuls then have the unbounded run's rows (B·Lt: with a short text, one element's
    // Lt rows alone could fall under the row count that changes the kernel, see MIN_CALL_ROWS)
    const k2 = this.attn2.key(ctx, null, act);
    const v2 = this.attn2.value(ctx, act);
    const groups: Array<[number, number]> = bounds.sequential ? Array.from({ length: B }, (_, b) => [b, 1]) : [[0, B]];
    for (const [b0, nb] of groups) {
      const xs = x.narrow0(b0, b0 + nb); // [nb, L, D], a view: updates land in x
      // 1. Self-attention: x += attn1(LN(x)·(1+scale_msa) + shift_msa) · gate_msa
      if (bounds.attnChunk > 0 && bounds.attnChunk < L) {
        for (let b = b0; b < b0 + nb; b++) await this.selfAttnChunked(e, x.select0(b), mod, ropeCs, bounds.attnChunk, act);
      } else {
        const h1 = layerNormMod(xs, mod[0]!, mod[1]!, this.dims.eps);
        const q = this.attn1.query(h1, ropeCs, act);
        const k = this.attn1.key(h1, ropeCs, act);
        const v = this.attn1.value(h1, act);
        h1.dispose();
        const y1 = this.attn1.attend(q, k, v, this.dims.attention);
        k.dispose();
        v.dispose();
        if (trace) await trace(`${tag}self_attn_out`, y1);
        putBytes(e, xs, 0, gatedResidual({ x: xs, r: y1, gate: mod[2]! }, {}));
        y1.dispose();
      }
      await e.throttle();
      // 2. Cross-attention over all text rows, no gate: x += attn2(LN_affine(x), ctx)
      if (bounds.attnChunk > 0 && bounds.attnChunk < L) {
        for (let b = b0; b < b0 + nb; b++) {
          const kb = batchRows(e, k2, b, 1);
          const vb = batchRows(e, v2, b, 1);
          const xb = x.select0(b);
          for (const [i0, i1] of rowRanges(L, bounds.attnChunk)) {
            const xr = xb.narrow0(i0, i1).reshape([1, i1 - i0, D]);
            const h2 = this.norm2.forward(xr);
            const q = this.attn2.query(h2, null, act);
            h2.dispose();
            const y2 = this.attn2.attend(q, kb, vb);
            putBytes(e, xr, 0, add(xr, y2));
            y2.dispose();
            xr.dispose();
            await e.throttle();
          }
          xb.dispose();
          kb.dispose();
          vb.dispose();
        }
      } else {
        const kg = batchRows(e, k2, b0, nb);
        const vg = batchRows(e, v2, b0, nb);
        const h2 = this.norm2.forward(xs);
        const q = this.attn2.query(h2, null, act);
        h2.dispose();
        const y2 = this.attn2.attend(q, kg, vg);
        kg.dispose();
        vg.dispose();
        if (trace) await trace(`${tag}cross_attn_out`, y2);
        putBytes(e, xs, 0, add(xs, y2));
        y2.dispose();
      }
      await e.throttle();
      // 3. FFN: x += ffn(LN(x)·(1+scale_ffn) + shift_ffn) · gate_ffn, per token: chunks run over
      // the group's rows of all its batch elements
      const rows = xs.reshape([nb * L, D]);
      for (const [r0, r1] of rowRanges(nb * L, bounds.ffnChunk)) {
        const xr = rows.narrow0(r0, r1);
        const y3 = this.ffn.forward(layerNormMod(xr, mod[3]!, mod[4]!, this.dims.eps), act);
        if (trace) await trace(`${tag}ffn_out`, y3);
        putBytes(e, xr, 0, gatedResidual({ x: xr, r: y3, gate: mod[5]! }, {}));
        y3.dispose();
        xr.dispose();
        await e.throttle();
      }
      rows.dispose();
      xs.dispose();
    }
    k2.dispose();
    v2.dispose();
    for (const t of mod) t.dispose();
    m.dispose();
  }

  /**
   * Self-attention of one batch element xb [L, D] (a view of the stream, updated in place) over
   * query chunks: k and v of all tokens first, computed chunk by chunk into whole-sequence tensors
   * (so LN(x) never exists for all tokens at once), then per query chunk: LN-mod again, q with the
   * chunk's RoPE rows, attention against all keys, output projection and the gated residual of
   * those rows. A chunk's rows are read for the last time right before they are overwritten.
   */
  private async selfAttnChunked(e: Engine, xb: Tensor, mod: Tensor[], ropeCs: RopeRows, chunk: number, act: DType): Promise<void> {
    const [L, D] = xb.shape as [number, number];
    const H = this.dims.numHeads;
    const es = dtypeSize(act);
    const ranges = rowRanges(L, chunk);
    const chunkIn = (i0: number, i1: number) => {
      const xr = xb.narrow0(i0, i1).reshape([1, i1 - i0, D]);
      const cs = { cos: ropeCs.cos.narrow0(i0, i1), sin: ropeCs.sin.narrow0(i0, i1) };
      const h = layerNormMod(xr, mod[0]!, mod[1]!, this.dims.eps);
      return { xr, cs, h, free: () => (xr.dispose(), cs.cos.dispose(), cs.sin.dispose()) };
    };
    const k = e.empty([1, L, H, D / H], act);
    const v = e.empty([1, L, H, D / H], act);
    for (const [i0, i1] of ranges) {
      const c = chunkIn(i0, i1);
      putBytes(e, k, i0 * D * es, this.attn1.key(c.h, c.cs, act));
      putBytes(e, v, i0 * D * es, this.attn1.value(c.h, act));
      c.h.dispose();
      c.free();
      await e.throttle();
    }
    for (const [i0, i1] of ranges) {
      const c = chunkIn(i0, i1);
      const q = this.attn1.query(c.h, c.cs, act);
      c.h.dispose();
      const y = this.attn1.attend(q, k, v, this.dims.attention);
      putBytes(e, c.xr, 0, gatedResidual({ x: c.xr, r: y, gate: mod[2]! }, {}));
      y.dispose();
      c.free();
      await e.throttle();
    }
    k.dispose();
    v.dispose();
    xb.dispose();
  }
}

class TimeTextEmbedding extends Module {
  readonly time_embedder: TwoLinear;
  readonly time_proj: Linear;
  readonly text_embedder: TwoLinear;
  constructor(D: number, freqDim: number, textDim: number) {
    super();
    this.time_embedder = this.child('time_embedder', new TwoLinear(freqDim, D, D));
    this.time_proj = this.child('time_proj', new Linear(D, 6 * D));
    this.text_embedder = this.child('text_embedder', new TwoLinear(textDim, D, D));
  }
}

class TwoLinear extends Module {
  readonly linear_1: Linear;
  readonly linear_2: Linear;
  constructor(a: number, b: number, c: number) {
    super();
    this.linear_1 = this.child('linear_1', new Linear(a, b));
    this.linear_2 = this.child('linear_2', new Linear(b, c));
  }
}

export interface DitForwardOptions {
  residency?: BlockResidency;
  trace?: Tracer;
  /**
   * Keep the residual stream in host memory between blocks (for very long videos at level 3):
   * each block reads it in and writes it back out, so the GPU holds one block's working set.
   */
  activationOffload?: boolean;
  /**
   * Called after each block (its work encoded, not necessarily finished): the pipeline checks its
   * AbortSignal here (throwing stops the forward between blocks) and reports progress inside a
   * long step.
   */
  onBlock?: (block: number, blocks: number) => void | Promise<void>;
  // Activation bounds. Each gives the same floats as the unbounded forward (bit-identical: every
  // piece is per token row or per batch element, and no matmul call gets so few rows that its
  // kernel changes, see MIN_CALL_ROWS). A traced forward ignores them: the trace reports
  // whole-stream intermediates.
  /**
   * Inside each block, run batch element 0, then 1, ... (CFG: cond, then uncond, each with its own
   * text row of ctxEmb), so the block's working set is that of batch 1. The block's weights are
   * acquired once per block either way.
   */
  cfgSequential?: boolean;
  /** The FFN over chunks of this many tokens, so one [chunk, ffn_dim] intermediate exists at a time (0 = whole; autoFfnChunkTokens) */
  ffnChunkTokens?: number;
  /**
   * Both attentions over chunks of this many query tokens: self-attention k / v for all tokens
   * first, then q, attention against all keys, output projection and residual per chunk; the
   * cross-attention's queries likewise (0 = whole; autoAttnChunkTokens).
   */
  attnChunkTokens?: number;
  /**
   * Step caching (src/pipeline/cache/): asked once per forward, after the patch and time
   * embeddings and before any block is acquired, which batch rows run which leading blocks; the
   * blocks it skips are neither acquired nor uploaded (level 3), and `finish` completes the stream
   * (adds a cached residual). Absent: the forward is exactly the plain one.
   */
  stepCache?: DitStepCache;
}

/** What a step cache decides for one forward (see DitStepCache). */
export interface DitStepPlan {
  /** per batch row (CFG: 0 cond, 1 uncond): true = the row runs the blocks, false = it takes a cached residual */
  rows: boolean[];
  /** how many leading blocks the running rows run (0..numLayers; numLayers = all) */
  blocks: number;
}

/**
 * A step cache's hook into WanTransformer3DModel.forward. hs is the residual stream [B, L, D]
 * (f32): the blocks' input at `plan` (read it, do not write it), their output at `finish`, where
 * rows that did not run (or ran fewer than all blocks) must be completed in place. e [1, D] and
 * e0 [6, D] are the step's time embedding and time projection (Wan's `e` and `e0`).
 */
export interface DitStepCache {
  plan(p: { hs: Tensor; e: Tensor; e0: Tensor; blocks: number }): Promise<DitStepPlan>;
  finish(hs: Tensor, plan: DitStepPlan): Promise<void>;
}

/**
 * Tokens per FFN chunk that keep the [chunk, ffn_dim] intermediate no larger than one residual
 * stream [L, D]: the largest multiple of 64 with chunk·ffnDim <= L·D, at least 64, at most L.
 */
export function autoFfnChunkTokens(L: number, D: number, ffnDim: number): number {
  return Math.min(L, Math.max(64, Math.floor((L * D) / ffnDim / 64) * 64));
}

/**
 * Query tokens per attention chunk: whole up to 8192 tokens (q, the attention output and the
 * projection's output are then a few residual-sized tensors), else the largest multiple of 64 up
 * to L/4, so those three are a quarter of the stream each. The attention op splits anything above
 * the binding limit itself, so no binding check is needed here.
 */
export function autoAttnChunkTokens(L: number): number {
  return L <= 8192 ? 0 : Math.floor(L / 4 / 64) * 64;
}

/** Chunk option `what` checked: a whole number >= 0 (0 / absent = whole). */
/** Chunk option `what` checked: a whole number >= 0 (0 / absent = whole); errors name `op` (the CP forward shares it). */
export function chunkTokens(what: string, v: number | undefined, op = 'wan_dit'): number {
  if (v === undefined) return 0;
  if (!Number.isInteger(v) || v < 0) throw new ShapeError(`[${op}] ${what} must be an integer >= 0 (0 = whole), got ${v}`);
  return v;
}

export class WanTransformer3DModel extends Module {
  readonly patchWeight: Param;
  readonly patchBias: Param;
  readonly condition_embedder: TimeTextEmbedding;
  readonly blocks: ModuleList<WanBlock>;
  readonly scale_shift_table: Param;
  readonly proj_out: Linear;
  readonly D: number;

  constructor(readonly dims: WanDitDims) {
    super();
    const D = (this.D = dims.numHeads * dims.headDim);
    const [pt, ph, pw] = dims.patchSize;
    const pe = this.child('patch_embedding', new ParamHolder());
    this.patchWeight = pe.add('weight', [D, dims.inChannels, pt, ph, pw]);
    this.patchBias = pe.add('bias', [D], 'f32');
    this.condition_embedder = this.child('condition_embedder', new TimeTextEmbedding(D, dims.freqDim, dims.textDim));
    this.blocks = this.child('blocks', new ModuleList(Array.from({ length: dims.numLayers }, () => new WanBlock(dims))));
    this.scale_shift_table = this.param('scale_shift_table', [1, 2, D], 'f32');
    this.proj_out = this.child('proj_out', new Linear(D, pt * ph * pw * dims.outChannels));
  }

  /** Non-block parameters (embedders, head): kept resident at every memory level. */
  isBlockKey(key: string): boolean {
    return key.startsWith('blocks.');
  }

  /**
   * Embed the text context once per prompt: ctx [B, textLen, textDim] (zero-padded T5 output)
   * → [B, textLen, D].
   */
  embedText(ctx: Tensor): Tensor {
    const te = this.condition_embedder.text_embedder;
    return te.linear_2.forward(te.linear_1.forward(ctx, 'gelu'));
  }

  /** Time embedding: e [1, D] and e0 [6, D] for timestep t (sinusoid in float64 on the host). */
  embedTime(e: Engine, t: number): { e: Tensor; e0: Tensor } {
    const sin = e.fromHost(timestepSinusoid(t, this.dims.freqDim), [1, this.dims.freqDim], 'f32');
    const te = this.condition_embedder.time_embedder;
    const emb = te.linear_2.forward(te.linear_1.forward(sin, 'silu')); // [1, D]
    const e0 = this.condition_embedder.time_proj.forward(unary({ x: emb }, { kind: 'silu' })).reshape([6, this.D]);
    sin.dispose();
    return { e: emb, e0 };
  }

  /**
   * One forward pass. x: latents [B, C, F, H, W]; t: timestep (integer in Wan's sampler);
   * ctxEmb: embedded text [B, textLen, D] (from embedText). Returns the flow prediction [B, C_out, F, H, W].
   */
  async forward(x: Tensor, t: number, ctxEmb: Tensor, opts: DitForwardOptions = {}): Promise<Tensor> {
    const e = engineOf(x);
    if (!e) throw new ShapeError('[wan_dit] run the DiT on a GPU engine');
    const residency = opts.residency ?? RESIDENT;
    const trace = opts.trace;
    const [B, C, F, H, W] = x.shape as [number, number, number, number, number];
    const [pt, ph, pw] = this.dims.patchSize;
    if (C !== this.dims.inChannels) throw new ShapeError(`[wan_dit] latents have ${C} channels, the model expects ${this.dims.inChannels}`);
    if (F % pt || H % ph || W % pw) throw new ShapeError(`[wan_dit] latent [${F}, ${H}, ${W}] is not divisible by the patch size [${pt}, ${ph}, ${pw}]`);
    if (pt !== 1) throw new ShapeError(`[wan_dit] temporal patch size ${pt} is not supported (Wan 2.1 uses 1)`);
    const f = F / pt;
    const h = H / ph;
    const w = W / pw;
    const L = f * h * w;
    const D = this.D;
    return e.scopeAsync(async () => {
      // patchify: [B, C, F, h, ph, w, pw] -> [B, F, h, w, C, ph, pw] -> tokens [B, L, C·ph·pw]
      // (each handle is dropped once the next one is encoded: views keep their storage alive)
      const xv = x.reshape([B * C, F, h, ph, w, pw]);
      const patches = permute(xv, [0, 1, 2, 4, 3, 5]); // [B·C, F, h, w, ph, pw]
      const pv = patches.reshape([B, C, L, ph * pw]);
      const tokT = permute(pv, [0, 2, 1, 3]);
      const tok = tokT.reshape([B, L, C * ph * pw]);
      const wFlat = this.patchWeight.t.reshape([D, C * pt * ph * pw]);
      let hs = linear(tok, wFlat, { bias: this.patchBias.t }); // [B, L, D]
      for (const t of [xv, patches, pv, tokT, tok, wFlat]) t.dispose();
      if (trace) await trace('patch_tokens', hs);
      const { e: emb, e0 } = this.embedTime(e, t);
      if (trace) {
        await trace('e', emb);
        await trace('e0', e0.reshape([1, 6, D]));
      }
      // (the memory planner's meta device reads no values: the tables are not computed there)
      const tabs = e.isMeta ? null : ropeTables(f, h, w, this.dims.headDim, this.dims.ropeMaxSeqLen);
      const cos = tabs ? e.fromHost(tabs.cos, [L, this.dims.headDim / 2], 'f32') : e.empty([L, this.dims.headDim / 2], 'f32');
      const sin = tabs ? e.fromHost(tabs.sin, [L, this.dims.headDim / 2], 'f32') : e.empty([L, this.dims.headDim / 2], 'f32');
      // a traced run reports whole-stream intermediates; a stream below MIN_CALL_ROWS tokens per
      // batch element is too small to bound (a per-element matmul could change kernel)
      const bounds: BlockBounds =
        trace || L < MIN_CALL_ROWS
          ? UNBOUNDED
          : { sequential: opts.cfgSequential ?? false, ffnChunk: chunkTokens('ffnChunkTokens', opts.ffnChunkTokens), attnChunk: chunkTokens('attnChunkTokens', opts.attnChunkTokens) };
      const n = this.blocks.length;
      // step caching: which rows run how many leading blocks (null: all rows, all blocks)
      const sc = opts.stepCache;
      const plan = sc ? await sc.plan({ hs, e: emb, e0, blocks: n }) : null;
      if (plan && (plan.rows.length !== B || !(Number.isInteger(plan.blocks) && plan.blocks >= 0 && plan.blocks <= n))) {
        throw new ShapeError(`[wan_dit] step cache plan must give ${B} rows and 0..${n} blocks, got ${plan.rows.length} rows and ${plan.blocks} blocks`);
      }
      const nRun = !plan || plan.rows.some(Boolean) ? (plan?.blocks ?? n) : 0;
      // the rows that run, when not all of them do (CFG split: one row): a stream of their own,
      // with their own text rows, copied back into hs after the blocks
      const runRow = plan && nRun > 0 && !plan.rows.every(Boolean) ? plan.rows.indexOf(true) : -1;
      if (runRow >= 0 && plan!.rows.lastIndexOf(true) !== runRow) throw new ShapeError('[wan_dit] a step cache plan may split off one running row');
      let run = runRow >= 0 ? e.clone(hs.narrow0(runRow, runRow + 1)) : hs;
      const ctxRun = runRow >= 0 ? e.bindable(ctxEmb.narrow0(runRow, runRow + 1)) : ctxEmb;
      if (nRun > 0) await residency.acquire(0);
      let hostStream: Float32Array | null = null;
      const streamShape = [...run.shape];
      let metaSpan: MetaSpan | null = null;
      for (let i = 0; i < nRun; i++) {
        if (hostStream) run = e.fromHost(hostStream, streamShape, 'f32', 'activation.residual');
        if (i + 1 < nRun) residency.prefetch(i + 1);
        // each block in its own scope (a safety net: it frees its intermediates as it goes), and
        // the stream is updated in place, so old and new streams never coexist
        const blk = this.blocks.at(i);
        const cur = run;
        // the planner's meta walk: a block that would repeat the last walked one exactly (the same
        // allocator state; every block has the same shapes) is accounted, not walked (Engine.metaRepeat)
        if (!(metaSpan && e.metaRepeat(metaSpan))) {
          const mark = e.isMeta && !trace ? e.metaSpanStart() : null;
          await e.scopeAsync(() => blk.forward(cur, e0, ctxRun, { cos, sin }, bounds, trace, `block${i}_`));
          metaSpan = mark ? e.metaSpanEnd(mark) : null;
        }
        if (trace) await trace(`block${i}_out`, run);
        residency.release(i);
        if (opts.activationOffload && i + 1 < nRun) {
          // (the planner's meta device has no values: one zero array of the stream's size)
          hostStream = e.isMeta ? (hostStream ?? new Float32Array(run.numel)) : ((await run.toArray()) as Float32Array);
          run.dispose();
        }
        // before the next block is acquired: a throw here (an abort) leaves no block held
        if (opts.onBlock) await opts.onBlock(i, n);
        if (i + 1 < nRun) await residency.acquire(i + 1);
        await e.throttle();
      }
      if (runRow >= 0) {
        // the running row's result back into its place in the batch
        e.copyBuffer(run.buffer, run.byteOffset, hs.buffer, hs.byteOffset + runRow * run.nbytes, run.nbytes);
        run.dispose();
      } else hs = run;
      if (sc && plan) await sc.finish(hs, plan);
      // head: (scale_shift_table[0] + e) -> shift, scale; proj_out(LN(x)·(1+scale) + shift)
      const mh = add(this.scale_shift_table.t.reshape([2, D]), emb); // [2, D]
      const hn = layerNormMod(hs, e.bindable(mh.select0(0)), e.bindable(mh.select0(1)), this.dims.eps);
      const out = this.proj_out.forward(hn); // [B, L, ph·pw·C_out], c fastest
      if (trace) await trace('head_out', out);
      // unpatchify: [B, f, h, w, ph, pw, C] -> [B, C, f, h, ph, w, pw]
      const Co = this.dims.outChannels;
      const u = permute(out.reshape([B, f * h, w, ph, pw, Co]), [0, 5, 1, 3, 2, 4]); // [B, Co, f·h, ph, w, pw]
      // [B, Co, f, h, ph, w, pw] == [B, Co, F, H, W] in memory once ph sits between h and w: we need (h, ph, w, pw)
      return u.reshape([B, Co, F, H, W]);
    });
  }
}
