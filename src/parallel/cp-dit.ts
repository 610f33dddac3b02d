// Context (sequence) parallel Wan DiT forward over N WebGPU devices (docs/context-parallel.md).
//
// Every rank holds a full copy of the DiT's weights (its own WanTransformer3DModel on its own
// Engine) and a contiguous run of every batch element's token rows [r0, r1) (the first L % N ranks
// one row more: exchanges go through host memory, so no all-to-all needs equal chunks and there is
// no padding to mask). Per forward:
//   patchify on the host (the latents are small: C·ph·pw = 64 floats a token) → each rank embeds
//   its rows; each rank computes the time embedding and uploads the RoPE rows of its own tokens.
//   Per block (the block's own pieces: WanAttention.query/key/value, norm2, attn2.attend, ffn):
//     1. self-attention, Ulysses: q/k/v of the rank's rows → all-to-all over heads (rank s gets all
//        L rows of heads [h0, h1), an uneven split when N does not divide H; ranks past H get none)
//        → attention per rank over all keys → all-to-all back → output projection and the gated
//        residual on the rank's rows.
//     2. cross-attention and 3. FFN: local, per token.
//   Head (LN-mod + proj_out, per token) on each rank's rows; the outputs [B, Lr, ph·pw·C_out]
//   (24x smaller than the stream at Wan's D = 1536) are gathered on rank 0 and unpatchified there.
// Exact: every piece is per token row or per (batch, head), so the result equals the one-device
// forward up to the summation order of matmuls that get fewer rows (a different kernel below 32
// rows on llvmpipe: ops/matmul.ts UBO_MIN_M); tests hold it to 1e-5.
//
// Not built here (see the docs): ring attention, the bounded-activation paths (attention chunks;
// the FFN chunks are), block streaming (level 3), step caching, activation offload.

import type { WanTransformer3DModel } from '../models/wan_dit/model.ts';
import { ropeTables } from '../models/wan_dit/host.ts';
import { engineOf, type Engine } from '../runtime/engine.ts';
import type { Tensor } from '../tensor/tensor.ts';
import { dtypeSize } from '../tensor/dtype.ts';
import { attention } from '../ops/attention.ts';
import { sageAttention } from '../ops/attention_sage.ts';
import { linear } from '../ops/matmul.ts';
import { layerNorm } from '../ops/norm.ts';
import { add, gatedResidual } from '../ops/elementwise.ts';
import { permute } from '../ops/layout.ts';
import { ShapeError } from '../util/errors.ts';
import { HostExchange, splitRanges, rowsToHeads, headsToRows, gatherRows, sliceRows, type A2aGeometry } from './exchange.ts';

/** One device of the run: its engine and its copy of the DiT (weights on that engine). */
export interface CpRank {
  engine: Engine;
  dit: WanTransformer3DModel;
}

export interface CpForwardOptions {
  /** FFN over chunks of this many rows of a rank's [B·Lr, D] rows (0 = whole), as the one-device ffnChunkTokens */
  ffnChunkTokens?: number;
  /** called after each block's exchanges (an AbortSignal check, progress) */
  onBlock?: (block: number, blocks: number) => void | Promise<void>;
}

/** Per-device memory peaks, the sidecar's memory.devices entries. */
export interface CpDevicePeak {
  adapter: string;
  peak_allocated_bytes: number;
  peak_reserved_bytes: number;
}

/**
 * Bytes one forward moves through the host (down + up), by the formula the exchanges follow: per
 * block the q/k/v all-to-all (3·B·L·D elements down and up) and the attention output's way back
 * (B·L·D down and up) at the activation dtype; the latents (B·C·F·H·W f32 down from their engine,
 * B·L·C·ph·pw up as token rows); the head's outputs (B·L·P f32 down and up to rank 0). The text
 * context's replication (once per prompt, ContextParallelDit.replicate) is not included.
 */
export function cpForwardBytes(p: { B: number; L: number; D: number; blocks: number; actBytes: number; latentElems: number; tokenRow: number; headRow: number; ranks: number }): { down: number; up: number } {
  const perBlock = 4 * p.B * p.L * p.D * p.actBytes;
  const down = p.blocks * perBlock + p.latentElems * 4 + p.B * p.L * p.headRow * 4;
  const up = p.blocks * perBlock + p.B * p.L * p.tokenRow * 4 + p.B * p.L * p.headRow * 4;
  return { down, up };
}

export class ContextParallelDit {
  readonly exchange: HostExchange;
  private ropeCache: { key: string; cos: Float32Array; sin: Float32Array } | null = null;

