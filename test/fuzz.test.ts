// Seeded fuzzing of every reader of user-supplied files and strings (src/tools/fuzz.ts): a few
// hundred mutated valid inputs per target must each end in success or a one-line
// SmartDiffusionError, within the per-case time limit, in bounded memory. The long run is
// `npm run fuzz -- --n 10000` (figures in docs/reliability.md); this is its CI slice.
import { describe, it, expect } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FUZZ_TARGETS, fuzzTarget, makeCase, formatStats, runCase } from '../src/tools/fuzz.ts';
import { SmartDiffusionError } from '../src/util/errors.ts';

const N = 300;
const SEED = 20261206;

describe('fuzz: mutated inputs give success or a one-line error, never a crash, a hang or unbounded memory', () => {
  for (const target of FUZZ_TARGETS) {
    it(`${target}: ${N} seeded cases`, { timeout: 60_000 }, async () => {
      const out = mkdtempSync(join(tmpdir(), 'sd-fuzz-failures-'));
      try {
        const s = await fuzzTarget(target, { n: N, seed: SEED, maxMs: 2000, outDir: out, heapMb: 512 });
        const report = [formatStats(s), ...s.failures.map((f) => `${f.kind} case ${f.case}: ${f.msg.split('\n')[0]} (${f.repro})`)].join('\n');
        expect(s.failures, report).toEqual([]);
        expect(s.cases).toBe(N);
        expect(s.ok + s.errors).toBe(N);
        // both outcomes occur: the mutations are neither all harmless nor all fatal
        expect(s.errors, report).toBeGreaterThan(N / 4);
        expect(s.ok, report).toBeGreaterThan(0);
        expect(s.maxMs).toBeLessThan(2000);
        expect(s.maxHeapBytes).toBeLessThan(512 * 2 ** 20);
      } finally {
        rmSync(out, { recursive: true, force: true });
      }
    });
  }

  it('a case is a pure function of (target, seed, index), and can be re-run in-process', async () => {
    for (const target of FUZZ_TARGETS) {
      const a = await makeCase(target, 5, 17);
      const b = await makeCase(target, 5, 17);
      expect(b.name).toBe(a.name);
      expect(Buffer.from(b.bytes).equals(Buffer.from(a.bytes))).toBe(true);
      const c = await makeCase(target, 5, 18);
      expect(Buffer.from(c.bytes).equals(Buffer.from(a.bytes))).toBe(false);
    }
    const dir = mkdtempSync(join(tmpdir(), 'sd-fuzz-one-'));
    try {
      const c = await makeCase('config', 1, 3);
      await runCase('config', c, dir).catch((e) => expect(e).toBeInstanceOf(SmartDiffusionError));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
