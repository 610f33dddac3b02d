// The command line of `npm run generate`: one table of switches, each mapped to schema keys (or to
// the command itself), the usage text made from that table, and the parser, which builds the
// settings through the same resolveSettings as the API (src/config/settings.ts).

import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { overridesLayer, resolveSettings } from '../config/settings.ts';
import type { Settings } from '../config/schema.ts';
import { ConfigError } from '../util/errors.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface Switch {
  /** the first one or two are shown in the usage (`-m, --model`); more are aliases */
  names: readonly string[];
  /** the value's name in the usage; absent for a flag */
  arg?: string;
  doc: string;
  /** the key it sets: to `value` (a flag), else to its argument */
  key?: string;
  value?: string;
  /** a switch that sets several keys: `key=value`s from its argument */
  expand?: (v: string) => string[];
  /** a switch of the command, not a setting */
  command?: 'help' | 'config' | 'decodeLatents' | 'printConfig' | 'debug' | 'prompts' | 'listAdapters' | 'printDevice';
}

function size(v: string): string[] {
  const m = /^(\d+)[x×](\d+)$/.exec(v);
  if (!m) throw new ConfigError(`--size must look like WIDTHxHEIGHT (e.g. 832x480), got '${v}'`);
  return [`infer.width=${m[1]}`, `infer.height=${m[2]}`];
}

export const SWITCHES: readonly Switch[] = [
  { names: ['-p', '--prompt'], arg: 'TEXT', key: 'prompt', doc: 'prompt (or the first positional argument)' },
  { names: ['-n', '--negative', '--negative-prompt'], arg: 'TEXT', key: 'negative_prompt', doc: 'negative prompt' },
  { names: ['-m', '--model'], arg: 'DIR', key: 'model', doc: 'model folder (default: the embedded demo model, weights/demo)' },
  { names: ['-c', '--config'], arg: 'FILE', command: 'config', doc: 'YAML config file (default: configs/wan.yaml)' },
  { names: ['-o', '--output'], arg: 'PATH', key: 'output.path', doc: 'output video path (.mp4); preview/sidecar/latents are written beside it' },
  { names: ['--size'], arg: 'WxH', expand: size, doc: 'width x height in pixels (multiples of 16)' },
  { names: ['--width'], arg: 'N', key: 'infer.width', doc: 'width in pixels' },
  { names: ['--height'], arg: 'N', key: 'infer.height', doc: 'height in pixels' },
  { names: ['--frames'], arg: 'N', key: 'infer.num_frames', doc: 'frames, 4k+1' },
  { names: ['--steps'], arg: 'N', key: 'infer.num_inference_steps', doc: 'denoising steps' },
  { names: ['--guidance'], arg: 'G', key: 'infer.guidance_scale', doc: 'classifier-free guidance scale' },
  { names: ['--shift'], arg: 'S', key: 'infer.shift', doc: 'flow shift' },
  { names: ['--seed'], arg: 'N', key: 'infer.seed', doc: 'seed' },
  { names: ['--sampler'], arg: 'unipc|euler', key: 'infer.sampler', doc: 'sampler' },
  { names: ['--low-mem'], arg: 'N', key: 'infer.diffusion.low_mem_level', doc: 'infer.diffusion.low_mem_level (0..3)' },
  { names: ['--attention'], arg: 'sdpa|sage', key: 'infer.attention', doc: 'self-attention kernel: exact (sdpa) or quantized int8 (sage)' },
  { names: ['--png-frames'], key: 'output.frames', value: 'true', doc: 'also write PNG frames' },
  { names: ['--decode-latents'], arg: 'FILE', command: 'decodeLatents', doc: 'decode saved latents (from an earlier run) instead of generating' },
  { names: ['--prompts'], arg: 'FILE', command: 'prompts', doc: 'a batch: one prompt per line (# comments), the model loaded once, one video per prompt' },
  { names: ['--memory-stats'], key: 'report.memory_stats', value: 'true', doc: 'print GPU memory per phase and step' },
  { names: ['--memory-snapshot'], arg: 'FILE', key: 'report.memory_snapshot', doc: 'write the memory history (FILE.json + FILE.html timeline)' },
  { names: ['--profile'], key: 'report.profile', value: 'true', doc: 'print per-kernel GPU time and phase times' },
  { names: ['--quiet'], key: 'report.progress', value: 'quiet', doc: 'no progress output' },
  { names: ['--json'], key: 'report.progress', value: 'jsonl', doc: 'JSON-lines progress on stdout' },
  { names: ['--print-config'], command: 'printConfig', doc: 'print the effective config and exit' },
  { names: ['--backend'], arg: 'NAME', key: 'device.backend', doc: 'WebGPU backend' },
  { names: ['--adapter'], arg: 'NAME', key: 'device.adapter', doc: 'WebGPU adapter (name substring)' },
  { names: ['--list-adapters'], command: 'listAdapters', doc: 'list the WebGPU adapters with their indices (for infer.diffusion.cp_devices) and exit' },
  { names: ['--print-device'], command: 'printDevice', doc: 'open the device (device.adapter / device.backend) and print what it got: f16, subgroups, subgroup matrices, limits, Dawn toggles; then exit' },
  { names: ['--debug'], command: 'debug', doc: 'on an unexpected error, print its stack trace (for bug reports)' },
  { names: ['-h', '--help'], command: 'help', doc: 'this help, with every config key' },
];

