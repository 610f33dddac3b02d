// `REDIS_URL=redis://host:6379 npm run worker -- [--model DIR] [--config FILE] [--name NAME] [key=value ...]`
// One worker: loads its pipeline once (model, memory level or budget from its config) and takes
// video jobs from the queue in Redis until SIGINT/SIGTERM (docs/service.md).

import { startWorker } from '../service/worker.ts';
import { parseServiceArgs, serviceUsage } from '../service/cli-args.ts';
import { report } from './fail.ts';
import { untilSignal, runMain } from './long-running.ts';
import { ConfigError } from '../util/errors.ts';

async function main(): Promise<number> {
  let a;
  try {
    a = parseServiceArgs(process.argv.slice(2), 'worker');
    if (a && !a.redisUrl) throw new ConfigError('a worker needs the queue\'s Redis: set REDIS_URL (e.g. REDIS_URL=redis://127.0.0.1:6379 npm run worker), the same one npm run serve uses');
  } catch (e) {
    return report(e, false);
  }
  if (!a) {
    process.stdout.write(serviceUsage('worker'));
    return 0;
  }
  const w = await startWorker({ ...a.worker, redisUrl: a.redisUrl!, outputDir: a.outputDir });
  process.stdout.write(`worker ${w.name} ready\n`);
  await untilSignal(() => w.close(), 'finishing the running job, then stopping (Ctrl-C again to quit at once: the job goes back to the queue)');
  return 0;
}

runMain(main);
