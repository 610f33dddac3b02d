// The one place that creates the Dawn instance, chooses the adapter, requests its real limits and
// features, reads what it can do (caps.ts), and turns device loss / uncaptured errors into loud errors.
//
// Adapter choice (first match wins): explicit options > environment (SD_WEBGPU_BACKEND,
// SD_WEBGPU_ADAPTER, SD_WEBGPU_POWER) > Dawn's default. Backend names are dawn.node's:
// 'vulkan', 'metal', 'd3d12', 'd3d11', 'opengl', 'opengles', 'null'.

import { mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NoAdapterError } from '../util/errors.ts';
import { readCaps, type AdapterCaps, type RawAdapterInfo } from './caps.ts';
import { withoutDawnLimitWarnings } from './dawn-stderr.ts';

/**
 * The Dawn toggles every device asks for (issue 26; docs/gpu-run.md): `vulkan_enable_f16_on_nvidia`
 * makes NVIDIA's Vulkan driver offer `shader-f16` (Dawn withholds it on drivers before 615.71),
 * `allow_unsafe_apis` lists the experimental `chromium-experimental-subgroup-matrix` feature (tensor
 * cores: Vulkan's cooperative matrices) where the adapter has it. Neither changes anything on an
 * adapter without them (lavapipe: the same features with and without, tested).
 */
export const DAWN_FEATURES = 'allow_unsafe_apis,vulkan_enable_f16_on_nvidia';
/** the subgroup-matrix feature, requested when the adapter lists it (its configs: AdapterCaps.subgroupMatrixConfigs) */
export const SUBGROUP_MATRIX = 'chromium-experimental-subgroup-matrix';

export interface GpuOptions {
  /** dawn.node backend, e.g. 'vulkan'. Env: SD_WEBGPU_BACKEND. */
  backend?: string;
  /** adapter name substring, e.g. 'llvmpipe' or 'NVIDIA'. Env: SD_WEBGPU_ADAPTER. */
  adapter?: string;
  powerPreference?: GPUPowerPreference;
  /** extra Dawn toggles: `enable-dawn-features=...` strings passed to create(). */
  dawnFlags?: string[];
  /** turn off optional features even when the adapter has them (tests of the fallback paths). */
  disableFeatures?: Array<'shader-f16' | 'timestamp-query' | 'subgroups' | typeof SUBGROUP_MATRIX>;
}

export interface GpuContext {
  device: GPUDevice;
  /** what the adapter and device can do (class, features, subgroup sizes, binding limits) */
  caps: AdapterCaps;
  limits: GPUSupportedLimits;
  /** Errors Dawn raised outside any error scope since the last check. */
  takeErrors(): GpuErrorRecord[];
  /** Resolves when the device is lost (never, unless something went badly wrong). */
  lost: Promise<GPUDeviceLostInfo>;
  isLost(): boolean;
  destroy(): void;
}

export interface GpuErrorRecord {
  kind: 'validation' | 'out-of-memory' | 'internal' | 'lost';
  message: string;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type DawnModule = { create: (flags: string[]) => GPU; globals: Record<string, any> };

let dawnModule: DawnModule | null = null;

async function loadDawn(): Promise<DawnModule> {
  if (dawnModule) return dawnModule;
  try {
    dawnModule = (await import('webgpu')) as unknown as DawnModule;
  } catch (err) {
    throw new NoAdapterError(
      `could not load dawn.node from the npm package 'webgpu' (${(err as Error).message}). ` +
        `Run 'npm ci' in the project folder.`,
    );
  }
  // GPUBufferUsage, GPUMapMode, ... are needed as globals by our code and by tfjs.
  Object.assign(globalThis, dawnModule.globals);
  return dawnModule;
}

const HOW_TO_GET_AN_ADAPTER =
  'WebGPU needs a Vulkan (or Metal/D3D12) driver. On a CPU-only Debian bookworm machine install ' +
  "Mesa's software Vulkan driver lavapipe (Mesa >= 24) from bookworm-backports as root: " +
  "add 'bookworm-backports' to the Suites: line of /etc/apt/sources.list.d/debian.sources, then " +
  "'apt-get update && apt-get install -y -t bookworm-backports mesa-vulkan-drivers libvulkan1' " +
  "(or run 'sudo .ci/install-vulkan.sh'). On a GPU machine install the vendor's Vulkan driver and libvulkan1.";

const instances = new Map<string, GPU>();
const enumerated = new WeakSet<GPU>();
let instancesCreated = 0;
/** Dawn instances created so far in this process (one per distinct set of flags). */
export function dawnInstanceCount(): number {
  return instancesCreated;
}

/** One adapter Dawn can open: its backend and name (the name `adapter=` matches against). */
export interface AdapterEntry {
  backend: string;
  name: string;
  /** a CPU implementation (lavapipe / llvmpipe, SwiftShader, softpipe) */
  software: boolean;
}

/** Dawn's Vulkan loader wants XDG_RUNTIME_DIR; a missing one only produces noise and failures. */
function ensureXdgRuntimeDir(): void {
  if (process.env.XDG_RUNTIME_DIR) return;
  const dir = join(tmpdir(), `smart-diffusion-xdg-${process.getuid?.() ?? 0}`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  process.env.XDG_RUNTIME_DIR = dir;
}

/** dawn.node's refusal of a backend name it does not know, as one line naming the ones it does (null: another refusal) */
function badBackend(msg: string): NoAdapterError | null {
  const m = /unrecognised backend '([^']*)'\s*Possible backends\s*:\s*(.*)/s.exec(msg);
  if (!m) return null;
  return new NoAdapterError(`[device] backend '${m[1]}' (device.backend, --backend, SD_WEBGPU_BACKEND) is not one dawn.node knows; use one of ${m[2]!.replace(/\s+/g, ' ').trim()}, or leave it empty`);
}

