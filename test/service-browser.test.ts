// The service's web page (src/service/web/) in a real browser: Debian's headless Chromium driven by
// playwright-core against the real service (startService, a real redis-server on a free port, one
// in-process worker with the demo model). Submit a prompt → live progress from the event stream →
// a video that plays; the finished job's memory-snapshot timeline with its owners legend; the queue
// and the worker's memory; the service's one-line errors; the API key; cancel. Screenshots go to
// test-artifacts/ (SD_UPDATE_SCREENSHOTS=1 also refreshes the README's docs/images/service-page.png).
//
// Debian's chromium plays the H.264 MP4 the engine writes (libx264, yuv420p, via the bundled ffmpeg):
// the test checks the <video> element's readyState, duration, size, that it played, and its pixels.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { existsSync, mkdirSync, mkdtempSync, rmSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { startService } from '../src/service/server.ts';
import { startRedis } from './helpers/service.ts';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const ARTIFACTS = join(ROOT, 'test-artifacts');
const CHROMIUM = process.env.SD_CHROMIUM || '/usr/bin/chromium';
const HAVE_CHROMIUM = existsSync(CHROMIUM);
if (!HAVE_CHROMIUM) {
  console.warn(`[service-browser] skipped: no Chromium at ${CHROMIUM} (install it with .ci/install-service-deps.sh or apt-get install chromium; SD_CHROMIUM=PATH picks another)`);
}

const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const PROMPT = 'a red circle moving right on a black background';
const API_KEY = 'browser-test-key-7f3a';

type Service = Awaited<ReturnType<typeof startService>>;
type Redis = Awaited<ReturnType<typeof startRedis>>;

async function shot(page: Page, name: string): Promise<string> {
  mkdirSync(ARTIFACTS, { recursive: true });
  const path = join(ARTIFACTS, name);
  await page.screenshot({ path, fullPage: true });
  return path;
}

/** Records, in the page, every text the element with `id` shows (the live progress as the user saw it). */
const RECORD_TEXTS = `
  window.__seen = {};
  window.__record = (id) => {
    const el = document.getElementById(id);
    const seen = (window.__seen[id] = [el.textContent]);
    new MutationObserver(() => { if (seen[seen.length - 1] !== el.textContent) seen.push(el.textContent); })
      .observe(el, { childList: true, characterData: true, subtree: true });
  };
`;

