// Params.flags bits of the attention kernels (attention.wgsl, softmax.wgsl attention_portable):
// run-time values, not override constants: every combination would be another pipeline, and each
// costs seconds of LLVM time on lavapipe; these branches are uniform and cheap.
const FLAG_MASK: u32 = 1u;       // key mask [B, Lk] i32
const FLAG_BIAS_FULL: u32 = 2u;  // bias [H, Lq, Lk]
const FLAG_BIAS_REL: u32 = 4u;   // bias [H, Lq + Lk - 1]
const FLAG_STATE_IN: u32 = 8u;   // continue from st_acc / st_ml (a previous key range)
const FLAG_FINAL: u32 = 16u;     // normalize and write the output (else write the (m, l) state)
const FLAG_ACC_IS_OUT: u32 = 32u; // st_acc is the f32 output itself (o unused)
