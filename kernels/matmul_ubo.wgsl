// Matmul for CPU WebGPU adapters (Mesa llvmpipe / lavapipe): operands staged in uniform buffers.
//
// Why this shape (measured on lavapipe, Mesa 25.0.7; see docs/notes/matmul.md):
// - lavapipe runs a subgroup of 8 invocations as one SIMD program. A storage-buffer load whose
//   address is not a compile-time constant becomes a per-lane loop with an exec-mask test and a
//   bounds-check branch per component (~10 instructions per lane), even if the address is the same
//   in every lane. A *uniform*-buffer load with a varying address is a branch-free gather (~3
//   instructions per lane). So both operands are first packed ("pack" below) into 64 KiB blocks
//   that are bound as uniform buffers.
// - The weight operand is gathered 8 distinct rows at a time (one per lane) and every row is then
//   handed to all lanes with subgroupBroadcast (an extract + splat), instead of 8 redundant
//   same-address gathers.
// - Register blocking: each invocation owns 2 rows (one from each of two x blocks) x 16 columns
//   (8 from each of two weight blocks), accumulated in f32 over one K chunk of KC values.
// A dispatch covers 2*MT rows x 2*NT columns x KC of K; the op loops over K chunks and
// accumulates in the f32 output (prev), applying bias + activation on the last chunk (epi).
//
// Packed layout (written by `pack`, read by `mm_pk`): a block is 16384 u32 words (64 KiB) holding
// one tile of rows x KC. Activation blocks hold MT = 16384 / KC rows of f32. Weight blocks hold
// f32 (NT = 16384 / KC rows) or 16-bit pairs in their natural order (NT = 32768 / KC rows; word j
// holds k = 2j in its low half, 2j + 1 in its high half), so packing is a plain copy of row
// segments. One vec4<u32> of 16-bit pairs unpacks to the even and the odd k of 8 values; the x side
// swizzles to match (free in llvmpipe's SoA code). Padding rows / k are zero.
//
// This file needs the `subgroups` feature (module-wide `enable`), which is why it is separate
// from matmul.wgsl (the portable tiled kernel).

enable subgroups;

alias y_t = f32;

override KC: u32 = 256u;        // k values per chunk (one block row)
override MT: u32 = 64u;         // activation rows per block = 16384 / KC
override NT: u32 = 128u;        // weight rows per block = 16384 / KC (f32) or 32768 / KC (16-bit)
override W_DTYPE: u32 = 2u;     // weight storage: 0 f32, 1 f16, 2 bf16 (see dtypeCode)

struct MmParams {
  M: u32,        // output rows (global)
  N: u32,        // output columns (global)
  m0: u32,       // global row of row 0 of block XU0 (XU1 holds rows m0 + MT ..)
  n0: u32,       // global column of row 0 of block WU0 (WU1 holds columns n0 + NT ..)
  y_off: u32,    // Y: element index of (y_row0, 0) in the bound window
  y_row0: u32,
  y_stride: u32, // elements per output row
  b_off: u32,    // bias: element index of bias[0] in the bound window
  // epilogue flags are run-time values (not overrides): they act once per output, and every
  // extra pipeline costs seconds of LLVM compile time on lavapipe
  prev: u32,     // 1: add the partial sums already in Y (K chunks after the first)
  epi: u32,      // 1: last K chunk: add bias (if has_bias), apply act
  has_bias: u32,
  bias_dtype: u32, // 0 f32, 1 f16, 2 bf16
  act: u32,      // 0 none, 1 gelu (tanh approximation), 2 silu
  _p0: u32,
  _p1: u32,
  _p2: u32,
}

@group(0) @binding(0) var<uniform> P: MmParams;
@group(0) @binding(1) var<uniform> XU0: array<vec4<f32>, 4096>;
@group(0) @binding(2) var<uniform> XU1: array<vec4<f32>, 4096>;
@group(0) @binding(3) var<uniform> WU0: array<vec4<u32>, 4096>;
@group(0) @binding(4) var<uniform> WU1: array<vec4<u32>, 4096>;
@group(0) @binding(5) var<storage, read> BIAS: array<u32>;
@group(0) @binding(6) var<storage, read_write> Y: array<y_t>;

//!include lib/dtype.wgsl
//!include lib/matmul_epilogue.wgsl

