// Normalization kernels (one family, like ggml's row_norm): LayerNorm (+affine, +fused Wan
// modulation) and RMSNorm over the last dim of row-major [rows, D]; the Wan VAE channel L2 norm
// over dim 1 of channel-first [B, C, S].
//
// Storage: activations x/y are `x_t`/`y_t` aliases (f32, or f16 via the loader). Weight, bias,
// shift, scale, gamma are bound as array<u32> words and widened in-kernel (dtype codes 0 f32,
// 1 f16, 2 bf16), so bf16 checkpoint weights need no conversion. Math and reductions are f32.
//
// Every op runs on windows of its buffers: the wrapper may split a big tensor into row ranges,
// each a separate dispatch binding a window that starts at an aligned byte offset; the
// `*_off` params are the element offset of this dispatch's first element inside its window.
//
// Row statistics. LayerNorm uses a one-pass, numerically robust scheme: each lane reads its
// elements in groups of 4 (two-pass mean/M2 inside the group), merges groups into a running
// (count, mean, M2) with Chan's formula, and lanes are merged the same way. This matches
// PyTorch's biased variance to f32 rounding without a separate mean pass (x is read twice in
// total: statistics, then the output). RMSNorm sums squares.
//
// Two row schedules, same math:
//   row_thread: one invocation per row, no barriers. lavapipe (CPU) runs this ~5x faster than a
//               workgroup reduction, whose barriers become coroutine switches.
//   row_wg:     one workgroup per row, lane statistics merged through workgroup memory; for
//               real GPUs (coalesced loads, enough parallelism for a few thousand rows).

alias x_t = f32;
alias y_t = f32;

struct Params {
  rows: u32,    // rows in this dispatch
  d: u32,       // row length (elements)
  x_off: u32,   // element offset of this dispatch's first row in the x window
  y_off: u32,   // ... in the y window
  m_row0: u32,  // modulation: row index of this dispatch's first row, for the broadcast below
  m_div: u32,   // modulation row used by row r: ((m_row0 + r) / m_div) % m_mod; element (that * d + j)
  m_mod: u32,
  m_off: u32,   // element offset inside the shift/scale windows
  eps: f32,
  w_off: u32,   // element offset of the weight inside its window
  b_off: u32,   // element offset of the bias inside its window
  flags: u32,   // bit 0 weight, bit 1 bias, bit 2 modulation; bits 8-9 weight/bias dtype, bits 10-11 shift/scale dtype
}

override WG: u32 = 64u;
// 0 LayerNorm, 1 RMSNorm
override NORM: u32 = 0u;
// gamma dtype of l2_apply (0 f32, 1 f16, 2 bf16)
override W_DTYPE: u32 = 0u;

// The optional operands and their dtypes are runtime flags, not overrides: the branches are
// uniform (free on every GPU, scalar on lavapipe), and one pipeline serves every variant.
// lavapipe JIT-compiles each pipeline at its first dispatch (~1 s each here), so fewer is better.
fn has_w() -> bool { return (P.flags & 1u) != 0u; }
fn has_b() -> bool { return (P.flags & 2u) != 0u; }
fn has_mod() -> bool { return (P.flags & 4u) != 0u; }
fn w_dtype() -> u32 { return (P.flags >> 8u) & 3u; }
fn m_dtype() -> u32 { return (P.flags >> 10u) & 3u; }

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<x_t>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<u32>;
@group(0) @binding(4) var<storage, read> shift: array<u32>;
@group(0) @binding(5) var<storage, read> scale: array<u32>;
@group(0) @binding(6) var<storage, read_write> y: array<y_t>;

//!include lib/dtype.wgsl

fn ld_w(j0: u32) -> f32 { let j = j0 + P.w_off; let c = w_dtype(); return widen(w[word_index(j, c)], j, c); }
fn ld_b(j0: u32) -> f32 { let j = j0 + P.b_off; let c = w_dtype(); return widen(bias[word_index(j, c)], j, c); }
fn ld_shift(j: u32) -> f32 { let c = m_dtype(); return widen(shift[word_index(j, c)], j, c); }
fn ld_scale(j: u32) -> f32 { let c = m_dtype(); return widen(scale[word_index(j, c)], j, c); }

// Running statistics of a set of values: count, mean, M2 = sum of squared deviations
// (RMSNorm: M2 holds the plain sum of squares and mean is unused).
struct Stats {
  n: f32,
  mean: f32,
  m2: f32,
}

