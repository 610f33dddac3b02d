// Text-to-video pipeline: tokenize -> encode prompt and negative prompt -> sample with CFG ->
// decode -> (the CLI writes files). The memory plan (memory-plan.ts) decides, per component and
// phase, what lives on the GPU; the code below makes every placement explicit.

import { resolve } from 'node:path';
import { listAdapters } from '../device/gpu.ts';
import { Engine } from '../runtime/engine.ts';
import { Tensor } from '../tensor/tensor.ts';
import { openModelFolder, type ModelFolder } from '../io/model-folder.ts';
import { loadTokenizer, encodePrompt, type UnigramTokenizer } from '../io/tokenizer.ts';
import { loadModuleFrom } from '../nn/load.ts';
import { WanTransformer3DModel, ditDimsFromConfig, type DitStepCache } from '../models/wan_dit/model.ts';
import { RESIDENT, type BlockResidency } from '../nn/residency.ts';
import { UMT5EncoderModel, umt5DimsFromConfig } from '../models/umt5/model.ts';
import { WanVaeDecoder, vaeDimsFromConfig } from '../models/wan_vae/model.ts';
import { createScheduler, cfgCombine } from '../schedulers/index.ts';
import { memoryPlan, ditPlacement, textEncoderLoad, enterPhase, ditRunOptions, decodeSplitFor, type MemoryPlan } from './memory-plan.ts';
import { StreamedBlocks } from './residency.ts';
import { decodeTiled, vaeHeadCopies, type TileDevice } from './tiled-vae.ts';
import { PromptCache, weightsIdentity } from './prompt-cache.ts';
import { settingsForModel, requestSettings, type SettingsOptions } from '../config/settings.ts';
import type { RequestSettings, Settings } from '../config/schema.ts';
import { Rng } from '../util/rng.ts';
import { preflight } from '../plan/preflight.ts';
import { releaseMatmulWorkspace } from '../ops/matmul.ts';
import { choosePlacement, type BudgetChoice } from '../plan/budget.ts';
import { shapesOfFolder } from '../plan/shapes.ts';
import { specFromCaps } from '../plan/meta-gpu.ts';
import { placementSummary } from '../plan/plan.ts';
import { ConfigError, InterruptedError, ShapeError, fmtBytes } from '../util/errors.ts';
import { NonFiniteError } from '../util/non-finite.ts';
import { countNonFinite } from '../ops/finite.ts';
import { scanNonFinite } from '../ops/cpu/finite.ts';
import { expertSchedule, EXPERT_NAMES, type ExpertStep } from './experts.ts';
import type { Param } from '../nn/module.ts';
import { DiskWeights, DiskHostBlocks, BlockImageCache, diskImagesOf, type DiskImage, type DiskReadStats } from './disk-weights.ts';
import { streamLayouts } from './residency.ts';
import { engineDTypeOf } from '../io/checkpoint.ts';
import { dtypeSize, type DType } from '../tensor/dtype.ts';
import { onDisk } from './memory-plan.ts';
import type { ContextParallelDit, CpDevicePeak } from '../parallel/cp-dit.ts';
import { resolveCpAdapters, cpUnsupported, cpBlockPlacement, createContextParallel, disposeContextParallel } from '../parallel/pipeline-cp.ts';
import { cpAttentionRefusal } from '../parallel/ring.ts';
import { CfgParallelDit } from '../parallel/cfg-parallel.ts';
import { hostAvailableBytes } from '../plan/preflight.ts';
import { createStepCache, cacheRecord, cacheRecordOf, type CacheRecord, type CacheSignals, type StepCache, type StepInfo } from './cache/index.ts';
import type { SignalRecorder, RecordOptions } from './cache/record.ts';


/** prompt contexts kept in memory by a pipeline (WanPipeline.encodePrompt) */
const EMBED_MEMO_ENTRIES = 4;
export type Phase = 'load' | 'encode' | 'denoise' | 'decode';

export type ProgressEvent =
  | { type: 'phase'; phase: Phase | 'write'; detail?: string }
  /** `cached`: the step took at least one CFG row's result from the step cache (infer.cache.mode) instead of running the DiT blocks */
  | { type: 'step'; step: number; total: number; elapsedMs: number; etaMs: number; allocated: number; peakAllocated: number; expert?: string; cached: boolean }
  /** two-expert models: the step's expert changed (its weights were swapped in for `swapMs`, 0 when both are resident) */
  | { type: 'expert'; step: number; expert: string; guidance: number; swapMs: number }
  /** inside a slow step (> 2 s), at most once a second: blocks of the DiT forward done so far */
  | { type: 'block'; step: number; total: number; block: number; blocks: number; elapsedMs: number }
  /** the preflight's check of this run against the machine (src/plan/preflight.ts), before loading */
  | { type: 'preflight'; ms: number; peakReserved: number; hostBytes: number; notes: string[] }
  /** something that did not stop the run but the user should know */
  | { type: 'warning'; message: string }
  | { type: 'decode'; done: number; total: number; unit: 'tile' | 'frame' }
  | { type: 'load'; component: string; done: number; total: number }
  | { type: 'plan'; placement: string; reasons: string[]; predictedPeakReserved: number; budget: number }
  | { type: 'memory'; phase: string; step?: number; allocated: number; reserved: number; peakAllocated: number; peakReserved: number };

/** What a pipeline needs besides its settings. */
export interface PipelineRuntime {
  /** use this engine instead of creating one (the pipeline then does not destroy it) */
  engine?: Engine;
  /** record every GPU alloc/free for a memory snapshot */
  recordMemory?: boolean;
  onProgress?: (ev: ProgressEvent) => void;
}

/**
 * Options of `WanPipeline.fromPretrained`: the load-time settings as typed fields (`lowMemLevel`,
 * `weightDtype`, ...; see `LoadSettings`), request `defaults`, dotted `config` keys or a YAML
 * `configFile` (settingsForModel), and the runtime parts.
 */
export interface WanPipelineOptions extends SettingsOptions, PipelineRuntime {}

/** One generation: the request settings (`RequestSettings`: size, steps, seed...; unset fields keep the pipeline's) */
export interface GenerateRequest extends Partial<RequestSettings> {
  prompt: string;
  /** the initial noise instead of the seed's (diffusers' `latents`): [C, F, H/8, W/8] of the request's size */
  latents?: Latents;
  /** the text encoder's output for the prompt, trimmed to its tokens ([n, text_dim], n <= text_len), instead of encoding `prompt` (diffusers' `prompt_embeds`) */
  promptEmbeds?: Float32Array;
  /** the same for the negative prompt (diffusers' `negative_prompt_embeds`) */
  negativePromptEmbeds?: Float32Array;
  onProgress?: (ev: ProgressEvent) => void;
  signal?: AbortSignal;
  /**
   * Record the signals the step caches decide on (`GenerateResult.cacheSignals`; every step
   * computed, infer.cache.mode must be off): what `npm run calibrate-cache` fits
   */
  recordCacheSignals?: boolean | RecordOptions;
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
  memory: { perPhase: Record<string, PhaseMemory>; perStep: Array<{ step: number; peakAllocated: number; peakReserved: number; expert?: string }>; peakAllocated: number; peakReserved: number; /** cp_size > 1: each device's peaks over the denoise and, when the decode is tiled over the devices, the decode (rank 0 first) */ devices?: CpDevicePeak[] };
  /** the request's effective settings */
  settings: Settings;
  /** two-expert models: each step's expert and guidance, and every expert swap with its time */
  experts?: ExpertsReport;
  uploads?: import('./residency.ts').UploadStats;
  /** infer.cache.mode other than off: which steps ran the DiT and which came from the step cache */
  cache?: CacheRecord;
  /** GenerateRequest.recordCacheSignals: the per-step signals (src/pipeline/cache/record.ts) */
  cacheSignals?: CacheSignals;
}

/**
 * What a NonFiniteError thrown by the pipeline carries besides its message (fields on the error
 * object): where the numbers went bad and, for the denoise, the last finite latents.
 */
