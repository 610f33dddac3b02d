// Text-to-video pipeline: tokenize -> encode prompt and negative prompt -> sample with CFG ->
// decode -> (the CLI writes files). The memory plan (memory-plan.ts) decides, per component and
// phase, what lives on the GPU; the code below makes every placement explicit.

import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { Engine } from '../runtime/engine.ts';
import { Tensor } from '../tensor/tensor.ts';
import { openModelFolder, type ModelFolder } from '../io/model-folder.ts';
import { loadTokenizer, encodePrompt, type UnigramTokenizer } from '../io/tokenizer.ts';
import { loadModule, type WeightDtype } from '../nn/load.ts';
import { WanTransformer3DModel, ditDimsFromConfig, RESIDENT, type BlockResidency } from '../models/wan_dit/model.ts';
import { UMT5EncoderModel, umt5DimsFromConfig } from '../models/umt5/model.ts';
import { WanVaeDecoder, vaeDimsFromConfig } from '../models/wan_vae/model.ts';
import { createScheduler, cfgCombine, type SchedulerKind } from '../schedulers/index.ts';
import { memoryPlan, type MemoryPlan } from './memory-plan.ts';
import { StreamedBlocks } from './residency.ts';
import { decodeTiled } from './tiled-vae.ts';
import { PromptCache, weightsIdentity } from './prompt-cache.ts';
import { defaultConfig, applyObject, type FlatConfig } from '../config/config.ts';
import { Rng } from '../util/rng.ts';
import { ConfigError, InterruptedError, ShapeError, fmtBytes } from '../util/errors.ts';

export type Phase = 'load' | 'encode' | 'denoise' | 'decode';

export type ProgressEvent =
  | { type: 'phase'; phase: Phase | 'write'; detail?: string }
  | { type: 'step'; step: number; total: number; elapsedMs: number; etaMs: number; allocated: number; peakAllocated: number }
  | { type: 'decode'; done: number; total: number; unit: 'tile' | 'frame' }
  | { type: 'load'; component: string; done: number; total: number }
  | { type: 'memory'; phase: string; step?: number; allocated: number; reserved: number; peakAllocated: number; peakReserved: number };

/** Options of `WanPipeline.fromPretrained`: the same settings as the CLI's dotted keys. */
export interface WanPipelineOptions {
  lowMemLevel?: 0 | 1 | 2 | 3;
  offloadTextEncoder?: boolean;
  offloadDit?: boolean;
  offloadVae?: boolean;
  vaeTiling?: boolean;
  vaeTileSize?: number;
  vaeTileOverlap?: number;
  textEncoderDevice?: 'cpu' | 'gpu-stream';
  activationOffload?: boolean;
  weightDtype?: WeightDtype;
  /** GPU memory budget in bytes (0 = unlimited) */
  memoryLimit?: number;
  promptCache?: boolean;
  promptCacheDir?: string;
  /** any config key by its dotted name (applied before the typed options above) */
  config?: Record<string, unknown>;
  /** use this engine instead of creating one (the pipeline then does not destroy it) */
  engine?: Engine;
  backend?: string;
  adapter?: string;
  /** per-kernel GPU timestamps */
  profile?: boolean;
  /** record every GPU alloc/free for a memory snapshot */
  recordMemory?: boolean;
  onProgress?: (ev: ProgressEvent) => void;
}

export interface GenerateRequest {
  prompt: string;
  negativePrompt?: string;
  height?: number;
  width?: number;
  numFrames?: number;
  numInferenceSteps?: number;
  guidanceScale?: number;
  shift?: number;
  seed?: number;
  sampler?: SchedulerKind;
  onProgress?: (ev: ProgressEvent) => void;
  signal?: AbortSignal;
}

export interface PhaseMemory {
  peakAllocated: number;
  peakReserved: number;
  /** allocated bytes by component at the end of the phase */
  byComponent: Record<string, number>;
}

export interface Latents {
  data: Float32Array;
  /** [C, F, H, W] */
  shape: [number, number, number, number];
}

