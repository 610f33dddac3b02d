// Temporary files and child processes that must not outlive the run.
//
// Every output is written to a temporary name in its final folder and renamed when complete. The
// names follow ONE scheme that embeds the writer's pid:
//
//     .<final name>.tmp-<pid>-<8 hex>        e.g. .clip.mp4.tmp-41234-9f3a01bc
//
// - while a temp file or an ffmpeg child is live it is registered here; `cleanupOnExit()` (sync)
//   removes every registered temp file and SIGKILLs every registered child. It runs on
//   process 'exit' (installed on first use, so process.exit(130) on a second Ctrl-C is covered) and
//   the CLI may call it itself;
// - a run killed outright (SIGKILL, power loss) leaves its temp files behind: `cleanStaleTemps(dir)`
//   removes those whose pid is no longer a live process, at the next start in that folder.

import { readdirSync, rmSync, statSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import type { ChildProcess } from 'node:child_process';

/** Temporary name for writing `path`: same folder (so rename is atomic), hidden, with our pid. */
export function tempPathFor(path: string): string {
  return join(dirname(path), `.${basename(path)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
}

/** Our temp names: the current scheme, the older video.ts scheme (.x.mp4.<pid>.<ms>.tmp) and the writability probe. */
const TEMP_PATTERNS: RegExp[] = [/^\..+\.tmp-(\d+)-[0-9a-f]+$/, /^\..+\.(\d+)\.\d{10,}\.tmp$/, /^\.sd-write-probe-(\d+)$/];

/** The pid embedded in one of our temp file names, or null when `name` is not one of ours. */
export function tempOwnerPid(name: string): number | null {
  for (const re of TEMP_PATTERNS) {
    const m = re.exec(name);
    if (m) {
      const pid = Number(m[1]);
      return Number.isSafeInteger(pid) && pid > 0 ? pid : null;
    }
  }
  return null;
}

/** Whether a process with this pid exists (EPERM: it exists but belongs to someone else). */
export function pidAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Temp files older than this are stale even when their pid was reused by a live process. */
const STALE_AGE_MS = 7 * 24 * 3600 * 1000;

/**
 * Remove the temp files left in `dir` by runs that no longer exist (their pid is not a live
 * process, or the file is over a week old and not ours). Files of live runs and every file that is
 * not one of our temp names are left alone. Never throws; returns the names removed.
 */
export function cleanStaleTemps(dir: string): string[] {
  const removed: string[] = [];
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return removed;
  }
  const now = Date.now();
  for (const name of names) {
    const pid = tempOwnerPid(name);
    if (pid === null || pid === process.pid) continue;
    const full = join(dir, name);
    let stale = !pidAlive(pid);
    if (!stale) {
      try {
        const st = statSync(full);
        stale = now - st.mtimeMs > STALE_AGE_MS;
      } catch {
        continue;
      }
    }
    if (!stale) continue;
    try {
      rmSync(full, { recursive: true, force: true }); // a PNG frames folder in the making is a temp too
      removed.push(name);
    } catch {
      /* gone already, or not ours to remove */
    }
  }
  return removed;
}

// ---- process-wide registry ----

const liveTemps = new Set<string>();
const liveChildren = new Set<ChildProcess>();
let hookInstalled = false;

function installExitHook(): void {
  if (hookInstalled) return;
  hookInstalled = true;
  process.on('exit', cleanupOnExit);
}

export function registerTemp(path: string): void {
  installExitHook();
  liveTemps.add(path);
}

export function unregisterTemp(path: string): void {
  liveTemps.delete(path);
}

/** Register a child (ffmpeg) until it exits. */
export function registerChild(child: ChildProcess): void {
  installExitHook();
  liveChildren.add(child);
  const drop = () => liveChildren.delete(child);
  child.once('exit', drop);
  child.once('error', drop);
}

/** The registered temp files and children (for tests and diagnostics). */
export function liveResources(): { temps: string[]; children: number[] } {
  return { temps: [...liveTemps], children: [...liveChildren].map((c) => c.pid ?? -1) };
}

/**
 * Synchronous last-chance cleanup for every exit path (process 'exit', a forced exit on the second
 * Ctrl-C, a fatal error): SIGKILL every registered child, then remove every registered temp file
 * (or temp folder of PNG frames).
 * Idempotent and never throws.
 */
export function cleanupOnExit(): void {
  for (const c of liveChildren) {
    try {
      if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    } catch {
      /* already gone */
    }
  }
  liveChildren.clear();
  for (const t of liveTemps) {
    try {
      rmSync(t, { recursive: true, force: true });
    } catch {
      /* already gone */
    }
  }
  liveTemps.clear();
}
