// Flash-style fused attention (online softmax; the L×L score matrix never exists), three entry
// points, all needing `subgroups` (8 lanes or more). The subgroup-free fallback (adapters without
// the feature, head dims that are not a multiple of 4) is `attention_portable` in softmax.wgsl: a
// module that enables subgroups cannot even be created on such an adapter.
//   flash      any adapter with subgroups; K/V/q read from storage buffers; bias, mask, splits.
//   flash_ubo  llvmpipe (lavapipe): K/V packed by pack_kv into [keys, Dh] f32 rows and read
//              through 64 KiB uniform windows; no bias. The fast path on this machine.
//   pack_kv    the packing for flash_ubo.
//
// q [B, Lq, H, Dh], k/v [B, Lk, H, Dh], out [B, Lq, H, Dh] (PyTorch order, contiguous: the layout a
// Linear's [B, L, H*Dh] output reshapes to). Optional f32 bias added to the scaled scores:
// 'full' [H, Lq, Lk] or T5 'relative' [H, Lq + Lk - 1] (score(h,i,j) += bias[h, j - i + Lq - 1]),
// and an i32 key mask [B, Lk] (0 = masked). A query with no attendable key returns zeros.
//
// What shaped the kernels (llvmpipe, Mesa 25.0.7, 8-wide subgroups; docs/notes/attention.md has
// the numbers):
// * Inside a loop every storage load is a per-lane loop with a mask test and a bounds-check
//   branch per component (~10 instructions per 32-bit value, ~32 LLVM basic blocks per vec4
//   access site), even when all lanes read the same address. Uniform-buffer loads with per-lane
//   addresses are branch-free gathers (~3 instructions). So K and V are loaded once per subgroup
//   (lane t loads key jb + 8r + t) and handed to all lanes with subgroupBroadcast, from uniform
//   windows where possible.
// * One invocation owns QPL = 4 queries of one (batch, head): each broadcast value serves 32
//   queries.
// * A private array indexed by a run-time value becomes an if-ladder. Indices into the per-lane
//   score registers are therefore literal arguments of small helpers (NIR inlines them), never
//   loop counters. Loops over the head dim stay rolled (run-time bound): unrolling them made LLVM
//   compile for minutes. So the Dh-long per-query state lives in memory: q is re-read, and the
//   unnormalized accumulator lives in `st_acc` ([row, head, Dh / 4] vec4<f32>, the f32 output
//   itself when the output is f32), updated once per block of keys.
// * Online softmax per block: m_new = max(m, max_j s_j); alpha = exp2(m - m_new);
//   p_j = exp2(s_j - m_new); l = l * alpha + sum p; acc = acc * alpha + P V, in the exp2 domain
//   (scale * log2(e) folded into `scale`). No workgroup memory, no barriers.
//
// Splitting (tensors above the binding limit, or flash_ubo's key windows): a dispatch covers
// batches from b0, heads [h0, h0 + nh), queries [i0, i0 + nq) and keys [j0, j1); tensors are
// bound as windows whose first element is `*_base` of the full tensor (index = full-tensor index
// - base). Key ranges are chained through the state: st_acc (unnormalized) and st_ml = (m, l);
// FLAG_STATE_IN reads it, a dispatch without FLAG_FINAL writes it instead of normalizing.

enable subgroups;

alias in_t = f32;   // q, k, v storage

struct Params {
  //!include lib/attention_params.wgsl
}

//!include lib/attention_flags.wgsl

override WG: u32 = 32u;          // invocations per workgroup (a multiple of 8)

// ---------------------------------------------------------------- flash
const KB: u32 = 32u;   // keys per online-softmax block (a multiple of 8)
const NR: u32 = 4u;    // KB / 8: key loads per lane per block
const QPL: u32 = 4u;   // queries per invocation
const NS: u32 = 32u;   // QPL * KB / 4: vec4 score registers per invocation
const NEG: f32 = -1.0e30; // running max before any key (finite: exp2(NEG - x) is 0, never NaN)

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<in_t>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<in_t>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<in_t>>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> kmask: array<i32>;
@group(0) @binding(6) var<storage, read_write> o: array<u32>;   // f16 output, two halves per word (an f32 output is st_acc itself)
@group(0) @binding(7) var<storage, read_write> st_acc: array<vec4<f32>>;  // [rows, H, Dh / 4] unnormalized output
@group(0) @binding(8) var<storage, read_write> st_ml: array<vec2<f32>>;   // [state rows] (m, l)

