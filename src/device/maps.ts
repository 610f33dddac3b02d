// lavapipe backs every descriptor set with its own memfd mapping until the GPU has finished the
// work that uses it, so the dispatches a process may queue are bounded by the kernel's
// vm.max_map_count minus the mappings it already has (measured: SIGSEGV in Dawn's
// DescriptorSetAllocator::AllocateDescriptorPool past ~64,500 queued dispatches at the default 65,530).

import { readFileSync } from 'node:fs';

/** vm.max_map_count minus this process's mappings now (Infinity where /proc does not say). */
export function mapHeadroom(): number {
  try {
    const max = Number(readFileSync('/proc/sys/vm/max_map_count', 'utf8').trim());
    let n = 0;
    const maps = readFileSync('/proc/self/maps', 'utf8');
    for (let i = 0; i < maps.length; i++) if (maps.charCodeAt(i) === 10) n++;
    return Number.isFinite(max) && max > 0 ? max - n : Infinity;
  } catch {
    return Infinity;
  }
}

/** Shmem of /proc/meminfo in bytes, system-wide (lavapipe's GPU memory is memfd shmem); 0 where there is none (not Linux). For the benches' memory reports. */
export function shmemBytes(): number {
  try {
    const m = /^Shmem:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}
