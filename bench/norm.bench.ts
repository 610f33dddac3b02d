// Norms, RoPE and layout permutes on Wan workload shapes (GB/s; the ops are memory-bound).
import { addBench, opBench, randn } from './harness.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import { layerNorm, rmsNorm, channelL2NormOp, type RowImpl } from '../src/ops/norm.ts';
import { ropeOp } from '../src/ops/rope.ts';
import { permuteOp } from '../src/ops/layout.ts';

// ---- LayerNorm (+ Wan modulation) and RMSNorm on DiT tokens ----
for (const [model, L, D] of [['wan1.3b', 4680, 1536], ['wan14b', 1560, 5120]] as const) {
  for (const impl of ['thread', 'wg'] as RowImpl[]) {
    addBench({
      kernel: 'layer_norm',
      name: `${model} norm1+mod (${impl})`,
      shape: `L${L} D${D}`,
      dtype: 'f32',
      async setup(e) {
        const x = Tensor.cpu(randn(L * D, 1), [L, D]);
        const shift = Tensor.cpu(randn(D, 2), [D]);
        const scale = Tensor.cpu(randn(D, 3, 0.1), [D]);
        return opBench(e, 'layer_norm', layerNorm, { x, shift, scale }, { eps: 1e-6, impl });
      },
    });
  }
  addBench({
    kernel: 'layer_norm',
    name: `${model} norm2 affine bf16 w`,
    shape: `L${L} D${D}`,
    dtype: 'f32',
    async setup(e) {
      const x = Tensor.cpu(randn(L * D, 4), [L, D]);
      const weight = Tensor.fromValues(randn(D, 5), [D], 'bf16');
      const bias = Tensor.fromValues(randn(D, 6), [D], 'bf16');
      return opBench(e, 'layer_norm affine', layerNorm, { x, weight, bias }, { eps: 1e-6 });
    },
  });
  addBench({
    kernel: 'rms_norm',
    name: `${model} q/k norm`,
    shape: `L${L} D${D}`,
    dtype: 'f32',
    async setup(e) {
      const x = Tensor.cpu(randn(L * D, 7), [L, D]);
      const weight = Tensor.cpu(randn(D, 8), [D]);
      return opBench(e, 'rms_norm', rmsNorm, { x, weight }, { eps: 1e-6 });
    },
  });
}

addBench({
  kernel: 'rms_norm',
  name: 'umt5-xxl layer norm',
  shape: 'L512 D4096',
  dtype: 'f32',
  async setup(e) {
    const x = Tensor.cpu(randn(512 * 4096, 9), [512, 4096]);
    const weight = Tensor.fromValues(randn(4096, 10), [4096], 'bf16');
    return opBench(e, 'rms_norm t5', rmsNorm, { x, weight }, { eps: 1e-6 });
  },
});

// ---- VAE channel L2 norm (RMS_norm) on a decoder stage, scaled down from [1, 384, 4, 60, 104] ----
{
  const shape = [1, 384, 2, 60, 104];
  const n = shape.reduce((a, b) => a * b, 1);
  addBench({
    kernel: 'channel_l2_norm',
    name: 'wan vae up-block (scaled)',
    shape: `[${shape.join(',')}]`,
    dtype: 'f32',
    async setup(e) {
      const x = Tensor.cpu(randn(n, 11), shape);
      const gamma = Tensor.cpu(randn(384, 12), [384, 1, 1, 1]);
      return opBench(e, 'channel_l2_norm', channelL2NormOp, { x, gamma }, undefined);
    },
  });
}

// ---- RoPE on self-attention q ----
{
  const [L, H, Dh] = [4680, 12, 128];
  const n = L * H * Dh;
  addBench({
    kernel: 'rope',
    name: 'wan1.3b attn1 q',
    shape: `[1,${L},${H},${Dh}]`,
    dtype: 'f32',
    async setup(e) {
      const x = Tensor.cpu(randn(n, 13), [1, L, H, Dh]);
      const ang = randn(L * (Dh / 2), 14, 3);
      const cos = Tensor.cpu(ang.map(Math.cos), [L, Dh / 2]);
      const sin = Tensor.cpu(ang.map(Math.sin), [L, Dh / 2]);
      return opBench(e, 'rope', ropeOp, { x, cos, sin }, undefined);
    },
  });
}

// ---- permutes: DiT patchify / unpatchify at 480p x 81 frames latents, head transpose ----
for (const [name, shape, dims] of [
  ['dit patchify [C,F,h,2,w,2]->[C,F,h,w,2,2]', [16, 21, 30, 2, 52, 2], [0, 1, 2, 4, 3, 5]],
  ['dit patchify [C,L,4]->[L,C,4]', [1, 16, 32760, 4], [0, 2, 1, 3]],
  ['dit unpatchify', [1, 630, 52, 2, 2, 16], [0, 5, 1, 3, 2, 4]],
  ['attn heads [L,H,Dh]->[H,L,Dh]', [4680, 12, 128], [1, 0, 2]],
  ['vae [B,C,T,H,W]->[B,T,C,H,W]', [1, 96, 4, 60, 104], [0, 2, 1, 3, 4]],
] as Array<[string, number[], number[]]>) {
  const n = shape.reduce((a, b) => a * b, 1);
  addBench({
    kernel: 'permute',
    name,
    shape: `[${shape.join(',')}]`,
    dtype: 'f32',
    async setup(e) {
      const x = Tensor.cpu(randn(n, 15), shape);
      return opBench(e, 'permute', permuteOp, { x }, { dims });
    },
  });
}
