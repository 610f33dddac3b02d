// Fused attention (src/ops/attention.ts) on the real models' head shapes, against the unfused
// path done as separate ops: scores = q·kᵀ (matmul, transB), + bias (binary add), softmax, P·v
// (matmul), all batched over (batch, head). The unfused inputs are given already in the
// [B*H, L, Dh] layout the matmuls need (the permutes a model would also need are not timed), and
// its scale is folded into q (an `affine`, timed). The report's "ratio" column is fused GFLOP/s
// over unfused GFLOP/s on the same shapes in the same run (> 1: the fused kernel is faster).
//
// Token counts are scaled down from the real workloads so that one fused run takes a second or
// two on the 2-core lavapipe machine (the shape string names what is run; `real` what the model
// does). FLOPs and bytes are the op registry's for the fused call (4 * B * H * Lq * Lk * Dh flops),
// used for both paths.
import { addBench, opWork, randn, type BenchInstance, type PeerInstance } from './harness.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import type { Engine } from '../src/runtime/engine.ts';
import type { DType } from '../src/tensor/dtype.ts';
import { WaitPredictor } from '../src/device/wait.ts';
import { attention, attentionKernel, type BiasMode } from '../src/ops/attention.ts';
import { softmax, softmaxOp } from '../src/ops/softmax.ts';
import { matmul } from '../src/ops/matmul.ts';
import { affine, add } from '../src/ops/elementwise.ts';
import { sageAttention, sagePv } from '../src/ops/attention_sage.ts';
import { attentionAccuracy } from '../src/ops/cpu/attention_sage.ts';

interface Case {
  name: string;
  B: number;
  Lq: number;
  Lk: number;
  H: number;
  Dh: number;
  scale: number;
  bias?: BiasMode;
  /** mask the last `maskTail` keys (T5 padding) */
  maskTail?: number;
  dtype: DType;
  real: string;
}

const CASES: Case[] = [
  { name: 'wan1.3b self-attn', B: 1, Lq: 512, Lk: 512, H: 12, Dh: 128, scale: 1 / Math.sqrt(128), dtype: 'f32', real: 'L=32760 (480p, 81 frames)' },
  { name: 'wan1.3b self-attn', B: 1, Lq: 512, Lk: 512, H: 12, Dh: 128, scale: 1 / Math.sqrt(128), dtype: 'f16', real: 'L=32760' },
  { name: 'wan1.3b cross-attn', B: 1, Lq: 768, Lk: 512, H: 12, Dh: 128, scale: 1 / Math.sqrt(128), dtype: 'f32', real: 'Lq=32760 video, Lk=512 text' },
  { name: 'wan14b self-attn', B: 1, Lq: 256, Lk: 256, H: 40, Dh: 128, scale: 1 / Math.sqrt(128), dtype: 'f32', real: 'L=75600 (720p, 81 frames)' },
  { name: 'umt5-xxl self-attn', B: 1, Lq: 512, Lk: 512, H: 64, Dh: 64, scale: 1, bias: 'relative', maskTail: 100, dtype: 'f32', real: 'L=512 (as run)' },
  { name: 'wan vae mid attn', B: 1, Lq: 1024, Lk: 1024, H: 1, Dh: 384, scale: 1 / Math.sqrt(384), dtype: 'f32', real: 'L=6240 per frame (480p), 21 frames' },
];

/** what both paths get: host data, and the T5 bias expanded to [H, Lq, Lk] for the unfused path */
function inputs(c: Case) {
  const qStd = c.scale === 1 ? 0.125 : 1; // T5 runs unscaled: keep its softmax non-degenerate
  const q = randn(c.B * c.Lq * c.H * c.Dh, 1, qStd);
  const k = randn(c.B * c.Lk * c.H * c.Dh, 2, 1);
  const v = randn(c.B * c.Lk * c.H * c.Dh, 3, 1);
  const rel = c.bias === 'relative' ? randn(c.H * (c.Lq + c.Lk - 1), 4, 1) : null;
  const mask = c.maskTail ? Int32Array.from({ length: c.B * c.Lk }, (_, i) => (i % c.Lk < c.Lk - c.maskTail! ? 1 : 0)) : null;
  // unfused: relative bias and mask folded into one additive [H, Lq, Lk] table (computed once per
  // layer, as T5 implementations do), masked keys at -1e9
  let full: Float32Array | null = null;
  if (rel || mask) {
    if (c.B !== 1) throw new Error('bench: the folded bias assumes B = 1');
    full = new Float32Array(c.H * c.Lq * c.Lk);
    for (let h = 0; h < c.H; h++)
      for (let i = 0; i < c.Lq; i++)
        for (let j = 0; j < c.Lk; j++) {
          const b = rel ? rel[h * (c.Lq + c.Lk - 1) + j - i + c.Lq - 1]! : 0;
          full[(h * c.Lq + i) * c.Lk + j] = mask && mask[j] === 0 ? -1e9 : b;
        }
  }
  return { q, k, v, rel, mask, full };
}

