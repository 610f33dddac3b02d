// Host-memory exchanges between the WebGPU devices of a context-parallel run.
//
// Dawn gives two devices no shared memory, so every exchange goes device → host → device, all on
// the main thread (the devices' queues run on their own; the only JavaScript work is moving bytes).
// Two paths, chosen per HostExchange (`path`), the same bytes either way (test/cp-exchange.test.ts):
//
// - 'copy' (the first one built): Engine.read of each source tensor (GPU copy into a mapped readback
//   buffer, then a host copy out of the mapped range), a host shuffle into new arrays (rowsToHeads:
//   a second host copy, in row segments of Hs·Dh elements), Engine.fromHost (queue.writeBuffer:
//   Dawn copies the bytes into its upload staging, a third host copy). Any shuffle function works.
// - 'mapped' (the default): ONE host copy per byte. The source device first packs, on the GPU, the
//   bytes of each destination contiguously (rowsToHeads: a `slice` of its head range per
//   destination, [B, Lr, Hs, Dh]); they are copied into this class's own MAP_READ staging buffers in
//   chunks of `chunkBytes` (one submit each), and as each chunk is mapped its contiguous runs go
//   straight from the mapped range to the destination tensors with queue.writeBuffer (Dawn's one
//   copy). No JavaScript array is made. headsToRows lands each source's block [B, Lr, Hs, Dh] in a
//   tensor of its own on the destination, which concatenates them along the heads on its GPU. The
//   chunks of every rank are handled as they arrive (a chunk's uploads are queued while the next
//   chunks are still being copied down), so on a real GPU the link transfers of one chunk overlap
//   the host copy of another. Only the shuffles made by rowsToHeadsShuffle / headsToRowsShuffle /
//   gatherShuffle have a layout this path knows; with any other shuffle, or runs not aligned to 4
//   bytes (copyBufferToBuffer / writeBuffer need that: 16-bit tensors with an odd Hs·Dh), the
//   'copy' path runs.
//
// Worker threads with a SharedArrayBuffer would need a Dawn instance, a device and the DiT's
// weights in every worker; not built (docs/context-parallel.md).
//
// The all-to-all of Ulysses sequence parallelism, on the host:
//   rank r holds rows [r0, r1) of every batch element, all H heads:  [B, Lr, H, Dh]
//   rank s needs all L rows of its heads [h0, h1):                     [B, L, Hs, Dh]
// rowsToHeads does the first, headsToRows the way back (attention outputs to their rows' owners).

import { engineOf, type Engine, type BufferBinding } from '../runtime/engine.ts';
import type { Tensor } from '../tensor/tensor.ts';
import { dtypeSize, type DType } from '../tensor/dtype.ts';
import { slice, sliceInto, concat } from '../ops/layout.ts';
import { GpuError, ShapeError } from '../util/errors.ts';

/** [start, end) of part i when `n` items are split into `parts` contiguous runs, the first n % parts one longer */
export function splitRange(n: number, parts: number, i: number): [number, number] {
  const base = Math.floor(n / parts);
  const extra = n % parts;
  const start = i * base + Math.min(i, extra);
  return [start, start + base + (i < extra ? 1 : 0)];
}

/** All parts' ranges (see splitRange). */
export function splitRanges(n: number, parts: number): Array<[number, number]> {
  return Array.from({ length: parts }, (_, i) => splitRange(n, parts, i));
}

/** Geometry of one all-to-all: B batch elements, row ranges per rank, head ranges per rank, head dim, bytes per element. */
export interface A2aGeometry {
  B: number;
  rows: Array<[number, number]>;
  heads: Array<[number, number]>;
  Dh: number;
  elemBytes: number;
}

function total(ranges: Array<[number, number]>): number {
  return ranges[ranges.length - 1]![1];
}

/**
 * parts[r] = rank r's rows [B, Lr, H, Dh] (raw bytes) → out[s] = all rows of rank s's heads
 * [B, L, Hs, Dh]. Plain CPU reference of the all-to-all; also what runs.
 */
