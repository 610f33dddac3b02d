// Runs every component of the engine on a golden case folder (a diffusers-layout model folder +
// golden.json + golden.safetensors produced by the official Wan 2.1 code) and compares every
// tensor listed in golden.json that the engine can produce. Works on any case of this format
// (other dims, head counts, odd lengths, non-square latents): everything is read from the case.
//
// Two-expert cases (Wan 2.2 A14B, e.g. test/fixtures/golden/wan22-tiny): the folder has
// transformer/ (high noise, golden prefix `dit.`) and transformer_2/ (low noise, `dit_2.`); the
// sampling loop picks each step's expert and guidance scale with expertSchedule (the one
// implementation of the rule) and reports the schedule itself (`sample.use_transformer_2`,
// `sample.guide_scale`, exact) and the guided prediction (`sample.step{k}.noise_pred`).

import { join } from 'node:path';
import { promises as fsp } from 'node:fs';
import type { Engine } from '../runtime/engine.ts';
import { Tensor } from '../tensor/tensor.ts';
import { Checkpoint, readTensor } from '../io/checkpoint.ts';
import { oneLine } from '../io/safetensors.ts';
import { openModelFolder, fsReason, type ModelFolder } from '../io/model-folder.ts';
import { loadModuleFrom, type WeightDtype } from '../nn/load.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../models/wan_dit/model.ts';
import { ropeTables, timestepSinusoid } from '../models/wan_dit/host.ts';
import { UMT5EncoderModel, umt5DimsFromConfig } from '../models/umt5/model.ts';
import { t5RelativeBuckets } from '../models/umt5/buckets.ts';
import { WanVaeDecoder, vaeDimsFromConfig } from '../models/wan_vae/model.ts';
import { createScheduler, cfgCombine } from '../schedulers/index.ts';
import { CheckpointError } from '../util/errors.ts';
import { expertSchedule, EXPERT_NAMES, type ExpertStep } from '../pipeline/experts.ts';

export interface CheckRow {
  name: string;
  group: string;
  maxAbs: number;
  maxRel: number;
  tol: number;
  pass: boolean;
  note?: string;
}

/** The component groups a check can be limited to (`--groups`). */
export const CHECK_GROUPS = ['sched', 'host', 't5', 'dit', 'vae', 'sample'] as const;
export type CheckGroup = (typeof CHECK_GROUPS)[number];

export interface CheckOptions {
  /** weight dtype for matmul/conv weights ('checkpoint' = as stored, f32 in golden cases) */
  weightDtype?: WeightDtype;
  /** per-component abs tolerance (default 1e-4) and end-to-end (default 1e-3) */
  tolComponent?: number;
  tolEndToEnd?: number;
  /** only run these groups */
  groups?: CheckGroup[];
  /** DiT activation dtype (f16 needs shader-f16) */
  activationDtype?: 'f32' | 'f16';
  /** DiT self-attention and VAE mid attention kernel (infer.attention; default 'sdpa') */
  attention?: 'sdpa' | 'sage';
  /**
   * 'abs': max |engine − golden| <= tol (f32); 'rel': max |engine − golden| / max |golden| <= tol
   * (bf16/f16, where errors scale with the magnitudes). Exact groups (sched, host) always use abs.
   */
  metric?: 'abs' | 'rel';
  /**
   * Two-expert cases: use this boundary ratio instead of the case's (a what-if: e.g. 0 runs
   * transformer/ on every step, which must then FAIL against the goldens).
   */
  boundaryRatio?: number;
  onRow?: (r: CheckRow) => void;
}

interface GoldenJson {
  settings: Record<string, unknown>;
  tensors: Record<string, { shape: number[]; dtype: string }>;
  [k: string]: unknown;
}

function setting(g: GoldenJson, prefix: string): unknown {
  for (const [k, v] of Object.entries(g.settings)) if (k === prefix || k.startsWith(prefix + ' ')) return v;
  return undefined;
}

