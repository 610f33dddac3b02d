// `npm run bench:cp -- [--tokens 1024] [--layers 1] [--rounds 5] [--memory]` — context parallelism
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
//
// `--attention ulysses|ring|both` (default ulysses): the CP forward's self-attention
// (infer.diffusion.cp_attention, src/parallel/ring.ts); `both` runs each N with Ulysses and with
// the ring as separate variants of the same rounds (bytes checked against ringForwardBytes), and
// prints the ring's rows of the cost model (ring vs Ulysses, also for N that do not divide 12 heads).
//
// `--exchange mapped|copy|both` (default mapped): the exchanges' host path (src/parallel/exchange.ts:
// 'mapped' one host copy per byte, 'copy' the first path's read + shuffle + writeBuffer); `both`
// runs each N on both as separate variants of the same rounds (`-copy`). The exchange section
// then times the all-to-all alone on both paths (N = 2, 3, [2, L, 12, 128] f32 at --a2a-tokens,
// default 8192; medians of --rounds) and Dawn's writeBuffer copy rate, and the cost model uses the
// measured copy rates: copies per byte, the chunked overlap of link transfers with the host copy.
// `--exchange-only`: that section and the cost model alone (no DiT forwards).
import { Engine } from '../src/runtime/engine.ts';
import { WanTransformer3DModel, ditDimsFromConfig, autoFfnChunkTokens } from '../src/models/wan_dit/model.ts';
import { parseTransformerConfig } from '../src/io/model-folder.ts';
import { randomizeModule, WAN_1_3B_TRANSFORMER } from '../src/tools/random-model.ts';
import { releaseMatmulWorkspace } from '../src/ops/matmul.ts';
import { Rng } from '../src/util/rng.ts';
import { ContextParallelDit, cpForwardBytes } from '../src/parallel/cp-dit.ts';
import { ringForwardBytes } from '../src/parallel/ring.ts';
import { HostExchange, splitRanges, rowsToHeadsShuffle, headsToRowsShuffle, type ExchangePath } from '../src/parallel/exchange.ts';
import type { Tensor } from '../src/tensor/tensor.ts';

