// Checkpoints: one .safetensors file, or a sharded set described by `*.safetensors.index.json`
// (`{"metadata": {...}, "weight_map": {key: shard file}}`), behind one read API; conversion of
// tensors to engine host tensors; and the strict loading helper the models use.
//
// A Checkpoint can also be a *renamed view* of another (same open files, keys mapped), which is
// how a transformer file in the original Wan layout is served under diffusers names.

import { promises as fsp } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { CheckpointError } from '../util/errors.ts';
import { Tensor, shapeStr, type HostArray } from '../tensor/tensor.ts';
import type { DType } from '../tensor/dtype.ts';
import { SafetensorsFile, rejectPickle, suggest, type TensorInfo, type StDType } from './safetensors.ts';
import { scanNonFinite, elementBits, nonFiniteKind, type FiniteDType } from '../ops/cpu/finite.ts';

interface Entry {
  file: SafetensorsFile;
  srcKey: string;
}

/** Shared state of the files of a checkpoint and its renamed views. */
interface Files {
  list: SafetensorsFile[];
}

export interface OpenCheckpointOptions {
  /** In a folder holding several candidates, prefer this base name (e.g. 'diffusion_pytorch_model'). */
  preferredName?: string;
}

export class Checkpoint {
  private constructor(
    /** what was opened: a .safetensors file or a .safetensors.index.json */
    readonly source: string,
    readonly sharded: boolean,
    private readonly entries: Map<string, Entry>,
    private readonly shared: Files,
  ) {}

  /**
   * Open a checkpoint: a `.safetensors` file, a `*.safetensors.index.json`, or a folder holding
   * exactly one of those (a folder with an index uses the index). Pickle files are refused.
   */
  static async open(path: string, opts: OpenCheckpointOptions = {}): Promise<Checkpoint> {
    const abs = resolve(path);
    rejectPickle(abs);
    let st;
    try {
      st = await fsp.stat(abs);
    } catch (err) {
      throw new CheckpointError(`[checkpoint] ${abs}: no such file or folder`, { cause: err });
    }
    if (st.isDirectory()) return Checkpoint.open(await findCheckpointIn(abs, opts.preferredName), opts);
    if (abs.endsWith('.index.json')) return Checkpoint.openIndex(abs);
    if (!abs.endsWith('.safetensors')) {
      throw new CheckpointError(`[checkpoint] ${abs}: expected a .safetensors file or a .safetensors.index.json`);
    }
    const f = await SafetensorsFile.open(abs);
    const entries = new Map<string, Entry>();
    for (const k of f.keys()) entries.set(k, { file: f, srcKey: k });
    return new Checkpoint(abs, false, entries, { list: [f] });
  }

  private static async openIndex(indexPath: string): Promise<Checkpoint> {
    let text: string;
    try {
      text = await fsp.readFile(indexPath, 'utf8');
    } catch (err) {
      throw new CheckpointError(`[checkpoint] ${indexPath}: cannot read the index (${(err as NodeJS.ErrnoException).code ?? err})`, { cause: err });
    }
    let idx: unknown;
    try {
      idx = JSON.parse(text);
    } catch (err) {
      throw new CheckpointError(`[checkpoint] ${indexPath}: malformed JSON (${(err as Error).message})`, { cause: err });
    }
    const wm = (idx as { weight_map?: unknown } | null)?.weight_map;
    if (wm === null || typeof wm !== 'object' || Array.isArray(wm)) {
      throw new CheckpointError(`[checkpoint] ${indexPath}: no "weight_map" object: not a safetensors index`);
    }
    const dir = dirname(indexPath);
    const byShard = new Map<string, string[]>();
    for (const [key, shard] of Object.entries(wm as Record<string, unknown>)) {
      if (typeof shard !== 'string' || shard === '' || shard.includes('/') || shard.includes('\\') || shard === '.' || shard === '..') {
        throw new CheckpointError(`[checkpoint] ${indexPath}: weight_map['${key}'] = ${JSON.stringify(shard)} is not a file name in the index's folder`);
      }
      if (!byShard.has(shard)) byShard.set(shard, []);
      byShard.get(shard)!.push(key);
    }
    if (byShard.size === 0) throw new CheckpointError(`[checkpoint] ${indexPath}: the weight_map is empty`);
    const files: SafetensorsFile[] = [];
    const entries = new Map<string, Entry>();
    try {
      for (const [shard, keys] of byShard) {
        const p = join(dir, shard);
        rejectPickle(p);
        try {
          await fsp.access(p);
        } catch (err) {
          throw new CheckpointError(
            `[checkpoint] ${indexPath}: shard '${shard}' is missing (${keys.length} keys map to it, e.g. '${keys[0]}'): the download is incomplete; download the folder again`,
            { cause: err },
          );
        }
        const f = await SafetensorsFile.open(p);
        files.push(f);
        for (const k of keys) {
          if (!f.has(k)) throw new CheckpointError(`[checkpoint] ${indexPath}: weight_map maps '${k}' to shard '${shard}', but ${p} has no such tensor: the index and the shards do not match`);
          entries.set(k, { file: f, srcKey: k });
        }
      }
    } catch (err) {
      await Promise.all(files.map((f) => f.close().catch(() => undefined)));
      throw err;
    }
    return new Checkpoint(indexPath, true, entries, { list: files });
  }

