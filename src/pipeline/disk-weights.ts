// Weights read from disk per use (`infer.weights_source=disk`): the streamed DiT blocks of level 3,
// the text encoder's blocks on the CPU device, Wan 2.2's inactive expert.
//
// A module's params are loaded with placement 'disk' (nn/load.ts): nothing is read, each Param
// gets a meta placeholder of its target dtype and its `disk` reference (key, file, byte range, file
// dtype). For a streamed block the bytes go straight from the file into the mapped staging buffer
// at the block image's offsets (positioned reads of exactly the block's tensors: no whole-file read,
// no host copy). Params whose dtype changes on load (bf16 file -> the f32 policy of norms and biases,
// or f32 file -> bf16 weights) are read into a small temporary and converted in place; when a block's
// converted bytes are more than a sixteenth of it (an f32 checkpoint run in bf16), the converted block
// image is written once to an on-disk cache (BlockImageCache) and each use is one contiguous read.
//
// The files must not change under a running pipeline: each file's size and mtime are recorded when
// the pipeline opens it and checked before every read (a CheckpointError naming the file, never
// garbage); a short read (truncated file) is an error too (safetensors.ts readFully).

import { promises as fsp, type Stats } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import type { Checkpoint } from '../io/checkpoint.ts';
import { engineDTypeOf } from '../io/checkpoint.ts';
import type { Param } from '../nn/module.ts';
import { Tensor } from '../tensor/tensor.ts';
import { dtypeSize, type DType } from '../tensor/dtype.ts';
import { convertHost } from '../nn/load.ts';
import { makeDirs, writeFileAtomic } from '../io/atomic.ts';
import { CheckpointError, ConfigError, fmtBytes } from '../util/errors.ts';

/** Where a disk-placed param's bytes are (set by nn/load.ts for placement 'disk'). */
export interface DiskRef {
  /** key in the checkpoint (diffusers names; a renamed view reads the original) */
  key: string;
  file: string;
  /** bytes in the file */
  byteLength: number;
  fileDtype: DType;
  /** dtype the param has once read (its meta placeholder's) */
  dtype: DType;
}

/** One tensor of a block image: `bytes` file bytes of `key` land at image offset `at` (converted when from != to). */
export interface DiskSegment {
  key: string;
  /** a param kept in host memory (not on disk): its bytes are copied from here */
  host?: Uint8Array;
  at: number;
  bytes: number;
  from: DType;
  to: DType;
}

/** How a block image is read: its tensors from the checkpoint, or one contiguous read of a cached image. */
export type DiskImage = { kind: 'checkpoint'; segments: DiskSegment[]; size: number } | { kind: 'cache'; path: string; size: number };

export interface DiskReadStats {
  reads: number;
  bytes: number;
  /** wall ms of the reads (from the first request to the last byte) */
  ms: number;
}

/** above this share of a block converted on load, its image is cached on disk converted */
const CACHE_CONVERTED_SHARE = 1 / 16;

/** The weights of one component on disk: its checkpoint kept open, the files' identities, the reads. */
export class DiskWeights {
  readonly stats: DiskReadStats = { reads: 0, bytes: 0, ms: 0 };
  private closed = false;

  private constructor(
    readonly ck: Checkpoint,
    /** file -> size and mtime when opened */
    private readonly identity: Map<string, { size: number; mtimeMs: number }>,
    readonly what: string,
  ) {}

  static async open(source: { open(): Promise<Checkpoint> }, what: string): Promise<DiskWeights> {
    const ck = await source.open();
    const identity = new Map<string, { size: number; mtimeMs: number }>();
    try {
      for (const f of ck.files()) {
        const st = await fsp.stat(f);
        identity.set(f, { size: st.size, mtimeMs: st.mtimeMs });
      }
    } catch (e) {
      await ck.close();
      throw e;
    }
    return new DiskWeights(ck, identity, what);
  }

