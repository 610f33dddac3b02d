// Public API of smart-diffusion.
export { WanPipeline } from './pipeline/wan-pipeline.ts';
export type { WanPipelineOptions, PipelineRuntime, GenerateRequest, GenerateResult, Latents, ProgressEvent, PhaseMemory } from './pipeline/wan-pipeline.ts';
export { memoryPlan, type MemoryPlan } from './pipeline/memory-plan.ts';
export { writeVideoOutputs, outputPaths, saveLatents, loadLatents, writeSidecar } from './pipeline/outputs.ts';
export { sidecar, writeMemorySnapshot } from './pipeline/report.ts';
export { toRgbFrames, writeMp4, writeGif, writePng, encodePng } from './io/video.ts';
export { Engine, type EngineOptions } from './runtime/engine.ts';
export { Tensor } from './tensor/tensor.ts';
export type { DType } from './tensor/dtype.ts';
export { resolveSettings, settingsForModel, defaultSettings, dottedLayer, overridesLayer, readConfigFile, modelDefaults, toDotted, settingsToYaml, type Layer, type SettingsOptions, type SettingsSources } from './config/settings.ts';
export { SCHEMA, KEYS, type Settings, type RequestSettings, type LoadSettings } from './config/schema.ts';
export { openModelFolder } from './io/model-folder.ts';
export { loadTokenizer, encodePrompt } from './io/tokenizer.ts';
export { createScheduler, cfgCombine } from './schedulers/index.ts';
export { takeSnapshot, renderSnapshotHtml } from './memory/snapshot.ts';
export { checkGolden } from './golden/check.ts';
export * from './util/errors.ts';
