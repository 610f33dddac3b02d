// Atomic file writes: every output writer (videos, latents, checkpoints, JSON reports) goes
// through here, so a crash, Ctrl-C or full disk never leaves a half-written file under the final
// name. Recipe: write a temporary file in the same folder (same file system, so rename is atomic),
// fsync it, rename it over the target, then fsync the folder (best effort). On any error the
// temporary file is removed and the target is left as it was.

import { promises as fsp, constants as fsc, existsSync, mkdirSync, statSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';

export type AtomicData = string | Uint8Array | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

/** Largest single write (Node caps one fs write at 2 GiB - 1). */
const MAX_WRITE = 1 << 30;

/** Write all of `data` at the file's current end (loops over short writes, splits huge buffers). */
export async function writeAll(fh: FileHandle, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.byteLength) {
    const n = Math.min(MAX_WRITE, data.byteLength - off);
    const { bytesWritten } = await fh.write(data, off, n);
    if (bytesWritten <= 0) throw new Error(`[atomic] write returned ${bytesWritten}`);
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
  for (const d of missing.reverse()) {
    try {
      mkdirSync(d);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
  }
  // `dir` itself may exist as a file: as mkdir -p, that is an error, not a folder
  if (!statSync(dir).isDirectory()) throw Object.assign(new Error(`ENOTDIR: not a directory, mkdir '${dir}'`), { code: 'ENOTDIR' });
}

function tmpNameFor(path: string): string {
  return join(dirname(path), `.${basename(path)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
}

/**
 * Create `path` atomically: `fill(fh)` writes the content into a temporary file that is then
 * fsynced and renamed over `path`. If `fill` throws, the temporary file is removed and the error
 * is rethrown; an existing file at `path` is untouched.
 */
export async function withAtomicFile<T>(path: string, fill: (fh: FileHandle) => Promise<T>, opts: { mode?: number } = {}): Promise<T> {
  const target = resolve(path);
  const tmp = tmpNameFor(target);
  const fh = await fsp.open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, opts.mode ?? 0o644);
  let closed = false;
  try {
    const result = await fill(fh);
    await fh.sync();
    await fh.close();
    closed = true;
    await fsp.rename(tmp, target);
    await syncDir(dirname(target));
    return result;
  } catch (err) {
    if (!closed) await fh.close().catch(() => undefined);
    await fsp.rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
}

/** Write `data` (a string as UTF-8, bytes, or a sequence of byte chunks) to `path` atomically. */
export async function writeFileAtomic(path: string, data: AtomicData, opts: { mode?: number } = {}): Promise<void> {
  await withAtomicFile(
    path,
    async (fh) => {
      if (typeof data === 'string') {
        await writeAll(fh, new TextEncoder().encode(data));
      } else if (data instanceof Uint8Array) {
        await writeAll(fh, data);
      } else if (Symbol.asyncIterator in data) {
        for await (const chunk of data as AsyncIterable<Uint8Array>) await writeAll(fh, chunk);
      } else {
        for (const chunk of data as Iterable<Uint8Array>) await writeAll(fh, chunk);
      }
    },
    opts,
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
