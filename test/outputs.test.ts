// Output writing under failure: full disks (a 1 MiB tmpfs), read-only file systems, truncated files
// from an ffmpeg that exits 0, NaN videos and latents, interrupts, stale and leftover temp files.
// Every failure must be one line, leave no temp file and leave the final name untouched.
import { describe, it, expect, beforeAll, afterAll, afterEach } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeFileAtomic, withAtomicFile } from '../src/io/atomic.ts';
import { writeSafetensors } from '../src/io/safetensors.ts';
import { OutputError, ffmpegPath, writeMp4, writeGif, encodePng } from '../src/io/video.ts';
import { cleanupOnExit, cleanStaleTemps, registerTemp, registerChild, liveResources, tempPathFor, tempOwnerPid } from '../src/io/cleanup.ts';
import { verifyOutputFile } from '../src/io/verify.ts';
import { checkWritable, checkWritableFile, loadLatents, outputPaths, saveLatents, writeSidecar, writeVideoOutputs } from '../src/pipeline/outputs.ts';
import { checkMemorySnapshotWritable } from '../src/pipeline/report.ts';
import { CheckpointError, InterruptedError } from '../src/util/errors.ts';
import { NonFiniteError } from '../src/util/non-finite.ts';

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'sd-outputs-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});
const savedFfmpeg = process.env.SD_FFMPEG;
afterEach(() => {
  if (savedFfmpeg === undefined) delete process.env.SD_FFMPEG;
  else process.env.SD_FFMPEG = savedFfmpeg;
});

let seq = 0;
function freshDir(name: string): string {
  const d = join(dir, `${name}-${++seq}`);
  mkdirSync(d);
  return d;
}

/** Seeded noise video [3, T, H, W] in [-1, 1]: incompressible, so the encoded file is large. */
function noiseVideo(T: number, H: number, W: number, seed = 1): Float32Array {
  const v = new Float32Array(3 * T * H * W);
  let s = seed >>> 0;
  for (let i = 0; i < v.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    v[i] = (s / 2 ** 32) * 2 - 1;
  }
  return v;
}

/** Every test asserts with this: a one-line message, no stack, no newline. */
function expectOneLine(e: unknown): Error {
  expect(e).toBeInstanceOf(Error);
  const msg = (e as Error).message;
  expect(msg).not.toMatch(/\n/);
  expect(msg).not.toMatch(/\bat .*\.ts:\d+/);
  return e as Error;
}

async function caught(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (e) {
    return expectOneLine(e);
  }
  throw new Error('expected a rejection');
}

/** Our temp names left in `d` (any scheme). */
function temps(d: string): string[] {
  return existsSync(d) ? readdirSync(d).filter((n) => tempOwnerPid(n) !== null) : [];
}

/** A fake ffmpeg: answers -version, otherwise runs `body` with $out = the last argument (the temp file). */
function fakeFfmpeg(name: string, body: string): string {
  const p = join(dir, `fake-ffmpeg-${name}.sh`);
  writeFileSync(p, `#!/bin/sh\nfor a; do out="$a"; done\nif [ "$2" = "-version" ]; then echo "ffmpeg version fake"; exit 0; fi\n${body}\n`);
  chmodSync(p, 0o755);
  return p;
}

const HAVE_FFMPEG = ffmpegPath() !== null;

// ---- a 1 MiB tmpfs (root only; skipped with the reason otherwise) ----

const tmpfsDirs: string[] = [];
function mountTmpfs(opts: string): { dir: string | null; reason: string } {
  const d = mkdtempSync(join(tmpdir(), 'sd-tmpfs-'));
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', opts, 'tmpfs', d], { encoding: 'utf8' });
  if (r.status !== 0) {
    rmSync(d, { recursive: true, force: true });
    return { dir: null, reason: `mount -t tmpfs not permitted here (${(r.stderr || r.error?.message || `exit ${r.status}`).trim()})` };
  }
  tmpfsDirs.push(d);
  return { dir: d, reason: '' };
}
const full = mountTmpfs('size=1m');
const ro = full.dir ? mountTmpfs('size=1m,ro') : { dir: null, reason: full.reason };
if (!full.dir) console.log(`[outputs.test] skipping the full-disk tests: ${full.reason}`);
afterAll(() => {
  for (const d of tmpfsDirs) {
    spawnSync('umount', [d]);
    rmSync(d, { recursive: true, force: true });
  }
});

