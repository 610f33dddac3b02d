// Wan 2.1 causal-3D VAE decoder (diffusers `AutoencoderKLWan`, decoder half only).
// Keys: post_quant_conv, decoder.conv_in, decoder.mid_block.{resnets.{0,1}, attentions.0},
// decoder.up_blocks.{0..3}.{resnets.{0,1,2}, upsamplers.0.{resample.1, time_conv}}, decoder.norm_out,
// decoder.conv_out. (A real VAE file also holds the encoder: those keys are not used, by design.)
//
// Conventions (../shared/golden/README.md "VAE decoder"): z_raw = z / (1/std) + mean;
// CausalConv3d pads k-1 frames in front, none behind; RMS_norm = x / max(‖x‖₂ over C, 1e-12) · √C · γ;
// per-frame single-head mid attention; nearest ×2 upsample + Conv2d 3×3 halving channels; upsample3d
// adds a (3,1,1) time_conv whose 2C outputs go to frames 2j, 2j+1, and frame 0 skips it
// (first-frame rule: T → 1 + 2(T−1)); clamp(−1, 1) at the end.
//
// Decoding runs one latent frame (or a chunk of frames) at a time with an explicit causal cache:
// every CausalConv3d keeps the last 2 frames of its input, so memory does not grow with the video
// length — exactly what the official decoder's feat_cache does.

import { Module, ModuleList, Param, Container, ParamHolder } from '../../nn/module.ts';
import { Tensor } from '../../tensor/tensor.ts';
import { engineOf, type Engine } from '../../runtime/engine.ts';
import type { VaeConfig } from '../../io/model-folder.ts';
import { conv3d, conv2d, conv3dWorkColumns } from '../../ops/conv.ts';
import { upsampleNearest2x } from '../../ops/upsample.ts';
import { channelL2Norm } from '../../ops/norm.ts';
import { permute, concat, slice } from '../../ops/layout.ts';
import { linear } from '../../ops/matmul.ts';
import { attention } from '../../ops/attention.ts';
import { sageAttention } from '../../ops/attention_sage.ts';
import { add, unary } from '../../ops/elementwise.ts';
import { ShapeError } from '../../util/errors.ts';
import type { Tracer } from '../../nn/trace.ts';
import { countNonFinite } from '../../ops/finite.ts';

export interface WanVaeDims {
  baseDim: number;
  zDim: number;
  dimMult: number[];
  numResBlocks: number;
  attnScales: number[];
  temporalDownsample: boolean[];
  latentsMean: number[];
  latentsStd: number[];
}

/** Dims from a parsed vae/config.json (io/model-folder.ts checks the keys). */
export function vaeDimsFromConfig(c: VaeConfig): WanVaeDims {
  return {
    baseDim: c.base_dim,
    zDim: c.z_dim,
    dimMult: c.dim_mult,
    numResBlocks: c.num_res_blocks,
    attnScales: c.attn_scales,
    temporalDownsample: c.temperal_downsample,
    latentsMean: c.latents_mean,
    latentsStd: c.latents_std,
  };
}

/** Per-decode state: the causal caches of every conv (last frames of its input) and 'Rep' flags. */
export class CausalCache {
  readonly frames = new Map<object, Tensor>();
  readonly seen = new Set<object>();
  dispose(): void {
    for (const t of this.frames.values()) t.dispose();
    this.frames.clear();
    this.seen.clear();
  }
  /** bytes held by the cache */
  bytes(): number {
    let n = 0;
    for (const t of this.frames.values()) n += t.nbytes;
    return n;
  }
}

const CACHE_T = 2;

class CausalConv3d extends Module {
  readonly weight: Param;
  readonly bias: Param;
  constructor(
    readonly cin: number,
    readonly cout: number,
    readonly k: [number, number, number],
  ) {
    super();
    this.weight = this.param('weight', [cout, cin, ...k]);
    this.bias = this.param('bias', [cout], 'f32');
  }

