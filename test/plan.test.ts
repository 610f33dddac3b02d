// The memory planner (src/plan/): its predictions against real runs of the same settings (the fast
// part of `npm run bench:plan`'s grid), the shortcuts it takes (decode frames, denoise steps), the
// budget that places, and the `npm run plan` command.
import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import { cpSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { getEngine } from './helpers/gpu.ts';
import { tinyModelWithTokenizer } from './helpers/models.ts';
import { WanPipeline, type WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { settingsForModel } from '../src/config/settings.ts';
import type { Settings } from '../src/config/schema.ts';
import { planRun, PLAN_PHASES, type PlanPhase, type RunPlan } from '../src/plan/plan.ts';
import { shapesFromFolder, PRESETS, type ModelShapes } from '../src/plan/shapes.ts';
import { specFromCaps } from '../src/plan/meta-gpu.ts';
import { choosePlacement } from '../src/plan/budget.ts';
import { releaseMatmulWorkspace } from '../src/ops/matmul.ts';
import { encodePrompt, loadTokenizer } from '../src/io/tokenizer.ts';
import { ConfigError } from '../src/util/errors.ts';
import { hostAvailableBytes } from '../src/plan/preflight.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const DEMO = join(ROOT, 'weights', 'demo');
const TINY = tinyModelWithTokenizer();
/** the two-expert golden case (Wan 2.2) with a tokenizer */
const WAN22 = (() => {
  const d = tinyModelWithTokenizer();
  rmSync(d, { recursive: true, force: true });
  cpSync(join(ROOT, 'test', 'fixtures', 'golden', 'wan22-tiny'), d, { recursive: true });
  cpSync(join(ROOT, 'test', 'fixtures', 'tokenizer', 'legacy'), join(d, 'tokenizer'), { recursive: true });
  writeFileSync(join(d, 'smart_diffusion.json'), JSON.stringify({ text_len: 16, height: 64, width: 64, num_frames: 9 }));
  return d;
})();
const PROMPT = 'a red circle moving right';

interface Measured {
  phases: Record<PlanPhase, { allocated: number; reserved: number }>;
  settings: Settings;
}

/** A real run (2 steps) on this machine's engine: each phase's peak allocated and reserved bytes. */
async function measure(model: string, opts: WanPipelineOptions): Promise<Measured> {
  const e = await getEngine();
  releaseMatmulWorkspace(e);
  e.allocator.emptyCache();
  e.allocator.resetPeakMemoryStats();
  const pipe = await WanPipeline.fromPretrained(model, { ...opts, engine: e, promptCache: false });
  const load = e.allocator.stats();
  try {
    const r = await pipe.generate({ prompt: PROMPT });
    const pp = r.memory.perPhase;
    const ph = (p: PlanPhase) => ({ allocated: pp[p]!.peakAllocated, reserved: pp[p]!.peakReserved });
    return { phases: { load: { allocated: load.peakAllocated, reserved: load.peakReserved }, encode: ph('encode'), denoise: ph('denoise'), decode: ph('decode') }, settings: { ...pipe.settings, request: { ...pipe.settings.request, prompt: PROMPT } } };
  } finally {
    pipe.dispose();
    e.allocator.limitBytes = Infinity;
  }
}

async function predict(model: string, settings: Settings, extra: Partial<Parameters<typeof planRun>[2]> = {}): Promise<RunPlan> {
  const e = await getEngine();
  const shapes = await shapesFromFolder(model);
  const tok = await loadTokenizer(shapes.tokenizerDir!);
  const n = (t: string) => encodePrompt(tok, t, settings.load.textLen).length;
  return planRun(shapes, settings, { device: specFromCaps(e.caps, e.limits), promptTokens: [n(settings.request.prompt), n(settings.request.negativePrompt)], ...extra });
}

function expectClose(plan: RunPlan, real: Measured, tol: number): void {
  for (const p of PLAN_PHASES) {
    const pr = plan.phases[p];
    const m = real.phases[p];
    expect(Math.abs(pr.peakBytes / m.allocated - 1), `${p} allocated: predicted ${pr.peakBytes}, measured ${m.allocated}`).toBeLessThanOrEqual(tol);
    expect(Math.abs(pr.peakReservedBytes / m.reserved - 1), `${p} reserved: predicted ${pr.peakReservedBytes}, measured ${m.reserved}`).toBeLessThanOrEqual(tol);
  }
}

describe('memory planner vs real runs', () => {
  const cases: Array<[string, string, WanPipelineOptions]> = [
    ['demo', DEMO, { lowMemLevel: 0, defaults: { numInferenceSteps: 2 } }],
    ['demo', DEMO, { lowMemLevel: 1, defaults: { numInferenceSteps: 2 } }],
    ['demo', DEMO, { lowMemLevel: 2, defaults: { numInferenceSteps: 2 } }],
    ['demo', DEMO, { lowMemLevel: 3, defaults: { numInferenceSteps: 2 } }],
    ['demo', DEMO, { lowMemLevel: 3, residentBlocks: 1, vaeTiling: false, defaults: { numInferenceSteps: 2 } }],
    ['tiny', TINY, { lowMemLevel: 1, textLen: 16, vaeTileSize: 8, defaults: { height: 128, width: 128, numFrames: 17, numInferenceSteps: 2 } }],
    ['tiny', TINY, { lowMemLevel: 3, textLen: 16, textEncoderDevice: 'gpu-stream', defaults: { height: 128, width: 96, numFrames: 9, numInferenceSteps: 2 } }],
  ];
  // Wan 2.2's two experts: 6 steps cross the boundary (the swap is inside the measured denoise)
  const w22: WanPipelineOptions['defaults'] = { numInferenceSteps: 6 };
  cases.push(
    ['wan22-tiny', WAN22, { lowMemLevel: 0, expertsResident: 'both', defaults: w22 }],
    ['wan22-tiny', WAN22, { lowMemLevel: 0, defaults: w22 }],
    ['wan22-tiny', WAN22, { lowMemLevel: 3, defaults: w22 }],
    // step caching keeps the blocks' residual(s) and, in a computed step, the stream's copy
    ['demo', DEMO, { lowMemLevel: 3, config: { 'infer.cache.mode': 'flex' }, defaults: { numInferenceSteps: 4, height: 256, width: 256 } }],
    ['demo', DEMO, { lowMemLevel: 1, config: { 'infer.cache.mode': 'teacache' }, defaults: { numInferenceSteps: 4, height: 256, width: 256 } }],
  );
  for (const [name, model, opts] of cases) {
    it(`${name} ${JSON.stringify({ ...opts, defaults: undefined })}: every phase's peak allocated and reserved within 1 %`, async () => {
      const real = await measure(model, opts);
      const plan = await predict(model, real.settings);
      expectClose(plan, real, 0.01);
    });
  }
});

describe('two experts (Wan 2.2) in the plan', () => {
  it('the GPU holds one expert unless both are asked for; host memory holds both experts at every level but both-resident', async () => {
    const shapes = await shapesFromFolder(WAN22);
    expect(shapes.experts).toBe(2);
    const plan = async (o: WanPipelineOptions) => planRun(shapes, settingsForModel(WAN22, { ...o, defaults: { numInferenceSteps: 6 } }));
    const active0 = await plan({ lowMemLevel: 0 });
    const both0 = await plan({ lowMemLevel: 0, expertsResident: 'both' });
    const active3 = await plan({ lowMemLevel: 3 });
    const d = active0.phases.denoise.byOwner;
    const oneExpert = (d['dit.blocks'] ?? 0) + (d['dit.other'] ?? 0);
    expect(oneExpert).toBeGreaterThan(0);
    expect(active0.phases.denoise.byOwner.dit_2 ?? 0).toBe(0);
    expect(both0.phases.denoise.byOwner.dit_2).toBe(oneExpert);
    expect(both0.peakBytes - active0.peakBytes).toBe(oneExpert);
    expect(both0.hostByPart['dit weights']).toBe(0);
    expect(active0.hostByPart['dit weights']).toBe(2 * oneExpert);
    expect(active3.hostByPart['dit weights']).toBe(2 * oneExpert);
  });

  it('a budget for a two-expert model tries both experts resident first, then one', async () => {
    const shapes = await shapesFromFolder(WAN22);
    const s = settingsForModel(WAN22, { defaults: { numInferenceSteps: 6 } });
    const big = await choosePlacement(shapes, s, 2 ** 34);
    expect(big.settings.load.expertsResident).toBe('both');
    expect(big.reasons[0]).toMatch(/^level 0, both experts resident: .* fits, chosen/);
    const both = await planRun(shapes, { ...s, load: { ...s.load, expertsResident: 'both' } });
    const tight = await choosePlacement(shapes, s, both.peakBytes - 1);
    expect(tight.settings.load.expertsResident).toBe('active');
    expect(tight.reasons[0]).toMatch(/^level 0, both experts resident: .* too big/);
  });
});

describe('the planner\'s shortcuts are exact', () => {
  it('decoding 4 latent frames gives the peaks of decoding all of them (tiled and whole-frame)', async () => {
    for (const tiling of [true, false]) {
      const s = settingsForModel(DEMO, { lowMemLevel: 1, vaeTiling: tiling, defaults: { numFrames: 37, numInferenceSteps: 1 } });
      const short = await predict(DEMO, s, { decodeFrames: 4 });
      const full = await predict(DEMO, s, { decodeFrames: 1000 });
      expect(short.phases.decode).toEqual(full.phases.decode);
      expect(short.hostByPart['decode buffers']).toBeCloseTo(full.hostByPart['decode buffers']!, -4);
    }
  });
  it('walking 2 denoise steps gives the peaks of walking 6', async () => {
    const s = settingsForModel(DEMO, { lowMemLevel: 3, defaults: { numInferenceSteps: 6 } });
    const two = await predict(DEMO, s, { denoiseSteps: 2 });
    const six = await predict(DEMO, s, { denoiseSteps: 6 });
    expect(two.phases.denoise).toEqual(six.phases.denoise);
  });
});

describe('presets', () => {
  const s480 = (level: number): Settings => {
    const s = settingsForModel(DEMO, { lowMemLevel: level, weightDtype: 'bf16', promptCache: false, defaults: { width: 832, height: 480, numFrames: 81, numInferenceSteps: 50 } });
    return s;
  };
  it('each preset plans at 480p, 81 frames; level 3 needs less than level 2, level 2 less than level 0', async () => {
    for (const [name, make] of Object.entries(PRESETS)) {
      const m: ModelShapes = make();
      const l0 = await planRun(m, s480(0));
      const l2 = await planRun(m, s480(2));
      const l3 = await planRun(m, s480(3));
      expect(l0.size.tokens, name).toBe(32760);
      expect(l3.peakBytes, name).toBeLessThan(l2.peakBytes);
      expect(l2.peakBytes, name).toBeLessThan(l0.peakBytes);
      expect(l3.hostByPart['dit weights'], name).toBeGreaterThan(0);
      // level 2 keeps the DiT on the GPU: no host copy, except Wan 2.2's experts (both wait in host memory, one runs)
      expect(l2.hostByPart['dit weights'], name).toBe(m.experts > 1 ? l3.hostByPart['dit weights'] : 0);
      for (const p of PLAN_PHASES) expect(l3.phases[p].peakBytes, `${name} ${p}`).toBeGreaterThan(0);
    }
  });
});

describe('a VRAM budget that places', () => {
  it('chooses a placement whose predicted peak reserved fits, the fastest first, and a run under it stays under the budget', async () => {
    const base = settingsForModel(DEMO, { promptCache: false, defaults: { numInferenceSteps: 2 } });
    const e = await getEngine();
    const device = specFromCaps(e.caps, e.limits);
    const shapes = await shapesFromFolder(DEMO);
    const l0 = await planRun(shapes, base, { device });
    const l3 = await planRun(shapes, { ...base, load: { ...base.load, lowMemLevel: 3 } }, { device });
    // a budget above level 0's needs keeps level 0; below level 0's live tensors, it must move down
    const big = await choosePlacement(shapes, base, l0.peakReservedBytes + 2 ** 20, { device });
    expect(big.plan.placement.level).toBe(0);
    for (const budget of [Math.round((l0.peakBytes + l3.peakBytes) / 2), Math.round(l3.peakReservedBytes * 1.02)]) {
      const c = await choosePlacement(shapes, base, budget, { device });
      expect(c.plan.peakReservedBytes).toBeLessThanOrEqual(budget);
      expect(c.plan.placement.level).toBeGreaterThan(0);
      const real = await measure(DEMO, { vramBudget: budget, defaults: { numInferenceSteps: 2 } });
      for (const p of PLAN_PHASES) expect(real.phases[p].reserved, `${p} at budget ${budget}`).toBeLessThanOrEqual(budget);
      expect(real.settings.load.lowMemLevel).toBe(c.plan.placement.level);
      expect(real.settings.load.residentBlocks).toBe(c.settings.load.residentBlocks);
    }
  });
  it('refuses a budget that cannot be met, naming the smallest budget and the largest size', async () => {
    const base = settingsForModel(DEMO, { promptCache: false });
    const shapes = await shapesFromFolder(DEMO);
    const err = await choosePlacement(shapes, base, 2 ** 20).catch((x: unknown) => x);
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as Error).message).toMatch(/needs a budget of at least [\d.]+ MiB/);
    expect((err as Error).message).toMatch(/No size fits|largest 16:9 size/);
  });
});

