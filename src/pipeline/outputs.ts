// Writing a run's outputs: MP4, GIF preview, PNG frames, latents (safetensors) and a JSON sidecar.
// Every file is written atomically (temporary name in the same folder, verified, then renamed);
// full disks and other file-system errors are one-line OutputErrors (exit 6); an AbortSignal stops
// the writing between files and frames (InterruptedError, exit 130) without leaving temp files.

import { accessSync, constants, existsSync, statSync, writeFileSync, unlinkSync } from 'node:fs';
import { mkdir, rename, rm } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { makeDirs, writeFileAtomic } from '../io/atomic.ts';
import { writeSafetensors } from '../io/safetensors.ts';
import { Checkpoint, readTensor } from '../io/checkpoint.ts';
import { toRgbFrames, writeMp4, writeGif, writePng, OutputError, interrupted } from '../io/video.ts';
import { cleanStaleTemps, registerTemp, unregisterTemp, tempPathFor } from '../io/cleanup.ts';
import { outputIoError, errnoCode, oneLine } from '../io/output-error.ts';
import { CheckpointError } from '../util/errors.ts';
import { NonFiniteError, countNonFinite } from '../util/non-finite.ts';
import type { Latents } from './wan-pipeline.ts';

function slugify(s: string, max = 40): string {
  const slug = s
    .toLowerCase()
    .normalize('NFKD')
    .replace(/[^a-z0-9]+/g, '-')
    .replace(/^-+|-+$/g, '')
    .slice(0, max)
    .replace(/-+$/g, '');
  return slug || 'video';
}

function dateStamp(d = new Date()): string {
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}

/** Fill {date}, {slug}, {seed} in the output path template. */
export function resolveOutputPath(template: string, prompt: string, seed: number): string {
  return resolve(template.replace(/\{date\}/g, dateStamp()).replace(/\{slug\}/g, slugify(prompt)).replace(/\{seed\}/g, String(seed)));
}

export interface OutputPaths {
  video: string;
  base: string;
  preview: string;
  sidecar: string;
  latents: string;
  framesDir: string;
}

export function outputPaths(videoPath: string): OutputPaths {
  const base = videoPath.replace(/\.(mp4|mov|mkv|webm)$/i, '');
  return {
    video: base + '.mp4',
    base,
    preview: base + '.gif',
    sidecar: base + '.json',
    latents: base + '.latents.safetensors',
    framesDir: base + '_frames',
  };
}

/**
 * Fail early (before any GPU work) when `path` cannot be written: creates its folder, then creates
 * and removes a probe file there. `option` is the setting that chose the path, named in the message
 * (e.g. 'report.memory_snapshot (--memory-snapshot)'). Throws a one-line OutputError.
 */
export function checkWritableFile(path: string, option = 'output.path (-o)'): void {
  const abs = resolve(path);
  const dir = dirname(abs);
  try {
    makeDirs(dir);
  } catch (e) {
    throw new OutputError(`[output] cannot create the output folder ${dir}: ${oneLine((e as Error).message)}; choose another ${option}`);
  }
  if (existsSync(abs) && statSync(abs).isDirectory()) throw new OutputError(`[output] ${abs} is a folder; give ${option} a file name such as ${join(abs, 'video.mp4')}`);
  const probe = join(dir, `.sd-write-probe-${process.pid}`);
  registerTemp(probe);
  try {
    accessSync(dir, constants.W_OK);
    writeFileSync(probe, '');
    unlinkSync(probe);
  } catch (e) {
    try {
      unlinkSync(probe);
    } catch {
      /* never created */
    }
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOSPC' ? 'no space left on device' : code === 'EROFS' ? 'read-only file system' : (code ?? (e as Error).message);
    throw new OutputError(`[output] the folder ${dir} is not writable (${why}); choose another ${option}`);
  } finally {
    unregisterTemp(probe);
  }
}

/**
 * Fail early (before any GPU work) when the output folder cannot be written (`checkWritableFile`),
 * and remove the temp files that killed runs left in it (`cleanStaleTemps`).
 */
export function checkWritable(path: string, option = 'output.path (-o)'): void {
  const abs = resolve(path);
  const dir = dirname(abs);
  if (existsSync(dir)) cleanStaleTemps(dir);
  checkWritableFile(abs, option);
}

