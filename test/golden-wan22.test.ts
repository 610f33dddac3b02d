// check-golden on the Wan 2.2 A14B-style two-expert case (test/fixtures/golden/wan22-tiny, made by
// the official Wan 2.2 code @ 42bf4cfa in float32; see its README.md): transformer/ is the
// HIGH-noise expert (goldens `dit.*`), transformer_2/ the LOW-noise one (`dit_2.*`); each sampling
// step uses transformer/ with guidance_scale (4) while its integer timestep >= 0.875 × 1000, else
// transformer_2/ with guidance_scale_2 (3). Same tolerances as tiny: 1e-4 per component, 1e-3 end
// to end; the schedule rows are exact. A wrong rule (one expert throughout, swapped scales) must FAIL.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cpSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { getEngine } from './helpers/gpu.ts';
import { TINY } from './helpers/golden.ts';
import { checkGolden, openGoldenCase, caseExpertSchedule, describeExperts, type CheckRow } from '../src/golden/check.ts';
import { expertSchedule, EXPERT_NAMES } from '../src/pipeline/experts.ts';
import { createScheduler } from '../src/schedulers/index.ts';
import { CheckpointError } from '../src/util/errors.ts';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const W22 = join(ROOT, 'test', 'fixtures', 'golden', 'wan22-tiny');
const CLI = join(ROOT, 'src', 'cli', 'check-golden.ts');
const FIX_TIMESTEPS = [999, 983, 959, 922, 856, 705];

function summarize(rows: CheckRow[]): string {
  return rows
    .filter((r) => !r.pass)
    .map((r) => `${r.name}: abs ${r.maxAbs.toExponential(2)} rel ${r.maxRel.toExponential(2)} > ${r.tol}`)
    .join('\n');
}
const row = (rows: CheckRow[], name: string): CheckRow => {
  const r = rows.find((x) => x.name === name);
  if (!r) throw new Error(`no row ${name}`);
  return r;
};

let tmp: string;
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'sd-golden-wan22-'));
});
afterAll(() => {
  rmSync(tmp, { recursive: true, force: true });
});
let k = 0;
/**
 * A cheap variant of the case: every part linked to the fixture except golden.json (edited by
 * `editJson`) and model_index.json (copied, edited by `editIndex`); `drop` leaves parts out.
 */
function variant(o: { editJson?: (g: Record<string, any>) => void; editIndex?: (j: Record<string, unknown>) => void; drop?: string[] } = {}): string {
  const d = join(tmp, `case${k++}`);
  cpSync(join(W22, 'model_index.json'), join(d, 'model_index.json'));
  for (const p of ['golden.safetensors', 'transformer', 'transformer_2', 'vae', 'text_encoder', 'scheduler']) {
    if (!o.drop?.includes(p)) symlinkSync(join(W22, p), join(d, p));
  }
  const g = JSON.parse(readFileSync(join(W22, 'golden.json'), 'utf8'));
  o.editJson?.(g);
  writeFileSync(join(d, 'golden.json'), JSON.stringify(g));
  if (o.editIndex) {
    const j = JSON.parse(readFileSync(join(d, 'model_index.json'), 'utf8'));
    o.editIndex(j);
    writeFileSync(join(d, 'model_index.json'), JSON.stringify(j));
  }
  return d;
}
/** the full settings key that starts with `prefix` + ' ' (as golden.json spells it) */
const key = (g: Record<string, any>, prefix: string): string => Object.keys(g.settings).find((s) => s.startsWith(`${prefix} `))!;

