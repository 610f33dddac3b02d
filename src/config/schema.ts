// The settings schema: every key the CLI, the YAML config and the TypeScript API accept, declared
// once with its dotted name (Hydra-style `infer.diffusion.low_mem_level`, as the reference spells
// it), its TypeScript field, type, default, allowed range and one line of doc. The typed
// `Settings` object is derived from this declaration, so a new key is added here and nowhere else.
//
// Keys are grouped by when they are used, not by their dotted prefix: `request` (what one
// generation asks for: `pipe.generate(req)` overrides these), `load` (fixed when the pipeline is
// built: model, precision, memory placement, device), `output` and `report` (what the CLI writes
// and prints). So `settings.request.seed` is `infer.seed` and `settings.load.profile` is
// `report.profile`. A field is the camelCase of its key's last part (checked by test/config.test.ts).

export type KeyType =
  | { kind: 'int'; min?: number; max?: number; step?: { mod: number; rem: number; what: string } }
  | { kind: 'float'; min?: number; max?: number }
  | { kind: 'bool' }
  | { kind: 'boolOrAuto' }
  | { kind: 'string' }
  | { kind: 'path' }
  | { kind: 'enum'; values: readonly string[] }
  | { kind: 'bytes' };

/** One key; `V` is the TypeScript type of its value. */
export interface Spec<V = unknown> {
  key: string;
  type: KeyType;
  default: V;
  doc: string;
  /** a model folder's smart_diffusion.json may recommend it, named by the key's last part (`text_len`) */
  fromModel?: boolean;
}

interface Common<V> {
  key: string;
  default: V;
  doc: string;
  fromModel?: boolean;
}

const spec = <V>(o: Common<V>, type: KeyType): Spec<V> => ({ key: o.key, type, default: o.default, doc: o.doc, ...(o.fromModel ? { fromModel: true } : {}) });
const int = (o: Common<number> & { min?: number; max?: number; step?: { mod: number; rem: number; what: string } }): Spec<number> =>
  spec(o, { kind: 'int', min: o.min, max: o.max, ...(o.step ? { step: o.step } : {}) });
const float = (o: Common<number> & { min?: number; max?: number }): Spec<number> => spec(o, { kind: 'float', min: o.min, max: o.max });
const bool = (o: Common<boolean>): Spec<boolean> => spec(o, { kind: 'bool' });
const boolOrAuto = (o: Common<boolean | 'auto'>): Spec<boolean | 'auto'> => spec(o, { kind: 'boolOrAuto' });
const str = (o: Common<string>): Spec<string> => spec(o, { kind: 'string' });
const path = (o: Common<string>): Spec<string> => spec(o, { kind: 'path' });
const bytes = (o: Common<number>): Spec<number> => spec(o, { kind: 'bytes' });
const oneOf = <const T extends readonly string[]>(o: Common<T[number]> & { values: T }): Spec<T[number]> => spec(o, { kind: 'enum', values: o.values });

const MULTIPLE_OF_16 = { mod: 16, rem: 0, what: 'a multiple of 16' };

