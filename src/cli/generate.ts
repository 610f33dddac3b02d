// `npm run generate -- [options] ["prompt"] [key=value ...]`  — see `--help` (src/cli/args.ts).
// Exit status (src/cli/fail.ts, docs/reliability.md): 0 done, 1 unexpected error (a bug), 2 bad usage/config,
// 3 no WebGPU adapter, 4 out of memory (GPU, host, or refused by the preflight), 5 bad model/checkpoint/latents,
// 6 output error, 7 non-finite numbers (NaN/Inf), 130 interrupted.

import { listAdapters, DAWN_FEATURES } from '../device/gpu.ts';
import { featuresLine } from '../device/caps.ts';
import { Engine } from '../runtime/engine.ts';
import { reachableAdapters } from '../parallel/pipeline-cp.ts';
import { resolve } from 'node:path';
import { parseArgs, usage, type CliArgs } from './args.ts';
import { helpText, settingsToYaml, toDotted } from '../config/settings.ts';
import { WanPipeline, type GenerateResult, type ProgressEvent, type Latents, type PipelineNonFiniteError } from '../pipeline/wan-pipeline.ts';
import { NonFiniteError } from '../util/non-finite.ts';
import { resolveOutputPath, outputPaths, checkWritable, saveLatents, loadLatents, writeVideoOutputs, writeSidecar } from '../pipeline/outputs.ts';
import { sidecar, memoryLine, hostWeightsLine, loadedLine, doneLine, profileText, profileRecord, writeMemorySnapshot, runPeaks, checkMemorySnapshotWritable } from '../pipeline/report.ts';
import { Progress } from './progress.ts';
import { ConfigError, InterruptedError, fmtBytes } from '../util/errors.ts';
import { cleanupOnExit } from '../io/cleanup.ts';
import { EXIT, report, installLastResort } from './fail.ts';
import { readPromptsFile } from '../config/prompts-file.ts';

const DEBUG = process.argv.includes('--debug');

/** stdout closed by its reader (`--json | head`): stop writing there, keep the run going */
let stdoutClosed = false;
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code !== 'EPIPE') throw err;
  if (!stdoutClosed) process.stderr.write('warning: stdout was closed by its reader (EPIPE); progress records are dropped, the run goes on\n');
  stdoutClosed = true;
});
const stdoutWrite = process.stdout.write.bind(process.stdout) as (s: string) => boolean;
(process.stdout as unknown as { write: (s: string) => boolean }).write = (s: string) => (stdoutClosed ? true : stdoutWrite(s));

