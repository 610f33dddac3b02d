// A safetensors reader/writer of our own.
//
// Format (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 N, then N bytes of
// UTF-8 JSON `{ "__metadata__": {str: str}, "<key>": { "dtype", "shape", "data_offsets": [begin,
// end] }, ... }` (may be padded with spaces), then the data region. Offsets are relative to the
// start of the data region; the tensors must tile it exactly: sorted by offset they start at 0,
// each begins where the previous ends (no gap, no overlap) and the last ends at the end of the
// file. Data is little-endian, row-major.
//
// Only the header is read on open. Each tensor is read when asked for, by positioned reads
// (FileHandle.read at an absolute offset, in chunks of at most 64 MiB), so a 28 GB checkpoint is
// never read whole and never mapped. Every validation failure is a CheckpointError naming the
// file (and the key); nothing here allocates more than the header cap or the tensor asked for.

import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { endianness } from 'node:os';
import { resolve } from 'node:path';
import { CheckpointError, fmtBytes } from '../util/errors.ts';
import { withAtomicFile, writeAll } from './atomic.ts';

/** Element types of the safetensors format. */
export type StDType = 'BOOL' | 'U8' | 'I8' | 'F8_E5M2' | 'F8_E4M3' | 'I16' | 'U16' | 'F16' | 'BF16' | 'I32' | 'U32' | 'F32' | 'F64' | 'I64' | 'U64';

/** Bytes per element of each safetensors dtype. */
const ST_DTYPE_SIZE: Readonly<Record<StDType, number>> = Object.freeze({
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
});

function isStDType(s: unknown): s is StDType {
  return typeof s === 'string' && Object.prototype.hasOwnProperty.call(ST_DTYPE_SIZE, s);
}

export interface TensorInfo {
  key: string;
  dtype: StDType;
  shape: number[];
  /** numel × dtype size */
  byteLength: number;
  /** absolute path of the file holding the tensor */
  file: string;
  /** absolute byte offset of the tensor's first byte in `file` */
  offset: number;
}

/** Largest header accepted (the reference implementation uses the same cap). */
export const MAX_HEADER_BYTES = 100_000_000;
/** Largest single positioned read. */
const READ_CHUNK = 64 * 1024 * 1024;

const PICKLE_EXTENSIONS = ['.bin', '.pt', '.pth', '.ckpt', '.pkl', '.pickle'];

/** Throws the "no pickle, ever" error when `path` has a PyTorch pickle extension. */
export function rejectPickle(path: string): void {
  const lower = path.toLowerCase();
  const ext = PICKLE_EXTENSIONS.find((e) => lower.endsWith(e));
  if (ext) {
    throw new CheckpointError(
      `[safetensors] ${path}: '${ext}' files are PyTorch pickles, which can run arbitrary code when loaded; they are not supported. ` +
        `Use the .safetensors release of the model (the -Diffusers repos ship safetensors), or convert it once in Python: ` +
        `python -c "import torch, safetensors.torch as st; st.save_file(torch.load('${path}', map_location='cpu', weights_only=True), 'model.safetensors')"`,
    );
  }
}

function hintForMagic(first: Uint8Array): string {
  if (first[0] === 0x50 && first[1] === 0x4b) return ' (the file starts with "PK": it is a zip archive, probably a PyTorch .pt/.bin checkpoint renamed; convert it to safetensors)';
  if (first[0] === 0x80 && first[1]! >= 2 && first[1]! <= 5) return ' (the file starts like a Python pickle: a PyTorch checkpoint; convert it to safetensors)';
  if (first[0] === 0x7b) return ' (the file starts with "{": is it a JSON file, e.g. an index or config?)';
  if (first[0] === 0x76 && first[1] === 0x65 && first[2] === 0x72) return ' (the file starts with "ver": is it a Git LFS pointer? run `git lfs pull` or download with huggingface-cli)';
  return '';
}

