// Key names of the original Wan 2.1 release (github Wan-Video/Wan2.1 `WanModel`, `WanVAE_`, `T5Encoder`)
// ↔ the names of the released diffusers / transformers checkpoints, which the models use.
//
// ONE table per component, used in both directions. Each row is a pair of full-key templates
// [wan, diffusers]; `{n}` stands for a block index (digits) and `{p}` for the parameter name
// (`weight`, `bias`, `gamma`). A key that no row matches is "unmapped" (reported, never guessed).
// Rows are checked to be unambiguous in both directions (tests map every key of the tiny model
// back and forth). Source: diffusers `scripts/convert_wan_to_diffusers.py` and the golden README
// ("Key mappings"). No tensor is transposed or reshaped by any of these renames.

export type KeyRow = readonly [wan: string, diffusers: string];

/** WanModel (t2v) → diffusers WanTransformer3DModel. Note the norm3 ↔ norm2 swap. */
export const TRANSFORMER_KEY_TABLE: readonly KeyRow[] = [
  ['patch_embedding.{p}', 'patch_embedding.{p}'], // Conv3d [D, 16, 1, 2, 2]
  ['text_embedding.0.{p}', 'condition_embedder.text_embedder.linear_1.{p}'],
  ['text_embedding.2.{p}', 'condition_embedder.text_embedder.linear_2.{p}'],
  ['time_embedding.0.{p}', 'condition_embedder.time_embedder.linear_1.{p}'],
  ['time_embedding.2.{p}', 'condition_embedder.time_embedder.linear_2.{p}'],
  ['time_projection.1.{p}', 'condition_embedder.time_proj.{p}'],
  ['head.head.{p}', 'proj_out.{p}'],
  ['head.modulation', 'scale_shift_table'], // [1, 2, D]
  ['blocks.{n}.modulation', 'blocks.{n}.scale_shift_table'], // [1, 6, D]
  ...attnRows('self_attn', 'attn1'),
  ...attnRows('cross_attn', 'attn2'),
  // Wan's cross-attention LayerNorm (affine) is norm3; diffusers calls it norm2. Wan norm1/norm2
  // and head.norm are affine-free (no parameters), so nothing else is named norm2/norm3.
  ['blocks.{n}.norm3.{p}', 'blocks.{n}.norm2.{p}'],
  ['blocks.{n}.ffn.0.{p}', 'blocks.{n}.ffn.net.0.proj.{p}'],
  ['blocks.{n}.ffn.2.{p}', 'blocks.{n}.ffn.net.2.{p}'],
];

function attnRows(wan: string, diff: string): KeyRow[] {
  return [
    [`blocks.{n}.${wan}.q.{p}`, `blocks.{n}.${diff}.to_q.{p}`],
    [`blocks.{n}.${wan}.k.{p}`, `blocks.{n}.${diff}.to_k.{p}`],
    [`blocks.{n}.${wan}.v.{p}`, `blocks.{n}.${diff}.to_v.{p}`],
    [`blocks.{n}.${wan}.o.{p}`, `blocks.{n}.${diff}.to_out.0.{p}`],
    [`blocks.{n}.${wan}.norm_q.{p}`, `blocks.{n}.${diff}.norm_q.{p}`],
    [`blocks.{n}.${wan}.norm_k.{p}`, `blocks.{n}.${diff}.norm_k.{p}`],
  ];
}

/** Wan residual block `residual.{0,2,3,6}` → diffusers resnet names. */
function resnetRows(wanBlock: string, diffBlock: string): KeyRow[] {
  return [
    [`${wanBlock}.residual.0.gamma`, `${diffBlock}.norm1.gamma`],
    [`${wanBlock}.residual.2.{p}`, `${diffBlock}.conv1.{p}`],
    [`${wanBlock}.residual.3.gamma`, `${diffBlock}.norm2.gamma`],
    [`${wanBlock}.residual.6.{p}`, `${diffBlock}.conv2.{p}`],
    [`${wanBlock}.shortcut.{p}`, `${diffBlock}.conv_shortcut.{p}`],
  ];
}

