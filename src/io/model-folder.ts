// Model folders in the diffusers layout, as Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers ship them:
//
//   model_index.json
//   transformer/   config.json + diffusion_pytorch_model.safetensors (14B: -0000N-of-0000M shards + .index.json)
//   vae/           config.json + diffusion_pytorch_model.safetensors
//   text_encoder/  config.json + model-0000N-of-0000M.safetensors + model.safetensors.index.json
//   scheduler/     scheduler_config.json
//   tokenizer/     tokenizer.json, spiece.model, special_tokens_map.json, tokenizer_config.json
//
// Wan 2.2 text-to-video A14B (Wan-AI/Wan2.2-T2V-A14B-Diffusers) adds a second DiT: `transformer/` is
// the HIGH-noise expert and `transformer_2/` the LOW-noise one, with `boundary_ratio` in
// model_index.json (diffusers' convert_wan_to_diffusers.py and pipeline_wan.py). The original Wan 2.2
// release names the two folders `high_noise_model/` and `low_noise_model/` (WanModel configs, Wan key
// names); they are accepted in place of transformer/ and transformer_2/ and renamed on open.
//
// Each config.json is parsed into a typed config with validation: required keys present with the
// right types (errors name the file and the key); extra Hugging Face keys are ignored by design.
// Config fields keep the exact config.json names (snake_case), so they read like the files.
// The transformer may also be a file in the ORIGINAL Wan release layout (`blocks.0.self_attn.q.weight`,
// `head.head.weight`, and a `WanModel` config.json); it is then served under diffusers names
// through the rename table in key-maps.ts.

import { promises as fsp } from 'node:fs';
import { join, resolve } from 'node:path';
import { CheckpointError } from '../util/errors.ts';
import { Checkpoint, findCheckpointIn } from './checkpoint.ts';
import { oneLine } from './safetensors.ts';
import { TRANSFORMER_KEYS, VAE_KEYS, T5_KEYS, detectTransformerLayout, type KeyMap } from './key-maps.ts';

const DOWNLOAD_HINT =
  'download a diffusers-format Wan 2.1 text-to-video model, e.g. `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR` ' +
  '(or Wan-AI/Wan2.1-T2V-14B-Diffusers), and pass DIR';

// ---- typed configs ----

/** transformer/config.json (diffusers WanTransformer3DModel), text-to-video only. */
export type TransformerConfig = {
  _class_name: string;
  patch_size: [number, number, number];
  num_attention_heads: number;
  attention_head_dim: number;
  in_channels: number;
  out_channels: number;
  text_dim: number;
  freq_dim: number;
  ffn_dim: number;
  num_layers: number;
  cross_attn_norm: boolean;
  /** 'rms_norm_across_heads' (the only kind Wan uses) or null */
  qk_norm: string | null;
  eps: number;
  rope_max_seq_len: number;
  /** always null here: image-to-video models are refused */
  image_dim: null;
};

/** vae/config.json (diffusers AutoencoderKLWan). */
export type VaeConfig = {
  _class_name: string;
  base_dim: number;
  z_dim: number;
  dim_mult: number[];
  num_res_blocks: number;
  attn_scales: number[];
  /** sic: the diffusers spelling */
  temperal_downsample: boolean[];
  latents_mean: number[];
  latents_std: number[];
};

/** text_encoder/config.json (transformers UMT5EncoderModel). */
export type T5Config = {
  model_type: 'umt5';
  d_model: number;
  d_kv: number;
  d_ff: number;
  num_heads: number;
  num_layers: number;
  vocab_size: number;
  relative_attention_num_buckets: number;
  relative_attention_max_distance: number;
  layer_norm_epsilon: number;
  feed_forward_proj: 'gated-gelu';
  pad_token_id: number;
  eos_token_id: number;
};

/** scheduler/scheduler_config.json (diffusers UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler). */
export type SchedulerConfig = {
  _class_name: string;
  /** the sigma shift (`flow_shift`, or `shift` for FlowMatchEulerDiscreteScheduler) */
  flow_shift: number;
  num_train_timesteps: number;
  solver_order: number;
  prediction_type: 'flow_prediction';
  use_flow_sigmas: boolean;
  solver_type: string;
  lower_order_final: boolean;
  final_sigmas_type: string;
};

export type ModelIndex = {
  _class_name: string;
  /** Wan 2.2 A14B: the expert switch as a fraction of num_train_timesteps (null when absent) */
  boundary_ratio: number | null;
  /** component → [library, class] as in model_index.json ([null, null] when absent) */
  components: Record<string, [string | null, string | null]>;
};

/** Where a component's weights are: pass `path` to Checkpoint.open. */
export interface WeightsRef {
  /** a .safetensors file or a .safetensors.index.json */
  path: string;
  sharded: boolean;
}