/** [B, L, H, Dh] -> [B*H, L, Dh] on the host (the unfused path's layout) */
function headsFirst(x: Float32Array, B: number, L: number, H: number, Dh: number): Float32Array {
  const y = new Float32Array(x.length);
  for (let b = 0; b < B; b++)
    for (let l = 0; l < L; l++)
      for (let h = 0; h < H; h++) y.set(x.subarray(((b * L + l) * H + h) * Dh, ((b * L + l) * H + h + 1) * Dh), ((b * H + h) * L + l) * Dh);
  return y;
}

/** exact attention for a few (b, i, h) rows, f64 */
function referenceRows(c: Case, d: ReturnType<typeof inputs>, rows: Array<[number, number, number]>): Float64Array[] {
  return rows.map(([b, i, h]) => {
    const s = new Float64Array(c.Lk);
    let m = -Infinity;
    for (let j = 0; j < c.Lk; j++) {
      if (d.mask && d.mask[b * c.Lk + j] === 0) {
        s[j] = -Infinity;
        continue;
      }
      let dot = 0;
      for (let x = 0; x < c.Dh; x++) dot += d.q[((b * c.Lq + i) * c.H + h) * c.Dh + x]! * d.k[((b * c.Lk + j) * c.H + h) * c.Dh + x]!;
      s[j] = dot * c.scale + (d.rel ? d.rel[h * (c.Lq + c.Lk - 1) + j - i + c.Lq - 1]! : 0);
      m = Math.max(m, s[j]!);
    }
    const o = new Float64Array(c.Dh);
    let sum = 0;
    for (let j = 0; j < c.Lk; j++) {
      if (s[j] === -Infinity) continue;
      const p = Math.exp(s[j]! - m);
      sum += p;
      for (let x = 0; x < c.Dh; x++) o[x] += p * d.v[((b * c.Lk + j) * c.H + h) * c.Dh + x]!;
    }
    return o.map((x) => x / sum);
  });
}

function sampleRows(c: Case): Array<[number, number, number]> {
  const r: Array<[number, number, number]> = [];
  for (const i of [0, Math.floor(c.Lq / 2), c.Lq - 1]) for (const h of [0, c.H - 1]) r.push([c.B - 1, i, h]);
  return r;
}

function check(what: string, c: Case, got: Float32Array, at: (b: number, i: number, h: number, x: number) => number, ref: Float64Array[]) {
  const tol = c.dtype === 'f16' ? 5e-3 : 1e-4;
  sampleRows(c).forEach(([b, i, h], r) => {
    for (let x = 0; x < c.Dh; x++) {
      const a = got[at(b, i, h, x)]!;
      const want = ref[r]![x]!;
      if (!(Math.abs(a - want) <= tol * (1 + Math.abs(want)))) throw new Error(`${what}: (b${b}, i${i}, h${h}, ${x}) got ${a}, want ${want}`);
    }
  });
}

/** The first run of a new pipeline includes its JIT compile; don't let the wait predictor learn it. */
function forgetCompileStall(e: Engine): void {
  Object.assign(e.predictor, new WaitPredictor());
}

