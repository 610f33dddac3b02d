import { describe, it, expect } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { getEngine as sharedEngine, randTensor, expectClose, TOL, Rng } from './helpers/gpu.ts';
import { loadGolden, TINY } from './helpers/golden.ts';
import { conv3d, conv2d, conv3dPath, type Conv3dAttrs, type Conv2dAttrs } from '../src/ops/conv.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import type { DType } from '../src/tensor/dtype.ts';

type Tol = { atol: number; rtol: number };

// The engine's default wait mode sleeps for a GPU time predicted from earlier submits; in a test
// file whose dispatch sizes differ by 10^5 (and on a machine shared with other jobs) that
// prediction can overshoot badly, so these tests simply await.
const getEngine = () => sharedEngine({ waitMode: 'await' });

/** Weights scaled by 1/sqrt(fan-in) so outputs stay O(1) and TOL.f32 is meaningful. */
function weights(rng: Rng, shape: number[], dt: DType): Tensor {
  const fanIn = shape.slice(1).reduce((a, b) => a * b, 1);
  return randTensor(rng, shape, dt, 1 / Math.sqrt(Math.max(1, fanIn)));
}

/**
 * Run `run` on CPU tensors (the reference) and on their GPU copies; compare. Returns the number
 * of dispatches the GPU run encoded.
 */
async function gpuVsCpu(run: (i: { x: Tensor; w: Tensor; b?: Tensor }) => Tensor, inputs: { x: Tensor; w: Tensor; b?: Tensor }, tol: Tol, what: string): Promise<number> {
  const e = await getEngine();
  const ref = run(inputs);
  const g = { x: inputs.x.toGpu(e), w: inputs.w.toGpu(e), b: inputs.b?.toGpu(e) };
  const before = e.dispatchCount;
  const out = run(g);
  const dispatches = e.dispatchCount - before;
  expect(out.shape).toEqual(ref.shape);
  expect(out.dtype).toBe(ref.dtype);
  expectClose(await out.toArray(), ref.hostValues(), tol, what);
  out.dispose();
  g.x.dispose();
  g.w.dispose();
  g.b?.dispose();
  return dispatches;
}

/** Direct 7-loop definition of a 3-D convolution (independent of the op's CPU reference). */
function naiveConv3d(x: Tensor, w: Tensor, b: Tensor | undefined, pad: number[], stride: number[]): Float32Array {
  const [B, Ci, T, H, W] = x.shape as number[];
  const [Co, , kt, kh, kw] = w.shape as number[];
  const [pt, pb, ph, pw] = pad;
  const [st, sh, sw] = stride;
  const To = Math.floor((T! + pt! + pb! - kt!) / st!) + 1;
  const Ho = Math.floor((H! + 2 * ph! - kh!) / sh!) + 1;
  const Wo = Math.floor((W! + 2 * pw! - kw!) / sw!) + 1;
  const xv = x.hostValues();
  const wv = w.hostValues();
  const bv = b?.hostValues();
  const y = new Float32Array(B! * Co! * To * Ho * Wo);
  let o = 0;
  for (let n = 0; n < B!; n++)
    for (let co = 0; co < Co!; co++)
      for (let t = 0; t < To; t++)
        for (let i = 0; i < Ho; i++)
          for (let j = 0; j < Wo; j++) {
            let s = bv ? bv[co]! : 0;
            for (let ci = 0; ci < Ci!; ci++)
              for (let a = 0; a < kt!; a++)
                for (let r = 0; r < kh!; r++)
                  for (let c = 0; c < kw!; c++) {
                    const ti = t * st! + a - pt!;
                    const hi = i * sh! + r - ph!;
                    const wi = j * sw! + c - pw!;
                    if (ti < 0 || ti >= T! || hi < 0 || hi >= H! || wi < 0 || wi >= W!) continue;
                    s += xv[(((n * Ci! + ci) * T! + ti) * H! + hi) * W! + wi]! * wv[(((co * Ci! + ci) * kt! + a) * kh! + r) * kw! + c]!;
                  }
            y[o++] = s;
          }
  return y;
}

