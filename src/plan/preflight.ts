// Preflight: before anything is loaded, the memory model (planRun, src/plan/plan.ts) walks the run
// on a device that holds no memory, with this adapter's limits, and the result is checked against
// what this machine has:
//   - every tensor within the device's largest buffer (maxBufferSize: the allocator refuses it in
//     the walk as it would in the run);
//   - host RAM: the run's host arrays (plus, on a software adapter, whose "GPU memory" is host RAM,
//     its peak reserved GPU bytes) within MemAvailable;
//   - on lavapipe: the dispatches queued at once within the process's memory-mapping headroom.
//     lavapipe backs every descriptor set with its own memfd mapping until the GPU has finished the
//     work that uses it, so a run that queues more dispatches than vm.max_map_count allows dies with
//     SIGSEGV inside Dawn (measured: demo model, 2048x2048, 81 frames, 75,397 dispatches in flight,
//     22,000 memfd mappings 25 s in; crash in DescriptorSetAllocator::AllocateDescriptorPool). When
//     the chunk knobs are on auto, preflight first tries chunked attention and FFN (the DiT waits for
//     the GPU between chunks, see Engine.throttle), then refuses.
// A refusal is one line with the bytes needed, the bytes there are, and a size that would fit.
// Where the full walk is slow (probeFirst: many tokens times DiT blocks) a probe goes first: the
// run walked with ONE DiT block (src/plan/bound.ts), a lower bound of the full walk's needs that
// refuses without it; a run the probe cannot rule out is walked in full, which decides.

import { readFileSync } from 'node:fs';
import { freemem } from 'node:os';
import type { Settings } from '../config/schema.ts';
import type { Engine } from '../runtime/engine.ts';
import type { ModelFolder } from '../io/model-folder.ts';
import { SmartDiffusionError, OutOfMemoryError, ShapeError, fmtBytes } from '../util/errors.ts';
import { planRun, type PlanOptions, type RunPlan } from './plan.ts';
import { tryBound, isUnplaceable, type RunBound, type Unplaceable } from './bound.ts';
import { shapesOfFolder, type ModelShapes } from './shapes.ts';
import { specFromCaps } from './meta-gpu.ts';
import { mapHeadroom } from '../device/maps.ts';

export { mapHeadroom };

/** A run this machine cannot hold, refused before any GPU work (exit 4, as an out-of-memory). */
export class TooBigError extends SmartDiffusionError {
  constructor(message: string) {
    super('OUT_OF_MEMORY', message);
  }
}

/** Node, V8 and Dawn themselves, beside the run's own arrays (measured RSS of an idle engine: ~250-350 MiB). */
export const RUNTIME_HOST_BYTES = 512 * 2 ** 20;
/** mappings kept free besides the run's dispatches (weights, caches, V8's heap pages) */
const MAP_MARGIN = 4096;
/** chunk sizes tried (tokens) when the dispatches in flight exceed the headroom and the knobs are auto */
const CHUNK_TRIES = [16384, 4096];

export interface MachineLimits {
  /** bytes of host RAM a new allocation can get (Linux: MemAvailable) */
  hostAvailable: number;
  /** how many more memory mappings this process may create (Linux: vm.max_map_count − mappings now); Infinity where unknown */
  mapHeadroom: number;
}

/** MemAvailable (Linux) or os.freemem(). */
export function hostAvailableBytes(): number {
  try {
    const m = /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'));
    if (m) return Number(m[1]) * 1024;
  } catch {
    /* not Linux */
  }
  return freemem();
}

export function machineLimits(): MachineLimits {
  return { hostAvailable: hostAvailableBytes(), mapHeadroom: mapHeadroom() };
}

export interface PreflightResult {
  plan: RunPlan;
  /** the settings to run (chunk knobs set when preflight had to bound the dispatches in flight) */
  settings: Settings;
  /** what preflight changed, one line each */
  notes: string[];
  ms: number;
}

interface Need {
  hostBytes: number;
  what: string;
}

function hostNeed(plan: RunPlan, software: boolean): Need {
  // (context parallelism: every device's GPU memory, rank 0's run peak and each further device's)
  const others = (plan.devices ?? []).slice(1).reduce((a, d) => a + d.peakReservedBytes, 0);
  const gpu = software ? plan.peakReservedBytes + others : 0;
  const hostBytes = plan.hostBytes + gpu + RUNTIME_HOST_BYTES;
  const devs = plan.devices && plan.devices.length > 1 ? ` over ${plan.devices.length} devices` : '';
  const what = software
    ? `${fmtBytes(plan.hostBytes)} of host arrays + ${fmtBytes(gpu)} of GPU memory${devs} (a software adapter's GPU memory is host RAM) + ${fmtBytes(RUNTIME_HOST_BYTES)} for the runtime`
    : `${fmtBytes(plan.hostBytes)} of host arrays + ${fmtBytes(RUNTIME_HOST_BYTES)} for the runtime`;
  return { hostBytes, what };
}