describe('full disk (1 MiB tmpfs)', () => {
  it.skipIf(!full.dir || !HAVE_FFMPEG)('an MP4 larger than the disk: OutputError "no space", no temp file, no final file', async () => {
    const d = join(full.dir!, 'mp4');
    mkdirSync(d);
    const paths = outputPaths(join(d, 'noise.mp4'));
    const e = await caught(writeVideoOutputs(paths, noiseVideo(24, 256, 256), [3, 24, 256, 256], { mp4: true, preview: false, frames: false, fps: 16 }));
    expect(e).toBeInstanceOf(OutputError);
    expect(e.message).toMatch(/^\[output\] no space left on device writing .*noise\.mp4.*; free space or choose another output\.path \(-o\)$/);
    expect(readdirSync(d)).toEqual([]);
  });
  it.skipIf(!full.dir || !HAVE_FFMPEG)('a GIF larger than the disk: OutputError "no space", no temp file, no final file', async () => {
    const d = join(full.dir!, 'gif');
    mkdirSync(d);
    const paths = outputPaths(join(d, 'noise.mp4'));
    const e = await caught(writeVideoOutputs(paths, noiseVideo(24, 256, 256, 7), [3, 24, 256, 256], { mp4: false, preview: true, frames: false, fps: 16 }));
    expect(e).toBeInstanceOf(OutputError);
    expect(e.message).toMatch(/no space left on device writing .*noise\.gif/);
    expect(readdirSync(d)).toEqual([]);
  });
  it.skipIf(!full.dir)('sidecar, writeFileAtomic, latents and PNG frames into a full disk: one-line OutputErrors; an existing file is kept', async () => {
    const d = join(full.dir!, 'small');
    mkdirSync(d);
    writeFileSync(join(d, 'run.json'), '{"old": true}\n');
    const big = { blob: 'x'.repeat(2 * 1024 * 1024) };
    const e1 = await caught(writeSidecar(join(d, 'run.json'), big));
    expect(e1).toBeInstanceOf(OutputError);
    expect(e1.message).toMatch(/^\[output\] no space left on device writing .*run\.json \(needs ~2\.0 MB\); free space or choose another output\.path \(-o\) or output\.sidecar=false$/);
    expect(readFileSync(join(d, 'run.json'), 'utf8')).toBe('{"old": true}\n');

    const e2 = await caught(writeFileAtomic(join(d, 'blob.bin'), new Uint8Array(3 * 1024 * 1024)));
    expect(e2).toBeInstanceOf(OutputError);
    expect(e2.message).toMatch(/no space left on device writing .*blob\.bin \(needs ~3\.0 MB\)/);

    const e3 = await caught(saveLatents(join(d, 'x.latents.safetensors'), { data: new Float32Array(16 * 5 * 64 * 64), shape: [16, 5, 64, 64] }, {}));
    expect(e3).toBeInstanceOf(OutputError);
    expect(e3.message).toMatch(/no space left on device writing .*x\.latents\.safetensors \(needs ~1\.3 MB\); free space or choose another output\.path \(-o\) or output\.save_latents=false$/);

    // chunked writes (unknown total): names what had been written
    const e4 = await caught(writeFileAtomic(join(d, 'chunks.bin'), [new Uint8Array(800_000), new Uint8Array(800_000)]));
    expect(e4.message).toMatch(/no space left on device writing .*chunks\.bin \(needs more than the .* MB written before the disk filled\)/);

    // PNG frames of noise: 8 × 256×256 RGB ≈ 1.6 MB
    const paths = outputPaths(join(d, 'frames.mp4'));
    const e5 = await caught(writeVideoOutputs(paths, noiseVideo(8, 256, 256, 3), [3, 8, 256, 256], { mp4: false, preview: false, frames: true, fps: 16 }));
    expect(e5).toBeInstanceOf(OutputError);
    expect(e5.message).toMatch(/no space left on device writing .*frames_frames\/000\d\.png/);
    expect(readdirSync(d).sort()).toEqual(['run.json']);
    expect(liveResources().temps).toEqual([]);
  });
  it.skipIf(!ro.dir)('a read-only file system: OutputError naming it, before (checkWritable) and while writing', async () => {
    const e1 = expectOneLine(
      (() => {
        try {
          checkWritable(join(ro.dir!, 'clip.mp4'));
        } catch (e) {
          return e;
        }
      })(),
    );
    expect(e1).toBeInstanceOf(OutputError);
    expect(e1.message).toMatch(/not writable \(read-only file system\); choose another output\.path \(-o\)/);
    const e2 = await caught(writeFileAtomic(join(ro.dir!, 'x.json'), '{}'));
    expect(e2).toBeInstanceOf(OutputError);
    expect(e2.message).toMatch(/^\[output\] the file system is read-only writing .*x\.json; choose another/);
  });
});

