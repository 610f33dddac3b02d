// Elementwise kernels: unary (copy/cast, SiLU, GELU-tanh, affine, clamp), binary with a
// "(i / b_div) % b_mod" broadcast of the second operand, Wan's modulation x*(1+scale)+shift and
// the gated residual x + r*gate.
//
// Storage types are aliases so one file serves f32 and f16 activations (the loader rewrites the
// alias lines and adds `enable f16;`). Math is always f32.
//
// Two implementations of each op:
//  * `*4` (the fast path, used whenever the element count and the broadcast period are multiples
//    of 4): the output is viewed as [rows, cols4] vec4s; each invocation owns one vec4 column `c`
//    and R consecutive rows, so broadcast operands are indexed without any per-element integer
//    division (see "operand modes" below) and a row-broadcast operand (shift/scale/gate [D]) is
//    loaded once per R rows. On lavapipe this is 5-6x faster than one element per invocation:
//    per-invocation overhead (index math, u32 division, which LLVM scalarizes, bounds checks)
//    dominates, and every per-lane load is a scalar loop anyway (docs/notes/norm-layout.md).
//  * the scalar 1-element-per-invocation kernels (the fallback for odd shapes), with the
//    "(i / div) % mod" broadcast of the second/third operand.
// The grid is 1-D folded into x/y (linear workgroup id = wid.x + wid.y * nwg.x).

alias a_t = f32;
alias b_t = f32;
alias c_t = f32;
alias y_t = f32;

struct Params {
  n: u32,       // output elements
  b_div: u32,   // second operand index = (i / b_div) % b_mod   (in elements)
  b_mod: u32,
  c_div: u32,   // third operand index  = (i / c_div) % c_mod   (in elements)
  c_mod: u32,
  alpha: f32,
  beta: f32,
  op: u32,      // unary / binary: which operation (below)
}

override WG: u32 = 256u;
// vec4 kernels: rows per invocation
override R: u32 = 4u;
// vec4 kernels: how operand b / c is indexed (operand modes)
//   0 full:  same shape as the output, vec4 index r * cols4 + c
//   1 col:   varies along the row only, period p4 vec4s: vec4 index c % p4      (e.g. shift [D])
//   2 row:   one scalar per row group: index (r / rdiv) % rmod, splat to vec4  (e.g. [C,1,1] on [C,H,W])
override B_MODE: u32 = 0u;
override C_MODE: u32 = 0u;
// Operation codes (a runtime uniform, not an override: the branch is uniform, free on GPUs and a
// scalar branch on lavapipe, and one pipeline per entry keeps lavapipe's per-pipeline JIT cost
// (~1 s each) out of the test suite):
// unary:  0 copy/cast, 1 silu, 2 gelu_tanh, 3 alpha*x + beta, 4 clamp(x, alpha, beta)
// binary: 0 a+b, 1 a-b, 2 a*b, 3 a/b, 4 a + alpha*b, 5 a + alpha*(b - a)

@group(0) @binding(0) var<uniform> P: Params;

//!include lib/activations.wgsl

// The operations, on vec4 values whatever the kernel: the scalar kernels use lane x (the same
// operations in the same order, so both paths give bit-identical elements).
fn unary_f(x: vec4<f32>, op: u32, alpha: f32, beta: f32) -> vec4<f32> {
  switch (op) {
    case 1u: { return silu4(x); }
    case 2u: { return gelu_tanh4(x); }
    case 3u: { return alpha * x + beta; }
    case 4u: { return clamp(x, vec4<f32>(alpha), vec4<f32>(beta)); }
    default: { return x; }
  }
}

fn binary_f(a: vec4<f32>, b: vec4<f32>, op: u32, alpha: f32) -> vec4<f32> {
  switch (op) {
    case 1u: { return a - b; }
    case 2u: { return a * b; }
    case 3u: { return a / b; }
    case 4u: { return a + alpha * b; }
    case 5u: { return a + alpha * (b - a); }
    default: { return a + b; }
  }
}

fn lin_id(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
  return (wid.x + wid.y * nwg.x) * WG + lid.x;
}

// ---------------------------------------------------------------- unary: bindings (x, y)
@group(0) @binding(1) var<storage, read> ua: array<a_t>;
@group(0) @binding(2) var<storage, read_write> uy: array<y_t>;

@compute @workgroup_size(WG)
fn unary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = lin_id(wid, nwg, lid);
  if (i >= P.n) { return; }
  uy[i] = y_t(unary_f(vec4<f32>(f32(ua[i])), P.op, P.alpha, P.beta).x);
}

// ---------------------------------------------------------------- binary: bindings (a, b, y)
@group(0) @binding(1) var<storage, read> ba: array<a_t>;
@group(0) @binding(2) var<storage, read> bb: array<b_t>;
@group(0) @binding(3) var<storage, read_write> by: array<y_t>;

@compute @workgroup_size(WG)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = lin_id(wid, nwg, lid);
  if (i >= P.n) { return; }
  let b = f32(bb[(i / P.b_div) % P.b_mod]);
  by[i] = y_t(binary_f(vec4<f32>(f32(ba[i])), vec4<f32>(b), P.op, P.alpha).x);
}

