// The streaming random-model writer (src/tools/random-model.ts, `spec.streamed`): a sharded checkpoint
// that Checkpoint.open reads with the model's keys, shapes and dtypes; content deterministic from the
// seed and independent of sharding and of how the bytes are cut into writes; resumable shard by shard.
import { describe, expect, it } from 'vitest';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Checkpoint } from '../src/io/checkpoint.ts';
import { randomModelFolder, randomStreamedTensors, writeSafetensorsStreamed, normalQuantile, WAN_VAE, umt5XxlConfig, type RandomModelSpec, type StreamedTensor } from '../src/tools/random-model.ts';
import { WanTransformer3DModel, ditDimsFromConfig } from '../src/models/wan_dit/model.ts';
import { parseTransformerConfig, parseVaeConfig } from '../src/io/model-folder.ts';
import { WanVaeDecoder, vaeDimsFromConfig } from '../src/models/wan_vae/model.ts';

const TOK = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'tokenizer', 'legacy');
const TINY_DIT = {
  _class_name: 'WanTransformer3DModel',
  attention_head_dim: 32,
  cross_attn_norm: true,
  eps: 1e-6,
  ffn_dim: 96,
  freq_dim: 256,
  in_channels: 16,
  num_attention_heads: 2,
  num_layers: 3,
  out_channels: 16,
  patch_size: [1, 2, 2],
  qk_norm: 'rms_norm_across_heads',
  rope_max_seq_len: 1024,
  text_dim: 64,
};
const spec = (shardBytes: number): RandomModelSpec => ({
  transformer: TINY_DIT,
  vae: { ...WAN_VAE, base_dim: 8 },
  textEncoder: { ...umt5XxlConfig(1, 384), d_model: 64, d_ff: 96, d_kv: 16, num_heads: 4 },
  dtype: 'bf16',
  seed: 7,
  tokenizerDir: TOK,
  streamed: { shardBytes },
});
const bf16 = (b: Uint8Array) => {
  const w = new Uint16Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
  const f = new Float32Array(w.length);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < w.length; i++) u[i] = w[i]! << 16;
  return f;
};

