// Convolutions (kernels/conv.wgsl fast paths, kernels/conv_generic.wgsl for everything else):
// conv3d for the Wan VAE's CausalConv3d (3x3x3, 1x1x1, time_conv 3x1x1) and the DiT patch
// embedding (kernel = stride = (1,2,2)); conv2d (the upsamplers' 3x3 conv, frames as batch).
//
// Layout is PyTorch's: x [B, Ci, T, H, W], w [Co, Ci, kt, kh, kw], y [B, Co, To, Ho, Wo].
// padding [t_front, t_back, h, w] is zero padding; a causal conv has t_front = kt - 1, t_back = 0.
//
// Tensors larger than one storage binding (a 480p decoder activation is ~600 MB): the op plans
// dispatches over (batch, output frames, output channels, input channels) so that the x, y and
// weight windows each fit one binding (window.ts); the kernels get the element offset of their
// first element. Chunks over input channels add into y (`accumulate`), so a split changes the f32
// summation order only by chunk.

import { defineOp, expectRank, expectDtype, grid1d } from './registry.ts';
import { actAlias, cpuTensor, f32 } from './common.ts';
import { bindingLimit, elemWindow, windowSlack } from './window.ts';
import { variantFor } from './variants.ts';
import type { Engine } from '../runtime/engine.ts';
import { Tensor, shapeStr } from '../tensor/tensor.ts';
import { type DType, dtypeCode, dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

export type ConvPath = 'auto' | 'generic';

export interface Conv3dAttrs {
  /** [t_front, t_back, h, w] zero padding (causal: [kt - 1, 0, kh // 2, kw // 2]) */
  padding: [number, number, number, number];
  /** [st, sh, sw], default [1, 1, 1] */
  stride?: [number, number, number];
  /** output dtype: 'f32' (default: x's dtype) or 'f16' */
  out?: DType;
  /** testing only: pretend storage bindings are at most this many bytes (exercises the split path) */
  maxBindingBytes?: number;
  /** testing / benchmarks only: 'generic' forces kernels/conv_generic.wgsl */
  path?: ConvPath;
}

export interface Conv2dAttrs {
  /** [h, w] zero padding */
  padding: [number, number];
  /** [sh, sw], default [1, 1] */
  stride?: [number, number];
  out?: DType;
  maxBindingBytes?: number;
  path?: ConvPath;
}

type ConvInputs = { x: Tensor; w: Tensor; b?: Tensor };

/** Resolved geometry of a conv3d call. */
interface Geo {
  B: number;
  Ci: number;
  T: number;
  H: number;
  W: number;
  Co: number;
  kt: number;
  kh: number;
  kw: number;
  st: number;
  sh: number;
  sw: number;
  pt: number;
  pb: number;
  ph: number;
  pw: number;
  To: number;
  Ho: number;
  Wo: number;
}

const WEIGHT_DTYPES = ['f32', 'f16', 'bf16'] as const;

function outSize(op: string, what: string, n: number, padTotal: number, k: number, s: number): number {
  if (n === 0) return 0; // an empty input dimension gives an empty output dimension
  if (n + padTotal < k) {
    throw new ShapeError(`[${op}] input ${what} ${n} plus padding ${padTotal} is smaller than the kernel (${k}); pad more or use a smaller kernel`);
  }
  return Math.floor((n + padTotal - k) / s) + 1;
}

function geometry(op: string, { x, w, b }: ConvInputs, a: Conv3dAttrs): Geo {
  expectRank(op, 'x', x, [5]);
  expectRank(op, 'weight', w, [5]);
  expectDtype(op, 'weight', w, WEIGHT_DTYPES);
  actAlias(op, x.dtype);
  actAlias(op, a.out ?? x.dtype);
  const [B, Ci, T, H, W] = x.shape as [number, number, number, number, number];
  const [Co, wCi, kt, kh, kw] = w.shape as [number, number, number, number, number];
  if (wCi !== Ci) {
    throw new ShapeError(`[${op}] weight ${shapeStr(w.shape)} does not match input channels ${Ci} (x ${shapeStr(x.shape)}); weight dim 1 must equal x dim 1`);
  }
  if (Co === 0 || Ci === 0 || kt === 0 || kh === 0 || kw === 0) {
    throw new ShapeError(`[${op}] weight ${shapeStr(w.shape)} has a zero dimension; channels and kernel sizes must be >= 1`);
  }
  if (b) {
    expectDtype(op, 'bias', b, WEIGHT_DTYPES);
    if (b.rank !== 1 || b.shape[0] !== Co) throw new ShapeError(`[${op}] bias ${shapeStr(b.shape)} must be [${Co}] (one value per output channel of weight ${shapeStr(w.shape)})`);
  }
  const pad = a.padding;
  if (!Array.isArray(pad) || pad.length !== 4 || !pad.every((p) => Number.isInteger(p) && p >= 0)) {
    throw new ShapeError(`[${op}] padding must be 4 integers >= 0 [t_front, t_back, h, w], got ${JSON.stringify(pad)}`);
  }
  const stride = a.stride ?? [1, 1, 1];
  if (!Array.isArray(stride) || stride.length !== 3 || !stride.every((s) => Number.isInteger(s) && s >= 1)) {
    throw new ShapeError(`[${op}] stride must be 3 integers >= 1 [st, sh, sw], got ${JSON.stringify(stride)}`);
  }
  const [pt, pb, ph, pw] = pad;
  const [st, sh, sw] = stride;
  // zero frames give zero output frames (a causal decoder called with nothing new)
  const To = T === 0 ? 0 : outSize(op, 'frames', T, pt + pb, kt, st);
  const Ho = outSize(op, 'height', H, 2 * ph, kh, sh);
  const Wo = outSize(op, 'width', W, 2 * pw, kw, sw);
  return { B, Ci, T, H, W, Co, kt, kh, kw, st, sh, sw, pt, pb, ph, pw, To, Ho, Wo };
}

/** Taps of a 1-D conv that land inside the input, summed over the outputs. */
function validTaps(n: number, k: number, s: number, padFront: number, out: number): number {
  let total = 0;
  for (let o = 0; o < out; o++) {
    const first = o * s - padFront;
    total += Math.max(0, Math.min(n, first + k) - Math.max(0, first));
  }
  return total;
}

/**
 * Useful floating-point operations: 2 per multiply-add whose input is not padding (taps on the
 * zero padding are skipped by the kernels and by the reference; counting them would inflate
 * GFLOP/s by up to 3x on one-row inputs).
 */
function convUsefulFlops(g: Geo): number {
  return 2 * g.B * g.Co * g.Ci * validTaps(g.T, g.kt, g.st, g.pt, g.To) * validTaps(g.H, g.kh, g.sh, g.ph, g.Ho) * validTaps(g.W, g.kw, g.sw, g.pw, g.Wo);
}

function convFlops(g: Geo): number {
  return convUsefulFlops(g);
}

// ---------------------------------------------------------------- CPU reference

/** Plain loops, f64 accumulation over one output plane at a time. */
function conv3dCpu(g: Geo, { x, w, b }: ConvInputs, out: DType): Tensor {
  const xv = f32(x);
  const wv = f32(w);
  const bv = b ? f32(b) : null;
  const { B, Ci, T, H, W, Co, kt, kh, kw, st, sh, sw, pt, ph, pw, To, Ho, Wo } = g;
  const y = new Float32Array(B * Co * To * Ho * Wo);
  const plane = To * Ho * Wo;
  const acc = new Float64Array(plane);
  for (let bi = 0; bi < B; bi++) {
    for (let co = 0; co < Co; co++) {
      acc.fill(bv ? bv[co]! : 0);
      for (let ci = 0; ci < Ci; ci++) {
        const xc = (bi * Ci + ci) * T * H * W;
        for (let a = 0; a < kt; a++) {
          for (let r = 0; r < kh; r++) {
            for (let c = 0; c < kw; c++) {
              const wt = wv[(((co * Ci + ci) * kt + a) * kh + r) * kw + c]!;
              // output columns whose input column wo*sw + c - pw lies inside [0, W)
              const lo = Math.max(0, Math.ceil((pw - c) / sw));
              const hi = Math.min(Wo - 1, Math.floor((W - 1 + pw - c) / sw));
              for (let to = 0; to < To; to++) {
                const ti = to * st + a - pt;
                if (ti < 0 || ti >= T) continue;
                for (let ho = 0; ho < Ho; ho++) {
                  const hi2 = ho * sh + r - ph;
                  if (hi2 < 0 || hi2 >= H) continue;
                  const xr = xc + (ti * H + hi2) * W + c - pw;
                  const orow = (to * Ho + ho) * Wo;
                  for (let wo = lo; wo <= hi; wo++) acc[orow + wo] += wt * xv[xr + wo * sw]!;
                }
              }
            }
          }
        }
      }
      y.set(acc, (bi * Co + co) * plane);
    }
  }
  return cpuTensor(y, [B, Co, To, Ho, Wo], out);
}

// ---------------------------------------------------------------- dispatch planning

type Path = 'k3' | 'k1' | 'generic';

/** The adapter's choice comes from variants.ts ('shuffle': the k3 / k1 kernels); the shape conditions are here. */
function choosePath(e: Engine, g: Geo, x: Tensor, forced: ConvPath | undefined): Path {
  // the fast kernels use 8-lane subgroup shuffles within one 8-invocation workgroup
  if (forced === 'generic' || variantFor(e.caps, 'conv') === 'generic') return 'generic';
  if (g.sh !== 1 || g.sw !== 1) return 'generic';
  // ... and vec4 loads of x rows: rows (k3) / frames (k1) of a multiple of 4 elements, x starting
  // at a multiple of 4 elements (then every window offset is one)
  if (x.byteOffset % (4 * dtypeSize(x.dtype)) !== 0) return 'generic';
  if (g.kh === 3 && g.kw === 3 && g.ph === 1 && g.pw === 1 && g.W % 4 === 0) return 'k3';
  if (g.kh === 1 && g.kw === 1 && g.ph === 0 && g.pw === 0 && (g.H * g.W) % 4 === 0) return 'k1';
  return 'generic';
}

/** One dispatch: batches [b0, b0+nb), output frames [t0, t1), output channels [o0, o1), input channels [c0, c1). */
interface Chunk {
  b0: number;
  nb: number;
  t0: number;
  t1: number;
  o0: number;
  o1: number;
  c0: number;
  c1: number;
}

/** Input frames [f0, f1) that output frames [t0, t1) read (never empty when T > 0). */
function inputFrames(g: Geo, t0: number, t1: number): [number, number] {
  const f0 = Math.min(Math.max(0, t0 * g.st - g.pt), g.T - 1);
  const f1 = Math.max(f0 + 1, Math.min(g.T, (t1 - 1) * g.st - g.pt + g.kt));
  return [f0, f1];
}

/**
 * Element strides of the contiguous operands: x [B, Ci, T, H, W] (HW a frame, xcs a channel, xbs
 * a batch element), y [B, Co, To, Ho, Wo] (plane, ycs, ybs) and weight [Co, Ci, kt, kh, kw] (kk a
 * channel's taps, wRow an output channel).
 */
function strides(g: Geo): { HW: number; plane: number; xcs: number; xbs: number; ycs: number; ybs: number; kk: number; wRow: number } {
  const HW = g.H * g.W;
  const plane = g.Ho * g.Wo;
  const xcs = g.T * HW;
  const ycs = g.To * plane;
  const kk = g.kt * g.kh * g.kw;
  return { HW, plane, xcs, xbs: g.Ci * xcs, ycs, ybs: g.Co * ycs, kk, wRow: g.Ci * kk };
}

/**
 * Split the call so each window (x, y, weights) fits `limit` bytes. Preference: whole batches,
 * then per batch element: all output frames if a single channel plane fits, input channels
 * chunked (accumulating into y) and output channels chunked (multiples of 8).
 */
function plan(op: string, g: Geo, xs: number, ys: number, ws: number, limit: number, slack: number): Chunk[] {
  const limX = Math.floor((limit - slack) / xs);
  const limY = Math.floor((limit - slack) / ys);
  const limW = Math.floor((limit - slack) / ws);
  const { HW, plane, xcs, xbs, ycs, ybs, kk, wRow } = strides(g);
  const chunks: Chunk[] = [];
  if (g.Co * wRow <= limW && xbs <= limX && ybs <= limY) {
    const nbMax = Math.max(1, Math.min(g.B, Math.floor(limX / xbs), Math.floor(limY / ybs)));
    for (let b0 = 0; b0 < g.B; b0 += nbMax) chunks.push({ b0, nb: Math.min(nbMax, g.B - b0), t0: 0, t1: g.To, o0: 0, o1: g.Co, c0: 0, c1: g.Ci });
    return chunks;
  }
  // output frames per chunk: as many as fit with one channel of x and of y
  const framesFit = (tc: number): boolean => {
    let worst = 0;
    for (let t0 = 0; t0 < g.To; t0 += tc) {
      const [f0, f1] = inputFrames(g, t0, Math.min(g.To, t0 + tc));
      worst = Math.max(worst, f1 - f0);
    }
    return worst * HW <= limX && tc * plane <= limY;
  };
  let tc = g.To;
  while (tc > 1 && !framesFit(tc)) tc = Math.ceil(tc / 2);
  if (!framesFit(tc)) {
    throw new ShapeError(
      `[${op}] one frame of x (${g.H}x${g.W}) or y (${g.Ho}x${g.Wo}) is larger than a storage binding (${limit} bytes); tile the input spatially first`,
    );
  }
  for (let b0 = 0; b0 < g.B; b0++) {
    for (let t0 = 0; t0 < g.To; t0 += tc) {
      const t1 = Math.min(g.To, t0 + tc);
      const [f0, f1] = inputFrames(g, t0, t1);
      // input channels: (cc - 1) * xcs + frames * HW <= limX, and one weight row chunk must fit
      let cc = Math.min(g.Ci, Math.floor((limX - (f1 - f0) * HW) / xcs) + 1, Math.floor(limW / kk));
      if (cc < 1) throw new ShapeError(`[${op}] weight rows of ${shapeStr([g.Co, g.Ci, g.kt, g.kh, g.kw])} cannot be split to fit one storage binding (${limit} bytes)`);
      // output channels: y window and weight window
      let oc = Math.min(g.Co, Math.floor((limY - (t1 - t0) * plane) / ycs) + 1, Math.floor((limW - cc * kk) / wRow) + 1);
      if (oc < 1) {
        cc = Math.max(1, Math.min(cc, Math.floor(limW / kk)));
        oc = 1;
      }
      if (oc < g.Co && oc >= 8) oc -= oc % 8; // keep 8-channel tiles full
      for (let o0 = 0; o0 < g.Co; o0 += oc) {
        for (let c0 = 0; c0 < g.Ci; c0 += cc) {
          chunks.push({ b0, nb: 1, t0, t1, o0, o1: Math.min(g.Co, o0 + oc), c0, c1: Math.min(g.Ci, c0 + cc) });
        }
      }
    }
  }
  return chunks;
}

/** Output columns of one row per workgroup of the 3×3 paths (the kernels' TILE). */
const K3_TILE_COLUMNS = 64;

/**
 * Output columns the 3×3 conv paths compute for a row of `width` columns: whole workgroups, so
 * widths just over a multiple of the workgroup waste most of one (the tiled VAE decode plans its
 * tile widths around this: conv3dWorkColumns(1) is the workgroup's width).
 */
export function conv3dWorkColumns(width: number): number {
  return Math.ceil(width / K3_TILE_COLUMNS) * K3_TILE_COLUMNS;
}

function conv3dGpu(e: Engine, op: string, g: Geo, { x, w, b }: ConvInputs, a: Conv3dAttrs): Tensor {
  const outDt = a.out ?? x.dtype;
  const y = e.empty([g.B, g.Co, g.To, g.Ho, g.Wo], outDt);
  if (y.numel === 0) return y;
  const path = choosePath(e, g, x, a.path);
  const limit = bindingLimit(e, a.maxBindingBytes);
  // the kernels read x rows as vec4: windows are rounded up to 16 bytes
  const win = { limit, granule: 16 } as const;
  const xs = dtypeSize(x.dtype);
  const ys = dtypeSize(outDt);
  const ws = dtypeSize(w.dtype);
  const chunks = plan(op, g, xs, ys, ws, limit, windowSlack(e, 16));
  const { HW, plane, xcs, xbs, ycs, ybs, kk, wRow } = strides(g);
  const aliases = { x_t: actAlias(op, x.dtype, e), y_t: actAlias(op, outDt, e) };
  // the only override: every distinct value is a pipeline variant that lavapipe compiles for
  // seconds on first use, so the bias and vec4 choices are Params fields
  const constants: Record<string, number> = { W_DTYPE: dtypeCode(w.dtype) };
  const tileW = path === 'generic' ? 256 : K3_TILE_COLUMNS; // positions per workgroup (kernels' TILE)
  const tn = path === 'generic' ? 4 : 8;
  for (const c of chunks) {
    const [f0, f1] = inputFrames(g, c.t0, c.t1);
    const xw = elemWindow(e, x, c.b0 * xbs + c.c0 * xcs + f0 * HW, (c.b0 + c.nb - 1) * xbs + (c.c1 - 1) * xcs + f1 * HW, op, win);
    const yw = elemWindow(e, y, c.b0 * ybs + c.o0 * ycs + c.t0 * plane, (c.b0 + c.nb - 1) * ybs + (c.o1 - 1) * ycs + c.t1 * plane, op, win);
    const ww = elemWindow(e, w, c.o0 * wRow + c.c0 * kk, (c.o1 - 1) * wRow + c.c1 * kk, op, win);
    const bw = b ? elemWindow(e, b, c.o0, c.o1, op, win) : ww;
    const nco = c.o1 - c.o0;
    const nt = c.t1 - c.t0;
    const tilesW = Math.ceil((path === 'k3' ? g.Wo : plane) / tileW);
    const tiles = tilesW * (path === 'k3' ? g.Ho : 1) * nt;
    const [gx, gy] = grid1d(c.nb * tiles);
    const gz = Math.ceil(nco / tn);
    const p: Record<string, number> = {
      ci: c.c1 - c.c0,
      t: f1 - f0,
      h: g.H,
      w: g.W,
      co: nco,
      to: nt,
      ho: g.Ho,
      wo: g.Wo,
      kt: g.kt,
      st: g.st,
      pt: g.pt - c.t0 * g.st + f0,
      nb: c.nb,
      x_off: xw.off,
      x_cs: xcs,
      x_bs: xbs,
      y_off: yw.off,
      y_cs: ycs,
      y_bs: ybs,
      w_row: wRow,
      w_off: ww.off,
      b_off: b ? bw.off : 0,
      tiles_w: tilesW,
      tiles,
      grid_x: gx,
      accumulate: c.c0 > 0 ? 1 : 0,
      has_bias: b ? 1 : 0,
      b_dtype: b ? dtypeCode(b.dtype) : 0,
    };
    if (path !== 'generic' && xw.off % 4 !== 0) throw new ShapeError(`[${op}] internal: x window offset ${xw.off} is not vec4-aligned`);
    if (path === 'generic') Object.assign(p, { kh: g.kh, kw: g.kw, sh: g.sh, sw: g.sw, ph: g.ph, pw: g.pw, w_dtype: dtypeCode(w.dtype) });
    if (path === 'generic') {
      e.dispatch({
        kernel: { family: 'conv_generic', entry: 'conv_any', aliases, layout: ['read', 'read', 'read', 'write'] },
        name: `${op}.generic`,
        params: p,
        bindings: [xw.binding, ww.binding, bw.binding, yw.binding],
        workgroups: [gx, gy, gz],
      });
    } else {
      e.dispatch({
        kernel: { family: 'conv', entry: path === 'k3' ? 'conv_k3' : 'conv_k1', constants, aliases, layout: ['read', 'read', 'read', 'read', 'write'] },
        name: `${op}.${path}`,
        params: p,
        bindings: [xw.binding, xw.binding, ww.binding, bw.binding, yw.binding],
        workgroups: [gx, gy, gz],
      });
    }
  }
  return y;
}

// ---------------------------------------------------------------- ops

export const conv3dOp = defineOp<ConvInputs, Conv3dAttrs>({
  name: 'conv3d',
  family: 'conv',
  check(inputs, a) {
    const g = geometry('conv3d', inputs, a);
    if (Math.ceil(g.Co / 4) > 65535) throw new ShapeError(`[conv3d] ${g.Co} output channels need more than 65535 workgroups along z; split the weight`);
  },
  gpu(e, inputs, a) {
    return conv3dGpu(e, 'conv3d', geometry('conv3d', inputs, a), inputs, a);
  },
  cpu(inputs, a) {
    return conv3dCpu(geometry('conv3d', inputs, a), inputs, a.out ?? inputs.x.dtype);
  },
  flops: (inputs, a) => convFlops(geometry('conv3d', inputs, a)),
  bytes: (inputs, a) => {
    const g = geometry('conv3d', inputs, a);
    return inputs.x.nbytes + inputs.w.nbytes + (inputs.b?.nbytes ?? 0) + g.B * g.Co * g.To * g.Ho * g.Wo * dtypeSize(a.out ?? inputs.x.dtype);
  },
});

function as3d(a: Conv2dAttrs): Conv3dAttrs {
  const pad = a.padding;
  if (!Array.isArray(pad) || pad.length !== 2) throw new ShapeError(`[conv2d] padding must be 2 integers >= 0 [h, w], got ${JSON.stringify(pad)}`);
  const s = a.stride ?? [1, 1];
  if (!Array.isArray(s) || s.length !== 2) throw new ShapeError(`[conv2d] stride must be 2 integers >= 1 [sh, sw], got ${JSON.stringify(s)}`);
  return { padding: [0, 0, pad[0], pad[1]], stride: [1, s[0], s[1]], out: a.out, maxBindingBytes: a.maxBindingBytes, path: a.path };
}

/** x [B, C, H, W] -> [B, C, 1, H, W] (a view), w [Co, Ci, kh, kw] -> [Co, Ci, 1, kh, kw]. */
function as5d({ x, w, b }: ConvInputs): ConvInputs {
  expectRank('conv2d', 'x', x, [4]);
  expectRank('conv2d', 'weight', w, [4]);
  const [B, C, H, W] = x.shape as [number, number, number, number];
  const [Co, Ci, kh, kw] = w.shape as [number, number, number, number];
  if (Ci !== C) throw new ShapeError(`[conv2d] weight ${shapeStr(w.shape)} does not match input channels ${C} (x ${shapeStr(x.shape)}); weight dim 1 must equal x dim 1`);
  return { x: x.reshape([B, C, 1, H, W]), w: w.reshape([Co, Ci, 1, kh, kw]), b };
}

function with5d<T>(inputs: ConvInputs, fn: (i5: ConvInputs) => T): T {
  const i5 = as5d(inputs);
  try {
    return fn(i5);
  } finally {
    i5.x.dispose();
    i5.w.dispose();
  }
}

function squeeze(y5: Tensor): Tensor {
  const [B, Co, , Ho, Wo] = y5.shape as [number, number, number, number, number];
  const y = y5.reshape([B, Co, Ho, Wo]);
  y5.dispose();
  return y;
}

export const conv2dOp = defineOp<ConvInputs, Conv2dAttrs>({
  name: 'conv2d',
  family: 'conv',
  check(inputs, a) {
    with5d(inputs, (i5) => geometry('conv2d', i5, as3d(a)));
  },
  gpu(e, inputs, a) {
    return squeeze(with5d(inputs, (i5) => conv3dGpu(e, 'conv2d', geometry('conv2d', i5, as3d(a)), i5, as3d(a))));
  },
  cpu(inputs, a) {
    return squeeze(with5d(inputs, (i5) => conv3dCpu(geometry('conv2d', i5, as3d(a)), i5, a.out ?? inputs.x.dtype)));
  },
  flops: (inputs, a) => with5d(inputs, (i5) => convFlops(geometry('conv2d', i5, as3d(a)))),
  bytes: (inputs, a) =>
    with5d(inputs, (i5) => {
      const g = geometry('conv2d', i5, as3d(a));
      return inputs.x.nbytes + inputs.w.nbytes + (inputs.b?.nbytes ?? 0) + g.B * g.Co * g.Ho * g.Wo * dtypeSize(a.out ?? inputs.x.dtype);
    }),
});

/** Which kernel a GPU conv3d call uses ('k3' / 'k1': kernels/conv.wgsl; 'generic': kernels/conv_generic.wgsl). */
export function conv3dPath(e: Engine, inputs: { x: Tensor; w: Tensor; b?: Tensor }, attrs: Conv3dAttrs): 'k3' | 'k1' | 'generic' {
  return choosePath(e, geometry('conv3d', inputs, attrs), inputs.x, attrs.path);
}

/**
 * 3-D convolution, PyTorch layout. x: [B, Ci, T, H, W]; w: [Co, Ci, kt, kh, kw] (f32/f16/bf16);
 * b: [Co] optional. padding [t_front, t_back, h, w]; stride [st, sh, sw] (default 1).
 * Returns [B, Co, T', H', W'].
 */
export function conv3d(inputs: { x: Tensor; w: Tensor; b?: Tensor }, attrs: Conv3dAttrs): Tensor {
  return conv3dOp(inputs, attrs);
}

/** 2-D convolution, PyTorch layout. x: [B, Ci, H, W]; w: [Co, Ci, kh, kw]; padding [h, w]; stride [sh, sw]. */
export function conv2d(inputs: { x: Tensor; w: Tensor; b?: Tensor }, attrs: Conv2dAttrs): Tensor {
  return conv2dOp(inputs, attrs);
}
