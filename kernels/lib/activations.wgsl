// Activations, f32 math: scalar and vec4 forms (WGSL has no generic user functions). The vec4
// forms do the same operations in the same order, so a lane's result is bit-identical to the
// scalar form's.

fn tanh_f(z: f32) -> f32 {
  // tanh through exp with the argument clamped: |z| > 15 is ±1 to f32 precision, and the clamp
  // keeps exp() finite on every implementation.
  let c = clamp(z, -15.0, 15.0);
  let e = exp(2.0 * c);
  return (e - 1.0) / (e + 1.0);
}

fn tanh4(z: vec4<f32>) -> vec4<f32> {
  let c = clamp(z, vec4<f32>(-15.0), vec4<f32>(15.0));
  let e = exp(2.0 * c);
  return (e - 1.0) / (e + 1.0);
}

// GELU, tanh approximation (PyTorch approximate='tanh', T5 gelu_new)
fn gelu_tanh(x: f32) -> f32 {
  return 0.5 * x * (1.0 + tanh_f(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

fn gelu_tanh4(x: vec4<f32>) -> vec4<f32> {
  return 0.5 * x * (1.0 + tanh4(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

fn silu(x: f32) -> f32 {
  return x / (1.0 + exp(-x));
}

fn silu4(x: vec4<f32>) -> vec4<f32> {
  return x / (1.0 + exp(-x));
}
