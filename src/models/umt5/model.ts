// UMT5 encoder (transformers `UMT5EncoderModel`), as Wan 2.1 uses it for text conditioning.
// Keys: shared.weight, encoder.block.N.layer.0.{layer_norm, SelfAttention.{q,k,v,o,relative_attention_bias}},
// encoder.block.N.layer.1.{layer_norm, DenseReluDense.{wi_0, wi_1, wo}}, encoder.final_layer_norm.
// Conventions (../shared/golden/README.md "UMT5"): RMSNorm (no mean subtraction), NO 1/sqrt(d_kv)
// scaling, a relative position bias per layer ([32 buckets, heads]) added to the scores,
// padded keys masked, gated-GELU(tanh) FFN `wo(gelu(wi_0 x) * wi_1 x)`, final RMSNorm.
//
// The same code runs on the GPU or on the CPU device: ops run where their inputs live. The token
// embedding table (2.1 GB in bf16 for UMT5-XXL) always stays in host memory: only the rows of the
// prompt are gathered and moved.

import { Module, ModuleList, Param, Container, ParamHolder } from '../../nn/module.ts';
import { Linear, RMSNorm } from '../../nn/layers.ts';
import { Tensor } from '../../tensor/tensor.ts';
import type { Engine } from '../../runtime/engine.ts';
import { attention } from '../../ops/attention.ts';
import { embedding } from '../../ops/gather.ts';
import { add, mul } from '../../ops/elementwise.ts';
import { relativeBucketsByOffset, relativeBiasTable } from './buckets.ts';
import { ShapeError } from '../../util/errors.ts';
import { RESIDENT, type BlockResidency } from '../../nn/residency.ts';
import type { Tracer } from '../../nn/trace.ts';
import type { T5Config } from '../../io/model-folder.ts';

export interface Umt5Dims {
  dModel: number;
  dKv: number;
  dFf: number;
  numHeads: number;
  numLayers: number;
  vocabSize: number;
  numBuckets: number;
  maxDistance: number;
  eps: number;
}

/** Dims from a parsed text_encoder/config.json (io/model-folder.ts checks the keys and `feed_forward_proj`). */
export function umt5DimsFromConfig(c: T5Config): Umt5Dims {
  return {
    dModel: c.d_model,
    dKv: c.d_kv,
    dFf: c.d_ff,
    numHeads: c.num_heads,
    numLayers: c.num_layers,
    vocabSize: c.vocab_size,
    numBuckets: c.relative_attention_num_buckets,
    maxDistance: c.relative_attention_max_distance,
    eps: c.layer_norm_epsilon,
  };
}

class SelfAttention extends Module {
  readonly q: Linear;
  readonly k: Linear;
  readonly v: Linear;
  readonly o: Linear;
  readonly relBias: Param;
  constructor(d: Umt5Dims) {
    super();
    const inner = d.numHeads * d.dKv;
    this.q = this.child('q', new Linear(d.dModel, inner, { bias: false }));
    this.k = this.child('k', new Linear(d.dModel, inner, { bias: false }));
    this.v = this.child('v', new Linear(d.dModel, inner, { bias: false }));
    this.o = this.child('o', new Linear(inner, d.dModel, { bias: false }));
    this.relBias = this.child('relative_attention_bias', new ParamHolder()).add('weight', [d.numBuckets, d.numHeads], 'f32');
  }
}

class Umt5Block extends Module {
  readonly ln0: RMSNorm;
  readonly attn: SelfAttention;
  readonly ln1: RMSNorm;
  readonly wi0: Linear;
  readonly wi1: Linear;
  readonly wo: Linear;
  constructor(readonly d: Umt5Dims) {
    super();
    const layer = this.child('layer', new Container());
    const l0 = layer.add('0', new Container());
    this.ln0 = l0.add('layer_norm', new RMSNorm(d.dModel, d.eps));
    this.attn = l0.add('SelfAttention', new SelfAttention(d));
    const l1 = layer.add('1', new Container());
    this.ln1 = l1.add('layer_norm', new RMSNorm(d.dModel, d.eps));
    const ff = l1.add('DenseReluDense', new Container());
    this.wi0 = ff.add('wi_0', new Linear(d.dModel, d.dFf, { bias: false }));
    this.wi1 = ff.add('wi_1', new Linear(d.dModel, d.dFf, { bias: false }));
    this.wo = ff.add('wo', new Linear(d.dFf, d.dModel, { bias: false }));
  }

  /** x [B, L, dModel]; relTable [H, 2L-1] this layer's relative bias by offset; mask [B, L] i32 */
  forward(x: Tensor, relTable: Tensor, mask: Tensor): Tensor {
    const [B, L] = x.shape as [number, number, number];
    const H = this.d.numHeads;
    // 1. self-attention with the relative position bias, no 1/sqrt(d) scaling
    const h = this.ln0.forward(x);
    const q = this.attn.q.forward(h).reshape([B, L, H, this.d.dKv]);
    const k = this.attn.k.forward(h).reshape([B, L, H, this.d.dKv]);
    const v = this.attn.v.forward(h).reshape([B, L, H, this.d.dKv]);
    const a = attention({ q, k, v, bias: relTable, keyMask: mask }, { scale: 1, biasMode: 'relative' }).reshape([B, L, H * this.d.dKv]);
    const x1 = add(x, this.attn.o.forward(a));
    // 2. gated-GELU FFN: wo(gelu(wi_0 x) * wi_1 x)
    const h2 = this.ln1.forward(x1);
    const g = mul(this.wi0.forward(h2, 'gelu'), this.wi1.forward(h2));
    return add(x1, this.wo.forward(g));
  }
}