/** A golden case folder, opened and checked before any GPU work: golden.json, golden.safetensors, the model folder. */
export interface GoldenCase {
  dir: string;
  json: GoldenJson;
  gold: Checkpoint;
  folder: ModelFolder;
  /** the settings the check uses, validated */
  textLen: number;
  /** guidance scale (two experts: transformer/'s, the high-noise one: settings `guidance_scale`) */
  guide: number;
  /** two experts: transformer_2/'s guidance scale (settings `guidance_scale_2`); one expert: = guide */
  guide2: number;
  /** 2 when the model folder has transformer_2/ (Wan 2.2 A14B), else 1 */
  experts: 1 | 2;
  /** two experts: settings `boundary_ratio`, else model_index.json's, else 0.875 (unused with one expert) */
  boundaryRatio: number;
  /** settings `num_train_timesteps`, else the scheduler config's */
  numTrainTimesteps: number;
  shift: number;
  steps: number;
}

const isObj = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);
const brief = (v: unknown): string => {
  const t = JSON.stringify(v) ?? 'nothing';
  return t.length > 60 ? `${t.slice(0, 57)}...` : t;
};

/**
 * Read and validate `golden.json` (its shape: `settings` and `tensors` objects, every tensor
 * `{shape: int[], dtype: string}`), open `golden.safetensors` (header only) and the model folder,
 * and check that what both files say agrees. Every problem is one CheckpointError line naming the
 * file, the JSON path and the fix.
 */
