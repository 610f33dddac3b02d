// Non-finite count (kernels/finite.wgsl): x f32 | f16 | bf16 (any shape, any view) -> y u32 [1],
// the number of NaN / ±Inf elements of x, plus acc[0] when `acc` (u32 [1]) is given — so counts of
// several tensors (the chunks of a decode) chain on the GPU and are read back once.
//
// By bits (exponent all ones), on the GPU and in the CPU reference (src/ops/cpu/finite.ts), so the
// two agree exactly. 16-bit tensors are read as u32 words: f16 needs no shader-f16 here.
// Tensors larger than one binding are counted window by window into the same y.

import { defineOp, expectDtype } from './registry.ts';
import { bindingLimit, elemWindow, windowSlack } from './window.ts';
import { scanNonFinite } from './cpu/finite.ts';
import { Tensor, shapeStr } from '../tensor/tensor.ts';
import { dtypeCode, dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

const WG = 256;
/**
 * Grid cap: enough workgroups to fill a big GPU; on lavapipe (a workgroup is a loop on one of a few
 * CPU threads, each ending in a barrier and atomics) few long ones. Measured on the 1.3B DiT output
 * (4.2 M f32, 2 loaded cores, bench/finite.bench.ts): 1024 groups 0.8 GB/s, 256 1.6, 16-128 3-4.5.
 */
const MAX_GROUPS = { gpu: 1024, software: 64 };
/** vec4s per lane below which fewer workgroups run */
const MIN_VEC_PER_LANE = 4;

export interface CountNonFiniteAttrs {
  /** tests only: plan as if the binding limit were this many bytes */
  maxBindingBytes?: number;
}

type Inputs = { x: Tensor; acc?: Tensor };

export const countNonFiniteOp = defineOp<Inputs, CountNonFiniteAttrs | undefined>({
  name: 'count_nonfinite',
  family: 'finite',
  check({ x, acc }) {
    expectDtype('count_nonfinite', 'x', x, ['f32', 'f16', 'bf16']);
    if (x.numel >= 2 ** 32) throw new ShapeError(`[count_nonfinite] x ${shapeStr(x.shape)} has 2^32 or more elements; count its halves`);
    if (acc) {
      expectDtype('count_nonfinite', 'acc', acc, ['u32']);
      if (acc.numel !== 1) throw new ShapeError(`[count_nonfinite] acc must be one u32 (a previous count), got ${shapeStr(acc.shape)}`);
    }
  },
  gpu(e, { x, acc }, a) {
    const y = e.empty([1], 'u32', 'activation');
    if (acc) {
      if (acc.byteOffset % 4 !== 0) throw new ShapeError(`[count_nonfinite] acc starts at byte ${acc.byteOffset}, not a multiple of 4`);
      e.copyBuffer(acc.buffer, acc.byteOffset, y.buffer, y.byteOffset, 4);
    } else e.fill(y, 0);
    const n = x.numel;
    if (n === 0) return y;
    const elt = dtypeSize(x.dtype);
    if (x.byteOffset % elt !== 0) throw new ShapeError(`[count_nonfinite] ${x} starts at byte ${x.byteOffset}, not a multiple of its element size`);
    const limit = bindingLimit(e, a?.maxBindingBytes);
    // elements per window: a multiple of 8 (whole vec4s of 16-bit elements) that fits with the slack
    const per = Math.floor((limit - windowSlack(e, 16)) / elt / 8) * 8;
    if (per < 8) throw new ShapeError(`[count_nonfinite] binding limit ${limit} is too small to bind a window`);
    const kernel = {
      family: 'finite',
      entry: 'count_nonfinite',
      constants: { WG, DT: dtypeCode(x.dtype) },
      aliases: {},
      layout: ['read', 'write'] as Array<'read' | 'write'>,
    };
    const maxGroups = e.caps.adapterClass === 'gpu' ? MAX_GROUPS.gpu : MAX_GROUPS.software;
    for (let s = 0; s < n; s += per) {
      const end = Math.min(n, s + per);
      const w = elemWindow(e, x, s, end, 'count_nonfinite', { limit, granule: 16 });
      const nvec = Math.ceil(((w.off + end - s) * elt) / 16);
      const groups = Math.max(1, Math.min(maxGroups, Math.ceil(nvec / (WG * MIN_VEC_PER_LANE))));
      e.dispatch({
        kernel,
        name: 'count_nonfinite',
        params: { n: end - s, off: w.off, nvec, stride: groups * WG },
        bindings: [w.binding, y],
        workgroups: [groups, 1, 1],
      });
    }
    return y;
  },
  cpu({ x, acc }) {
    const prev = acc ? acc.hostValues()[0]! : 0;
    const { count } = x.numel === 0 ? { count: 0 } : scanNonFinite(x.data!, x.dtype as 'f32' | 'f16' | 'bf16');
    return Tensor.cpu(new Uint32Array([(prev + count) >>> 0]), [1], 'u32');
  },
  flops: ({ x }) => x.numel,
  bytes: ({ x, acc }) => x.nbytes + 4 + (acc ? 4 : 0),
});

/** The number of NaN / ±Inf elements of x (+ acc[0]), as a u32 [1] tensor on x's device. */
export function countNonFinite(x: Tensor, acc?: Tensor, attrs?: CountNonFiniteAttrs): Tensor {
  return countNonFiniteOp({ x, acc }, attrs);
}

/** The count as a number (reads the 4 bytes back; the one sync point of a check). */
export async function countNonFiniteNow(x: Tensor): Promise<number> {
  const c = countNonFinite(x);
  try {
    return (await c.toArray())[0]!;
  } finally {
    if (c.device === 'gpu') c.dispose();
  }
}
