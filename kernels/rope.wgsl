// Wan 3-axis rotary position embedding on x [B, L, H, Dh] (row-major), tables cos/sin [L, Dh/2]
// (f32, the same for every head). Complex pairs are ADJACENT elements (2i, 2i+1):
//   y[2i]   = x[2i] * c - x[2i+1] * s
//   y[2i+1] = x[2i] * s + x[2i+1] * c          (c = cos[l, i], s = sin[l, i])
//
// One invocation per (token row, pair i): it loads c/s once and rotates pair i of every head
// (H loads of vec2, stride Dh). Consecutive invocations take consecutive pairs of one row, so
// lanes read consecutive 8-byte pairs (coalesced). Activations are `x_t`/`y_t` aliases (f32 or
// f16); math in f32. The wrapper splits big x into row ranges (windows; `*_off` in pairs).

alias x_t = f32;
alias y_t = f32;

struct Params {
  rows: u32,    // token rows (b, l) in this dispatch
  seq: u32,     // L: table row of token row r is (row0 + r) % seq
  heads: u32,   // H
  pairs: u32,   // Dh / 2
  row0: u32,    // global token row of this dispatch's first row
  x_off: u32,   // pair offset of the first row inside the x window
  y_off: u32,   // ... inside the y window
  cs_off: u32,  // element offset of cos[0, 0] / sin[0, 0] inside their windows
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<vec2<x_t>>;
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<vec2<y_t>>;

@compute @workgroup_size(WG)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let g = (wid.x + wid.y * nwg.x) * WG + lid.x;
  let r = g / P.pairs;
  if (r >= P.rows) { return; }
  let i = g - r * P.pairs;
  let t = P.cs_off + ((P.row0 + r) % P.seq) * P.pairs + i;
  let c = cos_t[t];
  let s = sin_t[t];
  let stride = P.pairs; // pairs per head
  var xi = P.x_off + r * P.heads * stride + i;
  var yi = P.y_off + r * P.heads * stride + i;
  for (var h = 0u; h < P.heads; h++) {
    let v = vec2<f32>(x[xi]);
    y[yi] = vec2<y_t>(vec2<f32>(v.x * c - v.y * s, v.x * s + v.y * c));
    xi += stride;
    yi += stride;
  }
}