/** one adapter in the list dawn.node's refusal prints: backend, name */
const ADAPTER_LINE = /\* backend: '([^']*)', name: '([^\n]*)'$/gm;
/** no adapter is named this: asking for it makes dawn.node list what it has */
const NO_SUCH_ADAPTER = 'smart-diffusion: list the adapters';
const listed = new Map<string, Promise<AdapterEntry[]>>();

/**
 * The adapters dawn.node can open, in the order it searches them (the order `adapter=NAME` takes
 * the first whose name contains NAME). dawn.node has no enumeration API: this asks a Dawn instance
 * for an adapter no name matches, and reads the list its refusal prints (" * backend: 'vulkan',
 * name: '...'", src/dawn/node/binding/GPU.cpp). Cached per backend and power preference.
 */
export async function listAdapters(opts: { backend?: string; powerPreference?: GPUPowerPreference } = {}): Promise<AdapterEntry[]> {
  const backend = opts.backend ?? process.env.SD_WEBGPU_BACKEND;
  const power = opts.powerPreference ?? (process.env.SD_WEBGPU_POWER as GPUPowerPreference | undefined) ?? 'high-performance';
  const key = `${backend ?? ''}|${power}`;
  let p = listed.get(key);
  if (!p) {
    p = (async () => {
      ensureXdgRuntimeDir();
      const dawn = await loadDawn();
      const flags = [...(backend ? [`backend=${backend}`] : []), `adapter=${NO_SUCH_ADAPTER}`];
      const ikey = JSON.stringify(flags);
      let g = instances.get(ikey);
      if (!g) {
        g = dawn.create(flags);
        instancesCreated++;
        instances.set(ikey, g);
      }
      const inst = g;
      try {
        const a = await withoutDawnLimitWarnings(() => inst.requestAdapter({ powerPreference: power }));
        // (null: no adapter at all; an adapter: impossible, the name matches nothing)
        if (!a) return [];
        throw new NoAdapterError('[device] could not list the adapters: dawn.node returned one for a name no adapter has');
      } catch (err) {
        if (err instanceof NoAdapterError) throw err;
        const msg = (err as Error).message ?? String(err);
        const out = [...msg.matchAll(ADAPTER_LINE)].map((m) => ({ backend: m[1]!, name: m[2]!, software: /llvmpipe|lavapipe|swiftshader|softpipe/i.test(m[2]!) }));
        if (out.length === 0) throw badBackend(msg) ?? new NoAdapterError(`[device] could not list the adapters: dawn.node said ${JSON.stringify(msg.slice(0, 200))}. ${HOW_TO_GET_AN_ADAPTER}`);
        return out;
      }
    })();
    listed.set(key, p);
    p.catch(() => listed.delete(key));
  }
  return p;
}

