// The exchanges of context parallelism (src/parallel/exchange.ts): the 'mapped' path (one host copy:
// GPU packing per destination, chunked MAP_READ staging, writeBuffer straight from the mapped range,
// a GPU concat on the way back) against the 'copy' path (Engine.read + host shuffle + fromHost) and
// the plain host reference, on N = 2 and 3 devices, odd row counts, heads that do and do not divide
// N (a rank without heads), f32 / f16 / bf16 tensors, chunks small enough to cut pieces and runs;
// the same bytes land (the mapped path keeps each rank's own part on its GPU: fewer host bytes by
// exactly that part), and the DiT forward is bit-identical on both paths.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { Engine } from '../src/runtime/engine.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../src/models/wan_dit/model.ts';
import { parseTransformerConfig } from '../src/io/model-folder.ts';
import { randomizeModule, WAN_1_3B_TRANSFORMER } from '../src/tools/random-model.ts';
import { Rng } from '../src/util/rng.ts';
import { ContextParallelDit } from '../src/parallel/cp-dit.ts';
import {
  HostExchange,
  splitRanges,
  rowsToHeads,
  headsToRows,
  gatherRows,
  sliceRows,
  rowsToHeadsShuffle,
  headsToRowsShuffle,
  gatherShuffle,
  type A2aGeometry,
  type ExchangePath,
} from '../src/parallel/exchange.ts';
import type { DType } from '../src/tensor/dtype.ts';
import type { Tensor } from '../src/tensor/tensor.ts';

const engines: Engine[] = [];
beforeAll(async () => {
  for (let i = 0; i < 3; i++) engines.push(await Engine.create());
});
afterAll(() => {
  for (const e of engines) e.destroy();
});

/** random bytes that are finite values of `dtype` (16-bit: bit 14 clear keeps the exponent below all-ones) */
function randomBytes(rng: Rng, n: number, dtype: DType): Uint8Array {
  if (dtype === 'f32') return new Uint8Array(rng.fillNormal(new Float32Array(n)).buffer);
  const w = new Uint16Array(n).map(() => Math.floor(rng.next() * 65536) & ~0x4000);
  return new Uint8Array(w.buffer);
}

const esOf = (d: DType) => (d === 'f32' ? 4 : 2);

async function bytesOf(t: Tensor | null): Promise<number[]> {
  if (!t) return [];
  const e = t.gpuDevice as Engine;
  return Array.from(await e.read(t));
}

/** one all-to-all there and back, and a gather, on `path`: the results' bytes and the stats */
async function roundTrip(N: number, B: number, L: number, H: number, Dh: number, dtype: DType, path: ExchangePath, chunkBytes: number, seed: number) {
  const es = esOf(dtype);
  const rows = splitRanges(L, N);
  const heads = splitRanges(H, N);
  const g: A2aGeometry = { B, rows, heads, Dh, elemBytes: es };
  const rng = new Rng(seed);
  const full = randomBytes(rng, B * L * H * Dh, dtype);
  const hostParts = rows.map(([r0, r1]) => sliceRows(full, B, L, r0, r1, H * Dh * es));
  const ex = new HostExchange(engines.slice(0, N), { path, chunkBytes });
  const src = rows.map(([r0, r1], r) => engines[r]!.fromHost(hostParts[r]!, [B, r1 - r0, H, Dh], dtype, 'test'));
  const shapes = heads.map(([h0, h1]) => (h1 > h0 ? [B, L, h1 - h0, Dh] : null));
  const byHead = await ex.exchange(src, rowsToHeadsShuffle(g), shapes, dtype, 'test');
  const headBytes = await Promise.all(byHead.map(bytesOf));
  const back = await ex.exchange(byHead, headsToRowsShuffle(g), rows.map(([r0, r1]) => [B, r1 - r0, H, Dh]), dtype, 'test');
  const backBytes = await Promise.all(back.map(bytesOf));
  const gathered = await ex.exchange(back, gatherShuffle(rows, B, H * Dh * es), rows.map((_, r) => (r === 0 ? [B, L, H * Dh] : null)), dtype, 'test');
  const gatherBytes = await bytesOf(gathered[0]!);
  for (const t of [...src, ...byHead, ...back, ...gathered]) t?.dispose();
  ex.releaseStaging();
  return { g, full, hostParts, headBytes, backBytes, gatherBytes, stats: { ...ex.stats } };
}

