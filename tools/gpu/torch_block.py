"""PyTorch's side of the one prepared GPU run (tools/gpu/run.sh; docs/gpu-run.md; issue 26).

The same work as tools/gpu/checks.ts, in PyTorch on the same GPU: a Wan 2.1 1.3B DiT block
forward (D 1536, 12 heads of 128, ffn 8960; B = 2 as classifier-free guidance runs it; a 512-row
text context; random weights of the same shapes), the block's attention alone ([1, L, 12, 128],
scaled_dot_product_attention) and its FFN matmul ([L, 1536] x [8960, 1536]^T), in bf16 (how the
official code runs) and, with --fp32, in fp32 (TF32 off). Medians of --rounds after a warm-up,
timed with CUDA events (or wall time on the CPU). One JSON object per line, as checks.ts prints.
The block follows diffusers' WanTransformerBlock: modulation from scale_shift_table + the time
projection, LayerNorm, q/k/v with RMSNorm over all heads, RoPE, self-attention, gated residual;
cross-attention over the text (LayerNorm with affine, RMSNorm on q/k); the FFN (GELU tanh), gated.
The FLOPs counted are the same formula as checks.ts's (matmuls + attention, text included).

Runs here on the CPU at small sizes too: python3 tools/gpu/torch_block.py --tokens 256 --rounds 1
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

D, H, DH, FFN, TEXT, B = 1536, 12, 128, 8960, 512, 2


def sdpa(q, k, v):
    # q, k, v [B, H, L, Dh]
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v)
    w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ v.float()).to(q.dtype)


def rms(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rope(x, cos, sin):
    # x [B, H, L, Dh], pairs (2i, 2i + 1) rotated by the position's angle i
    x2 = x.float().unflatten(-1, (-1, 2))
    a, b = x2[..., 0], x2[..., 1]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def params(dev, dt, gen):
    def w(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen, device="cpu") * std).to(device=dev, dtype=dt)

    p = {"sst": w(1, 6, D, std=1.0 / math.sqrt(D)), "n2w": torch.ones(D, device=dev, dtype=dt), "n2b": torch.zeros(D, device=dev, dtype=dt)}
    for a in ("a1", "a2"):
        for n in ("q", "k", "v", "o"):
            p[f"{a}.{n}.w"] = w(D, D)
            p[f"{a}.{n}.b"] = w(D)
        p[f"{a}.nq"] = torch.ones(D, device=dev, dtype=dt)
        p[f"{a}.nk"] = torch.ones(D, device=dev, dtype=dt)
    p["f0.w"], p["f0.b"], p["f2.w"], p["f2.b"] = w(FFN, D), w(FFN), w(D, FFN), w(D)
    return p


def block(x, ctx, temb, p, cos, sin):
    L = x.shape[1]
    dt = x.dtype
    mods = (p["sst"].float() + temb.float()).chunk(6, dim=1)  # [B, 1, D] each
    shift, scale, gate, c_shift, c_scale, c_gate = mods
    lin = lambda t, n: F.linear(t, p[f"{n}.w"], p[f"{n}.b"])
    heads = lambda t: t.unflatten(-1, (H, DH)).transpose(1, 2)  # [B, H, L, Dh]
    h = (F.layer_norm(x.float(), (D,), eps=1e-6) * (1 + scale) + shift).to(dt)
    q = rope(heads(rms(lin(h, "a1.q"), p["a1.nq"])), cos, sin)
    k = rope(heads(rms(lin(h, "a1.k"), p["a1.nk"])), cos, sin)
    v = heads(lin(h, "a1.v"))
    a = lin(sdpa(q, k, v).transpose(1, 2).reshape(B, L, D), "a1.o")
    x = (x.float() + a.float() * gate).to(dt)
    h = F.layer_norm(x.float(), (D,), p["n2w"].float(), p["n2b"].float(), eps=1e-6).to(dt)
    q = heads(rms(lin(h, "a2.q"), p["a2.nq"]))
    k = heads(rms(lin(ctx, "a2.k"), p["a2.nk"]))
    v = heads(lin(ctx, "a2.v"))
    x = x + lin(sdpa(q, k, v).transpose(1, 2).reshape(B, L, D), "a2.o")
    h = (F.layer_norm(x.float(), (D,), eps=1e-6) * (1 + c_scale) + c_shift).to(dt)
    f = lin(F.gelu(lin(h, "f0"), approximate="tanh"), "f2")
    return (x.float() + f.float() * c_gate).to(dt)


def timer(dev, rounds, fn):
    ts = []
    for i in range(rounds + 1):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ms = s.elapsed_time(e)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i > 0:
            ts.append(ms)
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fp32", action="store_true", help="also fp32 (TF32 off)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    L = a.tokens
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = []

    def emit(o):
        s = json.dumps(o)
        lines.append(s)
        print(s, flush=True)
        if a.out:
            with open(a.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    emit({"check": "torch", "version": torch.__version__, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "sdpa": hasattr(F, "scaled_dot_product_attention")})
    mm_flops = B * (2 * L * D * D * 4 + 2 * L * D * D * 2 + 2 * L * D * FFN * 2) + B * 2 * TEXT * D * D * 2
    at_flops = B * (4 * L * L * D + 4 * L * TEXT * D)
    pos = torch.arange(L, device=dev, dtype=torch.float32)[:, None] * (10000.0 ** (-torch.arange(DH // 2, device=dev, dtype=torch.float32) / (DH // 2)))[None, :]
    cos, sin = pos.cos(), pos.sin()
    for dt in [torch.bfloat16] + ([torch.float32] if a.fp32 else []):
        name = str(dt).replace("torch.", "")
        gen = torch.Generator().manual_seed(1234)
        p = params(dev, dt, gen)
        x = torch.randn(B, L, D, generator=gen).to(dev, dt)
        ctx = (torch.randn(B, TEXT, D, generator=gen) * 0.1).to(dev, dt)
        temb = (torch.randn(B, 6, D, generator=gen) * 0.1).to(dev, dt)
        with torch.no_grad():
            ms = timer(dev, a.rounds, lambda: block(x, ctx, temb, p, cos, sin))
            emit({"check": "block", "framework": "torch", "dtype": name, "tokens": L, "ms": ms, "tflops": (mm_flops + at_flops) / (ms / 1e3) / 1e12})
            q = torch.randn(1, H, L, DH, generator=gen).to(dev, dt)
            ms = timer(dev, a.rounds, lambda: sdpa(q, q, q))
            emit({"check": "attention", "framework": "torch", "dtype": name, "shape": f"[1, {L}, {H}, {DH}]", "ms": ms, "tflops": 4 * L * L * D / (ms / 1e3) / 1e12})
            h = torch.randn(L, D, generator=gen).to(dev, dt)
            ms = timer(dev, a.rounds, lambda: F.linear(h, p["f0.w"]))
            emit({"check": "matmul", "framework": "torch", "dtype": name, "shape": f"[{L}, {D}] x [{FFN}, {D}]^T", "ms": ms, "tflops": 2 * L * D * FFN / (ms / 1e3) / 1e12})
        del p, x, ctx, temb
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
