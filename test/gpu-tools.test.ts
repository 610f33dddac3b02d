// The prepared GPU run's engine side (tools/gpu/checks.ts, docs/gpu-run.md) runs here on lavapipe:
// a small size, the light checks (the block and two-device forwards take a minute at 1.3B shapes and
// were run by hand: docs/gpu-run.md), one JSON object per check with a positive rate.
import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');

describe('tools/gpu/checks.ts', () => {
  it('prints the device with the toggles, matmul and attention (sdpa and sage) rates as JSON lines', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'tools/gpu/checks.ts'), '--tokens', '128', '--rounds', '1', '--only', 'device,matmul,attention'], { cwd: ROOT, encoding: 'utf8', timeout: 120_000 });
    expect(r.status, r.stderr).toBe(0);
    const rows = r.stdout
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    const dev = rows.find((x) => x.check === 'device')!;
    expect(dev.toggles).toBe('enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia');
    expect(Array.isArray(dev.subgroupMatrixConfigs)).toBe(true);
    const mm = rows.filter((x) => x.check === 'matmul');
    const at = rows.filter((x) => x.check === 'attention');
    expect(mm.length).toBeGreaterThan(0);
    expect(at.map((x) => x.kind)).toEqual(expect.arrayContaining(['sdpa', 'sage']));
    for (const x of [...mm, ...at]) expect(x.tflops as number).toBeGreaterThan(0);
  }, 150_000);
});
