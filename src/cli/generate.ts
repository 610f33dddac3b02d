// `npm run generate -- [options] ["prompt"] [key=value ...]`  — see `--help` (src/cli/args.ts).
// Exit status: 0 done, 1 runtime error, 2 bad usage/config, 3 no WebGPU adapter, 4 out of GPU
// memory, 5 bad model/checkpoint, 6 output error, 130 interrupted.

import { resolve } from 'node:path';
import { parseArgs, usage, type CliArgs } from './args.ts';
import { helpText, settingsToYaml, toDotted } from '../config/settings.ts';
import { WanPipeline, type GenerateResult, type ProgressEvent, type Latents } from '../pipeline/wan-pipeline.ts';
import { resolveOutputPath, outputPaths, checkWritable, saveLatents, loadLatents, writeVideoOutputs, writeSidecar } from '../pipeline/outputs.ts';
import { sidecar, memoryLine, loadedLine, doneLine, profileText, profileRecord, writeMemorySnapshot, runPeaks } from '../pipeline/report.ts';
import { Progress } from './progress.ts';
import { SmartDiffusionError, ConfigError } from '../util/errors.ts';

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
  let cli: CliArgs | null;
  try {
    cli = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`error: ${(e as Error).message}`);
    return exitCodeOf(e);
  }
  if (!cli) {
    process.stdout.write(usage() + helpText() + '\n');
    return 0;
  }
  const { settings } = cli;
  const req = settings.request;
  if (cli.printConfig) {
    process.stdout.write(settingsToYaml(settings));
    return 0;
  }
  const mode = settings.report.progress;
  const progress = new Progress(mode);
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
    if (cli.decodeLatents) {
      // the latents file names the run that made them: its model (unless given here), prompt (unless given) and seed
      const l = await loadLatents(resolve(cli.decodeLatents));
      latents = l.latents;
      const meta = l.meta;
      if (typeof meta.model === 'string' && meta.model && !cli.explicit.has('model')) settings.load.model = meta.model;
      if (!req.prompt && typeof meta.prompt === 'string') req.prompt = meta.prompt;
      if (typeof meta.seed === 'number') req.seed = meta.seed;
    } else if (!req.prompt.trim()) {
      throw new ConfigError('no prompt: pass one, e.g. npm run generate -- "a red circle moving right on a black background"');
    }
    const out = settings.output;
    const videoPath = cli.decodeLatents
      ? resolve(out.path.includes('{') ? cli.decodeLatents.replace(/\.latents\.safetensors$/, '') + '.mp4' : out.path)
      : resolveOutputPath(out.path, req.prompt, req.seed);
    const paths = outputPaths(videoPath);
    checkWritable(paths.video);
    const onProgress = (ev: ProgressEvent) => {
      progress.event(ev);
      if (settings.report.memoryStats && ev.type === 'memory' && mode !== 'jsonl') progress.info(memoryLine(ev));
    };
    progress.record({ event: 'start', model: settings.load.model, output: paths.video }, `model ${settings.load.model}`);
    const tLoad = performance.now();
    pipe = await WanPipeline.fromSettings(settings, { recordMemory: Boolean(settings.report.memorySnapshot), onProgress });
    const loadMs = performance.now() - tLoad;
    progress.record({ event: 'loaded', ms: loadMs, adapter: pipe.engine.adapterName, plan: pipe.plan }, loadedLine(pipe, loadMs));
    const result: Partial<GenerateResult> = { timingsMs: { load: loadMs } };
    if (!latents) {
      latents = await pipe.sample({ prompt: req.prompt, negativePrompt: req.negativePrompt, onProgress, signal: abort.signal }, result);
      if (out.saveLatents) {
        progress.event({ type: 'phase', phase: 'write', detail: paths.latents });
        await saveLatents(paths.latents, latents, { model: settings.load.model, prompt: req.prompt, seed: req.seed, config: toDotted(settings) });
      }
    }
    const dec = await pipe.decode(latents, { onProgress, signal: abort.signal, result });
    progress.event({ type: 'phase', phase: 'write', detail: paths.video });
    const tw = performance.now();
    const written = await writeVideoOutputs(paths, dec.video, dec.shape, { mp4: out.mp4, preview: out.preview, frames: out.frames, fps: out.fps });
    const timingsMs = result.timingsMs!;
    timingsMs.write = performance.now() - tw;
    const run = { timingsMs, memory: result.memory!, uploads: result.uploads };
    if (out.sidecar) {
      const latentsPath = out.saveLatents && !cli.decodeLatents ? paths.latents : cli.decodeLatents;
      await writeSidecar(paths.sidecar, sidecar({ settings, pipe, videoPath: written.includes(paths.video) ? paths.video : null, videoShape: dec.shape, latentsPath, result: run }));
      written.push(paths.sidecar);
    }
    if (settings.report.memorySnapshot) written.push(...(await writeMemorySnapshot(settings.report.memorySnapshot, pipe, req.prompt)));
    if (settings.load.profile) {
      await pipe.engine.sync();
      if (mode === 'jsonl') progress.record(profileRecord(pipe, run));
      else process.stderr.write(profileText(pipe, run));
    }
    progress.record({ event: 'done', files: written, timings_ms: timingsMs, peak_allocated_bytes: runPeaks(run.memory).allocated }, doneLine(written, timingsMs, run.memory));
    return 0;
  } catch (e) {
    const code = exitCodeOf(e);
    if (mode === 'jsonl') process.stdout.write(JSON.stringify({ event: 'error', code: (e as SmartDiffusionError).code ?? 'ERROR', message: (e as Error).message }) + '\n');
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