export interface GenerateResult {
  /** [3, T, H, W] in [-1, 1] */
  video: Float32Array;
  videoShape: [number, number, number, number];
  latents: Latents;
  seed: number;
  timingsMs: Record<string, number>;
  memory: { perPhase: Record<string, PhaseMemory>; perStep: Array<{ step: number; peakAllocated: number; peakReserved: number }>; peakAllocated: number; peakReserved: number };
  config: FlatConfig;
  uploads?: { uploads: number; bytes: number; uploadMs: number; stallMs: number; prefetched: number; exposedMs: number };
}

/** Recommended defaults shipped with a model folder (smart_diffusion.json), e.g. the demo model's. */
export function modelDefaults(dir: string): Record<string, unknown> {
  const p = join(dir, 'smart_diffusion.json');
  if (!existsSync(p)) return {};
  try {
    const j = JSON.parse(readFileSync(p, 'utf8')) as Record<string, unknown>;
    const out: Record<string, unknown> = {};
    const map: Record<string, string> = {
      text_len: 'infer.text_len',
      height: 'infer.height',
      width: 'infer.width',
      num_frames: 'infer.num_frames',
      num_inference_steps: 'infer.num_inference_steps',
      guidance_scale: 'infer.guidance_scale',
      shift: 'infer.shift',
      fps: 'infer.fps',
      negative_prompt: 'negative_prompt',
      sampler: 'infer.sampler',
    };
    for (const [k, v] of Object.entries(j)) if (map[k]) out[map[k]!] = v;
    return out;
  } catch (e) {
    throw new ConfigError(`${p} is not valid JSON: ${(e as Error).message}`);
  }
}

export class WanPipeline {
  readonly plan: MemoryPlan;
  private streamed: StreamedBlocks | null = null;
  private vaeLoaded = false;
  /** level 3: the VAE's host copy (key -> host tensor in the weight dtype), uploaded per decode */
  private vaeHost: Map<string, Tensor> | null = null;
  /** text_encoder_device=gpu-stream: the encoder blocks' host images and their slot ring */
  private teRing: StreamedBlocks | null = null;
  private readonly promptCache: PromptCache | null;
  readonly componentBytes: Record<string, number> = {};

  private constructor(
    readonly engine: Engine,
    private readonly ownsEngine: boolean,
    readonly folder: ModelFolder,
    readonly config: FlatConfig,
    readonly dit: WanTransformer3DModel,
    readonly textEncoder: UMT5EncoderModel,
    readonly vae: WanVaeDecoder,
    readonly tokenizer: UnigramTokenizer | null,
    private readonly onProgress?: (ev: ProgressEvent) => void,
  ) {
    this.plan = memoryPlan(config);
    this.promptCache = config['infer.prompt_cache']
      ? new PromptCache(
          resolve(String(config['infer.prompt_cache_dir'])),
          Number(config['infer.prompt_cache_max_mb']) * 2 ** 20,
          weightsIdentity(folder.textEncoder.config, [folder.textEncoder.weights.path]),
        )
      : null;
  }

  /** Open a diffusers-layout Wan 2.1 T2V folder and place its components per the memory plan. */
  static async fromPretrained(dir: string, options: WanPipelineOptions = {}): Promise<WanPipeline> {
    const cfg = defaultConfig();
    applyObject(cfg, modelDefaults(dir), ` in ${join(dir, 'smart_diffusion.json')}`);
    if (options.config) applyObject(cfg, options.config, ' in the pipeline options');
    const typed: Record<string, unknown> = {
      'infer.diffusion.low_mem_level': options.lowMemLevel,
      'infer.offload_text_encoder': options.offloadTextEncoder,
      'infer.offload_dit': options.offloadDit,
      'infer.offload_vae': options.offloadVae,
      'infer.vae_tiling': options.vaeTiling,
      'infer.vae_tile_size': options.vaeTileSize,
      'infer.vae_tile_overlap': options.vaeTileOverlap,
      'infer.text_encoder_device': options.textEncoderDevice,
      'infer.activation_offload': options.activationOffload,
      'infer.weight_dtype': options.weightDtype,
      'infer.memory_limit': options.memoryLimit,
      'infer.prompt_cache': options.promptCache,
      'infer.prompt_cache_dir': options.promptCacheDir,
      'device.backend': options.backend,
      'device.adapter': options.adapter,
      'report.profile': options.profile,
    };
    applyObject(cfg, Object.fromEntries(Object.entries(typed).filter(([, v]) => v !== undefined)), ' in the pipeline options');
    cfg['model'] = dir;
    const folder = await openModelFolder(dir);
    const engine =
      options.engine ??
      (await Engine.create({
        backend: String(cfg['device.backend'] || '') || undefined,
        adapter: String(cfg['device.adapter'] || '') || undefined,
        profile: Boolean(cfg['report.profile']),
        limitBytes: Number(cfg['infer.memory_limit']) || undefined,
      }));
    if (options.engine && cfg['infer.memory_limit']) engine.allocator.limitBytes = Number(cfg['infer.memory_limit']);
    if (options.recordMemory) engine.allocator.startRecording();
    try {
      const dit = new WanTransformer3DModel(ditDimsFromConfig(folder.transformer.config as unknown as Record<string, unknown>));
      const te = new UMT5EncoderModel(umt5DimsFromConfig(folder.textEncoder.config as unknown as Record<string, unknown>));
      const vae = new WanVaeDecoder(vaeDimsFromConfig(folder.vae.config as unknown as Record<string, unknown>));
      const tok = folder.tokenizer ? await loadTokenizer(folder.tokenizer.dir) : null;
      const p = new WanPipeline(engine, !options.engine, folder, cfg, dit, te, vae, tok, options.onProgress);
      await p.load();
      return p;
    } catch (e) {
      if (!options.engine) engine.destroy();
      throw e;
    }
  }