// ------------------------------------- modulate / gated residual: bindings (x, b, c, y)
// modulate: y = x * (1 + c) + b (b = shift, indexed like b; c = scale, indexed like c, both usually
// [D] per row of x [L, D]); gated residual: y = x + b * c (b = r, x's shape; c = gate, indexed like c).
@group(0) @binding(1) var<storage, read> mx: array<a_t>;
@group(0) @binding(2) var<storage, read> mb: array<b_t>;
@group(0) @binding(3) var<storage, read> mc: array<c_t>;
@group(0) @binding(4) var<storage, read_write> my: array<y_t>;

// `gated` is a literal at both call sites: each entry point compiles to its own formula
fn ternary(i: u32, gated: bool) {
  let x = f32(mx[i]);
  let c = f32(mc[(i / P.c_div) % P.c_mod]);
  if (gated) {
    my[i] = y_t(x + f32(mb[i]) * c);
  } else {
    my[i] = y_t(x * (1.0 + c) + f32(mb[(i / P.b_div) % P.b_mod]));
  }
}

@compute @workgroup_size(WG)
fn modulate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = lin_id(wid, nwg, lid);
  if (i < P.n) { ternary(i, false); }
}

@compute @workgroup_size(WG)
fn gated_residual(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = lin_id(wid, nwg, lid);
  if (i < P.n) { ternary(i, true); }
}

// ================================================================= vec4 kernels
// Params of the vec4 kernels:
struct Params4 {
  n4: u32,      // output vec4s in this dispatch
  cols4: u32,   // vec4s per row of the [rows, cols4] view (the last row may be partial: i < n4)
  b_p: u32,     // operand b: col mode: period in vec4s; row mode: rows per group (rdiv)
  b_q: u32,     //            row mode: number of groups (rmod)
  c_p: u32,     // operand c: like b
  c_q: u32,
  alpha: f32,
  beta: f32,
  // Big tensors are split into row ranges, one dispatch each, binding windows: offsets of this
  // dispatch's first element inside each window (vec4s; a row-mode operand: elements), and the
  // global index of its first row (for row-mode operands).
  a_off: u32,
  b_off: u32,
  c_off: u32,
  y_off: u32,
  r0: u32,
  op: u32,      // unary / binary operation code (see Params)
}
@group(0) @binding(0) var<uniform> Q: Params4;

// Grid: x covers the columns (lane -> vec4 column c), y/z the blocks of R rows; the row block is
// the same for the whole workgroup, so row-dependent index math is uniform (scalar on lavapipe).

// An operand's index state along the R rows of one invocation.
struct Cursor {
  idx: u32,  // current element (row mode) or vec4 (col/full mode) index
  rem: u32,  // row mode: position inside the current group of rdiv rows
}

fn cursor_start(mode: u32, p: u32, q: u32, r0: u32, c: u32) -> Cursor {
  if (mode == 1u) { return Cursor(c % p, 0u); }
  if (mode == 2u) { let g = Q.r0 + r0; return Cursor((g / p) % q, g % p); }
  return Cursor(r0 * Q.cols4 + c, 0u);
}

fn cursor_next(mode: u32, p: u32, q: u32, k: Cursor) -> Cursor {
  if (mode == 1u) { return k; }
  if (mode == 2u) {
    var rem = k.rem + 1u;
    var idx = k.idx;
    if (rem == p) {
      rem = 0u;
      idx = idx + 1u;
      if (idx == q) { idx = 0u; }
    }
    return Cursor(idx, rem);
  }
  return Cursor(k.idx + Q.cols4, 0u);
}

// rows this invocation writes: R, fewer in the last block; a lane of the partial last row
// (i >= n4) stops before it. Computed once so the row loop has no early exit.
fn row_count(o: vec2<u32>) -> u32 {
  let rows = (Q.n4 + Q.cols4 - 1u) / Q.cols4;
  if (o.y >= rows) { return 0u; }
  var nr = min(R, rows - o.y);
  if ((o.y + nr - 1u) * Q.cols4 + o.x >= Q.n4) { nr -= 1u; }
  return nr;
}

// (column, first row) of this invocation; column 0xffffffff when outside the view
fn tile_origin(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> vec2<u32> {
  let c = wid.x * WG + lid.x;
  if (c >= Q.cols4) { return vec2<u32>(0xffffffffu, 0u); }
  return vec2<u32>(c, (wid.y + wid.z * nwg.y) * R);
}

// ---------------------------------------------------------------- unary4: bindings (x, y)
@group(0) @binding(1) var<storage, read> ua4: array<vec4<a_t>>;
@group(0) @binding(2) var<storage, read_write> uy4: array<vec4<y_t>>;

@compute @workgroup_size(WG)
fn unary4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let o = tile_origin(wid, nwg, lid);
  if (o.x == 0xffffffffu) { return; }
  var i = o.y * Q.cols4 + o.x;
  let nr = row_count(o);
  for (var k = 0u; k < nr; k++) {
    uy4[Q.y_off + i] = vec4<y_t>(unary_f(vec4<f32>(ua4[Q.a_off + i]), Q.op, Q.alpha, Q.beta));
    i += Q.cols4;
  }
}

