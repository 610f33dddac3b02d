// The memory planner: what a run needs, predicted by running the run's own code on the meta device.
//
// `planRun` walks the pipeline's phases exactly as WanPipeline does (load, encode, denoise,
// decode; the same placement rules from memory-plan.ts, the same phase boundaries, the same model
// forwards, the same StreamedBlocks ring), but on an Engine over src/plan/meta-gpu.ts: the caching
// allocator then counts the allocated and reserved bytes a real run of the same code would, owner
// tag by owner tag (`dit.blocks.7.attn1.to_q.weight`, `dit.blocks.slot.0`, `activation.linear`,
// `vae.*`), without a GPU and without reading a weight. Shortcuts that keep it under a second at
// 14B 720p, each exact for the peaks (test/plan.test.ts checks them against the full walk):
//   - denoise runs 2 steps: every step allocates the same tensors (the second one sees the cache
//     the first one left, as every later step does);
//   - decode runs the first `decodeFrames` latent frames: the decoder works chunk by chunk with a
//     causal cache whose size is fixed after the first chunks, so later chunks repeat the peak;
//     host-side decode buffers (which grow with the frame count) are scaled to the full length.
// Host memory is counted from the same walk: weights placed on the host, the staging ring, the
// decode's host buffers, latents and the video (see hostBytes).

import { Engine } from '../runtime/engine.ts';
import { Tensor } from '../tensor/tensor.ts';
import type { DType } from '../tensor/dtype.ts';
import { targetDtype, type Module } from '../nn/module.ts';
import type { WeightDtype } from '../nn/load.ts';
import { RESIDENT, type BlockResidency } from '../nn/residency.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../models/wan_dit/model.ts';
import { UMT5EncoderModel, umt5DimsFromConfig } from '../models/umt5/model.ts';
import { WanVaeDecoder, vaeDimsFromConfig } from '../models/wan_vae/model.ts';
import { memoryPlan, ditPlacement, textEncoderLoad, enterPhase, ditRunOptions, decodeSplitFor, onDisk, type MemoryPlan } from '../pipeline/memory-plan.ts';
import { StreamedBlocks } from '../pipeline/residency.ts';
import { decodeTiled, tiledDecodeHostBytes, headParamKeys, STEM_STAGES, type TileDevice } from '../pipeline/tiled-vae.ts';
import type { Settings } from '../config/schema.ts';
import type { MemoryEvent } from '../memory/allocator.ts';
import { ConfigError } from '../util/errors.ts';
import { createMetaGpu, GENERIC_GPU, type MetaDeviceSpec } from './meta-gpu.ts';
import { ContextParallelDit, type CpRank } from '../parallel/cp-dit.ts';
import { cpBlockPlacement, cpRankRing } from '../parallel/pipeline-cp.ts';
import type { ModelShapes } from './shapes.ts';

/** elements one Float32Array may hold in Node 20 (2^32) */
const MAX_HOST_ARRAY = 2 ** 32;

export type PlanPhase = 'load' | 'encode' | 'denoise' | 'decode';
export const PLAN_PHASES: readonly PlanPhase[] = ['load', 'encode', 'denoise', 'decode'];

export interface PhasePlan {
  /** peak allocated GPU bytes in the phase (what live tensors hold, weights included) */
  peakBytes: number;
  /** peak reserved GPU bytes (buffers the caching allocator holds: what the device gives) */
  peakReservedBytes: number;
  /** live bytes by owner at the phase's allocated peak (owner tags grouped: see ownerGroup) */
  byOwner: Record<string, number>;
}

/** Registry work of a phase (flops and bytes of every op, plus host → GPU uploads): the cost model's input. */
export interface PhaseWork {
  flops: number;
  bytes: number;
  dispatchOps: number;
  uploadBytes: number;
  /** per op name: flops and bytes */
  byOp: Record<string, { flops: number; bytes: number; calls: number }>;
}

