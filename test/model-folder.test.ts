// Model folders (diffusers layout), typed configs, the original-Wan key maps.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { mkdtempSync, rmSync, cpSync, readFileSync, writeFileSync, mkdirSync, renameSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { openModelFolder, parseTransformerConfig, parseT5Config, parseVaeConfig, parseSchedulerConfig, type ModelFolder } from '../src/io/model-folder.ts';
import { TRANSFORMER_KEYS, VAE_KEYS, T5_KEYS, TRANSFORMER_KEY_TABLE, detectTransformerLayout } from '../src/io/key-maps.ts';
import { Checkpoint, loadStrict } from '../src/io/checkpoint.ts';
import { SafetensorsFile, writeSafetensors } from '../src/io/safetensors.ts';
import { CheckpointError } from '../src/util/errors.ts';
import { TINY } from './helpers/golden.ts';

let tmp: string;
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'sd-model-folder-'));
});
afterAll(() => {
  rmSync(tmp, { recursive: true, force: true });
});

let n = 0;
/** A fresh copy of the tiny model folder (configs + weights, no golden files). */
function copyTiny(): string {
  const d = join(tmp, `m${n++}`);
  for (const sub of ['transformer', 'vae', 'text_encoder', 'scheduler']) cpSync(join(TINY, sub), join(d, sub), { recursive: true });
  cpSync(join(TINY, 'model_index.json'), join(d, 'model_index.json'));
  return d;
}

function editJson(p: string, edit: (j: Record<string, unknown>) => void): void {
  const j = JSON.parse(readFileSync(p, 'utf8'));
  edit(j);
  writeFileSync(p, JSON.stringify(j));
}

async function folderError(dir: string): Promise<string> {
  try {
    await openModelFolder(dir);
  } catch (err) {
    expect(err).toBeInstanceOf(CheckpointError);
    return (err as Error).message;
  }
  throw new Error('expected openModelFolder to fail');
}

/** Rewrite a checkpoint file with renamed keys (same order, same bytes). */
async function rewriteRenamed(src: string, dst: string, rename: (k: string) => string): Promise<void> {
  const f = await SafetensorsFile.open(src);
  const tensors = [];
  for (const k of f.keys()) {
    const i = f.info(k);
    tensors.push({ key: rename(k), dtype: i.dtype, shape: i.shape, data: await f.read(k) });
  }
  await f.close();
  await writeSafetensors(dst, tensors, { format: 'pt' });
}

describe('model folder: the tiny fixture', () => {
  let m: ModelFolder;
  beforeAll(async () => {
    m = await openModelFolder(TINY);
  });
  it('parses every config with the values of the files', () => {
    expect(m.index._class_name).toBe('WanPipeline');
    expect(m.index.components.transformer).toEqual(['diffusers', 'WanTransformer3DModel']);
    expect(m.transformer.config).toEqual({
      _class_name: 'WanTransformer3DModel',
      patch_size: [1, 2, 2],
      num_attention_heads: 2,
      attention_head_dim: 64,
      in_channels: 16,
      out_channels: 16,
      text_dim: 64,
      freq_dim: 256,
      ffn_dim: 256,
      num_layers: 2,
      cross_attn_norm: true,
      qk_norm: 'rms_norm_across_heads',
      eps: 1e-6,
      rope_max_seq_len: 1024,
      image_dim: null,
    });
    const v = m.vae.config;
    expect([v.base_dim, v.z_dim, v.num_res_blocks]).toEqual([16, 16, 2]);
    expect(v.dim_mult).toEqual([1, 2, 4, 4]);
    expect(v.temperal_downsample).toEqual([false, true, true]);
    expect(v.attn_scales).toEqual([]);
    expect(v.latents_mean[0]).toBe(-0.7571);
    expect(v.latents_std[15]).toBe(1.916);
    expect(m.textEncoder.config).toEqual({
      model_type: 'umt5',
      d_model: 64,
      d_kv: 16,
      d_ff: 128,
      num_heads: 4,
      num_layers: 2,
      vocab_size: 1000,
      relative_attention_num_buckets: 32,
      relative_attention_max_distance: 128,
      layer_norm_epsilon: 1e-6,
      feed_forward_proj: 'gated-gelu',
      pad_token_id: 0,
      eos_token_id: 1,
    });
    expect(m.scheduler.config).toEqual({
      _class_name: 'UniPCMultistepScheduler',
      flow_shift: 5,
      num_train_timesteps: 1000,
      solver_order: 2,
      prediction_type: 'flow_prediction',
      use_flow_sigmas: true,
      solver_type: 'bh2',
      lower_order_final: true,
      final_sigmas_type: 'zero',
    });
    expect(m.tokenizer).toBeNull();
  });
  it('configs are plain records (usable where a Record<string, unknown> is expected)', () => {
    const asRecord: Record<string, unknown> = m.transformer.config;
    expect(asRecord.num_layers).toBe(2);
  });
  it('finds and opens each component checkpoint under diffusers names', async () => {
    for (const c of [m.transformer, m.vae, m.textEncoder]) {
      expect(c.keyLayout).toBe('diffusers');
      expect(c.weights.sharded).toBe(false);
      const ck = await c.open();
      expect(ck.size).toBeGreaterThan(10);
      await ck.close();
    }
    const ck = await m.transformer.open();
    const { tensors, unused } = await loadStrict(ck, [{ key: 'proj_out.weight', shape: [64, 128] }], { what: 'transformer' });
    expect(tensors.get('proj_out.weight')!.shape).toEqual([64, 128]);
    expect(unused.length).toBe(ck.size - 1);
    await ck.close();
  });
});

