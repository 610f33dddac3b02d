// Embedding gather (kernels/gather.wgsl): ids [...] i32, table [V, D] f32 | f16 | bf16 ->
// [..., D] f32 (or attrs.out = 'f16').
//
// Out-of-range ids: the CPU reference throws `[embedding] id ... out of range`; the GPU kernel
// cannot throw, so it writes a zero row (check ids on the host when they come from users).
// Tables larger than one binding are bound in row windows (one dispatch per window).

import { defineOp, expectDtype } from './registry.ts';
import { actAlias } from './common.ts';
import { gridRows } from './layout.ts';
import { bindingLimit, elemWindow, rowChunks } from './window.ts';
import { Tensor, shapeStr } from '../tensor/tensor.ts';
import { type DType, dtypeCode, dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

export interface EmbeddingAttrs {
  out?: DType;
  /** tests only: plan as if the binding limit were this many bytes */
  maxBindingBytes?: number;
}

const WG = 64;

export const embeddingOp = defineOp<{ ids: Tensor; table: Tensor }, EmbeddingAttrs | undefined>({
  name: 'embedding',
  family: 'gather',
  check({ ids, table }, a) {
    expectDtype('embedding', 'ids', ids, ['i32']);
    expectDtype('embedding', 'table', table, ['f32', 'f16', 'bf16']);
    actAlias('embedding', a?.out ?? 'f32');
    if (table.rank !== 2) throw new ShapeError(`[embedding] table must be [V, D], got ${shapeStr(table.shape)}`);
  },
  gpu(e, { ids, table }, a) {
    const outDt = a?.out ?? 'f32';
    const [V, D] = table.shape as [number, number];
    const N = ids.numel;
    const y = e.empty([...ids.shape, D], outDt);
    if (N === 0 || D === 0) return y;
    if (V === 0) {
      e.fill(y, 0);
      return y;
    }
    const limit = bindingLimit(e, a?.maxBindingBytes);
    const tElt = dtypeSize(table.dtype);
    const rowChunksIds = rowChunks(e, 'embedding', N, [4, D * dtypeSize(outDt)], limit);
    const tableChunks = rowChunks(e, 'embedding', V, [D * tElt], limit);
    const kernel = {
      family: 'gather',
      entry: 'embedding',
      constants: { WG, T_DTYPE: dtypeCode(table.dtype) },
      aliases: { y_t: actAlias('embedding', outDt, e) },
      layout: ['read', 'read', 'write'] as Array<'read' | 'write'>,
    };
    for (const [n0, n1] of rowChunksIds) {
      const iw = elemWindow(e, ids, n0, n1, 'embedding');
      const yw = elemWindow(e, y, n0 * D, n1 * D, 'embedding');
      tableChunks.forEach(([v0, v1], k) => {
        const tw = elemWindow(e, table, v0 * D, v1 * D, 'embedding');
        e.dispatch({
          kernel,
          name: 'embedding',
          params: { rows: n1 - n0, d: D, v0, v1, vocab: V, t_off: tw.off, ids_off: iw.off, y_off: yw.off, zero_oob: k === 0 ? 1 : 0 },
          bindings: [iw.binding, tw.binding, yw.binding],
          workgroups: gridRows(Math.ceil(D / WG), n1 - n0),
        });
      });
    }
    return y;
  },
  cpu({ ids, table }, a) {
    const outDt = a?.out ?? 'f32';
    const [V, D] = table.shape as [number, number];
    const iv = ids.hostValues();
    const out = new Float32Array(ids.numel * D);
    for (let n = 0; n < iv.length; n++) {
      const id = iv[n]!;
      if (!(id >= 0 && id < V)) throw new ShapeError(`[embedding] id ${id} at position ${n} is out of range for a table of ${V} rows: the tokenizer and the text encoder come from different models; download tokenizer/ and text_encoder/ of the same model`);
      // only the gathered row is widened (UMT5-XXL's bf16 table is 2.1 GB: widening all of it per
      // prompt cost seconds)
      out.set(table.select0(id).hostValues(), n * D);
    }
    return Tensor.fromValues(out, [...ids.shape, D], outDt);
  },
  flops: () => 0,
  bytes: ({ ids, table }, a) => ids.nbytes + ids.numel * table.shape[1]! * (dtypeSize(table.dtype) + dtypeSize(a?.out ?? 'f32')),
});

/** Embedding lookup with optional attrs (the registered op is `embeddingOp`). */
export const embedding = Object.assign((inputs: { ids: Tensor; table: Tensor }, attrs?: EmbeddingAttrs): Tensor => embeddingOp(inputs, attrs), { def: embeddingOp.def });
