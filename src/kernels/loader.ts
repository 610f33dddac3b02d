// Loads `kernels/<family>.wgsl` and specializes it.
//
// Specialization is by WGSL `override` constants (numbers: workgroup sizes, dtype codes, flags)
// and, because WGSL cannot make a *type* an override, by rewriting `alias` declarations: a kernel
// file declares e.g. `alias act_t = f32;` and is valid WGSL as it is; asking for
// `{ act_t: 'f16' }` rewrites that one line and prepends `enable f16;`. Nothing else is textual.
// The pipeline cache key is derived mechanically from (family, entry, constants, aliases, layout).

import { readFileSync, existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
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

const sourceCache = new Map<string, string>();

export function kernelSource(family: string): string {
  let src = sourceCache.get(family);
  if (src === undefined) {
    // an absolute path names a kernel file outside kernels/ (tests of the error paths use this)
    const path = family.startsWith('/') ? family : join(getKernelsDir(), `${family}.wgsl`);
    if (!existsSync(path)) throw new Error(`[kernels] no kernel file ${path}`);
    src = readFileSync(path, 'utf8');
    sourceCache.set(family, src);
  }
  return src;
}

export type Aliases = Record<string, 'f32' | 'f16' | 'u32' | 'i32'>;

/** Apply alias specializations; prepends `enable f16;` when any alias becomes f16. */
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
  if (needF16 && !/^\s*enable\s+f16\s*;/m.test(out)) out = `enable f16;\n${out}`;
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

function sortedEntries(o: Record<string, unknown> | undefined): Array<[string, unknown]> {
  return Object.entries(o ?? {}).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
}

export function kernelKey(spec: KernelSpec): string {
  return JSON.stringify([spec.family, spec.entry, sortedEntries(spec.constants), sortedEntries(spec.aliases), spec.layout]);
}

export function moduleKey(spec: KernelSpec): string {
  return JSON.stringify([spec.family, sortedEntries(spec.aliases)]);
}
