// CPU reference of the quantized (SageAttention-style) attention in kernels/attention_sage.wgsl:
// the same quantization (same blocks, scales, clamp and round-half-to-even), the same integer
// dot products, the same order of the online softmax over blocks of 16 keys, and P·V with the
// products rounded to f16 (pv 'f16') or f32, each widened to f32 and summed in the kernel's order.
// Every f32 step is rounded with Math.fround. What can still differ from a GPU: exp2 (the WGSL
// builtin is not correctly rounded) and fused multiply-adds the shader compiler may form; the K
// mean matches the kernel's summation order when the keys fit one binding window (one chunk).
//
//   q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] values (f32 arrays), out [B, Lq, H, Dh]

import { f16BitsToF32, f32ToF16Bits } from '../../tensor/dtype.ts';

/** rows per quantization block (kernels/attention_sage.wgsl QB) */
export const SAGE_QB = 64;
/** keys per online-softmax block (KB) */
export const SAGE_KB = 16;
const NEG = -1.0e30;
const fr = Math.fround;

export type SagePv = 'f16' | 'f32';

/** round half to even (WGSL round()) */
export function roundHalfEven(x: number): number {
  const r = Math.round(x); // half up
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function f16(x: number): number {
  return f16BitsToF32(f32ToF16Bits(x));
}

/** Sum over `n` rows (stride `stride`, from `off`) in the kernel's order: 64 strided partial sums, then a tree. */
export function kernelSum(src: ArrayLike<number>, off: number, stride: number, n: number): number {
  const part = new Float64Array(64);
  for (let t = 0; t < 64; t++) {
    let s = 0;
    for (let r = t; r < n; r += 64) s = fr(s + src[off + r * stride]!);
    part[t] = s;
  }
  for (let w = 32; w > 0; w >>= 1) for (let t = 0; t < w; t++) part[t] = fr(part[t]! + part[t + w]!);
  return part[0]!;
}

export interface SageQuantized {
  /** int8 values [rows, Dh] */
  data: Int8Array;
  /** per block of SAGE_QB rows: (max |x| / 127) * mul */
  scales: Float32Array;
}

/**
 * Quantize `rows` rows of one head (row r, channel d at src[off + r * stride + d]) per block of
 * SAGE_QB rows, after subtracting `mean` (per channel) when given.
 */
export function sageQuantize(src: ArrayLike<number>, off: number, stride: number, rows: number, Dh: number, mul: number, mean?: Float32Array): SageQuantized {
  const data = new Int8Array(rows * Dh);
  const nb = Math.ceil(rows / SAGE_QB);
  const scales = new Float32Array(nb);
  const x = new Float32Array(SAGE_QB * Dh);
  const m32 = fr(mul);
  for (let blk = 0; blk < nb; blk++) {
    const r0 = blk * SAGE_QB;
    const n = Math.min(SAGE_QB, rows - r0);
    let amax = 0;
    for (let r = 0; r < n; r++) {
      for (let d = 0; d < Dh; d++) {
        let val = src[off + (r0 + r) * stride + d]!;
        if (mean) val = fr(val - mean[d]!);
        x[r * Dh + d] = val;
        const a = Math.abs(val);
        if (a > amax) amax = a;
      }
    }
    const inv = amax > 0 ? fr(127 / amax) : 0;
    scales[blk] = fr(fr(amax / 127) * m32);
    for (let i = 0; i < n * Dh; i++) {
      const qv = roundHalfEven(fr(x[i]! * inv));
      data[r0 * Dh + i] = Math.max(-127, Math.min(127, qv));
    }
  }
  return { data, scales };
}

/** The kernel's quantized attention (see the file comment); `scale` multiplies q·k. */
export function sageAttentionRef(
  q: ArrayLike<number>,
  k: ArrayLike<number>,
  v: ArrayLike<number>,
  dims: { B: number; Lq: number; Lk: number; H: number; Dh: number },
  scale: number,
  pv: SagePv,
): Float32Array {
  const { B, Lq, Lk, H, Dh } = dims;
  const out = new Float32Array(B * Lq * H * Dh);
  const stride = H * Dh;
  const invN = Lk > 0 ? fr(1 / Lk) : 0;
  const qmul = fr(scale * Math.LOG2E);
  const vh = new Float32Array(Lk * Dh);
  const mean = new Float32Array(Dh);
  const acc = new Float32Array(Dh);
  const f = new Float64Array(SAGE_KB);
  const p = new Float64Array(SAGE_KB);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      const kOff = b * Lk * stride + h * Dh;
      for (let d = 0; d < Dh; d++) mean[d] = fr(kernelSum(k, kOff + d, stride, Lk) * invN);
      const kq = sageQuantize(k, kOff, stride, Lk, Dh, 1, mean);
      const qq = sageQuantize(q, b * Lq * stride + h * Dh, stride, Lq, Dh, qmul);
      for (let j = 0; j < Lk; j++) {
        for (let d = 0; d < Dh; d++) {
          const x = v[kOff + j * stride + d]!;
          vh[j * Dh + d] = pv === 'f16' ? f16(x) : x;
        }
      }
      for (let i = 0; i < Lq; i++) {
        const qsc = qq.scales[Math.floor(i / SAGE_QB)]!;
        const qo = i * Dh;
        acc.fill(0);
        let m = NEG;
        let l = 0;
        for (let jb = 0; jb < Lk; jb += SAGE_KB) {
          let mb = m;
          for (let x = 0; x < SAGE_KB; x++) {
            const j = jb + x;
            if (j >= Lk) {
              f[x] = NEG;
              continue;
            }
            let dot = 0;
            const ko = j * Dh;
            for (let d = 0; d < Dh; d++) dot += qq.data[qo + d]! * kq.data[ko + d]!;
            f[x] = fr(fr(dot * qsc) * kq.scales[Math.floor(j / SAGE_QB)]!);
            if (f[x]! > mb) mb = f[x]!;
          }
          const alpha = fr(2 ** fr(m - mb));
          m = mb;
          for (let x = 0; x < SAGE_KB; x++) p[x] = f[x]! > NEG ? fr(2 ** fr(f[x]! - mb)) : 0;
          // ps = (p0 + p1) + (p2 + p3) as vec4s, then (x + y) + (z + w)
          const ps = [0, 1, 2, 3].map((c) => fr(fr(p[c]! + p[4 + c]!) + fr(p[8 + c]! + p[12 + c]!)));
          l = fr(fr(l * alpha) + fr(fr(ps[0]! + ps[1]!) + fr(ps[2]! + ps[3]!)));
          const pw = new Float64Array(SAGE_KB);
          for (let x = 0; x < SAGE_KB; x++) pw[x] = pv === 'f16' ? f16(p[x]!) : p[x]!;
          for (let d = 0; d < Dh; d++) {
            const g = [0, 0, 0, 0];
            for (let gi = 0; gi < 4; gi++) {
              let s = 0;
              for (let x = 0; x < 4; x++) {
                const jx = jb + gi * 4 + x;
                const vv = vh[Math.min(jx, Lk - 1) * Dh + d]!;
                const prod = pv === 'f16' ? f16(pw[gi * 4 + x]! * vv) : fr(pw[gi * 4 + x]! * vv);
                s = x === 0 ? prod : fr(s + prod);
              }
              g[gi] = s;
            }
            const a = fr(fr(g[0]! + g[1]!) + fr(g[2]! + g[3]!));
            acc[d] = fr(fr(acc[d]! * alpha) + a);
          }
        }
        const inv = l > 0 ? fr(1 / l) : 0;
        const oo = ((b * Lq + i) * H + h) * Dh;
        for (let d = 0; d < Dh; d++) out[oo + d] = fr(acc[d]! * inv);
      }
    }
  }
  return out;
}

/** The accuracy metrics SageAttention reports, of `a` against the reference `ref`: cosine similarity and relative L1. */
export function attentionAccuracy(a: ArrayLike<number>, ref: ArrayLike<number>): { cos: number; relL1: number } {
  if (a.length !== ref.length) throw new Error(`[attention_sage] accuracy: ${a.length} values against ${ref.length}`);
  let dot = 0;
  let na = 0;
  let nr = 0;
  let l1 = 0;
  let r1 = 0;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!;
    const y = ref[i]!;
    dot += x * y;
    na += x * x;
    nr += y * y;
    l1 += Math.abs(x - y);
    r1 += Math.abs(y);
  }
  const cos = na === 0 && nr === 0 ? 1 : dot / Math.sqrt(na * nr);
  return { cos, relL1: r1 === 0 ? (l1 === 0 ? 0 : Infinity) : l1 / r1 };
}
