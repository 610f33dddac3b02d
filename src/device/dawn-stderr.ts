// Keeps two Dawn lines off stderr:
//
//   Warning: maxDynamicUniformBuffersPerPipelineLayout artificially reduced from 1000000 to 16 to fit dynamic offset allocation limit.
//   Warning: maxDynamicStorageBuffersPerPipelineLayout artificially reduced from 1000000 to 16 ...
//
// Their cause is not ours to fix: Dawn writes them (C++ fprintf to fd 2) when an instance first
// enumerates its adapters and clamps the limits the Vulkan driver reports (lavapipe: 1000000) to
// what its bind-group code supports (16), before any device or requested limit exists. Dawn has no
// toggle or callback for them. So during the synchronous part of an instance's first requestAdapter
// fd 2 points at a temporary file; everything else written there (driver or loader diagnostics) is
// passed on to stderr afterwards. This is done only where it is safe: on the main thread, with
// stderr a pipe or a terminal (reopened through /proc/self/fd without sharing a file offset that
// stdout may also use), fds 0 and 1 open (so the lowest free descriptor is 2) and nothing queued
// on process.stderr. Anywhere else (stderr a file, or a socket: a child that Node spawned with
// piped stdio, such as a vitest worker) the two lines are printed as before; Node has no dup2.

import { closeSync, constants, fstatSync, openSync, readFileSync, unlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isMainThread } from 'node:worker_threads';

const DAWN_LIMIT_WARNING = /^Warning: maxDynamic(Uniform|Storage)BuffersPerPipelineLayout artificially reduced from \d+ to \d+ to fit dynamic offset allocation limit\.\n?/gm;

/** `text` without Dawn's two limit warnings (also used where the test workers' stderr reaches vitest). */
export function dropDawnLimitWarnings(text: string): string {
  return text.replace(DAWN_LIMIT_WARNING, '');
}

function redirectable(): boolean {
  if (!isMainThread || process.platform !== 'linux' || process.stderr.writableLength > 0) return false;
  try {
    fstatSync(0);
    fstatSync(1);
    const st = fstatSync(2);
    return st.isFIFO() || st.isCharacterDevice();
  } catch {
    return false;
  }
}

/** Point fd 2 back at what `saved` refers to and close `saved`. */
function restore(saved: number): void {
  closeSync(2);
  const fd = openSync(`/proc/self/fd/${saved}`, constants.O_WRONLY);
  if (fd !== 2) closeSync(fd); // cannot happen with fds 0 and 1 open; never leave a stray descriptor
  closeSync(saved);
}

/** Run `fn` (a call that makes Dawn enumerate adapters) with Dawn's two limit warnings filtered out of stderr. */
export function withoutDawnLimitWarnings<T>(fn: () => T): T {
  if (!redirectable()) return fn();
  let saved: number;
  try {
    saved = openSync('/proc/self/fd/2', constants.O_WRONLY);
  } catch {
    return fn();
  }
  const file = join(tmpdir(), `smart-diffusion-dawn-stderr-${process.pid}.txt`);
  closeSync(2);
  let fd = -1;
  try {
    fd = openSync(file, 'w+'); // the lowest free descriptor: 2
  } catch {
    /* fall through: fd stays -1 */
  }
  if (fd !== 2) {
    if (fd >= 0) closeSync(fd);
    restore(saved);
    return fn();
  }
  try {
    return fn();
  } finally {
    restore(saved);
    let text = '';
    try {
      text = readFileSync(file, 'utf8');
      unlinkSync(file);
    } catch {
      /* nothing to pass on */
    }
    const rest = dropDawnLimitWarnings(text);
    if (rest.length > 0) process.stderr.write(rest);
  }
}
