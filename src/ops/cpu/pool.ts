// Worker threads for the CPU device's big matrix multiplies (the text encoder at memory level 2).
//
// The kernel is written once, as self-contained JavaScript (GEMM_SOURCE), and used both by the
// workers (`new Worker(code, { eval: true })`, which works the same under tsx, vitest and a bundle)
// and on the main thread for small problems. The API stays synchronous like every CPU op: operands
// are copied into SharedArrayBuffers, each worker computes a slice of the output columns, and the
// main thread blocks in Atomics.wait until all slices are done (allowed on Node's main thread).

import { Worker } from 'node:worker_threads';
import { availableParallelism } from 'node:os';

/** y[m, n] = Σ_k x[m, k]·w[n, k] (+ bias[n]) for rows [m0,m1) and columns [n0,n1); f64 accumulation */
const GEMM_SOURCE = String.raw`
function gemmRange(x, w, kind, bias, y, K, N, m0, m1, n0, n1) {
  // Per group of 4 output columns and per K chunk, the 4 weight rows are widened to f32 once
  // (into scratch, which stays in L1) and then used by every row of x: 4x4 register tiles, and
  // 1x4 for the last M % 4 rows. Each output is Σ over chunks of (Σ over the chunk in order), in
  // f64, whatever the blocking of M: the same numbers for any M split.
  const KC = 256;
  const scratch = new Float32Array(4 * KC);
  const su = new Uint32Array(scratch.buffer);
  const M = m1 - m0;
  const acc = new Float64Array(4 * Math.max(1, M));
  const half = (h) => {
    const s = h & 0x8000 ? -1 : 1, e = (h >>> 10) & 0x1f, m = h & 0x3ff;
    if (e === 0) return s * m * 5.960464477539063e-8;
    if (e === 31) return m ? NaN : s * Infinity;
    return s * (1 + m / 1024) * Math.pow(2, e - 15);
  };
  for (let n = n0; n < n1; n += 4) {
    const nb = Math.min(4, n1 - n);
    acc.fill(0);
    for (let k0 = 0; k0 < K; k0 += KC) {
      const k1 = Math.min(K, k0 + KC), kl = k1 - k0;
      for (let j = 0; j < 4; j++) {
        const o = j * KC;
        if (j >= nb) { scratch.fill(0, o, o + kl); continue; }
        const base = (n + j) * K;
        if (kind === 0) for (let k = k0; k < k1; k++) scratch[o + k - k0] = w[base + k];
        else if (kind === 2) for (let k = k0; k < k1; k++) su[o + k - k0] = w[base + k] << 16;
        else for (let k = k0; k < k1; k++) scratch[o + k - k0] = half(w[base + k]);
      }
      let m = m0;
      for (; m + 4 <= m1; m += 4) {
        const xa = m * K + k0, xb = xa + K, xc = xb + K, xd = xc + K;
        let a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
        let a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
        for (let k = 0; k < kl; k++) {
          const w0 = scratch[k], w1 = scratch[KC + k], w2 = scratch[2 * KC + k], w3 = scratch[3 * KC + k];
          let v = x[xa + k]; a00 += v * w0; a01 += v * w1; a02 += v * w2; a03 += v * w3;
          v = x[xb + k]; a10 += v * w0; a11 += v * w1; a12 += v * w2; a13 += v * w3;
          v = x[xc + k]; a20 += v * w0; a21 += v * w1; a22 += v * w2; a23 += v * w3;
          v = x[xd + k]; a30 += v * w0; a31 += v * w1; a32 += v * w2; a33 += v * w3;
        }
        const o = (m - m0) * 4;
        acc[o] += a00; acc[o + 1] += a01; acc[o + 2] += a02; acc[o + 3] += a03;
        acc[o + 4] += a10; acc[o + 5] += a11; acc[o + 6] += a12; acc[o + 7] += a13;
        acc[o + 8] += a20; acc[o + 9] += a21; acc[o + 10] += a22; acc[o + 11] += a23;
        acc[o + 12] += a30; acc[o + 13] += a31; acc[o + 14] += a32; acc[o + 15] += a33;
      }
      for (; m < m1; m++) {
        const xa = m * K + k0;
        let a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        for (let k = 0; k < kl; k++) {
          const v = x[xa + k];
          a0 += v * scratch[k]; a1 += v * scratch[KC + k]; a2 += v * scratch[2 * KC + k]; a3 += v * scratch[3 * KC + k];
        }
        const o = (m - m0) * 4;
        acc[o] += a0; acc[o + 1] += a1; acc[o + 2] += a2; acc[o + 3] += a3;
      }
    }
    for (let m = m0; m < m1; m++)
      for (let j = 0; j < nb; j++) y[m * N + n + j] = acc[(m - m0) * 4 + j] + (bias ? bias[n + j] : 0);
  }
}
`;

