// Config = flat map of dotted keys (see schema.ts). Layers, later wins: schema defaults < the YAML
// config file (default: configs/wan.yaml) < dotted `key=value` overrides < API options.
// Unknown keys are rejected with the closest valid key; values are type- and range-checked.

import { readFileSync, existsSync } from 'node:fs';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';
import { SCHEMA, SCHEMA_BY_KEY, typeName, type KeySpec } from './schema.ts';
import { ConfigError } from '../util/errors.ts';

export type FlatConfig = Record<string, unknown>;

export function defaultConfig(): FlatConfig {
  const c: FlatConfig = {};
  for (const s of SCHEMA) c[s.key] = s.default;
  return c;
}

function levenshtein(a: string, b: string): number {
  const m = a.length;
  const n = b.length;
  const d = Array.from({ length: m + 1 }, (_, i) => [i, ...new Array(n).fill(0)]);
  for (let j = 1; j <= n; j++) d[0]![j] = j;
  for (let i = 1; i <= m; i++)
    for (let j = 1; j <= n; j++) d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
  return d[m]![n]!;
}

/** The valid key closest to `key` (by edit distance on the whole key and on its last part). */
export function closestKey(key: string): string {
  let best = SCHEMA[0]!.key;
  let bestD = Infinity;
  const last = key.split('.').pop()!;
  for (const s of SCHEMA) {
    const sLast = s.key.split('.').pop()!;
    let d = Math.min(levenshtein(key, s.key), levenshtein(last, sLast) + 1);
    // a prefix of a key ('infer.guidance' for 'infer.guidance_scale') is a strong hint
    if (s.key.startsWith(key) || (last.length >= 3 && sLast.startsWith(last))) d = Math.min(d, 1);
    if (d < bestD) {
      bestD = d;
      best = s.key;
    }
  }
  return best;
}

function unknownKey(key: string, where: string): ConfigError {
  return new ConfigError(`unknown config key '${key}'${where}; did you mean '${closestKey(key)}'? (run with --help for every key)`);
}

const BYTE_UNITS: Record<string, number> = { b: 1, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30 };

export function parseBytes(v: unknown, key = 'value'): number {
  if (typeof v === 'number' && Number.isFinite(v) && v >= 0) return Math.floor(v);
  if (typeof v === 'string') {
    const m = /^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$/.exec(v);
    if (m) {
      const unit = (m[2] || 'b').toLowerCase();
      const mult = BYTE_UNITS[unit];
      if (mult !== undefined) return Math.floor(Number(m[1]) * mult);
    }
  }
  throw new ConfigError(`${key} must be a byte size such as 512MiB, 8GiB or 0, got ${JSON.stringify(v)}`);
}

/** Check and normalize one value for `spec` (strings from the command line are parsed). */
export function coerce(spec: KeySpec, raw: unknown, fromString: boolean): unknown {
  const t = spec.type;
  const bad = (why: string) => new ConfigError(`${spec.key} ${why} (type ${typeName(t)}; ${spec.doc})`);
  let v = raw;
  if (fromString && typeof raw === 'string' && t.kind !== 'string' && t.kind !== 'path') {
    const s = raw.trim();
    if (t.kind === 'int' || t.kind === 'float') v = s === '' ? NaN : Number(s);
    else if (t.kind === 'bool' || t.kind === 'boolOrAuto') v = /^(true|yes|on|1)$/i.test(s) ? true : /^(false|no|off|0)$/i.test(s) ? false : s;
  }
  switch (t.kind) {
    case 'int': {
      if (typeof v !== 'number' || !Number.isInteger(v)) throw bad(`must be an integer, got ${JSON.stringify(raw)}`);
      if ((t.min !== undefined && v < t.min) || (t.max !== undefined && v > t.max)) throw bad(`must be in ${t.min}..${t.max}, got ${v}`);
      if (t.step && ((v % t.step.mod) + t.step.mod) % t.step.mod !== t.step.rem) {
        const lo = v - ((((v - t.step.rem) % t.step.mod) + t.step.mod) % t.step.mod);
        throw bad(`must be ${t.step.what}, got ${v} (nearest: ${lo}${lo + t.step.mod <= (t.max ?? Infinity) ? ` or ${lo + t.step.mod}` : ''})`);
      }
      return v;
    }
    case 'float': {
      if (typeof v !== 'number' || !Number.isFinite(v)) throw bad(`must be a number, got ${JSON.stringify(raw)}`);
      if ((t.min !== undefined && v < t.min) || (t.max !== undefined && v > t.max)) throw bad(`must be in ${t.min}..${t.max}, got ${v}`);
      return v;
    }
    case 'bool':
      if (typeof v !== 'boolean') throw bad(`must be true or false, got ${JSON.stringify(raw)}`);
      return v;
    case 'boolOrAuto':
      if (v === 'auto' || v === null) return 'auto';
      if (typeof v !== 'boolean') throw bad(`must be true, false or auto, got ${JSON.stringify(raw)}`);
      return v;
    case 'string':
    case 'path':
      if (v === null) return '';
      if (typeof v !== 'string') throw bad(`must be a string, got ${JSON.stringify(raw)}`);
      return v;
    case 'enum':
      if (typeof v !== 'string' || !t.values.includes(v)) throw bad(`must be one of ${t.values.join(', ')}, got ${JSON.stringify(raw)}`);
      return v;
    case 'bytes':
      return parseBytes(v, spec.key);
  }
}