for (const c of CASES) {
  const fusedIdx = (b: number, i: number, h: number, x: number) => ((b * c.Lq + i) * c.H + h) * c.Dh + x;
  const unfusedIdx = (b: number, i: number, h: number, x: number) => ((b * c.H + h) * c.Lq + i) * c.Dh + x;

  const setup = async (e: Engine): Promise<BenchInstance> => {
    if (c.dtype === 'f16' && !e.caps.shaderF16) throw new Error('bench: adapter lacks shader-f16');
    const d = inputs(c);
    const q = Tensor.fromValues(d.q, [c.B, c.Lq, c.H, c.Dh], c.dtype).toGpu(e);
    const k = Tensor.fromValues(d.k, [c.B, c.Lk, c.H, c.Dh], c.dtype).toGpu(e);
    const v = Tensor.fromValues(d.v, [c.B, c.Lk, c.H, c.Dh], c.dtype).toGpu(e);
    const bias = d.rel ? e.fromHost(d.rel, [c.H, c.Lq + c.Lk - 1], 'f32') : undefined;
    const keyMask = d.mask ? e.fromHost(d.mask, [c.B, c.Lk], 'i32') : undefined;
    const attrs = { scale: c.scale, biasMode: c.bias };
    let y: Tensor | null = null;
    return {
      work: opWork(attention, { q, k, v, bias, keyMask }, attrs),
      run() {
        y?.dispose();
        y = attention({ q, k, v, bias, keyMask }, attrs);
      },
      async validate() {
        const out = attention({ q, k, v, bias, keyMask }, attrs);
        const got = (await out.toFloat32()) as Float32Array;
        out.dispose();
        check(`attention ${c.name} (${attentionKernel(e, c.Dh)} kernel)`, c, got, fusedIdx, referenceRows(c, d, sampleRows(c)));
        forgetCompileStall(e);
      },
      dispose() {
        y?.dispose();
        for (const t of [q, k, v, bias, keyMask]) t?.dispose();
      },
    };
  };

  const peer = {
    name: 'unfused matmul+softmax+matmul',
    async setup(e: Engine): Promise<PeerInstance> {
      const d = inputs(c);
      const q = Tensor.fromValues(headsFirst(d.q, c.B, c.Lq, c.H, c.Dh), [c.B * c.H, c.Lq, c.Dh], c.dtype).toGpu(e);
      const k = Tensor.fromValues(headsFirst(d.k, c.B, c.Lk, c.H, c.Dh), [c.B * c.H, c.Lk, c.Dh], c.dtype).toGpu(e);
      const v = Tensor.fromValues(headsFirst(d.v, c.B, c.Lk, c.H, c.Dh), [c.B * c.H, c.Lk, c.Dh], c.dtype).toGpu(e);
      const full = d.full ? e.fromHost(d.full, [c.B * c.H, c.Lq, c.Lk], 'f32') : null;
      const encode = () =>
        e.scope(() => {
          let s = matmul(affine(q, c.scale), k, { transB: true, out: 'f32' }); // [B*H, Lq, Lk]
          if (full) s = add(s, full);
          const p = softmax(s, { out: c.dtype });
          return matmul(p, v); // [B*H, Lq, Dh]
        });
      let y: Tensor | null = null;
      return {
        async run() {
          y?.dispose();
          y = encode();
          await e.sync();
        },
        async validate() {
          const out = encode();
          const got = (await out.toFloat32()) as Float32Array;
          out.dispose();
          check(`unfused ${c.name}`, c, got, unfusedIdx, referenceRows(c, d, sampleRows(c)));
          forgetCompileStall(e);
        },
        dispose() {
          y?.dispose();
          for (const t of [q, k, v, full]) t?.dispose();
        },
      };
    },
  };

  addBench({
    kernel: 'attention',
    name: c.name,
    shape: `B${c.B} Lq${c.Lq} Lk${c.Lk} H${c.H} Dh${c.Dh}${c.bias ? ` ${c.bias}` : ''}${c.maskTail ? ' mask' : ''}`,
    dtype: c.dtype,
    setup,
    peer,
  });
}

// ---------------------------------------------------------------- quantized (sage) attention
// infer.attention=sage (src/ops/attention_sage.ts: smoothed K, int8 Q/K per 64 rows, dot4I8Packed,
// f32 online softmax, P·V in f16 with shader-f16) against our fused exact attention on the same
// inputs, dtype and shapes: "ratio" = sage GFLOP/s over fused GFLOP/s (> 1: sage is faster). Both
// are charged the exact op's 4·B·H·Lq·Lk·Dh flops. validate() prints the accuracy of the sage
// output against the fused f32 output (cosine, relative L1) and fails below 0.999 / above 0.03.
const SAGE_CASES: Case[] = [
  { name: 'wan1.3b self-attn', B: 1, Lq: 512, Lk: 512, H: 12, Dh: 128, scale: 1 / Math.sqrt(128), dtype: 'f32', real: 'L=32760' },
  { name: 'wan1.3b self-attn', B: 1, Lq: 512, Lk: 512, H: 12, Dh: 128, scale: 1 / Math.sqrt(128), dtype: 'f16', real: 'L=32760' },
  { name: 'wan1.3b self-attn', B: 1, Lq: 2048, Lk: 2048, H: 12, Dh: 128, scale: 1 / Math.sqrt(128), dtype: 'f32', real: 'L=32760' },
  { name: 'wan14b self-attn', B: 1, Lq: 256, Lk: 256, H: 40, Dh: 128, scale: 1 / Math.sqrt(128), dtype: 'f32', real: 'L=32760 / 75600' },
  { name: 'wan14b self-attn', B: 1, Lq: 256, Lk: 256, H: 40, Dh: 128, scale: 1 / Math.sqrt(128), dtype: 'f16', real: 'L=32760 / 75600' },
  { name: 'wan vae mid attn', B: 1, Lq: 1024, Lk: 1024, H: 1, Dh: 384, scale: 1 / Math.sqrt(384), dtype: 'f32', real: 'L=6240 per frame (480p)' },
];