export async function openGoldenCase(caseDir: string): Promise<GoldenCase> {
  const gpath = join(caseDir, 'golden.json');
  const fix = 'regenerate the case with the golden script (or copy it again)';
  let text: string;
  try {
    const st = await fsp.stat(gpath);
    if (st.isDirectory()) throw new CheckpointError(`[check-golden] ${gpath}: is a folder, not golden.json; pass a case folder (model folder + golden.json + golden.safetensors)`);
    if (st.size > 256 * 1024 * 1024) throw new CheckpointError(`[check-golden] ${gpath}: ${st.size} bytes is too large for a golden.json; ${fix}`);
    text = await fsp.readFile(gpath, 'utf8');
  } catch (err) {
    if (err instanceof CheckpointError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      throw new CheckpointError(`[check-golden] ${caseDir} has no golden.json: pass a case folder (model folder + golden.json + golden.safetensors)`, { cause: err });
    }
    throw new CheckpointError(`[check-golden] ${gpath}: ${fsReason(err)}`, { cause: err });
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new CheckpointError(`[check-golden] ${gpath}: malformed JSON (${oneLine((err as Error).message)}); ${fix}`, { cause: err });
  }
  const bad = (path: string, want: string, got: unknown): never => {
    throw new CheckpointError(`[check-golden] ${gpath}: ${path} must be ${want}, got ${brief(got)}; ${fix}`);
  };
  if (!isObj(raw)) bad('the top level', 'a JSON object', raw);
  const j = raw as Record<string, unknown>;
  const settings = j.settings ?? {};
  if (!isObj(settings)) bad('settings', 'an object', settings);
  if (!isObj(j.tensors)) bad('tensors', 'an object of {shape, dtype}', j.tensors);
  for (const [name, t] of Object.entries(j.tensors as Record<string, unknown>)) {
    const at = `tensors[${JSON.stringify(name)}]`;
    if (!isObj(t)) bad(at, 'an object {shape, dtype}', t);
    const sh = (t as Record<string, unknown>).shape;
    if (!Array.isArray(sh) || sh.length > 8 || !sh.every((d) => typeof d === 'number' && Number.isSafeInteger(d) && d >= 0)) bad(`${at}.shape`, 'an array of at most 8 integers >= 0', sh);
    if (typeof (t as Record<string, unknown>).dtype !== 'string') bad(`${at}.dtype`, 'a string', (t as Record<string, unknown>).dtype);
  }
  const g = { ...j, settings, tensors: j.tensors } as GoldenJson;
  // the settings the check uses: plausible numbers or absent
  const num = (name: string, dflt: number, ok: (v: number) => boolean, want: string): number => {
    const v = setting(g, name);
    if (v === undefined || v === null) return dflt;
    if (typeof v !== 'number' || !ok(v)) bad(`settings["${name}"]`, want, v);
    return v as number;
  };
  const textLen = num('text_len', 512, (v) => Number.isInteger(v) && v >= 1 && v <= 4096, 'an integer in 1..4096');
  const steps = num('sampling_steps', 0, (v) => Number.isInteger(v) && v >= 0 && v <= 1000, 'an integer in 0..1000');
  const shiftSetting = num('shift', NaN, (v) => Number.isFinite(v) && v > 0 && v <= 1000, 'a number in (0, 1000]');
  const guideOk = (v: number) => Number.isFinite(v) && v >= 0 && v <= 100;
  // Guidance. One expert (Wan 2.1): `guide_scale`, a number. Two experts (Wan 2.2): diffusers'
  // `guidance_scale` (transformer/, high noise) and `guidance_scale_2` (transformer_2/, low noise);
  // the official `guide_scale` is then the tuple (low_noise, high_noise): the SECOND entry belongs
  // to the expert that runs first. (setting() matches up to a space: 'guidance_scale' does not
  // match 'guidance_scale_2 (...)'.)
  const official = setting(g, 'guide_scale');
  let tuple: [number, number] | null = null;
  if (Array.isArray(official)) {
    if (official.length !== 2 || !official.every((v) => typeof v === 'number' && guideOk(v))) {
      bad('settings["guide_scale"]', 'a number in 0..100 or the official pair (low_noise, high_noise) of them', official);
    }
    tuple = [official[0] as number, official[1] as number];
  }
  const hasNew = setting(g, 'guidance_scale') !== undefined && setting(g, 'guidance_scale') !== null;
  const guide = hasNew
    ? num('guidance_scale', 5, guideOk, 'a number in 0..100')
    : tuple
      ? tuple[1]
      : num('guide_scale', 5, guideOk, 'a number in 0..100');
  const guide2 = num('guidance_scale_2', tuple ? tuple[0] : guide, guideOk, 'a number in 0..100');
  if (tuple && (tuple[1] !== guide || tuple[0] !== guide2)) {
    bad(
      'settings["guide_scale"]',
      `the pair (low_noise, high_noise) = (guidance_scale_2, guidance_scale) = [${guide2}, ${guide}] (it disagrees with those settings)`,
      official,
    );
  }
  const boundarySetting = num('boundary_ratio', NaN, (v) => v >= 0 && v <= 1, 'a number in 0..1 (Wan 2.2 T2V A14B: 0.875)');
  const nttSetting = num('num_train_timesteps', NaN, (v) => Number.isInteger(v) && v >= 2 && v <= 2 ** 20, 'an integer in 2..1048576');
  // what makes a case two-expert: tensors of transformer_2/ or of the schedule, or the boundary
  const twoExpertMarks = [
    ...Object.keys(g.tensors).filter((k) => k.startsWith('dit_2.') || k === 'sample.use_transformer_2' || k === 'sample.guide_scale').slice(0, 2),
    ...(Number.isNaN(boundarySetting) ? [] : ['settings boundary_ratio']),
  ];

  const gold = await Checkpoint.open(join(caseDir, 'golden.safetensors'));
  try {
    // the shapes golden.json lists must be the file's (the check reads shapes from the file)
    for (const [name, t] of Object.entries(g.tensors)) {
      if (!gold.has(name)) continue;
      const fileShape = gold.info(name).shape;
      if (JSON.stringify(fileShape) !== JSON.stringify(t.shape)) {
        throw new CheckpointError(`[check-golden] ${gpath}: tensors["${name}"].shape is [${t.shape.join(', ')}] but golden.safetensors holds [${fileShape.join(', ')}]: the two files are from different cases; ${fix}`);
      }
    }
    const rank = (name: string, r: number) => {
      if (gold.has(name) && gold.info(name).shape.length !== r) {
        throw new CheckpointError(`[check-golden] ${gold.describe()}: tensor '${name}' must have ${r} dimensions, got [${gold.info(name).shape.join(', ')}]; ${fix}`);
      }
    };
    rank('dit.x', 4);
    rank('t5.relative_buckets', 2);
    rank('vae.z', 4);
    rank('sample.noise', 4);
    const folder = await openModelFolder(caseDir);
    const shift = Number.isNaN(shiftSetting) ? folder.scheduler.config.flow_shift : shiftSetting;
    if (!folder.transformer2 && twoExpertMarks.length > 0) {
      throw new CheckpointError(
        `[check-golden] ${gpath}: a two-expert (Wan 2.2 A14B) case (it lists ${twoExpertMarks.join(', ')}) but the model folder ${folder.dir} has no transformer_2/ (the low-noise expert); ` +
          'copy transformer_2/ (and boundary_ratio in model_index.json) from the case it came with, or regenerate the case',
      );
    }
    const experts: 1 | 2 = folder.transformer2 ? 2 : 1;
    const boundaryRatio = !Number.isNaN(boundarySetting) ? boundarySetting : (folder.boundaryRatio ?? 0.875);
    const numTrainTimesteps = Number.isNaN(nttSetting) ? folder.scheduler.config.num_train_timesteps : nttSetting;
    const [, ph, pw] = folder.transformer.config.patch_size;
    for (const name of ['dit.x', 'sample.noise']) {
      if (!gold.has(name)) continue;
      const sh = gold.info(name).shape;
      if (sh[2]! % ph !== 0 || sh[3]! % pw !== 0) {
        throw new CheckpointError(`[check-golden] ${gold.describe()}: tensor '${name}' [${sh.join(', ')}]: H and W must be multiples of the patch size ${ph}x${pw}; ${fix}`);
      }
    }
    return { dir: caseDir, json: g, gold, folder, textLen, guide, guide2: experts === 2 ? guide2 : guide, experts, boundaryRatio, numTrainTimesteps, shift, steps };
  } catch (err) {
    await gold.close();
    throw err;
  }
}

