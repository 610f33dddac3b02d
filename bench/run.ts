// `npm run bench [-- --filter REGEX] [--json FILE] [--time MS] [--all] [--wait predict|await]`
// Runs every registered case (bench/*.bench.ts), validating each before timing.
import { readdirSync, writeFileSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Bench } from 'tinybench';
import { Engine } from '../src/runtime/engine.ts';
import { cases, type BenchRow } from './harness.ts';

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

async function timeIt(fn: () => Promise<void>, timeMs: number): Promise<{ median: number; samples: number }> {
  const bench = new Bench({ time: timeMs, iterations: 3, warmupIterations: 1, warmupTime: 0 });
  bench.add('x', fn);
  await bench.run();
  const r = bench.tasks[0]!.result as unknown as { latency?: { p50: number; samplesCount?: number; samples?: number[] }; error?: unknown; state?: string };
  if (!r.latency) throw new Error(`benchmark failed: ${String((r as { error?: unknown }).error ?? r.state)}`);
  return { median: r.latency.p50, samples: r.latency.samplesCount ?? r.latency.samples?.length ?? 0 };
}

async function main() {
  const here = dirname(fileURLToPath(import.meta.url));
  for (const f of readdirSync(here).filter((f) => f.endsWith('.bench.ts')).sort()) await import(join(here, f));
  const filter = arg('--filter');
  const re = filter ? new RegExp(filter) : null;
  const timeMs = Number(arg('--time') ?? 1500);
  const all = process.argv.includes('--all');
  const e = await Engine.create({ waitMode: (arg('--wait') as 'predict' | 'await') ?? 'predict' });
  console.log(`adapter: ${e.adapterName}; caps: ${JSON.stringify(e.caps)}`);
  const rows: BenchRow[] = [];
  const header = `${'kernel'.padEnd(10)} ${'workload'.padEnd(30)} ${'shape'.padEnd(28)} ${'dtype'.padEnd(9)} ${'ms'.padStart(9)} ${'GFLOP/s'.padStart(8)} ${'GB/s'.padStart(7)} ${'peer GF/s'.padStart(9)} ${'ratio'.padStart(6)}`;
  console.log(header);
  try {
    for (const c of cases) {
      const id = `${c.kernel} ${c.name} ${c.shape} ${c.dtype}`;
      if (re && !re.test(id)) continue;
      if (c.slow && !all && !re) continue;
      const inst = await c.setup(e);
      const flops = inst.work?.flops ?? c.flops;
      const bytes = inst.work?.bytes ?? c.bytes;
      if (flops === undefined || bytes === undefined) throw new Error(`[bench] ${id}: no flops/bytes (the case or its instance's registry work must give them)`);
      await inst.validate();
      const t = await timeIt(async () => {
        await inst.run();
        await e.sync();
      }, timeMs);
      inst.dispose();
      let peerMs: number | null = null;
      if (c.peer) {
        const p = await c.peer.setup(e);
        if (p.validate) await p.validate();
        peerMs = (await timeIt(() => p.run(), timeMs)).median;
        p.dispose();
      }
      const gflops = flops / (t.median * 1e6);
      const peerGf = peerMs ? flops / (peerMs * 1e6) : null;
      const row: BenchRow = {
        kernel: c.kernel,
        name: c.name,
        shape: c.shape,
        dtype: c.dtype,
        ms: t.median,
        gflops,
        gbps: bytes / (t.median * 1e6),
        peer: c.peer?.name ?? null,
        peer_ms: peerMs,
        peer_gflops: peerGf,
        ratio: peerGf ? gflops / peerGf : null,
        samples: t.samples,
      };
      rows.push(row);
      console.log(
        `${c.kernel.padEnd(10)} ${c.name.padEnd(30)} ${c.shape.padEnd(28)} ${c.dtype.padEnd(9)} ${t.median.toFixed(3).padStart(9)} ${gflops.toFixed(2).padStart(8)} ${row.gbps.toFixed(2).padStart(7)} ${(peerGf?.toFixed(2) ?? '-').padStart(9)} ${(row.ratio?.toFixed(2) ?? '-').padStart(6)}`,
      );
    }
  } finally {
    e.destroy();
  }
  const json = arg('--json');
  if (json) {
    mkdirSync(dirname(json), { recursive: true });
    writeFileSync(json, JSON.stringify({ adapter: e.adapterName, date: new Date().toISOString(), rows }, null, 2));
    console.log(`wrote ${json}`);
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
