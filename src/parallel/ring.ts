// Ring attention: the self-attention of a context-parallel DiT block (src/parallel/cp-dit.ts) by
// passing K/V chunks around the ranks instead of an all-to-all over heads (docs/context-parallel.md,
// "Ring attention"). Ulysses needs the head count to divide N for balanced work (12 heads on 5
// devices: 3/3/2/2/2, the busiest does 3 heads); the ring splits the work by rows, whatever N.
//
// Rank r holds q, k, v of its rows [B, Lr, H, Dh] (all heads). Pass 0: its queries against its own
// keys (attention_lse: the normalized output and each row's log-sum-exp). Pass p = 1 .. N-1: the K/V
// chunk of rank (r - p) mod N arrives, the LSE attention of the same queries against it, and the
// exact online-softmax merge with what the rank has (attention_merge; the last merge writes the
// output [B, Lr, H, Dh] in the activation dtype). The attention output never moves: it is already on
// the rows' owner, which applies the output projection.
//
// Dawn gives the devices no shared memory, so the ring goes through the host (HostExchange): every
// rank's K and V are read back once per block, and the host uploads chunk (r - p) mod N to rank r for
// pass p — the host is the ring's relay, so a chunk is read once rather than once per hop (a device
// ring would forward it N-1 times). All N-1 passes are queued at once and each rank's pass is
// submitted as soon as it is encoded: nothing waits between passes, so the devices compute pass p
// while the main thread copies the chunks of later passes (writeBuffer); one wait per block (the
// readback). Each device holds its own K/V and one arriving chunk (freed once its attention is queued).
//
// Bytes per block (f = the activation dtype's size): down 2·B·L·D·f (every rank's K and V once),
// up (N-1)·2·B·L·D·f (each rank receives the other ranks' K and V) — per rank (N-1)·2·B·(L/N)·D·f.
// Ulysses moves 4·B·L·D·f each way, so the ring moves fewer bytes up for N <= 3 and fewer down always.

import type { Tensor } from '../tensor/tensor.ts';
import type { DType } from '../tensor/dtype.ts';
import { dtypeSize } from '../tensor/dtype.ts';
import { attentionLse, attentionMerge } from '../ops/attention_lse.ts';
import { ShapeError } from '../util/errors.ts';
import type { HostExchange } from './exchange.ts';
import { cpForwardBytes } from './cp-dit.ts';

/** infer.diffusion.cp_attention: how the self-attention of a CP forward runs. */
export type CpAttention = 'auto' | 'ulysses' | 'ring';
export const CP_ATTENTION_MODES: readonly CpAttention[] = ['auto', 'ulysses', 'ring'];

/**
 * Whether a forward over N ranks runs the ring: 'auto' when the head count does not divide N (then
 * Ulysses would split the heads unevenly), 'ring' always (N > 1), 'ulysses' never. The ring computes
 * exact attention, so with the quantized one (infer.attention=sage) 'auto' keeps Ulysses and 'ring'
 * is refused.
 */
export function useRing(mode: CpAttention | undefined, N: number, heads: number, kind: string = 'sdpa'): boolean {
  const m = mode ?? 'auto';
  if (!CP_ATTENTION_MODES.includes(m)) throw new ShapeError(`[cp_dit] attention must be one of ${CP_ATTENTION_MODES.join(', ')} (infer.diffusion.cp_attention), got '${String(mode)}'`);
  if (N <= 1 || m === 'ulysses') return false;
  if (kind === 'sage') {
    if (m === 'ring') throw new ShapeError("[cp_dit] infer.diffusion.cp_attention=ring runs exact attention, not infer.attention=sage; use cp_attention=auto or ulysses (Ulysses runs the quantized attention per head), or infer.attention=sdpa");
    return false;
  }
  return m === 'ring' || heads % N !== 0;
}

/** The pipeline's load-time check of infer.diffusion.cp_attention: a one-line refusal, or null. */
export function cpAttentionRefusal(mode: CpAttention, cpSize: number, attention: string): string | null {
  if (cpSize > 1 && mode === 'ring' && attention === 'sage') return 'infer.diffusion.cp_attention=ring runs exact attention, not infer.attention=sage; use cp_attention=auto or ulysses (Ulysses runs the quantized attention per head), or infer.attention=sdpa';
  return null;
}

/**
 * Bytes one forward with ring self-attention moves through the host: cpForwardBytes' latents, token
 * rows and head gather, and per block the ring's K/V relay (see the file comment) instead of the
 * Ulysses all-to-alls.
 */
