// Matmul / linear (kernels/matmul.wgsl, kernels/matmul_ubo.wgsl).
//
//   linear(x [..., K], w [N, K], { bias [N], act, out })  -> [..., N]     (PyTorch Linear layout)
//   matmul(a [B?, M, K], b [B?, K, N] | [B?, N, K] with transB, { out }) -> [B?, M, N]
//
// Both lower to one GEMM  Y[b, m, n] = act(sum_k A[b, m, k] * B[b, n, k] + bias[n])  with the
// right operand addressed by strides, f32 accumulation and two GPU implementations:
// - 'tiled' (matmul.wgsl): workgroup-memory tiles, portable; used on real GPUs, for tiny M, and
//   when the adapter lacks subgroups.
// - 'ubo' (matmul_ubo.wgsl): for CPU adapters (Mesa llvmpipe/lavapipe), where uniform-buffer
//   gathers are ~3x cheaper than storage loads; operands are packed into 64 KiB blocks first.
//   See docs/notes/matmul.md for the measurements behind it.
// Operands or outputs larger than the adapter's storage-binding limit are processed in chunks, each
// dispatch binding a window of each operand (window.ts).

import { cpuGemm, PARALLEL_MACS } from './cpu/pool.ts';
import { defineOp } from './registry.ts';
import { bindingLimit, elemWindow, type Window } from './window.ts';
import { meets, variantFor } from './variants.ts';
import { actAlias, cpuTensor, f32 } from './common.ts';
import { cast, geluTanh, silu } from './elementwise.ts';
import type { Engine, BufferBinding } from '../runtime/engine.ts';
import type { KernelSpec } from '../runtime/kernels.ts';
import { Tensor, numelOf, shapeStr } from '../tensor/tensor.ts';
import { type DType, dtypeSize, dtypeCode, f16BitsToF32 } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

export type Act = 'none' | 'gelu' | 'silu';
const ACT_CODE: Record<Act, number> = { none: 0, gelu: 1, silu: 2 };

/** Implementation choice; 'auto' picks per adapter and shape (tests force the others). */
export type MatmulVariant = 'auto' | 'tiled' | 'ubo';

/** Internal knobs shared by both ops (tests use them to run the chunking code on small shapes). */
export interface GemmKnobs {
  variant?: MatmulVariant;
  /** pretend the storage-binding limit is this many bytes (never above the real one) */
  maxBindingBytes?: number;
  /** size limit of each packed operand buffer of the 'ubo' variant (default 64 MiB) */
  packBudgetBytes?: number;
  /** workgroup geometry of the 'tiled' variant (tuning experiments; TM, TN <= 4) */
  tile?: TiledGeom;
}

export interface LinearAttrs extends GemmKnobs {
  act?: Act;
  out?: DType;
  /** CPU device: always use the plain reference loop (tests compare the fast path with it) */
  referenceLoop?: boolean;
}

export interface MatmulAttrs extends GemmKnobs {
  transB?: boolean;
  out?: DType;
}

// ---------------------------------------------------------------- shared GEMM description

/** Y[b, m, n] = act(sum_k A[b, m, k] * B[b, n, k] + bias[n]); all offsets / strides in elements. */
interface Gemm {
  batch: number;
  M: number;
  N: number;
  K: number;
  a: Tensor;
  aBs: number; // batch stride of A (0: shared); rows of A are contiguous (row stride K)
  b: Tensor;
  bNs: number; // stride between n
  bKs: number; // stride between k
  bBs: number; // batch stride of B (0: shared)
  bias?: Tensor;
  act: Act;
  y: Tensor; // [batch, M, N] contiguous
}

function gemmFlops(g: { batch: number; M: number; N: number; K: number }): number {
  return 2 * g.batch * g.M * g.N * g.K;
}

const dummies = new WeakMap<Engine, Tensor>();
/** A tiny read-only tensor bound where a kernel's optional input (bias) is absent. */
function dummyTensor(e: Engine): Tensor {
  let t = dummies.get(e);
  if (!t || t.isDisposed) {
    t = e.keep(e.zeros([4], 'f32', 'matmul.dummy'));
    dummies.set(e, t);
  }
  return t;
}

/** The window of the bias, or of the dummy where there is none. */
function biasWindow(e: Engine, bias: Tensor | undefined, limit: number): Window {
  return bias ? elemWindow(e, bias, 0, bias.numel, 'linear', { limit }) : elemWindow(e, dummyTensor(e), 0, 1, 'linear', { limit });
}

// ---------------------------------------------------------------- variant choice

const MAX_WG = 65535;

const UBO_MIN_M = 32;

