// `npm run fuzz -- --n 10000 [--seed S] [--target safetensors|tokenizer|config|model-config|latents|all] [--max-ms 2000] [--out DIR]`
// `npm run fuzz -- --target T --seed S --case I`   (re-run one case in this process, with its stack)
//
// Seeded fuzzing of everything that reads user-supplied files or strings: it mutates VALID inputs
// (bit flips, interesting bytes, truncation, splicing, length-prefix edits, JSON-structure edits:
// values replaced by null / lists / huge, negative or fractional numbers / odd unicode / deep
// nesting, keys deleted, added or duplicated; YAML anchors, aliases, tags, deep nesting) and feeds
// them to
//   safetensors   SafetensorsFile.open + reading every tensor and the metadata
//   tokenizer     loadTokenizer + encoding, encodePrompt and decoding a few prompts
//   config        readConfigFile (YAML), overridesLayer (`key=value`), modelDefaults (smart_diffusion.json)
//   model-config  openModelFolder with one mutated config.json / model_index.json, then building the
//                 three models from the parsed configs (what the pipeline does next; no GPU)
//   latents       loadLatents (src/pipeline/outputs.ts)
// Each case must end in success or a SmartDiffusionError whose message is one line; anything else
// thrown is a crash, a multi-line message is a bad message, a case over --max-ms is slow, one over
// 5× that (or 10 s) is a hang (the worker running the cases is killed and restarted; a hang or a slow
// case counts only when a second run confirms it, so a busy machine gives no false alarm), and a worker
// over its 1 GiB heap limit is an out-of-memory. The cases run in a worker thread so that a hang
// or a runaway allocation is caught without taking the tool down. Per target it prints cases, ok,
// clean errors, crashes, hangs, the slowest case and memory; for each failure the seed, the case
// and a reproducer file. Exit status 1 when anything failed.
//
// Case i of seed S is a pure function of (target, S, i): `--case i` rebuilds exactly that input.

