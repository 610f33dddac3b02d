// The preflight (src/plan/preflight.ts): a run is checked against the machine before anything is
// loaded — host RAM (plus the GPU memory of a software adapter), the device's largest buffer, and
// lavapipe's memory-mapping headroom for queued dispatches — with machine limits given explicitly
// here so every branch runs on any machine.
import { describe, it, expect } from 'vitest';
import { getEngine } from './helpers/gpu.ts';
import { tinyModelWithTokenizer } from './helpers/models.ts';
import { settingsForModel } from '../src/config/settings.ts';
import { preflight, TooBigError, machineLimits, RUNTIME_HOST_BYTES } from '../src/plan/preflight.ts';
import { shapesFromFolder, PRESETS } from '../src/plan/shapes.ts';
import { planRun } from '../src/plan/plan.ts';
import { specFromCaps } from '../src/plan/meta-gpu.ts';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Engine } from '../src/runtime/engine.ts';

const TINY = tinyModelWithTokenizer();
const DEMO = join(resolve(dirname(fileURLToPath(import.meta.url)), '..'), 'weights', 'demo');
const GiB = 2 ** 30;

function settingsAt(w: number, h: number, frames: number) {
  const s = settingsForModel(TINY, {});
  s.request.width = w;
  s.request.height = h;
  s.request.numFrames = frames;
  return s;
}

