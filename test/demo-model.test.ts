// Does the embedded demo model (weights/demo) draw the prompt? Generated on the engine with fixed
// seeds for every held-out color x shape x direction combo (training/heldout.json; never shown in
// training, each on one background) and 20 seen combos covering every color x direction pair; the
// object is found by its color in the decoded frames (src/tools/demo-eval.ts, the same detector as
// training/eval.py). `npm run eval:demo` runs the larger evaluation (held-out combos on all three
// backgrounds, more seeds) quoted in docs/training.md.
import { describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { evalDemo } from '../src/tools/eval-demo.ts';
import { analyze } from '../src/tools/demo-eval.ts';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');

describe('demo-model detector', () => {
  // a synthetic 9-frame 16x16 clip: a 4x4 square (16 px >= MIN_PIXELS) moving 1 px per frame
  const T = 9, H = 16, W = 16;
  const clip = (rgb: [number, number, number], dx: number, dy: number) => {
    const v = new Float32Array(3 * T * H * W).fill(-1);
    for (let t = 0; t < T; t++)
      for (let y = 0; y < 4; y++)
        for (let x = 0; x < 4; x++) {
          const X = 2 + x + dx * t, Y = 6 + y + dy * t;
          for (let c = 0; c < 3; c++) v[c * T * H * W + t * H * W + Y * W + X] = rgb[c]! * 2 - 1;
        }
    return v;
  };
  const shape = [3, T, H, W] as const;
  it('finds color and direction of a known clip, and rejects wrong ones', () => {
    const v = clip([1, 0.9, 0.1], 1, 0);
    expect(analyze(v, shape, 'yellow', 'right', 'black')).toMatchObject({ colorOk: true, dirOk: true, dominant: 'yellow' });
    expect(analyze(v, shape, 'red', 'right', 'black').colorOk).toBe(false);
    expect(analyze(v, shape, 'yellow', 'left', 'black').dirOk).toBe(false);
    expect(analyze(v, shape, 'yellow', 'up', 'black').dirOk).toBe(false);
    const orange = clip([0.9, 0.4, 0.1], 1, 0);
    expect(analyze(orange, shape, 'yellow', 'right', 'black').dominant).toBe('red');
    const still = clip([1, 1, 1], 0, 0);
    expect(analyze(still, shape, 'white', 'right', 'black')).toMatchObject({ colorOk: true, dirOk: false });
    const empty = new Float32Array(3 * T * H * W).fill(-1);
    expect(analyze(empty, shape, 'white', 'right', 'black')).toMatchObject({ colorOk: false, dirOk: false, visible: false });
  });
});

describe.runIf(existsSync(join(ROOT, 'weights', 'demo', 'model_index.json')))('demo model draws the prompt (engine, fixed seeds)', () => {
  // The target is >= 90% on every count, asserted as such. Measured with this model (the
  // 2026-11-28 run: DiT dim 192, 5200 steps, 100 min of training) at its recommended guidance 3.5
  // (weights/demo/smart_diffusion.json): seen color 100 %, seen direction 95 %, held-out color 100 %,
  // held-out direction 100 % (margin: two videos on seen color, one on each other count). The previous
  // model (dim 128) measured 90 / 90 / 100 / 100 % here and ran against a seen threshold of 85 %.
  it('color and direction accuracy on seen and on held-out combinations (>= 90% on each)', async () => {
    const res = await evalDemo({ heldoutPerCombo: 1, seeds: 1 });
    const fails = res.rows.filter((r) => !r.colorOk || !r.dirOk).map((r) => `${r.split}: ${r.prompt} -> ${r.dominant}, moved ${r.displacement.join(',')}`);
    console.log(`demo model: ${JSON.stringify(res.summary)} in ${res.seconds.toFixed(0)} s${fails.length ? '\n  ' + fails.join('\n  ') : ''}`);
    expect(res.summary.heldout.n).toBe(10);
    expect(res.summary.seen.n).toBe(20);
    expect(res.summary.seen.colorAcc).toBeGreaterThanOrEqual(0.9);
    expect(res.summary.seen.directionAcc).toBeGreaterThanOrEqual(0.9);
    expect(res.summary.heldout.colorAcc).toBeGreaterThanOrEqual(0.9);
    expect(res.summary.heldout.directionAcc).toBeGreaterThanOrEqual(0.9);
  }, 1_200_000);
});