export function rowsToHeads(parts: Uint8Array[], g: A2aGeometry): Uint8Array[] {
  const L = total(g.rows);
  const H = total(g.heads);
  const rowBytes = H * g.Dh * g.elemBytes;
  return g.heads.map(([h0, h1]) => {
    const Hs = h1 - h0;
    const seg = Hs * g.Dh * g.elemBytes;
    const out = new Uint8Array(g.B * L * seg);
    if (seg === 0) return out;
    g.rows.forEach(([r0, r1], r) => {
      const src = parts[r]!;
      const Lr = r1 - r0;
      if (src.byteLength !== g.B * Lr * rowBytes) throw new ShapeError(`[cp_exchange] rank ${r} sent ${src.byteLength} bytes, expected ${g.B * Lr * rowBytes}`);
      for (let b = 0; b < g.B; b++) {
        for (let i = 0; i < Lr; i++) {
          const from = (b * Lr + i) * rowBytes + h0 * g.Dh * g.elemBytes;
          out.set(src.subarray(from, from + seg), (b * L + r0 + i) * seg);
        }
      }
    });
    return out;
  });
}

/** The inverse of rowsToHeads: parts[s] = rank s's heads for all rows [B, L, Hs, Dh] → out[r] = [B, Lr, H, Dh]. */
export function headsToRows(parts: Uint8Array[], g: A2aGeometry): Uint8Array[] {
  const L = total(g.rows);
  const H = total(g.heads);
  const rowBytes = H * g.Dh * g.elemBytes;
  return g.rows.map(([r0, r1]) => {
    const Lr = r1 - r0;
    const out = new Uint8Array(g.B * Lr * rowBytes);
    g.heads.forEach(([h0, h1], s) => {
      const seg = (h1 - h0) * g.Dh * g.elemBytes;
      if (seg === 0) return;
      const src = parts[s]!;
      if (src.byteLength !== g.B * L * seg) throw new ShapeError(`[cp_exchange] rank ${s} sent ${src.byteLength} bytes, expected ${g.B * L * seg}`);
      for (let b = 0; b < g.B; b++) {
        for (let i = 0; i < Lr; i++) {
          const from = (b * L + r0 + i) * seg;
          out.set(src.subarray(from, from + seg), (b * Lr + i) * rowBytes + h0 * g.Dh * g.elemBytes);
        }
      }
    });
    return out;
  });
}

/**
 * parts[r] = rank r's rows [B, Lr, ...row] → [B, L, ...row] (the gather of the head's output);
 * rowBytes: bytes of one token row.
 */
export function gatherRows(parts: Uint8Array[], rows: Array<[number, number]>, B: number, rowBytes: number): Uint8Array {
  const L = total(rows);
  const out = new Uint8Array(B * L * rowBytes);
  rows.forEach(([r0, r1], r) => {
    const Lr = r1 - r0;
    const src = parts[r]!;
    if (src.byteLength !== B * Lr * rowBytes) throw new ShapeError(`[cp_exchange] rank ${r} sent ${src.byteLength} bytes, expected ${B * Lr * rowBytes}`);
    for (let b = 0; b < B; b++) out.set(src.subarray(b * Lr * rowBytes, (b + 1) * Lr * rowBytes), (b * L + r0) * rowBytes);
  });
  return out;
}

/** Rows [r0, r1) of every batch element of [B, L, ...row] → [B, r1 - r0, ...row]. */
export function sliceRows(all: Uint8Array, B: number, L: number, r0: number, r1: number, rowBytes: number): Uint8Array {
  const Lr = r1 - r0;
  const out = new Uint8Array(B * Lr * rowBytes);
  for (let b = 0; b < B; b++) out.set(all.subarray((b * L + r0) * rowBytes, (b * L + r1) * rowBytes), b * Lr * rowBytes);
  return out;
}

