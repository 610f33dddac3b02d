// Benchmark harness shared by bench/*.bench.ts. A case names a real workload shape, sets up GPU
// inputs, validates the kernel against its CPU reference (or a known answer) *before* timing, and
// is timed with tinybench (each iteration: encode + submit + wait). A case may carry a peer
// (tfjs-backend-webgpu on the same Dawn device) timed the same way; the report shows the ratio.

import type { Engine } from '../src/runtime/engine.ts';
import type { Op, OpInputs } from '../src/ops/registry.ts';
import type { Tensor } from '../src/tensor/tensor.ts';
import { Rng } from '../src/util/rng.ts';

export interface BenchInstance {
  /** encode one run of the kernel(s) (the harness syncs after it) */
  run(): void | Promise<void>;
  /** flops and bytes of one run, from the op registry (see opWork); overrides the case's numbers */
  work?: Work;
  /** throw if the result is wrong (called once, before timing) */
  validate(): Promise<void>;
  dispose(): void;
}

export interface PeerInstance {
  /** one complete run, including waiting for the GPU */
  run(): Promise<void>;
  /** throw if the peer's result is wrong (optional) */
  validate?(): Promise<void>;
  dispose(): void;
}

export interface BenchCase {
  /** kernel family, e.g. 'matmul' */
  kernel: string;
  /** workload name, e.g. 'wan1.3b attn1.to_q' */
  name: string;
  /** shape string, e.g. 'M1024 K1536 N1536' */
  shape: string;
  dtype: string;
  /** floating-point operations per run; omit when the instance reports `work` from the registry */
  flops?: number;
  /** bytes read + written per run (ideal, each operand once); omit like flops */
  bytes?: number;
  setup(e: Engine): Promise<BenchInstance>;
  peer?: { name: string; setup(e: Engine): Promise<PeerInstance> };
  /** mark cases too slow for the default run (run with --all) */
  slow?: boolean;
}

export const cases: BenchCase[] = [];

export interface Work {
  flops: number;
  bytes: number;
}

/** One op call's flops and bytes, as the op registry counts them. */
export function opWork<I extends OpInputs, A>(op: Op<I, A>, inputs: I, attrs: A): Work {
  return { flops: op.def.flops(inputs, attrs), bytes: op.def.bytes(inputs, attrs) };
}

export function addBench(c: BenchCase): void {
  cases.push(c);
}

/** Seeded normal values (the cases' inputs). */
export function randn(n: number, seed: number, std = 1): Float32Array {
  return new Rng(seed).fillNormal(new Float32Array(n), std);
}

/** Validate a sample of the GPU result against the CPU reference (every 97th element). */
async function sampleCheck(what: string, gpu: Tensor, cpu: Tensor, tol = 1e-4): Promise<void> {
  const a = await gpu.toArray();
  const b = cpu.hostValues();
  if (a.length !== b.length) throw new Error(`${what}: length ${a.length} != ${b.length}`);
  for (let i = 0; i < a.length; i += 97) {
    if (!(Math.abs(a[i]! - b[i]!) <= tol * (1 + Math.abs(b[i]!)))) throw new Error(`${what} mismatch at ${i}: ${a[i]} vs ${b[i]}`);
  }
}

/**
 * A bench instance that runs the registered `op` on GPU copies of `inputs`, validated against the
 * same op on the CPU inputs (sampleCheck with `tol`); its flops and bytes are the registry's.
 */
export function opBench<I extends OpInputs, A>(e: Engine, what: string, op: Op<I, A>, inputs: I, attrs: A, tol?: number): BenchInstance {
  const g = Object.fromEntries(Object.entries(inputs).map(([k, t]) => [k, t?.toGpu(e)])) as I;
  let y: Tensor | null = null;
  return {
    work: opWork(op, g, attrs),
    run() {
      y?.dispose();
      y = op(g, attrs);
    },
    async validate() {
      const out = op(g, attrs);
      await sampleCheck(what, out, op(inputs, attrs), tol);
      out.dispose();
    },
    dispose() {
      y?.dispose();
      for (const t of Object.values(g)) t?.dispose();
    },
  };
}

export interface BenchRow {
  kernel: string;
  name: string;
  shape: string;
  dtype: string;
  ms: number;
  gflops: number;
  gbps: number;
  peer: string | null;
  peer_ms: number | null;
  peer_gflops: number | null;
  /** ours / peer in GFLOP/s (>1: we are faster) */
  ratio: number | null;
  samples: number;
}
