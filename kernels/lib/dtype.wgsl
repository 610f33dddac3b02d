// Float values stored in an array<u32> as dtype code 0 f32, 1 f16 or 2 bf16 (the 16-bit types two
// per word, element i in the low half when i is even). Weights are bound this way, so bf16
// checkpoints are used as they are and no shader feature is needed. Decoding is exact.
// Usage: widen(buf[word_index(i, dt)], i, dt).

// word of element i
fn word_index(i: u32, dt: u32) -> u32 {
  return select(i >> 1u, i, dt == 0u);
}

// the 16 bits of element i inside its word
fn half_bits(word: u32, i: u32) -> u32 {
  return (word >> ((i & 1u) * 16u)) & 0xffffu;
}

// element i (held by `word`) as f32
fn widen(word: u32, i: u32, dt: u32) -> f32 {
  if (dt == 0u) { return bitcast<f32>(word); }
  let h = half_bits(word, i);
  if (dt == 2u) { return bitcast<f32>(h << 16u); }
  return unpack2x16float(h).x;
}
