// Basic layers. Field names are the checkpoint's (`weight`, `bias`), so keys fall out of the tree.

import { Module, Param, type ParamPolicy } from './module.ts';
import type { Tensor } from '../tensor/tensor.ts';
import type { DType } from '../tensor/dtype.ts';
import { linear } from '../ops/matmul.ts';
import { layerNorm, rmsNorm } from '../ops/norm.ts';

export class Linear extends Module {
  readonly weight: Param;
  readonly bias: Param | null;
  constructor(
    readonly inFeatures: number,
    readonly outFeatures: number,
    opts: { bias?: boolean; biasPolicy?: ParamPolicy } = {},
  ) {
    super();
    this.weight = this.param('weight', [outFeatures, inFeatures]);
    this.bias = opts.bias === false ? null : this.param('bias', [outFeatures], opts.biasPolicy ?? 'f32');
  }
  forward(x: Tensor, act: 'none' | 'gelu' | 'silu' = 'none', out?: DType): Tensor {
    return linear(x, this.weight.t, { bias: this.bias?.t, act, out });
  }
}

/** LayerNorm with optional affine parameters (`weight`, `bias`), over the last dim. */
export class LayerNorm extends Module {
  readonly weight: Param | null;
  readonly bias: Param | null;
  constructor(
    readonly dim: number,
    readonly eps: number,
    affine: boolean,
  ) {
    super();
    this.weight = affine ? this.param('weight', [dim], 'f32') : null;
    this.bias = affine ? this.param('bias', [dim], 'f32') : null;
  }
  forward(x: Tensor, mod?: { shift: Tensor; scale: Tensor }): Tensor {
    return layerNorm({ x, weight: this.weight?.t, bias: this.bias?.t, shift: mod?.shift, scale: mod?.scale }, { eps: this.eps });
  }
}

/** RMSNorm over the last dim with a `weight` (T5 layer norm; Wan q/k norm across heads). */
export class RMSNorm extends Module {
  readonly weight: Param;
  constructor(
    readonly dim: number,
    readonly eps: number,
  ) {
    super();
    this.weight = this.param('weight', [dim], 'f32');
  }
  forward(x: Tensor): Tensor {
    return rmsNorm({ x, weight: this.weight.t }, { eps: this.eps });
  }
}
