// The TypeScript API: `npx tsx examples/generate.ts ["prompt"]`.
// Same settings as the CLI's dotted keys (typed options here); see docs/api.md.
import { WanPipeline, writeVideoOutputs, outputPaths, fmtBytes } from '../src/index.ts';

const prompt = process.argv[2] ?? 'a yellow triangle moving up on a dark blue background';

const pipe = await WanPipeline.fromPretrained('weights/demo', {
  lowMemLevel: 2, // text encoder off the GPU (runs on the CPU device)
  onProgress: (ev) => {
    if (ev.type === 'step') console.log(`step ${ev.step}/${ev.total}, GPU ${fmtBytes(ev.allocated)}`);
  },
});
try {
  const result = await pipe.generate({ prompt, seed: 42 });
  const [, frames, height, width] = result.videoShape;
  console.log(`${frames} frames ${width}x${height}; peak GPU memory ${fmtBytes(result.memory.peakAllocated)}`);
  const paths = outputPaths('outputs/example.mp4');
  const written = await writeVideoOutputs(paths, result.video, result.videoShape, { mp4: true, preview: true, frames: false, fps: 16 });
  console.log(`wrote ${written.join(', ')}`);
} finally {
  pipe.dispose(); // frees the GPU; the process can exit
}