const withSize = (s: Settings, width: number, height: number): Settings => ({ ...s, request: { ...s.request, width, height } });

/** Would the run fit this machine? (null: yes; else why not, one clause) */
function misfit(plan: RunPlan, software: boolean, m: MachineLimits): string | null {
  const need = hostNeed(plan, software);
  if (need.hostBytes > m.hostAvailable) return `needs ${fmtBytes(need.hostBytes)} of RAM (${need.what}) and ${fmtBytes(m.hostAvailable)} is available`;
  if (software && plan.maxInFlight > m.mapHeadroom - MAP_MARGIN) return `queues ${plan.maxInFlight.toLocaleString('en-US')} GPU dispatches at once and lavapipe can map ${Math.max(0, m.mapHeadroom - MAP_MARGIN).toLocaleString('en-US')} (one memory mapping each; vm.max_map_count)`;
  return null;
}


async function tryPlan(model: ModelShapes, s: Settings, opts: PlanOptions): Promise<RunPlan | Unplaceable> {
  try {
    return await planRun(model, s, opts);
  } catch (e) {
    if (e instanceof OutOfMemoryError || e instanceof ShapeError) return e;
    throw e;
  }
}
const isPlan = (p: RunPlan | Unplaceable): p is RunPlan => !isUnplaceable(p);

/**
 * Check a run against this machine before loading anything; returns the plan and the settings to
 * run with, or throws TooBigError naming what it needs, what there is, and a size that fits.
 */
export async function preflight(
  folder: ModelFolder | ModelShapes,
  settings: Settings,
  engine: Engine,
  limits: MachineLimits = machineLimits(),
  /** a plan of exactly these settings already made (the VRAM budget's choice): not walked again */
  known?: RunPlan,
): Promise<PreflightResult> {
  const t0 = performance.now();
  const model = 'index' in folder ? await shapesOfFolder(folder) : folder;
  const software = engine.caps.adapterClass !== 'gpu';
  const opts: PlanOptions = { device: specFromCaps(engine.caps, engine.limits), denoiseSteps: 1 };
  const r = settings.request;
  const notes: string[] = [];
  let s = settings;
  // a bound no walk is needed for: the decoded video in f32 and in 8 bits (both are held at the write)
  const videoBytes = videoHostBytes(r);
  if (videoBytes + RUNTIME_HOST_BYTES > limits.hostAvailable) {
    const f = Math.sqrt((limits.hostAvailable - RUNTIME_HOST_BYTES) / videoBytes) * 0.9;
    const w = Math.max(16, Math.floor((r.width * f) / 16) * 16);
    const h = Math.max(16, Math.floor((r.height * f) / 16) * 16);
    throw new TooBigError(
      `[preflight] ${r.width}x${r.height}, ${r.numFrames} frames of ${model.name}: the decoded video alone needs ${fmtBytes(videoBytes)} of RAM (f32 and 8-bit frames) and ${fmtBytes(limits.hostAvailable)} is available; ` +
        `at most ~${w}x${h} at ${r.numFrames} frames could fit, or fewer frames (npm run plan -- --size WxH --frames N shows any size's needs)`,
    );
  }
  const tooLarge = (e: Unplaceable) =>
    e instanceof OutOfMemoryError
      ? `needs one ${fmtBytes(e.info.requestedBytes)} buffer ('${e.info.owner}', phase ${e.info.phase}) and the device's largest is ${fmtBytes(engine.limits.maxBufferSize)} (maxBufferSize)`
      : `cannot be laid out on this device (${e.message.replace(/\.$/, '')})`;
  const refuse = (why: string, firstGuess: number) => refusal(model, s, engine, limits, opts, software, why, firstGuess);
  // the probe (bound.ts: the run walked with one DiT block): a lower bound that refuses without the
  // full walk, whose cost grows with the dispatches (seconds to minutes at sizes that cannot fit)
  if (!known && probeFirst(model, s, limits)) {
    const b = await tryBound(model, s, opts);
    if (isUnplaceable(b)) return refuse(tooLarge(b), unplaceableRatio(b, engine));
    const need = boundNeed(b, software);
    if (need.lower > limits.hostAvailable) return refuse(`needs ${fmtBytes(need.estimate)} of RAM (${need.what}) and ${fmtBytes(limits.hostAvailable)} is available`, estimateRatio(b, software, limits));
  }
  let plan = known ?? (await tryPlan(model, s, opts));
  let why = isPlan(plan) ? misfit(plan, software, limits) : tooLarge(plan);
  // too many dispatches in flight: chunked attention / FFN wait for the GPU between chunks
  if (isPlan(plan) && why && /dispatches/.test(why) && s.load.attnChunkTokens === 0 && s.load.ffnChunkTokens === 0) {
    for (const c of CHUNK_TRIES) {
      if (c >= plan.size.tokens) continue;
      const sc = { ...s, load: { ...s.load, attnChunkTokens: c, ffnChunkTokens: c } };
      const pc = await tryPlan(model, sc, opts);
      if (!isPlan(pc)) continue;
      const w = misfit(pc, software, limits);
      plan = pc;
      s = sc;
      why = w;
      notes.push(`attention and FFN in chunks of ${c} tokens (infer.attn_chunk_tokens, infer.ffn_chunk_tokens): ${pc.maxInFlight.toLocaleString('en-US')} dispatches in flight at most`);
      if (!w) break;
    }
  }
  if (!why && isPlan(plan)) return { plan, settings: s, notes, ms: performance.now() - t0 };
  if (isPlan(plan)) return refuse(why ?? 'does not fit', estimateRatioOfPlan(plan, software, limits));
  return refuse(why ?? 'does not fit', unplaceableRatio(plan, engine));
}

