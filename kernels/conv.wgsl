// Convolution fast paths (implicit GEMM, subgroup-shared operands) for the Wan VAE decoder:
//   conv_k3: kh = kw = 3, spatial padding 1, spatial stride 1, any kt / temporal padding / temporal
//            stride (CausalConv3d 3x3x3; Conv2d 3x3 is kt = 1)
//   conv_k1: kh = kw = 1, no spatial padding, spatial stride 1, any kt (1x1x1 convs, time_conv (3,1,1))
// Both need vec4-aligned rows (W % 4 == 0 for conv_k3, H*W % 4 == 0 for conv_k1, x starting at a
// multiple of 4 elements): every Wan VAE stage has that. Everything else goes to
// kernels/conv_generic.wgsl (which also serves adapters without subgroups). A scalar-load variant
// in this file was 10-40 % slower even when not taken, and doubled the pipelines to compile.
//
// Layout (PyTorch order): x [B, Ci, T, H, W], w [Co, Ci, kt, kh, kw], y [B, Co, To, Ho, Wo].
//
// Why this shape of kernel: on lavapipe every storage load whose address is not a compile-time
// constant is a per-lane scalar loop (~10 instructions per lane), while vector ALU work and
// subgroup broadcasts/shuffles are cheap. So each lane loads only data that is its own, and
// operands that all lanes need are loaded *once* by one lane and broadcast:
//   * a workgroup is one subgroup of 8 lanes and computes 64 consecutive output positions of one
//     output row (8 per lane, two vec4) for 8 output channels;
//   * per (input channel, kt, kh) each lane loads its 8 input columns (the kw = 0/1/2 taps are
//     those shifted by one position; the neighbours' elements come from subgroupShuffle and the
//     two row-tile halo elements from lanes 0 and 7);
//   * lane n loads the 3 kw-weights of output channel n and broadcasts them to all lanes;
//   * that is 5 loads per lane (2 vec4, 3 weights; +1 halo in lanes 0 and 7) for 192 vector
//     multiply-adds. (4 positions per lane, or 16 channels, measured slower: docs/notes/conv.md.)
// Accumulation is f32 whatever the storage types are.
//
// Large tensors: the op binds windows of x and y (see src/ops/conv.ts): `x_off`/`y_off` locate
// element (batch b0, channel c0, frame 0 of the window) inside the binding, and a dispatch may
// cover only some input channels (`accumulate` = 1 adds to y instead of overwriting it).

enable subgroups;

alias x_t = f32;
alias y_t = f32;

struct Params {
  //!include lib/conv_params.wgsl
  _pad0: u32,
}

// weight storage: 0 = f32, 1 = f16, 2 = bf16 (16-bit types packed two per u32 word). The bias
// dtype and flag are Params fields: every override value is one more pipeline variant, and
// lavapipe compiles each of these kernels for ~3 s on first use.
override W_DTYPE: u32 = 0u;
// output positions per workgroup (8 lanes x 8 consecutive positions)
const TILE: u32 = 64u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> X: array<x_t>;
@group(0) @binding(2) var<storage, read> X4: array<vec4<x_t>>;   // the same window as X
@group(0) @binding(3) var<storage, read> Wt: array<u32>;
@group(0) @binding(4) var<storage, read> Bs: array<u32>;
@group(0) @binding(5) var<storage, read_write> Y: array<y_t>;

//!include lib/dtype.wgsl

fn weight(i: u32) -> f32 {
  return widen(Wt[word_index(i, W_DTYPE)], i, W_DTYPE);
}

fn bias(i: u32) -> f32 {
  return widen(Bs[word_index(i, P.b_dtype)], i, P.b_dtype);
}

// 4 consecutive x elements: element i (a multiple of 4) of the row starting at element r (a
// multiple of 4); zeros past the row's n elements (n is a multiple of 4 too).
fn load4(r: u32, i: u32, n: u32) -> vec4<f32> {
  return select(vec4<f32>(0.0), vec4<f32>(X4[(r + i) >> 2u]), i < n);
}

// Stores (or, for later input-channel chunks, adds) 4 positions of one output channel; positions
// >= n are outside the row. Called from a runtime loop: unrolling it 16 times made the lavapipe
// compile of each pipeline variant take 20 s instead of 3 s.
fn store4(o: u32, p: u32, n: u32, v: vec4<f32>) {
  var r = v;
  if (P.accumulate != 0u) {
    if (p < n) { r.x += f32(Y[o]); }
    if (p + 1u < n) { r.y += f32(Y[o + 1u]); }
    if (p + 2u < n) { r.z += f32(Y[o + 2u]); }
    if (p + 3u < n) { r.w += f32(Y[o + 3u]); }
  }
  if (p < n) { Y[o] = y_t(r.x); }
  if (p + 1u < n) { Y[o + 1u] = y_t(r.y); }
  if (p + 2u < n) { Y[o + 2u] = y_t(r.z); }
  if (p + 3u < n) { Y[o + 3u] = y_t(r.w); }
}

