// Context (sequence) parallel Wan DiT forward over N WebGPU devices (docs/context-parallel.md).
//
// Every rank has its own WanTransformer3DModel on its own Engine (all weights there, or its blocks
// streamed / sharded: CpRank.residency) and a contiguous run of every batch element's token rows
// [r0, r1) (the first L % N ranks one row more: exchanges go through host memory, so no all-to-all needs equal chunks and there is
// no padding to mask). Per forward:
//   patchify on the host (the latents are small: C·ph·pw = 64 floats a token) → each rank embeds
//   its rows; each rank computes the time embedding and uploads the RoPE rows of its own tokens.
//   Per block (the block's own pieces: WanAttention.query/key/value, norm2, attn2.attend, ffn):
//     1. self-attention, Ulysses: q/k/v of the rank's rows → all-to-all over heads (rank s gets all
//        L rows of heads [h0, h1), an uneven split when N does not divide H; ranks past H get none)
//        → attention per rank over all keys → all-to-all back → output projection and the gated
//        residual on the rank's rows. Or the ring (ring.ts, infer.diffusion.cp_attention; auto when N
//        does not divide H): each rank keeps its rows' q, the K/V chunks pass around, exact LSE merges.
//     2. cross-attention and 3. FFN: local, per token.
//   Head (LN-mod + proj_out, per token) on each rank's rows; the outputs [B, Lr, ph·pw·C_out]
//   (24x smaller than the stream at Wan's D = 1536) are gathered on rank 0 and unpatchified there.
// Exact: every piece is per token row or per (batch, head), so the result equals the one-device
// forward up to the summation order of matmuls that get fewer rows (a different kernel below 32
// rows on llvmpipe: ops/matmul.ts UBO_MIN_M); tests hold it to 1e-5.
//
// Levels 1-2 (the one-device forward's activation bounds, same options): the batch elements in
// turn inside each block (cfgSequential: the all-to-alls then move one element at a time), row
// chunks for the projections / attentions (attnChunkTokens) and the FFN (ffnChunkTokens); the stream
// is updated in place (a rank under 32 rows keeps the batch together: the kernel would change, as
// in model.ts MIN_CALL_ROWS). Level 3 / sharded weights: a rank with a `residency` acquires each block's
// weights before running it (pipeline-cp.ts builds one streaming ring per device).
// Step caching: per-rank hooks (cp-cache.ts). Not built here (see the docs): activation offload.

import { MIN_CALL_ROWS, chunkTokens, rowRanges, type WanTransformer3DModel, type DitStepCache } from '../models/wan_dit/model.ts';
import { ropeTables } from '../models/wan_dit/host.ts';
import { engineOf, type Engine } from '../runtime/engine.ts';
import type { Tensor } from '../tensor/tensor.ts';
import { dtypeSize, type DType } from '../tensor/dtype.ts';
import { RESIDENT, type BlockResidency } from '../nn/residency.ts';
import type { StreamedBlocks } from '../pipeline/residency.ts';
import { attention } from '../ops/attention.ts';
import { sageAttention } from '../ops/attention_sage.ts';
import { linear } from '../ops/matmul.ts';
import { layerNorm } from '../ops/norm.ts';
import { add, gatedResidual } from '../ops/elementwise.ts';
import { permute } from '../ops/layout.ts';
import { ShapeError } from '../util/errors.ts';
import { HostExchange, splitRanges, type ExchangePath, rowsToHeadsShuffle, headsToRowsShuffle, gatherShuffle, sliceRows, type A2aGeometry } from './exchange.ts';
import { ringAttention, useRing, type CpAttention } from './ring.ts';
import { cpStepPlan, cpStepFinish } from './cp-cache.ts';

/**
 * One device of the run: its engine and its copy of the DiT (non-block weights on that engine).
 * Without `residency` every block's weights are on the engine too; with it, the forward acquires
 * block i there (model block numbers) before running it and prefetches the next, as the one-device
 * forward does at level 3 (pipeline-cp.ts: each device streams its own blocks, or keeps its shard).
 */