/** Minimal safetensors reader (F32 tensors) for the tiny VAE weights. */
function readSafetensors(path: string): Map<string, { shape: number[]; data: Float32Array }> {
  const buf = readFileSync(path);
  const hlen = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + hlen).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [k, v] of Object.entries(header)) {
    if (k === '__metadata__' || v.dtype !== 'F32') continue;
    const bytes = buf.subarray(8 + hlen + v.data_offsets[0], 8 + hlen + v.data_offsets[1]);
    const copy = new Uint8Array(bytes.length);
    copy.set(bytes);
    out.set(k, { shape: v.shape, data: new Float32Array(copy.buffer) });
  }
  return out;
}

const rng = new Rng(1234);

describe('conv3d: CPU reference', () => {
  for (const [xs, ws, pad, stride] of [
    [[2, 3, 4, 5, 6], [4, 3, 3, 3, 3], [2, 0, 1, 1], [1, 1, 1]],
    [[1, 2, 5, 7, 6], [3, 2, 3, 2, 3], [1, 2, 0, 2], [2, 3, 1]],
    [[1, 3, 2, 6, 6], [5, 3, 1, 2, 2], [0, 0, 0, 0], [1, 2, 2]],
  ] as number[][][]) {
    it(`matches the direct definition x${JSON.stringify(xs)} w${JSON.stringify(ws)} pad ${JSON.stringify(pad)} stride ${JSON.stringify(stride)}`, () => {
      const x = randTensor(rng, xs!);
      const w = randTensor(rng, ws!);
      const b = randTensor(rng, [ws![0]!]);
      const y = conv3d({ x, w, b }, { padding: pad as Conv3dAttrs['padding'], stride: stride as Conv3dAttrs['stride'] });
      expectClose(y.hostValues(), naiveConv3d(x, w, b, pad!, stride!), { atol: 1e-5, rtol: 1e-5 }, 'cpu reference');
    });
  }
});