  /**
   * x [B, C, T, H, W]. Without a cache: zero causal padding. With a cache: the cached last frames
   * of the previous chunk's input are used in front (zeros for what is missing), and the cache is
   * updated with this chunk's last frames.
   */
  forward(x: Tensor, cache: CausalCache | null): Tensor {
    const e = engineOf(x);
    const kt = this.k[0];
    const ph = (this.k[1] - 1) / 2;
    const pw = (this.k[2] - 1) / 2;
    if (kt === 1 || !cache) return conv3d({ x, w: this.weight.t, b: this.bias.t }, { padding: [kt - 1, 0, ph, pw] });
    const prev = cache.frames.get(this);
    // new cache: last CACHE_T frames of (prev ++ x)
    const input = prev ? concat([prev, x], 2) : x;
    const Tin = input.size(2);
    const front = Math.max(0, kt - 1 - (prev ? prev.size(2) : 0));
    const out = conv3d({ x: input, w: this.weight.t, b: this.bias.t }, { padding: [front, 0, ph, pw] });
    const keepFrom = Math.max(0, Tin - CACHE_T);
    const next = slice(input, 2, keepFrom, Tin);
    if (e) e.keep(next);
    prev?.dispose();
    cache.frames.set(this, next);
    if (input !== x) input.dispose();
    return out;
  }
}

/**
 * y = f(x) in its own scope (f's intermediates are freed when it returns), then x is freed unless it
 * is `input` (the caller's tensor). Keeps a decoder's working set to one sub-block's.
 */
function stepScoped(e: Engine, x: Tensor, input: Tensor, f: (x: Tensor) => Tensor): Tensor {
  const y = e.scope(() => f(x));
  if (x !== input && y !== x) x.dispose();
  return y;
}

/** RMS_norm over channels with gamma [C, 1, 1, 1] (or [C, 1, 1] in attention). */
class ChannelNorm extends Module {
  readonly gamma: Param;
  constructor(
    readonly dim: number,
    images: boolean,
  ) {
    super();
    this.gamma = this.param('gamma', images ? [dim, 1, 1] : [dim, 1, 1, 1], 'f32');
  }
  forward(x: Tensor): Tensor {
    return channelL2Norm({ x, gamma: this.gamma.t }, { eps: 1e-12 });
  }
}

class ResnetBlock extends Module {
  readonly norm1: ChannelNorm;
  readonly conv1: CausalConv3d;
  readonly norm2: ChannelNorm;
  readonly conv2: CausalConv3d;
  readonly conv_shortcut: CausalConv3d | null;
  constructor(cin: number, cout: number) {
    super();
    this.norm1 = this.child('norm1', new ChannelNorm(cin, false));
    this.conv1 = this.child('conv1', new CausalConv3d(cin, cout, [3, 3, 3]));
    this.norm2 = this.child('norm2', new ChannelNorm(cout, false));
    this.conv2 = this.child('conv2', new CausalConv3d(cout, cout, [3, 3, 3]));
    this.conv_shortcut = cin !== cout ? this.child('conv_shortcut', new CausalConv3d(cin, cout, [1, 1, 1])) : null;
  }
  forward(x: Tensor, cache: CausalCache | null): Tensor {
    const h = this.conv1.forward(silu(this.norm1.forward(x)), cache);
    const h2 = this.conv2.forward(silu(this.norm2.forward(h)), cache);
    const sc = this.conv_shortcut ? this.conv_shortcut.forward(x, cache) : x;
    return add(sc, h2);
  }
}

function silu(x: Tensor): Tensor {
  return unary({ x }, { kind: 'silu' });
}

/** [B, C, T, H, W] -> [B·T, C, H, W] */
function toFrames(x: Tensor): Tensor {
  const [B, C, T, H, W] = x.shape as [number, number, number, number, number];
  if (T === 1) return x.reshape([B, C, H, W]);
  return permute(x, [0, 2, 1, 3, 4]).reshape([B * T, C, H, W]);
}

