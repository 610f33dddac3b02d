// Ring attention's ops (src/ops/attention_lse.ts): attention_lse (the fused attention's kernels run
// without their final normalization, + lse_finish) against the fused `attention` on the same inputs
// ("ratio" = LSE GFLOP/s over fused GFLOP/s: the cost of also returning the LSE, ~1 expected), and
// attention_merge (elementwise, GB/s). Shapes: one ring pass of Wan 1.3B self-attention (12 heads
// of 128), a rank's queries against another rank's K/V chunk, scaled down like
// bench/attention.bench.ts so that a run takes a second or two on the 2-core lavapipe machine.
// Validated before timing: the LSE op against its CPU twin on sampled rows (output and LSE), the
// merge against its CPU twin.
//
//   npm run bench -- --filter attention_lse
import { addBench, opWork, randn, type BenchInstance, type PeerInstance } from './harness.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import type { Engine } from '../src/runtime/engine.ts';
import type { DType } from '../src/tensor/dtype.ts';
import { attention } from '../src/ops/attention.ts';
import { attentionLse, attentionMerge } from '../src/ops/attention_lse.ts';
import { attentionLseHost, attentionMergeHost } from '../src/ops/cpu/attention_lse.ts';

interface Case {
  name: string;
  B: number;
  Lq: number;
  Lk: number;
  H: number;
  Dh: number;
  dtype: DType;
  real: string;
}

const CASES: Case[] = [
  { name: 'wan1.3b ring pass', B: 1, Lq: 512, Lk: 512, H: 12, Dh: 128, dtype: 'f32', real: 'N=2 at 480p: Lq = Lk = 16380 per rank, B = 2' },
  { name: 'wan1.3b ring pass', B: 1, Lq: 512, Lk: 512, H: 12, Dh: 128, dtype: 'f16', real: 'N=2 at 480p' },
  { name: 'wan1.3b ring pass', B: 2, Lq: 342, Lk: 341, H: 12, Dh: 128, dtype: 'f32', real: 'N=3: Lr = 10920, B = 2' },
];

function gpuInputs(e: Engine, c: Case) {
  const q = randn(c.B * c.Lq * c.H * c.Dh, 1, 1);
  const k = randn(c.B * c.Lk * c.H * c.Dh, 2, 1);
  const v = randn(c.B * c.Lk * c.H * c.Dh, 3, 1);
  return {
    host: { q, k, v },
    t: {
      q: Tensor.fromValues(q, [c.B, c.Lq, c.H, c.Dh], c.dtype).toGpu(e),
      k: Tensor.fromValues(k, [c.B, c.Lk, c.H, c.Dh], c.dtype).toGpu(e),
      v: Tensor.fromValues(v, [c.B, c.Lk, c.H, c.Dh], c.dtype).toGpu(e),
    },
  };
}

for (const c of CASES) {
  const scale = 1 / Math.sqrt(c.Dh);
  addBench({
    kernel: 'attention_lse',
    name: c.name,
    shape: `B${c.B} Lq${c.Lq} Lk${c.Lk} H${c.H} Dh${c.Dh}`,
    dtype: c.dtype,
    async setup(e: Engine): Promise<BenchInstance> {
      if (c.dtype === 'f16' && !e.caps.shaderF16) throw new Error('bench: adapter lacks shader-f16');
      const { host, t } = gpuInputs(e, c);
      let y: Tensor | null = null;
      return {
        work: opWork(attentionLse, t, { scale }),
        run() {
          y?.dispose();
          y = attentionLse(t, { scale });
        },
        async validate() {
          const r = attentionLse(t, { scale });
          const got = (await r.toFloat32()) as Float32Array;
          r.dispose();
          // the CPU twin on the first query row of each batch (the inputs as the GPU sees them)
          const W = c.Dh + 1;
          const round = (x: Float32Array) => (c.dtype === 'f16' ? (Tensor.fromValues(x, [x.length], 'f16').hostValues() as Float32Array) : x);
          const [qv, kv, vv] = [round(host.q), round(host.k), round(host.v)];
          const tol = c.dtype === 'f16' ? 1e-3 : 1e-4;
          for (let b = 0; b < c.B; b++) {
            const q1 = qv.subarray(b * c.Lq * c.H * c.Dh, (b * c.Lq + 1) * c.H * c.Dh);
            const kb = kv.subarray(b * c.Lk * c.H * c.Dh, (b + 1) * c.Lk * c.H * c.Dh);
            const vb = vv.subarray(b * c.Lk * c.H * c.Dh, (b + 1) * c.Lk * c.H * c.Dh);
            const want = attentionLseHost(q1, kb, vb, { B: 1, Lq: 1, Lk: c.Lk, H: c.H, Dh: c.Dh }, scale);
            for (let x = 0; x < c.H * W; x++) {
              const g = got[b * c.Lq * c.H * W + x]!;
              if (!(Math.abs(g - want[x]!) <= tol * (1 + Math.abs(want[x]!)))) throw new Error(`attention_lse ${c.name}: b${b} element ${x}: got ${g}, want ${want[x]}`);
            }
          }
        },
        dispose() {
          y?.dispose();
          for (const x of Object.values(t)) x.dispose();
        },
      };
    },
    peer: {
      name: `fused attention (${c.dtype})`,
      async setup(e: Engine): Promise<PeerInstance> {
        const { t } = gpuInputs(e, c);
        let y: Tensor | null = null;
        return {
          async run() {
            y?.dispose();
            y = attention(t, { scale });
            await e.sync();
          },
          dispose() {
            y?.dispose();
            for (const x of Object.values(t)) x.dispose();
          },
        };
      },
    },
  });
}

