// Building the typed `Settings` (schema.ts) once, at the edge, from layers; later wins:
//   schema defaults < the model folder's smart_diffusion.json < a YAML config file < the caller's layers
// The CLI's layers are its options, then dotted `key=value` overrides (src/cli/args.ts); the API's are
// `config` (dotted keys), then its typed options (settingsForModel below). Both go through
// resolveSettings, so equal inputs give equal settings. Every value is checked on the way in
// (coerce.ts); below this folder code reads typed fields only. The dotted keys come back out for
// the sidecar and the YAML that `--print-config` prints (toDotted, settingsToYaml).

import { readFileSync, existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';
import { KEYS, SPEC_BY_KEY, SCHEMA, typeName, type Group, type KeySpec, type LoadSettings, type RequestSettings, type Settings, type SettingsPatch } from './schema.ts';
import { closestName, coerce, show, showKey, unknownKey } from './coerce.ts';
import { ConfigError } from '../util/errors.ts';

/** Checked values from one source, by dotted key; `where` names the source in errors. */
export interface Layer {
  where: string;
  values: Map<string, unknown>;
}

export function defaultSettings(): Settings {
  const s: Record<string, Record<string, unknown>> = {};
  for (const k of KEYS) (s[k.group] ??= {})[k.field] = k.default;
  return s as Settings;
}

function get(s: Settings, k: KeySpec): unknown {
  return (s[k.group] as Record<string, unknown>)[k.field];
}

/** A copy of `base` with the layers applied in order. */
export function applyLayers(base: Settings, layers: readonly Layer[]): Settings {
  const s = structuredClone(base);
  for (const l of layers)
    for (const [key, v] of l.values) {
      const k = SPEC_BY_KEY.get(key)!;
      (s[k.group] as Record<string, unknown>)[k.field] = v;
    }
  return s;
}

/** The deepest nesting of dotted keys (the schema's deepest key has 3 parts; YAML can nest without end, or in a cycle). */
const MAX_KEY_DEPTH = 8;

/** Flatten a nested object to dotted keys (a key of the schema is a leaf even when its value is an object). */
function flatten(obj: unknown, where: string, prefix = '', out: Map<string, unknown> = new Map(), depth = 0): Map<string, unknown> {
  if (obj && typeof obj === 'object' && !Array.isArray(obj)) {
    for (const [k, v] of Object.entries(obj as Record<string, unknown>)) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (v && typeof v === 'object' && !Array.isArray(v) && !ArrayBuffer.isView(v) && !SPEC_BY_KEY.has(key)) {
        // no schema key is this deep: the first unknown prefix is the error (also ends YAML alias cycles)
        if (depth + 1 >= MAX_KEY_DEPTH) throw unknownKey(key, where);
        flatten(v, where, key, out, depth + 1);
      } else out.set(key, v);
    }
  } else if (prefix) out.set(prefix, obj);
  return out;
}

/** Dotted keys, flat (`{ 'infer.seed': 7 }`) or nested (`{ infer: { seed: 7 } }`), as in YAML or the API's `config`. */
export function dottedLayer(obj: Record<string, unknown>, where: string): Layer {
  const values = new Map<string, unknown>();
  for (const [k, v] of flatten(obj, where)) {
    const spec = SPEC_BY_KEY.get(k);
    if (!spec) throw unknownKey(k, where);
    values.set(k, coerce(spec, v, false));
  }
  return { where, values };
}

/** `key=value` strings (values parsed per the key's type; Hydra's `+key=`/`++key=` accepted; YAML-style null for auto). */
export function overridesLayer(overrides: readonly string[], where = ' in the overrides'): Layer {
  const values = new Map<string, unknown>();
  for (const o of overrides) {
    const eq = o.indexOf('=');
    if (eq <= 0) throw new ConfigError(`override ${show(o)} must look like key=value (e.g. infer.diffusion.low_mem_level=2)`);
    const k = o.slice(0, eq).trim().replace(/^\+\+?/, '');
    const spec = SPEC_BY_KEY.get(k);
    if (!spec) throw unknownKey(k, where);
    values.set(k, coerce(spec, o.slice(eq + 1), true));
  }
  return { where, values };
}