  /** A short identity of the files (paths, sizes, mtimes): the cache key of converted images. */
  get fingerprint(): string {
    const h = createHash('sha256');
    for (const [f, id] of [...this.identity].sort((a, b) => a[0].localeCompare(b[0]))) h.update(`${f}\0${id.size}\0${id.mtimeMs}\n`);
    return h.digest('hex').slice(0, 16);
  }

  /** Throw when `file` is not the file the pipeline opened (size or mtime changed, or gone). */
  async checkUnchanged(file: string): Promise<void> {
    const id = this.identity.get(file);
    if (!id) return;
    let st: Stats;
    try {
      st = await fsp.stat(file);
    } catch (err) {
      throw new CheckpointError(`[disk] ${file}: the ${this.what} weights file disappeared under the running pipeline (${(err as NodeJS.ErrnoException).code ?? err}); restore it and restart the run`, { cause: err });
    }
    if (st.size !== id.size || st.mtimeMs !== id.mtimeMs) {
      const what = st.size !== id.size ? `its size went from ${id.size.toLocaleString('en-US')} to ${st.size.toLocaleString('en-US')} bytes` : `it was modified at ${st.mtime.toISOString()}`;
      throw new CheckpointError(`[disk] ${file}: the ${this.what} weights changed under the running pipeline (${what}); the weights on disk are no longer the ones loaded: restart the run (with infer.weights_source=memory the weights are read once, at load)`);
    }
  }

  /**
   * Read bytes [lo, hi) of a block image (default: all of it) into `dst` at 0 (chunked staging
   * reads a block in pieces); returns the bytes read from disk. Straight tensors are read by
   * positioned reads of exactly the overlapping byte range; a converted tensor (small: norms,
   * biases) is read and converted whole, and its overlapping part copied.
   */
  async fill(dst: Uint8Array, img: DiskImage, lo = 0, hi = img.size): Promise<number> {
    if (this.closed) throw new CheckpointError(`[disk] ${this.what}: read after the pipeline was disposed`);
    if (!(lo >= 0 && hi <= img.size && lo <= hi && hi - lo <= dst.byteLength)) throw new RangeError(`[disk] ${this.what}: bytes ${lo}..${hi} of a ${img.size}-byte block image into ${dst.byteLength} bytes`);
    const t0 = performance.now();
    let n = 0;
    if (img.kind === 'cache') {
      const fh = await fsp.open(img.path, 'r').catch((err) => {
        throw new CheckpointError(`[disk] ${img.path}: the cached block image is gone (${(err as NodeJS.ErrnoException).code ?? err}); restart the run (the cache is rebuilt at load)`, { cause: err });
      });
      try {
        let done = 0;
        while (done < hi - lo) {
          const { bytesRead } = await fh.read(dst, done, hi - lo - done, lo + done);
          if (bytesRead === 0) throw new CheckpointError(`[disk] ${img.path}: the cached block image is truncated (${lo + done} of ${img.size} bytes); delete the cache folder and restart`);
          done += bytesRead;
        }
      } finally {
        await fh.close();
      }
      n = hi - lo;
    } else {
      // a segment's extent in the image: its converted size
      const extent = (s: DiskSegment) => (s.host || s.from === s.to ? s.bytes : (s.bytes / dtypeSize(s.from)) * dtypeSize(s.to));
      const parts = img.segments.filter((s) => s.at < hi && s.at + extent(s) > lo);
      const files = new Set(parts.filter((s) => !s.host).map((s) => this.ck.fileOf(s.key)));
      for (const f of files) await this.checkUnchanged(f);
      // straight reads in parallel (the thread pool overlaps them), conversions through a temporary
      await Promise.all(
        parts.map(async (s) => {
          const a = Math.max(lo, s.at);
          const b = Math.min(hi, s.at + extent(s));
          const out = dst.subarray(a - lo, b - lo);
          if (s.host) {
            out.set(s.host.subarray(a - s.at, b - s.at));
            return;
          }
          if (s.from === s.to) {
            if (a === s.at && b === s.at + s.bytes) await this.ck.readInto(s.key, out);
            else await this.ck.readRange(s.key, a - s.at, b - a, out);
            n += b - a;
          } else {
            const raw = await this.ck.read(s.key);
            const host = Tensor.cpu(hostView(raw, s.from), [rawCount(raw, s.from)], s.from);
            const conv = convertHost(host, s.to);
            const d = conv.data!;
            out.set(new Uint8Array(d.buffer, d.byteOffset + (a - s.at), b - a));
            n += raw.byteLength;
          }
        }),
      );
    }
    if (lo === 0) this.stats.reads++;
    this.stats.bytes += n;
    this.stats.ms += performance.now() - t0;
    return n;
  }