/** The layout of a shuffle, which the 'mapped' path moves without calling the shuffle itself. */
export type ShuffleLayout =
  | { kind: 'rowsToHeads'; g: A2aGeometry }
  | { kind: 'headsToRows'; g: A2aGeometry }
  | { kind: 'gather'; rows: Array<[number, number]>; B: number; rowBytes: number };

/** A shuffle function (the 'copy' path and the reference) with its layout (the 'mapped' path). */
export interface KnownShuffle {
  (parts: Uint8Array[]): Uint8Array[];
  layout: ShuffleLayout;
}

/** rowsToHeads as an exchange's shuffle (HostExchange.exchange moves it on the mapped path). */
export function rowsToHeadsShuffle(g: A2aGeometry): KnownShuffle {
  return Object.assign((parts: Uint8Array[]) => rowsToHeads(parts, g), { layout: { kind: 'rowsToHeads', g } as const });
}

/** headsToRows as an exchange's shuffle. */
export function headsToRowsShuffle(g: A2aGeometry): KnownShuffle {
  return Object.assign((parts: Uint8Array[]) => headsToRows(parts, g), { layout: { kind: 'headsToRows', g } as const });
}

/** gatherRows as an exchange's shuffle: one output, to the one rank whose shape is given. */
export function gatherShuffle(rows: Array<[number, number]>, B: number, rowBytes: number): KnownShuffle {
  return Object.assign((parts: Uint8Array[]) => [gatherRows(parts, rows, B, rowBytes)], { layout: { kind: 'gather', rows, B, rowBytes } as const });
}

/** What the exchanges of a run moved and cost (reset per forward by the caller when wanted). */
export interface ExchangeStats {
  /** bytes read back from the devices to the host */
  bytesDown: number;
  /** bytes uploaded from the host to the devices */
  bytesUp: number;
  /** number of exchanges (one all-to-all or gather counts once) */
  exchanges: number;
  /** of those, how many ran on the mapped path */
  mapped: number;
  /** bytes a device copied for itself on its GPU (the mapped path: a rank's own part of an exchange never crosses the host) */
  bytesLocal: number;
  /** wall ms spent waiting for the devices' queued compute before an exchange (all ranks together) */
  computeMs: number;
  /** wall ms of the exchanges themselves: readbacks, the host copies, the uploads */
  exchangeMs: number;
}

export function emptyExchangeStats(): ExchangeStats {
  return { bytesDown: 0, bytesUp: 0, bytesLocal: 0, exchanges: 0, mapped: 0, computeMs: 0, exchangeMs: 0 };
}

export type ExchangePath = 'mapped' | 'copy';

export interface HostExchangeOptions {
  /** 'mapped' (default): one host copy per byte; 'copy': Engine.read + host shuffle + Engine.fromHost (see the file's head) */
  path?: ExchangePath;
  /** the mapped path's readback chunk (bytes, a multiple of 256): each chunk is one submit and one mapping */
  chunkBytes?: number;
}

/** One contiguous run of a source's packed bytes and where it lands: destination rank, its part, byte offset there. */
interface Route {
  srcOff: number;
  size: number;
  dst: number;
  part: number;
  dstOff: number;
}

/**
 * One GPU region a source reads, made when its first chunk is encoded (`open`: a packing slice is
 * computed then) and let go after its last (`close`): at most two packing slices exist at a time.
 */
interface Piece {
  size: number;
  open: () => BufferBinding;
  close: () => void;
}

/** What the mapped path reads from one source rank (its pieces, in staging order) and where each run goes. */
interface SourcePlan {
  pieces: Piece[];
  routes: Route[];
  total: number;
  /**
   * the source's own part (destination = the source rank): never staged, copied on its GPU straight
   * into the destination tensors (a strided copy, or buffer copies), after those exist
   */
  local: Array<{ bytes: number; run: (dst: Tensor[][]) => void; keep?: () => (dst: Tensor[][]) => void }>;
}

