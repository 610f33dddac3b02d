// Wan 2.2 A14B's model pool: two DiTs of the same shape, a HIGH-noise expert (diffusers
// `transformer/`, Wan `high_noise_model`) for the early steps and a LOW-noise expert
// (`transformer_2/`, `low_noise_model`) after the boundary, each with its own guidance scale.
//
// The rule, as the official code (wan/text2video.py WanT2V.generate) and diffusers (pipeline_wan.py)
// apply it: with t the scheduler's INTEGER timestep of the step (int64, truncated) and
// boundary = boundary_ratio × num_train_timesteps,
//   t >= boundary (inclusive)  ->  transformer/   with guidance_scale   (official guide_scale[1])
//   otherwise                  ->  transformer_2/ with guidance_scale_2 (official guide_scale[0])
// Both CFG passes of a step use that step's expert; the sampler's history carries over the switch.
// (The official tuple is ordered (low_noise, high_noise): the expert that runs FIRST takes the
// SECOND entry. diffusers' names are used here.)

/** Which expert and guidance scale each step uses. */
export interface ExpertStep {
  /** 0-based step */
  step: number;
  timestep: number;
  /** 0 = transformer/ (high noise), 1 = transformer_2/ (low noise) */
  expert: 0 | 1;
  guidance: number;
}

/** Folder names of the experts, by index (the sidecar, progress and errors use them). */
export const EXPERT_NAMES = ['transformer', 'transformer_2'] as const;
/** The official Wan 2.2 names of the same experts. */
export const EXPERT_WAN_NAMES = ['high_noise_model', 'low_noise_model'] as const;

/**
 * The per-step expert schedule. `guidance2` < 0 means "same as guidance" (diffusers' None).
 * With one expert (`experts` = 1) every step uses expert 0 and `guidance`.
 */
export function expertSchedule(
  timesteps: ArrayLike<number>,
  o: { experts: number; boundaryRatio: number; numTrainTimesteps?: number; guidance: number; guidance2: number },
): ExpertStep[] {
  const boundary = o.boundaryRatio * (o.numTrainTimesteps ?? 1000);
  const g2 = o.guidance2 < 0 ? o.guidance : o.guidance2;
  const out: ExpertStep[] = [];
  for (let i = 0; i < timesteps.length; i++) {
    // the scheduler's timesteps are integers already (flow-schedule.ts truncates); trunc again so a
    // fractional caller gets the reference's int64 comparison
    const t = Math.trunc(timesteps[i]!);
    const expert: 0 | 1 = o.experts < 2 || t >= boundary ? 0 : 1;
    out.push({ step: i, timestep: t, expert, guidance: expert === 0 ? o.guidance : g2 });
  }
  return out;
}
