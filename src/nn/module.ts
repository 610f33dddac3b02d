// Modules whose fields are named like the checkpoint keys, so loading is a tree walk and every
// error names the full key (candle's `vb.pp("...")` idea). A Param knows its key, its expected
// shape and its precision policy; its value is a Tensor on the GPU or on the CPU device.
//
// Precision policy (diffusers' declared policy for Wan): matmul weights stay in the checkpoint
// dtype (bf16 in real checkpoints: stored as 16-bit words, widened in the kernels); norms,
// modulation tables, biases of the time embedding and other small vectors are kept in f32.

import { Tensor, shapeStr, type Shape } from '../tensor/tensor.ts';
import type { DType } from '../tensor/dtype.ts';

/** 'checkpoint': keep the file's dtype (or the load-time weight dtype); 'f32': convert to f32. */
export type ParamPolicy = 'checkpoint' | 'f32';

export class Param {
  /** full dotted key, set when the module tree is walked */
  fullKey = '';
  value: Tensor | null = null;
  /**
   * A streamed param's host copy (a view of its block's host image), set while a residency manager
   * streams its block (pipeline/residency.ts): `value` is then either this or a view of a GPU slot.
   * Null for params that are not streamed.
   */
  streamHost: Tensor | null = null;
  /**
   * Where the param's bytes are on disk when it was loaded with placement 'disk' (infer.weights_source
   * =disk: read per use, pipeline/disk-weights.ts); its `value` is then a meta placeholder of its
   * target dtype between uses. Null otherwise.
   */
  disk: import('../pipeline/disk-weights.ts').DiskRef | null = null;
  constructor(
    readonly name: string,
    readonly shape: Shape,
    readonly policy: ParamPolicy = 'checkpoint',
  ) {}

  get t(): Tensor {
    if (!this.value) throw new Error(`[nn] parameter '${this.fullKey || this.name}' ${shapeStr(this.shape)} is not loaded (or its block is not resident)`);
    return this.value;
  }

  get loaded(): boolean {
    return this.value !== null;
  }

  /** bytes of the current value (0 if not loaded) */
  get nbytes(): number {
    return this.value?.nbytes ?? 0;
  }
}

export class Module {
  private readonly _params = new Map<string, Param>();
  private readonly _children = new Map<string, Module>();

  protected param(name: string, shape: Shape, policy: ParamPolicy = 'checkpoint'): Param {
    const p = new Param(name, shape, policy);
    this._params.set(name, p);
    return p;
  }

  protected child<M extends Module>(name: string, m: M): M {
    this._children.set(name, m);
    return m;
  }

  childModule(name: string): Module | undefined {
    return this._children.get(name);
  }

  /** Every parameter with its full key (prefix + dotted path), in declaration order. */
  namedParams(prefix = ''): Array<[string, Param]> {
    const out: Array<[string, Param]> = [];
    for (const [n, p] of this._params) {
      const key = prefix ? `${prefix}.${n}` : n;
      p.fullKey = key;
      out.push([key, p]);
    }
    for (const [n, c] of this._children) out.push(...c.namedParams(prefix ? `${prefix}.${n}` : n));
    return out;
  }

  /** Total bytes of loaded parameters. */
  paramBytes(): number {
    let n = 0;
    for (const [, p] of this.namedParams()) n += p.nbytes;
    return n;
  }

  /** Dispose every loaded parameter value. */
  disposeParams(): void {
    for (const [, p] of this.namedParams()) {
      p.value?.dispose();
      p.value = null;
    }
  }
}

/** A list of modules named 0, 1, 2... (checkpoint keys `blocks.0.…`). */
export class ModuleList<M extends Module> extends Module {
  readonly items: M[];
  constructor(items: M[]) {
    super();
    this.items = items;
    items.forEach((m, i) => this.child(String(i), m));
  }
  get length(): number {
    return this.items.length;
  }
  at(i: number): M {
    const m = this.items[i];
    if (!m) throw new Error(`[nn] index ${i} out of range (${this.items.length})`);
    return m;
  }
}

/** dtype a parameter ends up with, given the checkpoint dtype and the load options. */
export function targetDtype(p: Param, fileDtype: DType, weightDtype: DType | 'checkpoint'): DType {
  if (p.policy === 'f32') return 'f32';
  if (fileDtype === 'i32' || fileDtype === 'u32') return fileDtype;
  return weightDtype === 'checkpoint' ? fileDtype : weightDtype;
}

/** A module that only groups named children (checkpoint key levels such as `ffn.net`). */
export class Container extends Module {
  add<M extends Module>(name: string, m: M): M {
    return this.child(name, m);
  }
}

/** A module that only holds named parameters (e.g. a conv's `weight`/`bias` used through another op). */
export class ParamHolder extends Module {
  add(name: string, shape: readonly number[], policy: ParamPolicy = 'checkpoint'): Param {
    return this.param(name, shape, policy);
  }
}
