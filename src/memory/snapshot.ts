// Memory snapshots: the allocator's history as JSON, and a self-contained HTML page with an SVG
// timeline (allocated bytes stacked by owner, reserved as a line, phases as bands) a person can open.

import type { CachingAllocator, MemoryEvent } from './allocator.ts';
import { ownerGroup } from './allocator.ts';
import { fmtBytes } from '../util/errors.ts';

export interface MemorySnapshot {
  format: 'smart-diffusion-memory-snapshot';
  version: 1;
  createdAt: string;
  device: string;
  stats: ReturnType<CachingAllocator['stats']>;
  droppedEvents: number;
  events: MemoryEvent[];
  live: Array<{ id: number; bytes: number; size: number; owner: string; phase: string }>;
  /** host-visible upload buffers (counted apart from device memory: see allocator.ts) */
  staging: Array<{ id: number; size: number; owner: string }>;
}

export function takeSnapshot(alloc: CachingAllocator, device = 'unknown'): MemorySnapshot {
  return {
    format: 'smart-diffusion-memory-snapshot',
    version: 1,
    createdAt: new Date().toISOString(),
    device,
    stats: alloc.stats(),
    droppedEvents: alloc.droppedEvents(),
    events: [...alloc.events()],
    live: alloc.liveBlockList().map((b) => ({ id: b.id, bytes: b.requested, size: b.size, owner: b.owner, phase: b.phase })),
    staging: alloc.liveStagingList().map((b) => ({ id: b.id, size: b.size, owner: b.owner })),
  };
}

const PALETTE = [
  '#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#bab0ac',
  '#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf',
];

function esc(s: string): string {
  return s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!);
}

/**
 * Render a snapshot as a standalone HTML page. `groupDepth` sets how owner tags are grouped
 * (3: `dit.blocks.7`, `text_encoder.encoder.block`); at most `maxGroups` groups get their own band.
 */
