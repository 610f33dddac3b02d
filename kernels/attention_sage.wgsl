// Quantized ("SageAttention"-style) fused attention: INT8 Q·Kᵀ with a smoothed K, f32 online
// softmax, P·V in f16 (adapters with shader-f16) or f32. src/ops/attention_sage.ts drives it; the
// CPU reference of exactly this math is src/ops/cpu/attention_sage.ts.
//
// Per (batch, head), into per-head workspaces (reused head after head):
//   sage_kmean  ksum[d] = sum over keys of k[b, j, h, d] (f32; per thread a strided sum of rows
//               t, t + 64, ..., then a tree over the 64 threads; chunks of rows add up)
//   sage_quant  per block of QB = 64 rows: x = row - mean (K only: mean = ksum * (1 / Lk), which
//               leaves softmax(q·k) unchanged: it adds q·mean to every score of a row);
//               amax = max |x| over the block; scale = amax / 127; int8 = clamp(round(x *
//               (127 / amax)), -127, 127) with round() = round-half-to-even; four int8 packed per
//               u32 (pack4xI8, lowest byte = lowest channel); block scale times `mul` (Q: the
//               softmax scale times log2(e), so scores come out in the exp2 domain). For K the
//               same dispatch also copies V into vd ([keys, Dh] rows, v_t = f16 or f32).
//   sage_flash  one invocation per query, 64 per workgroup; keys in blocks of KB = 16: the block's
//               packed K rows go to workgroup memory, each invocation computes its 16 integer dot
//               products with dot4I8Packed (exact i32), scores = f32(dot) * qscale * kscale, online
//               softmax in f32 (exp2), acc = acc * alpha + sum_j v_t(p_j) * vd[j] (the product in
//               v_t, each product widened to f32 and summed in f32); st_acc holds the unnormalized
//               accumulator ([query rows of the dispatch, Dh / 4] vec4<f32>); the last block
//               writes acc / l. Each block's V rows are staged in workgroup memory next to K
//               (VSTAGE, when both fit the adapter's workgroup storage; 2.5x faster on llvmpipe),
//               else read from storage.

alias in_t = f32;   // q / k / v storage
alias v_t = f32;    // the V copy and the P·V products (f16 with shader-f16)
alias o_t = f32;    // output storage

override DH4: u32 = 32u;         // head dim / 4
override KT: u32 = 512u;         // KB * DH4: words of the workgroup tile of packed K
override VT: u32 = 512u;         // KB * DH4 when V is staged in workgroup memory (VSTAGE), else 1
override VSTAGE: bool = true;    // stage each block's V rows in workgroup memory (else read them from storage)

const QB: u32 = 64u;             // rows per quantization block (= workgroup size of sage_quant)
const KB: u32 = 16u;             // keys per online-softmax block of sage_flash
const NEG: f32 = -1.0e30;        // running max before any key (finite: exp2(NEG - x) is 0)

// ---------------------------------------------------------------- sage_kmean

struct KmParams {
  n: u32,          // key rows in this chunk
  H: u32,
  dh4: u32,
  row0: u32,       // full-tensor row (b * Lk + j0) of the chunk's first key
  h: u32,
  k_base: u32,     // window start of k (vec4 units)
  first: u32,      // 1: the first chunk (ksum starts at zero)
  _pad: u32,
}

@group(0) @binding(0) var<uniform> KM: KmParams;
@group(0) @binding(1) var<storage, read> km_k: array<vec4<in_t>>;
@group(0) @binding(2) var<storage, read_write> km_sum: array<vec4<f32>>;

var<workgroup> red4: array<vec4<f32>, 64>;

@compute @workgroup_size(64)
fn sage_kmean(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let d4 = wid.x + wid.y * nwg.x;   // uniform per workgroup
  var s = vec4<f32>(0.0);
  if (d4 < KM.dh4) {
    for (var r = t; r < KM.n; r += 64u) {
      s += vec4<f32>(km_k[((KM.row0 + r) * KM.H + KM.h) * KM.dh4 + d4 - KM.k_base]);
    }
  }
  red4[t] = s;
  workgroupBarrier();
  for (var w = 32u; w > 0u; w >>= 1u) {
    if (t < w) { red4[t] = red4[t] + red4[t + w]; }
    workgroupBarrier();
  }
  if (t == 0u && d4 < KM.dh4) {
    var prev = vec4<f32>(0.0);
    if (KM.first == 0u) { prev = km_sum[d4]; }
    km_sum[d4] = prev + red4[0];
  }
}

// ---------------------------------------------------------------- sage_quant

struct QuParams {
  n: u32,          // rows in this chunk
  H: u32,
  dh4: u32,
  row0: u32,       // full-tensor row (b * L + j0) of the chunk's first row
  h: u32,
  src_base: u32,   // window start of the source (vec4 units)
  v_base: u32,     // window start of v (vec4 units; K only)
  dst_row0: u32,   // workspace row of the chunk's first row (j0)
  blk0: u32,       // scale index of the chunk's first block (j0 / QB)
  smooth_k: u32,     // 1: K (subtract the mean over keys, copy V)
  mul: f32,        // multiplier of the stored scale (Q: softmax scale * log2(e); K: 1)
  inv_n: f32,      // 1 / Lk (the mean)
}