fn merge(a: Stats, b: Stats) -> Stats {
  let n = a.n + b.n;
  if (n == 0.0) { return a; }
  if (NORM == 1u) { return Stats(n, 0.0, a.m2 + b.m2); }
  let delta = b.mean - a.mean;
  let fb = b.n / n;
  return Stats(n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb);
}

// Statistics of the elements j0, j0+step, j0+2*step, ... (< d) of the row starting at x[base].
fn lane_stats(base: u32, j0: u32, step: u32) -> Stats {
  var s = Stats(0.0, 0.0, 0.0);
  let d = P.d;
  for (var j = j0; j < d; j += 4u * step) {
    // a group of up to 4 values; missing ones are masked out of the sums
    let j1 = j + step;
    let j2 = j1 + step;
    let j3 = j2 + step;
    let v0 = f32(x[base + j]);
    let v1 = select(0.0, f32(x[base + min(j1, d - 1u)]), j1 < d);
    let v2 = select(0.0, f32(x[base + min(j2, d - 1u)]), j2 < d);
    let v3 = select(0.0, f32(x[base + min(j3, d - 1u)]), j3 < d);
    let cnt = 1.0 + select(0.0, 1.0, j1 < d) + select(0.0, 1.0, j2 < d) + select(0.0, 1.0, j3 < d);
    var g: Stats;
    if (NORM == 1u) {
      g = Stats(cnt, 0.0, v0 * v0 + v1 * v1 + v2 * v2 + v3 * v3);
    } else {
      let m = (v0 + v1 + v2 + v3) / cnt;
      let e0 = v0 - m;
      let e1 = select(0.0, v1 - m, j1 < d);
      let e2 = select(0.0, v2 - m, j2 < d);
      let e3 = select(0.0, v3 - m, j3 < d);
      g = Stats(cnt, m, e0 * e0 + e1 * e1 + e2 * e2 + e3 * e3);
    }
    s = merge(s, g);
  }
  return s;
}

// (mean, 1/std) of a row from its merged statistics (biased variance, like PyTorch).
fn finish(s: Stats) -> vec2<f32> {
  let d = f32(P.d);
  if (NORM == 1u) { return vec2<f32>(0.0, 1.0 / sqrt(s.m2 / d + P.eps)); }
  return vec2<f32>(s.mean, 1.0 / sqrt(s.m2 / d + P.eps));
}

// y = ((x - mean) * rstd) [* w + b] [* (1 + scale) + shift], elements j0, j0+step, ... of row r
fn write_row(r: u32, mr: vec2<f32>, j0: u32, step: u32) {
  let d = P.d;
  let xb = P.x_off + r * d;
  let yb = P.y_off + r * d;
  let hw = has_w();
  let hb = has_b();
  let hm = has_mod();
  var mb = 0u;
  if (hm) { mb = P.m_off + ((P.m_row0 + r) / P.m_div) % P.m_mod * d; }
  for (var j = j0; j < d; j += step) {
    var v = (f32(x[xb + j]) - mr.x) * mr.y;
    if (hw) { v = v * ld_w(j); }
    if (hb) { v = v + ld_b(j); }
    if (hm) { v = v * (1.0 + ld_scale(mb + j)) + ld_shift(mb + j); }
    y[yb + j] = y_t(v);
  }
}

// ---------------------------------------------------------------- one invocation per row
@compute @workgroup_size(WG)
fn row_thread(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let r = (wid.x + wid.y * nwg.x) * WG + lid.x;
  if (r >= P.rows) { return; }
  let mr = finish(lane_stats(P.x_off + r * P.d, 0u, 1u));
  write_row(r, mr, 0u, 1u);
}

// ---------------------------------------------------------------- one workgroup per row
// Lane statistics (count, mean, M2) go to workgroup memory; after ONE barrier every lane combines
// all WG entries with the parallel form of Chan's formula (no divisions, same order in every lane,
// so identical results and no second barrier):
//   mean = sum_k n_k mean_k / D,   M2 = sum_k M2_k + n_k (mean_k - mean)^2.
// A log2(WG) tree needs a barrier per level: llvmpipe's JIT time grows by seconds per barrier
// (6.7 s vs 1.4 s measured), and on GPUs the 2 x WG shared-memory reads are cheap next to the
// row's traffic.
var<workgroup> red: array<vec4<f32>, WG>;