export type WeightKind = 0 | 1 | 2; // f32, f16, bf16

type GemmFn = (
  x: Float32Array,
  w: Float32Array | Uint16Array,
  kind: WeightKind,
  bias: Float32Array | null,
  y: Float32Array,
  K: number,
  N: number,
  m0: number,
  m1: number,
  n0: number,
  n1: number,
) => void;

// eslint-disable-next-line @typescript-eslint/no-implied-eval
const gemmRange: GemmFn = new Function(`${GEMM_SOURCE}; return gemmRange;`)() as GemmFn;

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
${GEMM_SOURCE}
parentPort.on('message', (j) => {
  const x = new Float32Array(j.x), y = new Float32Array(j.y);
  const w = j.kind === 0 ? new Float32Array(j.w, j.wOff, j.wLen) : new Uint16Array(j.w, j.wOff, j.wLen);
  const bias = j.bias ? new Float32Array(j.bias) : null;
  try { gemmRange(x, w, j.kind, bias, y, j.K, j.N, 0, j.M, j.n0, j.n1); } catch (e) { console.error(e); }
  const done = new Int32Array(j.done);
  Atomics.add(done, 0, 1);
  Atomics.notify(done, 0);
});
`;

let workers: Worker[] | null = null;

function pool(): Worker[] {
  if (!workers) {
    const n = Math.max(1, Math.min(8, Number(process.env.SD_CPU_THREADS) || availableParallelism()));
    workers = Array.from({ length: n }, () => {
      const w = new Worker(WORKER_SOURCE, { eval: true });
      w.unref(); // never keeps the process alive
      return w;
    });
  }
  return workers;
}

/** Shut the workers down (tests; the process exits without it since workers are unref'd). */
export function closeCpuPool(): void {
  for (const w of workers ?? []) void w.terminate();
  workers = null;
}

function shared(src: ArrayBufferView): SharedArrayBuffer {
  const sab = new SharedArrayBuffer(Math.max(4, src.byteLength));
  new Uint8Array(sab).set(new Uint8Array(src.buffer, src.byteOffset, src.byteLength));
  return sab;
}

/**
 * The weight as the workers see it: its own memory when it already lives in a SharedArrayBuffer
 * (the CPU device's weights are loaded that way: `loadModule` with no engine), else a copy made
 * for this call (measured: copying UMT5-XXL's 386 MB layer per call took longer than its GEMMs).
 */
function sharedView(src: Float32Array | Uint16Array): { buf: SharedArrayBuffer; off: number; len: number } {
  if (src.buffer instanceof SharedArrayBuffer) return { buf: src.buffer, off: src.byteOffset, len: src.length };
  return { buf: shared(src), off: 0, len: src.length };
}

/** Work (multiply-adds) above which the worker pool is used. */
export const PARALLEL_MACS = 1 << 24;

/**
 * y = x · wᵀ (+ bias): x [M, K] f32, w [N, K] as f32 or raw 16-bit words of `kind`. Synchronous.
 */
export function cpuGemm(x: Float32Array, w: Float32Array | Uint16Array, kind: WeightKind, bias: Float32Array | null, M: number, K: number, N: number): Float32Array {
  const ws = M * N * K >= PARALLEL_MACS ? pool() : [];
  if (ws.length <= 1) {
    const y = new Float32Array(M * N);
    gemmRange(x, w, kind, bias, y, K, N, 0, M, 0, N);
    return y;
  }
  const xs = shared(x);
  const wv = sharedView(w);
  const bs = bias ? shared(bias) : null;
  const ysab = new SharedArrayBuffer(Math.max(4, M * N * 4));
  const done = new SharedArrayBuffer(4);
  const parts = ws.length;
  const per = Math.ceil(N / parts / 4) * 4;
  let jobs = 0;
  for (let p = 0; p < parts; p++) {
    const n0 = p * per;
    const n1 = Math.min(N, n0 + per);
    if (n0 >= n1) continue;
    ws[p]!.postMessage({ x: xs, w: wv.buf, wOff: wv.off, wLen: wv.len, kind, bias: bs, y: ysab, done, M, K, N, n0, n1 });
    jobs++;
  }
  const flag = new Int32Array(done);
  for (;;) {
    const v = Atomics.load(flag, 0);
    if (v >= jobs) break;
    Atomics.wait(flag, 0, v, 60_000);
  }
  return new Float32Array(ysab).slice();
}
