// On-disk cache of prompt embeddings: encoding the same prompt with the same text encoder twice
// costs nothing the second time. Key = sha256(text-encoder identity, text_len, prompt); value = the
// trimmed context [len, d] f32 as a safetensors file. Bounded in size: least recently used entries
// are evicted (a hit touches the file's mtime).

import { createHash } from 'node:crypto';
import { readdirSync, statSync, unlinkSync, utimesSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { Checkpoint, readTensor } from '../io/checkpoint.ts';
import { writeSafetensors } from '../io/safetensors.ts';
import { makeDirs } from '../io/atomic.ts';
import { ConfigError } from '../util/errors.ts';

export class PromptCache {
  hits = 0;
  misses = 0;
  constructor(
    readonly dir: string,
    readonly maxBytes: number,
    /** identity of the text encoder: config + weight file names/sizes/mtimes */
    readonly encoderId: string,
  ) {
    try {
      makeDirs(dir);
    } catch (e) {
      throw new ConfigError(`[prompt-cache] cannot create the prompt embedding cache folder ${dir}: ${(e as Error).message}; set infer.prompt_cache_dir to a writable folder, or infer.prompt_cache=false`);
    }
  }

  key(prompt: string, textLen: number): string {
    return createHash('sha256').update(JSON.stringify([this.encoderId, textLen, prompt])).digest('hex').slice(0, 40);
  }

  private path(k: string): string {
    return join(this.dir, `${k}.safetensors`);
  }

  async get(prompt: string, textLen: number): Promise<{ context: Float32Array; length: number; dim: number } | null> {
    const p = this.path(this.key(prompt, textLen));
    if (!existsSync(p)) {
      this.misses++;
      return null;
    }
    try {
      const ck = await Checkpoint.open(p);
      try {
        const t = await readTensor(ck, 'context');
        const now = new Date();
        utimesSync(p, now, now);
        this.hits++;
        return { context: t.hostValues() as Float32Array, length: t.shape[0]!, dim: t.shape[1]! };
      } finally {
        await ck.close();
      }
    } catch {
      // a corrupt entry is dropped, not fatal
      try {
        unlinkSync(p);
      } catch {
        /* ignore */
      }
      this.misses++;
      return null;
    }
  }

  async put(prompt: string, textLen: number, context: Float32Array, length: number, dim: number): Promise<void> {
    const p = this.path(this.key(prompt, textLen));
    try {
      await writeSafetensors(p, [{ key: 'context', dtype: 'F32', shape: [length, dim], data: new Uint8Array(context.buffer, context.byteOffset, length * dim * 4) }], {
        prompt: prompt.slice(0, 200),
        text_len: String(textLen),
      });
      this.evict();
    } catch (e) {
      // a cache that cannot be written (disk full, read-only) costs the next run an encode, not this run
      this.writeError ??= `[prompt-cache] could not save the prompt embedding in ${this.dir} (${(e as Error).message.split('\n')[0]}); this run goes on without caching it`;
    }
  }

  /** the first failure to write an entry (the run goes on; the CLI prints it as a warning) */
  writeError: string | null = null;

  /** Remove least recently used entries until the folder is within maxBytes. */
  evict(): void {
    const files = readdirSync(this.dir)
      .filter((f) => f.endsWith('.safetensors'))
      .map((f) => {
        const s = statSync(join(this.dir, f));
        return { f, size: s.size, mtime: s.mtimeMs };
      })
      .sort((a, b) => a.mtime - b.mtime);
    let total = files.reduce((a, x) => a + x.size, 0);
    for (const x of files) {
      if (total <= this.maxBytes) break;
      try {
        unlinkSync(join(this.dir, x.f));
        total -= x.size;
      } catch {
        /* ignore */
      }
    }
  }
}

/** Identity of a component's weights for cache keys and sidecars (names, sizes, mtimes + config). */
export function weightsIdentity(config: unknown, files: string[]): string {
  const h = createHash('sha256');
  h.update(JSON.stringify(config));
  for (const f of files) {
    try {
      const s = statSync(f);
      h.update(`${f}:${s.size}:${Math.floor(s.mtimeMs)}`);
    } catch {
      h.update(f);
    }
  }
  return h.digest('hex').slice(0, 16);
}