function estimateRatioOfPlan(plan: RunPlan, software: boolean, m: MachineLimits): number {
  const room = Math.max(0, m.hostAvailable - RUNTIME_HOST_BYTES) / Math.max(1, hostNeed(plan, software).hostBytes - RUNTIME_HOST_BYTES);
  const maps = software ? Math.max(0, m.mapHeadroom - MAP_MARGIN) / Math.max(1, plan.maxInFlight) : Infinity;
  return Math.min(0.95, Math.sqrt(Math.min(room, maps)) * 0.97);
}

/** the refusal's second half: a size at the same aspect ratio that fits (probed, or walked in full), then the one-line error */
async function refusal(
  model: ModelShapes,
  s: Settings,
  engine: Engine,
  limits: MachineLimits,
  opts: PlanOptions,
  software: boolean,
  why: string,
  firstGuess: number,
): Promise<never> {
  const r = s.request;
  // a smaller size at the same aspect ratio. Where the full walk is cheap (!probeFirst) it decides;
  // elsewhere each guess is probed (one DiT block, see bound.ts) and the next one rescaled from what
  // the probe needs (memory ~ pixels; attention grows faster, so the ratio is applied again until a
  // probe fits). A probe of a resident DiT counts every allocation of the full walk (its allocated
  // peak is the walk's, its reserved peak within 5 %: test/bound.test.ts; 0.05 % at 2048x2048 x 81), so a
  // probe that fits with a 5 % margin on the memory and 10 % on the dispatches in flight is the
  // answer; a streamed DiT's probe (its resident blocks not counted) is walked in full.
  let fit: { width: number; height: number } | null = null;
  let smallest = `${r.width}x${r.height}`;
  let f = Math.min(0.95, firstGuess);
  let walks = 0;
  for (let i = 0; i < 10 && !fit && walks < 3; i++) {
    const w = Math.floor((r.width * f) / 16) * 16;
    const h = Math.floor((r.height * f) / 16) * 16;
    if (w < 16 || h < 16) break;
    smallest = `${w}x${h}`;
    const sw = withSize(s, w, h);
    if (probeFirst(model, sw)) {
      const b = await tryBound(model, sw, opts);
      const shrink = isUnplaceable(b) ? unplaceableRatio(b, engine) : estimateRatio(b, software, limits, true);
      if (shrink < 1) {
        f *= Math.min(0.9, shrink);
        continue;
      }
      if (!isUnplaceable(b) && b.probe.placement.dit === 'resident') {
        fit = { width: w, height: h };
        break;
      }
    }
    walks++;
    const p = await tryPlan(model, sw, opts);
    if (isPlan(p) && !misfit(p, software, limits)) fit = { width: w, height: h };
    else f *= Math.min(0.9, isPlan(p) ? estimateRatioOfPlan(p, software, limits) : unplaceableRatio(p, engine));
  }
  const hint = [
    fit ? `${fit.width}x${fit.height} at ${r.numFrames} frames fits` : `not even ${smallest} at ${r.numFrames} frames fits: use fewer frames`,
    software && /dispatches/.test(why) ? 'or raise the mapping limit: sudo sysctl -w vm.max_map_count=1048576' : null,
    s.load.lowMemLevel < 3 ? `or a higher infer.diffusion.low_mem_level (now ${s.load.lowMemLevel})` : null,
  ]
    .filter(Boolean)
    .join(', ');
  throw new TooBigError(`[preflight] ${r.width}x${r.height}, ${r.numFrames} frames of ${model.name} on ${engine.adapterName.split(' / ')[0]}: the run ${why}; ${hint} (npm run plan -- --size WxH --frames N shows any size's needs)`);
}

