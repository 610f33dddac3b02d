"""PyTorch port of exactly the Wan 2.1 architecture the smart-diffusion engine runs.

Three models, configured from the same config.json fields as the engine reads, with state-dict keys
equal to the diffusers / transformers names (so an export is a plain save):

* UMT5Encoder   -- transformers `UMT5EncoderModel` (text_encoder/config.json)
* WanDiT        -- diffusers `WanTransformer3DModel` (transformer/config.json)
* WanVAE        -- diffusers `AutoencoderKLWan` (vae/config.json), decoder AND encoder
* FlowUniPC     -- Wan's FlowUniPCMultistepScheduler (bh2, order 2, predict_x0), ported from the
                   engine's src/schedulers/flow-unipc.ts (itself bit-exact vs the goldens)

Conventions: /work/shared/golden/README.md (mirrored in docs/training.md). Everything runs in
float32 except the timestep sinusoid and RoPE (float64, as Wan).

The VAE runs whole sequences with causal convolutions and the first-frame rules (this is what
training needs); `chunked=True` runs the official one-chunk-at-a-time feature-cache path instead
(decode: 1 latent frame per call; encode: 1, 4, 4, ... frames per call). check_golden.py verifies
that both agree and that the chunked decoder matches the official goldens.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_T = 2


# ----------------------------------------------------------------------------------------------
# UMT5 encoder (transformers UMT5EncoderModel semantics)
# ----------------------------------------------------------------------------------------------

class T5RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def t5_relative_buckets(lq, lk, num_buckets=32, max_distance=128, device=None):
    """transformers UMT5Attention._relative_position_bucket (bidirectional), rel = key - query."""
    q = torch.arange(lq, dtype=torch.long, device=device)[:, None]
    k = torch.arange(lk, dtype=torch.long, device=device)[None, :]
    rel = k - q
    nb = num_buckets // 2
    buckets = (rel > 0).long() * nb
    n = rel.abs()
    max_exact = nb // 2
    is_small = n < max_exact
    large = torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (nb - max_exact)
    large = max_exact + large.to(torch.long)
    large = torch.min(large, torch.full_like(large, nb - 1))
    return buckets + torch.where(is_small, n, large)


class UMT5SelfAttention(nn.Module):
    def __init__(self, d_model, d_kv, heads, num_buckets, max_distance):
        super().__init__()
        inner = d_kv * heads
        self.heads, self.d_kv = heads, d_kv
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def position_bias(self, L, device):
        b = t5_relative_buckets(L, L, self.num_buckets, self.max_distance, device)
        return self.relative_attention_bias(b).permute(2, 0, 1).unsqueeze(0)  # [1, H, L, L]

    def forward(self, x, mask_add):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.heads, self.d_kv).transpose(1, 2)
        k = self.k(x).view(B, L, self.heads, self.d_kv).transpose(1, 2)
        v = self.v(x).view(B, L, self.heads, self.d_kv).transpose(1, 2)
        scores = q @ k.transpose(-1, -2)  # no 1/sqrt(d) in T5
        scores = scores + self.position_bias(L, x.device) + mask_add
        w = torch.softmax(scores.float(), dim=-1).type_as(scores)
        y = (w @ v).transpose(1, 2).reshape(B, L, self.heads * self.d_kv)
        return self.o(y)


class UMT5LayerSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm = T5RMSNorm(cfg['d_model'], cfg.get('layer_norm_epsilon', 1e-6))
        self.SelfAttention = UMT5SelfAttention(cfg['d_model'], cfg['d_kv'], cfg['num_heads'],
                                               cfg.get('relative_attention_num_buckets', 32),
                                               cfg.get('relative_attention_max_distance', 128))

    def forward(self, x, mask_add):
        return x + self.SelfAttention(self.layer_norm(x), mask_add)


class UMT5DenseGatedActDense(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate='tanh') * self.wi_1(x))


class UMT5LayerFF(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm = T5RMSNorm(cfg['d_model'], cfg.get('layer_norm_epsilon', 1e-6))
        self.DenseReluDense = UMT5DenseGatedActDense(cfg['d_model'], cfg['d_ff'])

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class UMT5Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList([UMT5LayerSelfAttention(cfg), UMT5LayerFF(cfg)])

    def forward(self, x, mask_add):
        return self.layer[1](self.layer[0](x, mask_add))


class _UMT5Stack(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.block = nn.ModuleList([UMT5Block(cfg) for _ in range(cfg['num_layers'])])
        self.final_layer_norm = T5RMSNorm(cfg['d_model'], cfg.get('layer_norm_epsilon', 1e-6))


class UMT5Encoder(nn.Module):
    """Keys: shared.weight, encoder.block.N.layer.{0,1}.*, encoder.final_layer_norm.weight."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.get('feed_forward_proj', 'gated-gelu') == 'gated-gelu'
        self.cfg = cfg
        self.shared = nn.Embedding(cfg['vocab_size'], cfg['d_model'])
        self.encoder = _UMT5Stack(cfg)

    def forward(self, ids, mask, trace=None):
        """ids, mask: [B, L] (mask 1 = token, 0 = pad). Returns last_hidden_state [B, L, d_model]."""
        x = self.shared(ids)
        mask_add = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for i, blk in enumerate(self.encoder.block):
            x = blk(x, mask_add)
            if trace is not None:
                trace[f'block{i}_out'] = x
        return self.encoder.final_layer_norm(x)