export function renderSnapshotHtml(snap: MemorySnapshot, opts: { groupDepth?: number; maxGroups?: number; title?: string } = {}): string {
  const depth = opts.groupDepth ?? 3;
  const maxGroups = opts.maxGroups ?? 40;
  const ev = snap.events;
  const title = opts.title ?? 'GPU memory timeline';
  const W = 1200;
  const H = 520;
  const padL = 80;
  const padR = 20;
  const padT = 40;
  const padB = 40;
  if (ev.length === 0) {
    return `<!doctype html><meta charset="utf-8"><title>${esc(title)}</title><body><h1>${esc(title)}</h1><p>No events were recorded.</p></body>`;
  }
  // per-group peak (to choose which groups get a band)
  const cur = new Map<string, number>();
  const peak = new Map<string, number>();
  const sizeOf = new Map<number, { group: string; bytes: number }>();
  for (const e of ev) {
    if (e.action === 'alloc') {
      const g = ownerGroup(e.owner, depth);
      sizeOf.set(e.id, { group: g, bytes: e.bytes });
      const v = (cur.get(g) ?? 0) + e.bytes;
      cur.set(g, v);
      if (v > (peak.get(g) ?? 0)) peak.set(g, v);
    } else if (e.action === 'free') {
      const s = sizeOf.get(e.id);
      const g = s?.group ?? ownerGroup(e.owner, depth);
      cur.set(g, (cur.get(g) ?? 0) - e.bytes);
    }
  }
  const ranked = [...peak.entries()].sort((a, b) => b[1] - a[1]);
  const kept = new Set(ranked.slice(0, maxGroups).map(([g]) => g));
  const groups = [...kept, ...(ranked.length > maxGroups ? ['(other)'] : [])];
  const gi = new Map(groups.map((g, i) => [g, i]));
  const groupIndex = (g: string) => gi.get(kept.has(g) ? g : '(other)')!;

  // sample into columns: for each column keep the state at the moment of its highest total
  const t0 = ev[0]!.t;
  const t1 = Math.max(ev[ev.length - 1]!.t, t0 + 1e-3);
  const cols = Math.min(1000, ev.length);
  const state = new Float64Array(groups.length);
  const colState: Float64Array[] = [];
  const colReserved: number[] = [];
  let col = 0;
  let best: Float64Array | null = null;
  let bestTotal = -1;
  let bestReserved = 0;
  let total = 0;
  const live = new Map<number, number>();
  const flushTo = (c: number) => {
    while (col < c) {
      colState.push(best ?? state.slice());
      colReserved.push(best ? bestReserved : ev.length ? colReserved[colReserved.length - 1] ?? 0 : 0);
      best = null;
      bestTotal = -1;
      col++;
    }
  };
  for (const e of ev) {
    const c = Math.min(cols - 1, Math.floor(((e.t - t0) / (t1 - t0)) * cols));
    flushTo(c);
    if (e.action === 'alloc') {
      const g = groupIndex(ownerGroup(e.owner, depth));
      live.set(e.id, g);
      state[g]! += e.bytes;
      total += e.bytes;
    } else if (e.action === 'free') {
      const g = live.get(e.id) ?? groupIndex(ownerGroup(e.owner, depth));
      live.delete(e.id);
      state[g]! -= e.bytes;
      total -= e.bytes;
    }
    if (total > bestTotal) {
      bestTotal = total;
      best = state.slice();
      bestReserved = e.reserved;
    } else if (best) {
      bestReserved = Math.max(bestReserved, e.reserved);
    }
  }
  flushTo(cols);
  let yMax = 1;
  for (let c = 0; c < cols; c++) {
    let s = 0;
    for (const v of colState[c]!) s += v;
    yMax = Math.max(yMax, s, colReserved[c]!);
  }
  const x = (c: number) => padL + (c / cols) * (W - padL - padR);
  const y = (v: number) => H - padB - (v / yMax) * (H - padT - padB);
  // stacked bands
  const base = new Float64Array(cols);
  const paths: string[] = [];
  groups.forEach((g, k) => {
    const top: string[] = [];
    const bot: string[] = [];
    let any = false;
    for (let c = 0; c < cols; c++) {
      const v = colState[c]![k]!;
      if (v > 0) any = true;
      top.push(`${x(c).toFixed(1)},${y(base[c]! + v).toFixed(1)} ${x(c + 1).toFixed(1)},${y(base[c]! + v).toFixed(1)}`);
      bot.push(`${x(c + 1).toFixed(1)},${y(base[c]!).toFixed(1)} ${x(c).toFixed(1)},${y(base[c]!).toFixed(1)}`);
      base[c]! += v;
    }
    if (!any) return;
    paths.push(
      `<polygon points="${top.join(' ')} ${bot.reverse().join(' ')}" fill="${PALETTE[k % PALETTE.length]}" fill-opacity="0.85"><title>${esc(g)} — peak ${fmtBytes(peak.get(g) ?? 0)}</title></polygon>`,
    );
  });
  const reservedLine = colReserved.map((r, c) => `${x(c).toFixed(1)},${y(r).toFixed(1)} ${x(c + 1).toFixed(1)},${y(r).toFixed(1)}`).join(' ');
  // phase bands
  const phases: Array<{ name: string; c0: number; c1: number }> = [];
  for (const e of ev) {
    const c = Math.min(cols - 1, Math.floor(((e.t - t0) / (t1 - t0)) * cols));
    const last = phases[phases.length - 1];
    if (!last || last.name !== e.phase) phases.push({ name: e.phase, c0: c, c1: c + 1 });
    else last.c1 = c + 1;
  }
  const phaseSvg = phases
    .map(
      (p, i) =>
        `<rect x="${x(p.c0).toFixed(1)}" y="${padT - 22}" width="${Math.max(1, x(p.c1) - x(p.c0)).toFixed(1)}" height="16" fill="${i % 2 ? '#ddd' : '#eee'}"><title>phase ${esc(p.name)}</title></rect>` +
        `<text x="${(x(p.c0) + 3).toFixed(1)}" y="${padT - 10}" font-size="11">${esc(p.name)}</text>`,
    )
    .join('');
  const ticks: string[] = [];
  for (let i = 0; i <= 5; i++) {
    const v = (yMax * i) / 5;
    ticks.push(`<line x1="${padL - 4}" x2="${W - padR}" y1="${y(v)}" y2="${y(v)}" stroke="#ccc" stroke-width="0.5"/><text x="${padL - 6}" y="${y(v) + 4}" font-size="11" text-anchor="end">${fmtBytes(v)}</text>`);
  }
  for (let i = 0; i <= 5; i++) {
    const c = (cols * i) / 5;
    const ms = t0 + ((t1 - t0) * i) / 5;
    ticks.push(`<text x="${x(c)}" y="${H - padB + 16}" font-size="11" text-anchor="middle">${(ms / 1000).toFixed(2)} s</text>`);
  }
  const legend = groups
    .map((g, k) => `<tr><td><span style="display:inline-block;width:12px;height:12px;background:${PALETTE[k % PALETTE.length]}"></span></td><td>${esc(g)}</td><td style="text-align:right">${fmtBytes(peak.get(g) ?? 0)}</td></tr>`)
    .join('');
  const s = snap.stats;
  return `<!doctype html>
<html><head><meta charset="utf-8"><title>${esc(title)}</title>
<style>body{font:13px system-ui,sans-serif;margin:20px}table{border-collapse:collapse}td{padding:1px 8px}</style></head>
<body><h1>${esc(title)}</h1>
<p>${esc(snap.device)} · ${esc(snap.createdAt)} · ${ev.length} events${snap.droppedEvents ? ` (${snap.droppedEvents} dropped)` : ''} ·
peak allocated <b>${fmtBytes(s.peakAllocated)}</b> · peak reserved <b>${fmtBytes(s.peakReserved)}</b>${s.peakStagingBytes ? ` · peak staging (host-visible upload buffers, not in the bands) <b>${fmtBytes(s.peakStagingBytes)}</b>` : ''}</p>
<p>Bands: live allocated bytes stacked by owner (grouped to ${depth} name parts; hover for the name). Black line: reserved (held from the device). Top strip: phases.</p>
<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">
${ticks.join('')}
${phaseSvg}
${paths.join('\n')}
<polyline points="${reservedLine}" fill="none" stroke="#000" stroke-width="1"/>
</svg>
<h2>Owners (peak live bytes)</h2><table>${legend}</table>
</body></html>
`;
}
