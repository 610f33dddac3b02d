// engine.caps (src/device/caps.ts), the variant table (src/ops/variants.ts) and the binding-window
// helper (src/ops/window.ts).
import { describe, it, expect } from 'vitest';
import { getEngine } from './helpers/gpu.ts';
import { adapterClass, featuresLine, type AdapterCaps } from '../src/device/caps.ts';
import { VARIANTS, meets, variantFor } from '../src/ops/variants.ts';
import { bindingLimit, elemWindow, windowSlack } from '../src/ops/window.ts';
import { attentionKernel } from '../src/ops/attention.ts';
import { ShapeError } from '../src/util/errors.ts';

const info = (device: string, description: string, architecture = '') => ({ vendor: '', architecture, device, description });

function caps(over: Partial<AdapterCaps>): AdapterCaps {
  return {
    adapterClass: 'gpu',
    vendor: '',
    architecture: '',
    device: '',
    description: '',
    backend: 'vulkan',
    shaderF16: true,
    timestampQuery: true,
    subgroups: true,
    subgroupMinSize: 32,
    subgroupMaxSize: 32,
    subgroupMatrix: false,
    subgroupMatrixConfigs: [],
    maxBinding: 2 ** 27,
    storageAlign: 256,
    ...over,
  };
}

describe('adapter caps', () => {
  it('classifies adapters', () => {
    expect(adapterClass(info('llvmpipe-llvm-15-0-6-256-bits-', 'llvmpipe: Mesa 25.0.7', 'software'))).toBe('llvmpipe');
    expect(adapterClass(info('llvmpipe (LLVM 15.0.6, 512 bits)', 'llvmpipe 512-bits'))).toBe('llvmpipe');
    expect(adapterClass(info('llvmpipe (LLVM 15.0.6, 128 bits)', 'llvmpipe: Mesa', 'software'))).toBe('cpu');
    expect(adapterClass(info('SwiftShader Device (Subzero)', 'SwiftShader'))).toBe('cpu');
    expect(adapterClass(info('NVIDIA H100 80GB HBM3', 'NVIDIA: 550.54', 'hopper'))).toBe('gpu');
  });

  it('reads this adapter once, typed', async () => {
    const e = await getEngine();
    const c = e.caps;
    expect(e.caps).toBe(c);
    expect(['llvmpipe', 'cpu', 'gpu']).toContain(c.adapterClass);
    if (/llvmpipe/.test(c.description) && /(256|512)-bits/.test(c.device)) expect(c.adapterClass).toBe('llvmpipe');
    expect(typeof c.subgroupMinSize).toBe('number');
    expect(typeof c.subgroupMaxSize).toBe('number');
    if (c.subgroups && c.subgroupMinSize > 0) expect(c.subgroupMaxSize).toBeGreaterThanOrEqual(c.subgroupMinSize);
    expect(Array.isArray(c.subgroupMatrixConfigs)).toBe(true);
    expect(c.maxBinding).toBe(e.limits.maxStorageBufferBindingSize);
    expect(c.storageAlign).toBe(e.limits.minStorageBufferOffsetAlignment);
    expect(typeof c.shaderF16).toBe('boolean');
  });
});