interface MappedPlan {
  sources: Array<SourcePlan | null>;
  /** per destination rank: the shapes of the tensors its runs land in (empty: nothing to that rank) */
  parts: number[][][];
  /** per destination: its result from its parts (on its GPU), or null */
  assemble: (s: number, parts: Tensor[]) => Tensor | null;
  /** the tensors' dtype */
  dtype: DType;
}

const DEFAULT_CHUNK = 16 * 2 ** 20;
const POOL_PER_ENGINE = 8;

/**
 * The host side of the exchanges of N engines. `exchange` waits for all devices' queued work
 * (counted as compute), then moves the bytes (counted as exchange time) on the path chosen.
 */
export class HostExchange {
  stats: ExchangeStats = emptyExchangeStats();
  path: ExchangePath;
  readonly chunkBytes: number;
  /** the mapped path's MAP_READ staging buffers, per engine (unmapped, free) */
  private readonly pool = new Map<Engine, GPUBuffer[]>();

  constructor(
    readonly engines: Engine[],
    opts: HostExchangeOptions = {},
  ) {
    this.path = opts.path ?? 'mapped';
    const c = opts.chunkBytes ?? DEFAULT_CHUNK;
    if (!Number.isInteger(c) || c < 256 || c % 256) throw new ShapeError(`[cp_exchange] chunkBytes must be a multiple of 256 >= 256, got ${c}`);
    this.chunkBytes = c;
  }

  resetStats(): void {
    this.stats = emptyExchangeStats();
  }

  /** Wait for every device's queued work (compute time in the stats). */
  async settle(): Promise<void> {
    const t0 = performance.now();
    await Promise.all(this.engines.map((e) => e.sync()));
    this.stats.computeMs += performance.now() - t0;
  }

  /**
   * Read `src[r]` (on engine r, null: nothing from that rank) to the host, map the bytes with
   * `shuffle`, upload out[s] to engine s with shape shapes[s] (null: nothing to that rank).
   * With a KnownShuffle the mapped path moves the same bytes without calling it.
   */
  async exchange(
    src: Array<Tensor | null>,
    shuffle: ((parts: Uint8Array[]) => Uint8Array[]) | KnownShuffle,
    shapes: Array<number[] | null>,
    dtype: DType,
    owner: string,
    opts: { consume?: boolean } = {},
  ): Promise<Array<Tensor | null>> {
    await this.settle();
    const t0 = performance.now();
    const layout = 'layout' in shuffle ? shuffle.layout : null;
    const plan = this.path === 'mapped' && layout ? this.planMapped(layout, src, shapes, dtype) : null;
    let res: Array<Tensor | null>;
    if (plan) {
      res = await this.runMapped(plan, owner, opts.consume ? src : null);
      this.stats.mapped++;
    } else {
      const parts = await Promise.all(src.map((t, r) => (t ? this.engines[r]!.read(t) : Promise.resolve(new Uint8Array(0)))));
      for (const p of parts) this.stats.bytesDown += p.byteLength;
      if (opts.consume) for (const t of src) t?.dispose();
      const out = shuffle(parts);
      res = shapes.map((shape, s) => {
        if (!shape) return null;
        this.stats.bytesUp += out[layout?.kind === 'gather' ? 0 : s]!.byteLength;
        return this.engines[s]!.fromHost(out[layout?.kind === 'gather' ? 0 : s]!, shape, dtype, owner);
      });
    }
    this.stats.exchanges++;
    this.stats.exchangeMs += performance.now() - t0;
    return res;
  }

  /** Upload host bytes to engine s (counted as exchange traffic). */
  upload(s: number, bytes: Uint8Array, shape: number[], dtype: DType, owner: string): Tensor {
    const t0 = performance.now();
    const t = this.engines[s]!.fromHost(bytes, shape, dtype, owner);
    this.stats.bytesUp += bytes.byteLength;
    this.stats.exchangeMs += performance.now() - t0;
    return t;
  }

