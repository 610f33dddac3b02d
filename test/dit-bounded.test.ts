// The DiT's activation bounds (DitForwardOptions cfgSequential / ffnChunkTokens / attnChunkTokens):
// every combination gives exactly the floats of the unbounded forward (compared bit for bit) on a
// small random Wan DiT with B = 2 at odd sizes (chunks that do not divide L, a last chunk short
// enough to join the one before, chunks below the fewest rows a matmul call may get, chunks larger
// than L, a stream too short to bound); the weights are acquired once per block; and with every
// bound on, the forward's peak allocation falls below the unbounded one by the factor the tensor
// sizes give.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { Engine } from '../src/runtime/engine.ts';
import { WanTransformer3DModel, ditDimsFromConfig, autoFfnChunkTokens, autoAttnChunkTokens, type DitForwardOptions } from '../src/models/wan_dit/model.ts';
import { parseTransformerConfig } from '../src/io/model-folder.ts';
import { randomizeModule, WAN_1_3B_TRANSFORMER } from '../src/tools/random-model.ts';
import { releaseMatmulWorkspace } from '../src/ops/matmul.ts';
import type { BlockResidency } from '../src/nn/residency.ts';
import { Rng } from '../src/util/rng.ts';

let e: Engine;
beforeAll(async () => {
  e = await Engine.create();
});
afterAll(() => e?.destroy());

function dit(cfg: Record<string, unknown>, activationDtype: 'f32' | 'f16' = 'f32'): WanTransformer3DModel {
  const m = new WanTransformer3DModel({ ...ditDimsFromConfig(parseTransformerConfig({ ...WAN_1_3B_TRANSFORMER, ...cfg })), activationDtype });
  randomizeModule(m, 31, e, 'bf16');
  return m;
}

interface Inputs {
  x: Float32Array;
  shape: [number, number, number, number, number];
  ctx: Float32Array;
  textLen: number;
}

/** B = 2 latents [2, C, F, H, W] and text [2, textLen, textDim], seeded */
function inputs(m: WanTransformer3DModel, F: number, H: number, W: number, textLen: number): Inputs {
  const rng = new Rng(7);
  const C = m.dims.inChannels;
  return {
    x: rng.fillNormal(new Float32Array(2 * C * F * H * W)),
    shape: [2, C, F, H, W],
    ctx: rng.fillNormal(new Float32Array(2 * textLen * m.dims.textDim)),
    textLen,
  };
}

/** the forward's output; `ready` runs once the inputs are on the GPU, right before the forward */
async function run(m: WanTransformer3DModel, inp: Inputs, opts: DitForwardOptions, ready?: () => void): Promise<Float32Array> {
  return e.scopeAsync(async () => {
    const ctxEmb = m.embedText(e.fromHost(inp.ctx, [2, inp.textLen, m.dims.textDim], 'f32'));
    const x = e.fromHost(inp.x, inp.shape, 'f32');
    ready?.();
    const out = await m.forward(x, 500, ctxEmb, opts);
    return (await out.toArray()) as Float32Array;
  });
}

/** index of the first element whose bits differ (-1: bit-identical) */
function firstDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++) if (ua[i] !== ub[i]) return i;
  return -1;
}

// 2 heads x 16, ffn 96, 2 blocks; latents [2, 4, 3, 10, 14] -> L = 3·5·7 = 105 tokens per element
const SMALL = { num_layers: 2, num_attention_heads: 2, attention_head_dim: 16, ffn_dim: 96, freq_dim: 32, in_channels: 4, out_channels: 4, text_dim: 24, rope_max_seq_len: 64 };