struct B8 { v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>, v4: vec4<f32>, v5: vec4<f32>, v6: vec4<f32>, v7: vec4<f32> }

// the values of lanes 0..7 of the subgroup, in every lane
fn bc8(x: vec4<f32>) -> B8 {
  return B8(subgroupBroadcast(x, 0u), subgroupBroadcast(x, 1u), subgroupBroadcast(x, 2u), subgroupBroadcast(x, 3u),
            subgroupBroadcast(x, 4u), subgroupBroadcast(x, 5u), subgroupBroadcast(x, 6u), subgroupBroadcast(x, 7u));
}

@compute @workgroup_size(WG)
fn flash(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lane: u32, @builtin(subgroup_invocation_id) sl: u32) {
  let g = wid.x + wid.y * nwg.x;
  if (g >= P.ngroups) { return; }
  let dh4 = P.Dh / 4u;           // runtime bound: keeps the head-dim loops rolled (compact code)
  let qt = g % P.qtiles;
  let bh = g / P.qtiles;
  let h = P.h0 + bh % P.nh;
  let b = P.b0 + bh / P.nh;
  var qok: array<bool, QPL>;     // this query exists (the others compute a copy of the last row)
  var qoff: array<u32, QPL>;     // q row start (vec4, window relative)
  var srow: array<u32, QPL>;     // state row (row * H + h)
  var brow: array<u32, QPL>;     // bias index of key 0 (window relative)
  var m: array<f32, QPL>;
  var l: array<f32, QPL>;
  var alpha: array<f32, QPL>;
  var s: array<vec4<f32>, NS>;   // [qi][KB / 4]: scores, then probabilities
  for (var qi = 0u; qi < QPL; qi++) {
    let il = (qt * QPL + qi) * WG + lane;
    qok[qi] = il < P.nq;
    let i = P.i0 + min(il, P.nq - 1u);
    let row = b * P.Lq + i;
    qoff[qi] = (row * P.H + h) * dh4 - P.q_base;
    srow[qi] = row * P.H + h;
    if ((P.flags & FLAG_BIAS_FULL) != 0u) { brow[qi] = (h * P.Lq + i) * P.Lk - P.bias_base; }
    if ((P.flags & FLAG_BIAS_REL) != 0u) { brow[qi] = h * (P.Lq + P.Lk - 1u) + P.Lq - 1u - i - P.bias_base; }
    m[qi] = NEG;
    l[qi] = 0.0;
    if (qok[qi]) {
      let ao = srow[qi] * dh4 - P.acc_base;
      if ((P.flags & FLAG_STATE_IN) != 0u) {
        let ml = st_ml[srow[qi] - P.s_row0];
        m[qi] = ml.x;
        l[qi] = ml.y;
      } else {
        for (var d4 = 0u; d4 < dh4; d4++) { st_acc[ao + d4] = vec4<f32>(0.0); }
      }
    }
  }
  let kstride = P.H * dh4;
  let kv0 = (b * P.Lk * P.H + h) * dh4;
  let mine = sl & 7u;            // within each group of 8 keys, the one this lane loads
  let jl = P.j1 - 1u;
  for (var jb = P.j0; jb < P.j1; jb += KB) {
    var ko: array<u32, NR>;                // this lane's key row (vec4, full tensor) per load round
    var okv: array<vec4<bool>, NR * 2u>;   // key in range and not masked, per score register
    for (var rr = 0u; rr < NR; rr++) {
      let j = jb + rr * 8u + mine;
      let jk = min(j, jl);
      ko[rr] = kv0 + jk * kstride;
      var okm = select(0.0, 1.0, j < P.j1);
      if ((P.flags & FLAG_MASK) != 0u) { okm = select(0.0, okm, kmask[b * P.Lk + jk] != 0); }
      let ob = bc8(vec4<f32>(okm));
      okv[rr * 2u] = vec4<f32>(ob.v0.x, ob.v1.x, ob.v2.x, ob.v3.x) > vec4<f32>(0.5);
      okv[rr * 2u + 1u] = vec4<f32>(ob.v4.x, ob.v5.x, ob.v6.x, ob.v7.x) > vec4<f32>(0.5);
    }
    for (var x = 0u; x < NS; x++) { s[x] = vec4<f32>(0.0); }
    // S = Q Kᵀ for the block
    for (var d4 = 0u; d4 < dh4; d4++) {
      for (var rr = 0u; rr < NR; rr++) {
        let kb = bc8(vec4<f32>(k[ko[rr] + d4 - P.k_base]));
        for (var qi = 0u; qi < QPL; qi++) {
          let q4 = vec4<f32>(q[qoff[qi] + d4]);
          let x = (qi * NR + rr) * 2u;
          s[x] += vec4<f32>(dot(q4, kb.v0), dot(q4, kb.v1), dot(q4, kb.v2), dot(q4, kb.v3));
          s[x + 1u] += vec4<f32>(dot(q4, kb.v4), dot(q4, kb.v5), dot(q4, kb.v6), dot(q4, kb.v7));
        }
      }
    }
    // online softmax
    for (var qi = 0u; qi < QPL; qi++) {
      var mb = m[qi];
      for (var x = 0u; x < NR * 2u; x++) {
        var sx = s[qi * NR * 2u + x] * P.scale;
        if ((P.flags & (FLAG_BIAS_FULL | FLAG_BIAS_REL)) != 0u) {
          let j = jb + x * 4u;
          let br = brow[qi];
          sx += vec4<f32>(bias[br + min(j, jl)], bias[br + min(j + 1u, jl)], bias[br + min(j + 2u, jl)], bias[br + min(j + 3u, jl)]) * P.bias_scale;
        }
        sx = select(vec4<f32>(NEG), max(sx, vec4<f32>(NEG)), okv[x]);   // masked / -inf: NEG, p = 0
        s[qi * NR * 2u + x] = sx;
        mb = max(mb, max(max(sx.x, sx.y), max(sx.z, sx.w)));
      }
      alpha[qi] = exp2(m[qi] - mb);
      m[qi] = mb;
      var ps = vec4<f32>(0.0);
      for (var x = 0u; x < NR * 2u; x++) {
        let sx = s[qi * NR * 2u + x];
        let px = select(vec4<f32>(0.0), exp2(sx - vec4<f32>(mb)), sx > vec4<f32>(NEG));
        s[qi * NR * 2u + x] = px;
        ps += px;
      }
      l[qi] = l[qi] * alpha[qi] + (ps.x + ps.y + ps.z + ps.w);
    }
    // acc = acc * alpha + P V
    for (var d4 = 0u; d4 < dh4; d4++) {
      var vb: array<B8, NR>;
      for (var rr = 0u; rr < NR; rr++) { vb[rr] = bc8(vec4<f32>(v[ko[rr] + d4 - P.v_base])); }
      for (var qi = 0u; qi < QPL; qi++) {
        var a = vec4<f32>(0.0);
        for (var rr = 0u; rr < NR; rr++) {
          let pl = s[(qi * NR + rr) * 2u];
          let ph = s[(qi * NR + rr) * 2u + 1u];
          let w = vb[rr];
          a += pl.x * w.v0 + pl.y * w.v1 + pl.z * w.v2 + pl.w * w.v3;
          a += ph.x * w.v4 + ph.y * w.v5 + ph.z * w.v6 + ph.w * w.v7;
        }
        if (qok[qi]) {
          let ai = srow[qi] * dh4 + d4 - P.acc_base;
          st_acc[ai] = st_acc[ai] * alpha[qi] + a;
        }
      }
    }
  }
  for (var qi = 0u; qi < QPL; qi++) {
    if (!qok[qi]) { continue; }
    if ((P.flags & FLAG_FINAL) == 0u) {
      st_ml[srow[qi] - P.s_row0] = vec2<f32>(m[qi], l[qi]);
      continue;
    }
    // a row without any attendable key (all masked, or Lk == 0) is zero
    let inv = select(0.0, 1.0 / l[qi], l[qi] > 0.0);
    if ((P.flags & FLAG_ACC_IS_OUT) != 0u) {
      let ao = srow[qi] * dh4 - P.acc_base;
      for (var d4 = 0u; d4 < dh4; d4++) { st_acc[ao + d4] = st_acc[ao + d4] * inv; }
    } else {
      let ow = (srow[qi] * P.Dh - P.o_base) / 2u;   // o_base is even (window starts are 16-byte aligned)
      let ao = srow[qi] * dh4 - P.acc_base;
      for (var d4 = 0u; d4 < dh4; d4++) {
        let a = st_acc[ao + d4] * inv;
        o[ow + d4 * 2u] = pack2x16float(a.xy);
        o[ow + d4 * 2u + 1u] = pack2x16float(a.zw);
      }
    }
  }
}

