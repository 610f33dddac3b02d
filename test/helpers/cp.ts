// Shared by the context-parallel tests (context-parallel, cp-ring, cp-levels, cp-compose): a random
// Wan DiT of a given config, a seeded input case, the one-device forward every CP forward is compared
// with, one CP forward of a case, and the max |diff| of two outputs.
import { expect } from 'vitest';
import type { Engine } from '../../src/runtime/engine.ts';
import type { ContextParallelDit, CpForwardOptions } from '../../src/parallel/cp-dit.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../../src/models/wan_dit/model.ts';
import { parseTransformerConfig } from '../../src/io/model-folder.ts';
import { randomizeModule, WAN_1_3B_TRANSFORMER } from '../../src/tools/random-model.ts';
import { Rng } from '../../src/util/rng.ts';

/** A random Wan DiT with 1.3B's config overridden by `cfg`, its weights on `e` (seed 41: the same weights on every rank). */
export function randomCpDit(e: Engine, cfg: Record<string, unknown>): WanTransformer3DModel {
  const m = new WanTransformer3DModel(ditDimsFromConfig(parseTransformerConfig({ ...WAN_1_3B_TRANSFORMER, ...cfg })));
  randomizeModule(m, 41, e, 'bf16');
  return m;
}

/** One CFG-batched forward's inputs (B = 2): latents [2, C, F, H, W] and a text context of textLen rows. */
export interface CpCase {
  x: Float32Array;
  shape: [number, number, number, number, number];
  ctx: Float32Array;
  textLen: number;
}

export function cpInputs(m: WanTransformer3DModel, F: number, H: number, W: number, textLen: number): CpCase {
  const rng = new Rng(9);
  const C = m.dims.inChannels;
  return { x: rng.fillNormal(new Float32Array(2 * C * F * H * W)), shape: [2, C, F, H, W], ctx: rng.fillNormal(new Float32Array(2 * textLen * m.dims.textDim)), textLen };
}

/** The one-device forward at t = 500 (the reference), with the model's own activation bounds `opts`. */
export async function oneDeviceForward(e: Engine, m: WanTransformer3DModel, c: CpCase, opts: Parameters<WanTransformer3DModel['forward']>[3] = {}): Promise<Float32Array> {
  return e.scopeAsync(async () => {
    const ctx = m.embedText(e.fromHost(c.ctx, [2, c.textLen, m.dims.textDim], 'f32'));
    const out = await m.forward(e.fromHost(c.x, c.shape, 'f32'), 500, ctx, opts);
    return (await out.toArray()) as Float32Array;
  });
}

/**
 * One CP forward of case c at t = 500 (the text embedded on rank 0 and replicated, the exchange
 * stats reset first): the output, and each rank's peak allocated bytes above what it held before.
 */
export async function cpForward(cp: ContextParallelDit, c: CpCase, opts: CpForwardOptions = {}): Promise<{ out: Float32Array; peaks: number[] }> {
  const e = cp.ranks[0]!.engine;
  const m = cp.ranks[0]!.dit;
  const ctx0 = e.scope(() => m.embedText(e.fromHost(c.ctx, [2, c.textLen, m.dims.textDim], 'f32')));
  const ctx = await cp.replicate(ctx0);
  cp.exchange.resetStats();
  const x = e.fromHost(c.x, c.shape, 'f32');
  for (const r of cp.ranks) await r.engine.sync();
  const base = cp.ranks.map((r) => r.engine.allocator.memoryAllocated());
  cp.resetPeaks();
  const out = await cp.forward(x, 500, ctx, opts);
  const v = (await out.toArray()) as Float32Array;
  const peaks = cp.ranks.map((r, k) => r.engine.allocator.maxMemoryAllocated() - base[k]!);
  for (const t of [x, out, ...ctx]) t.dispose();
  return { out: v, peaks };
}

/** max |a - b| over two outputs of the same length. */
export function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}
