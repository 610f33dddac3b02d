// Host-side math of Wan 2.1 vs the official goldens: timestep sinusoid, 3-axis RoPE tables,
// UMT5 relative position buckets and the per-offset relative bias table.
import { describe, it, expect } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadGolden, TINY } from './helpers/golden.ts';
import { timestepSinusoid, ropeTables, ropeAxisDims } from '../src/models/wan_dit/host.ts';
import { t5RelativeBucket, t5RelativeBuckets, relativeBucketsByOffset, relativeBiasTable } from '../src/models/umt5/buckets.ts';

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** Tiny safetensors reader for one f32 tensor (the production reader lives in src/io). */
function readSafetensorF32(file: string, key: string): { shape: number[]; data: Float32Array } {
  const buf = readFileSync(file);
  const hlen = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + hlen).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const e = header[key];
  if (!e) throw new Error(`${key} not in ${file}`);
  expect(e.dtype).toBe('F32');
  const [s, t] = e.data_offsets;
  const bytes = new Uint8Array(buf.subarray(8 + hlen + s, 8 + hlen + t));
  return { shape: e.shape, data: new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4) };
}

const g = loadGolden();

describe('timestep sinusoid', () => {
  it('matches dit.t999.time_sinusoid (f64 math, cos first)', () => {
    const gold = g.get('dit.t999.time_sinusoid');
    expect(gold.shape).toEqual([1, 256]);
    expect(g.get('dit.t999.timestep').data[0]).toBe(999);
    const s = timestepSinusoid(999, 256);
    expect(s.length).toBe(256);
    const err = maxAbsDiff(s, gold.data);
    expect(err).toBeLessThanOrEqual(1e-7); // measured: 0 (bit exact)
    // cos first: arg_0 = t
    expect(s[0]).toBeCloseTo(Math.cos(999), 6);
    expect(s[128]).toBeCloseTo(Math.sin(999), 6);
  });

  it('all-f32 math would NOT match (the golden discriminates the precision)', () => {
    const f = Math.fround;
    const gold = g.get('dit.t999.time_sinusoid').data;
    let m = 0;
    for (let i = 0; i < 128; i++) {
      const arg = f(999 * f(Math.pow(10000, f(-f(i / 128)))));
      m = Math.max(m, Math.abs(f(Math.cos(arg)) - gold[i]!), Math.abs(f(Math.sin(arg)) - gold[128 + i]!));
    }
    expect(m).toBeGreaterThan(1e-6);
  });

  it('t = 437.5 (fractional timestep of the second DiT golden): shape, range, cos²+sin² = 1', () => {
    expect(g.get('dit.t437_5.timestep').data[0]).toBe(437.5);
    const s = timestepSinusoid(437.5, 256);
    expect(s.length).toBe(256);
    for (let i = 0; i < 128; i++) {
      expect(Number.isFinite(s[i]!)).toBe(true);
      expect(Math.abs(s[i]! * s[i]! + s[128 + i]! * s[128 + i]! - 1)).toBeLessThan(1e-6);
    }
    expect(s[0]).toBeCloseTo(Math.cos(437.5), 6);
    // last frequency: 10000^(-127/128)
    expect(s[255]).toBeCloseTo(Math.sin(437.5 * Math.pow(10000, -127 / 128)), 6);
  });

  it('rejects odd / non-positive freq_dim and non-finite t', () => {
    expect(() => timestepSinusoid(1, 255)).toThrow(/\[timestep_sinusoid\] freq_dim/);
    expect(() => timestepSinusoid(1, 0)).toThrow(/freq_dim/);
    expect(() => timestepSinusoid(NaN, 256)).toThrow(/finite/);
  });
});

describe('RoPE tables', () => {
  it('axis dims: 24/20/20 for d=64, 12/10/10 for d=32, 44/42/42 for d=128', () => {
    expect(ropeAxisDims(64)).toEqual([24, 20, 20]);
    expect(ropeAxisDims(32)).toEqual([12, 10, 10]);
    expect(ropeAxisDims(128)).toEqual([44, 42, 42]);
  });

  it('matches dit.rope_cos / dit.rope_sin (tiny: latent [16,3,8,8], patch (1,2,2) → 3×4×4, head_dim 64)', () => {
    const gc = g.get('dit.rope_cos');
    const gs = g.get('dit.rope_sin');
    expect(gc.shape).toEqual([48, 32]);
    const { cos, sin } = ropeTables(3, 4, 4, 64);
    const ec = maxAbsDiff(cos, gc.data);
    const es = maxAbsDiff(sin, gs.data);
    expect(ec).toBeLessThanOrEqual(1e-7); // measured: 0 / 0 (bit exact)
    expect(es).toBeLessThanOrEqual(1e-7);
  });

  it('token order (f,h,w) row-major and pair order [t | h | w] (head_dim 128, independent formula)', () => {
    const [F, H, W, d] = [5, 3, 7, 128];
    const { cos, sin } = ropeTables(F, H, W, d);
    expect(cos.length).toBe(F * H * W * 64);
    const [pt, ph] = [22, 21];
    const theta = (pos: number, j: number, dim: number) => pos / Math.pow(10000, (2 * j) / dim);
    for (const [fi, hi, wi] of [[0, 0, 0], [4, 2, 6], [2, 1, 3], [1, 2, 0]] as const) {
      const row = (fi * H + hi) * W + wi;
      for (let p = 0; p < 64; p++) {
        const a = p < pt ? theta(fi, p, 44) : p < pt + ph ? theta(hi, p - pt, 42) : theta(wi, p - pt - ph, 42);
        expect(Math.abs(cos[row * 64 + p]! - Math.cos(a))).toBeLessThan(1e-7);
        expect(Math.abs(sin[row * 64 + p]! - Math.sin(a))).toBeLessThan(1e-7);
      }
    }
  });

  it('zero-size grid gives empty tables; errors name the problem', () => {
    expect(ropeTables(0, 4, 4, 64).cos.length).toBe(0);
    expect(() => ropeTables(1, 1025, 4, 64)).toThrow(/\[rope_tables\] grid size h=1025 exceeds rope_max_seq_len 1024/);
    expect(() => ropeTables(1, 4, 4, 63)).toThrow(/head_dim/);
    expect(() => ropeTables(1.5, 4, 4, 64)).toThrow(/grid size f/);
  });
});