export interface CpRank {
  engine: Engine;
  dit: WanTransformer3DModel;
  residency?: BlockResidency;
  /** the rank's streaming ring behind `residency` (its upload statistics; freed with the rank) */
  ring?: StreamedBlocks;
}

export interface CpForwardOptions {
  /** FFN over chunks of this many rows of a rank's [B·Lr, D] rows (0 = whole), as the one-device ffnChunkTokens */
  ffnChunkTokens?: number;
  /** inside each block, batch element 0, then 1 (CFG: cond, then uncond), as the one-device cfgSequential */
  cfgSequential?: boolean;
  /**
   * attention chunks, as the one-device attnChunkTokens: q / k / v projections, the output projection
   * and the cross-attention over chunks of this many of a rank's rows (when below its row count),
   * and the self-attention over chunks of this many query rows of all L (0 = whole)
   */
  attnChunkTokens?: number;
  /** self-attention (infer.diffusion.cp_attention, ring.ts useRing): 'ulysses' (the default here), 'ring', or 'auto' (the ring when the head count does not divide N) */
  attention?: CpAttention;
  /** called after each block's exchanges (an AbortSignal check, progress) */
  onBlock?: (block: number, blocks: number) => void | Promise<void>;
  /** step caching: one hook per rank, rank 0's deciding (StepPlan.cpHooks; cp-cache.ts) */
  stepCache?: DitStepCache[];
}

/** Per-device memory peaks, the sidecar's memory.devices entries. */
export interface CpDevicePeak {
  adapter: string;
  peak_allocated_bytes: number;
  peak_reserved_bytes: number;
  /** a device streaming its blocks (level 3, or its weight shard): the bytes it uploaded from the host copy during the request's denoise */
  uploaded_bytes?: number;
}

/**
 * Bytes one forward moves through the host (down + up), by the formula the exchanges follow, and the
 * bytes the devices copy for themselves (`local`): per block the q/k/v all-to-all (3·B·L·D elements)
 * and the attention output's way back (B·L·D) at the activation dtype; the latents (B·C·F·H·W f32
 * down from their engine, B·L·C·ph·pw up as token rows); the head's outputs (B·L·P f32 to rank 0).
 * On the mapped path (the default, exchange.ts) a rank's own part of every exchange stays on its GPU:
 * of the all-to-alls the rows r keeps of its own heads, Σ_r B·Lr·Hr·Dh elements each way, and of the
 * head gather rank 0's rows; on the copy path every byte crosses the host. The text context's
 * replication (once per prompt, ContextParallelDit.replicate) is not included.
 */