  private emit(ev: ProgressEvent, extra?: (ev: ProgressEvent) => void): void {
    this.onProgress?.(ev);
    if (extra && extra !== this.onProgress) extra(ev);
  }

  private setPhase(phase: string): void {
    this.engine.allocator.phase = phase;
    // low-memory levels give the previous phase's cached buffers back at each phase boundary (as
    // torch.cuda.empty_cache() between stages), so `reserved` follows the phase that runs now
    if (this.plan.level >= 1 && (phase === 'denoise' || phase === 'decode')) this.engine.allocator.emptyCache();
  }

  private oomAdvice(phase: string): (requested: number) => string {
    return () => {
      const lvl = this.plan.level;
      const tips: string[] = [];
      if (phase === 'decode' && !this.plan.vaeTiling) tips.push('infer.diffusion.low_mem_level=1 (tiled VAE decode)');
      if (phase === 'decode' && this.plan.vaeTiling) tips.push(this.plan.tileSize ? `a smaller infer.vae_tile_size (now ${this.plan.tileSize})` : 'an explicit small infer.vae_tile_size such as 8 (now auto, sized to the whole-frame stages\' peak)');
      if (phase === 'encode' && this.plan.textEncoder === 'gpu') tips.push('infer.diffusion.low_mem_level=2 (text encoder off the GPU)');
      if ((phase === 'denoise' || phase === 'load') && this.plan.dit === 'resident') tips.push('infer.diffusion.low_mem_level=3 (DiT blocks streamed from host memory)');
      if (lvl < 3 && tips.length === 0) tips.push(`infer.diffusion.low_mem_level=${Math.min(3, lvl + 1)}`);
      tips.push('a lower resolution or fewer frames');
      return `Try ${tips.join(', or ')}. The latents of a finished denoise are saved first, so --decode-latents can retry the decode alone.`;
    };
  }

  // ------------------------------------------------------------------ loading

