import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { getEngine } from './helpers/gpu.ts';
import { Engine } from '../src/runtime/engine.ts';
import { dawnInstanceCount } from '../src/device/gpu.ts';
import { GpuError, ShapeError } from '../src/util/errors.ts';
import { unary } from '../src/ops/elementwise.ts';
import { Tensor } from '../src/tensor/tensor.ts';

const here = dirname(fileURLToPath(import.meta.url));
const fixtures = join(here, 'fixtures');
const root = join(here, '..');

function runScript(script: string, env: Record<string, string> = {}) {
  return spawnSync(process.execPath, ['--import', 'tsx', script], {
    cwd: root,
    env: { ...process.env, ...env },
    encoding: 'utf8',
    timeout: 60_000,
  });
}

describe('device', () => {
  it('requests the adapter limits and reports features', async () => {
    const e = await getEngine();
    expect(e.limits.maxStorageBufferBindingSize).toBeGreaterThanOrEqual(128 * 2 ** 20);
    expect(typeof e.caps.shaderF16).toBe('boolean');
    expect(e.adapterName.length).toBeGreaterThan(0);
  });

  it('a process that used the GPU exits by itself after destroy()', () => {
    const r = runScript(join(fixtures, 'scripts', 'engine-run.ts'));
    expect(r.error).toBeUndefined(); // no timeout
    expect(r.stdout).toMatch(/result 11,22,33/);
    expect(r.status).toBe(0);
  });

  it('engines created one after another share one Dawn instance (a new instance per device kept each destroyed device\'s GPU memory)', async () => {
    const a = await Engine.create();
    a.destroy();
    const n = dawnInstanceCount();
    const b = await Engine.create();
    const t = Tensor.cpu(new Float32Array([1, 2, 3]), [3], 'f32').toGpu(b);
    expect(Array.from((await t.toArray()) as Float32Array)).toEqual([1, 2, 3]);
    b.destroy();
    expect(dawnInstanceCount()).toBe(n);
  });

  it('no adapter: the error says how to get one', () => {
    const r = runScript(join(fixtures, 'scripts', 'engine-run.ts'), { VK_DRIVER_FILES: '/nonexistent.json', VK_ICD_FILENAMES: '/nonexistent.json' });
    expect(r.status).toBe(3);
    expect(r.stdout).toMatch(/NoAdapterError/);
    expect(r.stdout).toMatch(/mesa-vulkan-drivers/);
    expect(r.stdout).toMatch(/bookworm-backports/);
  });

  it('an unknown backend name: one line naming the backends dawn.node knows', () => {
    const r = runScript(join(fixtures, 'scripts', 'engine-run.ts'), { SD_WEBGPU_BACKEND: 'no-such-backend' });
    expect(r.status).toBe(3);
    const line = r.stdout.split('\n').find((l) => l.includes('no-such-backend'))!;
    expect(line).toMatch(/backend 'no-such-backend' \(device\.backend, --backend, SD_WEBGPU_BACKEND\) is not one dawn\.node knows; use one of .*'vulkan'.*, or leave it empty$/);
  });

  it('an unknown adapter name is reported with the adapter', () => {
    const r = runScript(join(fixtures, 'scripts', 'engine-run.ts'), { SD_WEBGPU_ADAPTER: 'no-such-gpu-xyz' });
    expect(r.status).toBe(3);
    expect(r.stdout).toMatch(/NoAdapterError/);
    expect(r.stdout).toMatch(/no-such-gpu-xyz/);
    // one line that names the adapters there are and the fix (Dawn lists them one per line)
    const line = r.stdout.split('\n').find((l) => l.includes('no WebGPU adapter matches'))!;
    expect(line).toMatch(/no WebGPU adapter matches adapter 'no-such-gpu-xyz'; this machine has '[^']+' \(\w+\).* Set SD_WEBGPU_ADAPTER .*--list-adapters.*or unset it\.$/);
  });
});

