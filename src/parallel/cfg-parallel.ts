// Classifier-free guidance over two WebGPU devices (infer.diffusion.cfg_parallel=true): the
// conditional pass (batch row 0) runs on device 0, the unconditional one (row 1) on device 1, each
// the DiT's own one-device forward (WanTransformer3DModel.forward with B = 1, every activation
// bound of levels 1-2 included), at the same time. Exchanges through host memory (exchange.ts):
// the latent row and the text row to device 1 (the text once per request), its prediction back.
// Each device holds a full DiT copy; per device the activations are those of one CFG pass.

import type { DitForwardOptions } from '../models/wan_dit/model.ts';
import { engineOf } from '../runtime/engine.ts';
import type { Tensor } from '../tensor/tensor.ts';
import { ShapeError } from '../util/errors.ts';
import { HostExchange } from './exchange.ts';
import type { CpRank, CpDevicePeak } from './cp-dit.ts';

export class CfgParallelDit {
  readonly exchange: HostExchange;

  constructor(readonly ranks: CpRank[]) {
    if (ranks.length !== 2) throw new ShapeError(`[cfg_parallel] runs on exactly 2 devices (cond, uncond), got ${ranks.length}`);
    if (ranks[0]!.engine === ranks[1]!.engine) throw new ShapeError('[cfg_parallel] the two passes need two engines (devices)');
    this.exchange = new HostExchange(ranks.map((r) => r.engine));
  }

  devicePeaks(): CpDevicePeak[] {
    return this.ranks.map(({ engine }) => ({ adapter: engine.adapterName, peak_allocated_bytes: engine.allocator.maxMemoryAllocated(), peak_reserved_bytes: engine.allocator.maxMemoryReserved() }));
  }

  resetPeaks(): void {
    for (const { engine } of this.ranks) engine.allocator.resetPeakMemoryStats();
  }

  /** The embedded text [2, Lt, D] on device 0 → [row 0 on device 0, row 1 on device 1]. */
  async splitText(ctx: Tensor, owner = 'cfgp.ctx'): Promise<Tensor[]> {
    const e0 = this.ranks[0]!.engine;
    if (engineOf(ctx) !== e0 || ctx.shape[0] !== 2) throw new ShapeError(`[cfg_parallel] the embedded text must be [2, Lt, D] on device 0, got ${ctx}`);
    const row1 = ctx.narrow0(1, 2);
    const bytes = await this.exchange.download(0, row1);
    row1.dispose();
    return [e0.bindable(ctx.narrow0(0, 1)), this.exchange.upload(1, bytes, [1, ...ctx.shape.slice(1)], ctx.dtype, owner)];
  }

  /**
   * x [2, C, F, H, W] on device 0 (cond, uncond), ctx from splitText; opts are the one-device
   * forward's (activation bounds, onBlock; no residency or step cache: each device runs resident).
   * Returns the prediction [2, C_out, F, H, W] on device 0.
   */
  async forward(x: Tensor, t: number, ctx: Tensor[], opts: Pick<DitForwardOptions, 'ffnChunkTokens' | 'attnChunkTokens' | 'onBlock'> = {}): Promise<Tensor> {
    const [r0, r1] = this.ranks as [CpRank, CpRank];
    const e0 = r0.engine;
    if (engineOf(x) !== e0 || x.shape[0] !== 2) throw new ShapeError(`[cfg_parallel] the latents must be [2, C, F, H, W] on device 0, got ${x}`);
    const rowShape = [1, ...x.shape.slice(1)];
    const x0 = e0.bindable(x.narrow0(0, 1));
    const x1v = x.narrow0(1, 2);
    const x1 = this.exchange.upload(1, await this.exchange.download(0, x1v), rowShape, 'f32', 'cfgp.latents');
    x1v.dispose();
    const t0 = performance.now();
    // device 1 reports no blocks (onBlock is the pipeline's: progress and Ctrl-C between device 0's blocks)
    const [o0, o1] = await Promise.all([r0.dit.forward(x0, t, ctx[0]!, opts), r1.dit.forward(x1, t, ctx[1]!, { ...opts, onBlock: undefined })]);
    this.exchange.stats.computeMs += performance.now() - t0;
    x0.dispose();
    x1.dispose();
    const b1 = await this.exchange.download(1, o1);
    o1.dispose();
    const out = e0.empty([2, ...o0.shape.slice(1)], 'f32', 'cfgp.out');
    e0.copyBuffer(o0.buffer, o0.byteOffset, out.buffer, out.byteOffset, o0.nbytes);
    const nb = o0.nbytes;
    o0.dispose();
    const u1 = this.exchange.upload(0, b1, [1, ...out.shape.slice(1)], 'f32', 'cfgp.out');
    e0.copyBuffer(u1.buffer, u1.byteOffset, out.buffer, out.byteOffset + nb, nb);
    u1.dispose();
    return out;
  }
}