describe('UMT5 relative position buckets', () => {
  it('matches t5.relative_buckets [16, 16]', () => {
    const gold = g.get('t5.relative_buckets');
    expect(gold.shape).toEqual([16, 16]);
    const b = t5RelativeBuckets(16, 16);
    expect(b).toBeInstanceOf(Int32Array);
    expect(Array.from(b)).toEqual(Array.from(gold.data));
  });

  it('known values (bidirectional, 32 buckets, max distance 128)', () => {
    const cases: [number, number][] = [
      [0, 0], [-1, 1], [-7, 7], [-8, 8], [-11, 8], [-12, 9], [-15, 9], [-16, 10], [-32, 12], [-64, 14], [-127, 15], [-128, 15], [-100000, 15],
      [1, 17], [7, 23], [8, 24], [16, 26], [32, 28], [64, 30], [128, 31], [5000, 31],
    ];
    for (const [rel, want] of cases) expect(t5RelativeBucket(rel), `rel=${rel}`).toBe(want);
    // unidirectional: only non-positive offsets get distinct buckets
    expect(t5RelativeBucket(5, { bidirectional: false })).toBe(0);
    expect(t5RelativeBucket(-5, { bidirectional: false })).toBe(5);
    expect(t5RelativeBucket(-1000, { bidirectional: false })).toBe(31);
  });

  it('f32 log path agrees with an f64 formula for |rel| ≤ 20000 (no boundary case flips)', () => {
    for (let rel = -20000; rel <= 20000; rel += 1) {
      const n = Math.abs(rel);
      const want = (rel > 0 ? 16 : 0) + (n < 8 ? n : Math.min(15, 8 + Math.trunc((Math.log(n / 8) / Math.log(16)) * 8)));
      if (t5RelativeBucket(rel) !== want) expect(`rel=${rel}: ${t5RelativeBucket(rel)}`).toBe(`rel=${rel}: ${want}`);
    }
  });

  it('buckets by offset agree with the full table for lq ≠ lk, and are empty for zero length', () => {
    for (const [lq, lk] of [[5, 9], [9, 5], [1, 1], [1, 33], [65, 1]] as const) {
      const full = t5RelativeBuckets(lq, lk);
      const byRel = relativeBucketsByOffset(lq, lk);
      expect(byRel.length).toBe(lq + lk - 1);
      for (let q = 0; q < lq; q++) for (let k = 0; k < lk; k++) expect(full[q * lk + k]).toBe(byRel[k - q + lq - 1]);
    }
    expect(relativeBucketsByOffset(0, 4).length).toBe(0);
    expect(t5RelativeBuckets(0, 4).length).toBe(0);
    expect(() => t5RelativeBuckets(-1, 4)).toThrow(/lq/);
  });

  it('relative bias table + tiny T5 block-0 weight reproduces t5.block0_position_bias [1, heads, 16, 16]', () => {
    const gold = g.get('t5.block0_position_bias');
    expect(gold.shape).toEqual([1, 4, 16, 16]);
    const w = readSafetensorF32(join(TINY, 'text_encoder', 'model.safetensors'), 'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight');
    expect(w.shape).toEqual([32, 4]);
    const [H, L] = [4, 16];
    const table = relativeBiasTable(relativeBucketsByOffset(L, L), w.data, H); // [H, 2L−1]
    expect(table.length).toBe(H * (2 * L - 1));
    const full = new Float32Array(H * L * L);
    for (let h = 0; h < H; h++) for (let q = 0; q < L; q++) for (let k = 0; k < L; k++) full[(h * L + q) * L + k] = table[h * (2 * L - 1) + k - q + L - 1]!;
    expect(maxAbsDiff(full, gold.data)).toBe(0); // a pure gather: exact
  });

  it('relative bias table validates its inputs', () => {
    const emb = new Float32Array(32 * 4);
    expect(() => relativeBiasTable(Int32Array.of(0, 32), emb, 4)).toThrow(/\[relative_bias_table\] bucket 32/);
    expect(() => relativeBiasTable(Int32Array.of(0), new Float32Array(30), 4)).toThrow(/multiple of heads/);
    expect(relativeBiasTable(new Int32Array(0), emb, 4).length).toBe(0);
  });
});
