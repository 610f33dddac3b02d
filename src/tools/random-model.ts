// Deterministic random-weight model folders in the diffusers layout, for benchmarks and tests at
// real Wan shapes (never committed: generated at run time into a cache folder). The weights are
// drawn per parameter from a seeded stream, scaled by fan-in so activations stay O(1): the numbers
// are meaningless, the shapes, dtypes, file layout and loading path are the real ones.

import { existsSync, mkdirSync, writeFileSync, cpSync } from 'node:fs';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { writeSafetensors, type TensorToWrite } from '../io/safetensors.ts';
import { parseT5Config, parseTransformerConfig, parseVaeConfig } from '../io/model-folder.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../models/wan_dit/model.ts';
import { UMT5EncoderModel, umt5DimsFromConfig } from '../models/umt5/model.ts';
import { WanVaeDecoder, vaeDimsFromConfig } from '../models/wan_vae/model.ts';
import type { Module, Param } from '../nn/module.ts';
import { Rng } from '../util/rng.ts';
import { f32ToBf16Bits } from '../tensor/dtype.ts';
import { Tensor } from '../tensor/tensor.ts';

export interface RandomModelSpec {
  transformer: Record<string, unknown>;
  vae: Record<string, unknown>;
  textEncoder: Record<string, unknown>;
  /** dtype of matmul/conv weights in the files (norms etc. are written the same way, as real checkpoints do) */
  dtype: 'bf16' | 'f32';
  seed: number;
  /** tokenizer folder to copy into tokenizer/ */
  tokenizerDir: string;
  /** 2: a Wan 2.2 A14B-style folder, transformer/ (high noise) + transformer_2/ (low noise, other weights) and boundary_ratio 0.875 */
  experts?: 1 | 2;
}

/** Wan 2.1 T2V-1.3B transformer config (Wan-AI/Wan2.1-T2V-1.3B-Diffusers). */
export const WAN_1_3B_TRANSFORMER = {
  _class_name: 'WanTransformer3DModel',
  added_kv_proj_dim: null,
  attention_head_dim: 128,
  cross_attn_norm: true,
  eps: 1e-6,
  ffn_dim: 8960,
  freq_dim: 256,
  image_dim: null,
  in_channels: 16,
  num_attention_heads: 12,
  num_layers: 30,
  out_channels: 16,
  patch_size: [1, 2, 2],
  qk_norm: 'rms_norm_across_heads',
  rope_max_seq_len: 1024,
  text_dim: 4096,
};

/** Wan 2.1 T2V-14B transformer config (Wan-AI/Wan2.1-T2V-14B-Diffusers); each Wan 2.2 T2V-A14B expert has the same shapes. */
export const WAN_14B_TRANSFORMER = { ...WAN_1_3B_TRANSFORMER, attention_head_dim: 128, num_attention_heads: 40, ffn_dim: 13824, num_layers: 40 };