/** The adapter's choice comes from variants.ts; the shape conditions of 'ubo' are here. */
function chooseVariant(e: Engine, g: Gemm, knobs: GemmKnobs): 'tiled' | 'ubo' {
  const v = knobs.variant ?? 'auto';
  const uboOk = meets(e.caps, 'subgroups') && g.K > 0 && bindingLimit(e, knobs.maxBindingBytes) >= Math.max(UBO_BLOCK_BYTES, uboYWindowBytes(g));
  if (v === 'ubo') {
    if (!uboOk) throw new ShapeError(`[matmul] variant 'ubo' needs the 'subgroups' feature, K > 0 and a binding limit >= one output tile`);
    return 'ubo';
  }
  if (v === 'tiled') return 'tiled';
  return uboOk && variantFor(e.caps, 'matmul') === 'ubo' && g.M >= UBO_MIN_M ? 'ubo' : 'tiled';
}

// ---------------------------------------------------------------- tiled variant

export interface TiledGeom {
  TX: number;
  TY: number;
  TM: number;
  TN: number;
  BK: number;
}

/**
 * Workgroup geometry of the tiled kernel. Real GPUs: measured on an H100 (Dawn/Vulkan, see
 * docs/notes/matmul.md): 16x16 invocations of 4x4 outputs with BK = 8 (BK 4 equal, 16 ~10 %
 * slower, 32 ~35 % slower); for M <= 16 one row of 128 invocations of one column each (more
 * workgroups for a matrix-vector product). CPU adapters use it only for tiny M.
 */
function tiledGeom(e: Engine, M: number): TiledGeom {
  const cpu = variantFor(e.caps, 'matmulTile') === 'cpu';
  if (M <= 16) return cpu ? { TX: 64, TY: 1, TM: Math.max(1, Math.min(4, M)), TN: 4, BK: 16 } : { TX: 128, TY: 1, TM: Math.max(1, Math.min(4, M)), TN: 1, BK: 8 };
  return { TX: 16, TY: 16, TM: 4, TN: 4, BK: cpu ? 16 : 8 };
}

interface TiledPlan {
  geo: TiledGeom;
  /** batches, rows, columns and k per dispatch */
  bc: number;
  mc: number;
  nc: number;
  kc: number;
  /** K chunks (> 1: partial sums accumulate in an f32 output) */
  nk: number;
}

/** Chunk sizes for the tiled kernel: every window fits the binding limit, every grid dim 65535. */
function planTiled(e: Engine, g: Gemm, knobs: GemmKnobs, yEs: number): TiledPlan {
  const { M, N, K } = g;
  const limit = bindingLimit(e, knobs.maxBindingBytes);
  const geo = knobs.tile ?? tiledGeom(e, M);
  if (geo.TM > 4 || geo.TN > 4 || geo.TX * geo.TY > e.limits.maxComputeInvocationsPerWorkgroup) {
    throw new ShapeError(`[linear] tile ${JSON.stringify(geo)}: TM and TN must be <= 4 and TX*TY within the workgroup limit`);
  }
  const BM = geo.TY * geo.TM;
  const BN = geo.TX * geo.TN;
  const aEs = dtypeSize(g.a.dtype);
  const bEs = dtypeSize(g.b.dtype);
  let bc = Math.min(g.batch, MAX_WG);
  const fitsBatch = (n: number) =>
    (g.aBs * (n - 1) + M * K) * aEs <= limit && M * N * n * yEs <= limit && (g.bBs * (n - 1) + spanB(g, N, K)) * bEs <= limit;
  while (bc > 1 && !fitsBatch(bc)) bc = Math.ceil(bc / 2);
  // whole tiles while possible, single rows / columns / k at worst
  const shrink = (v: number, tile: number) => (v > 2 * tile ? Math.floor(v / 2 / tile) * tile : Math.floor(v / 2));
  let mc = Math.min(M, MAX_WG * BM);
  while (mc > 1 && (mc * K * aEs > limit || mc * N * yEs > limit)) mc = shrink(mc, BM);
  if (Math.max(1, mc) * Math.max(K, 1) * aEs > limit || Math.max(1, mc) * Math.max(N, 1) * yEs > limit) {
    throw new ShapeError(`[linear] one row of ${shapeStr([1, K])} or of its output [1, ${N}] does not fit the binding limit (${limit} bytes)`);
  }
  let nc = Math.min(N, MAX_WG * BN);
  let kc = Math.max(K, 1);
  // B window for (nc, kc): [N, K] rows are contiguous, so shrink along n; for a [K, N] operand
  // shrink along k (and accumulate over K chunks)
  const bRowsContig = g.bKs === 1;
  while (spanBytesB(g, nc, kc, bEs) > limit) {
    if (bRowsContig && nc > 1) nc = shrink(nc, BN);
    else if (!bRowsContig && kc > 1) kc = shrink(kc, geo.BK);
    else if (nc > 1) nc = shrink(nc, BN);
    else if (kc > 1) kc = shrink(kc, geo.BK);
    else throw new ShapeError(`[linear] the right operand ${g.b} cannot be split to fit the binding limit (${limit} bytes)`);
  }
  return { geo, bc, mc, nc, kc, nk: K === 0 ? 1 : Math.ceil(K / kc) };
}