  private async load(): Promise<void> {
    const e = this.engine;
    const act = String(this.config['infer.activation_dtype']) as 'f32' | 'f16';
    if (act === 'f16' && !e.features.shaderF16) {
      throw new ConfigError(`infer.activation_dtype=f16 needs the adapter feature 'shader-f16', which ${e.adapterName} does not expose; use f32`);
    }
    this.dit.dims.activationDtype = act;
    const wd = String(this.config['infer.weight_dtype']) as WeightDtype;
    this.setPhase('load');
    e.allocator.oomAdvice = this.oomAdvice('load');
    this.emit({ type: 'phase', phase: 'load' });
    // DiT: non-block weights always resident; blocks resident or host-streamed
    const streamDit = this.plan.dit === 'stream';
    const ck = await this.folder.transformer.open();
    try {
      await loadModule(this.dit, ck, {
        engine: e,
        owner: 'dit',
        weightDtype: wd,
        placement: (k) => (streamDit && this.dit.isBlockKey(k) ? 'host' : 'device'),
        onProgress: (d, t) => this.emit({ type: 'load', component: 'transformer', done: d, total: t }),
      });
    } finally {
      await ck.close();
    }
    if (streamDit) {
      this.streamed = new StreamedBlocks(e, this.dit.blocks.items, 'dit.blocks.slot');
      this.streamed.ownerOf = (i) => `dit.blocks.${i}`;
    }
    this.componentBytes.dit = this.dit.paramBytes();
    // Text encoder: resident on the GPU, or its host copy for the CPU device / the GPU stream. Every
    // copy loads here, with the pipeline, as level 0's GPU copies do: a request never reads weight files.
    await this.loadTextEncoder(this.plan.textEncoder);
    // VAE: resident now, or a host copy now that goes to the GPU for the decode phase only
    if (this.plan.vae === 'resident') await this.loadVae();
    else await this.loadVaeHost();
    await e.sync();
  }

  /** Read the VAE's weights (converted to the weight dtype) onto the GPU, or with placement 'host' into host memory. */
  private async readVae(placement?: 'host'): Promise<void> {
    const wd = String(this.config['infer.weight_dtype']) as WeightDtype;
    const ck = await this.folder.vae.open();
    try {
      await loadModule(this.vae, ck, {
        engine: this.engine,
        owner: 'vae',
        weightDtype: wd,
        ...(placement ? { placement: () => placement } : {}),
        onProgress: (d, t) => this.emit({ type: 'load', component: 'vae', done: d, total: t }),
      });
    } finally {
      await ck.close();
    }
  }

  /** level 3's VAE: weights converted once into host memory; loadVae() uploads them for a decode */
  private async loadVaeHost(): Promise<void> {
    await this.readVae('host');
    this.vaeHost = new Map(this.vae.namedParams().map(([k, p]) => [k, p.t]));
  }

  /** (once, by fromPretrained) mode 'gpu': resident; 'cpu': CPU device; 'gpu-stream': host weights, blocks streamed through the GPU */
  private async loadTextEncoder(mode: 'gpu' | 'cpu' | 'gpu-stream'): Promise<void> {
    const wd = String(this.config['infer.weight_dtype']) as WeightDtype;
    const ck = await this.folder.textEncoder.open();
    const te = this.textEncoder;
    try {
      await loadModule(te, ck, {
        engine: mode === 'cpu' ? null : this.engine,
        owner: 'text_encoder',
        weightDtype: mode === 'cpu' ? 'checkpoint' : wd,
        placement: (k) => (te.isDeviceKey(k) && !(mode === 'gpu-stream' && te.isBlockKey(k)) ? 'device' : 'host'),
        onProgress: (d, t) => this.emit({ type: 'load', component: 'text_encoder', done: d, total: t }),
      });
    } finally {
      await ck.close();
    }
    this.componentBytes.text_encoder = this.textEncoder.paramBytes();
    if (mode === 'gpu-stream') {
      // the blocks are packed into host images once; each encode borrows two GPU slots
      this.teRing = new StreamedBlocks(this.engine, this.textEncoder.blocks.items, 'text_encoder.block.slot', 2, false);
      this.teRing.ownerOf = (i) => `text_encoder.encoder.block.${i}`;
    }
  }

  private async loadVae(): Promise<void> {
    if (this.vaeLoaded) return;
    if (this.vaeHost) {
      const e = this.engine;
      for (const [k, p] of this.vae.namedParams()) p.value = e.keep(this.vaeHost.get(k)!.toGpu(e, `vae.${k}`));
      this.componentBytes.vae = this.vae.paramBytes();
      this.vaeLoaded = true;
      return;
    }
    await this.readVae();
    this.componentBytes.vae = this.vae.paramBytes();
    this.vaeLoaded = true;
  }

  private unloadVae(): void {
    if (this.vaeHost) {
      // back to the host copy
      for (const [k, p] of this.vae.namedParams()) {
        p.value?.dispose();
        p.value = this.vaeHost.get(k)!;
      }
    } else this.vae.disposeParams();
    this.vaeLoaded = false;
  }

  // ------------------------------------------------------------------ encode

