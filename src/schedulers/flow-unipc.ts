// Wan 2.1's FlowUniPCMultistepScheduler (solver_type bh2, solver_order 2, predict_x0,
// lower_order_final, flow_prediction, final_sigmas_type "zero"), host-side, f32 semantics.
//
// Reference: Wan-Video/Wan2.1 @ 9737cba, wan/utils/fm_solvers_unipc.py (`set_timesteps`, `step`,
// `convert_model_output`, `multistep_uni_p_bh_update`, `multistep_uni_c_bh_update`) as driven by
// `WanT2V.generate`: FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1,
// use_dynamic_shifting=False).set_timesteps(N, shift=shift).
// This is NOT diffusers' UniPCMultistepScheduler(use_flow_sigmas=True): the sigma schedule differs
// (see wanFlowSchedule in flow-schedule.ts and docs/schedulers.md).
//
// Precision: the reference holds sigmas as float32 tensors, so λ, h, B(h), rk, the bh2 right-hand
// side b and the 2×2 solve are float32 0-dim tensor math, and every tensor op rounds to f32. We
// reproduce that op by op with Math.fround (f(a op b) on f32 inputs is exactly the f32 op).
// The schedule itself (linspace + shift + timesteps) is float64 numpy math.

import type { StepInfo } from './types.ts';
import { FlowSampler, type FlowScheduleOptions, type StepResult } from './flow-schedule.ts';

const f = Math.fround;

/** Per-step solver orders Wan uses (lower_order_final, solver_order 2, warm-up). */
export function unipcOrders(steps: number): StepInfo[] {
  const out: StepInfo[] = [];
  let lowerOrderNums = 0;
  let prevOrder = 0;
  for (let i = 0; i < steps; i++) {
    const predictor = Math.min(Math.min(2, steps - i), lowerOrderNums + 1);
    out.push({ step: i, corrector: i > 0 ? prevOrder : null, predictor });
    prevOrder = predictor;
    if (lowerOrderNums < 2) lowerOrderNums++;
  }
  return out;
}

/** f32 λ(σ) = log(1 − σ) − log(σ) (torch.log on float32 0-dim tensors); λ(0) = +inf. */
function lambdaF32(sigma: number): number {
  const alpha = f(1 - sigma);
  return f(f(Math.log(alpha)) - f(Math.log(sigma)));
}

/**
 * torch.linalg.solve(R, b) in float32 for the order-2 UniC system R = [[1, 1], [rk, 1]].
 * torch (>= 1.13) LU-factors Rᵀ = [[1, rk], [1, 1]] when R is contiguous and solves with
 * adjoint=True (LAPACK sgetrf + sgetrs 'T'): column 0 of Rᵀ is [1, 1] → no row swap, l = 1,
 * u11 = 1 − rk; Uᵀy = b: y0 = b0, y1 = (b1 − rk·b0)/u11; Lᵀx = y: x1 = y1, x0 = y0 − x1.
 */
function solveOrder2(rk: number, b0: number, b1: number): [number, number] {
  const u11 = f(1 - rk);
  const x1 = f(f(b1 - f(rk * b0)) / u11);
  const x0 = f(b0 - x1);
  return [x0, x1];
}

export class FlowUniPCScheduler extends FlowSampler<'unipc'> {
  // solver state (Wan: model_outputs[-2:], last_sample, this_order, lower_order_nums, step_index)
  private m1: Float32Array | null = null; // x0 of step k−2 (model_outputs[-2])
  private m0: Float32Array | null = null; // x0 of step k−1 (model_outputs[-1])
  private lastSampleBuf: Float32Array | null = null; // corrected sample the previous predictor started from
  private thisOrder = 0;
  private lowerOrderNums = 0;

  constructor(opts: FlowScheduleOptions) {
    // the orders each step will use (same as Wan's, golden.json scheduler.steps)
    super('unipc', opts, unipcOrders);
  }

  override reset(): void {
    super.reset();
    this.m1 = this.m0 = this.lastSampleBuf = null;
    this.thisOrder = 0;
    this.lowerOrderNums = 0;
  }

  protected advance(v: Float32Array, sample: Float32Array): StepResult {
    const k = this.stepIndex;
    const S = this.sigmas;
    const n = sample.length;

    // convert_model_output: x0 = sample − σ_k·v (on the uncorrected sample)
    const sigK = S[k]!;
    const x0 = new Float32Array(n);
    for (let j = 0; j < n; j++) x0[j] = sample[j]! - f(sigK * v[j]!);

    // UniC corrector (order = the previous predictor's order)
    let x = sample;
    let correctorOrder: number | null = null;
    if (k > 0 && this.lastSampleBuf) {
      correctorOrder = this.thisOrder;
      x = this.corrector(x0, this.lastSampleBuf, correctorOrder);
    }

    // shift the model output history
    this.m1 = this.m0;
    this.m0 = x0;

    const predictorOrder = Math.min(Math.min(2, this.steps - k), this.lowerOrderNums + 1);
    this.thisOrder = predictorOrder;
    this.lastSampleBuf = x;
    const out = this.predictor(x, predictorOrder);
    if (this.lowerOrderNums < 2) this.lowerOrderNums++;
    return { next: out, x0, info: { step: k, corrector: correctorOrder, predictor: predictorOrder } };
  }

