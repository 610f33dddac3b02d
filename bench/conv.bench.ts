// Convolutions on Wan 2.1 VAE decoder shapes (base_dim 96: 384/384/192/96 channels at the latent,
// 2x, 4x and 8x resolution; the 480p latent is 60x104): the 3x3x3 CausalConv3d of each stage, the
// upsamplers' 3x3 conv2d (C -> C/2 after the x2 upsample), the upsample3d time_conv (3x1x1,
// C -> 2C) and the 1x1x1 resnet shortcut.
//
// Peer: tfjs-backend-webgpu on the same Dawn device. tfjs gets its own layout (NDHWC / NHWC, the
// filter as [kt, kh, kw, Ci, Co]) and its 'same' / 'valid' padding; only the conv itself is timed.
// Our result is validated against the CPU reference (first 8 output channels), the peer's against
// ours.

import { addBench, opWork, randn, type BenchInstance, type PeerInstance, type Work } from './harness.ts';
import { tfjsOn, tfSync } from './peers/tfjs.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import { conv3d, conv2d, conv3dOp, conv2dOp } from '../src/ops/conv.ts';
import type { Engine } from '../src/runtime/engine.ts';

interface ConvCase {
  name: string;
  /** x [B, Ci, T, H, W] */
  x: [number, number, number, number, number];
  /** Co, kt, kh, kw */
  co: number;
  k: [number, number, number];
  padding: [number, number, number, number];
  /** conv2d: frames as batch (x T must be 1) */
  twoD?: boolean;
  /** no peer run (too slow for tfjs here) */
  ours?: boolean;
}

// Spatial sizes are scaled down from the real stage sizes (latent 60x104, then 120x208, 240x416,
// 480x832 at 480p) so one tfjs run stays around 2-4 s here (tfjs conv3d runs at ~0.1-0.3 GFLOP/s
// on these channel counts). The 3x3x3 cases use 'same' padding [1, 1, 1, 1] on both sides (tfjs
// has no causal mode; a causal conv does the same per-output work); the time_conv and shortcut
// cases are exactly the decoder's cached calls. The last case is a real full-frame stage, ours only.
// GFLOP/s count useful multiply-adds only (taps on padding excluded; the op registry's flops), the
// same for both sides.
const cases: ConvCase[] = [
  { name: 'wan-vae 384ch stage conv 3x3x3', x: [1, 384, 3, 2, 32], co: 384, k: [3, 3, 3], padding: [1, 1, 1, 1] },
  { name: 'wan-vae 192ch stage conv 3x3x3', x: [1, 192, 3, 2, 64], co: 192, k: [3, 3, 3], padding: [1, 1, 1, 1] },
  { name: 'wan-vae 96ch stage conv 3x3x3', x: [1, 96, 3, 4, 128], co: 96, k: [3, 3, 3], padding: [1, 1, 1, 1] },
  { name: 'wan-vae up0 resample 384->192', x: [1, 384, 1, 4, 208], co: 192, k: [1, 3, 3], padding: [0, 0, 1, 1], twoD: true },
  { name: 'wan-vae up0 time_conv 384->768', x: [1, 384, 3, 2, 96], co: 768, k: [3, 1, 1], padding: [0, 0, 0, 0] },
  { name: 'wan-vae up1 shortcut 192->384', x: [1, 192, 1, 8, 256], co: 384, k: [1, 1, 1], padding: [0, 0, 0, 0] },
  { name: 'wan-vae mid conv 384@60x104 full', x: [1, 384, 3, 60, 104], co: 384, k: [3, 3, 3], padding: [0, 0, 1, 1], ours: true },
];

function outDims(c: ConvCase): [number, number, number] {
  const [, , T, H, W] = c.x;
  return [T + c.padding[0] + c.padding[1] - c.k[0] + 1, H + 2 * c.padding[2] - c.k[1] + 1, W + 2 * c.padding[3] - c.k[2] + 1];
}

