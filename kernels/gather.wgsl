// Embedding gather: y[n, :] = table[ids[n], :] widened to f32 (or stored as f16 via y_t).
// ids [N] i32, table [V, D] f32 / f16 / bf16 (T_DTYPE: 0 f32, 1 f16, 2 bf16; bound as u32 words).
//
// The table may be far larger than one binding (UMT5-XXL: 256384 x 4096 bf16 = 2 GiB), so the
// wrapper binds it in windows of rows [v0, v1), one dispatch each; a dispatch writes only the
// rows whose id falls in its window. Ids outside [0, V) produce zero rows (written by the
// dispatch flagged `zero_oob`); the CPU reference throws for them instead.
//
// Grid: x over D (consecutive lanes, consecutive elements of one row: coalesced), y/z over rows
// (the id load is uniform across the workgroup).

alias y_t = f32;

struct Params {
  rows: u32,     // ids / output rows in this dispatch
  d: u32,        // row length D
  v0: u32,       // first table row of the window
  v1: u32,       // one past the last table row of the window
  vocab: u32,    // V
  t_off: u32,    // element offset of table row v0 inside the table window
  ids_off: u32,  // element offset of this dispatch's first id inside the ids window
  y_off: u32,    // element offset of this dispatch's first output element inside the y window
  zero_oob: u32, // 1: also write zero rows for ids outside [0, V)
  _p0: u32,
  _p1: u32,
  _p2: u32,
}

override WG: u32 = 64u;
override T_DTYPE: u32 = 0u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> ids: array<i32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<y_t>;

//!include lib/dtype.wgsl

fn table_at(e: u32) -> f32 {
  return widen(table[word_index(e, T_DTYPE)], e, T_DTYPE);
}

@compute @workgroup_size(WG)
fn embedding(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let j = wid.x * WG + lid.x;
  let n = wid.y + wid.z * nwg.y;
  if (j >= P.d || n >= P.rows) { return; }
  let id = ids[P.ids_off + n];
  let o = P.y_off + n * P.d + j;
  if (id >= 0 && u32(id) >= P.v0 && u32(id) < P.v1) {
    y[o] = y_t(table_at(P.t_off + (u32(id) - P.v0) * P.d + j));
  } else if (P.zero_oob != 0u && (id < 0 || u32(id) >= P.vocab)) {
    y[o] = y_t(0.0);
  }
}