describe('conv3d: GPU vs CPU', () => {
  // [x shape, kernel, padding, stride, expected kernel]; sizes are odd and not multiples of the
  // 64-position tile. The fast kernels need vec4 rows (W % 4 == 0 for 3x3, H*W % 4 == 0 for
  // 1x1); odd widths run the generic kernel.
  const cases: Array<[number[], number[], Conv3dAttrs['padding'], Conv3dAttrs['stride'] | undefined, 'k3' | 'k1' | 'generic']> = [
    // 3x3x3 causal, fast path: H in {1, 3, 17, 33}, T in {1, 2, 5}, several 64-column tiles + halo
    [[1, 3, 5, 17, 132], [3, 3, 3], [2, 0, 1, 1], undefined, 'k3'],
    [[1, 16, 2, 3, 72], [3, 3, 3], [2, 0, 1, 1], undefined, 'k3'],
    [[1, 1, 1, 1, 4], [3, 3, 3], [2, 0, 1, 1], undefined, 'k3'],
    [[2, 33, 2, 33, 8], [3, 3, 3], [2, 0, 1, 1], undefined, 'k3'],
    [[1, 16, 5, 1, 36], [3, 3, 3], [0, 0, 1, 1], undefined, 'k3'], // the causal-cache call: cached frames in front
    [[1, 3, 4, 3, 20], [3, 3, 3], [1, 1, 1, 1], undefined, 'k3'],
    [[1, 3, 5, 3, 12], [3, 3, 3], [2, 0, 1, 1], [2, 1, 1], 'k3'], // temporal stride
    // 3x3x3 with odd widths W in {1, 3, 17, 33}: generic kernel
    [[1, 3, 5, 17, 33], [3, 3, 3], [2, 0, 1, 1], undefined, 'generic'],
    [[1, 16, 3, 3, 17], [3, 3, 3], [0, 0, 1, 1], undefined, 'generic'],
    [[1, 1, 1, 1, 1], [3, 3, 3], [2, 0, 1, 1], undefined, 'generic'],
    [[2, 33, 2, 33, 3], [3, 3, 3], [2, 0, 1, 1], undefined, 'generic'],
    // 1x1x1 and time_conv (3,1,1): fast path when H*W % 4 == 0
    [[1, 33, 2, 17, 12], [1, 1, 1], [0, 0, 0, 0], undefined, 'k1'],
    [[2, 3, 5, 3, 33], [1, 1, 1], [0, 0, 0, 0], undefined, 'generic'],
    [[1, 16, 5, 8, 12], [3, 1, 1], [2, 0, 0, 0], undefined, 'k1'],
    [[1, 16, 3, 17, 3], [3, 1, 1], [0, 0, 0, 0], undefined, 'generic'],
    [[1, 3, 2, 1, 4], [1, 1, 1], [0, 0, 0, 0], undefined, 'k1'],
    // DiT patch embedding (1,2,2) stride (1,2,2), odd kernels, strides, paddings: generic
    [[1, 16, 2, 17, 33], [1, 2, 2], [0, 0, 0, 0], [1, 2, 2], 'generic'],
    [[1, 3, 2, 6, 8], [1, 2, 2], [0, 0, 0, 0], [1, 2, 2], 'generic'],
    [[2, 3, 5, 9, 7], [2, 3, 5], [1, 2, 0, 2], [2, 1, 3], 'generic'],
    [[1, 3, 3, 17, 16], [3, 3, 3], [2, 0, 1, 1], [1, 2, 2], 'generic'],
    [[1, 3, 2, 5, 8], [1, 5, 5], [0, 0, 2, 2], undefined, 'generic'],
  ];
  cases.forEach(([xs, k, pad, stride, path], idx) => {
    const Co = [1, 3, 16, 33][idx % 4]!;
    it(`${path}: x${JSON.stringify(xs)} k${JSON.stringify(k)} pad ${JSON.stringify(pad)} stride ${JSON.stringify(stride ?? [1, 1, 1])} Co=${Co}`, async () => {
      const e = await getEngine();
      const x = randTensor(rng, xs);
      const w = weights(rng, [Co, xs[1]!, ...k], 'f32');
      const b = idx % 2 === 0 ? randTensor(rng, [Co]) : undefined;
      if (e.caps.subgroups) expect(conv3dPath(e, { x, w }, { padding: pad, stride })).toBe(path);
      await gpuVsCpu((i) => conv3d(i, { padding: pad, stride }), { x, w, b }, TOL.f32, 'conv3d');
    });
  });

  for (const wdt of ['f16', 'bf16'] as DType[]) {
    for (const [xs, k, pad] of [
      [[1, 33, 2, 17, 68], [3, 3, 3], [2, 0, 1, 1]],
      [[1, 16, 3, 8, 8], [3, 3, 3], [0, 0, 1, 1]],
      [[1, 33, 3, 5, 8], [3, 1, 1], [2, 0, 0, 0]],
      [[1, 16, 2, 6, 10], [1, 2, 2], [0, 0, 0, 0]],
    ] as Array<[number[], number[], Conv3dAttrs['padding']]>) {
      it(`${wdt} weights and bias x${JSON.stringify(xs)} k${JSON.stringify(k)}`, async () => {
        const x = randTensor(rng, xs);
        const w = weights(rng, [16, xs[1]!, ...k], wdt);
        const b = randTensor(rng, [16], wdt);
        const stride: Conv3dAttrs['stride'] = k[1] === 2 ? [1, 2, 2] : undefined;
        // the weights are rounded in the tensor itself, so the reference sees the same values: f32 tolerance
        await gpuVsCpu((i) => conv3d(i, { padding: pad, stride }), { x, w, b }, TOL.f32, `conv3d ${wdt}`);
      });
    }
  }

  it('generic kernel (the no-subgroups fallback) on the fast paths\' shapes', async () => {
    for (const [xs, k, pad] of [
      [[1, 16, 3, 17, 36], [3, 3, 3], [2, 0, 1, 1]],
      [[1, 16, 3, 8, 8], [1, 1, 1], [0, 0, 0, 0]],
      [[1, 3, 5, 3, 12], [3, 1, 1], [2, 0, 0, 0]],
    ] as Array<[number[], number[], Conv3dAttrs['padding']]>) {
      const x = randTensor(rng, xs);
      const w = weights(rng, [33, xs[1]!, ...k], 'bf16');
      const b = randTensor(rng, [33]);
      await gpuVsCpu((i) => conv3d(i, { padding: pad, path: 'generic' }), { x, w, b }, TOL.f32, 'conv3d generic');
    }
  });

  it('f16 activations in and out', async () => {
    const e = await getEngine();
    if (!e.caps.shaderF16) return; // adapter without shader-f16: f16 activations are not offered
    const x = randTensor(rng, [1, 16, 3, 8, 12], 'f16');
    const w = weights(rng, [16, 16, 3, 3, 3], 'bf16');
    await gpuVsCpu((i) => conv3d(i, { padding: [2, 0, 1, 1] }), { x, w }, TOL.f16, 'conv3d f16 -> f16');
    const x32 = randTensor(rng, [1, 16, 3, 8, 12]);
    await gpuVsCpu((i) => conv3d(i, { padding: [0, 0, 0, 0], out: 'f16' }), { x: x32, w: weights(rng, [8, 16, 1, 1, 1], 'f32') }, TOL.f16, 'conv3d 1x1 f32 -> f16');
  });

  it('zero frames give zero output frames', async () => {
    const e = await getEngine();
    const x = Tensor.cpuZeros([1, 4, 0, 5, 6]);
    const w = weights(rng, [8, 4, 3, 3, 3], 'f32');
    expect(conv3d({ x, w }, { padding: [2, 0, 1, 1] }).shape).toEqual([1, 8, 0, 5, 6]);
    const before = e.dispatchCount;
    const y = conv3d({ x: x.toGpu(e), w: w.toGpu(e) }, { padding: [2, 0, 1, 1] });
    expect(y.shape).toEqual([1, 8, 0, 5, 6]);
    expect(e.dispatchCount).toBe(before);
    expect((await y.toArray()).length).toBe(0);
    const yb = conv3d({ x: Tensor.cpuZeros([0, 4, 3, 5, 6]).toGpu(e), w: w.toGpu(e) }, { padding: [2, 0, 1, 1] });
    expect(yb.shape).toEqual([0, 8, 3, 5, 6]);
  });

  it('position grids above 65535 workgroups are folded', async () => {
    // k3: one tile per output row -> 70001 tiles; k1: 70001 * 64 positions in one plane
    const x = randTensor(rng, [1, 1, 1, 70001, 4]);
    await gpuVsCpu((i) => conv3d(i, { padding: [0, 0, 1, 1] }), { x, w: weights(rng, [2, 1, 1, 3, 3], 'f32') }, TOL.f32, 'conv3d k3 folded');
    const x1 = randTensor(rng, [1, 1, 1, 70001, 64]);
    await gpuVsCpu((i) => conv3d(i, { padding: [0, 0, 0, 0] }), { x: x1, w: weights(rng, [1, 1, 1, 1, 1], 'f32') }, TOL.f32, 'conv3d k1 folded');
  });
});

