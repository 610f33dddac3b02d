// A GPU that holds no memory and runs nothing: the memory planner's device (src/plan/plan.ts).
//
// The planner runs the real model code (the same ops, the same scopes and disposals, the same
// caching allocator) on an Engine whose device is this object. Buffers have a size and no
// contents, dispatches are recorded and dropped, reads return zeros. Everything the allocator
// counts (allocated, reserved, peaks, owners) is therefore what a real run of the same code at
// the same shapes would count, without a GPU and without reading a weight: the plan is the code's
// own accounting, not a second model of it. What a meta run cannot see is host-side data: its
// reads are zeros, so no code path may branch on computed values (none in the DiT, text encoder
// or VAE does).

import type { AdapterCaps } from '../device/caps.ts';
import type { GpuContext } from '../device/gpu.ts';

/** A device class for a plan: what the adapter-dependent code (kernel variants, binding windows) sees. */
export interface MetaDeviceSpec {
  /** 'gpu' (discrete or integrated GPU), 'llvmpipe' (this machine's lavapipe) */
  adapterClass: AdapterCaps['adapterClass'];
  /** maxStorageBufferBindingSize in bytes */
  maxBinding: number;
  /** minStorageBufferOffsetAlignment */
  storageAlign: number;
  shaderF16: boolean;
  subgroups: boolean;
  subgroupMinSize: number;
  subgroupMaxSize: number;
  /** maxBufferSize in bytes */
  maxBufferSize: number;
  /** maxComputeWorkgroupsPerDimension */
  maxWorkgroups: number;
}

/**
 * The default plan device: a discrete GPU through Dawn's Vulkan backend, with the limits Dawn gave
 * on the H100 of docs/gpu-run.md (maxStorageBufferBindingSize 2 GiB − 4, offsets aligned to 256).
 */
export const GENERIC_GPU: MetaDeviceSpec = {
  adapterClass: 'gpu',
  maxBinding: 2 ** 31 - 4,
  storageAlign: 256,
  shaderF16: true,
  subgroups: true,
  subgroupMinSize: 32,
  subgroupMaxSize: 32,
  maxBufferSize: 2 ** 40,
  maxWorkgroups: 65535,
};

/** This machine's lavapipe (Mesa 25, 256-bit llvmpipe): 128 MiB bindings, the uniform-buffer kernel variants. */
export const LAVAPIPE: MetaDeviceSpec = {
  adapterClass: 'llvmpipe',
  maxBinding: 128 * 2 ** 20,
  storageAlign: 16,
  shaderF16: true,
  subgroups: true,
  subgroupMinSize: 8,
  subgroupMaxSize: 8,
  maxBufferSize: 2 ** 31,
  maxWorkgroups: 65535,
};

/** The spec of a real engine's adapter, so a plan made here matches a run on it (bench:plan). */
export function specFromCaps(caps: AdapterCaps, limits: GPUSupportedLimits): MetaDeviceSpec {
  return {
    adapterClass: caps.adapterClass,
    maxBinding: caps.maxBinding,
    storageAlign: caps.storageAlign,
    shaderF16: caps.shaderF16,
    subgroups: caps.subgroups,
    subgroupMinSize: caps.subgroupMinSize,
    subgroupMaxSize: caps.subgroupMaxSize,
    maxBufferSize: limits.maxBufferSize,
    maxWorkgroups: limits.maxComputeWorkgroupsPerDimension,
  };
}

// The WebGPU constants our code reads as globals (from the spec; dawn.node installs the same values).
const CONSTANTS = {
  GPUBufferUsage: { MAP_READ: 0x1, MAP_WRITE: 0x2, COPY_SRC: 0x4, COPY_DST: 0x8, INDEX: 0x10, VERTEX: 0x20, UNIFORM: 0x40, STORAGE: 0x80, INDIRECT: 0x100, QUERY_RESOLVE: 0x200 },
  GPUMapMode: { READ: 0x1, WRITE: 0x2 },
  GPUShaderStage: { VERTEX: 0x1, FRAGMENT: 0x2, COMPUTE: 0x4 },
};

