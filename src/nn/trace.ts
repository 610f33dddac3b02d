// Tracing a forward pass: the models hand named intermediates to a Tracer (the golden tests compare
// them with the reference's activations).

import type { Tensor } from '../tensor/tensor.ts';

/** Receives named intermediates (golden tests); must copy what it keeps. */
export type Tracer = (name: string, t: Tensor) => Promise<void> | void;