export const SCHEMA = {
  request: {
    prompt: str({ key: 'prompt', default: '', doc: 'text prompt' }),
    negativePrompt: str({ key: 'negative_prompt', default: '', fromModel: true, doc: 'negative prompt (classifier-free guidance uncondition); empty = the model default' }),
    height: int({ key: 'infer.height', min: 16, max: 4096, step: MULTIPLE_OF_16, default: 64, fromModel: true, doc: 'video height in pixels (multiple of 16)' }),
    width: int({ key: 'infer.width', min: 16, max: 4096, step: MULTIPLE_OF_16, default: 64, fromModel: true, doc: 'video width in pixels (multiple of 16)' }),
    numFrames: int({ key: 'infer.num_frames', min: 1, max: 1025, step: { mod: 4, rem: 1, what: 'of the form 4k+1 (1, 5, 9, ..., 81)' }, default: 9, fromModel: true, doc: 'frames (4k+1)' }),
    numInferenceSteps: int({ key: 'infer.num_inference_steps', min: 1, max: 1000, default: 20, fromModel: true, doc: 'denoising steps' }),
    guidanceScale: float({ key: 'infer.guidance_scale', min: 0, max: 100, default: 5.0, fromModel: true, doc: 'classifier-free guidance scale (1 = no guidance: the negative pass is skipped)' }),
    guidanceScale2: float({ key: 'infer.guidance_scale_2', min: -1, max: 100, default: -1, fromModel: true, doc: "two-expert models (Wan 2.2 A14B): guidance scale of the low-noise expert (transformer_2/); infer.guidance_scale is the high-noise one's; -1 = the same as infer.guidance_scale (diffusers: None)" }),
    boundaryRatio: float({ key: 'infer.boundary_ratio', min: 0, max: 1, default: 0.875, fromModel: true, doc: "two-expert models: the high-noise expert (transformer/) runs while the step's timestep >= boundary_ratio x 1000, then the low-noise one (default: model_index.json's boundary_ratio; Wan 2.2 T2V: 0.875)" }),
    shift: float({ key: 'infer.shift', min: 0.01, max: 100, default: 5.0, fromModel: true, doc: "flow shift of the sigma schedule (null in a model's scheduler config = 5.0)" }),
    seed: int({ key: 'infer.seed', min: 0, max: 2 ** 32 - 1, default: 42, doc: 'random seed of the initial noise' }),
    sampler: oneOf({ key: 'infer.sampler', values: ['unipc', 'euler'], default: 'unipc', fromModel: true, doc: "sampler: Wan's flow UniPC (bh2, order 2) or flow Euler" }),
    // ---- step caching (src/pipeline/cache/, docs/api.md): skip DiT forwards whose result is predictable
    mode: oneOf({ key: 'infer.cache.mode', values: ['off', 'teacache', 'magcache', 'easycache', 'flex'], default: 'off', doc: "step caching: off, or skip DiT forwards as TeaCache, MagCache or EasyCache decide (the published Wan 2.1 algorithms), or flex (this engine's own); teacache/magcache need the model's calibration (built in for the official Wan checkpoints, else npm run calibrate-cache)" }),
    threshold: float({ key: 'infer.cache.threshold', min: 0, max: 100, default: 0, doc: 'step caching: the method\'s skip threshold (higher = more skipped steps, lower quality); 0 = the method\'s default (teacache 0.2 (Wan 2.1 1.3B built in: 0.08), magcache 0.12 (Wan 2.2: 0.04), easycache 0.05, flex 0.1)' }),
    warmupSteps: int({ key: 'infer.cache.warmup_steps', min: -1, max: 1000, default: -1, doc: 'step caching: steps always computed at the start (again after a Wan 2.2 expert switch); -1 = the method\'s default (teacache 1, or 5 with use_ret_steps; magcache retention_ratio; easycache 10; flex 1)' }),
    maxSkips: int({ key: 'infer.cache.max_skips', min: -1, max: 1000, default: -1, doc: 'step caching: most consecutive skipped steps; -1 = the method\'s default (magcache 2, the others unbounded)' }),
    useRetSteps: bool({ key: 'infer.cache.use_ret_steps', default: false, doc: "teacache (and flex's timestep signal): TeaCache's retention-steps variant: Wan's e0 instead of e, 5 warm-up steps, the last step not forced" }),
    extrapolation: float({ key: 'infer.cache.extrapolation', min: 0, max: 1, default: 1, doc: "flex: how much of its damped log-SNR prediction from the last two computed residuals a skipped step adds to the last one (1 = as tuned by npm run bench:cache; 0 = the last residual reused as it is: TeaCache's videos)" }),
    retentionRatio: float({ key: 'infer.cache.retention_ratio', min: 0, max: 1, default: 0.2, doc: 'magcache: fraction of the steps always computed at the start when infer.cache.warmup_steps is -1 (MagCache: retention_ratio, of the forwards)' }),
  },
  load: {
    model: path({ key: 'model', default: 'weights/demo', doc: 'model folder in the diffusers layout (default: the embedded demo model)' }),
    textLen: int({ key: 'infer.text_len', min: 1, max: 4096, default: 512, fromModel: true, doc: 'text tokens fed to the encoder / cross-attention (Wan: 512)' }),
    // ---- precision
    weightDtype: oneOf({ key: 'infer.weight_dtype', values: ['checkpoint', 'f32', 'f16', 'bf16'], default: 'checkpoint', doc: "dtype of matmul/conv weights on the GPU ('checkpoint' keeps the file's)" }),
    activationDtype: oneOf({ key: 'infer.activation_dtype', values: ['f32', 'f16'], default: 'f32', doc: 'activation dtype of the DiT matmuls/attention (f16 needs shader-f16); norms, modulation, RoPE stay f32' }),
    attention: oneOf({ key: 'infer.attention', values: ['sdpa', 'sage'], default: 'sdpa', doc: "self-attention of the DiT and the VAE: 'sdpa' = exact fused attention; 'sage' = quantized (SageAttention-style: K smoothed, Q/K int8 per 64-row block, dot4I8Packed, f32 softmax, P·V in f16 with shader-f16); the text encoder and cross-attention stay exact (docs/precision.md)" }),
    // ---- memory
    lowMemLevel: int({ key: 'infer.diffusion.low_mem_level', min: 0, max: 3, default: 0, doc: '0 all resident; 1 + tiled VAE decode; 2 + text encoder off the GPU; 3 + DiT blocks streamed from host memory' }),
    offloadTextEncoder: boolOrAuto({ key: 'infer.offload_text_encoder', default: 'auto', doc: 'keep the text encoder off the GPU (auto: level >= 2)' }),
    offloadDit: boolOrAuto({ key: 'infer.offload_dit', default: 'auto', doc: 'stream DiT blocks from host memory (auto: level 3)' }),
    offloadVae: boolOrAuto({ key: 'infer.offload_vae', default: 'auto', doc: 'load VAE weights to the GPU only for the decode phase (auto: level 3)' }),
    vaeTiling: boolOrAuto({ key: 'infer.vae_tiling', default: 'auto', doc: 'spatially tiled VAE decode (auto: level >= 1)' }),
    vaeTileSize: int({ key: 'infer.vae_tile_size', min: 0, max: 1024, default: 0, doc: "largest VAE tile in latent pixels (×8 in the video), >= 4; 0 = auto: the least work whose tiles need no more memory than the decoder's whole-frame stages" }),
    vaeTileOverlap: float({ key: 'infer.vae_tile_overlap', min: 0.25, max: 0.75, default: 0.25, doc: 'tile overlap as a fraction of the tile (>= 0.25: linear blend, no seams)' }),
    vaeStemStages: int({ key: 'infer.vae_stem_stages', min: -1, max: 16, default: -1, doc: 'tiled decode: VAE decoder stages run on whole frames before the tiles (fewer: less memory, more halo recompute); -1 = auto (5: everything below the output resolution)' }),
    textEncoderDevice: oneOf({ key: 'infer.text_encoder_device', values: ['cpu', 'gpu-stream'], default: 'cpu', doc: "where the offloaded text encoder runs: 'cpu' device, or streamed block by block through the GPU" }),
    activationOffload: bool({ key: 'infer.activation_offload', default: false, doc: 'keep the residual stream in host memory between DiT blocks (level 3, very long videos)' }),
    expertsResident: oneOf({ key: 'infer.experts_resident', values: ['active', 'both'], default: 'active', doc: "two-expert models with the DiT resident (levels 0-2): 'active' = only the running expert on the GPU, the other in host memory, swapped at the boundary; 'both' = both on the GPU (no swap, twice the DiT memory)" }),
    cpSize: int({ key: 'infer.diffusion.cp_size', min: 1, max: 8, default: 1, doc: 'context parallelism: split each video\'s DiT tokens over this many WebGPU devices (Ulysses all-to-all over heads through host memory; each device holds a full DiT copy, its shard of the blocks (cp_shard_weights) or streams its blocks (level 3); docs/context-parallel.md)' }),
    cfgParallel: bool({ key: 'infer.diffusion.cfg_parallel', default: false, doc: 'classifier-free guidance over 2 WebGPU devices: the cond pass on one, the uncond pass on the other, each a full DiT copy (levels 0-2, no step caching; not with cp_size > 1; devices from cp_devices: docs/context-parallel.md)' }),
    cpShardWeights: boolOrAuto({ key: 'infer.diffusion.cp_shard_weights', default: 'auto', doc: 'with cp_size > 1 and the DiT not streamed: each device keeps 1/cp_size of the DiT blocks resident (its shard, interleaved) and streams the others from one host copy, instead of a full copy per device (auto: level >= 2; with the DiT streamed, level 3, each device streams with infer.diffusion.resident_blocks instead: docs/context-parallel.md)' }),
    cpDevices: str({ key: 'infer.diffusion.cp_devices', default: '', doc: "with cp_size > 1 (or cfg_parallel): comma-separated adapter name substrings or indices (npm run generate -- --list-adapters), one per device; empty = device.adapter for every device when set, else the first cp_size GPU adapters when that many can be opened by name (dawn.node cannot tell identically named GPUs apart), else cp_size devices on the default adapter" }),
    cpAttention: oneOf({ key: 'infer.diffusion.cp_attention', values: ['auto', 'ulysses', 'ring'], default: 'auto', doc: "with cp_size > 1, the DiT's self-attention: 'ulysses' = all-to-all over heads (heads split unevenly when cp_size does not divide them); 'ring' = each device keeps its rows' queries and the K/V chunks pass around the devices (exact online-softmax merge; work split by rows whatever cp_size); auto = ulysses when cp_size divides the head count (or with infer.attention=sage), else ring (docs/context-parallel.md)" }),
    residentBlocks: int({ key: 'infer.diffusion.resident_blocks', min: 0, max: 10_000, default: 0, doc: 'with the DiT streamed (level 3): how many of its blocks stay resident on the GPU (no upload), the rest streamed' }),
    cfgSequential: boolOrAuto({ key: 'infer.cfg_sequential', default: 'auto', doc: 'run the cond and uncond passes one after the other inside each DiT block: half the activations, one weight upload (auto: level >= 1)' }),
    ffnChunkTokens: int({ key: 'infer.ffn_chunk_tokens', min: 0, max: 10_000_000, default: 0, doc: 'tokens per DiT FFN chunk (bounds the ffn_dim-wide intermediate); 0 = auto (chosen by the memory model)' }),
    attnChunkTokens: int({ key: 'infer.attn_chunk_tokens', min: 0, max: 10_000_000, default: 0, doc: 'query tokens per DiT self-attention chunk (q, attention output and out-projection per chunk); 0 = auto' }),
    vramBudget: bytes({ key: 'infer.vram_budget', default: 0, doc: "GPU memory budget (e.g. '8GiB'): pick the fastest placement whose predicted peak reserved fits, and hold the run under it; 0 = off" }),
    memoryLimit: bytes({ key: 'infer.memory_limit', default: 0, doc: "GPU memory budget (e.g. '8GiB'); 0 = unlimited (the device's own limit)" }),
    weightsSource: oneOf({ key: 'infer.weights_source', values: ['memory', 'disk', 'auto'], default: 'auto', doc: "where weights kept off the GPU wait between uses (level 3's streamed DiT blocks, level 2's CPU text encoder, Wan 2.2's inactive expert): host memory, or read from their files per use; auto = disk when those host copies would not fit in 80 % of the available RAM" }),
    weightsCacheDir: path({ key: 'infer.weights_cache_dir', default: '.cache/block-images', doc: 'weights_source=disk: folder of converted block images (blocks whose dtype changes on load are read from here in one piece)' }),
    weightsCacheMaxGb: int({ key: 'infer.weights_cache_max_gb', min: 1, max: 100_000, default: 64, doc: 'weights_source=disk: bound of the converted block image cache (older models evicted first)' }),
    promptCache: bool({ key: 'infer.prompt_cache', default: true, doc: 'cache prompt embeddings on disk (keyed by text encoder and prompt)' }),
    checkFinite: bool({ key: 'infer.check_finite', default: true, doc: 'scan weights for NaN/Inf at load (~5 GB/s on one core) and check the text context, every denoising step and the decoded video; false skips all of it' }),
    preflight: bool({ key: 'infer.preflight', default: true, doc: "before loading, check the run's predicted memory (npm run plan) against this machine's RAM, the device's buffer limit and, on lavapipe, its mapping limit; refuse with what would fit" }),
    promptCacheDir: path({ key: 'infer.prompt_cache_dir', default: '.cache/prompt-embeddings', doc: 'prompt embedding cache folder' }),
    promptCacheMaxMb: int({ key: 'infer.prompt_cache_max_mb', min: 1, max: 1_000_000, default: 512, doc: 'prompt embedding cache size bound (oldest entries evicted)' }),
    // ---- device
    backend: str({ key: 'device.backend', default: '', doc: "dawn backend ('vulkan', 'metal', 'd3d12'...; empty = default)" }),
    adapter: str({ key: 'device.adapter', default: '', doc: 'adapter name substring (empty = default)' }),
    // the engine records timestamps from its creation on
    profile: bool({ key: 'report.profile', default: false, doc: 'print a per-kernel GPU time table (timestamp queries) and phase times' }),
  },
  output: {
    fps: int({ key: 'infer.fps', min: 1, max: 240, default: 16, fromModel: true, doc: 'frames per second of the written video (Wan 2.1: 16)' }),
    path: path({ key: 'output.path', default: 'outputs/{date}-{slug}.mp4', doc: 'output video path ({date}, {slug}, {seed} are filled in)' }),
    mp4: bool({ key: 'output.mp4', default: true, doc: 'write an H.264 MP4 (needs ffmpeg: bundled or on PATH)' }),
    frames: bool({ key: 'output.frames', default: false, doc: 'also write every frame as PNG' }),
    preview: bool({ key: 'output.preview', default: true, doc: 'also write an animated GIF preview' }),
    saveLatents: bool({ key: 'output.save_latents', default: true, doc: 'save the final latents (decode later with --decode-latents)' }),
    sidecar: bool({ key: 'output.sidecar', default: true, doc: 'write a JSON sidecar with config, seed, model, timings and memory peaks' }),
  },
  report: {
    memoryStats: bool({ key: 'report.memory_stats', default: false, doc: 'print allocated/reserved/peak GPU memory per phase and step' }),
    memorySnapshot: path({ key: 'report.memory_snapshot', default: '', doc: 'write the memory history (JSON + HTML timeline) to this path' }),
    progress: oneOf({ key: 'report.progress', values: ['bar', 'quiet', 'jsonl'], default: 'bar', doc: 'progress output: bar (terminal), quiet, or JSON lines' }),
  },
};

