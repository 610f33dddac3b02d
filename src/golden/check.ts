// Runs every component of the engine on a golden case folder (a diffusers-layout model folder +
// golden.json + golden.safetensors produced by the official Wan 2.1 code) and compares every
// tensor listed in golden.json that the engine can produce. Works on any case of this format
// (other dims, head counts, odd lengths, non-square latents): everything is read from the case.

import { join } from 'node:path';
import { readFileSync, existsSync } from 'node:fs';
import type { Engine } from '../runtime/engine.ts';
import { Tensor } from '../tensor/tensor.ts';
import { Checkpoint, readTensor } from '../io/checkpoint.ts';
import { openModelFolder } from '../io/model-folder.ts';
import { loadModuleFrom, type WeightDtype } from '../nn/load.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../models/wan_dit/model.ts';
import { ropeTables, timestepSinusoid } from '../models/wan_dit/host.ts';
import { UMT5EncoderModel, umt5DimsFromConfig } from '../models/umt5/model.ts';
import { t5RelativeBuckets } from '../models/umt5/buckets.ts';
import { WanVaeDecoder, vaeDimsFromConfig } from '../models/wan_vae/model.ts';
import { createScheduler, cfgCombine } from '../schedulers/index.ts';
import { CheckpointError } from '../util/errors.ts';

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
  /**
   * 'abs': max |engine − golden| <= tol (f32); 'rel': max |engine − golden| / max |golden| <= tol
   * (bf16/f16, where errors scale with the magnitudes). Exact groups (sched, host) always use abs.
   */
  metric?: 'abs' | 'rel';
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

