// Model folders for pipeline tests: the tiny golden model plus a small UMT5-format tokenizer.
import { cpSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { TINY } from './golden.ts';

const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures');

/** A copy of the tiny golden model with tokenizer/ and recommended defaults (text_len 16, 64x64x9). */
export function tinyModelWithTokenizer(defaults: Record<string, unknown> = {}): string {
  const dir = mkdtempSync(join(tmpdir(), 'sd-tinymodel-'));
  cpSync(TINY, dir, { recursive: true });
  cpSync(join(FIXTURES, 'tokenizer', 'legacy'), join(dir, 'tokenizer'), { recursive: true });
  writeFileSync(
    join(dir, 'smart_diffusion.json'),
    JSON.stringify({ text_len: 16, height: 64, width: 64, num_frames: 9, num_inference_steps: 3, guidance_scale: 5, shift: 5, fps: 8, ...defaults }),
  );
  return dir;
}