// ---------------------------------------------------------------- flash_ubo (CPU adapters)
// The same online-softmax attention for one (batch, head) and one window of keys per dispatch,
// with K and V read from *uniform* buffers: on llvmpipe a uniform-buffer load with a per-lane
// address is a branch-free gather (~3 instructions per lane and component) where a storage load
// is a branchy per-lane loop (~10, and ~32 LLVM basic blocks per vec4 access site). K and V of the
// (batch, head) are first packed by `pack_kv` into [keys, Dh] f32 rows so that a 64 KiB window
// holds KPB = 16384 / Dh consecutive keys. Keys go in blocks of 128 (16 rounds of 8 lanes x one
// key each, broadcast to all lanes); every lane holds the 128 scores of its QPL = 4 queries in
// registers (indexed only by literal arguments of the helpers below). The accumulator stays in
// st_acc (as in `flash`); m and l go through st_ml between windows (dispatches). No bias here
// (the op uses `flash` when there is one); the key mask is read per key by the lane that loads it.

const UB_R: u32 = 16u;             // rounds of 8 keys per block (128 keys)
const UB_Q: u32 = 4u;              // queries per invocation

override NKW: u32 = 1u;            // uniform windows of K (and of V) per dispatch, 1..4

@group(0) @binding(1) var<storage, read> uq: array<vec4<in_t>>;
// packed K windows: window w holds keys j0 + w * KPB + [0, KPB) as [key][Dh / 4] (KPB = P.k_base)
@group(0) @binding(2) var<uniform> ukb0: array<vec4<f32>, 4096>;
@group(0) @binding(3) var<uniform> ukb1: array<vec4<f32>, 4096>;
@group(0) @binding(4) var<uniform> ukb2: array<vec4<f32>, 4096>;
@group(0) @binding(5) var<uniform> ukb3: array<vec4<f32>, 4096>;
@group(0) @binding(6) var<uniform> uvb0: array<vec4<f32>, 4096>;   // packed V windows, the same keys
@group(0) @binding(7) var<uniform> uvb1: array<vec4<f32>, 4096>;
@group(0) @binding(8) var<uniform> uvb2: array<vec4<f32>, 4096>;
@group(0) @binding(9) var<uniform> uvb3: array<vec4<f32>, 4096>;
@group(0) @binding(10) var<storage, read> ukmask: array<i32>;
@group(0) @binding(11) var<storage, read_write> uo: array<u32>;        // f16 output (packed pairs)
@group(0) @binding(12) var<storage, read_write> ust_acc: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> ust_ml: array<vec2<f32>>;

