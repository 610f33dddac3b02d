// Tensor.viewBytes: typed views into a packed tensor (how a block image and a GPU slot hand out their
// weights, pipeline/residency.ts) — same bytes, shared storage, and loud errors for offsets that
// misalign an element or views that run past the end.
import { describe, it, expect } from 'vitest';
import { Tensor } from '../src/tensor/tensor.ts';
import { engineOf } from '../src/runtime/engine.ts';
import { ShapeError } from '../src/util/errors.ts';
import { getEngine } from './helpers/gpu.ts';

/** 64 bytes 0..63 as a u32 CPU tensor [16] */
function packed(): Tensor {
  const bytes = new Uint8Array(64).map((_, i) => i);
  return Tensor.cpu(new Uint32Array(bytes.buffer), [16], 'u32');
}

describe('Tensor.viewBytes', () => {
  it('CPU: views the same bytes as another dtype and shape, without a copy', () => {
    const t = packed();
    const v = t.viewBytes(8, [2, 3], 'bf16');
    expect(v.shape).toEqual([2, 3]);
    expect(v.dtype).toBe('bf16');
    expect(Array.from(v.data as Uint16Array)).toEqual([0x0908, 0x0b0a, 0x0d0c, 0x0f0e, 0x1110, 0x1312]);
    expect(v.data!.buffer).toBe(t.data!.buffer);
    // a view of a view adds the offsets
    const w = t.narrow0(4, 16).viewBytes(4, [1], 'f32');
    expect(new Uint8Array(w.data!.buffer, w.data!.byteOffset, 4)).toEqual(new Uint8Array([20, 21, 22, 23]));
  });

  it('rejects misaligned offsets, views past the end, and bad offsets', () => {
    const t = packed();
    expect(() => t.viewBytes(2, [1], 'f32')).toThrow(ShapeError);
    expect(() => t.viewBytes(2, [1], 'f32')).toThrow(/\[viewBytes\] a f32 view .* byte offset 2 .* not a multiple of 4/);
    expect(() => t.viewBytes(1, [1], 'bf16')).toThrow(/not a multiple of 2/);
    expect(() => t.viewBytes(56, [3], 'f32')).toThrow(/\[viewBytes\] a f32 view \[3\] \(12 bytes\) at byte offset 56 runs past the end of .* \(64 bytes\)/);
    expect(() => t.viewBytes(0, [17], 'u32')).toThrow(/runs past the end/);
    expect(() => t.viewBytes(-4, [1], 'u32')).toThrow(/byte offset -4 .* must be an integer >= 0/);
    expect(() => t.viewBytes(4.5, [1], 'u32')).toThrow(/must be an integer >= 0/);
    expect(() => t.viewBytes(0, [-1], 'u32')).toThrow(/\[viewBytes\] invalid shape/);
    // the alignment is the storage's: a bf16 view at an odd element leaves f32 views misaligned
    const odd = t.viewBytes(2, [3], 'bf16');
    expect(() => odd.viewBytes(0, [1], 'f32')).toThrow(/starts at storage byte 2, not a multiple of 4/);
    expect(t.viewBytes(60, [1], 'f32').numel).toBe(1); // the last element fits
  });

  it('GPU: shares the storage (the bytes stay allocated while a view lives) and reads the same bytes', async () => {
    const e = await getEngine();
    const base = e.allocator.memoryAllocated();
    const src = packed();
    const t = e.fromHost(src.data!, [16], 'u32');
    const v = t.viewBytes(16, [4], 'u32');
    expect(engineOf(v)).toBe(e);
    expect(v.byteOffset).toBe(16);
    t.dispose();
    expect(e.allocator.memoryAllocated() - base).toBe(64); // the view keeps the block
    expect(Array.from(await v.toArray())).toEqual(Array.from(src.data!.subarray(4, 8)));
    expect(() => v.viewBytes(4, [4], 'u32')).toThrow(/runs past the end/);
    v.dispose();
    expect(e.allocator.memoryAllocated()).toBe(base);
    expect(() => v.viewBytes(0, [1], 'u32')).toThrow(/disposed/);
  });
});
