// The planner's walk repeats a DiT block (or a decode tile) instead of walking it when the allocator is in the state
// the last walked block started from (Engine.metaRepeat; every Wan block has the same shapes). The
// plan must be the same object as walking every block: peaks by phase and owner, host bytes, work
// per op (the cost model), dispatches in flight and where. These cases cover the branches: blocks
// with no wait inside (additive), blocks with throttle waits inside (lavapipe's mapping headroom;
// chunked attention), streamed and partially resident blocks, step caching, activation offload,
// two experts, and a state that changes between blocks (the first blocks are always walked).
import { describe, it, expect, vi } from 'vitest';
import { Engine } from '../src/runtime/engine.ts';
import { parseArgs } from '../src/cli/args.ts';
import { planRun } from '../src/plan/plan.ts';
import { modelShapes } from '../src/plan/shapes.ts';
import { GENERIC_GPU, LAVAPIPE, type MetaDeviceSpec } from '../src/plan/meta-gpu.ts';

const CASES: Array<[string, string[], MetaDeviceSpec]> = [
  ['weights/demo', ['infer.diffusion.low_mem_level=0', 'infer.width=96', 'infer.height=160', 'infer.num_frames=17'], GENERIC_GPU],
  ['weights/demo', ['infer.diffusion.low_mem_level=3', 'infer.width=512', 'infer.height=512', 'infer.num_frames=33'], LAVAPIPE],
  ['wan2.1-t2v-1.3b', ['infer.diffusion.low_mem_level=1', 'infer.attn_chunk_tokens=1024', 'infer.ffn_chunk_tokens=1024', 'infer.width=480', 'infer.height=272', 'infer.num_frames=33'], GENERIC_GPU],
  ['wan2.1-t2v-1.3b', ['infer.diffusion.low_mem_level=2', 'infer.width=480', 'infer.height=272', 'infer.num_frames=33'], LAVAPIPE],
  ['wan2.1-t2v-1.3b', ['infer.diffusion.low_mem_level=3', 'infer.diffusion.resident_blocks=10', 'infer.cache.mode=teacache', 'infer.width=480', 'infer.height=272', 'infer.num_frames=33'], GENERIC_GPU],
  ['wan2.1-t2v-1.3b', ['infer.diffusion.low_mem_level=3', 'infer.activation_offload=true', 'infer.width=256', 'infer.height=256', 'infer.num_frames=17'], GENERIC_GPU],
  ['wan2.1-t2v-14b', ['infer.diffusion.low_mem_level=3', 'infer.width=832', 'infer.height=480', 'infer.num_frames=81'], GENERIC_GPU],
  ['wan2.2-t2v-a14b', ['infer.diffusion.low_mem_level=3', 'infer.weights_source=disk', 'infer.width=256', 'infer.height=256', 'infer.num_frames=17'], LAVAPIPE],
];

describe('planner: repeated DiT blocks', () => {
  it.each(CASES)('%s %j: the same plan as walking every block', { timeout: 120_000 }, async (model, keys, device) => {
    const cli = parseArgs(['--model', model, ...keys])!;
    const shapes = await modelShapes(cli.settings.load.model);
    const repeat = vi.spyOn(Engine.prototype, 'metaRepeat');
    try {
      const full = await planRun(shapes, cli.settings, { device, repeatBlocks: false });
      expect(repeat.mock.results.some((r) => r.value === true)).toBe(false);
      repeat.mockClear();
      const fast = await planRun(shapes, cli.settings, { device });
      // most blocks were repeated, not walked (a DiT of n blocks, 2 steps: at least n of them)
      const repeated = repeat.mock.results.filter((r) => r.value === true).length;
      expect(repeated).toBeGreaterThanOrEqual(shapes.transformer.num_layers as number);
      expect(full.maxInFlight).toBeGreaterThan(0);
      expect(fast).toEqual(full);
    } finally {
      repeat.mockRestore();
    }
  });
});