function midRows(part: 'encoder' | 'decoder'): KeyRow[] {
  return [
    ...resnetRows(`${part}.middle.0`, `${part}.mid_block.resnets.0`),
    [`${part}.middle.1.norm.gamma`, `${part}.mid_block.attentions.0.norm.gamma`],
    [`${part}.middle.1.to_qkv.{p}`, `${part}.mid_block.attentions.0.to_qkv.{p}`],
    [`${part}.middle.1.proj.{p}`, `${part}.mid_block.attentions.0.proj.{p}`],
    ...resnetRows(`${part}.middle.2`, `${part}.mid_block.resnets.1`),
  ];
}

/**
 * WanVAE_ → diffusers AutoencoderKLWan (port of diffusers' `convert_vae()`). The decoder's
 * `upsamples` list is regrouped into 4 up blocks of 3 resnets + 1 upsampler (hard-coded for
 * num_res_blocks = 2, as in diffusers); the encoder's `downsamples` keep their flat numbering.
 */
const VAE_KEY_TABLE: readonly KeyRow[] = (() => {
  const rows: KeyRow[] = [
    ['conv1.{p}', 'quant_conv.{p}'],
    ['conv2.{p}', 'post_quant_conv.{p}'],
    ['decoder.conv1.{p}', 'decoder.conv_in.{p}'],
    ...midRows('decoder'),
  ];
  for (let b = 0; b < 4; b++) {
    for (let r = 0; r < 3; r++) rows.push(...resnetRows(`decoder.upsamples.${4 * b + r}`, `decoder.up_blocks.${b}.resnets.${r}`));
    if (b < 3) {
      rows.push([`decoder.upsamples.${4 * b + 3}.resample.1.{p}`, `decoder.up_blocks.${b}.upsamplers.0.resample.1.{p}`]);
      rows.push([`decoder.upsamples.${4 * b + 3}.time_conv.{p}`, `decoder.up_blocks.${b}.upsamplers.0.time_conv.{p}`]);
    }
  }
  rows.push(['decoder.head.0.gamma', 'decoder.norm_out.gamma'], ['decoder.head.2.{p}', 'decoder.conv_out.{p}']);
  // encoder (not needed for text-to-video; mapped so a converted Wan VAE file opens cleanly)
  rows.push(
    ['encoder.conv1.{p}', 'encoder.conv_in.{p}'],
    ...resnetRows('encoder.downsamples.{n}', 'encoder.down_blocks.{n}'),
    ['encoder.downsamples.{n}.resample.1.{p}', 'encoder.down_blocks.{n}.resample.1.{p}'],
    ['encoder.downsamples.{n}.time_conv.{p}', 'encoder.down_blocks.{n}.time_conv.{p}'],
    ...midRows('encoder'),
    ['encoder.head.0.gamma', 'encoder.norm_out.gamma'],
    ['encoder.head.2.{p}', 'encoder.conv_out.{p}'],
  );
  return rows;
})();

/** Wan T5Encoder (umt5-xxl) → transformers UMT5EncoderModel. No tensor has a bias. */
const T5_KEY_TABLE: readonly KeyRow[] = [
  ['token_embedding.weight', 'shared.weight'],
  ['blocks.{n}.norm1.weight', 'encoder.block.{n}.layer.0.layer_norm.weight'],
  ['blocks.{n}.attn.q.weight', 'encoder.block.{n}.layer.0.SelfAttention.q.weight'],
  ['blocks.{n}.attn.k.weight', 'encoder.block.{n}.layer.0.SelfAttention.k.weight'],
  ['blocks.{n}.attn.v.weight', 'encoder.block.{n}.layer.0.SelfAttention.v.weight'],
  ['blocks.{n}.attn.o.weight', 'encoder.block.{n}.layer.0.SelfAttention.o.weight'],
  ['blocks.{n}.pos_embedding.embedding.weight', 'encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias.weight'], // [32, heads]
  ['blocks.{n}.norm2.weight', 'encoder.block.{n}.layer.1.layer_norm.weight'],
  ['blocks.{n}.ffn.gate.0.weight', 'encoder.block.{n}.layer.1.DenseReluDense.wi_0.weight'], // gelu branch
  ['blocks.{n}.ffn.fc1.weight', 'encoder.block.{n}.layer.1.DenseReluDense.wi_1.weight'], // linear branch
  ['blocks.{n}.ffn.fc2.weight', 'encoder.block.{n}.layer.1.DenseReluDense.wo.weight'],
  ['norm.weight', 'encoder.final_layer_norm.weight'],
];