/**
 * A key for a one-line message: 'key' when it is short printable text, else JSON-escaped (newlines,
 * controls, bidi overrides) and cut: a header is untrusted, and its keys and values may be anything.
 */
function q(key: string, quote = true): string {
  if (key.length <= 200 && /^[\x20-\x26\x28-\x7e]*$/.test(key)) return quote ? `'${key}'` : key;
  return brief(key);
}

/** A header value for a one-line message: JSON, non-ASCII escaped, cut to 100 characters. */
function brief(v: unknown): string {
  let t: string;
  try {
    t = JSON.stringify(v) ?? String(v);
  } catch {
    t = String(v);
  }
  t = t.replace(/[^\x20-\x7e]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  return t.length > 100 ? `${t.slice(0, 97)}...` : t;
}

/**
 * A message from elsewhere (JSON.parse quotes a piece of its input, newlines included) on one line:
 * control and line-separator characters escaped, cut to `max` characters.
 */
export function oneLine(msg: string, max = 200): string {
  const t = msg.replace(/[\x00-\x1f\x7f\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  return t.length > max ? `${t.slice(0, max - 3)}...` : t;
}

interface ParsedHeader {
  infos: Map<string, TensorInfo>;
  metadata: Record<string, string>;
  dataEnd: number;
}

/**
 * Validate a header against the format rules and the file size. `headerLength` is N; `json` the
 * decoded header text. Pure (no I/O), exported for tests.
 */
function parseSafetensorsHeader(path: string, fileSize: number, headerLength: number, json: string): ParsedHeader {
  const where = `[safetensors] ${path}`;
  if (!json.startsWith('{')) throw new CheckpointError(`${where}: the JSON header does not start with '{' (the format requires it): not a safetensors file, or a corrupt one; download it again`);
  let raw: unknown;
  try {
    raw = JSON.parse(json);
  } catch (err) {
    throw new CheckpointError(`${where}: malformed JSON header (${oneLine((err as Error).message)}): the file is corrupt or not a safetensors file`, { cause: err });
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new CheckpointError(`${where}: the JSON header must be an object`);
  // JSON.parse keeps the last of duplicated keys silently; the reference reader refuses them (a file
  // whose two entries for one tensor disagree is corrupt or crafted, and which one wins is arbitrary)
  const dup = findDuplicateKey(json);
  if (dup) {
    const [key, ...inner] = dup;
    throw new CheckpointError(
      inner.length === 0
        ? `${where}: the JSON header has the key ${q(key)} twice: the file is corrupt; download it again`
        : `${where}: ${key === '__metadata__' ? key : `tensor ${q(key)}`}: the JSON header has the field ${q(inner.join('.'))} twice: the file is corrupt; download it again`,
    );
  }
  const dataStart = 8 + headerLength;
  const metadata: Record<string, string> = {};
  const entries: Array<{ key: string; begin: number; end: number; info: TensorInfo }> = [];
  for (const [key, v] of Object.entries(raw as Record<string, unknown>)) {
    if (key === '__metadata__') {
      if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new CheckpointError(`${where}: __metadata__ must be an object of strings`);
      for (const [mk, mv] of Object.entries(v as Record<string, unknown>)) {
        if (typeof mv !== 'string') throw new CheckpointError(`${where}: __metadata__.${q(mk, false)} must be a string, got ${brief(mv)}`);
        metadata[mk] = mv;
      }
      continue;
    }
    const t = `${where}: tensor ${q(key)}`;
    if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new CheckpointError(`${t}: entry must be an object with dtype, shape and data_offsets`);
    const e = v as Record<string, unknown>;
    if (!isStDType(e.dtype)) {
      throw new CheckpointError(`${t}: unknown dtype ${brief(e.dtype)} (supported: ${Object.keys(ST_DTYPE_SIZE).join(', ')})`);
    }
    if (!Array.isArray(e.shape)) throw new CheckpointError(`${t}: shape must be an array of integers, got ${brief(e.shape)}`);
    const shape: number[] = [];
    let numel = 1;
    for (const d of e.shape) {
      if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) throw new CheckpointError(`${t}: invalid shape ${brief(e.shape)}: dimensions must be integers >= 0`);
      shape.push(d);
      numel *= d;
    }
    const byteLength = numel * ST_DTYPE_SIZE[e.dtype];
    if (!Number.isSafeInteger(byteLength)) throw new CheckpointError(`${t}: shape [${shape.join(', ')}] is too large`);
    const off = e.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every((x) => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0)) {
      throw new CheckpointError(`${t}: data_offsets must be two integers [begin, end] >= 0, got ${brief(off)}`);
    }
    const [begin, end] = off as [number, number];
    if (end < begin) throw new CheckpointError(`${t}: data_offsets [${begin}, ${end}] end before they begin`);
    if (end - begin !== byteLength) {
      throw new CheckpointError(
        `${t}: data_offsets [${begin}, ${end}] hold ${end - begin} bytes but shape [${shape.join(', ')}] × ${e.dtype} (${ST_DTYPE_SIZE[e.dtype]} B) needs ${byteLength} bytes`,
      );
    }
    entries.push({ key, begin, end, info: { key, dtype: e.dtype, shape, byteLength, file: path, offset: dataStart + begin } });
  }
  // The tensors must tile the data region: sorted by offset, contiguous from 0, no overlap, no gap.
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let pos = 0;
  let prev: (typeof entries)[number] | null = null;
  for (const en of entries) {
    if (en.begin < pos) {
      throw new CheckpointError(`${where}: tensor ${q(en.key)} [${en.begin}, ${en.end}) overlaps tensor ${q(prev!.key)} [${prev!.begin}, ${prev!.end}): the header is corrupt`);
    }
    if (en.begin > pos) {
      throw new CheckpointError(
        prev
          ? `${where}: gap of ${en.begin - pos} bytes between tensor ${q(prev.key)} (ends at ${pos}) and tensor ${q(en.key)} (begins at ${en.begin}): the header is corrupt`
          : `${where}: the data region must start with a tensor at offset 0, but the first tensor ${q(en.key)} begins at ${en.begin}: the header is corrupt`,
      );
    }
    pos = en.end;
    prev = en;
  }
  const expected = dataStart + pos;
  if (expected > fileSize) {
    throw new CheckpointError(
      `${where}: the file is truncated: the header describes ${fmtBytes(expected)} (${expected} bytes) but the file has ${fileSize} bytes; download it again`,
    );
  }
  if (expected < fileSize) {
    throw new CheckpointError(`${where}: ${fileSize - expected} unexpected bytes after the last tensor (the header describes ${expected} bytes, the file has ${fileSize}): the file is corrupt`);
  }
  const infos = new Map<string, TensorInfo>();
  for (const en of entries) infos.set(en.key, en.info);
  return { infos, metadata, dataEnd: pos };
}

/**
 * The path (top-level key first) of the first key that occurs twice in one object of `json`, or
 * null. `json` must be valid JSON (JSON.parse accepted it), so a flat scan suffices: a string is a
 * key when it follows '{' or ',' inside an object. Linear time; keys with escapes are decoded.
 */
export function findDuplicateKey(json: string): string[] | null {
  const stack: Array<{ keys: Set<string> | null; name: string }> = [];
  let expectKey = false;
  let lastKey = '';
  const n = json.length;
  for (let i = 0; i < n; i++) {
    const c = json.charCodeAt(i);
    if (c === 0x22 /* " */) {
      let j = i + 1;
      let escaped = false;
      for (;;) {
        const d = json.charCodeAt(j);
        if (d === 0x5c /* \ */) {
          escaped = true;
          j += 2;
        } else if (d === 0x22 || j >= n) break;
        else j++;
      }
      const top = stack[stack.length - 1];
      if (expectKey && top?.keys) {
        const key = escaped ? (JSON.parse(json.slice(i, j + 1)) as string) : json.slice(i + 1, j);
        if (top.keys.has(key)) return [...stack.slice(1).map((s) => s.name), key];
        top.keys.add(key);
        lastKey = key;
      }
      expectKey = false;
      i = j;
    } else if (c === 0x7b /* { */) {
      stack.push({ keys: new Set(), name: lastKey });
      expectKey = true;
    } else if (c === 0x5b /* [ */) {
      stack.push({ keys: null, name: lastKey });
      lastKey = '[]';
      expectKey = false;
    } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
      stack.pop();
      expectKey = false;
    } else if (c === 0x2c /* , */) {
      expectKey = stack[stack.length - 1]?.keys != null;
    }
  }
  return null;
}

/** One .safetensors file, opened lazily: the header on open, tensors on demand. */
export class SafetensorsFile {
  /** bytes read from disk so far, header included (for tests and stats) */
  bytesRead = 0;
  private fh: FileHandle | null;

  private constructor(
    readonly path: string,
    readonly size: number,
    readonly headerLength: number,
    private readonly infos: Map<string, TensorInfo>,
    private readonly meta: Record<string, string>,
    fh: FileHandle,
  ) {
    this.fh = fh;
  }

  static async open(path: string): Promise<SafetensorsFile> {
    const abs = resolve(path);
    rejectPickle(abs);
    if (endianness() !== 'LE') throw new CheckpointError(`[safetensors] ${abs}: this reader supports little-endian hosts only`);
    let fh: FileHandle;
    try {
      fh = await fsp.open(abs, 'r');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') throw new CheckpointError(`[safetensors] ${abs}: no such file`, { cause: err });
      if (code === 'EISDIR') throw new CheckpointError(`[safetensors] ${abs}: is a folder, not a .safetensors file (use Checkpoint.open for folders)`, { cause: err });
      if (code === 'ELOOP') throw new CheckpointError(`[safetensors] ${abs}: symlink loop (ELOOP): a link points (through others) back to itself; fix or remove the link`, { cause: err });
      if (code === 'EACCES' || code === 'EPERM') throw new CheckpointError(`[safetensors] ${abs}: not readable (permission denied); fix its permissions (chmod / chown)`, { cause: err });
      if (code === 'ENOTDIR') throw new CheckpointError(`[safetensors] ${abs}: no such file (a part of its path is a file, not a folder)`, { cause: err });
      throw new CheckpointError(`[safetensors] ${abs}: cannot open (${code ?? oneLine((err as Error).message)})`, { cause: err });
    }
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw new CheckpointError(`[safetensors] ${abs}: not a regular file`);
      const size = st.size;
      let bytesRead = 0;
      if (size < 8) throw new CheckpointError(`[safetensors] ${abs}: the file has ${size} bytes, too few for a safetensors header (8-byte length + JSON): it is truncated or empty`);
      const lenBuf = new Uint8Array(8);
      await readFully(fh, lenBuf, 0, abs, 'the header length');
      bytesRead += 8;
      const n64 = new DataView(lenBuf.buffer).getBigUint64(0, true);
      if (n64 > BigInt(MAX_HEADER_BYTES)) {
        throw new CheckpointError(`[safetensors] ${abs}: header length ${n64} exceeds the ${MAX_HEADER_BYTES}-byte cap: not a safetensors file or corrupt${hintForMagic(lenBuf)}`);
      }
      const n = Number(n64);
      if (8 + n > size) {
        throw new CheckpointError(
          `[safetensors] ${abs}: header length ${n} runs past the end of the file (${size} bytes): the file is truncated or not a safetensors file${hintForMagic(lenBuf)}`,
        );
      }
      const hdr = new Uint8Array(n);
      await readFully(fh, hdr, 8, abs, 'the header');
      bytesRead += n;
      let json: string;
      try {
        json = new TextDecoder('utf-8', { fatal: true }).decode(hdr);
      } catch (err) {
        throw new CheckpointError(`[safetensors] ${abs}: the header is not valid UTF-8: the file is corrupt`, { cause: err });
      }
      const parsed = parseSafetensorsHeader(abs, size, n, json);
      const f = new SafetensorsFile(abs, size, n, parsed.infos, parsed.metadata, fh);
      f.bytesRead = bytesRead;
      return f;
    } catch (err) {
      await fh.close().catch(() => undefined);
      throw err;
    }
  }

  /** Tensor keys, in data order. */
  keys(): string[] {
    return [...this.infos.keys()];
  }
  has(key: string): boolean {
    return this.infos.has(key);
  }
  info(key: string): TensorInfo {
    const i = this.infos.get(key);
    if (!i) throw new CheckpointError(`[safetensors] ${this.path}: no tensor ${q(key)}${suggest(key, this.infos.keys())}`);
    return i;
  }
  /** The `__metadata__` strings (e.g. {format: 'pt'}). */
  metadata(): Record<string, string> {
    return { ...this.meta };
  }

  /** Read one tensor's bytes into a fresh (8-byte aligned) buffer. */
  async read(key: string): Promise<Uint8Array> {
    const info = this.info(key);
    const out = new Uint8Array(new ArrayBuffer(info.byteLength));
    await this.readRange(key, 0, info.byteLength, out);
    return out;
  }

  /** Read one tensor's bytes into `target` (exactly `byteLength` bytes). */
  async readInto(key: string, target: Uint8Array): Promise<void> {
    const info = this.info(key);
    if (target.byteLength !== info.byteLength) {
      throw new CheckpointError(`[safetensors] ${this.path}: tensor ${q(key)} has ${info.byteLength} bytes but the target buffer has ${target.byteLength}`);
    }
    await this.readRange(key, 0, info.byteLength, target);
  }

  /** Read bytes [start, start + length) of one tensor (e.g. a few rows of an embedding table). */
  async readRange(key: string, start: number, length: number, target?: Uint8Array): Promise<Uint8Array> {
    const info = this.info(key);
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 || start + length > info.byteLength) {
      throw new CheckpointError(`[safetensors] ${this.path}: tensor ${q(key)}: byte range [${start}, ${start + length}) is outside its ${info.byteLength} bytes`);
    }
    const out = target ?? new Uint8Array(new ArrayBuffer(length));
    if (out.byteLength !== length) throw new CheckpointError(`[safetensors] ${this.path}: tensor ${q(key)}: target has ${out.byteLength} bytes, ${length} requested`);
    const fh = this.handle();
    await readFully(fh, out, info.offset + start, this.path, `tensor ${q(key)}`);
    this.bytesRead += length;
    return out;
  }

  get isClosed(): boolean {
    return this.fh === null;
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    if (fh) await fh.close();
  }

  private handle(): FileHandle {
    if (!this.fh) throw new CheckpointError(`[safetensors] ${this.path}: read after close()`);
    return this.fh;
  }
}

