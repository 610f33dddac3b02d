// Where a model's repeated blocks keep their weights while it runs. A model's forward says what it
// needs, block by block (`await acquire(i); prefetch(i + 1); run(i); release(i)`), and the pipeline
// picks the implementation: RESIDENT (every weight already on the device) or a streaming manager
// (pipeline/residency.ts: level 3 and the text encoder's 'gpu-stream').

/** Placement of the blocks' weights, driven by the residency manager (explicit in the models' block loops). */
export interface BlockResidency {
  /** make block i's weights usable on the GPU (waits for a prefetch in flight) */
  acquire(i: number): Promise<void>;
  /** start bringing block i's weights (no-op when resident) */
  prefetch(i: number): void;
  /** block i's weights are no longer needed for this pass */
  release(i: number): void;
}

/** Every weight is where it runs already: nothing to do. */
export const RESIDENT: BlockResidency = {
  acquire: async () => {},
  prefetch: () => {},
  release: () => {},
};
