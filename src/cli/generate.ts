// `npm run generate -- [options] ["prompt"] [key=value ...]`  — see `--help`.
// Exit status: 0 done, 1 runtime error, 2 bad usage/config, 3 no WebGPU adapter, 4 out of GPU
// memory, 5 bad model/checkpoint, 6 output error, 130 interrupted.

import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { defaultConfig, applyOverrides, applyObject, loadConfigFile, helpText, configToYaml, type FlatConfig } from '../config/config.ts';
import { WanPipeline, modelDefaults, type GenerateResult, type ProgressEvent, type Latents } from '../pipeline/wan-pipeline.ts';
import { resolveOutputPath, outputPaths, checkWritable, saveLatents, loadLatents, writeVideoOutputs, writeSidecar } from '../pipeline/outputs.ts';
import { Progress, type ProgressMode } from './progress.ts';
import { takeSnapshot, renderSnapshotHtml } from '../memory/snapshot.ts';
import { writeFileAtomic } from '../io/atomic.ts';
import { SmartDiffusionError, ConfigError, fmtBytes } from '../util/errors.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

const USAGE = `usage: npm run generate -- [options] ["prompt"] [key=value ...]

Generates a video from a text prompt with a Wan 2.1 text-to-video model (diffusers folder layout).
Settings come from the schema defaults, the model folder's smart_diffusion.json, the YAML config
(--config, default configs/wan.yaml), then options and dotted key=value overrides (last wins).

options:
  -p, --prompt TEXT          prompt (or the first positional argument)
  -n, --negative TEXT        negative prompt
  -m, --model DIR            model folder (default: the embedded demo model, weights/demo)
  -c, --config FILE          YAML config file (default: configs/wan.yaml)
  -o, --output PATH          output video path (.mp4); preview/sidecar/latents are written beside it
      --size WxH             width x height in pixels (multiples of 16)
      --frames N             frames, 4k+1
      --steps N              denoising steps
      --guidance G           classifier-free guidance scale
      --shift S              flow shift
      --seed N               seed
      --sampler unipc|euler
      --low-mem N            infer.diffusion.low_mem_level (0..3)
      --png-frames           also write PNG frames
      --decode-latents FILE  decode saved latents (from an earlier run) instead of generating
      --memory-stats         print GPU memory per phase and step
      --memory-snapshot FILE write the memory history (FILE.json + FILE.html timeline)
      --profile              print per-kernel GPU time and phase times
      --quiet | --json       no progress output | JSON-lines progress on stdout
      --print-config         print the effective config and exit
      --backend NAME, --adapter NAME   WebGPU backend / adapter
  -h, --help                 this help, with every config key

config keys (key=value):
`;

interface Cli {
  cfg: FlatConfig;
  printConfig: boolean;
  decodeLatents: string | null;
  progress: ProgressMode;
}

