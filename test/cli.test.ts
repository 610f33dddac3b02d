// The real CLI as a subprocess: outputs, sidecar, decode-latents, and every error a user meets,
// each checked for its message, exit status, and that nothing partial was written.
import { describe, it, expect } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, writeFileSync, rmSync, truncateSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tinyModelWithTokenizer } from './helpers/models.ts';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const CLI = join(ROOT, 'src', 'cli', 'generate.ts');
const MODEL = tinyModelWithTokenizer({ num_inference_steps: 1 });

function gen(args: string[], env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, ...args], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    encoding: 'utf8',
    timeout: 240_000,
  });
  return { status: r.status, out: r.stdout, err: r.stderr, all: r.stdout + r.stderr };
}

function outDir(): string {
  return mkdtempSync(join(tmpdir(), 'sd-cli-'));
}

/** no file but the ones allowed (no *.tmp, no partial outputs) */
function files(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir).sort() : [];
}

describe('npm run generate (subprocess)', () => {
  it('writes MP4, GIF preview, latents and a sidecar; JSON-lines progress; decode-latents reproduces the video', { timeout: 300_000 }, () => {
    const dir = outDir();
    const r = gen(['a red circle moving right', '-m', MODEL, '-o', join(dir, 'clip.mp4'), '--json', '--seed', '11', 'infer.prompt_cache_dir=' + join(dir, 'cache')]);
    expect(r.status, r.all).toBe(0);
    const events = r.out.trim().split('\n').map((l) => JSON.parse(l));
    const kinds = events.map((e) => e.event);
    for (const k of ['start', 'loaded', 'phase', 'step', 'done']) expect(kinds).toContain(k);
    expect(events.filter((e) => e.event === 'phase').map((e) => e.phase)).toEqual(expect.arrayContaining(['load', 'encode', 'denoise', 'decode', 'write']));
    expect(files(dir).filter((f) => f !== 'cache')).toEqual(['clip.gif', 'clip.json', 'clip.latents.safetensors', 'clip.mp4']);
    const mp4 = readFileSync(join(dir, 'clip.mp4'));
    expect(mp4.subarray(4, 8).toString()).toBe('ftyp');
    expect(readFileSync(join(dir, 'clip.gif')).subarray(0, 6).toString()).toBe('GIF89a');
    const side = JSON.parse(readFileSync(join(dir, 'clip.json'), 'utf8'));
    expect(side.seed).toBe(11);
    expect(side.prompt).toBe('a red circle moving right');
    expect(side.video).toMatchObject({ frames: 9, height: 64, width: 64 });
    expect(side.config['infer.diffusion.low_mem_level']).toBe(0);
    expect(side.memory.peak_allocated_bytes).toBeGreaterThan(0);
    expect(Object.keys(side.timings_ms)).toEqual(expect.arrayContaining(['load', 'encode', 'denoise', 'decode', 'write']));
    expect(side.model.path).toBe(MODEL);
    // decode the saved latents again: same frames (MP4 is lossy: compare PNG frames instead)
    const d2 = outDir();
    const r2 = gen(['--decode-latents', join(dir, 'clip.latents.safetensors'), '-m', MODEL, '-o', join(d2, 'again.mp4'), '--png-frames', '--quiet', 'output.mp4=false']);
    expect(r2.status, r2.all).toBe(0);
    expect(readdirSync(join(d2, 'again_frames')).length).toBe(9);
  });

  it('--prompts FILE: a batch with the model loaded once, one video and sidecar per prompt (colliding names numbered), a peak per request; bad prompts files refused in one line', { timeout: 300_000 }, () => {
    const dir = outDir();
    const list = join(dir, 'prompts.txt');
    writeFileSync(list, '# two videos\na red circle moving right\n\na blue square moving left\n');
    const r = gen(['--prompts', list, '-m', MODEL, '-o', join(dir, 'clip.mp4'), '--json', '--seed', '3', 'infer.prompt_cache_dir=' + join(dir, 'cache')]);
    expect(r.status, r.all).toBe(0);
    const events = r.out.trim().split('\n').map((l) => JSON.parse(l));
    expect(events.filter((e) => e.event === 'loaded')).toHaveLength(1);
    const done = events.filter((e) => e.event === 'done');
    expect(done.map((e) => [e.index, e.of])).toEqual([[1, 2], [2, 2]]);
    for (const d of done) expect(d.peak_allocated_bytes).toBeGreaterThan(0);
    // (each request's peak from zero: the same size gives the same peak, up to the text encoder's small
    // per-length relative-bias tables kept for the last few prompt lengths)
    expect(Math.abs(done[1].peak_allocated_bytes - done[0].peak_allocated_bytes)).toBeLessThanOrEqual(4096);
    expect(events.at(-1)).toMatchObject({ event: 'batch_done', videos: 2 });
    expect(files(dir).filter((f) => f.startsWith('clip'))).toEqual(['clip-001.gif', 'clip-001.json', 'clip-001.latents.safetensors', 'clip-001.mp4', 'clip-002.gif', 'clip-002.json', 'clip-002.latents.safetensors', 'clip-002.mp4']);
    const sides = [1, 2].map((k) => JSON.parse(readFileSync(join(dir, `clip-00${k}.json`), 'utf8')));
    expect(sides.map((x) => x.prompt)).toEqual(['a red circle moving right', 'a blue square moving left']);
    expect(sides.map((x) => x.seed)).toEqual([3, 3]);
    // bad prompts files: one line, exit 2, nothing written
    writeFileSync(join(dir, 'empty.txt'), '# nothing\n\n');
    for (const [args, msg] of [
      [['--prompts', join(dir, 'none.txt')], /--prompts .*none\.txt: no such file; give a text file with one prompt per line/],
      [['--prompts', join(dir, 'empty.txt')], /--prompts .*empty\.txt: no prompts in it/],
      [['--prompts', list, 'a prompt too'], /--prompts FILE takes the prompts from the file/],
    ] as Array<[string[], RegExp]>) {
      const b = gen([...args, '-m', MODEL, '-o', join(dir, 'bad', 'x.mp4')]);
      expect(b.status, b.all).toBe(2);
      expect(b.err.trim().split('\n')).toHaveLength(1);
      expect(b.err).toMatch(msg);
      expect(existsSync(join(dir, 'bad'))).toBe(false);
    }
  });

  it('level 3 with --memory-stats, --memory-snapshot and --profile: per-step memory, per-block uploads and frees, no text-encoder bytes on the GPU, kernel table, upload/compute overlap', { timeout: 300_000 }, () => {
    const dir = outDir();
    const r = gen(['a blue square moving left', '-m', MODEL, '-o', join(dir, 'v.mp4'), '--steps', '2', '--low-mem', '3', '--memory-stats', '--memory-snapshot', join(dir, 'snap'), '--profile']);
    expect(r.status, r.all).toBe(0);
    expect(r.err).toMatch(/memory denoise step 1: allocated [\d.]+ \w+, reserved [\d.]+ \w+, peak allocated/);
    expect(r.err).toMatch(/memory denoise step 2:/);
    expect(r.err).toMatch(/memory decode: allocated/);
    expect(r.all).toMatch(/kernels \(GPU time from timestamp queries\):\nkernel\s+calls\s+total ms\s+mean ms\s+share/);
    expect(r.all).toMatch(/phases \(wall ms\):[\s\S]*denoise\s+\d+/);
    const m = /DiT block streaming: (\d+) uploads[\s\S]*?(\d+) prefetched \(copied while the GPU still had the previous blocks queued\): (\d+) ms of the copying ran ahead of need, (\d+) ms while the denoise loop waited for that block;\n\s+acquire\(\) waited (\d+) ms/.exec(r.all);
    expect(m, r.all).not.toBeNull();
    const blocks = 2; // the tiny model's DiT
    // every block uploaded (with 2 blocks and 2 slots they then stay: no re-upload on step 2)
    expect(Number(m![1])).toBeGreaterThanOrEqual(blocks);
    expect(Number(m![2])).toBeGreaterThan(0);
    const snap = JSON.parse(readFileSync(join(dir, 'snap.json'), 'utf8')) as { events: Array<{ action: string; owner: string; phase: string; bytes: number }> };
    const ev = snap.events;
    expect(ev.filter((e) => e.owner.startsWith('text_encoder'))).toEqual([]);
    for (let b = 0; b < blocks; b++) {
      const mine = ev.filter((e) => e.owner === `dit.blocks.${b}` && e.phase === 'denoise');
      expect(mine.filter((e) => e.action === 'alloc').length, `dit.blocks.${b}`).toBeGreaterThanOrEqual(1);
      expect(ev.filter((e) => e.owner === `dit.blocks.${b}` && e.action === 'free').length).toBeGreaterThanOrEqual(1);
    }
    const html = readFileSync(join(dir, 'snap.html'), 'utf8');
    expect(html).toMatch(/<svg/);
    expect(html).toMatch(/dit\.blocks/);
  });

  it('--help lists every key with type and default; --print-config prints the effective config', () => {
    const h = gen(['--help']);
    expect(h.status).toBe(0);
    expect(h.out).toMatch(/infer\.diffusion\.low_mem_level\s+int \[0\.\.3\]\s+\(default: 0\)/);
    expect(h.out).toMatch(/infer\.offload_text_encoder/);
    const p = gen(['x', '-m', MODEL, '--print-config', 'infer.diffusion.low_mem_level=2']);
    expect(p.status).toBe(0);
    expect(p.out).toMatch(/low_mem_level: 2/);
    expect(p.out).toMatch(/text_len: 16/); // the model folder's recommended defaults apply
  });

  it('--print-device prints what the device got with the Dawn toggles (SD_DAWN_FEATURES=none: without them)', () => {
    const r = gen(['--print-device']);
    expect(r.status).toBe(0);
    expect(r.out).toMatch(/^features: (no )?f16, (subgroups \d+(-\d+)?|no subgroups), (no )?timestamps, (no subgroup matrix|subgroup matrix \(.*\))$/m);
    expect(r.out).toMatch(/^Dawn toggles: enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia$/m);
    const n = gen(['--print-device'], { SD_DAWN_FEATURES: 'none' });
    expect(n.status).toBe(0);
    expect(n.out).toMatch(/^Dawn toggles: none$/m);
    // the same features either way on an adapter the toggles do not concern (lavapipe here)
    if (/llvmpipe/.test(r.out)) expect(n.out.match(/^features: .*$/m)![0]).toBe(r.out.match(/^features: .*$/m)![0]);
  });

  it('--list-adapters prints each adapter with its index (for infer.diffusion.cp_devices)', () => {
    const r = gen(['--list-adapters']);
    expect(r.status).toBe(0);
    expect(r.out).toMatch(/^0 {2}\w+ {2}\S.*$/m);
  });

  it('unknown or mistyped keys, bad sizes and frame counts: exit 2 with the fix', () => {
    let r = gen(['x', '-m', MODEL, 'infer.diffusion.low_mem_lvl=2']);
    expect(r.status).toBe(2);
    expect(r.err).toMatch(/unknown config key 'infer\.diffusion\.low_mem_lvl'.*did you mean 'infer\.diffusion\.low_mem_level'/);
    r = gen(['x', '-m', MODEL, 'infer.diffusion.low_mem_level=7']);
    expect(r.status).toBe(2);
    expect(r.err).toMatch(/low_mem_level must be in 0\.\.3, got 7/);
    r = gen(['x', '-m', MODEL, '--size', '100x64']);
    expect(r.status).toBe(2);
    expect(r.err).toMatch(/infer\.width must be a multiple of 16, got 100 \(nearest: 96 or 112\)/);
    r = gen(['x', '-m', MODEL, '--frames', '8']);
    expect(r.status).toBe(2);
    expect(r.err).toMatch(/4k\+1.*got 8/);
    r = gen(['-m', MODEL]);
    expect(r.status).toBe(2);
    expect(r.err).toMatch(/no prompt/);
  });

  it('model folder missing or incomplete, corrupt weights, config/weights mismatch: exit 5, nothing written', () => {
    const dir = outDir();
    const out = join(dir, 'o.mp4');
    let r = gen(['x', '-m', join(dir, 'nope'), '-o', out]);
    expect(r.status).toBe(5);
    expect(r.err).toMatch(/huggingface-cli download Wan-AI\/Wan2\.1-T2V-1\.3B-Diffusers/);
    const broken = tinyModelWithTokenizer();
    rmSync(join(broken, 'vae'), { recursive: true });
    r = gen(['x', '-m', broken, '-o', out]);
    expect(r.status).toBe(5);
    expect(r.err).toMatch(/vae/);
    const trunc = tinyModelWithTokenizer();
    const f = join(trunc, 'transformer', 'diffusion_pytorch_model.safetensors');
    truncateSync(f, Math.floor(statSync(f).size / 3));
    r = gen(['x', '-m', trunc, '-o', out]);
    expect(r.status).toBe(5);
    expect(r.err).toMatch(/diffusion_pytorch_model\.safetensors/);
    const mism = tinyModelWithTokenizer();
    const cfgPath = join(mism, 'transformer', 'config.json');
    const cfg = JSON.parse(readFileSync(cfgPath, 'utf8'));
    cfg.ffn_dim = 300;
    writeFileSync(cfgPath, JSON.stringify(cfg));
    r = gen(['x', '-m', mism, '-o', out]);
    expect(r.status).toBe(5);
    expect(r.err).toMatch(/blocks\.0\.ffn\.net\.0\.proj\.weight.*\[256, 128\], expected \[300, 128\]/);
    expect(files(dir)).toEqual([]);
  });

  it('unwritable output path: exit 6 before any GPU work', () => {
    const dir = outDir();
    writeFileSync(join(dir, 'afile'), 'x');
    const r = gen(['x', '-m', MODEL, '-o', join(dir, 'afile', 'video.mp4')]);
    expect(r.status).toBe(6);
    expect(r.err).toMatch(/cannot create the output folder .*afile/);
    expect(r.all).not.toMatch(/\[denoise\]/);
  });

  it('no WebGPU adapter: exit 3 with how to get one', () => {
    const dir = outDir();
    const r = gen(['x', '-m', MODEL, '-o', join(dir, 'o.mp4')], { VK_DRIVER_FILES: '/nonexistent.json', VK_ICD_FILENAMES: '/nonexistent.json' });
    expect(r.status).toBe(3);
    expect(r.err).toMatch(/mesa-vulkan-drivers/);
    expect(files(dir)).toEqual([]);
  });

  it('out of GPU memory at decode: exit 4 naming the phase, the bytes and a level that fits; latents kept, no video', { timeout: 300_000 }, () => {
    const dir = outDir();
    const r = gen(['a cat', '-m', MODEL, '-o', join(dir, 'o.mp4'), 'infer.memory_limit=24MiB', 'infer.prompt_cache=false']);
    expect(r.status, r.all).toBe(4);
    expect(r.err).toMatch(/out of GPU memory in phase 'decode': [0-9.]+ [KM]iB requested/);
    expect(r.err).toMatch(/low_mem_level=1/);
    expect(r.err).toMatch(/--decode-latents/);
    expect(files(dir)).toEqual(['o.latents.safetensors']);
  });

  it('Ctrl-C during denoising: exit 130, nothing written', { timeout: 300_000 }, async () => {
    const dir = outDir();
    const p = spawn(process.execPath, ['--import', 'tsx', CLI, 'a dog', '-m', MODEL, '-o', join(dir, 'o.mp4'), '--steps', '50', 'infer.prompt_cache=false'], { cwd: ROOT });
    let err = '';
    let sent = false;
    p.stderr.on('data', (d) => {
      err += String(d);
      if (!sent && /denoise \[/.test(err)) {
        sent = true;
        p.kill('SIGINT');
      }
    });
    const code = await new Promise<number | null>((res) => p.on('close', (c) => res(c)));
    expect(sent).toBe(true);
    expect(code).toBe(130);
    expect(err).toMatch(/interrupted/);
    expect(files(dir)).toEqual([]);
  });
});
