// Softmax over the last dim, and the subgroup-free attention kernel.
//
// softmax: y[r, :] = exp(x[r, :] - max) / sum(exp(x[r, :] - max)), computed in f32 with an online
// (running max, running sum) first pass and a second pass that writes. A row whose values are all
// -inf (nothing to attend) gives zeros. Two shapes of work:
//   softmax_rows: one invocation per row (many rows, any length);
//   softmax_wide: one workgroup per row (few long rows): lanes stride over the row, then a
//                 workgroup-memory tree reduction of the (max, sum) pairs.
//
// attention_portable: the same flash-style attention as attention.wgsl `flash` (online softmax,
// no L×L matrix), for adapters without the `subgroups` feature and for head dims that are not a
// multiple of 4. It lives here because attention.wgsl must `enable subgroups;`, which fails module
// creation on such adapters. One invocation per query; blocks of 8 keys read directly (the same
// address in every lane); scalar storage, so any head dim works. Slower on lavapipe, fine on GPUs.

alias x_t = f32;    // softmax input
alias y_t = f32;    // softmax output
alias in_t = f32;   // attention q, k, v
alias o_t = f32;    // attention output

const NEG: f32 = -1.0e30;   // running max before any value: exp(NEG - x) is 0, never NaN

// ---------------------------------------------------------------- softmax

struct Params {
  rows: u32,   // rows (product of the leading dims)
  n: u32,      // row length (elements)
  _pad0: u32,
  _pad1: u32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> sx: array<x_t>;
@group(0) @binding(2) var<storage, read_write> sy: array<y_t>;

var<workgroup> red_m: array<f32, WG>;
var<workgroup> red_l: array<f32, WG>;

// merge two (max, sum of exp(x - max)) pairs
fn merge(m1: f32, l1: f32, m2: f32, l2: f32) -> vec2<f32> {
  let mx = max(m1, m2);
  return vec2<f32>(mx, l1 * exp(m1 - mx) + l2 * exp(m2 - mx));
}

@compute @workgroup_size(WG)
fn softmax_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let r = (wid.x + wid.y * nwg.x) * WG + lane;
  if (r >= P.rows) { return; }
  let base = r * P.n;
  var m = NEG;
  var l = 0.0;
  for (var j = 0u; j < P.n; j++) {
    let x = max(f32(sx[base + j]), NEG);   // -inf counts as "nothing"
    let mx = max(m, x);
    l = l * exp(m - mx) + exp(x - mx);
    m = mx;
  }
  let all_neg = m <= NEG;
  let inv = select(1.0 / l, 0.0, all_neg);
  for (var j = 0u; j < P.n; j++) {
    sy[base + j] = y_t(exp(max(f32(sx[base + j]), NEG) - m) * inv);
  }
}

@compute @workgroup_size(WG)
fn softmax_wide(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let r = wid.x + wid.y * nwg.x;     // uniform: the whole workgroup leaves together
  if (r >= P.rows) { return; }
  let base = r * P.n;
  var m = NEG;
  var l = 0.0;
  for (var j = lane; j < P.n; j += WG) {
    let x = max(f32(sx[base + j]), NEG);
    let mx = max(m, x);
    l = l * exp(m - mx) + exp(x - mx);
    m = mx;
  }
  red_m[lane] = m;
  red_l[lane] = l;
  workgroupBarrier();
  for (var w = WG / 2u; w > 0u; w >>= 1u) {
    if (lane < w) {
      let c = merge(red_m[lane], red_l[lane], red_m[lane + w], red_l[lane + w]);
      red_m[lane] = c.x;
      red_l[lane] = c.y;
    }
    workgroupBarrier();
  }
  let mt = red_m[0];
  let lt = red_l[0];
  let inv = select(1.0 / lt, 0.0, mt <= NEG);
  for (var j = lane; j < P.n; j += WG) {
    sy[base + j] = y_t(exp(max(f32(sx[base + j]), NEG) - mt) * inv);
  }
}