function compareArrays(actual: ArrayLike<number>, expected: ArrayLike<number>): { maxAbs: number; maxRel: number } {
  if (actual.length !== expected.length) return { maxAbs: Infinity, maxRel: Infinity };
  let maxAbs = 0;
  let maxRef = 0;
  for (let i = 0; i < expected.length; i++) {
    const a = actual[i]!;
    const b = expected[i]!;
    if (a === b) {
      maxRef = Math.max(maxRef, Math.abs(b) || 0);
      continue;
    }
    const d = Math.abs(a - b);
    if (!(d <= maxAbs)) maxAbs = Number.isNaN(d) ? Infinity : Math.max(maxAbs, d);
    maxRef = Math.max(maxRef, Math.abs(b));
  }
  // relative error: max abs error over the largest reference magnitude (as golden.json's f32_vs_f64)
  return { maxAbs, maxRel: maxRef > 0 ? maxAbs / maxRef : maxAbs };
}

/**
 * The expert and guidance scale of each sampling step of a case (expertSchedule on the case's
 * scheduler timesteps; one expert: expert 0 and `guide` on every step). Empty without steps.
 */
export function caseExpertSchedule(c: GoldenCase, boundaryRatio: number = c.boundaryRatio): ExpertStep[] {
  if (c.steps < 1) return [];
  const s = createScheduler('unipc', { steps: c.steps, shift: c.shift, numTrainTimesteps: c.numTrainTimesteps });
  return expertSchedule(s.timesteps, { experts: c.experts, boundaryRatio, numTrainTimesteps: c.numTrainTimesteps, guidance: c.guide, guidance2: c.guide2 });
}

/**
 * A two-expert case's schedule in one line, e.g. `experts: transformer x4 (g 4, t 999..922),
 * transformer_2 x2 (g 3, t 856..705); boundary_ratio 0.875 (transformer/ while t >= 875)`;
 * null for a one-expert case.
 */
