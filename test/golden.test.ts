// The engine against the official Wan 2.1 reference (tiny case: test/fixtures/golden/tiny, produced
// by the official code in float32). Tolerances from the golden README: 1e-4 abs per component,
// 1e-3 end to end in f32; reduced precision is held to the documented relative tolerances
// (docs/precision.md).
import { describe, it, expect } from 'vitest';
import { getEngine } from './helpers/gpu.ts';
import { TINY } from './helpers/golden.ts';
import { checkGolden, type CheckRow } from '../src/golden/check.ts';

function summarize(rows: CheckRow[]): string {
  return rows
    .filter((r) => !r.pass)
    .map((r) => `${r.name}: abs ${r.maxAbs.toExponential(2)} rel ${r.maxRel.toExponential(2)} > ${r.tol}`)
    .join('\n');
}

describe('golden: official Wan 2.1 reference, tiny case', () => {
  it('f32: every tensor within 1e-4 per component and 1e-3 end to end', async () => {
    const e = await getEngine();
    const rows = await checkGolden(e, TINY);
    const names = rows.map((r) => r.name);
    // every group of the case is exercised
    for (const g of ['sched.sigmas', 't5.prompt.context', 't5.negative.context', 'dit.t999.block0_self_attn_out', 'dit.t999.out', 'dit.t437_5.out', 'vae.decoder_up0_out', 'vae.video', 'sample.final_latent', 'sample.video']) {
      expect(names).toContain(g);
    }
    expect(rows.length).toBeGreaterThanOrEqual(50);
    expect(summarize(rows)).toBe('');
    expect(rows.filter((r) => r.group === 'dit' || r.group === 't5' || r.group === 'vae').every((r) => r.maxAbs <= 1e-4)).toBe(true);
  });

  it('bf16 weights: within the documented tolerance (3e-2 relative per component, 5e-2 end to end)', async () => {
    const e = await getEngine();
    const rows = await checkGolden(e, TINY, { weightDtype: 'bf16', metric: 'rel', tolComponent: 3e-2, tolEndToEnd: 5e-2, groups: ['t5', 'dit', 'vae', 'sample'] });
    expect(summarize(rows)).toBe('');
    // and it is genuinely reduced precision: errors well above the f32 ones
    expect(Math.max(...rows.map((r) => r.maxAbs))).toBeGreaterThan(1e-3);
  });

  it('f16 activations in the DiT (when the adapter has shader-f16)', async () => {
    const e = await getEngine();
    if (!e.caps.shaderF16) return; // adapter without f16: the path is refused with a clear error elsewhere
    const rows = await checkGolden(e, TINY, { activationDtype: 'f16', metric: 'rel', tolComponent: 3e-2, tolEndToEnd: 5e-2, groups: ['dit'] });
    expect(summarize(rows)).toBe('');
    expect(Math.max(...rows.map((r) => r.maxAbs))).toBeGreaterThan(1e-5);
  });
});
