import { describe, it, expect, expectTypeOf } from 'vitest';
import { writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { applyLayers, defaultSettings, dottedLayer, overridesLayer, readConfigFile, helpText, settingsToYaml, resolveSettings, settingsForModel, requestSettings, toDotted, typedLayer, type Layer } from '../src/config/settings.ts';
import { parseArgs, SWITCHES } from '../src/cli/args.ts';
import { closestKey, parseBytes } from '../src/config/coerce.ts';
import { memoryPlan } from '../src/pipeline/memory-plan.ts';
import { KEYS, SPEC_BY_KEY, type Settings } from '../src/config/schema.ts';
import { ConfigError } from '../src/util/errors.ts';

/** the schema defaults with `layers` applied (no model folder, no config file) */
const settingsOf = (...layers: Layer[]) => applyLayers(defaultSettings(), layers);
const applyOverrides = (o: string[]) => settingsOf(overridesLayer(o));

describe('config', () => {
  it('overrides are typed and applied', () => {
    const c = applyOverrides(['infer.diffusion.low_mem_level=2', 'infer.guidance_scale=3.5', 'infer.offload_dit=true', 'prompt=a cat', 'infer.memory_limit=8GiB']);
    expect(c.load.lowMemLevel).toBe(2);
    expect(c.request.guidanceScale).toBe(3.5);
    expect(c.load.offloadDit).toBe(true);
    expect(c.request.prompt).toBe('a cat');
    expect(c.load.memoryLimit).toBe(8 * 2 ** 30);
  });
  it('unknown keys are rejected with the closest valid key', () => {
    expect(() => applyOverrides(['infer.diffusion.low_mem_lvl=2'])).toThrow(/unknown config key 'infer.diffusion.low_mem_lvl'.*did you mean 'infer.diffusion.low_mem_level'/);
    expect(closestKey('infer.guidance')).toBe('infer.guidance_scale');
    expect(closestKey('infer.num_inference_step')).toBe('infer.num_inference_steps');
    expect(closestKey('low_mem_level')).toBe('infer.diffusion.low_mem_level');
  });
  it('infer.diffusion.cp_size (context parallelism, docs/context-parallel.md) takes 1..8 devices', () => {
    expect(() => applyOverrides(['infer.diffusion.cp_size=2'])).not.toThrow();
    expect(() => applyOverrides(['infer.diffusion.cp_size=9'])).toThrow(/cp_size must be in 1\.\.8, got 9/);
  });
  it('wrong types and out-of-range values name the allowed range', () => {
    expect(() => applyOverrides(['infer.diffusion.low_mem_level=5'])).toThrow(/low_mem_level must be in 0\.\.3, got 5/);
    expect(() => applyOverrides(['infer.num_inference_steps=abc'])).toThrow(/must be an integer/);
    expect(() => applyOverrides(['infer.height=100'])).toThrow(/multiple of 16, got 100 \(nearest: 96 or 112\)/);
    expect(() => applyOverrides(['infer.num_frames=10'])).toThrow(/4k\+1.*got 10 \(nearest: 9 or 13\)/);
    expect(() => applyOverrides(['infer.sampler=ddim'])).toThrow(/one of unipc, euler/);
    expect(() => applyOverrides(['infer.offload_vae=maybe'])).toThrow(/true, false or auto/);
    expect(() => applyOverrides(['novalue'])).toThrow(/key=value/);
    expect(() => parseBytes('12 parsecs')).toThrow(ConfigError);
  });
  it('YAML files are strict too, and round-trip', () => {
    const dir = mkdtempSync(join(tmpdir(), 'sd-cfg-'));
    const p = join(dir, 'c.yaml');
    writeFileSync(p, 'infer:\n  diffusion:\n    low_mem_level: 3\n  seed: 7\noutput:\n  preview: false\n');
    const c = settingsOf(readConfigFile(p));
    expect(c.load.lowMemLevel).toBe(3);
    expect(c.request.seed).toBe(7);
    expect(c.output.preview).toBe(false);
    writeFileSync(p, 'infer:\n  sed: 7\n');
    expect(() => readConfigFile(p)).toThrow(/unknown config key 'infer.sed' in .*c\.yaml; did you mean 'infer.seed'/);
    writeFileSync(p, 'infer: [1, 2\n');
    expect(() => readConfigFile(p)).toThrow(/not valid YAML/);
    // the effective config written as YAML loads back to the same values
    const eff = applyOverrides(['infer.seed=123', 'infer.vae_tiling=false']);
    writeFileSync(p, settingsToYaml(eff));
    expect(settingsOf(readConfigFile(p))).toEqual(eff);
  });
  it('the shipped wan config is valid and complete', () => {
    const c = readConfigFile(join(__dirname, '..', 'configs', 'wan.yaml'));
    expect([...c.values.keys()].sort()).toEqual(KEYS.map((s) => s.key).sort());
  });
  it('help lists every key with type, default and doc', () => {
    const h = helpText();
    for (const s of KEYS) expect(h).toContain(s.key);
    expect(h).toMatch(/infer\.diffusion\.low_mem_level\s+int \[0\.\.3\]\s+\(default: 0\)/);
  });
  it('API objects are checked like files', () => {
    expect(() => dottedLayer({ infer: { diffusion: { low_mem_level: 9 } } }, '')).toThrow(/0\.\.3/);
  });
});

describe('memory plan', () => {
  const plan = (o: string[]) => memoryPlan(applyOverrides(o).load);
  it('levels add one measure each', () => {
    expect(plan(['infer.diffusion.low_mem_level=0'])).toMatchObject({ textEncoder: 'gpu', dit: 'resident', vae: 'resident', vaeTiling: false });
    expect(plan(['infer.diffusion.low_mem_level=1'])).toMatchObject({ textEncoder: 'gpu', dit: 'resident', vae: 'resident', vaeTiling: true });
    expect(plan(['infer.diffusion.low_mem_level=2'])).toMatchObject({ textEncoder: 'cpu', dit: 'resident', vae: 'resident', vaeTiling: true });
    expect(plan(['infer.diffusion.low_mem_level=3'])).toMatchObject({ textEncoder: 'cpu', dit: 'stream', vae: 'on-demand', vaeTiling: true });
  });
  it('VAE tile size: 0 = auto (the default), >= 4 latent px otherwise', () => {
    expect(plan(['infer.diffusion.low_mem_level=1']).tileSize).toBe(0);
    expect(plan(['infer.vae_tile_size=16']).tileSize).toBe(16);
    expect(() => plan(['infer.vae_tile_size=2'])).toThrow(/infer\.vae_tile_size=2.*at least 4/);
    expect(() => plan(['infer.vae_tile_size=-1'])).toThrow(/vae_tile_size/);
  });
  it('flags override the level either way', () => {
    expect(plan(['infer.diffusion.low_mem_level=3', 'infer.offload_dit=false', 'infer.vae_tiling=false'])).toMatchObject({ dit: 'resident', vaeTiling: false, textEncoder: 'cpu' });
    expect(plan(['infer.diffusion.low_mem_level=0', 'infer.offload_text_encoder=true', 'infer.text_encoder_device=gpu-stream'])).toMatchObject({ textEncoder: 'gpu-stream', dit: 'resident' });
  });
});

describe('settings', () => {
  /** a model folder with recommended settings (no weights: only the settings are built here) */
  const modelDir = (rec: Record<string, unknown> = { text_len: 16, height: 48, num_inference_steps: 3, guidance_scale: 3.5, fps: 8 }) => {
    const dir = mkdtempSync(join(tmpdir(), 'sd-model-'));
    writeFileSync(join(dir, 'smart_diffusion.json'), JSON.stringify(rec));
    return dir;
  };
  const yaml = (text: string) => {
    const p = join(mkdtempSync(join(tmpdir(), 'sd-cfg-')), 'c.yaml');
    writeFileSync(p, text);
    return p;
  };

  it('the CLI and the API build equal settings for equivalent inputs', () => {
    const dir = modelDir();
    const cli = parseArgs(['a cat', '-m', dir, '--low-mem', '2', '--size', '96x32', '--steps', '4', '--seed', '9', 'infer.weight_dtype=f16', 'infer.memory_limit=1GiB', 'infer.vae_tiling=false', '--profile'])!;
    const api = settingsForModel(dir, {
      lowMemLevel: 2,
      weightDtype: 'f16',
      memoryLimit: 2 ** 30,
      vaeTiling: false,
      profile: true,
      defaults: { prompt: 'a cat', width: 96, height: 32, numInferenceSteps: 4, seed: 9 },
    });
    expect(cli.settings).toEqual(api);
    // the dotted form too (the API's `config`, as a YAML file or key=value would give it)
    const dotted = settingsForModel(dir, { config: { prompt: 'a cat', infer: { diffusion: { low_mem_level: 2 }, width: 96, height: 32, num_inference_steps: 4, seed: 9, weight_dtype: 'f16', memory_limit: '1GiB', vae_tiling: false }, 'report.profile': true } });
    expect(dotted).toEqual(api);
    // and both agree with the model folder's recommendations where nothing was given
    expect(api.load.textLen).toBe(16);
    expect(api.output.fps).toBe(8);
  });

  it('layers: schema defaults < model folder < YAML < options < key=value overrides', () => {
    const dir = modelDir();
    const file = yaml(`model: ${dir}\ninfer:\n  num_inference_steps: 5\n  seed: 7\n  shift: 3\n  text_len: 512\n`);
    const s = resolveSettings({ configFile: file, layers: [overridesLayer(['infer.seed=9'])] });
    expect(s.load.model).toBe(dir); // the YAML's model chose the folder whose recommendations apply
    expect(s.request.width).toBe(64); // schema default
    expect(s.request.height).toBe(48); // model folder over the default
    expect(s.request.guidanceScale).toBe(3.5); // model folder
    expect(s.request.numInferenceSteps).toBe(5); // YAML over the model folder
    expect(s.request.shift).toBe(3); // YAML over the default
    expect(s.request.seed).toBe(9); // override over YAML
    // a YAML key at its schema default (configs/wan.yaml lists them all) leaves the model's recommendation
    expect(s.load.textLen).toBe(16);
    // the command line: options < overrides whatever their order; the positional prompt over -p
    const c = parseArgs(['-c', file, 'infer.seed=3', '--seed', '4', '-p', 'x', 'y'])!.settings;
    expect(c.request.seed).toBe(3);
    expect(c.request.prompt).toBe('y');
    expect(c.request.numInferenceSteps).toBe(5);
    // the API: `config` < typed fields; a request's fields over the pipeline's
    const a = settingsForModel(dir, { configFile: file, config: { 'infer.seed': 1, 'infer.text_encoder_device': 'gpu-stream' }, defaults: { seed: 2 } });
    expect([a.request.seed, a.load.textEncoderDevice, a.request.numInferenceSteps]).toEqual([2, 'gpu-stream', 5]);
    const r = requestSettings(a, { seed: 11, prompt: 'z' });
    expect([r.request.seed, r.request.prompt, r.request.numInferenceSteps, a.request.seed]).toEqual([11, 'z', 5, 2]);
  });

  it('values are typed: numbers are numbers, enums narrowed, bool|auto kept', () => {
    const s = parseArgs(['x', '--steps', '7', '--guidance', '2.5', 'infer.sampler=euler', 'infer.offload_dit=auto', 'infer.activation_offload=yes'])!.settings;
    expect(s.request.numInferenceSteps).toBe(7);
    expect(s.request.guidanceScale).toBe(2.5);
    expect(s.request.sampler).toBe('euler');
    expect(s.load.offloadDit).toBe('auto');
    expect(s.load.activationOffload).toBe(true);
    expectTypeOf(s.request.numInferenceSteps).toEqualTypeOf<number>();
    expectTypeOf(s.request.sampler).toEqualTypeOf<'unipc' | 'euler'>();
    expectTypeOf(s.load.weightDtype).toEqualTypeOf<'checkpoint' | 'f32' | 'f16' | 'bf16'>();
    expectTypeOf(s.load.offloadDit).toEqualTypeOf<boolean | 'auto'>();
    expectTypeOf(s.report.progress).toEqualTypeOf<'bar' | 'quiet' | 'jsonl'>();
    expectTypeOf<Settings['request']>().not.toHaveProperty('lowMemLevel');
    expectTypeOf<Settings['load']>().not.toHaveProperty('seed');
  });

  it('API values are checked like the CLI\'s', () => {
    const dir = modelDir();
    expect(() => settingsForModel(dir, { lowMemLevel: 9 })).toThrow(/infer\.diffusion\.low_mem_level must be in 0\.\.3, got 9/);
    expect(() => settingsForModel(dir, { defaults: { height: 100 } })).toThrow(/infer\.height must be a multiple of 16, got 100/);
    expect(() => requestSettings(defaultSettings(), { numFrames: 8 })).toThrow(/4k\+1.*got 8/);
    expect(() => typedLayer({ load: { lowMemLvl: 1 } as never }, ' in the pipeline options')).toThrow(/unknown setting 'load\.lowMemLvl' in the pipeline options; did you mean 'load\.lowMemLevel'/);
  });

  it('the command line says which keys it set (the decode-latents path keeps those over the latents file)', () => {
    expect([...parseArgs(['--decode-latents', 'l.safetensors', '-m', 'weights/demo'])!.explicit]).toEqual(['model']);
    expect(parseArgs(['x', 'model=weights/demo'])!.explicit.has('model')).toBe(true);
    const e = parseArgs(['x', '--size', '32x48', '--quiet'])!.explicit;
    expect([...e].sort()).toEqual(['infer.height', 'infer.width', 'prompt', 'report.progress']);
    expect(parseArgs(['--help', '--bogus'])).toBeNull();
    expect(() => parseArgs(['--bogus'])).toThrow(/unknown option --bogus/);
    expect(() => parseArgs(['--seed'])).toThrow(/option --seed needs a value/);
    expect(() => parseArgs(['--size', '64'])).toThrow(/--size must look like WIDTHxHEIGHT/);
  });

  it('one description: fields follow the keys, switches name schema keys, the dotted form has every key', () => {
    const camel = (k: string) => k.split('.').pop()!.replace(/_(\w)/g, (_, c: string) => c.toUpperCase());
    for (const k of KEYS) expect(k.field, k.key).toBe(camel(k.key));
    for (const sw of SWITCHES) {
      if (sw.key) expect(SPEC_BY_KEY.has(sw.key), sw.names[0]).toBe(true);
      expect(Boolean(sw.key) || Boolean(sw.expand) || Boolean(sw.command), sw.names[0]).toBe(true);
    }
    const s = defaultSettings();
    const d = toDotted(s);
    expect(Object.keys(d)).toEqual(KEYS.map((k) => k.key));
    expect(d['infer.diffusion.low_mem_level']).toBe(0);
    expect(settingsOf(dottedLayer(d, ''))).toEqual(s);
  });
});

describe('config: hostile input is a one-line ConfigError in bounded time', () => {
  const dir = mkdtempSync(join(tmpdir(), 'sd-cfg-bad-'));
  /** the ConfigError `fn` throws (one line), within `ms` */
  const cfgErr = (fn: () => unknown, ms = 2000): string => {
    const t0 = performance.now();
    let err: unknown;
    try {
      fn();
    } catch (e) {
      err = e;
    }
    expect(performance.now() - t0).toBeLessThan(ms);
    expect(err).toBeInstanceOf(ConfigError);
    const m = (err as Error).message;
    expect(m.split('\n')).toHaveLength(1);
    return m;
  };
  const yamlFile = (name: string, text: string | Buffer) => {
    const p = join(dir, name);
    writeFileSync(p, text);
    return p;
  };
  it('YAML syntax errors keep to one line (no code frame)', () => {
    expect(cfgErr(() => readConfigFile(yamlFile('a.yaml', 'infer: [1, 2\n  x: y\n')))).toMatch(/not valid YAML: .*line/);
    expect(cfgErr(() => readConfigFile(yamlFile('dup.yaml', 'infer:\n  seed: 1\n  seed: 2\n')))).toMatch(/Map keys must be unique/);
    expect(cfgErr(() => readConfigFile(yamlFile('alias.yaml', 'infer: *nope\n')))).toMatch(/not valid YAML: Unresolved alias/);
  });
  it('alias bombs ("billion laughs") stop at maxAliasCount', () => {
    let y = 'a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n';
    for (let i = 1; i < 10; i++) y += `a${i}: &a${i} [${Array(10).fill(`*a${i - 1}`).join(', ')}]\n`;
    expect(cfgErr(() => readConfigFile(yamlFile('bomb.yaml', y)))).toMatch(/not valid YAML: .*(alias|Excessive)/i);
  });
  it('deeply nested and cyclic YAML', () => {
    expect(cfgErr(() => readConfigFile(yamlFile('deep.yaml', '['.repeat(30000))))).toMatch(/not valid YAML: .* nested more than 64 deep/);
    expect(cfgErr(() => readConfigFile(yamlFile('deepmap.yaml', 'a: '.repeat(1) + '{a: '.repeat(2000) + '1' + '}'.repeat(2000))))).toMatch(/not valid YAML|unknown config key/);
    expect(cfgErr(() => readConfigFile(yamlFile('cycle.yaml', 'infer: &x {diffusion: *x}\n')))).toMatch(/unknown config key 'infer\.diffusion\.diffusion/);
    expect(cfgErr(() => readConfigFile(yamlFile('cyclev.yaml', 'infer:\n  seed: &x [*x]\n')))).toMatch(/infer.seed must be an integer, got \[a cyclic list\]/);
  });
  it('non-mapping documents, binary, huge numbers, odd keys', () => {
    expect(cfgErr(() => readConfigFile(yamlFile('list.yaml', '- 1\n- 2\n')))).toMatch(/must be a mapping of keys/);
    expect(cfgErr(() => readConfigFile(yamlFile('bin.yaml', '!!binary aGVsbG8=\n')))).toMatch(/must be a mapping of keys/);
    expect(cfgErr(() => readConfigFile(yamlFile('rand.bin', Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 7919 + 13) % 256)))))).toMatch(/c|./);
    expect(cfgErr(() => readConfigFile(yamlFile('big.yaml', 'infer:\n  seed: 1e999\n')))).toMatch(/infer.seed must be an integer, got Infinity/);
    expect(cfgErr(() => readConfigFile(yamlFile('nl.yaml', '"a\\nb": 1\n')))).toMatch(/unknown config key "a\\nb" in/);
    expect(cfgErr(() => readConfigFile(yamlFile('proto.yaml', '__proto__: {infer: 1}\n')))).toMatch(/unknown config key '__proto__\.infer'/);
    expect(cfgErr(() => readConfigFile(join(dir, 'missing.yaml')))).toMatch(/does not exist/);
    expect(cfgErr(() => readConfigFile(dir))).toMatch(/is a folder/);
    expect(cfgErr(() => readConfigFile(yamlFile('huge.yaml', Buffer.alloc(2 * 1024 * 1024, 0x20))))).toMatch(/more than the 32768 accepted/);
  });
  it('key=value overrides: huge numbers, odd unicode, NUL, huge keys', () => {
    expect(cfgErr(() => applyOverrides(['infer.seed=' + '9'.repeat(400)]))).toMatch(/infer.seed must be/);
    expect(cfgErr(() => applyOverrides(['infer.memory_limit=' + '9'.repeat(400) + 'GiB']))).toMatch(/memory_limit must be a byte size/);
    expect(cfgErr(() => applyOverrides(['infer.memory_limit=99999999TiB']))).toMatch(/below 8 PiB/);
    expect(cfgErr(() => applyOverrides(['infer.see\u202ed=1']))).toMatch(/unknown config key "infer.see\\u202ed"/);
    expect(cfgErr(() => applyOverrides(['\ud800=1']))).toMatch(/unknown config key/);
    expect(cfgErr(() => applyOverrides(['model=a\0b']))).toMatch(/must not contain a NUL character/);
    const m = cfgErr(() => applyOverrides(['x'.repeat(1_000_000) + '=1']));
    expect(m.length).toBeLessThan(400);
    expect(cfgErr(() => applyOverrides(['=1']))).toMatch(/must look like key=value/);
    expect(cfgErr(() => applyOverrides(['a\nb']))).toMatch(/override "a\\nb" must look like/);
  });
});