// ---------------------------------------------------------------- attention (portable)
// Params and flags are attention.wgsl's; window bases are in elements (scalar storage) and the
// head dim may be anything.

struct AttnParams {
  //!include lib/attention_params.wgsl
}

//!include lib/attention_flags.wgsl

override AWG: u32 = 64u;

@group(0) @binding(0) var<uniform> A: AttnParams;
@group(0) @binding(1) var<storage, read> aq: array<in_t>;
@group(0) @binding(2) var<storage, read> ak: array<in_t>;
@group(0) @binding(3) var<storage, read> av: array<in_t>;
@group(0) @binding(4) var<storage, read> abias: array<f32>;
@group(0) @binding(5) var<storage, read> akmask: array<i32>;
@group(0) @binding(6) var<storage, read_write> ao: array<o_t>;
@group(0) @binding(7) var<storage, read_write> ast_acc: array<f32>;     // [rows, H, Dh] unnormalized
@group(0) @binding(8) var<storage, read_write> ast_ml: array<vec2<f32>>; // [rows, H] (m, l)

fn key_ok(b: u32, j: u32) -> f32 {
  var ok = select(0.0, 1.0, j < A.j1);
  if ((A.flags & FLAG_MASK) != 0u) { ok = select(0.0, ok, akmask[b * A.Lk + min(j, A.j1 - 1u)] != 0); }
  return ok;
}

fn bias_at(br: u32, j: u32) -> f32 {
  return abias[br + min(j, A.j1 - 1u)] * A.bias_scale;
}