@group(0) @binding(0) var<uniform> QU: QuParams;
@group(0) @binding(1) var<storage, read> qu_src: array<vec4<in_t>>;
@group(0) @binding(2) var<storage, read> qu_v: array<vec4<in_t>>;
@group(0) @binding(3) var<storage, read> qu_sum: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> qu_dst: array<u32>;
@group(0) @binding(5) var<storage, read_write> qu_vd: array<vec4<v_t>>;
@group(0) @binding(6) var<storage, read_write> qu_scale: array<f32>;

var<workgroup> redm: array<f32, 64>;

fn qu_x(src: u32, d4: u32) -> vec4<f32> {
  let x = vec4<f32>(qu_src[src + d4]);
  if (QU.smooth_k != 0u) { return x - qu_sum[d4] * QU.inv_n; }
  return x;
}

@compute @workgroup_size(64)
fn sage_quant(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let blk = wid.x + wid.y * nwg.x;
  let r = blk * QB + t;
  let ok = r < QU.n;
  let rr = min(r, max(QU.n, 1u) - 1u);
  let src = ((QU.row0 + rr) * QU.H + QU.h) * QU.dh4 - QU.src_base;
  var amax = 0.0;
  if (ok) {
    for (var d4 = 0u; d4 < QU.dh4; d4++) {
      let a = abs(qu_x(src, d4));
      amax = max(amax, max(max(a.x, a.y), max(a.z, a.w)));
    }
  }
  redm[t] = amax;
  workgroupBarrier();
  for (var w = 32u; w > 0u; w >>= 1u) {
    if (t < w) { redm[t] = max(redm[t], redm[t + w]); }
    workgroupBarrier();
  }
  let bmax = redm[0];
  let inv = select(0.0, 127.0 / bmax, bmax > 0.0);
  if (t == 0u && blk * QB < QU.n) { qu_scale[QU.blk0 + blk] = (bmax / 127.0) * QU.mul; }
  if (!ok) { return; }
  let dst = (QU.dst_row0 + r) * QU.dh4;
  for (var d4 = 0u; d4 < QU.dh4; d4++) {
    let qi = clamp(vec4<i32>(round(qu_x(src, d4) * inv)), vec4<i32>(-127), vec4<i32>(127));
    qu_dst[dst + d4] = pack4xI8(qi);
  }
  if (QU.smooth_k != 0u) {
    let vs = ((QU.row0 + r) * QU.H + QU.h) * QU.dh4 - QU.v_base;
    for (var d4 = 0u; d4 < QU.dh4; d4++) { qu_vd[dst + d4] = vec4<v_t>(qu_v[vs + d4]); }
  }
}

// ---------------------------------------------------------------- sage_flash

struct FlParams {
  Lq: u32,         // queries per batch (full)
  Lk: u32,         // keys
  H: u32,
  dh4: u32,
  b: u32,
  h: u32,
  i0: u32,         // first query of this dispatch
  nq: u32,         // queries in this dispatch
  o_base: u32,     // output window start (elements)
  _p0: u32,
  _p1: u32,
  _p2: u32,
}

@group(0) @binding(0) var<uniform> FL: FlParams;
@group(0) @binding(1) var<storage, read> fl_q: array<u32>;        // [Lq, dh4] packed int8 (this head)
@group(0) @binding(2) var<storage, read> fl_qs: array<f32>;       // [ceil(Lq / QB)] scales (times softmax scale * log2 e)
@group(0) @binding(3) var<storage, read> fl_k: array<u32>;        // [Lk, dh4] packed int8, smoothed
@group(0) @binding(4) var<storage, read> fl_ks: array<f32>;       // [ceil(Lk / QB)]
@group(0) @binding(5) var<storage, read> fl_v: array<vec4<v_t>>;  // [Lk, dh4]
@group(0) @binding(6) var<storage, read_write> fl_acc: array<vec4<f32>>; // [nq, dh4]
@group(0) @binding(7) var<storage, read_write> fl_o: array<o_t>;  // [B, Lq, H, Dh] window

var<workgroup> kt: array<u32, KT>;
var<workgroup> kst: array<f32, KB>;
var<workgroup> vt: array<vec4<v_t>, VT>;

fn vrow(j: u32, jb: u32, d4: u32) -> vec4<v_t> {
  if (VSTAGE) { return vt[(j - jb) * DH4 + d4]; }
  return fl_v[min(j, FL.Lk - 1u) * DH4 + d4];
}

fn dots4(qw: u32, k0: u32) -> vec4<i32> {
  return vec4<i32>(dot4I8Packed(qw, kt[k0]), dot4I8Packed(qw, kt[k0 + DH4]), dot4I8Packed(qw, kt[k0 + 2u * DH4]), dot4I8Packed(qw, kt[k0 + 3u * DH4]));
}