export async function checkGolden(e: Engine, caseDir: string, opts: CheckOptions = {}): Promise<CheckRow[]> {
  const gpath = join(caseDir, 'golden.json');
  if (!existsSync(gpath)) throw new CheckpointError(`[check-golden] ${caseDir} has no golden.json: pass a case folder (model folder + golden.json + golden.safetensors)`);
  const g = JSON.parse(readFileSync(gpath, 'utf8')) as GoldenJson;
  const gold = await Checkpoint.open(join(caseDir, 'golden.safetensors'));
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

  const folder = await openModelFolder(caseDir);
  const textLen = Number(setting(g, 'text_len') ?? 512);
  const guide = Number(setting(g, 'guide_scale') ?? 5);
  const shift = Number(setting(g, 'shift') ?? folder.scheduler.config.flow_shift ?? 5);
  const steps = Number(setting(g, 'sampling_steps') ?? 0);
  const wd = opts.weightDtype ?? 'checkpoint';

  // ---- scheduler
  if (want.has('sched') && has('sched.timesteps') && steps > 0) {
    const s = createScheduler('unipc', { steps, shift });
    report('sched.timesteps', 'sched', s.timesteps, await vals('sched.timesteps'), 0);
    report('sched.sigmas', 'sched', s.sigmas, await vals('sched.sigmas'), 1e-7);
  }

  // ---- host math
  const xShape = has('dit.x') ? (g.tensors['dit.x']!.shape as [number, number, number, number]) : null;
  const dit = new WanTransformer3DModel(ditDimsFromConfig(folder.transformer.config));
  if (opts.activationDtype) dit.dims.activationDtype = opts.activationDtype;
  const [, ph, pw] = dit.dims.patchSize;
  if (want.has('host')) {
    if (xShape && has('dit.rope_cos')) {
      const r = ropeTables(xShape[1], xShape[2] / ph, xShape[3] / pw, dit.dims.headDim, dit.dims.ropeMaxSeqLen);
      report('dit.rope_cos', 'host', r.cos, await vals('dit.rope_cos'), 1e-6);
      report('dit.rope_sin', 'host', r.sin, await vals('dit.rope_sin'), 1e-6);
    }
    if (has('t5.relative_buckets')) {
      const sh = g.tensors['t5.relative_buckets']!.shape;
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
  const needDit = want.has('dit') || want.has('sample');
  if (needDit) await loadModuleFrom(dit, folder.transformer, { engine: e, owner: 'dit', weightDtype: wd });
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
    const prefixes = [...new Set(Object.keys(g.tensors).filter((k) => /^dit\.t[0-9_]+\./.test(k)).map((k) => k.split('.')[1]!))];
    for (const pfx of prefixes) {
      const tName = `dit.${pfx}.timestep`;
      const t = has(tName) ? (await vals(tName))[0]! : Number(pfx.slice(1).replace('_', '.'));
      await e.scopeAsync(async () => {
        const ctx = e.fromHost(ctxHost, [1, textLen, dit.dims.textDim], 'f32');
        const ctxEmb = dit.embedText(ctx);
        if (has(`dit.${pfx}.context_embedded`)) report(`dit.${pfx}.context_embedded`, 'dit', (await ctxEmb.toArray()) as Float32Array, await vals(`dit.${pfx}.context_embedded`), tolC);
        if (has(`dit.${pfx}.time_sinusoid`)) report(`dit.${pfx}.time_sinusoid`, 'dit', timestepSinusoid(t, dit.dims.freqDim), await vals(`dit.${pfx}.time_sinusoid`), 1e-6);
        const xg = e.fromHost(x.hostValues() as Float32Array, [1, ...xShape], 'f32');
        const out = await dit.forward(xg, t, ctxEmb, {
          trace: async (n, tt) => {
            const name = `dit.${pfx}.${n}`;
            if (has(name)) report(name, 'dit', (await tt.toArray()) as Float32Array, await vals(name), tolC);
          },
        });
        report(`dit.${pfx}.out`, 'dit', (await out.toArray()) as Float32Array, await vals(`dit.${pfx}.out`), tolC);
      });
    }
  }

  // ---- VAE
  const vae = new WanVaeDecoder(vaeDimsFromConfig(folder.vae.config));
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
    const sched = createScheduler('unipc', { steps, shift });
    let latent = noise.hostValues() as Float32Array;
    const cond = await ctxFor('prompt');
    const uncond = await ctxFor('negative');
    await e.scopeAsync(async () => {
      const ctxC = dit.embedText(e.fromHost(cond, [1, textLen, dit.dims.textDim], 'f32'));
      const ctxU = dit.embedText(e.fromHost(uncond, [1, textLen, dit.dims.textDim], 'f32'));
      for (let i = 0; i < steps; i++) {
        const t = sched.timesteps[i]!;
        const preds: Float32Array[] = [];
        for (const ctx of [ctxC, ctxU]) {
          const x = e.fromHost(latent, [1, ...sh], 'f32');
          const o = await dit.forward(x, t, ctx);
          preds.push((await o.toArray()) as Float32Array);
          o.dispose();
          x.dispose();
        }
        const s = `sample.step${i + 1}`;
        if (has(`${s}.noise_pred_cond`)) report(`${s}.noise_pred_cond`, 'sample', preds[0]!, await vals(`${s}.noise_pred_cond`), tolE);
        if (has(`${s}.noise_pred_uncond`)) report(`${s}.noise_pred_uncond`, 'sample', preds[1]!, await vals(`${s}.noise_pred_uncond`), tolE);
        const v = cfgCombine(preds[1]!, preds[0]!, guide);
        latent = sched.step(v, i, latent);
        if (has(`${s}.x0_pred`)) report(`${s}.x0_pred`, 'sample', sched.lastX0()!, await vals(`${s}.x0_pred`), tolE);
        if (has(`sample.latent_after_step${i + 1}`)) report(`sample.latent_after_step${i + 1}`, 'sample', latent, await vals(`sample.latent_after_step${i + 1}`), tolE);
      }
    });
    if (has('sample.final_latent')) report('sample.final_latent', 'sample', latent, await vals('sample.final_latent'), tolE);
    if (has('sample.video')) {
      const res = await vae.decode(e, latent, sh);
      report('sample.video', 'sample', res.video, await vals('sample.video'), tolE);
    }
  }
  dit.disposeParams();
  vae.disposeParams();
  await gold.close();
  return rows;
}
