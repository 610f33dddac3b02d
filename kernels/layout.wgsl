// Layout kernels: one strided N-d "box copy" serves permute / transpose, slice and concat.
//
// A dispatch copies a box of up to 6 dims: for every coordinate c in the box,
//   dst[dst_base + sum_k c_k * dst_stride_k] = src[src_base + sum_k c_k * src_stride_k]
// (strides and bases in units of the entry point: u32 words, vec4<u32> or 16-bit halves).
// Data is copied as raw bits (u32 words), so one kernel serves f32 / i32 / u32, and f16 / bf16
// as word pairs whenever their runs are even (the wrapper converts); `copy_half` handles odd
// 16-bit layouts element by element.
//
// Scheduling: the box's dims are split into the `ni` innermost dims, decomposed per lane from
// wid.x * WG + lid.x (consecutive lanes -> consecutive innermost elements: coalesced on GPUs),
// and the outer dims, decomposed from the row index. Each invocation copies RB rows (block
// wid.y + wid.z * nwg.y): its lane offsets are computed once, and the row offsets are the same
// for the whole workgroup (uniform scalar math, cheap on lavapipe).

struct Params {
  o0: u32, o1: u32, o2: u32, o3: u32, o4: u32, o5: u32,   // box sizes, dim 5 innermost
  s0: u32, s1: u32, s2: u32, s3: u32, s4: u32, s5: u32,   // source strides
  t0: u32, t1: u32, t2: u32, t3: u32, t4: u32, t5: u32,   // destination strides
  src_base: u32,
  dst_base: u32,
  ni: u32,        // number of innermost dims decomposed per lane (1..nd)
  inner: u32,     // product of the ni innermost sizes
  parity: u32,    // copy_half: which destination halves this dispatch writes (0 even, 1 odd)
  rows: u32,      // product of the outer sizes (the grid's y*z may round it up)
  nd: u32,        // dims actually used (the rest are leading size-1 padding)
  r0: f32, r1: f32, r2: f32, r3: f32, r4: f32, r5: f32,   // 1 / size, for the per-lane division
}

override WG: u32 = 256u;
// box rows per invocation (the lane part of the index is computed once for all of them)
override RB: u32 = 8u;

@group(0) @binding(0) var<uniform> P: Params;

// (a / n, a % n) for a < 2^24 without an integer division: per-lane u32 division is scalarized
// by llvmpipe (8 hardware divides per SIMD op), the f32 estimate is one vector multiply. The
// estimate floor(a * (1/n)) is off by at most one for a < 2^24 (exact for n = 1, 2), fixed below.
fn divmod_small(a: u32, n: u32, inv: f32) -> vec2<u32> {
  var q = u32(f32(a) * inv);
  var r = i32(a) - i32(q * n);
  if (r < 0) { q -= 1u; r += i32(n); }
  if (r >= i32(n)) { q += 1u; r -= i32(n); }
  return vec2<u32>(q, u32(r));
}

// Coordinate along dim k (5 = innermost) of the lane part (depth < ni) or the row part
// (ni <= depth < nd) of a box index; `idx` is the remaining lane or row index. k is a constant
// at every call site and all conditions are uniform, so this unrolls into straight-line code.
fn lane_coord(k: u32, n: u32, inv: f32, idx: ptr<function, u32>) -> u32 {
  let depth = 5u - k;
  if (depth >= P.ni) { return 0u; }
  if (depth + 1u == P.ni) { return *idx; } // outermost lane dim: what is left of the lane index
  let qr = divmod_small(*idx, n, inv);
  *idx = qr.x;
  return qr.y;
}
fn row_coord(k: u32, n: u32, idx: ptr<function, u32>) -> u32 {
  let depth = 5u - k;
  if (depth < P.ni || depth >= P.nd) { return 0u; }
  let c = *idx % n;
  *idx = *idx / n;
  return c;
}

fn dot6(c0: u32, c1: u32, c2: u32, c3: u32, c4: u32, c5: u32, src: bool) -> u32 {
  if (src) { return c0 * P.s0 + c1 * P.s1 + c2 * P.s2 + c3 * P.s3 + c4 * P.s4 + c5 * P.s5; }
  return c0 * P.t0 + c1 * P.t1 + c2 * P.t2 + c3 * P.t3 + c4 * P.t4 + c5 * P.t5;
}

