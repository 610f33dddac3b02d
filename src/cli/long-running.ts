// What `npm run serve` and `npm run worker` share as long-running commands: run until SIGINT/SIGTERM
// (the first closes gracefully, a second quits at once), then exit with the command's code.

import { EXIT, report } from './fail.ts';
import { cleanupOnExit } from '../io/cleanup.ts';

/** Resolve once the first SIGINT/SIGTERM has run `close` (`message` says what closing does); a second signal exits at once. */
export function untilSignal(close: () => Promise<void>, message: string): Promise<void> {
  return new Promise<void>((resolveStop) => {
    let n = 0;
    const stop = (sig: string) => {
      if (++n > 1) {
        cleanupOnExit();
        process.exit(EXIT.interrupted);
      }
      process.stderr.write(`\n${sig}: ${message}\n`);
      close().then(resolveStop, resolveStop);
    };
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGTERM', () => stop('SIGTERM'));
  });
}

/** Run a long-running command's main and exit with its code (BullMQ/ioredis timers may linger a moment after close). */
export function runMain(main: () => Promise<number>): void {
  main().then(
    (code) => {
      process.exitCode = code;
      setTimeout(() => process.exit(code), 500).unref();
    },
    (e) => {
      process.exitCode = report(e, process.argv.includes('--debug'));
      cleanupOnExit();
      process.exit(process.exitCode);
    },
  );
}