# ----------------------------------------------------------------------------------------------
# Wan DiT (diffusers WanTransformer3DModel names, Wan 2.1 math)
# ----------------------------------------------------------------------------------------------

def sinusoidal_embedding_1d(dim, t):
    """[cos | sin], computed in float64 then cast to float32 (Wan)."""
    half = dim // 2
    pos = t.to(torch.float64)
    s = torch.outer(pos, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half)))
    return torch.cat([torch.cos(s), torch.sin(s)], dim=1).float()


def rope_tables(head_dim, F_, H_, W_, max_seq_len=1024, theta=10000.0, device=None):
    """cos/sin [L, head_dim/2] (float64) of Wan's 3-axis RoPE for a (F_, H_, W_) token grid."""
    d = head_dim
    dims = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    angles = []
    for dim_axis in dims:
        inv = 1.0 / torch.pow(theta, torch.arange(0, dim_axis, 2, dtype=torch.float64, device=device)[: dim_axis // 2].div(dim_axis))
        angles.append(torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), inv))
    at = angles[0][:F_][:, None, None, :].expand(F_, H_, W_, -1)
    ah = angles[1][:H_][None, :, None, :].expand(F_, H_, W_, -1)
    aw = angles[2][:W_][None, None, :, :].expand(F_, H_, W_, -1)
    a = torch.cat([at, ah, aw], dim=-1).reshape(F_ * H_ * W_, -1)
    return torch.cos(a), torch.sin(a)