function parseArgs(argv: string[]): Cli | null {
  const opts: Record<string, unknown> = {};
  const overrides: string[] = [];
  let configFile: string | null = null;
  let printConfig = false;
  let decodeLatents: string | null = null;
  let progress: ProgressMode | null = null;
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const val = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new ConfigError(`option ${a} needs a value (see --help)`);
      return v;
    };
    switch (a) {
      case '-h':
      case '--help':
        process.stdout.write(USAGE + helpText() + '\n');
        return null;
      case '-p':
      case '--prompt':
        opts['prompt'] = val();
        break;
      case '-n':
      case '--negative':
      case '--negative-prompt':
        opts['negative_prompt'] = val();
        break;
      case '-m':
      case '--model':
        opts['model'] = val();
        break;
      case '-c':
      case '--config':
        configFile = val();
        break;
      case '-o':
      case '--output':
        opts['output.path'] = val();
        break;
      case '--size': {
        const v = val();
        const m = /^(\d+)[x×](\d+)$/.exec(v);
        if (!m) throw new ConfigError(`--size must look like WIDTHxHEIGHT (e.g. 832x480), got '${v}'`);
        overrides.push(`infer.width=${m[1]}`, `infer.height=${m[2]}`);
        break;
      }
      case '--height':
        overrides.push(`infer.height=${val()}`);
        break;
      case '--width':
        overrides.push(`infer.width=${val()}`);
        break;
      case '--frames':
        overrides.push(`infer.num_frames=${val()}`);
        break;
      case '--steps':
        overrides.push(`infer.num_inference_steps=${val()}`);
        break;
      case '--guidance':
        overrides.push(`infer.guidance_scale=${val()}`);
        break;
      case '--shift':
        overrides.push(`infer.shift=${val()}`);
        break;
      case '--seed':
        overrides.push(`infer.seed=${val()}`);
        break;
      case '--sampler':
        overrides.push(`infer.sampler=${val()}`);
        break;
      case '--low-mem':
        overrides.push(`infer.diffusion.low_mem_level=${val()}`);
        break;
      case '--png-frames':
        overrides.push('output.frames=true');
        break;
      case '--decode-latents':
        decodeLatents = val();
        break;
      case '--memory-stats':
        overrides.push('report.memory_stats=true');
        break;
      case '--memory-snapshot':
        opts['report.memory_snapshot'] = val();
        break;
      case '--profile':
        overrides.push('report.profile=true');
        break;
      case '--quiet':
        progress = 'quiet';
        break;
      case '--json':
        progress = 'jsonl';
        break;
      case '--print-config':
        printConfig = true;
        break;
      case '--backend':
        opts['device.backend'] = val();
        break;
      case '--adapter':
        opts['device.adapter'] = val();
        break;
      default:
        if (a.startsWith('-') && a.length > 1 && !/^-\d/.test(a)) throw new ConfigError(`unknown option ${a} (see --help)`);
        if (/^[A-Za-z_][\w.]*=/.test(a)) overrides.push(a);
        else positional.push(a);
    }
  }
  if (positional.length > 1) throw new ConfigError(`one prompt expected, got ${positional.length} arguments: ${positional.map((p) => JSON.stringify(p)).join(' ')} (quote the prompt)`);
  if (positional.length === 1) opts['prompt'] = positional[0];
  // layering: defaults < model defaults < config file < options < overrides
  const cfg = defaultConfig();
  const modelDir = resolveModelDir(String(opts['model'] ?? cfg['model']), configFile);
  if (existsSync(modelDir)) applyObject(cfg, modelDefaults(modelDir), ` in ${join(modelDir, 'smart_diffusion.json')}`);
  const cfgPath = configFile ?? join(ROOT, 'configs', 'wan.yaml');
  if (configFile || existsSync(cfgPath)) {
    const fileCfg = loadConfigFile(cfgPath, defaultConfig());
    // only keys the file sets differently from the schema defaults override the model defaults
    const base = defaultConfig();
    for (const [k, v] of Object.entries(fileCfg)) if (JSON.stringify(v) !== JSON.stringify(base[k])) cfg[k] = v;
  }
  applyObject(cfg, opts, ' on the command line');
  applyOverrides(cfg, overrides);
  cfg['model'] = resolveModelDir(String(cfg['model']), configFile);
  return { cfg, printConfig, decodeLatents, progress: progress ?? (cfg['report.progress'] as ProgressMode) };
}

/** A relative model path is looked up in the working folder, then in the project folder. */
function resolveModelDir(p: string, _configFile: string | null): string {
  if (existsSync(resolve(p))) return resolve(p);
  const inRoot = resolve(ROOT, p);
  return existsSync(inRoot) ? inRoot : resolve(p);
}

function exitCodeOf(err: unknown): number {
  if (!(err instanceof SmartDiffusionError)) return 1;
  switch (err.code) {
    case 'BAD_CONFIG':
      return 2;
    case 'NO_ADAPTER':
      return 3;
    case 'OUT_OF_MEMORY':
      return 4;
    case 'BAD_CHECKPOINT':
      return 5;
    case 'OUTPUT_ERROR':
      return 6;
    case 'INTERRUPTED':
      return 130;
    default:
      return 1;
  }
}