const BY_NAME: ReadonlyMap<string, Switch> = new Map(SWITCHES.flatMap((s) => s.names.map((n) => [n, s] as const)));

function usageLine(s: Switch): string {
  const short = s.names[0]!.startsWith('--') ? null : s.names[0]!;
  const long = s.names.find((n) => n.startsWith('--'))!;
  const left = `${short ? `${short}, ` : '    '}${long}${s.arg ? ` ${s.arg}` : ''}`;
  return `  ${left.padEnd(27)}${left.length >= 27 ? ' ' : ''}${s.doc}`;
}

/** The usage text; `--help` follows it with every config key (helpText). */
export function usage(): string {
  return `usage: npm run generate -- [options] ["prompt"] [key=value ...]

Generates a video from a text prompt with a Wan 2.1 text-to-video model (diffusers folder layout).
Settings come from the schema defaults, the model folder's smart_diffusion.json, the YAML config
(--config, default configs/wan.yaml), then options and dotted key=value overrides (last wins).

options:
${SWITCHES.map(usageLine).join('\n')}

config keys (key=value):
`;
}

export interface CliArgs {
  settings: Settings;
  /** the dotted keys the command line set (options and key=value overrides), e.g. whether `model` was given */
  explicit: ReadonlySet<string>;
  printConfig: boolean;
  /** --list-adapters: print the adapters dawn.node can open and exit */
  listAdapters: boolean;
  /** --print-device: open the device, print what it got and exit */
  printDevice: boolean;
  /** a latents file to decode instead of generating */
  decodeLatents: string | null;
  /** --prompts FILE: a batch, one prompt per line */
  promptsFile: string | null;
  /** --debug: stack traces of unexpected errors */
  debug: boolean;
}

/** A relative model path is looked up in the working folder, then in the project folder (the CLI's and the service worker's rule). */
export function resolveModelDir(p: string): string {
  if (existsSync(resolve(p))) return resolve(p);
  const inRoot = resolve(ROOT, p);
  return existsSync(inRoot) ? inRoot : resolve(p);
}

/** Parse the arguments and build the settings; null when `--help` was asked for. */
export function parseArgs(argv: readonly string[]): CliArgs | null {
  const options: string[] = [];
  const overrides: string[] = [];
  const positional: string[] = [];
  let configFile: string | null = null;
  let printConfig = false;
  let listAdapters = false;
  let printDevice = false;
  let decodeLatents: string | null = null;
  let promptsFile: string | null = null;
  let debug = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const s = BY_NAME.get(a);
    if (!s) {
      if (a.startsWith('-') && a.length > 1 && !/^-\d/.test(a)) throw new ConfigError(`unknown option ${a} (see --help)`);
      if (/^[A-Za-z_][\w.]*=/.test(a)) overrides.push(a);
      else positional.push(a);
      continue;
    }
    let v = '';
    if (s.arg) {
      const next = argv[++i];
      if (next === undefined) throw new ConfigError(`option ${a} needs a value (see --help)`);
      // `--seed -o x.mp4`: the value is missing, not '-o' (negative numbers stay values)
      if (BY_NAME.has(next) && !/^-\d/.test(next)) throw new ConfigError(`option ${a} needs a value before ${next} (e.g. ${a} ${s.arg ?? 'VALUE'})`);
      v = next;
    }
    if (s.command === 'help') return null;
    else if (s.command === 'config') configFile = v;
    else if (s.command === 'decodeLatents') decodeLatents = v;
    else if (s.command === 'prompts') promptsFile = v;
    else if (s.command === 'printConfig') printConfig = true;
    else if (s.command === 'listAdapters') listAdapters = true;
    else if (s.command === 'printDevice') printDevice = true;
    else if (s.command === 'debug') debug = true;
    else if (s.expand) options.push(...s.expand(v));
    else options.push(`${s.key}=${s.value ?? v}`);
  }
  if (positional.length > 1) throw new ConfigError(`one prompt expected, got ${positional.length} arguments: ${positional.map((p) => JSON.stringify(p)).join(' ')} (quote the prompt)`);
  if (promptsFile !== null && (positional.length > 0 || options.some((o) => o.startsWith('prompt=')))) throw new ConfigError('--prompts FILE takes the prompts from the file: drop the prompt on the command line (or drop --prompts)');
  if (promptsFile !== null && decodeLatents !== null) throw new ConfigError('--prompts and --decode-latents do not go together: a batch generates, --decode-latents decodes one saved run');
  if (positional.length === 1) options.push(`prompt=${positional[0]}`);
  // options < key=value overrides, whatever their order on the line
  const layers = [overridesLayer(options, ' on the command line'), overridesLayer(overrides)];
  const defaultFile = join(ROOT, 'configs', 'wan.yaml');
  const settings = resolveSettings({ configFile: configFile ?? (existsSync(defaultFile) ? defaultFile : null), layers, resolveModel: resolveModelDir });
  const explicit = new Set(layers.flatMap((l) => [...l.values.keys()]));
  return { settings, explicit, printConfig, listAdapters, printDevice, decodeLatents, promptsFile, debug };
}
