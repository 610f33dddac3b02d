// Non-finite detection: the count_nonfinite kernel against its CPU twin (odd sizes, f32/f16/bf16,
// NaN/±Inf planted among denormals and the largest finite values, views, binding windows, chained
// counts); the weight scan at load (the key and the file named); the pipeline's checks (latents
// after a step, the decoded video) with the tiny model.
import { describe, it, expect } from 'vitest';
import { getEngine, Rng } from './helpers/gpu.ts';
import { countNonFinite } from '../src/ops/finite.ts';
import { scanNonFinite } from '../src/ops/cpu/finite.ts';
import { Tensor } from '../src/tensor/tensor.ts';
import { f32ToBf16Bits, f32ToF16Bits } from '../src/tensor/dtype.ts';
import { join } from 'node:path';
import { tinyModelWithTokenizer } from './helpers/models.ts';
import { Checkpoint } from '../src/io/checkpoint.ts';
import { writeSafetensors, type StDType } from '../src/io/safetensors.ts';
import { WanPipeline, pipelineTestHooks, type PipelineNonFiniteError, type WanPipelineOptions } from '../src/pipeline/wan-pipeline.ts';
import { CheckpointError } from '../src/util/errors.ts';
import { NonFiniteError } from '../src/util/non-finite.ts';

type FDt = 'f32' | 'f16' | 'bf16';

/** bit patterns per dtype: non-finite ones (must count) and edge finite ones (must not) */
const BAD: Record<FDt, number[]> = {
  f32: [0x7fc00000, 0xffc00000, 0x7f800001, 0x7fffffff, 0x7f800000, 0xff800000],
  f16: [0x7e00, 0xfe00, 0x7c01, 0x7fff, 0x7c00, 0xfc00],
  bf16: [0x7fc0, 0xffc0, 0x7f81, 0x7fff, 0x7f80, 0xff80],
};
const EDGE: Record<FDt, number[]> = {
  // denormals, ±largest finite, ±0, ±smallest normal
  f32: [0x00000001, 0x807fffff, 0x7f7fffff, 0xff7fffff, 0x00000000, 0x80000000, 0x00800000],
  f16: [0x0001, 0x83ff, 0x7bff, 0xfbff, 0x0000, 0x8000, 0x0400],
  bf16: [0x0001, 0x807f, 0x7f7f, 0xff7f, 0x0000, 0x8000, 0x0080],
};

/** n random finite values of `dt` with `nBad` non-finite and some edge values planted at distinct random positions */
function planted(rng: Rng, n: number, dt: FDt, nBad: number): { data: Float32Array | Uint16Array; bad: number } {
  const data = dt === 'f32' ? new Float32Array(n) : new Uint16Array(n);
  for (let i = 0; i < n; i++) {
    const v = rng.normal() * 1e3;
    if (dt === 'f32') (data as Float32Array)[i] = v;
    else data[i] = dt === 'f16' ? f32ToF16Bits(v) : f32ToBf16Bits(v);
  }
  const bits = dt === 'f32' ? new Uint32Array(data.buffer) : (data as Uint16Array);
  const pos = new Set<number>();
  const take = (): number => {
    for (;;) {
      const p = Math.floor(rng.next() * n);
      if (!pos.has(p)) return pos.add(p), p;
    }
  };
  const b = Math.min(nBad, n);
  for (let k = 0; k < b; k++) bits[take()] = BAD[dt][k % BAD[dt].length]!;
  for (let k = 0; k < EDGE[dt].length && pos.size < n; k++) bits[take()] = EDGE[dt][k]!;
  return { data, bad: b };
}

const SIZES = [0, 1, 2, 3, 33, 65, 1025, 4099, 70001];

