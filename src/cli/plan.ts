// `npm run plan -- [--model DIR|PRESET] [--size WxH] [--frames N] [--level L | --budget 8GiB] [--json] [generate options] [key=value ...]`
// `npm run plan -- --table [--out docs/hardware.md]`
//
// Predicts what a `generate` run with the same settings needs — peak allocated and reserved GPU
// bytes per phase, by owner, and host RAM — with no GPU and no weight read (src/plan/plan.ts), in
// well under a second. With --budget it chooses the placement as `infer.vram_budget` does in a run.
// Exit status as generate: 0 ok, 2 bad usage/config (a budget that cannot be met included), 5 bad model.

import { writeFileSync } from 'node:fs';
import { parseArgs, usage } from './args.ts';
import { helpText } from '../config/settings.ts';
import { planRun, planLoadHost, placementSummary, PLAN_PHASES, type RunPlan } from '../plan/plan.ts';
import { modelShapes, PRESETS } from '../plan/shapes.ts';
import { choosePlacement } from '../plan/budget.ts';
import { estimateStep, RTX_4090 } from '../plan/cost.ts';
import { GENERIC_GPU, LAVAPIPE, type MetaDeviceSpec } from '../plan/meta-gpu.ts';
import { hardwareTable } from '../plan/table.ts';
import { ConfigError, fmtBytes } from '../util/errors.ts';
import { report } from './fail.ts';
import { hostAvailableBytes } from '../plan/preflight.ts';

const PLAN_USAGE = `usage: npm run plan -- [--model DIR|PRESET] [--size WxH] [--frames N] [--level L | --budget BYTES] [--json] [key=value ...]
       npm run plan -- --table [--out FILE]

Predicts the GPU memory (peak allocated and reserved, per phase and owner) and host RAM of a
generate run with the same settings, without a GPU and without reading weights.

plan options (besides every generate option and key):
  --model PRESET           also a preset: ${Object.keys(PRESETS).join(', ')} (shapes of the official configs)
  --level L                infer.diffusion.low_mem_level
  --budget BYTES           infer.vram_budget: choose the fastest placement that fits (e.g. 8GiB)
  --device generic|lavapipe  the device class the plan is for (default generic: a discrete GPU)
  --json                   one JSON object (peak_bytes, phases.<phase>.peak_bytes, host_bytes, placement, ...)
  --table                  the hardware table (VRAM x preset) as markdown; --out FILE writes it

`;

/** Preset request defaults: Wan's recommended 480p, 81 frames, 50 steps (used where the line sets none). */
const PRESET_REQUEST = { width: 832, height: 480, numFrames: 81, numInferenceSteps: 50, guidanceScale: 5 };
/** Wan 2.2 A14B's official recipe (wan/configs/wan_t2v_A14B.py), as a two-expert folder brings it (settings.ts) */
const PRESET_REQUEST_A14B = { ...PRESET_REQUEST, numInferenceSteps: 40, guidanceScale: 4, guidanceScale2: 3, shift: 12 };

interface PlanArgs {
  rest: string[];
  json: boolean;
  table: boolean;
  out: string | null;
  device: MetaDeviceSpec;
}

function splitArgs(argv: readonly string[]): PlanArgs {
  const rest: string[] = [];
  const a: PlanArgs = { rest, json: false, table: false, out: null, device: GENERIC_GPU };
  for (let i = 0; i < argv.length; i++) {
    const x = argv[i]!;
    const next = () => {
      const v = argv[++i];
      if (v === undefined) throw new ConfigError(`option ${x} needs a value (see --help)`);
      return v;
    };
    if (x === '--json') a.json = true;
    else if (x === '--table') a.table = true;
    else if (x === '--out') a.out = next();
    else if (x === '--level') rest.push(`infer.diffusion.low_mem_level=${next()}`);
    else if (x === '--budget') rest.push(`infer.vram_budget=${next()}`);
    else if (x === '--device') {
      const d = next();
      if (d !== 'generic' && d !== 'lavapipe') throw new ConfigError(`--device must be generic or lavapipe, got '${d}'`);
      a.device = d === 'generic' ? GENERIC_GPU : LAVAPIPE;
    } else rest.push(x);
  }
  return a;
}