export interface Component<C> {
  name: 'transformer' | 'transformer_2' | 'vae' | 'text_encoder';
  dir: string;
  configPath: string;
  config: C;
  weights: WeightsRef;
  /** 'wan': the file uses the original Wan names and is renamed to diffusers names on open */
  keyLayout: 'diffusers' | 'wan';
  /** Open the weights under diffusers / transformers names (the caller closes it). */
  open(): Promise<Checkpoint>;
}

export interface ModelFolder {
  dir: string;
  index: ModelIndex;
  /** the DiT; with two experts (Wan 2.2 A14B) the HIGH-noise one (transformer/ or high_noise_model/) */
  transformer: Component<TransformerConfig>;
  /** Wan 2.2 A14B: the LOW-noise expert (transformer_2/ or low_noise_model/), same shapes; null for one DiT */
  transformer2: Component<TransformerConfig> | null;
  /** model_index.json's boundary_ratio (Wan 2.2 T2V A14B: 0.875): the high-noise expert runs while t >= ratio × num_train_timesteps; null when absent */
  boundaryRatio: number | null;
  vae: Component<VaeConfig>;
  textEncoder: Component<T5Config>;
  scheduler: { dir: string; configPath: string; config: SchedulerConfig };
  /** null when the folder has no tokenizer (then prompts must come as token ids) */
  tokenizer: { dir: string } | null;
}

// ---- validation helpers ----

type Json = Record<string, unknown>;

// Plausible ranges of the config values. A config is refused at parse time when a value is outside
// them: the models are built from these numbers, so an absurd one (`num_layers: 1e9`, a dim of 1e12)
// would otherwise allocate until V8 runs out of heap. The bounds are generous: every released Wan 2.1
// model (1.3B: dim 1536, 30 layers, 12 heads; 14B: dim 5120, 40 layers, 40 heads, ffn 13824), its
// UMT5-XXL text encoder (d_model 4096, d_ff 10240, 64 heads, 24 layers, vocab 256384) and VAE
// (base_dim 96, dim_mult [1,2,4,4]) sit far inside; so does anything a few times bigger.
/** layer / block counts */
const LAYERS: Range = [1, 1000];
/** model widths, channels, embedding sizes */
const DIM: Range = [1, 65536];
/** feed-forward widths (4× a model width at most) */
const FFN: Range = [1, 262144];
/** attention heads */
const HEADS: Range = [1, 1024];
/** per-head widths */
const HEAD_DIM: Range = [1, 4096];
/** patch sizes, VAE channel multipliers */
const SMALL: Range = [1, 64];
/** token vocabularies (2^24: UMT5 has 256384) */
const VOCAB: Range = [1, 2 ** 24];
/** positions, timesteps, relative distances */
const POSITIONS: Range = [1, 2 ** 20];

type Range = readonly [min: number, max: number];

/** A config value for a message: JSON, cut to one short line. */
function brief(v: unknown): string {
  let t: string;
  try {
    t = typeof v === 'number' ? String(v) : (JSON.stringify(v) ?? String(v));
  } catch {
    t = String(v);
  }
  t = t.replace(/[\p{C}\u2028\u2029]/gu, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  return t.length > 60 ? `${t.slice(0, 57)}...` : t;
}

/** A string from a config for a message: 'text' when short and printable, else JSON-escaped and cut. */
function qs(v: string): string {
  return v.length <= 60 && /^[\x20-\x26\x28-\x7e]*$/.test(v) ? `'${v}'` : brief(v);
}

class Cfg {
  constructor(
    readonly file: string,
    readonly obj: Json,
  ) {}

  fail(key: string, want: string): never {
    const v = this.obj[key];
    const got = v === undefined ? 'it is missing' : `got ${brief(v)}`;
    throw new CheckpointError(`[model-folder] ${this.file}: key '${key}' must be ${want}, ${got}`);
  }
  has(key: string): boolean {
    return this.obj[key] !== undefined;
  }
  /** An integer in `range` (plausible values; see the ranges above). */
  int(key: string, range: Range, dflt?: number): number {
    const v = this.obj[key] ?? dflt;
    const [min, max] = range;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) this.fail(key, `an integer in ${min}..${max}`);
    return v;
  }
  num(key: string, dflt?: number, positive = true, max = Infinity): number {
    const v = this.obj[key] ?? dflt;
    if (typeof v !== 'number' || !Number.isFinite(v) || (positive && !(v > 0)) || v > max) {
      this.fail(key, positive ? (max < Infinity ? `a number > 0 and <= ${max}` : 'a number > 0') : 'a number');
    }
    return v;
  }
  bool(key: string, dflt?: boolean): boolean {
    const v = this.obj[key] ?? dflt;
    if (typeof v !== 'boolean') this.fail(key, 'true or false');
    return v;
  }
  str(key: string, dflt?: string): string {
    const v = this.obj[key] ?? dflt;
    if (typeof v !== 'string') this.fail(key, 'a string');
    return v;
  }
  /** An array of integers in `range`, of length `len` (or `len` = [min, max] lengths). */
  ints(key: string, len: number | Range, range: Range, dflt?: number[]): number[] {
    const v = this.obj[key] ?? dflt;
    const [lo, hi] = typeof len === 'number' ? [len, len] : len;
    const [min, max] = range;
    if (!Array.isArray(v) || v.length < lo || v.length > hi || !v.every((x) => typeof x === 'number' && Number.isSafeInteger(x) && x >= min && x <= max)) {
      this.fail(key, `an array of ${lo === hi ? lo : `${lo} to ${hi}`} integers in ${min}..${max}`);
    }
    return [...(v as number[])];
  }
  nums(key: string, len: number): number[] {
    const v = this.obj[key];
    if (!Array.isArray(v) || v.length !== len || !v.every((x) => typeof x === 'number' && Number.isFinite(x))) this.fail(key, `an array of ${len} numbers`);
    return [...(v as number[])];
  }
  /** `a` * `b` (e.g. heads × head_dim) within `range`, else an error naming both keys. */
  product(keyA: string, a: number, keyB: string, b: number, range: Range, what: string): void {
    if (a * b > range[1]) this.fail(keyA, `such that ${keyA} × ${keyB} (${a} × ${b} = ${a * b}, the ${what}) is at most ${range[1]}`);
  }
  bools(key: string, len: number): boolean[] {
    const v = this.obj[key];
    if (!Array.isArray(v) || v.length !== len || !v.every((x) => typeof x === 'boolean')) this.fail(key, `an array of ${len} booleans`);
    return [...(v as boolean[])];
  }
}