  /**
   * The text context of a prompt, trimmed to its true length and zero-padded to text_len:
   * [textLen, textDim] host f32 (exactly what WanModel stacks before text_embedding).
   */
  async encodePrompt(text: string): Promise<Float32Array> {
    const textLen = Number(this.config['infer.text_len']);
    const d = this.textEncoder.dims.dModel;
    const cached = await this.promptCache?.get(text, textLen);
    if (cached && cached.dim === d) return pad(cached.context, cached.length, textLen, d);
    if (!this.tokenizer) throw new ShapeError(`[pipeline] the model folder ${this.folder.dir} has no tokenizer/ folder: prompts cannot be encoded (add tokenizer/tokenizer.json)`);
    const enc = encodePrompt(this.tokenizer, text, textLen);
    const mode = this.plan.textEncoder; // its weights were loaded by fromPretrained
    // Only the prompt's own tokens are run. The official code runs all text_len positions with the
    // padded keys masked and then keeps the first `length` rows: a real token's output depends only on
    // the real tokens (masked keys weigh exactly 0, the relative bias depends on i - j), so this is the
    // same result for (for a 20-token prompt at text_len 512) 1/25 of the work.
    const n = enc.length;
    const ids = Tensor.cpu(enc.ids.slice(0, n), [1, n], 'i32');
    const mask = Tensor.cpu(enc.mask.slice(0, n), [1, n], 'i32');
    let out: Tensor;
    if (mode === 'gpu-stream') {
      // the text encoder's blocks pass through a 2-slot ring whose GPU memory is given back right after the encode
      const ring = this.teRing!;
      try {
        out = await this.textEncoder.forward(this.engine, ids, mask, undefined, ring);
        await this.engine.sync();
      } finally {
        ring.releaseDevice();
      }
    } else {
      out = await this.textEncoder.forward(mode === 'gpu' ? this.engine : null, ids, mask);
    }
    const all = (await out.toArray()) as Float32Array;
    if (out.device === 'gpu') out.dispose();
    const ctx = all.slice(0, enc.length * d);
    await this.promptCache?.put(text, textLen, ctx, enc.length, d);
    return pad(ctx, enc.length, textLen, d);
  }

  // ------------------------------------------------------------------ sample

