// A fast lower bound on a run's memory, for the preflight's refusals (src/plan/preflight.ts).
//
// The full walk (planRun) is the authority on what a run needs, but its cost grows with the GPU
// dispatches it encodes: ~1 s for the demo model at 2048x2048 x 81 frames (~70k dispatch windows),
// a minute for the 1.3B shape at 832x480 x 81. A request that cannot fit does not need all of it to
// be refused. The probe walks the same run with the DiT cut to ONE block (planRun on the same
// shapes, num_layers 1): the DiT's blocks are identical, so the block loop's activations, every
// tensor of a block (the largest buffer included), the text encoder and the decode are walked as
// they are, and what the probe leaves out is the other blocks' weights, which a resident DiT holds
// from the load on (added back exactly: the probe's own `dit.blocks` bytes, times the blocks left
// out). Everything the probe counts is a subset of what the full walk counts at the same moment:
//   - its allocated GPU peak + the missing resident blocks ≤ the full walk's allocated peak
//     ≤ its reserved peak (what a software adapter takes from host RAM), and its own reserved peak
//     ≤ the full walk's (the same activations go through the same caching allocator; the blocks
//     left out only add buffers that are never freed);
//   - its host arrays ≤ the full walk's (the same video, latents, decode buffers; fewer blocks'
//     host copies when the DiT is streamed);
//   - a tensor larger than maxBufferSize, or an operand no binding window holds, fails in block 0
//     as in every block.
// So a probe that does not fit is a full walk that does not fit (test/bound.test.ts checks the
// bound against the full walk over sizes, levels and models); a probe that fits proves nothing,
// and the preflight then walks the whole run. The probe's reserved bytes (+ the missing blocks)
// are also a close estimate of the full walk's (the allocator's rounding of the missing blocks'
// buffers aside), which the refusal message and the size search use.

import { OutOfMemoryError, ShapeError } from '../util/errors.ts';
import { planRun, type PlanOptions, type RunPlan } from './plan.ts';
import type { ModelShapes } from './shapes.ts';
import type { Settings } from '../config/schema.ts';

/** The probe's DiT blocks (of each expert). */
export const PROBE_BLOCKS = 1;

export interface RunBound {
  /** the one-block walk */
  probe: RunPlan;
  /** blocks of the real DiT, and those the probe walked */
  numBlocks: number;
  walkedBlocks: number;
  /** GPU bytes the blocks left out hold for the whole run (a resident DiT's weights; 0 when streamed) */
  missingDeviceBytes: number;
  /** lower bound of the run's peak allocated GPU bytes */
  peakBytes: number;
  /**
   * lower bound of the run's peak reserved GPU bytes: the probe's reserved peak (the full walk's
   * caching allocator holds the same activations' buffers and more weights) or the allocated bound
   */
  peakReservedBytes: number;
  /**
   * the probe's reserved peak + the missing blocks: an estimate (not a bound) of the run's reserved
   * peak; close for a resident DiT (test/bound.test.ts: within 5 %), low for a streamed one (its
   * resident blocks beyond the first are not added back)
   */
  peakReservedEstimate: number;
  /** lower bound of the run's host bytes */
  hostBytes: number;
  /** lower bound (in practice; see test/bound.test.ts) of the dispatches in flight */
  maxInFlight: number;
  ms: number;
}

/** The model with its DiT cut to `blocks` blocks (every other shape as it is). */
export function probeShapes(model: ModelShapes, blocks = PROBE_BLOCKS): ModelShapes {
  return { ...model, transformer: { ...model.transformer, num_layers: Math.min(blocks, model.transformer.num_layers) } };
}

/**
 * Walk the run with a one-block DiT and bound the full run's needs from below. Throws what the full
 * walk would throw for a tensor the device cannot hold (OutOfMemoryError, ShapeError).
 */
export async function boundRun(model: ModelShapes, settings: Settings, opts: PlanOptions = {}): Promise<RunBound> {
  const t0 = performance.now();
  const numBlocks = model.transformer.num_layers;
  const shapes = probeShapes(model);
  const walkedBlocks = shapes.transformer.num_layers;
  const probe = await planRun(shapes, settings, opts);
  // the blocks' weights on the GPU at the end of the load, as the allocator tagged them (one block)
  const blockBytes = walkedBlocks > 0 ? (probe.phases.load.byOwner['dit.blocks'] ?? 0) / walkedBlocks : 0;
  const missingDeviceBytes = probe.placement.dit === 'resident' ? (numBlocks - walkedBlocks) * blockBytes : 0;
  return {
    probe,
    numBlocks,
    walkedBlocks,
    missingDeviceBytes,
    peakBytes: probe.peakBytes + missingDeviceBytes,
    peakReservedBytes: Math.max(probe.peakBytes + missingDeviceBytes, probe.peakReservedBytes),
    peakReservedEstimate: probe.peakReservedBytes + missingDeviceBytes,
    hostBytes: probe.hostBytes,
    maxInFlight: probe.maxInFlight,
    ms: performance.now() - t0,
  };
}

/** a run the device cannot lay out (the probe's block 0 is every block) */
export type Unplaceable = OutOfMemoryError | ShapeError;
export const isUnplaceable = (e: unknown): e is Unplaceable => e instanceof OutOfMemoryError || e instanceof ShapeError;

/** boundRun, with the device's refusals returned instead of thrown */
export async function tryBound(model: ModelShapes, settings: Settings, opts: PlanOptions = {}): Promise<RunBound | Unplaceable> {
  try {
    return await boundRun(model, settings, opts);
  } catch (e) {
    if (isUnplaceable(e)) return e;
    throw e;
  }
}

