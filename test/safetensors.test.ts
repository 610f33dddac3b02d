// Safetensors reader/writer, sharded checkpoints, engine tensor conversion, strict loading,
// atomic writes. Bad files are generated in a temp folder, each checked for its exact error.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { mkdtempSync, writeFileSync, readFileSync, readdirSync, rmSync, mkdirSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SafetensorsFile, writeSafetensors, encodeSafetensorsHeader, MAX_HEADER_BYTES, type StDType } from '../src/io/safetensors.ts';
import { Checkpoint, readTensor, loadStrict, checkSpec } from '../src/io/checkpoint.ts';
import { writeFileAtomic, withAtomicFile, makeDirs } from '../src/io/atomic.ts';
import { checkWritable } from '../src/pipeline/outputs.ts';
import { PromptCache } from '../src/pipeline/prompt-cache.ts';
import { OutputError } from '../src/io/video.ts';
import { CheckpointError } from '../src/util/errors.ts';
import { f32ToBf16Bits, f32ToF16Bits } from '../src/tensor/dtype.ts';
import { TINY } from './helpers/golden.ts';

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'sd-safetensors-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** Raw file from a header object (any JSON, even invalid for the format) and a data region. */
function rawFile(name: string, header: unknown, data: Uint8Array | number = 0, opts: { headerText?: string; lengthOverride?: bigint } = {}): string {
  const json = new TextEncoder().encode(opts.headerText ?? JSON.stringify(header));
  const len = new Uint8Array(8);
  new DataView(len.buffer).setBigUint64(0, opts.lengthOverride ?? BigInt(json.byteLength), true);
  const body = typeof data === 'number' ? new Uint8Array(data) : data;
  const p = join(dir, name);
  writeFileSync(p, Buffer.concat([len, json, body]));
  return p;
}

async function openError(p: string): Promise<CheckpointError> {
  try {
    const f = await SafetensorsFile.open(p);
    await f.close();
  } catch (err) {
    expect(err).toBeInstanceOf(CheckpointError);
    expect((err as CheckpointError).code).toBe('BAD_CHECKPOINT');
    expect((err as Error).message).toContain(p);
    return err as CheckpointError;
  }
  throw new Error(`expected ${p} to fail`);
}

function f32bytes(v: number[]): Uint8Array {
  return new Uint8Array(Float32Array.from(v).buffer);
}