export interface RunPlan {
  model: string;
  size: { width: number; height: number; frames: number; tokens: number; latent: [number, number, number, number] };
  steps: number;
  cfg: boolean;
  placement: Placement;
  /** the run's peak allocated GPU bytes (max over phases) */
  peakBytes: number;
  /** the run's peak reserved GPU bytes: what a VRAM budget has to hold */
  peakReservedBytes: number;
  phases: Record<PlanPhase, PhasePlan>;
  /** host RAM the run holds at its peak (weights on the host, staging, video buffers), bytes */
  hostBytes: number;
  hostByPart: Record<string, number>;
  /** per phase; denoise is ONE step (one DiT forward for cond + uncond) */
  work: Record<PlanPhase, PhaseWork>;
  /** streamed DiT bytes uploaded per step */
  streamBytesPerStep: number;
  /** the most GPU dispatches queued at once (Engine.maxInFlight of the walk; lavapipe's limit, see preflight.ts) */
  maxInFlight: number;
  /** the op encoding at that moment */
  maxInFlightAt: string;
  /**
   * infer.diffusion.cp_size > 1: the context-parallel placement and one entry per device (rank 0
   * first; rank 0's peaks are its denoise phase's, the others' their peaks over the denoise, as the
   * run's memory.devices reports them), with each device's streamed bytes per step
   */
  /** decodeTiles: the tiled decode's tiles spread over the devices (then each `devices` entry is its denoise and decode peak; else its denoise peak) */
  cp?: { size: number; blocks: 'full copy' | 'shard' | 'streamed'; residentBlocks: number; decodeTiles: boolean };
  /** per device: its peak as a run reports it (see cp.decodeTiles), and its denoise peak alone */
  devices?: Array<{ adapter: string; peakBytes: number; peakReservedBytes: number; denoisePeakBytes: number; denoisePeakReservedBytes: number; streamBytesPerStep: number }>;
}

/** What the run places where (memory-plan.ts resolved, chunks resolved for this size). */
export interface Placement {
  level: 0 | 1 | 2 | 3;
  textEncoder: MemoryPlan['textEncoder'];
  dit: MemoryPlan['dit'];
  residentBlocks: number;
  numBlocks: number;
  vae: MemoryPlan['vae'];
  vaeTiling: boolean;
  tileSize: number;
  /** decoder stages run on whole frames before the tiles */
  stemStages: number;
  cfgSequential: boolean;
  ffnChunkTokens: number;
  attnChunkTokens: number;
  weightDtype: WeightDtype;
  activationDtype: 'f32' | 'f16';
}

export interface PlanOptions {
  /** the device class (default: a generic discrete GPU; bench:plan passes the real adapter's) */
  device?: MetaDeviceSpec;
  /** prompt token counts [cond, uncond] (default: text_len, the longest a prompt can be) */
  promptTokens?: [number, number];
  /** latent frames the decode walk runs (default 4; the rest repeat its peak) */
  decodeFrames?: number;
  /** denoise steps the walk runs (default 2) */
  denoiseSteps?: number;
  /**
   * the run's allocator limit (infer.vram_budget / memory_limit): the walk's allocator then gives
   * cached buffers back before crossing it, as the run's does, and throws OutOfMemoryError where the
   * run would
   */
  limitBytes?: number;
  /**
   * repeat a DiT block (or a decode tile of a region size already walked) that would allocate
   * exactly as a walked one instead of walking it (Engine.metaRepeat; default true). false walks
   * every block and tile: the same plan, slower (test/plan-repeat.test.ts compares them)
   */
  repeatBlocks?: boolean;
}

/** Owner tags grouped for reports: `dit.blocks.7.attn1.to_q.weight` → `dit.blocks`, `activation.linear` stays. */
export function ownerGroup(owner: string): string {
  const p = owner.split('.');
  // a slot takes the tag of the block it holds (`dit.blocks.7`), as a resident block's buffer has it
  if (p[0] === 'dit' && p[1] === 'blocks') return 'dit.blocks';
  if (p[0] === 'dit') return 'dit.other';
  if (p[0] === 'text_encoder') return p.includes('slot') ? 'text_encoder.slot' : 'text_encoder';
  if (p[0] === 'vae') return 'vae';
  if (p[0] === 'activation') return p.length > 1 ? `activation.${p[1]}` : 'activation.input';
  return p[0]!;
}

