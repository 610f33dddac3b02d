// `npm run eval:demo [-- --model DIR] [--seeds N] [--steps N] [--heldout-per-combo 1|3] [--attention sdpa|sage] [--vs sdpa|sage] [--limit N] [--json FILE]`
// Generates the evaluation prompts of src/tools/demo-eval.ts on the engine (the real pipeline,
// fixed seeds) and reports whether the videos follow their prompts: color and direction accuracy
// on seen and held-out color x shape x direction combinations. `--attention sage --vs sdpa` runs
// the same prompts and seeds with both attention kernels and adds the PSNR of each video against
// the `--vs` one (docs/precision.md "Quantized attention"); `--limit N` evaluates the first N prompts.
import { writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { WanPipeline } from '../pipeline/wan-pipeline.ts';
import { psnr } from './video-metrics.ts';
import { analyze, demoPrompts, loadHeldout, summarize, type Analysis, type DemoPrompt } from './demo-eval.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface DemoEvalOptions {
  model?: string;
  seeds?: number;
  steps?: number;
  heldoutPerCombo?: 1 | 3;
  /** infer.attention of the runs (default sdpa) */
  attention?: 'sdpa' | 'sage';
  /** evaluate only the first N prompts (0 / unset: all) */
  limit?: number;
  /** keep each row's video (for comparisons) */
  keepVideos?: boolean;
  onRow?: (row: DemoPrompt & Analysis & { seed: number }) => void;
}

export async function evalDemo(opts: DemoEvalOptions = {}) {
  const model = opts.model ?? join(ROOT, 'weights', 'demo');
  const all = demoPrompts(loadHeldout(join(ROOT, 'training', 'heldout.json')), { heldoutPerCombo: opts.heldoutPerCombo ?? 3 });
  const prompts = opts.limit ? all.slice(0, opts.limit) : all;
  const pipe = await WanPipeline.fromPretrained(model, { promptCache: false, attention: opts.attention ?? 'sdpa', defaults: { numInferenceSteps: opts.steps } });
  const rows: Array<DemoPrompt & Analysis & { seed: number }> = [];
  const videos: Array<{ video: Float32Array; shape: readonly [number, number, number, number] }> = [];
  const t0 = performance.now();
  try {
    for (let s = 0; s < (opts.seeds ?? 1); s++)
      for (const p of prompts) {
        const seed = 1000 + s;
        const r = await pipe.generate({ prompt: p.prompt, seed });
        const row = { ...p, seed, ...analyze(r.video, r.videoShape, p.color, p.direction, p.background) };
        rows.push(row);
        if (opts.keepVideos) videos.push({ video: r.video, shape: r.videoShape });
        opts.onRow?.(row);
      }
  } finally {
    pipe.dispose(); // destroys the engine it created
  }
  return {
    summary: summarize(rows),
    rows,
    videos,
    seconds: (performance.now() - t0) / 1000,
    settings: { model, steps: opts.steps ?? 'model default', seeds: opts.seeds ?? 1, attention: opts.attention ?? 'sdpa', prompts: prompts.length },
  };
}

async function main() {
  const arg = (n: string) => {
    const i = process.argv.indexOf(n);
    return i >= 0 ? process.argv[i + 1] : undefined;
  };
  const kind = (flag: string): 'sdpa' | 'sage' | undefined => {
    const v = arg(flag);
    if (v === undefined) return undefined;
    if (v !== 'sdpa' && v !== 'sage') {
      console.error(`eval:demo: ${flag} must be sdpa or sage; got '${v}'`);
      process.exit(2);
    }
    return v;
  };
  const attention = kind('--attention');
  const vs = kind('--vs');
  const limit = arg('--limit') ? Number(arg('--limit')) : 0;
  if (!(Number.isInteger(limit) && limit >= 0)) {
    console.error(`eval:demo: --limit must be a whole number >= 0; got '${arg('--limit')}'`);
    process.exit(2);
  }
  const base = {
    model: arg('--model'),
    seeds: arg('--seeds') ? Number(arg('--seeds')) : 1,
    steps: arg('--steps') ? Number(arg('--steps')) : undefined,
    heldoutPerCombo: (arg('--heldout-per-combo') === '1' ? 1 : 3) as 1 | 3,
    limit,
    keepVideos: vs !== undefined,
  };
  const print = (label: string, res: Awaited<ReturnType<typeof evalDemo>>) => {
    for (const k of ['seen', 'heldout'] as const) {
      const s = res.summary[k];
      console.log(`${label}${k.padEnd(8)} n=${s.n}  color ${(100 * s.colorAcc).toFixed(1)}%  direction ${(100 * s.directionAcc).toFixed(1)}%`);
    }
    console.log(`${label}${res.seconds.toFixed(0)} s`);
  };
  const res = await evalDemo({
    ...base,
    attention,
    onRow: (r) =>
      console.log(`${r.split.padEnd(8)} ${r.colorOk ? 'ok ' : 'BAD'} color (${r.dominant}) ${r.dirOk ? 'ok ' : 'BAD'} dir (${r.displacement.join(', ')})  ${r.prompt} [seed ${r.seed}]`),
  });
  print(vs ? `${attention ?? 'sdpa'}: ` : '', res);
  let comparison: Record<string, unknown> | null = null;
  if (vs) {
    const ref = await evalDemo({ ...base, attention: vs });
    print(`${vs}: `, ref);
    const db = res.videos.map((v, i) => psnr(v.video, ref.videos[i]!.video, v.shape));
    const finite = db.filter(Number.isFinite);
    const mean = finite.length ? finite.reduce((a, b) => a + b, 0) / finite.length : Infinity;
    const min = finite.length ? Math.min(...finite) : Infinity;
    const pts = (k: 'seen' | 'heldout', m: 'colorAcc' | 'directionAcc') => 100 * (res.summary[k][m] - ref.summary[k][m]);
    console.log(`PSNR ${attention ?? 'sdpa'} vs ${vs}: mean ${mean.toFixed(2)} dB, min ${min.toFixed(2)} dB over ${db.length} videos (${db.length - finite.length} identical)`);
    console.log(`accuracy difference (points): seen color ${pts('seen', 'colorAcc').toFixed(1)}, direction ${pts('seen', 'directionAcc').toFixed(1)}; heldout color ${pts('heldout', 'colorAcc').toFixed(1)}, direction ${pts('heldout', 'directionAcc').toFixed(1)}`);
    comparison = { vs, reference: ref.summary, psnr_db: db, psnr_mean_db: mean, psnr_min_db: min };
  }
  const json = arg('--json');
  if (json) writeFileSync(json, JSON.stringify({ ...res, videos: undefined, comparison }, null, 1));
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