@compute @workgroup_size(AWG)
fn attention_portable(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let g = wid.x + wid.y * nwg.x;
  if (g >= A.ngroups) { return; }
  let qt = g % A.qtiles;
  let bh = g / A.qtiles;
  let h = A.h0 + bh % A.nh;
  let b = A.b0 + bh / A.nh;
  let il = qt * AWG + lane;
  let qok = il < A.nq;
  let i = A.i0 + min(il, A.nq - 1u);
  let row = b * A.Lq + i;
  let srow = row * A.H + h;
  let qo = srow * A.Dh - A.q_base;
  let acc0 = srow * A.Dh - A.acc_base;
  var br = 0u;
  if ((A.flags & FLAG_BIAS_FULL) != 0u) { br = (h * A.Lq + i) * A.Lk - A.bias_base; }
  if ((A.flags & FLAG_BIAS_REL) != 0u) { br = h * (A.Lq + A.Lk - 1u) + A.Lq - 1u - i - A.bias_base; }
  var m = NEG;
  var l = 0.0;
  if (qok) {
    if ((A.flags & FLAG_STATE_IN) != 0u) {
      let ml = ast_ml[srow - A.s_row0];
      m = ml.x;
      l = ml.y;
    } else {
      for (var d = 0u; d < A.Dh; d++) { ast_acc[acc0 + d] = 0.0; }
    }
  }
  let kstride = A.H * A.Dh;
  let kv0 = (b * A.Lk * A.H + h) * A.Dh;
  let jl = A.j1 - 1u;
  for (var jb = A.j0; jb < A.j1; jb += 8u) {
    let r0 = kv0 + min(jb, jl) * kstride;
    let r1 = kv0 + min(jb + 1u, jl) * kstride;
    let r2 = kv0 + min(jb + 2u, jl) * kstride;
    let r3 = kv0 + min(jb + 3u, jl) * kstride;
    let r4 = kv0 + min(jb + 4u, jl) * kstride;
    let r5 = kv0 + min(jb + 5u, jl) * kstride;
    let r6 = kv0 + min(jb + 6u, jl) * kstride;
    let r7 = kv0 + min(jb + 7u, jl) * kstride;
    var s_lo = vec4<f32>(0.0);
    var s_hi = vec4<f32>(0.0);
    for (var d = 0u; d < A.Dh; d++) {
      let qd = f32(aq[qo + d]);
      let kd = d - A.k_base;   // wraps: r + kd = r + d - k_base (u32 arithmetic is modular)
      s_lo += qd * vec4<f32>(f32(ak[r0 + kd]), f32(ak[r1 + kd]), f32(ak[r2 + kd]), f32(ak[r3 + kd]));
      s_hi += qd * vec4<f32>(f32(ak[r4 + kd]), f32(ak[r5 + kd]), f32(ak[r6 + kd]), f32(ak[r7 + kd]));
    }
    s_lo *= A.scale;
    s_hi *= A.scale;
    if ((A.flags & (FLAG_BIAS_FULL | FLAG_BIAS_REL)) != 0u) {
      s_lo += vec4<f32>(bias_at(br, jb), bias_at(br, jb + 1u), bias_at(br, jb + 2u), bias_at(br, jb + 3u));
      s_hi += vec4<f32>(bias_at(br, jb + 4u), bias_at(br, jb + 5u), bias_at(br, jb + 6u), bias_at(br, jb + 7u));
    }
    let ok_lo = vec4<f32>(key_ok(b, jb), key_ok(b, jb + 1u), key_ok(b, jb + 2u), key_ok(b, jb + 3u)) > vec4<f32>(0.5);
    let ok_hi = vec4<f32>(key_ok(b, jb + 4u), key_ok(b, jb + 5u), key_ok(b, jb + 6u), key_ok(b, jb + 7u)) > vec4<f32>(0.5);
    s_lo = select(vec4<f32>(NEG), max(s_lo, vec4<f32>(NEG)), ok_lo);   // masked / -inf: NEG, p = 0
    s_hi = select(vec4<f32>(NEG), max(s_hi, vec4<f32>(NEG)), ok_hi);
    let mx4 = max(s_lo, s_hi);
    let mb = max(m, max(max(mx4.x, mx4.y), max(mx4.z, mx4.w)));
    let alpha = exp2(m - mb);
    m = mb;
    let p_lo = select(vec4<f32>(0.0), exp2(s_lo - vec4<f32>(mb)), s_lo > vec4<f32>(NEG));
    let p_hi = select(vec4<f32>(0.0), exp2(s_hi - vec4<f32>(mb)), s_hi > vec4<f32>(NEG));
    let ps = p_lo + p_hi;
    l = l * alpha + (ps.x + ps.y + ps.z + ps.w);
    if (qok) {
      for (var d = 0u; d < A.Dh; d++) {
        let vd = d - A.v_base;   // wraps, as kd above
        let pv = dot(p_lo, vec4<f32>(f32(av[r0 + vd]), f32(av[r1 + vd]), f32(av[r2 + vd]), f32(av[r3 + vd])))
               + dot(p_hi, vec4<f32>(f32(av[r4 + vd]), f32(av[r5 + vd]), f32(av[r6 + vd]), f32(av[r7 + vd])));
        ast_acc[acc0 + d] = ast_acc[acc0 + d] * alpha + pv;
      }
    }
  }
  if (!qok) { return; }
  if ((A.flags & FLAG_FINAL) == 0u) {
    ast_ml[srow - A.s_row0] = vec2<f32>(m, l);
    return;
  }
  // a row without any attendable key (all masked, or Lk == 0) is zero
  let inv = select(0.0, 1.0 / l, l > 0.0);
  if ((A.flags & FLAG_ACC_IS_OUT) != 0u) {
    for (var d = 0u; d < A.Dh; d++) { ast_acc[acc0 + d] = ast_acc[acc0 + d] * inv; }
  } else {
    let oo = srow * A.Dh - A.o_base;
    for (var d = 0u; d < A.Dh; d++) { ao[oo + d] = o_t(ast_acc[acc0 + d] * inv); }
  }
}
