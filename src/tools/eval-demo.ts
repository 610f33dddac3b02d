// `npm run eval:demo [-- --model DIR] [--seeds N] [--steps N] [--heldout-per-combo 1|3] [--json FILE]`
// Generates the evaluation prompts of src/tools/demo-eval.ts on the engine (the real pipeline,
// fixed seeds) and reports whether the videos follow their prompts: color and direction accuracy
// on seen and held-out color x shape x direction combinations.
import { writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { WanPipeline } from '../pipeline/wan-pipeline.ts';
import { analyze, demoPrompts, loadHeldout, summarize, type Analysis, type DemoPrompt } from './demo-eval.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface DemoEvalOptions {
  model?: string;
  seeds?: number;
  steps?: number;
  heldoutPerCombo?: 1 | 3;
  onRow?: (row: DemoPrompt & Analysis & { seed: number }) => void;
}

export async function evalDemo(opts: DemoEvalOptions = {}) {
  const model = opts.model ?? join(ROOT, 'weights', 'demo');
  const prompts = demoPrompts(loadHeldout(join(ROOT, 'training', 'heldout.json')), { heldoutPerCombo: opts.heldoutPerCombo ?? 3 });
  const pipe = await WanPipeline.fromPretrained(model, { promptCache: false, defaults: { numInferenceSteps: opts.steps } });
  const rows: Array<DemoPrompt & Analysis & { seed: number }> = [];
  const t0 = performance.now();
  try {
    for (let s = 0; s < (opts.seeds ?? 1); s++)
      for (const p of prompts) {
        const seed = 1000 + s;
        const r = await pipe.generate({ prompt: p.prompt, seed });
        const row = { ...p, seed, ...analyze(r.video, r.videoShape, p.color, p.direction, p.background) };
        rows.push(row);
        opts.onRow?.(row);
      }
  } finally {
    pipe.dispose(); // destroys the engine it created
  }
  return { summary: summarize(rows), rows, seconds: (performance.now() - t0) / 1000, settings: { model, steps: opts.steps ?? 'model default', seeds: opts.seeds ?? 1 } };
}

async function main() {
  const arg = (n: string) => {
    const i = process.argv.indexOf(n);
    return i >= 0 ? process.argv[i + 1] : undefined;
  };
  const res = await evalDemo({
    model: arg('--model'),
    seeds: arg('--seeds') ? Number(arg('--seeds')) : 1,
    steps: arg('--steps') ? Number(arg('--steps')) : undefined,
    heldoutPerCombo: arg('--heldout-per-combo') === '1' ? 1 : 3,
    onRow: (r) =>
      console.log(`${r.split.padEnd(8)} ${r.colorOk ? 'ok ' : 'BAD'} color (${r.dominant}) ${r.dirOk ? 'ok ' : 'BAD'} dir (${r.displacement.join(', ')})  ${r.prompt} [seed ${r.seed}]`),
  });
  for (const k of ['seen', 'heldout'] as const) {
    const s = res.summary[k];
    console.log(`${k.padEnd(8)} n=${s.n}  color ${(100 * s.colorAcc).toFixed(1)}%  direction ${(100 * s.directionAcc).toFixed(1)}%`);
  }
  console.log(`${res.seconds.toFixed(0)} s`);
  const json = arg('--json');
  if (json) writeFileSync(json, JSON.stringify(res, null, 1));
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
