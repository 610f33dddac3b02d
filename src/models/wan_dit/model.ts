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
import { engineOf, type Engine } from '../../runtime/engine.ts';
import { attention } from '../../ops/attention.ts';
import { rope } from '../../ops/rope.ts';
import { permute } from '../../ops/layout.ts';
import { linear } from '../../ops/matmul.ts';
import { layerNorm } from '../../ops/norm.ts';
import { add, gatedResidual, unary } from '../../ops/elementwise.ts';
import { timestepSinusoid, ropeTables } from './host.ts';
import { ShapeError } from '../../util/errors.ts';
import type { DType } from '../../tensor/dtype.ts';
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

  /** x [B, Lq, D]; ctx [B, Lk, D] (cross) or x itself (self, with RoPE tables [Lq, Dh/2]) */
  /** act: dtype of the projections' outputs and the attention (the residual stream stays f32) */
  forward(x: Tensor, ctx: Tensor | null, ropeCs: { cos: Tensor; sin: Tensor } | null, act: DType = 'f32'): Tensor {
    const B = x.size(0);
    const Lq = x.size(1);
    const src = ctx ?? x;
    const Lk = src.size(1);
    const dh = this.dim / this.heads;
    // q/k RMSNorm across the full D (f32 statistics), before the head split and RoPE
    let q = rmsNorm({ x: this.to_q.forward(x, 'none', act), weight: this.norm_q.weight.t }, { eps: this.norm_q.eps, out: act }).reshape([B, Lq, this.heads, dh]); // [B, Lq, H, Dh]
    let k = rmsNorm({ x: this.to_k.forward(src, 'none', act), weight: this.norm_k.weight.t }, { eps: this.norm_k.eps, out: act }).reshape([B, Lk, this.heads, dh]); // [B, Lk, H, Dh]
    const v = this.to_v.forward(src, 'none', act).reshape([B, Lk, this.heads, dh]);
    if (ropeCs) {
      q = rope({ x: q, cos: ropeCs.cos, sin: ropeCs.sin });
      k = rope({ x: k, cos: ropeCs.cos, sin: ropeCs.sin });
    }
    const o = attention({ q, k, v }, { scale: 1 / Math.sqrt(dh) }).reshape([B, Lq, this.dim]);
    return this.to_out.at(0).forward(o, 'none', 'f32');
  }
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
  forward(x: Tensor, act: DType = 'f32'): Tensor {
    return this.down.forward(this.proj.forward(x, 'gelu', act), 'none', 'f32');
  }
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
   * x [B, L, D] residual stream; e0 [6, D] time projection; ctx [B, Lt, D] embedded text.
   * Returns the new residual stream (the input is not modified).
   */
  async forward(x: Tensor, e0: Tensor, ctx: Tensor, ropeCs: { cos: Tensor; sin: Tensor }, trace?: Tracer, tag = ''): Promise<Tensor> {
    const e = engineOf(x)!;
    const eps = this.dims.eps;
    const D = x.size(2);
    // m = scale_shift_table[0] + e0, chunked: shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn
    const m = add(this.scale_shift_table.t.reshape([6, D]), e0); // [6, D]
    const row = (k: number) => e.bindable(m.select0(k));
    // 1. Self-attention: x += attn1(LN(x)·(1+scale_msa) + shift_msa) · gate_msa
    const h1 = layerNormMod(x, row(0), row(1), eps);
    const act = this.dims.activationDtype ?? 'f32';
    const y1 = this.attn1.forward(h1, null, ropeCs, act);
    if (trace) await trace(`${tag}self_attn_out`, y1);
    const x1 = gatedResidual({ x, r: y1, gate: row(2) }, {});
    // 2. Cross-attention over all text rows, no gate: x += attn2(LN_affine(x), ctx)
    const h2 = this.norm2.forward(x1);
    const y2 = this.attn2.forward(h2, ctx, null, act);
    if (trace) await trace(`${tag}cross_attn_out`, y2);
    const x2 = add(x1, y2);
    // 3. FFN: x += ffn(LN(x)·(1+scale_ffn) + shift_ffn) · gate_ffn
    const h3 = layerNormMod(x2, row(3), row(4), eps);
    const y3 = this.ffn.forward(h3, act);
    if (trace) await trace(`${tag}ffn_out`, y3);
    return gatedResidual({ x: x2, r: y3, gate: row(5) }, {});
  }
}

function layerNormMod(x: Tensor, shift: Tensor, scale: Tensor, eps: number): Tensor {
  return layerNorm({ x, shift, scale }, { eps });
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
      const patches = permute(x.reshape([B * C, F, h, ph, w, pw]), [0, 1, 2, 4, 3, 5]); // [B·C, F, h, w, ph, pw]
      const tok = permute(patches.reshape([B, C, L, ph * pw]), [0, 2, 1, 3]).reshape([B, L, C * ph * pw]);
      const wFlat = this.patchWeight.t.reshape([D, C * pt * ph * pw]);
      let hs = linear(tok, wFlat, { bias: this.patchBias.t }); // [B, L, D]
      if (trace) await trace('patch_tokens', hs);
      const { e: emb, e0 } = this.embedTime(e, t);
      if (trace) {
        await trace('e', emb);
        await trace('e0', e0.reshape([1, 6, D]));
      }
      const tabs = ropeTables(f, h, w, this.dims.headDim, this.dims.ropeMaxSeqLen);
      const cos = e.fromHost(tabs.cos, [L, this.dims.headDim / 2], 'f32');
      const sin = e.fromHost(tabs.sin, [L, this.dims.headDim / 2], 'f32');
      const n = this.blocks.length;
      await residency.acquire(0);
      let hostStream: Float32Array | null = null;
      const streamShape = [...hs.shape];
      for (let i = 0; i < n; i++) {
        if (hostStream) hs = e.fromHost(hostStream, streamShape, 'f32', 'activation.residual');
        if (i + 1 < n) residency.prefetch(i + 1);
        const prev = hs;
        // each block in its own scope: its intermediates (norms, q/k/v, attention and FFN outputs)
        // are freed when it returns, so the activation working set is one block's, not all blocks'
        const blk = this.blocks.at(i);
        hs = await e.scopeAsync(() => blk.forward(prev, e0, ctxEmb, { cos, sin }, trace, `block${i}_`));
        prev.dispose();
        if (trace) await trace(`block${i}_out`, hs);
        residency.release(i);
        if (opts.activationOffload && i + 1 < n) {
          hostStream = (await hs.toArray()) as Float32Array;
          hs.dispose();
        }
        if (i + 1 < n) await residency.acquire(i + 1);
      }
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