// 8 weights (one vec4<u32> of 16-bit pairs, k .. k+7) -> (k+0, 2, 4, 6), (k+1, 3, 5, 7)
fn unpack8(p: vec4<u32>) -> array<vec4<f32>, 2> {
  if (W_DTYPE == 2u) {
    return array<vec4<f32>, 2>(bitcast<vec4<f32>>(p << vec4<u32>(16u)), bitcast<vec4<f32>>(p & vec4<u32>(0xffff0000u)));
  }
  let a = unpack2x16float(p.x);
  let b = unpack2x16float(p.y);
  let c = unpack2x16float(p.z);
  let d = unpack2x16float(p.w);
  return array<vec4<f32>, 2>(vec4<f32>(a.x, b.x, c.x, d.x), vec4<f32>(a.y, b.y, c.y, d.y));
}

fn put(m: u32, n: u32, acc: f32) {
  if (m >= P.M || n >= P.N) { return; }
  epilogue(P.y_off + (m - P.y_row0) * P.y_stride + n, P.b_off + n, acc);
}

// Grid: (NT / 8, MT / 8, 1), workgroup = 8 invocations = one lavapipe subgroup.
// Invocation (wx, wy, lane): rows m0 + wy*8 + lane (+ MT), columns n0 + wx*8 + 0..7 (+ NT).
@compute @workgroup_size(8)
fn mm_pk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
  let r = wid.y * 8u + lane;                  // row inside the x blocks
  let xr = r * (KC / 4u);                     // vec4 index of that row
  let wrow = wid.x * 8u + lane;               // weight row this lane gathers
  let wr = wrow * select(KC / 8u, KC / 4u, W_DTYPE == 0u);
  var a00 = vec4<f32>(0.0); var a01 = vec4<f32>(0.0); var a02 = vec4<f32>(0.0); var a03 = vec4<f32>(0.0);
  var a10 = vec4<f32>(0.0); var a11 = vec4<f32>(0.0); var a12 = vec4<f32>(0.0); var a13 = vec4<f32>(0.0);
    if (W_DTYPE == 0u) {
      // f32 weights: one vec4 = 4 consecutive k
      for (var q = 0u; q < KC / 4u; q++) {
        let x0 = XU0[xr + q];
        let x1 = XU1[xr + q];
        let g0 = WU0[wr + q];
        let g1 = WU1[wr + q];
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g0, 0u)); a00.x += dot(x0, w); a10.x += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g0, 1u)); a00.y += dot(x0, w); a10.y += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g0, 2u)); a00.z += dot(x0, w); a10.z += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g0, 3u)); a00.w += dot(x0, w); a10.w += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g0, 4u)); a01.x += dot(x0, w); a11.x += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g0, 5u)); a01.y += dot(x0, w); a11.y += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g0, 6u)); a01.z += dot(x0, w); a11.z += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g0, 7u)); a01.w += dot(x0, w); a11.w += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g1, 0u)); a02.x += dot(x0, w); a12.x += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g1, 1u)); a02.y += dot(x0, w); a12.y += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g1, 2u)); a02.z += dot(x0, w); a12.z += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g1, 3u)); a02.w += dot(x0, w); a12.w += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g1, 4u)); a03.x += dot(x0, w); a13.x += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g1, 5u)); a03.y += dot(x0, w); a13.y += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g1, 6u)); a03.z += dot(x0, w); a13.z += dot(x1, w); }
        { let w = bitcast<vec4<f32>>(subgroupBroadcast(g1, 7u)); a03.w += dot(x0, w); a13.w += dot(x1, w); }
      }
    } else {
      // 16-bit weights: one vec4<u32> = 8 k as pairs; even k in the low halves, odd k in the high
      for (var q = 0u; q < KC / 8u; q++) {
        let x0a = XU0[xr + 2u * q];
        let x0b = XU0[xr + 2u * q + 1u];
        let x1a = XU1[xr + 2u * q];
        let x1b = XU1[xr + 2u * q + 1u];
        let x0l = vec4<f32>(x0a.xz, x0b.xz);  // even k
        let x0h = vec4<f32>(x0a.yw, x0b.yw);  // odd k
        let x1l = vec4<f32>(x1a.xz, x1b.xz);
        let x1h = vec4<f32>(x1a.yw, x1b.yw);
        let g0 = WU0[wr + q];
        let g1 = WU1[wr + q];
        { let w = unpack8(subgroupBroadcast(g0, 0u)); a00.x += dot(x0l, w[0]) + dot(x0h, w[1]); a10.x += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g0, 1u)); a00.y += dot(x0l, w[0]) + dot(x0h, w[1]); a10.y += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g0, 2u)); a00.z += dot(x0l, w[0]) + dot(x0h, w[1]); a10.z += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g0, 3u)); a00.w += dot(x0l, w[0]) + dot(x0h, w[1]); a10.w += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g0, 4u)); a01.x += dot(x0l, w[0]) + dot(x0h, w[1]); a11.x += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g0, 5u)); a01.y += dot(x0l, w[0]) + dot(x0h, w[1]); a11.y += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g0, 6u)); a01.z += dot(x0l, w[0]) + dot(x0h, w[1]); a11.z += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g0, 7u)); a01.w += dot(x0l, w[0]) + dot(x0h, w[1]); a11.w += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g1, 0u)); a02.x += dot(x0l, w[0]) + dot(x0h, w[1]); a12.x += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g1, 1u)); a02.y += dot(x0l, w[0]) + dot(x0h, w[1]); a12.y += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g1, 2u)); a02.z += dot(x0l, w[0]) + dot(x0h, w[1]); a12.z += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g1, 3u)); a02.w += dot(x0l, w[0]) + dot(x0h, w[1]); a12.w += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g1, 4u)); a03.x += dot(x0l, w[0]) + dot(x0h, w[1]); a13.x += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g1, 5u)); a03.y += dot(x0l, w[0]) + dot(x0h, w[1]); a13.y += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g1, 6u)); a03.z += dot(x0l, w[0]) + dot(x0h, w[1]); a13.z += dot(x1l, w[0]) + dot(x1h, w[1]); }
        { let w = unpack8(subgroupBroadcast(g1, 7u)); a03.w += dot(x0l, w[0]) + dot(x0h, w[1]); a13.w += dot(x1l, w[0]) + dot(x1h, w[1]); }
      }
    }

  let m0 = P.m0 + r;
  let m1 = m0 + MT;
  let nb = P.n0 + wid.x * 8u;
  put(m0, nb + 0u * NT + 0u, a00.x);
  put(m0, nb + 0u * NT + 1u, a00.y);
  put(m0, nb + 0u * NT + 2u, a00.z);
  put(m0, nb + 0u * NT + 3u, a00.w);
  put(m0, nb + 0u * NT + 4u, a01.x);
  put(m0, nb + 0u * NT + 5u, a01.y);
  put(m0, nb + 0u * NT + 6u, a01.z);
  put(m0, nb + 0u * NT + 7u, a01.w);
  put(m0, nb + 1u * NT + 0u, a02.x);
  put(m0, nb + 1u * NT + 1u, a02.y);
  put(m0, nb + 1u * NT + 2u, a02.z);
  put(m0, nb + 1u * NT + 3u, a02.w);
  put(m0, nb + 1u * NT + 4u, a03.x);
  put(m0, nb + 1u * NT + 5u, a03.y);
  put(m0, nb + 1u * NT + 6u, a03.z);
  put(m0, nb + 1u * NT + 7u, a03.w);
  put(m1, nb + 0u * NT + 0u, a10.x);
  put(m1, nb + 0u * NT + 1u, a10.y);
  put(m1, nb + 0u * NT + 2u, a10.z);
  put(m1, nb + 0u * NT + 3u, a10.w);
  put(m1, nb + 0u * NT + 4u, a11.x);
  put(m1, nb + 0u * NT + 5u, a11.y);
  put(m1, nb + 0u * NT + 6u, a11.z);
  put(m1, nb + 0u * NT + 7u, a11.w);
  put(m1, nb + 1u * NT + 0u, a12.x);
  put(m1, nb + 1u * NT + 1u, a12.y);
  put(m1, nb + 1u * NT + 2u, a12.z);
  put(m1, nb + 1u * NT + 3u, a12.w);
  put(m1, nb + 1u * NT + 4u, a13.x);
  put(m1, nb + 1u * NT + 5u, a13.y);
  put(m1, nb + 1u * NT + 6u, a13.z);
  put(m1, nb + 1u * NT + 7u, a13.w);
}

