// Nearest-neighbour x2 upsampling of the last two dims: x [N, H, W] -> y [N, 2H, 2W]
// (y[n, i, j] = x[n, i / 2, j / 2]; PyTorch 'nearest' and 'nearest-exact' agree at an exact x2).
// One invocation per input element: one load, two vec2 stores (the 2x2 block it fills). The grid
// is 1-D folded into x/y (linear workgroup id = wid.x + wid.y * nwg.x). The op binds windows of
// whole planes so tensors above the binding limit are done in several dispatches.

alias x_t = f32;

struct Params {
  n: u32,       // input elements in this dispatch (planes * h * w)
  h: u32,       // input height
  w: u32,       // input width
  x_off: u32,   // in elements: first input element inside the x binding
  y_off: u32,   // in vec2 units: first output pair inside the y binding
  _pad0: u32,
  _pad1: u32,
  _pad2: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> X: array<x_t>;
@group(0) @binding(2) var<storage, read_write> Y: array<vec2<x_t>>;

@compute @workgroup_size(WG)
fn nearest2x(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = (wid.x + wid.y * nwg.x) * WG + lid.x;
  if (i >= P.n) { return; }
  let v = X[P.x_off + i];
  let j = i % P.w;
  let r = i / P.w;            // plane * h + row
  // output row 2 * r (and 2 * r + 1) of width 2w; pair index = row * w + j
  let o = P.y_off + 2u * r * P.w + j;
  let pair = vec2<x_t>(v, v);
  Y[o] = pair;
  Y[o + P.w] = pair;
}
