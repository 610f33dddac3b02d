// Elementwise kernels: unary (copy/cast, SiLU, GELU-tanh, affine, clamp), binary with a
// "(i / b_div) % b_mod" broadcast of the second operand, Wan's modulation x*(1+scale)+shift and
// the gated residual x + r*gate.
//
// Storage types are aliases so one file serves f32 and f16 activations (the loader rewrites the
// alias lines and adds `enable f16;`). Math is always f32. One element per invocation; the grid is
// 1-D folded into x/y (linear workgroup id = wid.x + wid.y * nwg.x).

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
  _pad: u32,
}

override WG: u32 = 256u;
// unary:  0 copy/cast, 1 silu, 2 gelu_tanh, 3 alpha*x + beta, 4 clamp(x, alpha, beta)
// binary: 0 a+b, 1 a-b, 2 a*b, 3 a/b, 4 a + alpha*b, 5 a + alpha*(b - a)
override OP: u32 = 0u;

@group(0) @binding(0) var<uniform> P: Params;

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
  let x = f32(ua[i]);
  var r: f32;
  switch (OP) {
    case 1u: { r = silu(x); }
    case 2u: { r = gelu_tanh(x); }
    case 3u: { r = P.alpha * x + P.beta; }
    case 4u: { r = clamp(x, P.alpha, P.beta); }
    default: { r = x; }
  }
  uy[i] = y_t(r);
}

// ---------------------------------------------------------------- binary: bindings (a, b, y)
@group(0) @binding(1) var<storage, read> ba: array<a_t>;
@group(0) @binding(2) var<storage, read> bb: array<b_t>;
@group(0) @binding(3) var<storage, read_write> by: array<y_t>;

@compute @workgroup_size(WG)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = lin_id(wid, nwg, lid);
  if (i >= P.n) { return; }
  let a = f32(ba[i]);
  let b = f32(bb[(i / P.b_div) % P.b_mod]);
  var r: f32;
  switch (OP) {
    case 1u: { r = a - b; }
    case 2u: { r = a * b; }
    case 3u: { r = a / b; }
    case 4u: { r = a + P.alpha * b; }
    case 5u: { r = a + P.alpha * (b - a); }
    default: { r = a + b; }
  }
  by[i] = y_t(r);
}

// ------------------------------------- modulate: y = x * (1 + scale) + shift; bindings (x, shift, scale, y)
// shift is indexed like b, scale like c (both usually [D] per row of x [L, D]).
@group(0) @binding(1) var<storage, read> mx: array<a_t>;
@group(0) @binding(2) var<storage, read> mshift: array<b_t>;
@group(0) @binding(3) var<storage, read> mscale: array<c_t>;
@group(0) @binding(4) var<storage, read_write> my: array<y_t>;

@compute @workgroup_size(WG)
fn modulate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = lin_id(wid, nwg, lid);
  if (i >= P.n) { return; }
  let x = f32(mx[i]);
  let sh = f32(mshift[(i / P.b_div) % P.b_mod]);
  let sc = f32(mscale[(i / P.c_div) % P.c_mod]);
  my[i] = y_t(x * (1.0 + sc) + sh);
}

// ------------------------------------- gated residual: y = x + r * gate; bindings (x, r, gate, y)
// r has x's shape; gate is indexed like c.
@group(0) @binding(1) var<storage, read> gx: array<a_t>;
@group(0) @binding(2) var<storage, read> gr: array<b_t>;
@group(0) @binding(3) var<storage, read> gg: array<c_t>;
@group(0) @binding(4) var<storage, read_write> gy: array<y_t>;

@compute @workgroup_size(WG)
fn gated_residual(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = lin_id(wid, nwg, lid);
  if (i >= P.n) { return; }
  let x = f32(gx[i]);
  let r = f32(gr[i]);
  let g = f32(gg[(i / P.c_div) % P.c_mod]);
  gy[i] = y_t(x + r * g);
}