const BY_FIELD: ReadonlyMap<string, KeySpec> = new Map(KEYS.map((k) => [`${k.group}.${k.field}`, k]));

/** Typed values by group and field (the API's form); undefined fields are skipped. */
export function typedLayer(patch: SettingsPatch, where: string): Layer {
  const values = new Map<string, unknown>();
  for (const [group, fields] of Object.entries(patch))
    for (const [field, v] of Object.entries((fields ?? {}) as Record<string, unknown>)) {
      if (v === undefined) continue;
      const spec = BY_FIELD.get(`${group}.${field}`);
      if (!spec) throw new ConfigError(`unknown setting ${showKey(`${group}.${field}`)}${where}; did you mean '${closestName(`${group}.${field}`, [...BY_FIELD.keys()])}'?`);
      values.set(spec.key, coerce(spec, v, false));
    }
  return { where, values };
}

/** The fields of `group` that `obj` sets (an API object may carry other things: callbacks, an engine). */
function pickFields<G extends Group>(group: G, obj: object): Partial<Settings[G]> {
  const o = obj as Record<string, unknown>;
  return Object.fromEntries(KEYS.filter((k) => k.group === group && o[k.field] !== undefined).map((k) => [k.field, o[k.field]])) as Partial<Settings[G]>;
}

/** Largest config file read (configs/wan.yaml, listing every key, is 4 KB; the yaml package takes
 * seconds on some hostile inputs of a few hundred KB, e.g. 20,000 keys or `a: a: a: ...`, ~0.25 s at 32 KB). */
export const MAX_CONFIG_BYTES = 32 * 1024;

/** The text of a small config file, or a one-line ConfigError (missing, a folder, unreadable, a symlink loop, too big). */
function readSmallFile(path: string, what: string): string {
  try {
    const st = statSync(path);
    if (st.isDirectory()) throw new ConfigError(`${what} ${path} is a folder; pass a file`);
    if (st.size > MAX_CONFIG_BYTES) throw new ConfigError(`${what} ${path} has ${st.size} bytes, more than the ${MAX_CONFIG_BYTES} accepted: is it the right file?`);
    return readFileSync(path, 'utf8');
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    const why =
      code === 'ENOENT' ? 'does not exist'
      : code === 'ELOOP' ? 'is a symlink loop (ELOOP); fix the link'
      : code === 'EACCES' || code === 'EPERM' ? 'is not readable (permission denied); fix its permissions'
      : code === 'ENOTDIR' ? 'does not exist (a part of the path is a file, not a folder)'
      : `cannot be read (${code ?? firstLine(e)})`;
    throw new ConfigError(`${what} ${path} ${why}`);
  }
}

/** A yaml / JSON parser message on one line (the yaml package adds a code frame on the next lines). */
function firstLine(e: unknown): string {
  const m = e instanceof Error ? e.message : String(e);
  if (e instanceof RangeError || /Maximum call stack/.test(m)) return 'nested too deeply';
  // the yaml package appends a code frame after the first line; JSON.parse quotes its input (newlines too)
  const l = (e instanceof SyntaxError ? m : m.split('\n')[0]!.replace(/:$/, '')).replace(/[\x00-\x1f\x7f\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  return l.length > 200 ? `${l.slice(0, 197)}...` : l;
}

/** The deepest flow nesting (`[`, `{`) accepted in a YAML config (the schema needs 3; the yaml package needs seconds and gigabytes for 10^5). */
const MAX_YAML_FLOW_DEPTH = 64;

/**
 * The deepest `[`/`{` nesting of YAML text, outside quotes and comments (an upper bound is enough:
 * this only stops hostile input before the parser sees it).
 */
function flowDepth(text: string): number {
  let depth = 0;
  let max = 0;
  let quote = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quote) {
      if (c === '\\' && quote === '"') i++;
      else if (c === quote) quote = '';
      else if (c === '\n' && quote === "'") quote = ''; // a broken single-quoted scalar: resync at the line end
    } else if (c === '"' || c === "'") quote = c;
    else if (c === '#') {
      const nl = text.indexOf('\n', i);
      i = nl < 0 ? text.length : nl;
    } else if (c === '[' || c === '{') {
      if (++depth > max) max = depth;
    } else if ((c === ']' || c === '}') && depth > 0) depth--;
  }
  return max;
}