import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { mkdtempSync, writeFileSync, readFileSync, mkdirSync, copyFileSync, rmSync, symlinkSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { createRequire } from 'node:module';
import { SmartDiffusionError } from '../util/errors.ts';
import { Rng } from '../util/rng.ts';

export const FUZZ_TARGETS = ['safetensors', 'tokenizer', 'config', 'model-config', 'latents'] as const;
export type FuzzTarget = (typeof FUZZ_TARGETS)[number];

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

// ---------------------------------------------------------------------------------------------
// Seeded randomness: one independent stream per (target, seed, case)

/** the project's mulberry32 stream (util/rng.ts), seeded by a hash of (target, seed, case) */
class Rand extends Rng {
  constructor(...parts: number[]) {
    let h = 0x9e3779b9;
    for (const p of parts) {
      h = Math.imul(h ^ (p >>> 0), 0x85ebca6b);
      h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
      h ^= h >>> 16;
    }
    super(h >>> 0);
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(a: readonly T[]): T {
    return a[this.int(a.length)]!;
  }
  /** a size skewed to small values, up to `max` */
  size(max: number): number {
    return Math.floor(Math.pow(this.next(), 3) * max);
  }
}

// ---------------------------------------------------------------------------------------------
// Byte-level mutations

const INTERESTING_BYTES = [0x00, 0xff, 0x7f, 0x80, 0x01, 0x7b, 0x7d, 0x22, 0x5b, 0x5d, 0x3a, 0x2c, 0x5c, 0x20, 0x0a, 0x2d, 0x30, 0x39, 0xc0, 0xed, 0xf0, 0xfe];

function mutateBytes(r: Rand, input: Uint8Array, rounds = 1 + r.int(4)): Uint8Array {
  let b = Uint8Array.from(input);
  for (let k = 0; k < rounds; k++) {
    const n = b.length;
    const at = n === 0 ? 0 : r.int(n);
    switch (r.int(9)) {
      case 0: // bit flips
        for (let j = 1 + r.int(8); j > 0 && n > 0; j--) b[r.int(n)]! ^= 1 << r.int(8);
        break;
      case 1: // interesting bytes
        for (let j = 1 + r.int(4); j > 0 && n > 0; j--) b[r.int(n)] = r.pick(INTERESTING_BYTES);
        break;
      case 2: // truncate
        b = b.slice(0, r.int(n + 1));
        break;
      case 3: {
        // append random bytes
        const extra = new Uint8Array(1 + r.size(4096)).map(() => r.int(256));
        const c = new Uint8Array(n + extra.length);
        c.set(b);
        c.set(extra, n);
        b = c;
        break;
      }
      case 4: {
        // splice: copy a chunk over another place
        const len = Math.min(r.size(256) + 1, n);
        const from = r.int(Math.max(1, n - len + 1));
        const to = r.int(Math.max(1, n - len + 1));
        b.copyWithin(to, from, from + len);
        break;
      }
      case 5: {
        // delete a chunk
        const len = Math.min(r.size(512) + 1, n - at);
        b = Uint8Array.from([...b.subarray(0, at), ...b.subarray(at + len)]);
        break;
      }
      case 6: {
        // duplicate a chunk in place
        const len = Math.min(r.size(512) + 1, n - at);
        const chunk = b.slice(at, at + len);
        b = Uint8Array.from([...b.subarray(0, at + len), ...chunk, ...b.subarray(at + len)]);
        break;
      }
      case 7: // overwrite a run with random bytes
        for (let j = r.size(64) + 1, p = at; j > 0 && p < n; j--, p++) b[p] = r.int(256);
        break;
      default:
        // small random file
        if (r.chance(0.2)) b = new Uint8Array(r.size(2048)).map(() => r.int(256));
        else if (n > 0) b[at] = (b[at]! + (r.chance(0.5) ? 1 : 255)) & 0xff;
    }
  }
  return b;
}

// ---------------------------------------------------------------------------------------------
// JSON-structure mutations. Values stay plain JSON, except Raw (a literal written as is: 1e400,
// 2^64) and Dup (an object written with a repeated key), which JSON.stringify cannot express.

class Raw {
  constructor(readonly text: string) {}
}
class Dup {
  constructor(readonly entries: Array<[string, unknown]>) {}
}

function ser(v: unknown): string {
  if (v instanceof Raw) return v.text;
  if (v instanceof Dup) return `{${v.entries.map(([k, x]) => `${JSON.stringify(k)}:${ser(x)}`).join(',')}}`;
  if (Array.isArray(v)) return `[${v.map(ser).join(',')}]`;
  if (v !== null && typeof v === 'object') return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}:${ser(x)}`).join(',')}}`;
  return JSON.stringify(v) ?? 'null';
}

const ODD_STRINGS = ['', ' ', '\u0000', '\ud800', '\udfff', '\u202e', '\u200b', '\ufeff', '𝔘ñí©ødé', 'ｆｕｌｌ', '\n', '..', '__proto__', 'constructor', 'toString', '%s%n', '<0xZZ>', '▁', 'NaN', '-0', '1e400'];

function interesting(r: Rand, nodes: unknown[]): unknown {
  switch (r.int(22)) {
    case 0:
      return null;
    case 1:
      return [];
    case 2:
      return {};
    case 3:
      return r.chance(0.5);
    case 4:
      return r.pick([0, -1, 1, -0.5, 0.5, 2.5, 255, 256, 65535, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 53, -(2 ** 53), 1e9, 1e12, 1e308, -1e308, 5e-324]);
    case 5:
      return new Raw(r.pick(['1e400', '-1e400', '1e-400', '18446744073709551616', '9007199254740993', '-0', '0.0000000000000000000001', '123456789012345678901234567890']));
    case 6:
      return r.pick(ODD_STRINGS);
    case 7:
      return 'x'.repeat(r.size(100_000));
    case 8: {
      // deep nesting
      let v: unknown = r.chance(0.5) ? 1 : null;
      const depth = 1 + r.size(5000);
      for (let i = 0; i < depth; i++) v = r.chance(0.5) ? [v] : { a: v };
      return v;
    }
    case 9:
      return Array.from({ length: r.size(2000) }, () => r.int(1000) - 10);
    case 10:
      return String(r.int(100_000) - 50);
    default:
      // a copy of another node of the document (right type, wrong place)
      return nodes.length ? structuredCloneish(r.pick(nodes)) : null;
  }
}

function structuredCloneish(v: unknown): unknown {
  if (v instanceof Raw || v instanceof Dup) return v;
  if (Array.isArray(v)) return v.slice();
  if (v !== null && typeof v === 'object') return { ...(v as object) };
  return v;
}

/** Containers of a JSON value (objects and arrays), with a cap on how many are visited. */
function containers(root: unknown, cap = 20000): Array<Record<string, unknown> | unknown[]> {
  const out: Array<Record<string, unknown> | unknown[]> = [];
  const stack = [root];
  while (stack.length && out.length < cap) {
    const v = stack.pop();
    if (v instanceof Raw || v instanceof Dup) continue;
    if (Array.isArray(v)) {
      out.push(v);
      for (const x of v) if (x !== null && typeof x === 'object') stack.push(x);
    } else if (v !== null && typeof v === 'object') {
      out.push(v as Record<string, unknown>);
      for (const x of Object.values(v)) if (x !== null && typeof x === 'object') stack.push(x);
    }
  }
  return out;
}

/** Mutate a parsed JSON document in place (1-3 edits), returning the new root. */
function mutateJsonValue(r: Rand, root: unknown, extraKeys: readonly string[] = []): unknown {
  const edits = 1 + r.int(3);
  for (let e = 0; e < edits; e++) {
    const cs = containers(root);
    if (cs.length === 0) return interesting(r, []);
    // prefer shallow containers a little: most structure sits near the top
    const c = cs[r.chance(0.5) ? r.int(Math.min(cs.length, 8)) : r.int(cs.length)]!;
    const nodes = r.chance(0.3) ? (Array.isArray(c) ? c : Object.values(c)) : [];
    if (Array.isArray(c)) {
      const i = r.int(c.length + 1);
      switch (r.int(5)) {
        case 0:
          c.splice(i, 1);
          break;
        case 1:
          c.splice(i, 0, interesting(r, nodes));
          break;
        case 2:
          c.length = r.int(c.length + 1);
          break;
        default:
          if (c.length) c[r.int(c.length)] = interesting(r, nodes);
      }
    } else {
      const keys = Object.keys(c);
      const k = keys.length ? r.pick(keys) : 'x';
      switch (r.int(6)) {
        case 0:
          delete c[k];
          break;
        case 1:
          c[r.chance(0.5) && extraKeys.length ? r.pick(extraKeys) : r.pick(ODD_STRINGS)] = interesting(r, nodes);
          break;
        case 2: {
          // duplicated key: the same key twice, the second value mutated or not
          const entries = Object.entries(c);
          const dupVal = r.chance(0.5) ? c[k] : interesting(r, nodes);
          entries.splice(r.int(entries.length + 1), 0, [k, dupVal]);
          const d = new Dup(entries);
          if (c === root) return d;
          replaceIn(cs, c, d);
          break;
        }
        default:
          c[k] = interesting(r, nodes);
      }
    }
  }
  return root;
}

/** Replace container `old` by `nu` wherever it is referenced among `cs`. */
function replaceIn(cs: Array<Record<string, unknown> | unknown[]>, old: unknown, nu: unknown): void {
  for (const p of cs) {
    if (Array.isArray(p)) {
      const i = p.indexOf(old);
      if (i >= 0) p[i] = nu;
    } else for (const [k, v] of Object.entries(p)) if (v === old) p[k] = nu;
  }
}

const enc = new TextEncoder();
const dec = new TextDecoder();

/** A mutated JSON text: structural (70%) or textual (30%). */
function mutateJsonText(r: Rand, text: string, extraKeys: readonly string[] = []): Uint8Array {
  if (r.chance(0.7)) return enc.encode(ser(mutateJsonValue(r, JSON.parse(text), extraKeys)));
  return mutateBytes(r, enc.encode(text));
}

// ---------------------------------------------------------------------------------------------
// Valid inputs

interface Seeds {
  safetensors: Uint8Array[];
  latents: Uint8Array[];
  tokenizers: string[];
  yaml: string;
  overrides: string[];
  smartDiffusion: string;
  modelConfigs: Record<string, string>;
}

let seedsCache: Promise<Seeds> | null = null;

function seeds(): Promise<Seeds> {
  seedsCache ??= (async () => {
    const { encodeSafetensorsHeader } = await import('../io/safetensors.ts');
    const r = new Rand(12345);
    const file = (tensors: Array<{ key: string; dtype: 'F32' | 'F16' | 'BF16' | 'I64' | 'U8' | 'F64'; shape: number[] }>, metadata?: Record<string, string>) => {
      const size = { F32: 4, F16: 2, BF16: 2, I64: 8, U8: 1, F64: 8 };
      const hdr = encodeSafetensorsHeader(tensors, metadata);
      const n = tensors.reduce((a, t) => a + t.shape.reduce((x, d) => x * d, 1) * size[t.dtype], 0);
      const out = new Uint8Array(hdr.length + n);
      out.set(hdr);
      // plausible data: small f32 values (a latents file must be finite), random bytes elsewhere
      const f = new Float32Array(out.buffer, 0, Math.floor(out.length / 4));
      for (let i = Math.ceil(hdr.length / 4); i < f.length; i++) f[i] = r.next() * 2 - 1;
      return out;
    };
    const rd = (p: string) => readFileSync(join(ROOT, p), 'utf8');
    return {
      safetensors: [
        file(
          [
            { key: 'a.weight', dtype: 'F32', shape: [2, 3] },
            { key: 'b.bias', dtype: 'F16', shape: [4] },
            { key: 'c', dtype: 'I64', shape: [2] },
            { key: 'd', dtype: 'BF16', shape: [1, 1, 2] },
            { key: 'empty', dtype: 'U8', shape: [0] },
          ],
          { format: 'pt', note: 'x' },
        ),
        file([{ key: 'scalar', dtype: 'F64', shape: [] }]),
      ],
      latents: [
        file([{ key: 'latents', dtype: 'F32', shape: [16, 1, 4, 4] }], { format: 'smart-diffusion-latents', meta: JSON.stringify({ prompt: 'a cat', seed: 1, 'infer.height': 32 }) }),
        file([{ key: 'latents', dtype: 'F16', shape: [4, 3, 2, 2] }], { format: 'smart-diffusion-latents', meta: '{}' }),
      ],
      tokenizers: [rd('weights/demo/tokenizer/tokenizer.json'), rd('test/fixtures/tokenizer/legacy/tokenizer.json'), rd('test/fixtures/tokenizer/bytefallback/tokenizer.json')],
      yaml: rd('configs/wan.yaml'),
      overrides: [
        'infer.seed=7',
        'infer.diffusion.low_mem_level=2',
        'infer.memory_limit=8GiB',
        'infer.height=64',
        'prompt=a red circle',
        'infer.guidance_scale=3.5',
        'infer.offload_dit=auto',
        'model=weights/demo',
        '+infer.num_frames=9',
        'infer.vae_tile_overlap=0.5',
        'infer.sampler=euler',
      ],
      smartDiffusion: rd('weights/demo/smart_diffusion.json'),
      modelConfigs: {
        'model_index.json': rd('weights/demo/model_index.json'),
        'transformer/config.json': rd('weights/demo/transformer/config.json'),
        'vae/config.json': rd('weights/demo/vae/config.json'),
        'text_encoder/config.json': rd('weights/demo/text_encoder/config.json'),
        'scheduler/scheduler_config.json': rd('weights/demo/scheduler/scheduler_config.json'),
      },
    };
  })();
  return seedsCache;
}

// ---------------------------------------------------------------------------------------------
// Case generation: (target, seed, i) -> file name + bytes

export interface FuzzCase {
  /** file name the input is written to (in the case folder) */
  name: string;
  bytes: Uint8Array;
}

/** A safetensors-format file mutated in its length prefix, header JSON, header text or bytes. */
function mutateSafetensors(r: Rand, src: Uint8Array, extraKeys: readonly string[]): Uint8Array {
  const n = Number(new DataView(src.buffer, src.byteOffset).getBigUint64(0, true));
  const header = dec.decode(src.subarray(8, 8 + n));
  const data = src.subarray(8 + n);
  const assemble = (h: Uint8Array, len: bigint, body: Uint8Array) => {
    const out = new Uint8Array(8 + h.length + body.length);
    new DataView(out.buffer).setBigUint64(0, len, true);
    out.set(h, 8);
    out.set(body, 8 + h.length);
    return out;
  };
  const lenOf = (h: Uint8Array): bigint => {
    if (r.chance(0.8)) return BigInt(h.length);
    return r.pick([0n, 1n, 2n, BigInt(h.length) - 1n, BigInt(h.length) + 1n, BigInt(h.length) + 8n, 100_000_000n, 100_000_001n, 2n ** 32n, 2n ** 63n, 2n ** 64n - 1n].filter((x) => x >= 0n));
  };
  const p = r.next();
  if (p < 0.45) {
    const h = enc.encode(ser(mutateJsonValue(r, JSON.parse(header), extraKeys)));
    const padded = r.chance(0.5) ? Uint8Array.from([...h, ...new Array((8 - (h.length % 8)) % 8).fill(0x20)]) : h;
    let body: Uint8Array = data;
    if (r.chance(0.2)) body = mutateBytes(r, data);
    return assemble(padded, lenOf(padded), body);
  }
  if (p < 0.6) {
    const h = mutateBytes(r, enc.encode(header), 1 + r.int(2));
    return assemble(h, lenOf(h), data);
  }
  if (p < 0.7) return assemble(enc.encode(header), lenOf(new Uint8Array(0)) === 0n ? 0n : r.pick([0n, 7n, BigInt(n) - 1n, BigInt(n) + 1n, 2n ** 40n, 2n ** 63n]), data);
  return mutateBytes(r, src);
}

const YAML_TOKENS = ['&a', '*a', '&a [1, 2]', '*nope', '!!binary aGVsbG8=', '!!str', '!!int 1.5', '!foo', '~', 'null', '.nan', '.inf', '-.inf', '1e999', '-1', '0x10', '0o17', '1_000', 'yes', 'no', 'on', '"\\ud800"', '"\\u202e"', "'", '"', '{', '}', '[', ']', '- ', ': ', '? ', '|', '>', '%YAML 1.1', '---', '...', '#', '\t', '@', '`', '\\', 'ｆｕｌｌ', '9'.repeat(400), '[[[[[[[[[[', '{a: {a: {a: {a: 1}}}}', '<<: *a', '&x {a: *x}'];

function mutateYaml(r: Rand, text: string): Uint8Array {
  const lines = text.split('\n');
  const ops = 1 + r.int(4);
  for (let k = 0; k < ops; k++) {
    const i = r.int(lines.length);
    switch (r.int(8)) {
      case 0:
        lines.splice(i, 1);
        break;
      case 1:
        lines.splice(i, 0, lines[r.int(lines.length)]!);
        break;
      case 2: {
        // replace a value
        const l = lines[i]!;
        const c = l.indexOf(':');
        lines[i] = c >= 0 ? `${l.slice(0, c + 1)} ${r.pick(YAML_TOKENS)}` : r.pick(YAML_TOKENS);
        break;
      }
      case 3: {
        // insert a token somewhere in the line
        const l = lines[i]!;
        const at = r.int(l.length + 1);
        lines[i] = l.slice(0, at) + r.pick(YAML_TOKENS) + l.slice(at);
        break;
      }
      case 4: // indentation change
        lines[i] = r.chance(0.5) ? ' '.repeat(1 + r.int(8)) + lines[i] : lines[i]!.trimStart();
        break;
      case 5: {
        // an anchor on one value and aliases elsewhere (maybe many: alias bombs)
        const a = r.int(lines.length);
        const c = lines[a]!.indexOf(':');
        if (c >= 0) lines[a] = `${lines[a]!.slice(0, c + 1)} &z ${lines[a]!.slice(c + 1).trim() || '[1, 2]'}`;
        const refs = r.chance(0.3) ? r.size(2000) + 1 : 1;
        lines.splice(r.int(lines.length), 0, `zz: [${Array(refs).fill('*z').join(', ')}]`);
        break;
      }
      case 6: {
        // deep nesting
        const d = 1 + r.size(3000);
        lines.splice(i, 0, r.chance(0.5) ? `deep: ${'['.repeat(d)}${']'.repeat(r.chance(0.5) ? d : 0)}` : Array.from({ length: Math.min(d, 300) }, (_, j) => ' '.repeat(j) + 'a:').join('\n'));
        break;
      }
      default:
        return mutateBytes(r, enc.encode(lines.join('\n')));
    }
  }
  return enc.encode(lines.join('\n'));
}

const ODD_VALUES = ['', ' ', '-1', '1e999', 'NaN', 'Infinity', '0x10', '1.5', '9'.repeat(400), '99999999TiB', '-8GiB', '1e3GiB', 'auto', 'null', '~', 'true', 'yes', '\u0000', 'a\u0000b', '\ud800', '\u202e', 'ｆｕｌｌ', '٣', '\u00a0', '=', '==', 'x'.repeat(100_000)];

function mutateOverrides(r: Rand, valid: readonly string[]): Uint8Array {
  const list = Array.from({ length: 1 + r.int(4) }, () => r.pick(valid));
  for (let k = 1 + r.int(3); k > 0; k--) {
    const i = r.int(list.length);
    const o = list[i]!;
    const eq = o.indexOf('=');
    switch (r.int(5)) {
      case 0:
        list[i] = `${o.slice(0, eq + 1)}${r.pick(ODD_VALUES)}`;
        break;
      case 1: {
        // mutate the key's characters
        const key = [...o.slice(0, eq)];
        const at = r.int(key.length + 1);
        key.splice(at, r.int(2), r.pick([...ODD_STRINGS, '.', '+', '++', 'x']));
        list[i] = `${key.join('')}${o.slice(eq)}`;
        break;
      }
      case 2:
        list[i] = o.replace('=', r.pick(['', ' ', ':', '==', '= ']));
        break;
      case 3:
        list[i] = r.pick(ODD_VALUES) + '=' + r.pick(ODD_VALUES);
        break;
      default:
        list[i] = dec.decode(mutateBytes(r, enc.encode(o), 1));
    }
  }
  // one override per line; a line break inside one is a second override, as a shell would not make it
  return enc.encode(list.join('\n'));
}

export async function makeCase(target: FuzzTarget, seed: number, i: number): Promise<FuzzCase> {
  const s = await seeds();
  const r = new Rand(seed, FUZZ_TARGETS.indexOf(target), i);
  switch (target) {
    case 'safetensors':
      return { name: 'case.safetensors', bytes: mutateSafetensors(r, r.pick(s.safetensors), ['__metadata__', 'dtype', 'shape', 'data_offsets', 'a.weight']) };
    case 'latents':
      return { name: 'case.latents.safetensors', bytes: mutateSafetensors(r, r.pick(s.latents), ['__metadata__', 'latents', 'meta', 'dtype', 'shape', 'data_offsets']) };
    case 'tokenizer': {
      // the small demo tokenizer most often; the fixtures carry the real SentencePiece charsmap
      const src = r.chance(0.8) ? s.tokenizers[0]! : r.pick(s.tokenizers.slice(1));
      return { name: 'tokenizer.json', bytes: mutateJsonText(r, src, ['type', 'vocab', 'unk_id', 'normalizers', 'pretokenizers', 'added_tokens', 'ids', 'id', 'content', 'pattern', 'replacement', 'special_tokens', 'single', 'Sequence', 'SpecialToken']) };
    }
    case 'config': {
      const p = r.next();
      if (p < 0.5) return { name: 'config.yaml', bytes: mutateYaml(r, s.yaml) };
      if (p < 0.85) return { name: 'overrides.txt', bytes: mutateOverrides(r, s.overrides) };
      return { name: 'smart_diffusion.json', bytes: mutateJsonText(r, s.smartDiffusion, ['text_len', 'height', 'num_frames', 'shift', 'sampler']) };
    }
    case 'model-config': {
      const which = r.pick(Object.keys(s.modelConfigs));
      return { name: which, bytes: mutateJsonText(r, s.modelConfigs[which]!, ['num_layers', 'dim', 'num_heads', '_class_name', 'model_type', 'patch_size', 'dim_mult', 'z_dim', 'vocab_size', 'image_dim', 'tokenizer']) };
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Running one case

const PROMPTS = ['a red circle moving right on a black background', '', '   ', '</s> <pad> <unk>', 'Ünïcödé ｆｕｌｌ 漢字 🎬 \u0000 \ud800 a&amp;b', 'x'.repeat(3000)];

/** Run case `c` in folder `dir` (its files written there). Returns normally or throws what the code under test threw. */
export async function runCase(target: FuzzTarget, c: FuzzCase, dir: string): Promise<void> {
  const path = join(dir, c.name);
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, c.bytes);
  switch (target) {
    case 'safetensors': {
      const { SafetensorsFile } = await import('../io/safetensors.ts');
      const f = await SafetensorsFile.open(path);
      try {
        for (const k of f.keys()) await f.read(k);
        f.metadata();
      } finally {
        await f.close();
      }
      return;
    }
    case 'latents': {
      const { loadLatents } = await import('../pipeline/outputs.ts');
      await loadLatents(path);
      return;
    }
    case 'tokenizer': {
      const { loadTokenizer, encodePrompt } = await import('../io/tokenizer.ts');
      const tok = await loadTokenizer(dir);
      for (const p of PROMPTS) {
        const e = tok.encode(p);
        tok.decode(e.ids);
        encodePrompt(tok, p, 16);
      }
      return;
    }
    case 'config': {
      const { readConfigFile, overridesLayer, modelDefaults, applyLayers, defaultSettings, toDotted } = await import('../config/settings.ts');
      let layer;
      if (c.name === 'config.yaml') layer = readConfigFile(path);
      else if (c.name === 'overrides.txt') layer = overridesLayer(dec.decode(c.bytes).split('\n'));
      else layer = modelDefaults(dir);
      toDotted(applyLayers(defaultSettings(), [layer]));
      return;
    }
    case 'model-config': {
      const { openModelFolder } = await import('../io/model-folder.ts');
      const { WanTransformer3DModel, ditDimsFromConfig } = await import('../models/wan_dit/model.ts');
      const { UMT5EncoderModel, umt5DimsFromConfig } = await import('../models/umt5/model.ts');
      const { WanVaeDecoder, vaeDimsFromConfig } = await import('../models/wan_vae/model.ts');
      const m = await openModelFolder(dir);
      new WanTransformer3DModel(ditDimsFromConfig(m.transformer.config));
      new UMT5EncoderModel(umt5DimsFromConfig(m.textEncoder.config));
      new WanVaeDecoder(vaeDimsFromConfig(m.vae.config));
      return;
    }
  }
}

/** A model folder whose configs are copies (rewritten per case) and whose weights are links to the demo model's. */
function prepareModelFolder(dir: string, s: Seeds): void {
  for (const [name, text] of Object.entries(s.modelConfigs)) {
    mkdirSync(dirname(join(dir, name)), { recursive: true });
    writeFileSync(join(dir, name), text);
  }
  for (const w of ['transformer/diffusion_pytorch_model.safetensors', 'vae/diffusion_pytorch_model.safetensors', 'text_encoder/model.safetensors']) {
    if (!existsSync(join(dir, w))) symlinkSync(join(ROOT, 'weights', 'demo', w), join(dir, w));
  }
}

type Outcome = 'ok' | 'error' | 'crash' | 'badmsg';

function classify(err: unknown): { outcome: Outcome; msg: string } {
  if (err === undefined) return { outcome: 'ok', msg: '' };
  if (err instanceof SmartDiffusionError) {
    return err.message.includes('\n') || err.message.length > 2000
      ? { outcome: 'badmsg', msg: `${err.name} message of ${err.message.split('\n').length} lines / ${err.message.length} chars: ${JSON.stringify(err.message.slice(0, 300))}` }
      : { outcome: 'error', msg: err.message };
  }
  const e = err as Error;
  return { outcome: 'crash', msg: `${e?.name ?? typeof err}: ${String(e?.message ?? err).split('\n')[0]!.slice(0, 300)}\n${(e?.stack ?? '').split('\n').slice(1, 6).join('\n')}` };
}

// ---------------------------------------------------------------------------------------------
// Worker: runs cases [start, end) and reports each

interface WorkerJob {
  target: FuzzTarget;
  seed: number;
  start: number;
  end: number;
  dir: string;
  outDir: string;
  maxMs: number;
}

export type WorkerMsg =
  | { t: 'start'; i: number }
  | { t: 'done'; i: number; outcome: Outcome | 'slow'; ms: number; heap: number; msg: string; repro?: string };

function reproName(target: FuzzTarget, seed: number, i: number, name: string): string {
  return `${target}-s${seed}-c${i}-${name.replace(/[/\\]/g, '_')}`;
}

async function workerMain(job: WorkerJob): Promise<void> {
  const port = parentPort!;
  const s = await seeds();
  const dir = join(job.dir, `w${job.start}`);
  mkdirSync(dir, { recursive: true });
  if (job.target === 'model-config') prepareModelFolder(dir, s);
  for (let i = job.start; i < job.end; i++) {
    const c = await makeCase(job.target, job.seed, i);
    port.postMessage({ t: 'start', i } satisfies WorkerMsg);
    const t0 = performance.now();
    let err: unknown;
    try {
      await runCase(job.target, c, dir);
    } catch (e) {
      err = e;
    }
    let ms = performance.now() - t0;
    // a slow case is run once more before it counts (the machine may be busy with other work)
    if (ms > job.maxMs) {
      const t1 = performance.now();
      await runCase(job.target, c, dir).catch(() => undefined);
      ms = Math.min(ms, performance.now() - t1);
    }
    let { outcome, msg } = classify(err);
    if ((outcome === 'ok' || outcome === 'error') && ms > job.maxMs) {
      msg = `took ${ms.toFixed(0)} ms (limit ${job.maxMs}): ${outcome === 'ok' ? 'succeeded' : msg}`;
      outcome = 'slow' as Outcome;
    }
    let repro: string | undefined;
    if (outcome !== 'ok' && outcome !== 'error') {
      mkdirSync(job.outDir, { recursive: true });
      repro = join(job.outDir, reproName(job.target, job.seed, i, c.name));
      writeFileSync(repro, c.bytes);
    }
    // restore the model folder's config for the next case
    if (job.target === 'model-config') writeFileSync(join(dir, c.name), s.modelConfigs[c.name]!);
    port.postMessage({ t: 'done', i, outcome, ms, heap: process.memoryUsage().heapUsed, msg, repro } satisfies WorkerMsg);
  }
}

if (!isMainThread && (workerData as { fuzzJob?: WorkerJob } | null)?.fuzzJob) {
  workerMain((workerData as { fuzzJob: WorkerJob }).fuzzJob).catch((e) => {
    parentPort!.postMessage({ t: 'done', i: -1, outcome: 'crash', ms: 0, heap: 0, msg: `fuzz worker failed: ${(e as Error).stack ?? e}` } satisfies WorkerMsg);
  });
}

// ---------------------------------------------------------------------------------------------
// Main thread: one worker at a time per target, restarted after a hang or an out-of-memory

export interface Failure {
  target: FuzzTarget;
  seed: number;
  case: number;
  kind: 'crash' | 'badmsg' | 'slow' | 'hang' | 'oom';
  msg: string;
  repro: string;
}

export interface FuzzStats {
  target: FuzzTarget;
  seed: number;
  cases: number;
  ok: number;
  errors: number;
  crashes: number;
  badMessages: number;
  slow: number;
  hangs: number;
  /** cases that timed out once and then passed in a fresh worker (not failures; a busy machine) */
  hangRetries: number;
  ooms: number;
  maxMs: number;
  maxMsCase: number;
  maxHeapBytes: number;
  rssStartBytes: number;
  rssMaxBytes: number;
  rssEndBytes: number;
  wallMs: number;
  failures: Failure[];
}

export interface FuzzOptions {
  n: number;
  seed?: number;
  /** first case index (default 0) */
  start?: number;
  /** a case slower than this is a failure ('slow'); 5× this (at least 10 s) is a hang and kills the worker */
  maxMs?: number;
  /** where reproducers go (default: fuzz-failures/ in the working folder) */
  outDir?: string;
  /** heap limit of the worker, MiB */
  heapMb?: number;
  onFailure?: (f: Failure) => void;
}

export async function fuzzTarget(target: FuzzTarget, opts: FuzzOptions): Promise<FuzzStats> {
  const seed = opts.seed ?? 1;
  const maxMs = opts.maxMs ?? 2000;
  const hangMs = Math.max(10_000, 5 * maxMs);
  const outDir = resolve(opts.outDir ?? 'fuzz-failures');
  const tmp = mkdtempSync(join(tmpdir(), `sd-fuzz-${target}-`));
  const st: FuzzStats = {
    target,
    seed,
    cases: 0,
    ok: 0,
    errors: 0,
    crashes: 0,
    badMessages: 0,
    slow: 0,
    hangs: 0,
    hangRetries: 0,
    ooms: 0,
    maxMs: 0,
    maxMsCase: -1,
    maxHeapBytes: 0,
    rssStartBytes: process.memoryUsage().rss,
    rssMaxBytes: 0,
    rssEndBytes: 0,
    wallMs: 0,
    failures: [],
  };
  const t0 = performance.now();
  const start = opts.start ?? 0;
  const end = start + opts.n;
  const fail = (f: Failure) => {
    st.failures.push(f);
    opts.onFailure?.(f);
  };
  let next = start;
  const retried = new Set<number>();
  try {
    while (next < end) {
      next = await new Promise<number>((resolveRun, rejectRun) => {
        let current = -1;
        let started = false;
        let timer: NodeJS.Timeout | null = null;
        let settled = false;
        const job: WorkerJob = { target, seed, start: next, end, dir: tmp, outDir, maxMs };
        // the worker loads this TypeScript file through tsx's API (a `--import tsx` in execArgv does
        // not reach worker threads on Node 20, and under vitest there is no loader to inherit)
        const tsxApi = pathToFileURL(join(dirname(createRequire(join(ROOT, 'package.json')).resolve('tsx/package.json')), 'dist', 'esm', 'api', 'index.mjs')).href;
        const boot = `import(${JSON.stringify(tsxApi)}).then((m) => (m.tsImport ?? m.default.tsImport)(${JSON.stringify(import.meta.url)}, ${JSON.stringify(import.meta.url)}))`;
        const w = new Worker(boot, {
          eval: true,
          workerData: { fuzzJob: job },
          resourceLimits: { maxOldGenerationSizeMb: opts.heapMb ?? 1024 },
          stdout: true,
          stderr: true,
        });
        // the code under test prints nothing; keep stray worker output (yaml warnings) off the report
        w.stdout.resume();
        w.stderr.resume();
        const finish = (resumeAt: number) => {
          if (settled) return;
          settled = true;
          if (timer) clearTimeout(timer);
          void w.terminate();
          resolveRun(resumeAt);
        };
        let losing = false;
        const lost = (kind: 'hang' | 'oom' | 'crash', msg: string) => {
          if (kind === 'hang' && started && !settled && !losing && current >= 0 && !retried.has(current)) {
            // a hang is confirmed by a second run in a fresh worker (the first may have starved on a busy machine)
            retried.add(current);
            st.hangRetries++;
            if (timer) clearTimeout(timer);
            finish(current);
            return;
          }
          if (settled || losing) return;
          if (!started) {
            // the worker never ran a case: a fault of this tool or its setup, not of the code under test
            settled = true;
            if (timer) clearTimeout(timer);
            void w.terminate();
            rejectRun(new Error(`the fuzz worker for ${target} failed to start: ${msg}`));
            return;
          }
          losing = true;
          if (timer) clearTimeout(timer);
          void w.terminate();
          const i = current >= 0 ? current : next;
          st.cases++;
          if (kind === 'hang') st.hangs++;
          else if (kind === 'oom') st.ooms++;
          else st.crashes++;
          // the case is rebuilt from (target, seed, i) and kept as the reproducer
          void makeCase(target, seed, i)
            .then((cs) => {
              mkdirSync(outDir, { recursive: true });
              const repro = join(outDir, reproName(target, seed, i, cs.name));
              writeFileSync(repro, cs.bytes);
              return repro;
            })
            .catch(() => '(could not be written)')
            .then((repro) => {
              fail({ target, seed, case: i, kind, msg, repro });
              finish(i + 1);
            });
        };
        w.on('message', (m: WorkerMsg) => {
          if (m.t === 'start') {
            started = true;
            current = m.i;
            if (timer) clearTimeout(timer);
            timer = setTimeout(() => lost('hang', `no result after ${hangMs} ms`), hangMs);
            return;
          }
          if (timer) clearTimeout(timer);
          if (m.i < 0) {
            lost('crash', m.msg);
            return;
          }
          st.cases++;
          st.maxHeapBytes = Math.max(st.maxHeapBytes, m.heap);
          st.rssMaxBytes = Math.max(st.rssMaxBytes, process.memoryUsage().rss);
          if (m.ms > st.maxMs) {
            st.maxMs = m.ms;
            st.maxMsCase = m.i;
          }
          if (m.outcome === 'ok') st.ok++;
          else if (m.outcome === 'error') st.errors++;
          else {
            if (m.outcome === 'crash') st.crashes++;
            else if (m.outcome === 'badmsg') st.badMessages++;
            else st.slow++;
            fail({ target, seed, case: m.i, kind: m.outcome, msg: m.msg, repro: m.repro ?? '' });
          }
          current = -1;
          if (m.i === end - 1) finish(end);
        });
        w.on('error', (e) => {
          const oom = (e as NodeJS.ErrnoException).code === 'ERR_WORKER_OUT_OF_MEMORY';
          lost(oom ? 'oom' : 'crash', oom ? `the worker ran out of its ${opts.heapMb ?? 1024} MiB heap` : `worker error: ${(e as Error).message}`);
        });
        w.on('exit', (code) => {
          if (!settled) lost('crash', `the worker exited (status ${code}) during the case`);
        });
      });
    }
  } finally {
    st.wallMs = performance.now() - t0;
    st.rssEndBytes = process.memoryUsage().rss;
    rmSync(tmp, { recursive: true, force: true });
  }
  return st;
}

const MiB = (b: number) => `${(b / 2 ** 20).toFixed(0)} MiB`;

export function formatStats(s: FuzzStats): string {
  return (
    `${s.target.padEnd(12)} seed ${s.seed}: ${s.cases} cases, ${s.ok} ok, ${s.errors} clean errors, ${s.crashes} crashes, ${s.hangs} hangs` +
    `${s.hangRetries ? ` (${s.hangRetries} timed out once, then passed on a second run)` : ''}${s.slow ? `, ${s.slow} slow` : ''}${s.badMessages ? `, ${s.badMessages} multi-line or over-long messages` : ''}${s.ooms ? `, ${s.ooms} out-of-memory` : ''}; ` +
    `max ${s.maxMs.toFixed(0)} ms/case (case ${s.maxMsCase}), worker heap max ${MiB(s.maxHeapBytes)}, RSS ${MiB(s.rssStartBytes)} -> max ${MiB(s.rssMaxBytes)} -> ${MiB(s.rssEndBytes)}; ${(s.wallMs / 1000).toFixed(1)} s`
  );
}

// ---------------------------------------------------------------------------------------------
// CLI

function usage(): never {
  console.error('usage: npm run fuzz -- [--n 10000] [--seed S] [--target safetensors|tokenizer|config|model-config|latents|all] [--max-ms 2000] [--out fuzz-failures] [--case I]');
  process.exit(2);
}

async function cli(): Promise<number> {
  const a = process.argv.slice(2);
  let n = 1000;
  let seed = 1;
  let targets: FuzzTarget[] = [...FUZZ_TARGETS];
  let maxMs = 2000;
  let outDir = 'fuzz-failures';
  let one: number | null = null;
  const num = (v: string | undefined, flag: string): number => {
    const x = Number(v);
    if (v === undefined || !Number.isSafeInteger(x) || x < 0) {
      console.error(`fuzz: ${flag} must be an integer >= 0, got ${JSON.stringify(v)}`);
      process.exit(2);
    }
    return x;
  };
  for (let i = 0; i < a.length; i++) {
    const f = a[i]!;
    if (f === '--n') n = num(a[++i], f);
    else if (f === '--seed') seed = num(a[++i], f);
    else if (f === '--max-ms') maxMs = num(a[++i], f);
    else if (f === '--out') outDir = a[++i] ?? usage();
    else if (f === '--case') one = num(a[++i], f);
    else if (f === '--target') {
      const t = a[++i];
      if (t === 'all') targets = [...FUZZ_TARGETS];
      else if ((FUZZ_TARGETS as readonly string[]).includes(t ?? '')) targets = [t as FuzzTarget];
      else {
        console.error(`fuzz: --target must be one of ${FUZZ_TARGETS.join(', ')}, all; got ${JSON.stringify(t)}`);
        return 2;
      }
    } else usage();
  }
  if (one !== null) {
    // one case, in this process, with the full stack of whatever it throws
    let status = 0;
    for (const t of targets) {
      const c = await makeCase(t, seed, one);
      const dir = mkdtempSync(join(tmpdir(), 'sd-fuzz-one-'));
      if (t === 'model-config') prepareModelFolder(dir, await seeds());
      const t0 = performance.now();
      let err: unknown;
      try {
        await runCase(t, c, dir);
      } catch (e) {
        err = e;
      }
      const { outcome, msg } = classify(err);
      console.log(`${t} seed ${seed} case ${one} (${c.name}, ${c.bytes.length} bytes, in ${dir}): ${outcome} in ${(performance.now() - t0).toFixed(1)} ms${msg ? `: ${msg.split('\n')[0]}` : ''}`);
      if (outcome === 'crash' || outcome === 'badmsg') {
        console.log(err instanceof Error ? err.stack : err);
        status = 1;
      }
    }
    return status;
  }
  let failed = 0;
  const t0 = performance.now();
  for (const t of targets) {
    const s = await fuzzTarget(t, {
      n,
      seed,
      maxMs,
      outDir,
      onFailure: (f) => console.log(`  ${f.kind.toUpperCase()} ${f.target} seed ${f.seed} case ${f.case}: ${f.msg.split('\n')[0]}\n    reproducer: ${f.repro}; rerun: npm run fuzz -- --target ${f.target} --seed ${f.seed} --case ${f.case}`),
    });
    console.log(formatStats(s));
    failed += s.failures.length;
  }
  console.log(`${failed === 0 ? 'no failures' : `${failed} failures`} (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
  return failed === 0 ? 0 : 1;
}

if (isMainThread && process.argv[1] && /fuzz\.ts$/.test(process.argv[1])) {
  cli().then(
    (code) => {
      process.exitCode = code;
    },
    (e) => {
      console.error(`fuzz: ${(e as Error).stack ?? e}`);
      process.exitCode = 1;
    },
  );
}
