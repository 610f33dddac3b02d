// The leading fields of the convolution kernels' Params (conv.wgsl, conv_generic.wgsl): a
// fragment, included inside `struct Params { ... }`, which then adds its own fields.
  ci: u32,        // input channels summed by this dispatch
  t: u32,         // input frames in the x window
  h: u32,         // input height
  w: u32,         // input width
  co: u32,        // output channels written by this dispatch
  to: u32,        // output frames written by this dispatch
  ho: u32,        // output height
  wo: u32,        // output width
  kt: u32,        // kernel size (frames)
  st: u32,        // temporal stride
  pt: i32,        // input frame of output frame 0, tap 0 is -pt (relative to the x window)
  nb: u32,        // batch elements in this dispatch
  x_off: u32,     // in elements: element (b0, ci0, frame 0 of the window) in the x binding
  x_cs: u32,      // in elements: x channel stride
  x_bs: u32,      // in elements: x batch stride
  y_off: u32,     // in elements: element (b0, co0, frame t0) in the y binding
  y_cs: u32,      // in elements: y channel stride
  y_bs: u32,      // in elements: y batch stride
  w_row: u32,     // in elements: weight stride between output channels (Ci_total * kt * kh * kw)
  w_off: u32,     // in elements: weight offset of (co0, ci0) inside the weight binding
  b_off: u32,     // in elements: bias offset of co0 inside the bias binding
  tiles_w: u32,   // position tiles per output row (conv_k3) / per output frame (conv_k1, conv_any)
  tiles: u32,     // position tiles per batch element
  grid_x: u32,    // workgroups along x (the position-tile grid is folded into x and y)
  accumulate: u32,// 1: y += result (later input-channel chunks); 0: y = result (+ bias)
  has_bias: u32,  // 1: add the bias (binding Bs) on the first input-channel chunk
  b_dtype: u32,   // bias storage: 0 f32, 1 f16, 2 bf16