  /** Read one disk-placed param into a host tensor of its target dtype (the CPU device, an expert swap). */
  async readParam(p: Param, opts: { shared?: boolean; into?: Uint8Array } = {}): Promise<Tensor> {
    const ref = p.disk;
    if (!ref) throw new Error(`[disk] ${p.fullKey} is not placed on disk`);
    await this.checkUnchanged(ref.file);
    const t0 = performance.now();
    const raw = opts.into?.byteLength === ref.byteLength ? opts.into : opts.shared ? new Uint8Array(new SharedArrayBuffer(ref.byteLength)) : new Uint8Array(ref.byteLength);
    await this.ck.readInto(ref.key, raw);
    this.stats.reads++;
    this.stats.bytes += ref.byteLength;
    this.stats.ms += performance.now() - t0;
    const host = Tensor.cpu(hostView(raw, ref.fileDtype), p.shape, ref.fileDtype);
    return convertHost(host, ref.dtype);
  }

  /**
   * The rows of a disk-placed 2-D table (the UMT5 token table) that `ids` use: one positioned read
   * per distinct row, converted to the param's dtype. Returns the rows as a [U, cols] host tensor and
   * the ids renumbered into it. An id outside the table is an error naming it.
   */
  async readRows(p: Param, ids: Int32Array): Promise<{ table: Tensor; ids: Int32Array }> {
    const ref = p.disk;
    if (!ref || p.shape.length !== 2) throw new Error(`[disk] ${p.fullKey} is not a table placed on disk`);
    const [rows, cols] = p.shape as [number, number];
    const rowBytes = (ref.byteLength / rows) | 0;
    const index = new Map<number, number>();
    const out = new Int32Array(ids.length);
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      if (!(id >= 0 && id < rows)) throw new CheckpointError(`[disk] ${p.fullKey}: token id ${id} is outside the table's ${rows} rows; the tokenizer does not match this text encoder`);
      let j = index.get(id);
      if (j === undefined) index.set(id, (j = index.size));
      out[i] = j;
    }
    await this.checkUnchanged(ref.file);
    const t0 = performance.now();
    const raw = new Uint8Array(index.size * rowBytes);
    await Promise.all([...index].map(([id, j]) => this.ck.readRange(ref.key, id * rowBytes, rowBytes, raw.subarray(j * rowBytes, (j + 1) * rowBytes))));
    this.stats.reads++;
    this.stats.bytes += raw.byteLength;
    this.stats.ms += performance.now() - t0;
    const host = Tensor.cpu(hostView(raw, ref.fileDtype), [index.size, cols], ref.fileDtype);
    return { table: convertHost(host, ref.dtype), ids: out };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.ck.close();
  }
}

function rawCount(raw: Uint8Array, dt: DType): number {
  return raw.byteLength / (dt === 'f32' || dt === 'i32' || dt === 'u32' ? 4 : 2);
}

/** A typed view of raw little-endian bytes as `dt` (16-bit types as raw words). */
function hostView(raw: Uint8Array, dt: DType): Float32Array | Uint16Array | Int32Array | Uint32Array {
  const n = rawCount(raw, dt);
  // the readers give fresh, aligned buffers; copy when a view is misaligned
  const b = raw.byteOffset % 4 === 0 ? raw : raw.slice();
  switch (dt) {
    case 'f32':
      return new Float32Array(b.buffer, b.byteOffset, n);
    case 'i32':
      return new Int32Array(b.buffer, b.byteOffset, n);
    case 'u32':
      return new Uint32Array(b.buffer, b.byteOffset, n);
    default:
      return new Uint16Array(b.buffer, b.byteOffset, n);
  }
}