export function describeExperts(c: GoldenCase, boundaryRatio: number = c.boundaryRatio): string | null {
  if (c.experts < 2) return null;
  const runs: Array<{ expert: 0 | 1; n: number; g: number; t0: number; t1: number }> = [];
  for (const st of caseExpertSchedule(c, boundaryRatio)) {
    const last = runs[runs.length - 1];
    if (last && last.expert === st.expert) {
      last.n++;
      last.t1 = st.timestep;
    } else runs.push({ expert: st.expert, n: 1, g: st.guidance, t0: st.timestep, t1: st.timestep });
  }
  const parts = runs.map((r) => `${EXPERT_NAMES[r.expert]} x${r.n} (g ${r.g}, t ${r.t0 === r.t1 ? r.t0 : `${r.t0}..${r.t1}`})`);
  const b = boundaryRatio * c.numTrainTimesteps;
  return `experts: ${parts.length ? parts.join(', ') : 'no sampling steps'}; boundary_ratio ${boundaryRatio} (transformer/ while t >= ${b})`;
}

/** Run the check on a case folder (or a case opened with openGoldenCase, which this closes). */
export async function checkGolden(e: Engine, caseIn: string | GoldenCase, opts: CheckOptions = {}): Promise<CheckRow[]> {
  const c = typeof caseIn === 'string' ? await openGoldenCase(caseIn) : caseIn;
  try {
    return await runCheck(e, c, opts);
  } finally {
    await c.gold.close();
  }
}