/** Largest config JSON read (a Wan config.json is ~1 KB; a model_index.json too). */
const MAX_CONFIG_BYTES = 16 * 1024 * 1024;

/**
 * Why `path` cannot be used, as message words, for the fs error codes a broken download or a
 * bad link gives: 'symlink loop (ELOOP)', 'not readable (permission denied)', ... .
 */
export function fsReason(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  switch (code) {
    case 'ENOENT':
      return 'missing';
    case 'ELOOP':
      return 'symlink loop (ELOOP): a link points (through others) back to itself; fix or remove the link';
    case 'EACCES':
    case 'EPERM':
      return 'not readable (permission denied); fix its permissions (chmod / chown)';
    case 'EISDIR':
      return 'is a folder, not a file';
    case 'ENOTDIR':
      return 'missing (a part of its path is a file, not a folder)';
    case 'ENAMETOOLONG':
      return 'path too long (ENAMETOOLONG)';
    case 'EIO':
      return 'I/O error (EIO): the disk or network file system failed; check it and download again';
    default:
      return `cannot read (${code ?? oneLine((err as Error).message)})`;
  }
}

/** Kind of `p` ('file', 'dir', 'other' or 'missing'); a symlink loop or unreadable path is an error naming it. */
async function pathKind(p: string): Promise<'file' | 'dir' | 'other' | 'missing'> {
  try {
    const st = await fsp.stat(p);
    return st.isDirectory() ? 'dir' : st.isFile() ? 'file' : 'other';
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      // a dangling symlink says so (stat follows links; lstat sees the link itself)
      const link = await fsp.lstat(p).then((st) => st.isSymbolicLink(), () => false);
      if (link) {
        const target = await fsp.readlink(p).catch(() => '?');
        throw new CheckpointError(`[model-folder] ${p}: a symlink to '${target}', which does not exist (a dangling link); fix the link or download the file again`, { cause: err });
      }
      return 'missing';
    }
    throw new CheckpointError(`[model-folder] ${p}: ${fsReason(err)}`, { cause: err });
  }
}