export async function createGpu(opts: GpuOptions = {}): Promise<GpuContext> {
  ensureXdgRuntimeDir();
  const dawn = await loadDawn();
  const backend = opts.backend ?? process.env.SD_WEBGPU_BACKEND;
  const adapterName = opts.adapter ?? process.env.SD_WEBGPU_ADAPTER;
  const flags = [...(opts.dawnFlags ?? [])];
  // Dawn's features toggles, in ONE entry (a second enable-dawn-features= replaces the first): unless
  // the caller gives its own, DAWN_FEATURES (or SD_DAWN_FEATURES; 'none' for no entry)
  const features = process.env.SD_DAWN_FEATURES ?? DAWN_FEATURES;
  if (!flags.some((f) => f.startsWith('enable-dawn-features=')) && features && features !== 'none') flags.push(`enable-dawn-features=${features}`);
  if (backend) flags.push(`backend=${backend}`);
  if (adapterName) flags.push(`adapter=${adapterName}`);
  let gpu: GPU | null;
  try {
    // One Dawn instance per set of flags for the whole process. A new instance per device kept every
    // destroyed device's memory: on lavapipe 256 MiB uploaded on each of three engines in turn left
    // 265 -> 521 -> 777 MiB of (memfd) shared memory; with the instance reused, a new device reuses it.
    const key = JSON.stringify(flags);
    gpu = instances.get(key) ?? null;
    if (!gpu) {
      gpu = dawn.create(flags);
      instancesCreated++;
      instances.set(key, gpu);
    }
  } catch (err) {
    throw new NoAdapterError(`[device] dawn.node refused ${JSON.stringify(flags)}: ${(err as Error).message}. ${HOW_TO_GET_AN_ADAPTER}`);
  }
  const power = opts.powerPreference ?? (process.env.SD_WEBGPU_POWER as GPUPowerPreference | undefined) ?? 'high-performance';
  let adapter: GPUAdapter | null = null;
  try {
    const g = gpu;
    const ask = () => g.requestAdapter({ powerPreference: power });
    // an instance enumerates its adapters (and Dawn prints its limit warnings) at the first request only
    adapter = await (enumerated.has(g) ? ask() : withoutDawnLimitWarnings(ask));
    enumerated.add(g);
  } catch (err) {
    gpu = null;
    const msg = (err as Error).message;
    const which = [backend && `backend '${backend}'`, adapterName && `adapter '${adapterName}'`].filter(Boolean).join(', ');
    if (which && /Available adapters/.test(msg)) {
      // adapters exist, none matches what was asked for
      // (one line: Dawn lists them one per line)
      const names = [...msg.matchAll(ADAPTER_LINE)].map((m) => `'${m[2]}' (${m[1]})`);
      throw new NoAdapterError(
        `[device] no WebGPU adapter matches ${which}; this machine has ${names.join(', ') || 'none listed'}. ` +
          `Set SD_WEBGPU_ADAPTER / --adapter (or infer.diffusion.cp_devices) to one of them (a case-sensitive substring of the name is enough, or an index for cp_devices: npm run generate -- --list-adapters), or unset it.`,
      );
    }
    throw badBackend(msg) ?? new NoAdapterError(`[device] no WebGPU adapter (${msg.replace(/\s*\n\s*/g, '; ')}). ${HOW_TO_GET_AN_ADAPTER}`);
  }
  if (!adapter) {
    gpu = null;
    const which = [backend && `backend '${backend}'`, adapterName && `adapter '${adapterName}'`].filter(Boolean).join(', ');
    throw new NoAdapterError(`[device] no WebGPU adapter found${which ? ` for ${which}` : ''}. ${HOW_TO_GET_AN_ADAPTER}`);
  }
  const disabled = new Set(opts.disableFeatures ?? []);
  const want: GPUFeatureName[] = [];
  for (const f of ['shader-f16', 'timestamp-query', 'subgroups', SUBGROUP_MATRIX] as const) {
    if (adapter.features.has(f) && !disabled.has(f)) want.push(f as GPUFeatureName);
  }
  // Request the adapter's real limits (the defaults are far below what the hardware offers).
  const requiredLimits: Record<string, number> = {};
  const al = adapter.limits as unknown as Record<string, number>;
  for (const key of [
    'maxStorageBufferBindingSize',
    'maxBufferSize',
    'maxComputeWorkgroupStorageSize',
    'maxComputeInvocationsPerWorkgroup',
    'maxComputeWorkgroupSizeX',
    'maxComputeWorkgroupSizeY',
    'maxComputeWorkgroupSizeZ',
    'maxComputeWorkgroupsPerDimension',
    'maxStorageBuffersPerShaderStage',
    'maxBindingsPerBindGroup',
    'minStorageBufferOffsetAlignment',
    'minUniformBufferOffsetAlignment',
  ]) {
    const v = al[key];
    if (typeof v === 'number') requiredLimits[key] = v;
  }
  const device = await adapter.requestDevice({ requiredFeatures: want, requiredLimits });
  const info = adapter.info as GPUAdapterInfo & RawAdapterInfo;
  // dawn.node exposes the backend only in the description
  const caps = readCaps(info, backend ?? guessBackend(info.description), device.features, device.limits);
  const errors: GpuErrorRecord[] = [];
  let lostFlag = false;
  device.onuncapturederror = (ev: GPUUncapturedErrorEvent) => {
    const e = ev.error;
    const kind = e instanceof GPUOutOfMemoryError ? 'out-of-memory' : e instanceof GPUValidationError ? 'validation' : 'internal';
    errors.push({ kind, message: e.message });
  };
  const lost = device.lost.then((inf) => {
    lostFlag = true;
    if (inf.reason !== 'destroyed') errors.push({ kind: 'lost', message: `device lost (${inf.reason}): ${inf.message}` });
    return inf;
  });
  return {
    device,
    caps,
    limits: device.limits,
    takeErrors: () => errors.splice(0, errors.length),
    lost,
    isLost: () => lostFlag,
    destroy: () => {
      device.destroy();
      // Drop this context's references (the process-wide instance in `instances` stays: with no live
      // device it does not keep Node alive, measured with npm webgpu 0.6 on lavapipe: scripts and the CLI exit).
      adapter = null;
      gpu = null;
    },
  };
}

function guessBackend(desc: string): string {
  const d = desc.toLowerCase();
  if (d.includes('vulkan') || d.includes('mesa') || d.includes('llvmpipe')) return 'vulkan';
  if (d.includes('metal')) return 'metal';
  if (d.includes('d3d12')) return 'd3d12';
  return 'default';
}