describe('conv3d: split into windowed bindings', () => {
  // an artificially small binding limit forces chunks over batch / frames / output and input channels
  const cases: Array<[string, number[], number[], Conv3dAttrs['padding'], number, Conv3dAttrs['path']?]> = [
    ['k3, input-channel chunks accumulate', [2, 33, 5, 7, 12], [3, 3, 3], [2, 0, 1, 1], 4096],
    ['k3, frame chunks', [1, 3, 5, 17, 36], [3, 3, 3], [2, 0, 1, 1], 7600],
    ['k3, cache-style padding', [1, 16, 4, 9, 20], [3, 3, 3], [0, 0, 1, 1], 2400],
    ['k1, time_conv', [1, 16, 5, 8, 8], [3, 1, 1], [2, 0, 0, 0], 1024],
    ['generic', [2, 9, 5, 7, 9], [3, 3, 3], [2, 0, 1, 1], 4096, 'generic'],
    ['batches only', [5, 3, 2, 5, 8], [3, 3, 3], [2, 0, 1, 1], 1600],
  ];
  for (const [name, xs, k, pad, limit, path] of cases) {
    it(`${name}: x${JSON.stringify(xs)} limit ${limit} B`, async () => {
      const x = randTensor(rng, xs);
      const w = weights(rng, [19, xs[1]!, ...k], 'bf16');
      const b = randTensor(rng, [19]);
      const n = await gpuVsCpu((i) => conv3d(i, { padding: pad, maxBindingBytes: limit, path }), { x, w, b }, TOL.f32, `conv3d split ${name}`);
      expect(n).toBeGreaterThan(1);
    });
  }
  it('a frame larger than one binding is refused with a clear message', async () => {
    const e = await getEngine();
    const x = Tensor.cpuZeros([1, 1, 1, 40, 40]).toGpu(e);
    const w = Tensor.cpuZeros([1, 1, 3, 3, 3]).toGpu(e);
    expect(() => conv3d({ x, w }, { padding: [2, 0, 1, 1], maxBindingBytes: 2048 })).toThrow(/\[conv3d\] one frame of x \(40x40\).*larger than a storage binding/);
  });
});

