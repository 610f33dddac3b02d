// A model as the planner sees it: configs and the dtype each weight has in its file, nothing else.
// From a model folder (configs + safetensors headers; no tensor data is read) or from a preset:
// the official Wan configs, shapes only, nothing downloaded.

import { openModelFolder, parseT5Config, type ModelFolder, parseTransformerConfig, parseVaeConfig, type T5Config, type TransformerConfig, type VaeConfig } from '../io/model-folder.ts';
import { engineDTypeOf } from '../io/checkpoint.ts';
import type { DType } from '../tensor/dtype.ts';
import { WAN_1_3B_TRANSFORMER, WAN_14B_TRANSFORMER, WAN_VAE, umt5XxlConfig } from '../tools/random-model.ts';
import { ConfigError } from '../util/errors.ts';
import { existsSync } from 'node:fs';
import { basename } from 'node:path';

export interface ModelShapes {
  /** preset name or folder path */
  name: string;
  transformer: TransformerConfig;
  vae: VaeConfig;
  textEncoder: T5Config;
  /** dtype of each weight in its file (what infer.weight_dtype=checkpoint keeps) */
  fileDtype: { transformer: (key: string) => DType; vae: (key: string) => DType; textEncoder: (key: string) => DType };
  /** DiTs sampling in turn (Wan 2.2 A14B: 2, a high-noise and a low-noise expert of the same shape) */
  experts: number;
  /** tokenizer folder, when the model has one (prompts can then be counted in tokens) */
  tokenizerDir: string | null;
  /** the recommended request size of the preset, if any */
  note?: string;
}

/** Shapes from a model folder: its configs and its safetensors headers. */
export async function shapesFromFolder(dir: string): Promise<ModelShapes> {
  return shapesOfFolder(await openModelFolder(dir));
}

/** The same from a folder already opened (the pipeline's, for infer.vram_budget). */
export async function shapesOfFolder(folder: ModelFolder): Promise<ModelShapes> {
  const dtypes = async (c: { open(): Promise<{ keys(): Iterable<string>; info(k: string): { dtype: Parameters<typeof engineDTypeOf>[0] }; close(): Promise<void> }> }) => {
    const ck = await c.open();
    try {
      const m = new Map<string, DType>();
      for (const k of ck.keys()) m.set(k, engineDTypeOf(ck.info(k).dtype));
      return (key: string): DType => m.get(key) ?? 'f32';
    } finally {
      await ck.close();
    }
  };
  return {
    name: folder.dir,
    transformer: folder.transformer.config,
    vae: folder.vae.config,
    textEncoder: folder.textEncoder.config,
    fileDtype: { transformer: await dtypes(folder.transformer), vae: await dtypes(folder.vae), textEncoder: await dtypes(folder.textEncoder) },
    experts: folder.transformer2 ? 2 : 1,
    tokenizerDir: folder.tokenizer?.dir ?? null,
  };
}


/** UMT5-XXL encoder as Wan ships it (24 layers, the 256,384-token multilingual vocabulary). */
const UMT5_XXL = umt5XxlConfig(24, 256384);

// Presets assume 16-bit (bf16) DiT and text-encoder weights, as the official Wan release ships them;
// diffusers' f32 files with infer.weight_dtype=bf16 give the same plan. The VAE stays f32.
const bf16 = (): DType => 'bf16';
const f32 = (): DType => 'f32';

export const PRESETS: Record<string, () => ModelShapes> = {
  'wan2.1-t2v-1.3b': () => preset('wan2.1-t2v-1.3b', WAN_1_3B_TRANSFORMER, 1),
  'wan2.1-t2v-14b': () => preset('wan2.1-t2v-14b', WAN_14B_TRANSFORMER, 1),
  // two experts of the 14B shape, switched at the boundary timestep (Wan 2.2 text-to-video A14B)
  'wan2.2-t2v-a14b': () => preset('wan2.2-t2v-a14b', WAN_14B_TRANSFORMER, 2),
};

function preset(name: string, transformer: Record<string, unknown>, experts: number): ModelShapes {
  return {
    name,
    transformer: parseTransformerConfig(transformer),
    vae: parseVaeConfig(WAN_VAE),
    textEncoder: parseT5Config(UMT5_XXL),
    fileDtype: { transformer: bf16, vae: f32, textEncoder: bf16 },
    experts,
    tokenizerDir: null,
  };
}

/**
 * A model folder, or a preset name (when no such folder exists; matched on the last path part, case
 * insensitive: `wan2.1-t2v-14b`). The one place a `--model` value becomes shapes (npm run plan, the table).
 */
export async function modelShapes(model: string): Promise<ModelShapes> {
  if (existsSync(model)) return shapesFromFolder(model);
  const p = PRESETS[basename(model).toLowerCase()];
  if (p) return p();
  throw new ConfigError(`--model ${model}: no such folder and not a preset (${Object.keys(PRESETS).join(', ')})`);
}