/**
 * Probe before the full walk? Only where the walk is slow: its cost follows the dispatches, ~ the
 * tokens times the DiT blocks (this machine: the demo's full walk at 512x512 x 33 frames, 2^15
 * token-blocks, takes ~0.1 s; the 1.3B shape's at 480x272 x 33, 2^17, ~6 s). Below the threshold
 * the full walk alone costs about what the probe would. And only where it can pay: a run that fits
 * pays the probe on top of the full walk, ~1/blocks of the DiT's walk plus the decode, so a DiT of
 * few blocks (the demo's 4: the probe is half a walk) is probed only when the run looks large (its
 * decoded video alone a sixth of the RAM there is or more: the demo at level 0 needs ~7x its video).
 */
export const PROBE_TOKEN_BLOCKS = 2 ** 16;
const MANY_BLOCKS = 8;
function probeFirst(model: ModelShapes, s: Settings, m?: MachineLimits): boolean {
  const [, ph, pw] = model.transformer.patch_size;
  const r = s.request;
  const tokens = ((r.numFrames - 1) / 4 + 1) * Math.ceil(r.height / 8 / ph) * Math.ceil(r.width / 8 / pw);
  if (tokens * model.transformer.num_layers < PROBE_TOKEN_BLOCKS) return false;
  return !m || model.transformer.num_layers >= MANY_BLOCKS || 6 * videoHostBytes(r) >= m.hostAvailable;
}

/** the decoded video in f32 and in 8 bits (both are held at the write) */
const videoHostBytes = (r: Settings['request']): number => 3 * r.numFrames * r.width * r.height * 5;

/**
 * a size factor's room from a probe: 1 when its estimate fits (with `margin`: 5 % on the memory,
 * 10 % on the dispatches), else the linear factor to shrink by (0.97 of the square root of the room)
 */
function estimateRatio(b: RunBound, software: boolean, m: MachineLimits, margin = false): number {
  const need = boundNeed(b, software).estimate * (margin ? 1.05 : 1);
  const room = Math.max(0, m.hostAvailable - RUNTIME_HOST_BYTES) / Math.max(1, need - RUNTIME_HOST_BYTES);
  const maps = software ? Math.max(0, m.mapHeadroom - MAP_MARGIN) / Math.max(1, b.maxInFlight * (margin ? 1.1 : 1)) : Infinity;
  const ratio = Math.min(room, maps);
  return ratio >= 1 ? 1 : Math.sqrt(ratio) * 0.97;
}

function unplaceableRatio(e: Unplaceable, engine: Engine): number {
  if (e instanceof OutOfMemoryError) return Math.sqrt(engine.limits.maxBufferSize / Math.max(1, e.info.requestedBytes)) * 0.97;
  return 0.7;
}

/** what a probe says the run needs of host RAM: a lower bound (refuses) and an estimate (messages, search) */
function boundNeed(b: RunBound, software: boolean): { lower: number; estimate: number; what: string } {
  const gpuLower = software ? b.peakReservedBytes : 0;
  const gpuEst = software ? b.peakReservedEstimate : 0;
  const what = software
    ? `${fmtBytes(b.hostBytes)} of host arrays + ${fmtBytes(gpuEst)} of GPU memory (a software adapter's GPU memory is host RAM) + ${fmtBytes(RUNTIME_HOST_BYTES)} for the runtime; at least ${fmtBytes(b.hostBytes + gpuLower + RUNTIME_HOST_BYTES)}, walked with ${b.walkedBlocks} of ${b.numBlocks} DiT blocks`
    : `${fmtBytes(b.hostBytes)} of host arrays + ${fmtBytes(RUNTIME_HOST_BYTES)} for the runtime, walked with ${b.walkedBlocks} of ${b.numBlocks} DiT blocks`;
  return { lower: b.hostBytes + gpuLower + RUNTIME_HOST_BYTES, estimate: b.hostBytes + gpuEst + RUNTIME_HOST_BYTES, what };
}