describe('expertSchedule: the Wan 2.2 rule (t >= boundary_ratio × num_train_timesteps → transformer/)', () => {
  const o = { experts: 2, boundaryRatio: 0.875, guidance: 4, guidance2: 3 };
  it("the fixture's timesteps give [0,0,0,0,1,1] with scales [4,4,4,4,3,3]", () => {
    const s = expertSchedule(FIX_TIMESTEPS, o);
    expect(s.map((x) => x.expert)).toEqual([0, 0, 0, 0, 1, 1]);
    expect(s.map((x) => x.guidance)).toEqual([4, 4, 4, 4, 3, 3]);
    expect(s.map((x) => x.timestep)).toEqual(FIX_TIMESTEPS);
    expect(s.map((x) => x.step)).toEqual([0, 1, 2, 3, 4, 5]);
    expect(EXPERT_NAMES).toEqual(['transformer', 'transformer_2']);
  });
  it('the boundary is inclusive on the integer timestep', () => {
    expect(expertSchedule([875, 874], o).map((x) => x.expert)).toEqual([0, 1]);
    // a fractional timestep is truncated first, as the reference's int64
    expect(expertSchedule([875.9, 874.99], o).map((x) => x.expert)).toEqual([0, 1]);
    expect(expertSchedule([875.9, 874.99], o).map((x) => x.timestep)).toEqual([875, 874]);
    // boundary = ratio × num_train_timesteps
    expect(expertSchedule([1000, 999], { ...o, boundaryRatio: 0.5, numTrainTimesteps: 2000 }).map((x) => x.expert)).toEqual([0, 1]);
    // ratio 0: transformer/ throughout; ratio 1: transformer_2/ throughout (t < 1000)
    expect(expertSchedule(FIX_TIMESTEPS, { ...o, boundaryRatio: 0 }).every((x) => x.expert === 0)).toBe(true);
    expect(expertSchedule(FIX_TIMESTEPS, { ...o, boundaryRatio: 1 }).every((x) => x.expert === 1)).toBe(true);
  });
  it('guidance2 -1 means the same scale as guidance; one expert always uses expert 0', () => {
    expect(expertSchedule(FIX_TIMESTEPS, { ...o, guidance2: -1 }).map((x) => x.guidance)).toEqual([4, 4, 4, 4, 4, 4]);
    const one = expertSchedule(FIX_TIMESTEPS, { ...o, experts: 1 });
    expect(one.map((x) => x.expert)).toEqual([0, 0, 0, 0, 0, 0]);
    expect(one.map((x) => x.guidance)).toEqual([4, 4, 4, 4, 4, 4]);
  });
  it("on the scheduler's own timesteps it reproduces golden.json's expert_schedule", () => {
    const g = JSON.parse(readFileSync(join(W22, 'golden.json'), 'utf8'));
    const sched = createScheduler('unipc', { steps: 6, shift: 12 });
    expect(Array.from(sched.timesteps)).toEqual(FIX_TIMESTEPS);
    const s = expertSchedule(sched.timesteps, o);
    const want = g.settings.expert_schedule as Array<{ step: number; timestep: number; expert: string; guide_scale: number }>;
    expect(s.map((x) => [x.step + 1, x.timestep, EXPERT_NAMES[x.expert], x.guidance])).toEqual(want.map((w) => [w.step, w.timestep, w.expert, w.guide_scale]));
  });
});

