// Linear layers of the real models (weights [N, K], PyTorch layout), ours vs tfjs-backend-webgpu
// (`tf.matMul(x, w, false, true)`) on the same Dawn device.
//
// Token counts L are scaled down from the real workloads (a 480p x 81-frame Wan video has 32760
// tokens) so that one run of our kernel takes about a second on the 2-core lavapipe machine; the
// shape string names the L used. Weights: bf16 as in the checkpoints (ours only: tfjs has no
// bf16) and f32 (ours and the peer, same shapes). Each case is validated before timing: a few
// output rows against the CPU reference (src/ops/matmul.ts), and the peer against the same rows.
import { addBench, opWork, randn, type BenchInstance, type PeerInstance } from './harness.ts';
import { tfjsOn, tfSync } from './peers/tfjs.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import type { Engine } from '../src/runtime/engine.ts';
import type { DType } from '../src/tensor/dtype.ts';
import { WaitPredictor } from '../src/device/wait.ts';
import { linear, linearOp } from '../src/ops/matmul.ts';
import { cpuGemm } from '../src/ops/cpu/pool.ts';

interface Shape {
  name: string;
  L: number;
  K: number;
  N: number;
  /** real token count, for the notes */
  real: string;
}

const SHAPES: Shape[] = [
  { name: 'wan1.3b attn1.to_q/k/v/o', L: 1024, K: 1536, N: 1536, real: 'L=32760 (480p, 81 frames)' },
  { name: 'wan1.3b ffn.net.0.proj', L: 256, K: 1536, N: 8960, real: 'L=32760' },
  { name: 'wan1.3b ffn.net.2', L: 256, K: 8960, N: 1536, real: 'L=32760' },
  { name: 'wan1.3b attn2.to_k/v (text)', L: 512, K: 1536, N: 1536, real: 'L=512 (text tokens)' },
  { name: 'wan14b attn1.to_q/k/v/o', L: 128, K: 5120, N: 5120, real: 'L=75600 (720p, 81 frames)' },
  { name: 'wan14b ffn.net.0.proj', L: 128, K: 5120, N: 13824, real: 'L=75600' },
  { name: 'wan14b ffn.net.2', L: 128, K: 13824, N: 5120, real: 'L=75600' },
  { name: 'umt5-xxl DenseReluDense.wi', L: 128, K: 4096, N: 10240, real: 'L=512' },
  { name: 'umt5-xxl DenseReluDense.wo', L: 128, K: 10240, N: 4096, real: 'L=512' },
];

/** rows of x checked against the CPU reference before timing */
function sampleRows(L: number): number[] {
  return [...new Set([0, 1, Math.floor(L / 2), L - 2, L - 1].filter((r) => r >= 0 && r < L))];
}

/** CPU reference for the sampled rows: y[r, :] for r in rows */
function reference(xv: Float32Array, w: Tensor, K: number, rows: number[]): Float32Array {
  const xs = new Float32Array(rows.length * K);
  rows.forEach((r, i) => xs.set(xv.subarray(r * K, r * K + K), i * K));
  // the plain loop, not the CPU device's fast path (which the matmul-cpu cases measure)
  return linearOp.def.cpu({ x: Tensor.cpu(xs, [rows.length, K], 'f32'), w }, { referenceLoop: true } as never).hostValues() as Float32Array;
}

function checkRows(what: string, got: Float32Array, N: number, rows: number[], ref: Float32Array, K: number): void {
  // f32 accumulation over K terms (inputs ~N(0,1), weights ~N(0,1/K)): |err| ~ 6e-8 * sqrt(K)
  const tol = 1e-4 * Math.sqrt(K);
  rows.forEach((r, i) => {
    for (let n = 0; n < N; n++) {
      const a = got[r * N + n]!;
      const b = ref[i * N + n]!;
      if (!(Math.abs(a - b) <= tol * (1 + Math.abs(b)))) throw new Error(`${what}: row ${r} col ${n}: got ${a}, want ${b}`);
    }
  });
}

/**
 * The first run of a new pipeline compiles it (seconds on lavapipe); the engine's wait predictor
 * would learn that stall as kernel time and then over-sleep in the timed runs. Start it afresh.
 */
function forgetCompileStall(e: Engine): void {
  Object.assign(e.predictor, new WaitPredictor());
}

