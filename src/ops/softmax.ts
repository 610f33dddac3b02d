// Softmax over the last dim (kernels/softmax.wgsl): numerically stable (max subtraction, online
// max/sum first pass), any row length, any number of rows. A row of all -inf gives zeros.

import { defineOp, grid1d } from './registry.ts';
import { actAlias, cpuTensor, f32 } from './common.ts';
import { Tensor, shapeStr } from '../tensor/tensor.ts';
import { dtypeSize, type DType } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

const WG_ROWS = 64;
const WG_WIDE = 64;
/** below this many rows a workgroup per row (lanes split the row) beats an invocation per row */
const WIDE_BELOW_ROWS = 2048;

export interface SoftmaxAttrs {
  /** output dtype (default: input's) */
  out?: DType;
  /** force a kernel (tests): 'rows' = invocation per row, 'wide' = workgroup per row */
  kernel?: 'rows' | 'wide';
}

function rowsOf(x: Tensor): { rows: number; n: number } {
  const n = x.shape[x.rank - 1]!;
  return { rows: n === 0 ? 0 : x.numel / n, n };
}

export const softmaxOp = defineOp<{ x: Tensor }, SoftmaxAttrs>({
  name: 'softmax',
  family: 'softmax',
  check({ x }, a) {
    if (x.rank < 1) throw new ShapeError(`[softmax] x must have at least one dim (softmax runs over the last), got a scalar ${shapeStr(x.shape)}`);
    actAlias('softmax', x.dtype);
    actAlias('softmax', a.out ?? x.dtype);
    if (x.numel >= 2 ** 32) throw new ShapeError(`[softmax] x ${shapeStr(x.shape)} has 2^32 or more elements; split it`);
  },
  gpu(e, { x }, a) {
    const outDt = a.out ?? x.dtype;
    const y = e.empty(x.shape, outDt);
    const { rows, n } = rowsOf(x);
    if (rows === 0) return y;
    for (const [t, what] of [[x, 'x'], [y, 'output']] as const) {
      if (t.nbytes > e.caps.maxBinding) {
        throw new ShapeError(`[softmax] ${what} ${shapeStr(t.shape)} is ${t.nbytes} bytes, above this adapter's binding limit (${e.caps.maxBinding}); softmax over chunks of rows`);
      }
    }
    const wide = a.kernel ? a.kernel === 'wide' : rows < WIDE_BELOW_ROWS;
    const wg = wide ? WG_WIDE : WG_ROWS;
    e.dispatch({
      kernel: {
        family: 'softmax',
        entry: wide ? 'softmax_wide' : 'softmax_rows',
        constants: { WG: wg },
        aliases: { x_t: actAlias('softmax', x.dtype, e), y_t: actAlias('softmax', outDt, e) },
        layout: ['read', 'write'],
      },
      name: wide ? 'softmax.wide' : 'softmax.rows',
      params: { rows, n },
      bindings: [x, y],
      workgroups: grid1d(wide ? rows : Math.ceil(rows / wg)),
    });
    return y;
  },
  cpu({ x }, a) {
    const v = f32(x);
    const out = new Float32Array(v.length);
    const { rows, n } = rowsOf(x);
    for (let r = 0; r < rows; r++) {
      const o = r * n;
      let m = -Infinity;
      for (let j = 0; j < n; j++) if (v[o + j]! > m) m = v[o + j]!;
      if (m === -Infinity) continue; // all -inf (or empty): zeros
      let sum = 0;
      for (let j = 0; j < n; j++) sum += Math.exp(v[o + j]! - m);
      const inv = 1 / sum;
      for (let j = 0; j < n; j++) out[o + j] = Math.exp(v[o + j]! - m) * inv;
    }
    return cpuTensor(out, x.shape, a.out ?? x.dtype);
  },
  flops: ({ x }) => x.numel * 5,
  // x is read twice (max/sum pass, then the output pass)
  bytes: ({ x }, a) => x.numel * (2 * dtypeSize(x.dtype) + dtypeSize(a.out ?? x.dtype)),
});

/** softmax over the last dim of x [..., N] */
export function softmax(x: Tensor, attrs: SoftmaxAttrs = {}): Tensor {
  return softmaxOp({ x }, attrs);
}