describe('DiT activation bounds: bit-identical to the unbounded forward', () => {
  it('cfgSequential × ffnChunkTokens {0, 5, 37, 1000} × attnChunkTokens {0, 45, 1000} at L = 105, text 20 rows', async () => {
    const m = dit(SMALL);
    // 20 text rows: one element's cross-attention k / v projection alone has fewer rows than the
    // matmul's kernel switch (32), both elements together more
    const inp = inputs(m, 3, 10, 14, 20);
    const want = await run(m, inp, {});
    const bad: string[] = [];
    for (const cfgSequential of [false, true]) {
      // 5: raised to the fewest rows a matmul call may get; 37 and 45 leave last chunks of 31 and
      // 15 rows (joined to the chunk before) at L = 105 and 26 / 30 at 2L = 210 (FFN, batched)
      for (const ffnChunkTokens of [0, 5, 37, 1000]) {
        for (const attnChunkTokens of [0, 45, 1000]) {
          const got = await run(m, inp, { cfgSequential, ffnChunkTokens, attnChunkTokens });
          const i = firstDiff(got, want);
          if (i >= 0) bad.push(`cfgSequential ${cfgSequential} ffn ${ffnChunkTokens} attn ${attnChunkTokens}: element ${i} ${got[i]} != ${want[i]}`);
        }
      }
    }
    expect(bad).toEqual([]);
    m.disposeParams();
  });

  it('f16 activations (when the adapter has shader-f16): chunked k / v land at 16-bit offsets', async () => {
    if (!e.caps.shaderF16) return;
    const m = dit(SMALL, 'f16');
    const inp = inputs(m, 3, 10, 14, 20);
    const want = await run(m, inp, {});
    const got = await run(m, inp, { cfgSequential: true, ffnChunkTokens: 37, attnChunkTokens: 45 });
    expect(firstDiff(got, want)).toBe(-1);
    m.disposeParams();
  });

  it('a stream of 20 tokens (fewer than a matmul call may get per element) runs unbounded whatever the options', async () => {
    const m = dit(SMALL);
    const inp = inputs(m, 1, 8, 10, 20);
    const want = await run(m, inp, {});
    expect(firstDiff(await run(m, inp, { cfgSequential: true, ffnChunkTokens: 7, attnChunkTokens: 9 }), want)).toBe(-1);
    m.disposeParams();
  });

  it('cfgSequential acquires, prefetches and releases each block once', async () => {
    const m = dit(SMALL);
    const calls: string[] = [];
    const residency: BlockResidency = {
      acquire: async (i) => void calls.push(`acquire ${i}`),
      prefetch: (i) => void calls.push(`prefetch ${i}`),
      release: (i) => void calls.push(`release ${i}`),
    };
    await run(m, inputs(m, 3, 10, 14, 20), { residency, cfgSequential: true, ffnChunkTokens: 37, attnChunkTokens: 45 });
    expect(calls).toEqual(['acquire 0', 'prefetch 1', 'release 0', 'acquire 1', 'release 1']);
    m.disposeParams();
  });

  it('bad chunk sizes are one-line errors', async () => {
    const m = dit(SMALL);
    const inp = inputs(m, 3, 10, 14, 20);
    await expect(run(m, inp, { ffnChunkTokens: -1 })).rejects.toThrow(/^\[wan_dit\] ffnChunkTokens must be an integer >= 0 \(0 = whole\), got -1$/);
    await expect(run(m, inp, { attnChunkTokens: 2.5 })).rejects.toThrow(/^\[wan_dit\] attnChunkTokens must be an integer >= 0 \(0 = whole\), got 2.5$/);
    m.disposeParams();
  });
});

describe('auto chunk sizes', () => {
  it('FFN: the largest multiple of 64 whose [chunk, ffn_dim] intermediate fits one residual stream, in [64, L]', () => {
    expect(autoFfnChunkTokens(32760, 1536, 8960)).toBe(5568); // 1.3B 480p: 5615.9 -> 5568
    expect(autoFfnChunkTokens(75600, 5120, 13824)).toBe(27968); // 14B 720p: 28000 -> 27968
    expect(autoFfnChunkTokens(4096, 1536, 8960)).toBe(640);
    expect(autoFfnChunkTokens(1000, 64, 4096)).toBe(64); // 15.6: at least 64
    expect(autoFfnChunkTokens(40, 64, 256)).toBe(40); // at most L
    for (const [L, D, F] of [[32760, 1536, 8960], [4096, 1536, 8960], [75600, 5120, 13824], [1125, 256, 1024]] as const) {
      const c = autoFfnChunkTokens(L, D, F);
      expect(c % 64).toBe(0);
      expect(c * F).toBeLessThanOrEqual(L * D);
      expect((c + 64) * F).toBeGreaterThan(L * D);
    }
  });

  it('attention: whole up to 8192 tokens, else the largest multiple of 64 up to L/4', () => {
    expect(autoAttnChunkTokens(4096)).toBe(0);
    expect(autoAttnChunkTokens(8192)).toBe(0);
    expect(autoAttnChunkTokens(8193)).toBe(2048);
    expect(autoAttnChunkTokens(32760)).toBe(8128);
    expect(autoAttnChunkTokens(75600)).toBe(18880);
  });
});

