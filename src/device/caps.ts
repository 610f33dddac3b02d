// What the adapter can do, read once when the device is created (device/gpu.ts) and exposed as
// `engine.caps`. Ops choose kernel variants from it (src/ops/variants.ts) and plan their binding
// windows with its limits; nothing else sniffs adapter names or reads adapter fields.

/**
 * 'llvmpipe': Mesa llvmpipe (lavapipe) with 256- or 512-bit SIMD, the adapter the uniform-buffer
 * kernels are written for; 'cpu': another software adapter (llvmpipe with narrower SIMD,
 * SwiftShader, ...); 'gpu': everything else.
 */
export type AdapterClass = 'llvmpipe' | 'cpu' | 'gpu';

/** One shape the adapter's subgroup-matrix units multiply (feature 'chromium-experimental-subgroup-matrix'). */
export interface SubgroupMatrixConfig {
  componentType: string;
  resultComponentType: string;
  M: number;
  N: number;
  K: number;
}

export interface AdapterCaps {
  adapterClass: AdapterClass;
  vendor: string;
  architecture: string;
  device: string;
  description: string;
  /** dawn.node backend ('vulkan', 'metal', ...; guessed from the description when not chosen) */
  backend: string;
  /** device features (after GpuOptions.disableFeatures) */
  shaderF16: boolean;
  timestampQuery: boolean;
  subgroups: boolean;
  /** subgroup sizes the adapter may use; 0 when it does not say */
  subgroupMinSize: number;
  subgroupMaxSize: number;
  /** the device has 'chromium-experimental-subgroup-matrix' (tensor cores; Dawn toggle allow_unsafe_apis) */
  subgroupMatrix: boolean;
  /** empty unless the adapter exposes subgroup matrices (Dawn toggle allow_unsafe_apis) */
  subgroupMatrixConfigs: readonly SubgroupMatrixConfig[];
  /** bytes one storage binding may cover (maxStorageBufferBindingSize) */
  maxBinding: number;
  /** alignment of a storage binding's offset (minStorageBufferOffsetAlignment) */
  storageAlign: number;
}

/** The fields of GPUAdapterInfo we read; the subgroup ones are newer than some typings. */
export interface RawAdapterInfo {
  vendor: string;
  architecture: string;
  device: string;
  description: string;
  subgroupMinSize?: number;
  subgroupMaxSize?: number;
  subgroupMatrixConfigs?: ReadonlyArray<{ componentType: string; resultComponentType: string; M: number; N: number; K: number }>;
}

export function adapterClass(info: RawAdapterInfo): AdapterClass {
  const s = [info.vendor, info.architecture, info.device, info.description].join(' ').toLowerCase();
  if (s.includes('llvmpipe') && /(256|512)-bits/.test(s)) return 'llvmpipe';
  if (info.architecture === 'software' || /llvmpipe|lavapipe|swiftshader|software/.test(s)) return 'cpu';
  return 'gpu';
}

export function readCaps(info: RawAdapterInfo, backend: string, features: GPUSupportedFeatures, limits: GPUSupportedLimits): AdapterCaps {
  return {
    adapterClass: adapterClass(info),
    vendor: info.vendor,
    architecture: info.architecture,
    device: info.device,
    description: info.description,
    backend,
    shaderF16: features.has('shader-f16'),
    timestampQuery: features.has('timestamp-query'),
    subgroups: features.has('subgroups'),
    subgroupMatrix: features.has('chromium-experimental-subgroup-matrix' as GPUFeatureName),
    subgroupMinSize: info.subgroupMinSize ?? 0,
    subgroupMaxSize: info.subgroupMaxSize ?? 0,
    subgroupMatrixConfigs: (info.subgroupMatrixConfigs ?? []).map((c) => ({
      componentType: c.componentType,
      resultComponentType: c.resultComponentType,
      M: c.M,
      N: c.N,
      K: c.K,
    })),
    maxBinding: limits.maxStorageBufferBindingSize,
    storageAlign: limits.minStorageBufferOffsetAlignment,
  };
}

/** 'vendor / architecture / device / description' for logs and reports. */
export function adapterName(c: AdapterCaps): string {
  return [c.vendor, c.architecture, c.device, c.description].filter(Boolean).join(' / ');
}

/** What the device got, for the startup line and --print-device: 'f16, subgroups 32, timestamps, subgroup matrix (f16->f32 16x8x16, ...)'. */
export function featuresLine(c: AdapterCaps): string {
  const sg = c.subgroups ? `subgroups ${c.subgroupMinSize === c.subgroupMaxSize ? c.subgroupMinSize : `${c.subgroupMinSize}-${c.subgroupMaxSize}`}` : 'no subgroups';
  const mx = c.subgroupMatrix ? `subgroup matrix (${c.subgroupMatrixConfigs.map((m) => `${m.componentType}->${m.resultComponentType} ${m.M}x${m.N}x${m.K}`).join(', ') || 'no configs'})` : 'no subgroup matrix';
  return [c.shaderF16 ? 'f16' : 'no f16', sg, c.timestampQuery ? 'timestamps' : 'no timestamps', mx].join(', ');
}