  /** Resolve a request against the pipeline config (request fields win). */
  resolveRequest(req: GenerateRequest): FlatConfig {
    const cfg = { ...this.config };
    const o: Record<string, unknown> = {
      prompt: req.prompt,
      negative_prompt: req.negativePrompt,
      'infer.height': req.height,
      'infer.width': req.width,
      'infer.num_frames': req.numFrames,
      'infer.num_inference_steps': req.numInferenceSteps,
      'infer.guidance_scale': req.guidanceScale,
      'infer.shift': req.shift,
      'infer.seed': req.seed,
      'infer.sampler': req.sampler,
    };
    applyObject(cfg, Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)), ' in the request');
    return cfg;
  }

  /** Encode + denoise: returns the final latents (save them before decoding). */
  async sample(req: GenerateRequest, result: Partial<GenerateResult> = {}): Promise<Latents> {
    const cfg = this.resolveRequest(req);
    const e = this.engine;
    const cb = req.onProgress;
    const check = () => {
      if (req.signal?.aborted) throw new InterruptedError('generation interrupted');
    };
    const timings = (result.timingsMs ??= {});
    const perPhase = (result.memory ??= { perPhase: {}, perStep: [], peakAllocated: 0, peakReserved: 0 }).perPhase;
    const H = Number(cfg['infer.height']);
    const W = Number(cfg['infer.width']);
    const T = Number(cfg['infer.num_frames']);
    const [pt, ph, pw] = this.dit.dims.patchSize;
    const sfS = 8;
    const sfT = 4;
    if (H % (sfS * ph) || W % (sfS * pw)) throw new ConfigError(`height and width must be multiples of ${sfS * ph}, got ${H}x${W}`);
    if ((T - 1) % sfT) throw new ConfigError(`num_frames must be 4k+1, got ${T}`);
    void pt;
    const C = this.dit.dims.inChannels;
    const F = (T - 1) / sfT + 1;
    const lh = H / sfS;
    const lw = W / sfS;
    // ---- encode
    check();
    this.setPhase('encode');
    e.allocator.oomAdvice = this.oomAdvice('encode');
    e.allocator.resetPeakMemoryStats();
    this.emit({ type: 'phase', phase: 'encode' }, cb);
    let t0 = performance.now();
    const guidance = Number(cfg['infer.guidance_scale']);
    const useCfg = guidance !== 1;
    const cond = await this.encodePrompt(String(cfg['prompt']));
    const uncond = useCfg ? await this.encodePrompt(String(cfg['negative_prompt'])) : null;
    await e.sync();
    timings.encode = performance.now() - t0;
    perPhase.encode = this.phaseMemory();
    this.emitMemory('encode', cb);
    // ---- denoise
    check();
    this.setPhase('denoise');
    e.allocator.oomAdvice = this.oomAdvice('denoise');
    e.allocator.resetPeakMemoryStats();
    this.emit({ type: 'phase', phase: 'denoise' }, cb);
    t0 = performance.now();
    const steps = Number(cfg['infer.num_inference_steps']);
    const sched = createScheduler(String(cfg['infer.sampler']) as SchedulerKind, { steps, shift: Number(cfg['infer.shift']) });
    const seed = Number(cfg['infer.seed']);
    const rng = new Rng(seed);
    let latent = rng.fillNormal(new Float32Array(C * F * lh * lw));
    const textLen = Number(cfg['infer.text_len']);
    const textDim = this.dit.dims.textDim;
    const B = useCfg ? 2 : 1;
    const ctxHost = new Float32Array(B * textLen * textDim);
    ctxHost.set(cond, 0);
    if (uncond) ctxHost.set(uncond, textLen * textDim);
    this.streamed?.resetStats();
    const residency: BlockResidency = this.streamed ?? RESIDENT;
    const ctxEmb = e.keep(e.scope(() => this.dit.embedText(e.fromHost(ctxHost, [B, textLen, textDim], 'f32'))));
    const perStep = result.memory.perStep;
    try {
      for (let i = 0; i < steps; i++) {
        check();
        e.allocator.resetPeakMemoryStats();
        const tStep = performance.now();
        const x = new Float32Array(B * latent.length);
        for (let b = 0; b < B; b++) x.set(latent, b * latent.length);
        const xg = e.fromHost(x, [B, C, F, lh, lw], 'f32');
        const out = await this.dit.forward(xg, sched.timesteps[i]!, ctxEmb, { residency, activationOffload: this.plan.activationOffload });
        xg.dispose();
        const pred = (await out.toArray()) as Float32Array;
        out.dispose();
        const n = latent.length;
        const v = useCfg ? cfgCombine(pred.subarray(n, 2 * n), pred.subarray(0, n), guidance) : pred;
        latent = sched.step(v, i, latent);
        const st = e.allocator.stats();
        perStep.push({ step: i + 1, peakAllocated: st.peakAllocated, peakReserved: st.peakReserved });
        const el = performance.now() - t0;
        this.emit({ type: 'step', step: i + 1, total: steps, elapsedMs: el, etaMs: (el / (i + 1)) * (steps - i - 1), allocated: st.allocated, peakAllocated: st.peakAllocated }, cb);
        this.emitMemory('denoise', cb, i + 1);
        void tStep;
      }
    } finally {
      ctxEmb.dispose();
    }
    timings.denoise = performance.now() - t0;
    perPhase.denoise = {
      peakAllocated: Math.max(0, ...perStep.map((s) => s.peakAllocated)),
      peakReserved: Math.max(0, ...perStep.map((s) => s.peakReserved)),
      byComponent: this.byComponent(),
    };
    if (this.streamed) result.uploads = { ...this.streamed.stats };
    result.seed = seed;
    result.config = cfg;
    return { data: latent, shape: [C, F, lh, lw] };
  }

  // ------------------------------------------------------------------ decode

  /** Decode latents [C, F, H, W] (normalized latent space) to a video [3, T, 8H, 8W] in [-1, 1]. */
  async decode(latents: Latents, opts: { onProgress?: (ev: ProgressEvent) => void; signal?: AbortSignal; result?: Partial<GenerateResult> } = {}): Promise<{ video: Float32Array; shape: [number, number, number, number] }> {
    const e = this.engine;
    const cb = opts.onProgress;
    const result = opts.result ?? {};
    const timings = (result.timingsMs ??= {});
    const perPhase = (result.memory ??= { perPhase: {}, perStep: [], peakAllocated: 0, peakReserved: 0 }).perPhase;
    if (opts.signal?.aborted) throw new InterruptedError('generation interrupted');
    const [C] = latents.shape;
    if (C !== this.vae.dims.zDim) throw new ShapeError(`[pipeline] latents have ${C} channels; this VAE expects ${this.vae.dims.zDim}`);
    this.setPhase('decode');
    e.allocator.oomAdvice = this.oomAdvice('decode');
    // level 3: the DiT slots are freed before the VAE weights come in
    if (this.plan.vae === 'on-demand') {
      this.streamed?.releaseDevice(); // host images stay; the next denoise allocates the slots again
      e.allocator.emptyCache();
    }
    e.allocator.resetPeakMemoryStats();
    this.emit({ type: 'phase', phase: 'decode' }, cb);
    const t0 = performance.now();
    let res: { video: Float32Array; shape: [number, number, number, number] };
    try {
      await this.loadVae();
      if (this.plan.vaeTiling) {
        res = await decodeTiled(e, this.vae, latents.data, latents.shape, {
          tile: this.plan.tileSize,
          overlap: this.plan.tileOverlap,
          onTile: (d, t) => this.emit({ type: 'decode', done: d, total: t, unit: 'tile' }, cb),
        });
      } else {
        res = await this.vae.decode(e, latents.data, latents.shape, { onChunk: (d, t) => this.emit({ type: 'decode', done: d, total: t, unit: 'frame' }, cb) });
      }
      await e.sync();
      perPhase.decode = this.phaseMemory();
      this.emitMemory('decode', cb);
    } finally {
      // level 3: the VAE leaves the GPU after the decode, also a failed one (an OOM must not strand it there)
      if (this.plan.vae === 'on-demand') this.unloadVae();
    }
    timings.decode = performance.now() - t0;
    return res;
  }

  /** sample + decode */
  async generate(req: GenerateRequest): Promise<GenerateResult> {
    const result: Partial<GenerateResult> = {};
    const latents = await this.sample(req, result);
    const dec = await this.decode(latents, { onProgress: req.onProgress, signal: req.signal, result });
    const mem = result.memory!;
    mem.peakAllocated = Math.max(...Object.values(mem.perPhase).map((p) => p.peakAllocated));
    mem.peakReserved = Math.max(...Object.values(mem.perPhase).map((p) => p.peakReserved));
    return { ...(result as GenerateResult), latents, video: dec.video, videoShape: dec.shape };
  }

  private phaseMemory(): PhaseMemory {
    const s = this.engine.allocator.stats();
    return { peakAllocated: s.peakAllocated, peakReserved: s.peakReserved, byComponent: this.byComponent() };
  }

  /** live GPU bytes per component (owner tag's first part) */
  byComponent(): Record<string, number> {
    return Object.fromEntries(this.engine.allocator.allocatedByOwner(1));
  }

  private emitMemory(phase: string, cb?: (ev: ProgressEvent) => void, step?: number): void {
    const s = this.engine.allocator.stats();
    this.emit({ type: 'memory', phase, step, allocated: s.allocated, reserved: s.reserved, peakAllocated: s.peakAllocated, peakReserved: s.peakReserved }, cb);
  }

  describeMemory(): string {
    const s = this.engine.allocator.stats();
    return `allocated ${fmtBytes(s.allocated)}, reserved ${fmtBytes(s.reserved)}, peak ${fmtBytes(s.peakAllocated)}`;
  }

  /** Free every GPU resource (and the engine, if the pipeline created it). */
  dispose(): void {
    this.streamed?.dispose();
    this.teRing?.dispose();
    this.teRing = null;
    this.dit.disposeParams();
    this.textEncoder.disposeParams();
    this.textEncoder.disposeCaches();
    this.vae.disposeParams();
    this.vaeHost = null;
    if (this.ownsEngine) this.engine.destroy();
  }
}

function pad(ctx: Float32Array, len: number, textLen: number, d: number): Float32Array {
  const out = new Float32Array(textLen * d);
  out.set(ctx.subarray(0, Math.min(len, textLen) * d));
  return out;
}

