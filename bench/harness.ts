// Benchmark harness shared by bench/*.bench.ts. A case names a real workload shape, sets up GPU
// inputs, validates the kernel against its CPU reference (or a known answer) *before* timing, and
// is timed with tinybench (each iteration: encode + submit + wait). A case may carry a peer
// (tfjs-backend-webgpu on the same Dawn device) timed the same way; the report shows the ratio.

import type { Engine } from '../src/runtime/engine.ts';

export interface BenchInstance {
  /** encode one run of the kernel(s) (the harness syncs after it) */
  run(): void | Promise<void>;
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
  /** floating-point operations per run */
  flops: number;
  /** bytes read + written per run (ideal, each operand once) */
  bytes: number;
  setup(e: Engine): Promise<BenchInstance>;
  peer?: { name: string; setup(e: Engine): Promise<PeerInstance> };
  /** mark cases too slow for the default run (run with --all) */
  slow?: boolean;
}

export const cases: BenchCase[] = [];

export function addBench(c: BenchCase): void {
  cases.push(c);
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