/** Positioned read of exactly `out.byteLength` bytes at `position` (chunked, loops on short reads). */
async function readFully(fh: FileHandle, out: Uint8Array, position: number, path: string, what: string): Promise<void> {
  let done = 0;
  while (done < out.byteLength) {
    const n = Math.min(READ_CHUNK, out.byteLength - done);
    const { bytesRead } = await fh.read(out, done, n, position + done);
    if (bytesRead === 0) {
      throw new CheckpointError(`[safetensors] ${path}: unexpected end of file while reading ${what} at byte ${position + done}: the file is truncated (or changed while open)`);
    }
    done += bytesRead;
  }
}

/** " (did you mean 'x'?)" for the closest key by edit distance (when close enough), or ''. */
export function suggest(key: string, keys: Iterable<string>): string {
  let best = '';
  let bestD = Infinity;
  const limit = Math.max(2, Math.floor(key.length * 0.25));
  for (const k of keys) {
    if (Math.abs(k.length - key.length) > limit) continue;
    const d = editDistance(key, k, bestD);
    if (d < bestD) {
      bestD = d;
      best = k;
    }
  }
  return bestD <= limit ? ` (did you mean ${q(best)}?)` : '';
}

/** Levenshtein distance (transposition counts 2), giving up early once above `cap`. */
function editDistance(a: string, b: string, cap: number): number {
  let prev = new Array<number>(b.length + 1);
  let cur = new Array<number>(b.length + 1);
  for (let j = 0; j <= b.length; j++) prev[j] = j;
  for (let i = 1; i <= a.length; i++) {
    cur[0] = i;
    let rowMin = i;
    for (let j = 1; j <= b.length; j++) {
      const c = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a.charCodeAt(i - 1) === b.charCodeAt(j - 1) ? 0 : 1));
      cur[j] = c;
      if (c < rowMin) rowMin = c;
    }
    if (rowMin > cap) return Infinity;
    [prev, cur] = [cur, prev];
  }
  return prev[b.length]!;
}

