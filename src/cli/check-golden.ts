// `npm run check-golden -- <case-folder> [--weights f32|f16|bf16] [--attention sdpa|sage] [--groups t5,dit,...] [--tol 1e-4] [--tol-e2e 1e-3]`
// Runs every engine component on a golden case folder and prints one line per tensor:
// name, max abs error, max rel error, PASS/FAIL; then `N passed, M failed`. Exit status 0 only
// when all pass. Errors are one line: exit 2 for bad usage or config, 5 for a bad case folder
// (golden.json, golden.safetensors, the model folder: checked before the GPU starts), 1 otherwise;
// an unexpected error (a bug) prints its stack only with --debug.
import { resolve } from 'node:path';
import { Engine } from '../runtime/engine.ts';
import { checkGolden, openGoldenCase, describeExperts, CHECK_GROUPS, type CheckOptions, type GoldenCase } from '../golden/check.ts';
import { report } from './fail.ts';

function usage(): never {
  console.error(
    'usage: npm run check-golden -- <case-folder> [--weights checkpoint|f32|f16|bf16] [--groups sched,host,t5,dit,vae,sample] [--activations f32|f16] [--attention sdpa|sage] [--metric abs|rel] [--tol 1e-4] [--tol-e2e 1e-3] [--debug]',
  );
  process.exit(2);
}

const debug = process.argv.includes('--debug');

/** `value` if it is one of `allowed`, else a one-line error naming the flag and its choices. */
function oneOf<T extends string>(flag: string, value: string, allowed: readonly T[]): T {
  if ((allowed as readonly string[]).includes(value)) return value as T;
  console.error(`check-golden: ${flag} must be one of ${allowed.join(', ')}; got '${value}'`);
  process.exit(2);
}

/** `value` as a number > 0, else a one-line error naming the flag. */
function positive(flag: string, value: string): number {
  const v = Number(value);
  if (Number.isFinite(v) && v > 0) return v;
  console.error(`check-golden: ${flag} must be a number > 0 (e.g. 1e-4); got '${value}'`);
  process.exit(2);
}

async function main(): Promise<number> {
  const args = process.argv.slice(2);
  let dir: string | null = null;
  const opts: CheckOptions = {};
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const next = () => args[++i] ?? usage();
    if (a === '--weights') opts.weightDtype = oneOf(a, next(), ['checkpoint', 'f32', 'f16', 'bf16'] as const);
    else if (a === '--groups') opts.groups = next().split(',').map((g) => oneOf(a, g, CHECK_GROUPS));
    else if (a === '--activations') opts.activationDtype = oneOf(a, next(), ['f32', 'f16'] as const);
    else if (a === '--attention') opts.attention = oneOf(a, next(), ['sdpa', 'sage'] as const);
    else if (a === '--metric') opts.metric = oneOf(a, next(), ['abs', 'rel'] as const);
    else if (a === '--tol') opts.tolComponent = positive(a, next());
    else if (a === '--tol-e2e') opts.tolEndToEnd = positive(a, next());
    else if (a === '-h' || a === '--help') usage();
    else if (a === '--debug') continue;
    else if (!dir) dir = resolve(a);
    else usage();
  }
  if (!dir) usage();
  // reduced precision: errors scale with magnitudes; the documented tolerances (docs/precision.md)
  const reduced = (opts.weightDtype && opts.weightDtype !== 'checkpoint' && opts.weightDtype !== 'f32') || opts.activationDtype === 'f16';
  if (reduced) {
    opts.metric ??= 'rel';
    opts.tolComponent ??= 3e-2;
    opts.tolEndToEnd ??= 5e-2;
  } else if (opts.attention === 'sage') {
    // quantized attention (int8 Q·Kᵀ, f16 P·V): max error relative to the tensor's max, as for
    // reduced precision; the tolerances of docs/precision.md "Quantized attention"
    opts.metric ??= 'rel';
    opts.tolComponent ??= 3e-2;
    opts.tolEndToEnd ??= 5e-2;
  }
  // the case folder first: a malformed golden.json or missing file fails in milliseconds, before the GPU starts
  const gc: GoldenCase = await openGoldenCase(dir);
  let e: Engine;
  try {
    e = await Engine.create();
  } catch (err) {
    await gc.gold.close();
    throw err;
  }
  const t0 = performance.now();
  let pass = 0;
  let fail = 0;
  try {
    const w = 40;
    console.log(`case ${dir} on ${e.adapterName}${opts.weightDtype ? `, weights ${opts.weightDtype}` : ''}${opts.activationDtype ? `, activations ${opts.activationDtype}` : ''}${opts.attention ? `, attention ${opts.attention}` : ''}; metric ${opts.metric ?? 'abs'}`);
    // two-expert (Wan 2.2 A14B) cases: which DiT and guidance scale each sampling step uses
    const experts = describeExperts(gc);
    if (experts) console.log(`two experts (transformer/ = high noise, transformer_2/ = low noise); ${experts}`);
    console.log(`${'tensor'.padEnd(w)} ${'max abs'.padStart(11)} ${'max rel'.padStart(11)} ${'tol'.padStart(8)}  result`);
    await checkGolden(e, gc, {
      ...opts,
      onRow: (r) => {
        if (r.pass) pass++;
        else fail++;
        console.log(`${r.name.padEnd(w)} ${r.maxAbs.toExponential(3).padStart(11)} ${r.maxRel.toExponential(3).padStart(11)} ${r.tol.toExponential(0).padStart(8)}  ${r.pass ? 'PASS' : 'FAIL'}`);
      },
    });
  } finally {
    e.destroy();
  }
  console.log(`${pass} passed, ${fail} failed (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
  return fail === 0 && pass > 0 ? 0 : 1;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    // the same one-line report and exit status as `generate` (src/cli/fail.ts)
    process.exitCode = report(err, debug);
  },
);