describe('streamed random model folders', () => {
  it('writes a sharded transformer that Checkpoint.open reads with the expected keys, shapes, dtypes and content', async () => {
    const rootA = mkdtempSync(join(tmpdir(), 'sd-rms-a-'));
    const rootB = mkdtempSync(join(tmpdir(), 'sd-rms-b-'));
    try {
      const a = await randomModelFolder(rootA, spec(40_000));
      expect(existsSync(join(a, '.complete'))).toBe(true);
      const files = readdirSync(join(a, 'transformer')).sort();
      const shards = files.filter((f) => /^diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors$/.test(f));
      expect(shards.length).toBeGreaterThan(2);
      expect(files).toContain('diffusion_pytorch_model.safetensors.index.json');
      const dit = new WanTransformer3DModel(ditDimsFromConfig(parseTransformerConfig(TINY_DIT)));
      const params = dit.namedParams();
      const ck = await Checkpoint.open(join(a, 'transformer'), { preferredName: 'diffusion_pytorch_model' });
      try {
        expect(ck.sharded).toBe(true);
        expect(ck.files().length).toBe(shards.length);
        expect(ck.keys().sort()).toEqual(params.map(([k]) => k).sort());
        for (const [k, p] of params) {
          const info = ck.info(k);
          expect(info.dtype).toBe('BF16');
          expect(info.shape).toEqual([...p.shape]);
        }
        const idx = JSON.parse(readFileSync(join(a, 'transformer', 'diffusion_pytorch_model.safetensors.index.json'), 'utf8'));
        expect(idx.metadata.total_size).toBe(ck.totalBytes);
        // a matmul weight: roughly N(0, (0.7/sqrt(fan_in))²); a norm weight: ones
        const w = bf16(await ck.read('blocks.0.ffn.net.0.proj.weight'));
        const std = 0.7 / Math.sqrt(ck.info('blocks.0.ffn.net.0.proj.weight').shape[1]!);
        const mean = w.reduce((x, y) => x + y, 0) / w.length;
        const sd = Math.sqrt(w.reduce((x, y) => x + (y - mean) ** 2, 0) / w.length);
        expect(Math.abs(mean)).toBeLessThan(0.05 * std);
        expect(sd / std).toBeGreaterThan(0.95);
        expect(sd / std).toBeLessThan(1.05);
        expect(bf16(await ck.read('blocks.0.attn1.norm_q.weight')).every((v) => v === 1)).toBe(true);
        // the other components: one file each, readable
        const vae = await Checkpoint.open(join(a, 'vae'), { preferredName: 'diffusion_pytorch_model' });
        const te = await Checkpoint.open(join(a, 'text_encoder'));
        expect(vae.sharded || te.sharded).toBe(false);
        expect(vae.size).toBeGreaterThan(10);
        expect(te.has('shared.weight')).toBe(true);
        await vae.close();
        await te.close();

        // the same spec unsharded (another folder id): the same bytes per tensor
        const b = await randomModelFolder(rootB, spec(0));
        expect(b.split('/').pop()).not.toBe(a.split('/').pop());
        const ckB = await Checkpoint.open(join(b, 'transformer'));
        expect(ckB.sharded).toBe(false);
        for (const k of ck.keys()) expect(Buffer.compare(await ck.read(k), await ckB.read(k))).toBe(0);
        await ckB.close();
      } finally {
        await ck.close();
      }

      // resumable: remove one shard and the marker; the run writes only that shard again, identically
      const victim = join(a, 'transformer', shards[1]!);
      const before = readFileSync(victim);
      const keptMtime = statSync(join(a, 'transformer', shards[0]!)).mtimeMs;
      rmSync(victim);
      rmSync(join(a, '.complete'));
      const log: string[] = [];
      expect(await randomModelFolder(rootA, spec(40_000), (s) => log.push(s))).toBe(a);
      expect(Buffer.compare(readFileSync(victim), before)).toBe(0);
      expect(statSync(join(a, 'transformer', shards[0]!)).mtimeMs).toBe(keptMtime);
      expect(log.filter((l) => l.includes('already written')).length).toBeGreaterThanOrEqual(shards.length - 1 + 2);
    } finally {
      rmSync(rootA, { recursive: true, force: true });
      rmSync(rootB, { recursive: true, force: true });
    }
  });

  it('gives the same bytes whatever the write chunk (odd element counts across chunk boundaries)', async () => {
    const root = mkdtempSync(join(tmpdir(), 'sd-rms-c-'));
    try {
      const mk = (): StreamedTensor[] => {
        // a producer that counts: element i of tensor t is (t * 1000 + i) & 0xffff, so misplaced bytes show
        return [5, 7, 1, 12].map((n, t) => {
          let i = 0;
          return {
            key: `t${t}`,
            dtype: 'BF16' as const,
            shape: [n],
            produce: (dst: Uint8Array) => {
              const v = new Uint16Array(dst.buffer, dst.byteOffset, dst.byteLength / 2);
              for (let k = 0; k < v.length; k++) v[k] = (t * 1000 + i++) & 0xffff;
            },
          };
        });
      };
      await writeSafetensorsStreamed(join(root, 'big.safetensors'), mk());
      await writeSafetensorsStreamed(join(root, 'small.safetensors'), mk(), undefined, 8);
      expect(Buffer.compare(readFileSync(join(root, 'big.safetensors')), readFileSync(join(root, 'small.safetensors')))).toBe(0);
      const ck = await Checkpoint.open(join(root, 'small.safetensors'));
      expect([...new Uint16Array((await ck.read('t1')).slice().buffer)]).toEqual([1000, 1001, 1002, 1003, 1004, 1005, 1006]);
      await ck.close();
      // the random generator: its small tensors (odd element counts among them) cut into 8-byte writes
      // equal the same tensors written whole (the spare half of a 32-bit draw carries over)
      const vae = new WanVaeDecoder(vaeDimsFromConfig(parseVaeConfig({ ...WAN_VAE, base_dim: 8 })));
      const pick = () => randomStreamedTensors(vae, 7, 'vae', 'bf16').filter((t) => t.shape.reduce((x, y) => x * y, 1) < 600);
      expect(pick().some((t) => t.shape.reduce((x, y) => x * y, 1) % 2 === 1)).toBe(true);
      await writeSafetensorsStreamed(join(root, 'r-big.safetensors'), pick());
      await writeSafetensorsStreamed(join(root, 'r-small.safetensors'), pick(), undefined, 8);
      expect(Buffer.compare(readFileSync(join(root, 'r-big.safetensors')), readFileSync(join(root, 'r-small.safetensors')))).toBe(0);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  it('normalQuantile is the standard normal quantile', () => {
    expect(normalQuantile(0.5)).toBeCloseTo(0, 9);
    expect(normalQuantile(0.975)).toBeCloseTo(1.959964, 5);
    expect(normalQuantile(0.001)).toBeCloseTo(-3.090232, 5);
    expect(normalQuantile(0.5 / 65536)).toBeCloseTo(-4.3249, 3);
  });
});