describe('conv2d', () => {
  for (const [xs, co, pad, stride] of [
    [[4, 16, 17, 32], 8, [1, 1], [1, 1]], // upsampler conv: frames as batch
    [[2, 16, 5, 33], 8, [1, 1], [1, 1]],
    [[3, 33, 3, 8], 16, [1, 1], [1, 1]],
    [[1, 3, 1, 1], 3, [1, 1], [1, 1]],
    [[2, 5, 9, 11], 7, [0, 2], [2, 3]],
  ] as Array<[number[], number, [number, number], [number, number]]>) {
    it(`3x3 x${JSON.stringify(xs)} -> ${co} pad ${JSON.stringify(pad)} stride ${JSON.stringify(stride)}`, async () => {
      const x = randTensor(rng, xs);
      const w = weights(rng, [co, xs[1]!, 3, 3], 'bf16');
      const b = randTensor(rng, [co]);
      await gpuVsCpu((i) => conv2d(i, { padding: pad, stride }), { x, w, b }, TOL.f32, 'conv2d');
    });
  }
  it('matches conv3d with a 1-frame kernel', () => {
    const x = randTensor(rng, [2, 3, 5, 6]);
    const w = randTensor(rng, [4, 3, 3, 3]);
    const y2 = conv2d({ x, w }, { padding: [1, 1] });
    const y3 = conv3d({ x: x.reshape([2, 3, 1, 5, 6]), w: w.reshape([4, 3, 1, 3, 3]) }, { padding: [0, 0, 1, 1] });
    expect(y2.shape).toEqual([2, 4, 5, 6]);
    expectClose(y2.hostValues(), y3.hostValues(), { atol: 0, rtol: 0 }, 'conv2d vs conv3d');
  });
  it('split path', async () => {
    const x = randTensor(rng, [6, 16, 9, 12]);
    const w = weights(rng, [16, 16, 3, 3], 'f32');
    const n = await gpuVsCpu((i) => conv2d(i, { padding: [1, 1], maxBindingBytes: 2048 } as Conv2dAttrs), { x, w }, TOL.f32, 'conv2d split');
    expect(n).toBeGreaterThan(1);
  });
});