const arg = (n: string) => {
  const i = process.argv.indexOf(n);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
// `--memory`: the memory rows instead (bench/cp-memory.ts: per-device peaks at level 2 with and
// without the weight shard, the planner's per-device check, issue 24's memory target at 480p)
if (process.argv.includes('--memory')) {
  const { memoryBench } = await import('./cp-memory.ts');
  await memoryBench({ tokens: Number(arg('--tokens') ?? 256), layers: Number(arg('--layers') ?? 4), rounds: Number(arg('--rounds') ?? 1), planOnly: process.argv.includes('--plan-only') });
  process.exit(0);
}
const L = Number(arg('--tokens') ?? 1024);
const layers = Number(arg('--layers') ?? 1);
const rounds = Number(arg('--rounds') ?? 5);
if (!(Number.isInteger(L / 256) && L > 0)) throw new Error(`--tokens: a positive multiple of 256 (16 x 16 tokens per latent frame), got ${L}`);
if (!(Number.isInteger(layers) && layers >= 1)) throw new Error(`--layers: a whole number >= 1, got ${arg('--layers')}`);
if (!(Number.isInteger(rounds) && rounds >= 1)) throw new Error(`--rounds: a whole number >= 1, got ${arg('--rounds')}`);
const TEXT_LEN = 512;
const NS = [2, 3];
const attentionArg = arg('--attention') ?? 'ulysses';
if (!['ulysses', 'ring', 'both'].includes(attentionArg)) throw new Error(`--attention: ulysses, ring or both, got ${attentionArg}`);
const ATTENTIONS = attentionArg === 'both' ? (['ulysses', 'ring'] as const) : ([attentionArg] as Array<'ulysses' | 'ring'>);
/** a CP variant's name: cp<N>, or cp<N>-ring; -copy: the 'copy' exchange path */
const cpN = (v: string) => parseInt(v.slice(2), 10);
const exchangeArg = arg('--exchange') ?? 'mapped';
if (!['mapped', 'copy', 'both'].includes(exchangeArg)) throw new Error(`--exchange: mapped, copy or both, got ${exchangeArg}`);
const A2A_TOKENS = Number(arg('--a2a-tokens') ?? 8192);
if (!(Number.isInteger(A2A_TOKENS) && A2A_TOKENS >= 3)) throw new Error(`--a2a-tokens: a whole number >= 3, got ${arg('--a2a-tokens')}`);

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
    const k = NS.indexOf(cpN(v));
    const cp = cps[k]!;
    cp.exchange.resetStats();
    cp.exchange.path = v.endsWith('-copy') || (exchangeArg === 'copy' && !v.includes('-mapped')) ? 'copy' : 'mapped';
    out = await cp.forward(x, 500, ctxs[k]!, { attention: v.endsWith('-ring') ? 'ring' : 'ulysses' });
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

// (--exchange-only: no DiT forwards, only the exchange section and the cost model)
const variants = process.argv.includes('--exchange-only')
  ? []
  : ['one', 'one-bounded', ...NS.flatMap((n) => ATTENTIONS.map((a) => (a === 'ring' ? `cp${n}-ring` : `cp${n}`))), ...(exchangeArg === 'both' ? NS.map((n) => `cp${n}-copy`) : [])];
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
  const n = v.startsWith('cp') ? cpN(v) : 1;
  const peaks = Array.from({ length: n }, (_, i) => MiB(median(rs.map((x) => x.peaks[i]!)))).join(' / ');
  const r0 = rs[0]!;
  if (v.startsWith('cp')) {
    const want = (v.includes('-ring') ? ringForwardBytes : cpForwardBytes)({ B: 2, L, D, blocks: layers, actBytes: 4, latentElems: xHost.length, tokenRow: inChannels * 4, headRow: 4 * m0.dims.outChannels, ranks: n, heads: m0.dims.numHeads, path: v.endsWith('-copy') || (exchangeArg === 'copy' && !v.includes('-mapped')) ? 'copy' : 'mapped' });
    if (r0.down !== want.down || r0.up !== want.up) throw new Error(`${v}: moved ${r0.down} / ${r0.up} bytes, the formula says ${want.down} / ${want.up}`);
  }
  const name =
    v === 'one'
      ? 'one device, unbounded (level 0)'
      : v === 'one-bounded'
        ? 'one device, cfg_sequential + FFN chunks (levels 1-2)'
        : `context parallel, N = ${n}${v.endsWith('-ring') ? ', ring attention' : attentionArg === 'both' ? ', Ulysses' : ''}${exchangeArg !== 'mapped' ? (v.endsWith('-copy') || exchangeArg === 'copy' ? ', copy exchange' : ', mapped exchange') : ''}`;
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

// ---- the exchange alone on both paths (src/parallel/exchange.ts): Ulysses' all-to-all there and back
// of [2, L, 12, 128] f32 (q of a 1.3B block at L = --a2a-tokens) over N = 2 and 3 devices, the paths
// in rotating order per round, medians of --rounds after a warm-up; the round trip checked byte for
// byte. Then Dawn's queue.writeBuffer copy rate (the mapped path's one host copy), 64 MiB, median of 5.
const xchg: Array<{ N: number; path: ExchangePath; ms: number; bytes: number }> = [];
{
  const Hw = 12;
  const Dh = 128;
  console.log(`\nexchange paths: all-to-all there and back of [2, ${A2A_TOKENS}, ${Hw}, ${Dh}] f32, ${rounds} rounds`);
  for (const N of NS) {
    const g = { B: 2, rows: splitRanges(A2A_TOKENS, N), heads: splitRanges(Hw, N), Dh, elemBytes: 4 };
    const hostRows = g.rows.map(([r0, r1]) => new Rng(11 + r0).fillNormal(new Float32Array(2 * (r1 - r0) * Hw * Dh)));
    const src = g.rows.map(([r0, r1], r) => engines[r]!.fromHost(hostRows[r]!, [2, r1 - r0, Hw, Dh], 'f32', 'bench.a2a'));
    const paths: ExchangePath[] = ['copy', 'mapped'];
    const exs = paths.map((path) => new HostExchange(engines.slice(0, N), { path }));
    const times = new Map<ExchangePath, number[]>(paths.map((p) => [p, []]));
    for (let r = -1; r < rounds; r++) {
      for (let k = 0; k < paths.length; k++) {
        const i = (k + Math.max(0, r)) % paths.length;
        const ex = exs[i]!;
        ex.resetStats();
        const heads = await ex.exchange(src, rowsToHeadsShuffle(g), g.heads.map(([h0, h1]) => (h1 > h0 ? [2, A2A_TOKENS, h1 - h0, Dh] : null)), 'f32', 'bench.a2a');
        const back = await ex.exchange(heads, headsToRowsShuffle(g), g.rows.map(([r0, r1]) => [2, r1 - r0, Hw, Dh]), 'f32', 'bench.a2a');
        if (r === -1) {
          for (const [q, t] of back.entries()) {
            const v = (await t!.toArray()) as Float32Array;
            if (v.some((x, j) => x !== hostRows[q]![j])) throw new Error(`exchange path ${paths[i]}: the round trip changed rank ${q}'s rows`);
          }
          if (paths[i] === 'mapped' && ex.stats.mapped !== 2) throw new Error('the mapped path fell back to the copy path');
        }
        for (const t of [...heads, ...back]) t?.dispose();
        if (r >= 0) times.get(paths[i]!)!.push(ex.stats.exchangeMs);
        if (r === 0) xchg.push({ N, path: paths[i]!, ms: 0, bytes: ex.stats.bytesDown });
      }
    }
    for (const x of xchg.filter((y) => y.N === N)) x.ms = median(times.get(x.path)!);
    for (const ex of exs) ex.releaseStaging();
    for (const t of src) t.dispose();
  }
  console.log('\n| N | exchange path | host copies per byte | exchange ms, there and back (median) | bytes down per round trip (MiB) | GB/s (bytes down / exchange ms) | mapped / copy time |');
  console.log('|---|---|---|---|---|---|---|');
  for (const x of xchg) {
    const copy = xchg.find((y) => y.N === x.N && y.path === 'copy')!;
    console.log(`| ${x.N} | ${x.path} | ${x.path === 'copy' ? 3 : 1} | ${x.ms.toFixed(0)} | ${MiB(x.bytes)} | ${(x.bytes / (x.ms / 1e3) / 1e9).toFixed(2)} | ${(x.ms / copy.ms).toFixed(2)} |`);
  }
}
// Dawn's writeBuffer: the bytes are copied into its upload staging during the call (the one host copy)
let writeGBs = 0;
{
  const n = 64 * 2 ** 20;
  const buf = e0.device.createBuffer({ size: n, usage: GPUBufferUsage.COPY_DST | GPUBufferUsage.STORAGE });
  const ts: number[] = [];
  for (let i = 0; i < 6; i++) {
    const t = performance.now();
    e0.device.queue.writeBuffer(buf, 0, big.buffer, 0, n);
    if (i > 0) ts.push(performance.now() - t);
    await e0.device.queue.onSubmittedWorkDone();
  }
  buf.destroy();
  writeGBs = n / (median(ts) / 1e3) / 1e9;
  // the alternative upload: our own copy into a mapped MAP_WRITE staging buffer (then copyBufferToBuffer)
  const stage = e0.device.createBuffer({ size: n, usage: GPUBufferUsage.MAP_WRITE | GPUBufferUsage.COPY_SRC });
  const ws: number[] = [];
  for (let i = 0; i < 6; i++) {
    await stage.mapAsync(GPUMapMode.WRITE);
    const t = performance.now();
    new Uint8Array(stage.getMappedRange()).set(big.subarray(0, n));
    if (i > 0) ws.push(performance.now() - t);
    stage.unmap();
  }
  stage.destroy();
  const stageGBs = n / (median(ws) / 1e3) / 1e9;
  console.log(`\nDawn queue.writeBuffer copy rate here: ${writeGBs.toFixed(1)} GB/s (64 MiB per call, median of 5; the call's own time); a copy into a mapped MAP_WRITE range: ${stageGBs.toFixed(1)} GB/s`);
}

// ---- cost model: Wan 1.3B 480p (832x480, 81 frames: 21 x 30 x 52 = 32,760 tokens), 30 blocks, B = 2
// compute per block from the FLOPs at this engine's measured H100 rates (docs/gpu-run.md:
// matmul 15-17 TFLOP/s, fused attention 10-11 TFLOP/s; the low ends taken). Per block 4 exchanges
// (q, k, v there, the attention output back), each moving B·(L/N)·D·es bytes per device down and up
// over the device's own link. The host copies are serial on the one main thread (every device's
// bytes pass through it):
// - 'copy' path (as first built): 3 host copies per byte (Engine.read's copy out of the mapped
//   buffer, the shuffle, writeBuffer's copy into Dawn's staging; the first model counted 2) at the
//   memcpy rate measured here, nothing overlapped: link + host.
// - 'mapped' path: 1 host copy per byte (writeBuffer straight from the mapped readback range) at
//   Dawn's writeBuffer rate measured here, and only for the bytes that change device: a device's
//   own part (1/N of what it sends: its rows of its heads) is a GPU copy (mappedMs); the chunks
//   (16 MiB) are read back, copied and uploaded as they arrive, so per exchange the link down, the
//   host copy and the link up overlap but for one chunk's fill and drain: max(link down, host, link
//   up) + 2 chunks' link time; plus the GPU packing (slice per destination) and the concat on the
//   way back at this engine's measured H100 permute rate (docs/notes/norm-layout.md: 1207 GB/s;
//   read + write).
// the cost models' workload: one block of Wan 1.3B at 480p (832×480, 81 frames), CFG batched
const W480 = { L: 32760, D: 1536, H: 12, ffn: 8960, text: 512, B: 2 };
/** its matmul FLOPs per block (q/k/v/o, cross-attention q/o, FFN; the text's k/v) */
const W480_MATMUL_FLOPS = (() => {
  const { L, D, ffn, text, B } = W480;
  return B * (2 * L * D * D * 4 + 2 * L * D * D * 2 + 2 * L * D * ffn * 2) + B * 2 * text * D * D * 2;
})();
/** the mapped exchange's chunk, and this engine's H100 permute rate (read + write) */
const CHUNK = 16 * 2 ** 20;
const GPU_COPY = 1207e9;
/**
 * The mapped path's exposed ms per block for Ulysses at N devices (link and host rates in bytes/s, es
 * the activation's bytes): 4 exchanges; each device sends B·(L/N)·D·es bytes per exchange, of which
 * its own part (1/N: its rows of its heads) stays on its GPU (a GPU copy) and (N-1)/N leave it over
 * its link, so the host copies (N-1)·B·(L/N)·D·es bytes per exchange for all devices, serially;
 * per exchange max(link, host copy) + 2 chunks' fill; plus the GPU packing (q, k, v sliced, the output
 * concatenated: read + write) and the own parts' GPU copies.
 */
function mappedMs(N: number, link: number, host: number, es: number): number {
  const { L, D, B } = W480;
  const ms = (bytes: number, rate: number) => (bytes / rate) * 1e3;
  const perDev = B * (L / N) * D * es;
  const out = ((N - 1) / N) * perDev;
  const fill = 2 * ms(Math.min(CHUNK, out), link);
  const pack = ms(2 * (3 * perDev + perDev), GPU_COPY);
  const local = 4 * ms((2 * perDev) / N, GPU_COPY);
  return 4 * (Math.max(ms(out, link), ms(N * out, host)) + fill) + pack + local;
}
{
  const { L: Lw, D: Dw, text, B } = W480;
  const matmulFlops = W480_MATMUL_FLOPS;
  const attnFlops = B * (4 * Lw * Lw * Dw + 4 * Lw * text * Dw);
  const computeMs = (matmulFlops / 15e12 + attnFlops / 10e12) * 1e3;
  console.log(`\nhost copy bandwidth here: ${hostGBs.toFixed(1)} GB/s (Uint8Array.set of 256 MiB, median of 5); writeBuffer ${writeGBs.toFixed(1)} GB/s`);
  console.log(`cost model, Wan 1.3B 480p, per block: one H100 computes ${computeMs.toFixed(0)} ms (${(matmulFlops / 1e12).toFixed(2)} TFLOP matmul at 15 TFLOP/s + ${(attnFlops / 1e12).toFixed(2)} TFLOP attention at 10 TFLOP/s)`);
  console.log('\n| N | link | GB/s per direction | exchange path | host copies per byte | host copy GB/s | compute per device ms | exchange ms exposed per block | predicted speedup (f32 activations) | with f16 activations |');
  console.log('|---|---|---|---|---|---|---|---|---|---|');
  const exposed = (N: number, gbs: number, path: ExchangePath, host: number, es: number) => {
    const perDev = B * (Lw / N) * Dw * es; // one exchange, one device, each way
    const ms = (bytes: number, rate: number) => (bytes / rate) * 1e3;
    // (copy: two JavaScript copies at the memcpy rate `host`, writeBuffer's at its own measured rate)
    if (path === 'copy') return 4 * (2 * ms(perDev, gbs * 1e9) + 2 * ms(N * perDev, host * 1e9) + ms(N * perDev, writeGBs * 1e9));
    return mappedMs(N, gbs * 1e9, host * 1e9, es);
  };
  for (const N of [2, 4, 8]) {
    for (const [link, gbs] of [
      ['PCIe 4 x16', 25],
      ['PCIe 5 x16', 50],
    ] as const) {
      for (const [path, host] of [
        ['copy', hostGBs],
        ['mapped', writeGBs],
        ['mapped', 10],
      ] as Array<[ExchangePath, number]>) {
        const sp = (es: number) => (computeMs / (computeMs / N + exposed(N, gbs, path, host, es))).toFixed(2);
        console.log(`| ${N} | ${link} | ${gbs} | ${path} | ${path === 'copy' ? 3 : 1} | ${path === 'copy' ? `${host.toFixed(1)} (2), ${writeGBs.toFixed(1)} (1)` : host.toFixed(1)} | ${(computeMs / N).toFixed(0)} | ${exposed(N, gbs, path, host, 4).toFixed(0)} | ${sp(4)}x | ${sp(2)}x |`);
      }
    }
  }
  // the host copy rate the mapped path needs for a 1.7x 2-GPU speedup (PCIe 4, f32): the exposed time
  // T1/1.7 - T1/2 spread over the 4 exchanges, less each one's chunk fill and the GPU packing
  {
    // (bisection on the host rate: the exposed time falls as the rate grows)
    const N = 2;
    const want = computeMs / 1.7 - computeMs / N;
    let lo = 0.1e9;
    let hi = 1000e9;
    for (let i = 0; i < 60; i++) {
      const mid = Math.sqrt(lo * hi);
      if (mappedMs(N, 25e9, mid, 4) > want) lo = mid;
      else hi = mid;
    }
    console.log(`\n1.7x at N = 2 over PCIe 4 (f32) needs the mapped path's host copy at >= ${(hi / 1e9).toFixed(1)} GB/s (measured here: writeBuffer ${writeGBs.toFixed(1)} GB/s)`);
  }
}

// ---- ring attention's rows of the cost model (src/parallel/ring.ts; with --attention ring|both): the
// same Wan 1.3B 480p block and H100 rates, PCIe 4 x16; per N, Ulysses (the busiest device runs
// ceil(12/N) of the 12 heads' attention: uneven when N does not divide 12) against the ring (every
// device 1/N of the attention). Ulysses' exchange: the table above's 'mapped' path at the writeBuffer
// rate (4 exchanges of B·(L/N)·D per device each way, per exchange max(link, host copy) + 2 chunks'
// fill, + the GPU packing). The ring as built: every rank's K and V read back once (2·B·L·D down:
// Engine.read, one host copy at the memcpy rate) and (N-1)·2·B·L·D up (writeBuffer, one host copy at
// its rate), each device's own bytes over its link (down (2/N)·B·L·D, up (N-1)·(2/N)·B·L·D): nothing
// overlapped, and (last column) with the uploads overlapped: the passes are queued without waiting,
// so on GPUs the main thread's writeBuffer copies for passes 1..N-1 (and their link time) run while the
// devices compute the attention of passes 0..N-2 (selfMs·(N-1)/N² per device); only what exceeds that
// is exposed. The readback (before pass 0) is exposed either way.
if (ATTENTIONS.includes('ring')) {
  const { L: Lw, D: Dw, H: Hw, text, B } = W480;
  const gbs = 25e9;
  const matmulMs = (W480_MATMUL_FLOPS / 15e12) * 1e3;
  const selfMs = ((B * 4 * Lw * Lw * Dw) / 10e12) * 1e3;
  const crossMs = ((B * 4 * Lw * text * Dw) / 10e12) * 1e3;
  const T1 = matmulMs + selfMs + crossMs;
  const ms = (bytes: number, rate: number) => (bytes / rate) * 1e3;
  const ulyssesMs = (N: number, es: number) => mappedMs(N, gbs, writeGBs * 1e9, es);
  const ringMs = (N: number, es: number, overlap = false) => {
    const unit = B * Lw * Dw * es; // B·L·D elements, all devices
    const down = 2 * unit;
    const up = (N - 1) * 2 * unit;
    const downMs = ms(down / N, gbs) + ms(down, hostGBs * 1e9);
    const upMs = ms(up / N, gbs) + ms(up, writeGBs * 1e9);
    return downMs + (overlap ? Math.max(0, upMs - (selfMs * (N - 1)) / (N * N)) : upMs);
  };
  console.log(`\nring vs Ulysses in the cost model, Wan 1.3B 480p block (one H100: ${T1.toFixed(0)} ms), PCIe 4 x16; host copies: memcpy ${hostGBs.toFixed(1)} GB/s, writeBuffer ${writeGBs.toFixed(1)} GB/s:`);
  console.log('\n| N | Ulysses heads on the busiest device | Ulysses compute / exchange ms (f32) | Ulysses speedup (f32, f16) | ring compute / exchange ms (f32) | ring speedup (f32, f16) | ring, uploads overlapped: exchange ms (f32), speedup (f32, f16) |');
  console.log('|---|---|---|---|---|---|---|');
  for (const N of [2, 3, 4, 5, 6, 7, 8]) {
    const busiest = Math.ceil(Hw / N);
    const uCompute = (matmulMs + crossMs) / N + (selfMs * busiest) / Hw;
    const rCompute = T1 / N;
    const sp = (c: number, x: number) => (T1 / (c + x)).toFixed(2);
    console.log(`| ${N} | ${busiest} of ${Hw} | ${uCompute.toFixed(0)} / ${ulyssesMs(N, 4).toFixed(0)} | ${sp(uCompute, ulyssesMs(N, 4))}x, ${sp(uCompute, ulyssesMs(N, 2))}x | ${rCompute.toFixed(0)} / ${ringMs(N, 4).toFixed(0)} | ${sp(rCompute, ringMs(N, 4))}x, ${sp(rCompute, ringMs(N, 2))}x | ${ringMs(N, 4, true).toFixed(0)}: ${sp(rCompute, ringMs(N, 4, true))}x, ${sp(rCompute, ringMs(N, 2, true))}x |`);
  }
}

for (const ts of ctxs) for (const t of ts.slice(1)) t.dispose();
ctx0.dispose();
for (const m of dits) m.disposeParams();
for (const e of engines) e.destroy();
