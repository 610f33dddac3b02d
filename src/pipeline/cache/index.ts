// Step caching: the method for a request, from its infer.cache.* settings and the model's
// calibration. Calibration comes from the model folder's smart_diffusion.json ("cache": written by
// `npm run calibrate-cache`) or, for the official checkpoints, from the references' own numbers
// (TeaCache: Wan 2.1 T2V 1.3B / 14B; MagCache: those and Wan 2.2 T2V A14B), recognized by the
// DiT's shape. The folder's file wins over the built-in numbers.

import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Engine } from '../../runtime/engine.ts';
import type { WanDitDims } from '../../models/wan_dit/model.ts';
import { ConfigError } from '../../util/errors.ts';
import { TeaCache, TEACACHE_WAN21 } from './teacache.ts';
import { MagCache, MAGCACHE_WAN, ratiosForSteps } from './magcache.ts';
import { EasyCache } from './easycache.ts';
import { Flex } from './flex.ts';
import { SignalRecorder, type RecordOptions } from './record.ts';
import type { CacheCalibration, CacheKnobs, CacheRecord, StepCache, StepLog } from './types.ts';

export * from './types.ts';
export { SignalRecorder } from './record.ts';

/** Which official checkpoint a DiT is, by its shape (T2V: 16 input channels). */
export function officialModel(d: WanDitDims, twoExperts: boolean): 'wan21-1.3B' | 'wan21-14B' | 'wan22-A14B' | null {
  const D = d.numHeads * d.headDim;
  if (d.inChannels !== 16 || d.outChannels !== 16) return null;
  if (!twoExperts && d.numLayers === 30 && D === 1536 && d.ffnDim === 8960) return 'wan21-1.3B';
  if (d.numLayers === 40 && D === 5120 && d.ffnDim === 13824) return twoExperts ? 'wan22-A14B' : 'wan21-14B';
  return null;
}

const numList = (v: unknown, len?: number): v is number[] => Array.isArray(v) && v.every((x) => typeof x === 'number' && Number.isFinite(x)) && (len === undefined || v.length === len);

/** The "cache" object of DIR/smart_diffusion.json, checked (null when there is none). */
export function readCacheCalibration(dir: string): CacheCalibration | null {
  const p = join(dir, 'smart_diffusion.json');
  if (!existsSync(p)) return null;
  let j: unknown;
  try {
    j = JSON.parse(readFileSync(p, 'utf8'));
  } catch {
    return null; // the settings loader reports a bad file
  }
  const c = (j as Record<string, unknown> | null)?.cache as Record<string, unknown> | undefined;
  if (c === undefined || c === null) return null;
  const bad = (what: string) => new ConfigError(`${p}: "cache.${what}" is malformed; run npm run calibrate-cache -- --model ${dir} to write it again`);
  if (typeof c !== 'object' || Array.isArray(c)) throw bad('');
  const out: CacheCalibration = { source: p };
  const t = c.teacache as Record<string, unknown> | undefined;
  if (t !== undefined) {
    if (!t || typeof t !== 'object') throw bad('teacache');
    if (t.coefficients !== undefined && !numList(t.coefficients, 5)) throw bad('teacache.coefficients (5 numbers)');
    if (t.coefficients_ret_steps !== undefined && !numList(t.coefficients_ret_steps, 5)) throw bad('teacache.coefficients_ret_steps (5 numbers)');
    out.teacache = { coefficients: t.coefficients as number[] | undefined, coefficients_ret_steps: t.coefficients_ret_steps as number[] | undefined };
  }
  const m = c.magcache as Record<string, unknown> | undefined;
  if (m !== undefined) {
    if (!m || typeof m !== 'object' || !numList(m.mag_ratios) || (m.mag_ratios as number[]).length < 2 || (m.mag_ratios as number[]).length % 2) throw bad('magcache.mag_ratios (cond, uncond per step)');
    out.magcache = { mag_ratios: m.mag_ratios as number[], steps: (m.mag_ratios as number[]).length / 2 };
  }
  return out;
}

export interface CacheContext {
  engine: Engine;
  dims: WanDitDims;
  /** the model folder (for its smart_diffusion.json and the error messages) */
  dir: string;
  twoExperts: boolean;
  /** steps of the request */
  steps: number;
  /** the request records signals instead of caching (calibration) */
  record?: RecordOptions | null;
}

const calibrateHint = (dir: string) => `npm run calibrate-cache -- --model ${dir}`;