function runTiled(e: Engine, g: Gemm, knobs: GemmKnobs, yAcc: Tensor): void {
  const { M, N, K } = g;
  const limit = bindingLimit(e, knobs.maxBindingBytes);
  const { geo, bc, mc, nc, kc, nk } = planTiled(e, g, knobs, dtypeSize(yAcc.dtype));
  const BM = geo.TY * geo.TM;
  const BN = geo.TX * geo.TN;
  if (nk > 1 && yAcc.dtype !== 'f32') throw new Error('[matmul] internal: K split needs an f32 accumulator');

  const bias = g.bias;
  const biasWin = biasWindow(e, bias, limit);
  const aAlias = actAlias('linear', g.a.dtype, e);
  const yAlias = actAlias('linear', yAcc.dtype, e);
  for (let b0 = 0; b0 < g.batch; b0 += bc) {
    const nb = Math.min(bc, g.batch - b0);
    for (let m0 = 0; m0 < M; m0 += mc) {
      const mRows = Math.min(mc, M - m0);
      for (let n0 = 0; n0 < N; n0 += nc) {
        const nCols = Math.min(nc, N - n0);
        for (let ki = 0; ki < nk; ki++) {
          const k0 = ki * kc;
          const kLen = Math.min(kc, K - k0);
          const aLo = b0 * g.aBs + m0 * K + k0;
          const aHi = (b0 + nb - 1) * g.aBs + (m0 + mRows - 1) * K + k0 + Math.max(kLen, 1);
          const aw = elemWindow(e, g.a, aLo, aHi, 'linear', { limit });
          const bLo = b0 * g.bBs + n0 * g.bNs + k0 * g.bKs;
          const bHi = (b0 + nb - 1) * g.bBs + (n0 + nCols - 1) * g.bNs + (k0 + Math.max(kLen, 1) - 1) * g.bKs + 1;
          const bw = elemWindow(e, g.b, bLo, bHi, 'linear', { limit });
          const yLo = (b0 * M + m0) * N + n0;
          const yHi = ((b0 + nb - 1) * M + m0 + mRows - 1) * N + n0 + nCols;
          const yw = elemWindow(e, yAcc, yLo, yHi, 'linear', { limit });
          const last = ki === nk - 1;
          e.dispatch({
            kernel: {
              family: 'matmul',
              entry: 'mm_tiled',
              constants: {
                TX: geo.TX,
                TY: geo.TY,
                TM: geo.TM,
                TN: geo.TN,
                BK: geo.BK,
              },
              aliases: { a_t: aAlias, y_t: yAlias },
              layout: ['read', 'read', 'read', 'write'],
            },
            name: 'matmul.tiled',
            params: {
              M: mRows,
              N: nCols,
              K: Math.max(kLen, 0),
              a_off: aw.off,
              a_rs: K,
              a_bs: g.aBs,
              b_off: bw.off,
              b_ns: g.bNs,
              b_ks: g.bKs,
              b_bs: g.bBs,
              y_off: yw.off,
              y_rs: N,
              y_bs: M * N,
              bias_off: biasWin.off + n0,
              prev: ki > 0 ? 1 : 0,
              epi: last ? 1 : 0,
              has_bias: bias ? 1 : 0,
              bias_dtype: bias ? dtypeCode(bias.dtype) : 0,
              act: ACT_CODE[g.act],
              w_dtype: dtypeCode(g.b.dtype),
            },
            bindings: [aw.binding, bw.binding, biasWin.binding, yw.binding],
            workgroups: [Math.ceil(nCols / BN), Math.ceil(mRows / BM), nb],
          });
        }
      }
    }
  }
}

/** elements spanned by B for all n < nn and k < kk of one batch */
function spanB(g: Gemm, nn: number, kk: number): number {
  if (nn === 0 || kk === 0) return 1;
  return (nn - 1) * g.bNs + (kk - 1) * g.bKs + 1;
}
function spanBytesB(g: Gemm, nn: number, kk: number, es: number): number {
  return spanB(g, nn, kk) * es;
}

// ---------------------------------------------------------------- 'ubo' variant (CPU adapters)

const UBO_BLOCK_WORDS = 16384;
const UBO_BLOCK_BYTES = UBO_BLOCK_WORDS * 4;
/** k values per chunk; activation blocks hold UBO_BLOCK_WORDS / KC rows */
const KC = 256;
const MT = UBO_BLOCK_WORDS / KC; // activation rows per block (f32)
const PACK_WG = 256;
const DEFAULT_PACK_BUDGET = 64 * 2 ** 20;