// the merge of two partials of one ring pass (1024 rows x 12 heads x (128 + 1) f32, and the final f32 output)
for (const final of [false, true]) {
  const B = 1;
  const L = 1024;
  const H = 12;
  const Dh = 128;
  addBench({
    kernel: 'attention_lse',
    name: `wan1.3b ring merge${final ? ' (final)' : ''}`,
    shape: `B${B} L${L} H${H} Dh${Dh}`,
    dtype: 'f32',
    async setup(e: Engine): Promise<BenchInstance> {
      const mk = (seed: number) => {
        const x = randn(B * L * H * (Dh + 1), seed, 1);
        for (let s = 0; s < B * L * H; s++) x[s * (Dh + 1) + Dh] = 3 * x[s * (Dh + 1) + Dh]! + 6; // LSEs around 6 ± 3
        return x;
      };
      const ah = mk(7);
      const bh = mk(8);
      const a = e.fromHost(ah, [B, L, H, Dh + 1], 'f32');
      const b = e.fromHost(bh, [B, L, H, Dh + 1], 'f32');
      const attrs = { final };
      let y: Tensor | null = null;
      return {
        work: opWork(attentionMerge, { a, b }, attrs),
        run() {
          y?.dispose();
          y = attentionMerge({ a, b }, attrs);
        },
        async validate() {
          const r = attentionMerge({ a, b }, attrs);
          const got = (await r.toFloat32()) as Float32Array;
          r.dispose();
          const want = attentionMergeHost(ah, bh, Dh, final);
          for (let i = 0; i < want.length; i += 7) {
            if (!(Math.abs(got[i]! - want[i]!) <= 1e-5 * (1 + Math.abs(want[i]!)))) throw new Error(`attention_merge: element ${i}: got ${got[i]}, want ${want[i]}`);
          }
        },
        dispose() {
          y?.dispose();
          a.dispose();
          b.dispose();
        },
      };
    },
  });
}

// ---------------------------------------------------------------- side by side
// `npx tsx bench/ring.bench.ts --rr [ROUNDS]`: on Wan 1.3B's ring-pass shape (B1 Lq512 Lk512 H12
// Dh128 f32), the fused attention, the LSE attention, the merge and the final merge alternated run by
// run in one process (the shared machine's load moves; back-to-back tinybench blocks see different
// loads); medians, after a warm-up round.
async function sideBySide(rounds: number): Promise<void> {
  const { Engine } = await import('../src/runtime/engine.ts');
  const e = await Engine.create({ waitMode: 'await' });
  try {
    const [B, L, H, Dh] = [1, 512, 12, 128];
    const mk = (seed: number) => e.fromHost(randn(B * L * H * Dh, seed, 1), [B, L, H, Dh], 'f32');
    const [q, k, v] = [mk(1), mk(2), mk(3)];
    const scale = 1 / Math.sqrt(Dh);
    const p1 = attentionLse({ q, k, v }, { scale });
    const p2 = attentionLse({ q, k: v, v: k }, { scale });
    const part = B * L * H * (Dh + 1) * 4;
    const runs: Array<[string, () => Tensor, string]> = [
      ['fused attention', () => attention({ q, k, v }, { scale }), 'flops'],
      ['attention_lse', () => attentionLse({ q, k, v }, { scale }), 'flops'],
      ['attention_merge', () => attentionMerge({ a: p1, b: p2 }, undefined), `${3 * part}`],
      ['attention_merge final', () => attentionMerge({ a: p1, b: p2 }, { final: true }), `${2 * part + B * L * H * Dh * 4}`],
    ];
    const t = runs.map(() => [] as number[]);
    for (let r = -1; r < rounds; r++) {
      for (const [i, [, f]] of runs.entries()) {
        const t0 = performance.now();
        const y = f();
        await e.sync();
        if (r >= 0) t[i]!.push(performance.now() - t0);
        y.dispose();
      }
    }
    const med = (a: number[]) => [...a].sort((x, y) => x - y)[a.length >> 1]!;
    console.log(`adapter: ${e.adapterName}; B${B} Lq${L} Lk${L} H${H} Dh${Dh} f32, ${rounds} rounds alternated`);
    for (const [i, [name, , work]] of runs.entries()) {
      const m = med(t[i]!);
      const rate = work === 'flops' ? `${((4 * B * H * L * L * Dh) / m / 1e6).toFixed(2)} GFLOP/s` : `${(Number(work) / m / 1e6).toFixed(3)} GB/s`;
      console.log(`${name.padEnd(24)} ${m.toFixed(1).padStart(8)} ms  ${rate}`);
    }
    for (const x of [q, k, v, p1, p2]) x.dispose();
  } finally {
    e.destroy();
  }
}

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split('/').pop()!) && process.argv.includes('--rr')) {
  const i = process.argv.indexOf('--rr');
  sideBySide(Number(process.argv[i + 1] ?? 9) || 9).catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