/** Flatten a nested YAML object to dotted keys (arrays and scalars are leaves). */
export function flatten(obj: unknown, prefix = '', out: FlatConfig = {}): FlatConfig {
  if (obj && typeof obj === 'object' && !Array.isArray(obj)) {
    for (const [k, v] of Object.entries(obj as Record<string, unknown>)) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (v && typeof v === 'object' && !Array.isArray(v) && !SCHEMA_BY_KEY.has(key)) flatten(v, key, out);
      else out[key] = v;
    }
  } else if (prefix) out[prefix] = obj;
  return out;
}

/** Apply a nested or flat object of values on top of `cfg` (strict). */
export function applyObject(cfg: FlatConfig, obj: Record<string, unknown>, where = ''): FlatConfig {
  const flat = flatten(obj);
  for (const [k, v] of Object.entries(flat)) {
    const spec = SCHEMA_BY_KEY.get(k);
    if (!spec) throw unknownKey(k, where);
    cfg[k] = coerce(spec, v, false);
  }
  return cfg;
}

export function loadConfigFile(path: string, cfg: FlatConfig = defaultConfig()): FlatConfig {
  if (!existsSync(path)) throw new ConfigError(`config file ${path} does not exist`);
  let doc: unknown;
  try {
    doc = parseYaml(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new ConfigError(`config file ${path} is not valid YAML: ${(e as Error).message}`);
  }
  if (doc === null || doc === undefined) return cfg;
  if (typeof doc !== 'object' || Array.isArray(doc)) throw new ConfigError(`config file ${path} must be a mapping of keys`);
  return applyObject(cfg, doc as Record<string, unknown>, ` in ${path}`);
}

/** Apply `key=value` overrides (values parsed per the key's type; YAML-style null allowed for auto). */
export function applyOverrides(cfg: FlatConfig, overrides: string[]): FlatConfig {
  for (const o of overrides) {
    const eq = o.indexOf('=');
    if (eq <= 0) throw new ConfigError(`override '${o}' must look like key=value (e.g. infer.diffusion.low_mem_level=2)`);
    const k = o.slice(0, eq).trim().replace(/^\+\+?/, '');
    const spec = SCHEMA_BY_KEY.get(k);
    if (!spec) throw unknownKey(k, ' in the overrides');
    cfg[k] = coerce(spec, o.slice(eq + 1), true);
  }
  return cfg;
}

/** Nested object form (for printing / writing the effective config). */
export function nest(cfg: FlatConfig): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const s of SCHEMA) {
    const parts = s.key.split('.');
    let o = out;
    for (const p of parts.slice(0, -1)) o = (o[p] ??= {}) as Record<string, unknown>;
    o[parts[parts.length - 1]!] = cfg[s.key];
  }
  return out;
}

export function configToYaml(cfg: FlatConfig): string {
  return stringifyYaml(nest(cfg));
}

/** `--help` text: every key with its type, default and doc. */
export function helpText(): string {
  const w = Math.max(...SCHEMA.map((s) => s.key.length));
  return SCHEMA.map((s) => `  ${s.key.padEnd(w)}  ${typeName(s.type)}  (default: ${JSON.stringify(s.default)})\n  ${' '.repeat(w)}  ${s.doc}`).join('\n');
}