// ---------------------------------------------------------------- pack
// Grid (16384 / 4 / WG, block rows, K chunks): one invocation writes 4 destination words (a
// vec4<u32>) of block (t = wid.y, chunk kc0 + wid.z). Source element (row, k) is
// src_off + (row - src_row0) * rs + (k - src_k0) * ks. With `fast` (rows contiguous in k, offsets
// and K aligned to a vec4 of words, no conversion) the 4 words are one vec4 load of the source;
// otherwise every element is read and converted separately (f16 activations -> f32, operands
// addressed with a k stride, odd alignments). Rows >= `rows` and k >= K are written as zeros.

override WG: u32 = 256u;

// the pack kernel is cheap next to the product, so its choices are run-time values (one pipeline)
struct PackParams {
  rows: u32,       // valid rows of the operand (global), rows >= this are zero padding
  K: u32,          // valid k
  r0: u32,         // global row of the first block row of this dispatch
  kc0: u32,        // first K chunk of this dispatch
  blk_stride: u32, // blocks between consecutive block rows in the destination window
  src_off: u32,    // element index in the source window of (src_row0, src_k0)
  src_row0: u32,
  src_k0: u32,
  rs: u32,         // source element stride between rows
  ks: u32,         // source element stride between k
  s_dtype: u32,    // source storage: 0 f32, 1 f16, 2 bf16
  pack16: u32,     // 1: 16-bit pairs (weights, raw bits); 0: f32 words
  fast: u32,       // 1: word-aligned row copy (see above)
  rt: u32,         // rows per block
  kc: u32,         // k values per block row
  wpr_shift: u32,  // log2(words per block row) = log2(kc) - pack16
}

