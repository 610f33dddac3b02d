// CPU twins of attention_lse and attention_merge (src/ops/attention_lse.ts, kernels/attention_lse.wgsl):
// plain loops with f64 accumulation, the same math and the same "no key" convention as the kernels.
//
// A partial is f32 [rows, H, Dh + 1]: per (row, head) the normalized output o (Dh values) and the
// natural-log LSE ln Σ_j exp(scale·q·k_j) (NEG_LSE when the row saw no key; then o = 0).

/** The LSE of a row that saw no key: finite, so a merge never computes inf - inf. */
export const NEG_LSE = -1e30;

/**
 * q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] (as f32 values) → the partial [B, Lq, H, Dh + 1]: softmax
 * attention over the Lk keys, and each row's LSE.
 */
export function attentionLseHost(q: Float32Array, k: Float32Array, v: Float32Array, d: { B: number; Lq: number; Lk: number; H: number; Dh: number }, scale: number): Float32Array {
  const { B, Lq, Lk, H, Dh } = d;
  const W = Dh + 1;
  const out = new Float32Array(B * Lq * H * W);
  const s = new Float64Array(Lk);
  const acc = new Float64Array(Dh);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      for (let i = 0; i < Lq; i++) {
        const qo = ((b * Lq + i) * H + h) * Dh;
        const oo = ((b * Lq + i) * H + h) * W;
        if (Lk === 0) {
          out[oo + Dh] = NEG_LSE;
          continue;
        }
        let m = -Infinity;
        for (let j = 0; j < Lk; j++) {
          const ko = ((b * Lk + j) * H + h) * Dh;
          let dot = 0;
          for (let x = 0; x < Dh; x++) dot += q[qo + x]! * k[ko + x]!;
          s[j] = dot * scale;
          if (s[j]! > m) m = s[j]!;
        }
        let sum = 0;
        acc.fill(0);
        for (let j = 0; j < Lk; j++) {
          const p = Math.exp(s[j]! - m);
          sum += p;
          const vo = ((b * Lk + j) * H + h) * Dh;
          for (let x = 0; x < Dh; x++) acc[x] += p * v[vo + x]!;
        }
        for (let x = 0; x < Dh; x++) out[oo + x] = acc[x]! / sum;
        out[oo + Dh] = m + Math.log(sum);
      }
    }
  }
  return out;
}

/**
 * Merge two partials over disjoint key sets (each [rows, Dh + 1], rows = B·Lq·H) into their
 * attention over the union: the merged partial, or with `final` only the output [rows, Dh].
 */
export function attentionMergeHost(a: Float32Array, b: Float32Array, Dh: number, final: boolean): Float32Array {
  const W = Dh + 1;
  const rows = a.length / W;
  const Wo = final ? Dh : W;
  const out = new Float32Array(rows * Wo);
  for (let s = 0; s < rows; s++) {
    const la = a[s * W + Dh]!;
    const lb = b[s * W + Dh]!;
    const m = Math.max(la, lb);
    if (!(m > 0.5 * NEG_LSE)) {
      if (!final) out[s * Wo + Dh] = NEG_LSE;
      continue;
    }
    const wa = Math.exp(la - m);
    const wb = Math.exp(lb - m);
    const sw = wa + wb;
    for (let x = 0; x < Dh; x++) out[s * Wo + x] = (wa * a[s * W + x]! + wb * b[s * W + x]!) / sw;
    if (!final) out[s * Wo + Dh] = m + Math.log(sw);
  }
  return out;
}

/** A partial [rows, Dh + 1] split into its outputs [rows, Dh] and LSEs [rows] (tests, debugging). */
export function splitPartial(p: Float32Array, Dh: number): { o: Float32Array; lse: Float32Array } {
  const W = Dh + 1;
  const rows = p.length / W;
  const o = new Float32Array(rows * Dh);
  const lse = new Float32Array(rows);
  for (let s = 0; s < rows; s++) {
    o.set(p.subarray(s * W, s * W + Dh), s * Dh);
    lse[s] = p[s * W + Dh]!;
  }
  return { o, lse };
}