/** A disk ref for a param loaded with placement 'disk' (nn/load.ts). */
export function diskRefOf(ck: Checkpoint, key: string, dtype: DType): DiskRef {
  const info = ck.info(key);
  return { key, file: info.file, byteLength: info.byteLength, fileDtype: engineDTypeOf(info.dtype), dtype };
}

/**
 * The disk image of each block: its tensors at the layout's offsets (StreamedBlocks'
 * blockImageLayout), straight or converted; blocks whose converted share is large are written to
 * `cache` converted (once; reused while the files are unchanged) and read back in one piece.
 */
export async function diskImagesOf(
  blocks: Array<{ params: Param[]; offsets: number[]; size: number }>,
  weights: DiskWeights,
  cache: BlockImageCache | null,
  onProgress?: (done: number, total: number) => void,
): Promise<DiskImage[]> {
  const out: DiskImage[] = [];
  let i = 0;
  for (const b of blocks) {
    const segments: DiskSegment[] = b.params.map((p, k) => {
      const ref = p.disk;
      if (!ref) {
        // kept in host memory (tiny: UMT5's relative-bias tables): copied into the image per use
        const d = p.t.data;
        if (!d) throw new Error(`[disk] ${p.fullKey} is neither on disk nor in host memory`);
        const host = new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
        return { key: p.fullKey, host, at: b.offsets[k]!, bytes: host.byteLength, from: p.t.dtype, to: p.t.dtype };
      }
      return { key: ref.key, at: b.offsets[k]!, bytes: ref.byteLength, from: ref.fileDtype, to: ref.dtype };
    });
    const converted = segments.filter((s) => s.from !== s.to).reduce((a, s) => a + s.bytes, 0);
    const img: DiskImage = { kind: 'checkpoint', segments, size: b.size };
    if (cache && converted > b.size * CACHE_CONVERTED_SHARE) out.push(await cache.ensure(weights, i, img));
    else out.push(img);
    onProgress?.(++i, blocks.length);
  }
  return out;
}

/**
 * Converted block images on disk: `<dir>/<fingerprint>-<what>/block-<i>.img`, one folder per set of
 * weight files (their paths, sizes and mtimes) and target layout. The whole cache is bounded by
 * `maxBytes`: older folders (by mtime) are deleted to make room; a set larger than the bound is refused.
 */
export class BlockImageCache {
  constructor(
    readonly dir: string,
    readonly maxBytes: number,
    /** what the images are of (e.g. 'dit-bf16-a256'): part of the folder name */
    readonly tag: string,
  ) {}

  private folder(w: DiskWeights): string {
    return join(this.dir, `${w.fingerprint}-${this.tag}`);
  }

  /** The image of block i, written now when missing (read and converted from the checkpoint). */
  async ensure(w: DiskWeights, i: number, src: Extract<DiskImage, { kind: 'checkpoint' }>): Promise<DiskImage> {
    const folder = this.folder(w);
    const path = join(folder, `block-${i}.img`);
    const st = await fsp.stat(path).catch(() => null);
    if (st && st.size === src.size) return { kind: 'cache', path, size: src.size };
    if (i === 0) await this.makeRoom(folder, src.size);
    makeDirs(folder);
    const img = new Uint8Array(src.size);
    await w.fill(img, src);
    await writeFileAtomic(path, img, { option: 'infer.weights_cache_dir' });
    return { kind: 'cache', path, size: src.size };
  }

