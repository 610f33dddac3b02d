// A prompts file (`npm run generate -- --prompts FILE`, and the service's text/plain batches): one
// prompt per line; blank lines and lines starting with # are skipped.

import { readFileSync } from 'node:fs';
import { ConfigError } from '../util/errors.ts';

/** The prompts of a prompts file's text, in order. */
export function promptsOfText(text: string): string[] {
  return text
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
}

/** Most bytes read from a prompts file (a few thousand prompts). */
const MAX_FILE_BYTES = 4 * 1024 * 1024;

/** Read a prompts file; a missing, unreadable, oversized or empty file is a one-line ConfigError. */
export function readPromptsFile(path: string): string[] {
  let buf: Buffer;
  try {
    buf = readFileSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new ConfigError(`--prompts ${path}: ${code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'a folder, not a file' : code ?? String(e)}; give a text file with one prompt per line`);
  }
  if (buf.byteLength > MAX_FILE_BYTES) throw new ConfigError(`--prompts ${path}: ${buf.byteLength.toLocaleString('en-US')} bytes, more than the ${MAX_FILE_BYTES.toLocaleString('en-US')} a prompts file may have; split it`);
  if (buf.includes(0)) throw new ConfigError(`--prompts ${path}: not a text file (it has NUL bytes); give a text file with one prompt per line`);
  const prompts = promptsOfText(buf.toString('utf8'));
  if (prompts.length === 0) throw new ConfigError(`--prompts ${path}: no prompts in it: one prompt per line (lines starting with # are comments)`);
  return prompts;
}