// sum over keys j0 .. j0 + 3 of v_t(p_j) * v[j], each product widened to f32
fn pv4(p: vec4<f32>, j0: u32, jb: u32, d4: u32) -> vec4<f32> {
  let a = vec4<f32>(v_t(p.x) * vrow(j0, jb, d4));
  let b = vec4<f32>(v_t(p.y) * vrow(j0 + 1u, jb, d4));
  let c = vec4<f32>(v_t(p.z) * vrow(j0 + 2u, jb, d4));
  let d = vec4<f32>(v_t(p.w) * vrow(j0 + 3u, jb, d4));
  return ((a + b) + c) + d;
}

fn keymask(jb: u32, x: vec4<f32>) -> vec4<f32> {
  let ok = vec4<u32>(jb, jb + 1u, jb + 2u, jb + 3u) < vec4<u32>(FL.Lk);
  return select(vec4<f32>(NEG), x, ok);
}

@compute @workgroup_size(64)
fn sage_flash(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
  let g = wid.x + wid.y * nwg.x;
  let il = g * 64u + t;                  // query within the dispatch
  let ok = il < FL.nq;
  let ilc = min(il, FL.nq - 1u);
  let i = FL.i0 + ilc;
  let qrow = i * DH4;
  let qsc = fl_qs[i / QB];
  let arow = ilc * DH4;
  if (ok) {
    for (var d4 = 0u; d4 < DH4; d4++) { fl_acc[arow + d4] = vec4<f32>(0.0); }
  }
  var m = NEG;
  var l = 0.0;
  for (var jb = 0u; jb < FL.Lk; jb += KB) {
    workgroupBarrier();
    for (var x = t; x < KB * DH4; x += 64u) {
      let j = min(jb + x / DH4, FL.Lk - 1u);
      kt[x] = fl_k[j * DH4 + x % DH4];
      if (VSTAGE) { vt[x] = fl_v[j * DH4 + x % DH4]; }
    }
    if (t < KB) { kst[t] = fl_ks[min(jb + t, FL.Lk - 1u) / QB]; }
    workgroupBarrier();
    var s0 = vec4<i32>(0);
    var s1 = vec4<i32>(0);
    var s2 = vec4<i32>(0);
    var s3 = vec4<i32>(0);
    for (var w = 0u; w < DH4; w++) {
      let qw = fl_q[qrow + w];
      s0 += dots4(qw, w);
      s1 += dots4(qw, w + 4u * DH4);
      s2 += dots4(qw, w + 8u * DH4);
      s3 += dots4(qw, w + 12u * DH4);
    }
    let f0 = keymask(jb, vec4<f32>(s0) * qsc * vec4<f32>(kst[0], kst[1], kst[2], kst[3]));
    let f1 = keymask(jb + 4u, vec4<f32>(s1) * qsc * vec4<f32>(kst[4], kst[5], kst[6], kst[7]));
    let f2 = keymask(jb + 8u, vec4<f32>(s2) * qsc * vec4<f32>(kst[8], kst[9], kst[10], kst[11]));
    let f3 = keymask(jb + 12u, vec4<f32>(s3) * qsc * vec4<f32>(kst[12], kst[13], kst[14], kst[15]));
    let mx = max(max(f0, f1), max(f2, f3));
    let mb = max(m, max(max(mx.x, mx.y), max(mx.z, mx.w)));
    let alpha = exp2(m - mb);
    m = mb;
    let p0 = select(vec4<f32>(0.0), exp2(f0 - vec4<f32>(mb)), f0 > vec4<f32>(NEG));
    let p1 = select(vec4<f32>(0.0), exp2(f1 - vec4<f32>(mb)), f1 > vec4<f32>(NEG));
    let p2 = select(vec4<f32>(0.0), exp2(f2 - vec4<f32>(mb)), f2 > vec4<f32>(NEG));
    let p3 = select(vec4<f32>(0.0), exp2(f3 - vec4<f32>(mb)), f3 > vec4<f32>(NEG));
    let ps = (p0 + p1) + (p2 + p3);
    l = l * alpha + ((ps.x + ps.y) + (ps.z + ps.w));
    if (ok) {
      for (var d4 = 0u; d4 < DH4; d4++) {
        let a = (pv4(p0, jb, jb, d4) + pv4(p1, jb + 4u, jb, d4)) + (pv4(p2, jb + 8u, jb, d4) + pv4(p3, jb + 12u, jb, d4));
        fl_acc[arow + d4] = fl_acc[arow + d4] * alpha + a;
      }
    }
  }
  if (!ok) { return; }
  let inv = select(0.0, 1.0 / l, l > 0.0);
  let ob = ((FL.b * FL.Lq + i) * FL.H + FL.h) * DH4 * 4u - FL.o_base;
  for (var d4 = 0u; d4 < DH4; d4++) {
    let y = fl_acc[arow + d4] * inv;
    fl_o[ob + d4 * 4u] = o_t(y.x);
    fl_o[ob + d4 * 4u + 1u] = o_t(y.y);
    fl_o[ob + d4 * 4u + 2u] = o_t(y.z);
    fl_o[ob + d4 * 4u + 3u] = o_t(y.w);
  }
}