async function runCheck(e: Engine, c: GoldenCase, opts: CheckOptions): Promise<CheckRow[]> {
  const { json: g, gold, folder, textLen, shift, steps, numTrainTimesteps } = c;
  const boundaryRatio = opts.boundaryRatio ?? c.boundaryRatio;
  if (!(boundaryRatio >= 0 && boundaryRatio <= 1)) throw new CheckpointError(`[check-golden] boundaryRatio must be a number in 0..1, got ${boundaryRatio}`);
  const has = (n: string) => gold.has(n);
  const get = async (n: string): Promise<Tensor> => readTensor(gold, n);
  const tolC = opts.tolComponent ?? 1e-4;
  const tolE = opts.tolEndToEnd ?? 1e-3;
  const want = new Set(opts.groups ?? ['sched', 'host', 't5', 'dit', 'vae', 'sample']);
  const rows: CheckRow[] = [];
  const report = (name: string, group: string, actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, note?: string) => {
    const { maxAbs, maxRel } = compareArrays(actual, expected);
    const exact = group === 'sched' || group === 'host';
    const rel = opts.metric === 'rel' && !exact;
    const r: CheckRow = { name, group, maxAbs, maxRel, tol, pass: (rel ? maxRel : maxAbs) <= tol, note };
    rows.push(r);
    opts.onRow?.(r);
  };
  const vals = async (n: string) => (await get(n)).hostValues();

  const wd = opts.weightDtype ?? 'checkpoint';

  // ---- scheduler
  if (want.has('sched') && has('sched.timesteps') && steps > 0) {
    const s = createScheduler('unipc', { steps, shift, numTrainTimesteps });
    report('sched.timesteps', 'sched', s.timesteps, await vals('sched.timesteps'), 0);
    report('sched.sigmas', 'sched', s.sigmas, await vals('sched.sigmas'), 1e-7);
  }

  // ---- host math
  const xShape = has('dit.x') ? (gold.info('dit.x').shape as [number, number, number, number]) : null;
  // the DiT(s): [transformer/] or, with two experts, [transformer/ (high noise), transformer_2/ (low noise)]
  const dits = [folder.transformer, ...(folder.transformer2 ? [folder.transformer2] : [])].map((comp) => {
    const m = new WanTransformer3DModel(ditDimsFromConfig(comp.config));
    if (opts.activationDtype) m.dims.activationDtype = opts.activationDtype;
    if (opts.attention) m.dims.attention = opts.attention;
    return { comp, model: m, loaded: false };
  });
  const dit = dits[0]!.model;
  /** Free the weights of every DiT but expert `keep` (-1: all). */
  const freeDits = (keep: number) => {
    for (const [i, d] of dits.entries()) {
      if (i !== keep && d.loaded) {
        d.model.disposeParams();
        d.loaded = false;
      }
    }
  };
  /** Expert k's DiT with its weights on the GPU; the other expert's are freed first (one DiT resident at a time). */
  const useDit = async (k: number): Promise<WanTransformer3DModel> => {
    freeDits(k);
    const d = dits[k]!;
    if (!d.loaded) {
      await loadModuleFrom(d.model, d.comp, { engine: e, owner: EXPERT_NAMES[k] === 'transformer' ? 'dit' : 'dit_2', weightDtype: wd });
      d.loaded = true;
    }
    return d.model;
  };
  const [, ph, pw] = dit.dims.patchSize;
  if (want.has('host')) {
    if (xShape && has('dit.rope_cos')) {
      const r = ropeTables(xShape[1], xShape[2] / ph, xShape[3] / pw, dit.dims.headDim, dit.dims.ropeMaxSeqLen);
      report('dit.rope_cos', 'host', r.cos, await vals('dit.rope_cos'), 1e-6);
      report('dit.rope_sin', 'host', r.sin, await vals('dit.rope_sin'), 1e-6);
    }
    if (has('t5.relative_buckets')) {
      const sh = gold.info('t5.relative_buckets').shape;
      const tcfg = folder.textEncoder.config;
      report('t5.relative_buckets', 'host', t5RelativeBuckets(sh[0]!, sh[1]!, { numBuckets: tcfg.relative_attention_num_buckets, maxDistance: tcfg.relative_attention_max_distance }), await vals('t5.relative_buckets'), 0);
    }
  }

  // ---- text encoder
  const contexts = new Map<string, Float32Array>(); // prompt/negative -> padded context [textLen, d]
  const te = new UMT5EncoderModel(umt5DimsFromConfig(folder.textEncoder.config));
  if (want.has('t5') || want.has('sample')) {
    await loadModuleFrom(te, folder.textEncoder, { engine: e, owner: 'text_encoder', weightDtype: wd, placement: (k) => (te.isDeviceKey(k) ? 'device' : 'host') });
    for (const which of ['prompt', 'negative']) {
      const p = `t5.${which}`;
      if (!has(`${p}.input_ids`)) continue;
      const ids = await get(`${p}.input_ids`);
      const mask = await get(`${p}.attention_mask`);
      // ids beyond the embedding table would read zeros on the GPU (a silently wrong result)
      const vocab = folder.textEncoder.config.vocab_size;
      const badId = Array.from(ids.hostValues() as ArrayLike<number>).find((x) => !(x >= 0 && x < vocab));
      if (badId !== undefined) {
        throw new CheckpointError(
          `[check-golden] ${gold.describe()}: ${p}.input_ids holds token id ${badId}, outside the text encoder's vocab_size ${vocab} (${folder.textEncoder.configPath}): the case and its model folder do not match; regenerate the case`,
        );
      }
      const traced = new Map<string, Float32Array>();
      const out = await te.forward(e, ids, mask, async (n, t) => {
        traced.set(n, (await t.toArray()) as Float32Array);
      });
      const last = (await out.toArray()) as Float32Array;
      out.dispose();
      const d = te.dims.dModel;
      const L = ids.shape[1]!;
      const len = (mask.hostValues() as Int32Array).reduce((a, b) => a + b, 0);
      if (want.has('t5')) {
        for (const [n, v] of traced) if (has(`${p}.${n}`)) report(`${p}.${n}`, 't5', v, await vals(`${p}.${n}`), tolC);
        if (has(`${p}.last_hidden_state`)) report(`${p}.last_hidden_state`, 't5', last, await vals(`${p}.last_hidden_state`), tolC);
        if (has(`${p}.context`)) {
          report(`${p}.context`, 't5', last.subarray(0, len * d), await vals(`${p}.context`), tolC);
          // the pipeline runs only the prompt's own tokens (WanPipeline.encodePrompt): same context
          const n = Math.min(len, L);
          const ids1 = Tensor.cpu((ids.hostValues() as Int32Array).slice(0, n), [1, n], 'i32');
          const out1 = await te.forward(e, ids1, Tensor.cpu(new Int32Array(n).fill(1), [1, n], 'i32'));
          const ctx1 = (await out1.toArray()) as Float32Array;
          out1.dispose();
          report(`${p}.context (prompt tokens only)`, 't5', ctx1, await vals(`${p}.context`), tolC);
        }
      }
      // Wan trims to the true length; the DiT zero-pads to text_len
      const padded = new Float32Array(textLen * d);
      padded.set(last.subarray(0, Math.min(len, textLen) * d));
      contexts.set(which, padded);
    }
  }
  te.disposeParams();
  te.disposeCaches();

  // ---- DiT
  const ctxFor = async (which: string): Promise<Float32Array> => contexts.get(which) ?? goldCtx(which);
  // the golden context, zero-padded to text_len (isolates the DiT check from the text encoder)
  const goldCtx = async (which: string): Promise<Float32Array> => {
    const n = `t5.${which}.context_padded`;
    if (has(n)) return (await get(n)).hostValues() as Float32Array;
    const raw = (await get(`t5.${which}.context`)).hostValues() as Float32Array;
    const padded = new Float32Array(textLen * dit.dims.textDim);
    padded.set(raw.subarray(0, Math.min(raw.length, padded.length)));
    return padded;
  };
  if (want.has('dit') && xShape) {
    const x = await get('dit.x');
    const ctxHost = await goldCtx('prompt');
    // `dit.t*` are transformer/'s forwards, `dit_2.t*` transformer_2/'s (same dit.x, same context)
    for (const [k, gp] of (['dit', 'dit_2'] as const).slice(0, dits.length).entries()) {
      const re = new RegExp(`^${gp}\\.t[0-9_]+\\.`);
      const prefixes = [...new Set(Object.keys(g.tensors).filter((n) => re.test(n)).map((n) => n.split('.')[1]!))];
      if (prefixes.length === 0) continue;
      const m = await useDit(k);
      for (const pfx of prefixes) {
        const tName = `${gp}.${pfx}.timestep`;
        const t = has(tName) ? (await vals(tName))[0]! : Number(pfx.slice(1).replace('_', '.'));
        await e.scopeAsync(async () => {
          const ctx = e.fromHost(ctxHost, [1, textLen, m.dims.textDim], 'f32');
          const ctxEmb = m.embedText(ctx);
          if (has(`${gp}.${pfx}.context_embedded`)) report(`${gp}.${pfx}.context_embedded`, 'dit', (await ctxEmb.toArray()) as Float32Array, await vals(`${gp}.${pfx}.context_embedded`), tolC);
          if (has(`${gp}.${pfx}.time_sinusoid`)) report(`${gp}.${pfx}.time_sinusoid`, 'dit', timestepSinusoid(t, m.dims.freqDim), await vals(`${gp}.${pfx}.time_sinusoid`), 1e-6);
          const xg = e.fromHost(x.hostValues() as Float32Array, [1, ...xShape], 'f32');
          const out = await m.forward(xg, t, ctxEmb, {
            trace: async (n, tt) => {
              const name = `${gp}.${pfx}.${n}`;
              if (has(name)) report(name, 'dit', (await tt.toArray()) as Float32Array, await vals(name), tolC);
            },
          });
          if (has(`${gp}.${pfx}.out`)) report(`${gp}.${pfx}.out`, 'dit', (await out.toArray()) as Float32Array, await vals(`${gp}.${pfx}.out`), tolC);
        });
      }
    }
  }
  // keep only the DiT the sampling loop starts with (none without it): the VAE comes first
  const firstExpert = want.has('sample') && steps > 0 ? caseExpertSchedule(c, boundaryRatio)[0]!.expert : -1;
  freeDits(firstExpert);

  // ---- VAE
  const vae = new WanVaeDecoder(vaeDimsFromConfig(folder.vae.config));
  if (opts.attention) vae.midAttn.kind = opts.attention;
  const needVae = (want.has('vae') && has('vae.z')) || (want.has('sample') && has('sample.video'));
  if (needVae) await loadModuleFrom(vae, folder.vae, { engine: e, owner: 'vae', weightDtype: wd });
  if (want.has('vae') && has('vae.z')) {
    const z = await get('vae.z');
    const sh = z.shape as [number, number, number, number];
    const res = await vae.decode(e, z.hostValues() as Float32Array, sh, {
      trace: async (n, t) => {
        if (has(n)) report(n, 'vae', t.hostValues() as Float32Array, await vals(n), tolC);
      },
    });
    report('vae.video', 'vae', res.video, await vals('vae.video'), tolC);
  }

  // ---- full CFG sampling loop
  if (want.has('sample') && has('sample.noise') && steps > 0) {
    const noise = await get('sample.noise');
    const sh = noise.shape as [number, number, number, number];
    const sched = createScheduler('unipc', { steps, shift, numTrainTimesteps });
    // each step's expert and guidance: the rule in one place (src/pipeline/experts.ts)
    const plan = expertSchedule(sched.timesteps, { experts: dits.length, boundaryRatio, numTrainTimesteps, guidance: c.guide, guidance2: c.guide2 });
    if (has('sample.use_transformer_2')) report('sample.use_transformer_2', 'sample', Int32Array.from(plan, (p) => p.expert), await vals('sample.use_transformer_2'), 0);
    if (has('sample.guide_scale')) report('sample.guide_scale', 'sample', Float32Array.from(plan, (p) => p.guidance), await vals('sample.guide_scale'), 0);
    let latent = noise.hostValues() as Float32Array;
    const cond = await ctxFor('prompt');
    const uncond = await ctxFor('negative');
    // the embedded contexts belong to one expert (its text embedder): recomputed when the expert changes
    let ctxOf = null as { expert: number; c: Tensor; u: Tensor } | null;
    for (let i = 0; i < steps; i++) {
      const { timestep: t, expert, guidance } = plan[i]!;
      const m = await useDit(expert);
      if (ctxOf?.expert !== expert) {
        ctxOf?.c.dispose();
        ctxOf?.u.dispose();
        ctxOf = await e.scopeAsync(async () => ({
          expert,
          c: m.embedText(e.fromHost(cond, [1, textLen, m.dims.textDim], 'f32')),
          u: m.embedText(e.fromHost(uncond, [1, textLen, m.dims.textDim], 'f32')),
        }));
      }
      const preds: Float32Array[] = [];
      for (const ctx of [ctxOf.c, ctxOf.u]) {
        await e.scopeAsync(async () => {
          const x = e.fromHost(latent, [1, ...sh], 'f32');
          const o = await m.forward(x, t, ctx);
          preds.push((await o.toArray()) as Float32Array);
        });
      }
      const s = `sample.step${i + 1}`;
      if (has(`${s}.noise_pred_cond`)) report(`${s}.noise_pred_cond`, 'sample', preds[0]!, await vals(`${s}.noise_pred_cond`), tolE);
      if (has(`${s}.noise_pred_uncond`)) report(`${s}.noise_pred_uncond`, 'sample', preds[1]!, await vals(`${s}.noise_pred_uncond`), tolE);
      const v = cfgCombine(preds[1]!, preds[0]!, guidance);
      if (has(`${s}.noise_pred`)) report(`${s}.noise_pred`, 'sample', v, await vals(`${s}.noise_pred`), tolE);
      // the same scheduler object across the switch: the UniPC history carries over
      latent = sched.step(v, i, latent);
      if (has(`${s}.x0_pred`)) report(`${s}.x0_pred`, 'sample', sched.lastX0()!, await vals(`${s}.x0_pred`), tolE);
      if (has(`sample.latent_after_step${i + 1}`)) report(`sample.latent_after_step${i + 1}`, 'sample', latent, await vals(`sample.latent_after_step${i + 1}`), tolE);
    }
    ctxOf?.c.dispose();
    ctxOf?.u.dispose();
    freeDits(-1);
    if (has('sample.final_latent')) report('sample.final_latent', 'sample', latent, await vals('sample.final_latent'), tolE);
    if (has('sample.video')) {
      const res = await vae.decode(e, latent, sh);
      report('sample.video', 'sample', res.video, await vals('sample.video'), tolE);
    }
  }
  freeDits(-1);
  vae.disposeParams();
  return rows;
}