def rope_apply(x, cos, sin):
    """x [B, L, heads, hd] (pairs = adjacent elements); applied in float64, returned as float32."""
    xd = x.to(torch.float64)
    x1, x2 = xd[..., 0::2], xd[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    y = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return y.to(x.dtype)


class WanRMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def attention(q, k, v, key_bias=None):
    """q [B, Lq, H, d], k/v [B, Lk, H, d] -> [B, Lq, H, d]; key_bias [B, Lk] added to the scores."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if key_bias is not None:
        s = s + key_bias[:, None, None, :]
    return (torch.softmax(s, dim=-1) @ v).transpose(1, 2)


class _ToOut(nn.ModuleList):
    pass


class WanAttention(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = _ToOut([nn.Linear(dim, dim)])
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def forward(self, x, ctx=None, rope=None, key_bias=None):
        B, L, D = x.shape
        src = x if ctx is None else ctx
        q = self.norm_q(self.to_q(x)).view(B, L, self.heads, -1)
        k = self.norm_k(self.to_k(src)).view(B, src.shape[1], self.heads, -1)
        v = self.to_v(src).view(B, src.shape[1], self.heads, -1)
        if rope is not None:
            q = rope_apply(q, *rope)
            k = rope_apply(k, *rope)
        y = attention(q, k, v, key_bias).reshape(B, L, D)
        return self.to_out[0](y)


class _GeluProj(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.proj = nn.Linear(i, o)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate='tanh')


class WanFFN(nn.Module):
    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, ffn_dim), nn.Identity(), nn.Linear(ffn_dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class WanBlock(nn.Module):
    def __init__(self, dim, ffn_dim, heads, eps, cross_attn_norm=True):
        super().__init__()
        self.eps = eps
        self.attn1 = WanAttention(dim, heads, eps)
        self.attn2 = WanAttention(dim, heads, eps)
        # diffusers norm2 == Wan norm3: the cross-attention LayerNorm (affine)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = WanFFN(dim, ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def ln(self, x):
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps)

    def forward(self, x, e0, ctx, rope, ctx_bias=None, trace=None, i=0):
        m = (self.scale_shift_table + e0).chunk(6, dim=1)  # each [B, 1, D]
        y = self.attn1(self.ln(x) * (1 + m[1]) + m[0], rope=rope)
        x = x + y * m[2]
        c = self.attn2(self.norm2(x), ctx=ctx, key_bias=ctx_bias)
        x = x + c
        f = self.ffn(self.ln(x) * (1 + m[4]) + m[3])
        x = x + f * m[5]
        if trace is not None:
            trace[f'block{i}_self_attn_out'] = y
            trace[f'block{i}_cross_attn_out'] = c
            trace[f'block{i}_ffn_out'] = f
            trace[f'block{i}_out'] = x
        return x


class _TimeEmbedder(nn.Module):
    def __init__(self, i, d):
        super().__init__()
        self.linear_1 = nn.Linear(i, d)
        self.linear_2 = nn.Linear(d, d)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class _TextEmbedder(nn.Module):
    def __init__(self, i, d):
        super().__init__()
        self.linear_1 = nn.Linear(i, d)
        self.linear_2 = nn.Linear(d, d)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate='tanh'))


class _ConditionEmbedder(nn.Module):
    def __init__(self, dim, freq_dim, text_dim):
        super().__init__()
        self.time_embedder = _TimeEmbedder(freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = _TextEmbedder(text_dim, dim)


class WanDiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.heads = cfg['num_attention_heads']
        self.head_dim = cfg['attention_head_dim']
        self.dim = D = self.heads * self.head_dim
        self.freq_dim = cfg['freq_dim']
        self.patch = tuple(cfg['patch_size'])
        self.out_channels = cfg['out_channels']
        eps = cfg.get('eps', 1e-6)
        assert cfg.get('qk_norm', 'rms_norm_across_heads') == 'rms_norm_across_heads'
        self.eps = eps
        self.rope_max_seq_len = cfg.get('rope_max_seq_len', 1024)
        self.patch_embedding = nn.Conv3d(cfg['in_channels'], D, self.patch, stride=self.patch)
        self.condition_embedder = _ConditionEmbedder(D, self.freq_dim, cfg['text_dim'])
        self.blocks = nn.ModuleList([WanBlock(D, cfg['ffn_dim'], self.heads, eps, cfg.get('cross_attn_norm', True))
                                     for _ in range(cfg['num_layers'])])
        self.proj_out = nn.Linear(D, self.out_channels * self.patch[0] * self.patch[1] * self.patch[2])
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, D) / D ** 0.5)
        self._rope_cache = {}

    def rope(self, F_, H_, W_, device):
        key = (F_, H_, W_, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(self.head_dim, F_, H_, W_, self.rope_max_seq_len, device=device)
        return self._rope_cache[key]

    def embed_context(self, ctx, text_len):
        """Context rows for cross-attention.

        ctx [B, Lc, text_dim], zero-padded (rows past each prompt's length are zero). If Lc == text_len
        this is exactly Wan's padded context. If Lc < text_len, the text_len - Lc further zero rows
        (all equal to text_embedder(0)) are represented by ONE zero row whose key gets the bias
        ln(text_len - Lc): softmax over n identical keys == one key with +ln(n). Exact, and
        text_len-independent in cost (used for training with text_len 512).
        """
        B, Lc, _ = ctx.shape
        if Lc > text_len:
            raise ValueError(f'context has {Lc} rows > text_len {text_len}')
        bias = None
        if Lc < text_len:
            ctx = torch.cat([ctx, ctx.new_zeros(B, 1, ctx.shape[2])], dim=1)
            bias = ctx.new_zeros(B, Lc + 1)
            bias[:, Lc] = math.log(text_len - Lc)
        return self.condition_embedder.text_embedder(ctx), bias

    def forward(self, x, t, ctx, text_len=None, trace=None):
        """x [B, C, F, H, W]; t [B] (float timesteps); ctx [B, Lc, text_dim] zero-padded context.

        text_len defaults to Lc (context already padded to text_len, Wan's path)."""
        B, C, F_, H, W = x.shape
        pt, ph, pw = self.patch
        text_len = ctx.shape[1] if text_len is None else text_len
        tok = self.patch_embedding(x)  # [B, D, F', H', W']
        Fp, Hp, Wp = tok.shape[2:]
        tok = tok.flatten(2).transpose(1, 2)  # [B, L, D]
        sin = sinusoidal_embedding_1d(self.freq_dim, t)
        e = self.condition_embedder.time_embedder(sin)  # [B, D]
        e0 = self.condition_embedder.time_proj(F.silu(e)).unflatten(1, (6, self.dim))  # [B, 6, D]
        c, cbias = self.embed_context(ctx, text_len)
        rope = self.rope(Fp, Hp, Wp, x.device)
        if trace is not None:
            trace.update(patch_tokens=tok, time_sinusoid=sin, e=e, e0=e0, context_embedded=c)
        h = tok
        for i, blk in enumerate(self.blocks):
            h = blk(h, e0, c, rope, cbias, trace, i)
        m = (self.scale_shift_table + e[:, None, :]).chunk(2, dim=1)
        h = F.layer_norm(h, (h.shape[-1],), eps=self.eps) * (1 + m[1]) + m[0]
        out = self.proj_out(h)  # [B, L, pt*ph*pw*C], C fastest
        if trace is not None:
            trace['head_out'] = out
        Co = self.out_channels
        out = out.view(B, Fp, Hp, Wp, pt, ph, pw, Co)
        out = torch.einsum('bfhwpqrc->bcfphqwr', out).reshape(B, Co, Fp * pt, Hp * ph, Wp * pw)
        return out


# ----------------------------------------------------------------------------------------------
# Wan 2.1 causal 3D VAE (diffusers AutoencoderKLWan names)
# ----------------------------------------------------------------------------------------------

class CausalConv3d(nn.Conv3d):
    """Zero-pads spatially by padding and temporally by 2*padding_t frames in front (none behind)."""

    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__(cin, cout, k, stride=stride, padding=padding)
        p = self.padding
        self._pad = (p[2], p[2], p[1], p[1], 2 * p[0], 0)
        self.padding = (0, 0, 0)

    def forward(self, x, cache_x=None):
        pad = list(self._pad)
        if cache_x is not None and self._pad[4] > 0:
            x = torch.cat([cache_x, x], dim=2)
            pad[4] -= cache_x.shape[2]
        return super().forward(F.pad(x, pad))


class RMSNormC(nn.Module):
    """Wan RMS_norm: F.normalize over channels * sqrt(C) * gamma (gamma [C,1,1,1] or [C,1,1])."""

    def __init__(self, dim, images=False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x):
        # == F.normalize(x, dim=1) (x / max(||x||, 1e-12)), written out: 5x faster on CPU here
        return x / x.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12) * self.scale * self.gamma


class _Cache:
    """The official feat_cache list + feat_idx counter."""

    def __init__(self, n=512):
        self.map = [None] * n
        self.idx = 0


def _cached_conv(conv, x, cache):
    """Official pattern: cache the last CACHE_T input frames (plus one older frame if short)."""
    if cache is None:
        return conv(x)
    i = cache.idx
    cache_x = x[:, :, -CACHE_T:].clone()
    if cache_x.shape[2] < 2 and cache.map[i] is not None:
        cache_x = torch.cat([cache.map[i][:, :, -1:], cache_x], dim=2)
    out = conv(x, cache.map[i])
    cache.map[i] = cache_x
    cache.idx += 1
    return out


class ResidualBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = RMSNormC(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNormC(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x, cache=None):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = _cached_conv(self.conv1, F.silu(self.norm1(x)), cache)
        x = _cached_conv(self.conv2, F.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Per-frame single-head attention over h*w tokens, scale 1/sqrt(C)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNormC(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, cache=None):
        idt = x
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, c * 3, h * w).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        a = torch.softmax((q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(c)), dim=-1) @ v
        x = self.proj(a.transpose(1, 2).reshape(b * t, c, h, w))
        return x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + idt


class _Seq2(nn.ModuleList):
    """resample.{0: pad/upsample (no params), 1: conv}"""


class Resample(nn.Module):
    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode in ('upsample2d', 'upsample3d'):
            self.resample = _Seq2([nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1)])
        else:
            self.resample = _Seq2([nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2)])
        if mode == 'upsample3d':
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == 'downsample3d':
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def spatial(self, x):
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        if self.mode.startswith('up'):
            y = F.interpolate(y, scale_factor=2.0, mode='nearest')
        else:
            y = F.pad(y, (0, 1, 0, 1))
        y = self.resample[1](y)
        return y.view(b, t, y.shape[1], y.shape[2], y.shape[3]).permute(0, 2, 1, 3, 4)

    @staticmethod
    def _interleave(y, c):
        b, _, t, h, w = y.shape
        y = y.reshape(b, 2, c, t, h, w)
        return torch.stack((y[:, 0], y[:, 1]), 3).reshape(b, c, t * 2, h, w)

    def forward(self, x, cache=None):
        b, c, t, h, w = x.shape
        if self.mode == 'upsample3d':
            if cache is None:
                # first-frame rule: frame 0 skips time_conv; frames 1..T-1 go through it causally
                # (2 zero frames in front, frame 0 not used as context); T -> 1 + 2(T-1)
                if t > 1:
                    y = self._interleave(self.time_conv(x[:, :, 1:]), c)
                    x = torch.cat([x[:, :, :1], y], dim=2)
            else:
                i = cache.idx
                if cache.map[i] is None:
                    cache.map[i] = 'Rep'
                    cache.idx += 1
                else:
                    cache_x = x[:, :, -CACHE_T:].clone()
                    if cache_x.shape[2] < 2 and not isinstance(cache.map[i], str):
                        cache_x = torch.cat([cache.map[i][:, :, -1:], cache_x], dim=2)
                    if cache_x.shape[2] < 2 and isinstance(cache.map[i], str):
                        cache_x = torch.cat([torch.zeros_like(cache_x), cache_x], dim=2)
                    if isinstance(cache.map[i], str):
                        y = self.time_conv(x)
                    else:
                        y = self.time_conv(x, cache.map[i])
                    cache.map[i] = cache_x
                    cache.idx += 1
                    x = self._interleave(y, c)
        x = self.spatial(x)
        if self.mode == 'downsample3d':
            if cache is None:
                # first-frame rule: output frame 0 = input frame 0; frame j >= 1 = time_conv over
                # frames (2j-2, 2j-1, 2j) (stride 2, no padding); T = 1 + 2m -> 1 + m
                if x.shape[2] > 1:
                    x = torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
            else:
                i = cache.idx
                if cache.map[i] is None:
                    cache.map[i] = x.clone()
                    cache.idx += 1
                else:
                    cache_x = x[:, :, -1:].clone()
                    x = self.time_conv(torch.cat([cache.map[i][:, :, -1:], x], 2))
                    cache.map[i] = cache_x
                    cache.idx += 1
        return x


class MidBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x, cache=None, trace=None, prefix=''):
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x)
        return self.resnets[1](x, cache)