// K / V rows of window w (uniform per call: a round of 8 keys never straddles two windows)
fn ub_k(w: u32, i: u32) -> vec4<f32> {
  if (NKW == 1u || w == 0u) { return ukb0[i]; }
  if (NKW == 2u || w == 1u) { return ukb1[i]; }
  if (NKW == 3u || w == 2u) { return ukb2[i]; }
  return ukb3[i];
}

fn ub_v(w: u32, i: u32) -> vec4<f32> {
  if (NKW == 1u || w == 0u) { return uvb0[i]; }
  if (NKW == 2u || w == 1u) { return uvb1[i]; }
  if (NKW == 3u || w == 2u) { return uvb2[i]; }
  return uvb3[i];
}

var<private> us: array<vec4<f32>, 128>;   // [qi * 32 + rr * 2 + half]: scores, then probabilities
var<private> uq4: array<vec4<f32>, UB_Q>; // q vec4 of the current head-dim slot, per query
var<private> uok: array<vec4<bool>, 32>;  // [rr * 2 + half]: key valid (in range, not masked)
var<private> ualpha: array<f32, UB_Q>;
var<private> um: array<f32, UB_Q>;
var<private> ul: array<f32, UB_Q>;
var<private> uqok: array<bool, UB_Q>;
var<private> usrow: array<u32, UB_Q>;

