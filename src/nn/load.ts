// Loading a module tree from a checkpoint: the spec is the tree walk (key + shape of every Param),
// checked strictly against the file headers before any data is read (missing / mis-shaped keys
// throw with the full key; unused keys are returned: a real VAE file also holds the encoder).
// Tensors are then read one at a time, converted per the precision policy, and either uploaded
// (owner tag `<owner>.<key>`, so memory snapshots show them) or kept in host memory.

import type { Module, Param } from './module.ts';
import { targetDtype } from './module.ts';
import type { Engine } from '../runtime/engine.ts';
import type { Checkpoint } from '../io/checkpoint.ts';
import { checkSpec, readTensor } from '../io/checkpoint.ts';
import { Tensor } from '../tensor/tensor.ts';
import { type DType, encode } from '../tensor/dtype.ts';

export type WeightDtype = 'checkpoint' | 'f32' | 'f16' | 'bf16';

export interface LoadOptions {
  /** where device-placed parameters go; null: everything stays on the CPU device */
  engine: Engine | null;
  /** owner tag prefix in memory accounting, e.g. 'dit' */
  owner: string;
  /** dtype of 'checkpoint'-policy params (matmul/conv weights) */
  weightDtype?: WeightDtype;
  /** per key: 'device' (default) or 'host' (kept in host memory, e.g. streamed DiT blocks) */
  placement?: (key: string) => 'device' | 'host';
  /** progress callback (bytes read so far, total bytes) */
  onProgress?: (done: number, total: number) => void;
}

export interface LoadResult {
  unused: string[];
  deviceBytes: number;
  hostBytes: number;
}

/** Convert a host tensor to `dt` (f32 <-> f16 <-> bf16), keeping raw 16-bit words for 16-bit types. */
function convertHost(t: Tensor, dt: DType): Tensor {
  if (t.dtype === dt) return t;
  const values = t.hostValues();
  if (dt === 'f32') return Tensor.cpu(values instanceof Float32Array ? values : Float32Array.from(values), t.shape, 'f32');
  const bytes = encode(dt, values);
  const out = dt === 'f16' || dt === 'bf16' ? new Uint16Array(bytes.buffer) : dt === 'i32' ? new Int32Array(bytes.buffer) : new Uint32Array(bytes.buffer);
  return Tensor.cpu(out, t.shape, dt);
}

export async function loadModule(module: Module, ckpt: Checkpoint, opts: LoadOptions): Promise<LoadResult> {
  const params = module.namedParams();
  const spec = params.map(([key, p]) => ({ key, shape: p.shape }));
  const { unused } = checkSpec(ckpt, spec, { what: opts.owner });
  const total = params.reduce((a, [key]) => a + ckpt.info(key).byteLength, 0);
  let done = 0;
  let deviceBytes = 0;
  let hostBytes = 0;
  let sinceSync = 0;
  for (const [key, p] of params) {
    // the CPU device (no engine) computes on worker threads: its weights go to shared memory
    const host = await readTensor(ckpt, key, { expectShape: p.shape, what: opts.owner, shared: !opts.engine });
    const dt = targetDtype(p, host.dtype, opts.weightDtype ?? 'checkpoint');
    const conv = convertHost(host, dt);
    setParam(p, conv, opts, key);
    if (p.value!.device === 'gpu') {
      deviceBytes += p.value!.nbytes;
      sinceSync += p.value!.nbytes;
      // Dawn keeps each writeBuffer's staging copy until the queue has consumed it: let it go
      // every 256 MiB, or loading a 28 GB checkpoint would hold a second copy in host memory
      if (sinceSync > 256 * 2 ** 20 && opts.engine) {
        await opts.engine.sync();
        sinceSync = 0;
      }
    } else hostBytes += p.value!.nbytes;
    done += ckpt.info(key).byteLength;
    opts.onProgress?.(done, total);
  }
  return { unused, deviceBytes, hostBytes };
}

/** loadModule from a checkpoint opened for it (a model folder's component) and closed after, also on failure. */
export async function loadModuleFrom(module: Module, source: { open(): Promise<Checkpoint> }, opts: LoadOptions): Promise<LoadResult> {
  const ck = await source.open();
  try {
    return await loadModule(module, ck, opts);
  } finally {
    await ck.close();
  }
}

function setParam(p: Param, host: Tensor, opts: LoadOptions, key: string): void {
  p.value?.dispose();
  const place = opts.placement?.(key) ?? 'device';
  if (opts.engine && place === 'device') {
    const t = host.toGpu(opts.engine, `${opts.owner}.${key}`);
    opts.engine.keep(t);
    p.value = t;
  } else {
    p.value = host;
  }
}