describe('count_nonfinite kernel vs CPU', () => {
  for (const dt of ['f32', 'f16', 'bf16'] as FDt[]) {
    it(`${dt}: odd sizes, NaN/±Inf planted among denormals and the largest finite values`, async () => {
      const e = await getEngine();
      const rng = new Rng(dt === 'f32' ? 11 : dt === 'f16' ? 12 : 13);
      for (const n of SIZES) {
        for (const nBad of [0, 1, 7, 40]) {
          const { data, bad } = planted(rng, n, dt, nBad);
          const cpu = Tensor.cpu(data, [n], dt);
          const ref = countNonFinite(cpu).hostValues()[0];
          expect(ref, `${dt} n=${n} cpu`).toBe(bad);
          const g = cpu.toGpu(e);
          const y = countNonFinite(g);
          expect(y.dtype).toBe('u32');
          expect((await y.toArray())[0], `${dt} n=${n} bad=${nBad}`).toBe(bad);
          y.dispose();
          g.dispose();
        }
      }
    });

    it(`${dt}: views at odd offsets, binding windows and chained counts`, async () => {
      const e = await getEngine();
      const rng = new Rng(dt === 'f32' ? 21 : dt === 'f16' ? 22 : 23);
      const n = 4099;
      const { data } = planted(rng, n, dt, 300);
      const g = Tensor.cpu(data, [n], dt).toGpu(e);
      for (const [s, t] of [[1, 2], [3, 4098], [1000, 1001], [7, 4099], [0, 33]] as Array<[number, number]>) {
        const v = g.narrow0(s, t);
        const want = scanNonFinite(dt === 'f32' ? (data as Float32Array).subarray(s, t) : (data as Uint16Array).subarray(s, t), dt).count;
        for (const maxBindingBytes of [undefined, 1024]) {
          const y = countNonFinite(v, undefined, { maxBindingBytes });
          expect((await y.toArray())[0], `${dt} view [${s}, ${t}) limit ${maxBindingBytes}`).toBe(want);
          y.dispose();
        }
        v.dispose();
      }
      // a chain: count(x[a]) + count(x[b]) + count(x) read once
      const a = g.narrow0(0, 1500);
      const b = g.narrow0(1500, n);
      const c1 = countNonFinite(a);
      const c2 = countNonFinite(b, c1);
      const c3 = countNonFinite(g, c2, { maxBindingBytes: 1024 });
      const total = scanNonFinite(data, dt).count;
      expect(total).toBe(300);
      expect((await c3.toArray())[0]).toBe(2 * total);
      // the CPU twin chains the same way
      const cc = countNonFinite(Tensor.cpu(data, [n], dt), Tensor.cpu(new Uint32Array([5]), [1], 'u32'));
      expect(cc.hostValues()[0]).toBe(total + 5);
      for (const t of [a, b, c1, c2, c3, g]) t.dispose();
    });
  }

  it('host scan handles unaligned 16-bit data and counts every half', () => {
    const buf = new Uint16Array(11);
    buf.set([0x7c00, 0, 0x7c00, 0x7c00, 0x3c00, 0, 0, 0, 0, 0xfe00, 0x7c00]);
    for (let s = 0; s < 4; s++) {
      const v = buf.subarray(s);
      let want = 0;
      let first = -1;
      v.forEach((h, i) => {
        if ((h & 0x7c00) === 0x7c00) (want++, first < 0 && (first = i));
      });
      expect(scanNonFinite(v, 'f16'), `offset ${s}`).toEqual({ count: want, first });
    }
  });

  it('rejects integer tensors and a non-scalar acc', async () => {
    expect(() => countNonFinite(Tensor.cpu(new Int32Array(3), [3], 'i32'))).toThrow(/\[count_nonfinite\] x must be f32\/f16\/bf16, got i32/);
    expect(() => countNonFinite(Tensor.cpu(new Float32Array(3), [3]), Tensor.cpu(new Uint32Array(2), [2], 'u32'))).toThrow(/acc must be one u32/);
  });
});

// ---------------------------------------------------------------- load-time scan and pipeline checks

/** Rewrite tensor `key` of a component's safetensors file: `edit` gets its f32 values (or replace it by `replace`). */
async function editTensor(dir: string, comp: string, key: string, edit: ((v: Float32Array) => void) | { dtype: StDType; data: Uint8Array }): Promise<void> {
  const src = await Checkpoint.open(join(dir, comp));
  const file = src.files()[0]!;
  const tensors = [];
  let found = false;
  for (const k of src.keys()) {
    const info = src.info(k);
    let data = await src.read(k);
    let dtype = info.dtype;
    if (k === key) {
      found = true;
      if (typeof edit === 'function') {
        const v = new Float32Array(data.slice().buffer);
        edit(v);
        data = new Uint8Array(v.buffer);
      } else ({ dtype, data } = edit);
    }
    tensors.push({ key: k, dtype, shape: info.shape, data });
  }
  await src.close();
  if (!found) throw new Error(`test: no tensor ${key} in ${comp}`);
  await writeSafetensors(file, tensors);
}