export interface NonFiniteDetails {
  phase: 'encode' | 'denoise' | 'decode';
  /** denoise: the step (1-based) whose DiT output or scheduler update was non-finite */
  step?: number;
  totalSteps?: number;
  /** 'dit' (the DiT forward's output), 'scheduler' (the latents after the update), 'text_encoder', 'vae' */
  where: 'dit' | 'scheduler' | 'text_encoder' | 'vae';
  /** non-finite values found, of `total` */
  count: number;
  total: number;
  /** denoise: the last finite latents (the failing step's input; the initial noise at step 1); decode: its input latents */
  latents?: Latents;
  /** denoise: steps completed on `latents` (step - 1) */
  latentsStep?: number;
}

export interface ExpertsReport {
  schedule: Array<{ step: number; timestep: number; expert: string; guidance: number }>;
  /** swaps in this request (step = the 1-based step that needed it; ms = wall time of the swap, uploads finished) */
  swaps: Array<{ step: number; from: string; to: string; ms: number }>;
  boundaryRatio: number;
  resident: 'active' | 'both';
}

export type PipelineNonFiniteError = NonFiniteError & NonFiniteDetails;

function nonFiniteError(message: string, details: NonFiniteDetails): PipelineNonFiniteError {
  return Object.assign(new NonFiniteError(message), details);
}

/**
 * Test hooks (tests only; empty in normal runs): `afterDitForward` may replace the DiT output
 * of a step before the pipeline checks it (e.g. to plant a NaN).
 */
export const pipelineTestHooks: { afterDitForward?: (out: Tensor, step: number) => Tensor } = {};

export class WanPipeline {
  readonly plan: MemoryPlan;
  private streamed: StreamedBlocks | null = null;
  /** infer.diffusion.cp_size > 1: the DiT's devices (rank 0 = this.engine and this.dit; src/parallel/) */
  private cp: ContextParallelDit | null = null;
  /** infer.diffusion.cfg_parallel: the cond pass on this.engine, the uncond pass on a second device */
  private cfgp: CfgParallelDit | null = null;
  private vaeLoaded = false;
  /** level 3: the VAE's host copy (key -> host tensor in the weight dtype), uploaded per decode */
  private vaeHost: Map<string, Tensor> | null = null;
  /** text_encoder_device=gpu-stream: the encoder blocks' host images and their slot ring */
  private teRing: StreamedBlocks | null = null;
  private readonly promptCache: PromptCache | null;
  /**
   * The contexts of the last few prompts (a batch's shared negative prompt, a repeated prompt): a
   * pipeline that serves many requests (a worker, `--prompts`) encodes each once, with or without
   * the on-disk prompt cache. At most EMBED_MEMO_ENTRIES contexts of text_len x d f32 (8 MiB each
   * for UMT5-XXL at 512 tokens).
   */
  private readonly embedMemo = new Map<string, Float32Array>();
  /** prompts this pipeline ran through the text encoder (not found in the memo or the prompt cache) */
  textEncoderRuns = 0;
  private warnedCache = false;
  readonly componentBytes: Record<string, number> = {};
  /** with infer.vram_budget: the placement the budget chose, its predicted peaks and why */
  budget: BudgetChoice | null = null;
  /** context / CFG parallelism: each device's adapter, resolved from cp_devices (resolveCpAdapters) */
  private cpAdapterNames: string[] | null = null;
  /** two-expert models: the expert whose weights are on the GPU now (0 = transformer/, 1 = transformer_2/) */
  private activeExpert = 0;
  /**
   * two-expert models with experts_resident=active: per expert, its GPU-placed params (every param
   * with the DiT resident; the non-block ones with it streamed) and their host copies (converted to
   * the weight dtype at load). The inactive expert's params hold their host copy.
   */
  private expertHost: Array<Map<Param, Tensor>> | null = null;
  /** infer.weights_source=disk: the open weight files read per use, by component ('transformer', 'transformer_2', 'text_encoder') */
  private readonly disk = new Map<string, DiskWeights>();
  /** level 2's CPU-device text encoder with weights_source=disk: its blocks read per use */
  private teDisk: DiskHostBlocks | null = null;

  private constructor(
    readonly engine: Engine,
    private readonly ownsEngine: boolean,
    readonly folder: ModelFolder,
    readonly settings: Settings,
    readonly dit: WanTransformer3DModel,
    readonly textEncoder: UMT5EncoderModel,
    readonly vae: WanVaeDecoder,
    readonly tokenizer: UnigramTokenizer | null,
    private readonly onProgress?: (ev: ProgressEvent) => void,
    /** Wan 2.2 A14B: the low-noise expert (transformer_2/); null for one-DiT models */
    readonly dit2: WanTransformer3DModel | null = null,
  ) {
    const l = settings.load;
    this.plan = memoryPlan(l);
    this.promptCache = l.promptCache
      ? new PromptCache(
          resolve(l.promptCacheDir),
          l.promptCacheMaxMb * 2 ** 20,
          weightsIdentity(folder.textEncoder.config, [folder.textEncoder.weights.path]),
        )
      : null;
  }

  /** Open a diffusers-layout Wan 2.1 T2V folder and place its components per the memory plan. */
  static async fromPretrained(dir: string, options: WanPipelineOptions = {}): Promise<WanPipeline> {
    return WanPipeline.fromSettings(settingsForModel(dir, options), options);
  }