@group(0) @binding(0) var<uniform> Q: PackParams;
@group(0) @binding(1) var<storage, read> SRC: array<u32>;
@group(0) @binding(2) var<storage, read_write> DST: array<vec4<u32>>;

fn src_bits(row: u32, k: u32) -> u32 {
  // raw bits of one source element: f32 bits, or the 16-bit pattern in the low half
  if (row >= Q.rows || k >= Q.K) { return 0u; }
  let i = Q.src_off + (row - Q.src_row0) * Q.rs + (k - Q.src_k0) * Q.ks;
  let w = SRC[word_index(i, Q.s_dtype)];
  if (Q.s_dtype == 0u) { return w; }
  return half_bits(w, i);
}

fn src_word(row: u32, k: u32) -> u32 {
  // one destination word holding element k (and k + 1 for 16-bit pairs)
  if (Q.pack16 != 0u) { return src_bits(row, k) | (src_bits(row, k + 1u) << 16u); }
  let b = src_bits(row, k);
  if (Q.s_dtype == 0u) { return b; }
  if (Q.s_dtype == 2u) { return b << 16u; }
  return bitcast<u32>(unpack2x16float(b).x);
}

@compute @workgroup_size(WG)
fn pack(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let inner = (wid.x * WG + lid.x) * 4u;               // first word inside the block
  let row = Q.r0 + wid.y * Q.rt + (inner >> Q.wpr_shift);
  let word = inner & ((1u << Q.wpr_shift) - 1u);       // word inside the block row
  let epw = 1u + Q.pack16;                             // elements per word
  let k = (Q.kc0 + wid.z) * Q.kc + word * epw;         // first element of the 4 words
  let dst = ((wid.y * Q.blk_stride + wid.z) * 16384u + inner) / 4u;
  var v = vec4<u32>(0u);
  if (Q.fast != 0u) {
    if (row < Q.rows && k < Q.K) {
      // word index of element (row, k); 4-aligned by the host's choice of `fast`
      let i = (Q.src_off + (row - Q.src_row0) * Q.rs + (k - Q.src_k0)) / epw;
      v = vec4<u32>(SRC[i], SRC[i + 1u], SRC[i + 2u], SRC[i + 3u]);
    }
  } else {
    v = vec4<u32>(src_word(row, k), src_word(row, k + epw), src_word(row, k + 2u * epw), src_word(row, k + 3u * epw));
  }
  DST[dst] = v;
}