fn ub_qk_q(qi: u32, rr: u32, kb: B8) {
  let q4 = uq4[qi];
  let x = qi * 32u + rr * 2u;
  us[x] += vec4<f32>(dot(q4, kb.v0), dot(q4, kb.v1), dot(q4, kb.v2), dot(q4, kb.v3));
  us[x + 1u] += vec4<f32>(dot(q4, kb.v4), dot(q4, kb.v5), dot(q4, kb.v6), dot(q4, kb.v7));
}

fn ub_pv_q(qi: u32, rr: u32, vb: B8) -> vec4<f32> {
  let pl = us[qi * 32u + rr * 2u];
  let ph = us[qi * 32u + rr * 2u + 1u];
  return pl.x * vb.v0 + pl.y * vb.v1 + pl.z * vb.v2 + pl.w * vb.v3 + ph.x * vb.v4 + ph.y * vb.v5 + ph.z * vb.v6 + ph.w * vb.v7;
}

// the uniform window and this lane's row in it, for round rr of the block starting at key jb
fn ub_row(jb: u32, rr: u32, mine: u32) -> vec2<u32> {
  let j = jb + rr * 8u;          // a multiple of 8, as KPB is
  let w = j / P.k_base;
  return vec2<u32>(w, j + mine - w * P.k_base);
}

// round rr of the block: keys jb + 8 rr .. + 7; lane t loads key jb + 8 rr + t
fn ub_qk_r(rr: u32, nk: u32, jb: u32, mine: u32, dh4: u32, d4: u32) {
  if (rr * 8u >= nk) { return; }   // uniform: past the dispatch's last key
  let wr = ub_row(jb, rr, mine);
  let kb = bc8(ub_k(wr.x, wr.y * dh4 + d4));
  ub_qk_q(0u, rr, kb);
  ub_qk_q(1u, rr, kb);
  ub_qk_q(2u, rr, kb);
  ub_qk_q(3u, rr, kb);
}

var<private> upv: array<vec4<f32>, UB_Q>;   // P V of the current head-dim slot, per query

fn ub_pv_r(rr: u32, nk: u32, jb: u32, mine: u32, dh4: u32, d4: u32) {
  if (rr * 8u >= nk) { return; }
  let wr = ub_row(jb, rr, mine);
  let vb = bc8(ub_v(wr.x, wr.y * dh4 + d4));
  upv[0] += ub_pv_q(0u, rr, vb);
  upv[1] += ub_pv_q(1u, rr, vb);
  upv[2] += ub_pv_q(2u, rr, vb);
  upv[3] += ub_pv_q(3u, rr, vb);
}

// round rr of a new block: zero its scores; validity of its keys (range, mask) for every lane
fn ub_init_r(rr: u32, jb: u32, nk: u32, mine: u32, b: u32) {
  for (var qi = 0u; qi < UB_Q; qi++) {
    us[qi * 32u + rr * 2u] = vec4<f32>(0.0);
    us[qi * 32u + rr * 2u + 1u] = vec4<f32>(0.0);
  }
  let jj = rr * 8u + mine;   // key within the block
  var okm = select(0.0, 1.0, jj < nk);
  if ((P.flags & FLAG_MASK) != 0u) { okm = select(0.0, okm, ukmask[b * P.Lk + P.j0 + jb + min(jj, nk - 1u)] != 0); }
  let ob = bc8(vec4<f32>(okm));
  uok[rr * 2u] = vec4<f32>(ob.v0.x, ob.v1.x, ob.v2.x, ob.v3.x) > vec4<f32>(0.5);
  uok[rr * 2u + 1u] = vec4<f32>(ob.v4.x, ob.v5.x, ob.v6.x, ob.v7.x) > vec4<f32>(0.5);
}

var<private> umb: array<f32, UB_Q>;          // the block's running max, per query
var<private> ups: array<vec4<f32>, UB_Q>;    // the block's sum of probabilities, per query

// online softmax, by rounds (literal rr) so that every score index is a constant
fn ub_max_qr(qi: u32, rr: u32) {
  for (var hf = 0u; hf < 2u; hf++) {
    let x = qi * 32u + rr * 2u + hf;
    let sx = select(vec4<f32>(NEG), max(us[x] * P.scale, vec4<f32>(NEG)), uok[rr * 2u + hf]);
    us[x] = sx;
    umb[qi] = max(umb[qi], max(max(sx.x, sx.y), max(sx.z, sx.w)));
  }
}