async function main(): Promise<number> {
  let cli: Cli | null;
  try {
    cli = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`error: ${(e as Error).message}`);
    return exitCodeOf(e);
  }
  if (!cli) return 0;
  const { cfg } = cli;
  if (cli.printConfig) {
    process.stdout.write(configToYaml(cfg));
    return 0;
  }
  const progress = new Progress(cli.progress);
  const abort = new AbortController();
  let interrupts = 0;
  const onSignal = (sig: string) => {
    interrupts++;
    if (interrupts > 1) {
      console.error(`\n${sig} again: exiting now (no partial output was written)`);
      process.exit(130);
    }
    console.error(`\n${sig}: stopping after the current step (Ctrl-C again to quit at once)...`);
    abort.abort();
  };
  process.on('SIGINT', () => onSignal('SIGINT'));
  process.on('SIGTERM', () => onSignal('SIGTERM'));

  let pipe: WanPipeline | null = null;
  try {
    let latents: Latents | null = null;
    let meta: Record<string, unknown> = {};
    if (cli.decodeLatents) {
      const l = await loadLatents(resolve(cli.decodeLatents));
      latents = l.latents;
      meta = l.meta;
      if (meta.model && typeof meta.model === 'string' && !process.argv.some((a) => a === '-m' || a === '--model' || a.startsWith('model='))) cfg['model'] = meta.model;
      if (!cfg['prompt'] && typeof meta.prompt === 'string') cfg['prompt'] = meta.prompt;
      if (typeof meta.seed === 'number') cfg['infer.seed'] = meta.seed;
    } else if (!String(cfg['prompt']).trim()) {
      throw new ConfigError('no prompt: pass one, e.g. npm run generate -- "a red circle moving right on a black background"');
    }
    const videoPath = cli.decodeLatents
      ? resolve(String(cfg['output.path']).includes('{') ? cli.decodeLatents.replace(/\.latents\.safetensors$/, '') + '.mp4' : String(cfg['output.path']))
      : resolveOutputPath(String(cfg['output.path']), String(cfg['prompt']), Number(cfg['infer.seed']));
    const paths = outputPaths(videoPath);
    checkWritable(paths.video);
    const recordMemory = Boolean(cfg['report.memory_snapshot']);
    const memStats = Boolean(cfg['report.memory_stats']);
    const onProgress = (ev: ProgressEvent) => {
      progress.event(ev);
      if (memStats && ev.type === 'memory' && cli!.progress !== 'jsonl') {
        progress.info(
          `  memory ${ev.phase}${ev.step ? ` step ${ev.step}` : ''}: allocated ${fmtBytes(ev.allocated)}, reserved ${fmtBytes(ev.reserved)}, peak allocated ${fmtBytes(ev.peakAllocated)}, peak reserved ${fmtBytes(ev.peakReserved)}`,
        );
      }
    };
    progress.record({ event: 'start', model: cfg['model'], output: paths.video }, `model ${cfg['model']}`);
    const tLoad = performance.now();
    pipe = await WanPipeline.fromPretrained(String(cfg['model']), { config: cfg, recordMemory, onProgress });
    const loadMs = performance.now() - tLoad;
    progress.record(
      { event: 'loaded', ms: loadMs, adapter: pipe.engine.adapterName, plan: pipe.plan },
      `loaded in ${(loadMs / 1000).toFixed(1)} s on ${pipe.engine.adapterName}; memory level ${pipe.plan.level} (text encoder: ${pipe.plan.textEncoder}, DiT: ${pipe.plan.dit}, VAE: ${pipe.plan.vae}${pipe.plan.vaeTiling ? `, tiled ${pipe.plan.tileSize || 'auto'}` : ''})`,
    );
    const result: Partial<GenerateResult> = { timingsMs: { load: loadMs } };
    const req = {
      prompt: String(cfg['prompt']),
      negativePrompt: String(cfg['negative_prompt']),
      onProgress,
      signal: abort.signal,
    };
    if (!latents) {
      latents = await pipe.sample(req, result);
      if (cfg['output.save_latents']) {
        progress.event({ type: 'phase', phase: 'write', detail: paths.latents });
        await saveLatents(paths.latents, latents, { model: cfg['model'], prompt: cfg['prompt'], seed: cfg['infer.seed'], config: cfg });
      }
    } else {
      result.config = pipe.resolveRequest(req);
    }
    const dec = await pipe.decode(latents, { onProgress, signal: abort.signal, result });
    progress.event({ type: 'phase', phase: 'write', detail: paths.video });
    const tw = performance.now();
    const written = await writeVideoOutputs(paths, dec.video, dec.shape, {
      mp4: Boolean(cfg['output.mp4']),
      preview: Boolean(cfg['output.preview']),
      frames: Boolean(cfg['output.frames']),
      fps: Number(cfg['infer.fps']),
    });
    result.timingsMs!.write = performance.now() - tw;
    const mem = result.memory!;
    const phases = Object.values(mem.perPhase);
    const sidecar = {
      tool: 'smart-diffusion',
      created: new Date().toISOString(),
      prompt: cfg['prompt'],
      negative_prompt: cfg['negative_prompt'],
      seed: cfg['infer.seed'],
      model: { path: cfg['model'], transformer: pipe.folder.transformer.config, vae_base_dim: pipe.folder.vae.config.base_dim, text_encoder_d_model: pipe.folder.textEncoder.config.d_model },
      video: { path: written.includes(paths.video) ? paths.video : null, frames: dec.shape[1], height: dec.shape[2], width: dec.shape[3], fps: cfg['infer.fps'] },
      latents: cfg['output.save_latents'] && !cli.decodeLatents ? paths.latents : cli.decodeLatents,
      adapter: pipe.engine.adapterName,
      memory_plan: pipe.plan,
      timings_ms: result.timingsMs,
      memory: {
        peak_allocated_bytes: Math.max(0, ...phases.map((p) => p.peakAllocated)),
        peak_reserved_bytes: Math.max(0, ...phases.map((p) => p.peakReserved)),
        per_phase: mem.perPhase,
        per_step: mem.perStep,
      },
      uploads: result.uploads ?? null,
      config: cfg,
    };
    if (cfg['output.sidecar']) {
      await writeSidecar(paths.sidecar, sidecar);
      written.push(paths.sidecar);
    }
    if (recordMemory) {
      const snapPath = resolve(String(cfg['report.memory_snapshot']));
      const snap = takeSnapshot(pipe.engine.allocator, pipe.engine.adapterName);
      const jsonPath = snapPath.endsWith('.json') ? snapPath : `${snapPath}.json`;
      const htmlPath = jsonPath.replace(/\.json$/, '.html');
      await writeFileAtomic(jsonPath, JSON.stringify(snap));
      await writeFileAtomic(htmlPath, renderSnapshotHtml(snap, { title: `GPU memory: ${String(cfg['prompt']).slice(0, 60)} (level ${pipe.plan.level})` }));
      written.push(jsonPath, htmlPath);
    }
    if (cfg['report.profile']) {
      await pipe.engine.sync();
      const lines = ['', 'kernels (GPU time from timestamp queries):', pipe.engine.profile.table(), '', 'phases (wall ms):'];
      for (const [k, v] of Object.entries(result.timingsMs!)) lines.push(`  ${k.padEnd(8)} ${v.toFixed(0).padStart(9)}`);
      if (result.uploads) {
        const u = result.uploads;
        const hidden = u.uploadMs - u.exposedMs;
        lines.push(
          '',
          `DiT block streaming: ${u.uploads} uploads, ${fmtBytes(u.bytes)} in ${u.uploadMs.toFixed(0)} ms on the main thread (${((u.bytes / Math.max(1e-9, u.uploadMs)) / 1e6).toFixed(2)} GB/s);`,
          `  ${u.prefetched} prefetched (copied while the GPU still had the previous blocks queued): ${hidden.toFixed(0)} ms of the copying ran ahead of need, ${u.exposedMs.toFixed(0)} ms while the denoise loop waited for that block;`,
          `  acquire() waited ${u.stallMs.toFixed(0)} ms in all (mostly the GPU finishing the previous block, not upload time); the end-to-end cost of streaming is the denoise time against level 0 (npm run bench:memory)`,
        );
        lines.push(`  GPU compute (sum of kernel times): ${pipe.engine.profile.totalMs().toFixed(0)} ms`);
      }
      if (cli.progress === 'jsonl') progress.record({ event: 'profile', kernels: pipe.engine.profile.rows(), timings: result.timingsMs, uploads: result.uploads ?? null });
      else process.stderr.write(lines.join('\n') + '\n');
    }
    const peak = sidecar.memory.peak_allocated_bytes;
    progress.record(
      { event: 'done', files: written, timings_ms: result.timingsMs, peak_allocated_bytes: peak },
      `done: ${written.join(', ')}\n  timings ${Object.entries(result.timingsMs!)
        .map(([k, v]) => `${k} ${(v / 1000).toFixed(1)} s`)
        .join(', ')}; peak GPU memory ${fmtBytes(peak)} allocated, ${fmtBytes(sidecar.memory.peak_reserved_bytes)} reserved`,
    );
    return 0;
  } catch (e) {
    const code = exitCodeOf(e);
    if (cli.progress === 'jsonl') process.stdout.write(JSON.stringify({ event: 'error', code: (e as SmartDiffusionError).code ?? 'ERROR', message: (e as Error).message }) + '\n');
    if (e instanceof SmartDiffusionError) console.error(`\nerror: ${e.message}`);
    else console.error(e);
    return code;
  } finally {
    pipe?.dispose();
  }
}

main().then((code) => {
  process.exitCode = code;
});