  /** Read a tensor of engine r to the host (counted as exchange traffic). */
  async download(r: number, t: Tensor): Promise<Uint8Array> {
    const t0 = performance.now();
    const b = await this.engines[r]!.read(t);
    this.stats.bytesDown += b.byteLength;
    this.stats.exchangeMs += performance.now() - t0;
    return b;
  }

  /** Destroy the mapped path's pooled staging buffers (they are outside the engines' allocators). */
  releaseStaging(): void {
    for (const list of this.pool.values()) for (const b of list) b.destroy();
    this.pool.clear();
  }

  // ------------------------------------------------------------------ the mapped path

  /**
   * The runs of a known layout, or null when the mapped path cannot move them (a run or an offset
   * not a multiple of 4 bytes, shapes that do not match the layout): the copy path runs then.
   */
  private planMapped(layout: ShuffleLayout, src: Array<Tensor | null>, shapes: Array<number[] | null>, dtype: DType): MappedPlan | null {
    const N = this.engines.length;
    const whole = (t: Tensor): Piece => ({ size: t.nbytes, open: () => ({ buffer: t.buffer, offset: t.byteOffset, size: t.nbytes }), close: () => {} });
    const parts: number[][][] = Array.from({ length: N }, () => []);
    const sources: Array<SourcePlan | null> = Array.from({ length: N }, () => null);
    if (src.length !== N || shapes.length !== N) return null;
    const sizeOf = (shape: number[]) => shape.reduce((a, b) => a * b, 1);
    if (src.some((t) => t && (t.dtype !== dtype || engineOf(t) !== this.engines[src.indexOf(t)]))) return null;
    const es = dtypeSize(dtype);
    let assemble: MappedPlan['assemble'];
    /** the buffer-copy runs of the own parts (checked for 4-byte alignment with the staged ones) */
    const localRuns: Route[] = [];
    const copyRuns = (e: Engine, t: Tensor, routes: Route[]): SourcePlan['local'][number] => {
      localRuns.push(...routes);
      return {
        bytes: routes.reduce((a, x) => a + x.size, 0),
        run: (dst) => {
          for (const rt of routes) {
            const d = dst[rt.dst]![rt.part]!;
            e.copyBuffer(t.buffer, t.byteOffset + rt.srcOff, d.buffer, d.byteOffset + rt.dstOff, rt.size);
          }
        },
      };
    };
    if (layout.kind === 'rowsToHeads') {
      const { g } = layout;
      const L = total(g.rows);
      const H = total(g.heads);
      if (g.elemBytes !== es) return null;
      const segOf = (s: number) => (g.heads[s]![1] - g.heads[s]![0]) * g.Dh * es;
      for (let s = 0; s < N; s++) {
        if (segOf(s) === 0) continue;
        if (!shapes[s] || sizeOf(shapes[s]!) * es !== g.B * L * segOf(s)) return null;
        parts[s]!.push(shapes[s]!);
      }
      for (let r = 0; r < N; r++) {
        const t = src[r];
        const [r0, r1] = g.rows[r]!;
        const Lr = r1 - r0;
        if (!t || t.nbytes !== g.B * Lr * H * g.Dh * es) return null;
      }
      // (every check passed: now the GPU packing)
      for (let r = 0; r < N; r++) {
        const t = src[r]!;
        const [r0, r1] = g.rows[r]!;
        const Lr = r1 - r0;
        const plan: SourcePlan = { pieces: [], routes: [], total: 0, local: [] };
        const many = g.heads.filter(([a, b]) => b > a).length > 1;
        for (let s = 0; s < N; s++) {
          const seg = segOf(s);
          if (seg === 0) continue;
          const [h0, h1] = g.heads[s]!;
          // [B, Lr, Hs, Dh]: this destination's heads of the rank's rows, contiguous
          const e = this.engines[r]!;
          let sl: Tensor | null = null;
          const piece: Piece = many
            ? {
                size: g.B * Lr * seg,
                open: () => {
                  sl = e.scope(() => slice(t.reshape([g.B, Lr, H, g.Dh]), 2, h0, h1));
                  return { buffer: sl.buffer, offset: sl.byteOffset, size: sl.nbytes };
                },
                // (its copies are encoded: the block may be reused by later work, which queue order puts after them)
                close: () => sl?.dispose(),
              }
            : whole(t);
          if (s === r) {
            // the rank's own heads of its rows stay on its GPU: [B, Lr, H, Dh][:, :, h0:h1] straight
            // into rows r0.. of [B, L, Hs, Dh] (no packing slice)
            const Hs = h1 - h0;
            plan.local.push({
              bytes: g.B * Lr * seg,
              // (in a scope: the reshaped view holds its base until it is let go)
              run: (dst) => e.scope(() => sliceInto(t.reshape([g.B, Lr, H, g.Dh]), 2, h0, h1, dst[s]![0]!, r0 * Hs * g.Dh, [L * Hs * g.Dh, Hs * g.Dh, g.Dh, 1])),
              // (a consumed source: its own part packed first, [B, Lr, Hs, Dh], so the source can go
              // before the destinations are made; then one buffer copy per batch element)
              keep: () => {
                const own = e.scope(() => slice(t.reshape([g.B, Lr, H, g.Dh]), 2, h0, h1));
                return (dst) => {
                  const d = dst[s]![0]!;
                  for (let b = 0; b < g.B; b++) e.copyBuffer(own.buffer, own.byteOffset + b * Lr * seg, d.buffer, d.byteOffset + (b * L + r0) * seg, Lr * seg);
                  own.dispose();
                };
              },
            });
            continue;
          }
          const off = plan.total;
          plan.pieces.push(piece);
          for (let b = 0; b < g.B; b++) plan.routes.push({ srcOff: off + b * Lr * seg, size: Lr * seg, dst: s, part: 0, dstOff: (b * L + r0) * seg });
          plan.total += piece.size;
        }
        sources[r] = plan;
      }
      assemble = (_s, p) => p[0] ?? null;
    } else if (layout.kind === 'headsToRows') {
      const { g } = layout;
      const L = total(g.rows);
      const H = total(g.heads);
      if (g.elemBytes !== es) return null;
      for (let r = 0; r < N; r++) {
        const Lr = g.rows[r]![1] - g.rows[r]![0];
        // (the parts are concatenated along the heads: the result is [B, Lr, H, Dh] exactly)
        if (shapes[r]?.join() !== [g.B, Lr, H, g.Dh].join()) return null;
      }
      for (let s = 0; s < N; s++) {
        const [h0, h1] = g.heads[s]!;
        const Hs = h1 - h0;
        const seg = Hs * g.Dh * es;
        const t = src[s];
        if (Hs === 0) {
          if (t) return null;
          continue;
        }
        if (!t || t.nbytes !== g.B * L * seg) return null;
        const plan: SourcePlan = { pieces: [], routes: [], total: 0, local: [] };
        g.rows.forEach(([r0, r1], r) => {
          const Lr = r1 - r0;
          const part = parts[r]!.length;
          parts[r]!.push([g.B, Lr, Hs, g.Dh]);
          if (r === s) {
            // the source's own rows stay on its GPU
            plan.local.push(copyRuns(this.engines[s]!, t, Array.from({ length: g.B }, (_, b) => ({ srcOff: (b * L + r0) * seg, size: Lr * seg, dst: r, part, dstOff: b * Lr * seg }))));
            return;
          }
          // each element's rows of that destination: one run of the source (a view, no packing)
          for (let b = 0; b < g.B; b++) {
            const at = t.byteOffset + (b * L + r0) * seg;
            const size = Lr * seg;
            plan.pieces.push({ size, open: () => ({ buffer: t.buffer, offset: at, size }), close: () => {} });
            plan.routes.push({ srcOff: plan.total, size, dst: r, part, dstOff: b * Lr * seg });
            plan.total += size;
          }
        });
        sources[s] = plan;
      }
      // [B, Lr, Hs, Dh] per source, in head order → [B, Lr, H, Dh]
      assemble = (r, p) => {
        if (p.length === 1) return p[0]!;
        const e = this.engines[r]!;
        return e.scope(() => concat(p, 2));
      };
    } else {
      const { rows, B, rowBytes } = layout;
      const L = total(rows);
      const dsts = shapes.map((sh, k) => (sh ? k : -1)).filter((k) => k >= 0);
      if (dsts.length !== 1) return null;
      const d = dsts[0]!;
      if (sizeOf(shapes[d]!) * es !== B * L * rowBytes) return null;
      parts[d]!.push(shapes[d]!);
      for (let r = 0; r < N; r++) {
        const [r0, r1] = rows[r]!;
        const Lr = r1 - r0;
        const t = src[r];
        if (!t || t.nbytes !== B * Lr * rowBytes) return null;
        const routes = Array.from({ length: B }, (_, b) => ({ srcOff: b * Lr * rowBytes, size: Lr * rowBytes, dst: d, part: 0, dstOff: (b * L + r0) * rowBytes }));
        // (the destination's own rows stay on its GPU)
        sources[r] = r === d ? { pieces: [], routes: [], total: 0, local: [copyRuns(this.engines[r]!, t, routes)] } : { pieces: [whole(t)], routes, total: t.nbytes, local: [] };
      }
      assemble = (_s, p) => p[0] ?? null;
    }
    // (tensors start at allocator blocks or views of them; a view at an odd 2-byte offset goes the copy path)
    const srcAligned = src.every((t) => !t || t.byteOffset % 4 === 0);
    const runAligned = (x: Route) => x.srcOff % 4 === 0 && x.size % 4 === 0 && x.dstOff % 4 === 0;
    const aligned = srcAligned && sources.every((p) => !p || (p.pieces.every((x) => x.size % 4 === 0) && p.routes.every(runAligned))) && localRuns.every(runAligned);
    if (!aligned) return null;
    return { sources, parts, assemble, dtype };
  }

