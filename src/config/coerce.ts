// Checking one value against its key: type, range, step; strings from the command line are
// parsed first. Unknown names get the closest valid one.

import { KEYS, typeName, type KeySpec } from './schema.ts';
import { ConfigError } from '../util/errors.ts';

function levenshtein(a: string, b: string): number {
  const m = a.length;
  const n = b.length;
  const d = Array.from({ length: m + 1 }, (_, i) => [i, ...new Array(n).fill(0)]);
  for (let j = 1; j <= n; j++) d[0]![j] = j;
  for (let i = 1; i <= m; i++)
    for (let j = 1; j <= n; j++) d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
  return d[m]![n]!;
}

/**
 * A value as it may appear in a one-line message: JSON-ish, with non-finite numbers, bigints and
 * cyclic or exotic objects spelled out, newlines escaped, and long texts cut to `max` characters.
 */
export function show(v: unknown, max = 80): string {
  let t: string;
  if (typeof v === 'number' || typeof v === 'bigint') t = String(v);
  else if (v === undefined) t = 'nothing';
  else {
    try {
      t = JSON.stringify(v) ?? String(v);
    } catch {
      t = Array.isArray(v) ? '[a cyclic list]' : '{a cyclic mapping}'; // YAML aliases can build cycles
    }
  }
  // control, format (bidi overrides such as U+202E) and separator characters, escaped: one honest line
  t = t.replace(/[\p{C}\u2028\u2029]/gu, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  return t.length > max ? `${t.slice(0, max - 3)}...` : t;
}

/** A key as it may appear in a one-line message: plain when it looks like a key, quoted (escaped, cut) otherwise. */
export function showKey(k: string): string {
  return /^[A-Za-z0-9_.+-]{1,100}$/.test(k) ? `'${k}'` : show(k, 100);
}

/** The name in `names` closest to `name` (by edit distance on the whole dotted name and on its last part). */
export function closestName(name: string, names: readonly string[]): string {
  // edit distance is quadratic: a huge name (random bytes) is cut to a length real keys have
  name = name.slice(0, 100);
  let best = names[0]!;
  let bestD = Infinity;
  const last = name.split('.').pop()!;
  for (const n of names) {
    const nLast = n.split('.').pop()!;
    let d = Math.min(levenshtein(name, n), levenshtein(last, nLast) + 1);
    // a prefix of a key ('infer.guidance' for 'infer.guidance_scale') is a strong hint
    if (n.startsWith(name) || (last.length >= 3 && nLast.startsWith(last))) d = Math.min(d, 1);
    if (d < bestD) {
      bestD = d;
      best = n;
    }
  }
  return best;
}

/** The valid dotted key closest to `key`. */
export function closestKey(key: string): string {
  return closestName(
    key,
    KEYS.map((s) => s.key),
  );
}

/** Keys that existed once and were removed: why, instead of a closest-key guess. */
const REMOVED_KEYS: Readonly<Record<string, string>> = {};

export function unknownKey(key: string, where: string): ConfigError {
  const removed = REMOVED_KEYS[key];
  if (removed) return new ConfigError(`config key '${key}'${where} is no longer accepted: ${removed}`);
  return new ConfigError(`unknown config key ${showKey(key)}${where}; did you mean '${closestKey(key)}'? (run with --help for every key)`);
}

const BYTE_UNITS: Record<string, number> = { b: 1, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30 };

export function parseBytes(v: unknown, key = 'value'): number {
  let n = NaN;
  if (typeof v === 'number' && v >= 0) n = Math.floor(v);
  else if (typeof v === 'string' && v.length <= 100) {
    const m = /^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$/.exec(v);
    if (m) {
      const unit = (m[2] || 'b').toLowerCase();
      const mult = BYTE_UNITS[unit];
      if (mult !== undefined) n = Math.floor(Number(m[1]) * mult);
    }
  }
  if (Number.isFinite(n) && n > Number.MAX_SAFE_INTEGER) throw new ConfigError(`${key} must be a byte size below 8 PiB, got ${show(v)}`);
  if (Number.isSafeInteger(n)) return n;
  throw new ConfigError(`${key} must be a byte size such as 512MiB, 8GiB or 0, got ${show(v)}`);
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
      if (typeof v !== 'number' || !Number.isInteger(v)) throw bad(`must be an integer, got ${show(raw)}`);
      if ((t.min !== undefined && v < t.min) || (t.max !== undefined && v > t.max)) throw bad(`must be in ${t.min}..${t.max}, got ${v}`);
      if (t.step && ((v % t.step.mod) + t.step.mod) % t.step.mod !== t.step.rem) {
        const lo = v - ((((v - t.step.rem) % t.step.mod) + t.step.mod) % t.step.mod);
        throw bad(`must be ${t.step.what}, got ${v} (nearest: ${lo}${lo + t.step.mod <= (t.max ?? Infinity) ? ` or ${lo + t.step.mod}` : ''})`);
      }
      return v;
    }
    case 'float': {
      if (typeof v !== 'number' || !Number.isFinite(v)) throw bad(`must be a number, got ${show(raw)}`);
      if ((t.min !== undefined && v < t.min) || (t.max !== undefined && v > t.max)) throw bad(`must be in ${t.min}..${t.max}, got ${v}`);
      return v;
    }
    case 'bool':
      if (typeof v !== 'boolean') throw bad(`must be true or false, got ${show(raw)}`);
      return v;
    case 'boolOrAuto':
      if (v === 'auto' || v === null) return 'auto';
      if (typeof v !== 'boolean') throw bad(`must be true, false or auto, got ${show(raw)}`);
      return v;
    case 'string':
    case 'path':
      if (v === null) return '';
      if (typeof v !== 'string') throw bad(`must be a string, got ${show(raw)}`);
      // the file system refuses NUL in a path (a TypeError deep inside fs otherwise)
      if (t.kind === 'path' && v.includes('\0')) throw bad(`must not contain a NUL character, got ${show(raw)}`);
      return v;
    case 'enum':
      if (typeof v !== 'string' || !t.values.includes(v)) throw bad(`must be one of ${t.values.join(', ')}, got ${show(raw)}`);
      return v;
    case 'bytes':
      return parseBytes(v, spec.key);
  }
}