describe('kernels and errors', () => {
  it('a WGSL compile error throws a GpuError naming the kernel and the line', async () => {
    const e = await getEngine();
    const spec = { family: join(fixtures, 'kernels', 'broken.wgsl'), entry: 'main', layout: ['write' as const] };
    await expect(e.compile(spec)).rejects.toThrow(GpuError);
    try {
      e.pipeline({ ...spec, constants: { X: 1 } } as never);
      await e.checkErrors();
      expect.unreachable();
    } catch (err) {
      expect((err as Error).message).toMatch(/broken\.wgsl/);
    }
  });

  it('dispatches a kernel from a file; grids over the per-dimension limit are refused', async () => {
    const e = await getEngine();
    const y = e.empty([100], 'f32');
    const kernel = { family: join(fixtures, 'kernels', 'ok.wgsl'), entry: 'main', layout: ['write' as const] };
    e.dispatch({ kernel, params: { n: 100, scale: 0.5 }, bindings: [y], workgroups: [2] });
    const v = await y.toArray();
    expect(v[0]).toBe(0);
    expect(v[99]).toBe(49.5);
    expect(() => e.dispatch({ kernel, bindings: [y], workgroups: [70000] })).toThrow(ShapeError);
    y.dispose();
  });

  it('zero-size tensors read back empty and ops on them dispatch nothing', async () => {
    const e = await getEngine();
    const before = e.dispatchCount;
    const x = e.empty([0, 5]);
    const y = unary({ x }, { kind: 'silu' });
    expect(y.shape).toEqual([0, 5]);
    expect((await y.toArray()).length).toBe(0);
    expect(e.dispatchCount).toBe(before);
  });

  it('uploads never overtake queued reads of a reused buffer', async () => {
    const e = await getEngine();
    // a is read by the queued kernel, then freed; b reuses its block and is written at once.
    const a = e.fromValues([1, 2, 3, 4], [4]);
    const out = unary({ x: a }, { kind: 'affine', alpha: 2, beta: 0 });
    a.dispose();
    const b = e.fromValues([100, 100, 100, 100], [4]);
    expect(Array.from(await out.toArray())).toEqual([2, 4, 6, 8]);
    expect(Array.from(await b.toArray())).toEqual([100, 100, 100, 100]);
  });

  it('host round trip of every dtype', async () => {
    const e = await getEngine();
    for (const dt of ['f32', 'f16', 'bf16', 'i32', 'u32'] as const) {
      const vals = [0, 1, 2, 3, 5, 7, 11];
      const t = Tensor.fromValues(vals, [7], dt).toGpu(e);
      expect(Array.from(await t.toArray())).toEqual(vals);
      t.dispose();
    }
  });
});

describe('profiling with timestamp queries', () => {
  it('records per-kernel GPU time', async () => {
    const e = await Engine.create({ profile: true });
    try {
      if (!e.caps.timestampQuery) return; // adapter without timestamp-query: nothing to record
      const x = e.fromValues(new Float32Array(10000).fill(1), [10000]);
      for (let i = 0; i < 3; i++) unary({ x }, { kind: 'gelu' }).dispose();
      await e.sync();
      const rows = e.profile.rows();
      const g = rows.find((r) => r.name === 'unary.gelu');
      expect(g?.calls).toBe(3);
      expect(g!.totalMs).toBeGreaterThan(0);
      expect(e.profile.table()).toMatch(/unary\.gelu/);
    } finally {
      e.destroy();
    }
  });

  it("attributes each op call's registry flops and bytes, and its dispatches' GPU time, to the op", async () => {
    const e = await Engine.create({ profile: true });
    try {
      if (!e.caps.timestampQuery) return;
      const x = e.fromValues(new Float32Array(10000).fill(1), [100, 100]);
      for (let i = 0; i < 2; i++) unary({ x }, { kind: 'gelu' }).dispose();
      await e.sync();
      const op = e.profile.opRows().find((r) => r.name === 'unary');
      expect(op?.calls).toBe(2);
      expect(op!.flops).toBe(2 * unary.def.flops({ x }, { kind: 'gelu' }));
      expect(op!.bytes).toBe(2 * unary.def.bytes({ x }, { kind: 'gelu' }));
      expect(op!.totalMs).toBeCloseTo(e.profile.rows().find((r) => r.name === 'unary.gelu')!.totalMs, 9);
      expect(e.profile.table()).toMatch(/^unary\s+2\s+[\d.]+\s+[\d.]+\s+[\d.]+$/m);
    } finally {
      e.destroy();
    }
  });
});