export async function saveLatents(path: string, lat: Latents, meta: Record<string, unknown>): Promise<void> {
  // verified after writing (header + data = file length) and ENOSPC-mapped by withAtomicFile
  await writeSafetensors(path, [{ key: 'latents', dtype: 'F32', shape: [...lat.shape], data: new Uint8Array(lat.data.buffer, lat.data.byteOffset, lat.data.byteLength) }], {
    format: 'smart-diffusion-latents',
    meta: JSON.stringify(meta),
  }).catch((e) => {
    // withAtomicFile already made it an OutputError; redo it from the errno cause with the size and the option
    const cause = e instanceof OutputError && errnoCode(e.cause) ? e.cause : e;
    throw outputIoError(cause, resolve(path), { needBytes: lat.data.byteLength }, 'output.path (-o) or output.save_latents=false');
  });
}

/** The float dtypes a latents file may use (F16/BF16/F64 are widened to f32 on load). */
const LATENT_DTYPES = new Set(['F32', 'F16', 'BF16', 'F64']);
const MAX_LATENT_ELEMS = 2 ** 31;

/**
 * Read a latents file written by `saveLatents` (or another tool: key 'latents', a float dtype,
 * [C, F, H, W]). Rejected with a one-line CheckpointError (exit 5) naming the file: a missing key,
 * a non-float dtype, a rank other than 4, a zero or huge size, and any NaN/Inf value (with the
 * count and the first index). Matching C to the model's channels is the pipeline's job.
 */
export async function loadLatents(path: string): Promise<{ latents: Latents; meta: Record<string, unknown> }> {
  const abs = resolve(path);
  const ck = await Checkpoint.open(abs);
  try {
    if (!ck.keys().includes('latents')) throw new CheckpointError(`[latents] ${abs} has no 'latents' tensor (keys: ${ck.keys().slice(0, 5).map((k) => JSON.stringify(k.slice(0, 60))).join(', ') || 'none'}); give a file written with output.save_latents=true`);
    const info = ck.info('latents');
    if (!LATENT_DTYPES.has(info.dtype)) throw new CheckpointError(`[latents] ${abs}: 'latents' has dtype ${info.dtype}, expected a float dtype (F32, F16, BF16 or F64); give a latents file written with output.save_latents=true`);
    const shape = info.shape;
    if (shape.length !== 4) throw new CheckpointError(`[latents] ${abs}: 'latents' must be [C, F, H, W], got [${shape.join(', ')}]; give a latents file written with output.save_latents=true`);
    if (shape.some((d) => !(d > 0))) throw new CheckpointError(`[latents] ${abs}: 'latents' has an empty dimension in [${shape.join(', ')}]; give a latents file written with output.save_latents=true`);
    const n = shape.reduce((a, d) => a * d, 1);
    if (n > MAX_LATENT_ELEMS) throw new CheckpointError(`[latents] ${abs}: 'latents' [${shape.join(', ')}] has ${n} elements, more than 2^31; not a latents file of a video this tool can decode`);
    const t = await readTensor(ck, 'latents');
    const hv = t.hostValues();
    const data = hv instanceof Float32Array ? hv : Float32Array.from(hv as ArrayLike<number>);
    const bad = countNonFinite(data);
    if (bad.count > 0) {
      const [, F, H, W] = shape as [number, number, number, number];
      const i = bad.first;
      const where = `[${Math.floor(i / (F * H * W))}, ${Math.floor(i / (H * W)) % F}, ${Math.floor(i / W) % H}, ${i % W}]`;
      throw new CheckpointError(`[latents] ${abs}: ${bad.count} of ${n} values are NaN or infinite (first at index ${i} = ${where}, value ${data[i]}); the run that saved them diverged: generate again instead of decoding this file`);
    }
    const md = ck.metadata?.() ?? {};
    let meta: Record<string, unknown> = {};
    try {
      meta = JSON.parse(String((md as Record<string, string>).meta ?? '{}'));
    } catch {
      /* no metadata */
    }
    return { latents: { data, shape: shape as unknown as [number, number, number, number] }, meta };
  } finally {
    await ck.close();
  }
}

