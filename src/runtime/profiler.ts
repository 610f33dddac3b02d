// Per-kernel GPU time from timestamp queries. When enabled, each dispatch gets its own compute
// pass with `timestampWrites` (begin/end); query results are resolved at every flush and read
// back asynchronously. Totals are kept per kernel name (op name + variant).

export interface KernelStat {
  name: string;
  calls: number;
  totalMs: number;
}

export class KernelProfile {
  private readonly stats = new Map<string, KernelStat>();

  add(name: string, ms: number): void {
    let s = this.stats.get(name);
    if (!s) this.stats.set(name, (s = { name, calls: 0, totalMs: 0 }));
    s.calls++;
    s.totalMs += ms;
  }

  reset(): void {
    this.stats.clear();
  }

  rows(): KernelStat[] {
    return [...this.stats.values()].sort((a, b) => b.totalMs - a.totalMs);
  }

  totalMs(): number {
    let t = 0;
    for (const s of this.stats.values()) t += s.totalMs;
    return t;
  }

  /** Plain-text table: kernel, calls, total GPU ms, mean ms, share of total, sorted by total. */
  table(limit = 40): string {
    const rows = this.rows();
    const total = this.totalMs() || 1;
    const nameW = Math.max(6, ...rows.slice(0, limit).map((r) => r.name.length));
    const lines = [
      `${'kernel'.padEnd(nameW)}  ${'calls'.padStart(7)}  ${'total ms'.padStart(10)}  ${'mean ms'.padStart(9)}  ${'share'.padStart(6)}`,
    ];
    for (const r of rows.slice(0, limit)) {
      lines.push(
        `${r.name.padEnd(nameW)}  ${String(r.calls).padStart(7)}  ${r.totalMs.toFixed(2).padStart(10)}  ${(r.totalMs / r.calls).toFixed(3).padStart(9)}  ${((100 * r.totalMs) / total).toFixed(1).padStart(5)}%`,
      );
    }
    if (rows.length > limit) lines.push(`... ${rows.length - limit} more kernels`);
    lines.push(`${'total'.padEnd(nameW)}  ${String(rows.reduce((a, r) => a + r.calls, 0)).padStart(7)}  ${total.toFixed(2).padStart(10)}`);
    return lines.join('\n');
  }
}
