// `npx tsx bench/dit-activations.ts [--tokens 4096] [--rounds 5]` — the DiT's activation bounds
// at real Wan 2.1 1.3B block shapes (D 1536, 12 heads, ffn 8960, random bf16 weights, f32
// activations, a 512-row text context, B = 2 as classifier-free guidance runs it): one DiT forward
// with a single block, unbounded vs bounded (cfgSequential + autoFfnChunkTokens +
// autoAttnChunkTokens, as the pipeline's `0 = auto` resolves them) and, where the auto attention
// chunk is whole (L <= 8192), bounded with the attention in chunks of L/4 as well (what the auto
// choice does above 8192 tokens), all in one process. Per round each runs once, in rotating order
// (slow drifts of a shared machine hit all alike), each starting without the matmul's packing
// workspace; the peak is the allocator's peak allocated above what was live before the forward
// (weights and inputs excluded), the time is to the output read back. A warm-up round first
// (lavapipe compiles each pipeline on its first dispatch). Every output must be bit-identical to
// the unbounded one, every round. Prints a markdown table: peak and median time per variant.
//
// On lavapipe keep L at or below ~6000 tokens: the process's memory mappings grow with the
// dispatches submitted before the read-back, and a forward of more than ~64k dispatches (L 8192
// at these shapes: 85k, with or without the bounds) reaches vm.max_map_count (65530) and dies in
// lavapipe with SIGSEGV.
import { Engine } from '../src/runtime/engine.ts';
import { WanTransformer3DModel, ditDimsFromConfig, autoFfnChunkTokens, autoAttnChunkTokens, type DitForwardOptions } from '../src/models/wan_dit/model.ts';
import { parseTransformerConfig } from '../src/io/model-folder.ts';
import { randomizeModule, WAN_1_3B_TRANSFORMER } from '../src/tools/random-model.ts';
import { releaseMatmulWorkspace } from '../src/ops/matmul.ts';
import { Rng } from '../src/util/rng.ts';

const arg = (n: string) => {
  const i = process.argv.indexOf(n);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
const tokenList = (arg('--tokens') ?? '4096').split(',').map(Number);
const rounds = Number(arg('--rounds') ?? 5);
const TEXT_LEN = 512;
for (const L of tokenList) {
  // latents [2, 16, L / 1024, 64, 64]: patches (1, 2, 2) give 32 x 32 tokens per frame
  if (!(Number.isInteger(L / 1024) && L > 0)) throw new Error(`--tokens: each value must be a positive multiple of 1024 (32 x 32 tokens per latent frame), got ${L}`);
}
if (!(Number.isInteger(rounds) && rounds >= 1)) throw new Error(`--rounds: a whole number >= 1, got ${arg('--rounds')}`);

const e = await Engine.create();
const m = new WanTransformer3DModel(ditDimsFromConfig(parseTransformerConfig({ ...WAN_1_3B_TRANSFORMER, num_layers: 1 })));
randomizeModule(m, 1234, e, 'bf16');
const { numHeads, headDim, ffnDim, inChannels } = m.dims;
const D = numHeads * headDim;
console.log(`adapter: ${e.adapterName}; one block of D ${D}, ${numHeads} heads, ffn ${ffnDim}; B = 2, text ${TEXT_LEN} rows; ${rounds} rounds`);

const median = (v: number[]) => {
  const s = [...v].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const MiB = (b: number) => (b / 2 ** 20).toFixed(0);

interface Result {
  seconds: number;
  peak: number;
  out: Float32Array;
}

const lines: string[] = [];
for (const L of tokenList) {
  const rng = new Rng(L);
  const shape = [2, inChannels, L / 1024, 64, 64];
  const x = e.keep(e.fromHost(rng.fillNormal(new Float32Array(shape.reduce((a, b) => a * b, 1))), shape, 'f32'));
  const ctxEmb = e.keep(e.fromHost(rng.fillNormal(new Float32Array(2 * TEXT_LEN * D)), [2, TEXT_LEN, D], 'f32'));
  const ffnChunkTokens = autoFfnChunkTokens(L, D, ffnDim);
  const attnChunkTokens = autoAttnChunkTokens(L);
  const variants: Record<string, DitForwardOptions> = {
    unbounded: {},
    [`bounded (ffn ${ffnChunkTokens}, attn ${attnChunkTokens || 'whole'})`]: { cfgSequential: true, ffnChunkTokens, attnChunkTokens },
  };
  if (!attnChunkTokens) variants[`bounded (ffn ${ffnChunkTokens}, attn ${Math.floor(L / 4 / 64) * 64})`] = { cfgSequential: true, ffnChunkTokens, attnChunkTokens: Math.floor(L / 4 / 64) * 64 };
  const names = Object.keys(variants);
  const run = async (opts: DitForwardOptions): Promise<Result> => {
    releaseMatmulWorkspace(e);
    e.allocator.resetPeakMemoryStats();
    const before = e.allocator.stats().allocated;
    const t0 = performance.now();
    const out = await e.scopeAsync(async () => (await (await m.forward(x, 500, ctxEmb, opts)).toArray()) as Float32Array);
    const seconds = (performance.now() - t0) / 1000;
    return { seconds, peak: e.allocator.stats().peakAllocated - before, out };
  };
  const check = (a: Result, b: Result) => {
    const ua = new Uint32Array(a.out.buffer, a.out.byteOffset, a.out.length);
    const ub = new Uint32Array(b.out.buffer, b.out.byteOffset, b.out.length);
    for (let i = 0; i < ua.length; i++) if (ua[i] !== ub[i]) throw new Error(`L ${L}: bounded output differs from unbounded at element ${i} (${b.out[i]} vs ${a.out[i]})`);
  };
  console.log(`L ${L}: ${names.join(', ')}; warm-up`);
  const base = await run(variants.unbounded!);
  for (const k of names.slice(1)) check(base, await run(variants[k]!));
  const times: Record<string, number[]> = Object.fromEntries(names.map((k) => [k, []]));
  const peaks: Record<string, number> = Object.fromEntries(names.map((k) => [k, 0]));
  for (let r = 0; r < rounds; r++) {
    const order = names.map((_, i) => names[(i + r) % names.length]!);
    const res: Record<string, Result> = {};
    for (const k of order) {
      res[k] = await run(variants[k]!);
      times[k]!.push(res[k].seconds);
      peaks[k] = Math.max(peaks[k]!, res[k].peak);
    }
    for (const k of names.slice(1)) check(res.unbounded!, res[k]!);
    console.log(`  round ${r + 1}: ${names.map((k) => `${k} ${res[k]!.seconds.toFixed(2)} s`).join(', ')}`);
  }
  const mu = median(times.unbounded!);
  for (const k of names) {
    const ratios = times[k]!.map((t, i) => t / times.unbounded![i]!);
    lines.push(
      `| ${L} | ${k} | ${MiB(peaks[k]!)} | ${(peaks[k]! / peaks.unbounded!).toFixed(2)} | ${median(times[k]!).toFixed(2)} | ${times[k]!.map((t) => t.toFixed(2)).join(' / ')} | ${(median(times[k]!) / mu).toFixed(3)} | ${median(ratios).toFixed(3)} |`,
    );
  }
  x.dispose();
  ctxEmb.dispose();
}
console.log(`\n| tokens L | forward | peak allocated MiB | × unbounded | median s | rounds s | median × unbounded | median of per-round ratios |\n|---:|---|---:|---:|---:|---|---:|---:|\n${lines.join('\n')}`);
e.destroy();
