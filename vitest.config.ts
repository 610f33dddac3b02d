import { defineConfig } from 'vitest/config';
import { dropDawnLimitWarnings } from './src/device/dawn-stderr.ts';

// A worker's stderr is a socket, where createGpu cannot keep Dawn's two adapter-limit warnings
// out (src/device/dawn-stderr.ts); drop them where the workers' stderr reaches ours.
const writeStderr = process.stderr.write.bind(process.stderr) as (chunk: string | Uint8Array, ...rest: unknown[]) => boolean;
process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) =>
  writeStderr(dropDawnLimitWarnings(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8')), ...rest)) as typeof process.stderr.write;

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // One dawn.node instance per worker; lavapipe already uses both cores, so files run one at a time.
    fileParallelism: false,
    pool: 'forks',
    testTimeout: 120_000,
    hookTimeout: 120_000,
    setupFiles: ['test/setup.ts'],
  },
});