for (const s of SHAPES) {
  for (const wdt of ['bf16', 'f32'] as DType[]) {
    const setupOurs = async (e: Engine): Promise<BenchInstance> => {
      const xv = randn(s.L * s.K, 1, 1);
      const wv = randn(s.N * s.K, 2, 1 / Math.sqrt(s.K));
      const wCpu = Tensor.fromValues(wv, [s.N, s.K], wdt);
      const x = e.fromHost(xv, [s.L, s.K], 'f32');
      const w = wCpu.toGpu(e);
      let y: Tensor | null = null;
      return {
        work: opWork(linearOp, { x, w }, {}),
        run() {
          y?.dispose();
          y = linear(x, w);
        },
        async validate() {
          const out = linear(x, w);
          const got = (await out.toArray()) as Float32Array;
          out.dispose();
          const rows = sampleRows(s.L);
          checkRows(`matmul ${s.name} ${wdt}`, got, s.N, rows, reference(xv, wCpu, s.K, rows), s.K);
          forgetCompileStall(e);
        },
        dispose() {
          y?.dispose();
          x.dispose();
          w.dispose();
        },
      };
    };
    const peer =
      wdt === 'f32'
        ? {
            name: s.N * s.K * 4 > 128 * 2 ** 20 ? 'tfjs-webgpu (w split in 2-3 matMuls + concat)' : 'tfjs-webgpu',
            async setup(e: Engine): Promise<PeerInstance> {
              const tf = await tfjsOn(e);
              const xv = randn(s.L * s.K, 1, 1);
              const wv = randn(s.N * s.K, 2, 1 / Math.sqrt(s.K));
              const tx = tf.tensor(xv, [s.L, s.K]);
              // tfjs binds a weight as one storage buffer: one above the adapter's binding limit
              // (the 14B FFN and UMT5 f32 weights, 168-283 MB) fails validation, so it gets the
              // weight in row blocks that fit and concatenates the products (named in the row)
              const parts = Math.ceil((s.N * s.K * 4) / e.caps.maxBinding);
              const step = Math.ceil(s.N / parts);
              const tws: Array<{ dispose(): void }> = [];
              for (let n0 = 0; n0 < s.N; n0 += step) {
                const n1 = Math.min(s.N, n0 + step);
                tws.push(tf.tensor(wv.subarray(n0 * s.K, n1 * s.K), [n1 - n0, s.K]));
              }
              const product = () => {
                if (tws.length === 1) return tf.matMul(tx, tws[0], false, true);
                const outs = tws.map((t) => tf.matMul(tx, t, false, true));
                const r = tf.concat(outs, 1);
                for (const o of outs) o.dispose();
                return r;
              };
              let r: { dispose(): void } | null = null;
              const key = `matmul ${s.name}`;
              const sync = async () => {
                // tfjs keeps its compute pass open between ops: end it so submitQueue() can finish
                // the encoder (bench/peers/tfjs.ts tfSync alone fails with "pass not ended")
                const b = tf.backend() as { ensureCommandEncoderReady(): void; endComputePassEncoder(): void };
                b.ensureCommandEncoderReady();
                b.endComputePassEncoder();
                await tfSync(tf, e, key);
              };
              return {
                async run() {
                  r?.dispose();
                  r = product();
                  await sync();
                },
                async validate() {
                  const out = product();
                  const got = (await out.data()) as Float32Array;
                  out.dispose();
                  const rows = sampleRows(s.L);
                  const wCpu = Tensor.cpu(wv, [s.N, s.K], 'f32');
                  checkRows(`tfjs ${s.name}`, got, s.N, rows, reference(xv, wCpu, s.K, rows), s.K);
                  await sync();
                },
                dispose() {
                  r?.dispose();
                  tx.dispose();
                  for (const t of tws) t.dispose();
                },
              };
            },
          }
        : undefined;
    addBench({
      kernel: 'matmul',
      name: s.name,
      shape: `L${s.L} K${s.K} N${s.N}`,
      dtype: `x f32, w ${wdt}`,
      setup: setupOurs,
      peer,
    });
  }
}

// The CPU device's GEMM (src/ops/cpu/pool.ts: worker threads, bf16 weights read in place from a
// SharedArrayBuffer, as the text encoder at memory level 2+ holds them) on UMT5-XXL's layers at a
// prompt's length (41 tokens: the bench:memory prompt). The "peer" column is the same product by
// our WebGPU kernel on the engine's adapter (lavapipe here: the same two cores), which is what
// level 0's text encoder runs.
const CPU_SHAPES: Shape[] = [
  { name: 'umt5-xxl SelfAttention.q/k/v/o (CPU device)', L: 41, K: 4096, N: 4096, real: 'a 41-token prompt' },
  { name: 'umt5-xxl DenseReluDense.wi (CPU device)', L: 41, K: 4096, N: 10240, real: 'a 41-token prompt' },
  { name: 'umt5-xxl DenseReluDense.wo (CPU device)', L: 41, K: 10240, N: 4096, real: 'a 41-token prompt' },
];
for (const s of CPU_SHAPES) {
  const xv = () => randn(s.L * s.K, 1, 1);
  const wBf16 = () => Tensor.fromValues(randn(s.N * s.K, 2, 1 / Math.sqrt(s.K)), [s.N, s.K], 'bf16');
  addBench({
    kernel: 'matmul-cpu',
    name: s.name,
    shape: `L${s.L} K${s.K} N${s.N}`,
    dtype: 'x f32, w bf16',
    async setup(): Promise<BenchInstance> {
      const x = xv();
      const w = wBf16();
      const raw = w.data as Uint16Array;
      const ws = new Uint16Array(new SharedArrayBuffer(raw.byteLength));
      ws.set(raw);
      return {
        // the linear op's numbers: cpuGemm is what linear runs on CPU tensors
        work: opWork(linearOp, { x: Tensor.cpu(x, [s.L, s.K], 'f32'), w }, {}),
        run() {
          cpuGemm(x, ws, 2, null, s.L, s.K, s.N);
        },
        async validate() {
          const got = cpuGemm(x, ws, 2, null, s.L, s.K, s.N);
          const rows = sampleRows(s.L);
          checkRows(`cpu gemm ${s.name}`, got, s.N, rows, reference(x, w, s.K, rows), s.K);
        },
        dispose() {},
      };
    },
    peer: {
      name: 'ours on the WebGPU adapter',
      async setup(e: Engine): Promise<PeerInstance> {
        const x = e.fromHost(xv(), [s.L, s.K], 'f32');
        const w = wBf16().toGpu(e);
        let y: Tensor | null = null;
        return {
          async run() {
            y?.dispose();
            y = linear(x, w);
            await e.sync();
          },
          dispose() {
            y?.dispose();
            x.dispose();
            w.dispose();
          },
        };
      },
    },
  });
}
