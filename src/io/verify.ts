// Check a freshly written output file before it is renamed to its final name: a writer that
// "succeeded" (ffmpeg exits 0 after "Error writing trailer ... No space left on device", a file system
// that drops data) must not put a truncated file in place. Structural checks only, cheap at any size:
//   MP4  the top-level boxes tile the file exactly, and ftyp and moov are among them;
//   GIF  GIF87a/GIF89a signature and the 0x3B trailer as the last byte;
//   PNG  signature, IHDR first and an IEND chunk as the last 12 bytes;
//   safetensors  8-byte length + JSON header + the data its offsets describe = the file length.

import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { extname } from 'node:path';

export type OutputKind = 'mp4' | 'gif' | 'png' | 'safetensors';

/** The kind to verify for a final file name, by extension (null: only the size check applies). */
export function outputKindOf(finalPath: string): OutputKind | null {
  const p = finalPath.toLowerCase();
  if (p.endsWith('.safetensors')) return 'safetensors';
  const ext = extname(p);
  if (ext === '.mp4' || ext === '.mov' || ext === '.m4v') return 'mp4';
  if (ext === '.gif') return 'gif';
  if (ext === '.png') return 'png';
  return null;
}

async function readAt(fh: FileHandle, pos: number, len: number): Promise<Uint8Array> {
  const buf = new Uint8Array(len);
  let off = 0;
  while (off < len) {
    const { bytesRead } = await fh.read(buf, off, len - off, pos + off);
    if (bytesRead === 0) break;
    off += bytesRead;
  }
  return buf.subarray(0, off);
}

const ascii = (b: Uint8Array) => String.fromCharCode(...b);

/** Problems with an MP4 (ISO BMFF) file's top-level box structure, or null when it is sound. */
async function checkMp4(fh: FileHandle, size: number): Promise<string | null> {
  let pos = 0;
  const seen = new Set<string>();
  let boxes = 0;
  while (pos < size) {
    if (size - pos < 8) return `${size - pos} stray bytes after the last box at offset ${pos}`;
    const h = await readAt(fh, pos, 16);
    const dv = new DataView(h.buffer, h.byteOffset, h.byteLength);
    let len = dv.getUint32(0);
    const type = ascii(h.subarray(4, 8));
    if (!/^[\x20-\x7e]{4}$/.test(type)) return `no box header at offset ${pos}`;
    if (len === 1) {
      if (h.length < 16) return `box '${type}' at offset ${pos} is cut off`;
      len = Number(dv.getBigUint64(8));
    } else if (len === 0) {
      len = size - pos; // "to the end of the file": only valid for the last box
    }
    if (len < 8) return `box '${type}' at offset ${pos} has an invalid size ${len}`;
    if (pos + len > size) return `box '${type}' at offset ${pos} runs ${pos + len - size} bytes past the end of the file`;
    seen.add(type);
    boxes++;
    pos += len;
    if (boxes > 100_000) return 'too many top-level boxes';
  }
  for (const need of ['ftyp', 'moov']) if (!seen.has(need)) return `no '${need}' box`;
  return null;
}

async function checkGif(fh: FileHandle, size: number): Promise<string | null> {
  if (size < 14) return `only ${size} bytes`;
  const sig = ascii(await readAt(fh, 0, 6));
  if (sig !== 'GIF89a' && sig !== 'GIF87a') return 'no GIF signature';
  const last = await readAt(fh, size - 1, 1);
  if (last[0] !== 0x3b) return 'no GIF trailer (0x3B) at the end';
  return null;
}

const PNG_SIG = [137, 80, 78, 71, 13, 10, 26, 10];
const IEND = [0, 0, 0, 0, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82];

async function checkPng(fh: FileHandle, size: number): Promise<string | null> {
  if (size < 8 + 25 + 12) return `only ${size} bytes`;
  const head = await readAt(fh, 0, 16);
  if (!PNG_SIG.every((b, i) => head[i] === b)) return 'no PNG signature';
  if (ascii(head.subarray(12, 16)) !== 'IHDR') return 'no IHDR chunk first';
  const tail = await readAt(fh, size - 12, 12);
  if (!IEND.every((b, i) => tail[i] === b)) return 'no IEND chunk at the end';
  return null;
}

async function checkSafetensors(fh: FileHandle, size: number): Promise<string | null> {
  if (size < 8) return `only ${size} bytes`;
  const lenBuf = await readAt(fh, 0, 8);
  const n64 = new DataView(lenBuf.buffer, lenBuf.byteOffset, 8).getBigUint64(0, true);
  if (n64 > BigInt(size - 8)) return `header length ${n64} runs past the end of the file (${size} bytes)`;
  const n = Number(n64);
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(await readAt(fh, 8, n))) as Record<string, unknown>;
  } catch {
    return 'the header is not valid JSON';
  }
  let end = 0;
  for (const [k, v] of Object.entries(header)) {
    if (k === '__metadata__') continue;
    const offs = (v as { data_offsets?: unknown } | null)?.data_offsets;
    if (!Array.isArray(offs) || offs.length !== 2 || typeof offs[1] !== 'number') return `tensor '${k}' has no data_offsets`;
    end = Math.max(end, offs[1]);
  }
  if (8 + n + end !== size) return `the file has ${size} bytes, the header describes ${8 + n + end}`;
  return null;
}

/**
 * Check the file at `path` (a temporary name) as `kind` (or just non-empty / `expectBytes` long).
 * Returns a short description of what is wrong, or null when the file is sound.
 */
export async function verifyOutputFile(path: string, kind: OutputKind | null, expectBytes?: number): Promise<string | null> {
  const fh = await fsp.open(path, 'r');
  try {
    const { size } = await fh.stat();
    if (expectBytes !== undefined && size !== expectBytes) return `the file has ${size} bytes, ${expectBytes} were written`;
    if (kind === null) return null;
    if (size === 0) return 'the file is empty';
    switch (kind) {
      case 'mp4':
        return await checkMp4(fh, size);
      case 'gif':
        return await checkGif(fh, size);
      case 'png':
        return await checkPng(fh, size);
      case 'safetensors':
        return await checkSafetensors(fh, size);
    }
  } finally {
    await fh.close().catch(() => undefined);
  }
}