/** [B·T, C, H, W] -> [B, C, T, H, W] */
function fromFrames(x: Tensor, B: number, T: number): Tensor {
  const [, C, H, W] = x.shape as [number, number, number, number];
  if (T === 1) return x.reshape([B, C, 1, H, W]);
  return permute(x.reshape([B, T, C, H, W]), [0, 2, 1, 3, 4]);
}

class AttentionBlock extends Module {
  readonly norm: ChannelNorm;
  readonly qkvW: Param;
  readonly qkvB: Param;
  readonly projW: Param;
  readonly projB: Param;
  constructor(readonly dim: number) {
    super();
    this.norm = this.child('norm', new ChannelNorm(dim, true));
    const qkv = this.child('to_qkv', new ParamHolder());
    this.qkvW = qkv.add('weight', [3 * dim, dim, 1, 1]);
    this.qkvB = qkv.add('bias', [3 * dim], 'f32');
    const proj = this.child('proj', new ParamHolder());
    this.projW = proj.add('weight', [dim, dim, 1, 1]);
    this.projB = proj.add('bias', [dim], 'f32');
  }
  /** attention kernel (infer.attention): exact 'sdpa' or quantized 'sage' */
  kind: 'sdpa' | 'sage' = 'sdpa';
  /** single-head attention over h·w tokens of every frame, scale 1/√C, plus the identity */
  forward(x: Tensor): Tensor {
    const [B, C, T, H, W] = x.shape as [number, number, number, number, number];
    const f = toFrames(x); // [BT, C, H, W]
    const n = this.norm.forward(f);
    const tokens = permute(n.reshape([B * T, C, H * W]), [0, 2, 1]); // [BT, HW, C]
    const w = this.qkvW.t.reshape([3 * C, C]);
    const b = this.qkvB.t;
    const part = (i: number) => linear(tokens, rowsOf(w, i * C, C), { bias: rowsOf(b, i * C, C) }).reshape([B * T, H * W, 1, C]);
    const qkv = { q: part(0), k: part(1), v: part(2) };
    const o = (this.kind === 'sage' ? sageAttention(qkv, { scale: 1 / Math.sqrt(C) }) : attention(qkv, { scale: 1 / Math.sqrt(C) })).reshape([B * T, H * W, C]);
    const p = linear(o, this.projW.t.reshape([C, C]), { bias: this.projB.t }); // [BT, HW, C]
    const back = permute(p, [0, 2, 1]).reshape([B * T, C, H, W]);
    return fromFrames(add(back, f), B, T);
  }
}

/** rows [start, start+n) of a weight or bias, as a bindable tensor */
function rowsOf(t: Tensor, start: number, n: number): Tensor {
  const v = t.narrow0(start, start + n);
  return engineOf(t)?.bindable(v) ?? v;
}

class Upsampler extends Module {
  readonly convW: Param;
  readonly convB: Param;
  readonly time_conv: CausalConv3d | null;
  constructor(
    readonly dim: number,
    readonly temporal: boolean,
  ) {
    super();
    // resample = Sequential(Upsample, Conv2d): the conv is `resample.1`
    const rs = this.child('resample', new Container());
    const c = rs.add('1', new ParamHolder());
    this.convW = c.add('weight', [dim / 2, dim, 3, 3]);
    this.convB = c.add('bias', [dim / 2], 'f32');
    this.time_conv = temporal ? this.child('time_conv', new CausalConv3d(dim, dim * 2, [3, 1, 1])) : null;
  }

