// Atomic file writes: every output writer (videos, latents, checkpoints, JSON reports) goes
// through here, so a crash, Ctrl-C or full disk never leaves a half-written file under the final
// name. Recipe: write a temporary file in the same folder (same file system, so rename is atomic),
// fsync it, rename it over the target, then fsync the folder (best effort). On any error the
// temporary file is removed and the target is left as it was. The file is verified before the rename
// (src/io/verify.ts), and file-system errors become one-line OutputErrors (src/io/output-error.ts).

import { promises as fsp, constants as fsc, existsSync, mkdirSync, statSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { tempPathFor, registerTemp, unregisterTemp } from './cleanup.ts';
import { OutputError, outputIoError, oneLine, type SpaceHint } from './output-error.ts';
import { verifyOutputFile, outputKindOf, type OutputKind } from './verify.ts';

export type AtomicData = string | Uint8Array | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

/** Largest single write (Node caps one fs write at 2 GiB - 1). */
const MAX_WRITE = 1 << 30;

/** Write all of `data` at the file's current end (loops over short writes, splits huge buffers). */
export async function writeAll(fh: FileHandle, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.byteLength) {
    const n = Math.min(MAX_WRITE, data.byteLength - off);
    const { bytesWritten } = await fh.write(data, off, n);
    // a write that makes no progress: report it as the I/O error it is (mapped to an OutputError)
    if (bytesWritten <= 0) throw Object.assign(new Error(`EIO: write returned ${bytesWritten}`), { code: 'EIO' });
    off += bytesWritten;
  }
}

/**
 * `mkdir -p`, one level at a time. Node's `mkdirSync(dir, { recursive: true })` loops forever when a
 * parent exists but refuses children with ENOENT (measured: `-o /proc/x/out.mp4` hung the CLI with
 * 145,000 mkdir calls in 15 s); here that is an ordinary error naming the level.
 */
export function makeDirs(dir: string): void {
  const missing: string[] = [];
  for (let d = resolve(dir); !existsSync(d); ) {
    missing.push(d);
    const up = dirname(d);
    if (up === d) break;
    d = up;
  }
  // a symlink loop on the way (existsSync says "missing", mkdir "exists", stat ELOOP) is named as one
  const named = (e: unknown, d: string) =>
    (e as NodeJS.ErrnoException).code === 'ELOOP' ? Object.assign(new Error(`symlink loop (ELOOP) in the path ${d}: a link on it points (through others) back to itself; fix or remove the link`), { code: 'ELOOP', path: d }) : e;
  for (const d of missing.reverse()) {
    try {
      mkdirSync(d);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw named(e, d);
    }
  }
  let st: import('node:fs').Stats;
  try {
    st = statSync(dir);
  } catch (e) {
    throw named(e, dir);
  }
  // `dir` itself may exist as a file: as mkdir -p, that is an error, not a folder
  if (!st.isDirectory()) throw Object.assign(new Error(`ENOTDIR: not a directory, mkdir '${dir}'`), { code: 'ENOTDIR' });
}

export interface AtomicOptions {
  mode?: number;
  /**
   * How to check the temporary file before the rename: a kind (`mp4`, `gif`, `png`, `safetensors`),
   * null for none, or by default the kind the final name's extension implies (`outputKindOf`).
   */
  verify?: OutputKind | null;
  /** the setting that chose this path, named in error messages (default `output.path (-o)`) */
  option?: string;
  /** total bytes the file will have, when known (error messages; the size is then checked too) */
  expectBytes?: number;
}

/**
 * Create `path` atomically: `fill(fh)` writes the content into a temporary file (our pid in its
 * name, registered for `cleanupOnExit`) that is fsynced, verified (`verifyOutputFile`) and renamed
 * over `path`. If anything fails the temporary file is removed and an existing file at `path` is
 * untouched; file-system errors (ENOSPC, EDQUOT, EIO, EROFS, EACCES, ...) become one-line
 * OutputErrors naming `path`, other errors from `fill` are rethrown as they are.
 */
export async function withAtomicFile<T>(path: string, fill: (fh: FileHandle) => Promise<T>, opts: AtomicOptions = {}): Promise<T> {
  const target = resolve(path);
  const tmp = tempPathFor(target);
  const hint = (): SpaceHint => (opts.expectBytes !== undefined ? { needBytes: opts.expectBytes } : { writtenBytes: sizeOf(tmp) });
  registerTemp(tmp);
  let fh: FileHandle;
  try {
    fh = await fsp.open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, opts.mode ?? 0o644);
  } catch (err) {
    unregisterTemp(tmp);
    throw outputIoError(err, target, hint(), opts.option);
  }
  let closed = false;
  try {
    const result = await fill(fh);
    await fh.sync();
    await fh.close();
    closed = true;
    const kind = opts.verify === undefined ? outputKindOf(target) : opts.verify;
    const problem = await verifyOutputFile(tmp, kind, opts.expectBytes);
    if (problem) throw incompleteError(target, problem, opts.option);
    await fsp.rename(tmp, target);
    unregisterTemp(tmp);
    await syncDir(dirname(target));
    return result;
  } catch (err) {
    const mapped = outputIoError(err, target, hint(), opts.option);
    if (!closed) await fh.close().catch(() => undefined);
    await fsp.rm(tmp, { force: true }).catch(() => undefined);
    unregisterTemp(tmp);
    throw mapped;
  }
}

/** The error for a temporary file that failed verification (`problem` says how). */
export function incompleteError(target: string, problem: string, option = 'output.path (-o)'): OutputError {
  return new OutputError(`[output] the file written for ${target} is incomplete (${oneLine(problem)}), so it was not put in place; check free space on its disk and run again, or choose another ${option}`);
}

function sizeOf(p: string): number | undefined {
  try {
    return statSync(p).size;
  } catch {
    return undefined;
  }
}

function byteLengthOf(data: AtomicData): number | undefined {
  if (typeof data === 'string') return Buffer.byteLength(data, 'utf8');
  if (data instanceof Uint8Array) return data.byteLength;
  return undefined;
}

/** Write `data` (a string as UTF-8, bytes, or a sequence of byte chunks) to `path` atomically. */
export async function writeFileAtomic(path: string, data: AtomicData, opts: AtomicOptions = {}): Promise<void> {
  const put = (fh: FileHandle, b: Uint8Array) => writeAll(fh, b);
  const known = byteLengthOf(data);
  await withAtomicFile(
    path,
    async (fh) => {
      if (typeof data === 'string') {
        await put(fh, new TextEncoder().encode(data));
      } else if (data instanceof Uint8Array) {
        await put(fh, data);
      } else if (Symbol.asyncIterator in data) {
        for await (const chunk of data as AsyncIterable<Uint8Array>) await put(fh, chunk);
      } else {
        for (const chunk of data as Iterable<Uint8Array>) await put(fh, chunk);
      }
    },
    // the size check catches a file system that accepted fewer bytes than were written
    { ...opts, expectBytes: opts.expectBytes ?? known },
  );
}

/** fsync a folder so a rename inside it survives a power loss (not possible on every platform). */
async function syncDir(dir: string): Promise<void> {
  let fh: FileHandle | null = null;
  try {
    fh = await fsp.open(dir, fsc.O_RDONLY);
    await fh.sync();
  } catch {
    // Windows and some file systems cannot open or fsync a directory: the rename is still atomic.
  } finally {
    await fh?.close().catch(() => undefined);
  }
}