describe('npm run plan', () => {
  const plan = (...args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'src', 'cli', 'plan.ts'), ...args], { cwd: ROOT, encoding: 'utf8', timeout: 120_000 });
  it('--json prints one object with the run peak, the phase peaks, host bytes and the placement', () => {
    const r = plan('--model', 'wan2.1-t2v-1.3b', '--size', '832x480', '--frames', '81', '--level', '3', '--json');
    expect(r.status, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as Record<string, any>;
    expect(j.peak_bytes).toBeGreaterThan(0);
    for (const p of PLAN_PHASES) expect(j.phases[p].peak_bytes).toBeGreaterThan(0);
    expect(j.peak_bytes).toBe(Math.max(...PLAN_PHASES.map((p) => j.phases[p].peak_bytes)));
    expect(j.host_bytes).toBeGreaterThan(0);
    expect(j.placement.level).toBe(3);
    expect(j.size.tokens).toBe(32760);
  });
  it('infer.weights_source: auto resolves as generate does (disk when the weights kept off the GPU exceed 80 % of the RAM available); disk plans no host weights and a 256 MiB chunked staging ring at 14B shapes', () => {
    const run = (...extra: string[]) => {
      const r = plan('--model', 'wan2.1-t2v-14b', '--size', '832x480', '--frames', '81', '--level', '3', '--json', ...extra);
      expect(r.status, r.stderr).toBe(0);
      return JSON.parse(r.stdout) as Record<string, any>;
    };
    const mem = run('infer.weights_source=memory');
    const disk = run('infer.weights_source=disk');
    const auto = run();
    expect(mem.weights_source).toBe('memory');
    expect(disk.weights_source).toBe('disk');
    const held = mem.host_by_part['dit weights'] + mem.host_by_part['text encoder weights'];
    const avail = hostAvailableBytes();
    // (MemAvailable moves between the two reads: decide only away from the 80 % line)
    if (held > 0.85 * avail) expect(auto.weights_source).toBe('disk');
    if (held < 0.75 * avail) expect(auto.weights_source).toBe('memory');
    expect(disk.host_by_part['dit weights']).toBe(0);
    expect(mem.host_by_part['dit weights']).toBeGreaterThan(25 * 2 ** 30);
    // 670 MiB blocks: whole-block staging (two) in memory mode, 4 x 64 MiB chunks from disk
    expect(disk.host_by_part['staging ring']).toBe(256 * 2 ** 20);
    expect(mem.host_by_part['staging ring']).toBeGreaterThan(2 * 600 * 2 ** 20);
    expect(disk.peak_bytes).toBe(mem.peak_bytes);
  });
  it('defaults to the demo model and refuses an impossible budget with exit 2 and one line', () => {
    const ok = plan('--steps', '3');
    expect(ok.status, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/weights\/demo/);
    const bad = plan('--budget', '1MiB');
    expect(bad.status).toBe(2);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    expect(bad.stderr).toMatch(/infer\.vram_budget=1\.0 MiB cannot hold/);
  });
});
