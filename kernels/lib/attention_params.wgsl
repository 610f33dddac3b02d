// The fields of the attention kernels' Params (attention.wgsl `Params`, softmax.wgsl
// `AttnParams`: one host-side packing serves both): a fragment, included inside the struct's braces.
// Window starts (`*_base`) are in the unit of the kernel's storage view: vec4 in attention.wgsl
// (except o_base and bias_base: elements), elements in attention_portable.
  Lq: u32,         // full query length
  Lk: u32,         // full key length
  H: u32,          // heads
  Dh: u32,         // head dim (elements; a multiple of 4 in attention.wgsl)
  b0: u32,         // first batch of this dispatch
  nh: u32,         // heads in this dispatch
  h0: u32,         // first head
  i0: u32,         // first query row (per batch)
  nq: u32,         // query rows per batch in this dispatch
  qtiles: u32,     // query tiles per (batch, head): ceil(nq / queries per workgroup)
  ngroups: u32,    // workgroups with work: nb * nh * qtiles
  j0: u32,         // key range [j0, j1)
  j1: u32,
  q_base: u32,     // window starts of q, k, v (flash_ubo: k_base = keys per uniform window)
  k_base: u32,
  v_base: u32,
  s_row0: u32,     // first state row (row = (b * Lq + i) * H + h) held by the bound st_ml
  o_base: u32,     // output window start (elements; attention.wgsl: f16 output only)
  bias_base: u32,  // bias window start (elements)
  acc_base: u32,   // st_acc window start: acc index = (row * H + h) * Dh (/ 4 for vec4) + d - acc_base
  scale: f32,      // q·k multiplier times log2(e)
  bias_scale: f32, // log2(e): the bias is added in the exp2 domain
  flags: u32,      // FLAG_* bits (lib/attention_flags.wgsl)
  _pad2: u32,
