// Nearest-neighbour x2 upsampling of the last two dims (kernels/upsample.wgsl): the Wan VAE's
// Upsample (`nearest-exact` at an exact x2, equal to plain nearest) before its 3x3 conv.
// Tensors larger than one storage binding are done in dispatches over whole planes (window.ts).

import { defineOp, grid1d } from './registry.ts';
import { actAlias, cpuTensor, f32 } from './common.ts';
import { bindingLimit, elemWindow, windowSlack } from './window.ts';
import { Tensor, shapeStr } from '../tensor/tensor.ts';
import { dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

const WG = 256;

export interface UpsampleAttrs {
  /** testing only: pretend storage bindings are at most this many bytes (exercises the split path) */
  maxBindingBytes?: number;
}

function dims(x: Tensor): { planes: number; H: number; W: number } {
  if (x.rank < 2) throw new ShapeError(`[upsample_nearest2x] x must have rank >= 2 ([..., H, W]), got ${shapeStr(x.shape)}`);
  const H = x.shape[x.rank - 2]!;
  const W = x.shape[x.rank - 1]!;
  return { planes: H * W === 0 ? 0 : x.numel / (H * W), H, W };
}

function outShape(x: Tensor): number[] {
  const s = [...x.shape];
  s[s.length - 2] = s[s.length - 2]! * 2;
  s[s.length - 1] = s[s.length - 1]! * 2;
  return s;
}

export const upsampleNearest2xOp = defineOp<{ x: Tensor }, UpsampleAttrs>({
  name: 'upsample_nearest2x',
  family: 'upsample',
  check({ x }) {
    actAlias('upsample_nearest2x', x.dtype);
    dims(x);
  },
  gpu(e, { x }, a) {
    const y = e.empty(outShape(x), x.dtype);
    const { planes, H, W } = dims(x);
    if (y.numel === 0) return y;
    const es = dtypeSize(x.dtype);
    const limit = bindingLimit(e, a.maxBindingBytes);
    // the kernel writes y as pairs: windows are rounded up to 16 bytes
    const win = { limit, granule: 16 } as const;
    const planeOut = 4 * H * W * es;
    const per = Math.floor((limit - windowSlack(e, 16)) / planeOut);
    if (per < 1) {
      throw new ShapeError(`[upsample_nearest2x] one output plane (${2 * H}x${2 * W}, ${planeOut} bytes) is larger than a storage binding (${limit} bytes); tile it first`);
    }
    const alias = actAlias('upsample_nearest2x', x.dtype, e);
    for (let p0 = 0; p0 < planes; p0 += per) {
      const np = Math.min(per, planes - p0);
      const n = np * H * W;
      const xw = elemWindow(e, x, p0 * H * W, (p0 + np) * H * W, 'upsample_nearest2x', win);
      const yw = elemWindow(e, y, p0 * 4 * H * W, (p0 + np) * 4 * H * W, 'upsample_nearest2x', win);
      e.dispatch({
        kernel: { family: 'upsample', entry: 'nearest2x', constants: { WG }, aliases: { x_t: alias }, layout: ['read', 'write'] },
        name: 'upsample_nearest2x',
        params: { n, h: H, w: W, x_off: xw.off, y_off: yw.off / 2 },
        bindings: [xw.binding, yw.binding],
        workgroups: grid1d(Math.ceil(n / WG)),
      });
    }
    return y;
  },
  cpu({ x }) {
    const v = f32(x);
    const { planes, H, W } = dims(x);
    const out = new Float32Array(4 * planes * H * W);
    for (let p = 0; p < planes; p++) {
      for (let i = 0; i < 2 * H; i++) {
        const src = (p * H + (i >> 1)) * W;
        const dst = (p * 2 * H + i) * 2 * W;
        for (let j = 0; j < 2 * W; j++) out[dst + j] = v[src + (j >> 1)]!;
      }
    }
    return cpuTensor(out, outShape(x), x.dtype);
  },
  flops: () => 0,
  bytes: ({ x }) => 5 * x.nbytes,
});

/** Nearest-neighbour x2 on the last two dims: [..., H, W] -> [..., 2H, 2W]. */
export function upsampleNearest2x(x: Tensor, attrs: UpsampleAttrs = {}): Tensor {
  return upsampleNearest2xOp({ x }, attrs);
}
