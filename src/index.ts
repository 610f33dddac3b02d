// Public API of smart-diffusion.
export { WanPipeline, modelDefaults } from './pipeline/wan-pipeline.ts';
export type { WanPipelineOptions, GenerateRequest, GenerateResult, Latents, ProgressEvent, PhaseMemory } from './pipeline/wan-pipeline.ts';
export { memoryPlan, type MemoryPlan } from './pipeline/memory-plan.ts';
export { writeVideoOutputs, outputPaths, saveLatents, loadLatents, writeSidecar } from './pipeline/outputs.ts';
export { toRgbFrames, writeMp4, writeGif, writePng, encodePng } from './io/video.ts';
export { Engine, type EngineOptions } from './runtime/engine.ts';
export { Tensor } from './tensor/tensor.ts';
export type { DType } from './tensor/dtype.ts';
export { defaultConfig, applyOverrides, applyObject, loadConfigFile, configToYaml } from './config/config.ts';
export { SCHEMA } from './config/schema.ts';
export { openModelFolder } from './io/model-folder.ts';
export { loadTokenizer, encodePrompt } from './io/tokenizer.ts';
export { createScheduler, cfgCombine } from './schedulers/index.ts';
export { takeSnapshot, renderSnapshotHtml } from './memory/snapshot.ts';
export { checkGolden } from './golden/check.ts';
export * from './util/errors.ts';
