// Builds the bytes of a kernel's `Params` uniform: a struct of plain 4-byte scalars (u32/i32/f32)
// in declaration order, padded to 16 bytes as WGSL's uniform layout requires.

export class Params {
  private readonly view: DataView;
  private readonly buf: ArrayBuffer;
  private n = 0;
  constructor(maxFields = 60) {
    this.buf = new ArrayBuffer(maxFields * 4);
    this.view = new DataView(this.buf);
  }
  u32(v: number): this {
    if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new RangeError(`[params] u32 field ${this.n} out of range: ${v}`);
    this.view.setUint32(this.n++ * 4, v, true);
    return this;
  }
  i32(v: number): this {
    if (!Number.isInteger(v) || v < -0x80000000 || v > 0x7fffffff) throw new RangeError(`[params] i32 field ${this.n} out of range: ${v}`);
    this.view.setInt32(this.n++ * 4, v, true);
    return this;
  }
  f32(v: number): this {
    this.view.setFloat32(this.n++ * 4, v, true);
    return this;
  }
  bytes(): Uint8Array {
    const len = Math.max(16, Math.ceil((this.n * 4) / 16) * 16);
    return new Uint8Array(this.buf, 0, len);
  }
}

/** Shorthand: all-u32 params. */
export function u32Params(...v: number[]): Uint8Array {
  const p = new Params(Math.max(4, v.length));
  for (const x of v) p.u32(x);
  return p.bytes();
}