export interface TensorToWrite {
  key: string;
  dtype: StDType;
  shape: readonly number[];
  data: Uint8Array;
}

/** Header bytes (length prefix + JSON padded with spaces to a multiple of 8) for `tensors` in the given order. */
export function encodeSafetensorsHeader(tensors: ReadonlyArray<Omit<TensorToWrite, 'data'>>, metadata?: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let off = 0;
  for (const t of tensors) {
    let numel = 1;
    for (const d of t.shape) numel *= d;
    const n = numel * ST_DTYPE_SIZE[t.dtype];
    header[t.key] = { dtype: t.dtype, shape: [...t.shape], data_offsets: [off, off + n] };
    off += n;
  }
  let json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.byteLength / 8) * 8;
  if (padded !== json.byteLength) {
    const p = new Uint8Array(padded).fill(0x20);
    p.set(json);
    json = p;
  }
  const out = new Uint8Array(8 + json.byteLength);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.byteLength), true);
  out.set(json, 8);
  return out;
}

/** Write a .safetensors file atomically (temporary file + fsync + rename). Tensors keep the given order. */
export async function writeSafetensors(path: string, tensors: readonly TensorToWrite[], metadata?: Record<string, string>): Promise<void> {
  const seen = new Set<string>();
  for (const t of tensors) {
    const where = `[safetensors] writing ${path}: tensor ${q(t.key)}`;
    if (t.key === '__metadata__' || t.key === '') throw new CheckpointError(`${where}: invalid key`);
    if (seen.has(t.key)) throw new CheckpointError(`${where}: duplicate key`);
    seen.add(t.key);
    if (!isStDType(t.dtype)) throw new CheckpointError(`${where}: unknown dtype ${JSON.stringify(t.dtype)}`);
    let numel = 1;
    for (const d of t.shape) {
      if (!Number.isSafeInteger(d) || d < 0) throw new CheckpointError(`${where}: invalid shape [${t.shape.join(', ')}]`);
      numel *= d;
    }
    const need = numel * ST_DTYPE_SIZE[t.dtype];
    if (t.data.byteLength !== need) throw new CheckpointError(`${where}: ${t.data.byteLength} data bytes, but shape [${t.shape.join(', ')}] × ${t.dtype} needs ${need}`);
  }
  if (metadata) for (const [k, v] of Object.entries(metadata)) if (typeof v !== 'string') throw new CheckpointError(`[safetensors] writing ${path}: metadata '${k}' must be a string`);
  const header = encodeSafetensorsHeader(tensors, metadata);
  await withAtomicFile(path, async (fh) => {
    await writeAll(fh, header);
    for (const t of tensors) await writeAll(fh, t.data);
  });
}
