// Loads a golden case folder (model folder + golden.json + golden.safetensors) for tests.
// Minimal whole-file reader for the small golden file; the production reader is src/io/safetensors.ts.
import { readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

export const TINY = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'golden', 'tiny');

export interface GoldenTensor {
  shape: number[];
  dtype: 'F32' | 'I32';
  data: Float32Array | Int32Array;
}

export interface GoldenCase {
  dir: string;
  json: any; // eslint-disable-line @typescript-eslint/no-explicit-any
  tensors: Map<string, GoldenTensor>;
  get(name: string): GoldenTensor;
}

const cache = new Map<string, GoldenCase>();

export function loadGolden(dir = TINY): GoldenCase {
  const hit = cache.get(dir);
  if (hit) return hit;
  const json = JSON.parse(readFileSync(join(dir, 'golden.json'), 'utf8'));
  const buf = readFileSync(join(dir, 'golden.safetensors'));
  const hlen = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + hlen).toString('utf8'));
  const base = 8 + hlen;
  const tensors = new Map<string, GoldenTensor>();
  for (const [k, v] of Object.entries(header as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>)) {
    if (k === '__metadata__') continue;
    const [s, e] = v.data_offsets;
    const bytes = buf.subarray(base + s, base + e);
    const copy = new Uint8Array(bytes.length);
    copy.set(bytes);
    const data = v.dtype === 'F32' ? new Float32Array(copy.buffer) : new Int32Array(copy.buffer);
    tensors.set(k, { shape: v.shape, dtype: v.dtype as 'F32' | 'I32', data });
  }
  const c: GoldenCase = {
    dir,
    json,
    tensors,
    get(name: string) {
      const t = tensors.get(name);
      if (!t) throw new Error(`golden tensor ${name} not in ${dir}`);
      return t;
    },
  };
  cache.set(dir, c);
  return c;
}
