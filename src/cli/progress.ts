// Progress reporting for the CLI: a bar per denoising step with ETA and GPU memory (TTY), plain
// lines (not a TTY), JSON lines (`--json`, for scripts) or nothing (`--quiet`).

import type { ProgressEvent } from '../pipeline/wan-pipeline.ts';
import { fmtBytes } from '../util/errors.ts';

export type ProgressMode = 'bar' | 'quiet' | 'jsonl';

function fmtMs(ms: number): string {
  if (!Number.isFinite(ms)) return '?';
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
}

export class Progress {
  private lastLen = 0;
  private readonly tty: boolean;
  constructor(
    readonly mode: ProgressMode,
    private readonly out: NodeJS.WriteStream = process.stderr,
    private readonly jsonOut: NodeJS.WriteStream = process.stdout,
  ) {
    this.tty = Boolean(out.isTTY);
  }

  /** a line of text (not in json/quiet mode) */
  info(msg: string): void {
    if (this.mode === 'bar') {
      this.clear();
      this.out.write(msg + '\n');
    }
  }

  /** a JSON record (json mode), or a text line */
  record(obj: Record<string, unknown>, text?: string): void {
    if (this.mode === 'jsonl') this.jsonOut.write(JSON.stringify(obj) + '\n');
    else if (text !== undefined) this.info(text);
  }

  private clear(): void {
    if (this.tty && this.lastLen > 0) {
      this.out.write('\r' + ' '.repeat(this.lastLen) + '\r');
      this.lastLen = 0;
    }
  }

  event(ev: ProgressEvent): void {
    // a warning is not progress: --quiet still shows it
    if (this.mode === 'quiet' && ev.type === 'warning') this.out.write(`warning: ${ev.message}\n`);
    if (this.mode === 'quiet') return;
    if (this.mode === 'jsonl') {
      this.jsonOut.write(JSON.stringify({ event: ev.type, ...ev, type: undefined }) + '\n');
      return;
    }
    switch (ev.type) {
      case 'phase':
        this.info(`[${ev.phase}]${ev.detail ? ` ${ev.detail}` : ''}`);
        break;
      case 'step': {
        const w = 24;
        const fill = Math.round((ev.step / ev.total) * w);
        const line = `denoise [${'#'.repeat(fill)}${'-'.repeat(w - fill)}] ${ev.step}/${ev.total}${ev.expert ? ` ${ev.expert}` : ''}  ${fmtMs(ev.elapsedMs)} elapsed, ETA ${fmtMs(ev.etaMs)}  GPU ${fmtBytes(ev.allocated)} (peak ${fmtBytes(ev.peakAllocated)})`;
        if (this.tty) {
          this.out.write('\r' + line.padEnd(this.lastLen));
          this.lastLen = line.length;
          if (ev.step === ev.total) {
            this.out.write('\n');
            this.lastLen = 0;
          }
        } else this.out.write(line + '\n');
        break;
      }
      case 'decode':
        if (this.tty) {
          const line = `decode ${ev.unit} ${ev.done}/${ev.total}`;
          this.out.write('\r' + line.padEnd(this.lastLen));
          this.lastLen = line.length;
          if (ev.done === ev.total) {
            this.out.write('\n');
            this.lastLen = 0;
          }
        } else this.out.write(`decode ${ev.unit} ${ev.done}/${ev.total}\n`);
        break;
      case 'plan':
        this.info(`[plan] infer.vram_budget=${fmtBytes(ev.budget)}: ${ev.placement} (predicted peak reserved ${fmtBytes(ev.predictedPeakReserved)})`);
        for (const r of ev.reasons) this.info(`[plan]   ${r}`);
        break;
      case 'block': {
        // inside a slow step: which block of the DiT forward, so a long step is never silent
        const line = `denoise step ${ev.step}/${ev.total}: block ${ev.block}/${ev.blocks}  ${fmtMs(ev.elapsedMs)} into the step`;
        if (this.tty) {
          this.out.write('\r' + line.padEnd(this.lastLen));
          this.lastLen = line.length;
        } else this.out.write(line + '\n');
        break;
      }
      case 'expert':
        // two-expert models: which expert runs from this step on, and what the switch cost
        this.clear();
        this.out.write(
          `[expert] step ${ev.step}: ${ev.expert} (${ev.expert === 'transformer' ? 'high' : 'low'}-noise expert, guidance ${ev.guidance})${ev.swapMs > 0 ? `, weights swapped in ${fmtMs(ev.swapMs)}` : ''}\n`,
        );
        break;
      case 'preflight':
        for (const n of ev.notes) this.info(`[preflight] ${n}`);
        break;
      case 'warning':
        this.clear();
        this.out.write(`warning: ${ev.message}\n`);
        break;
      case 'load':
      case 'memory':
        break;
    }
  }
}