/** The Wan 2.1 VAE config (base_dim 96). */
export const WAN_VAE = {
  _class_name: 'AutoencoderKLWan',
  attn_scales: [],
  base_dim: 96,
  dim_mult: [1, 2, 4, 4],
  dropout: 0.0,
  latents_mean: [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
  latents_std: [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
  num_res_blocks: 2,
  temperal_downsample: [false, true, true],
  z_dim: 16,
};

/** UMT5-XXL encoder shapes (google/umt5-xxl as Wan uses it), depth and vocabulary given by the caller. */
export function umt5XxlConfig(numLayers: number, vocab = 32128): Record<string, unknown> {
  return {
    architectures: ['UMT5EncoderModel'],
    d_ff: 10240,
    d_kv: 64,
    d_model: 4096,
    dense_act_fn: 'gelu_new',
    feed_forward_proj: 'gated-gelu',
    layer_norm_epsilon: 1e-6,
    model_type: 'umt5',
    num_heads: 64,
    num_layers: numLayers,
    relative_attention_max_distance: 128,
    relative_attention_num_buckets: 32,
    vocab_size: vocab,
  };
}

function paramStd(key: string, p: Param): { kind: 'normal' | 'ones' | 'zeros'; std: number } {
  const shape = p.shape;
  if (/(^|\.)(gamma|norm_q\.weight|norm_k\.weight|layer_norm\.weight|final_layer_norm\.weight)$/.test(key) || /norm2\.weight$/.test(key)) return { kind: 'ones', std: 0 };
  if (key.endsWith('.bias')) return { kind: 'normal', std: 0.02 };
  if (key.endsWith('scale_shift_table')) return { kind: 'normal', std: 0.05 };
  if (key.endsWith('relative_attention_bias.weight')) return { kind: 'normal', std: 0.1 };
  if (key === 'shared.weight') return { kind: 'normal', std: 1 };
  if (shape.length >= 2) {
    const fanIn = shape.slice(1).reduce((a, b) => a * b, 1);
    return { kind: 'normal', std: 0.7 / Math.sqrt(fanIn) };
  }
  return { kind: 'normal', std: 0.02 };
}

function tensorsOf(m: Module, rng: Rng, dtype: 'bf16' | 'f32', skip?: (key: string) => boolean): TensorToWrite[] {
  const out: TensorToWrite[] = [];
  for (const [key, p] of m.namedParams()) {
    if (skip?.(key)) continue;
    const n = p.shape.reduce((a, b) => a * b, 1);
    const { kind, std } = paramStd(key, p);
    if (dtype === 'bf16') {
      const words = new Uint16Array(n);
      if (kind === 'ones') words.fill(f32ToBf16Bits(1));
      else if (kind === 'normal') for (let i = 0; i < n; i++) words[i] = f32ToBf16Bits(rng.normal() * std);
      out.push({ key, dtype: 'BF16', shape: [...p.shape], data: new Uint8Array(words.buffer) });
    } else {
      const v = new Float32Array(n);
      if (kind === 'ones') v.fill(1);
      else if (kind === 'normal') for (let i = 0; i < n; i++) v[i] = rng.normal() * std;
      out.push({ key, dtype: 'F32', shape: [...p.shape], data: new Uint8Array(v.buffer) });
    }
  }
  return out;
}

/** Write (or reuse, when already complete) a random model folder for `spec` under `root`. Returns its path. */
export async function randomModelFolder(root: string, spec: RandomModelSpec, log: (s: string) => void = () => {}): Promise<string> {
  const id = createHash('sha256').update(JSON.stringify({ ...spec, tokenizerDir: undefined, v: 1 })).digest('hex').slice(0, 12);
  const dir = join(root, id);
  const done = join(dir, '.complete');
  if (existsSync(done)) return dir;
  mkdirSync(dir, { recursive: true });
  const json = (p: string, o: unknown) => {
    mkdirSync(join(dir, p, '..'), { recursive: true });
    writeFileSync(join(dir, p), JSON.stringify(o, null, 2));
  };
  json('model_index.json', {
    _class_name: 'WanPipeline',
    scheduler: ['diffusers', 'UniPCMultistepScheduler'],
    text_encoder: ['transformers', 'UMT5EncoderModel'],
    tokenizer: ['transformers', 'T5TokenizerFast'],
    transformer: ['diffusers', 'WanTransformer3DModel'],
    ...(spec.experts === 2 ? { transformer_2: ['diffusers', 'WanTransformer3DModel'], boundary_ratio: 0.875 } : {}),
    vae: ['diffusers', 'AutoencoderKLWan'],
  });
  json('transformer/config.json', spec.transformer);
  if (spec.experts === 2) json('transformer_2/config.json', spec.transformer);
  json('vae/config.json', spec.vae);
  json('text_encoder/config.json', spec.textEncoder);
  json('scheduler/scheduler_config.json', { _class_name: 'UniPCMultistepScheduler', flow_shift: 5.0, num_train_timesteps: 1000, prediction_type: 'flow_prediction', solver_order: 2, use_flow_sigmas: true });
  cpSync(spec.tokenizerDir, join(dir, 'tokenizer'), { recursive: true });
  const t0 = performance.now();
  const dit = new WanTransformer3DModel(ditDimsFromConfig(parseTransformerConfig(spec.transformer)));
  await writeSafetensors(join(dir, 'transformer', 'diffusion_pytorch_model.safetensors'), tensorsOf(dit, new Rng(spec.seed), spec.dtype));
  log(`transformer written (${((performance.now() - t0) / 1000).toFixed(0)} s)`);
  if (spec.experts === 2) {
    await writeSafetensors(join(dir, 'transformer_2', 'diffusion_pytorch_model.safetensors'), tensorsOf(dit, new Rng(spec.seed + 3), spec.dtype));
    log(`transformer_2 written (${((performance.now() - t0) / 1000).toFixed(0)} s)`);
  }
  const vae = new WanVaeDecoder(vaeDimsFromConfig(parseVaeConfig(spec.vae)));
  await writeSafetensors(join(dir, 'vae', 'diffusion_pytorch_model.safetensors'), tensorsOf(vae, new Rng(spec.seed + 1), spec.dtype));
  const te = new UMT5EncoderModel(umt5DimsFromConfig(parseT5Config(spec.textEncoder)));
  await writeSafetensors(join(dir, 'text_encoder', 'model.safetensors'), tensorsOf(te, new Rng(spec.seed + 2), spec.dtype));
  log(`model written to ${dir} (${((performance.now() - t0) / 1000).toFixed(0)} s)`);
  writeFileSync(done, new Date().toISOString());
  return dir;
}


/** Fill a module's params in place with deterministic random values (on `engine`, or the CPU device). */
export function randomizeModule(m: Module, seed: number, engine: import('../runtime/engine.ts').Engine | null, dtype: 'bf16' | 'f32' = 'f32'): void {
  const rng = new Rng(seed);
  for (const t of tensorsOf(m, rng, dtype)) {
    const p = m.namedParams().find(([k]) => k === t.key)![1];
    const host = dtype === 'f32' || p.policy === 'f32'
      ? Tensor.cpu(dtype === 'f32' ? new Float32Array(t.data.buffer) : bf16ToF32(new Uint16Array(t.data.buffer)), t.shape, 'f32')
      : Tensor.cpu(new Uint16Array(t.data.buffer), t.shape, 'bf16');
    p.value?.dispose();
    p.value = engine ? engine.keep(host.toGpu(engine, `random.${t.key}`)) : host;
  }
}

function bf16ToF32(w: Uint16Array): Float32Array {
  const out = new Float32Array(w.length);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < w.length; i++) u[i] = w[i]! << 16;
  return out;
}