// One lane's accumulators: 8 output channels (a0..a7) x its 8 positions (two vec4). Separate
// members, each indexed by literals only: a private array indexed at run time is an if-ladder.
struct Acc {
  a0: array<vec4<f32>, 2>,
  a1: array<vec4<f32>, 2>,
  a2: array<vec4<f32>, 2>,
  a3: array<vec4<f32>, 2>,
  a4: array<vec4<f32>, 2>,
  a5: array<vec4<f32>, 2>,
  a6: array<vec4<f32>, 2>,
  a7: array<vec4<f32>, 2>,
}

struct Tile {
  valid: bool,
  b: u32,       // batch element inside the dispatch
  t: u32,       // output frame inside the dispatch
  r: u32,       // output row (k3) / 0 (k1)
  p0: u32,      // first position of the tile along the row (k3) / the output plane (k1)
  co0: u32,     // first output channel of the tile (relative to the dispatch)
}

fn tile_of(wid: vec3<u32>, rows: u32) -> Tile {
  var tl: Tile;
  let id = wid.x + wid.y * P.grid_x;
  tl.valid = id < P.nb * P.tiles;
  let bt = id / P.tiles;
  let q = id % P.tiles;
  let tw = q % P.tiles_w;
  let rr = q / P.tiles_w;
  tl.b = bt;
  tl.r = rr % rows;
  tl.t = rr / rows;
  tl.p0 = tw * TILE;
  tl.co0 = wid.z * 8u;
  return tl;
}

// ---------------------------------------------------------------- 3x3 spatial, pad 1, stride 1

// One output channel's 8 positions (two vec4) += the three kw taps of one input row.
fn mac3(a: ptr<function, array<vec4<f32>, 2>>, w0: f32, w1: f32, w2: f32,
        l0: vec4<f32>, v0: vec4<f32>, r0: vec4<f32>, l1: vec4<f32>, v1: vec4<f32>, r1: vec4<f32>) {
  (*a)[0] += w0 * l0 + w1 * v0 + w2 * r0;
  (*a)[1] += w0 * l1 + w1 * v1 + w2 * r1;
}

@compute @workgroup_size(8)
fn conv_k3(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
  let tl = tile_of(wid, P.ho);
  if (!tl.valid) { return; }          // uniform: the whole workgroup leaves
  let kk = P.kt * 9u;
  let pl = tl.p0 + 8u * lane;          // this lane's first output (= input) column
  let xb0 = P.x_off + tl.b * P.x_bs;
  // halo: lane 0 reads the column left of the tile, lane 7 the one right of it
  let is_l = lane == 0u;
  let is_r = lane == 7u;
  let hcol = select(tl.p0 + TILE, tl.p0 - 1u, is_l);
  let hok = (is_l && tl.p0 > 0u) || (is_r && tl.p0 + TILE < P.w);
  // weights of output channel co0 + lane (clamped: lanes past Co load a valid row, never stored)
  let wrow = P.w_off + min(tl.co0 + lane, P.co - 1u) * P.w_row;
  var acc: Acc;
  for (var ka = 0u; ka < P.kt; ka++) {
    let ti = i32(tl.t * P.st + ka) - P.pt;
    if (ti < 0 || ti >= i32(P.t)) { continue; }
    for (var kb = 0u; kb < 3u; kb++) {
      let hi = i32(tl.r + kb) - 1;
      if (hi < 0 || hi >= i32(P.h)) { continue; }
      let row0 = xb0 + (u32(ti) * P.h + u32(hi)) * P.w;
      let wtap = wrow + (ka * 3u + kb) * 3u;
      for (var ci = 0u; ci < P.ci; ci++) {
        let row = row0 + ci * P.x_cs;
        let v0 = load4(row, pl, P.w);
        let v1 = load4(row, pl + 4u, P.w);
        var hv = 0.0;
        if (hok) { hv = f32(X[row + hcol]); }
        let left = select(subgroupShuffleUp(v1.w, 1u), subgroupBroadcast(hv, 0u), is_l);
        let right = select(subgroupShuffleDown(v0.x, 1u), subgroupBroadcast(hv, 7u), is_r);
        let l0 = vec4<f32>(left, v0.x, v0.y, v0.z);   // kw = 0: column - 1
        let r0 = vec4<f32>(v0.y, v0.z, v0.w, v1.x);   // kw = 2: column + 1
        let l1 = vec4<f32>(v0.w, v1.x, v1.y, v1.z);
        let r1 = vec4<f32>(v1.y, v1.z, v1.w, right);
        let wi = wtap + ci * kk;
        let w0 = weight(wi);
        let w1 = weight(wi + 1u);
        let w2 = weight(wi + 2u);
        mac3(&acc.a0, subgroupBroadcast(w0, 0u), subgroupBroadcast(w1, 0u), subgroupBroadcast(w2, 0u), l0, v0, r0, l1, v1, r1);
        mac3(&acc.a1, subgroupBroadcast(w0, 1u), subgroupBroadcast(w1, 1u), subgroupBroadcast(w2, 1u), l0, v0, r0, l1, v1, r1);
        mac3(&acc.a2, subgroupBroadcast(w0, 2u), subgroupBroadcast(w1, 2u), subgroupBroadcast(w2, 2u), l0, v0, r0, l1, v1, r1);
        mac3(&acc.a3, subgroupBroadcast(w0, 3u), subgroupBroadcast(w1, 3u), subgroupBroadcast(w2, 3u), l0, v0, r0, l1, v1, r1);
        mac3(&acc.a4, subgroupBroadcast(w0, 4u), subgroupBroadcast(w1, 4u), subgroupBroadcast(w2, 4u), l0, v0, r0, l1, v1, r1);
        mac3(&acc.a5, subgroupBroadcast(w0, 5u), subgroupBroadcast(w1, 5u), subgroupBroadcast(w2, 5u), l0, v0, r0, l1, v1, r1);
        mac3(&acc.a6, subgroupBroadcast(w0, 6u), subgroupBroadcast(w1, 6u), subgroupBroadcast(w2, 6u), l0, v0, r0, l1, v1, r1);
        mac3(&acc.a7, subgroupBroadcast(w0, 7u), subgroupBroadcast(w1, 7u), subgroupBroadcast(w2, 7u), l0, v0, r0, l1, v1, r1);
      }
    }
  }
  finish(tl, lane, pl, P.wo, tl.r * P.wo + pl, acc);
}