for (const c of SAGE_CASES) {
  const gpuInputs = (e: Engine) => {
    const d = inputs(c);
    return {
      q: Tensor.fromValues(d.q, [c.B, c.Lq, c.H, c.Dh], c.dtype).toGpu(e),
      k: Tensor.fromValues(d.k, [c.B, c.Lk, c.H, c.Dh], c.dtype).toGpu(e),
      v: Tensor.fromValues(d.v, [c.B, c.Lk, c.H, c.Dh], c.dtype).toGpu(e),
    };
  };
  addBench({
    kernel: 'attention',
    name: `${c.name} sage`,
    shape: `B${c.B} Lq${c.Lq} Lk${c.Lk} H${c.H} Dh${c.Dh}`,
    dtype: c.dtype,
    async setup(e: Engine): Promise<BenchInstance> {
      if (c.dtype === 'f16' && !e.caps.shaderF16) throw new Error('bench: adapter lacks shader-f16');
      const t = gpuInputs(e);
      const attrs = { scale: c.scale };
      let y: Tensor | null = null;
      return {
        work: opWork(attention, t, attrs),
        run() {
          y?.dispose();
          y = sageAttention(t, attrs);
        },
        async validate() {
          const got = (await sageAttention(t, attrs).toFloat32()) as Float32Array;
          const f = await Promise.all([t.q, t.k, t.v].map((x) => x.toFloat32()));
          const ex = attention({ q: Tensor.cpu(f[0] as Float32Array, t.q.shape, 'f32').toGpu(e), k: Tensor.cpu(f[1] as Float32Array, t.k.shape, 'f32').toGpu(e), v: Tensor.cpu(f[2] as Float32Array, t.v.shape, 'f32').toGpu(e) }, attrs);
          const acc = attentionAccuracy(got, (await ex.toFloat32()) as Float32Array);
          ex.dispose();
          console.log(`  sage ${c.name} ${c.dtype} B${c.B} Lq${c.Lq} H${c.H} Dh${c.Dh} (pv ${sagePv(e.caps.shaderF16)}): cos ${acc.cos.toFixed(6)}, relL1 ${acc.relL1.toFixed(5)} vs fused f32`);
          if (!(acc.cos >= 0.999 && acc.relL1 <= 0.03)) throw new Error(`sage ${c.name}: accuracy below target (cos ${acc.cos}, relL1 ${acc.relL1})`);
          forgetCompileStall(e);
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
        const t = gpuInputs(e);
        let y: Tensor | null = null;
        return {
          async run() {
            y?.dispose();
            y = attention(t, { scale: c.scale });
            await e.sync();
          },
          async validate() {
            await attention(t, { scale: c.scale }).toFloat32();
            forgetCompileStall(e);
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

// softmax alone, on the unfused path's score shape
for (const [name, rows, n] of [
  ['wan1.3b scores rows', 12 * 512, 512],
  ['long rows', 8, 70001],
] as Array<[string, number, number]>) {
  addBench({
    kernel: 'softmax',
    name,
    shape: `rows${rows} N${n}`,
    dtype: 'f32',
    async setup(e) {
      const xv = randn(rows * n, 5, 3);
      const x = e.fromHost(xv, [rows, n], 'f32');
      let y: Tensor | null = null;
      return {
        work: opWork(softmaxOp, { x }, {}),
        run() {
          y?.dispose();
          y = softmax(x);
        },
        async validate() {
          const got = (await softmax(x).toFloat32()) as Float32Array;
          for (const r of [0, rows - 1]) {
            let m = -Infinity;
            for (let j = 0; j < n; j++) m = Math.max(m, xv[r * n + j]!);
            let s = 0;
            for (let j = 0; j < n; j++) s += Math.exp(xv[r * n + j]! - m);
            for (let j = 0; j < n; j += 97) {
              const want = Math.exp(xv[r * n + j]! - m) / s;
              if (Math.abs(got[r * n + j]! - want) > 1e-6 + 1e-4 * want) throw new Error(`softmax ${name}: row ${r} col ${j}: ${got[r * n + j]} vs ${want}`);
            }
          }
          forgetCompileStall(e);
        },
        dispose() {
          y?.dispose();
          x.dispose();
        },
      };
    },
  });
}

// ---------------------------------------------------------------- interleaved comparison
// `npx tsx bench/attention.bench.ts --rr [ROUNDS] [--only REGEX]`: the same cases (those whose
// 'name shape dtype' matches REGEX), fused and unfused (for the sage cases: sage and fused) alternated
// run by run in one process (the 2-core machine is shared, so back-to-back tinybench blocks see
// different loads), reporting medians of wall time and of the CPU time of the non-main threads
// (lavapipe's workers), which the load disturbs much less.
async function roundRobin(rounds: number, only: RegExp | null): Promise<void> {
  const { Engine } = await import('../src/runtime/engine.ts');
  const { readdirSync, readFileSync } = await import('node:fs');
  const workerCpuMs = (): number => {
    let t = 0;
    for (const id of readdirSync('/proc/self/task')) {
      if (Number(id) === process.pid) continue;
      try {
        const st = readFileSync(`/proc/self/task/${id}/stat`, 'utf8');
        const f = st.slice(st.indexOf(')') + 2).split(' ');
        t += (Number(f[11]) + Number(f[12])) * 10; // clock ticks of 10 ms
      } catch {
        /* thread ended */
      }
    }
    return t;
  };
  const { cases } = await import('./harness.ts');
  const e = await Engine.create({ waitMode: 'await' });
  const med = (a: number[]) => a.slice().sort((x, y) => x - y)[a.length >> 1]!;
  console.log(`adapter: ${e.adapterName}; ${rounds} rounds, fused and unfused alternated`);
  console.log(`${'workload'.padEnd(22)} ${'shape'.padEnd(40)} ${'dtype'.padEnd(5)} ${'fused ms'.padStart(9)} ${'unfused ms'.padStart(10)} ${'wall ratio'.padStart(10)} ${'fused GF/cpu-s'.padStart(14)} ${'unfused GF/cpu-s'.padStart(16)} ${'cpu ratio'.padStart(9)}`);
  try {
    for (const c of cases.filter((x) => x.kernel === 'attention' && x.peer && (!only || only.test(`${x.name} ${x.shape} ${x.dtype}`)))) {
      if (c.dtype === 'f16' && !e.caps.shaderF16) continue;
      const a = await c.setup(e);
      const b = await c.peer!.setup(e);
      await a.validate();
      if (b.validate) await b.validate();
      const wall = [[], []] as number[][];
      const cpu = [[], []] as number[][];
      for (let r = 0; r < rounds; r++) {
        for (const [i, run] of [
          [0, async () => {
            await a.run();
            await e.sync();
          }],
          [1, () => b.run()],
        ] as Array<[number, () => Promise<void>]>) {
          const c0 = workerCpuMs();
          const t = performance.now();
          await run();
          wall[i]!.push(performance.now() - t);
          cpu[i]!.push(workerCpuMs() - c0);
        }
      }
      a.dispose();
      b.dispose();
      const [wf, wu, cf, cu] = [med(wall[0]!), med(wall[1]!), med(cpu[0]!), med(cpu[1]!)];
      const flops = a.work?.flops ?? c.flops ?? NaN;
      console.log(
        `${c.name.padEnd(22)} ${c.shape.padEnd(40)} ${c.dtype.padEnd(5)} ${wf.toFixed(0).padStart(9)} ${wu.toFixed(0).padStart(10)} ${(wu / wf).toFixed(2).padStart(10)} ${(flops / cf / 1e6).toFixed(2).padStart(14)} ${(flops / cu / 1e6).toFixed(2).padStart(16)} ${(cu / cf).toFixed(2).padStart(9)}`,
      );
    }
  } finally {
    e.destroy();
  }
}

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split('/').pop()!) && process.argv.includes('--rr')) {
  const i = process.argv.indexOf('--rr');
  const j = process.argv.indexOf('--only');
  roundRobin(Number(process.argv[i + 1] ?? 5) || 5, j >= 0 ? new RegExp(process.argv[j + 1]!) : null).catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
