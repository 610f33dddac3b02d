// Seconds per step from a plan's work: every op's registry flops and bytes (recorded by the meta
// walk, src/plan/plan.ts) against a stated GPU class, plus the streamed blocks' uploads over PCIe.
//
// Per op: max(flops / (peak × efficiency of its kind), bytes / (bandwidth × 0.7)) — a roofline with
// this engine's measured efficiencies, not the card's peak: on an H100 (docs/gpu-run.md) the f32
// matmul kernel reaches 15–17 of 67 TFLOP/s (0.24) and fused attention 10–11 (0.16); the conv3d
// kernel 4.8–6.1 on an H200 (0.09 of its 67). Streaming (level 3): block i+1 uploads while block
// i computes, so a streamed block costs max(its compute, its upload); resident blocks cost compute.
// Every number this gives is a prediction for that class, labelled so wherever it is printed.

import type { RunPlan, PhaseWork } from './plan.ts';

export interface GpuClass {
  name: string;
  /** memory bandwidth, bytes/s */
  bandwidth: number;
  /** f32 (non-tensor-core) peak, flop/s */
  f32: number;
  /** host → device copy rate over PCIe, bytes/s (measured pinned-copy rates, not the link's nominal) */
  pcie: number;
}

/** The class the hardware table states its times for. */
export const RTX_4090: GpuClass = { name: 'RTX 4090 class (1008 GB/s, 82.6 TFLOP/s f32, PCIe 4.0 x16 at 25 GB/s)', bandwidth: 1008e9, f32: 82.6e12, pcie: 25e9 };
/** A PCIe 4 data-centre card (issue 18 point 6 asks what partial residency would cost on one). */
export const A100_PCIE: GpuClass = { name: 'A100 PCIe class (1935 GB/s, 19.5 TFLOP/s f32, PCIe 4.0 x16 at 25 GB/s)', bandwidth: 1935e9, f32: 19.5e12, pcie: 25e9 };

/** This engine's share of the f32 peak per op kind (docs/gpu-run.md measurements; see the header). */
const EFFICIENCY: Record<string, number> = { linear: 0.24, matmul: 0.24, attention: 0.16, conv3d: 0.09, conv2d: 0.09 };
const BANDWIDTH_EFFICIENCY = 0.7;

/** Seconds of GPU work for a phase's ops (no uploads). */
export function computeSeconds(w: PhaseWork, gpu: GpuClass): number {
  let s = 0;
  for (const [op, o] of Object.entries(w.byOp)) {
    const eff = EFFICIENCY[op] ?? 0.24;
    s += Math.max(o.flops / (gpu.f32 * eff), o.bytes / (gpu.bandwidth * BANDWIDTH_EFFICIENCY));
  }
  return s;
}

export interface StepEstimate {
  /** one denoising step (cond + uncond), seconds */
  stepSeconds: number;
  /** of which upload time not hidden behind compute */
  exposedUploadSeconds: number;
  decodeSeconds: number;
  gpu: string;
}

/** Predicted seconds per denoising step and for the decode on `gpu`. */
export function estimateStep(plan: RunPlan, gpu: GpuClass): StepEstimate {
  const compute = computeSeconds(plan.work.denoise, gpu);
  const { numBlocks, residentBlocks, dit } = plan.placement;
  let exposed = 0;
  if (dit === 'stream' && numBlocks > residentBlocks) {
    const streamed = numBlocks - residentBlocks;
    const perBlockCompute = compute / numBlocks;
    const perBlockUpload = plan.streamBytesPerStep / streamed / gpu.pcie;
    exposed = streamed * Math.max(0, perBlockUpload - perBlockCompute);
  }
  return { stepSeconds: compute + exposed, exposedUploadSeconds: exposed, decodeSeconds: computeSeconds(plan.work.decode, gpu), gpu: gpu.name };
}