describe('HostExchange: the mapped path moves the same bytes as the copy path', () => {
  const cases: Array<[number, number, number, number, number, DType]> = [
    // N, B, L, H, Dh, dtype
    [2, 2, 7, 3, 4, 'f32'], // heads 2/1, rows 4/3
    [3, 2, 11, 3, 4, 'f32'], // heads 1/1/1, rows 4/4/3
    [3, 1, 10, 2, 6, 'f32'], // rank 2 holds rows and no heads
    [2, 2, 9, 5, 8, 'bf16'],
    [3, 2, 13, 4, 2, 'f16'], // heads 2/1/1
    [3, 2, 5, 7, 16, 'bf16'],
  ];
  for (const [N, B, L, H, Dh, dtype] of cases) {
    it(`N=${N} B=${B} L=${L} H=${H} Dh=${Dh} ${dtype}: rowsToHeads, headsToRows, gather (chunks of 256 B and 16 MiB)`, async () => {
      const copy = await roundTrip(N, B, L, H, Dh, dtype, 'copy', 256, 7);
      for (const chunk of [256, 16 * 2 ** 20]) {
        const mapped = await roundTrip(N, B, L, H, Dh, dtype, 'mapped', chunk, 7);
        // against the host reference
        const ref = rowsToHeads(mapped.hostParts, mapped.g);
        mapped.headBytes.forEach((b, s) => expect(b, `heads of rank ${s}`).toEqual(Array.from(ref[s]!.byteLength ? ref[s]! : [])));
        mapped.backBytes.forEach((b, r) => expect(b, `rows of rank ${r}`).toEqual(Array.from(mapped.hostParts[r]!)));
        expect(mapped.gatherBytes).toEqual(Array.from(mapped.full));
        // against the copy path, and the same byte counts
        expect(mapped.headBytes).toEqual(copy.headBytes);
        expect(mapped.backBytes).toEqual(copy.backBytes);
        expect(mapped.gatherBytes).toEqual(copy.gatherBytes);
        // the same bytes moved: on the mapped path each rank's own part stays on its GPU
        // (a rank's own heads of its rows there and back, rank 0's rows of the gather)
        const own = (g: A2aGeometry) => g.rows.reduce((a, [r0, r1], r) => a + (r1 - r0) * (g.heads[r]![1] - g.heads[r]![0]), 0) * B * Dh * esOf(dtype);
        const ownBytes = 2 * own(mapped.g) + (mapped.g.rows[0]![1] - mapped.g.rows[0]![0]) * B * H * Dh * esOf(dtype);
        expect(copy.stats.bytesLocal).toBe(0);
        expect(mapped.stats.bytesLocal).toBe(ownBytes);
        expect(mapped.stats.bytesDown + ownBytes).toBe(copy.stats.bytesDown);
        expect(mapped.stats.bytesUp + ownBytes).toBe(copy.stats.bytesUp);
        expect(mapped.stats.exchanges).toBe(3);
        expect(mapped.stats.mapped, 'every exchange on the mapped path').toBe(3);
      }
      expect(copy.stats.mapped).toBe(0);
      // the reference itself: headsToRows inverts rowsToHeads, gatherRows restores the whole
      const ref = rowsToHeads(copy.hostParts, copy.g);
      headsToRows(ref, copy.g).forEach((p, r) => expect(Array.from(p)).toEqual(Array.from(copy.hostParts[r]!)));
      expect(Array.from(gatherRows(copy.hostParts, copy.g.rows, B, H * Dh * esOf(dtype)))).toEqual(Array.from(copy.full));
    });
  }

  it('runs not aligned to 4 bytes (16-bit, odd Hs·Dh) fall back to the copy path with the same result', async () => {
    const copy = await roundTrip(2, 2, 7, 3, 3, 'bf16', 'copy', 256, 3);
    const mapped = await roundTrip(2, 2, 7, 3, 3, 'bf16', 'mapped', 256, 3);
    expect(mapped.stats.mapped).toBeLessThan(3);
    expect(mapped.headBytes).toEqual(copy.headBytes);
    expect(mapped.backBytes).toEqual(copy.backBytes);
    expect(mapped.gatherBytes).toEqual(copy.gatherBytes);
  });

  it('a plain shuffle function runs the copy path; a bad chunk size is refused', async () => {
    const ex = new HostExchange(engines.slice(0, 2));
    const a = engines[0]!.fromHost(new Float32Array([1, 2]), [2], 'f32');
    const b = engines[1]!.fromHost(new Float32Array([3]), [1], 'f32');
    const out = await ex.exchange([a, b], (p) => [new Uint8Array([...p[1]!, ...p[0]!])], [[3], null], 'f32', 'test');
    expect(Array.from((await out[0]!.toArray()) as Float32Array)).toEqual([3, 1, 2]);
    expect(ex.stats.mapped).toBe(0);
    for (const t of [a, b, out[0]!]) t.dispose();
    expect(() => new HostExchange(engines.slice(0, 2), { chunkBytes: 100 })).toThrow(/\[cp_exchange\] chunkBytes must be a multiple of 256/);
  });
});