  /**
   * x [B, C, T, H, W]. upsample3d: the chunk holding frame 0 skips time_conv for that frame (first-
   * frame rule); later frames go through time_conv (causal, zero start) and double in number.
   */
  forward(x: Tensor, cache: CausalCache, firstChunk: boolean): Tensor {
    let y = x;
    if (this.time_conv) {
      const [B, C, T, H, W] = x.shape as [number, number, number, number, number];
      const head = firstChunk ? slice(x, 2, 0, 1) : null; // frame 0 passes through
      const rest = firstChunk ? (T > 1 ? slice(x, 2, 1, T) : null) : x;
      let doubled: Tensor | null = null;
      if (rest) {
        const Tr = rest.size(2);
        const tc = this.time_conv.forward(rest, cache); // [B, 2C, Tr, H, W]
        // channels [0:C] -> frame 2j, [C:2C] -> frame 2j+1
        doubled = permute(tc.reshape([B, 2, C, Tr, H * W]), [0, 2, 3, 1, 4]).reshape([B, C, 2 * Tr, H, W]);
      }
      y = head && doubled ? concat([head, doubled], 2) : (head ?? doubled!);
    }
    const [B, , T] = y.shape as [number, number, number, number, number];
    const f = toFrames(y);
    const up = upsampleNearest2x(f);
    const c = conv2d({ x: up, w: this.convW.t, b: this.convB.t }, { padding: [1, 1] });
    return fromFrames(c, B, T);
  }
}

class UpBlock extends Module {
  readonly resnets: ModuleList<ResnetBlock>;
  readonly upsamplers: ModuleList<Upsampler> | null;
  constructor(cin: number, cout: number, nRes: number, up: 'none' | 'upsample2d' | 'upsample3d') {
    super();
    const rs: ResnetBlock[] = [];
    for (let i = 0; i < nRes + 1; i++) rs.push(new ResnetBlock(i === 0 ? cin : cout, cout));
    this.resnets = this.child('resnets', new ModuleList(rs));
    this.upsamplers = up === 'none' ? null : this.child('upsamplers', new ModuleList([new Upsampler(cout, up === 'upsample3d')]));
  }
}

export interface VaeDecodeOptions {
  /** latent frames per decoder call after frame 0 (1 = the official frame-by-frame decode) */
  framesPerChunk?: number;
  trace?: Tracer;
  /** called after every chunk with the decoded frames so far (progress; throwing stops the decode) */
  onChunk?: (done: number, total: number) => void;
  /** count NaN/±Inf of each chunk's output on the GPU before its readback (`nonFinite` in the result) */
  checkFinite?: boolean;
}

export class WanVaeDecoder extends Module {
  readonly post_quant_conv: CausalConv3d;
  readonly conv_in: CausalConv3d;
  readonly midRes0: ResnetBlock;
  readonly midAttn: AttentionBlock;
  readonly midRes1: ResnetBlock;
  readonly up_blocks: ModuleList<UpBlock>;
  readonly norm_out: ChannelNorm;
  readonly conv_out: CausalConv3d;

  constructor(readonly dims: WanVaeDims) {
    super();
    const { baseDim, zDim, dimMult, numResBlocks } = dims;
    if (numResBlocks !== 2) throw new ShapeError(`[wan_vae] num_res_blocks ${numResBlocks} is not supported (diffusers hard-codes the up_blocks grouping for 2)`);
    if (dims.attnScales.length) throw new ShapeError(`[wan_vae] attn_scales ${JSON.stringify(dims.attnScales)} is not supported (Wan 2.1 uses [])`);
    const d = [baseDim * dimMult[dimMult.length - 1]!, ...[...dimMult].reverse().map((m) => baseDim * m)];
    const temporalUp = [...dims.temporalDownsample].reverse();
    this.post_quant_conv = this.child('post_quant_conv', new CausalConv3d(zDim, zDim, [1, 1, 1]));
    const dec = this.child('decoder', new Container());
    this.conv_in = dec.add('conv_in', new CausalConv3d(zDim, d[0]!, [3, 3, 3]));
    const mid = dec.add('mid_block', new Container());
    const midRes = mid.add('resnets', new ModuleList([new ResnetBlock(d[0]!, d[0]!), new ResnetBlock(d[0]!, d[0]!)]));
    this.midRes0 = midRes.at(0);
    this.midRes1 = midRes.at(1);
    this.midAttn = mid.add('attentions', new ModuleList([new AttentionBlock(d[0]!)])).at(0);
    const ups: UpBlock[] = [];
    for (let i = 0; i < dimMult.length; i++) {
      const cin = i === 0 ? d[i]! : d[i]! / 2;
      const cout = d[i + 1]!;
      const up = i === dimMult.length - 1 ? 'none' : temporalUp[i] ? 'upsample3d' : 'upsample2d';
      ups.push(new UpBlock(cin, cout, numResBlocks, up));
    }
    this.up_blocks = dec.add('up_blocks', new ModuleList(ups));
    this.norm_out = dec.add('norm_out', new ChannelNorm(d[d.length - 1]!, false));
    this.conv_out = dec.add('conv_out', new CausalConv3d(d[d.length - 1]!, 3, [3, 3, 3]));
  }

