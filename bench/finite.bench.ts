// count_nonfinite bandwidth on the tensors the pipeline checks: the DiT output of one denoising step
// (the CFG pair of Wan 1.3B latents at 480x832x81), one VAE decode chunk's output at that size, and a
// bf16 weight of the 1.3B DiT (the size of a load-time scan). Inputs carry planted NaN/Inf so the
// validation (GPU count == CPU count) is not 0 == 0.
import { addBench, opBench, randn } from './harness.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import { countNonFiniteOp } from '../src/ops/finite.ts';
import { f32ToBf16Bits } from '../src/tensor/dtype.ts';

function withBad(v: Float32Array): Float32Array {
  for (let i = 17; i < v.length; i += 99991) v[i] = i % 2 ? NaN : -Infinity;
  return v;
}

const cases: Array<[string, number[], 'f32' | 'bf16']> = [
  ['wan1.3b DiT out (CFG pair)', [2, 16, 21, 60, 104], 'f32'],
  ['wan1.3b VAE chunk out', [1, 3, 4, 480, 832], 'f32'],
  ['wan1.3b ffn.net.0.proj.weight', [8960, 1536], 'bf16'],
];

for (const [name, shape, dtype] of cases) {
  const n = shape.reduce((a, b) => a * b, 1);
  addBench({
    kernel: 'nonfinite',
    name,
    shape: `[${shape.join(', ')}]`,
    dtype,
    async setup(e) {
      const v = withBad(randn(n, 7));
      const x = dtype === 'f32' ? Tensor.cpu(v, shape) : Tensor.cpu(Uint16Array.from(v, f32ToBf16Bits), shape, 'bf16');
      return opBench(e, 'count_nonfinite', countNonFiniteOp, { x }, undefined, 0);
    },
  });
}
