// The failure modes of `npm run generate`, each as a user meets it (a subprocess under plain node,
// as `npm run generate` runs it): the exit status, ONE clear `error:` line, no stack trace, no hang,
// and the output folder's exact contents afterwards. docs/reliability.md lists every case.
import { describe, it, expect } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tinyModelWithTokenizer } from './helpers/models.ts';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const CLI = join(ROOT, 'src', 'cli', 'generate.ts');
const MODEL = tinyModelWithTokenizer({ num_inference_steps: 1 });

function gen(args: string[], opts: { env?: Record<string, string>; timeout?: number } = {}) {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, ...args], {
    cwd: ROOT,
    env: { ...process.env, ...opts.env },
    encoding: 'utf8',
    timeout: opts.timeout ?? 240_000,
  });
  return { status: r.status, signal: r.signal, out: r.stdout, err: r.stderr, all: r.stdout + r.stderr, ms: performance.now() - t0 };
}

const outDir = () => mkdtempSync(join(tmpdir(), 'sd-fail-'));
const files = (dir: string) => (existsSync(dir) ? readdirSync(dir).sort() : []);

/** one `error:` line, no stack frames, no raw Node error dump */
function expectOneLine(stderr: string): string {
  const errs = stderr.split('\n').filter((l) => l.startsWith('error:'));
  expect(errs, stderr).toHaveLength(1);
  expect(stderr).not.toMatch(/^\s+at .+:\d+:\d+\)?$/m);
  expect(stderr).not.toMatch(/node:internal|Error: .*\n\s+at /);
  return errs[0]!;
}

