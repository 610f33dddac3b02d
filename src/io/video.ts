// Video outputs: H.264 MP4 and animated GIF through ffmpeg (the static binary shipped in the npm
// package @ffmpeg-installer/ffmpeg, or $SD_FFMPEG, or `ffmpeg` on PATH), PNG frames with our own
// encoder. Every file is written to a temporary name in the same folder and renamed when complete:
// an interrupted run never leaves a half-written output.

import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { rename, unlink } from 'node:fs/promises';
import { dirname, basename, join } from 'node:path';
import { createRequire } from 'node:module';
import { deflateSync } from 'node:zlib';
import { writeFileAtomic } from './atomic.ts';
import { SmartDiffusionError } from '../util/errors.ts';

export class OutputError extends SmartDiffusionError {
  constructor(message: string) {
    super('OUTPUT_ERROR', message);
  }
}

let ffmpegCached: string | null | undefined;

/** Path of an ffmpeg binary, or null when none is available. */
function ffmpegPath(): string | null {
  if (ffmpegCached !== undefined) return ffmpegCached;
  const candidates: string[] = [];
  if (process.env.SD_FFMPEG) candidates.push(process.env.SD_FFMPEG);
  try {
    const req = createRequire(import.meta.url);
    const inst = req('@ffmpeg-installer/ffmpeg') as { path: string };
    candidates.push(inst.path);
  } catch {
    /* not installed for this platform */
  }
  candidates.push('ffmpeg');
  for (const c of candidates) {
    if (c !== 'ffmpeg' && !existsSync(c)) continue;
    const r = spawnSync(c, ['-hide_banner', '-version'], { encoding: 'utf8', timeout: 10_000 });
    if (r.status === 0) return (ffmpegCached = c);
  }
  return (ffmpegCached = null);
}

/** Video [3, T, H, W] float in [-1, 1] -> T frames of packed RGB8 (Wan: (x.clamp(-1,1)+1)/2·255). */
export function toRgbFrames(video: Float32Array, T: number, H: number, W: number): Uint8Array[] {
  const hw = H * W;
  const frames: Uint8Array[] = [];
  for (let t = 0; t < T; t++) {
    const f = new Uint8Array(hw * 3);
    for (let c = 0; c < 3; c++) {
      const base = (c * T + t) * hw;
      for (let i = 0; i < hw; i++) {
        const v = Math.min(1, Math.max(-1, video[base + i]!));
        f[i * 3 + c] = Math.round(((v + 1) / 2) * 255);
      }
    }
    frames.push(f);
  }
  return frames;
}

function tmpName(path: string): string {
  return join(dirname(path), `.${basename(path)}.${process.pid}.${Date.now()}.tmp`);
}

async function runFfmpeg(args: string[], frames: Uint8Array[], outPath: string, what: string): Promise<void> {
  const bin = ffmpegPath();
  if (!bin) throw new OutputError(`[${what}] no ffmpeg found: run 'npm ci' (installs @ffmpeg-installer/ffmpeg), install ffmpeg on PATH, or set SD_FFMPEG; or set output.mp4=false / output.preview=false`);
  const tmp = tmpName(outPath);
  // the temporary name has no video extension: tell ffmpeg the container
  const full = [...args, tmp];
  await new Promise<void>((resolve, reject) => {
    const p = spawn(bin, full, { stdio: ['pipe', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d) => {
      err += String(d);
      if (err.length > 20_000) err = err.slice(-10_000);
    });
    p.on('error', (e) => reject(new OutputError(`[${what}] could not start ffmpeg (${bin}): ${e.message}`)));
    p.on('close', (code) => (code === 0 ? resolve() : reject(new OutputError(`[${what}] ffmpeg failed (exit ${code}): ${err.trim().split('\n').slice(-3).join(' | ')}`))));
    p.stdin.on('error', () => {
      /* reported by close */
    });
    (async () => {
      for (const f of frames) {
        if (!p.stdin.write(f)) await new Promise((r) => p.stdin.once('drain', r));
      }
      p.stdin.end();
    })();
  }).catch(async (e) => {
    await unlink(tmp).catch(() => {});
    throw e;
  });
  await rename(tmp, outPath);
}

const rawInput = (W: number, H: number, fps: number) => ['-hide_banner', '-loglevel', 'error', '-y', '-f', 'rawvideo', '-pix_fmt', 'rgb24', '-s', `${W}x${H}`, '-r', String(fps), '-i', '-'];

/** H.264 MP4 (yuv420p, CRF 17; odd sizes are padded to even as H.264 requires). */
export async function writeMp4(path: string, frames: Uint8Array[], W: number, H: number, fps: number): Promise<void> {
  const pad = W % 2 || H % 2 ? ['-vf', 'pad=ceil(iw/2)*2:ceil(ih/2)*2'] : [];
  await runFfmpeg([...rawInput(W, H, fps), ...pad, '-c:v', 'libx264', '-pix_fmt', 'yuv420p', '-crf', '17', '-movflags', '+faststart', '-f', 'mp4'], frames, path, 'mp4');
}

/** Animated GIF with a per-video palette (ffmpeg palettegen/paletteuse), looping. `scale` enlarges small videos. */
export async function writeGif(path: string, frames: Uint8Array[], W: number, H: number, fps: number, scale = 1): Promise<void> {
  const s = scale !== 1 ? `scale=${W * scale}:${H * scale}:flags=neighbor,` : '';
  await runFfmpeg([...rawInput(W, H, fps), '-vf', `${s}split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=bayer`, '-loop', '0', '-f', 'gif'], frames, path, 'gif');
}

// ---- PNG (own encoder: 8-bit RGB, filter 0, zlib) ----

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(buf: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < buf.length; i++) c = CRC_TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type: string, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  dv.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

export function encodePng(rgb: Uint8Array, W: number, H: number): Uint8Array {
  const raw = new Uint8Array(H * (W * 3 + 1));
  for (let y = 0; y < H; y++) raw.set(rgb.subarray(y * W * 3, (y + 1) * W * 3), y * (W * 3 + 1) + 1);
  const ihdr = new Uint8Array(13);
  const dv = new DataView(ihdr.buffer);
  dv.setUint32(0, W);
  dv.setUint32(4, H);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const sig = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
  const parts = [sig, chunk('IHDR', ihdr), chunk('IDAT', deflateSync(raw)), chunk('IEND', new Uint8Array(0))];
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

export async function writePng(path: string, rgb: Uint8Array, W: number, H: number): Promise<void> {
  await writeFileAtomic(path, encodePng(rgb, W, H));
}