export class UMT5EncoderModel extends Module {
  readonly shared: Param;
  readonly blocks: ModuleList<Umt5Block>;
  readonly finalNorm: RMSNorm;
  private relTables = new Map<string, Tensor[]>();

  constructor(readonly dims: Umt5Dims) {
    super();
    this.shared = this.child('shared', new ParamHolder()).add('weight', [dims.vocabSize, dims.dModel]);
    const enc = this.child('encoder', new Container());
    this.blocks = enc.add('block', new ModuleList(Array.from({ length: dims.numLayers }, () => new Umt5Block(dims))));
    this.finalNorm = enc.add('final_layer_norm', new RMSNorm(dims.dModel, dims.eps));
  }

  isBlockKey(key: string): boolean {
    return key.startsWith('encoder.block.');
  }

  /**
   * Parameters that live on the compute device: everything but the token embedding table (only the
   * prompt's rows are gathered on the host) and the relative-bias embeddings (host-side inputs of
   * the per-layer bias tables).
   */
  isDeviceKey(key: string): boolean {
    return key !== 'shared.weight' && !key.endsWith('relative_attention_bias.weight');
  }

  /**
   * infer.weights_source=disk: the keys read from their files per use — the blocks' compute
   * weights and the token table (a prompt reads only its own rows: `tokenRows`).
   */
  isDiskKey(key: string): boolean {
    return (this.isBlockKey(key) && this.isDeviceKey(key)) || key === 'shared.weight';
  }

  /**
   * Set when the token table stays in its file (weights_source=disk): given the prompt's ids, the
   * rows they use as a small table [U, dModel] and the ids renumbered into it. The embedding then
   * gathers from that table: the same values as from the whole table.
   */
  tokenRows: ((ids: Int32Array) => Promise<{ table: Tensor; ids: Int32Array }>) | null = null;

  /** Per-layer relative bias tables [H, 2L-1], built once per length and device (the 4 most recent kept). */
  private tablesFor(L: number, engine: Engine | null): Tensor[] {
    const key = `${L}:${engine ? 'gpu' : 'cpu'}`;
    let t = this.relTables.get(key);
    if (!t) {
      const byRel = relativeBucketsByOffset(L, L, { numBuckets: this.dims.numBuckets, maxDistance: this.dims.maxDistance, bidirectional: true });
      t = this.blocks.items.map((b) => {
        const emb = b.attn.relBias.t.hostValues() as Float32Array;
        const tab = relativeBiasTable(byRel, emb, this.dims.numHeads);
        const host = Tensor.cpu(tab, [this.dims.numHeads, 2 * L - 1], 'f32');
        return engine ? engine.keep(host.toGpu(engine, 'text_encoder.relative_bias')) : host;
      });
      // prompts are encoded at their own length, so lengths vary: keep the few most recent
      if (this.relTables.size >= 4) {
        const [oldKey, old] = this.relTables.entries().next().value as [string, Tensor[]];
        for (const x of old) x.dispose();
        this.relTables.delete(oldKey);
      }
      this.relTables.set(key, t);
    }
    return t;
  }

  /** Drop cached bias tables (on unload). */
  disposeCaches(): void {
    for (const ts of this.relTables.values()) for (const t of ts) t.dispose();
    this.relTables.clear();
  }

  /**
   * ids, mask: [B, L] i32 CPU tensors. Runs on `engine` (GPU) or, with engine = null, on the CPU
   * device. Returns last_hidden_state [B, L, dModel] on the compute device.
   */
  async forward(engine: Engine | null, ids: Tensor, mask: Tensor, trace?: Tracer, residency: BlockResidency = RESIDENT): Promise<Tensor> {
    const [B, L] = ids.shape as [number, number];
    const run = async () => {
      // the relative-bias embeddings are tiny; they are read on the host to build the tables
      const tables = this.tablesFor(L, engine);
      let emb: Tensor;
      if (this.tokenRows) {
        const rows = await this.tokenRows(ids.data as Int32Array);
        emb = embedding({ ids: Tensor.cpu(rows.ids, [B * L], 'i32'), table: rows.table }, {});
      } else {
        const table = this.shared.t;
        emb = embedding({ ids: ids.reshape([B * L]), table: table.device === 'cpu' ? table : await table.toCpu() }, {});
      }
      let x = (engine ? emb.toGpu(engine) : emb).reshape([B, L, this.dims.dModel]);
      const m = engine ? mask.toGpu(engine) : mask;
      const n = this.blocks.length;
      await residency.acquire(0);
      for (let i = 0; i < n; i++) {
        if (i + 1 < n) residency.prefetch(i + 1);
        const blk = this.blocks.at(i);
        if (engine) {
          // one block's intermediates at a time on the GPU
          const prev = x;
          x = engine.scope(() => blk.forward(prev, tables[i]!, m));
          prev.dispose();
        } else x = blk.forward(x, tables[i]!, m);
        if (trace) await trace(`block${i}_out`, x);
        residency.release(i);
        if (i + 1 < n) await residency.acquire(i + 1);
      }
      return this.finalNorm.forward(x);
    };
    return engine ? engine.scopeAsync(run) : run();
  }
}