describe('safetensors: bad files', () => {
  it('empty / shorter than the 8-byte length', async () => {
    const p = join(dir, 'empty.safetensors');
    writeFileSync(p, new Uint8Array(3));
    expect((await openError(p)).message).toMatch(/has 3 bytes, too few for a safetensors header/);
  });
  it('header length beyond the file', async () => {
    const p = rawFile('hlen.safetensors', {}, 0, { lengthOverride: 5000n });
    expect((await openError(p)).message).toMatch(/header length 5000 runs past the end of the file \(10 bytes\)/);
  });
  it('absurd header length (over the 100 MB cap), with a pickle hint', async () => {
    const p = join(dir, 'zip.safetensors');
    const b = new Uint8Array(64);
    b.set([0x50, 0x4b, 0x03, 0x04, 0xff, 0xff, 0xff, 0x7f]);
    writeFileSync(p, b);
    const e = await openError(p);
    expect(e.message).toMatch(new RegExp(`exceeds the ${MAX_HEADER_BYTES}-byte cap`));
    expect(e.message).toMatch(/zip archive/);
  });
  it('malformed JSON header', async () => {
    const p = rawFile('badjson.safetensors', null, 0, { headerText: '{"a": {"dtype": "F32",' });
    expect((await openError(p)).message).toMatch(/malformed JSON header/);
  });
  it('header not starting with {', async () => {
    const p = rawFile('array.safetensors', null, 0, { headerText: '[1,2]' });
    expect((await openError(p)).message).toMatch(/does not start with '\{'/);
  });
  it('header starting with whitespace or empty (the spec: it must begin with {)', async () => {
    const p = rawFile('lead-ws.safetensors', null, 0, { headerText: ' {}' });
    expect((await openError(p)).message).toMatch(/does not start with '\{'/);
    const q = rawFile('empty-hdr.safetensors', null, 0, { headerText: '' });
    expect((await openError(q)).message).toMatch(/does not start with '\{'/);
  });
  it('trailing space padding after the header is accepted', async () => {
    const p = rawFile('pad.safetensors', null, 8, { headerText: '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}      ' });
    const f = await SafetensorsFile.open(p);
    expect(f.keys()).toEqual(['a']);
    await f.close();
  });
  it('duplicate tensor key in the header (JSON.parse would keep the last one)', async () => {
    const t = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}';
    const p = rawFile('dup.safetensors', null, 8, { headerText: `{"a":${t},"a":${t}}` });
    const m = (await openError(p)).message;
    expect(m).toMatch(/has the key 'a' twice/);
    expect(m.split('\n')).toHaveLength(1);
    // the same key spelled with an escape is the same key
    const q = rawFile('dup-esc.safetensors', null, 8, { headerText: `{"ab":${t},"a\\u0062":${t}}` });
    expect((await openError(q)).message).toMatch(/has the key 'ab' twice/);
    const r = rawFile('dup-meta.safetensors', null, 8, { headerText: `{"__metadata__":{"x":"1"},"a":${t},"__metadata__":{}}` });
    expect((await openError(r)).message).toMatch(/key '__metadata__' twice/);
  });
  it('duplicate field inside a tensor entry', async () => {
    const p = rawFile('dupfield.safetensors', null, 8, { headerText: '{"a":{"dtype":"F16","shape":[2],"dtype":"F32","data_offsets":[0,8]}}' });
    expect((await openError(p)).message).toMatch(/tensor 'a': the JSON header has the field 'dtype' twice/);
    const q = rawFile('dupmeta.safetensors', null, 8, { headerText: '{"__metadata__":{"format":"pt","format":"np"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}' });
    expect((await openError(q)).message).toMatch(/__metadata__: the JSON header has the field 'format' twice/);
  });
  it('same key names in different objects are not duplicates', async () => {
    const t = (b: number) => `{"dtype":"F32","shape":[2],"data_offsets":[${b},${b + 8}]}`;
    const p = rawFile('nodup.safetensors', null, 16, { headerText: `{"__metadata__":{"dtype":"x","a":"y"},"a":${t(0)},"b":${t(8)}}` });
    const f = await SafetensorsFile.open(p);
    expect(f.keys().sort()).toEqual(['a', 'b']);
    await f.close();
  });
  it('header not UTF-8', async () => {
    const p = join(dir, 'utf8.safetensors');
    const b = new Uint8Array(8 + 4);
    new DataView(b.buffer).setBigUint64(0, 4n, true);
    b.set([0x7b, 0xff, 0xfe, 0x7d], 8);
    writeFileSync(p, b);
    expect((await openError(p)).message).toMatch(/not valid UTF-8/);
  });
  it('overlapping offsets', async () => {
    const p = rawFile('overlap.safetensors', { a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] }, b: { dtype: 'F32', shape: [4], data_offsets: [8, 24] } }, 24);
    expect((await openError(p)).message).toMatch(/tensor 'b' \[8, 24\) overlaps tensor 'a' \[0, 16\)/);
  });
  it('gap between tensors', async () => {
    const p = rawFile('gap.safetensors', { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [12, 20] } }, 20);
    expect((await openError(p)).message).toMatch(/gap of 4 bytes between tensor 'a' \(ends at 8\) and tensor 'b'/);
  });
  it('data region not starting at 0', async () => {
    const p = rawFile('start.safetensors', { a: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } }, 12);
    expect((await openError(p)).message).toMatch(/first tensor 'a' begins at 4/);
  });
  it('byte size != shape x dtype size', async () => {
    const p = rawFile('size.safetensors', { w: { dtype: 'BF16', shape: [3, 4], data_offsets: [0, 48] } }, 48);
    expect((await openError(p)).message).toMatch(/tensor 'w': data_offsets \[0, 48\] hold 48 bytes but shape \[3, 4\] × BF16 \(2 B\) needs 24 bytes/);
  });
  it('unknown dtype', async () => {
    const p = rawFile('dtype.safetensors', { w: { dtype: 'F128', shape: [1], data_offsets: [0, 16] } }, 16);
    expect((await openError(p)).message).toMatch(/tensor 'w': unknown dtype "F128"/);
  });
  it('negative / non-integer shapes', async () => {
    const p1 = rawFile('neg.safetensors', { w: { dtype: 'F32', shape: [-1, 4], data_offsets: [0, 16] } }, 16);
    expect((await openError(p1)).message).toMatch(/tensor 'w': invalid shape \[-1,4\]/);
    const p2 = rawFile('frac.safetensors', { w: { dtype: 'F32', shape: [1.5], data_offsets: [0, 6] } }, 6);
    expect((await openError(p2)).message).toMatch(/tensor 'w': invalid shape \[1.5\]/);
  });
  it('bad data_offsets', async () => {
    const p1 = rawFile('offs1.safetensors', { w: { dtype: 'F32', shape: [1], data_offsets: [4, 0] } }, 4);
    expect((await openError(p1)).message).toMatch(/data_offsets \[4, 0\] end before they begin/);
    const p2 = rawFile('offs2.safetensors', { w: { dtype: 'F32', shape: [1], data_offsets: [0] } }, 4);
    expect((await openError(p2)).message).toMatch(/data_offsets must be two integers/);
  });
  it('truncated file (data region cut)', async () => {
    const p = rawFile('trunc.safetensors', { a: { dtype: 'F32', shape: [100], data_offsets: [0, 400] } }, 399);
    expect((await openError(p)).message).toMatch(/the file is truncated: the header describes .* but the file has/);
  });
  it('trailing bytes after the last tensor', async () => {
    const p = rawFile('trail.safetensors', { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, 8);
    expect((await openError(p)).message).toMatch(/4 unexpected bytes after the last tensor/);
  });
  it('bad __metadata__', async () => {
    const p = rawFile('meta.safetensors', { __metadata__: { format: 3 } }, 0);
    expect((await openError(p)).message).toMatch(/__metadata__.format must be a string/);
  });
  it('pickle files are refused with a conversion hint', async () => {
    for (const ext of ['.bin', '.pt', '.pth', '.ckpt']) {
      const p = join(dir, `model${ext}`);
      writeFileSync(p, new Uint8Array([0x80, 0x02]));
      await expect(SafetensorsFile.open(p)).rejects.toThrow(/PyTorch pickles.*not supported.*convert/);
      await expect(Checkpoint.open(p)).rejects.toThrow(/PyTorch pickles/);
    }
    const only = join(dir, 'pickle-only');
    mkdirSync(only);
    writeFileSync(join(only, 'pytorch_model.bin'), new Uint8Array([0x80, 0x02]));
    await expect(Checkpoint.open(only)).rejects.toThrow(/pytorch_model\.bin.*PyTorch pickles/);
  });
  it('missing file', async () => {
    await expect(SafetensorsFile.open(join(dir, 'nope.safetensors'))).rejects.toThrow(/nope\.safetensors: no such file/);
  });
  it('a file truncated after opening: reads fail with a clear error', async () => {
    const p = join(dir, 'shrink.safetensors');
    await writeSafetensors(p, [{ key: 'a', dtype: 'F32', shape: [1000], data: new Uint8Array(4000) }]);
    const f = await SafetensorsFile.open(p);
    writeFileSync(p, readFileSync(p).subarray(0, 1000));
    await expect(f.read('a')).rejects.toThrow(/unexpected end of file while reading tensor 'a'/);
    await f.close();
    await expect(f.read('a')).rejects.toThrow(/read after close/);
  });
});