  /** Delete the oldest other folders until `need` more bytes fit under the bound (a first estimate: one block × blocks is checked by the caller). */
  private async makeRoom(keep: string, need: number): Promise<void> {
    const entries = await fsp.readdir(this.dir, { withFileTypes: true }).catch(() => []);
    const folders: Array<{ path: string; bytes: number; mtime: number }> = [];
    for (const d of entries) {
      if (!d.isDirectory()) continue;
      const p = join(this.dir, d.name);
      if (p === keep) continue;
      let bytes = 0;
      let mtime = 0;
      for (const f of await fsp.readdir(p).catch(() => [])) {
        const s = await fsp.stat(join(p, f)).catch(() => null);
        if (s) {
          bytes += s.size;
          mtime = Math.max(mtime, s.mtimeMs);
        }
      }
      folders.push({ path: p, bytes, mtime });
    }
    let used = folders.reduce((a, f) => a + f.bytes, 0);
    folders.sort((a, b) => a.mtime - b.mtime);
    while (used + need > this.maxBytes && folders.length) {
      const f = folders.shift()!;
      await fsp.rm(f.path, { recursive: true, force: true });
      used -= f.bytes;
    }
  }

  /** Refuse a set of images larger than the bound, before anything is written. */
  check(total: number): void {
    if (total > this.maxBytes) {
      throw new ConfigError(
        `[disk] the converted block images need ${fmtBytes(total)} in ${this.dir}, more than infer.weights_cache_max_gb (${fmtBytes(this.maxBytes)}): raise it, or use weights whose dtype needs no conversion (infer.weight_dtype=checkpoint)`,
      );
    }
  }
}

/**
 * Blocks of a model run on the CPU device with weights read from disk per use (level 2's text
 * encoder with infer.weights_source=disk): acquire(i) waits for block i's tensors (read into shared
 * memory for the CPU device's workers, converted to their dtype), prefetch(i+1) starts the next
 * block's reads while block i computes, release(i) drops block i's tensors (its params hold their
 * meta placeholders again). The host holds at most two blocks.
 */
export class DiskHostBlocks {
  private readonly inflight = new Map<number, Promise<void>>();
  private readonly loaded = new Set<number>();
  /**
   * Two sets of shared buffers (block i reads into set i % 2), reused by every encode: fresh
   * SharedArrayBuffers per use stayed alive in the CPU device's worker heaps until those collected
   * (measured: +375 MiB per encode on the 14B-shaped run's 1-layer UMT5-XXL, bench:disk).
   */
  private readonly buffers: Array<Map<number, Uint8Array>> = [new Map(), new Map()];

  constructor(
    private readonly blocks: Array<{ namedParams(): Array<[string, Param]> }>,
    private readonly weights: DiskWeights,
  ) {}

  private load(i: number): Promise<void> {
    let p = this.inflight.get(i);
    if (!p) {
      p = (async () => {
        const params = this.blocks[i]!.namedParams().map(([, q]) => q).filter((q) => q.disk);
        const set = this.buffers[i % 2]!;
        const values = await Promise.all(
          params.map((q, k) => {
            let buf = set.get(k);
            if (!buf || buf.byteLength !== q.disk!.byteLength) set.set(k, (buf = new Uint8Array(new SharedArrayBuffer(q.disk!.byteLength))));
            return this.weights.readParam(q, { shared: true, into: buf });
          }),
        );
        params.forEach((q, k) => (q.value = values[k]!));
        this.loaded.add(i);
      })();
      this.inflight.set(i, p);
      p.catch(() => this.inflight.delete(i));
    }
    return p;
  }

  async acquire(i: number): Promise<void> {
    await this.load(i);
  }

  prefetch(i: number): void {
    if (i < this.blocks.length) void this.load(i).catch(() => {}); // errors surface in acquire(i)
  }

  release(i: number): void {
    if (!this.loaded.has(i)) return;
    for (const [, q] of this.blocks[i]!.namedParams()) if (q.disk) q.value = Tensor.meta(q.shape, q.disk.dtype);
    this.loaded.delete(i);
    this.inflight.delete(i);
  }

  /** drop every block read so far (after a forward that stopped early) */
  releaseAll(): void {
    for (const i of [...this.loaded]) this.release(i);
    this.inflight.clear();
  }
}