/** Every key a YAML config file sets, checked. */
export function readConfigFile(path: string): Layer {
  const where = ` in ${path}`;
  const text = readSmallFile(path, 'config file');
  if (flowDepth(text) > MAX_YAML_FLOW_DEPTH) throw new ConfigError(`config file ${path} is not valid YAML: [ ] / { } nested more than ${MAX_YAML_FLOW_DEPTH} deep`);
  let doc: unknown;
  try {
    // maxAliasCount bounds alias expansion ("billion laughs"); duplicate keys are errors (uniqueKeys)
    doc = parseYaml(text, { maxAliasCount: 100, uniqueKeys: true, logLevel: 'error' });
  } catch (e) {
    throw new ConfigError(`config file ${path} is not valid YAML: ${firstLine(e)}`);
  }
  if (doc === null || doc === undefined) return { where, values: new Map() };
  if (typeof doc !== 'object' || Array.isArray(doc) || ArrayBuffer.isView(doc)) throw new ConfigError(`config file ${path} must be a mapping of keys, got ${show(doc, 40)}`);
  return dottedLayer(doc as Record<string, unknown>, where);
}

/**
 * The recommended settings shipped with a model folder (smart_diffusion.json, e.g. the demo model's
 * 64x64x9 and text_len 16), named by their key's last part; keys the schema does not mark
 * `fromModel` are ignored. An empty layer when the file is missing.
 */
export function modelDefaults(dir: string): Layer {
  const p = join(dir, 'smart_diffusion.json');
  const where = ` in ${p}`;
  const recipe = expertRecipe(dir);
  if (!existsSync(p)) return { where: recipe.size ? ` in ${join(dir, 'model_index.json')}` : where, values: recipe };
  const text = readSmallFile(p, "the model's recommended settings");
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(text) as Record<string, unknown>;
  } catch (e) {
    throw new ConfigError(`${p} is not valid JSON: ${firstLine(e)}`);
  }
  if (j === null || typeof j !== 'object' || Array.isArray(j)) throw new ConfigError(`${p} must be a JSON object of settings, got ${show(j, 40)}`);
  const values = recipe;
  for (const k of KEYS) {
    const name = k.key.split('.').pop()!;
    if (k.fromModel && Object.prototype.hasOwnProperty.call(j, name) && j[name] !== undefined) values.set(k.key, coerce(k, j[name], false));
  }
  return { where, values };
}

/**
 * A two-expert folder (Wan 2.2 A14B: transformer_2/ or low_noise_model/, or boundary_ratio in
 * model_index.json) brings the official recipe (wan/configs/wan_t2v_A14B.py: guidance 4.0 high /
 * 3.0 low, sample_shift 12, 40 steps) and its model_index.json's boundary_ratio, below the folder's
 * smart_diffusion.json. (diffusers' conversion writes flow_shift 3.0 into the scheduler config; the
 * official recipe samples with 12, and so does this.) Anything unreadable here is left to
 * openModelFolder, which reports it.
 */
function expertRecipe(dir: string): Map<string, unknown> {
  const values = new Map<string, unknown>();
  let index: Record<string, unknown> = {};
  try {
    const text = readSmallFile(join(dir, 'model_index.json'), 'model_index.json');
    const j = JSON.parse(text) as unknown;
    if (j && typeof j === 'object' && !Array.isArray(j)) index = j as Record<string, unknown>;
  } catch {
    // no or bad model_index.json: the folder's own check says so
  }
  const t2 = index.transformer_2;
  const twoExperts = (Array.isArray(t2) && t2[0] !== null) || typeof index.boundary_ratio === 'number' || existsSync(join(dir, 'transformer_2')) || existsSync(join(dir, 'low_noise_model'));
  if (!twoExperts) return values;
  values.set('infer.guidance_scale', 4.0);
  values.set('infer.guidance_scale_2', 3.0);
  values.set('infer.shift', 12.0);
  values.set('infer.num_inference_steps', 40);
  const br = index.boundary_ratio;
  if (typeof br === 'number' && br >= 0 && br <= 1) values.set('infer.boundary_ratio', br);
  return values;
}

