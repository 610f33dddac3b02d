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
export const GEMM_SOURCE = String.raw`
function gemmRange(x, w, kind, bias, y, K, N, m0, m1, n0, n1) {
  const KC = 256;
  const scratch = new Float32Array(4 * KC);
  const su = new Uint32Array(scratch.buffer);
  const acc = new Float64Array(16);
  const half = (h) => {
    const s = h & 0x8000 ? -1 : 1, e = (h >>> 10) & 0x1f, m = h & 0x3ff;
    if (e === 0) return s * m * 5.960464477539063e-8;
    if (e === 31) return m ? NaN : s * Infinity;
    return s * (1 + m / 1024) * Math.pow(2, e - 15);
  };
  for (let n = n0; n < n1; n += 4) {
    const nb = Math.min(4, n1 - n);
    for (let m = m0; m < m1; m += 4) {
      const mb = Math.min(4, m1 - m);
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
        if (mb === 4) {
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
          acc[0] += a00; acc[1] += a01; acc[2] += a02; acc[3] += a03;
          acc[4] += a10; acc[5] += a11; acc[6] += a12; acc[7] += a13;
          acc[8] += a20; acc[9] += a21; acc[10] += a22; acc[11] += a23;
          acc[12] += a30; acc[13] += a31; acc[14] += a32; acc[15] += a33;
        } else {
          for (let i = 0; i < mb; i++) {
            const xo = (m + i) * K + k0;
            for (let j = 0; j < 4; j++) {
              let s = 0;
              const so = j * KC;
              for (let k = 0; k < kl; k++) s += x[xo + k] * scratch[so + k];
              acc[i * 4 + j] += s;
            }
          }
        }
      }
      for (let i = 0; i < mb; i++)
        for (let j = 0; j < nb; j++) y[(m + i) * N + n + j] = acc[i * 4 + j] + (bias ? bias[n + j] : 0);
    }
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
export const gemmRange: GemmFn = new Function(`${GEMM_SOURCE}; return gemmRange;`)() as GemmFn;

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
${GEMM_SOURCE}
parentPort.on('message', (j) => {
  const x = new Float32Array(j.x), y = new Float32Array(j.y);
  const w = j.kind === 0 ? new Float32Array(j.w) : new Uint16Array(j.w);
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
  const wsab = shared(w);
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
    ws[p]!.postMessage({ x: xs, w: wsab, kind, bias: bs, y: ysab, done, M, K, N, n0, n1 });
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
