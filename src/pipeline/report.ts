// What a run reports about itself: the JSON sidecar, the memory snapshot files, and the text of
// `--memory-stats`, `--profile` and the loaded/done lines. Used by the CLI; nothing here runs the model.

import { featuresLine } from '../device/caps.ts';
import { dirname, resolve } from 'node:path';
import { toDotted } from '../config/settings.ts';
import type { Settings } from '../config/schema.ts';
import { sagePv } from '../ops/attention_sage.ts';
import { takeSnapshot, renderSnapshotHtml } from '../memory/snapshot.ts';
import { makeDirs, writeFileAtomic } from '../io/atomic.ts';
import { OutputError, oneLine } from '../io/output-error.ts';
import { fmtBytes, SmartDiffusionError } from '../util/errors.ts';
import { checkWritableFile } from './outputs.ts';
import { placementSummary } from '../plan/plan.ts';
import type { GenerateResult, ProgressEvent, WanPipeline } from './wan-pipeline.ts';
import { cacheRecordOf, type CacheRecord } from './cache/index.ts';

type Memory = GenerateResult['memory'];

/** The run's peaks: the largest of its phases' (the pipeline resets the peaks at each phase). */
export function runPeaks(mem: Memory): { allocated: number; reserved: number } {
  const phases = Object.values(mem.perPhase);
  return { allocated: Math.max(0, ...phases.map((p) => p.peakAllocated)), reserved: Math.max(0, ...phases.map((p) => p.peakReserved)) };
}

export interface SidecarInput {
  settings: Settings;
  pipe: WanPipeline;
  /** the video file, or null when none was written */
  videoPath: string | null;
  /** [3, T, H, W] */
  videoShape: readonly number[];
  /** the latents file this run wrote or decoded, if any */
  latentsPath: string | null;
  result: Pick<GenerateResult, 'timingsMs' | 'memory' | 'uploads'> & Partial<Pick<GenerateResult, 'experts' | 'cache'>>;
}

/** The request's step cache record: the result's, else the one filed under its timings (a caller that copied only some result fields) */
function cacheOf(result: Partial<Pick<GenerateResult, 'cache' | 'timingsMs'>>): CacheRecord | null {
  return result.cache ?? (result.timingsMs ? cacheRecordOf.get(result.timingsMs) : undefined) ?? null;
}

/** The sidecar's `cache`: which steps the DiT computed (infer.cache.mode), null when uncached. */
export function cacheSidecar(c: CacheRecord | null): Record<string, unknown> | null {
  if (!c) return null;
  return {
    mode: c.mode,
    forwards: c.forwards,
    computed_steps: c.computedSteps,
    skipped_steps: c.skippedSteps,
    ...(c.splitSteps.length ? { split_steps: c.splitSteps } : {}),
    ...(c.savedUploadBytes !== undefined ? { saved_upload_bytes: c.savedUploadBytes } : {}),
    settings: c.settings,
  };
}

/** The JSON sidecar: what was asked (the settings by their dotted keys), on what, and what it cost. */
export function sidecar(r: SidecarInput): Record<string, unknown> {
  const { settings, pipe, result } = r;
  const req = settings.request;
  const peaks = runPeaks(result.memory);
  return {
    tool: 'smart-diffusion',
    created: new Date().toISOString(),
    prompt: req.prompt,
    negative_prompt: req.negativePrompt,
    seed: req.seed,
    model: { path: settings.load.model, transformer: pipe.folder.transformer.config, ...(pipe.folder.transformer2 ? { transformer_2: pipe.folder.transformer2.config } : {}), vae_base_dim: pipe.folder.vae.config.base_dim, text_encoder_d_model: pipe.folder.textEncoder.config.d_model },
    video: { path: r.videoPath, frames: r.videoShape[1], height: r.videoShape[2], width: r.videoShape[3], fps: settings.output.fps },
    latents: r.latentsPath,
    adapter: pipe.engine.adapterName,
    // infer.attention: the DiT / VAE self-attention kernel, and for 'sage' the P·V precision that ran
    attention: settings.load.attention === 'sage' ? { kind: 'sage', pv: sagePv(pipe.engine.caps.shaderF16) } : { kind: 'sdpa' },
    memory_plan: pipe.plan,
    vram_budget: pipe.budget
      ? { budget_bytes: pipe.settings.load.vramBudget, placement: placementSummary(pipe.budget.plan), predicted_peak_bytes: pipe.budget.plan.peakBytes, predicted_peak_reserved_bytes: pipe.budget.plan.peakReservedBytes, reasons: pipe.budget.reasons }
      : null,
    timings_ms: result.timingsMs,
    memory: {
      peak_allocated_bytes: peaks.allocated,
      peak_reserved_bytes: peaks.reserved,
      per_phase: result.memory.perPhase,
      per_step: result.memory.perStep,
      // infer.diffusion.cp_size > 1: one entry per device (src/parallel/)
      ...(result.memory.devices ? { devices: result.memory.devices } : {}),
    },
    uploads: result.uploads ?? null,
    // step caching: the steps whose DiT forward ran (the others reused the cache)
    cache: cacheSidecar(cacheOf(result)),
    // two-expert models: the expert and guidance of every step, and each swap's time
    ...(result.experts
      ? {
          experts: {
            boundary_ratio: result.experts.boundaryRatio,
            resident: result.experts.resident,
            per_step: result.experts.schedule,
            swaps: result.experts.swaps.map((w) => ({ step: w.step, from: w.from, to: w.to, ms: Math.round(w.ms * 10) / 10 })),
          },
        }
      : {}),
    host_weight_bytes: pipe.hostWeightBytes(),
    config: toDotted(settings),
  };
}

