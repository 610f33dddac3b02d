// The one place a command-line tool turns a failure into what the user sees: a single line
// `error: [area] what is wrong; what to do` and an exit status (docs/reliability.md has the table).
// Known failures are SmartDiffusionErrors (src/util/errors.ts) and a few Node errors with a clear
// meaning; anything else is a bug: a short line with the bug-report hint, its stack only with --debug.

import { SmartDiffusionError } from '../util/errors.ts';

export const EXIT = {
  ok: 0,
  runtime: 1,
  config: 2,
  noAdapter: 3,
  outOfMemory: 4,
  checkpoint: 5,
  output: 6,
  nonFinite: 7,
  interrupted: 130,
} as const;

const BY_CODE: Record<string, number> = {
  BAD_CONFIG: EXIT.config,
  BAD_SHAPE: EXIT.config,
  NO_ADAPTER: EXIT.noAdapter,
  OUT_OF_MEMORY: EXIT.outOfMemory,
  BAD_CHECKPOINT: EXIT.checkpoint,
  OUTPUT_ERROR: EXIT.output,
  NON_FINITE: EXIT.nonFinite,
  INTERRUPTED: EXIT.interrupted,
};

export const BUG_HINT = 'this is a bug in smart-diffusion: please report it with the output of the same command plus --debug';

export function exitCodeOf(err: unknown): number {
  if (err instanceof SmartDiffusionError) return BY_CODE[err.code] ?? EXIT.runtime;
  const code = (err as NodeJS.ErrnoException | null)?.code;
  if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EROFS' || code === 'EPIPE' || code === 'EIO') return EXIT.output;
  if (isHostOom(err)) return EXIT.outOfMemory;
  return EXIT.runtime;
}

/** A JS allocation the host could not satisfy (ArrayBuffer / typed array / string too large). */
function isHostOom(err: unknown): boolean {
  return err instanceof RangeError && /Array buffer allocation failed|Invalid typed array length|Invalid array length|Invalid string length/.test(err.message);
}

/** The one line a user sees for `err` (without the `error: ` prefix), and whether it is a bug. */
export function describe(err: unknown): { line: string; bug: boolean } {
  if (err instanceof SmartDiffusionError) return { line: firstLine(err.message), bug: false };
  const e = err as NodeJS.ErrnoException | null;
  if (e && typeof e === 'object' && typeof e.code === 'string' && typeof e.syscall === 'string') {
    const where = e.path ? ` ${e.path}` : '';
    const what: Record<string, string> = {
      ENOSPC: 'no space left on device',
      EDQUOT: 'disk quota exceeded',
      EROFS: 'read-only file system',
      EIO: 'input/output error',
      EACCES: 'permission denied',
      EPERM: 'operation not permitted',
      ENOENT: 'no such file or folder',
      ELOOP: 'symlink loop',
      EMFILE: 'too many open files',
    };
    if (what[e.code]) return { line: `[io] ${e.syscall}${where}: ${what[e.code]} (${e.code}); check the path and free space, or choose another path`, bug: false };
  }
  if (isHostOom(err)) return { line: `[host] out of host memory (RAM): ${(err as Error).message}; lower the size or frame count, or raise infer.diffusion.low_mem_level (npm run plan shows what a run needs)`, bug: false };
  const msg = err instanceof Error ? `${err.name}: ${firstLine(err.message)}` : String(err);
  return { line: `unexpected ${msg}; ${BUG_HINT}`, bug: true };
}

function firstLine(s: string): string {
  const i = s.indexOf('\n');
  return i < 0 ? s : s.slice(0, i);
}

/** Print `err` as the user should see it (stderr) and return its exit status. */
export function report(err: unknown, debug: boolean, out: (s: string) => void = (s) => process.stderr.write(s)): number {
  const d = describe(err);
  out(`error: ${d.line}\n`);
  if (debug && err instanceof Error && err.stack) out(err.stack + '\n');
  else if (debug && err instanceof SmartDiffusionError && err.cause instanceof Error && err.cause.stack) out(`cause: ${err.cause.stack}\n`);
  return exitCodeOf(err);
}

/**
 * Last-resort handlers: an error thrown where nothing awaits it (a stream's 'error', a timer) is
 * reported like any other, then the process exits with its status (after `cleanup`).
 */
export function installLastResort(debug: boolean, cleanup: () => void = () => {}): void {
  const die = (err: unknown) => {
    // a closed stdout/stderr (`| head`): nothing more can be said there
    if ((err as NodeJS.ErrnoException | null)?.code === 'EPIPE') {
      cleanup();
      process.exit(EXIT.output);
    }
    let code: number = EXIT.runtime;
    try {
      code = report(err, debug);
    } catch {
      /* stderr gone */
    }
    cleanup();
    process.exit(code);
  };
  process.on('uncaughtException', die);
  process.on('unhandledRejection', die);
}