// ---------------------------------------------------------------- binary4: bindings (a, b, y)
@group(0) @binding(1) var<storage, read> ba4: array<vec4<a_t>>;
@group(0) @binding(2) var<storage, read> bb4: array<vec4<b_t>>;
@group(0) @binding(3) var<storage, read_write> by4: array<vec4<y_t>>;
// binary4: B_MODE 0 or 1. binary4_row: b in row mode (one scalar per row group, e.g. a per-channel
// [C,1,1] or a scalar), read through this scalar view of the same binding.
@group(0) @binding(2) var<storage, read> bb1: array<b_t>;

@compute @workgroup_size(WG)
fn binary4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let o = tile_origin(wid, nwg, lid);
  if (o.x == 0xffffffffu) { return; }
  var i = o.y * Q.cols4 + o.x;
  var kb = cursor_start(B_MODE, Q.b_p, Q.b_q, o.y, o.x);
  // a col-mode operand is the same for all R rows: load it once
  var b = vec4<f32>(0.0);
  if (B_MODE == 1u) { b = vec4<f32>(bb4[Q.b_off + kb.idx]); }
  let nr = row_count(o);
  for (var k = 0u; k < nr; k++) {
    if (B_MODE != 1u) { b = vec4<f32>(bb4[Q.b_off + kb.idx]); }
    by4[Q.y_off + i] = vec4<y_t>(binary_f(vec4<f32>(ba4[Q.a_off + i]), b, Q.op, Q.alpha));
    i += Q.cols4;
    kb = cursor_next(B_MODE, Q.b_p, Q.b_q, kb);
  }
}

@compute @workgroup_size(WG)
fn binary4_row(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let o = tile_origin(wid, nwg, lid);
  if (o.x == 0xffffffffu) { return; }
  var i = o.y * Q.cols4 + o.x;
  var kb = cursor_start(2u, Q.b_p, Q.b_q, o.y, o.x);
  let nr = row_count(o);
  for (var k = 0u; k < nr; k++) {
    by4[Q.y_off + i] = vec4<y_t>(binary_f(vec4<f32>(ba4[Q.a_off + i]), vec4<f32>(f32(bb1[Q.b_off + kb.idx])), Q.op, Q.alpha));
    i += Q.cols4;
    kb = cursor_next(2u, Q.b_p, Q.b_q, kb);
  }
}

// ------------------------------------- modulate4 / gated4: bindings (x, b, c, y)
// modulate: y = x * (1 + c) + b  (b = shift, c = scale); gated: y = x + b * c (b = r, c = gate).
// B_MODE / C_MODE are 0 or 1 here (vec4 loads); an operand in row mode sends the op to the
// scalar kernels (the wrapper decides; Wan's shift/scale/gate are all [D] rows, col mode).
@group(0) @binding(1) var<storage, read> mx4: array<vec4<a_t>>;
@group(0) @binding(2) var<storage, read> mb4: array<vec4<b_t>>;
@group(0) @binding(3) var<storage, read> mc4: array<vec4<c_t>>;
@group(0) @binding(4) var<storage, read_write> my4: array<vec4<y_t>>;

// `gated` is a literal at both call sites (see ternary)
fn ternary4(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>, gated: bool) {
  let o = tile_origin(wid, nwg, lid);
  if (o.x == 0xffffffffu) { return; }
  var i = o.y * Q.cols4 + o.x;
  var kb = cursor_start(B_MODE, Q.b_p, Q.b_q, o.y, o.x);
  var kc = cursor_start(C_MODE, Q.c_p, Q.c_q, o.y, o.x);
  // col-mode operands are the same for all R rows: load them once
  var b = vec4<f32>(0.0);
  var c = vec4<f32>(0.0);
  if (B_MODE == 1u) { b = vec4<f32>(mb4[Q.b_off + kb.idx]); }
  if (C_MODE == 1u) { c = vec4<f32>(mc4[Q.c_off + kc.idx]); }
  let nr = row_count(o);
  for (var k = 0u; k < nr; k++) {
    if (B_MODE != 1u) { b = vec4<f32>(mb4[Q.b_off + kb.idx]); }
    if (C_MODE != 1u) { c = vec4<f32>(mc4[Q.c_off + kc.idx]); }
    let x = vec4<f32>(mx4[Q.a_off + i]);
    if (gated) {
      my4[Q.y_off + i] = vec4<y_t>(x + b * c);
    } else {
      my4[Q.y_off + i] = vec4<y_t>(x * (1.0 + c) + b);
    }
    i += Q.cols4;
    kb = cursor_next(B_MODE, Q.b_p, Q.b_q, kb);
    kc = cursor_next(C_MODE, Q.c_p, Q.c_q, kc);
  }
}

@compute @workgroup_size(WG)
fn modulate4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  ternary4(wid, nwg, lid, false);
}

@compute @workgroup_size(WG)
fn gated4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  ternary4(wid, nwg, lid, true);
}