function data(c: ConvCase) {
  const [B, Ci, T, H, W] = c.x;
  const fan = Ci * c.k[0] * c.k[1] * c.k[2];
  return {
    x: randn(B * Ci * T * H * W, 1),
    w: randn(c.co * fan, 2, 1 / Math.sqrt(fan)),
    b: randn(c.co, 3, 0.1),
  };
}

/** Our op on GPU tensors (conv2d: x [B*T, C, H, W] with T = 1). */
function runOurs(c: ConvCase, x: Tensor, w: Tensor, b: Tensor): Tensor {
  if (c.twoD) {
    const [B, Ci, , H, W] = c.x;
    const x4 = x.reshape([B, Ci, H, W]);
    const w4 = w.reshape([c.co, Ci, c.k[1], c.k[2]]);
    const y = conv2d({ x: x4, w: w4, b }, { padding: [c.padding[2], c.padding[3]] });
    x4.dispose();
    w4.dispose();
    return y;
  }
  return conv3d({ x, w, b }, { padding: c.padding });
}

/** The registry's flops (useful multiply-adds, padding taps excluded) and bytes of runOurs. */
function oursWork(c: ConvCase, x: Tensor, w: Tensor, b: Tensor): Work {
  if (c.twoD) {
    const [B, Ci, , H, W] = c.x;
    const x4 = x.reshape([B, Ci, H, W]);
    const w4 = w.reshape([c.co, Ci, c.k[1], c.k[2]]);
    const work = opWork(conv2dOp, { x: x4, w: w4, b }, { padding: [c.padding[2], c.padding[3]] });
    x4.dispose();
    w4.dispose();
    return work;
  }
  return opWork(conv3dOp, { x, w, b }, { padding: c.padding });
}

async function setupOurs(e: Engine, c: ConvCase): Promise<BenchInstance> {
  const d = data(c);
  const fan = c.x[1] * c.k[0] * c.k[1] * c.k[2];
  const x = e.fromHost(d.x, c.x, 'f32');
  const w = e.fromHost(d.w, [c.co, c.x[1], ...c.k], 'f32');
  const b = e.fromHost(d.b, [c.co], 'f32');
  let y: Tensor | null = null;
  return {
    work: oursWork(c, x, w, b),
    run() {
      y?.dispose();
      y = runOurs(c, x, w, b);
    },
    async validate() {
      const out = runOurs(c, x, w, b);
      const got = await out.toArray();
      out.dispose();
      // CPU reference on the first 8 output channels (the full reference would take minutes here)
      const n8 = Math.min(8, c.co);
      const ref = conv3d(
        { x: Tensor.cpu(d.x, c.x, 'f32'), w: Tensor.cpu(d.w.subarray(0, n8 * fan), [n8, c.x[1], ...c.k], 'f32'), b: Tensor.cpu(d.b.subarray(0, n8), [n8], 'f32') },
        { padding: c.padding },
      ).hostValues();
      const [To, Ho, Wo] = outDims(c);
      const plane = To * Ho * Wo;
      let worst = 0;
      for (let i = 0; i < n8 * plane; i++) worst = Math.max(worst, Math.abs(got[i]! - ref[i]!));
      if (!(worst < 1e-4)) throw new Error(`[conv bench] ${c.name}: GPU vs CPU max abs diff ${worst}`);
    },
    dispose() {
      y?.dispose();
      x.dispose();
      w.dispose();
      b.dispose();
    },
  };
}

/**
 * tfjs keeps its compute pass open between ops; `submitQueue()` (what tfSync calls) finishes the
 * command encoder without ending it, which is a validation error when fewer than 15 dispatches
 * are pending (a single conv). End the pass first, as tfjs's own read path does.
 */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
function endPass(tf: any): void {
  const be = tf.backend() as { ensureCommandEncoderReady?: () => void; endComputePassEncoder?: () => void };
  be.ensureCommandEncoderReady?.();
  be.endComputePassEncoder?.();
}

