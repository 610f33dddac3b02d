// The configuration schema: every key the CLI, the YAML config and the TypeScript API accept,
// with its type, default, allowed range and one line of doc. Key names follow the reference
// (Hydra-style `infer.diffusion.low_mem_level`, `infer.offload_text_encoder`, ...).

export type KeyType =
  | { kind: 'int'; min?: number; max?: number; step?: { mod: number; rem: number; what: string } }
  | { kind: 'float'; min?: number; max?: number; minExclusive?: boolean }
  | { kind: 'bool' }
  | { kind: 'boolOrAuto' }
  | { kind: 'string' }
  | { kind: 'path' }
  | { kind: 'enum'; values: readonly string[] }
  | { kind: 'bytes' };

export interface KeySpec {
  key: string;
  type: KeyType;
  default: unknown;
  doc: string;
}

const int = (min?: number, max?: number): KeyType => ({ kind: 'int', min, max });
const float = (min?: number, max?: number): KeyType => ({ kind: 'float', min, max });

export const SCHEMA: readonly KeySpec[] = [
  // ---- what to generate
  { key: 'prompt', type: { kind: 'string' }, default: '', doc: 'text prompt' },
  { key: 'negative_prompt', type: { kind: 'string' }, default: '', doc: 'negative prompt (classifier-free guidance uncondition); empty = the model default' },
  { key: 'model', type: { kind: 'path' }, default: 'weights/demo', doc: 'model folder in the diffusers layout (default: the embedded demo model)' },
  { key: 'infer.height', type: { kind: 'int', min: 16, max: 4096, step: { mod: 16, rem: 0, what: 'a multiple of 16' } }, default: 64, doc: 'video height in pixels (multiple of 16)' },
  { key: 'infer.width', type: { kind: 'int', min: 16, max: 4096, step: { mod: 16, rem: 0, what: 'a multiple of 16' } }, default: 64, doc: 'video width in pixels (multiple of 16)' },
  { key: 'infer.num_frames', type: { kind: 'int', min: 1, max: 1025, step: { mod: 4, rem: 1, what: 'of the form 4k+1 (1, 5, 9, ..., 81)' } }, default: 9, doc: 'frames (4k+1)' },
  { key: 'infer.num_inference_steps', type: int(1, 1000), default: 20, doc: 'denoising steps' },
  { key: 'infer.guidance_scale', type: float(0, 100), default: 5.0, doc: 'classifier-free guidance scale (1 = no guidance: the negative pass is skipped)' },
  { key: 'infer.shift', type: float(0.01, 100), default: 5.0, doc: "flow shift of the sigma schedule (null in a model's scheduler config = 5.0)" },
  { key: 'infer.seed', type: int(0, 2 ** 32 - 1), default: 42, doc: 'random seed of the initial noise' },
  { key: 'infer.sampler', type: { kind: 'enum', values: ['unipc', 'euler'] }, default: 'unipc', doc: "sampler: Wan's flow UniPC (bh2, order 2) or flow Euler" },
  { key: 'infer.text_len', type: int(1, 4096), default: 512, doc: 'text tokens fed to the encoder / cross-attention (Wan: 512)' },
  { key: 'infer.fps', type: int(1, 240), default: 16, doc: 'frames per second of the written video (Wan 2.1: 16)' },
  // ---- precision
  { key: 'infer.weight_dtype', type: { kind: 'enum', values: ['checkpoint', 'f32', 'f16', 'bf16'] }, default: 'checkpoint', doc: "dtype of matmul/conv weights on the GPU ('checkpoint' keeps the file's)" },
  { key: 'infer.activation_dtype', type: { kind: 'enum', values: ['f32', 'f16'] }, default: 'f32', doc: 'activation dtype of the DiT matmuls/attention (f16 needs shader-f16); norms, modulation, RoPE stay f32' },
  // ---- memory
  { key: 'infer.diffusion.low_mem_level', type: int(0, 3), default: 0, doc: '0 all resident; 1 + tiled VAE decode; 2 + text encoder off the GPU; 3 + DiT blocks streamed from host memory' },
  { key: 'infer.diffusion.cp_size', type: int(1, 1), default: 1, doc: 'context-parallel GPUs (only 1: multi-GPU is not implemented)' },
  { key: 'infer.offload_text_encoder', type: { kind: 'boolOrAuto' }, default: 'auto', doc: 'keep the text encoder off the GPU (auto: level >= 2)' },
  { key: 'infer.offload_dit', type: { kind: 'boolOrAuto' }, default: 'auto', doc: 'stream DiT blocks from host memory (auto: level 3)' },
  { key: 'infer.offload_vae', type: { kind: 'boolOrAuto' }, default: 'auto', doc: 'load VAE weights to the GPU only for the decode phase (auto: level 3)' },
  { key: 'infer.vae_tiling', type: { kind: 'boolOrAuto' }, default: 'auto', doc: 'spatially tiled VAE decode (auto: level >= 1)' },
  { key: 'infer.vae_tile_size', type: int(0, 1024), default: 0, doc: "largest VAE tile in latent pixels (×8 in the video), >= 4; 0 = auto: the least work whose tiles need no more memory than the decoder's whole-frame stages" },
  { key: 'infer.vae_tile_overlap', type: float(0.25, 0.75), default: 0.25, doc: 'tile overlap as a fraction of the tile (>= 0.25: linear blend, no seams)' },
  { key: 'infer.text_encoder_device', type: { kind: 'enum', values: ['cpu', 'gpu-stream'] }, default: 'cpu', doc: "where the offloaded text encoder runs: 'cpu' device, or streamed block by block through the GPU" },
  { key: 'infer.activation_offload', type: { kind: 'bool' }, default: false, doc: 'keep the residual stream in host memory between DiT blocks (level 3, very long videos)' },
  { key: 'infer.memory_limit', type: { kind: 'bytes' }, default: 0, doc: "GPU memory budget (e.g. '8GiB'); 0 = unlimited (the device's own limit)" },
  { key: 'infer.prompt_cache', type: { kind: 'bool' }, default: true, doc: 'cache prompt embeddings on disk (keyed by text encoder and prompt)' },
  { key: 'infer.prompt_cache_dir', type: { kind: 'path' }, default: '.cache/prompt-embeddings', doc: 'prompt embedding cache folder' },
  { key: 'infer.prompt_cache_max_mb', type: int(1, 1_000_000), default: 512, doc: 'prompt embedding cache size bound (oldest entries evicted)' },
  // ---- output
  { key: 'output.path', type: { kind: 'path' }, default: 'outputs/{date}-{slug}.mp4', doc: 'output video path ({date}, {slug}, {seed} are filled in)' },
  { key: 'output.mp4', type: { kind: 'bool' }, default: true, doc: 'write an H.264 MP4 (needs ffmpeg: bundled or on PATH)' },
  { key: 'output.frames', type: { kind: 'bool' }, default: false, doc: 'also write every frame as PNG' },
  { key: 'output.preview', type: { kind: 'bool' }, default: true, doc: 'also write an animated GIF preview' },
  { key: 'output.save_latents', type: { kind: 'bool' }, default: true, doc: 'save the final latents (decode later with --decode-latents)' },
  { key: 'output.sidecar', type: { kind: 'bool' }, default: true, doc: 'write a JSON sidecar with config, seed, model, timings and memory peaks' },
  // ---- device and reporting
  { key: 'device.backend', type: { kind: 'string' }, default: '', doc: "dawn backend ('vulkan', 'metal', 'd3d12'...; empty = default)" },
  { key: 'device.adapter', type: { kind: 'string' }, default: '', doc: 'adapter name substring (empty = default)' },
  { key: 'report.memory_stats', type: { kind: 'bool' }, default: false, doc: 'print allocated/reserved/peak GPU memory per phase and step' },
  { key: 'report.memory_snapshot', type: { kind: 'path' }, default: '', doc: 'write the memory history (JSON + HTML timeline) to this path' },
  { key: 'report.profile', type: { kind: 'bool' }, default: false, doc: 'print a per-kernel GPU time table (timestamp queries) and phase times' },
  { key: 'report.progress', type: { kind: 'enum', values: ['bar', 'quiet', 'jsonl'] }, default: 'bar', doc: 'progress output: bar (terminal), quiet, or JSON lines' },
];

export const SCHEMA_BY_KEY: ReadonlyMap<string, KeySpec> = new Map(SCHEMA.map((s) => [s.key, s]));

export function typeName(t: KeyType): string {
  switch (t.kind) {
    case 'int':
      return `int${t.min !== undefined || t.max !== undefined ? ` [${t.min ?? '-inf'}..${t.max ?? 'inf'}]` : ''}${t.step ? `, ${t.step.what}` : ''}`;
    case 'float':
      return `float${t.min !== undefined || t.max !== undefined ? ` [${t.min ?? '-inf'}..${t.max ?? 'inf'}]` : ''}`;
    case 'bool':
      return 'bool';
    case 'boolOrAuto':
      return 'bool|auto';
    case 'string':
      return 'string';
    case 'path':
      return 'path';
    case 'enum':
      return t.values.join('|');
    case 'bytes':
      return "bytes (e.g. 512MiB, 8GiB, 0)";
  }
}