export interface SettingsSources {
  /** a YAML config file, between the model folder's defaults and `layers` */
  configFile?: string | null;
  /** the caller's layers, lowest first */
  layers?: readonly Layer[];
  /** where a model path is looked up (the CLI: the working folder, then the project folder); default: as given */
  resolveModel?: (path: string) => string;
}

/** The one way settings are built (CLI and API). */
export function resolveSettings(src: SettingsSources = {}): Settings {
  const file = src.configFile ? readConfigFile(src.configFile) : null;
  // A config file lists every key (configs/wan.yaml does, at the schema defaults): only the keys it
  // sets to something else override the model folder's recommendations.
  if (file) for (const [key, v] of file.values) if (JSON.stringify(v) === JSON.stringify(SPEC_BY_KEY.get(key)!.default)) file.values.delete(key);
  const upper = [...(file ? [file] : []), ...(src.layers ?? [])];
  // the model the upper layers choose decides which folder's recommendations form the layer below them
  let model = SCHEMA.load.model.default;
  for (const l of upper) if (l.values.has('model')) model = String(l.values.get('model'));
  model = src.resolveModel ? src.resolveModel(model) : model;
  const s = applyLayers(defaultSettings(), [modelDefaults(model), ...upper]);
  s.load.model = model;
  return s;
}

/** The settings part of `WanPipeline.fromPretrained`'s options. */
export interface SettingsOptions extends Partial<Omit<LoadSettings, 'model'>> {
  /** request defaults of this pipeline (a request's own fields win), e.g. `{ numInferenceSteps: 4 }` */
  defaults?: Partial<RequestSettings>;
  /** any key by its dotted name, flat or nested (`{ 'infer.activation_dtype': 'f16' }`), below the typed fields */
  config?: Record<string, unknown>;
  /** a YAML config file (as the CLI's `--config`), below `config` */
  configFile?: string;
}

/** The API's settings: the model folder `dir`, then `options` (the same layering as the CLI). */
export function settingsForModel(dir: string, options: SettingsOptions = {}): Settings {
  const where = ' in the pipeline options';
  return resolveSettings({
    configFile: options.configFile,
    layers: [dottedLayer(options.config ?? {}, where), typedLayer({ load: { ...pickFields('load', options), model: dir }, request: pickFields('request', options.defaults ?? {}) }, where)],
  });
}

/** `base` with a request's fields (checked like every other layer). */
export function requestSettings(base: Settings, req: Partial<RequestSettings>): Settings {
  return applyLayers(base, [typedLayer({ request: pickFields('request', req) }, ' in the request')]);
}

/** The settings by dotted key, in schema order (the sidecar's `config`, the latents' metadata). */
export function toDotted(s: Settings): Record<string, unknown> {
  return Object.fromEntries(KEYS.map((k) => [k.key, get(s, k)]));
}

/** YAML of the settings, nested by dotted key (loads back with --config). */
export function settingsToYaml(s: Settings): string {
  const out: Record<string, unknown> = {};
  for (const k of KEYS) {
    const parts = k.key.split('.');
    let o = out;
    for (const p of parts.slice(0, -1)) o = (o[p] ??= {}) as Record<string, unknown>;
    o[parts[parts.length - 1]!] = get(s, k);
  }
  return stringifyYaml(out);
}

/** `--help` text: every key with its type, default and doc. */
export function helpText(): string {
  const w = Math.max(...KEYS.map((s) => s.key.length));
  return KEYS.map((s) => `  ${s.key.padEnd(w)}  ${typeName(s.type)}  (default: ${JSON.stringify(s.default)})\n  ${' '.repeat(w)}  ${s.doc}`).join('\n');
}