function uboNT(bDtype: DType): number {
  return bDtype === 'f32' ? UBO_BLOCK_WORDS / KC : (2 * UBO_BLOCK_WORDS) / KC;
}

/** bytes of the output window one 'ubo' dispatch binds (two row blocks, all columns) */
function uboYWindowBytes(g: { N: number }): number {
  return 2 * MT * g.N * 4 + 256;
}

interface PackBuffers {
  a: Tensor | null;
  b: Tensor | null;
}
const packBuffers = new WeakMap<Engine, PackBuffers>();

/**
 * A reusable workspace buffer of at least `bytes` that can be bound as a uniform buffer, owned by
 * the engine's allocator (tag `workspace.matmul.pack.a|b`) so it counts in the memory figures.
 */
function packBuffer(e: Engine, which: 'a' | 'b', bytes: number): GPUBuffer {
  let pb = packBuffers.get(e);
  if (!pb) {
    pb = { a: null, b: null };
    packBuffers.set(e, pb);
  }
  const cur = pb[which];
  if (cur && !cur.isDisposed && cur.nbytes >= bytes) return cur.buffer;
  // the old buffer may still be read by encoded work: submit that work before giving it back
  if (cur && !cur.isDisposed) {
    e.flush();
    cur.dispose();
  }
  const size = Math.ceil(bytes / UBO_BLOCK_BYTES) * UBO_BLOCK_BYTES;
  const t = e.keep(e.empty([size / 4], 'u32', `workspace.matmul.pack.${which}`));
  pb[which] = t;
  return t.buffer;
}

/** Give back the matmul workspace of an engine (e.g. before measuring a phase's peak). */
export function releaseMatmulWorkspace(e: Engine): void {
  const pb = packBuffers.get(e);
  if (!pb) return;
  e.flush();
  pb.a?.dispose();
  pb.b?.dispose();
  packBuffers.delete(e);
}

/**
 * Pack rows [r0, r0 + nTiles*RT) x all K of one operand into blocks (tile t, chunk kc) at block
 * index t*nk + kc of `dst`. Element (row, k) of the operand is src[base + row*rs + k*ks].
 */
function packOperand(
  e: Engine,
  limit: number,
  o: { src: Tensor; base: number; rs: number; ks: number; rows: number; K: number; pack16: boolean; RT: number },
  r0: number,
  nTiles: number,
  nk: number,
  dst: GPUBuffer,
): void {
  const srcEs = dtypeSize(o.src.dtype);
  const maxBlocks = Math.floor(limit / UBO_BLOCK_BYTES);
  /** bytes of the source window for block rows [t0, t0+tn) and K chunks [0, kn) */
  const srcBytes = (t0: number, tn: number, kn: number): number => {
    const rLo = Math.min(r0 + t0 * o.RT, o.rows);
    const rHi = Math.min(r0 + (t0 + tn) * o.RT, o.rows);
    const kHi = Math.min(kn * KC, o.K);
    if (rHi <= rLo || kHi <= 0) return 4;
    return ((rHi - 1 - rLo) * o.rs + (kHi - 1) * o.ks + 1) * srcEs + e.caps.storageAlign;
  };
  for (let t0 = 0; t0 < nTiles; ) {
    // the destination window holds whole block rows when it can; the source window must fit too
    let tn = Math.min(nTiles - t0, Math.max(1, Math.floor(maxBlocks / nk)));
    while (tn > 1 && srcBytes(t0, tn, nk) > limit) tn = Math.ceil(tn / 2);
    let kcn = tn > 1 ? nk : Math.min(nk, maxBlocks);
    while (kcn > 1 && srcBytes(t0, tn, kcn) > limit) kcn = Math.ceil(kcn / 2);
    for (let kc0 = 0; kc0 < nk; kc0 += kcn) {
      const kn = Math.min(kcn, nk - kc0);
      const rowBase = r0 + t0 * o.RT;
      const rLo = Math.min(rowBase, o.rows);
      const rHi = Math.min(r0 + (t0 + tn) * o.RT, o.rows);
      const kLo = Math.min(kc0 * KC, o.K);
      const kHi = Math.min((kc0 + kn) * KC, o.K);
      const valid = rHi > rLo && kHi > kLo;
      const lo = o.base + rLo * o.rs + kLo * o.ks;
      const hi = valid ? o.base + (rHi - 1) * o.rs + (kHi - 1) * o.ks + 1 : lo + 1;
      const sw = elemWindow(e, o.src, lo, hi, 'linear', { limit });
      const firstBlk = t0 * nk + kc0;
      const lastBlk = (t0 + tn - 1) * nk + kc0 + kn; // exclusive
      const dstWin: BufferBinding = { buffer: dst, offset: firstBlk * UBO_BLOCK_BYTES, size: (lastBlk - firstBlk) * UBO_BLOCK_BYTES };
      if (dstWin.size > limit) throw new Error(`[linear] internal: pack window ${dstWin.size} > ${limit}`);
      const epw = o.pack16 ? 2 : 1; // elements per destination word
      // word-aligned row copy: one vec4 load per 4 destination words
      const fast =
        o.ks === 1 &&
        (o.pack16 ? o.src.dtype !== 'f32' : o.src.dtype === 'f32') &&
        sw.off % (4 * epw) === 0 &&
        o.rs % (4 * epw) === 0 &&
        o.K % (4 * epw) === 0;
      e.dispatch({
        kernel: { family: 'matmul_ubo', entry: 'pack', constants: { WG: PACK_WG }, layout: ['read', 'write'] },
        name: 'matmul.pack',
        params: {
          rows: o.rows,
          K: o.K,
          r0: rowBase,
          kc0,
          blk_stride: nk,
          src_off: sw.off,
          src_row0: rLo,
          src_k0: kLo,
          rs: o.rs,
          ks: o.ks,
          s_dtype: dtypeCode(o.src.dtype),
          pack16: o.pack16 ? 1 : 0,
          fast: fast ? 1 : 0,
          rt: o.RT,
          kc: KC,
          wpr_shift: Math.log2(KC / epw),
        },
        bindings: [sw.binding, dstWin],
        workgroups: [UBO_BLOCK_WORDS / 4 / PACK_WG, tn, kn],
      });
    }
    t0 += tn;
  }
}