class UpBlock(nn.Module):
    def __init__(self, cin, cout, num_res_blocks, upsample_mode):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks + 1)])
        self.upsamplers = nn.ModuleList([Resample(cout, upsample_mode)]) if upsample_mode else None

    def forward(self, x, cache=None):
        for r in self.resnets:
            x = r(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


class Decoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_upsample):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin = cin // 2
            mode = None
            if i != len(dim_mult) - 1:
                mode = 'upsample3d' if temperal_upsample[i] else 'upsample2d'
            self.up_blocks.append(UpBlock(cin, cout, num_res_blocks, mode))
        self.norm_out = RMSNormC(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 3, 3, padding=1)

    def forward(self, x, cache=None, trace=None):
        x = _cached_conv(self.conv_in, x, cache)
        if trace is not None:
            trace.setdefault('decoder_conv_in_out', []).append(x)
        x = self.mid_block(x, cache)
        if trace is not None:
            trace.setdefault('decoder_mid_out', []).append(x)
        for i, ub in enumerate(self.up_blocks):
            x = ub(x, cache)
            if trace is not None and i == 0:
                trace.setdefault('decoder_up0_out', []).append(x)
        x = F.silu(self.norm_out(x))
        return _cached_conv(self.conv_out, x, cache)


class Encoder3d(nn.Module):
    def __init__(self, dim, z_dim2, dim_mult, num_res_blocks, temperal_downsample):
        super().__init__()
        dims = [dim * u for u in [1] + dim_mult]
        self.conv_in = CausalConv3d(3, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                self.down_blocks.append(Resample(cout, 'downsample3d' if temperal_downsample[i] else 'downsample2d'))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNormC(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], z_dim2, 3, padding=1)

    def forward(self, x, cache=None):
        x = _cached_conv(self.conv_in, x, cache)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        x = F.silu(self.norm_out(x))
        return _cached_conv(self.conv_out, x, cache)


