// General convolution kernel: any kernel size, stride and zero padding (x [B, Ci, T, H, W],
// w [Co, Ci, kt, kh, kw], y [B, Co, To, Ho, Wo], PyTorch order). It needs no subgroups, so it is
// also what runs on adapters without the 'subgroups' feature; shapes the fast paths of
// kernels/conv.wgsl cover (3x3 pad 1 and 1x1, spatial stride 1, vec4-aligned rows) go there.
//
// An invocation computes 4 consecutive positions of one output frame (flat over Ho x Wo) for
// 4 output channels; the 4 channels are the same for the whole workgroup. The windowed bindings
// are the ones of kernels/conv.wgsl (see there); Params are its fields (lib/conv_params.wgsl) plus
// the spatial geometry.
// Accumulation is f32.

alias x_t = f32;
alias y_t = f32;

struct Params {
  //!include lib/conv_params.wgsl
  _pad2: u32,
  kh: u32,
  kw: u32,
  sh: u32,
  sw: u32,
  ph: u32,        // zero padding above / below
  pw: u32,        // zero padding left / right
  w_dtype: u32,   // weight storage: 0 f32, 1 f16, 2 bf16
  _pad1: u32,
}

const WG: u32 = 64u;          // invocations per workgroup; a tile is WG * 4 positions
const TN: u32 = 4u;           // output channels per workgroup

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> X: array<x_t>;
@group(0) @binding(2) var<storage, read> Wt: array<u32>;
@group(0) @binding(3) var<storage, read> Bs: array<u32>;
@group(0) @binding(4) var<storage, read_write> Y: array<y_t>;

//!include lib/dtype.wgsl

// The weight dtype is a Params field here, not an override: this kernel is the slow path and one
// pipeline per dtype would cost seconds of lavapipe compile each.
fn weight(i: u32) -> f32 {
  return widen(Wt[word_index(i, P.w_dtype)], i, P.w_dtype);
}

fn bias(i: u32) -> f32 {
  return widen(Bs[word_index(i, P.b_dtype)], i, P.b_dtype);
}

// top-left input corner (may be negative: padding) of output position p of the frame
fn corner(p: u32) -> vec2<i32> {
  return vec2<i32>(i32((p / P.wo) * P.sh) - i32(P.ph), i32((p % P.wo) * P.sw) - i32(P.pw));
}

// x element (row-major offset) of tap (kb, kc) for a corner, or -1 when it falls in the padding
fn tap_index(c: vec2<i32>, kb: u32, kc: u32, frame: u32) -> i32 {
  let hi = c.x + i32(kb);
  let wi = c.y + i32(kc);
  if (hi < 0 || hi >= i32(P.h) || wi < 0 || wi >= i32(P.w)) {
    return -1;
  }
  return i32(frame + u32(hi) * P.w + u32(wi));
}

fn xval(i: i32, xo: u32) -> f32 {
  if (i < 0) {
    return 0.0;
  }
  return f32(X[u32(i) + xo]);
}

// Stores (or adds, for later input-channel chunks) one position's `nco` channels.
fn store_pos(o: u32, p: u32, nco: u32, v: vec4<f32>) {
  if (p >= P.ho * P.wo) {
    return;
  }
  for (var n = 0u; n < nco; n++) {
    let oi = o + n * P.y_cs + p;
    var r = v[n];
    if (P.accumulate != 0u) {
      r += f32(Y[oi]);
    }
    Y[oi] = y_t(r);
  }
}

@compute @workgroup_size(WG)
fn conv_any(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let id = wid.x + wid.y * P.grid_x;
  if (id >= P.nb * P.tiles) { return; }
  let b = id / P.tiles;
  let q = id % P.tiles;
  let t = q / P.tiles_w;
  let plane = P.ho * P.wo;
  let p0 = (q % P.tiles_w) * (WG * 4u) + lid.x * 4u;   // this invocation's 4 positions p0..p0+3
  let co0 = wid.z * TN;
  let nco = min(TN, P.co - co0);
  let kk = P.kt * P.kh * P.kw;
  let xb = P.x_off + b * P.x_bs;
  let c0 = corner(min(p0, plane - 1u));
  let c1 = corner(min(p0 + 1u, plane - 1u));
  let c2 = corner(min(p0 + 2u, plane - 1u));
  let c3 = corner(min(p0 + 3u, plane - 1u));
  // weight rows of the 4 channels (clamped: channels past Co are computed, never stored)
  let w0 = P.w_off + min(co0, P.co - 1u) * P.w_row;
  let w1 = P.w_off + min(co0 + 1u, P.co - 1u) * P.w_row;
  let w2 = P.w_off + min(co0 + 2u, P.co - 1u) * P.w_row;
  let w3 = P.w_off + min(co0 + 3u, P.co - 1u) * P.w_row;
  // acc_j: position j, the 4 channels in the components
  var acc0 = vec4<f32>(0.0);
  var acc1 = vec4<f32>(0.0);
  var acc2 = vec4<f32>(0.0);
  var acc3 = vec4<f32>(0.0);
  for (var ka = 0u; ka < P.kt; ka++) {
    let ti = i32(t * P.st + ka) - P.pt;
    if (ti < 0 || ti >= i32(P.t)) { continue; }
    let frame = xb + u32(ti) * P.h * P.w;
    for (var kb = 0u; kb < P.kh; kb++) {
      for (var kc = 0u; kc < P.kw; kc++) {
        let i0 = tap_index(c0, kb, kc, frame);
        let i1 = tap_index(c1, kb, kc, frame);
        let i2 = tap_index(c2, kb, kc, frame);
        let i3 = tap_index(c3, kb, kc, frame);
        let tap = (ka * P.kh + kb) * P.kw + kc;
        for (var ci = 0u; ci < P.ci; ci++) {
          let xo = ci * P.x_cs;
          let wo = ci * kk + tap;
          let wv = vec4<f32>(weight(w0 + wo), weight(w1 + wo), weight(w2 + wo), weight(w3 + wo));
          acc0 += xval(i0, xo) * wv;
          acc1 += xval(i1, xo) * wv;
          acc2 += xval(i2, xo) * wv;
          acc3 += xval(i3, xo) * wv;
        }
      }
    }
  }
  var bv = vec4<f32>(0.0);
  if (P.has_bias != 0u && P.accumulate == 0u) {
    bv = vec4<f32>(bias(P.b_off + co0), bias(P.b_off + min(co0 + 1u, P.co - 1u)),
                   bias(P.b_off + min(co0 + 2u, P.co - 1u)), bias(P.b_off + min(co0 + 3u, P.co - 1u)));
  }
  let o = P.y_off + b * P.y_bs + co0 * P.y_cs + t * plane;
  store_pos(o, p0, nco, acc0 + bv);
  store_pos(o, p0 + 1u, nco, acc1 + bv);
  store_pos(o, p0 + 2u, nco, acc2 + bv);
  store_pos(o, p0 + 3u, nco, acc3 + bv);
}