// (source, destination) offsets of the lane part: per lane, computed once per invocation.
fn lane_offsets(lane: u32) -> vec2<u32> {
  var l = lane;
  let c5 = lane_coord(5u, P.o5, P.r5, &l);
  let c4 = lane_coord(4u, P.o4, P.r4, &l);
  let c3 = lane_coord(3u, P.o3, P.r3, &l);
  let c2 = lane_coord(2u, P.o2, P.r2, &l);
  let c1 = lane_coord(1u, P.o1, P.r1, &l);
  let c0 = lane_coord(0u, P.o0, P.r0, &l);
  return vec2<u32>(P.src_base + dot6(c0, c1, c2, c3, c4, c5, true), P.dst_base + dot6(c0, c1, c2, c3, c4, c5, false));
}

// ... of the row part: the same for the whole workgroup (uniform scalar math on lavapipe).
fn row_offsets(row: u32) -> vec2<u32> {
  var r = row;
  let c5 = row_coord(5u, P.o5, &r);
  let c4 = row_coord(4u, P.o4, &r);
  let c3 = row_coord(3u, P.o3, &r);
  let c2 = row_coord(2u, P.o2, &r);
  let c1 = row_coord(1u, P.o1, &r);
  let c0 = row_coord(0u, P.o0, &r);
  return vec2<u32>(dot6(c0, c1, c2, c3, c4, c5, true), dot6(c0, c1, c2, c3, c4, c5, false));
}

// rows of one invocation: [first, end)
fn row_range(wid: vec3<u32>, nwg: vec3<u32>) -> vec2<u32> {
  let r0 = (wid.y + wid.z * nwg.y) * RB;
  return vec2<u32>(r0, min(r0 + RB, P.rows));
}

// ---------------------------------------------------------------- 32-bit words and 16-bit halves
@group(0) @binding(1) var<storage, read> src1: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst1: array<u32>;

// copy_w1 (half = false): units are u32 words. copy_half (half = true): units are 16-bit elements;
// each invocation moves one element with a read-modify-write of its destination word, and the
// wrapper runs the box twice, parity 0 then 1 (elements whose destination index is even, then
// odd), so no two invocations of one dispatch ever touch the same word. `half` is a literal at
// both call sites: each entry point compiles to its own loop body.
fn copy_u32(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>, half: bool) {
  let lane = wid.x * WG + lid.x;
  if (lane >= P.inner) { return; }
  let lo = lane_offsets(lane);
  let rr = row_range(wid, nwg);
  for (var r = rr.x; r < rr.y; r++) {
    let o = lo + row_offsets(r);
    if (!half) {
      dst1[o.y] = src1[o.x];
      continue;
    }
    let h = o.y & 1u;
    if (h == P.parity) {
      let v = (src1[o.x >> 1u] >> ((o.x & 1u) * 16u)) & 0xffffu;
      let w = o.y >> 1u;
      dst1[w] = (dst1[w] & ~(0xffffu << (16u * h))) | (v << (16u * h));
    }
  }
}

@compute @workgroup_size(WG)
fn copy_w1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  copy_u32(wid, nwg, lid, false);
}

@compute @workgroup_size(WG)
fn copy_half(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  copy_u32(wid, nwg, lid, true);
}

// ---------------------------------------------------------------- vec4<u32> (16-byte) units
// (its own loop: the array<vec4<u32>> views share binding numbers with the u32 ones above, and
// one entry point cannot use both)
@group(0) @binding(1) var<storage, read> src4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst4: array<vec4<u32>>;

@compute @workgroup_size(WG)
fn copy_w4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let lane = wid.x * WG + lid.x;
  if (lane >= P.inner) { return; }
  let lo = lane_offsets(lane);
  let rr = row_range(wid, nwg);
  for (var r = rr.x; r < rr.y; r++) {
    let o = lo + row_offsets(r);
    dst4[o.y] = src4[o.x];
  }
}
