// Error types. Every message names the thing and the fix (conventions: "[op] what is wrong; what to do").
// `code` is stable and machine readable (the CLI prints it and maps it to an exit status).

export class SmartDiffusionError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** No WebGPU adapter or dawn.node could not start. */
export class NoAdapterError extends SmartDiffusionError {
  constructor(message: string) {
    super('NO_ADAPTER', message);
  }
}

/** A WebGPU validation/internal error or device loss, attributed to the kernels that ran. */
export class GpuError extends SmartDiffusionError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('GPU_ERROR', message, options);
  }
}

export interface OomInfo {
  phase: string;
  owner: string;
  requestedBytes: number;
  allocatedBytes: number;
  reservedBytes: number;
  limitBytes: number;
}

/** The GPU memory budget (or the device itself) could not satisfy an allocation. */
export class OutOfMemoryError extends SmartDiffusionError {
  readonly info: OomInfo;
  constructor(info: OomInfo, advice: string) {
    super(
      'OUT_OF_MEMORY',
      `out of GPU memory in phase '${info.phase}': ${fmtBytes(info.requestedBytes)} requested for '${info.owner}' ` +
        `with ${fmtBytes(info.allocatedBytes)} allocated and ${fmtBytes(info.reservedBytes)} reserved` +
        (Number.isFinite(info.limitBytes) ? ` of a ${fmtBytes(info.limitBytes)} budget` : '') +
        `. ${advice}`,
    );
    this.info = info;
  }
}

/** Wrong shapes / dtypes / sizes given to an op. */
export class ShapeError extends SmartDiffusionError {
  constructor(message: string) {
    super('BAD_SHAPE', message);
  }
}

/** A checkpoint file or model folder is missing, corrupt or does not match its config. */
export class CheckpointError extends SmartDiffusionError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('BAD_CHECKPOINT', message, options);
  }
}

/** A configuration key is unknown, mistyped or out of range. */
export class ConfigError extends SmartDiffusionError {
  constructor(message: string) {
    super('BAD_CONFIG', message);
  }
}

/** The run was interrupted (Ctrl-C / SIGTERM / AbortSignal). */
export class InterruptedError extends SmartDiffusionError {
  constructor(message = 'interrupted') {
    super('INTERRUPTED', message);
  }
}

export function fmtBytes(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  const a = Math.abs(n);
  if (a >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (a >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  if (a >= 2 ** 10) return `${(n / 2 ** 10).toFixed(1)} KiB`;
  return `${n} B`;
}