  /** Keys, in index / file order. */
  keys(): string[] {
    return [...this.entries.keys()];
  }
  has(key: string): boolean {
    return this.entries.has(key);
  }
  get size(): number {
    return this.entries.size;
  }
  /** Absolute paths of the .safetensors files. */
  files(): string[] {
    return this.shared.list.map((f) => f.path);
  }
  /** Bytes read from disk so far by all files (header included). */
  get bytesRead(): number {
    return this.shared.list.reduce((a, f) => a + f.bytesRead, 0);
  }
  /** `__metadata__` of the first file. */
  metadata(): Record<string, string> {
    return this.shared.list[0]?.metadata() ?? {};
  }
  /** Total bytes of all tensors. */
  get totalBytes(): number {
    let n = 0;
    for (const e of this.entries.values()) n += e.file.info(e.srcKey).byteLength;
    return n;
  }

  info(key: string): TensorInfo {
    const e = this.entry(key);
    return { ...e.file.info(e.srcKey), key };
  }
  async read(key: string): Promise<Uint8Array> {
    const e = this.entry(key);
    return e.file.read(e.srcKey);
  }
  async readInto(key: string, target: Uint8Array): Promise<void> {
    const e = this.entry(key);
    return e.file.readInto(e.srcKey, target);
  }
  async readRange(key: string, start: number, length: number, target?: Uint8Array): Promise<Uint8Array> {
    const e = this.entry(key);
    return e.file.readRange(e.srcKey, start, length, target);
  }

  /**
   * A view with renamed keys over the same open files. `rename(key)` gives the new name or null
   * (the key is left out and listed in `unmapped`). Two keys mapping to one name is an error.
   * Closing the view closes the shared files.
   */
  renamed(rename: (key: string) => string | null): { checkpoint: Checkpoint; unmapped: string[] } {
    const entries = new Map<string, Entry>();
    const unmapped: string[] = [];
    for (const [k, e] of this.entries) {
      const nk = rename(k);
      if (nk === null) {
        unmapped.push(k);
        continue;
      }
      if (entries.has(nk)) throw new CheckpointError(`[checkpoint] ${this.source}: keys '${entries.get(nk)!.srcKey}' and '${e.srcKey}' both map to '${nk}'`);
      entries.set(nk, e);
    }
    return { checkpoint: new Checkpoint(this.source, this.sharded, entries, this.shared), unmapped };
  }

  /** Human-readable name of the checkpoint for messages. */
  describe(): string {
    return this.sharded ? `${this.source} (${this.shared.list.length} shards)` : this.source;
  }
  /** The file that holds `key` (for messages). */
  fileOf(key: string): string {
    return this.entries.get(key)?.file.path ?? this.describe();
  }

  async close(): Promise<void> {
    await Promise.all(this.shared.list.map((f) => f.close()));
  }

  private entry(key: string): Entry {
    const e = this.entries.get(key);
    if (!e) throw new CheckpointError(`[checkpoint] ${this.describe()}: no tensor '${key}'${suggest(key, this.entries.keys())}`);
    return e;
  }
}

/** The checkpoint to open inside a folder: its single index, or its single .safetensors file. */
export async function findCheckpointIn(dir: string, preferredName?: string): Promise<string> {
  let names: string[];
  try {
    names = (await fsp.readdir(dir)).sort();
  } catch (err) {
    throw new CheckpointError(`[checkpoint] ${dir}: cannot list the folder (${(err as NodeJS.ErrnoException).code ?? err})`, { cause: err });
  }
  const pick = (cands: string[], ext: string): string | null => {
    if (cands.length === 1) return join(dir, cands[0]!);
    if (cands.length > 1 && preferredName && cands.includes(preferredName + ext)) return join(dir, preferredName + ext);
    if (cands.length > 1) {
      throw new CheckpointError(`[checkpoint] ${dir}: several candidate checkpoints (${cands.join(', ')}); pass the file or index to open explicitly`);
    }
    return null;
  };
  const idx = pick(names.filter((n) => n.endsWith('.safetensors.index.json')), '.safetensors.index.json');
  if (idx) return idx;
  const single = pick(names.filter((n) => n.endsWith('.safetensors')), '.safetensors');
  if (single) return single;
  const pickles = names.filter((n) => /\.(bin|pt|pth|ckpt|pkl)$/i.test(n));
  if (pickles.length > 0) rejectPickle(join(dir, pickles[0]!));
  throw new CheckpointError(`[checkpoint] ${dir}: no .safetensors file or .safetensors.index.json in this folder`);
}