// ---------------------------------------------------------------- 1x1 spatial, no padding, stride 1

fn mac1(a: ptr<function, array<vec4<f32>, 2>>, w: f32, v0: vec4<f32>, v1: vec4<f32>) {
  (*a)[0] += w * v0;
  (*a)[1] += w * v1;
}

@compute @workgroup_size(8)
fn conv_k1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
  let tl = tile_of(wid, 1u);
  if (!tl.valid) { return; }
  let plane = P.h * P.w;               // = ho * wo: positions are flat over the frame
  let pl = tl.p0 + 8u * lane;
  let xb0 = P.x_off + tl.b * P.x_bs;
  let wrow = P.w_off + min(tl.co0 + lane, P.co - 1u) * P.w_row;
  var acc: Acc;
  for (var ka = 0u; ka < P.kt; ka++) {
    let ti = i32(tl.t * P.st + ka) - P.pt;
    if (ti < 0 || ti >= i32(P.t)) { continue; }
    let f0 = xb0 + u32(ti) * plane;
    for (var ci = 0u; ci < P.ci; ci++) {
      let row = f0 + ci * P.x_cs;
      let v0 = load4(row, pl, plane);
      let v1 = load4(row, pl + 4u, plane);
      let wv = weight(wrow + ci * P.kt + ka);
      mac1(&acc.a0, subgroupBroadcast(wv, 0u), v0, v1);
      mac1(&acc.a1, subgroupBroadcast(wv, 1u), v0, v1);
      mac1(&acc.a2, subgroupBroadcast(wv, 2u), v0, v1);
      mac1(&acc.a3, subgroupBroadcast(wv, 3u), v0, v1);
      mac1(&acc.a4, subgroupBroadcast(wv, 4u), v0, v1);
      mac1(&acc.a5, subgroupBroadcast(wv, 5u), v0, v1);
      mac1(&acc.a6, subgroupBroadcast(wv, 6u), v0, v1);
      mac1(&acc.a7, subgroupBroadcast(wv, 7u), v0, v1);
    }
  }
  finish(tl, lane, pl, plane, pl, acc);
}

// Adds the bias (first input-channel chunk only) and stores 8 channels x 8 positions per lane.
// `p` is the lane's first position along a row of `n` valid positions; `q` its offset in the frame.
fn finish(tl: Tile, lane: u32, p: u32, n: u32, q: u32, acc: Acc) {
  var bv = 0.0;
  if (P.has_bias != 0u && P.accumulate == 0u) {
    bv = bias(P.b_off + min(tl.co0 + lane, P.co - 1u));
  }
  // broadcasts in uniform control flow, then one store loop over the channels
  var r: array<array<vec4<f32>, 2>, 8>;
  var b: array<f32, 8>;
  r[0] = acc.a0; b[0] = subgroupBroadcast(bv, 0u);
  r[1] = acc.a1; b[1] = subgroupBroadcast(bv, 1u);
  r[2] = acc.a2; b[2] = subgroupBroadcast(bv, 2u);
  r[3] = acc.a3; b[3] = subgroupBroadcast(bv, 3u);
  r[4] = acc.a4; b[4] = subgroupBroadcast(bv, 4u);
  r[5] = acc.a5; b[5] = subgroupBroadcast(bv, 5u);
  r[6] = acc.a6; b[6] = subgroupBroadcast(bv, 6u);
  r[7] = acc.a7; b[7] = subgroupBroadcast(bv, 7u);
  let o = P.y_off + tl.b * P.y_bs + tl.co0 * P.y_cs + tl.t * P.ho * P.wo + q;
  let nco = min(8u, P.co - tl.co0);
  for (var c = 0u; c < nco; c++) {
    let oc = o + c * P.y_cs;
    store4(oc, p, n, r[c][0] + b[c]);
    store4(oc + 4u, p + 4u, n, r[c][1] + b[c]);
  }
}
