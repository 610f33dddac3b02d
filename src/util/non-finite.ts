// Non-finite values (NaN / ±Inf) found in a tensor that must be finite: latents read from a file,
// a denoiser step's output, the decoded video. Its own error code so scripts can tell "the numbers
// went bad" apart from a broken checkpoint or an output write failure (proposed CLI exit 7).

import { SmartDiffusionError } from './errors.ts';

export class NonFiniteError extends SmartDiffusionError {
  constructor(message: string) {
    super('NON_FINITE', message);
  }
}

/** Count of non-finite values in `a` and the index of the first one (-1 when none). */
export function countNonFinite(a: ArrayLike<number>): { count: number; first: number } {
  let count = 0;
  let first = -1;
  for (let i = 0; i < a.length; i++) {
    const v = a[i]!;
    // v - v is NaN exactly when v is NaN or ±Inf; cheaper than Number.isFinite in a hot loop
    if (v - v !== 0) {
      if (first < 0) first = i;
      count++;
    }
  }
  return { count, first };
}