/** The phase peaks and the owners at each peak, from an allocator event history. */
function phasePeaks(events: readonly MemoryEvent[], resets: Map<PlanPhase, number>): Record<PlanPhase, PhasePlan> {
  const out = {} as Record<PlanPhase, PhasePlan>;
  const starts = PLAN_PHASES.map((p) => resets.get(p) ?? events.length);
  // pass 1: each phase's peaks and the event index of its allocated peak (-1: the phase's start)
  const peakAt: number[] = [];
  for (let k = 0; k < PLAN_PHASES.length; k++) {
    const a = starts[k]!;
    const b = k + 1 < starts.length ? Math.max(a, starts[k + 1]!) : events.length;
    const before = a > 0 ? events[a - 1] : undefined;
    let peak = before?.allocated ?? 0;
    let peakRes = before?.reserved ?? 0;
    let at = a - 1;
    for (let i = a; i < b; i++) {
      const ev = events[i]!;
      if (ev.reserved > peakRes) peakRes = ev.reserved;
      if (ev.allocated > peak) {
        peak = ev.allocated;
        at = i;
      }
    }
    out[PLAN_PHASES[k]!] = { peakBytes: peak, peakReservedBytes: peakRes, byOwner: {} };
    peakAt.push(at);
  }
  // pass 2: replay the live set to each peak and group it by owner
  const live = new Map<number, { bytes: number; owner: string }>();
  const want = PLAN_PHASES.map((p, k) => [p, peakAt[k]!] as const).sort((x, y) => x[1] - y[1]);
  let w = 0;
  const snapshot = () => {
    const by: Record<string, number> = {};
    for (const { bytes, owner } of live.values()) {
      const g = ownerGroup(owner);
      by[g] = (by[g] ?? 0) + bytes;
    }
    return by;
  };
  while (w < want.length && want[w]![1] < 0) out[want[w++]![0]].byOwner = snapshot();
  for (let i = 0; i < events.length && w < want.length; i++) {
    const ev = events[i]!;
    if (ev.action === 'alloc') live.set(ev.id, { bytes: ev.bytes, owner: ev.owner });
    else if (ev.action === 'free') live.delete(ev.id);
    while (w < want.length && want[w]![1] === i) out[want[w++]![0]].byOwner = snapshot();
  }
  return out;
}

/**
 * vaeHeadCopies on meta engines: a decoder per engine holding the head's weights (by shape, in the
 * order and dtypes vaeHeadCopies uploads them).
 */
function metaHeadCopies(vae: WanVaeDecoder, engines: Engine[], stemStages?: number): TileDevice[] {
  const keys = new Set(headParamKeys(vae, stemStages));
  const copies = engines.map((engine) => ({ engine, vae: new WanVaeDecoder(vae.dims) }));
  const byKey = copies.map((c) => new Map(c.vae.namedParams()));
  for (const [k, p] of vae.namedParams()) {
    if (!keys.has(k)) continue;
    copies.forEach((c, i) => {
      byKey[i]!.get(k)!.value = c.engine.keep(c.engine.empty(p.value!.shape, p.value!.dtype, `vae.${k}`));
    });
  }
  return copies;
}

/** Allocate a module's weights by shape on the meta engine (as loadModule does: same order, dtypes, owners). */
function placeModule(e: Engine, m: Module, owner: string, fileDtype: (key: string) => DType, wd: WeightDtype, placement: (key: string) => 'device' | 'host' | 'disk'): { deviceBytes: number; hostBytes: number } {
  let deviceBytes = 0;
  let hostBytes = 0;
  for (const [key, p] of m.namedParams()) {
    const dt = targetDtype(p, fileDtype(key), wd);
    const place = placement(key);
    if (place === 'device') {
      p.value = e.keep(e.empty(p.shape, dt, `${owner}.${key}`));
      deviceBytes += p.value.nbytes;
    } else {
      // 'disk' (infer.weights_source=disk): read per use, held nowhere between uses
      p.value = Tensor.meta(p.shape, dt);
      if (place === 'host') hostBytes += p.value.nbytes;
    }
  }
  return { deviceBytes, hostBytes };
}

function emptyWork(): PhaseWork {
  return { flops: 0, bytes: 0, dispatchOps: 0, uploadBytes: 0, byOp: {} };
}

/**
 * Predict a run of `settings.request` at `settings.load`'s placement for a model given by its shapes.
 * Needs no GPU and reads no weight (model shapes come from configs and file headers: shapes.ts).
 */
export async function planRun(model: ModelShapes, settings: Settings, opts: PlanOptions = {}): Promise<RunPlan> {
  return (await walkRun(model, settings, opts, false)) as RunPlan;
}

/**
 * The host bytes of the load phase alone (the weights each placement keeps off the GPU, by part:
 * `dit weights`, `text encoder weights`, `vae weights`), without walking the run: what
 * infer.weights_source=auto decides on (`npm run plan` first asks this, then walks once).
 */
export async function planLoadHost(model: ModelShapes, settings: Settings, opts: PlanOptions = {}): Promise<Record<string, number>> {
  return (await walkRun(model, settings, opts, true)) as Record<string, number>;
}