async function setupTfjs(e: Engine, c: ConvCase): Promise<PeerInstance> {
  const tf = await tfjsOn(e);
  const d = data(c);
  const [B, Ci, T, H, W] = c.x;
  const [kt, kh, kw] = c.k;
  // tfjs pads 'same' (k // 2 on every side of every dim) or not at all
  const zero = c.padding.every((p) => p === 0);
  const same = c.padding[0] === (c.twoD ? 0 : kt >> 1) && c.padding[1] === c.padding[0] && c.padding[2] === kh >> 1 && c.padding[3] === kw >> 1;
  if (!zero && !same) throw new Error(`[conv bench] ${c.name}: padding ${JSON.stringify(c.padding)} has no tfjs equivalent`);
  const pad = zero ? 'valid' : 'same';
  // NDHWC
  const xp = new Float32Array(B * T * H * W * Ci);
  for (let n = 0; n < B; n++)
    for (let ci = 0; ci < Ci; ci++)
      for (let t = 0; t < T; t++)
        for (let h = 0; h < H; h++) for (let w = 0; w < W; w++) xp[(((n * T + t) * H + h) * W + w) * Ci + ci] = d.x[(((n * Ci + ci) * T + t) * H + h) * W + w]!;
  // filter [kt, kh, kw, Ci, Co]
  const f = new Float32Array(kt * kh * kw * Ci * c.co);
  for (let co = 0; co < c.co; co++)
    for (let ci = 0; ci < Ci; ci++)
      for (let a = 0; a < kt * kh * kw; a++) f[(a * Ci + ci) * c.co + co] = d.w[(co * Ci + ci) * kt * kh * kw + a]!;
  const x = c.twoD ? tf.tensor4d(xp, [B * T, H, W, Ci]) : tf.tensor5d(xp, [B, T, H, W, Ci]);
  const filt = c.twoD ? tf.tensor4d(f, [kh, kw, Ci, c.co]) : tf.tensor5d(f, [kt, kh, kw, Ci, c.co]);
  // only the conv is timed (our side includes its fused bias; the peer has none)
  const conv = () => (c.twoD ? tf.conv2d(x, filt, 1, pad) : tf.conv3d(x, filt, 1, pad));
  const key = `conv ${c.name}`;
  return {
    async run() {
      const y = conv();
      endPass(tf);
      await tfSync(tf, e, key);
      y.dispose();
    },
    async validate() {
      const y = conv();
      const got = (await y.data()) as Float32Array;
      y.dispose();
      // bias added here: tfjs-webgpu 4.22 fails to broadcast a bias onto a rank-5 tensor
      for (let i = 0; i < got.length; i++) got[i] = got[i]! + d.b[i % c.co]!;
      // compare with our (validated) result, transposing NDHWC -> NCDHW
      const xs = e.fromHost(d.x, c.x, 'f32');
      const ws = e.fromHost(d.w, [c.co, Ci, ...c.k], 'f32');
      const bs = e.fromHost(d.b, [c.co], 'f32');
      const ours = runOurs(c, xs, ws, bs);
      const want = await ours.toArray();
      for (const t of [xs, ws, bs, ours]) t.dispose();
      const [To, Ho, Wo] = outDims(c);
      let worst = 0;
      for (let co = 0; co < c.co; co++)
        for (let p = 0; p < To * Ho * Wo; p++) worst = Math.max(worst, Math.abs(got[p * c.co + co]! - want[co * To * Ho * Wo + p]!));
      if (!(worst < 1e-3)) throw new Error(`[conv bench] tfjs ${c.name}: differs from ours by ${worst}`);
    },
    dispose() {
      x.dispose();
      filt.dispose();
    },
  };
}

for (const c of cases) {
  const [To] = outDims(c);
  addBench({
    kernel: c.twoD ? 'conv2d' : 'conv3d',
    name: c.name,
    shape: c.twoD
      ? `x[${c.x[0] * c.x[2]},${c.x[1]},${c.x[3]},${c.x[4]}] k${c.k[1]}x${c.k[2]} Co${c.co}`
      : `x[${c.x.join(',')}] k${c.k.join('x')} Co${c.co} -> T${To}`,
    dtype: 'f32',
    setup: (e) => setupOurs(e, c),
    peer: c.ours ? undefined : { name: 'tfjs-webgpu', setup: (e) => setupTfjs(e, c) },
  });
}
