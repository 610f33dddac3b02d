// Step caching: the shared types. A step cache is made per request (index.ts: createStepCache)
// and consulted once per denoising step by the pipeline (wan-pipeline.ts sample()):
//
//   beginStep(step)  ->  'skip' with the whole prediction from the cache (EasyCache: no DiT forward
//                        at all), or 'forward' with a DiT hook (TeaCache, MagCache, flex: the
//                        forward runs its patch embedding, asks the hook which rows run the blocks,
//                        and the hook adds the cached residual of the rest before the head)
//   endStep(step, prediction)   after a forward: what the method learns from the step's output
//   reset()          Wan 2.2's expert switch: everything cached belongs to the other expert
//
// Every decision is plain host logic over numbers (rel-L1 distances, magnitude ratios, rates)
// that the methods' own files keep apart from the GPU work, so test/step-cache.test.ts can replay
// recorded numbers through them and through straight ports of the reference loops.

import type { DitStepCache } from '../../models/wan_dit/model.ts';
import type { Engine } from '../../runtime/engine.ts';

export const CACHE_MODES = ['off', 'teacache', 'magcache', 'easycache', 'flex'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];

/** The infer.cache.* settings (src/config/schema.ts), as a request resolved them. */
export interface CacheKnobs {
  mode: CacheMode;
  /** 0 = the method's default */
  threshold: number;
  /** steps always computed at the start (per expert); -1 = the method's default */
  warmupSteps: number;
  /** most consecutive skipped steps; -1 = the method's default (MagCache K = 2; the others: unbounded) */
  maxSkips: number;
  /** TeaCache (and flex's timestep signal): Wan's e0 with 5 retention steps instead of e with 1 */
  useRetSteps: boolean;
  /** MagCache / flex: fraction of the forwards always computed at the start when warmup_steps = -1 */
  retentionRatio: number;
  /** flex: how far a skipped step's residual is extrapolated from the last two (0 = reused as it is, 1 = linear in the timestep) */
  extrapolation: number;
}

/** One step as the cache sees it. */
export interface StepInfo {
  /** 0-based step of the request */
  step: number;
  /** steps in the request */
  steps: number;
  /** expert segment (Wan 2.2: 0 = high-noise expert, 1 = after the switch); 0 for one-DiT models */
  segment: number;
  /** first step of this segment, and how many steps it has */
  segStart: number;
  segSteps: number;
  /** steps of the request's first segment (Wan 2.2: the high-noise expert's steps; = steps with one DiT) */
  firstSegSteps: number;
  /** number of segments in the request (2 for a two-expert run that switches) */
  segments: number;
  timestep: number;
  /** batch rows of the forward: 2 with CFG (row 0 cond, row 1 uncond), 1 without */
  rows: number;
  /** the step's input latents [C, F, H, W] (host; the same for every row) */
  latent: Float32Array;
}

export type StepPlan =
  /** no DiT forward: the prediction [rows, C, F, H, W] comes from the cache */
  | { kind: 'skip'; pred: Float32Array }
  /**
   * run the forward with this hook (null: a plain forward); cpHooks: the hooks of a
   * context-parallel forward, one per device (absent: the method does not run context-parallel)
   */
  | { kind: 'forward'; hook: DitStepCache | null; cpHooks?: (engines: Engine[]) => DitStepCache[] };

/** What happened at one step (1-based `step` in the records). */
export interface StepLog {
  step: number;
  /** per row: did it run the DiT blocks */
  ran: boolean[];
  /** blocks run by the rows that ran (numLayers = all; 0 when no row ran) */
  blocks: number;
  /** upload bytes of streamed DiT blocks at this step (level 3; 0 otherwise) */
  uploadBytes?: number;
}

export interface StepCache {
  readonly mode: CacheMode;
  beginStep(s: StepInfo): Promise<StepPlan>;
  /** after a forward ran (not after a 'skip'): the prediction [rows, C, F, H, W] on the host */
  endStep(s: StepInfo, pred: Float32Array): Promise<void>;
  /** the expert changed (Wan 2.2): forget the cached residuals and the accumulated state */
  reset(): void;
  /** what each step did, in order (the pipeline appends upload bytes) */
  readonly log: StepLog[];
  /** the method's effective knobs, for the sidecar */
  readonly describe: Record<string, unknown>;
  /** free the cached GPU tensors */
  dispose(): void;
}

/** GenerateResult.cache: which steps the DiT computed. */
export interface CacheRecord {
  mode: CacheMode;
  /** DiT forwards that ran blocks (the CFG batch counts as one; a split forward of one row counts as one) */
  forwards: number;
  /** 1-based steps whose forward ran the blocks (for at least one row) */
  computedSteps: number[];
  /** 1-based steps that ran no DiT block */
  skippedSteps: number[];
  /** 1-based steps where only some CFG rows ran the blocks (MagCache: cond and uncond decide apart) */
  splitSteps: number[];
  /** level 3: bytes of streamed block uploads the skipped blocks did not need */
  savedUploadBytes?: number;
  /** the method's effective settings (threshold, warm-up, max skips, calibration source ...) */
  settings: Record<string, unknown>;
}

// ---- calibration (a model folder's smart_diffusion.json, key "cache"; npm run calibrate-cache)

export interface TeaCacheCalibration {
  /** np.poly1d order (highest power first), fitted on Wan's `e` (use_ret_steps = false) */
  coefficients?: number[];
  /** the same fitted on `e0` (use_ret_steps = true) */
  coefficients_ret_steps?: number[];
}

export interface MagCacheCalibration {
  /** interleaved per step: cond, uncond (the reference's `mag_ratios`, starting with 1.0, 1.0) */
  mag_ratios: number[];
  /** steps of the calibration run (mag_ratios.length / 2) */
  steps: number;
}

export interface CacheCalibration {
  teacache?: TeaCacheCalibration;
  magcache?: MagCacheCalibration;
  /** where the numbers came from (built-in reference values, or this folder's file) */
  source?: string;
}

/** Per-step signals recorded by an uncached run (GenerateRequest.recordCacheSignals): what calibration fits. */
export interface CacheSignalStep {
  /** 1-based */
  step: number;
  timestep: number;
  /** expert segment */
  segment: number;
  /** rel-L1 of Wan's e / e0 against the previous step's (null at a segment's first step) */
  eRelL1: number | null;
  e0RelL1: number | null;
  /** per row: rel-L1 of the DiT output (the flow prediction) against the previous step's */
  outRelL1: Array<number | null>;
  /** per row: MagCache's magnitude ratio, mean over tokens of |r_k| / |r_k-1| (r = blocks' output - input) */
  magRatio: Array<number | null>;
  /** per row: |r_k - r_k-1| / |r_k-1| (L2 over the whole row) */
  resRelL2: Array<number | null>;
  /** EasyCache's raw quantities: mean |x_k - x_k-1| of the input latents, mean |out| per row */
  inputMeanAbsChange: number | null;
  outMeanAbs: number[];
}

export interface CacheSignals {
  steps: CacheSignalStep[];
  rows: number;
}
