// Element types of the engine. PyTorch names; bf16 has no WGSL type, so it is stored as 16-bit
// words and widened to f32 inside the kernels (`bitcast<f32>(u32(bits) << 16)`).

export type DType = 'f32' | 'f16' | 'bf16' | 'i32' | 'u32';

/** Bytes per element. */
export function dtypeSize(dt: DType): number {
  switch (dt) {
    case 'f32':
    case 'i32':
    case 'u32':
      return 4;
    case 'f16':
    case 'bf16':
      return 2;
  }
}

/**
 * The code kernels use for a storage dtype in `override` constants (`W_DTYPE`, `X_DTYPE`):
 * 0 = f32, 1 = f16, 2 = bf16. Buffers of 16-bit types are bound as `array<u32>` and unpacked.
 */
export function dtypeCode(dt: DType): number {
  switch (dt) {
    case 'f32':
      return 0;
    case 'f16':
      return 1;
    case 'bf16':
      return 2;
    default:
      throw new Error(`[dtype] ${dt} has no float storage code`);
  }
}

// ---- host conversions (exact, round-to-nearest-even) ----

const f32buf = new Float32Array(1);
const u32buf = new Uint32Array(f32buf.buffer);

/** f32 -> bf16 bits, round to nearest even; NaN stays NaN. */
export function f32ToBf16Bits(x: number): number {
  f32buf[0] = x;
  const u = u32buf[0]!;
  if ((u & 0x7f800000) === 0x7f800000 && (u & 0x7fffff) !== 0) return ((u >>> 16) | 0x40) & 0xffff;
  const lsb = (u >>> 16) & 1;
  return ((u + 0x7fff + lsb) >>> 16) & 0xffff;
}

/** f32 -> IEEE half bits, round to nearest even, overflow to inf. */
export function f32ToF16Bits(x: number): number {
  f32buf[0] = x;
  const u = u32buf[0]!;
  const sign = (u >>> 16) & 0x8000;
  const exp = (u >>> 23) & 0xff;
  let mant = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rem = mant & ((1 << shift) - 1);
    let m = mant >>> shift;
    if (rem > half || (rem === half && (m & 1))) m++;
    return sign | m;
  }
  const rem = mant & 0x1fff;
  let m = mant >>> 13;
  if (rem > 0x1000 || (rem === 0x1000 && (m & 1))) {
    m++;
    if (m === 0x400) {
      m = 0;
      e++;
      if (e >= 0x1f) return sign | 0x7c00;
    }
  }
  return sign | (e << 10) | m;
}

export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 0x1f) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

/** Encode float values into the raw bytes of `dt` (f32/f16/bf16) or ints (i32/u32). */
export function encode(dt: DType, values: ArrayLike<number>): Uint8Array {
  const n = values.length;
  switch (dt) {
    case 'f32':
      return new Uint8Array(Float32Array.from(values).buffer);
    case 'i32':
      return new Uint8Array(Int32Array.from(values).buffer);
    case 'u32':
      return new Uint8Array(Uint32Array.from(values).buffer);
    case 'f16': {
      const out = new Uint16Array(n);
      for (let i = 0; i < n; i++) out[i] = f32ToF16Bits(values[i]!);
      return new Uint8Array(out.buffer);
    }
    case 'bf16': {
      const out = new Uint16Array(n);
      for (let i = 0; i < n; i++) out[i] = f32ToBf16Bits(values[i]!);
      return new Uint8Array(out.buffer);
    }
  }
}

/** Decode raw bytes of `dt` into f32 (floats) or Int32/Uint32 arrays (ints). */
export function decode(dt: DType, bytes: Uint8Array, n: number): Float32Array | Int32Array | Uint32Array {
  // copy to an aligned buffer first: `bytes` may start at any offset
  const aligned = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
  switch (dt) {
    case 'f32':
      return new Float32Array(aligned.buffer, aligned.byteOffset, n).slice();
    case 'i32':
      return new Int32Array(aligned.buffer, aligned.byteOffset, n).slice();
    case 'u32':
      return new Uint32Array(aligned.buffer, aligned.byteOffset, n).slice();
    case 'f16':
    case 'bf16': {
      const src = new Uint16Array(aligned.buffer, aligned.byteOffset, n);
      const out = new Float32Array(n);
      if (dt === 'bf16') {
        const ou = new Uint32Array(out.buffer);
        for (let i = 0; i < n; i++) ou[i] = src[i]! << 16;
      } else {
        for (let i = 0; i < n; i++) out[i] = f16BitsToF32(src[i]!);
      }
      return out;
    }
  }
}
