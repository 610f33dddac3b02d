// A kernel's `Params` uniform, declared once: the WGSL struct bound at `@group(0) @binding(0)` by
// the entry point is parsed from the kernel's specialized source (once per pipeline) into an offset
// table, and each dispatch's `params: { rows, n }` is packed by field name against it. A missing or
// unknown field, or a value the field's type cannot hold, is a one-line error listing the struct's
// fields; fields named `_...` (padding) default to 0.

export type ParamValues = Readonly<Record<string, number>>;

export interface ParamField {
  name: string;
  type: 'u32' | 'i32' | 'f32';
  /** byte offset in the uniform */
  offset: number;
}

export interface ParamLayout {
  /** the WGSL struct's name */
  struct: string;
  fields: ParamField[];
  /** bytes of the uniform binding: the struct's size rounded up to 16 (at least 16) */
  size: number;
  /** `name: type, ...` for error messages */
  signature: string;
}

/** WGSL source without comments (line comments and nested block comments). */
export function stripComments(src: string): string {
  let out = '';
  let i = 0;
  let depth = 0;
  while (i < src.length) {
    const two = src.slice(i, i + 2);
    if (depth === 0 && two === '//') {
      const nl = src.indexOf('\n', i);
      i = nl < 0 ? src.length : nl;
    } else if (two === '/*') {
      depth++;
      i += 2;
    } else if (depth > 0 && two === '*/') {
      depth--;
      i += 2;
      if (depth === 0) out += ' ';
    } else {
      if (depth === 0) out += src[i];
      i++;
    }
  }
  return out;
}

const UNIFORM_AT_0 = /((?:@\s*\w+\s*\(\s*\d+\s*\)\s*)+)var\s*<\s*uniform\s*>\s*(\w+)\s*:\s*(\w+)\s*;/g;

/** Names of the functions each function body mentions, and the identifiers it uses. */
function functionIdents(src: string): Map<string, Set<string>> {
  const fns = new Map<string, Set<string>>();
  const re = /\bfn\s+(\w+)\s*\(/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(src))) {
    const open = src.indexOf('{', re.lastIndex);
    if (open < 0) break;
    let depth = 0;
    let end = open;
    for (; end < src.length; end++) {
      if (src[end] === '{') depth++;
      else if (src[end] === '}' && --depth === 0) break;
    }
    fns.set(m[1]!, new Set(src.slice(open, end).match(/[A-Za-z_]\w*/g) ?? []));
    re.lastIndex = end;
  }
  return fns;
}

/**
 * The `Params` layout the entry point `entry` uses: the struct of the `var<uniform>` at
 * `@group(0) @binding(0)`; a file declaring several (one per entry point) is resolved by which one
 * the entry point (or a function it calls) mentions. null: the entry point uses none.
 * Throws `params: ...` (without the kernel's name; the engine prefixes it).
 */
export function parseParamLayout(source: string, entry: string): ParamLayout | null {
  const src = stripComments(source);
  const candidates: Array<{ varName: string; struct: string }> = [];
  for (const m of src.matchAll(UNIFORM_AT_0)) {
    const attrs = m[1]!.replace(/\s+/g, '');
    if (/@group\(0\)/.test(attrs) && /@binding\(0\)/.test(attrs)) candidates.push({ varName: m[2]!, struct: m[3]! });
  }
  if (candidates.length === 0) return null;
  let chosen = candidates[0]!;
  if (candidates.length > 1) {
    const fns = functionIdents(src);
    if (!fns.has(entry)) throw new Error(`params: no function '${entry}' in the kernel source`);
    const seen = new Set<string>([entry]);
    const todo = [entry];
    const used = new Set<string>();
    while (todo.length > 0) {
      for (const id of fns.get(todo.pop()!)!) {
        if (fns.has(id) && !seen.has(id)) {
          seen.add(id);
          todo.push(id);
        } else if (candidates.some((c) => c.varName === id)) used.add(id);
      }
    }
    const hits = candidates.filter((c) => used.has(c.varName));
    if (hits.length === 0) return null;
    if (hits.length > 1) throw new Error(`params: entry point '${entry}' uses several binding-0 uniforms (${hits.map((h) => h.varName).join(', ')})`);
    chosen = hits[0]!;
  }
  return structLayout(src, chosen.struct);
}