describe('failure modes of npm run generate (subprocess)', () => {
  it('an option missing its value names the option, not the prompt', () => {
    const r = gen(['a cat', '--seed', '-o', 'x.mp4']);
    expect(r.status).toBe(2);
    expect(expectOneLine(r.err)).toMatch(/--seed needs a value before -o/);
  });

  it('too big for this machine: refused by the preflight in seconds, before loading, with the bytes and a size that fits', { timeout: 120_000 }, () => {
    const dir = outDir();
    const r = gen(['a cat', '-m', MODEL, '-o', join(dir, 'o.mp4'), '--size', '4096x4096', '--frames', '81']);
    expect(r.status, r.all).toBe(4);
    const line = expectOneLine(r.err);
    expect(line).toMatch(/\[preflight\] 4096x4096, 81 frames/);
    expect(line).toMatch(/needs [0-9.]+ [GM]iB of RAM .* and [0-9.]+ [GM]iB is available|cannot be laid out on this device \(\[\w+\] .*binding limit|needs one [0-9.]+ [GM]iB buffer/);
    expect(line).toMatch(/\d+x\d+ at 81 frames (fits|could fit)/);
    expect(r.all).not.toMatch(/\[denoise\]/);
    expect(files(dir)).toEqual([]);
  });

  it('a video the host cannot hold: refused at once, without a walk', () => {
    const r = gen(['a cat', '-m', MODEL, '--size', '4096x4096', '--frames', '201']);
    expect(r.status, r.all).toBe(4);
    expect(expectOneLine(r.err)).toMatch(/\[preflight\] 4096x4096, 201 frames .*: the decoded video alone needs [0-9.]+ GiB of RAM .*at most ~\d+x\d+ at 201 frames could fit/);
  });

  it('--memory-snapshot to an unwritable path fails before any GPU work', () => {
    const dir = outDir();
    writeFileSync(join(dir, 'afile'), 'x');
    const r = gen(['a cat', '-m', MODEL, '-o', join(dir, 'o.mp4'), '--memory-snapshot', join(dir, 'afile', 'snap')]);
    expect(r.status).toBe(6);
    expect(expectOneLine(r.err)).toMatch(/report\.memory_snapshot \(--memory-snapshot\)/);
    expect(r.all).not.toMatch(/\[load\]|\[denoise\]/);
    expect(files(dir)).toEqual(['afile']);
  });

  it('a prompt-cache folder that is a file: one line naming the key', () => {
    const dir = outDir();
    writeFileSync(join(dir, 'pc'), 'x');
    const r = gen(['a cat', '-m', MODEL, '-o', join(dir, 'o.mp4'), `infer.prompt_cache_dir=${join(dir, 'pc')}`]);
    expect(r.status).not.toBe(0);
    expect(expectOneLine(r.err)).toMatch(/\[prompt-cache\].*infer\.prompt_cache_dir/);
    expect(files(dir)).toEqual(['pc']);
  });

  it('output under /proc (recursive mkdir loops there in Node 20): fails in seconds, not a hang', () => {
    const r = gen(['a cat', '-m', MODEL, '-o', '/proc/sub/x.mp4'], { timeout: 30_000 });
    expect(r.signal).toBeNull();
    expect(r.status).toBe(6);
    expect(expectOneLine(r.err)).toMatch(/\[output\] cannot create the output folder \/proc\/sub/);
  });

  it('--json into a reader that closes early (| head -c 100): the run finishes, one warning, no EPIPE stack', { timeout: 240_000 }, () => {
    const dir = outDir();
    const cmd = `'${process.execPath}' --import tsx '${CLI}' 'a cat' -m '${MODEL}' -o '${join(dir, 'o.mp4')}' --json infer.prompt_cache=false 2>'${join(dir, 'stderr.txt')}' | head -c 100 >/dev/null; echo "rc=\${PIPESTATUS[0]}"`;
    const r = spawnSync('bash', ['-c', cmd], { cwd: ROOT, encoding: 'utf8', timeout: 240_000 });
    expect(r.stdout).toMatch(/rc=0/);
    const err = spawnSync('cat', [join(dir, 'stderr.txt')], { encoding: 'utf8' }).stdout;
    expect(err).not.toMatch(/EPIPE.*\n\s+at |Unhandled 'error' event/);
    expect(files(dir)).toEqual(['o.gif', 'o.json', 'o.latents.safetensors', 'o.mp4', 'stderr.txt']);
  });

  it('a second Ctrl-C exits at once with 130 and leaves no temporary file', { timeout: 300_000 }, async () => {
    const dir = outDir();
    const p = spawn(process.execPath, ['--import', 'tsx', CLI, 'a dog', '-m', MODEL, '-o', join(dir, 'o.mp4'), '--steps', '50', 'infer.prompt_cache=false'], { cwd: ROOT });
    let err = '';
    let sent = 0;
    p.stderr.on('data', (d) => {
      err += String(d);
      if (sent === 0 && /denoise \[/.test(err)) {
        sent = 1;
        p.kill('SIGINT');
        setTimeout(() => {
          sent = 2;
          p.kill('SIGINT');
        }, 20);
      }
    });
    const code = await new Promise<number | null>((res) => p.on('close', (c) => res(c)));
    expect(sent).toBe(2);
    expect(code).toBe(130);
    expect(err).not.toMatch(/^\s+at /m);
    expect(files(dir)).toEqual([]);
  });

  it('Ctrl-C during the decode: exit 130, no video (the latents, complete before it, stay)', { timeout: 300_000 }, async () => {
    const dir = outDir();
    const p = spawn(process.execPath, ['--import', 'tsx', CLI, 'a dog', '-m', MODEL, '-o', join(dir, 'o.mp4'), '--frames', '33', 'infer.prompt_cache=false', 'infer.vae_tiling=true', 'infer.vae_tile_size=4'], { cwd: ROOT });
    let err = '';
    let sent = false;
    p.stderr.on('data', (d) => {
      err += String(d);
      if (!sent && /decode (tiles|frames|chunks)? ?\d+\/\d+|\[decode\]/.test(err)) {
        sent = true;
        p.kill('SIGINT');
      }
    });
    const code = await new Promise<number | null>((res) => p.on('close', (c) => res(c)));
    expect(sent).toBe(true);
    expect(code, err).toBe(130);
    expect(err).toMatch(/interrupted/);
    expect(files(dir)).toEqual(['o.latents.safetensors']);
  });
});