export type Group = keyof typeof SCHEMA;
type ValuesOf<G> = { [F in keyof G]: G[F] extends Spec<infer V> ? V : never };

/** Every setting, typed: `settings.request.height`, `settings.load.lowMemLevel`, ... */
export type Settings = { [G in Group]: ValuesOf<(typeof SCHEMA)[G]> };
/** What one generation asks for (prompt, size, steps, seed, ...): `pipe.generate(req)` */
export type RequestSettings = Settings['request'];
/** Fixed when the pipeline is built: model, precision, memory placement, device */
export type LoadSettings = Settings['load'];
/** Any part of the settings, by group and field (the typed form of a layer) */
export type SettingsPatch = { [G in Group]?: Partial<Settings[G]> };

/** A key with its place in `Settings`. */
export interface KeySpec extends Spec {
  group: Group;
  field: string;
}

// Users know the keys by their dotted names: lists of keys (help, YAML, the sidecar's `config`)
// are ordered by dotted section, in declaration order within a section.
const SECTIONS = ['', 'infer', 'output', 'device', 'report'];
const section = (key: string) => SECTIONS.indexOf(key.includes('.') ? key.slice(0, key.indexOf('.')) : '');

/** Every key, by dotted section. */
export const KEYS: readonly KeySpec[] = Object.entries(SCHEMA)
  .flatMap(([group, specs]) => Object.entries(specs as Record<string, Spec>).map(([field, s]) => ({ ...s, group: group as Group, field })))
  .sort((a, b) => section(a.key) - section(b.key));

export const SPEC_BY_KEY: ReadonlyMap<string, KeySpec> = new Map(KEYS.map((s) => [s.key, s]));

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
      return 'bytes (e.g. 512MiB, 8GiB, 0)';
  }
}