describe.skipIf(!HAVE_CHROMIUM)('service web page in headless Chromium', () => {
  let redis: Redis;
  let svc: Service;
  let keyed: Service | undefined;
  let ctx: BrowserContext;
  let profile: string;
  let outputDir: string;
  const pageErrors: string[] = [];
  let finishedId = '';

  beforeAll(async () => {
    redis = await startRedis();
    outputDir = mkdtempSync(join(tmpdir(), 'sd-browser-out-'));
    svc = await startService({ port: 0, host: '127.0.0.1', redisUrl: redis.url, inProcessWorker: true, outputDir });
    profile = mkdtempSync(join(tmpdir(), 'sd-chromium-profile-'));
    ctx = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1200, height: 900 },
    });
    ctx.on('page', (p) => p.on('pageerror', (e) => pageErrors.push(`${p.url()}: ${e.message}`)));
  }, 180_000);

  afterAll(async () => {
    await ctx?.close().catch(() => {});
    await keyed?.close().catch(() => {});
    await svc?.close().catch(() => {});
    await redis?.stop().catch(() => {});
    if (profile) rmSync(profile, { recursive: true, force: true });
    if (outputDir) rmSync(outputDir, { recursive: true, force: true });
  });

  async function openPage(url: string): Promise<Page> {
    const page = await ctx.newPage();
    page.on('pageerror', (e) => pageErrors.push(`${page.url()}: ${e.message}`));
    await page.addInitScript(RECORD_TEXTS);
    await page.goto(url);
    return page;
  }

  it('submit → live progress from the event stream → a video that plays, the queue and the worker memory', { timeout: 240_000 }, async () => {
    const page = await openPage(svc.url);
    await expect.poll(() => page.locator('#health').textContent(), { timeout: 20_000 }).toContain('redis up');
    await page.evaluate(`window.__record('job-step'); window.__record('job-state'); window.__record('job-eta')`);

    await page.getByLabel('Prompt', { exact: true }).fill(PROMPT);
    await page.getByLabel('Steps', { exact: true }).fill('20');
    await page.getByLabel('Seed', { exact: true }).fill('3');
    await page.getByLabel('Guidance', { exact: true }).fill('3.5');
    await page.getByLabel(/memory snapshot/i).check();
    await page.getByRole('button', { name: 'Generate', exact: true }).click();

    await expect.poll(() => page.locator('#job-state').textContent(), { timeout: 180_000, interval: 250 }).toBe('completed');
    finishedId = decodeURIComponent(new URL(page.url()).hash.replace(/^#video=/, ''));
    expect(finishedId).not.toBe('');

    // the progress the user saw: several intermediate steps of 20, states in order, an ETA
    const seen = (await page.evaluate('window.__seen')) as Record<string, string[]>;
    const steps = seen['job-step']!.map((t) => /^(\d+) \/ 20$/.exec(t)).filter((m) => m).map((m) => Number(m![1]));
    const intermediate = new Set(steps.filter((s) => s > 0 && s < 20));
    expect(intermediate.size, `steps shown: ${seen['job-step']!.join(', ')}`).toBeGreaterThanOrEqual(3);
    expect(steps).toEqual([...steps].sort((a, b) => a - b)); // never went backwards
    expect(seen['job-state']!.filter((s) => s)).toEqual(expect.arrayContaining(['active', 'completed']));
    expect(seen['job-eta']!.some((t) => /\d+(\.\d)? s|min/.test(t)), `ETAs shown: ${seen['job-eta']!.join(', ')}`).toBe(true);
    expect(await page.locator('#job-progress').evaluate((el: { value: number }) => el.value)).toBe(1);

    // the settings reached the service as typed
    const job = (await (await fetch(`${svc.url.replace(/\/$/, '')}/v1/videos/${finishedId}`)).json()) as { state: string; settings: unknown; memory: { peak_allocated_bytes: number } | null };
    expect(job.state).toBe('completed');
    expect(JSON.stringify(job.settings)).toMatch(/num_inference_steps"?:20|numInferenceSteps"?:20/);
    expect(job.memory?.peak_allocated_bytes).toBeGreaterThan(0);
    expect(await page.locator('#job-memory').textContent()).toMatch(/(KiB|MiB|GiB) allocated/);

    // the MP4 plays in the <video>: metadata and a decodable frame, the demo's size and length, time advanced
    const video = page.locator('#job-video');
    await expect
      .poll(() => video.evaluate((v: { readyState: number; played: { length: number; end(i: number): number } }) => v.readyState >= 2 && v.played.length > 0 && v.played.end(0) > 0.2), { timeout: 20_000 })
      .toBe(true);
    const info = await video.evaluate((v: { readyState: number; duration: number; videoWidth: number; videoHeight: number; currentTime: number; error: unknown; paused: boolean }) => ({
      readyState: v.readyState,
      duration: v.duration,
      width: v.videoWidth,
      height: v.videoHeight,
      error: v.error,
      paused: v.paused,
    }));
    expect(info.error).toBeNull();
    expect(info.width).toBe(64);
    expect(info.height).toBe(64);
    expect(info.duration).toBeGreaterThan(1.0); // 9 frames at the demo's 8 fps: 1.125 s
    expect(info.duration).toBeLessThan(1.3);
    expect(info.paused).toBe(false);
    // what it shows: a red object on black (the prompt), read back from the decoded frame
    const px = await video.evaluate(
      (v: { ownerDocument: { createElement(t: string): any }; videoWidth: number; videoHeight: number }) => {
        const c = v.ownerDocument.createElement('canvas');
        c.width = v.videoWidth;
        c.height = v.videoHeight;
        const g = c.getContext('2d');
        g.drawImage(v, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data as Uint8ClampedArray;
        let red = 0;
        let dark = 0;
        for (let i = 0; i < d.length; i += 4) {
          if (d[i]! > 150 && d[i]! > d[i + 1]! + 60 && d[i]! > d[i + 2]! + 60) red++;
          if (d[i]! + d[i + 1]! + d[i + 2]! < 90) dark++;
        }
        return { red, dark, n: d.length / 4 };
      },
    );
    expect(px.red, JSON.stringify(px)).toBeGreaterThan(20);
    expect(px.dark, JSON.stringify(px)).toBeGreaterThan(px.n / 3);
    // the GIF preview decoded too (the engine scales small previews up: 64 → 256)
    const gif = await page.locator('#job-preview').evaluate((i: { complete: boolean; naturalWidth: number; naturalHeight: number }) => ({ ok: i.complete, w: i.naturalWidth, h: i.naturalHeight }));
    expect(gif.ok).toBe(true);
    expect(gif.w).toBeGreaterThanOrEqual(64);
    expect(gif.h).toBe(gif.w);

    // the queue panel: counts and this worker with its GPU memory (refreshed every 3 s)
    await expect.poll(async () => Number(await page.locator('#count-completed').textContent()), { timeout: 15_000 }).toBeGreaterThanOrEqual(1);
    const row = page.locator('#workers tr[data-worker]').first();
    await expect.poll(() => row.count(), { timeout: 15_000 }).toBe(1);
    await expect.poll(async () => Number(await row.locator('td').nth(8).textContent()), { timeout: 15_000 }).toBeGreaterThanOrEqual(1);
    expect(await row.locator('td').nth(6).textContent()).toMatch(/(KiB|MiB|GiB)$/); // GPU reserved
    expect(await row.locator('td').nth(7).textContent()).toMatch(/(KiB|MiB|GiB)$/); // peak allocated

    const png = await shot(page, 'service-page.png');
    if (process.env.SD_UPDATE_SCREENSHOTS === '1') copyFileSync(png, join(ROOT, 'docs', 'images', 'service-page.png'));
    expect(pageErrors).toEqual([]);
  });

  it("opens the finished job's memory-snapshot timeline, with its owners legend", { timeout: 60_000 }, async () => {
    expect(finishedId, 'needs the video of the first test').not.toBe('');
    const page = await openPage(`${svc.url.replace(/\/$/, '')}/#video=${encodeURIComponent(finishedId)}`);
    const linkEl = page.getByRole('link', { name: 'Memory timeline' });
    await expect.poll(() => linkEl.isVisible(), { timeout: 20_000 }).toBe(true);
    const [tl] = await Promise.all([ctx.waitForEvent('page'), linkEl.click()]);
    await tl.waitForLoadState('load');
    await shot(tl, 'memory-timeline.png');
    expect(await tl.locator('h1').textContent()).toMatch(/GPU memory/);
    expect(await tl.locator('h2').textContent()).toMatch(/Owners/);
    // the stacked bands and the legend: one row per owner group with its colour and peak bytes
    expect(await tl.locator('svg polygon').count()).toBeGreaterThan(3);
    const rows = tl.locator('table tr');
    expect(await rows.count()).toBeGreaterThan(3);
    const owners = await rows.locator('td:nth-child(2)').allTextContents();
    // the request's own allocations by owner, and the weights the worker loaded before the job
    expect(owners.some((o) => o.startsWith('activation.'))).toBe(true);
    expect(owners.some((o) => /^(dit|text_encoder|vae)\b/.test(o))).toBe(true);
    expect(new Set(owners).size).toBe(owners.length);
    for (const r of await rows.all()) {
      expect(await r.locator('td span').evaluate((e: { style: { background: string } }) => e.style.background)).not.toBe('');
      expect(await r.locator('td').nth(2).textContent()).toMatch(/^\d+(\.\d)? (B|KiB|MiB|GiB)$/);
    }
    expect(await tl.locator('body > p').first().textContent()).toMatch(/peak allocated \d/);
    const box = await tl.locator('svg').boundingBox();
    expect(box && box.width > 300 && box.height > 150).toBe(true);
    await tl.close();
    await page.close();
    expect(pageErrors).toEqual([]);
  });

  it("shows the service's own one-line error for a request it refuses", { timeout: 60_000 }, async () => {
    const page = await openPage(svc.url);
    await page.getByLabel('Prompt', { exact: true }).fill(PROMPT);
    // the form's own checks would stop 40: turn them off to see what the service says
    await page.locator('#gen-form').evaluate((f: { noValidate: boolean }) => {
      f.noValidate = true;
    });
    await page.getByLabel('Width', { exact: true }).fill('40');
    await page.getByRole('button', { name: 'Generate', exact: true }).click();
    const alert = page.locator('#form-error');
    await expect.poll(() => alert.isVisible(), { timeout: 15_000 }).toBe(true);
    const text = (await alert.textContent()) ?? '';
    expect(text).toContain('infer.width');
    expect(text).toContain('16');
    expect(text.split('\n').length).toBe(1);
    expect(await page.locator('#job').isVisible()).toBe(false); // nothing was queued
    await shot(page, 'service-error.png');
    await page.close();
  });

  it('asks for the API key when the service wants one, stores it, and sends it', { timeout: 60_000 }, async () => {
    keyed = await startService({ port: 0, host: '127.0.0.1', redisUrl: redis.url, inProcessWorker: false, apiKey: API_KEY, outputDir });
    const page = await openPage(keyed.url);
    const table = page.locator('#workers');
    await expect.poll(() => table.textContent(), { timeout: 15_000 }).toMatch(/key/i);
    expect(await page.locator('#key-box').evaluate((d: { open: boolean }) => d.open)).toBe(true);
    await page.getByLabel('API key', { exact: true }).fill(API_KEY);
    await page.getByRole('button', { name: 'Save', exact: true }).click();
    await expect.poll(() => page.locator('#count-completed').textContent(), { timeout: 15_000 }).toMatch(/^\d+$/);
    expect(await table.textContent()).not.toMatch(/key/i);
    expect(await page.evaluate(`localStorage.getItem('smart-diffusion.api-key')`)).toBe(API_KEY);
    // a reload keeps it: the page works straight away
    await page.reload();
    await expect.poll(() => page.locator('#count-completed').textContent(), { timeout: 15_000 }).toMatch(/^\d+$/);
    await shot(page, 'service-api-key.png');
    await page.close();
    expect(pageErrors).toEqual([]);
  });

  it('cancels a running video from the page', { timeout: 180_000 }, async () => {
    const page = await openPage(svc.url);
    await page.getByLabel('Prompt', { exact: true }).fill(PROMPT);
    await page.getByLabel('Steps', { exact: true }).fill('400');
    await page.getByRole('button', { name: 'Generate', exact: true }).click();
    await expect.poll(() => page.locator('#job-step').textContent(), { timeout: 120_000, interval: 250 }).toMatch(/^[1-9]\d* \/ 400$/);
    await page.getByRole('button', { name: 'Cancel', exact: true }).click();
    await expect.poll(() => page.locator('#job-state').textContent(), { timeout: 60_000 }).toBe('cancelled');
    expect(await page.getByRole('button', { name: 'Cancel', exact: true }).isVisible()).toBe(false);
    expect(await page.locator('#result').isVisible()).toBe(false);
    // the worker is free again
    await expect.poll(async () => page.locator('#workers tr[data-worker] td').nth(3).textContent(), { timeout: 60_000 }).toBe('idle');
    await page.close();
    expect(pageErrors).toEqual([]);
  });

  it('says when Redis is down, and recovers when it is back', { timeout: 120_000 }, async () => {
    const page = await openPage(svc.url);
    await expect.poll(() => page.locator('#health').textContent(), { timeout: 15_000 }).toContain('redis up');
    const port = redis.port;
    redis.kill();
    await expect.poll(() => page.locator('#health').textContent(), { timeout: 30_000 }).toMatch(/redis down/);
    expect(await page.locator('#health').getAttribute('class')).toContain('down');
    await expect.poll(() => page.locator('#workers').textContent(), { timeout: 15_000 }).toMatch(/redis|unavailable|503/i);
    expect(await page.locator('#count-queued').textContent()).toBe('–'); // no stale counts while it is down
    await shot(page, 'service-redis-down.png');
    redis = await startRedis(port);
    await expect.poll(() => page.locator('#health').textContent(), { timeout: 60_000 }).toContain('redis up');
    await expect.poll(() => page.locator('#count-queued').textContent(), { timeout: 30_000 }).toMatch(/^\d+$/);
    await page.close();
    expect(pageErrors).toEqual([]);
  });
});
