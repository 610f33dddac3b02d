// Matmul / linear, portable tiled kernel: Y[b, m, n] = epi(sum_k A[b, m, k] * B[b, n, k] + bias[n]).
//
// A is the activation operand (a_t storage: f32, or f16 with shader-f16). B is bound as raw u32
// words and decoded per w_dtype (0 f32, 1 f16, 2 bf16), so bf16 checkpoints are used as they are.
// B is addressed with two strides (element (n, k) at b_off + n * b_ns + k * b_ks): PyTorch Linear
// weights [N, K] have (K, 1); a matmul right operand [K, N] has (1, N). Math and accumulation are
// f32. bias/act are applied in the epilogue when `epi` is set; `prev` adds the partial sums already in
// Y (used when K is split across dispatches because an operand exceeds the binding limit).
//
// Geometry (overrides): a workgroup of TX x TY invocations computes a BM x BN tile
// (BM = TY * TM, BN = TX * TN; each invocation TM rows x TN columns, strided by TY / TX so that
// neighbouring invocations read neighbouring workgroup-memory words). K advances in steps of BK
// through workgroup memory. Grid: (ceil(N / BN), ceil(M / BM), batches).
//
// This is the kernel for real GPUs and the fallback everywhere; CPU adapters (lavapipe) use
// matmul_ubo.wgsl for all but tiny M, see src/ops/matmul.ts.

alias a_t = f32;
alias y_t = f32;

override TX: u32 = 16u;
override TY: u32 = 16u;
override TM: u32 = 4u;          // 1..4
override TN: u32 = 4u;          // 1..4
override BK: u32 = 16u;

struct Params {
  M: u32,
  N: u32,
  K: u32,
  a_off: u32,   // A: element index of A[batch0, 0, 0] in the bound window
  a_rs: u32,    // elements between rows of A
  a_bs: u32,    // elements between batches of A (0: shared)
  b_off: u32,   // B: element index of B[batch0, n=0, k=0] in the bound window
  b_ns: u32,    // elements between consecutive n
  b_ks: u32,    // elements between consecutive k
  b_bs: u32,    // elements between batches of B (0: shared)
  y_off: u32,   // Y: element index of Y[batch0, 0, 0] in the bound window
  y_rs: u32,    // elements between rows of Y
  y_bs: u32,    // elements between batches of Y
  bias_off: u32,// element index of bias[0] in the bound window
  // epilogue flags are run-time values: they act once per output, and fewer pipelines means less
  // shader compile time
  prev: u32,    // 1: add the value already in Y (f32 Y only)
  epi: u32,     // 1: add bias (if has_bias) and apply act
  has_bias: u32,
  bias_dtype: u32, // 0 f32, 1 f16, 2 bf16
  act: u32,     // 0 none, 1 gelu (tanh approximation), 2 silu
  w_dtype: u32, // B storage: 0 f32, 1 f16, 2 bf16 (a run-time value: the branch is uniform and
                // outside the inner product; one pipeline serves every weight dtype)
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> A: array<a_t>;
@group(0) @binding(2) var<storage, read> B: array<u32>;
@group(0) @binding(3) var<storage, read> BIAS: array<u32>;
@group(0) @binding(4) var<storage, read_write> Y: array<y_t>;

var<workgroup> As: array<f32, BK * TY * TM>;   // [k][m]
var<workgroup> Bs: array<f32, BK * TX * TN>;   // [k][n]

//!include lib/dtype.wgsl
//!include lib/matmul_epilogue.wgsl

fn load_b(i: u32) -> f32 {
  return widen(B[word_index(i, P.w_dtype)], i, P.w_dtype);
}

// Staging values: A[m, k] and B[n, k] of the current batch (zero outside the matrices)
fn a_val(base: u32, m: u32, k: u32) -> f32 {
  if (m < P.M && k < P.K) { return f32(A[base + m * P.a_rs + k]); }
  return 0.0;
}

fn b_val(base: u32, n: u32, k: u32) -> f32 {
  if (n < P.N && k < P.K) { return load_b(base + n * P.b_ns + k * P.b_ks); }
  return 0.0;
}

@compute @workgroup_size(TX, TY)
fn mm_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let BM = TY * TM;
  let BN = TX * TN;
  let NT = TX * TY;
  let m0 = wid.y * BM;
  let n0 = wid.x * BN;
  let a_base = P.a_off + wid.z * P.a_bs;
  let b_base = P.b_off + wid.z * P.b_bs;
  let li = lid.y * TX + lid.x;

  var acc: array<array<f32, 4>, 4>;
  for (var i = 0u; i < 4u; i++) {
    for (var j = 0u; j < 4u; j++) { acc[i][j] = 0.0; }
  }

  for (var k0 = 0u; k0 < P.K; k0 += BK) {
    // stage A[m0.., k0..] and B[n0.., k0..] (k fastest: consecutive invocations, consecutive k)
    // (element e: row e / BK, k e % BK of the tile)
    for (var e = li; e < BM * BK; e += NT) { As[(e % BK) * BM + e / BK] = a_val(a_base, m0 + e / BK, k0 + e % BK); }
    for (var e = li; e < BN * BK; e += NT) { Bs[(e % BK) * BN + e / BK] = b_val(b_base, n0 + e / BK, k0 + e % BK); }
    workgroupBarrier();
    for (var kk = 0u; kk < BK; kk++) {
      var a: array<f32, 4>;
      var b: array<f32, 4>;
      for (var i = 0u; i < TM; i++) { a[i] = As[kk * BM + lid.y + i * TY]; }
      for (var j = 0u; j < TN; j++) { b[j] = Bs[kk * BN + lid.x + j * TX]; }
      for (var i = 0u; i < TM; i++) {
        for (var j = 0u; j < TN; j++) { acc[i][j] = fma(a[i], b[j], acc[i][j]); }
      }
    }
    workgroupBarrier();
  }

  let y_base = P.y_off + wid.z * P.y_bs;
  for (var i = 0u; i < TM; i++) {
    let m = m0 + lid.y + i * TY;
    if (m >= P.M) { continue; }
    for (var j = 0u; j < TN; j++) {
      let n = n0 + lid.x + j * TX;
      if (n >= P.N) { continue; }
      epilogue(y_base + m * P.y_rs + n, P.bias_off + n, acc[i][j]);
    }
  }
}
