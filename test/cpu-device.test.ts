// The CPU device's fast matmul (blocked kernel on worker threads) against the plain reference loop.
import { describe, it, expect, afterAll } from 'vitest';
import { linear } from '../src/ops/matmul.ts';
import { closeCpuPool, PARALLEL_MACS, cpuGemm } from '../src/ops/cpu/pool.ts';
import { Rng, randTensor, expectClose } from './helpers/gpu.ts';

afterAll(() => closeCpuPool());

describe('CPU device matmul', () => {
  const rng = new Rng(5);
  // just above the pool threshold (2^24 multiply-adds), odd sizes
  for (const [M, K, N, dt] of [
    [33, 1025, 499, 'bf16'],
    [65, 513, 505, 'f32'],
    [7, 4097, 587, 'f16'],
  ] as const) {
    it(`fast path == reference loop: M${M} K${K} N${N} ${dt}`, () => {
      expect(M * K * N).toBeGreaterThanOrEqual(PARALLEL_MACS);
      const x = randTensor(rng, [M, K]);
      const w = randTensor(rng, [N, K], dt, 1 / Math.sqrt(K));
      const b = randTensor(rng, [N]);
      for (const act of ['none', 'gelu'] as const) {
        const ref = linear(x, w, { bias: b, act, referenceLoop: true } as never);
        const fast = linear(x, w, { bias: b, act });
        expectClose(fast.hostValues(), ref.hostValues(), { atol: 1e-5, rtol: 1e-5 }, `linear ${act}`);
      }
    });
  }

  it('weights in a SharedArrayBuffer (at an offset) are used in place and give the same numbers; any M split gives the same numbers', () => {
    const [M, K, N] = [23, 771, 1031];
    expect(M * K * N).toBeGreaterThanOrEqual(PARALLEL_MACS);
    const x = randTensor(rng, [M, K]).hostValues() as Float32Array;
    const w = randTensor(rng, [N, K], 'bf16', 1 / Math.sqrt(K)).data as Uint16Array;
    const sab = new SharedArrayBuffer(w.byteLength + 64);
    const ws = new Uint16Array(sab, 64, w.length);
    ws.set(w);
    const plain = cpuGemm(x, w, 2, null, M, K, N);
    const shared = cpuGemm(x, ws, 2, null, M, K, N);
    expect(Array.from(shared)).toEqual(Array.from(plain));
    // rows one at a time (the 1x4 tail path) == the 4x4 tiles of the batched call
    for (const m of [0, 5, 22]) {
      const row = cpuGemm(x.subarray(m * K, (m + 1) * K), ws, 2, null, 1, K, N);
      expect(Array.from(row)).toEqual(Array.from(plain.subarray(m * N, (m + 1) * N)));
    }
  });
});