/** `--memory-stats`: one line per memory event */
export function memoryLine(ev: Extract<ProgressEvent, { type: 'memory' }>): string {
  return `  memory ${ev.phase}${ev.step ? ` step ${ev.step}` : ''}: allocated ${fmtBytes(ev.allocated)}, reserved ${fmtBytes(ev.reserved)}, peak allocated ${fmtBytes(ev.peakAllocated)}, peak reserved ${fmtBytes(ev.peakReserved)}`;
}

/** `--memory-stats`: host memory holding weights, by component (a two-expert model's inactive expert waits here) */
export function hostWeightsLine(pipe: WanPipeline): string {
  const h = pipe.hostWeightBytes();
  const parts = Object.entries(h).map(([k, v]) => `${k} ${fmtBytes(v)}${pipe.dit2 && (k === 'dit' || k === 'dit_2') ? ` (${k === 'dit' ? 'transformer/' : 'transformer_2/'})` : ''}`);
  return `  host weights: ${parts.length ? parts.join(', ') : 'none'}; total ${fmtBytes(Object.values(h).reduce((a, b) => a + b, 0))}`;
}

export function loadedLine(pipe: WanPipeline, loadMs: number): string {
  const p = pipe.plan;
  const experts = pipe.dit2 ? `; two experts (transformer/ high noise, transformer_2/ low noise; ${pipe.settings.load.expertsResident === 'both' ? 'both resident' : 'the running one on the GPU, the other in host memory'})` : '';
  return `loaded in ${(loadMs / 1000).toFixed(1)} s on ${pipe.engine.adapterName} (${featuresLine(pipe.engine.caps)}); memory level ${p.level} (text encoder: ${p.textEncoder}, DiT: ${p.dit}, VAE: ${p.vae}${p.vaeTiling ? `, tiled ${p.tileSize || 'auto'}` : ''})${experts}`;
}

export function doneLine(written: readonly string[], timingsMs: Record<string, number>, mem: Memory): string {
  const peaks = runPeaks(mem);
  const timings = Object.entries(timingsMs)
    .map(([k, v]) => `${k} ${(v / 1000).toFixed(1)} s`)
    .join(', ');
  return `done: ${written.join(', ')}\n  timings ${timings}; peak GPU memory ${fmtBytes(peaks.allocated)} allocated, ${fmtBytes(peaks.reserved)} reserved`;
}

