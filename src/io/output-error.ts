// OutputError (exit 6) and the one place that turns a file-system error met while writing an output
// into a one-line message naming the file and the fix. Every writer (atomic.ts, video.ts, outputs.ts,
// report.ts) goes through `outputIoError`, so ENOSPC in the sidecar reads the same as ENOSPC in ffmpeg.

import { SmartDiffusionError } from '../util/errors.ts';

export class OutputError extends SmartDiffusionError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('OUTPUT_ERROR', message, options);
  }
}

const MB = 1024 * 1024;
function mb(n: number): string {
  return n >= 10 * MB ? (n / MB).toFixed(0) : (n / MB).toFixed(1);
}

/** How much space a failed write needed: a known total, or at least what was written before it failed. */
export interface SpaceHint {
  /** total bytes the file needs, when known */
  needBytes?: number;
  /** bytes written before the failure (the file needs more than this) */
  writtenBytes?: number;
}

function spaceText(h: SpaceHint): string {
  if (h.needBytes !== undefined && h.needBytes > 0) return ` (needs ~${mb(h.needBytes)} MB)`;
  if (h.writtenBytes !== undefined && h.writtenBytes > 0) return ` (needs more than the ${mb(h.writtenBytes)} MB written before the disk filled)`;
  return '';
}

/** One line: newlines and runs of spaces collapsed. */
export function oneLine(s: string): string {
  return s.replace(/\s*[\r\n]+\s*/g, ' | ').replace(/\s{2,}/g, ' ').trim();
}

/**
 * The errno-style code of `e` (`ENOSPC`, ...), or undefined. Also recognises the texts ffmpeg prints
 * for them (ffmpeg reports errors on stderr, not by a code).
 */
export function errnoCode(e: unknown): string | undefined {
  const code = (e as NodeJS.ErrnoException | null)?.code;
  if (typeof code === 'string' && /^E[A-Z0-9]+$/.test(code)) return code;
  return undefined;
}

const TEXT_CODES: Array<[RegExp, string]> = [
  [/no space left on device/i, 'ENOSPC'],
  [/disk quota exceeded/i, 'EDQUOT'],
  [/read-only file system/i, 'EROFS'],
  [/permission denied/i, 'EACCES'],
  [/input\/output error/i, 'EIO'],
  [/file too large/i, 'EFBIG'],
];

/** The errno code named by an error text such as ffmpeg's "Error writing trailer ...: No space left on device". */
export function errnoFromText(text: string): string | undefined {
  for (const [re, code] of TEXT_CODES) if (re.test(text)) return code;
  return undefined;
}

/**
 * The one-line OutputError for a failed write of `path`. `code` is the errno code (ENOSPC, EDQUOT,
 * EIO, EPIPE, EROFS, EACCES, ...); `detail` the underlying message for codes without a fixed text;
 * `option` the setting that chooses the path (default `output.path (-o)`).
 */
export function outputErrorFor(code: string | undefined, path: string, detail: string, hint: SpaceHint = {}, option = 'output.path (-o)', cause?: unknown): OutputError {
  const p = path;
  let msg: string;
  switch (code) {
    case 'ENOSPC':
      msg = `[output] no space left on device writing ${p}${spaceText(hint)}; free space or choose another ${option}`;
      break;
    case 'EDQUOT':
      msg = `[output] disk quota exceeded writing ${p}${spaceText(hint)}; free space within your quota or choose another ${option}`;
      break;
    case 'EFBIG':
      msg = `[output] file too large for the file system writing ${p}${spaceText(hint)}; choose another ${option} on a file system that allows larger files`;
      break;
    case 'EROFS':
      msg = `[output] the file system is read-only writing ${p}; choose another ${option}`;
      break;
    case 'EACCES':
    case 'EPERM':
      msg = `[output] permission denied writing ${p}; fix the folder's permissions or choose another ${option}`;
      break;
    case 'EIO':
      msg = `[output] input/output error writing ${p} (a failing disk or a lost network mount); check the device or choose another ${option}`;
      break;
    case 'EPIPE':
      msg = `[output] the writer's pipe closed while writing ${p}${detail ? ` (${oneLine(detail)})` : ''}; free space or choose another ${option}`;
      break;
    case 'ENOENT':
      msg = `[output] the folder of ${p} does not exist (ENOENT: it is missing or was removed during the write); create it or choose another ${option}`;
      break;
    default:
      msg = `[output] could not write ${p} (${oneLine(detail || code || 'unknown error')}); choose another ${option}`;
  }
  return new OutputError(msg, { cause });
}

/**
 * Map any error thrown while writing `path` to a one-line OutputError; errors that are already ours
 * (SmartDiffusionError: interrupted, verification failures, ...) pass through unchanged, and so do
 * plain programming errors without an errno code.
 */
export function outputIoError(e: unknown, path: string, hint: SpaceHint = {}, option?: string): unknown {
  if (e instanceof SmartDiffusionError) return e;
  const code = errnoCode(e);
  if (!code) return e;
  const detail = `${code}: ${String((e as Error).message ?? e).replace(/^E[A-Z0-9]+: /, '')}`;
  return outputErrorFor(code, path, detail, hint, option, e);
}