  /** Output frames for a latent of T frames: 1 + 4(T − 1) with two temporal upsamplers. */
  outputFrames(T: number): number {
    const n = this.dims.temporalDownsample.filter(Boolean).length;
    return T === 0 ? 0 : 1 + 2 ** n * (T - 1);
  }

  /** z [16, F, H, W] (normalized latent, host f32) -> z_raw = z / (1/std) + mean, per channel, f32. */
  denormalize(z: Float32Array, C: number): Float32Array {
    const n = z.length / C;
    const out = new Float32Array(z.length);
    for (let c = 0; c < C; c++) {
      const inv = Math.fround(1 / this.dims.latentsStd[c]!);
      const mean = Math.fround(this.dims.latentsMean[c]!);
      for (let i = c * n; i < (c + 1) * n; i++) out[i] = Math.fround(z[i]! / inv) + mean;
    }
    return out;
  }

  /**
   * The latent-resolution part of one decoder call: post_quant_conv, conv_in and the mid block
   * (with its per-frame global attention), then optionally the first `stages` up-block stages
   * (see runStages). x: [B, zDim, Tc, H, W] de-normalized latents.
   */
  stem(x: Tensor, cache: CausalCache, traceStep?: (n: string, t: Tensor) => Promise<void>, opts: { stages?: number; first?: boolean } = {}): Promise<Tensor> {
    const e = engineOf(x)!;
    return e.scopeAsync(async () => {
      const pq = this.post_quant_conv.forward(x, cache);
      if (traceStep) await traceStep('post_quant_conv_out', pq);
      let h = this.conv_in.forward(pq, cache);
      if (traceStep) await traceStep('decoder_conv_in_out', h);
      // each sub-block in its own scope, its input freed after it: the working set is one block's
      h = stepScoped(e, h, x, (t) => this.midRes0.forward(t, cache));
      h = stepScoped(e, h, x, (t) => this.midAttn.forward(t));
      h = stepScoped(e, h, x, (t) => this.midRes1.forward(t, cache));
      if (traceStep) await traceStep('decoder_mid_out', h);
      // optionally the first up-block stages too (tiled decode: the low-resolution stages on whole frames)
      return this.runStages(e, 0, opts.stages ?? 0, h, x, cache, opts.first ?? false);
    });
  }

  /**
   * The upsampling part of one decoder call from stage `fromStage` on (only local convolutions: it
   * can run on spatial tiles): the remaining up-block stages, norm_out, SiLU, conv_out. Returns the
   * raw (unclamped) output [B, 3, T', 8H, 8W].
   */
  head(h: Tensor, cache: CausalCache, first: boolean, traceStep?: (n: string, t: Tensor) => Promise<void>, fromStage = 0): Promise<Tensor> {
    const e = engineOf(h)!;
    return e.scopeAsync(async () => {
      const x = await this.runStages(e, fromStage, this.numStages, h, h, cache, first, traceStep);
      return this.conv_out.forward(silu(this.norm_out.forward(x)), cache);
    });
  }

  /** Up-block stages: stage 2i is up block i's resnets, stage 2i + 1 its upsampler (empty if none). */
  get numStages(): number {
    return 2 * this.up_blocks.length;
  }