describe('verification before the rename', () => {
  it('a truncated MP4 from an ffmpeg that exits 0 is caught; nothing is left', async () => {
    // ftyp (16 bytes) + a moov box that claims 1000 bytes but has 20
    process.env.SD_FFMPEG = fakeFfmpeg('trunc-mp4', `cat > /dev/null\nprintf '\\000\\000\\000\\020ftypisom\\000\\000\\002\\000\\000\\000\\003\\350moov0123456789abcdef0123' > "$out"\nexit 0`);
    const d = freshDir('trunc');
    const e = await caught(writeMp4(join(d, 'clip.mp4'), [new Uint8Array(12)], 2, 2, 16));
    expect(e).toBeInstanceOf(OutputError);
    expect(e.message).toMatch(/^\[output\] the file written for .*clip\.mp4 is incomplete \(box 'moov' at offset 16 runs \d+ bytes past the end of the file\), so it was not put in place; /);
    expect(readdirSync(d)).toEqual([]);
  });
  it('an MP4 without moov, a GIF without trailer and an empty output are caught', async () => {
    const d = freshDir('nomoov');
    process.env.SD_FFMPEG = fakeFfmpeg('nomoov', `cat > /dev/null\nprintf '\\000\\000\\000\\020ftypisom\\000\\000\\002\\000\\000\\000\\000\\010free' > "$out"`);
    expect((await caught(writeMp4(join(d, 'a.mp4'), [new Uint8Array(12)], 2, 2, 16))).message).toMatch(/incomplete \(no 'moov' box\)/);
    process.env.SD_FFMPEG = fakeFfmpeg('notrailer', `cat > /dev/null\nprintf 'GIF89a0123456789abcdef' > "$out"`);
    expect((await caught(writeGif(join(d, 'a.gif'), [new Uint8Array(12)], 2, 2, 16))).message).toMatch(/incomplete \(no GIF trailer/);
    process.env.SD_FFMPEG = fakeFfmpeg('empty', `cat > /dev/null\n: > "$out"`);
    expect((await caught(writeGif(join(d, 'b.gif'), [new Uint8Array(12)], 2, 2, 16))).message).toMatch(/incomplete \(the file is empty\)/);
    expect(readdirSync(d)).toEqual([]);
  });
  it("ffmpeg's stderr is an error even with exit 0 (\"Error writing trailer ... No space left on device\")", async () => {
    const d = freshDir('stderr');
    process.env.SD_FFMPEG = fakeFfmpeg('enospc0', `cat > /dev/null\nprintf 'GIF89a;' > "$out"\necho "Error writing trailer of $out: No space left on device" >&2\nexit 0`);
    const e = await caught(writeGif(join(d, 'a.gif'), [new Uint8Array(12)], 2, 2, 16));
    expect(e.message).toMatch(/^\[output\] no space left on device writing .*a\.gif/);
    process.env.SD_FFMPEG = fakeFfmpeg('other', `cat > /dev/null\necho "Unknown encoder 'libx264'" >&2\nexit 1`);
    const e2 = await caught(writeMp4(join(d, 'a.mp4'), [new Uint8Array(12)], 2, 2, 16));
    expect(e2.message).toMatch(/^\[mp4\] ffmpeg failed writing .*a\.mp4 \(exit 1\): Unknown encoder 'libx264'; /);
    expect(readdirSync(d)).toEqual([]);
  });
  it('a safetensors file whose data is shorter than its header says is not put in place', async () => {
    const d = freshDir('st');
    const target = join(d, 'w.safetensors');
    const e = await caught(
      withAtomicFile(target, async (fh) => {
        const hdr = new TextEncoder().encode(JSON.stringify({ a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }).padEnd(56));
        const len = new Uint8Array(8);
        new DataView(len.buffer).setBigUint64(0, BigInt(hdr.length), true);
        await fh.write(len);
        await fh.write(hdr);
        await fh.write(new Uint8Array(8)); // 8 of the 16 data bytes
      }),
    );
    expect(e.message).toMatch(/incomplete \(the file has 72 bytes, the header describes 80\)/);
    expect(readdirSync(d)).toEqual([]);
    await writeSafetensors(target, [{ key: 'a', dtype: 'F32', shape: [4], data: new Uint8Array(16) }]);
    expect(await verifyOutputFile(target, 'safetensors')).toBeNull();
  });
  it.skipIf(!HAVE_FFMPEG)('real MP4, GIF and PNG outputs pass verification', async () => {
    delete process.env.SD_FFMPEG;
    const d = freshDir('real');
    const paths = outputPaths(join(d, 'ok.mp4'));
    const written = await writeVideoOutputs(paths, noiseVideo(5, 17, 23), [3, 5, 17, 23], { mp4: true, preview: true, frames: true, fps: 8 });
    expect(written).toEqual([paths.video, paths.preview, paths.framesDir + '/']);
    expect(await verifyOutputFile(paths.video, 'mp4')).toBeNull();
    expect(await verifyOutputFile(paths.preview, 'gif')).toBeNull();
    expect(readdirSync(paths.framesDir)).toEqual(['0001.png', '0002.png', '0003.png', '0004.png', '0005.png']);
    expect(await verifyOutputFile(join(paths.framesDir, '0005.png'), 'png')).toBeNull();
    expect(readdirSync(d).sort()).toEqual(['ok.gif', 'ok.mp4', 'ok_frames']);
    // a second run replaces the frames folder as a whole
    await writeVideoOutputs(paths, noiseVideo(2, 17, 23), [3, 2, 17, 23], { mp4: false, preview: false, frames: true, fps: 8 });
    expect(readdirSync(paths.framesDir)).toEqual(['0001.png', '0002.png']);
    expect(readdirSync(d).sort()).toEqual(['ok.gif', 'ok.mp4', 'ok_frames']);
    // a PNG cut short
    const png = encodePng(new Uint8Array(4 * 4 * 3), 4, 4);
    writeFileSync(join(d, 'cut.png'), png.subarray(0, png.length - 4));
    expect(await verifyOutputFile(join(d, 'cut.png'), 'png')).toMatch(/no IEND/);
  });
});

describe('temp files and children on every exit path', () => {
  /** a pid that is certainly not running: a child that has exited */
  function deadPid(): number {
    const r = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
    return Number(r.stdout);
  }
  it('one naming scheme with our pid', () => {
    const t = tempPathFor('/x/y/clip.mp4');
    expect(t).toMatch(new RegExp(`^/x/y/\\.clip\\.mp4\\.tmp-${process.pid}-[0-9a-f]{8}$`));
    expect(tempOwnerPid(t.split('/').pop()!)).toBe(process.pid);
    expect(tempOwnerPid('clip.mp4')).toBeNull();
  });
  it('checkWritable removes temp files of dead runs only', () => {
    const d = freshDir('stale');
    const dead = deadPid();
    const names = {
      dead: `.clip.mp4.tmp-${dead}-deadbeef`,
      deadLegacy: `.clip.mp4.${dead}.1712345678901.tmp`,
      deadFrames: `.clip_frames.tmp-${dead}-0badf00d`,
      deadProbe: `.sd-write-probe-${dead}`,
      live: `.clip.mp4.tmp-${process.pid}-cafebabe`,
      liveOther: `.clip.gif.tmp-1-12345678`, // pid 1 is alive
      notOurs: '.clip.mp4.tmp-notours',
      final: 'clip.mp4',
    };
    for (const [k, n] of Object.entries(names)) {
      if (k === 'deadFrames') {
        mkdirSync(join(d, n));
        writeFileSync(join(d, n, '0001.png'), 'x');
      } else writeFileSync(join(d, n), 'x');
    }
    checkWritable(join(d, 'clip.mp4'));
    expect(readdirSync(d).sort()).toEqual([names.live, names.liveOther, names.notOurs, names.final].sort());
    expect(cleanStaleTemps(join(d, 'no-such-folder'))).toEqual([]);
  });
  it('cleanupOnExit removes registered temp files and kills registered children', async () => {
    const d = freshDir('exit');
    const t = join(d, `.a.mp4.tmp-${process.pid}-00000001`);
    writeFileSync(t, 'partial');
    registerTemp(t);
    const child = spawn('sleep', ['30'], { stdio: 'ignore' });
    registerChild(child);
    const exited = new Promise<string | null>((r) => child.once('exit', (_c, sig) => r(sig)));
    expect(liveResources().children).toContain(child.pid);
    cleanupOnExit();
    expect(await exited).toBe('SIGKILL');
    expect(readdirSync(d)).toEqual([]);
    expect(liveResources()).toEqual({ temps: [], children: [] });
    cleanupOnExit(); // idempotent
  });
  it('process.exit(130) (the forced second Ctrl-C) removes a live temp file', () => {
    const d = freshDir('exit130');
    const script = join(d, 'run.ts');
    const cleanupTs = join(process.cwd(), 'src/io/cleanup.ts');
    writeFileSync(
      script,
      `import { writeFileSync } from 'node:fs';\nimport { registerTemp, tempPathFor } from ${JSON.stringify(cleanupTs)};\n` +
        `const t = tempPathFor(${JSON.stringify(join(d, 'clip.mp4'))});\nwriteFileSync(t, 'partial');\nregisterTemp(t);\nprocess.exit(130);\n`,
    );
    const r = spawnSync(process.execPath, ['--import', 'tsx', script], { encoding: 'utf8', cwd: process.cwd(), timeout: 60_000 });
    expect(r.status, r.stderr).toBe(130);
    expect(readdirSync(d)).toEqual(['run.ts']);
  });
});

describe('interrupts during writes', () => {
  it('abort while ffmpeg runs: ffmpeg is killed, InterruptedError, no temp file', async () => {
    const d = freshDir('abort');
    process.env.SD_FFMPEG = fakeFfmpeg('slow', `printf 'partial' > "$out"\nexec sleep 30`);
    const ac = new AbortController();
    const paths = outputPaths(join(d, 'clip.mp4'));
    const p = writeVideoOutputs(paths, noiseVideo(2, 8, 8), [3, 2, 8, 8], { mp4: true, preview: true, frames: true, fps: 8, signal: ac.signal });
    const t0 = Date.now();
    while (temps(d).length === 0 && Date.now() - t0 < 10_000) await new Promise((r) => setTimeout(r, 20));
    expect(liveResources().children.length).toBe(1);
    ac.abort();
    const e = await caught(p);
    expect(e).toBeInstanceOf(InterruptedError);
    expect(e.message).toMatch(/^\[output\] interrupted while writing .*clip\.mp4/);
    expect(readdirSync(d)).toEqual([]);
    expect(liveResources()).toEqual({ temps: [], children: [] });
  });
  it('abort between PNG frames: no frames folder, no temp', async () => {
    const d = freshDir('abort-png');
    let reads = 0;
    // a signal that turns aborted at its 4th check: between PNG frames, deterministically
    const signal = {
      get aborted() {
        return ++reads > 3;
      },
      addEventListener() {},
      removeEventListener() {},
    } as unknown as AbortSignal;
    const paths = outputPaths(join(d, 'clip.mp4'));
    const e = await caught(writeVideoOutputs(paths, noiseVideo(6, 8, 8), [3, 6, 8, 8], { mp4: false, preview: false, frames: true, fps: 8, signal }));
    expect(e).toBeInstanceOf(InterruptedError);
    expect(e.message).toMatch(/clip_frames\/000\d\.png/);
    expect(readdirSync(d)).toEqual([]);
  });
  it('an already aborted signal writes nothing', async () => {
    const d = freshDir('pre-abort');
    const ac = new AbortController();
    ac.abort();
    const e = await caught(writeVideoOutputs(outputPaths(join(d, 'c.mp4')), noiseVideo(1, 4, 4), [3, 1, 4, 4], { mp4: true, preview: true, frames: true, fps: 8, signal: ac.signal }));
    expect(e).toBeInstanceOf(InterruptedError);
    expect(readdirSync(d)).toEqual([]);
  });
  it.skipIf(!existsSync('/proc/self/stat'))('ffmpeg runs in its own process group (a terminal Ctrl-C reaches only us)', async () => {
    const d = freshDir('pgid');
    const side = join(d, 'pgid.txt');
    process.env.SD_FFMPEG = fakeFfmpeg('pgid', `cat > /dev/null\ncut -d' ' -f5 /proc/$$/stat > ${side}\nprintf 'GIF89a0123456;' > "$out"`);
    await writeGif(join(d, 'a.gif'), [new Uint8Array(12)], 2, 2, 8);
    const ours = readFileSync('/proc/self/stat', 'utf8').split(') ')[1]!.split(' ')[2];
    expect(readFileSync(side, 'utf8').trim()).not.toBe(ours);
    expect(readdirSync(d).sort()).toEqual(['a.gif', 'pgid.txt']);
  });
});

describe('bad numbers', () => {
  it('writeVideoOutputs rejects a video with NaN/Inf before writing anything', async () => {
    const d = freshDir('nan');
    const v = noiseVideo(3, 4, 4);
    v[3 * 4 * 4 * 1 + 0 * 48 + 5] = NaN; // channel 1, frame 0
    v[16 * 2 + 3] = Infinity; // channel 0, frame 2
    const e = await caught(writeVideoOutputs(outputPaths(join(d, 'c.mp4')), v, [3, 3, 4, 4], { mp4: true, preview: true, frames: true, fps: 8 }));
    expect(e).toBeInstanceOf(NonFiniteError);
    expect((e as NonFiniteError).code).toBe('NON_FINITE');
    expect(e.message).toMatch(/^\[decode\] the decoded video has 2 non-finite values of 144 \(first at frame 2, channel 0: Infinity\); nothing was written\./);
    expect(readdirSync(d)).toEqual([]);
  });
  it('loadLatents rejects non-float dtypes, NaN values and implausible shapes; widens F16', async () => {
    const d = freshDir('latents');
    const shape = [16, 1, 2, 2];
    const n = 64;
    await writeSafetensors(join(d, 'i32.latents.safetensors'), [{ key: 'latents', dtype: 'I32', shape, data: new Uint8Array(n * 4) }]);
    let e = await caught(loadLatents(join(d, 'i32.latents.safetensors')));
    expect(e).toBeInstanceOf(CheckpointError);
    expect(e.message).toMatch(/^\[latents\] .*i32\.latents\.safetensors: 'latents' has dtype I32, expected a float dtype/);

    const f = new Float32Array(n).fill(0.5);
    f[37] = NaN;
    f[50] = -Infinity;
    await writeSafetensors(join(d, 'nan.latents.safetensors'), [{ key: 'latents', dtype: 'F32', shape, data: new Uint8Array(f.buffer) }]);
    e = await caught(loadLatents(join(d, 'nan.latents.safetensors')));
    expect(e).toBeInstanceOf(CheckpointError);
    expect(e.message).toMatch(/nan\.latents\.safetensors: 2 of 64 values are NaN or infinite \(first at index 37 = \[9, 0, 0, 1\], value NaN\)/);

    await writeSafetensors(join(d, 'r3.latents.safetensors'), [{ key: 'latents', dtype: 'F32', shape: [16, 2, 2], data: new Uint8Array(n * 4) }]);
    expect((await caught(loadLatents(join(d, 'r3.latents.safetensors')))).message).toMatch(/must be \[C, F, H, W\], got \[16, 2, 2\]/);
    await writeSafetensors(join(d, 'z.latents.safetensors'), [{ key: 'latents', dtype: 'F32', shape: [16, 0, 2, 2], data: new Uint8Array(0) }]);
    expect((await caught(loadLatents(join(d, 'z.latents.safetensors')))).message).toMatch(/empty dimension/);
    await writeSafetensors(join(d, 'nokey.safetensors'), [{ key: 'x', dtype: 'F32', shape: [1], data: new Uint8Array(4) }]);
    expect((await caught(loadLatents(join(d, 'nokey.safetensors')))).message).toMatch(/has no 'latents' tensor \(keys: "x"\)/);

    const h = new Uint16Array(n).fill(0x3c00); // 1.0 in f16
    await writeSafetensors(join(d, 'f16.latents.safetensors'), [{ key: 'latents', dtype: 'F16', shape, data: new Uint8Array(h.buffer) }], { meta: '{"seed":3}' });
    const ok = await loadLatents(join(d, 'f16.latents.safetensors'));
    expect(ok.latents.data).toBeInstanceOf(Float32Array);
    expect(ok.latents.data[5]).toBe(1);
    expect(ok.latents.shape).toEqual(shape);
    expect(ok.meta).toEqual({ seed: 3 });
  });
});

describe('checking paths before any GPU work', () => {
  it('checkWritableFile / checkMemorySnapshotWritable: one-line OutputErrors naming the option', () => {
    const d = freshDir('check');
    writeFileSync(join(d, 'afile'), 'x');
    const run = (f: () => void) => {
      try {
        f();
      } catch (e) {
        return expectOneLine(e);
      }
      throw new Error('expected a throw');
    };
    const e1 = run(() => checkMemorySnapshotWritable(join(d, 'afile', 'snap')));
    expect(e1).toBeInstanceOf(OutputError);
    expect(e1.message).toMatch(/^\[output\] cannot create the output folder .*afile.*; choose another report\.memory_snapshot \(--memory-snapshot\)$/);
    mkdirSync(join(d, 'snap.json'));
    expect(run(() => checkMemorySnapshotWritable(join(d, 'snap'))).message).toMatch(/snap\.json is a folder; give report\.memory_snapshot/);
    checkWritableFile(join(d, 'sub', 'ok.json'), 'x');
    expect(existsSync(join(d, 'sub'))).toBe(true);
    expect(readdirSync(join(d, 'sub'))).toEqual([]);
  });
});
