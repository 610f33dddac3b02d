// Non-finite count: y[0] = acc + the number of NaN / +Inf / -Inf elements of a float tensor.
//
// Tested by bits, never by float comparisons (`x != x` may be folded away by compilers that assume
// no NaNs, and WGSL has no isnan): a value is NaN or ±Inf exactly when its exponent bits are all
// ones — f32 0x7f800000, f16 0x7c00, bf16 0x7f80. Denormals and the largest finite values
// (0x7f7fffff, 0x7bff, 0x7f7f) are finite. The tensor is bound as array<vec4<u32>> whatever its
// dtype (DT: 0 f32, 1 f16, 2 bf16), so f16 needs no shader feature and bf16 works as stored.
//
// The binding is a window that starts at an aligned byte offset: the tensor's elements are
// [off, off + n) of the window (16-bit element e is half e & 1 of word e >> 1, low half first).
// Invocations stride over the vec4s, count in a register, then add into one workgroup atomic and,
// lane 0, once into y[0] (the wrapper clears y or copies `acc` into it first; several windows of
// one tensor add into the same y).

struct Params {
  n: u32,       // elements of the tensor in this window
  off: u32,     // element offset of the first of them inside the window
  nvec: u32,    // vec4s of the window that hold them: ceil((off + n) * elt / 16)
  stride: u32,  // invocations in the grid (workgroups * WG)
}

override WG: u32 = 256u;
override DT: u32 = 0u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> y: array<atomic<u32>>;

var<workgroup> wg_count: atomic<u32>;

fn hsum(v: vec4<u32>) -> u32 {
  return v.x + v.y + v.z + v.w;
}

// 1 per element of `e` (element indices) whose bits `b` have the exponent field `m` all ones and
// that lies in [off, off + n)
fn bad4(b: vec4<u32>, m: u32, e: vec4<u32>) -> u32 {
  let hit = (b & vec4<u32>(m)) == vec4<u32>(m);
  let inside = (e >= vec4<u32>(P.off)) & (e < vec4<u32>(P.off + P.n));
  return hsum(select(vec4<u32>(0u), vec4<u32>(1u), hit & inside));
}

// the same without the range test (a vec4 wholly inside the tensor: all but the first and last)
fn hits4(b: vec4<u32>, m: u32) -> u32 {
  return hsum(select(vec4<u32>(0u), vec4<u32>(1u), (b & vec4<u32>(m)) == vec4<u32>(m)));
}

@compute @workgroup_size(WG)
fn count_nonfinite(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let epv = select(8u, 4u, DT == 0u);   // elements per vec4
  let hi = P.off + P.n;
  var c = 0u;
  for (var q = gid.x; q < P.nvec; q += P.stride) {
    let v = x[q];
    let e0 = q * epv;
    let whole = e0 >= P.off && e0 + epv <= hi;
    if (DT == 0u) {
      if (whole) {
        c += hits4(v, 0x7f800000u);
      } else {
        c += bad4(v, 0x7f800000u, vec4<u32>(e0) + vec4<u32>(0u, 1u, 2u, 3u));
      }
    } else {
      let m = select(0x7f80u, 0x7c00u, DT == 1u);
      if (whole) {
        c += hits4(v, m) + hits4(v >> vec4<u32>(16u), m);
      } else {
        let e = vec4<u32>(e0) + vec4<u32>(0u, 2u, 4u, 6u);   // low halves; the high halves are e + 1
        c += bad4(v, m, e) + bad4(v >> vec4<u32>(16u), m, e + vec4<u32>(1u));
      }
    }
  }
  if (c != 0u) { atomicAdd(&wg_count, c); }
  workgroupBarrier();
  if (lane == 0u) {
    let t = atomicLoad(&wg_count);
    if (t != 0u) { atomicAdd(&y[0], t); }
  }
}