describe('DiT activation bounds: peak memory', () => {
  // 4 heads x 64 (D = 256), ffn 4·D, one block; latents [2, 4, 5, 30, 30] -> L = 5·15·15 = 1125
  const BIG = { ...SMALL, num_layers: 1, num_attention_heads: 4, attention_head_dim: 64, ffn_dim: 1024 };
  const L = 1125;
  const D = 256;
  const DH = 64;
  const FFN = 1024;
  const TEXT = 24;

  async function peak(m: WanTransformer3DModel, inp: Inputs, opts: DitForwardOptions): Promise<{ out: Float32Array; bytes: number }> {
    let before = 0;
    const out = await run(m, inp, opts, () => {
      // the matmul's packing workspace (CPU adapters) grows with the largest call: start both runs without it
      releaseMatmulWorkspace(e);
      e.allocator.resetPeakMemoryStats();
      before = e.allocator.stats().allocated;
    });
    return { out, bytes: e.allocator.stats().peakAllocated - before };
  }

  it('cfgSequential + chunks: within the bound the sizes give, and at most half the unbounded peak', async () => {
    const m = dit(BIG);
    const inp = inputs(m, 5, 30, 30, TEXT);
    const S = L * D * 4; // one batch element's residual stream, bytes
    const rowsBytes = (n: number) => n * D * 4;
    const ffnChunk = autoFfnChunkTokens(L, D, FFN); // 256 (256·1024 <= 1125·256)
    const attnChunk = 256; // as autoAttnChunkTokens would above 8192 tokens: 4 chunks of 256, one of 101
    const unb = await peak(m, inp, {});
    const bnd = await peak(m, inp, { cfgSequential: true, ffnChunkTokens: ffnChunk, attnChunkTokens: attnChunk });
    expect(firstDiff(bnd.out, unb.out)).toBe(-1);
    // Unbounded, at the FFN: the stream [2, L, D] (2S), LN(x) (2S) and its [2, L, ffn] intermediate
    // (2·L·ffn·4 = 8S) exist together: 12S
    const unboundedAtLeast = 2 * S + 2 * S + 2 * L * FFN * 4;
    // Bounded: the stream (2S), RoPE tables, text k / v of both elements, modulation rows, plus the
    // largest phase: self-attention's whole-sequence k and v of one element (2S) with at most three
    // chunk-sized tensors (LN rows, q, attention output / projection); the FFN's chunk LN and
    // intermediate; the cross-attention's chunk tensors are below the self-attention's. 64 KiB more
    // for the small buffers (time embedding, the attention's running softmax state and dummies).
    const always = 2 * S + L * DH * 4 + 2 * 2 * TEXT * D * 4 + 2 * 6 * D * 4 + 65536;
    const phases = Math.max(2 * S + 3 * rowsBytes(attnChunk), ffnChunk * (D + FFN) * 4);
    // The 'ubo' kernels of CPU adapters (ops/matmul.ts, ops/attention.ts) add workspaces: the
    // matmul packs the largest activation operand seen (rows padded to 128, K to 256: the patch
    // embedding's 2L rows of 16 -> 256, an FFN chunk's intermediate) and the largest bf16 weight,
    // and the attention one head's k and v (keys padded to 256, plus a 64 KiB window)
    const up = (v: number, k: number) => Math.ceil(v / k) * k;
    const workspace = Math.max(up(2 * L, 128) * 256 * 4, up(ffnChunk, 128) * FFN * 4) + FFN * D * 2 + 2 * (up(L, 256) * DH + 16384) * 4;
    const boundedAtMost = always + phases + workspace;
    console.log(
      `peak allocated: unbounded ${(unb.bytes / S).toFixed(2)} S (>= ${(unboundedAtLeast / S).toFixed(2)}), bounded ${(bnd.bytes / S).toFixed(2)} S (<= ${(boundedAtMost / S).toFixed(2)}; S = ${S} bytes)`,
    );
    expect(unb.bytes).toBeGreaterThanOrEqual(unboundedAtLeast);
    expect(bnd.bytes).toBeLessThanOrEqual(boundedAtMost);
    // the factor the sizes give without the CPU workspaces: 12S against 5.1S here; with them the
    // unbounded run packs its whole [2L, ffn] intermediate too (8S more)
    expect(unboundedAtLeast / (boundedAtMost - workspace)).toBeGreaterThan(2);
    expect(bnd.bytes * 2).toBeLessThanOrEqual(unb.bytes);
    m.disposeParams();
  });
});