describe('model folder: errors for missing or bad parts', () => {
  it('missing folder / not a model folder / original Wan layout at the root', async () => {
    expect(await folderError(join(tmp, 'nope'))).toMatch(/no such folder; download .*huggingface-cli download Wan-AI\/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR/);
    const d = join(tmp, 'plain');
    mkdirSync(d);
    expect(await folderError(d)).toMatch(/missing model_index.json: not a diffusers model folder/);
    writeFileSync(join(d, 'config.json'), JSON.stringify({ _class_name: 'WanModel', dim: 1536 }));
    expect(await folderError(d)).toMatch(/original Wan release layout .*pickles \(\.pth\)/);
  });
  it('missing component folders, configs and weights', async () => {
    let d = copyTiny();
    rmSync(join(d, 'vae'), { recursive: true });
    expect(await folderError(d)).toMatch(/missing the vae\/ folder: the download is incomplete/);
    d = copyTiny();
    rmSync(join(d, 'transformer', 'config.json'));
    expect(await folderError(d)).toMatch(/transformer\/config.json: missing: the transformer config/);
    d = copyTiny();
    rmSync(join(d, 'text_encoder', 'model.safetensors'));
    expect(await folderError(d)).toMatch(/text_encoder: the text_encoder has no weights \(model.safetensors or model.safetensors.index.json\)/);
    d = copyTiny();
    rmSync(join(d, 'scheduler', 'scheduler_config.json'));
    expect(await folderError(d)).toMatch(/scheduler_config.json: missing/);
    d = copyTiny();
    renameSync(join(d, 'vae', 'diffusion_pytorch_model.safetensors'), join(d, 'vae', 'diffusion_pytorch_model.bin'));
    expect(await folderError(d)).toMatch(/diffusion_pytorch_model.bin: '.bin' files are PyTorch pickles/);
  });
  it('config keys: missing, mistyped, i2v, wrong model type — each names the file and key', async () => {
    let d = copyTiny();
    editJson(join(d, 'transformer', 'config.json'), (j) => delete j.num_layers);
    expect(await folderError(d)).toMatch(/transformer\/config.json: key 'num_layers' must be an integer in 1..1000, it is missing/);
    d = copyTiny();
    editJson(join(d, 'transformer', 'config.json'), (j) => (j.ffn_dim = '256'));
    expect(await folderError(d)).toMatch(/key 'ffn_dim' must be an integer in 1..262144, got "256"/);
    d = copyTiny();
    editJson(join(d, 'transformer', 'config.json'), (j) => (j.image_dim = 1280));
    expect(await folderError(d)).toMatch(/image-to-video transformer .* only text-to-video \(T2V\) models are supported yet/);
    d = copyTiny();
    editJson(join(d, 'vae', 'config.json'), (j) => (j.latents_std = [1, 2]));
    expect(await folderError(d)).toMatch(/vae\/config.json: key 'latents_std' must be an array of 16 numbers, got \[1,2\]/);
    d = copyTiny();
    editJson(join(d, 'text_encoder', 'config.json'), (j) => (j.model_type = 't5'));
    expect(await folderError(d)).toMatch(/model_type is 't5', expected 'umt5'/);
    d = copyTiny();
    editJson(join(d, 'model_index.json'), (j) => (j._class_name = 'WanImageToVideoPipeline'));
    expect(await folderError(d)).toMatch(/only text-to-video models are supported yet/);
    d = copyTiny();
    writeFileSync(join(d, 'scheduler', 'scheduler_config.json'), '{"_class_name": ');
    expect(await folderError(d)).toMatch(/scheduler_config.json: malformed JSON/);
    d = copyTiny();
    editJson(join(d, 'text_encoder', 'config.json'), (j) => (j.d_model = 32));
    expect(await folderError(d)).toMatch(/transformer text_dim \(64\) != text_encoder d_model \(32\)/);
  });
  it('absurd config values are refused at parse time, in milliseconds, naming file, key, value and range', () => {
    const base = JSON.parse(readFileSync(join(TINY, 'transformer', 'config.json'), 'utf8'));
    const cases: Array<[Record<string, unknown>, RegExp]> = [
      [{ num_layers: 1e9 }, /key 'num_layers' must be an integer in 1\.\.1000, got 1000000000$/],
      [{ num_layers: -3 }, /key 'num_layers' must be an integer in 1\.\.1000, got -3/],
      [{ num_layers: 2.5 }, /key 'num_layers' must be an integer in 1\.\.1000, got 2\.5/],
      [{ num_layers: 'NaN' }, /key 'num_layers' must be an integer in 1\.\.1000, got "NaN"/],
      [{ num_layers: 1e400 }, /got Infinity/],
      [{ ffn_dim: 1e12 }, /key 'ffn_dim' must be an integer in 1\.\.262144, got 1000000000000/],
      [{ text_dim: 0 }, /key 'text_dim' must be an integer in 1\.\.65536, got 0/],
      [{ num_attention_heads: 1024, attention_head_dim: 128 }, /num_attention_heads × attention_head_dim \(1024 × 128 = 131072, the model width\) is at most 65536/],
      [{ patch_size: [1, 2, 1e6] }, /key 'patch_size' must be an array of 3 integers in 1\.\.64/],
      [{ eps: 5 }, /key 'eps' must be a number > 0 and <= 1, got 5/],
      [{ freq_dim: 255 }, /key 'freq_dim' must be an even integer/],
      [{ rope_max_seq_len: 2 ** 40 }, /rope_max_seq_len' must be an integer in 1\.\.1048576/],
    ];
    for (const [edit, re] of cases) {
      const t0 = performance.now();
      let err: unknown;
      try {
        parseTransformerConfig({ ...base, ...edit }, '/m/transformer/config.json');
      } catch (e) {
        err = e;
      }
      expect(performance.now() - t0).toBeLessThan(50);
      expect(err, String(re)).toBeInstanceOf(CheckpointError);
      expect((err as Error).message).toMatch(re);
      expect((err as Error).message).toMatch(/^\[model-folder\] \/m\/transformer\/config.json: key '/);
    }
    expect(() => parseTransformerConfig({ _class_name: 'WanModel', dim: 1e9, num_heads: 12, model_type: 't2v', in_dim: 16, out_dim: 16, ffn_dim: 8960, num_layers: 30 })).toThrow(/key 'dim' must be an integer in 1\.\.65536/);
    expect(() => parseTransformerConfig({ _class_name: 'WanModel', dim: 1536, num_heads: 12, model_type: 't2v', in_dim: 16, out_dim: 16, ffn_dim: 8960, num_layers: 1e9 })).toThrow(/num_layers' must be an integer in 1\.\.1000/);
    const vae = JSON.parse(readFileSync(join(TINY, 'vae', 'config.json'), 'utf8'));
    expect(() => parseVaeConfig({ ...vae, base_dim: 1e12 })).toThrow(/key 'base_dim' must be an integer in 1\.\.4096, got 1000000000000/);
    expect(() => parseVaeConfig({ ...vae, base_dim: 4096, dim_mult: [1, 2, 64, 4] })).toThrow(/base_dim × dim_mult \(4096 × 64 = 262144, the widest VAE stage\) is at most 65536/);
    expect(() => parseVaeConfig({ ...vae, dim_mult: Array(100).fill(1) })).toThrow(/dim_mult' must be an array of 2 to 8 integers/);
    expect(() => parseVaeConfig({ ...vae, z_dim: 1e9 })).toThrow(/z_dim' must be an integer in 1\.\.1024/);
    expect(() => parseVaeConfig({ ...vae, num_res_blocks: 1e9 })).toThrow(/num_res_blocks' must be an integer in 1\.\.64/);
    const t5 = JSON.parse(readFileSync(join(TINY, 'text_encoder', 'config.json'), 'utf8'));
    expect(() => parseT5Config({ ...t5, num_layers: 1e9 })).toThrow(/text_encoder\/config.json: key 'num_layers' must be an integer in 1\.\.1000, got 1000000000/);
    expect(() => parseT5Config({ ...t5, vocab_size: 1e12 })).toThrow(/vocab_size' must be an integer in 1\.\.16777216/);
    expect(() => parseT5Config({ ...t5, d_kv: 4096, num_heads: 64 })).toThrow(/num_heads × d_kv .* is at most 65536/);
    expect(() => parseT5Config({ ...t5, eos_token_id: t5.vocab_size })).toThrow(/eos_token_id' must be a token id below vocab_size/);
    expect(() => parseSchedulerConfig({ _class_name: 'X', flow_shift: 3, num_train_timesteps: 1e12 })).toThrow(/num_train_timesteps' must be an integer in 1\.\.1048576/);
  });
  it('num_layers 1e9 in a model folder fails at open, in milliseconds', async () => {
    const d = copyTiny();
    editJson(join(d, 'transformer', 'config.json'), (j) => (j.num_layers = 1e9));
    const t0 = performance.now();
    expect(await folderError(d)).toMatch(/transformer\/config.json: key 'num_layers' must be an integer in 1\.\.1000, got 1000000000/);
    expect(performance.now() - t0).toBeLessThan(1000);
  });
  it('symlink loops, dangling links, folders where files belong: named, not "no such file"', async () => {
    // a weights file that is a symlink loop
    let d = copyTiny();
    const w = join(d, 'vae', 'diffusion_pytorch_model.safetensors');
    rmSync(w);
    symlinkSync(join(d, 'vae', 'loop-b'), w);
    symlinkSync(w, join(d, 'vae', 'loop-b'));
    let m = await folderError(d);
    expect(m).toMatch(/diffusion_pytorch_model.safetensors: symlink loop \(ELOOP\)/);
    expect(m.split('\n')).toHaveLength(1);
    await expect(SafetensorsFile.open(w)).rejects.toThrow(/symlink loop \(ELOOP\)/);
    // a component folder that is a symlink loop
    d = copyTiny();
    rmSync(join(d, 'text_encoder'), { recursive: true });
    symlinkSync(join(d, 'te-b'), join(d, 'text_encoder'));
    symlinkSync(join(d, 'text_encoder'), join(d, 'te-b'));
    expect(await folderError(d)).toMatch(/text_encoder: symlink loop \(ELOOP\)/);
    // a config.json that is a symlink loop; the model folder itself
    d = copyTiny();
    rmSync(join(d, 'scheduler', 'scheduler_config.json'));
    symlinkSync(join(d, 'scheduler', 'scheduler_config.json'), join(d, 'scheduler', 'scheduler_config.json'));
    expect(await folderError(d)).toMatch(/scheduler_config.json: symlink loop \(ELOOP\)/);
    const self = join(tmp, 'self-loop');
    symlinkSync(self, self);
    expect(await folderError(self)).toMatch(/self-loop: symlink loop \(ELOOP\)/);
    // a dangling link, a folder where config.json belongs
    d = copyTiny();
    rmSync(join(d, 'vae', 'config.json'));
    symlinkSync(join(d, 'nowhere.json'), join(d, 'vae', 'config.json'));
    expect(await folderError(d)).toMatch(/vae\/config.json: a symlink to '.*nowhere.json', which does not exist \(a dangling link\)/);
    d = copyTiny();
    rmSync(join(d, 'vae', 'config.json'));
    mkdirSync(join(d, 'vae', 'config.json'));
    expect(await folderError(d)).toMatch(/vae\/config.json: is a folder, not a JSON file/);
  });
  it('config parsers ignore extra keys and apply documented defaults', () => {
    const t = parseTransformerConfig({
      _class_name: 'WanTransformer3DModel',
      patch_size: [1, 2, 2],
      num_attention_heads: 12,
      attention_head_dim: 128,
      in_channels: 16,
      out_channels: 16,
      text_dim: 4096,
      freq_dim: 256,
      ffn_dim: 8960,
      num_layers: 30,
      cross_attn_norm: true,
      qk_norm: 'rms_norm_across_heads',
      eps: 1e-6,
      added_kv_proj_dim: null,
      some_future_key: 3,
    });
    expect(t.rope_max_seq_len).toBe(1024);
    expect(t.num_attention_heads * t.attention_head_dim).toBe(1536);
    // the original Wan config.json (WanModel) maps onto the same fields
    const w = parseTransformerConfig({ _class_name: 'WanModel', dim: 1536, eps: 1e-6, ffn_dim: 8960, freq_dim: 256, in_dim: 16, model_type: 't2v', num_heads: 12, num_layers: 30, out_dim: 16, text_len: 512 });
    expect(w).toEqual({ ...t, _class_name: 'WanModel' });
    expect(() => parseTransformerConfig({ _class_name: 'WanModel', dim: 5120, num_heads: 40, model_type: 'i2v', in_dim: 36, out_dim: 16, ffn_dim: 13824, num_layers: 40 })).toThrow(
      /model_type 'i2v' .* not supported yet/,
    );
    expect(() => parseT5Config({ model_type: 'umt5', feed_forward_proj: 'relu' })).toThrow(/key 'feed_forward_proj' must be 'gated-gelu'/);
    expect(() => parseVaeConfig({ _class_name: 'AutoencoderKL' })).toThrow(/expected 'AutoencoderKLWan'/);
    const s = parseSchedulerConfig({ _class_name: 'FlowMatchEulerDiscreteScheduler', shift: 3, num_train_timesteps: 1000 });
    expect(s.flow_shift).toBe(3);
    expect(() => parseSchedulerConfig({ _class_name: 'X', flow_shift: 3, num_train_timesteps: 1000, prediction_type: 'epsilon' })).toThrow(/prediction_type' must be 'flow_prediction'/);
  });
  it('tokenizer: listed but missing, or present without tokenizer.json', async () => {
    const d = copyTiny();
    editJson(join(d, 'model_index.json'), (j) => (j.tokenizer = ['transformers', 'T5TokenizerFast']));
    expect(await folderError(d)).toMatch(/lists a tokenizer but the tokenizer\/ folder is missing/);
    mkdirSync(join(d, 'tokenizer'));
    expect(await folderError(d)).toMatch(/tokenizer: missing tokenizer.json/);
    writeFileSync(join(d, 'tokenizer', 'tokenizer.json'), '{}');
    expect((await openModelFolder(d)).tokenizer).toEqual({ dir: join(d, 'tokenizer') });
  });
});

describe('model folder: sharded components', () => {
  async function shardTextEncoder(d: string): Promise<void> {
    const src = join(d, 'text_encoder', 'model.safetensors');
    const f = await SafetensorsFile.open(src);
    const keys = f.keys();
    const half = Math.ceil(keys.length / 2);
    const weightMap: Record<string, string> = {};
    for (const [i, part] of [keys.slice(0, half), keys.slice(half)].entries()) {
      const name = `model-0000${i + 1}-of-00002.safetensors`;
      const tensors = [];
      for (const k of part) {
        const info = f.info(k);
        tensors.push({ key: k, dtype: info.dtype, shape: info.shape, data: await f.read(k) });
        weightMap[k] = name;
      }
      await writeSafetensors(join(d, 'text_encoder', name), tensors);
    }
    await f.close();
    rmSync(src);
    writeFileSync(join(d, 'text_encoder', 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }));
  }
  it('a sharded text encoder opens like the single file; a missing shard is named', async () => {
    const d = copyTiny();
    await shardTextEncoder(d);
    const m = await openModelFolder(d);
    expect(m.textEncoder.weights.sharded).toBe(true);
    expect(m.textEncoder.weights.path).toMatch(/model.safetensors.index.json$/);
    const ck = await m.textEncoder.open();
    const ref = await Checkpoint.open(join(TINY, 'text_encoder'));
    expect(ck.keys().sort()).toEqual(ref.keys().sort());
    for (const k of ref.keys()) expect(Buffer.from(await ck.read(k)).equals(Buffer.from(await ref.read(k)))).toBe(true);
    await ck.close();
    await ref.close();
    rmSync(join(d, 'text_encoder', 'model-00002-of-00002.safetensors'));
    expect(await folderError(d)).toMatch(/shard 'model-00002-of-00002.safetensors' is missing/);
  });
  it('a text encoder holding encoder.embed_tokens.weight instead of shared.weight', async () => {
    const d = copyTiny();
    const p = join(d, 'text_encoder', 'model.safetensors');
    await rewriteRenamed(join(TINY, 'text_encoder', 'model.safetensors'), p, (k) => (k === 'shared.weight' ? 'encoder.embed_tokens.weight' : k));
    const m = await openModelFolder(d);
    const ck = await m.textEncoder.open();
    expect(ck.has('shared.weight')).toBe(true);
    expect(ck.info('shared.weight').shape).toEqual([1000, 64]);
    await ck.close();
  });
});

describe('key maps (original Wan ↔ diffusers)', () => {
  async function keysOf(rel: string): Promise<string[]> {
    const f = await SafetensorsFile.open(join(TINY, rel));
    const k = f.keys();
    await f.close();
    return k;
  }
  it('transformer: every tiny key maps to Wan and back; the Wan names are the expected ones', async () => {
    const keys = await keysOf('transformer/diffusion_pytorch_model.safetensors');
    const wan = keys.map((k) => TRANSFORMER_KEYS.toWanName(k));
    expect(wan.every((k) => k !== null)).toBe(true);
    expect(new Set(wan).size).toBe(keys.length);
    expect(wan.map((k) => TRANSFORMER_KEYS.toDiffusers(k!))).toEqual(keys);
    const m = new Map(keys.map((k, i) => [k, wan[i]]));
    expect(m.get('blocks.0.norm2.weight')).toBe('blocks.0.norm3.weight'); // the norm3 ↔ norm2 swap
    expect(m.get('blocks.1.norm2.bias')).toBe('blocks.1.norm3.bias');
    expect(m.get('blocks.0.scale_shift_table')).toBe('blocks.0.modulation');
    expect(m.get('scale_shift_table')).toBe('head.modulation');
    expect(m.get('proj_out.weight')).toBe('head.head.weight');
    expect(m.get('blocks.1.attn1.to_out.0.weight')).toBe('blocks.1.self_attn.o.weight');
    expect(m.get('blocks.0.attn2.norm_k.weight')).toBe('blocks.0.cross_attn.norm_k.weight');
    expect(m.get('blocks.0.ffn.net.0.proj.bias')).toBe('blocks.0.ffn.0.bias');
    expect(m.get('blocks.0.ffn.net.2.weight')).toBe('blocks.0.ffn.2.weight');
    expect(m.get('condition_embedder.time_proj.weight')).toBe('time_projection.1.weight');
    expect(m.get('condition_embedder.time_embedder.linear_2.bias')).toBe('time_embedding.2.bias');
    expect(m.get('condition_embedder.text_embedder.linear_1.weight')).toBe('text_embedding.0.weight');
    expect(m.get('patch_embedding.weight')).toBe('patch_embedding.weight');
    expect(detectTransformerLayout(keys)).toBe('diffusers');
    expect(detectTransformerLayout(wan as string[])).toBe('wan');
    // unknown names are reported, not guessed
    expect(TRANSFORMER_KEYS.toDiffusers('blocks.0.norm2.weight')).toBeNull(); // Wan norm2 has no parameters
    expect(TRANSFORMER_KEYS.toDiffusers('blocks.0.self_attn.k_img.weight')).toBeNull(); // i2v
    expect(TRANSFORMER_KEY_TABLE.length).toBeGreaterThan(10);
  });
  it('vae and text encoder: every tiny key maps to Wan and back', async () => {
    for (const [rel, map] of [
      ['vae/diffusion_pytorch_model.safetensors', VAE_KEYS],
      ['text_encoder/model.safetensors', T5_KEYS],
    ] as const) {
      const keys = await keysOf(rel);
      const wan = keys.map((k) => map.toWanName(k));
      expect(wan.filter((k) => k === null)).toEqual([]);
      expect(new Set(wan).size).toBe(keys.length);
      expect(wan.map((k) => map.toDiffusers(k!))).toEqual(keys);
    }
    expect(VAE_KEYS.toWanName('decoder.up_blocks.1.resnets.0.conv_shortcut.weight')).toBe('decoder.upsamples.4.shortcut.weight');
    expect(VAE_KEYS.toWanName('decoder.up_blocks.2.upsamplers.0.resample.1.bias')).toBe('decoder.upsamples.11.resample.1.bias');
    expect(VAE_KEYS.toWanName('decoder.up_blocks.3.resnets.2.norm2.gamma')).toBe('decoder.upsamples.14.residual.3.gamma');
    expect(VAE_KEYS.toWanName('decoder.mid_block.attentions.0.to_qkv.weight')).toBe('decoder.middle.1.to_qkv.weight');
    expect(VAE_KEYS.toWanName('post_quant_conv.weight')).toBe('conv2.weight');
    expect(VAE_KEYS.toWanName('decoder.norm_out.gamma')).toBe('decoder.head.0.gamma');
    expect(T5_KEYS.toWanName('encoder.block.1.layer.1.DenseReluDense.wi_0.weight')).toBe('blocks.1.ffn.gate.0.weight');
    expect(T5_KEYS.toWanName('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight')).toBe('blocks.0.pos_embedding.embedding.weight');
  });
  it('a transformer in the original Wan layout (+ WanModel config.json) is detected and served under diffusers names', async () => {
    const d = copyTiny();
    const dst = join(d, 'transformer', 'diffusion_pytorch_model.safetensors');
    await rewriteRenamed(join(TINY, 'transformer', 'diffusion_pytorch_model.safetensors'), dst, (k) => TRANSFORMER_KEYS.toWanName(k)!);
    const raw = await SafetensorsFile.open(dst);
    expect(raw.has('head.head.weight')).toBe(true);
    expect(raw.has('blocks.0.norm3.weight')).toBe(true);
    await raw.close();
    writeFileSync(
      join(d, 'transformer', 'config.json'),
      JSON.stringify({ _class_name: 'WanModel', _diffusers_version: '0.30.0', dim: 128, eps: 1e-6, ffn_dim: 256, freq_dim: 256, in_dim: 16, model_type: 't2v', num_heads: 2, num_layers: 2, out_dim: 16, text_dim: 64, text_len: 512 }),
    );
    const m = await openModelFolder(d);
    expect(m.transformer.keyLayout).toBe('wan');
    const tiny = await openModelFolder(TINY);
    expect(m.transformer.config).toEqual({ ...tiny.transformer.config, _class_name: 'WanModel' });
    const ck = await m.transformer.open();
    const ref = await Checkpoint.open(join(TINY, 'transformer'));
    expect(ck.keys().sort()).toEqual(ref.keys().sort());
    for (const k of ref.keys()) {
      expect(ck.info(k).shape).toEqual(ref.info(k).shape);
      expect(Buffer.from(await ck.read(k)).equals(Buffer.from(await ref.read(k)))).toBe(true);
    }
    await ck.close();
    await ref.close();
  });
});

describe('model folder: Wan 2.2 A14B, two experts (the wan22-tiny fixture)', () => {
  const W22 = join(TINY, '..', 'wan22-tiny');
  /** A copy of the two-expert folder: the transformers and model_index.json copied, the rest linked. */
  function copyWan22(): string {
    const d = join(tmp, `w${n++}`);
    for (const sub of ['transformer', 'transformer_2']) cpSync(join(W22, sub), join(d, sub), { recursive: true });
    cpSync(join(W22, 'model_index.json'), join(d, 'model_index.json'));
    for (const sub of ['vae', 'text_encoder', 'scheduler']) symlinkSync(join(W22, sub), join(d, sub));
    return d;
  }
  /** every tensor of `c` equals the same-named tensor of the file `ref` (diffusers names), byte for byte */
  async function sameWeights(c: ModelFolder['transformer'], ref: string): Promise<void> {
    const ck = await c.open();
    const r = await Checkpoint.open(ref);
    expect(ck.keys().sort()).toEqual(r.keys().sort());
    for (const key of r.keys()) expect(Buffer.from(await ck.read(key)).equals(Buffer.from(await r.read(key))), key).toBe(true);
    await ck.close();
    await r.close();
  }

  it('opens with transformer2 (the low-noise expert) and boundaryRatio 0.875; one-expert folders have neither', async () => {
    const m = await openModelFolder(W22);
    expect(m.transformer2).not.toBeNull();
    expect(m.transformer2!.name).toBe('transformer_2');
    expect(m.transformer2!.dir).toBe(join(W22, 'transformer_2'));
    expect(m.transformer.dir).toBe(join(W22, 'transformer'));
    expect(m.boundaryRatio).toBe(0.875);
    expect(m.index.boundary_ratio).toBe(0.875);
    expect(m.index.components.transformer_2).toEqual(['diffusers', 'WanTransformer3DModel']);
    expect(m.transformer2!.config).toEqual(m.transformer.config); // same architecture...
    await sameWeights(m.transformer2!, join(W22, 'transformer_2')); // ...its own weights
    const a = await m.transformer.open();
    const b = await m.transformer2!.open();
    expect(Buffer.from(await a.read('proj_out.weight')).equals(Buffer.from(await b.read('proj_out.weight')))).toBe(false);
    await a.close();
    await b.close();
    const tiny = await openModelFolder(TINY);
    expect([tiny.transformer2, tiny.boundaryRatio]).toEqual([null, null]);
  });
  it("transformer_2/ missing while model_index.json lists it: 'incomplete'", async () => {
    const d = copyWan22();
    rmSync(join(d, 'transformer_2'), { recursive: true });
    const msg = await folderError(d);
    expect(msg).toMatch(/transformer_2/);
    expect(msg).toMatch(/incomplete/);
  });
  it('one expert alone, or boundary_ratio with one transformer, or a boundary_ratio out of 0..1: errors naming the fix', async () => {
    let d = copyWan22();
    rmSync(join(d, 'transformer'), { recursive: true });
    expect(await folderError(d)).toMatch(/has transformer_2\/ \(the low-noise expert\) but no transformer\/.*incomplete/);
    d = copyWan22();
    rmSync(join(d, 'transformer_2'), { recursive: true });
    editJson(join(d, 'model_index.json'), (j) => delete j.transformer_2);
    expect(await folderError(d)).toMatch(/boundary_ratio is set .* but the folder has one transformer: add transformer_2\//);
    d = copyWan22();
    editJson(join(d, 'model_index.json'), (j) => (j.boundary_ratio = 2));
    expect(await folderError(d)).toMatch(/model_index.json: key 'boundary_ratio' must be a number in 0\.\.1/);
    d = copyWan22();
    editJson(join(d, 'model_index.json'), (j) => (j.boundary_ratio = '0.875'));
    expect(await folderError(d)).toMatch(/key 'boundary_ratio'/);
    // no boundary_ratio: two experts still open; the caller's default applies
    d = copyWan22();
    editJson(join(d, 'model_index.json'), (j) => delete j.boundary_ratio);
    const m = await openModelFolder(d);
    expect([m.transformer2 !== null, m.boundaryRatio]).toEqual([true, null]);
  });
  it("experts of different shapes: 'the two experts differ in num_layers'", async () => {
    const d = copyWan22();
    editJson(join(d, 'transformer_2', 'config.json'), (j) => (j.num_layers = 3));
    const msg = await folderError(d);
    expect(msg).toMatch(/the two experts differ in num_layers: 2 in .*transformer\/config.json vs 3 in .*transformer_2\/config.json/);
  });
  it('the same expert in two layouts (transformer/ and high_noise_model/, transformer_2/ and low_noise_model/)', async () => {
    let d = copyWan22();
    cpSync(join(d, 'transformer'), join(d, 'high_noise_model'), { recursive: true });
    expect(await folderError(d)).toMatch(/has both transformer\/ and high_noise_model\//);
    d = copyWan22();
    cpSync(join(d, 'transformer_2'), join(d, 'low_noise_model'), { recursive: true });
    expect(await folderError(d)).toMatch(/has both transformer_2\/ and low_noise_model\//);
  });
  it('the original Wan 2.2 folder names (high_noise_model/, low_noise_model/) in a diffusers folder, diffusers or Wan key names', async () => {
    let d = copyWan22();
    renameSync(join(d, 'transformer'), join(d, 'high_noise_model'));
    renameSync(join(d, 'transformer_2'), join(d, 'low_noise_model'));
    let m = await openModelFolder(d);
    expect(m.transformer.dir).toBe(join(d, 'high_noise_model'));
    expect(m.transformer.name).toBe('transformer');
    expect(m.transformer2?.dir).toBe(join(d, 'low_noise_model'));
    expect(m.transformer2?.name).toBe('transformer_2');
    expect(m.boundaryRatio).toBe(0.875);
    await sameWeights(m.transformer, join(W22, 'transformer'));
    await sameWeights(m.transformer2!, join(W22, 'transformer_2'));
    // low_noise_model/ as the original release ships it: Wan key names and a WanModel config.json
    d = copyWan22();
    renameSync(join(d, 'transformer'), join(d, 'high_noise_model'));
    renameSync(join(d, 'transformer_2'), join(d, 'low_noise_model'));
    const w = join(d, 'low_noise_model', 'diffusion_pytorch_model.safetensors');
    await rewriteRenamed(join(W22, 'transformer_2', 'diffusion_pytorch_model.safetensors'), w, (k) => TRANSFORMER_KEYS.toWanName(k)!);
    writeFileSync(
      join(d, 'low_noise_model', 'config.json'),
      JSON.stringify({ _class_name: 'WanModel', _diffusers_version: '0.33.0', dim: 128, eps: 1e-6, ffn_dim: 256, freq_dim: 256, in_dim: 16, model_type: 't2v', num_heads: 2, num_layers: 2, out_dim: 16, text_dim: 64, text_len: 512 }),
    );
    m = await openModelFolder(d);
    expect([m.transformer.keyLayout, m.transformer2?.keyLayout]).toEqual(['diffusers', 'wan']);
    expect(m.transformer2!.config).toEqual({ ...m.transformer.config, _class_name: 'WanModel' });
    await sameWeights(m.transformer2!, join(W22, 'transformer_2'));
    // high_noise_model/ without low_noise_model/
    d = copyWan22();
    renameSync(join(d, 'transformer'), join(d, 'high_noise_model'));
    rmSync(join(d, 'transformer_2'), { recursive: true });
    expect(await folderError(d)).toMatch(/lists transformer_2 .* the transformer_2\/ folder is missing: the download is incomplete/);
    editJson(join(d, 'model_index.json'), (j) => {
      delete j.transformer_2;
      delete j.boundary_ratio;
    });
    expect(await folderError(d)).toMatch(/has high_noise_model\/ but no low_noise_model\/: Wan 2\.2 A14B needs both experts/);
  });
  it("the original Wan 2.2 release root (high_noise_model/, no model_index.json): 'original Wan 2.2 release layout'", async () => {
    const d = join(tmp, `w${n++}`);
    mkdirSync(d);
    cpSync(join(W22, 'transformer'), join(d, 'high_noise_model'), { recursive: true });
    cpSync(join(W22, 'transformer_2'), join(d, 'low_noise_model'), { recursive: true });
    writeFileSync(join(d, 'Wan2.1_VAE.pth'), 'not a real pickle');
    const msg = await folderError(d);
    expect(msg).toMatch(/this is the original Wan 2\.2 release layout \(high_noise_model\/, low_noise_model\/\)/);
    expect(msg).toMatch(/Wan2\.2-T2V-A14B-Diffusers/);
    expect(msg.split('\n')).toHaveLength(1);
  });
});

describe('check-golden: a malformed case folder is one line and exit 5 (checked before the GPU starts)', () => {
  const ROOT = join(TINY, '..', '..', '..', '..');
  const run = (args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'src', 'cli', 'check-golden.ts'), ...args], { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });
  let k = 0;
  /** a copy of the tiny golden case with golden.json replaced by `json` (a string is written as is) */
  const caseWith = (json: unknown, edit?: (d: string) => void): string => {
    const d = join(tmp, `case${k++}`);
    cpSync(TINY, d, { recursive: true });
    if (json !== undefined) writeFileSync(join(d, 'golden.json'), typeof json === 'string' ? json : JSON.stringify(json));
    edit?.(d);
    return d;
  };
  const good = () => JSON.parse(readFileSync(join(TINY, 'golden.json'), 'utf8'));
  const expectOneLine = (r: ReturnType<typeof run>, status: number, re: RegExp) => {
    expect(r.status, r.stderr).toBe(status);
    const lines = r.stderr.split('\n').filter((l) => l.trim() !== '');
    expect(lines, r.stderr).toHaveLength(1);
    expect(lines[0]).toMatch(re);
    expect(r.stderr).not.toMatch(/\n\s+at /); // no stack
  };
  it('bad JSON, wrong types, missing fields, missing files, disagreeing shapes', () => {
    const g = good();
    const cases: Array<[string, RegExp]> = [
      [caseWith('{"tensors": '), /^error: \[check-golden\] .*golden.json: malformed JSON .*regenerate the case/],
      [caseWith('[1, 2]'), /golden.json: the top level must be a JSON object, got \[1,2\]/],
      [caseWith({ ...g, tensors: null }), /golden.json: tensors must be an object of \{shape, dtype\}, got null/],
      [caseWith({ ...g, tensors: undefined }), /golden.json: tensors must be an object .*got nothing/],
      [caseWith({ ...g, tensors: { ...g.tensors, 'dit.x': { shape: 'big', dtype: 'F32' } } }), /tensors\["dit.x"\].shape must be an array of at most 8 integers >= 0, got "big"/],
      [caseWith({ ...g, tensors: { ...g.tensors, 'dit.x': null } }), /tensors\["dit.x"\] must be an object \{shape, dtype\}, got null/],
      [caseWith({ ...g, settings: [] }), /golden.json: settings must be an object, got \[\]/],
      [caseWith({ ...g, settings: { ...g.settings, 'text_len (max_sequence_length)': 'NaN' } }), /settings\["text_len"\] must be an integer in 1\.\.4096, got "NaN"/],
      [caseWith({ ...g, settings: { ...g.settings, sampling_steps: 1e9 } }), /settings\["sampling_steps"\] must be an integer in 0\.\.1000, got 1000000000/],
      [caseWith({ ...g, tensors: { ...g.tensors, 'dit.x': { shape: [1, 2, 3], dtype: 'F32' } } }), /tensors\["dit.x"\].shape is \[1, 2, 3\] but golden.safetensors holds \[16, 3, 8, 8\]/],
      [caseWith(undefined, (d) => rmSync(join(d, 'golden.safetensors'))), /golden.safetensors: no such file/],
      [caseWith(undefined, (d) => rmSync(join(d, 'golden.json'))), /has no golden.json: pass a case folder/],
      [caseWith(undefined, (d) => editJson(join(d, 'transformer', 'config.json'), (j) => (j.num_layers = 1e9))), /key 'num_layers' must be an integer in 1\.\.1000/],
    ];
    for (const [d, re] of cases) expectOneLine(run([d]), 5, re);
  });
  it('bad usage exits 2', () => {
    expectOneLine(run([TINY, '--weights', 'f64']), 2, /--weights must be one of/);
  });
});
