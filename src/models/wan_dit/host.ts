// Host-side (CPU, plain TypeScript) tables of the Wan 2.1 DiT: the timestep sinusoid and the 3-axis
// RoPE cos/sin tables. Both are small, computed once per step / per video shape, and uploaded.
//
// Reference: Wan-Video/Wan2.1 @ 9737cba, wan/modules/model.py (`sinusoidal_embedding_1d`,
// `rope_params`, `rope_apply`, and `WanModel.__init__` building `self.freqs`). Wan computes both in
// float64; so do we (JS doubles), rounding to f32 only at the end. See shared/golden/README.md.

import { ShapeError } from '../../util/errors.ts';

/**
 * Wan's `sinusoidal_embedding_1d(freqDim, t)`: `[cos(arg) | sin(arg)]` (cos first), with
 * `arg_i = t · 10000^(-i/half)`, i = 0..half-1, computed in float64 and rounded to f32.
 * (All-f32 math would be off by up to 2.8e-5 at t = 999.)
 * @returns Float32Array [freqDim]
 */
export function timestepSinusoid(t: number, freqDim: number): Float32Array {
  if (!Number.isInteger(freqDim) || freqDim <= 0 || freqDim % 2 !== 0) {
    throw new ShapeError(`[timestep_sinusoid] freq_dim must be a positive even integer, got ${freqDim}`);
  }
  if (!Number.isFinite(t)) throw new ShapeError(`[timestep_sinusoid] timestep must be finite, got ${t}`);
  const half = freqDim / 2;
  const out = new Float32Array(freqDim);
  for (let i = 0; i < half; i++) {
    // torch: position.float64 ⊗ pow(10000, -(arange(half) / half))
    const arg = t * Math.pow(10000, -(i / half));
    out[i] = Math.cos(arg);
    out[half + i] = Math.sin(arg);
  }
  return out;
}

/** Per-axis RoPE angle dims for head_dim d: t gets d − 4·(d//6), h and w get 2·(d//6) each. */
export function ropeAxisDims(headDim: number): [number, number, number] {
  const s = Math.floor(headDim / 6);
  return [headDim - 4 * s, 2 * s, 2 * s];
}

/**
 * The first `numPos` rows of Wan's `rope_params(1024, dim)` for one axis (the angles before
 * `torch.polar`): angle[pos][j] = pos · (1 / 10000^(2j/dim)), f64. Note the reciprocal-then-multiply
 * order of the reference, not pos / 10000^(2j/dim).
 * @returns Float64Array [numPos, dim/2]
 */
function ropeAxisAngles(numPos: number, dim: number, theta = 10000): Float64Array {
  const pairs = dim / 2;
  const inv = new Float64Array(pairs);
  for (let j = 0; j < pairs; j++) inv[j] = 1.0 / Math.pow(theta, (2 * j) / dim);
  const out = new Float64Array(numPos * pairs);
  for (let p = 0; p < numPos; p++) for (let j = 0; j < pairs; j++) out[p * pairs + j] = p * inv[j]!;
  return out;
}

/**
 * 3-axis RoPE tables of the Wan DiT for a latent grid of (f, h, w) **patches**.
 * Token order (f, h, w) row-major; per token, headDim/2 complex pairs ordered
 * [t pairs | h pairs | w pairs]; pair i rotates the adjacent elements (2i, 2i+1).
 * Angles in float64 (Wan applies RoPE in float64), cos/sin rounded to f32.
 * @returns cos, sin: Float32Array [L = f·h·w, headDim/2]
 */
export function ropeTables(
  f: number,
  h: number,
  w: number,
  headDim: number,
  maxSeqLen = 1024,
): { cos: Float32Array; sin: Float32Array } {
  for (const [name, v] of [['f', f], ['h', h], ['w', w]] as const) {
    if (!Number.isInteger(v) || v < 0) throw new ShapeError(`[rope_tables] grid size ${name} must be a non-negative integer, got ${v}`);
    if (v > maxSeqLen) {
      throw new ShapeError(`[rope_tables] grid size ${name}=${v} exceeds rope_max_seq_len ${maxSeqLen}; use a smaller video or a larger rope_max_seq_len`);
    }
  }
  if (!Number.isInteger(headDim) || headDim <= 0 || headDim % 2 !== 0) {
    throw new ShapeError(`[rope_tables] head_dim must be a positive even integer, got ${headDim}`);
  }
  const [dt, dh, dw] = ropeAxisDims(headDim);
  const [pt, ph, pw] = [dt / 2, dh / 2, dw / 2];
  const half = headDim / 2; // pt + ph + pw
  // Only the positions actually used are needed; the values equal rows of rope_params(maxSeqLen, ·).
  const at = ropeAxisAngles(f, dt);
  const ah = ropeAxisAngles(h, dh);
  const aw = ropeAxisAngles(w, dw);
  const L = f * h * w;
  const cos = new Float32Array(L * half);
  const sin = new Float32Array(L * half);
  // cos/sin once per axis position (f·pt + h·ph + w·pw values), then copied into the rows: the same
  // float32 values as evaluating every row, without L·half trig calls (75,600 × 64 at 720p)
  const trig = (angles: Float64Array | number[], fn: (x: number) => number) => Float32Array.from(angles, fn);
  const [ct, st, ch, sh, cw, sw] = [trig(at, Math.cos), trig(at, Math.sin), trig(ah, Math.cos), trig(ah, Math.sin), trig(aw, Math.cos), trig(aw, Math.sin)];
  let row = 0;
  for (let fi = 0; fi < f; fi++) {
    for (let hi = 0; hi < h; hi++) {
      for (let wi = 0; wi < w; wi++, row++) {
        const o = row * half; // [L, half]
        for (let j = 0; j < pt; j++) {
          cos[o + j] = ct[fi * pt + j]!;
          sin[o + j] = st[fi * pt + j]!;
        }
        for (let j = 0; j < ph; j++) {
          cos[o + pt + j] = ch[hi * ph + j]!;
          sin[o + pt + j] = sh[hi * ph + j]!;
        }
        for (let j = 0; j < pw; j++) {
          cos[o + pt + ph + j] = cw[wi * pw + j]!;
          sin[o + pt + ph + j] = sw[wi * pw + j]!;
        }
      }
    }
  }
  return { cos, sin };
}