export function ringForwardBytes(p: Parameters<typeof cpForwardBytes>[0]): { down: number; up: number; local: number } {
  const rest = cpForwardBytes({ ...p, blocks: 0 });
  const kv = 2 * p.B * p.L * p.D * p.actBytes; // every rank's K and V, once
  return { down: rest.down + p.blocks * kv, up: rest.up + p.blocks * (p.ranks - 1) * kv, local: rest.local };
}

export interface RingOptions {
  /** multiplier of q·k (1/sqrt(Dh)) */
  scale: number;
  /** dtype of the output (the activation dtype) */
  out: DType;
  /** allocator owner tag of the uploaded chunks */
  owner?: string;
}

/**
 * Ring self-attention over the ranks of `ex`: q[r], k[r], v[r] = rank r's rows [B, Lr, H, Dh] (on
 * engine r; Lr may differ between ranks). Returns out[r] = rank r's rows of the attention over all
 * L keys [B, Lr, H, Dh] in `o.out`, on engine r. Consumes (disposes) q, k and v.
 */
export async function ringAttention(ex: HostExchange, q: Tensor[], k: Tensor[], v: Tensor[], o: RingOptions): Promise<Tensor[]> {
  const N = ex.engines.length;
  if (q.length !== N || k.length !== N || v.length !== N) throw new ShapeError(`[cp_ring] needs q, k and v of each of the ${N} ranks, got ${q.length}, ${k.length}, ${v.length}`);
  if (N < 2) throw new ShapeError('[cp_ring] needs at least 2 ranks (one rank attends to its own keys)');
  const owner = o.owner ?? 'cp.ring';
  const act = k[0]!.dtype;
  for (let r = 0; r < N; r++) {
    const [B, , H, Dh] = q[0]!.shape;
    for (const [t, n] of [[q[r]!, 'q'], [k[r]!, 'k'], [v[r]!, 'v']] as const) {
      if (t.rank !== 4 || t.shape[0] !== B || t.shape[2] !== H || t.shape[3] !== Dh || t.dtype !== act) {
        throw new ShapeError(`[cp_ring] rank ${r}'s ${n} ${t.dtype} [${t.shape.join(', ')}] does not match rank 0's q [${q[0]!.shape.join(', ')}] (${act}): every rank needs [B, Lr, H, Dh] of one dtype`);
      }
    }
    if (k[r]!.shape[1] !== v[r]!.shape[1] || k[r]!.shape[1] !== q[r]!.shape[1]) throw new ShapeError(`[cp_ring] rank ${r}'s q, k and v must hold the same rows`);
  }
  // the K/V chunks to the host, once (wait for the devices first: that is compute, not exchange)
  await ex.settle();
  const kh: Uint8Array[] = [];
  const vh: Uint8Array[] = [];
  for (let r = 0; r < N; r++) {
    kh.push(await ex.download(r, k[r]!));
    vh.push(await ex.download(r, v[r]!));
  }
  const shapes = k.map((t) => [...t.shape]);
  // pass 0: each rank's queries against its own keys
  const state: Tensor[] = q.map((qr, r) => {
    const part = attentionLse({ q: qr, k: k[r]!, v: v[r]! }, { scale: o.scale });
    k[r]!.dispose();
    v[r]!.dispose();
    return part;
  });
  for (const e of ex.engines) e.flush(); // every device starts pass 0 before the host copies below
  const es = dtypeSize(act);
  // passes 1 .. N-1, queued on every device without waiting: rank r gets the chunk of rank r - p
  for (let p = 1; p < N; p++) {
    for (let r = 0; r < N; r++) {
      const src = (r - p + N) % N;
      const shape = shapes[src]!;
      if (kh[src]!.byteLength !== shape.reduce((a, b) => a * b, 1) * es) throw new Error(`[cp_ring] internal: rank ${src}'s chunk has ${kh[src]!.byteLength} bytes`);
      const kc = ex.upload(r, kh[src]!, shape, act, owner);
      const vc = ex.upload(r, vh[src]!, shape, act, owner);
      const part = attentionLse({ q: q[r]!, k: kc, v: vc }, { scale: o.scale });
      kc.dispose();
      vc.dispose();
      const last = p === N - 1;
      const merged = attentionMerge({ a: state[r]!, b: part }, last ? { final: true, out: o.out } : undefined);
      state[r]!.dispose();
      part.dispose();
      state[r] = merged;
      ex.engines[r]!.flush(); // submit rank r's pass now: it computes while the host copies the others' chunks
    }
    ex.stats.exchanges++; // one ring pass: every rank receives one chunk
  }
  for (const t of q) t.dispose();
  return state;
}