async function walkRun(model: ModelShapes, settings: Settings, opts: PlanOptions, loadOnly: boolean): Promise<RunPlan | Record<string, number>> {
  const r = settings.request;
  const l = settings.load;
  const plan = memoryPlan(l);
  const dit = new WanTransformer3DModel(ditDimsFromConfig(model.transformer));
  const te = new UMT5EncoderModel(umt5DimsFromConfig(model.textEncoder));
  const vae = new WanVaeDecoder(vaeDimsFromConfig(model.vae));
  dit.dims.activationDtype = l.activationDtype;
  // infer.attention=sage: the meta run walks the quantized op, so its per-head workspaces are
  // counted (owner 'attention.sage', grouped with the exact op's 'attention.scratch')
  dit.dims.attention = l.attention;
  vae.midAttn.kind = l.attention;
  const [, ph, pw] = dit.dims.patchSize;
  const H = r.height;
  const W = r.width;
  const T = r.numFrames;
  if (H % (8 * ph) || W % (8 * pw)) throw new ConfigError(`height and width must be multiples of ${8 * ph}, got ${H}x${W}`);
  if ((T - 1) % 4) throw new ConfigError(`num_frames must be 4k+1, got ${T}`);
  const C = dit.dims.inChannels;
  const F = (T - 1) / 4 + 1;
  const lh = H / 8;
  const lw = W / 8;
  const L = F * (lh / ph) * (lw / pw);
  const cfg = r.guidanceScale !== 1;
  const B = cfg ? 2 : 1;
  // the run holds the decoded video (and the CFG latents) in single host arrays
  const hostElems = Math.max(3 * T * H * W, B * C * F * lh * lw);
  if (hostElems > MAX_HOST_ARRAY) {
    throw new ConfigError(`${W}x${H}, ${T} frames needs host arrays of ${hostElems.toLocaleString('en-US')} values (the f32 video), above the ${MAX_HOST_ARRAY.toLocaleString('en-US')} one array can hold; lower the size or the frame count`);
  }
  const wd = l.weightDtype;
  const device = opts.device ?? GENERIC_GPU;
  if (plan.textEncoder === 'gpu' && l.activationDtype === 'f16' && !device.shaderF16) throw new ConfigError('infer.activation_dtype=f16 needs shader-f16, which this plan device does not have');
  const e = Engine.meta(createMetaGpu(device), opts.limitBytes ? { limitBytes: opts.limitBytes } : {});
  e.metaRepeats = opts.repeatBlocks ?? true;
  const a = e.allocator;
  const work: Record<PlanPhase, PhaseWork> = { load: emptyWork(), encode: emptyWork(), denoise: emptyWork(), decode: emptyWork() };
  let phase: PlanPhase = 'load';
  e.onOpWork = (op, flops, bytes) => {
    const w = work[phase];
    w.flops += flops;
    w.bytes += bytes;
    w.dispatchOps++;
    const o = (w.byOp[op] ??= { flops: 0, bytes: 0, calls: 0 });
    o.flops += flops;
    o.bytes += bytes;
    o.calls++;
  };
  a.startRecording(50_000_000);
  const resets = new Map<PlanPhase, number>();
  // work is counted per phase from the phase's start; peaks from where the pipeline resets them
  const mark = (p: PlanPhase) => {
    phase = p;
  };
  // the staging ring's peak over the whole run (each phase's reset starts the allocator's anew)
  let stagingPeak = 0;
  const resetPeaks = (p: PlanPhase) => {
    stagingPeak = Math.max(stagingPeak, a.stats().peakStagingBytes);
    a.resetPeakMemoryStats();
    resets.set(p, a.events().length);
  };
  const host: Record<string, number> = {};
  let streamBytesPerStep = 0;
  let events: MemoryEvent[] = [];
  let maxInFlight = 0;
  let maxInFlightAt = '';
  const forwardOpts = ditRunOptions(plan, dit.dims, L);
  // infer.diffusion.cp_size (cfg_parallel is not planned: each of its devices runs the one-device forward)
  const cpN = l.cfgParallel ? 1 : l.cpSize;
  const cpRanks: CpRank[] = [];
  let devices: RunPlan['devices'];
  let cpStaging = 0;
  let cpInfo: RunPlan['cp'];
  /** a tiled decode spread over the devices (context parallelism) */
  let spreadDecode = false;
  try {
    // ---- load (WanPipeline.load)
    mark('load');
    resets.set('load', 0);
    enterPhase(a, plan, 'load');
    const disk = l.weightsSource === 'disk';
    // context parallelism (src/parallel/pipeline-cp.ts): where each device keeps the blocks
    const cpPlace = cpBlockPlacement({ cpSize: cpN, level: plan.level, ditStreamed: plan.dit === 'stream', shard: l.cpShardWeights, residentBlocks: plan.residentBlocks, numBlocks: dit.blocks.length });
    const cpStream = cpN > 1 && cpPlace.stream;
    cpInfo = { size: cpN, blocks: cpStream ? (plan.dit === 'stream' ? 'streamed' : 'shard') : 'full copy', residentBlocks: cpPlace.resident, decodeTiles: false };
    const ditHost = placeModule(e, dit, 'dit', model.fileDtype.transformer, wd, onDisk(ditPlacement(cpStream ? { ...plan, dit: 'stream' } : plan, (k) => dit.isBlockKey(k)), disk, (k) => dit.isBlockKey(k)));
    let ring: StreamedBlocks | null = null;
    if (plan.dit === 'stream' && !cpStream) ring = new StreamedBlocks(e, dit.blocks.items, 'dit.blocks.slot', { meta: true, resident: plan.residentBlocks, ownerOf: (i) => `dit.blocks.${i}`, chunkedStaging: disk });
    host['dit weights'] = ditHost.hostBytes;
    if (cpN > 1) {
      // rank 0 is this engine (it also holds the text encoder and the VAE); ranks 1..N-1 are meta
      // devices of the same class holding their DiT's non-block weights and their blocks (a full
      // copy, or a ring streaming from the one host copy: nothing more on the host)
      let rank0: CpRank = { engine: e, dit };
      if (cpStream) {
        const r0 = cpRankRing(e, dit, 0, cpN, cpPlace.resident, { meta: true });
        ring = r0.ring;
        rank0 = { engine: e, dit, ring: r0.ring, residency: r0.residency };
      }
      cpRanks.push(rank0);
      for (let r = 1; r < cpN; r++) {
        const er = Engine.meta(createMetaGpu(device), opts.limitBytes ? { limitBytes: opts.limitBytes } : {});
        const d = new WanTransformer3DModel(ditDimsFromConfig(model.transformer));
        d.dims.activationDtype = l.activationDtype;
        d.dims.attention = l.attention;
        const rank: CpRank = { engine: er, dit: d };
        cpRanks.push(rank);
        placeModule(er, d, 'dit', model.fileDtype.transformer, wd, (k) => (cpStream && d.isBlockKey(k) ? 'disk' : 'device'));
        if (cpStream) {
          const rr = cpRankRing(er, d, r, cpN, cpPlace.resident, { meta: true });
          rank.ring = rr.ring;
          rank.residency = rr.residency;
        }
      }
    }
    if (model.experts > 1) {
      // Wan 2.2 (WanPipeline.loadExperts): one expert runs per step, so the ring and the activations
      // are shared. experts_resident=both (DiT resident): the other expert on the GPU as well.
      // Otherwise ('active') both experts wait in host memory whole (converted), the running one's
      // non-streamed weights are ALSO on the GPU, and a swap frees them before the other's come in:
      // the GPU side is one expert's, the host side two experts'.
      const other = new WanTransformer3DModel(ditDimsFromConfig(model.transformer));
      if (l.expertsResident === 'both' && plan.dit === 'resident') {
        placeModule(e, other, 'dit_2', model.fileDtype.transformer, wd, ditPlacement(plan, (k) => other.isBlockKey(k)));
      } else {
        const expertHost = placeModule(e, other, 'dit_2', model.fileDtype.transformer, wd, () => (disk ? 'disk' : 'host')).hostBytes;
        host['dit weights'] = 2 * expertHost;
      }
    }
    const teHow = textEncoderLoad(plan.textEncoder, wd, te);
    const teFile = model.fileDtype.textEncoder;
    const tePlaced = placeModule(e, te, 'text_encoder', teFile, teHow.weightDtype, onDisk(teHow.placement, disk && plan.textEncoder !== 'gpu', (k) => te.isDiskKey(k)));
    host['text encoder weights'] = tePlaced.hostBytes;
    let teRing: StreamedBlocks | null = null;
    if (plan.textEncoder === 'gpu-stream') teRing = new StreamedBlocks(e, te.blocks.items, 'text_encoder.block.slot', { numSlots: 2, allocateNow: false, meta: true, ownerOf: (i) => `text_encoder.encoder.block.${i}`, chunkedStaging: disk });
    // the encoder reads two host weights itself: its relative-bias embeddings (small; real zeros here)
    // and the token table, of which a prompt gathers its own rows (one zero row stands for it: the
    // gather's GPU output is what counts)
    for (const [key, p] of te.namedParams()) {
      if (!key.endsWith('relative_attention_bias.weight')) continue;
      p.value = Tensor.cpuZeros(p.shape, 'f32');
      // streamed blocks (gpu-stream) put their host copy back after each use
      if (p.streamHost) p.streamHost = p.value;
    }
    te.shared.value = Tensor.cpuZeros([1, te.dims.dModel], 'f32');
    const vaeOnGpu = plan.vae === 'resident';
    const vaePlaced = placeModule(e, vae, 'vae', model.fileDtype.vae, wd, () => (vaeOnGpu ? 'device' : 'host'));
    host['vae weights'] = vaePlaced.hostBytes;
    if (loadOnly) return { ...host };

    // ---- encode (WanPipeline.encodePrompt, a prompt-cache miss)
    mark('encode');
    enterPhase(a, plan, 'encode');
    resetPeaks(phase);
    const tokens = opts.promptTokens ?? [l.textLen, l.textLen];
    if (plan.textEncoder !== 'cpu') {
      for (const n of cfg ? tokens : tokens.slice(0, 1)) {
        const len = Math.max(1, Math.min(n, l.textLen));
        const ids = Tensor.cpu(new Int32Array(len), [1, len], 'i32');
        const mask = Tensor.cpu(new Int32Array(len).fill(1), [1, len], 'i32');
        if (teRing) {
          try {
            const out = await te.forward(e, ids, mask, undefined, teRing);
            await e.sync();
            out.dispose();
          } finally {
            teRing.releaseDevice();
          }
        } else {
          const out = await te.forward(e, ids, mask);
          out.dispose();
        }
      }
    }

    // ---- denoise (WanPipeline.sample)
    mark('denoise');
    enterPhase(a, plan, 'denoise');
    resetPeaks(phase);
    const textLen = l.textLen;
    const ctxEmb = e.keep(e.scope(() => dit.embedText(e.fromHost(new Float32Array(B * textLen * dit.dims.textDim), [B, textLen, dit.dims.textDim], 'f32'))));
    const residency: BlockResidency = ring ?? RESIDENT;
    const steps = Math.min(r.numInferenceSteps, opts.denoiseSteps ?? 2);
    // context parallelism: the embedded text on every device, then each device's peaks from here (as the run)
    const cp = cpRanks.length > 1 ? new ContextParallelDit(cpRanks) : null;
    const cpCtx = cp ? await cp.replicate(ctxEmb, 'dit.cp.ctx') : null;
    cp?.resetPeaks();
    const rankStream = cpRanks.map(() => 0);
    // step caching in the DiT's hidden space (src/pipeline/cache/hidden.ts: TeaCache, MagCache,
    // flex) keeps the blocks' residual [B, L, D] f32 between steps (flex: the last two), and during
    // a computed step a copy of the stream before the blocks; EasyCache caches on the host
    const cacheDepth = r.mode === 'flex' ? 2 : r.mode === 'teacache' || r.mode === 'magcache' ? 1 : 0;
    const streamShape = [B, L, dit.dims.numHeads * dit.dims.headDim];
    const cacheKept = Array.from({ length: cacheDepth }, () => e.keep(e.empty(streamShape, 'f32', 'cache.residual')));
    try {
      for (let i = 0; i < steps; i++) {
        if (i === 1) {
          // the second step's work is not counted again: `work.denoise` is one step
          e.onOpWork = null;
          ring?.resetStats();
          cp?.resetUploadStats();
        }
        const xg = e.fromHost(new Float32Array(B * C * F * lh * lw), [B, C, F, lh, lw], 'f32');
        const cacheInput = cacheDepth ? e.keep(e.empty(streamShape, 'f32', 'cache.input')) : null;
        const out = cp ? await cp.forward(xg, 999, cpCtx!, { ...forwardOpts, attention: l.cpAttention }) : await dit.forward(xg, 999, ctxEmb, { residency, activationOffload: plan.activationOffload, ...forwardOpts });
        cacheInput?.dispose();
        xg.dispose();
        // (the run reads the prediction back here: no allocation, nothing to read on the meta device)
        out.dispose();
        // a step's streamed bytes: the second step's (the first one also uploads the resident blocks)
        if (ring && (i === 1 || steps === 1)) streamBytesPerStep = i === 1 ? ring.stats.bytes : ring.stats.bytes - residentImageBytes(ring);
        if (i === 1 || steps === 1) cpRanks.forEach((rk, k) => (rankStream[k] = rk.ring ? (i === 1 ? rk.ring.stats.bytes : rk.ring.stats.bytes - residentImageBytes(rk.ring)) : 0));
      }
      if (cp) {
        // the other devices' staging rings are host memory too
        cpStaging = cpRanks.slice(1).reduce((x, rk) => x + rk.engine.allocator.stats().peakStagingBytes, 0);
        devices = cpRanks.map((rk, k) => {
          const peakBytes = rk.engine.allocator.maxMemoryAllocated();
          const peakReservedBytes = rk.engine.allocator.maxMemoryReserved();
          return { adapter: rk.engine.adapterName, peakBytes, peakReservedBytes, denoisePeakBytes: peakBytes, denoisePeakReservedBytes: peakReservedBytes, streamBytesPerStep: rankStream[k]! };
        });
      }
    } finally {
      for (const t of cpCtx?.slice(1) ?? []) t.dispose();
      ctxEmb.dispose();
      for (const t of cacheKept) t.dispose();
    }
    work.denoise.uploadBytes = streamBytesPerStep;

    // ---- decode (WanPipeline.decode)
    mark('decode');
    phase = 'decode';
    e.onOpWork = (op, flops, bytes) => {
      const w = work.decode;
      w.flops += flops * decodeScale;
      w.bytes += bytes * decodeScale;
      w.dispatchOps++;
      const o = (w.byOp[op] ??= { flops: 0, bytes: 0, calls: 0 });
      o.flops += flops * decodeScale;
      o.bytes += bytes * decodeScale;
      o.calls++;
    };
    enterPhase(a, plan, 'decode');
    // (context parallelism with streamed blocks frees them for the decode too: WanPipeline.decode)
    if (plan.vae === 'on-demand' || cpStream) {
      ring?.releaseDevice();
      a.emptyCache();
    }
    resetPeaks(phase);
    if (!vaeOnGpu) for (const [k, p] of vae.namedParams()) p.value = e.keep(e.empty(p.value!.shape, p.value!.dtype, `vae.${k}`));
    const Fd = Math.min(F, Math.max(1, opts.decodeFrames ?? 4));
    const decodeScale = F / Fd;
    const z = new Float32Array(C * Fd * lh * lw);
    let decodeHost: number;
    if (plan.vaeTiling) {
      const split = decodeSplitFor(plan, vae, lh, lw);
      // context parallelism: the tiles spread over the devices, each further one with a copy of the
      // head's weights (WanPipeline.decode: its streamed blocks given back first)
      let tileDevs: TileDevice[] = [];
      if (cp) {
        spreadDecode = true;
        if (cpInfo) cpInfo.decodeTiles = true;
        if (cpStream) for (const rk of cpRanks.slice(1)) rk.ring?.releaseDevice();
        tileDevs = metaHeadCopies(vae, cpRanks.slice(1).map((rk) => rk.engine), split.stemStages);
        for (const d of tileDevs) d.engine.allocator.resetPeakMemoryStats();
      }
      const res = await decodeTiled(e, vae, z, [C, Fd, lh, lw], { tile: plan.tileSize, overlap: plan.tileOverlap, ...split, devices: tileDevs });
      // each further device's entry: the larger of its denoise and decode peaks (as a run reports it)
      if (devices)
        tileDevs.forEach((d, k) => {
          const o = devices![k + 1]!;
          devices![k + 1] = { ...o, peakBytes: Math.max(o.peakBytes, d.engine.allocator.maxMemoryAllocated()), peakReservedBytes: Math.max(o.peakReservedBytes, d.engine.allocator.maxMemoryReserved()) };
        });
      // the stems of the chunks not walked are the size of the last one walked (one latent frame each)
      const stems = [...res.stemBytes];
      while (stems.length < F) stems.push(stems[stems.length - 1]!);
      decodeHost = tiledDecodeHostBytes(stems, T, res.shape[2], res.shape[3]);
    } else {
      const res = await vae.decode(e, z, [C, Fd, lh, lw]);
      // the decoded chunks, their concatenation and the clamped video: three f32 copies of the frames
      decodeHost = 3 * 4 * 3 * T * res.shape[2] * res.shape[3];
    }
    await e.sync();
    host['decode buffers'] = decodeHost;
    // latents, the CFG input and the prediction (f32), and the 8-bit frames written to the video file
    host['latents'] = 3 * B * C * F * lh * lw * 4;
    host['video frames (8-bit)'] = 3 * T * H * W;
    host['staging ring'] = Math.max(stagingPeak, a.stats().peakStagingBytes) + cpStaging;
  } finally {
    events = a.stopRecording();
    maxInFlight = e.maxInFlight;
    maxInFlightAt = e.maxInFlightAt;
    e.destroy();
    for (const rk of cpRanks.slice(1)) rk.engine.destroy();
  }
  const phases = phasePeaks(events, resets);
  // rank 0's entry: its denoise phase (the run reports perPhase.denoise for it), and with the tiles
  // spread over the devices the larger of that and its decode (as every device's entry then)
  if (devices) {
    const d0 = spreadDecode ? { peakBytes: Math.max(phases.denoise.peakBytes, phases.decode.peakBytes), peakReservedBytes: Math.max(phases.denoise.peakReservedBytes, phases.decode.peakReservedBytes) } : { peakBytes: phases.denoise.peakBytes, peakReservedBytes: phases.denoise.peakReservedBytes };
    devices[0] = { ...devices[0]!, ...d0, denoisePeakBytes: phases.denoise.peakBytes, denoisePeakReservedBytes: phases.denoise.peakReservedBytes };
  }
  const peakBytes = Math.max(...PLAN_PHASES.map((p) => phases[p].peakBytes));
  const peakReservedBytes = Math.max(...PLAN_PHASES.map((p) => phases[p].peakReservedBytes));
  const hostBytes = Object.values(host).reduce((x, y) => x + y, 0);
  return {
    model: model.name,
    size: { width: W, height: H, frames: T, tokens: L, latent: [C, F, lh, lw] },
    steps: r.numInferenceSteps,
    cfg,
    placement: {
      level: plan.level,
      textEncoder: plan.textEncoder,
      dit: plan.dit,
      residentBlocks: plan.dit === 'stream' ? Math.min(plan.residentBlocks, dit.blocks.length) : dit.blocks.length,
      numBlocks: dit.blocks.length,
      vae: plan.vae,
      vaeTiling: plan.vaeTiling,
      tileSize: plan.tileSize,
      stemStages: decodeSplitFor(plan, vae, lh, lw).stemStages ?? STEM_STAGES,
      ...forwardOpts,
      weightDtype: wd,
      activationDtype: l.activationDtype,
    },
    peakBytes,
    peakReservedBytes,
    phases,
    hostBytes,
    hostByPart: host,
    work,
    streamBytesPerStep,
    maxInFlight,
    maxInFlightAt,
    ...(devices ? { cp: cpInfo, devices } : {}),
  };
}

