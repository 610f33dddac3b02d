// tfjs-backend-webgpu as a peer, on the *same* Dawn device as our engine (same adapter, same queue).
// It works in Node: the Dawn globals are set by our device module; the backend is registered with
// our GPUDevice so both libraries run side by side in one process.
import type { Engine } from '../../src/runtime/engine.ts';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Tf = any;
let tfPromise: Promise<Tf> | null = null;

export function tfjsOn(e: Engine): Promise<Tf> {
  if (!tfPromise) {
    tfPromise = (async () => {
      const g = globalThis as unknown as { navigator?: { gpu?: unknown } };
      // tfjs checks `navigator.gpu` to decide that WebGPU exists; we hand it our device directly.
      if (!g.navigator) Object.defineProperty(globalThis, 'navigator', { value: {}, configurable: true, writable: true });
      // a placeholder is enough: the backend below is built on our device, not on navigator.gpu
      if (!g.navigator!.gpu) g.navigator!.gpu = { placeholder: 'smart-diffusion shares its GPUDevice' };
      const tf = await import('@tensorflow/tfjs-core');
      const wgpu = await import('@tensorflow/tfjs-backend-webgpu');
      // kernels are registered under the name 'webgpu': replace that backend's factory with ours
      if (tf.findBackendFactory('webgpu')) tf.removeBackend('webgpu');
      tf.registerBackend('webgpu', async () => new wgpu.WebGPUBackend(e.device), 10);
      await tf.setBackend('webgpu');
      await tf.ready();
      return tf;
    })();
  }
  return tfPromise;
}

const lastMs = new Map<string, number>();

/**
 * Wait for the peer's work: tfjs batches dispatches and submits every 15; make it submit what it
 * has, then wait on the shared queue. To be fair to the peer, it waits the way our engine does
 * (sleep ~85 % of the time its previous run took, then await; see src/device/wait.ts), so neither
 * side pays dawn.node's busy-poll cost in the comparison.
 */
export async function tfSync(tf: Tf, e: Engine, key = 'default'): Promise<void> {
  const t0 = performance.now();
  const b = tf.backend() as { submitQueue?: () => void; ensureCommandEncoderReady?: () => void; endComputePassEncoder?: () => void };
  // a lone tfjs op leaves its compute pass open: end it before submitting
  b.ensureCommandEncoderReady?.();
  b.endComputePassEncoder?.();
  b.submitQueue?.();
  const prev = lastMs.get(key);
  if (prev && prev > 2) await new Promise((r) => setTimeout(r, prev * 0.85));
  await e.device.queue.onSubmittedWorkDone();
  lastMs.set(key, performance.now() - t0);
}
