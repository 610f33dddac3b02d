// The GPU side shared by the methods that cache in the DiT's hidden space (TeaCache, MagCache,
// flex): the blocks' residual r = (stream after the blocks) - (stream before them), [B, L, D] f32,
// kept per batch row between steps, and added back to the stream of a skipped step before the
// head. Also the few reductions the decisions and the calibration read back (per-token sums of
// squares, composed from elementwise ops and a matmul against ones: no kernel of its own).

import type { Engine } from '../../runtime/engine.ts';
import type { Tensor } from '../../tensor/tensor.ts';
import { add, binary, mul } from '../../ops/elementwise.ts';
import { linear } from '../../ops/matmul.ts';

/** Per-token sum of squares of x [B, L, D]: host [B·L] (f32 sums of the matmul against ones). */
export async function tokenSumSq(e: Engine, x: Tensor): Promise<Float32Array> {
  const D = x.shape[x.shape.length - 1]!;
  const sq = mul(x, x);
  const ones = e.fromHost(new Float32Array(D).fill(1), [1, D], 'f32');
  const s = linear(sq, ones); // [B, L, 1]
  sq.dispose();
  ones.dispose();
  const out = (await s.toArray()) as Float32Array;
  s.dispose();
  return out;
}

/** Sum of squares of each batch row of x [B, L, D], from per-token sums (float64 on the host). */
export function rowSums(perToken: Float32Array, rows: number): number[] {
  const L = perToken.length / rows;
  const out: number[] = [];
  for (let b = 0; b < rows; b++) {
    let s = 0;
    for (let i = b * L; i < (b + 1) * L; i++) s += perToken[i]!;
    out.push(s);
  }
  return out;
}

/** mean |a - b| / mean |b| (the reference's rel-L1: `(a - b).abs().mean() / b.abs().mean()`), in float64. */
export function relL1(a: ArrayLike<number>, b: ArrayLike<number>, from = 0, to = a.length): number {
  let num = 0;
  let den = 0;
  for (let i = from; i < to; i++) {
    num += Math.abs(a[i]! - b[i]!);
    den += Math.abs(b[i]!);
  }
  return num / den;
}

/** mean |a - b| */
export function meanAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>, from = 0, to = a.length): number {
  let s = 0;
  for (let i = from; i < to; i++) s += Math.abs(a[i]! - b[i]!);
  return s / (to - from);
}

/** mean |a| */
export function meanAbs(a: ArrayLike<number>, from = 0, to = a.length): number {
  let s = 0;
  for (let i = from; i < to; i++) s += Math.abs(a[i]!);
  return s / (to - from);
}

/**
 * The cached residuals of the hidden stream. Row r of `last` is row r's latest residual (rows may
 * be computed at different steps when CFG rows decide apart, MagCache); `prev` is the one before
 * (kept with depth 2, for flex's extrapolation; rows always computed together there).
 */
export class HiddenResiduals {
  private x0: Tensor | null = null;
  last: Tensor | null = null;
  prev: Tensor | null = null;
  constructor(
    private readonly e: Engine,
    private readonly depth: 1 | 2 = 1,
  ) {}

  /** at plan time, when some row runs the blocks: their input (freed by `store`, or with the forward's scope) */
  keepInput(hs: Tensor): void {
    this.x0 = this.e.clone(hs);
  }

  /**
   * At finish: the residual of the rows that ran. `inspect` sees the new residual [B, L, D] (all
   * rows; only the ran rows are meaningful) and the previous `last` before they are stored.
   */
  async store(hs: Tensor, ran: boolean[], inspect?: (res: Tensor, last: Tensor | null) => Promise<void>): Promise<void> {
    const e = this.e;
    const x0 = this.x0!;
    this.x0 = null;
    const res = binary({ a: hs, b: x0 }, { kind: 'sub' }); // [B, L, D]
    x0.dispose();
    if (inspect) await inspect(res, this.last);
    if (ran.every(Boolean) || !this.last) {
      if (this.depth === 2) {
        this.prev?.dispose();
        this.prev = this.last;
      } else this.last?.dispose();
      this.last = e.keep(res);
      return;
    }
    // one row ran: its residual replaces that row's (depth 1 only: rows of `prev` would mix steps)
    const rowBytes = res.nbytes / ran.length;
    ran.forEach((r, b) => {
      if (r) e.copyBuffer(res.buffer, res.byteOffset + b * rowBytes, this.last!.buffer, this.last!.byteOffset + b * rowBytes, rowBytes);
    });
    res.dispose();
  }

  /**
   * Rows that did not run but went through the blocks anyway (a context-parallel forward runs every
   * row): hs[b] = their input again, from the copy kept at plan time (before `store`).
   */
  restoreSkipped(hs: Tensor, ran: boolean[]): void {
    const x0 = this.x0;
    if (!x0) throw new Error('[step cache] restoreSkipped needs the input kept at plan time');
    const rowBytes = hs.nbytes / ran.length;
    ran.forEach((r, b) => {
      if (!r) this.e.copyBuffer(x0.buffer, x0.byteOffset + b * rowBytes, hs.buffer, hs.byteOffset + b * rowBytes, rowBytes);
    });
  }

  /** hs[b] += residual[b] for the rows with add[b] (in place) */
  apply(hs: Tensor, addRows: boolean[], residual: Tensor): void {
    const e = this.e;
    if (addRows.every(Boolean)) {
      const s = add(hs, residual);
      e.copyBuffer(s.buffer, s.byteOffset, hs.buffer, hs.byteOffset, s.nbytes);
      s.dispose();
      return;
    }
    const rowBytes = hs.nbytes / addRows.length;
    addRows.forEach((a, b) => {
      if (!a) return;
      const x = e.clone(hs.narrow0(b, b + 1));
      const r = e.clone(residual.narrow0(b, b + 1));
      const s = add(x, r);
      e.copyBuffer(s.buffer, s.byteOffset, hs.buffer, hs.byteOffset + b * rowBytes, rowBytes);
      for (const t of [x, r, s]) t.dispose();
    });
  }

  /** forget everything (the expert switch) */
  reset(): void {
    this.x0?.dispose();
    this.x0 = null;
    this.last?.dispose();
    this.prev?.dispose();
    this.last = this.prev = null;
  }
}

/** Read e [1, D] or e0 [6, D] to the host. */
export async function hostValues(t: Tensor): Promise<Float32Array> {
  return (await t.toArray()) as Float32Array;
}
