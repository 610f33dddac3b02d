// The kernel loader's include mechanism (`//!include path`): expansion, include-once, errors,
// the line map that compile errors use, and alias specialization of expanded sources.
import { describe, it, expect, afterAll } from 'vitest';
import { mkdtempSync, mkdirSync, writeFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { getEngine } from './helpers/gpu.ts';
import { kernelSource, kernelLine, specialize, getKernelsDir } from '../src/runtime/kernels.ts';
import { GpuError } from '../src/util/errors.ts';

const root = mkdtempSync(join(tmpdir(), 'sd-kernel-loader-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

let n = 0;
/** A fresh folder holding `files` (path -> lines); returns the absolute path of each. */
function tree(files: Record<string, string[]>): Record<string, string> {
  const dir = join(root, `t${n++}`);
  const out: Record<string, string> = {};
  for (const [rel, lines] of Object.entries(files)) {
    const path = join(dir, rel);
    mkdirSync(join(path, '..'), { recursive: true });
    writeFileSync(path, lines.join('\n') + '\n');
    out[rel] = path;
  }
  return out;
}

describe('kernel includes', () => {
  it('expands an include in place, nested includes relative to the including file', () => {
    const t = tree({
      'main.wgsl': ['// main', '//!include lib/b.wgsl', 'fn main_fn() {}'],
      'lib/b.wgsl': ['//!include a.wgsl', 'fn b_fn() {}'],
      'lib/a.wgsl': ['fn a_fn() {}'],
    });
    expect(kernelSource(t['main.wgsl']!)).toBe('// main\nfn a_fn() {}\nfn b_fn() {}\nfn main_fn() {}\n');
  });

  it('includes a file once per module however many files ask for it', () => {
    const t = tree({
      'main.wgsl': ['//!include lib/a.wgsl', '  //!include lib/b.wgsl', '//!include lib/a.wgsl', 'fn main_fn() {}'],
      'lib/b.wgsl': ['//!include a.wgsl', 'fn b_fn() {}'],
      'lib/a.wgsl': ['fn a_fn() {}'],
    });
    const src = kernelSource(t['main.wgsl']!);
    expect(src.match(/fn a_fn/g)).toHaveLength(1);
    expect(src).toBe('fn a_fn() {}\nfn b_fn() {}\nfn main_fn() {}\n');
  });

  it('a missing include is a one-line error naming the chain and the file', () => {
    const t = tree({
      'main.wgsl': ['// x', '//!include lib/b.wgsl'],
      'lib/b.wgsl': ['', '', '//!include nope.wgsl'],
    });
    const err = () => kernelSource(t['main.wgsl']!);
    expect(err).toThrow(/^\[kernels\] .*main\.wgsl:2 -> .*lib\/b\.wgsl:3 includes nope\.wgsl: no such file \(.*lib\/nope\.wgsl\)$/);
  });

  it('an include cycle is a one-line error naming the cycle', () => {
    const t = tree({
      'main.wgsl': ['//!include lib/a.wgsl'],
      'lib/a.wgsl': ['fn a_fn() {}', '//!include b.wgsl'],
      'lib/b.wgsl': ['//!include a.wgsl'],
    });
    expect(() => kernelSource(t['main.wgsl']!)).toThrow(/^\[kernels\] include cycle: .*main\.wgsl:1 -> .*lib\/a\.wgsl:2 -> .*lib\/b\.wgsl:1 -> .*lib\/a\.wgsl; /);
  });

  it('maps every expanded line back to its file and line', () => {
    const t = tree({
      'main.wgsl': ['// line 1', '//!include lib/a.wgsl', '// line 3'],
      'lib/a.wgsl': ['// a 1', '//!include b.wgsl', '// a 3'],
      'lib/b.wgsl': ['// b 1'],
    });
    const f = t['main.wgsl']!;
    const lines = kernelSource(f).trimEnd().split('\n');
    expect(lines).toEqual(['// line 1', '// a 1', '// b 1', '// a 3', '// line 3']);
    const at = lines.map((_, i) => kernelLine(f, i + 1));
    expect(at).toEqual([`${f}:1`, `${t['lib/a.wgsl']}:1`, `${t['lib/b.wgsl']}:1`, `${t['lib/a.wgsl']}:3`, `${f}:3`]);
  });

  it('aliases live in the kernel file; snippets using them specialize with it, line numbers kept', () => {
    const t = tree({
      'main.wgsl': ['// k', 'alias y_t = f32;', '//!include lib/store.wgsl'],
      'lib/store.wgsl': ['fn store(v: f32) -> y_t { return y_t(v); }'],
      'bad.wgsl': ['//!include lib/alias.wgsl'],
      'lib/alias.wgsl': ['// a snippet may not declare an alias', 'alias x_t = f32;'],
    });
    const src = kernelSource(t['main.wgsl']!);
    const f16 = specialize('main', src, { y_t: 'f16' });
    expect(f16).toBe('enable f16; // k\nalias y_t = f16;\nfn store(v: f32) -> y_t { return y_t(v); }\n');
    expect(f16.split('\n')).toHaveLength(src.split('\n').length);
    expect(() => kernelSource(t['bad.wgsl']!)).toThrow(/^\[kernels\] .*lib\/alias\.wgsl:2 declares an alias; aliases belong in the kernel file/);
  });

  it('every kernel in kernels/ expands, naming its own lines relative to the folder', () => {
    const families = readdirSync(getKernelsDir()).filter((f) => f.endsWith('.wgsl')).map((f) => f.slice(0, -5));
    expect(families).toContain('matmul');
    for (const family of families) {
      const src = kernelSource(family);
      expect(src).not.toMatch(/\/\/!include/);
      expect(kernelLine(family, 1)).toBe(`${family}.wgsl:1`);
    }
    const mm = kernelSource('matmul').split('\n');
    const gelu = mm.findIndex((l) => l.startsWith('fn gelu_tanh('));
    expect(kernelLine('matmul', gelu + 1)).toMatch(/^lib\/activations\.wgsl:\d+$/);
  });
});

describe('kernel includes on the GPU', () => {
  it('a compile error inside an included snippet names the snippet file and line', async () => {
    const t = tree({
      'main.wgsl': [
        '// a valid kernel calling a broken snippet',
        'struct Params { n: u32, }',
        '@group(0) @binding(0) var<uniform> P: Params;',
        '@group(0) @binding(1) var<storage, read_write> y: array<f32>;',
        '//!include lib/bad.wgsl',
        '@compute @workgroup_size(64)',
        'fn main(@builtin(global_invocation_id) gid: vec3<u32>) {',
        '  if (gid.x < P.n) { y[gid.x] = twice(gid.x); }',
        '}',
      ],
      'lib/bad.wgsl': ['// line 1', 'fn twice(i: u32) -> f32 {', '  let bad: f32 = i;   // u32 assigned to f32', '  return bad * 2.0;', '}'],
    });
    const e = await getEngine();
    const spec = { family: t['main.wgsl']!, entry: 'main', layout: ['write' as const] };
    const err = await e.compile(spec).then(
      () => null,
      (x: unknown) => x,
    );
    expect(err).toBeInstanceOf(GpuError);
    expect((err as Error).message).toContain(`${t['lib/bad.wgsl']}:3:`);
  });
});
