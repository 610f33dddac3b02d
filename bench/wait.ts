// `npm run bench:wait` — what waiting for the GPU costs. dawn.node busy-polls the main thread while
// a GPU promise is pending; the engine instead sleeps for the predicted GPU time first
// (src/device/wait.ts). Same kernel, same process, modes interleaved; reports the median wall time
// per run, the GPU time of the kernel (timestamp queries) and the main thread's CPU time.
import { Engine } from '../src/runtime/engine.ts';
import { linear } from '../src/ops/matmul.ts';
import { Rng } from '../src/util/rng.ts';
import { readFileSync } from 'node:fs';

/** CPU ms of the main thread alone (Linux: /proc/self/task/<pid>/stat utime + stime). */
function mainThreadCpuMs(): number {
  try {
    const f = readFileSync(`/proc/self/task/${process.pid}/stat`, 'utf8');
    const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
    return ((Number(rest[11]) + Number(rest[12])) * 1000) / 100; // USER_HZ = 100
  } catch {
    const c = process.cpuUsage();
    return (c.user + c.system) / 1000;
  }
}

const [M, K, N] = [1024, 1536, 1536];
const rounds = Number(process.argv[2] ?? 6);
const e = await Engine.create({ profile: true });
const r = new Rng(3);
const x = e.fromHost(r.fillNormal(new Float32Array(M * K)), [M, K], 'f32');
const w = e.fromHost(r.fillNormal(new Float32Array(N * K), 1 / Math.sqrt(K)), [N, K], 'f32');
// warm up: compile the pipelines, calibrate the predictor
for (let i = 0; i < 3; i++) {
  linear(x, w).dispose();
  await e.sync();
}
const res: Record<string, { wall: number[]; gpu: number[]; cpu: number[] }> = { await: { wall: [], gpu: [], cpu: [] }, predict: { wall: [], gpu: [], cpu: [] } };
for (let i = 0; i < rounds; i++) {
  for (const mode of ['await', 'predict'] as const) {
    e.waitMode = mode;
    e.profile.reset();
    const c0 = mainThreadCpuMs();
    const t0 = performance.now();
    const y = linear(x, w);
    await e.sync();
    const wall = performance.now() - t0;
    const c = mainThreadCpuMs() - c0;
    y.dispose();
    res[mode]!.wall.push(wall);
    res[mode]!.gpu.push(e.profile.totalMs());
    res[mode]!.cpu.push(c);
  }
}
const med = (a: number[]) => [...a].sort((p, q) => p - q)[Math.floor(a.length / 2)]!;
console.log(`adapter ${e.adapterName}; linear ${M}x${K}x${N} f32, ${rounds} rounds per mode (interleaved)`);
console.log('mode     wall ms (median)  kernel GPU ms (median)  main-thread CPU ms (median)');
for (const mode of ['await', 'predict']) {
  const m = res[mode]!;
  console.log(`${mode.padEnd(8)} ${med(m.wall).toFixed(1).padStart(16)}  ${med(m.gpu).toFixed(1).padStart(22)}  ${med(m.cpu).toFixed(1).padStart(27)}`);
}
const a = res.await!;
const p = res.predict!;
console.log(`predict/await: wall x${(med(p.wall) / med(a.wall)).toFixed(2)}, kernel time x${(med(p.gpu) / med(a.gpu)).toFixed(2)}, main-thread CPU ${med(a.cpu).toFixed(0)} -> ${med(p.cpu).toFixed(0)} ms`);
x.dispose();
w.dispose();
e.destroy();