class WanVAE(nn.Module):
    """AutoencoderKLWan. Latent normalization: z_norm = (z - mean) / std (Wan: (z - mean) * (1/std)),
    decode de-normalizes with z / (1/std) + mean, exactly as Wan and diffusers write it."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        dim, z = cfg['base_dim'], cfg['z_dim']
        assert not cfg.get('attn_scales'), 'attn_scales other than [] are not supported'
        self.z_dim = z
        tdown = cfg['temperal_downsample']
        self.encoder = Encoder3d(dim, 2 * z, cfg['dim_mult'], cfg['num_res_blocks'], tdown)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(dim, z, cfg['dim_mult'], cfg['num_res_blocks'], tdown[::-1])
        self.set_latent_stats(cfg.get('latents_mean', [0.0] * z), cfg.get('latents_std', [1.0] * z))

    def set_latent_stats(self, mean, std):
        self.register_buffer('lat_mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer('lat_std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)

    # --- raw (un-normalized) latents
    def encode_moments(self, x, chunked=False):
        """x [B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> (mu, logvar) [B, z, 1 + k, H/8, W/8]."""
        if not chunked:
            out = self.encoder(x)
        else:
            cache = _Cache()
            T = x.shape[2]
            outs = []
            for i in range(1 + (T - 1) // 4):
                cache.idx = 0
                xs = x[:, :, :1] if i == 0 else x[:, :, 1 + 4 * (i - 1): 1 + 4 * i]
                outs.append(self.encoder(xs, cache))
            out = torch.cat(outs, dim=2)
        mu, logvar = self.quant_conv(out).chunk(2, dim=1)
        return mu, logvar

    def decode_raw(self, z, chunked=False, trace=None):
        """z: raw latent [B, z, F, h, w] -> video [B, 3, 1 + 4(F-1), 8h, 8w], NOT clamped."""
        x = self.post_quant_conv(z)
        if trace is not None:
            trace['post_quant_conv_out'] = x
        if not chunked:
            out = self.decoder(x, None, trace)
        else:
            cache = _Cache()
            outs = []
            for i in range(x.shape[2]):
                cache.idx = 0
                outs.append(self.decoder(x[:, :, i:i + 1], cache, trace))
            out = torch.cat(outs, dim=2)
        if trace is not None:
            for k in list(trace):
                if isinstance(trace[k], list):
                    trace[k] = torch.cat(trace[k], dim=2)
        return out

    # --- normalized latents (what the DiT sees)
    def normalize(self, z):
        return (z - self.lat_mean) * (1.0 / self.lat_std)

    def denormalize(self, zn):
        return zn / (1.0 / self.lat_std) + self.lat_mean

    def encode(self, x, chunked=False):
        mu, _ = self.encode_moments(x, chunked)
        return self.normalize(mu)

    def decode(self, zn, chunked=False, trace=None):
        return self.decode_raw(self.denormalize(zn), chunked, trace).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# Wan's flow UniPC sampler (port of src/schedulers/flow-unipc.ts; float32 semantics)
# ----------------------------------------------------------------------------------------------

import numpy as np  # noqa: E402

f32 = np.float32


def wan_flow_schedule(steps, shift, T=1000):
    sigma_max = float(f32(1 - 1 / T))
    step = (0.0 - sigma_max) / steps
    ts, sig = [], []
    for k in range(steps):
        s0 = k * step + sigma_max
        s = shift * s0 / (1 + (shift - 1) * s0)
        ts.append(math.trunc(s * T))
        sig.append(f32(s))
    sig.append(f32(0))
    return ts, sig


def _lam(s):
    s = f32(s)
    if s == 0:
        return f32(np.inf)
    # f64 log of the f32 values, rounded to f32 (as the engine's TS port, bit-exact vs the goldens)
    return f32(f32(math.log(float(f32(1 - s)))) - f32(math.log(float(s))))


class FlowUniPC:
    """Wan FlowUniPCMultistepScheduler (bh2, solver_order 2, predict_x0, lower_order_final)."""

    def __init__(self, steps, shift):
        self.timesteps, self.sigmas = wan_flow_schedule(steps, shift)
        self.steps = steps
        self.m1 = self.m0 = self.last = None
        self.this_order = 0
        self.lower = 0
        self.k = 0

    def step(self, v, sample):
        with np.errstate(over='ignore', divide='ignore', invalid='ignore'):
            return self._step(v, sample)

    def _step(self, v, sample):
        S, k = self.sigmas, self.k
        x0 = sample - float(S[k]) * v  # f32 tensor op (the scalar is an exact f32 value)
        x = sample
        if k > 0 and self.last is not None:
            x = self._corrector(x0, self.last, self.this_order)
        self.m1, self.m0 = self.m0, x0
        order = min(2, self.steps - k, self.lower + 1)
        self.this_order = order
        self.last = x
        out = self._predictor(x, order)
        self.lower = min(self.lower + 1, 2)
        self.k += 1
        self.x0 = x0
        return out

    def _coef(self, sigma_t, sigma_s0):
        alpha_t = f32(1 - sigma_t)
        h = f32(_lam(sigma_t) - _lam(sigma_s0))
        hh = f32(-h)
        h_phi_1 = f32(math.expm1(float(hh)))
        ratio = f32(sigma_t / sigma_s0)
        return alpha_t, h, hh, h_phi_1, ratio

    def _predictor(self, x, order):
        S, k = self.sigmas, self.k
        alpha_t, h, hh, h_phi_1, ratio = self._coef(S[k + 1], S[k])
        c1 = f32(alpha_t * h_phi_1)
        cB = f32(alpha_t * h_phi_1)
        if order == 2:
            rk = f32(f32(_lam(S[k - 1]) - _lam(S[k])) / h)
            xt_ = ratio.item() * x - c1.item() * self.m0
            d1 = (self.m1 - self.m0) / rk.item()
            return xt_ - cB.item() * (0.5 * d1)
        return ratio.item() * x - c1.item() * self.m0

    def _corrector(self, model_t, last, order):
        S, k = self.sigmas, self.k
        alpha_t, h, hh, h_phi_1, ratio = self._coef(S[k], S[k - 1])
        Bh = h_phi_1
        h_phi_k = f32(f32(h_phi_1 / hh) - 1)
        b0 = f32(h_phi_k / Bh)
        h_phi_k = f32(f32(h_phi_k / hh) - f32(0.5))
        b1 = f32(f32(h_phi_k * 2) / Bh)
        c1 = f32(alpha_t * h_phi_1)
        cB = f32(alpha_t * Bh)
        xt_ = ratio.item() * last - c1.item() * self.m0
        d1t = model_t - self.m0
        if order == 2:
            rk = f32(f32(_lam(S[k - 2]) - _lam(S[k - 1])) / h)
            u11 = f32(1 - rk)
            r1 = f32(f32(b1 - f32(rk * b0)) / u11)
            r0 = f32(b0 - r1)
            d1 = (self.m1 - self.m0) / rk.item()
            return xt_ - cB.item() * (r0.item() * d1 + r1.item() * d1t)
        return xt_ - cB.item() * (0.5 * d1t)


def sample_cfg(dit, ctx_c, ctx_u, noise, steps, shift, guidance, text_len, trace=None):
    """Wan generate() loop: UniPC with classifier-free guidance. ctx_*: [B, Lc, text_dim] zero-padded.

    Returns the final normalized latent. trace (dict) gets per-step predictions like the goldens."""
    sch = FlowUniPC(steps, shift)
    lat = noise
    B = noise.shape[0]
    for i, t in enumerate(sch.timesteps):
        tt = torch.full((B,), float(t), dtype=torch.float32)
        if guidance == 1.0:
            v = dit(lat, tt, ctx_c, text_len)
            vc = vu = v
        else:
            # cond and uncond in one batch; pad contexts to a common row count
            Lc = max(ctx_c.shape[1], ctx_u.shape[1])
            cc = F.pad(ctx_c, (0, 0, 0, Lc - ctx_c.shape[1]))
            cu = F.pad(ctx_u, (0, 0, 0, Lc - ctx_u.shape[1]))
            vv = dit(torch.cat([lat, lat]), torch.cat([tt, tt]), torch.cat([cc, cu]), text_len)
            vc, vu = vv[:B], vv[B:]
            v = vu + guidance * (vc - vu)
        lat = sch.step(v, lat)
        if trace is not None:
            trace[f'step{i + 1}.noise_pred_cond'] = vc
            trace[f'step{i + 1}.noise_pred_uncond'] = vu
            trace[f'step{i + 1}.x0_pred'] = sch.x0
            trace[f'latent_after_step{i + 1}'] = lat
    return lat