function ownersLine(by: Record<string, number>, max = 6): string {
  return Object.entries(by)
    .sort((a, b) => b[1] - a[1])
    .slice(0, max)
    .map(([k, v]) => `${k} ${fmtBytes(v)}`)
    .join(', ');
}

export function planText(plan: RunPlan, reasons: string[] = [], notes: string[] = []): string {
  const s = plan.size;
  const est = estimateStep(plan, RTX_4090);
  const lines = [
    `plan for ${plan.model}: ${s.width}x${s.height}, ${s.frames} frames (latent ${s.latent.join('x')}, ${s.tokens.toLocaleString('en-US')} tokens), ${plan.steps} steps${plan.cfg ? ', CFG' : ''}`,
    `placement: ${placementSummary(plan)}`,
    ...reasons.map((r) => `  budget: ${r}`),
    ...notes.map((r) => `  ${r}`),
    '',
    `phase     peak allocated  peak reserved  largest owners at the peak`,
    ...PLAN_PHASES.map((ph) => {
      const p = plan.phases[ph];
      return `${ph.padEnd(9)} ${fmtBytes(p.peakBytes).padStart(14)} ${fmtBytes(p.peakReservedBytes).padStart(14)}  ${ownersLine(p.byOwner)}`;
    }),
    `run peak: ${fmtBytes(plan.peakBytes)} allocated, ${fmtBytes(plan.peakReservedBytes)} reserved (GPU)`,
    ...(plan.devices ?? []).map((d, k) => `cp device ${k}: ${plan.cp?.decodeTiles ? 'peak over the denoise and its decode tiles' : 'denoise peak'} ${fmtBytes(d.peakBytes)} allocated, ${fmtBytes(d.peakReservedBytes)} reserved${d.streamBytesPerStep ? `, streams ${fmtBytes(d.streamBytesPerStep)} per step` : ''}`),
    `host RAM: ${fmtBytes(plan.hostBytes)} (${Object.entries(plan.hostByPart)
      .filter(([, v]) => v > 0)
      .map(([k, v]) => `${k} ${fmtBytes(v)}`)
      .join(', ')}; plus the Node/Dawn runtime)`,
    `predicted on an ${est.gpu}: ${est.stepSeconds.toFixed(2)} s/step${est.exposedUploadSeconds > 0 ? ` (${est.exposedUploadSeconds.toFixed(2)} s of it uploads not hidden by compute)` : ''}, decode ${est.decodeSeconds.toFixed(1)} s`,
  ];
  return lines.join('\n');
}

export function planJson(plan: RunPlan, reasons: string[] = [], extra: Record<string, unknown> = {}): Record<string, unknown> {
  const est = estimateStep(plan, RTX_4090);
  return {
    model: plan.model,
    size: plan.size,
    steps: plan.steps,
    cfg: plan.cfg,
    peak_bytes: plan.peakBytes,
    peak_reserved_bytes: plan.peakReservedBytes,
    phases: Object.fromEntries(PLAN_PHASES.map((p) => [p, { peak_bytes: plan.phases[p].peakBytes, peak_reserved_bytes: plan.phases[p].peakReservedBytes, by_owner: plan.phases[p].byOwner }])),
    host_bytes: plan.hostBytes,
    host_by_part: plan.hostByPart,
    max_in_flight_dispatches: plan.maxInFlight,
    max_in_flight_at: plan.maxInFlightAt,
    placement: plan.placement,
    ...(plan.devices ? { cp: plan.cp, devices: plan.devices.map((d) => ({ adapter: d.adapter, peak_bytes: d.peakBytes, peak_reserved_bytes: d.peakReservedBytes, stream_bytes_per_step: d.streamBytesPerStep })) } : {}),
    ...(reasons.length ? { budget_reasons: reasons } : {}),
    ...extra,
    estimate: { gpu: est.gpu, step_seconds: est.stepSeconds, exposed_upload_seconds: est.exposedUploadSeconds, decode_seconds: est.decodeSeconds, label: 'predicted' },
  };
}