function installConstants(): void {
  const g = globalThis as Record<string, unknown>;
  for (const [k, v] of Object.entries(CONSTANTS)) if (g[k] === undefined) g[k] = v;
}

/**
 * Mapped ranges handed out, by size: one host buffer per size is reused (a context-parallel
 * forward's exchanges map and copy hundreds of MiB per block at real sizes; fresh zeroed buffers
 * would make the plan slow). Their contents mean nothing: a meta device has no data.
 */
const mappedRanges = new Map<number, ArrayBuffer>();

class MetaBuffer {
  constructor(
    readonly size: number,
    readonly usage: number,
    readonly label: string,
  ) {}
  async mapAsync(): Promise<void> {}
  /** a host buffer of the size asked (shared between meta buffers: no data, see mappedRanges) */
  getMappedRange(offset = 0, size?: number): ArrayBuffer {
    const n = size ?? this.size - offset;
    let b = mappedRanges.get(n);
    if (!b) {
      if (mappedRanges.size >= 16) mappedRanges.clear();
      b = new ArrayBuffer(n);
      mappedRanges.set(n, b);
    }
    return b;
  }
  unmap(): void {}
  destroy(): void {}
}

const noop = (): void => {};

/** A GpuContext for Engine over the meta device. */
export function createMetaGpu(spec: MetaDeviceSpec = GENERIC_GPU): GpuContext {
  installConstants();
  const limits = {
    maxStorageBufferBindingSize: spec.maxBinding,
    maxBufferSize: spec.maxBufferSize,
    minStorageBufferOffsetAlignment: spec.storageAlign,
    minUniformBufferOffsetAlignment: 256,
    maxComputeWorkgroupsPerDimension: spec.maxWorkgroups,
    maxComputeWorkgroupStorageSize: 32768,
    maxComputeInvocationsPerWorkgroup: 1024,
    maxComputeWorkgroupSizeX: 1024,
    maxComputeWorkgroupSizeY: 1024,
    maxComputeWorkgroupSizeZ: 64,
    maxStorageBuffersPerShaderStage: 10,
    maxBindingsPerBindGroup: 1000,
  } as unknown as GPUSupportedLimits;
  const pass = { setPipeline: noop, setBindGroup: noop, dispatchWorkgroups: noop, end: noop };
  const encoder = () => ({ beginComputePass: () => pass, copyBufferToBuffer: noop, clearBuffer: noop, resolveQuerySet: noop, finish: () => ({}) });
  const device = {
    features: new Set<string>(),
    limits,
    queue: { writeBuffer: noop, submit: noop, onSubmittedWorkDone: async () => {} },
    createBuffer: (d: GPUBufferDescriptor) => new MetaBuffer(d.size, d.usage, d.label ?? ''),
    pushErrorScope: noop,
    popErrorScope: async () => null,
    createShaderModule: () => ({ getCompilationInfo: async () => ({ messages: [] }) }),
    createComputePipeline: () => ({}),
    createBindGroupLayout: () => ({}),
    createPipelineLayout: () => ({}),
    createBindGroup: () => ({}),
    createCommandEncoder: encoder,
    createQuerySet: () => ({ destroy: noop }),
    destroy: noop,
  } as unknown as GPUDevice;
  const caps: AdapterCaps = {
    adapterClass: spec.adapterClass,
    vendor: 'meta',
    architecture: spec.adapterClass,
    device: 'plan',
    description: 'memory planner (no GPU)',
    backend: 'meta',
    shaderF16: spec.shaderF16,
    timestampQuery: false,
    subgroups: spec.subgroups,
    subgroupMinSize: spec.subgroupMinSize,
    subgroupMaxSize: spec.subgroupMaxSize,
    subgroupMatrix: false,
    subgroupMatrixConfigs: [],
    maxBinding: spec.maxBinding,
    storageAlign: spec.storageAlign,
  };
  return {
    device,
    caps,
    limits,
    takeErrors: () => [],
    lost: new Promise<GPUDeviceLostInfo>(() => {}),
    isLost: () => false,
    destroy: noop,
  };
}
