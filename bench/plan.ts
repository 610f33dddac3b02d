// `npm run bench:plan [-- --models tiny,demo,1.3b --large --json rows.json --no-md]`
//
// The memory planner's accuracy grid: for each row, a real run on this machine's adapter (a fresh
// GPU device per row, 2 denoise steps unless the row says otherwise) and the planner's prediction
// for the same settings (src/plan/plan.ts, walked for this adapter's limits and the prompts' token
// counts), phase by phase, allocated and reserved. Writes docs/plan-accuracy.md; --json writes the
// rows ({ predicted_bytes, measured_bytes, error, ... }). The 1.3B rows need the 3.4 GB random
// 1.3B-shaped model (generated once into .cache/bench-models, as bench:memory does) and up to
// ~16 GB of host memory: run this alone. --large adds the big rows (the largest 1.3B run that
// lavapipe finishes in ~15 minutes for one step).

import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Engine } from '../src/runtime/engine.ts';
import { WanPipeline, type WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { planRun, PLAN_PHASES, placementSummary, type PlanPhase } from '../src/plan/plan.ts';
import { shapesFromFolder } from '../src/plan/shapes.ts';
import { specFromCaps } from '../src/plan/meta-gpu.ts';
import { choosePlacement } from '../src/plan/budget.ts';
import { releaseMatmulWorkspace } from '../src/ops/matmul.ts';
import { encodePrompt, loadTokenizer } from '../src/io/tokenizer.ts';
import { randomModelFolder, WAN_1_3B_TRANSFORMER, WAN_VAE, umt5XxlConfig } from '../src/tools/random-model.ts';
import { tinyModelWithTokenizer } from '../test/helpers/models.ts';
import { fmtBytes } from '../src/util/errors.ts';
import { settingsForModel } from '../src/config/settings.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const arg = (n: string) => {
  const i = process.argv.indexOf(n);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
const PROMPT = 'a red circle moving right on a black background';

interface Case {
  model: string;
  dir: () => Promise<string> | string;
  label: string;
  opts: WanPipelineOptions;
  /** a budget as a fraction between the level-3 and level-0 predictions (the row runs infer.vram_budget) */
  budgetAt?: number;
}

interface Row {
  model: string;
  label: string;
  placement: string;
  predicted_bytes: number;
  measured_bytes: number;
  error: number;
  predicted_reserved_bytes: number;
  measured_reserved_bytes: number;
  reserved_error: number;
  budget_bytes?: number;
  phases: Record<PlanPhase, { predicted: number; measured: number; predicted_reserved: number; measured_reserved: number }>;
  plan_ms: number;
  run_seconds: number;
}

async function main(): Promise<void> {
  // --from-json FILE: write docs/plan-accuracy.md from the rows of an earlier (or interrupted) run
  const fromJson = arg('--from-json');
  if (fromJson) {
    const j = JSON.parse(readFileSync(fromJson, 'utf8')) as { adapter: string; rows: Row[] };
    writeFileSync(join(ROOT, 'docs', 'plan-accuracy.md'), renderDoc(j.rows, j.adapter));
    console.log('wrote docs/plan-accuracy.md');
    return;
  }
  const models = (arg('--models') ?? 'tiny,demo,1.3b').split(',');
  const large = process.argv.includes('--large');
  const demo = join(ROOT, 'weights', 'demo');
  const tok = join(ROOT, 'test', 'fixtures', 'tokenizer', 'legacy');
  const big = () => randomModelFolder(join(ROOT, '.cache', 'bench-models'), { transformer: WAN_1_3B_TRANSFORMER, vae: WAN_VAE, textEncoder: umt5XxlConfig(1), dtype: 'bf16', seed: 1234, tokenizerDir: tok }, (s) => console.log(`  ${s}`));
  const cases: Case[] = [];
  const steps2 = { numInferenceSteps: 2 };
  if (models.includes('tiny')) {
    const t = { textLen: 16, vaeTileOverlap: 0.25 };
    const d = { height: 128, width: 128, numFrames: 9, ...steps2 };
    for (const lvl of [0, 1, 2, 3]) cases.push({ model: 'tiny (golden)', dir: () => tinyModelWithTokenizer(), label: `level ${lvl}`, opts: { ...t, lowMemLevel: lvl, defaults: d } });
    cases.push({ model: 'tiny (golden)', dir: () => tinyModelWithTokenizer(), label: 'level 3, text encoder gpu-stream, 17 frames', opts: { ...t, lowMemLevel: 3, textEncoderDevice: 'gpu-stream', defaults: { ...d, numFrames: 17 } } });
  }
  if (models.includes('demo')) {
    for (const lvl of [0, 1, 2, 3]) cases.push({ model: 'demo', dir: () => demo, label: `level ${lvl}`, opts: { lowMemLevel: lvl, defaults: steps2 } });
    cases.push({ model: 'demo', dir: () => demo, label: 'level 1, tiling off', opts: { lowMemLevel: 1, vaeTiling: false, defaults: steps2 } });
    cases.push({ model: 'demo', dir: () => demo, label: 'level 3, 1 block resident, tiles of 4', opts: { lowMemLevel: 3, residentBlocks: 1, vaeTileSize: 4, defaults: steps2 } });
    cases.push({ model: 'demo', dir: () => demo, label: 'level 0, 96x160, 17 frames', opts: { lowMemLevel: 0, defaults: { ...steps2, width: 160, height: 96, numFrames: 17 } } });
    for (const at of [0.5, 0.1]) cases.push({ model: 'demo', dir: () => demo, label: `budget-chosen (${at} of the way from level 3 to level 0)`, opts: { defaults: steps2 }, budgetAt: at });
  }
  if (models.includes('1.3b')) {
    const o = { textLen: 512, vaeTileOverlap: 0.25 };
    const d = { height: 128, width: 128, numFrames: 5, numInferenceSteps: 1 };
    for (const lvl of [0, 1, 2, 3]) cases.push({ model: 'Wan2.1-1.3B shapes', dir: big, label: `level ${lvl}, 128x128, 5 frames`, opts: { ...o, lowMemLevel: lvl, defaults: d } });
    cases.push({ model: 'Wan2.1-1.3B shapes', dir: big, label: 'level 3, 10 blocks resident, 128x128', opts: { ...o, lowMemLevel: 3, residentBlocks: 10, defaults: d } });
    cases.push({ model: 'Wan2.1-1.3B shapes', dir: big, label: 'budget-chosen (0.5), 128x128', opts: { ...o, defaults: d }, budgetAt: 0.5 });
    if (large) {
      cases.push({ model: 'Wan2.1-1.3B shapes', dir: big, label: 'level 3, 320x320, 5 frames', opts: { ...o, lowMemLevel: 3, defaults: { ...d, width: 320, height: 320 } } });
      cases.push({ model: 'Wan2.1-1.3B shapes', dir: big, label: 'level 1, 320x320, 5 frames', opts: { ...o, lowMemLevel: 1, defaults: { ...d, width: 320, height: 320 } } });
    }
  }
  const rows: Row[] = [];
  let adapter = '';
  // --only TEXT: the rows whose model or label contains TEXT
  const only = arg('--only');
  for (const c of cases.filter((x) => !only || `${x.model} ${x.label}`.includes(only))) {
    const dir = await c.dir();
    const e = await Engine.create();
    adapter = e.adapterName;
    try {
      const device = specFromCaps(e.caps, e.limits);
      const shapes = await shapesFromFolder(dir);
      const tk = await loadTokenizer(shapes.tokenizerDir!);
      let opts = c.opts;
      let budget: number | undefined;
      if (c.budgetAt !== undefined) {
        // a budget between what level 3 and level 0 need at this size: the pipeline chooses
        const base = settingsForModel(dir, { ...opts, promptCache: false });
        const p0 = await planRun(shapes, base, { device });
        const p3 = await planRun(shapes, { ...base, load: { ...base.load, lowMemLevel: 3 } }, { device });
        budget = Math.round(p3.peakReservedBytes + c.budgetAt * (p0.peakReservedBytes - p3.peakReservedBytes));
        await choosePlacement(shapes, base, budget, { device });
        opts = { ...opts, vramBudget: budget };
      }
      releaseMatmulWorkspace(e);
      e.allocator.resetPeakMemoryStats();
      const pipe = await WanPipeline.fromPretrained(dir, { ...opts, engine: e, promptCache: false, profile: false });
      const load = e.allocator.stats();
      const t0 = performance.now();
      const r = await pipe.generate({ prompt: PROMPT });
      const secs = (performance.now() - t0) / 1000;
      const settings = { ...pipe.settings, request: { ...pipe.settings.request, prompt: PROMPT } };
      pipe.dispose();
      const n = (t: string) => encodePrompt(tk, t, settings.load.textLen).length;
      const tp = performance.now();
      const plan = await planRun(shapes, settings, { device, promptTokens: [n(PROMPT), n(settings.request.negativePrompt)], ...(budget ? { limitBytes: budget } : {}) });
      const planMs = performance.now() - tp;
      const measured = (p: PlanPhase) => (p === 'load' ? { a: load.peakAllocated, r: load.peakReserved } : { a: r.memory.perPhase[p]!.peakAllocated, r: r.memory.perPhase[p]!.peakReserved });
      const phases = Object.fromEntries(PLAN_PHASES.map((p) => [p, { predicted: plan.phases[p].peakBytes, measured: measured(p).a, predicted_reserved: plan.phases[p].peakReservedBytes, measured_reserved: measured(p).r }])) as Row['phases'];
      const mA = Math.max(...PLAN_PHASES.map((p) => phases[p].measured));
      const mR = Math.max(...PLAN_PHASES.map((p) => phases[p].measured_reserved));
      const row: Row = {
        model: c.model,
        label: c.label,
        placement: placementSummary(plan),
        predicted_bytes: plan.peakBytes,
        measured_bytes: mA,
        error: plan.peakBytes / mA - 1,
        predicted_reserved_bytes: plan.peakReservedBytes,
        measured_reserved_bytes: mR,
        reserved_error: plan.peakReservedBytes / mR - 1,
        ...(budget ? { budget_bytes: budget } : {}),
        phases,
        plan_ms: planMs,
        run_seconds: secs,
      };
      rows.push(row);
      const worstPhase = Math.max(...PLAN_PHASES.map((p) => Math.abs(phases[p].predicted / phases[p].measured - 1)));
      console.log(`${c.model} | ${c.label}: predicted ${fmtBytes(plan.peakBytes)} measured ${fmtBytes(mA)} (${(row.error * 100).toFixed(3)} %), reserved ${fmtBytes(plan.peakReservedBytes)} vs ${fmtBytes(mR)} (${(row.reserved_error * 100).toFixed(3)} %), worst phase ${(worstPhase * 100).toFixed(3)} %; plan ${planMs.toFixed(0)} ms, run ${secs.toFixed(1)} s`);
    } finally {
      releaseMatmulWorkspace(e);
      e.destroy();
    }
    const jsonPath = arg('--json');
    if (jsonPath) writeFileSync(jsonPath, JSON.stringify({ adapter, date: new Date().toISOString().slice(0, 10), rows }, null, 1));
  }
  if (!process.argv.includes('--no-md')) {
    writeFileSync(join(ROOT, 'docs', 'plan-accuracy.md'), renderDoc(rows, adapter));
    console.log('wrote docs/plan-accuracy.md');
  }
}

const pct = (x: number) => `${(x * 100).toFixed(3)} %`;

function renderDoc(rows: Row[], adapter: string): string {
  const worst = (f: (r: Row) => number) => rows.reduce((m, r) => Math.max(m, Math.abs(f(r))), 0);
  const worstPhase = rows.reduce((m, r) => Math.max(m, ...PLAN_PHASES.map((p) => Math.abs(r.phases[p].predicted / r.phases[p].measured - 1))), 0);
  return [
    '# Memory planner accuracy',
    '',
    '<!-- generated by `npm run bench:plan` (bench/plan.ts); edit the text there -->',
    `Written by \`npm run bench:plan -- --large --json rows.json\` (rendered with \`--from-json rows.json\`) on ${new Date().toISOString().slice(0, 10)}; adapter: ${adapter}.`,
    '',
    'Each row is a real run on this adapter (a fresh GPU device, the settings of the row, the prompt cache off) and',
    "the planner's prediction for the same settings (`npm run plan` with this adapter's limits and the prompts'",
    'token counts): peak allocated GPU bytes of the run (max over phases) and of each phase, and peak reserved bytes.',
    'The planner walks the run\'s own code on a device that holds no memory (src/plan/), so the prediction is the',
    "caching allocator's own accounting. Budget rows run with `infer.vram_budget` set between what level 3 and",
    'level 0 need at that size: the pipeline chose the placement, and the prediction is for that placement under that limit.',
    '',
    `**Rows: ${rows.length}. Worst run-peak error: allocated ${pct(worst((r) => r.error))}, reserved ${pct(worst((r) => r.reserved_error))}; worst phase (allocated): ${pct(worstPhase)}.** Target: every row within 5 %.`,
    '',
    '| model | run | placement | predicted peak | measured peak | error | predicted reserved | measured reserved | error | load / encode / denoise / decode (measured) | plan ms |',
    '|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|',
    ...rows.map(
      (r) =>
        `| ${r.model} | ${r.label}${r.budget_bytes ? ` (budget ${fmtBytes(r.budget_bytes)})` : ''} | ${r.placement} | ${fmtBytes(r.predicted_bytes)} | ${fmtBytes(r.measured_bytes)} | ${pct(r.error)} | ${fmtBytes(r.predicted_reserved_bytes)} | ${fmtBytes(r.measured_reserved_bytes)} | ${pct(r.reserved_error)} | ${PLAN_PHASES.map((p) => fmtBytes(r.phases[p].measured)).join(' / ')} | ${r.plan_ms.toFixed(0)} |`,
    ),
    '',
  ].join('\n');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