  /** Runs stages [from, to) on x; frees each intermediate (and x unless it is `input`). */
  private async runStages(e: Engine, from: number, to: number, x: Tensor, input: Tensor, cache: CausalCache, first: boolean, traceStep?: (n: string, t: Tensor) => Promise<void>): Promise<Tensor> {
    for (let s = from; s < to; s++) {
      const ub = this.up_blocks.at(s >> 1);
      if (s % 2 === 0) {
        for (const r of ub.resnets.items) x = stepScoped(e, x, input, (t) => r.forward(t, cache));
      } else if (ub.upsamplers) {
        const up = ub.upsamplers.at(0);
        x = stepScoped(e, x, input, (t) => up.forward(t, cache, first));
      }
      if (traceStep && s % 2 === 1) await traceStep(`decoder_up${s >> 1}_out`, x);
    }
    return x;
  }

  /**
   * Spatial receptive radius of head(fromStage), in latent pixels: every 3×3 convolution adds one
   * pixel at its own scale (ResnetBlock conv1/conv2, the upsampler's conv after the ×2, conv_out);
   * norms are per pixel and the shortcuts and time convs are 1×1 in space. A tile decoded with at
   * least this much context around it equals the untiled decode inside the tile.
   */
  headRadius(fromStage: number): number {
    let r = 0;
    let sc = this.stageScale(fromStage);
    for (let s = fromStage; s < this.numStages; s++) {
      const ub = this.up_blocks.at(s >> 1);
      if (s % 2 === 0) r += (2 * ub.resnets.items.length) / sc;
      else if (ub.upsamplers) {
        sc *= 2;
        r += 1 / sc;
      }
    }
    return r + 1 / sc; // conv_out
  }

  /**
   * Width granularity, in latent pixels, of the decode's cost: the output-resolution convs compute
   * rows in whole workgroups (conv3dWorkColumns), so a region's columns cost this many at a time.
   * The tiled decode plans its column tiles around it.
   */
  get columnQuantum(): number {
    return Math.max(1, Math.round(conv3dWorkColumns(1) / this.stageScale(this.numStages)));
  }

  /** Spatial scale, relative to the latent, of the output of stages [0, s). */
  stageScale(s: number): number {
    let sc = 1;
    for (let i = 1; i < s; i += 2) if (this.up_blocks.at(i >> 1).upsamplers) sc *= 2;
    return sc;
  }