describe('conv: Wan VAE goldens (official Wan 2.1 code, tiny model)', () => {
  const golden = loadGolden();
  const vae = readSafetensors(join(TINY, 'vae', 'diffusion_pytorch_model.safetensors'));
  const cfg = JSON.parse(readFileSync(join(TINY, 'vae', 'config.json'), 'utf8')) as { latents_mean: number[]; latents_std: number[] };
  const t = (name: string) => {
    const v = vae.get(name)!;
    return Tensor.cpu(v.data, v.shape, 'f32');
  };
  const gt = (name: string) => {
    const g = golden.get(name);
    return Tensor.cpu(g.data as Float32Array, g.shape, 'f32');
  };
  it('post_quant_conv (1x1x1) on the de-normalized latent', async () => {
    const e = await getEngine();
    const z = golden.get('vae.z'); // [16, F, H, W]
    const plane = z.data.length / 16;
    const zr = new Float32Array(z.data.length);
    for (let c = 0; c < 16; c++) {
      const inv = Math.fround(1 / cfg.latents_std[c]!);
      for (let i = 0; i < plane; i++) zr[c * plane + i] = Math.fround(z.data[c * plane + i]! / inv) + Math.fround(cfg.latents_mean[c]!);
    }
    const x = Tensor.cpu(zr, [1, ...z.shape], 'f32').toGpu(e);
    const y = conv3d({ x, w: t('post_quant_conv.weight').toGpu(e), b: t('post_quant_conv.bias').toGpu(e) }, { padding: [0, 0, 0, 0] });
    expectClose(await y.toArray(), gt('vae.post_quant_conv_out').hostValues(), { atol: 1e-4, rtol: 0 }, 'post_quant_conv');
  });
  it('decoder conv_in (3x3x3 causal)', async () => {
    const e = await getEngine();
    const x = gt('vae.post_quant_conv_out').toGpu(e);
    const y = conv3d({ x, w: t('decoder.conv_in.weight').toGpu(e), b: t('decoder.conv_in.bias').toGpu(e) }, { padding: [2, 0, 1, 1] });
    expectClose(await y.toArray(), gt('vae.decoder_conv_in_out').hostValues(), { atol: 1e-4, rtol: 0 }, 'conv_in');
  });
});

describe('conv: errors', () => {
  const x = Tensor.cpuZeros([1, 32, 3, 8, 8]);
  it('weight channels must match x', () => {
    expect(() => conv3d({ x, w: Tensor.cpuZeros([320, 16, 3, 3, 3]) }, { padding: [2, 0, 1, 1] })).toThrow(
      /\[conv3d\] weight \[320, 16, 3, 3, 3\] does not match input channels 32/,
    );
    expect(() => conv2d({ x: Tensor.cpuZeros([1, 32, 8, 8]), w: Tensor.cpuZeros([8, 16, 3, 3]) }, { padding: [1, 1] })).toThrow(
      /\[conv2d\] weight \[8, 16, 3, 3\] does not match input channels 32/,
    );
  });
  it('ranks, bias, padding, stride, kernel larger than the input', () => {
    expect(() => conv3d({ x: Tensor.cpuZeros([32, 3, 8, 8]), w: Tensor.cpuZeros([8, 32, 3, 3, 3]) }, { padding: [2, 0, 1, 1] })).toThrow(/\[conv3d\] x must have rank 5/);
    expect(() => conv3d({ x, w: Tensor.cpuZeros([8, 32, 3, 3, 3]), b: Tensor.cpuZeros([7]) }, { padding: [2, 0, 1, 1] })).toThrow(/\[conv3d\] bias \[7\] must be \[8\]/);
    expect(() => conv3d({ x, w: Tensor.cpuZeros([8, 32, 3, 3, 3]) }, { padding: [2, 0, 1] as unknown as Conv3dAttrs['padding'] })).toThrow(/\[conv3d\] padding must be 4 integers/);
    expect(() => conv3d({ x, w: Tensor.cpuZeros([8, 32, 3, 3, 3]) }, { padding: [2, 0, 1, 1], stride: [1, 0, 1] })).toThrow(/\[conv3d\] stride must be 3 integers >= 1/);
    expect(() => conv3d({ x, w: Tensor.cpuZeros([8, 32, 3, 3, 3]) }, { padding: [0, 0, 0, 0], stride: [1, 1, 1] }).shape).not.toThrow();
    expect(() => conv3d({ x: Tensor.cpuZeros([1, 32, 1, 8, 8]), w: Tensor.cpuZeros([8, 32, 3, 3, 3]) }, { padding: [0, 0, 1, 1] })).toThrow(
      /\[conv3d\] input frames 1 plus padding 0 is smaller than the kernel \(3\)/,
    );
    expect(() => conv3d({ x, w: Tensor.cpuZeros([8, 32, 3, 3, 3], 'i32') }, { padding: [2, 0, 1, 1] })).toThrow(/\[conv3d\] weight must be f32\/f16\/bf16/);
  });
});
