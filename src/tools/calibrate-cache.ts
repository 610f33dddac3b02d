// npm run calibrate-cache -- --model DIR [--prompts N] [--steps N] [--low-mem N]
//
// Fits what the calibrated step caches need for a model (src/pipeline/cache/calibrate.ts) from a
// few uncached generations that record their signals (GenerateRequest.recordCacheSignals):
// TeaCache's rescale polynomials (on Wan's e, and on e0 for use_ret_steps) and MagCache's
// per-step magnitude ratios, and writes them into DIR/smart_diffusion.json under "cache" (its other
// keys kept). The runs use the model's recommended settings (size, steps, guidance, sampler), so
// the ratios are for that step count (other counts are resampled as MagCache does).

import { resolve } from 'node:path';
import { WanPipeline } from '../pipeline/wan-pipeline.ts';
import { fitMagCache, fitTeaCache, writeCalibration } from '../pipeline/cache/calibrate.ts';
import type { CacheSignals } from '../pipeline/cache/types.ts';
import { SmartDiffusionError } from '../util/errors.ts';

/** Prompts of the calibration runs (the demo model's grammar, also plain prompts for a real Wan). */
export const CALIBRATION_PROMPTS = [
  'a red circle moving right on a black background',
  'a blue square moving left on a gray background',
  'a green triangle moving up on a dark blue background',
  'a yellow circle moving down on a black background',
  'a white square moving right on a dark blue background',
  'a red triangle moving left on a gray background',
  'a blue circle moving up on a black background',
  'a green square moving down on a gray background',
];

const USAGE = 'usage: npm run calibrate-cache -- --model DIR [--prompts N (1..8, default 4)] [--steps N (default: the model\'s)] [--low-mem 0..3]';

function parse(argv: string[]): { model: string; prompts: number; steps: number | null; lowMem: number | null } {
  const o = { model: '', prompts: 4, steps: null as number | null, lowMem: null as number | null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const val = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value; ${USAGE}`);
      return v;
    };
    const int = (v: string, lo: number, hi: number) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < lo || n > hi) throw new Error(`${a} must be an integer in ${lo}..${hi}, got ${v}`);
      return n;
    };
    if (a === '--model') o.model = val();
    else if (a === '--prompts') o.prompts = int(val(), 1, CALIBRATION_PROMPTS.length);
    else if (a === '--steps') o.steps = int(val(), 2, 1000);
    else if (a === '--low-mem') o.lowMem = int(val(), 0, 3);
    else if (a === '--help' || a === '-h') {
      console.log(USAGE);
      process.exit(0);
    } else throw new Error(`unknown argument ${a}; ${USAGE}`);
  }
  if (!o.model) throw new Error(`--model DIR is required; ${USAGE}`);
  return o;
}

const roundFit = (f: { points: number; r2: number; relErr: number }) => ({ points: f.points, r2: Math.round(f.r2 * 1e4) / 1e4, rel_err: Math.round(f.relErr * 1e4) / 1e4 });
const fmt = (v: number[]) => `[${v.map((x) => x.toPrecision(9)).join(', ')}]`;

async function main(): Promise<number> {
  const o = parse(process.argv.slice(2));
  const dir = resolve(o.model);
  const t0 = performance.now();
  const pipe = await WanPipeline.fromPretrained(dir, { ...(o.lowMem !== null ? { lowMemLevel: o.lowMem } : {}) });
  const runs: CacheSignals[] = [];
  let desc = '';
  try {
    for (let k = 0; k < o.prompts; k++) {
      const prompt = CALIBRATION_PROMPTS[k]!;
      const res: Parameters<WanPipeline['sample']>[1] = {};
      const req = { prompt, seed: k + 1, recordCacheSignals: true, ...(o.steps ? { numInferenceSteps: o.steps } : {}) };
      const tr = performance.now();
      await pipe.sample(req, res);
      const s = pipe.resolveRequest(req).request;
      desc = `${s.numInferenceSteps} steps, ${s.sampler}, shift ${s.shift}, guidance ${s.guidanceScale}, ${s.width}x${s.height}x${s.numFrames}`;
      runs.push(res.cacheSignals!);
      console.log(`  run ${k + 1}/${o.prompts}: "${prompt}" (seed ${k + 1}) ${((performance.now() - tr) / 1000).toFixed(1)} s`);
    }
  } finally {
    pipe.dispose();
  }
  const tea = fitTeaCache(runs);
  const mag = fitMagCache(runs);
  const path = writeCalibration(dir, {
    teacache: tea.cal,
    magcache: mag,
    calibrated: { tool: 'npm run calibrate-cache', date: new Date().toISOString().slice(0, 10), prompts: o.prompts, settings: desc, teacache_fit: { e: roundFit(tea.e), e0: roundFit(tea.e0) } },
  });
  console.log(`calibrated ${o.model}: ${o.prompts} prompts, ${desc}, in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  console.log(`TeaCache polynomial on e (use_ret_steps=false): ${fmt(tea.cal.coefficients!)}`);
  console.log(`  fit on ${tea.e.points} points: R^2 ${tea.e.r2.toFixed(3)}, mean |fit - y| / mean |y| ${(tea.e.relErr * 100).toFixed(1)} %`);
  console.log(`TeaCache polynomial on e0 (use_ret_steps=true): ${fmt(tea.cal.coefficients_ret_steps!)}`);
  console.log(`  fit on ${tea.e0.points} points: R^2 ${tea.e0.r2.toFixed(3)}, mean |fit - y| / mean |y| ${(tea.e0.relErr * 100).toFixed(1)} %`);
  console.log(`MagCache mag_ratios (${mag.steps} steps, cond/uncond interleaved): [${mag.mag_ratios.join(', ')}]`);
  console.log(`wrote "cache" into ${path}`);
  return 0;
}

main().then(
  (c) => process.exit(c),
  (e) => {
    console.error(e instanceof SmartDiffusionError || e instanceof Error ? `calibrate-cache: ${e.message}` : e);
    process.exit(1);
  },
);
