// UMT5 relative position buckets and the per-offset bias table the attention kernel consumes.
//
// Reference: Wan-Video/Wan2.1 @ 9737cba, wan/modules/t5.py `T5RelativeEmbedding._relative_position_bucket`
// (identical to transformers' UMT5 `_relative_position_bucket`). rel = key_pos − query_pos.
// The large-distance branch is computed in float32 exactly like the reference:
//   max_exact + long(log(f32(n) / max_exact) / math.log(max_dist / max_exact) * (nb − max_exact))
// with every op rounded to f32 (the python double math.log(...) is cast to f32 by torch).

import { ShapeError } from '../../util/errors.ts';

export interface BucketOptions {
  numBuckets?: number;
  maxDistance?: number;
  bidirectional?: boolean;
}

const f = Math.fround;

/** Bucket of one relative offset rel = key − query (Wan/T5 `_relative_position_bucket`). */
export function t5RelativeBucket(rel: number, opts: BucketOptions = {}): number {
  const numBucketsTotal = opts.numBuckets ?? 32;
  const maxDistance = opts.maxDistance ?? 128;
  const bidirectional = opts.bidirectional ?? true;
  let nb: number;
  let bucket: number;
  let n: number;
  if (bidirectional) {
    nb = Math.trunc(numBucketsTotal / 2);
    bucket = rel > 0 ? nb : 0;
    n = Math.abs(rel);
  } else {
    nb = numBucketsTotal;
    bucket = 0;
    n = -Math.min(rel, 0);
  }
  const maxExact = Math.trunc(nb / 2);
  if (n < maxExact) return bucket + n;
  // f32: log(f32(n) / maxExact) / f32(ln(maxDistance / maxExact)) * (nb - maxExact), truncated
  const lg = f(Math.log(f(f(n) / maxExact)));
  const denom = f(Math.log(maxDistance / maxExact));
  const large = maxExact + Math.trunc(f(f(lg / denom) * (nb - maxExact)));
  return bucket + Math.min(large, nb - 1);
}

function checkLen(op: string, name: string, v: number): void {
  if (!Number.isInteger(v) || v < 0) throw new ShapeError(`[${op}] ${name} must be a non-negative integer, got ${v}`);
}

/** Full bucket table [lq, lk]: out[q·lk + k] = bucket(k − q) (golden `t5.relative_buckets`). */
export function t5RelativeBuckets(lq: number, lk: number, opts: BucketOptions = {}): Int32Array {
  checkLen('t5_relative_buckets', 'lq', lq);
  checkLen('t5_relative_buckets', 'lk', lk);
  const byRel = relativeBucketsByOffset(lq, lk, opts);
  const out = new Int32Array(lq * lk);
  for (let q = 0; q < lq; q++) for (let k = 0; k < lk; k++) out[q * lk + k] = byRel[k - q + lq - 1]!;
  return out;
}

/**
 * Bucket per relative offset rel = k − q for rel in [−(lq−1), lk−1]:
 * Int32Array [lq + lk − 1], index rel + lq − 1. (Empty when lq or lk is 0.)
 */
export function relativeBucketsByOffset(lq: number, lk: number, opts: BucketOptions = {}): Int32Array {
  checkLen('relative_buckets_by_offset', 'lq', lq);
  checkLen('relative_buckets_by_offset', 'lk', lk);
  if (lq === 0 || lk === 0) return new Int32Array(0);
  const R = lq + lk - 1;
  const out = new Int32Array(R);
  for (let i = 0; i < R; i++) out[i] = t5RelativeBucket(i - (lq - 1), opts);
  return out;
}

/**
 * The "relative" bias table the attention kernel takes: out[h, r] = embedding[bucketsByRel[r], h].
 * The attention bias for (head h, query q, key k) is out[h, k − q + lq − 1].
 * @param bucketsByRel Int32Array [R = lq + lk − 1] from relativeBucketsByOffset
 * @param embedding    Float32Array [numBuckets, heads] (`…SelfAttention.relative_attention_bias.weight`)
 * @returns Float32Array [heads, R]
 */
export function relativeBiasTable(bucketsByRel: Int32Array, embedding: Float32Array, heads: number): Float32Array {
  if (!Number.isInteger(heads) || heads <= 0) throw new ShapeError(`[relative_bias_table] heads must be a positive integer, got ${heads}`);
  if (embedding.length % heads !== 0) {
    throw new ShapeError(`[relative_bias_table] embedding has ${embedding.length} values, not a multiple of heads=${heads}; pass the [num_buckets, heads] weight`);
  }
  const numBuckets = embedding.length / heads;
  const R = bucketsByRel.length;
  const out = new Float32Array(heads * R);
  for (let r = 0; r < R; r++) {
    const b = bucketsByRel[r]!;
    if (b < 0 || b >= numBuckets) {
      throw new ShapeError(`[relative_bias_table] bucket ${b} at offset index ${r} is outside the embedding's ${numBuckets} buckets; build the buckets with the model's num_buckets`);
    }
    for (let h = 0; h < heads; h++) out[h * R + r] = embedding[b * heads + h]!;
  }
  return out;
}
