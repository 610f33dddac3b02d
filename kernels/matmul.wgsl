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

fn tanh_f(z: f32) -> f32 {
  // tanh through exp with the argument clamped: |z| > 15 is ±1 to f32 precision, and the clamp
  // keeps exp() finite on every implementation.
  let c = clamp(z, -15.0, 15.0);
  let e = exp(2.0 * c);
  return (e - 1.0) / (e + 1.0);
}

fn gelu_tanh(x: f32) -> f32 {
  // GELU, tanh approximation (PyTorch approximate='tanh', T5 gelu_new)
  return 0.5 * x * (1.0 + tanh_f(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

fn silu(x: f32) -> f32 {
  return x / (1.0 + exp(-x));
}

fn half_of(w: u32, idx: u32) -> u32 {
  return select(w & 0xffffu, w >> 16u, (idx & 1u) == 1u);
}

fn load_b(i: u32) -> f32 {
  if (P.w_dtype == 0u) { return bitcast<f32>(B[i]); }
  let h = half_of(B[i >> 1u], i);
  if (P.w_dtype == 2u) { return bitcast<f32>(h << 16u); }
  return unpack2x16float(h).x;
}

fn bias_at(n: u32) -> f32 {
  let i = P.bias_off + n;
  if (P.bias_dtype == 0u) { return bitcast<f32>(BIAS[i]); }
  let h = half_of(BIAS[i >> 1u], i);
  if (P.bias_dtype == 2u) { return bitcast<f32>(h << 16u); }
  return unpack2x16float(h).x;
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
    for (var e = li; e < BM * BK; e += NT) {
      let r = e / BK;
      let c = e % BK;
      let m = m0 + r;
      let k = k0 + c;
      var v = 0.0;
      if (m < P.M && k < P.K) { v = f32(A[a_base + m * P.a_rs + k]); }
      As[c * BM + r] = v;
    }
    for (var e = li; e < BN * BK; e += NT) {
      let r = e / BK;
      let c = e % BK;
      let n = n0 + r;
      let k = k0 + c;
      var v = 0.0;
      if (n < P.N && k < P.K) { v = load_b(b_base + n * P.b_ns + k * P.b_ks); }
      Bs[c * BN + r] = v;
    }
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
      let yi = y_base + m * P.y_rs + n;
      var v = acc[i][j];
      if (P.prev != 0u) { v += f32(Y[yi]); }
      if (P.epi != 0u) {
        if (P.has_bias != 0u) { v += bias_at(n); }
        if (P.act == 1u) { v = gelu_tanh(v); } else if (P.act == 2u) { v = silu(v); }
      }
      Y[yi] = y_t(v);
    }
  }
}