async function main(): Promise<number> {
  let cli: CliArgs | null;
  try {
    cli = parseArgs(process.argv.slice(2));
  } catch (e) {
    return report(e, DEBUG);
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
  if (cli.printDevice) {
    try {
      const e = await Engine.create({ backend: settings.load.backend || undefined, adapter: settings.load.adapter || undefined });
      const c = e.caps;
      const lines = [
        `adapter: ${e.adapterName}`,
        `backend: ${c.backend}; class: ${c.adapterClass}`,
        `features: ${featuresLine(c)}`,
        `limits: maxStorageBufferBindingSize ${c.maxBinding}, maxBufferSize ${e.limits.maxBufferSize}, minStorageBufferOffsetAlignment ${c.storageAlign}`,
        `Dawn toggles: ${process.env.SD_DAWN_FEATURES === 'none' ? 'none' : `enable-dawn-features=${process.env.SD_DAWN_FEATURES ?? DAWN_FEATURES}`}`,
      ];
      process.stdout.write(lines.join('\n') + '\n');
      e.destroy();
      return 0;
    } catch (err) {
      return report(err, DEBUG);
    }
  }
  if (cli.listAdapters) {
    // (indices for infer.diffusion.cp_devices; dawn.node opens the first adapter whose name contains the one asked for)
    try {
      const all = await listAdapters({ backend: settings.load.backend || undefined });
      const ok = reachableAdapters(all);
      if (all.length === 0) process.stdout.write('no WebGPU adapter\n');
      all.forEach((a, k) => process.stdout.write(`${k}  ${a.backend}  ${a.name}${a.software ? '  (software)' : ''}${ok[k] ? '' : '  (same name as an earlier adapter: dawn.node cannot open it)'}\n`));
      return 0;
    } catch (e) {
      return report(e, DEBUG);
    }
  }
  const mode = settings.report.progress;
  const progress = new Progress(mode);
  const abort = new AbortController();
  let interrupts = 0;
  const onSignal = (sig: string) => {
    interrupts++;
    if (interrupts > 1) {
      console.error(`\n${sig} again: exiting now (temporary files removed, no partial output under a final name)`);
      cleanupOnExit();
      process.exit(EXIT.interrupted);
    }
    console.error(`\n${sig}: stopping at the next DiT block, decode chunk or file (Ctrl-C again to quit at once)...`);
    abort.abort();
  };
  process.on('SIGINT', () => onSignal('SIGINT'));
  process.on('SIGTERM', () => onSignal('SIGTERM'));

  let pipe: WanPipeline | null = null;
  let paths: ReturnType<typeof outputPaths> | null = null;
  try {
    let latents: Latents | null = null;
    // --prompts FILE: a batch, the model loaded once; otherwise one prompt
    const prompts = cli.promptsFile ? readPromptsFile(resolve(cli.promptsFile)) : null;
    if (cli.decodeLatents) {
      // the latents file names the run that made them: its model (unless given here), prompt (unless given) and seed
      const l = await loadLatents(resolve(cli.decodeLatents));
      latents = l.latents;
      const meta = l.meta;
      if (typeof meta.model === 'string' && meta.model && !cli.explicit.has('model')) settings.load.model = meta.model;
      if (!req.prompt && typeof meta.prompt === 'string') req.prompt = meta.prompt;
      if (typeof meta.seed === 'number') req.seed = meta.seed;
    } else if (!prompts && !req.prompt.trim()) {
      throw new ConfigError('no prompt: pass one, e.g. npm run generate -- "a red circle moving right on a black background"');
    }
    const out = settings.output;
    // every video's output paths, checked before anything loads (a batch numbers names that collide)
    const jobs: Array<{ prompt: string; paths: ReturnType<typeof outputPaths> }> = [];
    if (prompts) {
      const used = new Set<string>();
      prompts.forEach((p, k) => {
        let v = resolveOutputPath(out.path, p, req.seed);
        if (!out.path.includes('{slug}') || used.has(v)) v = v.replace(/(\.(mp4|mov|mkv|webm))?$/i, (ext) => `-${String(k + 1).padStart(3, '0')}${ext || '.mp4'}`);
        used.add(v);
        jobs.push({ prompt: p, paths: outputPaths(v) });
      });
    } else {
      const videoPath = cli.decodeLatents
        ? resolve(out.path.includes('{') ? cli.decodeLatents.replace(/\.latents\.safetensors$/, '') + '.mp4' : out.path)
        : resolveOutputPath(out.path, req.prompt, req.seed);
      jobs.push({ prompt: req.prompt, paths: outputPaths(videoPath) });
    }
    for (const j of jobs) checkWritable(j.paths.video);
    if (settings.report.memorySnapshot) checkMemorySnapshotWritable(settings.report.memorySnapshot);
    const onProgress = (ev: ProgressEvent) => {
      progress.event(ev);
      if (settings.report.memoryStats && ev.type === 'memory' && mode !== 'jsonl') progress.info(memoryLine(ev));
    };
    progress.record({ event: 'start', model: settings.load.model, output: jobs[0]!.paths.video, ...(prompts ? { prompts: prompts.length } : {}) }, `model ${settings.load.model}${prompts ? `, ${prompts.length} prompts from ${cli.promptsFile}` : ''}`);
    const tLoad = performance.now();
    pipe = await WanPipeline.fromSettings(settings, { recordMemory: Boolean(settings.report.memorySnapshot), onProgress });
    const loadMs = performance.now() - tLoad;
    progress.record({ event: 'loaded', ms: loadMs, adapter: pipe.engine.adapterName, plan: pipe.plan, host_weight_bytes: pipe.hostWeightBytes() }, loadedLine(pipe, loadMs));
    if (settings.report.memoryStats && mode !== 'jsonl') progress.info(hostWeightsLine(pipe));
    const allWritten: string[] = [];
    for (const [k, job] of jobs.entries()) {
      paths = job.paths;
      const prompt = job.prompt;
      // this video's settings (the sidecar records its prompt)
      const vs = prompts ? { ...settings, request: { ...req, prompt } } : settings;
      if (prompts) progress.record({ event: 'video', index: k + 1, of: jobs.length, prompt, output: paths.video }, `[batch] ${k + 1}/${jobs.length}: ${prompt}`);
      // each request's peaks from zero (the reference's monitoring advice: log the peak per request, reset it after)
      if (k > 0) pipe.engine.allocator.resetPeakMemoryStats();
      const result: Partial<GenerateResult> = { timingsMs: k === 0 ? { load: loadMs } : {} };
      if (!latents || prompts) {
        latents = await pipe.sample({ prompt, negativePrompt: req.negativePrompt, onProgress, signal: abort.signal }, result);
        if (out.saveLatents) {
          progress.event({ type: 'phase', phase: 'write', detail: paths.latents });
          await saveLatents(paths.latents, latents, { model: settings.load.model, prompt, seed: req.seed, config: toDotted(vs) });
        }
      }
      // infer.diffusion.cp_size > 1: each device's denoise peak
      if (settings.report.memoryStats && mode !== 'jsonl') for (const [d, dev] of (result.memory?.devices ?? []).entries()) progress.info(`[memory] cp device ${d} (${dev.adapter}): peak allocated ${fmtBytes(dev.peak_allocated_bytes)}, peak reserved ${fmtBytes(dev.peak_reserved_bytes)}${dev.uploaded_bytes !== undefined ? `, uploaded ${fmtBytes(dev.uploaded_bytes)} of streamed blocks` : ''}`);
      const dec = await pipe.decode(latents, { onProgress, signal: abort.signal, result });
      if (abort.signal.aborted) throw new InterruptedError('[decode] interrupted: nothing was written');
      progress.event({ type: 'phase', phase: 'write', detail: paths.video });
      const tw = performance.now();
      const written = await writeVideoOutputs(paths, dec.video, dec.shape, { mp4: out.mp4, preview: out.preview, frames: out.frames, fps: out.fps, signal: abort.signal });
      const timingsMs = result.timingsMs!;
      timingsMs.write = performance.now() - tw;
      const run = { timingsMs, memory: result.memory!, uploads: result.uploads, experts: result.experts, cache: result.cache };
      if (abort.signal.aborted) throw new InterruptedError(`[write] interrupted after writing ${written.join(', ')}`);
      if (out.sidecar) {
        const latentsPath = out.saveLatents && !cli.decodeLatents ? paths.latents : cli.decodeLatents;
        await writeSidecar(paths.sidecar, sidecar({ settings: vs, pipe, videoPath: written.includes(paths.video) ? paths.video : null, videoShape: dec.shape, latentsPath, result: run }));
        written.push(paths.sidecar);
      }
      if (settings.report.memorySnapshot && k === jobs.length - 1) written.push(...(await writeMemorySnapshot(settings.report.memorySnapshot, pipe, prompts ? `${jobs.length} prompts from ${cli.promptsFile}` : prompt)));
      if (settings.load.profile) {
        await pipe.engine.sync();
        if (mode === 'jsonl') progress.record(profileRecord(pipe, run));
        else process.stderr.write(profileText(pipe, run));
      }
      const peaks = runPeaks(run.memory);
      progress.record({ event: 'done', files: written, timings_ms: timingsMs, peak_allocated_bytes: peaks.allocated, ...(prompts ? { index: k + 1, of: jobs.length, peak_reserved_bytes: peaks.reserved } : {}) }, doneLine(written, timingsMs, run.memory));
      allWritten.push(...written);
    }
    if (prompts) progress.record({ event: 'batch_done', videos: jobs.length, files: allWritten.length }, `[batch] ${jobs.length} videos written`);
    return 0;
  } catch (e) {
    progress.info('');
    // NaN/Inf: the last finite latents are kept for inspection (and --decode-latents), when the run had any
    const nf = e as PipelineNonFiniteError;
    if (nf instanceof NonFiniteError && nf.latents && paths && !cli.decodeLatents) {
      try {
        await saveLatents(paths.latents, nf.latents, { model: settings.load.model, prompt: req.prompt, seed: req.seed, config: toDotted(settings), non_finite: { phase: nf.phase, step: nf.step ?? null, latents_step: nf.latentsStep ?? null } });
        nf.message += `; saved to ${paths.latents}`;
      } catch {
        /* the error itself is what matters */
      }
    }
    const code = report(e, cli.debug);
    if (mode === 'jsonl') process.stdout.write(JSON.stringify({ event: 'error', code: (e as { code?: string }).code ?? 'ERROR', exit: code, message: (e as Error).message }) + '\n');
    return code;
  } finally {
    pipe?.dispose();
  }
}

installLastResort(DEBUG, cleanupOnExit);
main().then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    process.exitCode = report(e, DEBUG);
  },
);