describe('variant table', () => {
  it('has a choice for every adapter class', () => {
    for (const row of Object.values(VARIANTS)) {
      expect(Object.keys(row.prefer).sort()).toEqual(['cpu', 'gpu', 'llvmpipe']);
    }
  });

  it('picks what the per-op sniffing picked before on this adapter', async () => {
    const e = await getEngine();
    const c = e.caps;
    // the checks the ops used to make themselves
    const name = [c.vendor, c.architecture, c.device, c.description].join(' / ').toLowerCase();
    const wasLlvmpipe = name.includes('llvmpipe') && /(256|512)-bits/.test(name);
    const wasCpu = c.architecture === 'software' || /llvmpipe|lavapipe|swiftshader|software/.test(name);
    const sg8 = c.subgroups && (c.subgroupMinSize === 0 || c.subgroupMinSize >= 8);
    expect(variantFor(c, 'matmul') === 'ubo').toBe(c.subgroups && wasLlvmpipe);
    expect(variantFor(c, 'matmulTile')).toBe(wasLlvmpipe ? 'cpu' : 'gpu');
    expect(variantFor(c, 'attention')).toBe(!sg8 ? 'portable' : wasLlvmpipe ? 'ubo' : 'subgroup');
    expect(variantFor(c, 'conv')).toBe(sg8 ? 'shuffle' : 'generic');
    expect(variantFor(c, 'rowNorm')).toBe(wasCpu ? 'thread' : 'wg');
    if (c.adapterClass === 'llvmpipe' && sg8) {
      expect(attentionKernel(e, 64)).toBe('ubo');
      expect(attentionKernel(e, 64, 'auto', true)).toBe('subgroup');
      expect(attentionKernel(e, 62)).toBe('portable');
    }
  });

  it('falls back where a capability is missing', () => {
    const gpu = caps({});
    expect([variantFor(gpu, 'matmul'), variantFor(gpu, 'attention'), variantFor(gpu, 'conv'), variantFor(gpu, 'rowNorm')]).toEqual(['tiled', 'subgroup', 'shuffle', 'wg']);
    const lp = caps({ adapterClass: 'llvmpipe', subgroupMinSize: 8, subgroupMaxSize: 8 });
    expect([variantFor(lp, 'matmul'), variantFor(lp, 'attention'), variantFor(lp, 'conv'), variantFor(lp, 'rowNorm')]).toEqual(['ubo', 'ubo', 'shuffle', 'thread']);
    const noSg = caps({ adapterClass: 'llvmpipe', subgroups: false });
    expect([variantFor(noSg, 'matmul'), variantFor(noSg, 'attention'), variantFor(noSg, 'conv')]).toEqual(['tiled', 'portable', 'generic']);
    // 4-lane subgroups: the 8-lane shuffle kernels cannot run, the matmul's broadcasts can
    const sg4 = caps({ adapterClass: 'llvmpipe', subgroupMinSize: 4 });
    expect([variantFor(sg4, 'matmul'), variantFor(sg4, 'attention'), variantFor(sg4, 'conv')]).toEqual(['ubo', 'portable', 'generic']);
    // an adapter that does not report its subgroup sizes is trusted (as before)
    expect(meets(caps({ subgroupMinSize: 0 }), 'subgroups8')).toBe(true);
  });
});

describe('binding windows', () => {
  it('plans with the adapter limit or a test override', async () => {
    const e = await getEngine();
    expect(bindingLimit(e)).toBe(Math.floor(e.caps.maxBinding / 4) * 4);
    expect(bindingLimit(e, 1000)).toBe(1000);
    expect(bindingLimit(e, 1001)).toBe(1000);
    expect(() => bindingLimit(e, 32)).toThrow(ShapeError);
    expect(() => bindingLimit(e, 32)).toThrow(/\[binding\] maxBindingBytes must be >= 64 bytes/);
    expect(windowSlack(e, 16)).toBe(e.caps.storageAlign + 16);
  });

  it('aligns the start down, rounds the end up and reports the offset', async () => {
    const e = await getEngine();
    const t = e.zeros([1000], 'f32');
    const a = e.caps.storageAlign;
    const w = elemWindow(e, t, 37, 45, 'test');
    expect(w.binding.offset).toBe(Math.floor((37 * 4) / a) * a);
    expect(w.binding.offset + w.off * 4).toBe(37 * 4);
    expect(w.binding.size).toBe(45 * 4 - w.binding.offset);
    const h = e.zeros([1000], 'f16');
    const w16 = elemWindow(e, h, 3, 8, 'test', { granule: 16 });
    expect(w16.binding.size % 16).toBe(0);
    expect(w16.binding.size).toBeGreaterThanOrEqual(8 * 2 - w16.binding.offset);
    expect(() => elemWindow(e, t, 0, 1000, 'test', { limit: 256 })).toThrow(/\[test\] internal: a window of 4000 bytes .* exceeds the binding limit 256/);
    t.dispose();
    h.dispose();
  });
});

describe('featuresLine', () => {
  it('says what the device got, subgroup matrix configs included', () => {
    expect(featuresLine(caps({}))).toBe('f16, subgroups 32, timestamps, no subgroup matrix');
    expect(featuresLine(caps({ shaderF16: false, subgroups: false, timestampQuery: false }))).toBe('no f16, no subgroups, no timestamps, no subgroup matrix');
    expect(featuresLine(caps({ subgroupMinSize: 32, subgroupMaxSize: 64, subgroupMatrix: true, subgroupMatrixConfigs: [{ componentType: 'f16', resultComponentType: 'f32', M: 16, N: 8, K: 16 }] }))).toBe('f16, subgroups 32-64, timestamps, subgroup matrix (f16->f32 16x8x16)');
  });
});