describe('safetensors: good files', () => {
  it('every tensor of the tiny model folder and golden file opens and reads', async () => {
    const files = ['transformer/diffusion_pytorch_model.safetensors', 'vae/diffusion_pytorch_model.safetensors', 'text_encoder/model.safetensors', 'golden.safetensors'];
    for (const rel of files) {
      const p = join(TINY, rel);
      const f = await SafetensorsFile.open(p);
      const whole = readFileSync(p);
      const hlen = Number(whole.readBigUInt64LE(0));
      expect(f.headerLength).toBe(hlen);
      if (rel !== 'golden.safetensors') expect(f.metadata()).toEqual({ format: 'pt' });
      expect(f.keys().length).toBeGreaterThan(10);
      let total = 0;
      for (const k of f.keys()) {
        const info = f.info(k);
        const bytes = await f.read(k);
        expect(bytes.byteLength).toBe(info.byteLength);
        expect(Buffer.from(bytes).equals(whole.subarray(info.offset, info.offset + info.byteLength))).toBe(true);
        total += info.byteLength;
      }
      expect(8 + hlen + total).toBe(whole.byteLength);
      await f.close();
    }
  });
  it('tiny transformer values come out as engine f32 tensors', async () => {
    const ck = await Checkpoint.open(join(TINY, 'transformer'));
    expect(ck.sharded).toBe(false);
    const t = await readTensor(ck, 'patch_embedding.weight', { expectShape: [128, 16, 1, 2, 2] });
    expect(t.dtype).toBe('f32');
    expect(t.device).toBe('cpu');
    expect(t.shape).toEqual([128, 16, 1, 2, 2]);
    const info = ck.info('patch_embedding.weight');
    const whole = readFileSync(info.file);
    const ref = new Float32Array(whole.buffer.slice(whole.byteOffset + info.offset, whole.byteOffset + info.offset + info.byteLength));
    expect(t.hostValues()).toEqual(ref);
    await expect(readTensor(ck, 'patch_embedding.weight', { expectShape: [128, 16, 2, 2] })).rejects.toThrow(
      /key 'patch_embedding.weight' in .*diffusion_pytorch_model.safetensors has shape \[128, 16, 1, 2, 2\], expected \[128, 16, 2, 2\]/,
    );
    await ck.close();
  });
  it('positioned reads: asking for a small tensor does not read the big one', async () => {
    const p = join(dir, 'bigsmall.safetensors');
    const big = new Uint8Array(8 << 20); // 8 MiB
    big[123] = 7;
    await writeSafetensors(p, [
      { key: 'big', dtype: 'U8', shape: [big.length], data: big },
      { key: 'small', dtype: 'F32', shape: [3], data: f32bytes([1, 2, 3]) },
    ]);
    const f = await SafetensorsFile.open(p);
    const afterOpen = f.bytesRead;
    expect(afterOpen).toBe(8 + f.headerLength); // only the header on open
    expect(Array.from(new Float32Array((await f.read('small')).buffer))).toEqual([1, 2, 3]);
    expect(f.bytesRead - afterOpen).toBe(12); // exactly the small tensor's bytes
    const part = await f.readRange('big', 120, 8);
    expect(Array.from(part)).toEqual([0, 0, 0, 7, 0, 0, 0, 0]);
    expect(f.bytesRead - afterOpen).toBe(20);
    const target = new Uint8Array(big.length);
    await f.readInto('big', target);
    expect(target[123]).toBe(7);
    await expect(f.readInto('big', new Uint8Array(3))).rejects.toThrow(/has 8388608 bytes but the target buffer has 3/);
    await expect(f.readRange('small', 8, 8)).rejects.toThrow(/byte range \[8, 16\) is outside its 12 bytes/);
    await f.close();
  });
  it('write → read round trip for every dtype, zero-size tensors, metadata, 8-byte header padding', async () => {
    const p = join(dir, 'dtypes.safetensors');
    const cases: Array<{ key: string; dtype: StDType; shape: number[]; data: Uint8Array }> = [
      { key: 'f32', dtype: 'F32', shape: [2, 2], data: f32bytes([1.5, -2, 3.25, 0]) },
      { key: 'f16', dtype: 'F16', shape: [3], data: new Uint8Array(Uint16Array.from([1, 2, 3].map(f32ToF16Bits)).buffer) },
      { key: 'bf16', dtype: 'BF16', shape: [3], data: new Uint8Array(Uint16Array.from([1, -2, 0.5].map(f32ToBf16Bits)).buffer) },
      { key: 'i64', dtype: 'I64', shape: [3], data: new Uint8Array(BigInt64Array.from([5n, -7n, 2147483647n]).buffer) },
      { key: 'i32', dtype: 'I32', shape: [2], data: new Uint8Array(Int32Array.from([-1, 9]).buffer) },
      { key: 'u8', dtype: 'U8', shape: [3], data: Uint8Array.from([0, 200, 255]) },
      { key: 'i16', dtype: 'I16', shape: [2], data: new Uint8Array(Int16Array.from([-300, 300]).buffer) },
      { key: 'bool', dtype: 'BOOL', shape: [2], data: Uint8Array.from([1, 0]) },
      { key: 'f64', dtype: 'F64', shape: [2], data: new Uint8Array(Float64Array.from([0.1, 1e300]).buffer) },
      { key: 'empty', dtype: 'F32', shape: [0, 5], data: new Uint8Array(0) },
      { key: 'scalar', dtype: 'F32', shape: [], data: f32bytes([42]) },
    ];
    await writeSafetensors(p, cases, { format: 'pt', note: 'ünï' });
    expect(readdirSync(dir).filter((n) => n.includes('.tmp-'))).toEqual([]);
    const f = await SafetensorsFile.open(p);
    expect(f.headerLength % 8).toBe(0);
    expect(f.metadata()).toEqual({ format: 'pt', note: 'ünï' });
    expect(f.keys()).toEqual(cases.map((c) => c.key));
    for (const c of cases) expect(Buffer.from(await f.read(c.key)).equals(Buffer.from(c.data))).toBe(true);
    await f.close();

    const ck = await Checkpoint.open(p);
    const get = async (k: string) => readTensor(ck, k);
    expect((await get('f32')).hostValues()).toEqual(Float32Array.from([1.5, -2, 3.25, 0]));
    const f16 = await get('f16');
    expect(f16.dtype).toBe('f16');
    expect(f16.data).toBeInstanceOf(Uint16Array); // raw words, not widened
    expect(Array.from(f16.hostValues())).toEqual([1, 2, 3]);
    const bf = await get('bf16');
    expect(bf.dtype).toBe('bf16');
    expect(bf.data).toBeInstanceOf(Uint16Array);
    expect(Array.from(bf.hostValues())).toEqual([1, -2, 0.5]);
    const i64 = await get('i64');
    expect(i64.dtype).toBe('i32');
    expect(Array.from(i64.hostValues())).toEqual([5, -7, 2147483647]);
    expect(Array.from((await get('i32')).hostValues())).toEqual([-1, 9]);
    expect(Array.from((await get('u8')).hostValues())).toEqual([0, 200, 255]);
    expect(Array.from((await get('i16')).hostValues())).toEqual([-300, 300]);
    expect(Array.from((await get('bool')).hostValues())).toEqual([1, 0]);
    expect(Array.from((await get('f64')).hostValues())).toEqual([Math.fround(0.1), Infinity]);
    const e = await get('empty');
    expect(e.shape).toEqual([0, 5]);
    expect(e.numel).toBe(0);
    const s = await get('scalar');
    expect(s.shape).toEqual([]);
    expect(Array.from(s.hostValues())).toEqual([42]);
    await ck.close();
  });
  it('I64 outside the i32 range is refused with the key and value', async () => {
    const p = join(dir, 'i64big.safetensors');
    await writeSafetensors(p, [{ key: 'ids', dtype: 'I64', shape: [2], data: new Uint8Array(BigInt64Array.from([1n, 1n << 40n]).buffer) }]);
    const ck = await Checkpoint.open(p);
    await expect(readTensor(ck, 'ids')).rejects.toThrow(/key 'ids' in .*: I64 value 1099511627776 at index 1 does not fit in i32/);
    await ck.close();
  });
  it('writer validation', async () => {
    const p = join(dir, 'w.safetensors');
    await expect(writeSafetensors(p, [{ key: 'a', dtype: 'F32', shape: [2], data: new Uint8Array(4) }])).rejects.toThrow(/tensor 'a': 4 data bytes, but shape \[2\] × F32 needs 8/);
    await expect(
      writeSafetensors(p, [
        { key: 'a', dtype: 'F32', shape: [1], data: new Uint8Array(4) },
        { key: 'a', dtype: 'F32', shape: [1], data: new Uint8Array(4) },
      ]),
    ).rejects.toThrow(/duplicate key/);
    expect(existsSync(p)).toBe(false);
    expect(readdirSync(dir).filter((n) => n.includes('.tmp-'))).toEqual([]);
  });
  it('header encoder pads with spaces to a multiple of 8', () => {
    const h = encodeSafetensorsHeader([{ key: 'abc', dtype: 'F32', shape: [1] }]);
    const n = Number(new DataView(h.buffer).getBigUint64(0, true));
    expect(n % 8).toBe(0);
    expect(h.byteLength).toBe(8 + n);
    const text = new TextDecoder().decode(h.subarray(8));
    expect(JSON.parse(text)).toEqual({ abc: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } });
  });
});

