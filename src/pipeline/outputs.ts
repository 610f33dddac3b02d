// Writing a run's outputs: MP4, GIF preview, PNG frames, latents (safetensors) and a JSON sidecar.
// Every file is written atomically (temporary name in the same folder, then rename).

import { accessSync, constants, existsSync, statSync, writeFileSync, unlinkSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { makeDirs, writeFileAtomic } from '../io/atomic.ts';
import { writeSafetensors } from '../io/safetensors.ts';
import { Checkpoint, readTensor } from '../io/checkpoint.ts';
import { toRgbFrames, writeMp4, writeGif, writePng, OutputError } from '../io/video.ts';
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
 * Fail early (before any GPU work) when the output folder cannot be written: creates the folder,
 * then creates and removes a probe file in it.
 */
export function checkWritable(path: string): void {
  const dir = dirname(path);
  try {
    makeDirs(dir);
  } catch (e) {
    throw new OutputError(`[output] cannot create the output folder ${dir}: ${(e as Error).message}; choose another output.path (-o)`);
  }
  if (existsSync(path) && statSync(path).isDirectory()) throw new OutputError(`[output] ${path} is a folder; give a file name such as ${join(path, 'video.mp4')}`);
  const probe = join(dir, `.sd-write-probe-${process.pid}`);
  try {
    accessSync(dir, constants.W_OK);
    writeFileSync(probe, '');
    unlinkSync(probe);
  } catch (e) {
    throw new OutputError(`[output] the output folder ${dir} is not writable (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); choose another output.path (-o)`);
  }
}

export async function saveLatents(path: string, lat: Latents, meta: Record<string, unknown>): Promise<void> {
  await writeSafetensors(path, [{ key: 'latents', dtype: 'F32', shape: [...lat.shape], data: new Uint8Array(lat.data.buffer, lat.data.byteOffset, lat.data.byteLength) }], {
    format: 'smart-diffusion-latents',
    meta: JSON.stringify(meta),
  });
}

export async function loadLatents(path: string): Promise<{ latents: Latents; meta: Record<string, unknown> }> {
  const ck = await Checkpoint.open(path);
  try {
    const t = await readTensor(ck, 'latents');
    if (t.rank !== 4) throw new OutputError(`[latents] ${path}: 'latents' must be [C, F, H, W], got [${t.shape.join(', ')}]`);
    const md = ck.metadata?.() ?? {};
    let meta: Record<string, unknown> = {};
    try {
      meta = JSON.parse(String((md as Record<string, string>).meta ?? '{}'));
    } catch {
      /* no metadata */
    }
    return { latents: { data: t.hostValues() as Float32Array, shape: t.shape as unknown as [number, number, number, number] }, meta };
  } finally {
    await ck.close();
  }
}

export interface WriteOptions {
  mp4: boolean;
  preview: boolean;
  frames: boolean;
  fps: number;
}

/** Write the video outputs; returns the files written. */
export async function writeVideoOutputs(paths: OutputPaths, video: Float32Array, shape: [number, number, number, number], opts: WriteOptions): Promise<string[]> {
  const [, T, H, W] = shape;
  const frames = toRgbFrames(video, T, H, W);
  const written: string[] = [];
  if (opts.mp4) {
    await writeMp4(paths.video, frames, W, H, opts.fps);
    written.push(paths.video);
  }
  if (opts.preview) {
    const scale = Math.max(1, Math.min(4, Math.floor(256 / Math.max(W, H))));
    await writeGif(paths.preview, frames, W, H, opts.fps, scale);
    written.push(paths.preview);
  }
  if (opts.frames) {
    makeDirs(paths.framesDir);
    for (let t = 0; t < T; t++) {
      const p = join(paths.framesDir, `${String(t + 1).padStart(4, '0')}.png`);
      await writePng(p, frames[t]!, W, H);
    }
    written.push(paths.framesDir + '/');
  }
  return written;
}

export async function writeSidecar(path: string, data: unknown): Promise<void> {
  await writeFileAtomic(path, JSON.stringify(data, null, 2) + '\n');
}