async function main(): Promise<number> {
  let args: PlanArgs;
  try {
    args = splitArgs(process.argv.slice(2));
    if (args.table) {
      const md = await hardwareTable({ device: args.device, onRow: (s) => process.stderr.write(`${s}\n`) });
      if (args.out) {
        writeFileSync(args.out, md);
        console.error(`wrote ${args.out}`);
      } else process.stdout.write(md);
      return 0;
    }
    const cli = parseArgs(args.rest);
    if (!cli) {
      process.stdout.write(PLAN_USAGE + usage().split('\n').slice(5).join('\n') + helpText() + '\n');
      return 0;
    }
    let settings = cli.settings;
    const model = await modelShapes(settings.load.model);
    if (PRESETS[model.name]) {
      // a preset has no smart_diffusion.json: Wan's recommended request where the line sets none
      const keyOf: Record<string, string> = { width: 'infer.width', height: 'infer.height', numFrames: 'infer.num_frames', numInferenceSteps: 'infer.num_inference_steps', guidanceScale: 'infer.guidance_scale', guidanceScale2: 'infer.guidance_scale_2', shift: 'infer.shift' };
      const req = { ...settings.request };
      for (const [f, v] of Object.entries(model.experts > 1 ? PRESET_REQUEST_A14B : PRESET_REQUEST)) if (!cli.explicit.has(keyOf[f]!)) (req as Record<string, unknown>)[f] = v;
      settings = { ...settings, request: req };
    }
    const t0 = performance.now();
    let plan!: RunPlan;
    let reasons: string[] = [];
    const place = async (st: typeof settings) => {
      if (st.load.vramBudget > 0) {
        const c = await choosePlacement(model, st, st.load.vramBudget, { device: args.device });
        plan = c.plan;
        reasons = c.reasons;
      } else plan = await planRun(model, st, { device: args.device });
    };
    // infer.weights_source=auto as `generate` resolves it (wan-pipeline.ts resolveWeightsSource):
    // disk when the weights this placement keeps in host memory exceed 80 % of the RAM available now
    const auto = settings.load.weightsSource === 'auto';
    let source: 'memory' | 'disk' = settings.load.weightsSource === 'disk' ? 'disk' : 'memory';
    const notes: string[] = [];
    if (auto) settings = { ...settings, load: { ...settings.load, weightsSource: 'memory' } };
    // without a budget the placement is the settings' own, so the load phase alone says what the
    // weights kept off the GPU need (src/plan/plan.ts planLoadHost) and the run is walked once;
    // a budget chooses the placement by walking, so that walk's own host bytes decide
    const heldOf = (h: Record<string, number>) => (h['dit weights'] ?? 0) + (h['text encoder weights'] ?? 0);
    let held = auto && !(settings.load.vramBudget > 0) ? heldOf(await planLoadHost(model, settings, { device: args.device })) : -1;
    const avail = hostAvailableBytes();
    if (held < 0 || held <= 0.8 * avail) await place(settings);
    if (auto) {
      if (held < 0) held = heldOf(plan.hostByPart);
      if (held > 0.8 * avail) {
        source = 'disk';
        await place({ ...settings, load: { ...settings.load, weightsSource: 'disk' } });
        notes.push(`weights: infer.weights_source=auto: disk (the weights kept off the GPU need ${fmtBytes(held)} of host memory, more than 80 % of the ${fmtBytes(avail)} available here): read from their files per use`);
      } else if (held > 0) notes.push(`weights: infer.weights_source=auto: memory (the weights kept off the GPU, ${fmtBytes(held)}, fit in 80 % of the ${fmtBytes(avail)} available here)`);
    } else if (source === 'disk') notes.push('weights: infer.weights_source=disk: read from their files per use');
    const ms = performance.now() - t0;
    if (args.json) process.stdout.write(JSON.stringify({ ...planJson(plan, reasons, { weights_source: source }), plan_ms: Math.round(ms) }) + '\n');
    else process.stdout.write(planText(plan, reasons, notes) + `\n(planned in ${ms.toFixed(0)} ms, no GPU, no weights read)\n`);
    return 0;
  } catch (e) {
    return report(e, process.argv.includes('--debug'));
  }
}

if (process.argv[1] && /plan\.ts$/.test(process.argv[1])) main().then((code) => process.exit(code));
