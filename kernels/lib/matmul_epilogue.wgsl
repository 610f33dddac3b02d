// The epilogue of matmul.wgsl and matmul_ubo.wgsl. The including kernel declares `P` with the
// fields prev, epi, has_bias, bias_dtype and act (see its Params), `BIAS: array<u32>` (bias values
// of dtype code P.bias_dtype) and `Y: array<y_t>`.

//!include activations.wgsl
//!include dtype.wgsl

// Y[yi] = acc, + the partial sum already in Y[yi] (P.prev: K chunks after the first); on the
// last K chunk (P.epi) + bias element bi (P.has_bias), then the activation P.act (0 none,
// 1 gelu tanh, 2 silu).
fn epilogue(yi: u32, bi: u32, acc: f32) {
  var v = acc;
  if (P.prev != 0u) { v += f32(Y[yi]); }
  if (P.epi != 0u) {
    if (P.has_bias != 0u) { v += widen(BIAS[word_index(bi, P.bias_dtype)], bi, P.bias_dtype); }
    if (P.act == 1u) { v = gelu_tanh(v); } else if (P.act == 2u) { v = silu(v); }
  }
  Y[yi] = y_t(v);
}