/** `--profile`: the per-kernel table, phase times and (level 3) the block streaming statistics */
export function profileText(pipe: WanPipeline, result: Pick<GenerateResult, 'timingsMs' | 'uploads'> & Partial<Pick<GenerateResult, 'experts' | 'cache'>>): string {
  const lines = ['', 'kernels (GPU time from timestamp queries):', pipe.engine.profile.table(), '', 'phases (wall ms):'];
  for (const [k, v] of Object.entries(result.timingsMs)) lines.push(`  ${k.padEnd(8)} ${v.toFixed(0).padStart(9)}`);
  if (result.uploads) {
    const u = result.uploads;
    const hidden = u.uploadMs - u.exposedMs;
    lines.push(
      '',
      `DiT block streaming: ${u.uploads} uploads, ${fmtBytes(u.bytes)} in ${u.uploadMs.toFixed(0)} ms on the main thread (${(u.bytes / Math.max(1e-9, u.uploadMs) / 1e6).toFixed(2)} GB/s);`,
      `  ${u.prefetched} prefetched (copied while the GPU still had the previous blocks queued): ${hidden.toFixed(0)} ms of the copying ran ahead of need, ${u.exposedMs.toFixed(0)} ms while the denoise loop waited for that block;`,
      `  acquire() waited ${u.stallMs.toFixed(0)} ms in all (mostly the GPU finishing the previous block, not upload time); the end-to-end cost of streaming is the denoise time against level 0 (npm run bench:memory)`,
    );
    lines.push(`  GPU compute (sum of kernel times): ${pipe.engine.profile.totalMs().toFixed(0)} ms`);
    if (u.diskReads) {
      // weights_source=disk: the block images came from their files, read while earlier blocks computed
      const hiddenDisk = (u.diskReadMs ?? 0) - (u.diskExposedMs ?? 0);
      lines.push(
        `  read from disk: ${u.diskReads} block images, ${fmtBytes(u.diskBytes ?? 0)} in ${(u.diskReadMs ?? 0).toFixed(0)} ms of reads (${((u.diskBytes ?? 0) / Math.max(1e-9, u.diskReadMs ?? 0) / 1e6).toFixed(2)} GB/s);`,
        `  ${hiddenDisk.toFixed(0)} ms of reading ran before the loop needed the block, ${(u.diskExposedMs ?? 0).toFixed(0)} ms while it waited for that block (the GPU may still have been computing earlier blocks then: the end-to-end cost of reading is the denoise time against infer.weights_source=memory)`,
      );
    }
  }
  const disk = pipe.diskReadStats();
  if (Object.keys(disk).length) {
    lines.push('', `weights read from disk since load (infer.weights_source=disk): ${Object.entries(disk).map(([k, v]) => `${k} ${fmtBytes(v.bytes)} in ${v.reads} reads, ${v.ms.toFixed(0)} ms`).join('; ')}`);
  }
  const c = cacheOf(result);
  if (c) {
    const total = c.computedSteps.length + c.skippedSteps.length;
    lines.push('', `step cache (${c.mode}): ${c.forwards} DiT forwards for ${total} steps, ${c.skippedSteps.length} skipped${c.skippedSteps.length ? ` (steps ${c.skippedSteps.join(', ')})` : ''}`);
    if (c.splitSteps.length) lines.push(`  one CFG row computed, the other from the cache: steps ${c.splitSteps.join(', ')}`);
    if (c.savedUploadBytes !== undefined) lines.push(`  block uploads saved: ${fmtBytes(c.savedUploadBytes)}`);
  }
  if (result.experts) {
    const sw = result.experts.swaps;
    lines.push('', `experts (${result.experts.resident === 'both' ? 'both resident' : 'active one on the GPU'}): ${result.experts.schedule.map((s) => (s.expert === 'transformer' ? 'H' : 'L')).join('')} (H = transformer/ high noise, L = transformer_2/ low noise)`);
    lines.push(sw.length ? `  swaps: ${sw.map((w) => `step ${w.step} ${w.from} -> ${w.to} ${w.ms.toFixed(0)} ms`).join('; ')}` : '  swaps: none');
  }
  return lines.join('\n') + '\n';
}

/** `--profile` as one JSON-lines record */
export function profileRecord(pipe: WanPipeline, result: Pick<GenerateResult, 'timingsMs' | 'uploads'> & Partial<Pick<GenerateResult, 'experts' | 'cache'>>): Record<string, unknown> {
  return { event: 'profile', kernels: pipe.engine.profile.rows(), timings: result.timingsMs, uploads: result.uploads ?? null, experts: result.experts ?? null, cache: cacheSidecar(cacheOf(result)) };
}

const SNAPSHOT_OPTION = 'report.memory_snapshot (--memory-snapshot)';

/** The two files `--memory-snapshot PATH` writes: PATH.json (PATH itself when it ends in .json) and the .html beside it. */
export function memorySnapshotPaths(path: string): { json: string; html: string } {
  const snapPath = resolve(path);
  const json = snapPath.endsWith('.json') ? snapPath : `${snapPath}.json`;
  return { json, html: json.replace(/\.json$/, '.html') };
}

/** Fail early (before any GPU work) when the memory snapshot files cannot be written: one-line OutputError. */
export function checkMemorySnapshotWritable(path: string): void {
  const p = memorySnapshotPaths(path);
  checkWritableFile(p.json, SNAPSHOT_OPTION);
  checkWritableFile(p.html, SNAPSHOT_OPTION);
}

/** `--memory-snapshot PATH`: the allocator's history as PATH.json and an HTML timeline; returns the files. Errors are one-line OutputErrors. */
export async function writeMemorySnapshot(path: string, pipe: WanPipeline, prompt: string): Promise<string[]> {
  const { json: jsonPath, html: htmlPath } = memorySnapshotPaths(path);
  let json: string;
  let html: string;
  try {
    const snap = takeSnapshot(pipe.engine.allocator, pipe.engine.adapterName);
    json = JSON.stringify(snap);
    html = renderSnapshotHtml(snap, { title: `GPU memory: ${prompt.slice(0, 60)} (level ${pipe.plan.level})` });
  } catch (e) {
    if (e instanceof SmartDiffusionError) throw e;
    throw new OutputError(`[output] could not build the memory snapshot for ${jsonPath} (${oneLine((e as Error).message ?? String(e))}); run without ${SNAPSHOT_OPTION} or with fewer steps`);
  }
  try {
    makeDirs(dirname(jsonPath));
  } catch (e) {
    throw new OutputError(`[output] cannot create the folder ${dirname(jsonPath)} for ${jsonPath} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); choose another ${SNAPSHOT_OPTION}`);
  }
  await writeFileAtomic(jsonPath, json, { option: SNAPSHOT_OPTION });
  await writeFileAtomic(htmlPath, html, { option: SNAPSHOT_OPTION });
  return [jsonPath, htmlPath];
}