export function cpForwardBytes(p: {
  B: number;
  L: number;
  D: number;
  /** attention heads (D = heads · Dh): how the all-to-all splits them */
  heads: number;
  blocks: number;
  actBytes: number;
  latentElems: number;
  tokenRow: number;
  headRow: number;
  ranks: number;
  path?: ExchangePath;
}): { down: number; up: number; local: number } {
  const mapped = (p.path ?? 'mapped') === 'mapped';
  const rows = splitRanges(p.L, p.ranks);
  const heads = splitRanges(p.heads, p.ranks);
  const Dh = p.D / p.heads;
  const ownA2a = mapped ? rows.reduce((a, [r0, r1], r) => a + (r1 - r0) * (heads[r]![1] - heads[r]![0]), 0) * p.B * Dh * p.actBytes : 0;
  const ownHead = mapped ? (rows[0]![1] - rows[0]![0]) * p.B * p.headRow * 4 : 0;
  const perBlock = 4 * p.B * p.L * p.D * p.actBytes - 4 * ownA2a;
  const down = p.blocks * perBlock + p.latentElems * 4 + p.B * p.L * p.headRow * 4 - ownHead;
  const up = p.blocks * perBlock + p.B * p.L * p.tokenRow * 4 + p.B * p.L * p.headRow * 4 - ownHead;
  return { down, up, local: p.blocks * 4 * ownA2a + ownHead };
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

  /** Bytes each rank's streaming ring uploaded since resetUploadStats (0 for a rank holding every block). */
  uploadBytes(): number[] {
    return this.ranks.map((r) => r.ring?.stats.bytes ?? 0);
  }

  resetUploadStats(): void {
    for (const r of this.ranks) r.ring?.resetStats();
  }

  /** Give every rank's streamed blocks' device side back (after an interrupted forward; the next one allocates it again). */
  releaseStreams(): void {
    for (const r of this.ranks) r.ring?.releaseDevice();
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
    const ffnChunk = chunkTokens('ffnChunkTokens', opts.ffnChunkTokens, 'cp_dit');
    const attnChunk = chunkTokens('attnChunkTokens', opts.attnChunkTokens, 'cp_dit');
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
    // step caching (cp-cache.ts): which rows run how many blocks; every row runs them (the hooks put
    // skipped rows back to their input), none when no row runs
    const cache = await cpStepPlan(opts.stepCache, state, B, n);
    // the one-device forward's activation bounds (model.ts DitForwardOptions): the batch elements
    // (CFG: cond, uncond) one after the other inside each block, and row chunks; the all-to-alls then
    // move one element's rows at a time
    // (as the one-device forward runs a stream under MIN_CALL_ROWS tokens unbounded: a rank with fewer
    // rows would run one element's matmuls on another kernel than the whole batch's)
    const fewRows = rows.some(([a, b]) => b - a < MIN_CALL_ROWS);
    const groups: Array<[number, number]> = opts.cfgSequential && B > 1 && !fewRows ? Array.from({ length: B }, (_, b) => [b, 1]) : [[0, B]];
    const scale = 1 / Math.sqrt(Dh);
    const kind = dims.attention ?? 'sdpa';
    const ring = useRing(opts.attention ?? 'ulysses', N, Hh, kind); // infer.diffusion.cp_attention (ring.ts)
    const res = this.ranks.map((r) => r.residency ?? RESIDENT);
    for (let i = 0; i < cache.blocks; i++) {
      // the block's weights on every rank (a streamed rank's next block uploads behind this one)
      await Promise.all(res.map((x) => x.acquire(i)));
      if (i + 1 < cache.blocks) for (const x of res) x.prefetch(i + 1);
      // per rank: modulation rows shift/scale/gate (msa), shift/scale/gate (ffn), each [D]; the
      // cross-attention k / v of all batch elements' text rows in one call each (the rows of the
      // one-device call whatever the grouping, as model.ts does)
      const blockIn = state.map((s, r) =>
        s.e.scope(() => {
          const blk = s.dit.blocks.at(i);
          const m = add(blk.scale_shift_table.t.reshape([6, D]), s.e0); // [6, D]
          return { mod: Array.from({ length: 6 }, (_, k) => s.e.bindable(m.select0(k))), k2: blk.attn2.key(ctx[r]!, null, act), v2: blk.attn2.value(ctx[r]!, act) };
        }),
      );
      const mods = blockIn.map((x) => x.mod);
      for (const [b0, nb] of groups) {
        const g: A2aGeometry = { B: nb, rows, heads, Dh, elemBytes: es };
        // 1a. per rank: q / k / v of its rows of the group's elements [nb, Lr, H, Dh] (RoPE on its rows; row chunks when bounded)
        const pre: Array<{ q: Tensor; k: Tensor; v: Tensor }> = [];
        for (const [r, s] of state.entries()) pre.push(await qkvRows(s, s.dit.blocks.at(i).attn1, mods[r]!, b0, nb, attnChunk, dims.eps, act));
        // 1b-1d. self-attention over all L keys → back[r] = the output of rank r's rows [nb, Lr, H, Dh]:
        // by the ring (ring.ts: each rank keeps its queries, the K/V chunks pass around, exact LSE
        // merges) or by Ulysses (all-to-all over heads and back)
        let back: Array<Tensor | null>;
        if (ring) back = await ringAttention(ex, pre.map((p) => p.q), pre.map((p) => p.k), pre.map((p) => p.v), { scale, out: act });
        else {
          // 1b. all-to-all: rank s gets all rows of its heads [nb, L, Hs, Dh]
          const headShape = (s: number) => (heads[s]![1] > heads[s]![0] ? [nb, L, heads[s]![1] - heads[s]![0], Dh] : null);
          const shapes = state.map((_, s) => headShape(s));
          // (consumed: each rank's q / k / v goes once its bytes are staged, before the heads arrive)
          const a2a = (pick: (p: (typeof pre)[number]) => Tensor) => ex.exchange(pre.map(pick), rowsToHeadsShuffle(g), shapes, act, 'cp.a2a', { consume: true });
          const qh = await a2a((p) => p.q);
          const kh = await a2a((p) => p.k);
          const vh = await a2a((p) => p.v);
          // 1c. attention of each rank's heads over all keys [nb, L, Hs, Dh] (query chunks when bounded)
          const oh: Array<Tensor | null> = [];
          for (const [r, s] of state.entries()) {
            const q = qh[r];
            if (!q) {
              oh.push(null);
              continue;
            }
            const attend = (qq: Tensor, kk: Tensor, vv: Tensor) => (kind === 'sage' ? sageAttention({ q: qq, k: kk, v: vv }, { scale }) : attention({ q: qq, k: kk, v: vv }, { scale }));
            const o = await attendChunked(s.e, q, kh[r]!, vh[r]!, attnChunk, attend);
            oh.push(o);
            for (const tt of [q, kh[r]!, vh[r]!]) if (tt !== o) tt.dispose();
          }
          // 1d. back to the rows' owners [nb, Lr, H, Dh]
          back = await ex.exchange(oh, headsToRowsShuffle(g), state.map((s) => [nb, s.Lr, Hh, Dh]), act, 'cp.a2a');
          for (const o of oh) o?.dispose();
        }
        // 1e. output projection and gated residual, 2. cross-attention, 3. FFN: on each rank's rows of
        // the group, in place in its stream (row chunks when bounded)
        for (const [r, s] of state.entries()) {
          await blockRest(s, s.dit.blocks.at(i), mods[r]!, back[r]!, blockIn[r]!.k2, blockIn[r]!.v2, b0, nb, { attnChunk, ffnChunk, eps: dims.eps, act });
          back[r]!.dispose();
        }
      }
      state.forEach((s, r) => {
        res[r]!.release(i);
        for (const t2 of [...mods[r]!, blockIn[r]!.k2, blockIn[r]!.v2]) t2.dispose();
      });
      await Promise.all(state.map((s) => s.e.throttle()));
      if (opts.onBlock) await opts.onBlock(i, n);
    }

    await cpStepFinish(opts.stepCache, state, cache.plan);

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
      gatherShuffle(rows, B, P * 4),
      state.map((_, s) => (s === 0 ? [B, L, P] : null)),
      'f32',
      'cp.head',
    );
    for (const tt of heads0) tt.dispose();
    ex.releaseStaging(); // the exchanges' readback buffers (outside the allocators) until the next forward
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

// ---- the block's pieces on one rank (ContextParallelDit.forward's block loop)

/** One rank's part of a forward: its engine and DiT, its rows, its stream [B, Lr, D] (updated in place), time embeddings, RoPE rows. */
interface RankState {
  e: Engine;
  dit: WanTransformer3DModel;
  Lr: number;
  hs: Tensor;
  emb: Tensor;
  e0: Tensor;
  cos: Tensor;
  sin: Tensor;
}

type DitBlock = ReturnType<WanTransformer3DModel['blocks']['at']>;

/** Copy src into dst at `byteOffset` bytes into it and free src (a chunk's result into a whole tensor or the stream, in place). */
function putBytes(e: Engine, dst: Tensor, byteOffset: number, src: Tensor): void {
  e.copyBuffer(src.buffer, src.byteOffset, dst.buffer, dst.byteOffset + byteOffset, src.nbytes);
  src.dispose();
}

/**
 * q / k / v [nb, Lr, H, Dh] of batch elements [b0, b0 + nb) of the rank's rows: LN-mod, the
 * projections with their RMSNorm, RoPE with the rank's tables. With `chunk` (< Lr) over row chunks
 * of each element, written into the whole tensors (only one chunk's intermediates at a time).
 */
async function qkvRows(s: RankState, a: DitBlock['attn1'], mod: Tensor[], b0: number, nb: number, chunk: number, eps: number, act: DType): Promise<{ q: Tensor; k: Tensor; v: Tensor }> {
  const { e, Lr } = s;
  const D = s.hs.shape[2]!;
  if (!(chunk > 0 && chunk < Lr)) {
    return e.scope(() => {
      const h1 = layerNorm({ x: s.hs.narrow0(b0, b0 + nb), shift: mod[0]!, scale: mod[1]! }, { eps });
      const rc = { cos: s.cos, sin: s.sin };
      return { q: a.query(h1, rc, act), k: a.key(h1, rc, act), v: a.value(h1, act) };
    });
  }
  const es = dtypeSize(act);
  const shape = [nb, Lr, a.heads, D / a.heads];
  const out = { q: e.empty(shape, act, 'cp.qkv'), k: e.empty(shape, act, 'cp.qkv'), v: e.empty(shape, act, 'cp.qkv') };
  for (let b = 0; b < nb; b++) {
    for (const [i0, i1] of rowRanges(Lr, chunk)) {
      e.scope(() => {
        const xr = e.bindable(s.hs.select0(b0 + b).narrow0(i0, i1).reshape([1, i1 - i0, D]));
        const cs = { cos: e.bindable(s.cos.narrow0(i0, i1)), sin: e.bindable(s.sin.narrow0(i0, i1)) };
        const h = layerNorm({ x: xr, shift: mod[0]!, scale: mod[1]! }, { eps });
        const off = (b * Lr + i0) * D * es;
        putBytes(e, out.q, off, a.query(h, cs, act));
        putBytes(e, out.k, off, a.key(h, cs, act));
        putBytes(e, out.v, off, a.value(h, act));
      });
      await e.throttle();
    }
  }
  return out;
}

/**
 * Attention of q [nb, L, Hs, Dh] over k, v [nb, L, Hs, Dh] (all keys of the rank's heads): whole,
 * or (chunk < L) per batch element over chunks of query rows, each chunk's output written over its
 * own query rows (a chunk's queries are read by its attention only, which queue order puts before
 * the copy), so the chunked output is q's buffer: returned as q itself (no second [nb, L, Hs, Dh]).
 */
async function attendChunked(e: Engine, q: Tensor, k: Tensor, v: Tensor, chunk: number, attend: (q: Tensor, k: Tensor, v: Tensor) => Tensor): Promise<Tensor> {
  const [nb, L, Hs, Dh] = q.shape as [number, number, number, number];
  if (!(chunk > 0 && chunk < L)) return e.scope(() => attend(q, k, v));
  let o: Tensor | null = null;
  // (the output's dtype is the queries': attention and sage attention give the activation dtype)
  for (let b = 0; b < nb; b++) {
    const kb = nb > 1 ? e.bindable(k.narrow0(b, b + 1)) : k;
    const vb = nb > 1 ? e.bindable(v.narrow0(b, b + 1)) : v;
    for (const [j0, j1] of rowRanges(L, chunk)) {
      e.scope(() => {
        const qc = e.bindable(q.select0(b).narrow0(j0, j1).reshape([1, j1 - j0, Hs, Dh]));
        const y = attend(qc, kb, vb);
        if (y.dtype !== q.dtype) throw new ShapeError(`[cp_dit] the attention gave ${y.dtype} for ${q.dtype} queries`);
        o = q;
        putBytes(e, o, (b * L + j0) * Hs * Dh * dtypeSize(y.dtype), y);
      });
      await e.throttle();
    }
    if (nb > 1) {
      kb.dispose();
      vb.dispose();
    }
  }
  return o!;
}

/**
 * The rest of a block on batch elements [b0, b0 + nb) of one rank's rows, in place in its stream:
 * the self-attention's output projection and gated residual (o = the attention output [nb, Lr, H,
 * Dh] back from the all-to-all), the cross-attention over the element's text rows (k2 / v2 [B, Lt,
 * H, Dh], no gate), the FFN with its gate. Row chunks of the rank's rows when bounded (attnChunk for
 * the attentions, ffnChunk for the FFN).
 */
async function blockRest(
  s: RankState,
  blk: DitBlock,
  mod: Tensor[],
  o: Tensor,
  k2: Tensor,
  v2: Tensor,
  b0: number,
  nb: number,
  c: { attnChunk: number; ffnChunk: number; eps: number; act: DType },
): Promise<void> {
  const { e, Lr } = s;
  const D = s.hs.shape[2]!;
  const rowsAll = nb * Lr;
  const attnChunk = c.attnChunk > 0 && c.attnChunk < Lr ? c.attnChunk : 0;
  const xs = s.hs.narrow0(b0, b0 + nb); // [nb, Lr, D], a view: updates land in the stream
  const rowsX = xs.reshape([rowsAll, D]);
  const oFlat = o.reshape([rowsAll, D]);
  // 1e. x += to_out(o) · gate_msa
  for (const [r0, r1] of rowRanges(rowsAll, attnChunk)) {
    e.scope(() => {
      const y1 = blk.attn1.to_out.at(0).forward(e.bindable(oFlat.narrow0(r0, r1)), 'none', 'f32');
      putBytes(e, rowsX, r0 * D * 4, gatedResidual({ x: e.bindable(rowsX.narrow0(r0, r1)), r: y1, gate: mod[2]! }, {}));
    });
    await e.throttle();
  }
  // 2. cross-attention over all text rows, no gate: x += attn2(LN_affine(x), ctx)
  if (attnChunk === 0) {
    e.scope(() => {
      const kg = e.bindable(k2.narrow0(b0, b0 + nb));
      const vg = e.bindable(v2.narrow0(b0, b0 + nb));
      const q2 = blk.attn2.query(blk.norm2.forward(xs), null, c.act);
      putBytes(e, xs, 0, add(xs, blk.attn2.attend(q2, kg, vg)));
    });
  } else {
    for (let b = b0; b < b0 + nb; b++) {
      const kb = e.bindable(k2.narrow0(b, b + 1));
      const vb = e.bindable(v2.narrow0(b, b + 1));
      for (const [i0, i1] of rowRanges(Lr, attnChunk)) {
        e.scope(() => {
          const xr = e.bindable(s.hs.select0(b).narrow0(i0, i1).reshape([1, i1 - i0, D]));
          const q2 = blk.attn2.query(blk.norm2.forward(xr), null, c.act);
          putBytes(e, s.hs, (b * Lr + i0) * D * 4, add(xr, blk.attn2.attend(q2, kb, vb)));
        });
        await e.throttle();
      }
      kb.dispose();
      vb.dispose();
    }
  }
  await e.throttle();
  // 3. FFN: x += ffn(LN(x)·(1+scale_ffn) + shift_ffn) · gate_ffn, per token (chunks of the group's rows)
  for (const [r0, r1] of rowRanges(rowsAll, c.ffnChunk)) {
    e.scope(() => {
      const xr = e.bindable(rowsX.narrow0(r0, r1));
      const y3 = blk.ffn.forward(layerNorm({ x: xr, shift: mod[3]!, scale: mod[4]! }, { eps: c.eps }), c.act);
      putBytes(e, rowsX, r0 * D * 4, gatedResidual({ x: xr, r: y3, gate: mod[5]! }, {}));
    });
    await e.throttle();
  }
  for (const t of [oFlat, rowsX, xs]) t.dispose();
}
