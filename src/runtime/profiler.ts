// Per-kernel GPU time from timestamp queries. When enabled, each dispatch gets its own compute
// pass with `timestampWrites` (begin/end); query results are resolved at every flush and read
// back asynchronously. Totals are kept per kernel name (op name + variant), and per op: each op
// call's registry flops and bytes (src/ops/registry.ts) against the GPU time of the dispatches it
// encoded, so the profile shows achieved GFLOP/s and GB/s per op.

export interface KernelStat {
  name: string;
  calls: number;
  totalMs: number;
}

export interface OpStat {
  name: string;
  calls: number;
  /** GPU time of the dispatches the op's calls encoded */
  totalMs: number;
  /** sums over the calls, from the op registry */
  flops: number;
  bytes: number;
}

export class KernelProfile {
  private readonly stats = new Map<string, KernelStat>();
  private readonly ops = new Map<string, OpStat>();

  /** One dispatch's GPU time; `op` is the op whose call encoded it (null: none). */
  add(name: string, ms: number, op: string | null = null): void {
    let s = this.stats.get(name);
    if (!s) this.stats.set(name, (s = { name, calls: 0, totalMs: 0 }));
    s.calls++;
    s.totalMs += ms;
    if (op !== null) this.op(op).totalMs += ms;
  }

  /** One op call with its registry numbers. */
  addOp(name: string, flops: number, bytes: number): void {
    const s = this.op(name);
    s.calls++;
    s.flops += flops;
    s.bytes += bytes;
  }

  private op(name: string): OpStat {
    let s = this.ops.get(name);
    if (!s) this.ops.set(name, (s = { name, calls: 0, totalMs: 0, flops: 0, bytes: 0 }));
    return s;
  }

  reset(): void {
    this.stats.clear();
    this.ops.clear();
  }

  rows(): KernelStat[] {
    return [...this.stats.values()].sort((a, b) => b.totalMs - a.totalMs);
  }

  opRows(): OpStat[] {
    return [...this.ops.values()].sort((a, b) => b.totalMs - a.totalMs);
  }

  totalMs(): number {
    let t = 0;
    for (const s of this.stats.values()) t += s.totalMs;
    return t;
  }

  /**
   * Plain-text tables: per kernel (calls, total GPU ms, mean ms, share of total, sorted by total),
   * then per op (calls, GPU ms, achieved GFLOP/s and GB/s from the registry's flops and bytes).
   */
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
    const ops = this.opRows();
    if (ops.length > 0) lines.push('', this.opTable(ops));
    return lines.join('\n');
  }

  private opTable(ops: OpStat[]): string {
    const nameW = Math.max(2, ...ops.map((r) => r.name.length));
    const rate = (x: number, ms: number) => (ms > 0 ? (x / (ms * 1e6)).toFixed(2) : '-').padStart(9);
    const lines = [`${'op'.padEnd(nameW)}  ${'calls'.padStart(7)}  ${'GPU ms'.padStart(10)}  ${'GFLOP/s'.padStart(9)}  ${'GB/s'.padStart(9)}   (flops and bytes from the op registry)`];
    for (const r of ops) {
      lines.push(`${r.name.padEnd(nameW)}  ${String(r.calls).padStart(7)}  ${r.totalMs.toFixed(2).padStart(10)}  ${rate(r.flops, r.totalMs)}  ${rate(r.bytes, r.totalMs)}`);
    }
    return lines.join('\n');
  }
}
