// `npm run bench:cp -- [--tokens 1024] [--layers 1] [--rounds 5]` — context parallelism
// (src/parallel/) at real Wan 2.1 1.3B block shapes (D 1536, 12 heads, ffn 8960, random bf16
// weights, f32 activations, B = 2 as classifier-free guidance runs it, a 512-row text context):
// one DiT forward on one device (WanTransformer3DModel.forward, unbounded = level 0, and with the
// level 1-2 bounds: cfgSequential + auto FFN chunks) against the context-parallel forward over
// N = 2 and 3 devices on the same adapter, all in one process. Per round each variant runs once,
// in rotating order, after a warm-up round; every CP output must be within 1e-5 of the one-device
// one. Prints a markdown table: per-device peak allocated above the weights and inputs, median
// wall time, median exchange time (readbacks + host shuffle + uploads) and the compute time the
// exchanges waited for, and the bytes moved through the host per forward (checked against the
// formula, cpForwardBytes). Then the cost model: the predicted N-GPU speedup for Wan 1.3B at 480p
// (81 frames, 32,760 tokens) over PCIe, from this engine's measured H100 throughput and this
// machine's measured host copy bandwidth.
//
// Here (lavapipe on 2 shared CPU cores) the devices share the same two cores, so no speedup is
// possible: the table shows the overhead.
import { Engine } from '../src/runtime/engine.ts';
import { WanTransformer3DModel, ditDimsFromConfig, autoFfnChunkTokens } from '../src/models/wan_dit/model.ts';
import { parseTransformerConfig } from '../src/io/model-folder.ts';
import { randomizeModule, WAN_1_3B_TRANSFORMER } from '../src/tools/random-model.ts';
import { releaseMatmulWorkspace } from '../src/ops/matmul.ts';
import { Rng } from '../src/util/rng.ts';
import { ContextParallelDit, cpForwardBytes } from '../src/parallel/cp-dit.ts';
import type { Tensor } from '../src/tensor/tensor.ts';

