// Loading a module tree from a checkpoint: the spec is the tree walk (key + shape of every Param),
// checked strictly against the file headers before any data is read (missing / mis-shaped keys
// throw with the full key; unused keys are returned: a real VAE file also holds the encoder).
// Tensors are then read one at a time, scanned for NaN/±Inf as read (a CheckpointError naming the
// key and the file), converted per the precision policy, and either uploaded (owner tag
// `<owner>.<key>`, so memory snapshots show them) or kept in host memory.

import type { Module, Param } from './module.ts';
import { targetDtype } from './module.ts';
import type { Engine } from '../runtime/engine.ts';
import type { Checkpoint } from '../io/checkpoint.ts';
import { assertFinite, checkSpec, readTensor, engineDTypeOf } from '../io/checkpoint.ts';
import { diskRefOf } from '../pipeline/disk-weights.ts';
import { Tensor } from '../tensor/tensor.ts';
import { type DType, encode } from '../tensor/dtype.ts';
import { CheckpointError, ConfigError } from '../util/errors.ts';
import { scanNonFinite } from '../ops/cpu/finite.ts';

export type WeightDtype = 'checkpoint' | 'f32' | 'f16' | 'bf16';

export interface LoadOptions {
  /** where device-placed parameters go; null: everything stays on the CPU device */
  engine: Engine | null;
  /** owner tag prefix in memory accounting, e.g. 'dit' */
  owner: string;
  /** dtype of 'checkpoint'-policy params (matmul/conv weights) */
  weightDtype?: WeightDtype;
  /**
   * per key: 'device' (default), 'host' (kept in host memory, e.g. streamed DiT blocks) or 'disk'
   * (not read: a meta placeholder of the target dtype and `Param.disk`, read per use; no NaN scan)
   */
  placement?: (key: string) => 'device' | 'host' | 'disk';
  /** load only these keys (the others keep their values); default all */
  only?: (key: string) => boolean;
  /** progress callback (bytes read so far, total bytes) */
  onProgress?: (done: number, total: number) => void;
  /**
   * scan every float weight for NaN/±Inf as it is read (default true): ~4-5 GB/s on one core, i.e.
   * ~0.55 s for the 1.3B DiT's 2.65 GiB (a host load of it from the page cache took ~1.5 s here)
   */
  checkFinite?: boolean;
}

/** File dtypes a (float) parameter may be loaded from. */
const FLOAT_FILE_DTYPES = new Set(['F32', 'F16', 'BF16', 'F64']);

export interface LoadResult {
  unused: string[];
  deviceBytes: number;
  hostBytes: number;
}

/** Convert a host tensor to `dt` (f32 <-> f16 <-> bf16), keeping raw 16-bit words for 16-bit types. */
export function convertHost(t: Tensor, dt: DType): Tensor {
  if (t.dtype === dt) return t;
  const values = t.hostValues();
  if (dt === 'f32') return Tensor.cpu(values instanceof Float32Array ? values : Float32Array.from(values), t.shape, 'f32');
  const bytes = encode(dt, values);
  const out = dt === 'f16' || dt === 'bf16' ? new Uint16Array(bytes.buffer) : dt === 'i32' ? new Int32Array(bytes.buffer) : new Uint32Array(bytes.buffer);
  return Tensor.cpu(out, t.shape, dt);
}

export async function loadModule(module: Module, ckpt: Checkpoint, opts: LoadOptions): Promise<LoadResult> {
  const all = module.namedParams();
  const params = opts.only ? all.filter(([k]) => opts.only!(k)) : all;
  const spec = params.map(([key, p]) => ({ key, shape: p.shape }));
  const { unused } = checkSpec(ckpt, spec, { what: opts.owner });
  // every Param of the models is a float (policy 'checkpoint' or 'f32'): an integer tensor under a
  // weight's name is a wrong or damaged file, refused on the headers before any data is read
  for (const [key, p] of params) {
    const info = ckpt.info(key);
    if (!FLOAT_FILE_DTYPES.has(info.dtype)) {
      throw new CheckpointError(
        `[checkpoint] ${opts.owner}: tensor '${key}' in ${info.file} is ${info.dtype}, expected a float tensor (F32, F16 or BF16${p.policy === 'f32' ? '; used as f32' : ''}); the file does not match the model: re-download it or re-export it with float weights`,
      );
    }
  }
  const total = params.reduce((a, [key]) => a + ckpt.info(key).byteLength, 0);
  let done = 0;
  let deviceBytes = 0;
  let hostBytes = 0;
  let sinceSync = 0;
  const check = opts.checkFinite ?? true;
  for (const [key, p] of params) {
    if (opts.placement?.(key) === 'disk') {
      // read per use (pipeline/disk-weights.ts): nothing read now
      const info = ckpt.info(key);
      const dt = targetDtype(p, engineDTypeOf(info.dtype), opts.weightDtype ?? 'checkpoint');
      p.value?.dispose();
      p.value = Tensor.meta(p.shape, dt);
      p.disk = diskRefOf(ckpt, key, dt);
      done += info.byteLength;
      opts.onProgress?.(done, total);
      continue;
    }
    // the CPU device (no engine) computes on worker threads: its weights go to shared memory
    const host = await readTensor(ckpt, key, { expectShape: p.shape, what: opts.owner, shared: !opts.engine });
    // NaN/±Inf in a weight: a CheckpointError naming the key and the file (~4-5 GB/s on one core)
    if (check && (host.dtype === 'f32' || host.dtype === 'f16' || host.dtype === 'bf16')) assertFinite(ckpt.info(key), host.data!, host.dtype);
    const dt = targetDtype(p, host.dtype, opts.weightDtype ?? 'checkpoint');
    const conv = convertHost(host, dt);
    // f16 is the one conversion that can overflow (|x| > 65504 becomes ±Inf); the file was finite
    if (check && dt === 'f16' && host.dtype !== 'f16') {
      const { count } = scanNonFinite(conv.data!, 'f16');
      if (count > 0) {
        throw new ConfigError(
          `[load] ${opts.owner}: tensor '${key}' in ${ckpt.fileOf(key)} has ${count.toLocaleString('en-US')} value${count === 1 ? '' : 's'} beyond f16's range (±65504) that become Inf as f16; use infer.weight_dtype=checkpoint or bf16`,
        );
      }
    }
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