  constructor(readonly ranks: CpRank[]) {
    if (ranks.length < 1) throw new ShapeError('[cp_dit] needs at least one rank');
    const d0 = ranks[0]!.dit.dims;
    ranks.forEach((r, i) => {
      const d = r.dit.dims;
      if (d.numHeads !== d0.numHeads || d.headDim !== d0.headDim || d.numLayers !== d0.numLayers || d.ffnDim !== d0.ffnDim) {
        throw new ShapeError(`[cp_dit] rank ${i}'s DiT has other dims than rank 0's; every rank must load the same model`);
      }
    });
    if (new Set(ranks.map((x) => x.engine)).size !== ranks.length) throw new ShapeError('[cp_dit] every rank needs its own engine (device)');
    this.exchange = new HostExchange(ranks.map((r) => r.engine));
  }

  get size(): number {
    return this.ranks.length;
  }

  /** Each rank's peak allocated / reserved bytes since its last resetPeakMemoryStats. */
  devicePeaks(): CpDevicePeak[] {
    return this.ranks.map(({ engine }) => ({
      adapter: engine.adapterName,
      peak_allocated_bytes: engine.allocator.maxMemoryAllocated(),
      peak_reserved_bytes: engine.allocator.maxMemoryReserved(),
    }));
  }

  resetPeaks(): void {
    for (const { engine } of this.ranks) engine.allocator.resetPeakMemoryStats();
  }

  /**
   * A tensor of rank 0 (e.g. the embedded text [B, Lt, D], once per prompt) copied to every rank:
   * [t itself, copies on ranks 1..N-1]. Counted in the exchange stats.
   */
  async replicate(t: Tensor, owner = 'cp.replica'): Promise<Tensor[]> {
    const e0 = this.ranks[0]!.engine;
    if (engineOf(t) !== e0) throw new ShapeError('[cp_dit] replicate: the tensor must live on rank 0');
    if (this.size === 1) return [t];
    const bytes = await this.exchange.download(0, t);
    return [t, ...this.ranks.slice(1).map((_, i) => this.exchange.upload(i + 1, bytes, [...t.shape], t.dtype, owner))];
  }

  private rope(f: number, h: number, w: number): { cos: Float32Array; sin: Float32Array } {
    const d = this.ranks[0]!.dit.dims;
    const key = `${f}x${h}x${w}`;
    if (this.ropeCache?.key !== key) this.ropeCache = { key, ...ropeTables(f, h, w, d.headDim, d.ropeMaxSeqLen) };
    return this.ropeCache;
  }