/** alternating ±3e38: finite, but any dot product with it overflows */
const huge = (v: Float32Array) => v.forEach((_, i) => (v[i] = i % 2 ? -3e38 : 3e38));

async function pipeline(dir: string, opts: WanPipelineOptions = {}) {
  const e = await getEngine();
  return WanPipeline.fromPretrained(dir, { engine: e, promptCache: false, ...opts });
}

async function generateError(dir: string, opts: WanPipelineOptions = {}, steps = 3): Promise<PipelineNonFiniteError> {
  const pipe = await pipeline(dir, opts);
  try {
    await pipe.generate({ prompt: 'a red circle moving right', seed: 7, numInferenceSteps: steps });
  } catch (err) {
    return err as PipelineNonFiniteError;
  } finally {
    pipe.dispose();
  }
  throw new Error('test: generate did not fail');
}

function allFinite(v: Float32Array): boolean {
  return scanNonFinite(v, 'f32').count === 0;
}

describe('weights: non-finite values and wrong dtypes are refused at load, naming the key and the file', () => {
  it('NaN in a DiT weight', async () => {
    const dir = tinyModelWithTokenizer();
    await editTensor(dir, 'transformer', 'blocks.0.ffn.net.0.proj.weight', (v) => {
      for (let k = 0; k < 17; k++) v[(k * 1931) % v.length] = NaN;
    });
    const p = pipeline(dir);
    await expect(p).rejects.toThrow(CheckpointError);
    await expect(pipeline(dir)).rejects.toThrow(
      /^\[checkpoint\] \S*transformer\/diffusion_pytorch_model\.safetensors: tensor 'blocks\.0\.ffn\.net\.0\.proj\.weight' \[256, 128\] F32 has 17 non-finite values \(NaN\/Inf; the first at flat index 0: NaN\); the file is corrupt: re-download it/,
    );
  });

  it('+Inf in a VAE weight, at load also when the VAE stays in host memory (level 3)', async () => {
    const dir = tinyModelWithTokenizer();
    await editTensor(dir, 'vae', 'decoder.conv_out.bias', (v) => (v[2] = Infinity));
    for (const lowMemLevel of [0, 3]) {
      await expect(pipeline(dir, { lowMemLevel })).rejects.toThrow(
        /\[checkpoint\] \S*vae\/diffusion_pytorch_model\.safetensors: tensor 'decoder\.conv_out\.bias' \[3\] F32 has 1 non-finite value \(NaN\/Inf; the first at flat index 2: \+Inf\)/,
      );
    }
  });

  it('-Inf in a text-encoder weight on the CPU device (level 2)', async () => {
    const dir = tinyModelWithTokenizer();
    await editTensor(dir, 'text_encoder', 'encoder.final_layer_norm.weight', (v) => (v[5] = -Infinity));
    await expect(pipeline(dir, { lowMemLevel: 2 })).rejects.toThrow(/text_encoder\/\S+\.safetensors: tensor 'encoder\.final_layer_norm\.weight' \[64\] F32 has 1 non-finite value \(NaN\/Inf; the first at flat index 5: -Inf\)/);
  });

  it('an I32 tensor where a float weight is expected: key, file and the expected dtype', async () => {
    const dir = tinyModelWithTokenizer();
    await editTensor(dir, 'transformer', 'blocks.0.ffn.net.0.proj.bias', { dtype: 'I32', data: new Uint8Array(256 * 4) });
    await expect(pipeline(dir)).rejects.toThrow(
      /^\[checkpoint\] dit: tensor 'blocks\.0\.ffn\.net\.0\.proj\.bias' in \S*transformer\/diffusion_pytorch_model\.safetensors is I32, expected a float tensor \(F32, F16 or BF16; used as f32\); the file does not match the model/,
    );
  });

  it('a weight beyond f16 range with infer.weight_dtype=f16 is named (it would become Inf)', async () => {
    const e = await getEngine();
    if (!e.caps.shaderF16) return;
    const dir = tinyModelWithTokenizer();
    await editTensor(dir, 'transformer', 'blocks.0.ffn.net.0.proj.weight', (v) => (v[3] = 1e6));
    await expect(pipeline(dir, { weightDtype: 'f16' })).rejects.toThrow(/\[load\] dit: tensor 'blocks\.0\.ffn\.net\.0\.proj\.weight' .* beyond f16's range .* infer\.weight_dtype=checkpoint/);
  });
});

describe('pipeline: non-finite values at run time are a NonFiniteError naming the phase and the step', () => {
  it('a huge (finite) DiT weight: the DiT output overflows at step 1; the initial noise is attached', async () => {
    const dir = tinyModelWithTokenizer();
    await editTensor(dir, 'transformer', 'proj_out.weight', huge);
    const err = await generateError(dir);
    expect(err).toBeInstanceOf(NonFiniteError);
    expect(err.code).toBe('NON_FINITE');
    expect(err.message).toMatch(/^\[denoise\] step 1\/3: the DiT output \(the predicted flow, both CFG passes\) has [\d,]+ non-finite values \(NaN\/Inf\) of 6,144; .*check the transformer weights/);
    expect(err.message.split('\n')).toHaveLength(1);
    expect(err).toMatchObject({ phase: 'denoise', where: 'dit', step: 1, totalSteps: 3, latentsStep: 0 });
    expect(err.latents!.shape).toEqual([16, 3, 8, 8]);
    // step 1's input is the seeded noise, exactly
    expect(err.latents!.data).toEqual(new Rng(7).fillNormal(new Float32Array(16 * 3 * 8 * 8)));
  });

  it('NaN planted in the DiT output of step 2: the latents after step 1 are attached', async () => {
    const dir = tinyModelWithTokenizer();
    const e = await getEngine();
    pipelineTestHooks.afterDitForward = (out, step) => {
      if (step !== 2) return out;
      // one NaN in the unconditional pass's half, replacing the output tensor
      const bad = e.empty(out.shape, out.dtype);
      e.copyBuffer(out.buffer, out.byteOffset, bad.buffer, 0, out.nbytes);
      e.write(bad.narrow0(1, 2).reshape([-1]).narrow0(100, 101), new Float32Array([NaN]));
      out.dispose();
      return bad;
    };
    try {
      const err = await generateError(dir);
      expect(err.message).toMatch(/^\[denoise\] step 2\/3: the DiT output .* has 1 non-finite values \(NaN\/Inf\) of 6,144; .*\(after step 1 of 3\)/);
      expect(err).toMatchObject({ phase: 'denoise', step: 2, latentsStep: 1 });
      expect(allFinite(err.latents!.data)).toBe(true);
      expect(err.latents!.data).not.toEqual(new Rng(7).fillNormal(new Float32Array(16 * 3 * 8 * 8)));
    } finally {
      delete pipelineTestHooks.afterDitForward;
    }
  });

  it('a huge text-encoder norm weight: the context overflows, caught after the encode', async () => {
    const dir = tinyModelWithTokenizer();
    await editTensor(dir, 'text_encoder', 'encoder.final_layer_norm.weight', (v) => v.fill(3e38));
    const err = await generateError(dir);
    expect(err).toBeInstanceOf(NonFiniteError);
    expect(err.message).toMatch(/^\[encode\] the text encoder's output \(context\) for the prompt "a red circle moving right" has [\d,]+ non-finite values/);
    expect(err).toMatchObject({ phase: 'encode', where: 'text_encoder' });
  });

  for (const vaeTiling of [true, false]) {
    it(`a huge VAE weight: the decoded video overflows (${vaeTiling ? 'tiled, GPU count' : 'untiled, host scan'})`, async () => {
      const dir = tinyModelWithTokenizer();
      await editTensor(dir, 'vae', 'decoder.conv_out.weight', huge);
      const err = await generateError(dir, { lowMemLevel: 1, vaeTiling, vaeTileSize: vaeTiling ? 8 : 0 }, 2);
      expect(err).toBeInstanceOf(NonFiniteError);
      expect(err.message).toMatch(/^\[decode\] the VAE decoder's output has [\d,]+ non-finite values \(NaN\/Inf\) of [\d,]+ in the decod.*check the vae weights/);
      expect(err).toMatchObject({ phase: 'decode', where: 'vae' });
      expect(allFinite(err.latents!.data)).toBe(true);
    });
  }
});
