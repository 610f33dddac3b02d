// Elementwise / modulation bandwidth on Wan 1.3B activation shapes.
import { addBench } from './harness.ts';
import { Rng } from '../src/util/rng.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import { modulate, gatedResidual } from '../src/ops/elementwise.ts';

function rand(n: number, seed: number): Float32Array {
  return new Rng(seed).fillNormal(new Float32Array(n));
}

for (const [name, L, D] of [['wan1.3b tokens', 4680, 1536]] as const) {
  addBench({
    kernel: 'modulate',
    name,
    shape: `L${L} D${D}`,
    dtype: 'f32',
    flops: L * D * 3,
    bytes: L * D * 8,
    async setup(e) {
      const x = e.fromHost(rand(L * D, 1), [L, D], 'f32');
      const sh = e.fromHost(rand(D, 2), [D], 'f32');
      const sc = e.fromHost(rand(D, 3), [D], 'f32');
      let y: Tensor | null = null;
      return {
        run() {
          y?.dispose();
          y = modulate({ x, shift: sh, scale: sc }, {});
        },
        async validate() {
          const out = modulate({ x, shift: sh, scale: sc }, {});
          const ref = modulate({ x: await x.toCpu(), shift: await sh.toCpu(), scale: await sc.toCpu() }, {});
          const a = await out.toArray();
          const b = ref.hostValues();
          for (let i = 0; i < a.length; i += 97) if (Math.abs(a[i]! - b[i]!) > 1e-5) throw new Error(`modulate mismatch at ${i}`);
          out.dispose();
        },
        dispose() {
          y?.dispose();
          x.dispose();
          sh.dispose();
          sc.dispose();
        },
      };
    },
  });
  addBench({
    kernel: 'gated_res',
    name,
    shape: `L${L} D${D}`,
    dtype: 'f32',
    flops: L * D * 2,
    bytes: L * D * 12,
    async setup(e) {
      const x = e.fromHost(rand(L * D, 1), [L, D], 'f32');
      const r = e.fromHost(rand(L * D, 4), [L, D], 'f32');
      const g = e.fromHost(rand(D, 3), [D], 'f32');
      let y: Tensor | null = null;
      return {
        run() {
          y?.dispose();
          y = gatedResidual({ x, r, gate: g }, {});
        },
        async validate() {
          const out = gatedResidual({ x, r, gate: g }, {});
          const ref = gatedResidual({ x: await x.toCpu(), r: await r.toCpu(), gate: await g.toCpu() }, {});
          const a = await out.toArray();
          const b = ref.hostValues();
          for (let i = 0; i < a.length; i += 97) if (Math.abs(a[i]! - b[i]!) > 1e-5) throw new Error(`gated_residual mismatch at ${i}`);
          out.dispose();
        },
        dispose() {
          y?.dispose();
          x.dispose();
          r.dispose();
          g.dispose();
        },
      };
    },
  });
}
