// Deterministic random-weight model folders in the diffusers layout, for benchmarks and tests at
// real Wan shapes (never committed: generated at run time into a cache folder). The weights are
// drawn per parameter from a seeded stream, scaled by fan-in so activations stay O(1): the numbers
// are meaningless, the shapes, dtypes, file layout and loading path are the real ones.

import { existsSync, mkdirSync, writeFileSync, cpSync, statSync, openSync, readSync, closeSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { writeSafetensors, encodeSafetensorsHeader, type TensorToWrite, type StDType } from '../io/safetensors.ts';
import { withAtomicFile, writeAll } from '../io/atomic.ts';
import { cleanStaleTemps } from '../io/cleanup.ts';
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
  /**
   * Write with the streaming writer (`randomModelFolder` then calls `streamedRandomModelFolder`): bounded
   * memory (one 16 MiB chunk generating while the previous one is written, whatever the model's size), the
   * fast quantile-table generator (different bytes from the in-memory path, so a folder of its own), the
   * transformer sharded into files of at most `shardBytes` bytes of tensor data with a
   * `diffusion_pytorch_model.safetensors.index.json` as the real diffusers downloads have (0 or absent:
   * one file). Absent: the in-memory path, whose output (and folder id) is unchanged.
   */
  streamed?: { shardBytes?: number };
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
  if (spec.streamed) return streamedRandomModelFolder(root, spec, log);
  const id = createHash('sha256').update(JSON.stringify({ ...spec, tokenizerDir: undefined, v: 1 })).digest('hex').slice(0, 12);
  const dir = join(root, id);
  const done = join(dir, '.complete');
  if (existsSync(done)) return dir;
  writeSkeleton(dir, spec);
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


/** model_index.json, the components' configs, the scheduler config and the tokenizer (both paths) */
function writeSkeleton(dir: string, spec: RandomModelSpec): void {
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
}

// ---- the streaming writer (spec.streamed) ----
//
// Generator: each tensor gets its own 32-bit seed, sha256(`${seed}/${component}/${key}`), so its bytes
// depend on nothing else (not on the order or the sharding: a sharded and an unsharded folder of one
// spec hold the same tensors). Its elements are drawn from a table of the 65536 quantiles of N(0, std²),
// table[i] = bf16(std · Φ⁻¹((i + 0.5) / 65536)), indexed by 16-bit halves of a mulberry32 stream (two
// elements per 32-bit draw): a normal distribution discretized to 65536 levels and cut at ±4.32 std.
// About 5 ns per element here, against ~100-150 ns for Rng.normal + f32ToBf16Bits (Box-Muller, one
// log/sqrt/sin per element): 14 B parameters in ~1-2 minutes of CPU instead of ~30. This is random
// benchmark data, not a model: only the shapes, dtypes, scale and file layout matter.

/** Streamed-generator format version (part of the folder id). */
const STREAM_VERSION = 2;
/** Bytes generated per write (two buffers: one filling while the other is written). */
const STREAM_CHUNK = 16 * 1024 * 1024;

/** Φ⁻¹(p), the standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9). */
export function normalQuantile(p: number): number {
  const a = [-3.969683028665376e1, 2.209460984245205e2, -2.759285104469687e2, 1.38357751867269e2, -3.066479806614716e1, 2.506628277459239];
  const b = [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
  const c = [-7.784894002430293e-3, -3.223964580411365e-1, -2.400758277161838, -2.549732539343734, 4.374664141464968, 2.938163982698783];
  const d = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
  const lo = 0.02425;
  if (p < lo) {
    const q = Math.sqrt(-2 * Math.log(p));
    return (((((c[0]! * q + c[1]!) * q + c[2]!) * q + c[3]!) * q + c[4]!) * q + c[5]!) / ((((d[0]! * q + d[1]!) * q + d[2]!) * q + d[3]!) * q + 1);
  }
  if (p > 1 - lo) return -normalQuantile(1 - p);
  const q = p - 0.5;
  const r = q * q;
  return ((((((a[0]! * r + a[1]!) * r + a[2]!) * r + a[3]!) * r + a[4]!) * r + a[5]!) * q) / (((((b[0]! * r + b[1]!) * r + b[2]!) * r + b[3]!) * r + b[4]!) * r + 1);
}

const tableCache = new Map<string, Uint16Array | Uint32Array>();
/** The 65536-entry quantile table of N(0, std²) as bf16 bits (Uint16Array) or f32 bits (Uint32Array). */
function quantileTable(std: number, dtype: 'bf16' | 'f32'): Uint16Array | Uint32Array {
  const k = `${dtype}:${std}`;
  let t = tableCache.get(k);
  if (!t) {
    if (dtype === 'bf16') {
      const u = new Uint16Array(65536);
      for (let i = 0; i < 65536; i++) u[i] = f32ToBf16Bits(std * normalQuantile((i + 0.5) / 65536));
      t = u;
    } else {
      const f = new Float32Array(65536);
      for (let i = 0; i < 65536; i++) f[i] = std * normalQuantile((i + 0.5) / 65536);
      t = new Uint32Array(f.buffer);
    }
    if (tableCache.size > 256) tableCache.clear();
    tableCache.set(k, t);
  }
  return t;
}

/** A tensor's element stream: `fill(dst, n)` writes its next `n` elements into `dst[0..n)`. */
class ElementStream {
  private s: number;
  /** the second element of the last 32-bit draw, not yet written (-1: none) */
  private spare = -1;
  constructor(
    seed: number,
    private readonly table: Uint16Array | Uint32Array | null,
    private readonly constant: number,
  ) {
    this.s = seed >>> 0;
  }
  fill(dst: Uint16Array | Uint32Array, n: number): void {
    const t = this.table;
    if (!t) {
      dst.fill(this.constant, 0, n);
      return;
    }
    let i = 0;
    if (this.spare >= 0 && n > 0) {
      dst[i++] = t[this.spare]!;
      this.spare = -1;
    }
    let s = this.s;
    const pairs = (n - i) >>> 1;
    for (let k = 0; k < pairs; k++) {
      s = (s + 0x6d2b79f5) | 0;
      let z = Math.imul(s ^ (s >>> 15), s | 1);
      z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
      z ^= z >>> 14;
      dst[i++] = t[z & 0xffff]!;
      dst[i++] = t[z >>> 16]!;
    }
    if (i < n) {
      s = (s + 0x6d2b79f5) | 0;
      let z = Math.imul(s ^ (s >>> 15), s | 1);
      z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
      z ^= z >>> 14;
      dst[i++] = t[z & 0xffff]!;
      this.spare = z >>> 16;
    }
    this.s = s;
  }
}

/** One tensor of a streamed file: its header entry and how to make its bytes. */
export interface StreamedTensor {
  key: string;
  dtype: StDType;
  shape: readonly number[];
  /**
   * Write the tensor's next `dst.byteLength` bytes into `dst` (called in order, from its first byte to its
   * last; `dst` starts at a multiple of the dtype's size within the tensor and within its ArrayBuffer).
   */
  produce: (dst: Uint8Array) => void;
}

const ELEMENT_BYTES: Partial<Record<StDType, number>> = { BF16: 2, F16: 2, F32: 4, U8: 1, I8: 1, I32: 4, U32: 4, I16: 2, U16: 2 };
const byteLengthOf = (t: Pick<StreamedTensor, 'dtype' | 'shape'>) => t.shape.reduce((a, b) => a * b, 1) * (ELEMENT_BYTES[t.dtype] ?? 0);

/**
 * Write a .safetensors file whose tensors are generated while it is written: the header first (from the
 * shapes and dtypes), then each tensor's bytes in order, in chunks of 16 MiB (one chunk generating while
 * the previous one is being written), so memory stays at two chunks whatever the file's size. Atomic
 * (temporary file, fsync, verified, renamed), like writeSafetensors. `chunkBytes` (a multiple of 8) only
 * changes how the bytes are cut into writes, never the bytes.
 */
export async function writeSafetensorsStreamed(path: string, tensors: readonly StreamedTensor[], metadata?: Record<string, string>, chunkBytes = STREAM_CHUNK): Promise<number> {
  const CHUNK = Math.max(8, chunkBytes - (chunkBytes % 8));
  for (const t of tensors) if (!ELEMENT_BYTES[t.dtype]) throw new Error(`writeSafetensorsStreamed ${path}: tensor '${t.key}': dtype ${t.dtype} is not supported`);
  const header = encodeSafetensorsHeader(tensors, metadata);
  const total = header.byteLength + tensors.reduce((a, t) => a + byteLengthOf(t), 0);
  const bufs = [new Uint8Array(CHUNK), new Uint8Array(CHUNK)];
  await withAtomicFile(
    path,
    async (fh: FileHandle) => {
      await writeAll(fh, header);
      let pending: Promise<void> | null = null;
      let which = 0;
      let buf = bufs[0]!;
      let used = 0;
      const flush = async () => {
        const out = buf.subarray(0, used);
        if (pending) await pending;
        pending = writeAll(fh, out);
        which ^= 1;
        buf = bufs[which]!;
        used = 0;
      };
      for (const t of tensors) {
        let left = byteLengthOf(t);
        const el = ELEMENT_BYTES[t.dtype]!;
        while (left > 0) {
          // whole elements only, so the producer's views stay aligned (the data region starts 8-aligned)
          let n = Math.min(left, CHUNK - used);
          n -= n % el;
          if (n === 0) {
            await flush();
            continue;
          }
          t.produce(buf.subarray(used, used + n));
          used += n;
          left -= n;
          if (used === CHUNK) await flush();
        }
      }
      if (used > 0) await flush();
      if (pending) await pending;
    },
    { expectBytes: total },
  );
  return total;
}

/** The random tensors of module `m` for the streaming writer (bf16 or f32; seeds from `seed`, `component`, key). */
export function randomStreamedTensors(m: Module, seed: number, component: string, dtype: 'bf16' | 'f32', skip?: (key: string) => boolean): StreamedTensor[] {
  const out: StreamedTensor[] = [];
  for (const [key, p] of m.namedParams()) {
    if (skip?.(key)) continue;
    const { kind, std } = paramStd(key, p);
    const tseed = createHash('sha256').update(`${seed}/${component}/${key}`).digest().readUInt32LE(0);
    let stream: ElementStream | null = null;
    out.push({
      key,
      dtype: dtype === 'bf16' ? 'BF16' : 'F32',
      shape: [...p.shape],
      produce: (dst) => {
        // created on first use (the table is built then), so a list of a 14B model's tensors holds no tables
        stream ??= new ElementStream(
          tseed,
          kind === 'normal' ? quantileTable(std, dtype) : null,
          dtype === 'bf16' ? (kind === 'ones' ? f32ToBf16Bits(1) : 0) : kind === 'ones' ? 0x3f800000 : 0,
        );
        const view = dtype === 'bf16' ? new Uint16Array(dst.buffer, dst.byteOffset, dst.byteLength >>> 1) : new Uint32Array(dst.buffer, dst.byteOffset, dst.byteLength >>> 2);
        stream.fill(view, view.length);
      },
    });
  }
  return out;
}

/** Whether `path` is already a complete file with exactly `header` at its start and `total` bytes (a resumed run skips it). */
function fileIsWritten(path: string, header: Uint8Array, total: number): boolean {
  try {
    if (statSync(path).size !== total) return false;
    const fd = openSync(path, 'r');
    try {
      const got = new Uint8Array(header.byteLength);
      if (readSync(fd, got, 0, got.byteLength, 0) !== got.byteLength) return false;
      return Buffer.compare(got, header) === 0;
    } finally {
      closeSync(fd);
    }
  } catch {
    return false;
  }
}

/** Shard `tensors` greedily, in order, into groups of at most `shardBytes` data bytes (a larger tensor gets a shard of its own). */
function shardTensors<T extends Pick<StreamedTensor, 'dtype' | 'shape'>>(tensors: readonly T[], shardBytes: number): T[][] {
  if (!(shardBytes > 0)) return [[...tensors]];
  const shards: T[][] = [];
  let cur: T[] = [];
  let bytes = 0;
  for (const t of tensors) {
    const n = byteLengthOf(t);
    if (cur.length > 0 && bytes + n > shardBytes) {
      shards.push(cur);
      cur = [];
      bytes = 0;
    }
    cur.push(t);
    bytes += n;
  }
  if (cur.length > 0) shards.push(cur);
  return shards;
}

/**
 * Write one component's weights with the streaming writer: `<base>.safetensors`, or (more than one shard)
 * `<base>-0000i-of-0000n.safetensors` + `<base>.safetensors.index.json` (`{ metadata: { total_size },
 * weight_map }`). Shards already complete (right size and header) are kept: an interrupted run resumes at
 * the first missing shard. Returns the bytes of tensor data.
 */
export async function writeStreamedComponent(
  folder: string,
  base: string,
  tensors: readonly StreamedTensor[],
  shardBytes: number,
  log: (s: string) => void = () => {},
): Promise<number> {
  mkdirSync(folder, { recursive: true });
  cleanStaleTemps(folder);
  const shards = shardTensors(tensors, shardBytes);
  const names = shards.length === 1 ? [`${base}.safetensors`] : shards.map((_, i) => `${base}-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`);
  let dataBytes = 0;
  for (let i = 0; i < shards.length; i++) {
    const path = join(folder, names[i]!);
    const header = encodeSafetensorsHeader(shards[i]!);
    const data = shards[i]!.reduce((a, t) => a + byteLengthOf(t), 0);
    dataBytes += data;
    if (fileIsWritten(path, header, header.byteLength + data)) {
      log(`${names[i]} already written, kept`);
      continue;
    }
    const t0 = performance.now();
    await writeSafetensorsStreamed(path, shards[i]!);
    const s = (performance.now() - t0) / 1000;
    log(`${names[i]}: ${shards[i]!.length} tensors, ${(data / 1e9).toFixed(2)} GB in ${s.toFixed(0)} s (${(data / 1e6 / Math.max(s, 1e-3)).toFixed(0)} MB/s)`);
  }
  if (shards.length > 1) {
    const weightMap: Record<string, string> = {};
    shards.forEach((sh, i) => sh.forEach((t) => (weightMap[t.key] = names[i]!)));
    writeFileSync(join(folder, `${base}.safetensors.index.json`), JSON.stringify({ metadata: { total_size: dataBytes }, weight_map: weightMap }, null, 2));
  }
  return dataBytes;
}

/**
 * `randomModelFolder` for a spec with `streamed`: the same folder layout written with bounded memory
 * (writeSafetensorsStreamed: two 16 MiB chunks, whatever the model's size), the transformer sharded at
 * `streamed.shardBytes`. Resumable: complete shards are kept when a run is interrupted and started again;
 * `.complete` is written last. The folder's id hashes the spec and the generator's version.
 */
export async function streamedRandomModelFolder(root: string, spec: RandomModelSpec, log: (s: string) => void = () => {}): Promise<string> {
  const id = createHash('sha256').update(JSON.stringify({ ...spec, tokenizerDir: undefined, v: STREAM_VERSION })).digest('hex').slice(0, 12);
  const dir = join(root, id);
  const done = join(dir, '.complete');
  if (existsSync(done)) return dir;
  writeSkeleton(dir, spec);
  const about = { note: 'random benchmark weights generated by src/tools/random-model.ts (streamed writer); not a model; delete this folder freely', generator: `quantile-table mulberry32 v${STREAM_VERSION}`, spec: { ...spec, tokenizerDir: undefined } };
  writeFileSync(join(dir, 'random-model.json'), JSON.stringify(about, null, 2));
  const t0 = performance.now();
  const shardBytes = spec.streamed?.shardBytes ?? 0;
  const dit = new WanTransformer3DModel(ditDimsFromConfig(parseTransformerConfig(spec.transformer)));
  let bytes = await writeStreamedComponent(join(dir, 'transformer'), 'diffusion_pytorch_model', randomStreamedTensors(dit, spec.seed, 'transformer', spec.dtype), shardBytes, log);
  log(`transformer written (${((performance.now() - t0) / 1000).toFixed(0)} s)`);
  if (spec.experts === 2) {
    bytes += await writeStreamedComponent(join(dir, 'transformer_2'), 'diffusion_pytorch_model', randomStreamedTensors(dit, spec.seed, 'transformer_2', spec.dtype), shardBytes, log);
    log(`transformer_2 written (${((performance.now() - t0) / 1000).toFixed(0)} s)`);
  }
  const vae = new WanVaeDecoder(vaeDimsFromConfig(parseVaeConfig(spec.vae)));
  bytes += await writeStreamedComponent(join(dir, 'vae'), 'diffusion_pytorch_model', randomStreamedTensors(vae, spec.seed, 'vae', spec.dtype), 0, log);
  const te = new UMT5EncoderModel(umt5DimsFromConfig(parseT5Config(spec.textEncoder)));
  bytes += await writeStreamedComponent(join(dir, 'text_encoder'), 'model', randomStreamedTensors(te, spec.seed, 'text_encoder', spec.dtype), 0, log);
  const s = (performance.now() - t0) / 1000;
  log(`model written to ${dir} (${(bytes / 1e9).toFixed(2)} GB of tensors in ${s.toFixed(0)} s, ${(bytes / 1e6 / Math.max(s, 1e-3)).toFixed(0)} MB/s)`);
  // how this write went (a resumed run's seconds cover only its own part): for the benchmarks' reports
  const maxRssBytes = process.resourceUsage().maxRSS * 1024;
  writeFileSync(join(dir, 'random-model.json'), JSON.stringify({ ...about, written: { date: new Date().toISOString(), seconds: +s.toFixed(1), tensorBytes: bytes, processMaxRssBytes: maxRssBytes } }, null, 2));
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