async function readJson(file: string, what: string): Promise<Json> {
  let text: string;
  try {
    const kind = await pathKind(file);
    if (kind === 'dir') throw new CheckpointError(`[model-folder] ${file}: is a folder, not a JSON file${what ? `: ${what}` : ''}`);
    if (kind === 'file' && (await fsp.stat(file)).size > MAX_CONFIG_BYTES) {
      throw new CheckpointError(`[model-folder] ${file}: larger than ${MAX_CONFIG_BYTES} bytes: not a config file${what ? `: ${what}` : ''}`);
    }
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if (err instanceof CheckpointError) throw err;
    throw new CheckpointError(`[model-folder] ${file}: ${fsReason(err)}${what ? `: ${what}` : ''}`, { cause: err });
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new CheckpointError(`[model-folder] ${file}: malformed JSON (${oneLine((err as Error).message)}); download it again`, { cause: err });
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new CheckpointError(`[model-folder] ${file}: must be a JSON object`);
  return v as Json;
}

// ---- config parsers (exported for tests and for callers holding a config object) ----

export function parseTransformerConfig(obj: Json, file = 'transformer/config.json'): TransformerConfig {
  const c = new Cfg(file, obj);
  const cls = c.str('_class_name', 'WanTransformer3DModel');
  if (cls === 'WanModel') return parseWanModelConfig(c);
  if (cls !== 'WanTransformer3DModel') {
    throw new CheckpointError(`[model-folder] ${file}: _class_name is ${qs(cls)}, expected 'WanTransformer3DModel' (Wan 2.1 text-to-video); ${DOWNLOAD_HINT}`);
  }
  if ((obj.image_dim ?? null) !== null || (obj.added_kv_proj_dim ?? null) !== null) {
    throw new CheckpointError(
      `[model-folder] ${file}: this is an image-to-video transformer (image_dim / added_kv_proj_dim set); only text-to-video (T2V) models are supported yet`,
    );
  }
  const ps = c.ints('patch_size', 3, SMALL);
  const qk = obj.qk_norm ?? null;
  if (qk !== null && qk !== 'rms_norm_across_heads') c.fail('qk_norm', "'rms_norm_across_heads' or null");
  const cfg: TransformerConfig = {
    _class_name: cls,
    patch_size: [ps[0]!, ps[1]!, ps[2]!],
    num_attention_heads: c.int('num_attention_heads', HEADS),
    attention_head_dim: c.int('attention_head_dim', HEAD_DIM),
    in_channels: c.int('in_channels', DIM),
    out_channels: c.int('out_channels', DIM),
    text_dim: c.int('text_dim', DIM),
    freq_dim: c.int('freq_dim', DIM),
    ffn_dim: c.int('ffn_dim', FFN),
    num_layers: c.int('num_layers', LAYERS),
    cross_attn_norm: c.bool('cross_attn_norm'),
    qk_norm: qk as string | null,
    eps: c.num('eps', undefined, true, 1),
    rope_max_seq_len: c.int('rope_max_seq_len', POSITIONS, 1024),
    image_dim: null,
  };
  checkTransformer(c, cfg);
  return cfg;
}

/** The original Wan release's config.json (`WanModel`: dim, num_heads, in_dim, out_dim, model_type, ...). */
function parseWanModelConfig(c: Cfg): TransformerConfig {
  const type = c.str('model_type', 't2v');
  if (type !== 't2v') throw new CheckpointError(`[model-folder] ${c.file}: model_type ${qs(type)} (image-to-video / first-last-frame) is not supported yet; only 't2v' models are`);
  const dim = c.int('dim', DIM);
  const heads = c.int('num_heads', HEADS);
  if (dim % heads !== 0) c.fail('dim', `divisible by num_heads (${heads})`);
  const ps = c.ints('patch_size', 3, SMALL, [1, 2, 2]);
  const cfg: TransformerConfig = {
    _class_name: 'WanModel',
    patch_size: [ps[0]!, ps[1]!, ps[2]!],
    num_attention_heads: heads,
    attention_head_dim: dim / heads,
    in_channels: c.int('in_dim', DIM),
    out_channels: c.int('out_dim', DIM),
    text_dim: c.int('text_dim', DIM, 4096),
    freq_dim: c.int('freq_dim', DIM, 256),
    ffn_dim: c.int('ffn_dim', FFN),
    num_layers: c.int('num_layers', LAYERS),
    cross_attn_norm: c.bool('cross_attn_norm', true),
    qk_norm: c.bool('qk_norm', true) ? 'rms_norm_across_heads' : null,
    eps: c.num('eps', 1e-6, true, 1),
    rope_max_seq_len: 1024, // Wan builds its RoPE tables with rope_params(1024, ...)
    image_dim: null,
  };
  checkTransformer(c, cfg);
  return cfg;
}

function checkTransformer(c: Cfg, cfg: TransformerConfig): void {
  const d = cfg.attention_head_dim;
  // RoPE splits head_dim into t/h/w angle dims d - 4(d//6), 2(d//6), 2(d//6): all must be even.
  if (d % 2 !== 0 || d < 6) c.fail(cfg._class_name === 'WanModel' ? 'dim' : 'attention_head_dim', cfg._class_name === 'WanModel' ? `dim / num_heads = ${d}: an even number >= 6 (RoPE pairs)` : 'an even number >= 6 (RoPE pairs)');
  // the model width (heads × head_dim) is a dim too
  if (cfg._class_name !== 'WanModel') c.product('num_attention_heads', cfg.num_attention_heads, 'attention_head_dim', d, DIM, 'model width');
  // the sinusoidal time embedding takes cos and sin halves of freq_dim
  if (cfg.freq_dim % 2 !== 0) c.fail('freq_dim', 'an even integer (cos and sin halves)');
}

export function parseVaeConfig(obj: Json, file = 'vae/config.json'): VaeConfig {
  const c = new Cfg(file, obj);
  const cls = c.str('_class_name', 'AutoencoderKLWan');
  if (cls !== 'AutoencoderKLWan') throw new CheckpointError(`[model-folder] ${file}: _class_name is ${qs(cls)}, expected 'AutoencoderKLWan' (the Wan 2.1 VAE)`);
  const zDim = c.int('z_dim', [1, 1024]);
  // Wan's VAE: 4 stages ([1, 2, 4, 4]); up to 8 stages (a 2^7 downsampling) is plausible
  const dimMult = c.ints('dim_mult', [2, 8], SMALL);
  const baseDim = c.int('base_dim', [1, 4096]);
  c.product('base_dim', baseDim, 'dim_mult', Math.max(...dimMult), DIM, 'widest VAE stage');
  const cfg: VaeConfig = {
    _class_name: cls,
    base_dim: baseDim,
    z_dim: zDim,
    dim_mult: dimMult,
    num_res_blocks: c.int('num_res_blocks', SMALL),
    attn_scales: (() => {
      const v = obj.attn_scales ?? [];
      if (!Array.isArray(v) || v.length > 64 || !v.every((x) => typeof x === 'number' && Number.isFinite(x))) c.fail('attn_scales', 'an array of at most 64 numbers');
      return [...(v as number[])];
    })(),
    temperal_downsample: c.bools('temperal_downsample', dimMult.length - 1),
    latents_mean: c.nums('latents_mean', zDim),
    latents_std: c.nums('latents_std', zDim),
  };
  if (cfg.latents_std.some((s) => !(s > 0))) c.fail('latents_std', `an array of ${zDim} numbers > 0`);
  return cfg;
}

export function parseT5Config(obj: Json, file = 'text_encoder/config.json'): T5Config {
  const c = new Cfg(file, obj);
  const mt = c.str('model_type');
  if (mt !== 'umt5') {
    throw new CheckpointError(`[model-folder] ${file}: model_type is ${qs(mt)}, expected 'umt5' (Wan's text encoder is UMT5-XXL: one relative-position bias per layer, unlike T5)`);
  }
  const ff = c.str('feed_forward_proj');
  if (ff !== 'gated-gelu') c.fail('feed_forward_proj', "'gated-gelu' (Wan's UMT5 uses a gated GELU FFN)");
  const cfg: T5Config = {
    model_type: 'umt5',
    d_model: c.int('d_model', DIM),
    d_kv: c.int('d_kv', HEAD_DIM),
    d_ff: c.int('d_ff', FFN),
    num_heads: c.int('num_heads', HEADS),
    num_layers: c.int('num_layers', LAYERS),
    vocab_size: c.int('vocab_size', VOCAB),
    relative_attention_num_buckets: c.int('relative_attention_num_buckets', [2, 4096]),
    relative_attention_max_distance: c.int('relative_attention_max_distance', [2, POSITIONS[1]]),
    layer_norm_epsilon: c.num('layer_norm_epsilon', undefined, true, 1),
    feed_forward_proj: 'gated-gelu',
    pad_token_id: c.int('pad_token_id', [0, VOCAB[1]], 0),
    eos_token_id: c.int('eos_token_id', [0, VOCAB[1]], 1),
  };
  c.product('num_heads', cfg.num_heads, 'd_kv', cfg.d_kv, DIM, 'attention width');
  if (cfg.pad_token_id >= cfg.vocab_size) c.fail('pad_token_id', `a token id below vocab_size (${cfg.vocab_size})`);
  if (cfg.eos_token_id >= cfg.vocab_size) c.fail('eos_token_id', `a token id below vocab_size (${cfg.vocab_size})`);
  return cfg;
}

export function parseSchedulerConfig(obj: Json, file = 'scheduler/scheduler_config.json'): SchedulerConfig {
  const c = new Cfg(file, obj);
  const cls = c.str('_class_name');
  const shiftKey = c.has('flow_shift') ? 'flow_shift' : c.has('shift') ? 'shift' : 'flow_shift';
  const pt = c.str('prediction_type', 'flow_prediction');
  if (pt !== 'flow_prediction') c.fail('prediction_type', "'flow_prediction' (Wan is a flow-matching model)");
  return {
    _class_name: cls,
    flow_shift: c.num(shiftKey, undefined, true, 1000),
    num_train_timesteps: c.int('num_train_timesteps', POSITIONS),
    solver_order: c.int('solver_order', [1, 3], 2),
    prediction_type: 'flow_prediction',
    use_flow_sigmas: c.bool('use_flow_sigmas', true),
    solver_type: c.str('solver_type', 'bh2'),
    lower_order_final: c.bool('lower_order_final', true),
    final_sigmas_type: c.str('final_sigmas_type', 'zero'),
  };
}

function parseModelIndex(obj: Json, file = 'model_index.json'): ModelIndex {
  const c = new Cfg(file, obj);
  const cls = c.str('_class_name');
  if (cls !== 'WanPipeline') {
    const i2v = /ImageToVideo|I2V|VACE|Video2Video/i.test(cls);
    throw new CheckpointError(
      `[model-folder] ${file}: _class_name is ${qs(cls)}, expected 'WanPipeline'` + (i2v ? ': only text-to-video models are supported yet' : `; ${DOWNLOAD_HINT}`),
    );
  }
  const components: Record<string, [string | null, string | null]> = {};
  for (const [k, v] of Object.entries(obj)) {
    if (k.startsWith('_')) continue;
    if (Array.isArray(v) && v.length === 2 && v.every((x) => x === null || typeof x === 'string')) components[k] = [v[0] as string | null, v[1] as string | null];
  }
  const br = obj.boundary_ratio ?? null;
  if (br !== null && (typeof br !== 'number' || !(br >= 0 && br <= 1))) c.fail('boundary_ratio', 'a number in 0..1 (Wan 2.2 T2V A14B: 0.875) or null');
  return { _class_name: cls, components, boundary_ratio: br as number | null };
}

// ---- folder opening ----

async function isDir(p: string): Promise<boolean> {
  return (await pathKind(p)) === 'dir';
}
async function isFile(p: string): Promise<boolean> {
  return (await pathKind(p)) === 'file';
}

async function findWeights(dir: string, base: string, comp: string): Promise<WeightsRef> {
  let path: string;
  try {
    path = await findCheckpointIn(dir, base);
  } catch (err) {
    if (err instanceof CheckpointError && /no \.safetensors file/.test(err.message)) {
      throw new CheckpointError(`[model-folder] ${dir}: the ${comp} has no weights (${base}.safetensors or ${base}.safetensors.index.json): the download is incomplete; ${DOWNLOAD_HINT}`, {
        cause: err,
      });
    }
    throw err;
  }
  // the name is listed; the file itself may be a symlink loop, a dangling link or unreadable
  const kind = await pathKind(path);
  if (kind !== 'file') throw new CheckpointError(`[model-folder] ${path}: ${kind === 'dir' ? 'is a folder' : kind === 'missing' ? 'missing' : 'not a regular file'}: the ${comp} weights must be a file`);
  return { path, sharded: path.endsWith('.index.json') };
}

function makeComponent<C>(
  name: Component<C>['name'],
  dir: string,
  configPath: string,
  config: C,
  weights: WeightsRef,
  keyLayout: 'diffusers' | 'wan',
  view: (ck: Checkpoint) => Checkpoint,
): Component<C> {
  return {
    name,
    dir,
    configPath,
    config,
    weights,
    keyLayout,
    async open() {
      const ck = await Checkpoint.open(weights.path);
      try {
        return view(ck);
      } catch (err) {
        await ck.close();
        throw err;
      }
    },
  };
}

/** Rename a Wan-layout checkpoint to diffusers names; keys no row maps are left out (and ignored). */
function wanView(map: KeyMap): (ck: Checkpoint) => Checkpoint {
  return (ck) => ck.renamed((k) => map.toDiffusers(k)).checkpoint;
}

/**
 * Open a Wan 2.1 text-to-video model folder (diffusers layout). Reads the configs and the
 * checkpoint headers (no tensor data); every missing or corrupt part is a CheckpointError saying
 * what is wrong and how to fix it.
 */
export async function openModelFolder(dirIn: string): Promise<ModelFolder> {
  const dir = resolve(dirIn);
  const rootKind = await pathKind(dir);
  if (rootKind === 'file' && /\.safetensors(\.index\.json)?$/.test(dir)) throw new CheckpointError(`[model-folder] ${dir}: is a checkpoint file, not a model folder; pass the folder holding model_index.json`);
  if (rootKind !== 'dir') throw new CheckpointError(`[model-folder] ${dir}: ${rootKind === 'missing' ? 'no such folder' : 'not a folder'}; ${DOWNLOAD_HINT}`);
  const indexPath = join(dir, 'model_index.json');
  if (!(await isFile(indexPath))) {
    const cfgPath = join(dir, 'config.json');
    if (await isFile(cfgPath)) {
      const cfg = await readJson(cfgPath, '');
      if (cfg._class_name === 'WanModel') {
        throw new CheckpointError(
          `[model-folder] ${dir}: this is the original Wan release layout (WanModel): its VAE and T5 are PyTorch pickles (.pth), which are not supported. ` +
            `${DOWNLOAD_HINT}. (Its transformer safetensors can replace transformer/ of a diffusers folder: the original key names are recognized.)`,
        );
      }
    }
    if (await isDir(join(dir, 'high_noise_model'))) {
      throw new CheckpointError(
        `[model-folder] ${dir}: this is the original Wan 2.2 release layout (high_noise_model/, low_noise_model/): its T5 and VAE are PyTorch pickles (.pth), which are not supported. ` +
          'Download Wan-AI/Wan2.2-T2V-A14B-Diffusers, or put high_noise_model/ and low_noise_model/ into a diffusers folder in place of transformer/ and transformer_2/ (the original key names are recognized)',
      );
    }
    throw new CheckpointError(`[model-folder] ${dir}: missing model_index.json: not a diffusers model folder; ${DOWNLOAD_HINT}`);
  }
  const index = parseModelIndex(await readJson(indexPath, ''), indexPath);

  const need = async (sub: string): Promise<string> => {
    const p = join(dir, sub);
    if (!(await isDir(p))) throw new CheckpointError(`[model-folder] ${dir}: missing the ${sub}/ folder: the download is incomplete; ${DOWNLOAD_HINT}`);
    return p;
  };

  // transformer(s): transformer/ (+ transformer_2/), or the original Wan 2.2 names
  const hasDir = async (sub: string) => isDir(join(dir, sub));
  const [tNew, t2New, hiOld, loOld] = await Promise.all(['transformer', 'transformer_2', 'high_noise_model', 'low_noise_model'].map(hasDir));
  if (tNew && hiOld) throw new CheckpointError(`[model-folder] ${dir}: has both transformer/ and high_noise_model/ (the same expert in two layouts); keep one`);
  if (t2New && loOld) throw new CheckpointError(`[model-folder] ${dir}: has both transformer_2/ and low_noise_model/ (the same expert in two layouts); keep one`);
  const t1Sub = hiOld ? 'high_noise_model' : 'transformer';
  const t2Sub = loOld ? 'low_noise_model' : t2New ? 'transformer_2' : null;
  const t2Listed = (index.components.transformer_2 ?? [null])[0] !== null && index.components.transformer_2 !== undefined;
  if (!tNew && !hiOld && (t2New || loOld)) {
    throw new CheckpointError(`[model-folder] ${dir}: has ${t2Sub}/ (the low-noise expert) but no transformer/ (or high_noise_model/), the high-noise expert: the download is incomplete; download both experts (e.g. Wan-AI/Wan2.2-T2V-A14B-Diffusers)`);
  }
  if (!t2Sub && t2Listed) {
    throw new CheckpointError(`[model-folder] ${dir}: model_index.json lists transformer_2 (Wan 2.2's low-noise expert) but the transformer_2/ folder is missing: the download is incomplete; download both experts (e.g. Wan-AI/Wan2.2-T2V-A14B-Diffusers)`);
  }
  if (hiOld && !loOld) {
    throw new CheckpointError(`[model-folder] ${dir}: has high_noise_model/ but no low_noise_model/: Wan 2.2 A14B needs both experts; copy low_noise_model/ from the same release`);
  }
  const tDir = await need(t1Sub);
  const transformer = await openTransformer(tDir, 'transformer');
  const transformer2 = t2Sub ? await openTransformer(join(dir, t2Sub), 'transformer_2') : null;
  if (transformer2) checkSameShapes(transformer, transformer2);
  if (!transformer2 && index.boundary_ratio !== null) {
    throw new CheckpointError(`[model-folder] ${indexPath}: boundary_ratio is set (a two-expert Wan 2.2 model) but the folder has one transformer: add transformer_2/ (the low-noise expert) or remove boundary_ratio`);
  }
  const tCfg = transformer.config;

  // vae
  const vDir = await need('vae');
  const vCfgPath = join(vDir, 'config.json');
  const vCfg = parseVaeConfig(await readJson(vCfgPath, `the VAE config; ${DOWNLOAD_HINT}`), vCfgPath);
  const vW = await findWeights(vDir, 'diffusion_pytorch_model', 'vae');
  const vLayout = await withCheckpoint(vW.path, (ck) => (ck.has('decoder.conv1.weight') && !ck.has('decoder.conv_in.weight') ? 'wan' : 'diffusers'));
  const vae = makeComponent('vae', vDir, vCfgPath, vCfg, vW, vLayout, vLayout === 'wan' ? wanView(VAE_KEYS) : (ck) => ck);

  // text encoder
  const eDir = await need('text_encoder');
  const eCfgPath = join(eDir, 'config.json');
  const eCfg = parseT5Config(await readJson(eCfgPath, `the text encoder config; ${DOWNLOAD_HINT}`), eCfgPath);
  const eW = await findWeights(eDir, 'model', 'text_encoder');
  const eLayout = await withCheckpoint(eW.path, (ck) => (ck.has('token_embedding.weight') && !ck.has('shared.weight') ? 'wan' : 'diffusers'));
  const textEncoder = makeComponent('text_encoder', eDir, eCfgPath, eCfg, eW, eLayout, (ck) => {
    if (eLayout === 'wan') return wanView(T5_KEYS)(ck);
    // transformers ties shared.weight and encoder.embed_tokens.weight; a file may hold either copy
    if (!ck.has('shared.weight') && ck.has('encoder.embed_tokens.weight')) {
      return ck.renamed((k) => (k === 'encoder.embed_tokens.weight' ? 'shared.weight' : k)).checkpoint;
    }
    return ck;
  });

  // scheduler
  const sDir = await need('scheduler');
  const sCfgPath = join(sDir, 'scheduler_config.json');
  const scheduler = { dir: sDir, configPath: sCfgPath, config: parseSchedulerConfig(await readJson(sCfgPath, `the scheduler config; ${DOWNLOAD_HINT}`), sCfgPath) };

  // tokenizer (optional: the tiny test model has none and gives token ids)
  let tokenizer: { dir: string } | null = null;
  const tokEntry = index.components.tokenizer;
  const tokDir = join(dir, 'tokenizer');
  const listed = tokEntry !== undefined && tokEntry[0] !== null;
  if (await isDir(tokDir)) {
    if (!(await isFile(join(tokDir, 'tokenizer.json')))) {
      throw new CheckpointError(`[model-folder] ${tokDir}: missing tokenizer.json (the UMT5 tokenizer): the download is incomplete; ${DOWNLOAD_HINT}`);
    }
    tokenizer = { dir: tokDir };
  } else if (listed) {
    throw new CheckpointError(`[model-folder] ${dir}: model_index.json lists a tokenizer but the tokenizer/ folder is missing: the download is incomplete; ${DOWNLOAD_HINT}`);
  }

  // cross-component consistency
  if (tCfg.text_dim !== eCfg.d_model) {
    throw new CheckpointError(`[model-folder] ${dir}: transformer text_dim (${tCfg.text_dim}) != text_encoder d_model (${eCfg.d_model}): the components come from different models`);
  }
  if (tCfg.in_channels !== vCfg.z_dim || tCfg.out_channels !== vCfg.z_dim) {
    throw new CheckpointError(
      `[model-folder] ${dir}: transformer in/out channels (${tCfg.in_channels}/${tCfg.out_channels}) != vae z_dim (${vCfg.z_dim}): the components come from different models`,
    );
  }
  return { dir, index, transformer, transformer2, boundaryRatio: index.boundary_ratio, vae, textEncoder, scheduler, tokenizer };
}

/** One DiT folder: its config (diffusers or WanModel) and weights (diffusers or Wan key names). */
async function openTransformer(tDir: string, name: 'transformer' | 'transformer_2'): Promise<Component<TransformerConfig>> {
  const tCfgPath = join(tDir, 'config.json');
  const tCfg = parseTransformerConfig(await readJson(tCfgPath, `the ${name} config; ${DOWNLOAD_HINT}`), tCfgPath);
  const tW = await findWeights(tDir, 'diffusion_pytorch_model', name);
  const tLayout = await withCheckpoint(tW.path, (ck) => {
    const l = detectTransformerLayout(ck.keys());
    if (l === 'unknown') {
      throw new CheckpointError(
        `[model-folder] ${ck.describe()}: cannot tell the key layout of this transformer checkpoint (neither diffusers 'proj_out.weight' nor Wan 'head.head.weight'): is it a Wan 2.1 / 2.2 model?`,
      );
    }
    return l;
  });
  return makeComponent(name, tDir, tCfgPath, tCfg, tW, tLayout, tLayout === 'wan' ? wanView(TRANSFORMER_KEYS) : (ck) => ck);
}

/** The two experts of a Wan 2.2 model must have the same shapes (one ring, one memory plan serve both). */
function checkSameShapes(a: Component<TransformerConfig>, b: Component<TransformerConfig>): void {
  const keys: Array<keyof TransformerConfig> = ['patch_size', 'num_attention_heads', 'attention_head_dim', 'in_channels', 'out_channels', 'text_dim', 'freq_dim', 'ffn_dim', 'num_layers', 'cross_attn_norm', 'qk_norm'];
  for (const k of keys) {
    if (JSON.stringify(a.config[k]) !== JSON.stringify(b.config[k])) {
      throw new CheckpointError(
        `[model-folder] the two experts differ in ${k}: ${JSON.stringify(a.config[k])} in ${a.configPath} vs ${JSON.stringify(b.config[k])} in ${b.configPath}: they come from different models; use the two experts of one Wan 2.2 release`,
      );
    }
  }
}

async function withCheckpoint<T>(path: string, fn: (ck: Checkpoint) => T): Promise<T> {
  const ck = await Checkpoint.open(path);
  try {
    return fn(ck);
  } finally {
    await ck.close();
  }
}