@compute @workgroup_size(WG)
fn row_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let r = wid.x + wid.y * nwg.x; // uniform across the workgroup: the early return keeps the barrier uniform
  if (r >= P.rows) { return; }
  let l = lid.x;
  let s = lane_stats(P.x_off + r * P.d, l, WG);
  red[l] = vec4<f32>(s.n, s.mean, s.m2, 0.0);
  workgroupBarrier();
  var mean = 0.0;
  if (NORM == 0u) {
    var sm = 0.0;
    for (var k = 0u; k < WG; k++) {
      let q = red[k];
      sm += q.x * q.y;
    }
    mean = sm / f32(P.d);
  }
  var m2 = 0.0;
  for (var k = 0u; k < WG; k++) {
    let q = red[k];
    let dm = q.y - mean;
    m2 += select(q.z + q.x * dm * dm, q.z, NORM == 1u);
  }
  write_row(r, finish(Stats(f32(P.d), mean, m2)), l, WG);
}

// ================================================================= channel L2 norm (Wan VAE RMS_norm)
// x [B, C, S] channel-first: y[b, c, s] = x[b, c, s] / max(||x[b, :, s]||_2, eps) * sqrt(C) * gamma[c].
// Two passes, each over a window of channels [c0, c0 + nc) of one batch: `l2_sumsq` accumulates
// sum over c of x^2 per position into ss [B*S] f32, `l2_apply` writes y. One invocation per
// position s, looping over the channels; consecutive invocations are consecutive positions, so
// each channel's loads are contiguous across lanes. gamma[c] is the same for all lanes (a
// uniform load, cheap on lavapipe).

struct L2Params {
  ns: u32,       // positions in this dispatch
  nc: u32,       // channels in this dispatch
  s_stride: u32, // elements between channels (S)
  x_off: u32,    // element offset of (c0, s0) inside the x window
  y_off: u32,    // ... inside the y window
  ss_off: u32,   // element offset of (b, s0) inside the ss window
  c0: u32,       // first channel (gamma index)
  accumulate: u32, // 0: ss = sum; 1: ss += sum
  scale: f32,    // sqrt(C)
  eps: f32,
  _p0: u32,
  _p1: u32,
}

@group(0) @binding(0) var<uniform> L: L2Params;
@group(0) @binding(1) var<storage, read> lx: array<x_t>;
@group(0) @binding(2) var<storage, read_write> lss: array<f32>;

@compute @workgroup_size(WG)
fn l2_sumsq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let s = (wid.x + wid.y * nwg.x) * WG + lid.x;
  if (s >= L.ns) { return; }
  // 4 partial sums (pairwise-ish) keep the f32 error of long channel sums small
  var acc = vec4<f32>(0.0);
  var i = L.x_off + s;
  var c = 0u;
  for (; c + 4u <= L.nc; c += 4u) {
    let a = f32(lx[i]);
    let b = f32(lx[i + L.s_stride]);
    let cc = f32(lx[i + 2u * L.s_stride]);
    let d = f32(lx[i + 3u * L.s_stride]);
    acc += vec4<f32>(a * a, b * b, cc * cc, d * d);
    i += 4u * L.s_stride;
  }
  for (; c < L.nc; c++) {
    let a = f32(lx[i]);
    acc.x += a * a;
    i += L.s_stride;
  }
  var t = (acc.x + acc.y) + (acc.z + acc.w);
  if (L.accumulate != 0u) { t += lss[L.ss_off + s]; }
  lss[L.ss_off + s] = t;
}

@group(0) @binding(1) var<storage, read> ax: array<x_t>;
@group(0) @binding(2) var<storage, read> ass: array<f32>;
@group(0) @binding(3) var<storage, read> agamma: array<u32>;
@group(0) @binding(4) var<storage, read_write> ay: array<y_t>;

@compute @workgroup_size(WG)
fn l2_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let s = (wid.x + wid.y * nwg.x) * WG + lid.x;
  if (s >= L.ns) { return; }
  let f = L.scale / max(sqrt(ass[L.ss_off + s]), L.eps);
  var i = L.x_off + s;
  var o = L.y_off + s;
  for (var c = 0u; c < L.nc; c++) {
    let g = widen(agamma[word_index(L.c0 + c, W_DTYPE)], L.c0 + c, W_DTYPE);
    ay[o] = y_t(f32(ax[i]) * f * g);
    i += L.s_stride;
    o += L.s_stride;
  }
}
