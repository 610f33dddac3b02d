import { describe, it, expect } from 'vitest';
import { writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defaultConfig, applyOverrides, loadConfigFile, closestKey, parseBytes, helpText, configToYaml, applyObject } from '../src/config/config.ts';
import { memoryPlan } from '../src/pipeline/memory-plan.ts';
import { SCHEMA } from '../src/config/schema.ts';
import { ConfigError } from '../src/util/errors.ts';

describe('config', () => {
  it('overrides are typed and applied', () => {
    const c = applyOverrides(defaultConfig(), ['infer.diffusion.low_mem_level=2', 'infer.guidance_scale=3.5', 'infer.offload_dit=true', 'prompt=a cat', 'infer.memory_limit=8GiB']);
    expect(c['infer.diffusion.low_mem_level']).toBe(2);
    expect(c['infer.guidance_scale']).toBe(3.5);
    expect(c['infer.offload_dit']).toBe(true);
    expect(c['prompt']).toBe('a cat');
    expect(c['infer.memory_limit']).toBe(8 * 2 ** 30);
  });
  it('unknown keys are rejected with the closest valid key', () => {
    expect(() => applyOverrides(defaultConfig(), ['infer.diffusion.low_mem_lvl=2'])).toThrow(/unknown config key 'infer.diffusion.low_mem_lvl'.*did you mean 'infer.diffusion.low_mem_level'/);
    expect(closestKey('infer.guidance')).toBe('infer.guidance_scale');
    expect(closestKey('infer.num_inference_step')).toBe('infer.num_inference_steps');
    expect(closestKey('low_mem_level')).toBe('infer.diffusion.low_mem_level');
  });
  it('wrong types and out-of-range values name the allowed range', () => {
    expect(() => applyOverrides(defaultConfig(), ['infer.diffusion.low_mem_level=5'])).toThrow(/low_mem_level must be in 0\.\.3, got 5/);
    expect(() => applyOverrides(defaultConfig(), ['infer.num_inference_steps=abc'])).toThrow(/must be an integer/);
    expect(() => applyOverrides(defaultConfig(), ['infer.height=100'])).toThrow(/multiple of 16, got 100 \(nearest: 96 or 112\)/);
    expect(() => applyOverrides(defaultConfig(), ['infer.num_frames=10'])).toThrow(/4k\+1.*got 10 \(nearest: 9 or 13\)/);
    expect(() => applyOverrides(defaultConfig(), ['infer.sampler=ddim'])).toThrow(/one of unipc, euler/);
    expect(() => applyOverrides(defaultConfig(), ['infer.offload_vae=maybe'])).toThrow(/true, false or auto/);
    expect(() => applyOverrides(defaultConfig(), ['novalue'])).toThrow(/key=value/);
    expect(() => parseBytes('12 parsecs')).toThrow(ConfigError);
  });
  it('YAML files are strict too, and round-trip', () => {
    const dir = mkdtempSync(join(tmpdir(), 'sd-cfg-'));
    const p = join(dir, 'c.yaml');
    writeFileSync(p, 'infer:\n  diffusion:\n    low_mem_level: 3\n  seed: 7\noutput:\n  preview: false\n');
    const c = loadConfigFile(p);
    expect(c['infer.diffusion.low_mem_level']).toBe(3);
    expect(c['infer.seed']).toBe(7);
    expect(c['output.preview']).toBe(false);
    writeFileSync(p, 'infer:\n  sed: 7\n');
    expect(() => loadConfigFile(p)).toThrow(/unknown config key 'infer.sed' in .*c\.yaml; did you mean 'infer.seed'/);
    writeFileSync(p, 'infer: [1, 2\n');
    expect(() => loadConfigFile(p)).toThrow(/not valid YAML/);
    // the effective config written as YAML loads back to the same values
    const eff = applyOverrides(defaultConfig(), ['infer.seed=123', 'infer.vae_tiling=false']);
    writeFileSync(p, configToYaml(eff));
    expect(loadConfigFile(p)).toEqual(eff);
  });
  it('the shipped wan config is valid and complete', () => {
    const c = loadConfigFile(join(__dirname, '..', 'configs', 'wan.yaml'));
    expect(Object.keys(c).sort()).toEqual(SCHEMA.map((s) => s.key).sort());
  });
  it('help lists every key with type, default and doc', () => {
    const h = helpText();
    for (const s of SCHEMA) expect(h).toContain(s.key);
    expect(h).toMatch(/infer\.diffusion\.low_mem_level\s+int \[0\.\.3\]\s+\(default: 0\)/);
  });
  it('API objects are checked like files', () => {
    expect(() => applyObject(defaultConfig(), { infer: { diffusion: { low_mem_level: 9 } } })).toThrow(/0\.\.3/);
  });
});

describe('memory plan', () => {
  const plan = (o: string[]) => memoryPlan(applyOverrides(defaultConfig(), o));
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
