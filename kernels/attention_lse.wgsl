// Attention with its per-row log-sum-exp, and the exact merge of two partial attentions over
// disjoint key sets (src/ops/attention_lse.ts; ring attention, src/parallel/ring.ts).
//
// A "partial" is f32 [rows, H, Dh + 1] (rows = B·Lq, PyTorch order): elements 0..Dh-1 of a
// (row, head) are its normalized attention output o, element Dh its natural-log LSE
// ln Σ_j exp(scale·q·k_j) over the keys it saw; NEG (-1e30, finite) when it saw none (then o = 0).
//
//   lse_finish  the fused attention's kernels (attention.wgsl flash / flash_ubo, softmax.wgsl
//               attention_portable) run without FLAG_FINAL leave the unnormalized accumulator
//               st_acc [rows, H, Dh] and the online-softmax state st_ml = (m, l) per (row, head),
//               m in the exp2 domain (scale·log2(e) folded in): o = acc / l, lse = (m + log2 l)·ln 2.
//   lse_merge   a, b partials → their attention over the union of the key sets:
//               m = max(lse_a, lse_b), w_x = exp(lse_x - m), o = (w_a·o_a + w_b·o_b) / (w_a + w_b),
//               lse = m + ln(w_a + w_b); with `fin` only o, [rows, H, Dh] in o_t (f32 or f16).
//
// Both are elementwise over their outputs (one invocation per output element: the LSE of a state
// row is re-read by each of its Dh + 1 invocations, from cache); tensors above one binding are split
// by the wrapper into windows of whole state rows (`*_off`: element offset of the first state row
// inside its window).

alias o_t = f32;   // lse_merge output (f16 only with fin = 1)

const NEG: f32 = -1.0e30;
const LN2: f32 = 0.6931471805599453;

override WG: u32 = 256u;

// ---------------------------------------------------------------- lse_finish

struct FinishParams {
  n: u32,       // state rows (row, head) in this dispatch
  dh: u32,      // head dim
  o_off: u32,   // element offset of state row 0 in the output window ([n, dh + 1])
  empty: u32,   // 1: no keys at all (Lk = 0): o = 0, lse = NEG without reading the state
}

@group(0) @binding(0) var<uniform> FP: FinishParams;
@group(0) @binding(1) var<storage, read> f_acc: array<f32>;        // [n, dh] unnormalized output
@group(0) @binding(2) var<storage, read> f_ml: array<vec2<f32>>;   // [n] (m, l)
@group(0) @binding(3) var<storage, read_write> f_out: array<f32>;  // [n, dh + 1] window

@compute @workgroup_size(WG)
fn lse_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let w = FP.dh + 1u;
  let i = (wid.x + wid.y * nwg.x) * WG + lane;
  if (i >= FP.n * w) { return; }
  let s = i / w;
  let d = i - s * w;
  var val = select(0.0, NEG, d == FP.dh);
  if (FP.empty == 0u) {
    let ml = f_ml[s];
    if (ml.y > 0.0) {
      if (d < FP.dh) {
        val = f_acc[s * FP.dh + d] / ml.y;
      } else {
        val = (ml.x + log2(ml.y)) * LN2;
      }
    }
  }
  f_out[FP.o_off + i] = val;
}

// ---------------------------------------------------------------- lse_merge

struct MergeParams {
  n: u32,       // state rows in this dispatch
  dh: u32,      // head dim (the partials' rows are dh + 1 long)
  a_off: u32,   // element offset of state row 0 in the a / b / output windows
  b_off: u32,
  o_off: u32,
  fin: u32,     // 1: write only o ([n, dh] in o_t); 0: the merged partial ([n, dh + 1] f32)
  _pad0: u32,
  _pad1: u32,
}

@group(0) @binding(0) var<uniform> MP: MergeParams;
@group(0) @binding(1) var<storage, read> m_a: array<f32>;
@group(0) @binding(2) var<storage, read> m_b: array<f32>;
@group(0) @binding(3) var<storage, read_write> m_out: array<o_t>;

@compute @workgroup_size(WG)
fn lse_merge(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let win = MP.dh + 1u;                       // partial row length
  let wout = select(win, MP.dh, MP.fin != 0u); // output row length
  let i = (wid.x + wid.y * nwg.x) * WG + lane;
  if (i >= MP.n * wout) { return; }
  let s = i / wout;
  let d = i - s * wout;
  let ra = MP.a_off + s * win;
  let rb = MP.b_off + s * win;
  let la = m_a[ra + MP.dh];
  let lb = m_b[rb + MP.dh];
  let m = max(la, lb);
  var val = select(0.0, NEG, d == MP.dh);     // neither partial saw a key
  if (m > 0.5 * NEG) {
    let wa = exp(la - m);
    let wb = exp(lb - m);
    let sw = wa + wb;
    if (d < MP.dh) {
      val = (wa * m_a[ra + d] + wb * m_b[rb + d]) / sw;
    } else {
      val = m + log(sw);
    }
  }
  m_out[MP.o_off + i] = o_t(val);
}