  /** The same from settings already resolved (the CLI builds them from its arguments; src/config/settings.ts). */
  static async fromSettings(settingsIn: Settings, options: PipelineRuntime = {}): Promise<WanPipeline> {
    let settings = settingsIn;
    const l = settings.load;
    const folder = await openModelFolder(l.model);
    // infer.vram_budget bounds what the device holds (reserved bytes), infer.memory_limit too: the smaller wins
    const limit = Math.min(l.memoryLimit || Infinity, l.vramBudget || Infinity);
    // context / CFG parallelism: each device's adapter (cp_devices names or indices, or the first GPUs)
    const cpSel = l.cpSize > 1 || l.cfgParallel ? await resolveCpAdapters(l.cfgParallel ? 2 : l.cpSize, l.cpDevices, l.adapter, () => listAdapters({ backend: l.backend || undefined })) : null;
    if (cpSel?.note) options.onProgress?.({ type: 'warning', message: cpSel.note });
    const engine =
      options.engine ??
      (await Engine.create({
        backend: l.backend || undefined,
        adapter: (cpSel ? cpSel.adapters[0] : l.adapter) || undefined,
        profile: l.profile,
        limitBytes: Number.isFinite(limit) ? limit : undefined,
      }));
    if (options.engine && Number.isFinite(limit)) engine.allocator.limitBytes = limit;
    let budget: BudgetChoice | null = null;
    try {
      // infer.diffusion.cp_attention=ring with quantized attention: refused before any planning
      const ringWhy = cpAttentionRefusal(l.cpAttention, l.cpSize, l.attention);
      if (ringWhy) throw new ConfigError(ringWhy);
      const src = await resolveWeightsSource(folder, settings);
      if (src.note) options.onProgress?.({ type: 'preflight', ms: 0, peakReserved: 0, hostBytes: 0, notes: [src.note] });
      settings = { ...settings, load: { ...settings.load, weightsSource: src.source } };
      if (l.vramBudget > 0) {
        // the placement is chosen before anything is loaded: the planner walks this run's code on a
        // device that holds no memory (src/plan/), with this adapter's limits, at the pipeline's request size
        budget = await choosePlacement(await shapesOfFolder(folder), settings, l.vramBudget, { device: specFromCaps(engine.caps, engine.limits) });
        settings = budget.settings;
        options.onProgress?.({ type: 'plan', placement: placementSummary(budget.plan), reasons: budget.reasons, predictedPeakReserved: budget.plan.peakReservedBytes, budget: l.vramBudget });
      }
      if (l.preflight) {
        // before anything is loaded: this run against this machine (RAM, buffer limit, lavapipe's mappings)
        const pf = await preflight(folder, settings, engine, undefined, budget?.plan);
        settings = pf.settings;
        options.onProgress?.({ type: 'preflight', ms: pf.ms, peakReserved: pf.plan.peakReservedBytes, hostBytes: pf.plan.hostBytes, notes: pf.notes });
      }
    } catch (e) {
      if (!options.engine) engine.destroy();
      throw e;
    }
    if (options.recordMemory) engine.allocator.startRecording();
    try {
      const dit = new WanTransformer3DModel(ditDimsFromConfig(folder.transformer.config));
      const dit2 = folder.transformer2 ? new WanTransformer3DModel(ditDimsFromConfig(folder.transformer2.config)) : null;
      if (!dit2 && settings.request.guidanceScale2 >= 0) {
        options.onProgress?.({ type: 'warning', message: `infer.guidance_scale_2 (${settings.request.guidanceScale2}) applies to two-expert models (Wan 2.2 A14B); ${folder.dir} has one transformer, so it is ignored: use infer.guidance_scale` });
      }
      if (dit2 && settings.load.expertsResident === 'both' && memoryPlan(settings.load).dit === 'stream') {
        throw new ConfigError(
          'infer.experts_resident=both keeps both experts resident on the GPU, but the DiT is streamed (low_mem_level 3 or infer.offload_dit=true): use infer.experts_resident=active, or a lower level with infer.offload_dit=false',
        );
      }
      const te = new UMT5EncoderModel(umt5DimsFromConfig(folder.textEncoder.config));
      const vae = new WanVaeDecoder(vaeDimsFromConfig(folder.vae.config));
      const tok = folder.tokenizer ? await loadTokenizer(folder.tokenizer.dir) : null;
      tok?.checkVocabSize(folder.textEncoder.config.vocab_size, folder.textEncoder.configPath);
      const p = new WanPipeline(engine, !options.engine, folder, settings, dit, te, vae, tok, options.onProgress, dit2);
      p.budget = budget;
      p.cpAdapterNames = cpSel?.adapters ?? null;
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
    enterPhase(this.engine.allocator, this.plan, phase);
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
    const act = this.settings.load.activationDtype;
    if (act === 'f16' && !e.caps.shaderF16) {
      throw new ConfigError(`infer.activation_dtype=f16 needs the adapter feature 'shader-f16', which ${e.adapterName} does not expose; use f32`);
    }
    this.dit.dims.activationDtype = act;
    if (this.dit2) this.dit2.dims.activationDtype = act;
    // infer.attention: the DiT's self-attention and the VAE's mid attention (the text encoder and
    // the cross-attention stay exact: the quantized op takes no bias or key mask)
    const attn = this.settings.load.attention;
    this.dit.dims.attention = attn;
    if (this.dit2) this.dit2.dims.attention = attn;
    this.vae.midAttn.kind = attn;
    const l = this.settings.load;
    // cp_size > 1: where each device keeps the DiT's blocks (a full copy, its shard, or streamed from one host copy)
    const cpPlace = cpBlockPlacement({ cpSize: l.cfgParallel ? 1 : l.cpSize, level: this.plan.level, ditStreamed: this.plan.dit === 'stream', shard: l.cpShardWeights, residentBlocks: this.plan.residentBlocks, numBlocks: this.dit.blocks.length });
    const cpStream = l.cpSize > 1 && !l.cfgParallel && cpPlace.stream;
    const cpWhy = cpUnsupported({ cpSize: l.cpSize, cfgParallel: l.cfgParallel, ditStreamed: this.plan.dit === 'stream', twoExperts: !!this.dit2, activationOffload: this.plan.activationOffload, diskStreamed: cpStream && this.fromDisk });
    if (cpWhy) throw new ConfigError(cpWhy);
    this.setPhase('load');
    e.allocator.oomAdvice = this.oomAdvice('load');
    this.emit({ type: 'phase', phase: 'load' });
    if (this.dit2) await this.loadExperts();
    else {
      // DiT: non-block weights always resident; blocks resident or host-streamed
      await this.loadDit(this.dit, 'transformer', onDisk(ditPlacement(cpStream ? { ...this.plan, dit: 'stream' } : this.plan, (k) => this.dit.isBlockKey(k)), this.fromDisk, (k) => this.dit.isBlockKey(k)));
      if (this.plan.dit === 'stream' && !cpStream) {
        const disk = this.fromDisk ? await this.diskImages([[this.dit, 'transformer']]) : undefined;
        this.streamed = new StreamedBlocks(e, this.dit.blocks.items, 'dit.blocks.slot', { resident: this.plan.residentBlocks, ownerOf: (i) => `dit.blocks.${i}`, disk });
      }
      this.componentBytes.dit = this.dit.paramBytes();
      if (l.cpSize > 1 || l.cfgParallel) {
        // context parallelism / CFG parallelism: every further device gets its own engine and a full DiT copy
        const set = await createContextParallel({
          engine0: e,
          dit0: this.dit,
          adapters: this.cpAdapterNames ?? Array.from({ length: l.cfgParallel ? 2 : l.cpSize }, () => l.adapter),
          backend: l.backend,
          limitBytes: e.allocator.limitBytes ?? undefined,
          load: (dit, engine, placement) => loadModuleFrom(dit, this.folder.transformer, { engine, owner: 'dit', weightDtype: l.weightDtype, checkFinite: this.checkFinite, placement }).then(() => undefined),
          stream: cpStream ? { resident: cpPlace.resident } : undefined,
        });
        // rank 0's ring is the pipeline's streamed blocks (released for the decode at level 3, freed with it)
        if (set.ranks[0]!.ring) this.streamed = set.ranks[0]!.ring;
        if (l.cfgParallel) this.cfgp = new CfgParallelDit(set.ranks);
        else this.cp = set;
      }
    }
    // Text encoder: resident on the GPU, or its host copy for the CPU device / the GPU stream. Every
    // copy loads here, with the pipeline, as level 0's GPU copies do: a request never reads weight files.
    await this.loadTextEncoder(this.plan.textEncoder);
    // VAE: resident now, or a host copy now that goes to the GPU for the decode phase only
    if (this.plan.vae === 'resident') await this.loadVae();
    else await this.loadVaeHost();
    await e.sync();
  }

  /** infer.weights_source resolved to disk (fromSettings resolves auto) */
  private get fromDisk(): boolean {
    return this.settings.load.weightsSource === 'disk';
  }

  /**
   * weights_source=disk: the disk images of the streamed blocks of these modules, in order (one
   * DiskWeights per component, kept open for the pipeline's life); blocks whose dtype changes on
   * load much go through the converted-image cache.
   */
  private async diskImages(mods: Array<[{ blocks: { items: import('../nn/module.ts').Module[] } }, string]>): Promise<{ weights: DiskWeights[]; images: DiskImage[] }> {
    const l = this.settings.load;
    const weights: DiskWeights[] = [];
    const images: DiskImage[] = [];
    const comps: Record<string, { open(): Promise<import('../io/checkpoint.ts').Checkpoint> }> = { transformer: this.folder.transformer, transformer_2: this.folder.transformer2!, text_encoder: this.folder.textEncoder };
    for (const [m, name] of mods) {
      let dw = this.disk.get(name);
      if (!dw) {
        dw = await DiskWeights.open(comps[name]!, name);
        this.disk.set(name, dw);
      }
      const layouts = streamLayouts(this.engine, m.blocks.items);
      const cache = new BlockImageCache(resolve(l.weightsCacheDir), l.weightsCacheMaxGb * 2 ** 30, `${name}-${l.weightDtype}-a${Math.max(this.engine.caps.storageAlign, 256)}`);
      const imgs = await diskImagesOf(layouts, dw, cache, (d, t) => this.emit({ type: 'load', component: `${name} (disk images)`, done: d, total: t }));
      for (const img of imgs) {
        images.push(img);
        weights.push(dw);
      }
    }
    return { weights, images };
  }

  /** weights_source=disk: what was read from the weight files, by component (since load) */
  diskReadStats(): Record<string, DiskReadStats> {
    return Object.fromEntries([...this.disk].map(([k, w]) => [k, { ...w.stats }]));
  }

  /** owner tag of an expert's weights: 'dit' (transformer/) or 'dit_2' (transformer_2/) */
  private static ditOwner(k: number): string {
    return k === 0 ? 'dit' : 'dit_2';
  }

  private async loadDit(dit: WanTransformer3DModel, which: 'transformer' | 'transformer_2', placement: (key: string) => 'device' | 'host' | 'disk'): Promise<void> {
    const comp = which === 'transformer' ? this.folder.transformer : this.folder.transformer2!;
    await loadModuleFrom(dit, comp, {
      engine: this.engine,
      owner: WanPipeline.ditOwner(which === 'transformer' ? 0 : 1),
      weightDtype: this.settings.load.weightDtype,
      checkFinite: this.checkFinite,
      placement,
      onProgress: (d, t) => this.emit({ type: 'load', component: which, done: d, total: t }),
    });
  }

  /** the experts by index (one-DiT models: just the DiT) */
  private get experts(): WanTransformer3DModel[] {
    return this.dit2 ? [this.dit, this.dit2] : [this.dit];
  }

  /**
   * Wan 2.2's two experts. experts_resident=both (DiT resident): both on the GPU, nothing swaps.
   * Otherwise both are read once into host memory (converted to the weight dtype); with the DiT
   * streamed their blocks become the block images of ONE StreamedBlocks (a group per expert, one
   * ring of slots), and the active expert's other weights (all of them with the DiT resident) are
   * uploaded from their host copies: expert 0 now, the other at the boundary (useExpert).
   */
  private async loadExperts(): Promise<void> {
    const e = this.engine;
    const both = this.settings.load.expertsResident === 'both';
    const stream = this.plan.dit === 'stream';
    const names = EXPERT_NAMES;
    for (let k = 0; k < 2; k++) {
      const dit = this.experts[k]!;
      // 'active': every weight of both experts waits off the GPU: in host memory, or on disk (read at the swap / per block)
      await this.loadDit(dit, names[k], both ? ditPlacement(this.plan, (key) => dit.isBlockKey(key)) : this.fromDisk ? () => 'disk' : () => 'host');
      if (this.fromDisk && !both) this.disk.set(names[k], await DiskWeights.open(k === 0 ? this.folder.transformer : this.folder.transformer2!, names[k]));
    }
    if (both) {
      this.componentBytes.dit = this.dit.paramBytes();
      this.componentBytes.dit_2 = this.dit2!.paramBytes();
      return;
    }
    if (stream) {
      const n = this.dit.blocks.items.length;
      this.streamed = new StreamedBlocks(e, [...this.dit.blocks.items, ...this.dit2!.blocks.items], 'dit.blocks.slot', {
        resident: this.plan.residentBlocks,
        groups: [n, this.dit2!.blocks.items.length],
        ownerOf: (i) => (i < n ? `dit.blocks.${i}` : `dit_2.blocks.${i - n}`),
        disk: this.fromDisk ? await this.diskImages([[this.dit, 'transformer'], [this.dit2!, 'transformer_2']]) : undefined,
      });
    }
    this.expertHost = this.experts.map((dit) => new Map(dit.namedParams().filter(([key]) => !(stream && dit.isBlockKey(key))).map(([, p]) => [p, p.t] as [Param, Tensor])));
    this.activeExpert = -1;
    await this.useExpert(0);
    this.componentBytes.dit = this.dit.paramBytes();
    this.componentBytes.dit_2 = this.dit2!.paramBytes();
  }

  /**
   * Put expert k's weights on the GPU (a no-op when it is there, or when both are resident). The
   * current expert's GPU copies are freed FIRST (their params point at the host copies again; the
   * caching allocator keeps the buffers, which the other expert's same-shaped weights then reuse),
   * then k's are uploaded and waited for: the GPU never holds both. Returns the wall time in ms.
   */
  private async useExpert(k: number): Promise<number> {
    if (!this.dit2 || k === this.activeExpert || !this.expertHost) {
      this.activeExpert = k;
      return 0;
    }
    const e = this.engine;
    const t0 = performance.now();
    e.flush();
    if (this.activeExpert >= 0) {
      for (const [p, host] of this.expertHost[this.activeExpert]!) {
        if (p.value !== host) p.value?.dispose();
        p.value = host;
      }
    }
    this.streamed?.setGroup(k);
    const owner = WanPipeline.ditOwner(k);
    // weights_source=disk: read from the expert's files now (the placeholder is meta)
    const dw = this.disk.get(EXPERT_NAMES[k as 0 | 1]);
    for (const [p, host] of this.expertHost[k]!) {
      const src = host.isMeta && dw ? await dw.readParam(p) : host;
      p.value = e.keep(src.toGpu(e, `${owner}.${p.fullKey}`));
    }
    this.activeExpert = k;
    await e.sync();
    return performance.now() - t0;
  }

  /**
   * Host memory holding weights, by component, each host buffer counted once (views of one block
   * image, or of one file, count as one): the inactive expert's copies are here. `dit` / `dit_2` are
   * the experts (their block images with the DiT streamed), `text_encoder` and `vae` their host copies.
   */
  hostWeightBytes(): Record<string, number> {
    const out: Record<string, number> = {};
    const seen = new Set<ArrayBufferLike>();
    const add = (name: string, t: Tensor | null | undefined) => {
      if (!t || t.device !== 'cpu' || !t.data) return;
      const buf = t.data.buffer;
      if (seen.has(buf)) return;
      seen.add(buf);
      out[name] = (out[name] ?? 0) + buf.byteLength;
    };
    this.experts.forEach((dit, k) => {
      for (const [, p] of dit.namedParams()) {
        add(WanPipeline.ditOwner(k), p.streamHost);
        add(WanPipeline.ditOwner(k), this.expertHost?.[k]?.get(p));
        add(WanPipeline.ditOwner(k), p.value);
      }
    });
    for (const [, p] of this.textEncoder.namedParams()) {
      add('text_encoder', p.streamHost);
      add('text_encoder', p.value);
    }
    for (const t of this.vaeHost?.values() ?? []) add('vae', t);
    return out;
  }

  /** Read the VAE's weights (converted to the weight dtype) onto the GPU, or with placement 'host' into host memory. */
  private async readVae(placement?: 'host'): Promise<void> {
    const wd = this.settings.load.weightDtype;
    await loadModuleFrom(this.vae, this.folder.vae, {
      engine: this.engine,
      owner: 'vae',
      weightDtype: wd,
      checkFinite: this.checkFinite,
      ...(placement ? { placement: () => placement } : {}),
      onProgress: (d, t) => this.emit({ type: 'load', component: 'vae', done: d, total: t }),
    });
  }

  /** level 3's VAE: weights converted once into host memory; loadVae() uploads them for a decode */
  private async loadVaeHost(): Promise<void> {
    await this.readVae('host');
    this.vaeHost = new Map(this.vae.namedParams().map(([k, p]) => [k, p.t]));
  }

  /** (once, by fromPretrained) mode 'gpu': resident; 'cpu': CPU device; 'gpu-stream': host weights, blocks streamed through the GPU */
  private async loadTextEncoder(mode: 'gpu' | 'cpu' | 'gpu-stream'): Promise<void> {
    const wd = this.settings.load.weightDtype;
    const how = textEncoderLoad(mode, wd, this.textEncoder);
    const te = this.textEncoder;
    await loadModuleFrom(te, this.folder.textEncoder, {
      engine: how.onGpu ? this.engine : null,
      owner: 'text_encoder',
      weightDtype: how.weightDtype,
      checkFinite: this.checkFinite,
      // weights_source=disk: the encoder's blocks are read per use (CPU device or the GPU stream)
      // (the relative-bias embeddings stay in host memory: tiny, and read before the blocks run)
      // (and the token table: a prompt reads its own rows)
      placement: onDisk(how.placement, this.fromDisk && mode !== 'gpu', (k) => te.isDiskKey(k)),
      onProgress: (d, t) => this.emit({ type: 'load', component: 'text_encoder', done: d, total: t }),
    });
    this.componentBytes.text_encoder = this.textEncoder.paramBytes();
    if (mode === 'gpu-stream') {
      // the blocks are packed into host images once (or read from disk per use); each encode borrows two GPU slots
      const disk = this.fromDisk ? await this.diskImages([[te, 'text_encoder']]) : undefined;
      this.teRing = new StreamedBlocks(this.engine, te.blocks.items, 'text_encoder.block.slot', { numSlots: 2, allocateNow: false, ownerOf: (i) => `text_encoder.encoder.block.${i}`, disk });
    } else if (mode === 'cpu' && this.fromDisk) {
      const dw = await DiskWeights.open(this.folder.textEncoder, 'text_encoder');
      this.disk.set('text_encoder', dw);
      this.teDisk = new DiskHostBlocks(te.blocks.items, dw);
    }
    if (this.fromDisk && mode !== 'gpu') {
      const dw = this.disk.get('text_encoder') ?? (await DiskWeights.open(this.folder.textEncoder, 'text_encoder'));
      this.disk.set('text_encoder', dw);
      te.tokenRows = (ids) => dw.readRows(te.shared, ids);
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
    const memo = this.embedMemo.get(text);
    if (memo) {
      // most recently used last
      this.embedMemo.delete(text);
      this.embedMemo.set(text, memo);
      return memo.slice();
    }
    const ctx = await this.encodeUncached(text);
    this.embedMemo.set(text, ctx);
    while (this.embedMemo.size > EMBED_MEMO_ENTRIES) this.embedMemo.delete(this.embedMemo.keys().next().value!);
    return ctx.slice();
  }

  /** encodePrompt without the in-memory memo: the on-disk prompt cache, else the text encoder */
  private async encodeUncached(text: string): Promise<Float32Array> {
    const textLen = this.settings.load.textLen;
    const d = this.textEncoder.dims.dModel;
    const cached = await this.promptCache?.get(text, textLen);
    if (cached && cached.dim === d) {
      this.checkContext(cached.context, text);
      return pad(cached.context, cached.length, textLen, d);
    }
    this.textEncoderRuns++;
    if (!this.tokenizer) throw new ShapeError(`[pipeline] the model folder ${this.folder.dir} has no tokenizer/ folder: prompts cannot be encoded (add tokenizer/tokenizer.json)`);
    const enc = encodePrompt(this.tokenizer, text, textLen);
    const kept = textLen - this.tokenizer.numSpecialTokens;
    if (enc.promptTokens > kept) {
      // as the official code does, the encoder reads the first text_len tokens: say so, never silently
      this.emit({ type: 'warning', message: `[tokenizer] the prompt is ${fmtCount(enc.promptTokens)} tokens; the text encoder reads the first ${fmtCount(kept)} (text_len ${textLen}) and ignores the other ${fmtCount(enc.promptTokens - kept)}: shorten the prompt` });
    }
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
      await this.engine.settleFrees();
    } else {
      try {
        out = await this.textEncoder.forward(mode === 'gpu' ? this.engine : null, ids, mask, undefined, this.teDisk ?? undefined);
      } finally {
        this.teDisk?.releaseAll();
      }
    }
    const all = (await out.toArray()) as Float32Array;
    if (out.device === 'gpu') out.dispose();
    const ctx = all.slice(0, enc.length * d);
    // before the cache keeps it: a bad context must not outlive the run
    this.checkContext(ctx, text);
    await this.promptCache?.put(text, textLen, ctx, enc.length, d);
    if (this.promptCache?.writeError && !this.warnedCache) {
      this.warnedCache = true;
      this.emit({ type: 'warning', message: this.promptCache.writeError });
    }
    return pad(ctx, enc.length, textLen, d);
  }

  /**
   * infer.check_finite (default true): weights scanned for NaN/±Inf at load, the text context, every
   * step's DiT output and latents and the decoded video checked at run time
   */
  private get checkFinite(): boolean {
    return (this.settings.load as { checkFinite?: boolean }).checkFinite ?? true;
  }

  /** What to try when a phase's numbers overflow, from this pipeline's precision settings. */
  private overflowAdvice(component: 'dit' | 'text_encoder' | 'vae'): string {
    const l = this.settings.load;
    const tips: string[] = [];
    if (component === 'dit' && l.activationDtype === 'f16') tips.push('infer.activation_dtype=f32');
    if (l.weightDtype === 'f16') tips.push('infer.weight_dtype=checkpoint');
    const what = component === 'dit' ? 'transformer' : component;
    tips.push(`check the ${what} weights (NaN/Inf in a file is refused at load; finite but huge values are not)`);
    return `try ${tips.join(', or ')}`;
  }

  /** [encode] the text encoder's output (host, after its readback: a scan of a few KB) */
  private checkContext(ctx: Float32Array, prompt: string): void {
    if (!this.checkFinite) return;
    const { count } = scanNonFinite(ctx, 'f32');
    if (count === 0) return;
    const shown = prompt.length > 40 ? `${prompt.slice(0, 40)}...` : prompt;
    throw nonFiniteError(
      `[encode] the text encoder's output (context) for the prompt ${JSON.stringify(shown)} has ${fmtCount(count)} non-finite values (NaN/Inf) of ${fmtCount(ctx.length)}; the text encoder's weights or settings overflow: ${this.overflowAdvice('text_encoder')}`,
      { phase: 'encode', where: 'text_encoder', count, total: ctx.length },
    );
  }

  // ------------------------------------------------------------------ sample

  /** a caller's prompt embeddings ([n, text_dim], n <= text_len), checked and zero-padded to text_len */
  private givenEmbeds(x: Float32Array, name: string): Float32Array {
    const d = this.textEncoder.dims.dModel;
    const textLen = this.settings.load.textLen;
    const n = x.length / d;
    if (!Number.isInteger(n) || n < 1 || n > textLen) {
      throw new ShapeError(`[pipeline] ${name} has ${x.length} values: it must be [n, ${d}] (the text encoder's output for n tokens) with 1 <= n <= text_len (${textLen})`);
    }
    this.checkContext(x, `(${name})`);
    return pad(x, n, textLen, d);
  }

  /** A request's effective settings: the pipeline's, with the request's fields (checked) on top. */
  resolveRequest(req: GenerateRequest): Settings {
    return requestSettings(this.settings, req);
  }

  /** Encode + denoise: returns the final latents (save them before decoding). */
  async sample(req: GenerateRequest, result: Partial<GenerateResult> = {}): Promise<Latents> {
    const settings = this.resolveRequest(req);
    const r = settings.request;
    const e = this.engine;
    const cb = req.onProgress;
    const check = () => {
      if (req.signal?.aborted) throw new InterruptedError('generation interrupted');
    };
    const timings = (result.timingsMs ??= {});
    const perPhase = (result.memory ??= { perPhase: {}, perStep: [], peakAllocated: 0, peakReserved: 0 }).perPhase;
    const H = r.height;
    const W = r.width;
    const T = r.numFrames;
    const [, ph, pw] = this.dit.dims.patchSize;
    const sfS = 8;
    const sfT = 4;
    if (H % (sfS * ph) || W % (sfS * pw)) throw new ConfigError(`height and width must be multiples of ${sfS * ph}, got ${H}x${W}`);
    if ((T - 1) % sfT) throw new ConfigError(`num_frames must be 4k+1, got ${T}`);
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
    const steps = r.numInferenceSteps;
    const sched = createScheduler(r.sampler, { steps, shift: r.shift });
    // the expert and guidance of each step (one-DiT models: the DiT and infer.guidance_scale throughout)
    const schedule: ExpertStep[] = expertSchedule(sched.timesteps, {
      experts: this.experts.length,
      boundaryRatio: r.boundaryRatio,
      numTrainTimesteps: this.folder.scheduler.config.num_train_timesteps,
      guidance: r.guidanceScale,
      guidance2: r.guidanceScale2,
    });
    const useCfg = schedule.some((st) => st.guidance !== 1);
    // step caching (infer.cache.*): a method per request; a missing calibration fails here, before any work
    const stepCache: StepCache | null = createStepCache(
      { mode: r.mode, threshold: r.threshold, warmupSteps: r.warmupSteps, maxSkips: r.maxSkips, useRetSteps: r.useRetSteps, retentionRatio: r.retentionRatio, extrapolation: r.extrapolation },
      { engine: e, dims: this.dit.dims, dir: this.folder.dir, twoExperts: this.experts.length > 1, steps, record: req.recordCacheSignals ? (typeof req.recordCacheSignals === 'object' ? req.recordCacheSignals : {}) : null },
    );
    // (it holds no GPU memory until its first step; the step loop's finally frees it)
    if (this.cp || this.cfgp) {
      const cpWhy =
        cpUnsupported({ cpSize: this.cp?.size ?? 1, cfgParallel: !!this.cfgp, ditStreamed: false, twoExperts: false, activationOffload: false, cacheMode: r.mode }) ??
        (req.recordCacheSignals ? 'recording cache signals (calibration) needs the whole residual stream on one device: run it with infer.diffusion.cp_size=1 and cfg_parallel=false' : null);
      if (cpWhy) {
        stepCache?.dispose();
        throw new ConfigError(cpWhy);
      }
    }
    const cond = req.promptEmbeds ? this.givenEmbeds(req.promptEmbeds, 'promptEmbeds') : await this.encodePrompt(r.prompt);
    const uncond = !useCfg ? null : req.negativePromptEmbeds ? this.givenEmbeds(req.negativePromptEmbeds, 'negativePromptEmbeds') : await this.encodePrompt(r.negativePrompt);
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
    const seed = r.seed;
    const rng = new Rng(seed);
    let latent: Float32Array;
    if (req.latents) {
      const want = [C, F, lh, lw];
      if (req.latents.shape.join(',') !== want.join(',') || req.latents.data.length !== C * F * lh * lw) {
        throw new ShapeError(`[pipeline] latents [${req.latents.shape.join(', ')}] do not fit this request: ${W}x${H}, ${T} frames needs [${want.join(', ')}] (channels, latent frames, height/8, width/8)`);
      }
      latent = Float32Array.from(req.latents.data);
    } else latent = rng.fillNormal(new Float32Array(C * F * lh * lw));
    const textLen = settings.load.textLen;
    const textDim = this.dit.dims.textDim;
    const B = useCfg ? 2 : 1;
    const ctxHost = new Float32Array(B * textLen * textDim);
    ctxHost.set(cond, 0);
    if (uncond) ctxHost.set(uncond, textLen * textDim);
    this.streamed?.resetStats();
    this.cp?.resetUploadStats();
    // the text context through the running expert's own text embedding (computed again after a switch)
    const embedFor = (k: number) => e.keep(e.scope(() => this.experts[k]!.embedText(e.fromHost(ctxHost, [B, textLen, textDim], 'f32'))));
    let expertNow = schedule[0]?.expert ?? 0;
    const experts: ExpertsReport | undefined = this.dit2
      ? { schedule: schedule.map((st) => ({ step: st.step + 1, timestep: st.timestep, expert: EXPERT_NAMES[st.expert], guidance: st.guidance })), swaps: [], boundaryRatio: r.boundaryRatio, resident: this.settings.load.expertsResident }
      : undefined;
    let swapMs = 0;
    const swapTo = async (k: number, step: number) => {
      const from = this.activeExpert;
      const ms = await this.useExpert(k);
      swapMs += ms;
      if (experts && ms > 0) experts.swaps.push({ step, from: EXPERT_NAMES[from as 0 | 1] ?? 'none', to: EXPERT_NAMES[k as 0 | 1], ms });
      return ms;
    };
    if (this.dit2) {
      // a request starts with the first step's expert (the previous request may have ended on the other)
      const ms = await swapTo(expertNow, 1);
      this.emit({ type: 'expert', step: 1, expert: EXPERT_NAMES[expertNow], guidance: schedule[0]?.guidance ?? r.guidanceScale, swapMs: ms }, cb);
    }
    let ctxEmb = embedFor(expertNow);
    // context parallelism: the embedded text on every device (once per request), the peaks from here
    const cpCtx = this.cp ? await this.cp.replicate(ctxEmb, 'dit.cp.ctx') : null;
    this.cp?.resetPeaks();
    // CFG parallelism: the uncond text row on the second device (without CFG, B = 1: one device runs)
    const cfgCtx = this.cfgp && B === 2 ? await this.cfgp.splitText(ctxEmb) : null;
    this.cfgp?.resetPeaks();
    const perStep = result.memory.perStep;
    // activation bounds (CFG passes in turn, FFN / attention chunks) for this many tokens
    const tokens = F * (lh / ph) * (lw / pw);
    const bounds = ditRunOptions(this.plan, this.dit.dims, tokens);
    const checkFinite = this.checkFinite;
    /** measured GPU time of one DiT block (blocks waited for one by one), for the sleep before each wait */
    let blockMs = 0;
    // step caching: the expert segments (Wan 2.2: the cache state starts again at the switch)
    const segments = 1 + schedule.filter((st, k) => k > 0 && st.expert !== schedule[k - 1]!.expert).length;
    const switchAt = schedule.findIndex((st) => st.expert !== schedule[0]!.expert);
    const firstSegSteps = switchAt < 0 ? steps : switchAt;
    let segment = 0;
    let segStart = 0;
    try {
      for (let i = 0; i < steps; i++) {
        check();
        e.allocator.resetPeakMemoryStats();
        const st = schedule[i]!;
        if (st.expert !== expertNow) {
          // the boundary: the other expert's weights in, its own text embedding of the context
          ctxEmb.dispose();
          const ms = await swapTo(st.expert, i + 1);
          expertNow = st.expert;
          ctxEmb = embedFor(expertNow);
          this.emit({ type: 'expert', step: i + 1, expert: EXPERT_NAMES[expertNow], guidance: st.guidance, swapMs: ms }, cb);
          // the cached residuals and accumulators belong to the other expert
          stepCache?.reset();
          segment++;
          segStart = i;
        }
        const dit = this.experts[expertNow]!;
        const residency: BlockResidency = this.streamed ? (this.dit2 ? this.streamed.group(expertNow) : this.streamed) : RESIDENT;
        const segEnd = schedule.findIndex((s2, k) => k > i && s2.expert !== expertNow);
        const info: StepInfo = { step: i, steps, segment, segStart, segSteps: (segEnd < 0 ? steps : segEnd) - segStart, firstSegSteps, segments, timestep: sched.timesteps[i]!, rows: B, latent };
        const plan = stepCache ? await stepCache.beginStep(info) : null;
        const bytes0 = this.streamed?.stats.bytes ?? 0;
        let pred: Float32Array;
        if (plan?.kind === 'skip') {
          // the whole prediction from the cache (EasyCache): no DiT work, nothing uploaded
          pred = plan.pred;
        } else {
          const x = new Float32Array(B * latent.length);
          for (let b = 0; b < B; b++) x.set(latent, b * latent.length);
          const xg = e.fromHost(x, [B, C, F, lh, lw], 'f32');
          // between blocks: Ctrl-C stops a long step, and a step slower than 2 s reports its blocks
          const tStep = performance.now();
          let tBlock = tStep;
          // blocks are only encoded unless we wait: on the FIRST step the forward waits for each block,
          // so even a huge request shows progress and Ctrl-C lands within a block; later steps run
          // unsynced (Ctrl-C between steps) at full speed. After the first block each wait first sleeps
          // for the measured block time: awaiting a GPU promise spins dawn.node's main thread
          // (device/wait.ts), which on lavapipe takes a core from the GPU (measured, tiny model 1024x1024:
          // a 2-block step 11.0-12.1 s unsynced, 19.5-21.8 s spinning per block, 11.8 s sleeping 5 s first)
          // (only from 4,096 tokens: below, a whole step is short and the waits would cost more than
          // they show; measured on the demo, 48 tokens: denoise 3.5 s with, 2.4 s without)
          const waitEach = i === 0 && tokens >= 4096;
          let tPrev = tStep;
          const onBlock = async (b: number, nb: number) => {
            check();
            if (waitEach) {
              e.flush();
              const ahead = 0.9 * blockMs - (performance.now() - tPrev);
              const slept = blockMs > 0 && ahead > 2;
              if (slept) await new Promise((r) => setTimeout(r, ahead));
              const tw = performance.now();
              await e.sync({ sleep: false });
              const t = performance.now();
              // done at once after the sleep: over-slept, the block is shorter than thought; else measured
              blockMs = slept && t - tw < 3 ? 0.7 * blockMs : t - tPrev;
              tPrev = t;
            }
            check();
            const now = performance.now();
            if (now - tStep > 2000 && now - tBlock > 1000) {
              tBlock = now;
              this.emit({ type: 'block', step: i + 1, total: steps, block: b + 1, blocks: nb, elapsedMs: now - tStep }, cb);
            }
          };
          let out: Tensor;
          try {
            out = this.cp
              ? await this.cp.forward(xg, sched.timesteps[i]!, cpCtx!, { ...bounds, attention: this.settings.load.cpAttention, onBlock, ...(plan?.hook ? { stepCache: cpStepHooks(plan, this.cp.ranks.map((x) => x.engine)) } : {}) })
              : cfgCtx
                ? await this.cfgp!.forward(xg, sched.timesteps[i]!, cfgCtx, { ffnChunkTokens: bounds.ffnChunkTokens, attnChunkTokens: bounds.attnChunkTokens, onBlock })
                : await dit.forward(xg, sched.timesteps[i]!, ctxEmb, { residency, activationOffload: this.plan.activationOffload, ...bounds, onBlock, ...(plan?.hook ? { stepCache: plan.hook } : {}) });
          } catch (err) {
            // an interrupted forward gives its streamed blocks' slots back (the next run allocates them again)
            if (err instanceof InterruptedError) {
              this.streamed?.releaseDevice();
              this.cp?.releaseStreams();
            }
            throw err;
          } finally {
            xg.dispose();
          }
          if (pipelineTestHooks.afterDitForward) out = pipelineTestHooks.afterDitForward(out, i + 1);
          // the non-finite count is encoded before the readback, so it runs in the same submit; its
          // 4 bytes are read right after the prediction (the GPU is done by then: no extra wait)
          const bad = checkFinite ? countNonFinite(out) : null;
          pred = (await out.toArray()) as Float32Array;
          out.dispose();
          if (bad) {
            const count = (await bad.toArray())[0]!;
            bad.dispose();
            if (count > 0) throw this.denoiseError('dit', count, pred.length, i, steps, latent, [C, F, lh, lw]);
          }
          await stepCache?.endStep(info, pred);
        }
        const stepLog = stepCache?.log[stepCache.log.length - 1];
        if (stepLog && this.streamed) stepLog.uploadBytes = this.streamed.stats.bytes - bytes0;
        const cached = stepLog ? !stepLog.ran.every(Boolean) : false;
        const n = latent.length;
        // (a step with guidance 1 takes the cond prediction as it is)
        const v = !useCfg ? pred : st.guidance === 1 ? pred.subarray(0, n) : cfgCombine(pred.subarray(n, 2 * n), pred.subarray(0, n), st.guidance);
        const next = sched.step(v, i, latent);
        // the update itself (finite prediction, huge values): a host scan of the new latents
        if (checkFinite) {
          const { count } = scanNonFinite(next, 'f32');
          if (count > 0) throw this.denoiseError('scheduler', count, next.length, i, steps, latent, [C, F, lh, lw]);
        }
        latent = next;
        const ms = e.allocator.stats();
        const expert = this.dit2 ? EXPERT_NAMES[expertNow] : undefined;
        perStep.push({ step: i + 1, peakAllocated: ms.peakAllocated, peakReserved: ms.peakReserved, ...(expert ? { expert } : {}) });
        const el = performance.now() - t0;
        this.emit({ type: 'step', step: i + 1, total: steps, elapsedMs: el, etaMs: (el / (i + 1)) * (steps - i - 1), allocated: ms.allocated, peakAllocated: ms.peakAllocated, ...(expert ? { expert } : {}), cached }, cb);
        this.emitMemory('denoise', cb, i + 1);
      }
      if (stepCache && stepCache.mode !== 'off') {
        result.cache = cacheRecord(stepCache, this.streamed ? savedUploads(stepCache.log, this.dit.dims.numLayers) : undefined);
        // also found from the request's timings object (a caller that passes on only some fields of the result: report.ts)
        cacheRecordOf.set(timings, result.cache);
      }
      if (req.recordCacheSignals && stepCache) result.cacheSignals = (stepCache as SignalRecorder).signals;
    } finally {
      ctxEmb.dispose();
      for (const t of cpCtx?.slice(1) ?? []) t.dispose();
      for (const t of cfgCtx ?? []) t.dispose();
      stepCache?.dispose();
    }
    timings.denoise = performance.now() - t0;
    if (experts) {
      timings.expert_swap = swapMs;
      result.experts = experts;
    }
    perPhase.denoise = {
      peakAllocated: Math.max(0, ...perStep.map((s) => s.peakAllocated)),
      peakReserved: Math.max(0, ...perStep.map((s) => s.peakReserved)),
      byComponent: this.byComponent(),
    };
    const devs = this.cp ?? this.cfgp;
    if (devs) {
      // rank 0: this engine's denoise peak (its peaks restart every step); the others: since the request's start
      const d0 = perPhase.denoise;
      result.memory.devices = devs.devicePeaks().map((d, k) => (k === 0 ? { ...d, peak_allocated_bytes: d0.peakAllocated, peak_reserved_bytes: d0.peakReserved } : d));
      // devices streaming their blocks: what each uploaded from the one host copy
      const up = this.cp?.uploadBytes() ?? [];
      result.memory.devices.forEach((d, k) => {
        if (this.cp?.ranks[k]?.ring) d.uploaded_bytes = up[k]!;
      });
    }
    if (this.streamed) result.uploads = { ...this.streamed.stats };
    result.seed = seed;
    result.settings = settings;
    return { data: latent, shape: [C, F, lh, lw] };
  }

  private denoiseError(where: 'dit' | 'scheduler', count: number, total: number, i: number, steps: number, latent: Float32Array, shape: Latents['shape']): PipelineNonFiniteError {
    const what = where === 'dit' ? 'the DiT output (the predicted flow, both CFG passes)' : 'the latents after the scheduler update';
    return nonFiniteError(
      `[denoise] step ${i + 1}/${steps}: ${what} has ${fmtCount(count)} non-finite values (NaN/Inf) of ${fmtCount(total)}; the model's weights or settings overflow: ` +
        `${this.overflowAdvice('dit')}. The last finite latents (after step ${i} of ${steps}) are kept with the error`,
      { phase: 'denoise', where, step: i + 1, totalSteps: steps, count, total, latents: { data: latent, shape }, latentsStep: i },
    );
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
    // level 3: the DiT slots are freed before the VAE weights come in; context parallelism with
    // streamed blocks (level 3, or each device's weight shard) frees every device's slots and
    // resident blocks for the decode (the next denoise uploads them again from the host copy)
    const cpStreams = !!this.cp?.ranks[0]?.ring;
    if (this.plan.vae === 'on-demand' || cpStreams) {
      this.streamed?.releaseDevice(); // host images stay; the next denoise allocates the slots again
      this.cp?.releaseStreams();
      e.allocator.emptyCache();
      await e.settleFrees(); // the slots' and ring's memory goes now, not under the VAE's
    }
    e.allocator.resetPeakMemoryStats();
    this.emit({ type: 'phase', phase: 'decode' }, cb);
    const t0 = performance.now();
    let res: { video: Float32Array; shape: [number, number, number, number] };
    // context parallelism: the tiles spread over the DiT's devices, each with a copy of the VAE head's weights (freed after)
    let tileDevs: TileDevice[] = [];
    try {
      await this.loadVae();
      if (this.plan.vaeTiling) {
        const split = decodeSplitFor(this.plan, this.vae, latents.shape[2], latents.shape[3]);
        if (this.cp && this.cp.size > 1) {
          tileDevs = await vaeHeadCopies(this.vae, this.cp.ranks.slice(1).map((x) => x.engine), split.stemStages);
          for (const d of tileDevs) d.engine.allocator.resetPeakMemoryStats();
        }
        const tiled = await decodeTiled(e, this.vae, latents.data, latents.shape, {
          checkFinite: this.checkFinite,
          tile: this.plan.tileSize,
          overlap: this.plan.tileOverlap,
          ...split,
          devices: tileDevs,
          onTile: (d, t) => {
            if (opts.signal?.aborted) throw new InterruptedError('[decode] interrupted: nothing was written');
            this.emit({ type: 'decode', done: d, total: t, unit: 'tile' }, cb);
          },
        });
        res = tiled;
        if (this.checkFinite && tiled.nonFinite > 0) throw this.decodeError(tiled.nonFinite, tiled.checked, latents, 'in the decoder output tiles (overlaps counted once per tile)');
      } else {
        const dec = await this.vae.decode(e, latents.data, latents.shape, {
          checkFinite: this.checkFinite,
          onChunk: (d, t) => {
            if (opts.signal?.aborted) throw new InterruptedError('[decode] interrupted: nothing was written');
            this.emit({ type: 'decode', done: d, total: t, unit: 'frame' }, cb);
          },
        });
        res = dec;
        // counted on the GPU before each chunk's readback (±Inf too: the returned video is clamped)
        if (this.checkFinite && (dec.nonFinite ?? 0) > 0) throw this.decodeError(dec.nonFinite!, dec.video.length, latents, 'in the decoded video');
      }
      await e.sync();
      perPhase.decode = this.phaseMemory();
      if (tileDevs.length > 0) {
        // each device's peak over the request: the denoise's (sample) and the decode's
        const mem = result.memory!;
        const dec = [
          { adapter: e.adapterName, peak_allocated_bytes: perPhase.decode.peakAllocated, peak_reserved_bytes: perPhase.decode.peakReserved },
          ...tileDevs.map((d) => ({ adapter: d.engine.adapterName, peak_allocated_bytes: d.engine.allocator.maxMemoryAllocated(), peak_reserved_bytes: d.engine.allocator.maxMemoryReserved() })),
        ];
        mem.devices = dec.map((d, k) => {
          const o = mem.devices?.[k];
          return o ? { ...o, peak_allocated_bytes: Math.max(o.peak_allocated_bytes, d.peak_allocated_bytes), peak_reserved_bytes: Math.max(o.peak_reserved_bytes, d.peak_reserved_bytes) } : d;
        });
      }
      this.emitMemory('decode', cb);
    } finally {
      for (const d of tileDevs) d.vae.disposeParams();
      // level 3: the VAE leaves the GPU after the decode, also a failed one (an OOM must not strand it there)
      if (this.plan.vae === 'on-demand') this.unloadVae();
    }
    timings.decode = performance.now() - t0;
    return res;
  }

  private decodeError(count: number, total: number, latents: Latents, where: string): PipelineNonFiniteError {
    return nonFiniteError(
      `[decode] the VAE decoder's output has ${fmtCount(count)} non-finite values (NaN/Inf) of ${fmtCount(total)} ${where}; the VAE's weights or settings overflow: ${this.overflowAdvice('vae')}. The latents are finite (kept with the error)`,
      { phase: 'decode', where: 'vae', count, total, latents },
    );
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
    if (this.cp) disposeContextParallel(this.cp);
    this.cp = null;
    if (this.cfgp) disposeContextParallel(this.cfgp);
    this.cfgp = null;
    this.teRing?.dispose();
    this.teRing = null;
    this.dit.disposeParams();
    this.dit2?.disposeParams();
    this.expertHost = null;
    for (const w of this.disk.values()) void w.close().catch(() => {});
    this.disk.clear();
    this.teDisk = null;
    this.textEncoder.disposeParams();
    this.textEncoder.disposeCaches();
    this.vae.disposeParams();
    this.vaeHost = null;
    // the engine's matmul workspace (packed operands on lavapipe) belongs to no model: give it back
    // with the pipeline, so a shared engine holds 0 bytes allocated afterwards (bench:soak)
    releaseMatmulWorkspace(this.engine);
    if (this.ownsEngine) this.engine.destroy();
  }
}

/**
 * Level 3: upload bytes the step cache saved: per skipped (or shortened) forward, what a full
 * forward uploads (the fewest bytes any full forward of the request uploaded: the first one also
 * brings the resident blocks) less what it did upload.
 */
function savedUploads(log: readonly { ran: boolean[]; blocks: number; uploadBytes?: number }[], blocks: number): number {
  const full = log.filter((l) => l.ran.every(Boolean) && l.blocks === blocks).map((l) => l.uploadBytes ?? 0);
  if (full.length === 0) return 0;
  const perForward = Math.min(...full);
  return log.filter((l) => !(l.ran.every(Boolean) && l.blocks === blocks)).reduce((s, l) => s + Math.max(0, perForward - (l.uploadBytes ?? 0)), 0);
}

/** A step's per-device hooks for a context-parallel forward (src/parallel/cp-cache.ts). */
function cpStepHooks(plan: { cpHooks?: (engines: Engine[]) => DitStepCache[] }, engines: Engine[]): DitStepCache[] {
  if (!plan.cpHooks) throw new ConfigError('this step cache method does not run with infer.diffusion.cp_size > 1; use infer.cache.mode=off, or cp_size=1');
  return plan.cpHooks(engines);
}

function fmtCount(n: number): string {
  return n.toLocaleString('en-US');
}

function pad(ctx: Float32Array, len: number, textLen: number, d: number): Float32Array {
  const out = new Float32Array(textLen * d);
  out.set(ctx.subarray(0, Math.min(len, textLen) * d));
  return out;
}

/**
 * infer.weights_source: 'auto' becomes 'disk' when the weights this placement keeps in host memory
 * between uses (level 3's DiT blocks, both of Wan 2.2's experts, level 2's text encoder) would take
 * more than 80 % of the RAM available now, else 'memory'. Sizes from the checkpoint headers (in
 * the weight dtype when it converts); nothing is read.
 */
export async function resolveWeightsSource(folder: ModelFolder, settings: Settings, avail = hostAvailableBytes()): Promise<{ source: 'memory' | 'disk'; note: string | null }> {
  const l = settings.load;
  if (l.weightsSource !== 'auto') return { source: l.weightsSource, note: null };
  const plan = memoryPlan(l);
  const bytesOf = async (c: { open(): Promise<import('../io/checkpoint.ts').Checkpoint> }, wd: string) => {
    const ck = await c.open();
    try {
      let n = 0;
      for (const k of ck.keys()) {
        const info = ck.info(k);
        const fileSize = info.dtype === 'F64' ? 8 : dtypeSize(engineDTypeOf(info.dtype));
        const size = wd === 'checkpoint' ? fileSize : dtypeSize(wd as DType);
        n += (info.byteLength / fileSize) * size;
      }
      return n;
    } finally {
      await ck.close();
    }
  };
  const experts = folder.transformer2 && l.expertsResident !== 'both' ? 2 : 0;
  let host = 0;
  if (plan.dit === 'stream' || experts) host += (await bytesOf(folder.transformer, l.weightDtype)) * Math.max(1, experts);
  if (plan.textEncoder !== 'gpu') host += await bytesOf(folder.textEncoder, plan.textEncoder === 'cpu' ? 'checkpoint' : l.weightDtype);
  if (host === 0) return { source: 'memory', note: null };
  if (host <= 0.8 * avail) return { source: 'memory', note: null };
  return { source: 'disk', note: `infer.weights_source=auto: disk (the weights kept off the GPU need ${fmtBytes(host)} of host memory, more than 80 % of the ${fmtBytes(avail)} available): they are read from their files per use` };
}