describe('ContextParallelDit on both exchange paths', () => {
  it('N = 3, 2 heads (rank 2 without heads), L = 35: the outputs are bit-identical and the bytes the same', async () => {
    const cfg = { ...WAN_1_3B_TRANSFORMER, num_layers: 2, num_attention_heads: 2, attention_head_dim: 16, ffn_dim: 80, freq_dim: 32, in_channels: 4, out_channels: 4, text_dim: 24, rope_max_seq_len: 64 };
    const dits = engines.map((e) => {
      const m = new WanTransformer3DModel(ditDimsFromConfig(parseTransformerConfig(cfg)));
      randomizeModule(m, 41, e, 'bf16');
      return m;
    });
    const cp = new ContextParallelDit(engines.map((engine, r) => ({ engine, dit: dits[r]! })));
    const rng = new Rng(4);
    const x = rng.fillNormal(new Float32Array(2 * 4 * 1 * 10 * 14));
    const ctxHost = rng.fillNormal(new Float32Array(2 * 5 * 24));
    const e0 = engines[0]!;
    const ctx0 = e0.scope(() => dits[0]!.embedText(e0.fromHost(ctxHost, [2, 5, 24], 'f32')));
    const ctx = await cp.replicate(ctx0);
    const run = async (path: ExchangePath) => {
      cp.exchange.path = path;
      cp.exchange.resetStats();
      const xt = e0.fromHost(x, [2, 4, 1, 10, 14], 'f32');
      const out = await cp.forward(xt, 700, ctx);
      const v = (await out.toArray()) as Float32Array;
      xt.dispose();
      out.dispose();
      return { v, stats: { ...cp.exchange.stats } };
    };
    const a = await run('copy');
    const b = await run('mapped');
    expect(Array.from(b.v)).toEqual(Array.from(a.v));
    expect(b.stats.bytesDown + b.stats.bytesLocal).toBe(a.stats.bytesDown);
    expect(b.stats.bytesUp + b.stats.bytesLocal).toBe(a.stats.bytesUp);
    expect(b.stats.bytesLocal).toBeGreaterThan(0);
    expect(b.stats.mapped).toBe(b.stats.exchanges);
    expect(a.stats.mapped).toBe(0);
    for (const t of ctx) t.dispose();
    for (const m of dits) m.disposeParams();
  });
});
