// Params declared once, by name: the WGSL struct is parsed into an offset table and each dispatch's
// `params` object is packed against it; a mismatch is a loud error, never a silent garbage kernel.
import { describe, it, expect } from 'vitest';
import { readdirSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { getEngine } from './helpers/gpu.ts';
import { parseParamLayout, packParams, structLayout, stripComments } from '../src/runtime/params.ts';
import { getKernelsDir, kernelSource } from '../src/runtime/kernels.ts';

const here = dirname(fileURLToPath(import.meta.url));
const okKernel = { family: join(here, 'fixtures', 'kernels', 'ok.wgsl'), entry: 'main', layout: ['write' as const] };

const SRC = `
/* a block comment /* nested */ struct Decoy { x: vec4<f32> } */
struct Params {
  rows: u32,      // rows in this dispatch, a comment with: colons, commas
  eps: f32,
  off: i32,
  @align(16) wide: u32,
  @size(8) sized: f32,
  _pad0: u32,
}
struct Other { a: u32, b: u32, }
@group(0) @binding(0) var<uniform> P: Params;
@binding(0) @group(0) var<uniform> Q: Other;
fn helper() -> u32 { return Q.a; }
@compute @workgroup_size(1) fn main_p() { let r = P.rows; }
@compute @workgroup_size(1) fn main_q() { let r = helper(); }
@compute @workgroup_size(1) fn main_none() { }
`;

describe('Params struct parsing', () => {
  it('lays out scalars with comments, attributes and padding; 16-byte rounding', () => {
    const l = parseParamLayout(SRC, 'main_p')!;
    expect(l.struct).toBe('Params');
    expect(l.fields.map((f) => [f.name, f.type, f.offset])).toEqual([
      ['rows', 'u32', 0],
      ['eps', 'f32', 4],
      ['off', 'i32', 8],
      ['wide', 'u32', 16],
      ['sized', 'f32', 20],
      ['_pad0', 'u32', 28],
    ]);
    expect(l.size).toBe(32);
    expect(structLayout('struct S { a: u32 }', 'S').size).toBe(16);
    expect(structLayout('struct S { a: u32, b: u32, c: u32, d: u32, e: u32, }', 'S').size).toBe(32);
    expect(stripComments('a /* b /* c */ d */ e // f\ng')).toBe('a   e \ng');
  });

  it('a file with several binding-0 uniforms: the one the entry point (or a function it calls) uses', () => {
    expect(parseParamLayout(SRC, 'main_q')!.struct).toBe('Other');
    expect(parseParamLayout(SRC, 'main_none')).toBeNull();
    expect(parseParamLayout('fn main() {}', 'main')).toBeNull();
  });

  it('refuses what it cannot pack', () => {
    expect(() => structLayout('struct S { v: vec4<u32>, }', 'S')).toThrow(/params: field 'v' of struct S is vec4<u32>/);
    expect(() => structLayout('struct S { a: u32 }', 'T')).toThrow(/struct T not found/);
  });

  it('every kernel entry point resolves to one Params struct of packable fields', () => {
    const dir = getKernelsDir();
    let entries = 0;
    for (const f of readdirSync(dir).filter((f) => f.endsWith('.wgsl'))) {
      const family = f.replace(/\.wgsl$/, '');
      const src = kernelSource(family);
      for (const m of stripComments(src).matchAll(/@compute[^{]*?\bfn\s+(\w+)/g)) {
        const l = parseParamLayout(src, m[1]!);
        expect(l, `${family}.${m[1]}`).not.toBeNull();
        entries++;
      }
    }
    expect(entries).toBeGreaterThan(20);
  });
});

describe('Params packing by name', () => {
  const l = structLayout('struct P { n: u32, s: f32, o: i32, _p: u32, }', 'P');
  const view = new DataView(new ArrayBuffer(64));

  it('writes each field at its offset; `_` fields default to 0', () => {
    view.setUint32(12, 99, true);
    packParams(l, { n: 7, s: 0.5, o: -3 }, view, 0);
    expect([view.getUint32(0, true), view.getFloat32(4, true), view.getInt32(8, true), view.getUint32(12, true)]).toEqual([7, 0.5, -3, 0]);
  });

  it('a missing, unknown or out-of-range field throws, listing the struct', () => {
    expect(() => packParams(l, { n: 1, s: 0 }, view, 0)).toThrow(/params: missing field 'o'; struct P is \{ n: u32, s: f32, o: i32, _p: u32 \}/);
    expect(() => packParams(l, { n: 1, s: 0, o: 0, rows: 2 }, view, 0)).toThrow(/params: unknown field 'rows'/);
    expect(() => packParams(l, { n: -1, s: 0, o: 0 }, view, 0)).toThrow(/field 'n' is u32, got -1/);
    expect(() => packParams(l, { n: 1.5, s: 0, o: 0 }, view, 0)).toThrow(/field 'n' is u32/);
    expect(() => packParams(l, { n: 1, s: 0, o: 2 ** 31 }, view, 0)).toThrow(/field 'o' is i32/);
  });

  it('the engine names the kernel: a wrong field name and a missing field throw at dispatch', async () => {
    const e = await getEngine();
    const y = e.empty([100], 'f32');
    expect(() => e.dispatch({ kernel: okKernel, params: { n: 100, scal: 0.5 }, bindings: [y], workgroups: [2] })).toThrow(
      /\[.*ok\.wgsl\.main\] params: missing field 'scale' \(given but unknown: 'scal'\); struct Params is \{ n: u32, scale: f32 \}/,
    );
    expect(() => e.dispatch({ kernel: okKernel, params: { n: 100, scale: 0.5, extra: 1 }, bindings: [y], workgroups: [2] })).toThrow(/params: unknown field 'extra'/);
    expect(() => e.dispatch({ kernel: okKernel, params: { n: 100 }, bindings: [y], workgroups: [2] })).toThrow(/params: missing field 'scale'/);
    e.dispatch({ kernel: okKernel, params: { n: 100, scale: 2 }, bindings: [y], workgroups: [2] });
    const v = await y.toArray();
    expect(v[99]).toBe(198);
    y.dispose();
  });
});