fn ub_exp_qr(qi: u32, rr: u32) {
  for (var hf = 0u; hf < 2u; hf++) {
    let x = qi * 32u + rr * 2u + hf;
    let sx = us[x];
    let px = select(vec4<f32>(0.0), exp2(sx - vec4<f32>(umb[qi])), sx > vec4<f32>(NEG));
    us[x] = px;
    ups[qi] += px;
  }
}

fn ub_max_r(rr: u32, nk: u32) {
  if (rr * 8u >= nk) { return; }
  ub_max_qr(0u, rr);
  ub_max_qr(1u, rr);
  ub_max_qr(2u, rr);
  ub_max_qr(3u, rr);
}

fn ub_exp_r(rr: u32, nk: u32) {
  if (rr * 8u >= nk) { return; }
  ub_exp_qr(0u, rr);
  ub_exp_qr(1u, rr);
  ub_exp_qr(2u, rr);
  ub_exp_qr(3u, rr);
}

fn ub_alpha_q(qi: u32) {
  ualpha[qi] = exp2(um[qi] - umb[qi]);
  um[qi] = umb[qi];
  ups[qi] = vec4<f32>(0.0);
}

fn ub_sum_q(qi: u32) {
  let ps = ups[qi];
  ul[qi] = ul[qi] * ualpha[qi] + (ps.x + ps.y + ps.z + ps.w);
}

fn ub_softmax(nk: u32) {
  umb[0] = um[0];
  umb[1] = um[1];
  umb[2] = um[2];
  umb[3] = um[3];
  ub_max_r(0u, nk);
  ub_max_r(1u, nk);
  ub_max_r(2u, nk);
  ub_max_r(3u, nk);
  ub_max_r(4u, nk);
  ub_max_r(5u, nk);
  ub_max_r(6u, nk);
  ub_max_r(7u, nk);
  ub_max_r(8u, nk);
  ub_max_r(9u, nk);
  ub_max_r(10u, nk);
  ub_max_r(11u, nk);
  ub_max_r(12u, nk);
  ub_max_r(13u, nk);
  ub_max_r(14u, nk);
  ub_max_r(15u, nk);
  ub_alpha_q(0u);
  ub_alpha_q(1u);
  ub_alpha_q(2u);
  ub_alpha_q(3u);
  ub_exp_r(0u, nk);
  ub_exp_r(1u, nk);
  ub_exp_r(2u, nk);
  ub_exp_r(3u, nk);
  ub_exp_r(4u, nk);
  ub_exp_r(5u, nk);
  ub_exp_r(6u, nk);
  ub_exp_r(7u, nk);
  ub_exp_r(8u, nk);
  ub_exp_r(9u, nk);
  ub_exp_r(10u, nk);
  ub_exp_r(11u, nk);
  ub_exp_r(12u, nk);
  ub_exp_r(13u, nk);
  ub_exp_r(14u, nk);
  ub_exp_r(15u, nk);
  ub_sum_q(0u);
  ub_sum_q(1u);
  ub_sum_q(2u);
  ub_sum_q(3u);
}

fn ub_init_q(qi: u32, b: u32, qt: u32, lane: u32, dh4: u32) {
  let il = (qt * UB_Q + qi) * WG + lane;
  uqok[qi] = il < P.nq;
  let i = P.i0 + min(il, P.nq - 1u);
  usrow[qi] = (b * P.Lq + i) * P.H + P.h0;
  um[qi] = NEG;
  ul[qi] = 0.0;
  if (!uqok[qi]) { return; }
  let ao = usrow[qi] * dh4 - P.acc_base;
  if ((P.flags & FLAG_STATE_IN) != 0u) {
    let ml = ust_ml[usrow[qi] - P.s_row0];
    um[qi] = ml.x;
    ul[qi] = ml.y;
  } else {
    for (var d4 = 0u; d4 < dh4; d4++) { ust_acc[ao + d4] = vec4<f32>(0.0); }
  }
}

