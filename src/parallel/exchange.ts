// Host-memory exchanges between the WebGPU devices of a context-parallel run.
//
// Dawn gives two devices no shared memory, so every exchange is device → host (a mapped readback
// staging buffer, Engine.read) → host shuffle (plain byte copies) → host → device (queue.writeBuffer,
// Engine.fromHost). All on the main thread: the devices' queues run on their own (on lavapipe, on
// the driver's threads), so the only JavaScript work is the shuffle itself. Worker threads with a
// SharedArrayBuffer would remove one host copy per exchange, but each worker would need its own
// Dawn instance and device and the DiT's weights loaded there; not built (docs/context-parallel.md).
//
// The all-to-all of Ulysses sequence parallelism, on the host:
//   rank r holds rows [r0, r1) of every batch element, all H heads:  [B, Lr, H, Dh]
//   rank s needs all L rows of its heads [h0, h1):                     [B, L, Hs, Dh]
// rowsToHeads does the first, headsToRows the way back (attention outputs to their rows' owners).

import type { Engine } from '../runtime/engine.ts';
import type { Tensor } from '../tensor/tensor.ts';
import type { DType } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

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

/** What the exchanges of a run moved and cost (reset per forward by the caller when wanted). */
export interface ExchangeStats {
  /** bytes read back from the devices to the host */
  bytesDown: number;
  /** bytes uploaded from the host to the devices */
  bytesUp: number;
  /** number of exchanges (one all-to-all or gather counts once) */
  exchanges: number;
  /** wall ms spent waiting for the devices' queued compute before an exchange (all ranks together) */
  computeMs: number;
  /** wall ms of the exchanges themselves: readbacks, the host shuffle, the uploads */
  exchangeMs: number;
}

export function emptyExchangeStats(): ExchangeStats {
  return { bytesDown: 0, bytesUp: 0, exchanges: 0, computeMs: 0, exchangeMs: 0 };
}

/**
 * The host side of the exchanges of N engines. `exchange` waits for all devices' queued work
 * (counted as compute), reads the tensors back in parallel, shuffles on the host and uploads the
 * results (counted as exchange time).
 */
export class HostExchange {
  stats: ExchangeStats = emptyExchangeStats();
  constructor(readonly engines: Engine[]) {}

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
   */
  async exchange(
    src: Array<Tensor | null>,
    shuffle: (parts: Uint8Array[]) => Uint8Array[],
    shapes: Array<number[] | null>,
    dtype: DType,
    owner: string,
  ): Promise<Array<Tensor | null>> {
    await this.settle();
    const t0 = performance.now();
    const parts = await Promise.all(src.map((t, r) => (t ? this.engines[r]!.read(t) : Promise.resolve(new Uint8Array(0)))));
    for (const p of parts) this.stats.bytesDown += p.byteLength;
    const out = shuffle(parts);
    const res = shapes.map((shape, s) => {
      if (!shape) return null;
      this.stats.bytesUp += out[s]!.byteLength;
      return this.engines[s]!.fromHost(out[s]!, shape, dtype, owner);
    });
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
}
