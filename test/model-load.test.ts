// Loading real model folders into the models: config/weights mismatches and corrupt files give
// clear errors that name the key and the file.
import { describe, it, expect } from 'vitest';
import { cpSync, mkdtempSync, readFileSync, writeFileSync, truncateSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TINY } from './helpers/golden.ts';
import { getEngine } from './helpers/gpu.ts';
import { openModelFolder } from '../src/io/model-folder.ts';
import { loadModule } from '../src/nn/load.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../src/models/wan_dit/model.ts';
import { WanVaeDecoder, vaeDimsFromConfig } from '../src/models/wan_vae/model.ts';
import { CheckpointError } from '../src/util/errors.ts';
import { Checkpoint } from '../src/io/checkpoint.ts';
import { writeSafetensors } from '../src/io/safetensors.ts';
import { f32ToBf16Bits } from '../src/tensor/dtype.ts';

function copyTiny(): string {
  const dir = mkdtempSync(join(tmpdir(), 'sd-tiny-'));
  cpSync(TINY, dir, { recursive: true });
  return dir;
}

async function loadDit(dir: string) {
  const e = await getEngine();
  const f = await openModelFolder(dir);
  const m = new WanTransformer3DModel(ditDimsFromConfig(f.transformer.config));
  const ck = await f.transformer.open();
  try {
    return await loadModule(m, ck, { engine: e, owner: 'dit' });
  } finally {
    await ck.close();
    m.disposeParams();
  }
}

function editConfig(dir: string, comp: string, edit: (c: Record<string, unknown>) => void) {
  const p = join(dir, comp, 'config.json');
  const c = JSON.parse(readFileSync(p, 'utf8'));
  edit(c);
  writeFileSync(p, JSON.stringify(c));
}

describe('model loading', () => {
  it('loads the tiny DiT strictly and reports no unused keys', async () => {
    const r = await loadDit(copyTiny());
    expect(r.unused).toEqual([]);
    expect(r.deviceBytes).toBeGreaterThan(0);
  });

  it('config says more layers than the weights hold: missing key named in full', async () => {
    const dir = copyTiny();
    editConfig(dir, 'transformer', (c) => (c.num_layers = 3));
    await expect(loadDit(dir)).rejects.toThrow(/missing .*'blocks\.2\.[a-z_0-9.]+'.*diffusion_pytorch_model\.safetensors/s);
  });

  it('config/weights shape mismatch: both shapes in the message', async () => {
    const dir = copyTiny();
    editConfig(dir, 'transformer', (c) => (c.ffn_dim = 512));
    await expect(loadDit(dir)).rejects.toThrow(/key 'blocks\.0\.ffn\.net\.0\.proj\.weight' .* has shape \[256, 128\], expected \[512, 128\]/);
  });

  it('a truncated weight file is refused before anything is read', async () => {
    const dir = copyTiny();
    const p = join(dir, 'transformer', 'diffusion_pytorch_model.safetensors');
    truncateSync(p, Math.floor(statSync(p).size / 2));
    await expect(loadDit(dir)).rejects.toThrow(CheckpointError);
    await expect(loadDit(dir)).rejects.toThrow(/diffusion_pytorch_model\.safetensors/);
  });

  it('a lying header (length beyond the file) is refused with the file name', async () => {
    const dir = copyTiny();
    const p = join(dir, 'transformer', 'diffusion_pytorch_model.safetensors');
    const b = readFileSync(p);
    b.writeBigUInt64LE(BigInt(b.length * 4), 0);
    writeFileSync(p, b);
    await expect(loadDit(dir)).rejects.toThrow(/diffusion_pytorch_model\.safetensors.*header/is);
  });

  it('the VAE loads the decoder only; encoder keys of a real VAE file are reported unused, by design', async () => {
    const e = await getEngine();
    const dir = copyTiny();
    // add encoder tensors, as a real diffusers VAE file has them
    const p = join(dir, 'vae', 'diffusion_pytorch_model.safetensors');
    const src = await Checkpoint.open(p);
    const tensors = [];
    for (const k of src.keys()) tensors.push({ key: k, dtype: src.info(k).dtype, shape: src.info(k).shape, data: await src.read(k) });
    await src.close();
    tensors.push({ key: 'encoder.conv_in.weight', dtype: 'F32' as const, shape: [2, 2], data: new Uint8Array(16) });
    tensors.push({ key: 'quant_conv.weight', dtype: 'F32' as const, shape: [1], data: new Uint8Array(4) });
    await writeSafetensors(p, tensors);
    const f = await openModelFolder(dir);
    const vae = new WanVaeDecoder(vaeDimsFromConfig(f.vae.config));
    const ck = await f.vae.open();
    try {
      const r = await loadModule(vae, ck, { engine: e, owner: 'vae' });
      expect(r.unused.sort()).toEqual(['encoder.conv_in.weight', 'quant_conv.weight']);
    } finally {
      await ck.close();
      vae.disposeParams();
    }
  });

  it('a BF16 weight holding NaN/-Inf is refused with the key, the file and the count; checkFinite: false loads it', async () => {
    const e = await getEngine();
    const dir = copyTiny();
    const p = join(dir, 'transformer', 'diffusion_pytorch_model.safetensors');
    const src = await Checkpoint.open(p);
    const tensors = [];
    for (const k of src.keys()) {
      const info = src.info(k);
      let data = await src.read(k);
      let dtype = info.dtype;
      if (k === 'blocks.1.attn1.to_q.weight') {
        // stored as BF16 (a real checkpoint's dtype) with 3 NaN and one -Inf at odd and even positions
        const v = new Float32Array(data.slice().buffer);
        v[1] = NaN;
        v[2] = NaN;
        v[1001] = -Infinity;
        v[v.length - 1] = NaN;
        data = new Uint8Array(Uint16Array.from(v, f32ToBf16Bits).buffer);
        dtype = 'BF16';
      }
      tensors.push({ key: k, dtype, shape: info.shape, data });
    }
    await src.close();
    await writeSafetensors(p, tensors);
    const f = await openModelFolder(dir);
    const load = async (checkFinite?: boolean) => {
      const m = new WanTransformer3DModel(ditDimsFromConfig(f.transformer.config));
      const ck = await f.transformer.open();
      try {
        return await loadModule(m, ck, { engine: e, owner: 'dit', checkFinite });
      } finally {
        await ck.close();
        m.disposeParams();
      }
    };
    await expect(load()).rejects.toThrow(CheckpointError);
    await expect(load()).rejects.toThrow(
      /\[checkpoint\] \S*transformer\/diffusion_pytorch_model\.safetensors: tensor 'blocks\.1\.attn1\.to_q\.weight' \[128, 128\] BF16 has 4 non-finite values \(NaN\/Inf; the first at flat index 1: NaN\); the file is corrupt: re-download it/,
    );
    await expect(load(false)).resolves.toMatchObject({ unused: [] });
  });
});