  /** multistep_uni_p_bh_update (predict_x0, bh2): from sample x at σ_k to σ_{k+1}. */
  private predictor(x: Float32Array, order: number): Float32Array {
    const S = this.sigmas;
    const k = this.stepIndex;
    const m0 = this.m0!;
    const sigmaT = S[k + 1]!;
    const sigmaS0 = S[k]!;
    const alphaT = f(1 - sigmaT);
    const lambdaT = lambdaF32(sigmaT); // +inf at the last step (σ = 0)
    const lambdaS0 = lambdaF32(sigmaS0);
    const h = f(lambdaT - lambdaS0);
    const hh = -h;
    const hPhi1 = f(Math.expm1(hh)); // −1 when h = +inf
    const Bh = hPhi1; // bh2: B(h) = expm1(hh)
    const ratio = f(sigmaT / sigmaS0); // 0 at the last step
    const c1 = f(alphaT * hPhi1);
    const cB = f(alphaT * Bh);
    const n = x.length;
    const out = new Float32Array(n);
    if (order === 2) {
      // rk = (λ_{k−1} − λ_k)/h; D1 = (m_{k−1} − m_k)/rk; rhos_p = [0.5] (Wan's order-2 shortcut)
      const m1 = this.m1!;
      const rk = f(f(lambdaF32(S[k - 1]!) - lambdaS0) / h);
      for (let j = 0; j < n; j++) {
        const xt_ = f(f(ratio * x[j]!) - f(c1 * m0[j]!));
        const d1 = f(f(m1[j]! - m0[j]!) / rk);
        const predRes = f(0.5 * d1);
        out[j] = xt_ - f(cB * predRes);
      }
    } else {
      // order 1: x_t = σ_t/σ_s0·x − α_t·(e^{−h} − 1)·m0; at the last step (ratio 0, α 1, B −1) this is
      // 0·x + m0 = m0 exactly.
      for (let j = 0; j < n; j++) out[j] = f(ratio * x[j]!) - f(c1 * m0[j]!);
    }
    return out;
  }

  /** multistep_uni_c_bh_update (predict_x0, bh2): corrects the sample at σ_k using x0_k (modelT). */
  private corrector(modelT: Float32Array, lastSample: Float32Array, order: number): Float32Array {
    const S = this.sigmas;
    const k = this.stepIndex;
    const m0 = this.m0!; // x0 of step k−1
    const sigmaT = S[k]!;
    const sigmaS0 = S[k - 1]!;
    const alphaT = f(1 - sigmaT);
    const lambdaT = lambdaF32(sigmaT);
    const lambdaS0 = lambdaF32(sigmaS0);
    const h = f(lambdaT - lambdaS0);
    const hh = -h;
    const hPhi1 = f(Math.expm1(hh));
    const Bh = hPhi1;
    // b_i = h_phi_k·i! / B_h with h_phi_k: φ1/hh − 1, then (· / hh − 1/2)
    let hPhiK = f(f(hPhi1 / hh) - 1);
    const b0 = f(hPhiK / Bh);
    hPhiK = f(f(hPhiK / hh) - 0.5);
    const b1 = f(f(hPhiK * 2) / Bh);
    const ratio = f(sigmaT / sigmaS0);
    const c1 = f(alphaT * hPhi1);
    const cB = f(alphaT * Bh);
    const n = modelT.length;
    const out = new Float32Array(n);
    if (order === 2) {
      const m1 = this.m1!; // x0 of step k−2
      const rk = f(f(lambdaF32(S[k - 2]!) - lambdaS0) / h);
      const [r0, r1] = solveOrder2(rk, b0, b1);
      for (let j = 0; j < n; j++) {
        const xt_ = f(f(ratio * lastSample[j]!) - f(c1 * m0[j]!));
        const d1 = f(f(m1[j]! - m0[j]!) / rk);
        const corrRes = f(r0 * d1);
        const d1t = f(modelT[j]! - m0[j]!);
        out[j] = xt_ - f(cB * f(corrRes + f(r1 * d1t)));
      }
    } else {
      // order 1: rhos_c = [0.5]
      for (let j = 0; j < n; j++) {
        const xt_ = f(f(ratio * lastSample[j]!) - f(c1 * m0[j]!));
        const d1t = f(modelT[j]! - m0[j]!);
        out[j] = xt_ - f(cB * f(0.5 * d1t));
      }
    }
    return out;
  }
}
