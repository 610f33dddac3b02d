// Loads `kernels/<family>.wgsl`, expands its includes and specializes it.
//
// Includes: a line `//!include lib/activations.wgsl` is replaced by that file (a path relative
// to the including file's folder), once per module however many files ask for it; included
// files may include others. The directive is a comment, so WGSL tools read the files as they are.
// A snippet may also be a fragment (the shared fields of a `struct`, expanded inside its braces).
// The expansion keeps a line map, so compile errors name the original file and line.
//
// Specialization is by WGSL `override` constants (numbers: workgroup sizes, dtype codes, flags)
// and, because WGSL cannot make a *type* an override, by rewriting `alias` declarations: a kernel
// file declares e.g. `alias act_t = f32;` and is valid WGSL as it is (once expanded); asking for
// `{ act_t: 'f16' }` rewrites that one line and adds `enable f16;`. Nothing else is textual. Alias
// lines live in the kernel file, never in a snippet: snippets use the kernel's storage types by name
// (module-scope declarations may come in any order), so one snippet serves every specialization.
// The pipeline cache key is derived mechanically from (family, entry, constants, aliases, layout).

import { readFileSync, existsSync } from 'node:fs';
import { dirname, join, relative, resolve, isAbsolute } from 'node:path';
import { fileURLToPath } from 'node:url';

let kernelsDir: string | null = null;

/** Folder holding the .wgsl files: $SD_KERNELS_DIR, or the `kernels/` folder of the package. */
export function getKernelsDir(): string {
  if (kernelsDir) return kernelsDir;
  const env = process.env.SD_KERNELS_DIR;
  if (env) return (kernelsDir = resolve(env));
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    if (existsSync(join(dir, 'kernels')) && existsSync(join(dir, 'kernels', 'elementwise.wgsl'))) return (kernelsDir = join(dir, 'kernels'));
    dir = dirname(dir);
  }
  throw new Error(`[kernels] cannot find the kernels/ folder above ${fileURLToPath(import.meta.url)}; set SD_KERNELS_DIR`);
}

/** Where a line of an expanded kernel comes from. */
interface SourceLine {
  /** the file, relative to the kernels folder when inside it */
  file: string;
  /** 1-based line in that file */
  line: number;
}

interface Expanded {
  code: string;
  /** lines[i] is the origin of line i + 1 of `code` */
  lines: SourceLine[];
}

const INCLUDE = /^\s*\/\/!include\s+(\S+)\s*$/;

const sourceCache = new Map<string, Expanded>();

function displayName(path: string): string {
  const rel = relative(getKernelsDir(), path);
  return rel.startsWith('..') || isAbsolute(rel) ? path : rel;
}

function expand(path: string): Expanded {
  const lines: string[] = [];
  const origin: SourceLine[] = [];
  const done = new Set<string>();
  // `chain`: the includes that led to `file`, outermost first (the includer and its directive line)
  const visit = (file: string, chain: Array<{ file: string; at: string }>): void => {
    done.add(file);
    const name = displayName(file);
    const text = readFileSync(file, 'utf8').split('\n');
    if (text[text.length - 1] === '') text.pop();
    text.forEach((src, i) => {
      const m = INCLUDE.exec(src);
      if (!m) {
        if (chain.length > 0 && /^\s*alias\s/.test(src)) {
          throw new Error(`[kernels] ${name}:${i + 1} declares an alias; aliases belong in the kernel file (snippets use its types by name)`);
        }
        lines.push(src);
        origin.push({ file: name, line: i + 1 });
        return;
      }
      const target = resolve(dirname(file), m[1]);
      const here = [...chain, { file, at: `${name}:${i + 1}` }];
      const trail = here.map((c) => c.at).join(' -> ');
      if (here.some((c) => c.file === target)) {
        throw new Error(`[kernels] include cycle: ${trail} -> ${displayName(target)}; remove one of these includes`);
      }
      if (!existsSync(target)) throw new Error(`[kernels] ${trail} includes ${m[1]}: no such file (${target})`);
      // include-once: a snippet already in this module is not repeated (WGSL forbids redeclaring)
      if (!done.has(target)) visit(target, here);
    });
  };
  visit(path, []);
  return { code: lines.join('\n') + '\n', lines: origin };
}