/** The uniform-buffer layout of a struct of 4-byte scalars (`@align(n)` / `@size(n)` honoured). */
export function structLayout(src: string, struct: string): ParamLayout {
  const m = new RegExp(`\\bstruct\\s+${struct}\\s*\\{([^}]*)\\}`).exec(stripComments(src));
  if (!m) throw new Error(`params: struct ${struct} not found in the kernel source`);
  const fields: ParamField[] = [];
  let end = 0;
  let maxAlign = 4;
  for (const raw of m[1]!.split(',')) {
    const decl = raw.trim();
    if (!decl) continue;
    const f = /^((?:@\s*\w+\s*\(\s*\d+\s*\)\s*)*)(\w+)\s*:\s*([\w<>, ]+?)\s*$/.exec(decl);
    if (!f) throw new Error(`params: cannot parse field '${decl}' of struct ${struct}`);
    const [, attrs, name, type] = f as unknown as [string, string, string, string];
    if (type !== 'u32' && type !== 'i32' && type !== 'f32') {
      throw new Error(`params: field '${name}' of struct ${struct} is ${type}; the engine packs u32/i32/f32 scalars only`);
    }
    let align = 4;
    let size = 4;
    for (const a of attrs.matchAll(/@\s*(\w+)\s*\(\s*(\d+)\s*\)/g)) {
      if (a[1] === 'align') align = Number(a[2]);
      else if (a[1] === 'size') size = Number(a[2]);
      else throw new Error(`params: unsupported attribute @${a[1]} on field '${name}' of struct ${struct}`);
    }
    const offset = Math.ceil(end / align) * align;
    fields.push({ name, type, offset });
    end = offset + size;
    maxAlign = Math.max(maxAlign, align);
  }
  const structSize = Math.ceil(end / maxAlign) * maxAlign;
  return {
    struct,
    fields,
    size: Math.max(16, Math.ceil(structSize / 16) * 16),
    signature: fields.map((f) => `${f.name}: ${f.type}`).join(', '),
  };
}

/**
 * Write `values` into `view` at byte `at` by field name (the caller zeroes nothing: every field of
 * the layout is written). Throws `params: ...` on a missing, unknown or out-of-range field.
 */
export function packParams(layout: ParamLayout, values: ParamValues, view: DataView, at: number): void {
  let matched = 0;
  for (const f of layout.fields) {
    let v = values[f.name];
    if (v === undefined) {
      if (f.name.charCodeAt(0) !== 95 /* _ */) {
        const unknown = unknownFields(layout, values);
        const also = unknown.length > 0 ? ` (given but unknown: ${unknown.map((k) => `'${k}'`).join(', ')})` : '';
        throw new Error(`params: missing field '${f.name}'${also}; struct ${layout.struct} is { ${layout.signature} }`);
      }
      v = 0;
    } else matched++;
    if (f.type === 'u32') {
      if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new RangeError(`params: field '${f.name}' is u32, got ${v}`);
      view.setUint32(at + f.offset, v, true);
    } else if (f.type === 'i32') {
      if (!Number.isInteger(v) || v < -0x80000000 || v > 0x7fffffff) throw new RangeError(`params: field '${f.name}' is i32, got ${v}`);
      view.setInt32(at + f.offset, v, true);
    } else {
      if (typeof v !== 'number') throw new RangeError(`params: field '${f.name}' is f32, got ${String(v)}`);
      view.setFloat32(at + f.offset, v, true);
    }
  }
  let given = 0;
  for (const k in values) if (values[k] !== undefined) given++;
  if (given !== matched) {
    const unknown = unknownFields(layout, values);
    throw new Error(`params: unknown field${unknown.length > 1 ? 's' : ''} ${unknown.map((k) => `'${k}'`).join(', ')}; struct ${layout.struct} is { ${layout.signature} }`);
  }
}

function unknownFields(layout: ParamLayout, values: ParamValues): string[] {
  return Object.keys(values).filter((k) => values[k] !== undefined && !layout.fields.some((f) => f.name === k));
}