  /**
   * Estimated peak activation bytes (f32) of decoding an h×w latent region with `latentFrames`
   * latent frames per call (`first`: the call holding frame 0, which skips the time convs), either
   * the stem with `stages` up-block stages (part 'stem', the region is the whole frame) or the head
   * from stage `stages` on (part 'head', with the caller's input of the head counted). A model of what
   * the code above keeps alive: the causal caches of every conv in the part (2 frames of its input,
   * they persist across calls) plus the largest transient of one sub-block (stepScoped frees a
   * sub-block's intermediates when it returns: a resnet holds x, norm1, silu1, conv1, norm2, silu2,
   * conv2 and the concat of cache and input at once). Every term is proportional to the region's area,
   * so tiles can be sized against it before decoding. Measured against the allocator on the 1.3B
   * VAE (16×16 latent, 2 latent frames): stem (5 stages) 165.6 vs 166.7 MiB, head on a 9×8 region
   * 84.3 vs 83.9 MiB, on the whole frame 299.7 vs 295.3 MiB (test/tiled-vae.test.ts checks it).
   */
  workingSetBytes(part: 'stem' | 'head', h: number, w: number, stages: number, latentFrames: number, first: boolean): number {
    let A = h * w;
    let T = latentFrames;
    let caches = 0;
    let peak = 0;
    let held = 0;
    const conv3 = (cin: number) => {
      caches += 2 * cin * A;
    };
    const resnet = (cin: number, cout: number) => {
      conv3(cin);
      conv3(cout);
      peak = Math.max(peak, (3 * cin * T + cout * (5 * T + 2) + (cin !== cout ? cout * T : 0)) * A);
    };
    const up0 = this.up_blocks.at(0).resnets.at(0).conv1.cin;
    if (part === 'stem') {
      const z = this.dims.zDim;
      held = z * T * A;
      conv3(z);
      peak = Math.max(peak, (2 * z * T + z * (T + 2) + up0 * T) * A);
      resnet(up0, up0);
      peak = Math.max(peak, 10 * up0 * T * A); // attention: norm, tokens, q, k, v, o, proj, back, + x
      resnet(up0, up0);
    }
    const from = part === 'stem' ? 0 : stages;
    const to = part === 'stem' ? stages : this.numStages;
    for (let s = 0; s < to; s++) {
      const ub = this.up_blocks.at(s >> 1);
      const counted = s >= from;
      if (s === from && part === 'head') held = this.stageChannels(s) * T * A;
      if (s % 2 === 0) {
        if (counted) for (const r of ub.resnets.items) resnet(r.conv1.cin, r.conv1.cout);
      } else if (ub.upsamplers) {
        const u = ub.upsamplers.at(0);
        const c = ub.resnets.at(ub.resnets.items.length - 1).conv1.cout;
        let t2 = T;
        let tr = 0;
        if (u.time_conv) {
          if (counted) conv3(c);
          tr = first ? T - 1 : T;
          t2 = first ? 1 + 2 * (T - 1) : 2 * T;
        }
        // x, time_conv out, its frame interleave, the concat, toFrames; nearest ×2; conv out and fromFrames
        if (counted) peak = Math.max(peak, c * A * (T + 4 * tr + 2 * t2) + c * 4 * A * t2 + (c / 2) * 4 * A * t2 * 2);
        T = t2;
        A *= 4;
      }
    }
    if (part === 'head') {
      const C = this.up_blocks.at(this.up_blocks.length - 1).resnets.at(0).conv1.cout;
      conv3(C);
      peak = Math.max(peak, (3 * C * T + C * (T + 2) + 3 * T) * A);
    }
    return 4 * (caches + peak + held);
  }

  /** Channels entering stage s. */
  private stageChannels(s: number): number {
    const ub = this.up_blocks.at(s >> 1);
    return s % 2 === 0 ? ub.resnets.at(0).conv1.cin : ub.resnets.at(ub.resnets.items.length - 1).conv1.cout;
  }

  /** One decoder call on a chunk [B, zDim, Tc, H, W] of de-normalized latents. */
  private async chunk(x: Tensor, cache: CausalCache, first: boolean, _trace?: Tracer, traceStep?: (n: string, t: Tensor) => Promise<void>): Promise<Tensor> {
    const h = await this.stem(x, cache, traceStep);
    const o = await this.head(h, cache, first, traceStep);
    h.dispose();
    return o;
  }