/** K chunk `kc` of packed tile `t` (of `nTiles`, `nk` chunks each) as a uniform binding; a missing second tile re-binds the first (its rows/columns are out of range and not stored) */
function uboBlock(buf: GPUBuffer, t: number, nTiles: number, nk: number, kc: number): BufferBinding {
  const tt = Math.min(t, nTiles - 1);
  return { buffer: buf, offset: (tt * nk + kc) * UBO_BLOCK_BYTES, size: UBO_BLOCK_BYTES };
}

function runUbo(e: Engine, g: Gemm, knobs: GemmKnobs, yAcc: Tensor): void {
  const { M, N, K } = g;
  const limit = bindingLimit(e, knobs.maxBindingBytes);
  const budget = Math.max(2 * UBO_BLOCK_BYTES, knobs.packBudgetBytes ?? DEFAULT_PACK_BUDGET);
  const nk = Math.ceil(K / KC);
  const NT = uboNT(g.b.dtype);
  const pack16 = g.b.dtype !== 'f32';
  const blockRowBytes = nk * UBO_BLOCK_BYTES; // one tile of rows, all K
  // rows per packed chunk: pairs of tiles (a dispatch reads two blocks of each operand)
  const aPairs = Math.max(1, Math.floor(budget / (2 * blockRowBytes)));
  const bPairs = Math.max(1, Math.floor(budget / (2 * blockRowBytes)));
  const mcRows = Math.min(aPairs * 2 * MT, Math.ceil(M / (2 * MT)) * 2 * MT);
  const ncRows = Math.min(bPairs * 2 * NT, Math.ceil(N / (2 * NT)) * 2 * NT);
  const aBuf = packBuffer(e, 'a', (mcRows / MT) * blockRowBytes);
  const bBuf = packBuffer(e, 'b', (ncRows / NT) * blockRowBytes);
  const bias = g.bias;
  const biasWin = biasWindow(e, bias, limit);
  const yAlias = actAlias('linear', yAcc.dtype, e);
  if (nk > 1 && yAcc.dtype !== 'f32') throw new Error('[matmul] internal: K split needs an f32 accumulator');
  // one spec object for every dispatch of the call (the engine caches its pipeline by identity)
  const kernel: KernelSpec = {
    family: 'matmul_ubo',
    entry: 'mm_pk',
    constants: { KC, MT, NT, W_DTYPE: dtypeCode(g.b.dtype) },
    aliases: { y_t: yAlias },
    layout: ['uniform', 'uniform', 'uniform', 'uniform', 'read', 'write'],
  };
  const sharedB = g.bBs === 0;
  let packedB = -1; // (batch, n0) key of what bBuf holds; -1 none
  for (let bi = 0; bi < g.batch; bi++) {
    for (let n0 = 0; n0 < N; n0 += ncRows) {
      const nTilesB = Math.ceil(Math.min(ncRows, N - n0) / NT);
      const keyB = (sharedB ? 0 : bi) * N + n0;
      if (packedB !== keyB) {
        packOperand(e, limit, { src: g.b, base: bi * g.bBs, rs: g.bNs, ks: g.bKs, rows: N, K, pack16, RT: NT }, n0, nTilesB, nk, bBuf);
        packedB = keyB;
      }
      for (let m0 = 0; m0 < M; m0 += mcRows) {
        const nTilesA = Math.ceil(Math.min(mcRows, M - m0) / MT);
        packOperand(e, limit, { src: g.a, base: bi * g.aBs, rs: K, ks: 1, rows: M, K, pack16: false, RT: MT }, m0, nTilesA, nk, aBuf);
        for (let ta = 0; ta < nTilesA; ta += 2) {
          const rowLo = m0 + ta * MT;
          const rowHi = Math.min(M, rowLo + 2 * MT);
          const yw = elemWindow(e, yAcc, (bi * M + rowLo) * N, (bi * M + rowHi - 1) * N + N, 'linear', { limit });
          if (e.isMeta) {
            // the planner's walk: the same count, no per-dispatch objects (every binding below is a plain range)
            e.metaDispatches(Math.ceil(nTilesB / 2) * nk, 'matmul.ubo');
            continue;
          }
          for (let tb = 0; tb < nTilesB; tb += 2) {
            for (let kc = 0; kc < nk; kc++) {
              e.dispatch({
                kernel,
                name: 'matmul.ubo',
                params: {
                  M,
                  N,
                  m0: rowLo,
                  n0: n0 + tb * NT,
                  y_off: yw.off,
                  y_row0: rowLo,
                  y_stride: N,
                  b_off: biasWin.off,
                  prev: kc > 0 ? 1 : 0,
                  epi: kc === nk - 1 ? 1 : 0,
                  has_bias: bias ? 1 : 0,
                  bias_dtype: bias ? dtypeCode(bias.dtype) : 0,
                  act: ACT_CODE[g.act],
                },
                bindings: [uboBlock(aBuf, ta, nTilesA, nk, kc), uboBlock(aBuf, ta + 1, nTilesA, nk, kc), uboBlock(bBuf, tb, nTilesB, nk, kc), uboBlock(bBuf, tb + 1, nTilesB, nk, kc), biasWin.binding, yw.binding],
                workgroups: [NT / 8, MT / 8, 1],
              });
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- GPU driver

function runGemm(e: Engine, g: Gemm, knobs: GemmKnobs, outDt: DType): Tensor {
  const { batch, M, N, K } = g;
  if (batch * M * N === 0) return g.y;
  const variant = chooseVariant(e, g, knobs);
  // partial sums over K chunks need an f32 accumulator ('ubo' always chunks K; 'tiled' only when
  // a [K, N] right operand exceeds the binding limit)
  const kSplit = variant === 'ubo' ? Math.ceil(K / KC) > 1 : planTiled(e, g, knobs, dtypeSize(outDt)).nk > 1;
  const accIsY = outDt === 'f32' || !kSplit;
  const yAcc = accIsY ? g.y : e.empty(g.y.shape, 'f32', 'matmul.acc');
  const gg = { ...g, y: yAcc };
  if (variant === 'ubo') runUbo(e, gg, knobs, yAcc);
  else runTiled(e, gg, knobs, yAcc);
  if (accIsY) return g.y;
  g.y.dispose();
  const y = cast(yAcc, outDt);
  yAcc.dispose();
  return y;
}

// ---------------------------------------------------------------- CPU reference

let f16Table: Float32Array | null = null;
function f16ToF32Table(): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) f16Table[i] = f16BitsToF32(i);
  }
  return f16Table;
}

/** Row n of a weight [N, K] as f32 (f32 rows are views; 16-bit rows are widened into `buf`). */
function weightRow(w: Tensor, n: number, K: number, buf: Float32Array): Float32Array {
  const d = w.data!;
  if (w.dtype === 'f32') return (d as Float32Array).subarray(n * K, n * K + K);
  const src = (d as Uint16Array).subarray(n * K, n * K + K);
  if (w.dtype === 'bf16') {
    const u = new Uint32Array(buf.buffer, buf.byteOffset, K);
    for (let k = 0; k < K; k++) u[k] = src[k]! << 16;
  } else {
    const tab = f16ToF32Table();
    for (let k = 0; k < K; k++) buf[k] = tab[src[k]!]!;
  }
  return buf;
}

function epilogue(v: number, bias: Float32Array | null, n: number, act: Act): number {
  let r = bias ? v + bias[n]! : v;
  if (act === 'gelu') r = geluTanh(r);
  else if (act === 'silu') r = silu(r);
  return r;
}

function linearCpu(x: Tensor, w: Tensor, bias: Tensor | undefined, a: LinearAttrs): Tensor {
  const K = x.shape[x.rank - 1]!;
  const N = w.shape[0]!;
  const rows = numelOf(x.shape.slice(0, -1));
  const xv = f32(x);
  const bv = bias ? f32(bias) : null;
  const act = a.act ?? 'none';
  if (rows * N * K >= PARALLEL_MACS && !a.referenceLoop) {
    // the CPU device's fast path: blocked kernel on worker threads (src/ops/cpu/pool.ts)
    const kind = w.dtype === 'f32' ? 0 : w.dtype === 'f16' ? 1 : 2;
    const y = cpuGemm(xv, w.data as Float32Array | Uint16Array, kind, bv, rows, K, N);
    if (act !== 'none') for (let i = 0; i < y.length; i++) y[i] = epilogue(y[i]!, null, 0, act);
    return cpuTensor(y, [...x.shape.slice(0, -1), N], a.out ?? x.dtype);
  }
  const out = new Float32Array(rows * N);
  const buf = new Float32Array(Math.max(K, 1));
  // n outer: each weight row is widened once and reused for every row of x
  for (let n = 0; n < N; n++) {
    const wr = weightRow(w, n, K, buf);
    for (let m = 0; m < rows; m++) {
      const xo = m * K;
      let s = 0;
      for (let k = 0; k < K; k++) s += xv[xo + k]! * wr[k]!;
      out[m * N + n] = epilogue(s, bv, n, act);
    }
  }
  return cpuTensor(out, [...x.shape.slice(0, -1), N], a.out ?? x.dtype);
}

// ---------------------------------------------------------------- linear

function checkFloat(op: string, what: string, t: Tensor, allowed: readonly DType[]): void {
  if (!allowed.includes(t.dtype)) throw new ShapeError(`[${op}] ${what} must be ${allowed.join('/')}, got ${t.dtype} ${shapeStr(t.shape)}`);
}

export const linearOp = defineOp<{ x: Tensor; w: Tensor; bias?: Tensor }, LinearAttrs>({
  name: 'linear',
  family: 'matmul',
  check({ x, w, bias }, a) {
    checkFloat('linear', 'x', x, ['f32', 'f16']);
    checkFloat('linear', 'weight', w, ['f32', 'f16', 'bf16']);
    if (x.rank < 1) throw new ShapeError(`[linear] x must have at least one dimension (features last), got a scalar`);
    if (w.rank !== 2) throw new ShapeError(`[linear] weight must be [N, K] (PyTorch Linear layout), got ${shapeStr(w.shape)}`);
    const K = x.shape[x.rank - 1]!;
    const [N, Kw] = w.shape as [number, number];
    if (K !== Kw) {
      throw new ShapeError(
        `[linear] x ${shapeStr(x.shape)} has ${K} input features but weight ${shapeStr(w.shape)} expects ${Kw} (weight is [out, in]); transpose or reshape one of them`,
      );
    }
    if (bias) {
      checkFloat('linear', 'bias', bias, ['f32', 'f16', 'bf16']);
      if (bias.rank !== 1 || bias.shape[0] !== N) throw new ShapeError(`[linear] bias ${shapeStr(bias.shape)} must be [${N}] to match weight ${shapeStr(w.shape)}`);
    }
    if (a.act && !(a.act in ACT_CODE)) throw new ShapeError(`[linear] unknown act '${a.act}'; use 'none', 'gelu' or 'silu'`);
    actAlias('linear', a.out ?? x.dtype);
  },
  gpu(e, { x, w, bias }, a) {
    const outDt = a.out ?? x.dtype;
    actAlias('linear', x.dtype, e);
    actAlias('linear', outDt, e);
    const K = x.shape[x.rank - 1]!;
    const N = w.shape[0]!;
    const M = numelOf(x.shape.slice(0, -1));
    const y = e.empty([...x.shape.slice(0, -1), N], outDt);
    const g: Gemm = { batch: 1, M, N, K, a: x, aBs: 0, b: w, bNs: K, bKs: 1, bBs: 0, bias, act: a.act ?? 'none', y };
    return runGemm(e, g, a, outDt);
  },
  cpu({ x, w, bias }, a) {
    return linearCpu(x, w, bias, a);
  },
  flops: ({ x, w }) => 2 * numelOf(x.shape.slice(0, -1)) * w.shape[0]! * w.shape[1]!,
  bytes: ({ x, w, bias }, a) => x.nbytes + w.nbytes + (bias?.nbytes ?? 0) + numelOf(x.shape.slice(0, -1)) * w.shape[0]! * dtypeSize(a.out ?? x.dtype),
});

/** y = act(x @ w^T + bias): x [..., K] (f32/f16), w [N, K] (f32/f16/bf16), bias [N]. */
export function linear(x: Tensor, w: Tensor, opts: { bias?: Tensor; act?: Act; out?: DType } & GemmKnobs = {}): Tensor {
  const { bias, ...attrs } = opts;
  return linearOp({ x, w, bias }, attrs);
}

// ---------------------------------------------------------------- matmul

interface MatmulDims {
  batch: number;
  M: number;
  N: number;
  K: number;
  aBs: number;
  bBs: number;
  outShape: number[];
}

function matmulDims(a: Tensor, b: Tensor, transB: boolean): MatmulDims {
  const what = transB ? 'b [B?, N, K]' : 'b [B?, K, N]';
  if (a.rank < 2 || a.rank > 3) throw new ShapeError(`[matmul] a must be [M, K] or [B, M, K], got ${shapeStr(a.shape)}`);
  if (b.rank < 2 || b.rank > 3) throw new ShapeError(`[matmul] ${what} must have rank 2 or 3, got ${shapeStr(b.shape)}`);
  const [M, K] = a.shape.slice(-2) as [number, number];
  const [b0, b1] = b.shape.slice(-2) as [number, number];
  const N = transB ? b0 : b1;
  const Kb = transB ? b1 : b0;
  if (K !== Kb) {
    throw new ShapeError(`[matmul] a ${shapeStr(a.shape)} has K=${K} but ${what} ${shapeStr(b.shape)} has K=${Kb}${transB ? '' : ' (pass transB if b is [N, K])'}`);
  }
  const ba = a.rank === 3 ? a.shape[0]! : 1;
  const bb = b.rank === 3 ? b.shape[0]! : 1;
  if (a.rank === 3 && b.rank === 3 && ba !== bb) throw new ShapeError(`[matmul] batch sizes differ: a ${shapeStr(a.shape)} vs b ${shapeStr(b.shape)}`);
  const batch = Math.max(ba, bb);
  const outShape = a.rank === 3 || b.rank === 3 ? [batch, M, N] : [M, N];
  return { batch, M, N, K, aBs: a.rank === 3 ? M * K : 0, bBs: b.rank === 3 ? N * K : 0, outShape };
}

function matmulCpu(a: Tensor, b: Tensor, at: MatmulAttrs): Tensor {
  const transB = at.transB ?? false;
  const d = matmulDims(a, b, transB);
  const { batch, M, N, K } = d;
  const av = f32(a);
  const bv = f32(b);
  const out = new Float32Array(batch * M * N);
  const acc = new Float64Array(N);
  for (let bi = 0; bi < batch; bi++) {
    const ao = bi * d.aBs;
    const bo = bi * d.bBs;
    for (let m = 0; m < M; m++) {
      const yo = (bi * M + m) * N;
      if (transB) {
        for (let n = 0; n < N; n++) {
          let s = 0;
          const bro = bo + n * K;
          for (let k = 0; k < K; k++) s += av[ao + m * K + k]! * bv[bro + k]!;
          out[yo + n] = s;
        }
      } else {
        // i-k-j: stream rows of b
        acc.fill(0);
        for (let k = 0; k < K; k++) {
          const x = av[ao + m * K + k]!;
          const bro = bo + k * N;
          for (let n = 0; n < N; n++) acc[n] += x * bv[bro + n]!;
        }
        for (let n = 0; n < N; n++) out[yo + n] = acc[n]!;
      }
    }
  }
  return cpuTensor(out, d.outShape, at.out ?? a.dtype);
}

export const matmulOp = defineOp<{ a: Tensor; b: Tensor }, MatmulAttrs>({
  name: 'matmul',
  family: 'matmul',
  check({ a, b }, at) {
    checkFloat('matmul', 'a', a, ['f32', 'f16']);
    checkFloat('matmul', 'b', b, ['f32', 'f16']);
    matmulDims(a, b, at.transB ?? false);
    actAlias('matmul', at.out ?? a.dtype);
  },
  gpu(e, { a, b }, at) {
    const outDt = at.out ?? a.dtype;
    actAlias('matmul', a.dtype, e);
    actAlias('matmul', outDt, e);
    const transB = at.transB ?? false;
    const d = matmulDims(a, b, transB);
    const y = e.empty(d.outShape, outDt);
    const g: Gemm = {
      batch: d.batch,
      M: d.M,
      N: d.N,
      K: d.K,
      a,
      aBs: d.aBs,
      b,
      bNs: transB ? d.K : 1,
      bKs: transB ? 1 : d.N,
      bBs: d.bBs,
      act: 'none',
      y,
    };
    return runGemm(e, g, at, outDt);
  },
  cpu({ a, b }, at) {
    return matmulCpu(a, b, at);
  },
  flops: ({ a, b }, at) => {
    const d = matmulDims(a, b, at.transB ?? false);
    return gemmFlops(d);
  },
  bytes: ({ a, b }, at) => {
    const d = matmulDims(a, b, at.transB ?? false);
    return a.nbytes + b.nbytes + d.batch * d.M * d.N * dtypeSize(at.out ?? a.dtype);
  },
});

/** Batched activation x activation product: a [B?, M, K] @ b [B?, K, N] (or b [B?, N, K] with transB). */
export function matmul(a: Tensor, b: Tensor, opts: { transB?: boolean; out?: DType } & GemmKnobs = {}): Tensor {
  return matmulOp({ a, b }, opts);
}