fn ub_fin_q(qi: u32, dh4: u32) {
  if (!uqok[qi]) { return; }
  if ((P.flags & FLAG_FINAL) == 0u) {
    ust_ml[usrow[qi] - P.s_row0] = vec2<f32>(um[qi], ul[qi]);
    return;
  }
  let inv = select(0.0, 1.0 / ul[qi], ul[qi] > 0.0);
  let ao = usrow[qi] * dh4 - P.acc_base;
  if ((P.flags & FLAG_ACC_IS_OUT) != 0u) {
    for (var d4 = 0u; d4 < dh4; d4++) { ust_acc[ao + d4] = ust_acc[ao + d4] * inv; }
  } else {
    let ow = (usrow[qi] * P.Dh - P.o_base) / 2u;
    for (var d4 = 0u; d4 < dh4; d4++) {
      let a = ust_acc[ao + d4] * inv;
      uo[ow + d4 * 2u] = pack2x16float(a.xy);
      uo[ow + d4 * 2u + 1u] = pack2x16float(a.zw);
    }
  }
}

fn ub_acc_q(qi: u32, dh4: u32, d4: u32) {
  if (uqok[qi]) {
    let ai = usrow[qi] * dh4 + d4 - P.acc_base;
    ust_acc[ai] = ust_acc[ai] * ualpha[qi] + upv[qi];
  }
}

@compute @workgroup_size(WG)
fn flash_ubo(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lane: u32, @builtin(subgroup_invocation_id) sl: u32) {
  let g = wid.x + wid.y * nwg.x;
  if (g >= P.ngroups) { return; }
  let dh4 = P.Dh / 4u;
  let qt = g % P.qtiles;
  let b = P.b0 + g / P.qtiles;
  let mine = sl & 7u;
  ub_init_q(0u, b, qt, lane, dh4);
  ub_init_q(1u, b, qt, lane, dh4);
  ub_init_q(2u, b, qt, lane, dh4);
  ub_init_q(3u, b, qt, lane, dh4);
  var qo: array<u32, UB_Q>;
  qo[0] = usrow[0] * dh4 - P.q_base;
  qo[1] = usrow[1] * dh4 - P.q_base;
  qo[2] = usrow[2] * dh4 - P.q_base;
  qo[3] = usrow[3] * dh4 - P.q_base;
  let nkeys = P.j1 - P.j0;        // keys of this dispatch (its NKW windows)
  for (var jb = 0u; jb < nkeys; jb += UB_R * 8u) {
    let nk = min(nkeys - jb, UB_R * 8u);
    ub_init_r(0u, jb, nk, mine, b);
    ub_init_r(1u, jb, nk, mine, b);
    ub_init_r(2u, jb, nk, mine, b);
    ub_init_r(3u, jb, nk, mine, b);
    ub_init_r(4u, jb, nk, mine, b);
    ub_init_r(5u, jb, nk, mine, b);
    ub_init_r(6u, jb, nk, mine, b);
    ub_init_r(7u, jb, nk, mine, b);
    ub_init_r(8u, jb, nk, mine, b);
    ub_init_r(9u, jb, nk, mine, b);
    ub_init_r(10u, jb, nk, mine, b);
    ub_init_r(11u, jb, nk, mine, b);
    ub_init_r(12u, jb, nk, mine, b);
    ub_init_r(13u, jb, nk, mine, b);
    ub_init_r(14u, jb, nk, mine, b);
    ub_init_r(15u, jb, nk, mine, b);
    // S = Q Kᵀ for the block
    for (var d4 = 0u; d4 < dh4; d4++) {
      uq4[0] = vec4<f32>(uq[qo[0] + d4]);
      uq4[1] = vec4<f32>(uq[qo[1] + d4]);
      uq4[2] = vec4<f32>(uq[qo[2] + d4]);
      uq4[3] = vec4<f32>(uq[qo[3] + d4]);
      ub_qk_r(0u, nk, jb, mine, dh4, d4);
      ub_qk_r(1u, nk, jb, mine, dh4, d4);
      ub_qk_r(2u, nk, jb, mine, dh4, d4);
      ub_qk_r(3u, nk, jb, mine, dh4, d4);
      ub_qk_r(4u, nk, jb, mine, dh4, d4);
      ub_qk_r(5u, nk, jb, mine, dh4, d4);
      ub_qk_r(6u, nk, jb, mine, dh4, d4);
      ub_qk_r(7u, nk, jb, mine, dh4, d4);
      ub_qk_r(8u, nk, jb, mine, dh4, d4);
      ub_qk_r(9u, nk, jb, mine, dh4, d4);
      ub_qk_r(10u, nk, jb, mine, dh4, d4);
      ub_qk_r(11u, nk, jb, mine, dh4, d4);
      ub_qk_r(12u, nk, jb, mine, dh4, d4);
      ub_qk_r(13u, nk, jb, mine, dh4, d4);
      ub_qk_r(14u, nk, jb, mine, dh4, d4);
      ub_qk_r(15u, nk, jb, mine, dh4, d4);
    }
    ub_softmax(nk);
    // acc = acc * alpha + P V
    for (var d4 = 0u; d4 < dh4; d4++) {
      upv[0] = vec4<f32>(0.0);
      upv[1] = vec4<f32>(0.0);
      upv[2] = vec4<f32>(0.0);
      upv[3] = vec4<f32>(0.0);
      ub_pv_r(0u, nk, jb, mine, dh4, d4);
      ub_pv_r(1u, nk, jb, mine, dh4, d4);
      ub_pv_r(2u, nk, jb, mine, dh4, d4);
      ub_pv_r(3u, nk, jb, mine, dh4, d4);
      ub_pv_r(4u, nk, jb, mine, dh4, d4);
      ub_pv_r(5u, nk, jb, mine, dh4, d4);
      ub_pv_r(6u, nk, jb, mine, dh4, d4);
      ub_pv_r(7u, nk, jb, mine, dh4, d4);
      ub_pv_r(8u, nk, jb, mine, dh4, d4);
      ub_pv_r(9u, nk, jb, mine, dh4, d4);
      ub_pv_r(10u, nk, jb, mine, dh4, d4);
      ub_pv_r(11u, nk, jb, mine, dh4, d4);
      ub_pv_r(12u, nk, jb, mine, dh4, d4);
      ub_pv_r(13u, nk, jb, mine, dh4, d4);
      ub_pv_r(14u, nk, jb, mine, dh4, d4);
      ub_pv_r(15u, nk, jb, mine, dh4, d4);
      ub_acc_q(0u, dh4, d4);
      ub_acc_q(1u, dh4, d4);
      ub_acc_q(2u, dh4, d4);
      ub_acc_q(3u, dh4, d4);
    }
  }
  ub_fin_q(0u, dh4);
  ub_fin_q(1u, dh4);
  ub_fin_q(2u, dh4);
  ub_fin_q(3u, dh4);
}