  /** The latent chunks of a decode: frame 0 alone (first-frame rule), then `per` frames at a time. */
  static chunks(F: number, per: number): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    let f0 = 0;
    while (f0 < F) {
      const f1 = f0 === 0 ? 1 : Math.min(F, f0 + per);
      out.push([f0, f1]);
      f0 = f1;
    }
    return out;
  }

  /**
   * Decode normalized latents z [16, F, H, W] (host f32) into a video [3, 1+4(F−1), 8H, 8W] in
   * [−1, 1] (host f32). Frame 0 first, then `framesPerChunk` latent frames per call.
   * With `trace`, intermediate tensors are reported concatenated over chunks like the goldens.
   */
  async decode(e: Engine, z: Float32Array, shape: [number, number, number, number], opts: VaeDecodeOptions = {}): Promise<{ video: Float32Array; shape: [number, number, number, number]; raw?: Float32Array; nonFinite?: number }> {
    const [C, F, H, W] = shape;
    if (C !== this.dims.zDim) throw new ShapeError(`[wan_vae] latent has ${C} channels, the VAE expects ${this.dims.zDim}`);
    // (the meta device of the memory planner reads no values: the host math is skipped there)
    const per = Math.max(1, opts.framesPerChunk ?? 1);
    // on the meta device the chunks' uploads are zeros of the chunk's size: one array, reused
    const metaPart = e.isMeta ? new Float32Array(C * Math.min(F, per) * H * W) : null;
    const zr = metaPart ? null : this.denormalize(z, C);
    const cache = new CausalCache();
    const chunks: Float32Array[] = [];
    const traces = new Map<string, { parts: Float32Array[]; shape: number[] }>();
    const traceStep = opts.trace
      ? async (name: string, t: Tensor) => {
          const v = (await t.toArray()) as Float32Array;
          let rec = traces.get(name);
          if (!rec) traces.set(name, (rec = { parts: [], shape: [...t.shape] }));
          rec.parts.push(v);
          rec.shape[2] = rec.parts.length === 1 ? t.shape[2]! : rec.shape[2]! + t.shape[2]!;
        }
      : undefined;
    let outT = 0;
    let outHW: [number, number] = [0, 0];
    let bad: Tensor | null = null;
    let nonFinite = 0;
    try {
      let f0 = 0;
      while (f0 < F) {
        const f1 = f0 === 0 ? 1 : Math.min(F, f0 + per);
        const part = zr ? sliceFrames(zr, C, F, H, W, f0, f1) : metaPart!.subarray(0, C * (f1 - f0) * H * W);
        const x = e.fromHost(part, [1, C, f1 - f0, H, W], 'f32', 'activation');
        const out = await this.chunk(x, cache, f0 === 0, opts.trace, traceStep);
        x.dispose();
        if (opts.checkFinite && !e.isMeta) {
          const nx = countNonFinite(out, bad ?? undefined);
          bad?.dispose();
          bad = nx;
        }
        // the memory planner's meta engine (src/plan/) reads nothing back: only the shapes matter
        if (!e.isMeta) chunks.push((await out.toArray()) as Float32Array);
        outT += out.size(2);
        outHW = [out.size(3), out.size(4)];
        out.dispose();
        f0 = f1;
        opts.onChunk?.(f0, F);
      }
      if (bad) nonFinite = (await bad.toArray())[0]!;
    } finally {
      cache.dispose();
      bad?.dispose();
    }
    // chunks are [3, Tc, H', W'] each: concatenate along time
    const [Ho, Wo] = outHW;
    if (e.isMeta) return { video: new Float32Array(0), shape: [3, outT, Ho, Wo] };
    const raw = concatTime(chunks, 3, outT, Ho * Wo);
    if (opts.trace) {
      for (const [name, rec] of traces) {
        const c = rec.shape[1]!;
        const hw = rec.shape[3]! * rec.shape[4]!;
        const cat = concatTime(rec.parts, c, rec.shape[2]!, hw);
        await opts.trace(`vae.${name}`, Tensor.cpu(cat, rec.shape, 'f32'));
      }
      await opts.trace('vae.decoder_raw_out', Tensor.cpu(raw, [1, 3, outT, Ho, Wo], 'f32'));
    }
    const video = new Float32Array(raw.length);
    for (let i = 0; i < raw.length; i++) video[i] = Math.min(1, Math.max(-1, raw[i]!));
    return { video, shape: [3, outT, Ho, Wo], nonFinite };
  }
}

/** frames [f0, f1) of a [C, F, H, W] array */
export function sliceFrames(z: Float32Array, C: number, F: number, H: number, W: number, f0: number, f1: number): Float32Array {
  const hw = H * W;
  const n = f1 - f0;
  const out = new Float32Array(C * n * hw);
  for (let c = 0; c < C; c++) out.set(z.subarray((c * F + f0) * hw, (c * F + f1) * hw), c * n * hw);
  return out;
}

/** concatenate [C, Ti, HW] parts along T */
export function concatTime(parts: Float32Array[], C: number, T: number, hw: number): Float32Array {
  const out = new Float32Array(C * T * hw);
  let t0 = 0;
  for (const p of parts) {
    const Ti = p.length / (C * hw);
    for (let c = 0; c < C; c++) out.set(p.subarray(c * Ti * hw, (c + 1) * Ti * hw), (c * T + t0) * hw);
    t0 += Ti;
  }
  return out;
}
