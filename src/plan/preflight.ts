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

import { readFileSync } from 'node:fs';
import { freemem } from 'node:os';
import type { Settings } from '../config/schema.ts';
import type { Engine } from '../runtime/engine.ts';
import type { ModelFolder } from '../io/model-folder.ts';
import { SmartDiffusionError, OutOfMemoryError, ShapeError, fmtBytes } from '../util/errors.ts';
import { planRun, type PlanOptions, type RunPlan } from './plan.ts';
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
  const gpu = software ? plan.peakReservedBytes : 0;
  const hostBytes = plan.hostBytes + gpu + RUNTIME_HOST_BYTES;
  const what = software
    ? `${fmtBytes(plan.hostBytes)} of host arrays + ${fmtBytes(gpu)} of GPU memory (a software adapter's GPU memory is host RAM) + ${fmtBytes(RUNTIME_HOST_BYTES)} for the runtime`
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

/** a run the device cannot lay out: a tensor over maxBufferSize, or an operand no binding window can hold */
type Unplaceable = OutOfMemoryError | ShapeError;

async function tryPlan(model: ModelShapes, s: Settings, opts: PlanOptions): Promise<RunPlan | Unplaceable> {
  try {
    return await planRun(model, s, opts);
  } catch (e) {
    if (e instanceof OutOfMemoryError || e instanceof ShapeError) return e;
    throw e;
  }
}
const isPlan = (p: RunPlan | Unplaceable): p is RunPlan => !(p instanceof OutOfMemoryError || p instanceof ShapeError);

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
  const videoBytes = 3 * r.numFrames * r.width * r.height * 5;
  if (videoBytes + RUNTIME_HOST_BYTES > limits.hostAvailable) {
    const f = Math.sqrt((limits.hostAvailable - RUNTIME_HOST_BYTES) / videoBytes) * 0.9;
    const w = Math.max(16, Math.floor((r.width * f) / 16) * 16);
    const h = Math.max(16, Math.floor((r.height * f) / 16) * 16);
    throw new TooBigError(
      `[preflight] ${r.width}x${r.height}, ${r.numFrames} frames of ${model.name}: the decoded video alone needs ${fmtBytes(videoBytes)} of RAM (f32 and 8-bit frames) and ${fmtBytes(limits.hostAvailable)} is available; ` +
        `at most ~${w}x${h} at ${r.numFrames} frames could fit, or fewer frames (npm run plan -- --size WxH --frames N shows any size's needs)`,
    );
  }
  let plan = known ?? (await tryPlan(model, s, opts));
  const tooLarge = (e: Unplaceable) =>
    e instanceof OutOfMemoryError
      ? `needs one ${fmtBytes(e.info.requestedBytes)} buffer ('${e.info.owner}', phase ${e.info.phase}) and the device's largest is ${fmtBytes(engine.limits.maxBufferSize)} (maxBufferSize)`
      : `cannot be laid out on this device (${e.message.replace(/\.$/, '')})`;
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
  // a smaller size at the same aspect ratio that fits: the memory scales ~ with the pixels, so one
  // guess from the ratio, checked (and shrunk) with a few walks
  let fit: { width: number; height: number } | null = null;
  let smallest = `${r.width}x${r.height}`;
  const needBytes = isPlan(plan) ? hostNeed(plan, software).hostBytes : 0;
  let f = needBytes > 0 ? Math.sqrt(Math.max(0, limits.hostAvailable - RUNTIME_HOST_BYTES) / Math.max(1, needBytes - RUNTIME_HOST_BYTES)) * 0.95 : 0.5;
  for (let i = 0; i < 6 && !fit; i++, f *= 0.7) {
    const w = Math.floor((r.width * Math.min(f, 0.95)) / 16) * 16;
    const h = Math.floor((r.height * Math.min(f, 0.95)) / 16) * 16;
    if (w < 16 || h < 16) break;
    const p = await tryPlan(model, withSize(s, w, h), opts);
    if (isPlan(p) && !misfit(p, software, limits)) fit = { width: w, height: h };
    smallest = `${w}x${h}`;
  }
  const reason = why ?? 'does not fit';
  const hint = [
    fit ? `${fit.width}x${fit.height} at ${r.numFrames} frames fits` : `not even ${smallest} at ${r.numFrames} frames fits: use fewer frames`,
    software && /dispatches/.test(reason) ? 'or raise the mapping limit: sudo sysctl -w vm.max_map_count=1048576' : null,
    s.load.lowMemLevel < 3 ? `or a higher infer.diffusion.low_mem_level (now ${s.load.lowMemLevel})` : null,
  ]
    .filter(Boolean)
    .join(', ');
  throw new TooBigError(`[preflight] ${r.width}x${r.height}, ${r.numFrames} frames of ${model.name} on ${engine.adapterName.split(' / ')[0]}: the run ${reason}; ${hint} (npm run plan -- --size WxH --frames N shows any size's needs)`);
}
