// Fitting what the calibrated methods need from recorded signals (record.ts), and writing it into
// a model folder's smart_diffusion.json (`npm run calibrate-cache`, src/tools/calibrate-cache.ts).
//
// - TeaCache: np.polyfit(x, y, 4) with x = rel-L1 change of the modulated input (Wan's e; e0 for
//   use_ret_steps) and y = rel-L1 change of the model output, over every step of every calibration
//   run and both CFG streams (the authors' recipe: ali-vilab/TeaCache issue #2). Least squares by
//   Householder QR on the column-scaled Vandermonde matrix (what numpy's lstsq-based polyfit does,
//   without its SVD), coefficients highest power first (np.poly1d order).
// - MagCache: per step and stream the magnitude ratio, averaged over the calibration prompts,
//   rounded to 5 decimals, interleaved cond/uncond with the two leading 1.0 pads
//   (MagCache4Wan2.1 `magcache_calibration` writes one run's list; we average a few).

import { readFileSync, renameSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { ConfigError } from '../../util/errors.ts';
import type { CacheCalibration, CacheSignals, MagCacheCalibration, TeaCacheCalibration } from './types.ts';
import { poly1d } from './teacache.ts';

/** Least-squares polynomial of degree `deg` through (x, y): coefficients highest power first. */
export function polyfit(x: readonly number[], y: readonly number[], deg: number): number[] {
  const m = x.length;
  const n = deg + 1;
  if (m < n) throw new Error(`[polyfit] ${m} points cannot fit a degree-${deg} polynomial`);
  // A[i][j] = x_i^(deg - j), column-major copies for the QR
  const A: Float64Array[] = Array.from({ length: n }, (_, j) => Float64Array.from(x, (v) => v ** (deg - j)));
  const scale = A.map((col) => Math.sqrt(col.reduce((s, v) => s + v * v, 0)) || 1);
  A.forEach((col, j) => col.forEach((_, i) => (col[i]! /= scale[j]!)));
  const b = Float64Array.from(y);
  // Householder QR: A = QR, b <- Q^T b
  for (let k = 0; k < n; k++) {
    const col = A[k]!;
    let norm = 0;
    for (let i = k; i < m; i++) norm += col[i]! * col[i]!;
    norm = Math.sqrt(norm);
    if (norm === 0) continue;
    const alpha = col[k]! > 0 ? -norm : norm;
    const v = new Float64Array(m);
    v[k] = col[k]! - alpha;
    for (let i = k + 1; i < m; i++) v[i] = col[i]!;
    const vv = v.reduce((s, t) => s + t * t, 0);
    if (vv === 0) continue;
    const reflect = (c: Float64Array) => {
      let d = 0;
      for (let i = k; i < m; i++) d += v[i]! * c[i]!;
      const f = (2 * d) / vv;
      for (let i = k; i < m; i++) c[i] = c[i]! - f * v[i]!;
    };
    for (let j = k; j < n; j++) reflect(A[j]!);
    reflect(b);
  }
  // back substitution R c = (Q^T b)[0..n)
  const c = new Array<number>(n).fill(0);
  for (let k = n - 1; k >= 0; k--) {
    let s = b[k]!;
    for (let j = k + 1; j < n; j++) s -= A[j]![k]! * c[j]!;
    c[k] = s / A[k]![k]!;
  }
  return c.map((v, j) => v / scale[j]!);
}

export interface FitReport {
  points: number;
  /** coefficient of determination of the fit on its own points */
  r2: number;
  /** mean |fit - y| / mean |y| */
  relErr: number;
}

function fitQuality(c: readonly number[], x: readonly number[], y: readonly number[]): FitReport {
  const mean = y.reduce((a, b) => a + b, 0) / y.length;
  let ssRes = 0;
  let ssTot = 0;
  let abs = 0;
  let absY = 0;
  x.forEach((v, i) => {
    const p = poly1d(c, v);
    ssRes += (p - y[i]!) ** 2;
    ssTot += (y[i]! - mean) ** 2;
    abs += Math.abs(p - y[i]!);
    absY += Math.abs(y[i]!);
  });
  return { points: x.length, r2: 1 - ssRes / ssTot, relErr: abs / absY };
}

/** TeaCache's two polynomials (on e, and on e0 for use_ret_steps) from recorded runs. */
export function fitTeaCache(runs: readonly CacheSignals[]): { cal: TeaCacheCalibration; e: FitReport; e0: FitReport } {
  const pts = { e: { x: [] as number[], y: [] as number[] }, e0: { x: [] as number[], y: [] as number[] } };
  for (const r of runs)
    for (const st of r.steps)
      st.outRelL1.forEach((y) => {
        if (y === null || st.eRelL1 === null || st.e0RelL1 === null) return;
        pts.e.x.push(st.eRelL1);
        pts.e.y.push(y);
        pts.e0.x.push(st.e0RelL1);
        pts.e0.y.push(y);
      });
  const ce = polyfit(pts.e.x, pts.e.y, 4);
  const ce0 = polyfit(pts.e0.x, pts.e0.y, 4);
  return { cal: { coefficients: ce, coefficients_ret_steps: ce0 }, e: fitQuality(ce, pts.e.x, pts.e.y), e0: fitQuality(ce0, pts.e0.x, pts.e0.y) };
}

/** MagCache's ratios from recorded runs of the same step count. */
export function fitMagCache(runs: readonly CacheSignals[]): MagCacheCalibration {
  const steps = runs[0]!.steps.length;
  if (runs.some((r) => r.steps.length !== steps)) throw new Error('[calibrate] MagCache ratios need runs of the same step count');
  const out: number[] = [];
  for (let k = 0; k < steps; k++) {
    for (let row = 0; row < 2; row++) {
      if (k === 0) {
        out.push(1.0);
        continue;
      }
      const vals = runs.map((r) => {
        const m = r.steps[k]!.magRatio;
        return m[Math.min(row, m.length - 1)] ?? 1.0; // one-row runs (no CFG): the cond ratio for both
      });
      out.push(Math.round((vals.reduce((a, b) => a + b, 0) / vals.length) * 1e5) / 1e5);
    }
  }
  return { mag_ratios: out, steps };
}

/** The model folder's smart_diffusion.json with `cache` replaced (its other keys kept); returns the path. */
export function writeCalibration(dir: string, cal: CacheCalibration & Record<string, unknown>): string {
  const p = join(dir, 'smart_diffusion.json');
  let j: Record<string, unknown> = {};
  if (existsSync(p)) {
    try {
      j = JSON.parse(readFileSync(p, 'utf8')) as Record<string, unknown>;
    } catch (e) {
      throw new ConfigError(`${p} is not valid JSON (${(e as Error).message.split('\n')[0]}); fix or remove it before calibrating`);
    }
  }
  j.cache = cal;
  const tmp = `${p}.tmp-${process.pid}`;
  // numeric lists on one line each (the ratios and coefficients stay readable)
  const text = JSON.stringify(j, null, 2).replace(/\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]/g, (_, body: string) => `[${body.split(/,\s*/).join(', ')}]`);
  writeFileSync(tmp, text + '\n');
  renameSync(tmp, p);
  return p;
}