const arg = (n: string) => {
  const i = process.argv.indexOf(n);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
const L = Number(arg('--tokens') ?? 1024);
const layers = Number(arg('--layers') ?? 1);
const rounds = Number(arg('--rounds') ?? 5);
if (!(Number.isInteger(L / 256) && L > 0)) throw new Error(`--tokens: a positive multiple of 256 (16 x 16 tokens per latent frame), got ${L}`);
if (!(Number.isInteger(layers) && layers >= 1)) throw new Error(`--layers: a whole number >= 1, got ${arg('--layers')}`);
if (!(Number.isInteger(rounds) && rounds >= 1)) throw new Error(`--rounds: a whole number >= 1, got ${arg('--rounds')}`);
const TEXT_LEN = 512;
const NS = [2, 3];

const engines: Engine[] = [];
for (let i = 0; i < 3; i++) engines.push(await Engine.create());
const cfg = { ...WAN_1_3B_TRANSFORMER, num_layers: layers };
const dits = engines.map((e) => {
  const m = new WanTransformer3DModel(ditDimsFromConfig(parseTransformerConfig(cfg)));
  randomizeModule(m, 1234, e, 'bf16');
  return m;
});
const m0 = dits[0]!;
const { numHeads, headDim, ffnDim, inChannels, textDim } = m0.dims;
const D = numHeads * headDim;
const weightBytes = m0.paramBytes();
console.log(`adapter: ${engines[0]!.adapterName}; ${layers} block(s) of D ${D}, ${numHeads} heads, ffn ${ffnDim}; L ${L} tokens, B = 2, text ${TEXT_LEN} rows; weights ${(weightBytes / 2 ** 20).toFixed(0)} MiB per device; ${rounds} rounds`);

const rng = new Rng(5);
const F = L / 256;
const shape: [number, number, number, number, number] = [2, inChannels, F, 32, 32];
const xHost = rng.fillNormal(new Float32Array(2 * inChannels * F * 32 * 32));
const ctxHost = rng.fillNormal(new Float32Array(2 * TEXT_LEN * textDim)).map((v) => v * 0.1);
const e0 = engines[0]!;
const ctx0 = e0.keep(e0.scope(() => m0.embedText(e0.fromHost(ctxHost, [2, TEXT_LEN, textDim], 'f32'))));
const cps = NS.map((N) => new ContextParallelDit(engines.slice(0, N).map((engine, r) => ({ engine, dit: dits[r]! }))));
const ctxs = await Promise.all(cps.map((cp) => cp.replicate(ctx0)));

interface Res {
  ms: number;
  peaks: number[];
  out: Float32Array;
  exchangeMs: number;
  computeMs: number;
  down: number;
  up: number;
}
async function runVariant(v: string): Promise<Res> {
  for (const e of engines) {
    releaseMatmulWorkspace(e);
    await e.sync();
  }
  const base = engines.map((e) => e.allocator.memoryAllocated());
  for (const e of engines) e.allocator.resetPeakMemoryStats();
  const x = e0.fromHost(xHost, shape, 'f32');
  const t0 = performance.now();
  let out: Tensor;
  let stats = { exchangeMs: 0, computeMs: 0, bytesDown: 0, bytesUp: 0 };
  if (v.startsWith('cp')) {
    const k = NS.indexOf(Number(v.slice(2)));
    const cp = cps[k]!;
    cp.exchange.resetStats();
    out = await cp.forward(x, 500, ctxs[k]!);
    stats = cp.exchange.stats;
  } else {
    const bounded = v === 'one-bounded';
    out = await m0.forward(x, 500, ctx0, bounded ? { cfgSequential: true, ffnChunkTokens: autoFfnChunkTokens(L, D, ffnDim) } : {});
  }
  const o = (await out.toArray()) as Float32Array;
  const ms = performance.now() - t0;
  const peaks = engines.map((e, i) => e.allocator.maxMemoryAllocated() - base[i]!);
  out.dispose();
  x.dispose();
  return { ms, peaks, out: o, exchangeMs: stats.exchangeMs, computeMs: stats.computeMs, down: stats.bytesDown, up: stats.bytesUp };
}

const variants = ['one', 'one-bounded', ...NS.map((n) => `cp${n}`)];
const res = new Map<string, Res[]>(variants.map((v) => [v, []]));
let ref: Float32Array | null = null;
for (let r = -1; r < rounds; r++) {
  for (let k = 0; k < variants.length; k++) {
    const v = variants[(k + Math.max(0, r)) % variants.length]!;
    const x = await runVariant(v);
    if (v === 'one') ref = x.out;
    if (r >= 0) res.get(v)!.push(x);
  }
  for (const v of variants) {
    const last = res.get(v)!.at(-1);
    if (!last || !ref) continue;
    let d = 0;
    for (let i = 0; i < ref.length; i++) d = Math.max(d, Math.abs(last.out[i]! - ref[i]!));
    if (d > 1e-5) throw new Error(`${v}: max |diff| ${d} against the one-device forward (> 1e-5)`);
  }
}
const median = (v: number[]) => {
  const s = [...v].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const MiB = (b: number) => (b / 2 ** 20).toFixed(1);
console.log('\n| variant | devices | peak allocated above weights + inputs, per device (MiB) | wall ms (median) | compute waited ms | exchange ms | host bytes down / up per forward (MiB) |');
console.log('|---|---|---|---|---|---|---|');
for (const v of variants) {
  const rs = res.get(v)!;
  const n = v.startsWith('cp') ? Number(v.slice(2)) : 1;
  const peaks = Array.from({ length: n }, (_, i) => MiB(median(rs.map((x) => x.peaks[i]!)))).join(' / ');
  const r0 = rs[0]!;
  if (v.startsWith('cp')) {
    const want = cpForwardBytes({ B: 2, L, D, blocks: layers, actBytes: 4, latentElems: xHost.length, tokenRow: inChannels * 4, headRow: 4 * m0.dims.outChannels, ranks: n });
    if (r0.down !== want.down || r0.up !== want.up) throw new Error(`${v}: moved ${r0.down} / ${r0.up} bytes, the formula says ${want.down} / ${want.up}`);
  }
  const name = v === 'one' ? 'one device, unbounded (level 0)' : v === 'one-bounded' ? 'one device, cfg_sequential + FFN chunks (levels 1-2)' : `context parallel, N = ${n}`;
  console.log(
    `| ${name} | ${n} | ${peaks} | ${median(rs.map((x) => x.ms)).toFixed(0)} | ${v.startsWith('cp') ? median(rs.map((x) => x.computeMs)).toFixed(0) : '-'} | ${v.startsWith('cp') ? median(rs.map((x) => x.exchangeMs)).toFixed(0) : '-'} | ${v.startsWith('cp') ? `${MiB(r0.down)} / ${MiB(r0.up)}` : '-'} |`,
  );
}

// ---- host copy bandwidth (the shuffle is Uint8Array.set of row segments; a readback copies once more)
const big = new Uint8Array(256 * 2 ** 20).fill(1);
const dst = new Uint8Array(big.length);
const cpT: number[] = [];
for (let i = 0; i < 5; i++) {
  const t = performance.now();
  dst.set(big);
  cpT.push(performance.now() - t);
}
const hostGBs = big.length / (median(cpT) / 1e3) / 1e9;

// ---- cost model: Wan 1.3B 480p (832x480, 81 frames: 21 x 30 x 52 = 32,760 tokens), 30 blocks, B = 2
// compute per block from the FLOPs at this engine's measured H100 rates (docs/gpu-run.md:
// matmul 15-17 TFLOP/s, fused attention 10-11 TFLOP/s; the low ends taken); exchange per block and
// device: 4·B·(L/N)·D·4 bytes down and up (f32) over the link, plus the host copies (the readback's
// copy out of the mapped buffer and the shuffle: 2 copies of everything down, serial on one thread)
{
  const Lw = 32760;
  const Dw = 1536;
  const ffn = 8960;
  const text = 512;
  const B = 2;
  const matmulFlops = B * (2 * Lw * Dw * Dw * 4 + 2 * Lw * Dw * Dw * 2 + 2 * Lw * Dw * ffn * 2) + B * 2 * text * Dw * Dw * 2;
  const attnFlops = B * (4 * Lw * Lw * Dw + 4 * Lw * text * Dw);
  const computeMs = (matmulFlops / 15e12 + attnFlops / 10e12) * 1e3;
  console.log(`\nhost copy bandwidth here: ${hostGBs.toFixed(1)} GB/s (Uint8Array.set of 256 MiB, median of 5)`);
  console.log(`cost model, Wan 1.3B 480p, per block: one H100 computes ${computeMs.toFixed(0)} ms (${(matmulFlops / 1e12).toFixed(2)} TFLOP matmul at 15 TFLOP/s + ${(attnFlops / 1e12).toFixed(2)} TFLOP attention at 10 TFLOP/s)`);
  console.log('\n| N | link | GB/s per direction | host copy GB/s | compute per device ms | link ms | host copy ms | predicted speedup (no overlap) | with f16 activations |');
  console.log('|---|---|---|---|---|---|---|---|---|');
  for (const N of [2, 4, 8]) {
    for (const [link, gbs] of [
      ['PCIe 4 x16', 25],
      ['PCIe 5 x16', 50],
    ] as const) {
      for (const host of [hostGBs, 10]) {
        const pred = (es: number) => {
          const perDev = 4 * B * (Lw / N) * Dw * es; // each way, per device
          const linkMs = ((2 * perDev) / (gbs * 1e9)) * 1e3; // down then up (each device on its own link)
          const hostMs = ((2 * N * perDev) / (host * 1e9)) * 1e3; // every device's data copied twice, one thread
          return { linkMs, hostMs, speedup: computeMs / (computeMs / N + linkMs + hostMs) };
        };
        const p = pred(4);
        console.log(`| ${N} | ${link} | ${gbs} | ${host.toFixed(1)} | ${(computeMs / N).toFixed(0)} | ${p.linkMs.toFixed(0)} | ${p.hostMs.toFixed(0)} | ${p.speedup.toFixed(2)}x | ${pred(2).speedup.toFixed(2)}x |`);
      }
    }
  }
}

for (const ts of ctxs) for (const t of ts.slice(1)) t.dispose();
ctx0.dispose();
for (const m of dits) m.disposeParams();
for (const e of engines) e.destroy();