describe('golden: Wan 2.2 two-expert case, opening and settings', () => {
  it('the fixture is intact (golden.json files: bytes and sha256)', () => {
    const g = JSON.parse(readFileSync(join(W22, 'golden.json'), 'utf8'));
    for (const [rel, f] of Object.entries(g.files as Record<string, { bytes: number; sha256: string }>)) {
      const buf = readFileSync(join(W22, rel));
      expect(buf.length, rel).toBe(f.bytes);
      expect(createHash('sha256').update(buf).digest('hex'), rel).toBe(f.sha256);
    }
    expect(g.generated_by.wan_commit).toBe('42bf4cfaa384bc21833865abc2f9e6c0e67233dc');
  });
  it('reads guidance_scale / guidance_scale_2 (not the official list guide_scale), the boundary and num_train_timesteps', async () => {
    const c = await openGoldenCase(W22);
    await c.gold.close();
    expect([c.experts, c.guide, c.guide2, c.boundaryRatio, c.numTrainTimesteps, c.steps, c.shift, c.textLen]).toEqual([2, 4, 3, 0.875, 1000, 6, 12, 16]);
    expect(c.folder.transformer2?.name).toBe('transformer_2');
    expect(caseExpertSchedule(c).map((s) => s.expert)).toEqual([0, 0, 0, 0, 1, 1]);
    expect(describeExperts(c)).toBe('experts: transformer x4 (g 4, t 999..922), transformer_2 x2 (g 3, t 856..705); boundary_ratio 0.875 (transformer/ while t >= 875)');
    expect(describeExperts(c, 0)).toMatch(/^experts: transformer x6 \(g 4, t 999\.\.705\);/);
    // one-expert cases are unchanged: guide_scale, one DiT, no expert line
    const t = await openGoldenCase(TINY);
    await t.gold.close();
    const tinyJson = JSON.parse(readFileSync(join(TINY, 'golden.json'), 'utf8'));
    expect([t.experts, t.guide, t.guide2]).toEqual([1, tinyJson.settings.guide_scale, tinyJson.settings.guide_scale]);
    expect(t.folder.transformer2).toBeNull();
    expect(describeExperts(t)).toBeNull();
    expect(caseExpertSchedule(t).every((s) => s.expert === 0 && s.guidance === t.guide)).toBe(true);
  });
  it("setting names match up to a space: 'guidance_scale' never reads 'guidance_scale_2 (…)'", async () => {
    // only guidance_scale_2 given: guidance_scale falls back to the default (5), not to 3
    let d = variant({
      editJson: (g) => {
        delete g.settings[key(g, 'guidance_scale')];
        delete g.settings[key(g, 'guide_scale')];
      },
    });
    let c = await openGoldenCase(d);
    await c.gold.close();
    expect([c.guide, c.guide2]).toEqual([5, 3]);
    // guidance_scale_2 listed BEFORE guidance_scale: still 4 / 3
    d = variant({
      editJson: (g) => {
        const k2 = key(g, 'guidance_scale_2');
        const k1 = key(g, 'guidance_scale');
        const v2 = g.settings[k2];
        const v1 = g.settings[k1];
        delete g.settings[k1];
        delete g.settings[k2];
        g.settings = { [k2]: v2, [k1]: v1, ...g.settings };
      },
    });
    c = await openGoldenCase(d);
    await c.gold.close();
    expect([c.guide, c.guide2]).toEqual([4, 3]);
    // only the official tuple (low_noise, high_noise): its SECOND entry is transformer/'s
    d = variant({
      editJson: (g) => {
        delete g.settings[key(g, 'guidance_scale')];
        delete g.settings[key(g, 'guidance_scale_2')];
      },
    });
    c = await openGoldenCase(d);
    await c.gold.close();
    expect([c.guide, c.guide2]).toEqual([4, 3]);
    // the boundary from settings; without it, model_index.json's
    d = variant({ editJson: (g) => (g.settings[key(g, 'boundary_ratio')] = 0) });
    c = await openGoldenCase(d);
    await c.gold.close();
    expect(c.boundaryRatio).toBe(0);
    d = variant({
      editJson: (g) => delete g.settings[key(g, 'boundary_ratio')],
      editIndex: (j) => (j.boundary_ratio = 0.9),
    });
    c = await openGoldenCase(d);
    await c.gold.close();
    expect(c.boundaryRatio).toBe(0.9);
  });
  it('bad or contradicting settings, and a two-expert case without transformer_2/, are one-line CheckpointErrors', async () => {
    const err = async (d: string): Promise<string> => {
      try {
        const c = await openGoldenCase(d);
        await c.gold.close();
      } catch (e) {
        expect(e).toBeInstanceOf(CheckpointError);
        expect((e as Error).message.split('\n')).toHaveLength(1);
        return (e as Error).message;
      }
      throw new Error('expected openGoldenCase to fail');
    };
    expect(await err(variant({ editJson: (g) => (g.settings[key(g, 'guide_scale')] = [4, 3]) }))).toMatch(/settings\["guide_scale"\] must be the pair \(low_noise, high_noise\) = \(guidance_scale_2, guidance_scale\) = \[3, 4\].*got \[4,3\]/);
    expect(await err(variant({ editJson: (g) => (g.settings[key(g, 'guide_scale')] = [1, 2, 3]) }))).toMatch(/settings\["guide_scale"\] must be a number in 0\.\.100 or the official pair/);
    expect(await err(variant({ editJson: (g) => (g.settings[key(g, 'guidance_scale_2')] = 'x') }))).toMatch(/settings\["guidance_scale_2"\] must be a number in 0\.\.100, got "x"/);
    expect(await err(variant({ editJson: (g) => (g.settings[key(g, 'boundary_ratio')] = 2) }))).toMatch(/settings\["boundary_ratio"\] must be a number in 0\.\.1/);
    const noT2 = variant({
      drop: ['transformer_2'],
      editIndex: (j) => {
        delete j.transformer_2;
        delete j.boundary_ratio;
      },
    });
    expect(await err(noT2)).toMatch(/golden.json: a two-expert \(Wan 2\.2 A14B\) case \(it lists dit_2\..*\) but the model folder .* has no transformer_2\/ \(the low-noise expert\); copy transformer_2\//);
    // the CLI: the same line, exit 5, before the GPU starts
    const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, noT2], { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stderr).toBe(5);
    const lines = r.stderr.split('\n').filter((l) => l.trim() !== '' && !/^Warning: /.test(l));
    expect(lines, r.stderr).toHaveLength(1);
    expect(lines[0]).toMatch(/has no transformer_2\//);
  });
});

describe('golden: Wan 2.2 two-expert case on the engine', () => {
  it('f32: every tensor within 1e-4 per component and 1e-3 end to end; the schedule exactly', async () => {
    const e = await getEngine();
    const rows = await checkGolden(e, W22);
    const names = rows.map((r) => r.name);
    for (const n of [
      'sched.timesteps', 'sched.sigmas', 't5.prompt.context', 't5.negative.context',
      'dit.t999.block0_self_attn_out', 'dit.t999.out', 'dit.t437_5.out',
      'dit_2.t999.context_embedded', 'dit_2.t999.time_sinusoid', 'dit_2.t999.e0', 'dit_2.t999.block1_out', 'dit_2.t999.out', 'dit_2.t437_5.out',
      'vae.video', 'sample.use_transformer_2', 'sample.guide_scale', 'sample.step1.noise_pred', 'sample.step5.noise_pred', 'sample.step5.noise_pred_cond',
      'sample.step6.x0_pred', 'sample.final_latent', 'sample.video',
    ]) {
      expect(names).toContain(n);
    }
    // every golden tensor the engine can produce is compared (inputs and host-only tensors aside)
    expect(rows.length).toBeGreaterThanOrEqual(81);
    expect(summarize(rows)).toBe('');
    expect(rows.filter((r) => r.group === 'dit' || r.group === 't5' || r.group === 'vae').every((r) => r.maxAbs <= 1e-4)).toBe(true);
    for (const n of ['sample.use_transformer_2', 'sample.guide_scale']) expect([row(rows, n).maxAbs, row(rows, n).tol]).toEqual([0, 0]);
    // the two experts really differ (a check that ran transformer/ twice would not pass dit_2.*)
    expect(rows.filter((r) => r.name.startsWith('dit_2.')).length).toBeGreaterThanOrEqual(13);
  });

  it('a wrong rule FAILS: transformer/ (and guidance 4) on every step', async () => {
    const e = await getEngine();
    const rows = await checkGolden(e, W22, { groups: ['sample'], boundaryRatio: 0 });
    // steps 1-4 are the same as the right rule's
    for (let i = 1; i <= 4; i++) expect(row(rows, `sample.latent_after_step${i}`).pass).toBe(true);
    // from the switch on, everything is off
    for (const n of ['sample.use_transformer_2', 'sample.guide_scale', 'sample.step5.noise_pred_cond', 'sample.step5.noise_pred', 'sample.final_latent', 'sample.video']) {
      expect(row(rows, n).pass, n).toBe(false);
    }
    expect(row(rows, 'sample.final_latent').maxAbs).toBeGreaterThan(1e-2);
  });

  it("a wrong rule FAILS: golden.json's boundary_ratio 0.0 (read from the case) and swapped guidance scales", async () => {
    const e = await getEngine();
    let rows = await checkGolden(e, variant({ editJson: (g) => (g.settings[key(g, 'boundary_ratio')] = 0.0) }), { groups: ['sample'] });
    expect(row(rows, 'sample.use_transformer_2').pass).toBe(false);
    expect(row(rows, 'sample.final_latent').pass).toBe(false);
    // the official tuple read in the wrong order: guidance 3 on transformer/, 4 on transformer_2/
    rows = await checkGolden(
      e,
      variant({
        editJson: (g) => {
          g.settings[key(g, 'guidance_scale')] = 3;
          g.settings[key(g, 'guidance_scale_2')] = 4;
          g.settings[key(g, 'guide_scale')] = [4, 3];
        },
      }),
      { groups: ['sample'] },
    );
    expect(row(rows, 'sample.use_transformer_2').pass).toBe(true);
    expect(row(rows, 'sample.guide_scale').pass).toBe(false);
    expect(row(rows, 'sample.step1.noise_pred_cond').pass).toBe(true); // the DiT is right...
    expect(row(rows, 'sample.step1.noise_pred').pass).toBe(false); // ...the guidance is not
    expect(row(rows, 'sample.final_latent').pass).toBe(false);
  });

  it('npm run check-golden -- test/fixtures/golden/wan22-tiny exits 0 and prints the expert schedule', { timeout: 240_000 }, () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, W22], { cwd: ROOT, env: process.env, encoding: 'utf8', timeout: 230_000 });
    const all = r.stdout + r.stderr;
    expect(r.status, all).toBe(0);
    expect(r.stdout).toMatch(/^two experts .*experts: transformer x4 \(g 4, t 999\.\.922\), transformer_2 x2 \(g 3, t 856\.\.705\); boundary_ratio 0\.875/m);
    const m = /^(\d+) passed, 0 failed/m.exec(r.stdout);
    expect(m, all).not.toBeNull();
    expect(Number(m![1])).toBeGreaterThanOrEqual(81);
    expect(r.stdout).not.toMatch(/FAIL/);
    for (const n of ['dit_2\\.t999\\.out', 'sample\\.use_transformer_2', 'sample\\.step5\\.noise_pred', 'sample\\.video']) expect(r.stdout).toMatch(new RegExp(`^${n}\\s.*PASS$`, 'm'));
  });
});
