// `npm run serve -- [--port N] [--host H] [--api-key K] [--no-worker] [worker options] [key=value ...]`
// The generation service's HTTP API (docs/service.md). REDIS_URL set: jobs go to that Redis and
// workers (npm run worker) run them. REDIS_URL unset: a local redis-server (temporary, no
// persistence) and one in-process worker, so `npm run serve` then one curl makes a video.

import { startService } from '../service/server.ts';
import { parseServiceArgs, serviceUsage } from '../service/cli-args.ts';
import { report } from './fail.ts';
import { untilSignal, runMain } from './long-running.ts';

async function main(): Promise<number> {
  let a;
  try {
    a = parseServiceArgs(process.argv.slice(2), 'serve');
  } catch (e) {
    return report(e, false);
  }
  if (!a) {
    process.stdout.write(serviceUsage('serve'));
    return 0;
  }
  const svc = await startService({
    port: a.port ?? 8080,
    host: a.host,
    redisUrl: a.redisUrl,
    apiKey: a.apiKey,
    inProcessWorker: a.noWorker ? false : a.redisUrl ? a.inProcessWorker : true,
    outputDir: a.outputDir,
    maxBodyBytes: a.maxBodyBytes,
    maxPixels: a.maxPixels,
    resultTtlSeconds: a.resultTtlSeconds,
    workerOptions: a.worker,
  });
  process.stdout.write(
    `ready: ${svc.url}\n  try: curl -s -X POST ${svc.url}/v1/videos -H 'content-type: application/json'${a.apiKey ? " -H 'authorization: Bearer $SMART_DIFFUSION_API_KEY'" : ''} -d '{"prompt": "a red circle moving right on a black background"}'\n`,
  );
  await untilSignal(() => svc.close(), 'stopping (the running job, if any, goes back to the queue when Redis is shared; Ctrl-C again to quit at once)');
  return 0;
}

runMain(main);