// ---- template matching ----

interface Compiled {
  re: RegExp;
  names: string[];
  out: string;
}

const PLACEHOLDER = /\{([np])\}/g;

function compile(from: string, to: string): Compiled {
  const names: string[] = [];
  const src = from
    .split(PLACEHOLDER)
    .map((part, i) => {
      if (i % 2 === 1) {
        names.push(part);
        return part === 'n' ? '(\\d+)' : '(weight|bias|gamma)';
      }
      return part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    })
    .join('');
  return { re: new RegExp(`^${src}$`), names, out: to };
}

/** A bidirectional renamer built from one table. */
export class KeyMap {
  private readonly toDiff: Compiled[];
  private readonly toWan: Compiled[];

  constructor(
    readonly name: string,
    readonly table: readonly KeyRow[],
  ) {
    this.toDiff = table.map(([w, d]) => compile(w, d));
    this.toWan = table.map(([w, d]) => compile(d, w));
  }

  /** Wan name → diffusers name, or null when no row matches. */
  toDiffusers(key: string): string | null {
    return apply(this.toDiff, key, this.name, 'Wan');
  }
  /** diffusers name → Wan name, or null when no row matches. */
  toWanName(key: string): string | null {
    return apply(this.toWan, key, this.name, 'diffusers');
  }
}

function apply(rows: Compiled[], key: string, table: string, side: string): string | null {
  let result: string | null = null;
  for (const r of rows) {
    const m = r.re.exec(key);
    if (!m) continue;
    if (result !== null) throw new Error(`[key-maps] ${table}: ${side} key '${key}' matches two rows of the table`);
    let i = 1;
    const vals: Record<string, string> = {};
    for (const n of r.names) vals[n] = m[i++]!;
    result = r.out.replace(PLACEHOLDER, (_, n: string) => vals[n]!);
  }
  return result;
}

export const TRANSFORMER_KEYS = new KeyMap('transformer', TRANSFORMER_KEY_TABLE);
export const VAE_KEYS = new KeyMap('vae', VAE_KEY_TABLE);
export const T5_KEYS = new KeyMap('text_encoder', T5_KEY_TABLE);

/**
 * Does this key list look like the original Wan transformer layout? (`head.head.weight`,
 * `blocks.0.self_attn.q.weight`, `blocks.0.modulation`, ...) as opposed to diffusers
 * (`proj_out.weight`, `blocks.0.attn1.to_q.weight`).
 */
export function detectTransformerLayout(keys: readonly string[]): 'wan' | 'diffusers' | 'unknown' {
  const set = new Set(keys);
  const wan = ['head.head.weight', 'time_projection.1.weight', 'blocks.0.self_attn.q.weight', 'blocks.0.modulation'].filter((k) => set.has(k)).length;
  const diff = ['proj_out.weight', 'condition_embedder.time_proj.weight', 'blocks.0.attn1.to_q.weight', 'blocks.0.scale_shift_table'].filter((k) => set.has(k)).length;
  if (wan > 0 && diff === 0) return 'wan';
  if (diff > 0 && wan === 0) return 'diffusers';
  return 'unknown';
}