export interface WriteOptions {
  mp4: boolean;
  preview: boolean;
  frames: boolean;
  fps: number;
  /** stops the writing (checked between files and PNG frames; kills ffmpeg): InterruptedError */
  signal?: AbortSignal;
}

/**
 * Throw NonFiniteError when the decoded video [3, T, H, W] holds NaN/Inf (a host loop, ~1 ns per
 * value): such a video would be written as black or garbage frames with exit 0.
 */
export function checkVideoFinite(video: Float32Array, shape: readonly [number, number, number, number]): void {
  const bad = countNonFinite(video);
  if (bad.count === 0) return;
  const [, T, H, W] = shape;
  const hw = H * W;
  const t = Math.floor(bad.first / hw) % T;
  const c = Math.floor(bad.first / (T * hw));
  throw new NonFiniteError(
    `[decode] the decoded video has ${bad.count} non-finite values of ${video.length} (first at frame ${t}, channel ${c}: ${video[bad.first]}); nothing was written. ` +
      `The latents or the VAE went out of range: try infer.activation_dtype=f32 and infer.weight_dtype=f32, or save the latents (output.save_latents=true) and check them`,
  );
}

/** Write the video outputs; returns the files written. */
export async function writeVideoOutputs(paths: OutputPaths, video: Float32Array, shape: [number, number, number, number], opts: WriteOptions): Promise<string[]> {
  const { signal } = opts;
  const [, T, H, W] = shape;
  checkVideoFinite(video, shape);
  if (signal?.aborted) throw interrupted(paths.video);
  const frames = toRgbFrames(video, T, H, W);
  const written: string[] = [];
  if (opts.mp4) {
    await writeMp4(paths.video, frames, W, H, opts.fps, signal);
    written.push(paths.video);
  }
  if (opts.preview) {
    if (signal?.aborted) throw interrupted(paths.preview);
    const scale = Math.max(1, Math.min(4, Math.floor(256 / Math.max(W, H))));
    await writeGif(paths.preview, frames, W, H, opts.fps, scale, signal);
    written.push(paths.preview);
  }
  if (opts.frames) {
    await writeFramesDir(paths.framesDir, frames, W, H, signal);
    written.push(paths.framesDir + '/');
  }
  return written;
}

/**
 * PNG frames 0001.png... into a temporary folder beside `dir`, renamed to `dir` when all are written
 * (an existing `dir` is replaced only then), so an interrupted or failed run leaves no partial set.
 */
async function writeFramesDir(dir: string, frames: Uint8Array[], W: number, H: number, signal?: AbortSignal): Promise<void> {
  const tmp = tempPathFor(dir);
  registerTemp(tmp);
  let old: string | null = null;
  try {
    await mkdir(tmp).catch((e) => {
      throw outputIoError(e, dir);
    });
    for (let t = 0; t < frames.length; t++) {
      const name = `${String(t + 1).padStart(4, '0')}.png`;
      if (signal?.aborted) throw interrupted(join(dir, name));
      await writePng(join(tmp, name), frames[t]!, W, H).catch((e) => {
        // name the final frame path, not the temporary folder
        if (e instanceof OutputError) throw new OutputError(e.message.split(tmp).join(dir), { cause: e });
        throw e;
      });
    }
    if (signal?.aborted) throw interrupted(dir);
    try {
      if (existsSync(dir)) {
        old = tempPathFor(dir);
        registerTemp(old);
        await rename(dir, old);
      }
      await rename(tmp, dir);
    } catch (e) {
      if (old && !existsSync(dir)) await rename(old, dir).catch(() => undefined);
      throw outputIoError(e, dir);
    }
  } finally {
    await rm(tmp, { recursive: true, force: true }).catch(() => undefined);
    unregisterTemp(tmp);
    if (old) {
      await rm(old, { recursive: true, force: true }).catch(() => undefined);
      unregisterTemp(old);
    }
  }
}

export async function writeSidecar(path: string, data: unknown): Promise<void> {
  await writeFileAtomic(path, JSON.stringify(data, null, 2) + '\n', { option: 'output.path (-o) or output.sidecar=false' });
}