/** One line: where everything goes (the pipeline's plan event, the CLI, the sidecar). */
export function placementSummary(plan: RunPlan): string {
  const p = plan.placement;
  const parts = [`level ${p.level}`];
  parts.push(p.dit === 'stream' ? `DiT streamed (${p.residentBlocks} of ${p.numBlocks} blocks resident)` : 'DiT resident');
  parts.push(p.textEncoder === 'gpu' ? 'text encoder on the GPU' : p.textEncoder === 'cpu' ? 'text encoder on the CPU device' : 'text encoder streamed through the GPU');
  parts.push(`VAE ${p.vae === 'resident' ? 'resident' : 'on the GPU for the decode only'}, ${p.vaeTiling ? `tiled (${p.tileSize ? `tiles of ${p.tileSize}` : 'auto tiles'}, ${p.stemStages} whole-frame stages)` : 'whole frames'}`);
  if (p.cfgSequential) parts.push('CFG passes one after the other per block');
  if (p.ffnChunkTokens) parts.push(`FFN in chunks of ${p.ffnChunkTokens} tokens`);
  if (p.attnChunkTokens) parts.push(`attention in query chunks of ${p.attnChunkTokens}`);
  if (plan.cp) parts.push(`context parallel over ${plan.cp.size} devices (blocks: ${plan.cp.blocks}${plan.cp.blocks === 'full copy' ? '' : `, ${plan.cp.residentBlocks} of ${p.numBlocks} resident per device`})`);
  parts.push(`weights ${p.weightDtype}, activations ${p.activationDtype}`);
  return parts.join('; ');
}

/** Bytes of the resident blocks' images in a ring (uploaded once, at its allocation). */
function residentImageBytes(ring: StreamedBlocks): number {
  let n = 0;
  for (let i = 0; i < ring.resident; i++) n += ring.blockBytes(i);
  return n;
}