/** The step cache of a request (null: infer.cache.mode=off and no recording). */
export function createStepCache(k: CacheKnobs, ctx: CacheContext): StepCache | null {
  const { engine, dims, dir, twoExperts, steps } = ctx;
  if (ctx.record) {
    if (k.mode !== 'off') throw new ConfigError(`recording cache signals (calibration) needs an uncached run: infer.cache.mode=off, got ${k.mode}`);
    return new SignalRecorder(engine, ctx.record);
  }
  if (k.mode === 'off') return null;
  const official = officialModel(dims, twoExperts);
  const folder = readCacheCalibration(dir);
  const maxSkips = (def: number) => (k.maxSkips >= 0 ? k.maxSkips : def);
  switch (k.mode) {
    case 'teacache': {
      const fromFolder = k.useRetSteps ? folder?.teacache?.coefficients_ret_steps : folder?.teacache?.coefficients;
      const builtin = official === 'wan21-1.3B' || official === 'wan21-14B' ? TEACACHE_WAN21[official === 'wan21-1.3B' ? '1.3B' : '14B'][k.useRetSteps ? 'e0' : 'e'] : undefined;
      const coefficients = fromFolder ?? builtin;
      if (!coefficients) {
        throw new ConfigError(
          `infer.cache.mode=teacache needs TeaCache's rescale polynomial for this model (${k.useRetSteps ? 'coefficients_ret_steps, for use_ret_steps' : 'coefficients'}), which ${join(dir, 'smart_diffusion.json')} does not have: run ${calibrateHint(dir)}`,
        );
      }
      return new TeaCache(engine, {
        coefficients,
        useRetSteps: k.useRetSteps,
        // argparse default 0.2; the README's T2V-1.3B command uses 0.08
        threshold: k.threshold > 0 ? k.threshold : official === 'wan21-1.3B' && !fromFolder ? 0.08 : 0.2,
        warmupSteps: k.warmupSteps >= 0 ? k.warmupSteps : k.useRetSteps ? 5 : 1,
        lastStepComputed: !k.useRetSteps,
        maxSkips: maxSkips(Infinity),
        source: fromFolder ? folder!.source! : `built in (TeaCache4Wan2.1, Wan 2.1 T2V ${official === 'wan21-1.3B' ? '1.3B' : '14B'})`,
      });
    }
    case 'magcache': {
      const cal = folder?.magcache ?? (official ? { mag_ratios: MAGCACHE_WAN[official].ratios, steps: MAGCACHE_WAN[official].ratios.length / 2 } : undefined);
      if (!cal) {
        throw new ConfigError(`infer.cache.mode=magcache needs MagCache's magnitude ratios for this model, which ${join(dir, 'smart_diffusion.json')} does not have: run ${calibrateHint(dir)}`);
      }
      return new MagCache(engine, {
        ratios: ratiosForSteps(cal.mag_ratios, steps),
        threshold: k.threshold > 0 ? k.threshold : twoExperts ? 0.04 : 0.12,
        K: maxSkips(2),
        retentionRatio: k.retentionRatio,
        warmupSteps: k.warmupSteps >= 0 ? k.warmupSteps : null,
        source: folder?.magcache ? folder.source! : `built in (MagCache, ${official})`,
        calibrationSteps: cal.steps,
      });
    }
    case 'easycache':
      return new EasyCache({ threshold: k.threshold > 0 ? k.threshold : 0.05, warmupSteps: k.warmupSteps >= 0 ? k.warmupSteps : 10, maxSkips: maxSkips(Infinity), blocks: dims.numLayers });
    case 'flex': {
      const fromFolder = k.useRetSteps ? folder?.teacache?.coefficients_ret_steps : folder?.teacache?.coefficients;
      const builtin = official === 'wan21-1.3B' || official === 'wan21-14B' ? TEACACHE_WAN21[official === 'wan21-1.3B' ? '1.3B' : '14B'][k.useRetSteps ? 'e0' : 'e'] : undefined;
      const coefficients = fromFolder ?? builtin ?? null;
      return new Flex(engine, {
        threshold: k.threshold > 0 ? k.threshold : 0.1,
        // (as tuned in npm run bench:cache: TeaCache's one warm-up step, no cap on consecutive skips)
        warmupSteps: k.warmupSteps >= 0 ? k.warmupSteps : 1,
        maxSkips: maxSkips(Infinity),
        coefficients,
        useRetSteps: k.useRetSteps,
        extrapolation: k.extrapolation,
        source: fromFolder ? folder!.source! : builtin ? `built in (TeaCache4Wan2.1 polynomial, ${official})` : 'none (raw timestep signal)',
      });
    }
  }
}

/**
 * A request's cache record by its `timingsMs` object: the CLI passes the sidecar a result object
 * of its own that carries the same timings object (src/cli/generate.ts `run`) but not `cache`.
 */
export const cacheRecordOf = new WeakMap<object, CacheRecord>();

/** GenerateResult.cache from a cache's step log. */
export function cacheRecord(c: StepCache, savedUploadBytes?: number): CacheRecord {
  const log: StepLog[] = c.log;
  const computed = log.filter((l) => l.ran.some(Boolean));
  return {
    mode: c.mode,
    forwards: computed.length,
    computedSteps: computed.map((l) => l.step),
    skippedSteps: log.filter((l) => !l.ran.some(Boolean)).map((l) => l.step),
    splitSteps: computed.filter((l) => !l.ran.every(Boolean)).map((l) => l.step),
    ...(savedUploadBytes !== undefined ? { savedUploadBytes } : {}),
    settings: c.describe,
  };
}