  private takeStaging(e: Engine, size: number): GPUBuffer {
    const list = this.pool.get(e) ?? [];
    this.pool.set(e, list);
    const i = list.findIndex((b) => b.size >= size && b.size <= 2 * size);
    if (i >= 0) return list.splice(i, 1)[0]!;
    return e.device.createBuffer({ size: Math.ceil(size / 256) * 256, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST, label: 'cp.exchange.readback' });
  }

  private giveStaging(e: Engine, b: GPUBuffer): void {
    const list = this.pool.get(e) ?? [];
    this.pool.set(e, list);
    list.push(b);
    while (list.length > POOL_PER_ENGINE) list.shift()!.destroy();
  }

  /** Runs a plan: packed bytes down in chunks, each chunk's runs straight up from its mapped range. */
  /** `consumed`: the sources, disposed here once their bytes are staged and their own parts packed (before the destinations are made) */
  private async runMapped(plan: MappedPlan, owner: string, consumed: Array<Tensor | null> | null): Promise<Array<Tensor | null>> {
    const N = this.engines.length;
    // (the destinations are made after every staging copy is encoded, so the packing slices are
    // freed first: the peak is the sources and the destinations, not those and a slice. Their
    // writes come in the mapping callbacks, which cannot run before this function awaits.)
    let dst: Tensor[][] = [];
    const pending: Array<Promise<void>> = [];
    /** pieces whose region is open (packing slices made, not yet let go) */
    const open: Record<string, BufferBinding> = {};
    const staged: Array<{ e: Engine; buf: GPUBuffer }> = [];
    try {
      // 1. every source's chunks: GPU copies into staging buffers, one submit per chunk, mapped as they complete
      for (let r = 0; r < N; r++) {
        const sp = plan.sources[r];
        if (!sp || sp.total === 0) continue;
        const e = this.engines[r]!;
        this.stats.bytesDown += sp.total;
        for (let c0 = 0; c0 < sp.total; c0 += this.chunkBytes) {
          const c1 = Math.min(sp.total, c0 + this.chunkBytes);
          const buf = this.takeStaging(e, c1 - c0);
          staged.push({ e, buf });
          let at = 0;
          for (const [k, p] of sp.pieces.entries()) {
            const lo = Math.max(c0, at);
            const hi = Math.min(c1, at + p.size);
            if (hi > lo) {
              const b = (open[`${r}.${k}`] ??= p.open());
              e.copyBuffer(b.buffer, b.offset + (lo - at), buf, lo - c0, hi - lo);
              if (hi === at + p.size) {
                p.close();
                delete open[`${r}.${k}`];
              }
            }
            at += p.size;
          }
          e.flush();
          const len = Math.ceil((c1 - c0) / 4) * 4;
          pending.push(
            buf.mapAsync(GPUMapMode.READ, 0, len).then(
              () => {
                // 2. this chunk's runs to their destinations (Dawn copies them into its upload staging: the one host copy)
                const ab = buf.getMappedRange(0, len);
                const flushed = new Set<number>();
                for (const rt of sp.routes) {
                  const lo = Math.max(c0, rt.srcOff);
                  const hi = Math.min(c1, rt.srcOff + rt.size);
                  if (hi <= lo) continue;
                  const de = this.engines[rt.dst]!;
                  // unsubmitted work of that engine may still read the destination's reused block: submit it first
                  if (!flushed.has(rt.dst)) {
                    de.flush();
                    flushed.add(rt.dst);
                  }
                  const t = dst[rt.dst]![rt.part]!;
                  de.device.queue.writeBuffer(t.buffer, t.byteOffset + rt.dstOff + (lo - rt.srcOff), ab, lo - c0, hi - lo);
                }
                buf.unmap();
              },
              (err: unknown) => {
                throw new GpuError(`[cp_exchange] mapping rank ${r}'s readback failed: ${(err as Error).message}`, { cause: err });
              },
            ),
          );
        }
      }
      // 2. the destinations, and every source's own part into them: copied on its GPU, never through
      // the host. A consumed source goes first (its own part packed, when it has one), so the
      // destinations can take its memory.
      const locals = plan.sources.flatMap((p) => p?.local ?? []);
      const early = consumed && locals.every((l) => l.keep) ? locals.map((l) => l.keep!()) : null;
      if (early) {
        for (const t of consumed!) t?.dispose();
        consumed = null;
      }
      dst = plan.parts.map((shapes, s) => shapes.map((shape) => this.engines[s]!.empty(shape, plan.dtype, owner)));
      locals.forEach((l, k) => (early ? early[k]!(dst) : l.run(dst)));
      for (const l of locals) this.stats.bytesLocal += l.bytes;
      if (consumed) for (const t of consumed) t?.dispose();
      await Promise.all(pending);
      // (uploaded: every staged run, each written once to its destination)
      for (const sp of plan.sources) for (const rt of sp?.routes ?? []) this.stats.bytesUp += rt.size;
      for (const { e, buf } of staged) this.giveStaging(e, buf);
      staged.length = 0;
      await Promise.all(this.engines.map((e) => e.checkErrors()));
    } catch (err) {
      for (const key of Object.keys(open)) {
        const [r, k] = key.split('.').map(Number);
        plan.sources[r!]!.pieces[k!]!.close();
      }
      await Promise.allSettled(pending);
      if (consumed) for (const t of consumed) t?.dispose();
      for (const { buf } of staged) buf.destroy();
      for (const list of dst) for (const t of list) t.dispose();
      throw err;
    }
    return dst.map((list, s) => {
      if (list.length === 0) return null;
      const out = plan.assemble(s, list);
      for (const t of list) if (t !== out) t.dispose();
      return out;
    });
  }
}