// ---- engine tensors ----

/** The engine dtype a safetensors dtype loads as (16-bit floats stay 16-bit; ints become i32). */
/** The engine dtype a file dtype is read as (readTensor). */
export function engineDTypeOf(dt: StDType): DType {
  switch (dt) {
    case 'F32':
    case 'F64':
      return 'f32';
    case 'F16':
      return 'f16';
    case 'BF16':
      return 'bf16';
    case 'U32':
      return 'u32';
    case 'BOOL':
    case 'U8':
    case 'I8':
    case 'I16':
    case 'U16':
    case 'I32':
    case 'I64':
    case 'U64':
      return 'i32';
    case 'F8_E4M3':
    case 'F8_E5M2':
      throw new CheckpointError(`[checkpoint] dtype ${dt} is not supported by the engine (no fp8 kernels); use an f32/f16/bf16 checkpoint`);
  }
}

/**
 * Read one tensor as a host (CPU) engine tensor. F32 → f32; F16/BF16 → f16/bf16 kept as raw 16-bit
 * words (never widened); I32 → i32; U32 → u32; I64/U64 → i32 with a range check; smaller ints →
 * i32; F64 → f32 (rounded). `expectShape` throws with both shapes when the stored shape differs.
 * `shared`: F32/F16/BF16/I32/U32 data is read straight into a SharedArrayBuffer, which the CPU
 * device's worker threads read without a copy.
 * `finite`: float data is scanned for NaN/±Inf as read (a weight must be finite: a corrupt file
 * otherwise gives a black or garbage video with no error); see `assertFinite`.
 */
export async function readTensor(ckpt: Checkpoint, key: string, opts: { expectShape?: readonly number[]; what?: string; shared?: boolean; finite?: boolean } = {}): Promise<Tensor> {
  const info = ckpt.info(key);
  const what = opts.what ? `${opts.what}: ` : '';
  if (opts.expectShape && !sameShape(info.shape, opts.expectShape)) {
    throw new CheckpointError(`[checkpoint] ${what}key '${key}' in ${info.file} has shape ${shapeStr(info.shape)}, expected ${shapeStr(opts.expectShape)}: the weights do not match the config`);
  }
  const dt = engineDTypeOf(info.dtype);
  const n = numel(info.shape);
  const mem = (bytesPer: number): ArrayBufferLike => (opts.shared ? new SharedArrayBuffer(n * bytesPer) : new ArrayBuffer(n * bytesPer));
  let data: HostArray;
  switch (info.dtype) {
    case 'F32':
      data = new Float32Array(mem(4));
      await ckpt.readInto(key, bytesOf(data));
      break;
    case 'F16':
    case 'BF16':
      data = new Uint16Array(mem(2));
      await ckpt.readInto(key, bytesOf(data));
      break;
    case 'I32':
      data = new Int32Array(mem(4));
      await ckpt.readInto(key, bytesOf(data));
      break;
    case 'U32':
      data = new Uint32Array(mem(4));
      await ckpt.readInto(key, bytesOf(data));
      break;
    case 'F64': {
      const src = new Float64Array(n);
      await ckpt.readInto(key, bytesOf(src));
      data = Float32Array.from(src);
      break;
    }
    case 'I64':
    case 'U64': {
      const src = info.dtype === 'I64' ? new BigInt64Array(n) : new BigUint64Array(n);
      await ckpt.readInto(key, bytesOf(src));
      const out = new Int32Array(n);
      for (let i = 0; i < n; i++) {
        const v = src[i]!;
        if (v > 2147483647n || v < -2147483648n) {
          throw new CheckpointError(`[checkpoint] ${what}key '${key}' in ${info.file}: ${info.dtype} value ${v} at index ${i} does not fit in i32 (the engine's integer type)`);
        }
        out[i] = Number(v);
      }
      data = out;
      break;
    }
    default: {
      const raw = await ckpt.read(key);
      const out = new Int32Array(n);
      const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
      for (let i = 0; i < n; i++) {
        switch (info.dtype) {
          case 'BOOL':
          case 'U8':
            out[i] = dv.getUint8(i);
            break;
          case 'I8':
            out[i] = dv.getInt8(i);
            break;
          case 'I16':
            out[i] = dv.getInt16(2 * i, true);
            break;
          case 'U16':
            out[i] = dv.getUint16(2 * i, true);
            break;
        }
      }
      data = out;
    }
  }
  if (opts.finite && (dt === 'f32' || dt === 'f16' || dt === 'bf16')) assertFinite(info, data, dt);
  return Tensor.cpu(data, info.shape, dt);
}