  /**
   * One forward pass, as WanTransformer3DModel.forward: x latents [B, C, F, H, W] (f32, on any of
   * the ranks' engines, usually rank 0), timestep t, ctx[r] = the embedded text [B, Lt, D] on rank
   * r (replicate). Returns the flow prediction [B, C_out, F, H, W] on rank 0's engine.
   */
  async forward(x: Tensor, t: number, ctx: Tensor[], opts: CpForwardOptions = {}): Promise<Tensor> {
    const N = this.size;
    const dit0 = this.ranks[0]!.dit;
    const dims = dit0.dims;
    const D = dit0.D;
    const Hh = dims.numHeads;
    const Dh = dims.headDim;
    const act = dims.activationDtype ?? 'f32';
    const es = dtypeSize(act);
    if (ctx.length !== N) throw new ShapeError(`[cp_dit] needs the embedded text on each of the ${N} ranks, got ${ctx.length} (use replicate)`);
    ctx.forEach((c, r) => {
      if (engineOf(c) !== this.ranks[r]!.engine) throw new ShapeError(`[cp_dit] ctx[${r}] must live on rank ${r}'s engine`);
    });
    const xe = engineOf(x);
    const xr = this.ranks.findIndex((r) => r.engine === xe);
    if (xr < 0) throw new ShapeError('[cp_dit] the latents must live on one of the ranks\' engines');
    if (x.dtype !== 'f32' || x.rank !== 5) throw new ShapeError(`[cp_dit] latents must be f32 [B, C, F, H, W], got ${x}`);
    const [B, C, F, H, W] = x.shape as [number, number, number, number, number];
    const [pt, ph, pw] = dims.patchSize;
    if (C !== dims.inChannels) throw new ShapeError(`[cp_dit] latents have ${C} channels, the model expects ${dims.inChannels}`);
    if (pt !== 1) throw new ShapeError(`[cp_dit] temporal patch size ${pt} is not supported (Wan 2.1 uses 1)`);
    if (H % ph || W % pw) throw new ShapeError(`[cp_dit] latent [${F}, ${H}, ${W}] is not divisible by the patch size [${pt}, ${ph}, ${pw}]`);
    const f = F;
    const h = H / ph;
    const w = W / pw;
    const L = f * h * w;
    if (L < N) throw new ShapeError(`[cp_dit] ${L} tokens cannot be split over cp_size=${N} devices; use a smaller infer.diffusion.cp_size or a larger video`);
    const rows = splitRanges(L, N);
    const heads = splitRanges(Hh, N);
    const g: A2aGeometry = { B, rows, heads, Dh, elemBytes: es };
    const Cp = C * ph * pw;
    const ex = this.exchange;

    // patchify on the host: token (fi, hi, wi), features (c, i, j) = x[b, c, fi, hi·ph + i, wi·pw + j]
    const xh = new Float32Array((await ex.download(xr, x)).buffer);
    const tok = new Float32Array(B * L * Cp);
    for (let b = 0; b < B; b++) {
      for (let fi = 0; fi < f; fi++) {
        for (let hi = 0; hi < h; hi++) {
          for (let wi = 0; wi < w; wi++) {
            const o = (b * L + (fi * h + hi) * w + wi) * Cp;
            for (let c = 0; c < C; c++) {
              for (let i = 0; i < ph; i++) {
                const src = (((b * C + c) * F + fi) * H + hi * ph + i) * W + wi * pw;
                for (let j = 0; j < pw; j++) tok[o + (c * ph + i) * pw + j] = xh[src + j]!;
              }
            }
          }
        }
      }
    }
    const tokBytes = new Uint8Array(tok.buffer);
    const tabs = this.rope(f, h, w);
    const half = Dh / 2;

    // per rank: its rows of the stream, the time embedding, its RoPE rows
    const state = this.ranks.map(({ engine: e, dit }, r) => {
      const [r0, r1] = rows[r]!;
      const Lr = r1 - r0;
      const tk = ex.upload(r, sliceRows(tokBytes, B, L, r0, r1, Cp * 4), [B, Lr, Cp], 'f32', 'cp.tokens');
      const hs = e.scope(() => linear(tk, dit.patchWeight.t.reshape([D, Cp]), { bias: dit.patchBias.t })); // [B, Lr, D]
      tk.dispose();
      const { e: emb, e0 } = e.scope(() => dit.embedTime(e, t)); // [1, D], [6, D]
      const cos = e.fromHost(tabs.cos.subarray(r0 * half, r1 * half), [Lr, half], 'f32', 'cp.rope');
      const sin = e.fromHost(tabs.sin.subarray(r0 * half, r1 * half), [Lr, half], 'f32', 'cp.rope');
      return { e, dit, Lr, hs, emb, e0, cos, sin };
    });

    const n = dit0.blocks.length;
    const ffnChunk = opts.ffnChunkTokens ?? 0;
    if (!Number.isInteger(ffnChunk) || ffnChunk < 0) throw new ShapeError(`[cp_dit] ffnChunkTokens must be an integer >= 0 (0 = whole), got ${ffnChunk}`);
    const scale = 1 / Math.sqrt(Dh);
    const kind = dims.attention ?? 'sdpa';
    for (let i = 0; i < n; i++) {
      // 1a. per rank: modulation, LN-mod, q / k / v of its rows [B, Lr, H, Dh] (RoPE on its rows)
      const pre = state.map((s) =>
        s.e.scope(() => {
          const blk = s.dit.blocks.at(i);
          const m = add(blk.scale_shift_table.t.reshape([6, D]), s.e0); // [6, D]
          const mod = Array.from({ length: 6 }, (_, k) => s.e.bindable(m.select0(k)));
          const h1 = layerNorm({ x: s.hs, shift: mod[0]!, scale: mod[1]! }, { eps: dims.eps });
          const rc = { cos: s.cos, sin: s.sin };
          return { mod, q: blk.attn1.query(h1, rc, act), k: blk.attn1.key(h1, rc, act), v: blk.attn1.value(h1, act) };
        }),
      );
      // 1b. all-to-all: rank s gets all rows of its heads [B, L, Hs, Dh]
      const headShape = (s: number) => (heads[s]![1] > heads[s]![0] ? [B, L, heads[s]![1] - heads[s]![0], Dh] : null);
      const shapes = state.map((_, s) => headShape(s));
      const a2a = async (pick: (p: (typeof pre)[number]) => Tensor) => {
        const src = pre.map(pick);
        const out = await ex.exchange(src, (parts) => rowsToHeads(parts, g), shapes, act, 'cp.a2a');
        for (const t of src) t.dispose();
        return out;
      };
      const qh = await a2a((p) => p.q);
      const kh = await a2a((p) => p.k);
      const vh = await a2a((p) => p.v);
      // 1c. attention of each rank's heads over all keys [B, L, Hs, Dh]
      const oh = state.map((s, r) => {
        const q = qh[r];
        if (!q) return null;
        const o = s.e.scope(() => (kind === 'sage' ? sageAttention({ q, k: kh[r]!, v: vh[r]! }, { scale }) : attention({ q, k: kh[r]!, v: vh[r]! }, { scale })));
        for (const tt of [q, kh[r]!, vh[r]!]) tt.dispose();
        return o;
      });
      // 1d. back to the rows' owners [B, Lr, H, Dh], output projection, gated residual
      const back = await ex.exchange(oh, (parts) => headsToRows(parts, g), state.map((s) => [B, s.Lr, Hh, Dh]), act, 'cp.a2a');
      for (const o of oh) o?.dispose();
      state.forEach((s, r) => {
        const blk = s.dit.blocks.at(i);
        const mod = pre[r]!.mod;
        const o = back[r]!;
        const old = s.hs;
        s.hs = s.e.scope(() => {
          const y1 = blk.attn1.to_out.at(0).forward(o.reshape([B, s.Lr, D]), 'none', 'f32');
          const x1 = gatedResidual({ x: s.hs, r: y1, gate: mod[2]! }, {});
          // 2. cross-attention over all text rows, no gate: x += attn2(LN_affine(x), ctx)
          const k2 = blk.attn2.key(ctx[r]!, null, act);
          const v2 = blk.attn2.value(ctx[r]!, act);
          const q2 = blk.attn2.query(blk.norm2.forward(x1), null, act);
          const x2 = add(x1, blk.attn2.attend(q2, k2, v2));
          // 3. FFN: x += ffn(LN(x)·(1+scale_ffn) + shift_ffn) · gate_ffn, per token (chunks of rows)
          const flat = x2.reshape([B * s.Lr, D]);
          const rowsAll = B * s.Lr;
          const c = ffnChunk > 0 ? ffnChunk : rowsAll;
          const outs: Tensor[] = [];
          for (let a = 0; a < rowsAll; a += c) {
            const xr = flat.narrow0(a, Math.min(rowsAll, a + c));
            const y3 = blk.ffn.forward(layerNorm({ x: xr, shift: mod[3]!, scale: mod[4]! }, { eps: dims.eps }), act);
            outs.push(gatedResidual({ x: xr, r: y3, gate: mod[5]! }, {}));
          }
          const x3 = outs.length === 1 ? outs[0]! : s.e.empty([rowsAll, D], 'f32', 'cp.stream');
          if (outs.length > 1) {
            let off = 0;
            for (const t3 of outs) {
              s.e.copyBuffer(t3.buffer, t3.byteOffset, x3.buffer, x3.byteOffset + off, t3.nbytes);
              off += t3.nbytes;
            }
          }
          return x3.reshape([B, s.Lr, D]);
        });
        old.dispose();
        o.dispose();
        for (const t2 of mod) t2.dispose();
      });
      await Promise.all(state.map((s) => s.e.throttle()));
      if (opts.onBlock) await opts.onBlock(i, n);
    }

    // head per rank: (scale_shift_table[0] + e) -> shift, scale; proj_out(LN(x)·(1+scale) + shift)
    const P = ph * pw * dims.outChannels;
    const heads0 = state.map((s) =>
      s.e.scope(() => {
        const mh = add(s.dit.scale_shift_table.t.reshape([2, D]), s.emb); // [2, D]
        const hn = layerNorm({ x: s.hs, shift: s.e.bindable(mh.select0(0)), scale: s.e.bindable(mh.select0(1)) }, { eps: dims.eps });
        return s.dit.proj_out.forward(hn); // [B, Lr, P]
      }),
    );
    for (const s of state) for (const tt of [s.hs, s.emb, s.e0, s.cos, s.sin]) tt.dispose();
    const [out] = await ex.exchange(
      heads0,
      (parts) => [gatherRows(parts, rows, B, P * 4)],
      state.map((_, s) => (s === 0 ? [B, L, P] : null)),
      'f32',
      'cp.head',
    );
    for (const tt of heads0) tt.dispose();
    const e0 = this.ranks[0]!.engine;
    return e0.scope(() => {
      // unpatchify: [B, f, h, w, ph, pw, C] -> [B, C, f, h, ph, w, pw]
      const Co = dims.outChannels;
      const u = permute(out!.reshape([B, f * h, w, ph, pw, Co]), [0, 5, 1, 3, 2, 4]);
      out!.dispose();
      return u.reshape([B, Co, F, H, W]);
    });
  }
}
