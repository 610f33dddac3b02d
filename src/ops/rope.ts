// Wan rotary position embedding (kernels/rope.wgsl). x [B, L, H, Dh] with cos/sin tables
// [L, Dh/2] f32; complex pairs are adjacent elements (2i, 2i+1) (Wan's rope_apply on
// view_as_complex of [..., Dh/2, 2]). The tables hold Wan's 3-axis angles ([t | h | w] pairs);
// building them is the model's job (dit.rope_cos / dit.rope_sin in the goldens).

import { defineOp, grid1d, expectDtype } from './registry.ts';
import { actAlias } from './common.ts';
import { bindingLimit, elemWindow, rowChunks, windowSlack } from './window.ts';
import { Tensor, shapeStr } from '../tensor/tensor.ts';
import { type DType, dtypeSize } from '../tensor/dtype.ts';
import { ShapeError } from '../util/errors.ts';

export interface RopeAttrs {
  out?: DType;
  /** tests only: plan as if the binding limit were this many bytes */
  maxBindingBytes?: number;
}

const WG = 64;

export const ropeOp = defineOp<{ x: Tensor; cos: Tensor; sin: Tensor }, RopeAttrs | undefined>({
  name: 'rope',
  family: 'rope',
  check({ x, cos, sin }, a) {
    actAlias('rope', x.dtype);
    actAlias('rope', a?.out ?? x.dtype);
    if (x.rank !== 4) throw new ShapeError(`[rope] x must be [B, L, H, Dh], got ${x}`);
    const [, L, , Dh] = x.shape as [number, number, number, number];
    if (Dh % 2 !== 0) throw new ShapeError(`[rope] head dim ${Dh} must be even (complex pairs)`);
    for (const [k, t] of [['cos', cos], ['sin', sin]] as const) {
      expectDtype('rope', k, t, ['f32']);
      if (t.rank !== 2 || t.shape[0] !== L || t.shape[1] !== Dh / 2) {
        throw new ShapeError(`[rope] ${k} ${shapeStr(t.shape)} must be [L, Dh/2] = [${L}, ${Dh / 2}] for x ${shapeStr(x.shape)}`);
      }
    }
  },
  gpu(e, { x, cos, sin }, a) {
    const outDt = a?.out ?? x.dtype;
    const y = e.empty(x.shape, outDt);
    const [B, L, H, Dh] = x.shape as [number, number, number, number];
    const rows = B * L;
    const P2 = Dh / 2;
    if (x.numel === 0) return y;
    const limit = bindingLimit(e, a?.maxBindingBytes);
    if (cos.nbytes + windowSlack(e) > limit) throw new ShapeError(`[rope] the cos/sin tables (${cos.nbytes} bytes each) exceed the binding limit ${limit}`);
    const cw = elemWindow(e, cos, 0, cos.numel, 'rope');
    const sw = elemWindow(e, sin, 0, sin.numel, 'rope');
    if (cw.off !== sw.off) throw new ShapeError('[rope] cos and sin views are aligned differently; clone one of them');
    const rowElems = H * Dh;
    for (const [r0, r1] of rowChunks(e, 'rope', rows, [rowElems * dtypeSize(x.dtype), rowElems * dtypeSize(outDt)], limit)) {
      const n = r1 - r0;
      const xw = elemWindow(e, x, r0 * rowElems, r1 * rowElems, 'rope');
      const yw = elemWindow(e, y, r0 * rowElems, r1 * rowElems, 'rope');
      if (xw.off % 2 !== 0 || yw.off % 2 !== 0) throw new ShapeError(`[rope] ${x} is a view at an odd element offset; clone it`);
      e.dispatch({
        kernel: { family: 'rope', entry: 'rope', constants: { WG }, aliases: { x_t: actAlias('rope', x.dtype, e), y_t: actAlias('rope', outDt, e) }, layout: ['read', 'read', 'read', 'write'] },
        name: 'rope',
        params: { rows: n, seq: L, heads: H, pairs: P2, row0: r0, x_off: xw.off / 2, y_off: yw.off / 2, cs_off: cw.off },
        bindings: [xw.binding, cw.binding, sw.binding, yw.binding],
        workgroups: grid1d(Math.ceil((n * P2) / WG)),
      });
    }
    return y;
  },
  cpu({ x, cos, sin }, a) {
    const outDt = a?.out ?? x.dtype;
    const [B, L, H, Dh] = x.shape as [number, number, number, number];
    const P2 = Dh / 2;
    const xv = x.hostValues();
    const cv = cos.hostValues();
    const sv = sin.hostValues();
    const out = new Float32Array(x.numel);
    for (let b = 0; b < B; b++) {
      for (let l = 0; l < L; l++) {
        for (let h = 0; h < H; h++) {
          const o = ((b * L + l) * H + h) * Dh;
          for (let i = 0; i < P2; i++) {
            const re = xv[o + 2 * i]!;
            const im = xv[o + 2 * i + 1]!;
            const c = cv[l * P2 + i]!;
            const s = sv[l * P2 + i]!;
            // (re + i·im)·(c + i·s)
            out[o + 2 * i] = re * c - im * s;
            out[o + 2 * i + 1] = re * s + im * c;
          }
        }
      }
    }
    return Tensor.fromValues(out, x.shape, outDt);
  },
  flops: ({ x }) => x.numel * 3,
  bytes: ({ x, cos }, a) => x.numel * (dtypeSize(x.dtype) + dtypeSize(a?.out ?? x.dtype)) + 2 * cos.nbytes,
});

/** RoPE with optional attrs (the registered op is `ropeOp`). */
export const rope = Object.assign((inputs: { x: Tensor; cos: Tensor; sin: Tensor }, attrs?: RopeAttrs): Tensor => ropeOp(inputs, attrs), { def: ropeOp.def });