function familyPath(family: string): string {
  // an absolute path names a kernel file outside kernels/ (tests of the error paths use this)
  return family.startsWith('/') ? family : join(getKernelsDir(), `${family}.wgsl`);
}

function expanded(family: string): Expanded {
  let e = sourceCache.get(family);
  if (e === undefined) {
    const path = familyPath(family);
    if (!existsSync(path)) throw new Error(`[kernels] no kernel file ${path}`);
    e = expand(path);
    sourceCache.set(family, e);
  }
  return e;
}

/** The kernel's WGSL with every include expanded (what is compiled, before alias rewriting). */
export function kernelSource(family: string): string {
  return expanded(family).code;
}

/**
 * The file and line that line `line` (1-based) of the kernel's module comes from, as
 * `lib/activations.wgsl:12`; specialization keeps line numbers, so this holds for compiler
 * messages too.
 */
export function kernelLine(family: string, line: number): string {
  const at = expanded(family).lines[line - 1];
  return at ? `${at.file}:${at.line}` : `${displayName(familyPath(family))}:${line}`;
}

export type Aliases = Record<string, 'f32' | 'f16' | 'u32' | 'i32'>;

/**
 * Apply alias specializations; adds `enable f16;` when any alias becomes f16. The directive goes
 * at the start of the first line, not on a line of its own, so line numbers stay those of the
 * line map.
 */
export function specialize(family: string, src: string, aliases: Aliases | undefined): string {
  if (!aliases || Object.keys(aliases).length === 0) return src;
  let out = src;
  let needF16 = false;
  for (const [name, ty] of Object.entries(aliases)) {
    const re = new RegExp(`^alias\\s+${name}\\s*=\\s*[A-Za-z0-9_<>]+\\s*;`, 'm');
    if (!re.test(out)) throw new Error(`[kernels] ${family}.wgsl declares no 'alias ${name} = ...;' to specialize`);
    out = out.replace(re, `alias ${name} = ${ty};`);
    if (ty === 'f16') needF16 = true;
  }
  if (needF16 && !/^\s*enable\s+f16\s*;/m.test(out)) out = `enable f16; ${out}`;
  return out;
}

export type BindingKind = 'read' | 'write' | 'uniform';

export interface KernelSpec {
  family: string;
  entry: string;
  /** override constants */
  constants?: Record<string, number>;
  /** alias rewrites */
  aliases?: Aliases;
  /** storage bindings 1..n in order; binding 0 is always the `Params` uniform */
  layout: BindingKind[];
}

/**
 * `k=v;` for each entry in key order. Names are WGSL identifiers and values numbers or WGSL type
 * names, so `=` and `;` cannot occur inside them and the string is unambiguous. (This runs once per
 * dispatch — 10^5..10^6 times in a planner's walk at real sizes —, so no JSON, no arrays.)
 */
function entriesKey(o: Record<string, unknown> | undefined): string {
  if (!o) return '';
  const keys = Object.keys(o);
  if (keys.length > 1) keys.sort();
  let s = '';
  for (const k of keys) s += `${k}=${String(o[k])};`;
  return s;
}

/** The pipeline cache's key: family, entry point, override constants, aliases, binding layout. */
export function kernelKey(spec: KernelSpec): string {
  return `${spec.family}|${spec.entry}|${entriesKey(spec.constants)}|${entriesKey(spec.aliases)}|${spec.layout.join(',')}`;
}

/** The shader module cache's key: family and aliases (the entry point and constants are per pipeline). */
export function moduleKey(spec: KernelSpec): string {
  return `${spec.family}|${entriesKey(spec.aliases)}`;
}