describe('preflight', () => {
  it('a run that fits passes with its plan; the machine limits are read from /proc', async () => {
    const e = await getEngine();
    const model = await shapesFromFolder(TINY);
    const r = await preflight(model, settingsAt(64, 64, 9), e);
    expect(r.plan.peakReservedBytes).toBeGreaterThan(0);
    expect(r.plan.maxInFlight).toBeGreaterThan(0);
    expect(r.notes).toEqual([]);
    const m = machineLimits();
    expect(m.hostAvailable).toBeGreaterThan(RUNTIME_HOST_BYTES);
    expect(m.mapHeadroom).toBeGreaterThan(1000);
  });

  it('too little host RAM: refused with the bytes needed and available, and a smaller size that passes', async () => {
    const e = await getEngine();
    const model = await shapesFromFolder(TINY);
    const s = settingsAt(512, 512, 33);
    const full = await preflight(model, s, e, { hostAvailable: 64 * GiB, mapHeadroom: Infinity });
    const need = full.plan.hostBytes + full.plan.peakReservedBytes + RUNTIME_HOST_BYTES;
    const limits = { hostAvailable: RUNTIME_HOST_BYTES + 0.5 * (need - RUNTIME_HOST_BYTES), mapHeadroom: Infinity };
    const t0 = performance.now();
    const err = await preflight(model, s, e, limits).catch((x) => x);
    expect(err).toBeInstanceOf(TooBigError);
    expect(err.code).toBe('OUT_OF_MEMORY');
    expect(err.message).toMatch(/^\[preflight\] 512x512, 33 frames .* needs [0-9.]+ [GM]iB of RAM .* and [0-9.]+ [GM]iB is available; \d+x\d+ at 33 frames fits/);
    expect(performance.now() - t0).toBeLessThan(20_000);
    const [, w, h] = /(\d+)x(\d+) at 33 frames fits/.exec(err.message)!;
    expect(Number(w)).toBeLessThan(512);
    const ok = await preflight(model, settingsAt(Number(w), Number(h), 33), e, limits);
    expect(ok.plan.size.width).toBe(Number(w));
  });

  it('the decoded video alone over the RAM: refused without a walk', async () => {
    const e = await getEngine();
    const model = await shapesFromFolder(TINY);
    const t0 = performance.now();
    const err = await preflight(model, settingsAt(1024, 1024, 81), e, { hostAvailable: 1 * GiB, mapHeadroom: Infinity }).catch((x) => x);
    expect(performance.now() - t0).toBeLessThan(1000);
    expect(err).toBeInstanceOf(TooBigError);
    expect(err.message).toMatch(/the decoded video alone needs [0-9.]+ GiB of RAM .* and 1.00 GiB is available; at most ~\d+x\d+ at 81 frames could fit/);
  });

  it('a tensor larger than the device buffer limit: refused naming the buffer, the owner and maxBufferSize', async () => {
    const e = await getEngine();
    const model = await shapesFromFolder(TINY);
    const small = { caps: e.caps, limits: { ...e.limits, maxBufferSize: 4 * 2 ** 20 }, adapterName: e.adapterName } as unknown as Engine;
    const err = await preflight(model, settingsAt(256, 256, 33), small, { hostAvailable: 64 * GiB, mapHeadroom: Infinity }).catch((x) => x);
    expect(err).toBeInstanceOf(TooBigError);
    expect(err.message).toMatch(/needs one [0-9.]+ MiB buffer \('[\w.]+', phase \w+\) and the device's largest is 4.0 MiB \(maxBufferSize\)/);
  });

  it('on lavapipe, more dispatches in flight than memory mappings: chunked attention/FFN first, else refused with the sysctl fix', async () => {
    const e = await getEngine();
    if (e.caps.adapterClass === 'gpu') return; // the mapping limit is lavapipe's
    const model = await shapesFromFolder(TINY);
    const s = settingsAt(256, 256, 33);
    const full = await preflight(model, s, e, { hostAvailable: 64 * GiB, mapHeadroom: Infinity });
    const n = full.plan.maxInFlight;
    // headroom just below the run's need (MAP_MARGIN 4096 on top): chunks bring it under
    const chunked = await preflight(model, s, e, { hostAvailable: 64 * GiB, mapHeadroom: 4096 + n - 1 }).catch((x) => x);
    if (chunked instanceof TooBigError) {
      expect(chunked.message).toMatch(/sysctl -w vm.max_map_count/);
    } else {
      expect(chunked.notes.join(' ')).toMatch(/attention and FFN in chunks of \d+ tokens/);
      expect(chunked.settings.load.attnChunkTokens).toBeGreaterThan(0);
      expect(chunked.plan.maxInFlight).toBeLessThan(n);
    }
    // no headroom at all: refused
    const err = await preflight(model, s, e, { hostAvailable: 64 * GiB, mapHeadroom: 4096 + 10 }).catch((x) => x);
    expect(err).toBeInstanceOf(TooBigError);
    expect(err.message).toMatch(/queues [\d,]+ GPU dispatches at once and lavapipe can map 10 .*sudo sysctl -w vm.max_map_count=/);
  });

  it('a run far over the RAM is refused by the one-block probe, fast, with a size that the full preflight admits', async () => {
    const e = await getEngine();
    const model = await shapesFromFolder(DEMO);
    const s = settingsForModel(DEMO, { defaults: { width: 512, height: 512, numFrames: 81 } });
    const limits = { hostAvailable: 1 * GiB, mapHeadroom: Infinity };
    const t0 = performance.now();
    const err = await preflight(model, s, e, limits).catch((x) => x);
    const ms = performance.now() - t0;
    expect(err).toBeInstanceOf(TooBigError);
    // refused on the probe's numbers (the full walk of 1024x1024 x 81 frames is never made)
    expect(err.message).toMatch(/^\[preflight\] 512x512, 81 frames .* needs [0-9.]+ [GM]iB of RAM \(.* at least [0-9.]+ [GM]iB, walked with 1 of 4 DiT blocks\) and 1.00 GiB is available; (\d+)x\1 at 81 frames fits/);
    // generous (CI machines vary; docs/reliability.md has the medians)
    expect(ms).toBeLessThan(3000);
    const [, w] = /(\d+)x\d+ at 81 frames fits/.exec(err.message)!;
    expect(Number(w)).toBeLessThan(512);
    expect(Number(w)).toBeGreaterThan(128);
    // the size it names passes the full preflight under the same limits
    const ok = await preflight(model, settingsForModel(DEMO, { defaults: { width: Number(w), height: Number(w), numFrames: 81 } }), e, limits);
    expect(ok.plan.size.width).toBe(Number(w));
  });

  it('context parallelism on a software adapter: every device\'s GPU memory is host RAM', async () => {
    const e = await getEngine();
    if (e.caps.adapterClass === 'gpu') return; // a real GPU's memory is not host RAM
    const model = await shapesFromFolder(TINY);
    const s = settingsAt(64, 64, 9);
    s.load.cpSize = 2;
    s.load.lowMemLevel = 1; // (a tiled decode: the tiles spread over both devices)
    const plan = await planRun(model, s, { device: specFromCaps(e.caps, e.limits), denoiseSteps: 1 });
    expect(plan.devices!.length).toBe(2);
    const need = plan.hostBytes + plan.peakReservedBytes + plan.devices![1]!.peakReservedBytes + RUNTIME_HOST_BYTES;
    const ok = await preflight(model, s, e, { hostAvailable: need, mapHeadroom: Infinity });
    expect(ok.plan.devices!.length).toBe(2);
    // rank 0's alone is not enough: the second device's GPU memory counts too
    const err = await preflight(model, s, e, { hostAvailable: need - 1, mapHeadroom: Infinity }).catch((x) => x);
    expect(err).toBeInstanceOf(TooBigError);
    expect(err.message).toMatch(/of GPU memory over 2 devices \(a software adapter's GPU memory is host RAM\)/);
  });

  it('the probe never refuses what the full walk admits: near the limit, the full walk decides', async () => {
    const e = await getEngine();
    const model = await shapesFromFolder(DEMO);
    const s = settingsForModel(DEMO, { defaults: { width: 640, height: 640, numFrames: 33 } });
    const plan = await planRun(model, s, { device: specFromCaps(e.caps, e.limits), denoiseSteps: 1 });
    const need = plan.hostBytes + (e.caps.adapterClass === 'gpu' ? 0 : plan.peakReservedBytes) + RUNTIME_HOST_BYTES;
    // exactly enough: admitted with the full walk's plan
    const ok = await preflight(model, s, e, { hostAvailable: need, mapHeadroom: Infinity });
    expect(ok.plan.peakReservedBytes).toBe(plan.peakReservedBytes);
    expect(ok.plan.placement.numBlocks).toBe(4);
    // one byte less: refused, naming the full walk's need
    const err = await preflight(model, s, e, { hostAvailable: need - 1, mapHeadroom: Infinity }).catch((x) => x);
    expect(err).toBeInstanceOf(TooBigError);
  });

  it('the 1.3B shape over maxBufferSize: refused by the probe in a fraction of the full walk', async () => {
    const e = await getEngine();
    const model = PRESETS['wan2.1-t2v-1.3b']!();
    const s = settingsForModel(DEMO, { weightDtype: 'bf16', defaults: { width: 832, height: 480, numFrames: 33 } });
    // a device whose largest buffer is below one FFN intermediate at this size
    const small = { caps: e.caps, limits: { ...e.limits, maxBufferSize: 256 * 2 ** 20 }, adapterName: e.adapterName } as unknown as Engine;
    const t0 = performance.now();
    const err = await preflight(model, s, small, { hostAvailable: 64 * GiB, mapHeadroom: Infinity }).catch((x) => x);
    expect(performance.now() - t0).toBeLessThan(10_000);
    expect(err).toBeInstanceOf(TooBigError);
    expect(err.message).toMatch(/832x480, 33 frames of wan2.1-t2v-1.3b .* needs one [0-9.]+ MiB buffer \('[\w.]+', phase denoise\) and the device's largest is 256.0 MiB \(maxBufferSize\); (\d+x\d+ at 33 frames fits|not even)/);
  }, 60_000);
});
