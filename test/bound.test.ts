// The preflight's fast lower bound (src/plan/bound.ts: the run walked with one DiT block) against
// the full walk of the same run: it must never be above it, or the preflight could refuse a run
// that fits. Swept over models (the tiny golden model, the demo model, the 1.3B and Wan 2.2 preset
// shapes), sizes, low-memory levels, weight/activation dtypes and both plan devices.
import { describe, it, expect } from 'vitest';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { settingsForModel } from '../src/config/settings.ts';
import type { Settings } from '../src/config/schema.ts';
import { planRun } from '../src/plan/plan.ts';
import { boundRun, probeShapes, tryBound, isUnplaceable } from '../src/plan/bound.ts';
import { shapesFromFolder, PRESETS, type ModelShapes } from '../src/plan/shapes.ts';
import { GENERIC_GPU, LAVAPIPE, type MetaDeviceSpec } from '../src/plan/meta-gpu.ts';
import { OutOfMemoryError } from '../src/util/errors.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const DEMO = join(ROOT, 'weights', 'demo');
const TINY = join(ROOT, 'test', 'fixtures', 'golden', 'tiny');

function settingsAt(dir: string, w: number, h: number, frames: number, load: Record<string, unknown> = {}): Settings {
  return settingsForModel(dir, { promptCache: false, ...load, defaults: { width: w, height: h, numFrames: frames, numInferenceSteps: 4 } });
}

async function expectBelow(model: ModelShapes, s: Settings, device: MetaDeviceSpec, label: string) {
  const opts = { device, denoiseSteps: 1 };
  const full = await planRun(model, s, opts);
  const b = await boundRun(model, s, opts);
  expect(b.walkedBlocks, label).toBe(1);
  expect(b.numBlocks, label).toBe(model.transformer.num_layers);
  expect(b.hostBytes, `${label} host`).toBeLessThanOrEqual(full.hostBytes);
  expect(b.peakBytes, `${label} allocated`).toBeLessThanOrEqual(full.peakBytes);
  expect(b.peakReservedBytes, `${label} reserved`).toBeLessThanOrEqual(full.peakReservedBytes);
  expect(b.maxInFlight, `${label} in flight`).toBeLessThanOrEqual(full.maxInFlight);
  // the missing blocks are added back exactly: with a resident DiT the allocated peak is the full walk's
  // and the estimate is close to the full walk's reserved peak (what the refusal message names)
  if (full.placement.dit === 'resident') {
    expect(b.peakBytes, `${label} allocated, resident DiT`).toBe(full.peakBytes);
    expect(Math.abs(b.peakReservedEstimate - full.peakReservedBytes) / full.peakReservedBytes, `${label} estimate`).toBeLessThan(0.05);
  }
  return { full, b };
}

describe('the probe bound (one DiT block)', () => {
  it('cuts only the DiT', async () => {
    const m = await shapesFromFolder(DEMO);
    const p = probeShapes(m);
    expect(p.transformer.num_layers).toBe(1);
    expect(p.transformer.ffn_dim).toBe(m.transformer.ffn_dim);
    expect(p.vae).toBe(m.vae);
    expect(p.textEncoder).toBe(m.textEncoder);
  });

  it('is never above the full walk: tiny golden model, sizes x levels x devices', async () => {
    const m = await shapesFromFolder(TINY);
    for (const device of [LAVAPIPE, GENERIC_GPU]) {
      for (const [w, h, f] of [
        [64, 64, 9],
        [144, 80, 17],
        [256, 256, 33],
      ] as const) {
        for (const level of [0, 1, 2, 3]) await expectBelow(m, settingsAt(TINY, w, h, f, { lowMemLevel: level }), device, `tiny ${device.adapterClass} ${w}x${h}x${f} L${level}`);
      }
    }
  });

  it('is never above the full walk: demo model, sizes x levels, dtypes, chunk knobs (lavapipe)', async () => {
    const m = await shapesFromFolder(DEMO);
    for (const [w, h, f] of [
      [256, 256, 17],
      [480, 272, 33],
      [640, 640, 21],
    ] as const) {
      for (const level of [0, 1, 2, 3]) await expectBelow(m, settingsAt(DEMO, w, h, f, { lowMemLevel: level }), LAVAPIPE, `demo ${w}x${h}x${f} L${level}`);
    }
    await expectBelow(m, settingsAt(DEMO, 480, 272, 33, { weightDtype: 'bf16', activationDtype: 'f16' }), LAVAPIPE, 'demo bf16/f16');
    await expectBelow(m, settingsAt(DEMO, 480, 272, 33, { attnChunkTokens: 512, ffnChunkTokens: 512 }), LAVAPIPE, 'demo chunked');
  });

  it('is never above the full walk: 1.3B and Wan 2.2 preset shapes at small sizes', async () => {
    for (const name of ['wan2.1-t2v-1.3b', 'wan2.2-t2v-a14b']) {
      const m = PRESETS[name]!();
      for (const level of [0, 3]) await expectBelow(m, settingsAt(DEMO, 160, 96, 5, { lowMemLevel: level, weightDtype: 'bf16' }), GENERIC_GPU, `${name} L${level}`);
    }
  }, 120_000);

  it('a tensor over maxBufferSize fails the probe exactly when it fails the full walk', async () => {
    const m = await shapesFromFolder(DEMO);
    const s = settingsAt(DEMO, 640, 640, 21);
    const device = { ...LAVAPIPE, maxBufferSize: 64 * 2 ** 20 };
    const full = await planRun(m, s, { device, denoiseSteps: 1 }).catch((e) => e);
    const b = await tryBound(m, s, { device, denoiseSteps: 1 });
    expect(full).toBeInstanceOf(OutOfMemoryError);
    expect(isUnplaceable(b)).toBe(true);
    expect((b as OutOfMemoryError).info.requestedBytes).toBe(full.info.requestedBytes);
    expect((b as OutOfMemoryError).info.owner).toBe(full.info.owner);
    // and a device that holds it passes both
    const ok = await tryBound(m, s, { device: LAVAPIPE, denoiseSteps: 1 });
    expect(isUnplaceable(ok)).toBe(false);
  });
});