// ---------------------------------------------------------------- pack_kv
// k/v [B, Lk, H, Dh] (in_t) -> two [rows, Dh] f32 tensors holding keys [j0, j0 + n) of head h of
// batch b (row r = key j0 + r), for flash_ubo's uniform windows. One invocation per vec4.
struct PackParams {
  Lk: u32,
  H: u32,
  dh4: u32,     // Dh / 4
  b: u32,
  h: u32,
  j0: u32,
  n: u32,       // keys to pack
  k_base: u32,  // window starts of k and v (vec4 units)
  v_base: u32,
  dst_base: u32, // window start of both destinations (vec4 units; row j0 + r at (j0 + r) * dh4)
  _pad1: u32,
  _pad2: u32,
}

@group(0) @binding(0) var<uniform> PP: PackParams;
@group(0) @binding(1) var<storage, read> pk_src: array<vec4<in_t>>;
@group(0) @binding(2) var<storage, read> pv_src: array<vec4<in_t>>;
@group(0) @binding(3) var<storage, read_write> pk_dst: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> pv_dst: array<vec4<f32>>;

@compute @workgroup_size(64)
fn pack_kv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let x = (wid.x + wid.y * nwg.x) * 64u + lane;
  if (x >= PP.n * PP.dh4) { return; }
  let r = x / PP.dh4;
  let d4 = x % PP.dh4;
  let src = ((PP.b * PP.Lk + PP.j0 + r) * PP.H + PP.h) * PP.dh4 + d4;
  let dst = (PP.j0 + r) * PP.dh4 + d4 - PP.dst_base;
  pk_dst[dst] = vec4<f32>(pk_src[src - PP.k_base]);
  pv_dst[dst] = vec4<f32>(pv_src[src - PP.v_base]);
}