describe('sharded checkpoints', () => {
  async function makeShards(name: string): Promise<string> {
    const d = join(dir, name);
    mkdirSync(d);
    await writeSafetensors(join(d, 'model-00001-of-00002.safetensors'), [
      { key: 'a.weight', dtype: 'F32', shape: [2, 2], data: f32bytes([1, 2, 3, 4]) },
      { key: 'b.weight', dtype: 'F32', shape: [1], data: f32bytes([5]) },
    ]);
    await writeSafetensors(join(d, 'model-00002-of-00002.safetensors'), [{ key: 'c.weight', dtype: 'BF16', shape: [2], data: new Uint8Array(Uint16Array.from([f32ToBf16Bits(6), f32ToBf16Bits(7)]).buffer) }]);
    writeFileSync(
      join(d, 'model.safetensors.index.json'),
      JSON.stringify({
        metadata: { total_size: 24 },
        weight_map: { 'a.weight': 'model-00001-of-00002.safetensors', 'b.weight': 'model-00001-of-00002.safetensors', 'c.weight': 'model-00002-of-00002.safetensors' },
      }),
    );
    return d;
  }
  it('opens by folder or index, reads across shards', async () => {
    const d = await makeShards('sh-good');
    for (const p of [d, join(d, 'model.safetensors.index.json')]) {
      const ck = await Checkpoint.open(p);
      expect(ck.sharded).toBe(true);
      expect(ck.keys()).toEqual(['a.weight', 'b.weight', 'c.weight']);
      expect(ck.files().length).toBe(2);
      expect(ck.info('c.weight').file).toContain('model-00002-of-00002.safetensors');
      expect(Array.from((await readTensor(ck, 'a.weight')).hostValues())).toEqual([1, 2, 3, 4]);
      expect(Array.from((await readTensor(ck, 'c.weight')).hostValues())).toEqual([6, 7]);
      expect(ck.describe()).toMatch(/\(2 shards\)/);
      await ck.close();
    }
  });
  it('missing shard', async () => {
    const d = await makeShards('sh-missing');
    rmSync(join(d, 'model-00002-of-00002.safetensors'));
    await expect(Checkpoint.open(d)).rejects.toThrow(/shard 'model-00002-of-00002.safetensors' is missing \(1 keys map to it, e.g. 'c.weight'\)/);
  });
  it('key mapped to a shard that lacks it', async () => {
    const d = await makeShards('sh-wrong');
    const idx = join(d, 'model.safetensors.index.json');
    const j = JSON.parse(readFileSync(idx, 'utf8'));
    j.weight_map['c.weight'] = 'model-00001-of-00002.safetensors';
    writeFileSync(idx, JSON.stringify(j));
    await expect(Checkpoint.open(d)).rejects.toThrow(/weight_map maps 'c.weight' to shard 'model-00001-of-00002.safetensors', but .* has no such tensor/);
  });
  it('index without weight_map, and shard names escaping the folder', async () => {
    const d = await makeShards('sh-bad');
    const idx = join(d, 'model.safetensors.index.json');
    writeFileSync(idx, JSON.stringify({ metadata: {} }));
    await expect(Checkpoint.open(idx)).rejects.toThrow(/no "weight_map" object/);
    writeFileSync(idx, JSON.stringify({ weight_map: { a: '../x.safetensors' } }));
    await expect(Checkpoint.open(idx)).rejects.toThrow(/is not a file name in the index's folder/);
    writeFileSync(idx, '{');
    await expect(Checkpoint.open(idx)).rejects.toThrow(/malformed JSON/);
  });
  it('folder with several candidates needs a choice', async () => {
    const d = join(dir, 'two');
    mkdirSync(d);
    await writeSafetensors(join(d, 'x.safetensors'), []);
    await writeSafetensors(join(d, 'y.safetensors'), []);
    await expect(Checkpoint.open(d)).rejects.toThrow(/several candidate checkpoints \(x.safetensors, y.safetensors\)/);
    const ck = await Checkpoint.open(d, { preferredName: 'y' });
    expect(ck.source).toMatch(/y\.safetensors$/);
    await ck.close();
    const empty = join(dir, 'emptydir');
    mkdirSync(empty);
    await expect(Checkpoint.open(empty)).rejects.toThrow(/no .safetensors file or .safetensors.index.json/);
  });
});

describe('strict loading', () => {
  it('loads a spec, lists unused keys, names missing keys and shape mismatches', async () => {
    const ck = await Checkpoint.open(join(TINY, 'vae'));
    const spec = [
      { key: 'post_quant_conv.weight', shape: [16, 16, 1, 1, 1] },
      { key: 'post_quant_conv.bias', shape: [16] },
    ];
    const { tensors, unused } = await loadStrict(ck, spec, { what: 'vae' });
    expect([...tensors.keys()]).toEqual(['post_quant_conv.weight', 'post_quant_conv.bias']);
    expect(tensors.get('post_quant_conv.bias')!.shape).toEqual([16]);
    expect(unused.length).toBe(ck.size - 2);
    expect(unused).toContain('decoder.conv_in.weight');

    // prefix: relative keys, unused only within the prefix
    const r = await loadStrict(ck, [{ key: 'conv1.bias', shape: [64] }], { prefix: 'decoder.mid_block.resnets.0.' });
    expect([...r.tensors.keys()]).toEqual(['conv1.bias']);
    expect(r.unused.sort()).toEqual(
      ['conv1.weight', 'conv2.bias', 'conv2.weight', 'norm1.gamma', 'norm2.gamma'].map((k) => 'decoder.mid_block.resnets.0.' + k),
    );

    expect(() => checkSpec(ck, [{ key: 'decoder.conv_in.wieght', shape: [64, 16, 3, 3, 3] }], { what: 'vae' })).toThrow(
      /vae: missing key 'decoder.conv_in.wieght' \(did you mean 'decoder.conv_in.weight'\?\) in .*vae\/diffusion_pytorch_model.safetensors/,
    );
    expect(() => checkSpec(ck, [{ key: 'decoder.conv_in.weight', shape: [64, 16, 3, 3] }])).toThrow(
      /key 'decoder.conv_in.weight' in .*diffusion_pytorch_model.safetensors has shape \[64, 16, 3, 3, 3\], expected \[64, 16, 3, 3\]/,
    );
    const before = ck.bytesRead;
    await expect(loadStrict(ck, [...spec, { key: 'x.y', shape: [1] }, { key: 'x.z', shape: [1] }])).rejects.toThrow(/missing 2 keys 'x.y', 'x.z'/);
    expect(ck.bytesRead).toBe(before); // validated on headers before reading any data
    await ck.close();
  });
  it('renamed views share the files', async () => {
    const ck = await Checkpoint.open(join(TINY, 'transformer'));
    const { checkpoint: v, unmapped } = ck.renamed((k) => (k.startsWith('blocks.') ? 'x.' + k : null));
    expect(v.keys().every((k) => k.startsWith('x.blocks.'))).toBe(true);
    expect(unmapped).toContain('proj_out.weight');
    expect(v.info('x.blocks.0.norm2.weight').key).toBe('x.blocks.0.norm2.weight');
    const a = await v.read('x.blocks.0.norm2.weight');
    const b = await ck.read('blocks.0.norm2.weight');
    expect(Buffer.from(a).equals(Buffer.from(b))).toBe(true);
    expect(() => ck.renamed(() => 'same')).toThrow(/both map to 'same'/);
    await v.close();
  });
});

describe('atomic writes', () => {
  it('writes strings, bytes and chunk sequences; leaves no temp file', async () => {
    const p = join(dir, 'atomic.txt');
    await writeFileAtomic(p, 'hello');
    expect(readFileSync(p, 'utf8')).toBe('hello');
    await writeFileAtomic(p, Uint8Array.from([65, 66]));
    expect(readFileSync(p, 'utf8')).toBe('AB');
    await writeFileAtomic(p, [Uint8Array.from([67]), Uint8Array.from([68])]);
    expect(readFileSync(p, 'utf8')).toBe('CD');
    async function* gen() {
      yield Uint8Array.from([69]);
      yield Uint8Array.from([70]);
    }
    await writeFileAtomic(p, gen());
    expect(readFileSync(p, 'utf8')).toBe('EF');
    expect(readdirSync(dir).filter((n) => n.startsWith('.atomic.txt.tmp'))).toEqual([]);
  });
  it('on error the target is untouched and the temp file removed', async () => {
    const p = join(dir, 'keep.txt');
    await writeFileAtomic(p, 'original');
    await expect(
      withAtomicFile(p, async (fh) => {
        await fh.write('partial');
        throw new Error('disk on fire');
      }),
    ).rejects.toThrow('disk on fire');
    expect(readFileSync(p, 'utf8')).toBe('original');
    expect(readdirSync(dir).filter((n) => n.startsWith('.keep.txt.tmp'))).toEqual([]);
    await expect(writeFileAtomic(join(dir, 'no-such-dir', 'x.txt'), 'x')).rejects.toThrow(/ENOENT/);
  });
  it('makeDirs creates missing levels, and fails (instead of looping) where a parent refuses children', () => {
    const deep = join(dir, 'a', 'b', 'c');
    makeDirs(deep);
    expect(existsSync(deep)).toBe(true);
    makeDirs(deep); // exists: nothing to do
    writeFileSync(join(dir, 'plain-file'), 'x');
    expect(() => makeDirs(join(dir, 'plain-file', 'sub'))).toThrow(/ENOTDIR/);
    expect(() => makeDirs(join(dir, 'plain-file'))).toThrow(/ENOTDIR/);
    // /proc exists but refuses new entries with ENOENT: Node's recursive mkdir loops forever there
    if (process.platform === 'linux') {
      expect(() => makeDirs('/proc/sd-no-such/x')).toThrow(/ENOENT/);
      expect(() => checkWritable('/proc/sd-no-such/out.mp4')).toThrow(OutputError);
      expect(() => checkWritable('/proc/sd-no-such/out.mp4')).toThrow(/\[output\] cannot create the output folder \/proc\/sd-no-such/);
      expect(() => new PromptCache('/proc/sd-no-such/cache', 1 << 20, 'encoder')).toThrow(/\[prompt-cache\] cannot create the prompt embedding cache folder .*infer\.prompt_cache=false/);
    }
  });
});
