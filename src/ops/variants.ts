// Which kernel variant each op family runs on which adapter: the one place that decides by
// adapter. Ops call `variantFor(e.caps, family)` for their 'auto' choice and then apply only
// conditions of the call's shape (noted per row); variants forced by tests and benchmarks are
// checked by the op itself.
//
// Why the CPU rows differ (docs/notes/*.md): on llvmpipe uniform-buffer loads are cheap gathers
// while storage loads are per-lane loops, and barriers are expensive; on GPUs workgroup-memory
// tiles win. Other software adapters get the GPU kernels but one invocation per row for norms.

import type { AdapterCaps, AdapterClass } from '../device/caps.ts';

/** What a variant needs from the adapter. */
export type Need = 'subgroups' | 'subgroups8';

interface Row<V extends string> {
  /** the variant 'auto' picks per adapter class */
  prefer: Record<AdapterClass, V>;
  /** variants that need an adapter capability; without it the row's fallback runs */
  needs?: Partial<Record<V, Need>>;
  fallback?: V;
}

function row<V extends string>(r: Row<V>): Row<V> {
  return r;
}

export const VARIANTS = {
  // matmul.ts. Shape: 'ubo' also needs M >= 32, K > 0 and a binding limit above one output tile.
  matmul: row({
    prefer: { llvmpipe: 'ubo', cpu: 'tiled', gpu: 'tiled' },
    needs: { ubo: 'subgroups' },
    fallback: 'tiled',
  }),
  // matmul.ts tiledGeom: workgroup geometry of the 'tiled' matmul
  matmulTile: row({
    prefer: { llvmpipe: 'cpu', cpu: 'gpu', gpu: 'gpu' },
  }),
  // attention.ts. Shape: 'ubo' only without a bias and for Dh <= 1024 (else 'subgroup');
  // Dh % 4 != 0 -> 'portable'.
  attention: row({
    prefer: { llvmpipe: 'ubo', cpu: 'subgroup', gpu: 'subgroup' },
    needs: { ubo: 'subgroups8', subgroup: 'subgroups8' },
    fallback: 'portable',
  }),
  // conv.ts. 'shuffle' = conv.wgsl's k3 / k1 kernels; shape: picked by kernel size and padding,
  // stride 1 and vec4-aligned rows, else 'generic' (conv_generic.wgsl).
  conv: row({
    prefer: { llvmpipe: 'shuffle', cpu: 'shuffle', gpu: 'shuffle' },
    needs: { shuffle: 'subgroups8' },
    fallback: 'generic',
  }),
  // norm.ts layer / RMS norm: one invocation per row, or a workgroup per row
  rowNorm: row({
    prefer: { llvmpipe: 'thread', cpu: 'thread', gpu: 'wg' },
  }),
};

export type Family = keyof typeof VARIANTS;
type VariantOf<F extends Family> = (typeof VARIANTS)[F] extends Row<infer V> ? V : never;

/** Whether the adapter has what `need` names. */
export function meets(caps: AdapterCaps, need: Need): boolean {
  if (need === 'subgroups') return caps.subgroups;
  // the shuffle kernels exchange values within 8 lanes; an adapter that does not report its
  // subgroup sizes (0) is trusted
  return caps.subgroups && (caps.subgroupMinSize === 0 || caps.subgroupMinSize >= 8);
}

/** The variant of `family` for this adapter, before the op's shape conditions. */
export function variantFor<F extends Family>(caps: AdapterCaps, family: F): VariantOf<F> {
  const r = VARIANTS[family] as Row<VariantOf<F>>;
  const v = r.prefer[caps.adapterClass];
  const need = r.needs?.[v];
  return need && !meets(caps, need) ? r.fallback! : v;
}
