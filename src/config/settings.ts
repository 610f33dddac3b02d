// Building the typed `Settings` (schema.ts) once, at the edge, from layers; later wins:
//   schema defaults < the model folder's smart_diffusion.json < a YAML config file < the caller's layers
// The CLI's layers are its options, then dotted `key=value` overrides (src/cli/args.ts); the API's are
// `config` (dotted keys), then its typed options (settingsForModel below). Both go through
// resolveSettings, so equal inputs give equal settings. Every value is checked on the way in
// (coerce.ts); below this folder code reads typed fields only. The dotted keys come back out for
// the sidecar and the YAML that `--print-config` prints (toDotted, settingsToYaml).

import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';
import { KEYS, SPEC_BY_KEY, SCHEMA, typeName, type Group, type KeySpec, type LoadSettings, type RequestSettings, type Settings, type SettingsPatch } from './schema.ts';
import { closestName, coerce, unknownKey } from './coerce.ts';
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

/** Flatten a nested object to dotted keys (a key of the schema is a leaf even when its value is an object). */
function flatten(obj: unknown, prefix = '', out: Record<string, unknown> = {}): Record<string, unknown> {
  if (obj && typeof obj === 'object' && !Array.isArray(obj)) {
    for (const [k, v] of Object.entries(obj as Record<string, unknown>)) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (v && typeof v === 'object' && !Array.isArray(v) && !SPEC_BY_KEY.has(key)) flatten(v, key, out);
      else out[key] = v;
    }
  } else if (prefix) out[prefix] = obj;
  return out;
}

/** Dotted keys, flat (`{ 'infer.seed': 7 }`) or nested (`{ infer: { seed: 7 } }`), as in YAML or the API's `config`. */
export function dottedLayer(obj: Record<string, unknown>, where: string): Layer {
  const values = new Map<string, unknown>();
  for (const [k, v] of Object.entries(flatten(obj))) {
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
    if (eq <= 0) throw new ConfigError(`override '${o}' must look like key=value (e.g. infer.diffusion.low_mem_level=2)`);
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
      if (!spec) throw new ConfigError(`unknown setting '${group}.${field}'${where}; did you mean '${closestName(`${group}.${field}`, [...BY_FIELD.keys()])}'?`);
      values.set(spec.key, coerce(spec, v, false));
    }
  return { where, values };
}

/** The fields of `group` that `obj` sets (an API object may carry other things: callbacks, an engine). */
function pickFields<G extends Group>(group: G, obj: object): Partial<Settings[G]> {
  const o = obj as Record<string, unknown>;
  return Object.fromEntries(KEYS.filter((k) => k.group === group && o[k.field] !== undefined).map((k) => [k.field, o[k.field]])) as Partial<Settings[G]>;
}

/** Every key a YAML config file sets, checked. */
export function readConfigFile(path: string): Layer {
  const where = ` in ${path}`;
  if (!existsSync(path)) throw new ConfigError(`config file ${path} does not exist`);
  let doc: unknown;
  try {
    doc = parseYaml(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new ConfigError(`config file ${path} is not valid YAML: ${(e as Error).message}`);
  }
  if (doc === null || doc === undefined) return { where, values: new Map() };
  if (typeof doc !== 'object' || Array.isArray(doc)) throw new ConfigError(`config file ${path} must be a mapping of keys`);
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
  if (!existsSync(p)) return { where, values: new Map() };
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(readFileSync(p, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new ConfigError(`${p} is not valid JSON: ${(e as Error).message}`);
  }
  const values = new Map<string, unknown>();
  for (const k of KEYS) {
    const name = k.key.split('.').pop()!;
    if (k.fromModel && j[name] !== undefined) values.set(k.key, coerce(k, j[name], false));
  }
  return { where, values };
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