/**
 * Throw a CheckpointError naming the file and the key when `data` (tensor `info`, as loaded: f32 or
 * raw 16-bit words) holds NaN/±Inf. The scan is by exponent bits over 32-bit words (src/ops/cpu/finite.ts,
 * ~4-5.5 GB/s on one core).
 */
export function assertFinite(info: TensorInfo, data: ArrayBufferView, dt: FiniteDType): void {
  const { count, first } = scanNonFinite(data, dt);
  if (count === 0) return;
  const kind = nonFiniteKind(elementBits(data, dt, first), dt);
  throw new CheckpointError(
    `[checkpoint] ${info.file}: tensor '${info.key}' ${shapeStr(info.shape)} ${info.dtype} has ${count.toLocaleString('en-US')} non-finite ` +
      `value${count === 1 ? '' : 's'} (NaN/Inf; the first at flat index ${first}: ${kind}); the file is corrupt: re-download it (or re-export it from the original weights)`,
  );
}

function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

// ---- strict loading ----

export interface WeightSpec {
  /** key relative to `prefix` */
  key: string;
  shape: readonly number[];
}

export interface StrictOptions {
  /** prepended to every spec key; `unused` then only lists keys under this prefix */
  prefix?: string;
  /** what is being loaded, for messages (e.g. 'transformer') */
  what?: string;
}

/**
 * Check `spec` against the checkpoint's headers without reading any data: every key present with
 * the expected shape. Throws a CheckpointError naming every missing key (with the file) or the
 * first mis-shaped key (both shapes). Returns the keys under `prefix` that the spec does not use.
 */
export function checkSpec(ckpt: Checkpoint, spec: readonly WeightSpec[], opts: StrictOptions = {}): { unused: string[] } {
  const prefix = opts.prefix ?? '';
  const what = opts.what ? `${opts.what}: ` : '';
  const wanted = new Set<string>();
  const missing: string[] = [];
  for (const s of spec) {
    const full = prefix + s.key;
    if (wanted.has(full)) throw new CheckpointError(`[checkpoint] ${what}key '${full}' is listed twice in the weight spec`);
    wanted.add(full);
    if (!ckpt.has(full)) missing.push(full);
  }
  if (missing.length > 0) {
    const shown = missing.slice(0, 8).map((k) => `'${k}'${suggest(k, ckpt.keys())}`);
    throw new CheckpointError(
      `[checkpoint] ${what}missing ${missing.length === 1 ? 'key' : `${missing.length} keys`} ${shown.join(', ')}${missing.length > 8 ? `, ... (${missing.length - 8} more)` : ''} in ${ckpt.describe()}: ` +
        `the checkpoint does not match the model (wrong folder, another model variant, or an incomplete download)`,
    );
  }
  for (const s of spec) {
    const full = prefix + s.key;
    const info = ckpt.info(full);
    if (!sameShape(info.shape, s.shape)) {
      throw new CheckpointError(
        `[checkpoint] ${what}key '${full}' in ${info.file} has shape ${shapeStr(info.shape)}, expected ${shapeStr(s.shape)}: the weights do not match the config (another model size?)`,
      );
    }
  }
  const unused = ckpt.keys().filter((k) => k.startsWith(prefix) && !wanted.has(k));
  return { unused };
}

/**
 * Load `spec` strictly as host tensors, keyed by the spec's (relative) keys. A missing key throws
 * with its full name and the file, a mis-shaped key with both shapes; all of that is checked on
 * the headers before any data is read. Keys the spec does not use are returned in `unused`
 * (a real VAE file also holds the encoder): ignoring them is the caller's decision.
 */
export async function loadStrict(ckpt: Checkpoint, spec: readonly WeightSpec[], opts: StrictOptions = {}): Promise<{ tensors: Map<string, Tensor>; unused: string[] }> {
  const { unused } = checkSpec(ckpt, spec, opts);
  const prefix = opts.prefix ?? '';
  const tensors = new Map<string, Tensor>();
  for (const s of spec) tensors.set(s.key, await readTensor(ckpt, prefix + s.key, { what: opts.what }));
  return { tensors, unused };
}
