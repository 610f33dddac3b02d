// Elementwise / modulation bandwidth on Wan 1.3B activation shapes.
import { addBench, opBench, opWork, randn, type Work } from './harness.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import { modulate, gatedResidual, unary, type UnaryKind } from '../src/ops/elementwise.ts';
import type { ParamValues } from '../src/runtime/params.ts';
import { grid1d } from '../src/ops/registry.ts';

for (const [name, L, D] of [['wan1.3b tokens', 4680, 1536]] as const) {
  addBench({
    kernel: 'modulate',
    name,
    shape: `L${L} D${D}`,
    dtype: 'f32',
    async setup(e) {
      const x = Tensor.cpu(randn(L * D, 1), [L, D]);
      const shift = Tensor.cpu(randn(D, 2), [D]);
      const scale = Tensor.cpu(randn(D, 3), [D]);
      return opBench(e, 'modulate', modulate, { x, shift, scale }, {}, 1e-5);
    },
  });
  addBench({
    kernel: 'gated_res',
    name,
    shape: `L${L} D${D}`,
    dtype: 'f32',
    async setup(e) {
      const x = Tensor.cpu(randn(L * D, 1), [L, D]);
      const r = Tensor.cpu(randn(L * D, 4), [L, D]);
      const gate = Tensor.cpu(randn(D, 3), [D]);
      return opBench(e, 'gated_residual', gatedResidual, { x, r, gate }, {}, 1e-5);
    },
  });
}

// ---- unary ops, the bandwidth ceiling, and the pre-vec4 scalar kernels as the "before" baseline ----
// The scalar entries (one element per invocation, "(i / div) % mod" broadcast) are still in
// kernels/elementwise.wgsl as the fallback for odd shapes; dispatching them directly here gives
// before/after numbers in one run (docs/notes/norm-layout.md).

const WG = 256;

/** `work`: the registry's numbers for the op this kernel implemented, on the bound tensors */
function scalarBaseline(kernel: string, entry: string, L: number, D: number, layout: Array<'read' | 'write'>, params: (n: number) => ParamValues, work: (bufs: Tensor[]) => Work): void {
  addBench({
    kernel,
    name: `wan1.3b tokens (scalar, before)`,
    shape: `L${L} D${D}`,
    dtype: 'f32',
    async setup(e) {
      const n = L * D;
      const bufs = layout.map((k, i) => (k === 'write' ? e.empty([L, D], 'f32') : e.fromHost(randn(i === 0 || entry === 'gated_residual' ? n : D, 20 + i), [i === 0 || entry === 'gated_residual' ? n : D], 'f32')));
      const w = work(bufs);
      const run = () => {
        // a bare kernel, not an op: tell the wait predictor its work
        e.addWork(w.flops + w.bytes);
        e.dispatch({
          kernel: { family: 'elementwise', entry, constants: { WG }, aliases: { a_t: 'f32', b_t: 'f32', c_t: 'f32', y_t: 'f32' }, layout },
          name: `${entry}.scalar`,
          params: params(n),
          bindings: bufs,
          workgroups: grid1d(Math.ceil(n / WG)),
        });
      };
      return {
        work: w,
        run,
        async validate() {
          run();
          await e.sync();
        },
        dispose() {
          for (const b of bufs) b.dispose();
        },
      };
    },
  });
}

{
  const [L, D] = [4680, 1536];
  const n = L * D;
  scalarBaseline('modulate', 'modulate', L, D, ['read', 'read', 'read', 'write'], (m) => ({ n: m, b_div: 1, b_mod: D, c_div: 1, c_mod: D, alpha: 0, beta: 0, op: 0 }), ([x, shift, scale]) => opWork(modulate, { x: x!, shift: shift!, scale: scale! }, {}));
  scalarBaseline('gated_res', 'gated_residual', L, D, ['read', 'read', 'read', 'write'], (m) => ({ n: m, b_div: 1, b_mod: 1, c_div: 1, c_mod: D, alpha: 0, beta: 0, op: 0 }), ([x, r, gate]) => opWork(gatedResidual, { x: x!, r: r!, gate: gate! }, {}));
  scalarBaseline('unary', 'unary', L, D, ['read', 'write'], (m) => ({ n: m, b_div: 1, b_mod: 1, c_div: 1, c_mod: 1, alpha: 1, beta: 0, op: 0 }), ([x]) => opWork(unary, { x: x! }, { kind: 'copy' }));
  for (const kind of ['copy', 'silu', 'gelu'] as UnaryKind[]) {
    addBench({
      kernel: 'unary',
      name: `wan1.3b tokens ${kind}`,
      shape: `L${L} D${D}`,
      dtype: 'f32',
      async setup(e) {
        return opBench(e, `unary ${kind}`, unary, { x: Tensor.cpu(randn(n, 30), [L, D]) }, { kind }, 1e-5);
      },
    });
  }
  addBench({
    kernel: 'unary',
    name: 'memcpy ceiling (copyBufferToBuffer)',
    shape: `L${L} D${D}`,
    dtype: 'f32',
    flops: 0,
    bytes: n * 8,
    async setup(e) {
      const x = e.fromHost(randn(n, 31), [L, D], 'f32');
      const y = e.empty([L, D], 'f32');
      return {
        run: () => e.copyBuffer(x.buffer, x.byteOffset, y.buffer, y.byteOffset, n * 4),
        async validate() {
          e.copyBuffer(x.buffer, x.byteOffset, y.buffer, y.byteOffset, n * 4);
          const a = await y.toArray();
          const b = await x.toArray();
          for (let i = 0; i < a.length; i += 97) if (a[i] !== b[i]) throw new Error('memcpy mismatch');
        },
        dispose() {
          x.dispose();
          y.dispose();
        },
      };
    },
  });
}
