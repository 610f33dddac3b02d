// Video outputs: H.264 MP4 and animated GIF through ffmpeg (the static binary shipped in the npm
// package @ffmpeg-installer/ffmpeg, or $SD_FFMPEG, or `ffmpeg` on PATH), PNG frames with our own
// encoder. Every file is written to a temporary name in the same folder and renamed when complete:
// an interrupted run never leaves a half-written output.

import { spawn, spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { deflateSync } from 'node:zlib';
import { writeFileAtomic, incompleteError } from './atomic.ts';
import { tempPathFor, registerTemp, unregisterTemp, registerChild } from './cleanup.ts';
import { OutputError, outputErrorFor, outputIoError, errnoFromText, oneLine } from './output-error.ts';
import { verifyOutputFile } from './verify.ts';
import { InterruptedError } from '../util/errors.ts';

// OutputError lives in output-error.ts (atomic.ts needs it too); re-exported here where callers import it
export { OutputError };

let ffmpegCached: { env: string | undefined; path: string | null } | undefined;

/** Forget the ffmpeg found so far (tests that change $SD_FFMPEG; a change of $SD_FFMPEG also does this). */
export function resetFfmpegCache(): void {
  ffmpegCached = undefined;
}

/** Path of an ffmpeg binary, or null when none is available. Cached per value of $SD_FFMPEG. */
export function ffmpegPath(): string | null {
  const env = process.env.SD_FFMPEG || undefined;
  if (ffmpegCached && ffmpegCached.env === env) return ffmpegCached.path;
  const candidates: string[] = [];
  if (env) candidates.push(env);
  try {
    const req = createRequire(import.meta.url);
    const inst = req('@ffmpeg-installer/ffmpeg') as { path: string };
    candidates.push(inst.path);
  } catch {
    /* not installed for this platform */
  }
  candidates.push('ffmpeg');
  let found: string | null = null;
  for (const c of candidates) {
    if (c !== 'ffmpeg' && !existsSync(c)) continue;
    const r = spawnSync(c, ['-hide_banner', '-version'], { encoding: 'utf8', timeout: 10_000 });
    if (r.status === 0) {
      found = c;
      break;
    }
  }
  ffmpegCached = { env, path: found };
  return found;
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

function sizeOf(p: string): number | undefined {
  try {
    return statSync(p).size;
  } catch {
    return undefined;
  }
}

export function interrupted(path: string): InterruptedError {
  return new InterruptedError(`[output] interrupted while writing ${path}; nothing was left under that name`);
}

/**
 * Run ffmpeg with `args` + a temporary output name, feed it `frames` on stdin, then check the
 * result before renaming it to `outPath`: ffmpeg runs with `-loglevel error`, so anything on its
 * stderr is an error even when it exits 0 (it does after "Error writing trailer ...: No space left on
 * device"), and the file must pass `verifyOutputFile`. ffmpeg runs in its own process group, so a
 * terminal Ctrl-C reaches only us; `signal` kills it (-> InterruptedError). The temp file is removed
 * on every failure and registered for `cleanupOnExit` meanwhile.
 */
async function runFfmpeg(args: string[], frames: Uint8Array[], outPath: string, what: 'mp4' | 'gif', signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) throw interrupted(outPath);
  const bin = ffmpegPath();
  if (!bin) throw new OutputError(`[${what}] no ffmpeg found: run 'npm ci' (installs @ffmpeg-installer/ffmpeg), install ffmpeg on PATH, or set SD_FFMPEG; or set output.mp4=false / output.preview=false`);
  const tmp = tempPathFor(outPath);
  registerTemp(tmp);
  let placed = false;
  try {
    // the temporary name has no video extension: the args tell ffmpeg the container (-f)
    await new Promise<void>((resolvePromise, reject) => {
      let p;
      try {
        p = spawn(bin, [...args, tmp], { stdio: ['pipe', 'ignore', 'pipe'], detached: process.platform !== 'win32' });
      } catch (e) {
        reject(new OutputError(`[${what}] could not start ffmpeg (${bin}): ${oneLine((e as Error).message)}`));
        return;
      }
      const child = p;
      registerChild(child);
      let err = '';
      child.stderr!.on('data', (d) => {
        err += String(d);
        if (err.length > 20_000) err = err.slice(-10_000);
      });
      const onAbort = () => {
        try {
          child.kill('SIGKILL');
        } catch {
          /* gone */
        }
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      child.on('error', (e) => {
        signal?.removeEventListener('abort', onAbort);
        reject(new OutputError(`[${what}] could not start ffmpeg (${bin}): ${oneLine(e.message)}; install ffmpeg or set SD_FFMPEG`));
      });
      child.on('close', (code, sig) => {
        signal?.removeEventListener('abort', onAbort);
        if (signal?.aborted) return reject(interrupted(outPath));
        const text = err.trim();
        if (code === 0 && !sig && !text) return resolvePromise();
        const errno = errnoFromText(text);
        const last = oneLine(text.split('\n').slice(-3).join('\n'));
        if (errno) return reject(outputErrorFor(errno, outPath, last, { writtenBytes: sizeOf(tmp) }));
        const how = sig ? `killed by ${sig}` : `exit ${code}`;
        reject(new OutputError(`[${what}] ffmpeg failed writing ${outPath} (${how})${last ? `: ${last}` : ''}; check the message, the output folder and the ffmpeg binary (SD_FFMPEG)`));
      });
      child.stdin!.on('error', () => {
        /* EPIPE when ffmpeg exits early: reported by 'close' with its stderr */
      });
      const closed = new Promise<void>((r) => child.once('close', () => r()));
      (async () => {
        for (const f of frames) {
          if (signal?.aborted || child.exitCode !== null || child.signalCode !== null) break;
          // wait for the pipe to drain, or for ffmpeg to exit (then 'close' reports why)
          if (!child.stdin!.write(f)) await Promise.race([new Promise((r) => child.stdin!.once('drain', r)), closed]);
        }
        child.stdin!.end();
      })().catch(() => undefined);
    });
    const problem = await verifyOutputFile(tmp, what);
    if (problem) throw incompleteError(outPath, problem);
    if (signal?.aborted) throw interrupted(outPath);
    await rename(tmp, outPath).catch((e) => {
      throw outputIoError(e, outPath);
    });
    placed = true;
  } finally {
    if (!placed) await rm(tmp, { force: true }).catch(() => undefined);
    unregisterTemp(tmp);
  }
}

const rawInput = (W: number, H: number, fps: number) => ['-hide_banner', '-loglevel', 'error', '-y', '-f', 'rawvideo', '-pix_fmt', 'rgb24', '-s', `${W}x${H}`, '-r', String(fps), '-i', '-'];

/** H.264 MP4 (yuv420p, CRF 17; odd sizes are padded to even as H.264 requires). */
export async function writeMp4(path: string, frames: Uint8Array[], W: number, H: number, fps: number, signal?: AbortSignal): Promise<void> {
  const pad = W % 2 || H % 2 ? ['-vf', 'pad=ceil(iw/2)*2:ceil(ih/2)*2'] : [];
  await runFfmpeg([...rawInput(W, H, fps), ...pad, '-c:v', 'libx264', '-pix_fmt', 'yuv420p', '-crf', '17', '-movflags', '+faststart', '-f', 'mp4'], frames, path, 'mp4', signal);
}

/** Animated GIF with a per-video palette (ffmpeg palettegen/paletteuse), looping. `scale` enlarges small videos. */
export async function writeGif(path: string, frames: Uint8Array[], W: number, H: number, fps: number, scale = 1, signal?: AbortSignal): Promise<void> {
  const s = scale !== 1 ? `scale=${W * scale}:${H * scale}:flags=neighbor,` : '';
  await runFfmpeg([...rawInput(W, H, fps), '-vf', `${s}split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=bayer`, '-loop', '0', '-f', 'gif'], frames, path, 'gif', signal);
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
