"""Generate a golden case folder (same format as test/fixtures/golden/tiny) with the PyTorch port.

The tiny case was produced by the official Wan 2.1 code. This script produces further cases with
OTHER shapes (head counts, head_dim, layer counts, odd vocab / text_len / prompt lengths, non-square
latents, another frame count, another z_dim, another number of sampling steps, shift and guidance)
so that `npm run check-golden -- <case>` is exercised on more than one geometry. The numbers come
from training/wan_torch.py, the PyTorch port of the engine's architecture, which matches every
official tiny golden within ~1e-5 (training/check_golden.py); they are NOT produced by the
official Wan code.

Everything is computed exactly as check_golden.py checks the tiny case: float32 models (the
timestep sinusoid and RoPE in float64, as Wan), Wan's padded-context path (context zero-padded to
text_len, no key bias), the official chunked (one latent frame per call) VAE decode, and the Wan
flow UniPC sampler with classifier-free guidance. A float64 run of the same code gives the
`f32_vs_f64` table (the floor of any fair tolerance).

Weights are random but deterministic (torch.Generator per model), scaled so activations stay O(1);
the VAE file holds the decoder half only (as tiny).

Usage: /usr/bin/python3 training/make_golden_case.py [--case odd] [--out DIR]
"""
import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402
import wan_torch as wt  # noqa: E402
from wan_torch import UMT5Encoder, WanDiT, WanVAE, FlowUniPC, sample_cfg, rope_tables, t5_relative_buckets, wan_flow_schedule  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    'odd': dict(
        # DiT: 3 heads x 32 head_dim (dim 96), 3 layers, ffn 160, text_dim 48, freq_dim 128, z 12
        dit=dict(heads=3, head_dim=32, layers=3, ffn=160, freq_dim=64),
        # UMT5: d_model 48, 3 heads x d_kv 16, 3 layers, d_ff 40, odd vocab
        t5=dict(d_model=48, heads=3, d_kv=16, layers=3, d_ff=40, vocab=131),
        # VAE: base_dim 4, z_dim 12 (tiny: 16 / 16)
        vae=dict(base_dim=4, z_dim=12),
        text_len=13,
        prompt_len=9,
        negative_prompt_len=3,
        # latent [F, H, W] per group (each non-square; the folder must stay < 3 MB, hence small videos):
        dit_latent=[2, 6, 10],  # DiT forward with intermediates: token grid 2 x 3 x 5 (odd h, w)
        vae_latent=[2, 6, 4],  # VAE decode with intermediates: portrait, video [3, 5, 48, 32]
        sample_latent=[2, 4, 6],  # full CFG sample + decode: 5 frames of 48 x 32 (W x H)
        sampling_steps=3,
        shift=3.0,
        guide_scale=4.5,
        dit_timesteps=[952.0, 281.75],
        weight_seeds=dict(dit=2001, t5=2002, vae=2003),
        input_seed=2004,
        seed=2005,
    ),
}


# ------------------------------------------------------------------------------------------------
# configs (the same files a diffusers-layout download has)
# ------------------------------------------------------------------------------------------------

def make_configs(c):
    d, t, v = c['dit'], c['t5'], c['vae']
    z = v['z_dim']
    g = torch.Generator().manual_seed(c['weight_seeds']['vae'] + 100)
    mean = [round(float(x), 4) for x in torch.randn(z, generator=g) * 0.7]
    std = [round(float(x), 4) for x in 1.1 + torch.rand(z, generator=g) * 2.0]
    transformer = {
        '_class_name': 'WanTransformer3DModel', '_diffusers_version': '0.33.0.dev0', 'added_kv_proj_dim': None,
        'attention_head_dim': d['head_dim'], 'cross_attn_norm': True, 'eps': 1e-06, 'ffn_dim': d['ffn'],
        'freq_dim': d['freq_dim'], 'image_dim': None, 'in_channels': z, 'num_attention_heads': d['heads'],
        'num_layers': d['layers'], 'out_channels': z, 'patch_size': [1, 2, 2], 'qk_norm': 'rms_norm_across_heads',
        'rope_max_seq_len': 1024, 'text_dim': t['d_model'],
    }
    vae = {
        '_class_name': 'AutoencoderKLWan', '_diffusers_version': '0.33.0.dev0', 'attn_scales': [],
        'base_dim': v['base_dim'], 'dim_mult': [1, 2, 4, 4], 'dropout': 0.0, 'latents_mean': mean, 'latents_std': std,
        'num_res_blocks': 2, 'temperal_downsample': [False, True, True], 'z_dim': z,
    }
    text_encoder = {
        'architectures': ['UMT5EncoderModel'], 'classifier_dropout': 0.0, 'd_ff': t['d_ff'], 'd_kv': t['d_kv'],
        'd_model': t['d_model'], 'decoder_start_token_id': 0, 'dense_act_fn': 'gelu_new', 'dropout_rate': 0.1,
        'eos_token_id': 1, 'feed_forward_proj': 'gated-gelu', 'initializer_factor': 1.0, 'is_encoder_decoder': True,
        'is_gated_act': True, 'layer_norm_epsilon': 1e-06, 'model_type': 'umt5', 'num_decoder_layers': t['layers'],
        'num_heads': t['heads'], 'num_layers': t['layers'], 'output_past': True, 'pad_token_id': 0,
        'relative_attention_max_distance': 128, 'relative_attention_num_buckets': 32, 'scalable_attention': True,
        'tie_word_embeddings': False, 'tokenizer_class': 'T5Tokenizer', 'torch_dtype': 'float32',
        'transformers_version': '4.49.0', 'use_cache': True, 'vocab_size': t['vocab'],
    }
    scheduler = {
        '_class_name': 'UniPCMultistepScheduler', '_diffusers_version': '0.33.0.dev0', 'beta_end': 0.02,
        'beta_schedule': 'linear', 'beta_start': 0.0001, 'disable_corrector': [], 'dynamic_thresholding_ratio': 0.995,
        'final_sigmas_type': 'zero', 'flow_shift': c['shift'], 'lower_order_final': True, 'num_train_timesteps': 1000,
        'predict_x0': True, 'prediction_type': 'flow_prediction', 'rescale_betas_zero_snr': False,
        'sample_max_value': 1.0, 'solver_order': 2, 'solver_p': None, 'solver_type': 'bh2', 'steps_offset': 0,
        'thresholding': False, 'timestep_spacing': 'linspace', 'trained_betas': None, 'use_beta_sigmas': False,
        'use_exponential_sigmas': False, 'use_flow_sigmas': True, 'use_karras_sigmas': False,
    }
    model_index = {
        '_class_name': 'WanPipeline', '_diffusers_version': '0.33.0.dev0',
        'scheduler': ['diffusers', 'UniPCMultistepScheduler'], 'text_encoder': ['transformers', 'UMT5EncoderModel'],
        'tokenizer': [None, None], 'transformer': ['diffusers', 'WanTransformer3DModel'],
        'vae': ['diffusers', 'AutoencoderKLWan'],
    }
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, scheduler=scheduler, model_index=model_index)


def wan_kwargs(cfgs, text_len):
    """The equivalent official Wan constructor arguments (informational, as in tiny's golden.json)."""
    tr, te, va = cfgs['transformer'], cfgs['text_encoder'], cfgs['vae']
    D = tr['num_attention_heads'] * tr['attention_head_dim']
    return {
        'wan_model_kwargs': {
            'model_type': 't2v', 'patch_size': tr['patch_size'], 'text_len': text_len, 'in_dim': tr['in_channels'],
            'dim': D, 'ffn_dim': tr['ffn_dim'], 'freq_dim': tr['freq_dim'], 'text_dim': tr['text_dim'],
            'out_dim': tr['out_channels'], 'num_heads': tr['num_attention_heads'], 'num_layers': tr['num_layers'],
            'window_size': [-1, -1], 'qk_norm': True, 'cross_attn_norm': True, 'eps': 1e-06,
        },
        'wan_t5_encoder_kwargs': {
            'vocab': te['vocab_size'], 'dim': te['d_model'], 'dim_attn': te['num_heads'] * te['d_kv'],
            'dim_ffn': te['d_ff'], 'num_heads': te['num_heads'], 'num_layers': te['num_layers'], 'num_buckets': 32,
            'shared_pos': False, 'max_dist': 128,
        },
        'wan_vae_kwargs': {
            'dim': va['base_dim'], 'z_dim': va['z_dim'], 'dim_mult': va['dim_mult'],
            'num_res_blocks': va['num_res_blocks'], 'attn_scales': [], 'temperal_downsample': va['temperal_downsample'],
            'dropout': 0.0,
        },
    }


# ------------------------------------------------------------------------------------------------
# deterministic random weights, scaled like tiny's (activations O(1))
# ------------------------------------------------------------------------------------------------

def init_weights(model, seed, kind):
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for name in sorted(sd):
        p = sd[name]
        r = torch.randn(p.shape, generator=g)
        leaf = name.rsplit('.', 1)[-1]
        if name.endswith('scale_shift_table'):
            v = 0.3 * r
        elif leaf == 'gamma' or 'norm' in name and leaf == 'weight' and p.dim() == 1:
            v = 1.0 + 0.1 * r  # RMSNorm / LayerNorm / channel-norm gains
        elif name.endswith('relative_attention_bias.weight'):
            v = 0.5 * r
        elif name == 'shared.weight':
            v = r
        elif leaf == 'bias':
            v = (0.05 if kind == 'dit' else 0.02) * r
        else:
            fan_in = p[0].numel()
            v = r / math.sqrt(fan_in)
            if kind == 't5' and name.endswith('SelfAttention.q.weight'):
                v = v * 0.5  # T5 has no 1/sqrt(d_kv): keep the scores moderate
            if name.endswith('decoder.conv_out.weight'):
                v = v * 0.8  # keep most of the video inside the clamp
        p.copy_(v)
    return model


def state_dict_for_file(model, kind):
    sd = model.state_dict()
    if kind == 'vae':  # decoder half only (T2V needs no encoder), as tiny
        sd = {k: v for k, v in sd.items() if k.startswith(('decoder.', 'post_quant_conv.'))}
    return {k: v.detach().clone().float() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------
# the golden computation (mirrors check_golden.py)
# ------------------------------------------------------------------------------------------------

def compute(models, inputs, c, trace_all=True):
    """Runs every golden tensor through the port. Dtype follows the models (float32 or float64)."""
    t5, dit, vae = models
    dt = next(dit.parameters()).dtype
    text_len = c['text_len']
    out = {}
    # ---- T5
    ctx = {}
    for p in ['prompt', 'negative']:
        ids = inputs[f't5.{p}.input_ids'].long()
        mask = inputs[f't5.{p}.attention_mask'].long()
        tr = {}
        h = t5(ids, mask, tr)
        for i in range(c['t5']['layers']):
            out[f't5.{p}.block{i}_out'] = tr[f'block{i}_out']
        out[f't5.{p}.last_hidden_state'] = h
        L = int(mask.sum())
        out[f't5.{p}.context'] = h[0, :L]
        ctx[p] = F.pad(h[0, :L], (0, 0, 0, text_len - L))[None]  # Wan pads to text_len with zeros
    out['t5.prompt.context_padded'] = ctx['prompt'][0]
    out['t5.block0_position_bias'] = t5.encoder.block[0].layer[0].SelfAttention.position_bias(text_len, 'cpu')
    # ---- DiT (on the padded prompt context: Wan's path, no key bias)
    x = inputs['dit.x'][None].to(dt)
    for j, tv in enumerate(c['dit_timesteps']):
        tag = 't' + ('%g' % tv).replace('.', '_')
        t = torch.tensor([tv], dtype=torch.float32)
        tr = {}
        o = dit(x, t, ctx['prompt'], text_len, trace=tr)
        if j == 0:
            for k in ['time_sinusoid', 'e', 'e0', 'context_embedded', 'patch_tokens', 'head_out']:
                out[f'dit.{tag}.{k}'] = tr[k]
            for i in range(c['dit']['layers']):  # block 0 sub-layers (as tiny) and every block's output
                for k in (['self_attn_out', 'cross_attn_out', 'ffn_out'] if i == 0 else []) + ['out']:
                    out[f'dit.{tag}.block{i}_{k}'] = tr[f'block{i}_{k}']
        out[f'dit.{tag}.out'] = o[0]
    # ---- VAE decode: the official chunked (one latent frame per call) path
    z = inputs['vae.z'][None].to(dt)
    tr = {}
    raw = vae.decode_raw(vae.denormalize(z), chunked=True, trace=tr)
    for k in ['post_quant_conv_out', 'decoder_conv_in_out', 'decoder_mid_out', 'decoder_up0_out']:
        out[f'vae.{k}'] = tr[k]
    out['vae.decoder_raw_out'] = raw
    out['vae.video'] = raw.clamp(-1, 1)[0]
    # ---- full CFG sample (padded contexts: Wan's path)
    tr = {}
    steps = c['sampling_steps']
    lat = sample_cfg(dit, ctx['prompt'], ctx['negative'], inputs['sample.noise'][None].to(dt), steps, c['shift'],
                     c['guide_scale'], text_len, trace=tr)
    for i in range(1, steps + 1):
        for k in ['noise_pred_cond', 'noise_pred_uncond', 'x0_pred']:
            out[f'sample.step{i}.{k}'] = tr[f'step{i}.{k}'][0]
        out[f'sample.latent_after_step{i}'] = tr[f'latent_after_step{i}'][0]
    out['sample.final_latent'] = lat[0]
    out['sample.video'] = vae.decode(lat, chunked=True)[0]
    return out


class _Float64:
    """float64 diagnostic run: Tensor.float() is a no-op on float64 tensors (as the official f64 oracle
    run), so the sinusoid and the T5 softmax stay in float64."""

    def __enter__(self):
        self.orig = torch.Tensor.float
        orig = self.orig
        torch.Tensor.float = lambda s, *a, **k: s if s.dtype == torch.float64 else orig(s, *a, **k)

    def __exit__(self, *exc):
        torch.Tensor.float = self.orig


DESCRIPTIONS = {
    'dit.rope_cos': 'cos of the 3-axis RoPE angle per token and complex pair [L_tokens, head_dim/2] (pairs = adjacent elements 2i,2i+1)',
    'dit.rope_sin': 'sin of the same angles',
    'dit.x': 'DiT input latent [C, F, H, W]',
    'timestep': 'timestep tensor passed as t (float32 [1]; Wan casts to float64 for the sinusoid)',
    'out': 'WanModel output (flow prediction) [C, F, H, W]',
    'time_sinusoid': 'sinusoidal_embedding_1d(freq_dim, t) = [cos, sin] (computed in float64, cast to float32) [1, freq_dim]',
    'e': 'time_embedding output [1, dim] (used by the head modulation)',
    'e0': "time_projection output unflattened [1, 6, dim] (block modulation before adding the block's own table)",
    'context_embedded': 'text_embedding(context_padded) [1, text_len, dim]',
    'patch_tokens': 'patch_embedding output flattened to tokens [1, L_tokens, dim] (token order f, h, w)',
    'head_out': 'head output before unpatchify [1, L_tokens, prod(patch)*out_dim] (channel order p, q, r, c with c fastest)',
    'self_attn_out': 'block self-attention output y (before gating by e[2]) [1, L, dim]',
    'cross_attn_out': 'block cross-attention output (added ungated) [1, L, dim]',
    'ffn_out': 'block FFN output (before gating by e[5]) [1, L, dim]',
    'block_out': 'output of DiT block (residual stream) [1, L_tokens, dim]',
    't5.block0_position_bias': 'block 0 relative position bias [1, heads, text_len, text_len] (added to q.k, no 1/sqrt(d) scaling in T5)',
    't5.relative_buckets': 'T5 relative position bucket (bidirectional), rel = k - q, [text_len, text_len] (int32)',
    't5.prompt.input_ids': 'prompt token ids (ending with </s> = 1) padded with 0 to text_len (int32)',
    't5.prompt.attention_mask': '1 for real tokens, 0 for padding (int32)',
    't5.negative.input_ids': 'negative-prompt token ids padded with 0 to text_len (int32)',
    't5.negative.attention_mask': 'mask for the negative prompt (int32)',
    't5.block_out': 'output of T5 block (residual stream) [1, text_len, d_model]',
    't5.last_hidden_state': 'T5 encoder output incl. padded positions (final RMSNorm applied) [1, text_len, d_model]',
    't5.context': 'last_hidden_state trimmed to the true length [L, d_model]',
    't5.prompt.context_padded': 'context zero-padded to text_len, exactly what WanModel.forward stacks before text_embedding',
    'vae.z': 'latent fed to the VAE decode, in the normalized latent space [z_dim, F, H, W]',
    'vae.post_quant_conv_out': 'conv2 (post_quant_conv) output on the de-normalized latent [1, z_dim, F, H, W]',
    'vae.decoder_conv_in_out': 'decoder conv1 (conv_in) output, per-frame chunks concatenated on time [1, 4*base, F, H, W]',
    'vae.decoder_mid_out': 'decoder middle block output (after the 2nd residual block), chunks concatenated [1, 4*base, F, H, W]',
    'vae.decoder_up0_out': 'output of the first upsample3d Resample (up_blocks.0.upsamplers.0), chunks concatenated [1, 2*base, 1+2*(F-1), 2H, 2W]',
    'vae.decoder_raw_out': 'decoder output BEFORE the clamp [1, 3, 1+4*(F-1), 8H, 8W]',
    'vae.video': 'decode output, clamped to [-1, 1] [3, 1+4*(F-1), 8H, 8W]',
    'sched.timesteps': 'Wan FlowUniPCMultistepScheduler timesteps after set_timesteps (int32 here, int64 officially)',
    'sched.sigmas': 'Wan FlowUniPCMultistepScheduler sigmas after set_timesteps [N+1] (float32, last = 0)',
    'sample.noise': 'initial noise latent of the sampling loop [z_dim, F, H, W] (torch.randn with a seeded CPU generator)',
    'noise_pred_cond': 'WanModel(latent, t, context=prompt) at this step',
    'noise_pred_uncond': 'WanModel(latent, t, context=negative prompt) at this step',
    'x0_pred': 'converted model output x0 = sample - sigma_t * noise_pred (guided), at this step',
    'latent_after_step': 'latent returned by scheduler.step at this step',
    'sample.final_latent': 'latent after the last step (fed to the VAE)',
    'sample.video': 'decode(final_latent), clamped [3, T, 8H, 8W] (the generate() output)',
}


def describe(name):
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    parts = name.split('.')
    leaf = parts[-1]
    if name.startswith('dit.'):
        if leaf.startswith('block') and leaf.endswith('_out') and leaf.count('_') == 1:
            return DESCRIPTIONS['block_out']
        for k in ['self_attn_out', 'cross_attn_out', 'ffn_out']:
            if leaf.endswith(k):
                return DESCRIPTIONS[k]
        return DESCRIPTIONS[leaf]
    if name.startswith('t5.'):
        if leaf.startswith('block'):
            return DESCRIPTIONS['t5.block_out']
        return DESCRIPTIONS['t5.' + leaf]
    if name.startswith('sample.'):
        if leaf.startswith('latent_after_step'):
            return DESCRIPTIONS['latent_after_step']
        return DESCRIPTIONS[leaf]
    raise KeyError(name)


def make_ids(g, n, text_len, vocab):
    ids = torch.zeros(1, text_len, dtype=torch.int32)
    ids[0, :n - 1] = torch.randint(2, vocab, (n - 1,), generator=g, dtype=torch.int64).to(torch.int32)
    ids[0, n - 1] = 1  # </s>
    mask = torch.zeros(1, text_len, dtype=torch.int32)
    mask[0, :n] = 1
    return ids, mask


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as fh:
        h.update(fh.read())
    return h.hexdigest()


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as fh:
        json.dump(obj, fh, indent=2)
        fh.write('\n')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--case', default='odd', choices=sorted(CASES))
    ap.add_argument('--out', default=None, help='case folder (default test/fixtures/golden/<case>)')
    a = ap.parse_args()
    torch.set_num_threads(1)
    c = CASES[a.case]
    out_dir = a.out or os.path.join(ROOT, 'test', 'fixtures', 'golden', a.case)
    cfgs = make_configs(c)
    text_len = c['text_len']
    z = c['vae']['z_dim']
    dit_shape, vae_shape, lat_shape = ([z] + list(c[k]) for k in ('dit_latent', 'vae_latent', 'sample_latent'))
    for sh in (dit_shape, vae_shape, lat_shape):
        assert sh[2] % 2 == 0 and sh[3] % 2 == 0, sh  # patch (1, 2, 2)
    frames = 1 + 4 * (lat_shape[1] - 1)
    H, W = 8 * lat_shape[2], 8 * lat_shape[3]

    # ---- models with deterministic random weights
    t5 = init_weights(UMT5Encoder(cfgs['text_encoder']), c['weight_seeds']['t5'], 't5').eval()
    dit = init_weights(WanDiT(cfgs['transformer']), c['weight_seeds']['dit'], 'dit').eval()
    vae = init_weights(WanVAE(cfgs['vae']), c['weight_seeds']['vae'], 'vae').eval()

    # ---- inputs
    g = torch.Generator().manual_seed(c['input_seed'])
    inputs = {}
    for p, n in [('prompt', c['prompt_len']), ('negative', c['negative_prompt_len'])]:
        inputs[f't5.{p}.input_ids'], inputs[f't5.{p}.attention_mask'] = make_ids(g, n, text_len, cfgs['text_encoder']['vocab_size'])
    inputs['dit.x'] = torch.randn(dit_shape, generator=g)
    inputs['vae.z'] = torch.randn(vae_shape, generator=g)
    inputs['sample.noise'] = torch.randn(lat_shape, generator=torch.Generator('cpu').manual_seed(c['seed']))

    with torch.no_grad():
        res = compute((t5, dit, vae), inputs, c)
        with _Float64():
            res64 = compute(tuple(copy.deepcopy(m).double() for m in (t5, dit, vae)), inputs, c)
        # sanity: the port's other paths agree (whole-sequence VAE, compact context)
        zz = inputs['vae.z'][None]
        whole = vae.decode_raw(vae.denormalize(zz), chunked=False)
        d_vae = (whole - res['vae.decoder_raw_out']).abs().max().item()
        t0 = torch.tensor([c['dit_timesteps'][0]])
        L = int(inputs['t5.prompt.attention_mask'].sum())
        compact = dit(inputs['dit.x'][None], t0, res['t5.prompt.context'][None], text_len)[0]
        tag0 = 't' + ('%g' % c['dit_timesteps'][0]).replace('.', '_')
        d_dit = (compact - res[f'dit.{tag0}.out']).abs().max().item()
        print(f'sanity: VAE whole vs chunked {d_vae:.2e}; DiT compact vs padded context {d_dit:.2e} (L={L})')
        assert d_vae < 1e-5 and d_dit < 1e-5

    # ---- host tables and the schedule
    Fp, Hp, Wp = dit_shape[1], dit_shape[2] // 2, dit_shape[3] // 2
    cos, sin = rope_tables(dit.head_dim, Fp, Hp, Wp)
    ts, sg = wan_flow_schedule(c['sampling_steps'], c['shift'])
    gold = dict(inputs)
    gold.update({k: v.detach().float().contiguous() for k, v in res.items()})
    gold['dit.rope_cos'] = cos.float()
    gold['dit.rope_sin'] = sin.float()
    gold['t5.relative_buckets'] = t5_relative_buckets(text_len, text_len).to(torch.int32)
    gold['sched.timesteps'] = torch.tensor(ts, dtype=torch.int32)
    gold['sched.sigmas'] = torch.tensor([float(s) for s in sg], dtype=torch.float32)
    for tv in c['dit_timesteps']:
        gold['dit.t' + ('%g' % tv).replace('.', '_') + '.timestep'] = torch.tensor([tv], dtype=torch.float32)

    # per step orders (the sampler's own bookkeeping)
    sch = FlowUniPC(c['sampling_steps'], c['shift'])
    steps_info = []
    prev_order = None
    for k in range(c['sampling_steps']):
        order = min(2, c['sampling_steps'] - k, k + 1)
        steps_info.append({
            'step': k + 1, 'timestep': ts[k], 'step_index': k, 'sigma': float(sg[k]), 'sigma_next': float(sg[k + 1]),
            'corrector_used': k > 0, 'corrector_order': prev_order, 'predictor_order': order,
        })
        prev_order = order
    assert sch.timesteps == ts

    # float32 vs float64
    f64 = {}
    for k in sorted(res):
        a32, a64 = res[k].detach().double(), res64[k].detach().double()
        err = (a32 - a64).abs()
        ref = a64.abs().max().item()
        rms_ref = a64.pow(2).mean().sqrt().item()
        f64[k] = {
            'max_abs': err.max().item(), 'max_abs_ref': ref,
            'max_abs_over_max_ref': err.max().item() / ref if ref else 0.0,
            'rms_err_over_rms_ref': err.pow(2).mean().sqrt().item() / rms_ref if rms_ref else 0.0,
        }

    # ---- write the folder
    os.makedirs(out_dir, exist_ok=True)
    files = {
        'model_index.json': cfgs['model_index'],
        'scheduler/scheduler_config.json': cfgs['scheduler'],
        'text_encoder/config.json': cfgs['text_encoder'],
        'transformer/config.json': cfgs['transformer'],
        'vae/config.json': cfgs['vae'],
    }
    for rel, obj in files.items():
        write_json(os.path.join(out_dir, rel), obj)
    st.save(state_dict_for_file(t5, 't5'), os.path.join(out_dir, 'text_encoder/model.safetensors'))
    st.save(state_dict_for_file(dit, 'dit'), os.path.join(out_dir, 'transformer/diffusion_pytorch_model.safetensors'))
    st.save(state_dict_for_file(vae, 'vae'), os.path.join(out_dir, 'vae/diffusion_pytorch_model.safetensors'))
    st.save(gold, os.path.join(out_dir, 'golden.safetensors'),
            metadata={'case': a.case, 'generated_by': 'training/make_golden_case.py (PyTorch port training/wan_torch.py)'})

    video_shape = list(gold['vae.video'].shape)
    frac_clamped = (gold['vae.decoder_raw_out'].abs() > 1).float().mean().item()
    meta = {
        'case': a.case,
        'description': (
            f'Golden case "{a.case}": shapes other than tiny\'s (DiT {c["dit"]["heads"]} heads x {c["dit"]["head_dim"]} '
            f'head_dim, {c["dit"]["layers"]} layers; UMT5 {c["t5"]["heads"]} heads, {c["t5"]["layers"]} layers, vocab '
            f'{c["t5"]["vocab"]}; text_len {text_len}, prompt lengths {c["prompt_len"]}/{c["negative_prompt_len"]}; '
            f'non-square latents: DiT {dit_shape}, VAE {vae_shape}, sample {lat_shape} ({frames} frames); '
            f'{c["sampling_steps"]} UniPC steps, shift {c["shift"]}, guidance {c["guide_scale"]}). Each group has its own '
            'latent shape (dit.x, vae.z, sample.noise). Produced by the '
            'PyTorch port training/wan_torch.py (which matches the official tiny goldens within ~1e-5, see '
            'training/check_golden.py), NOT by the official Wan 2.1 code. Same format and conventions as tiny '
            '(/work/shared/golden/README.md).'),
        'generated_by': {
            'command': f'/usr/bin/python3 training/make_golden_case.py --case {a.case}',
            'script': 'training/make_golden_case.py', 'port': 'training/wan_torch.py',
            'python': platform.python_version(), 'torch': torch.__version__, 'numpy': np.__version__,
            'platform': platform.platform(), 'threads': 1,
        },
        'patches': [
            'None: the goldens are the float32 math of the PyTorch port (not the official code). Wan paths used: '
            'context zero-padded to text_len (no key bias), chunked VAE decode (one latent frame per call, '
            'feature cache), Wan FlowUniPC (bh2, order 2, predict_x0) with CFG.',
            'float64 diagnostic run only (f32_vs_f64): the same models cast to float64 and Tensor.float() made a '
            'no-op on float64 tensors; the sampler keeps its float32 sigmas.',
        ],
        'model_configs': dict(wan_kwargs(cfgs, text_len), **{
            'transformer/config.json': cfgs['transformer'], 'vae/config.json': cfgs['vae'],
            'text_encoder/config.json': cfgs['text_encoder'], 'scheduler/scheduler_config.json': cfgs['scheduler'],
        }),
        'settings': {
            'text_len (max_sequence_length)': text_len,
            'prompt_len': c['prompt_len'],
            'negative_prompt_len': c['negative_prompt_len'],
            'latent_shape [C,F,H,W]': lat_shape,
            'video_shape [3,T,H,W]': list(gold['sample.video'].shape),
            'frame_num': frames,
            'size (W,H)': [W, H],
            'seq_len (tokens)': lat_shape[1] * (lat_shape[2] // 2) * (lat_shape[3] // 2),
            'dit_latent_shape [C,F,H,W] (dit.x)': dit_shape,
            'dit_seq_len (tokens of dit.x)': Fp * Hp * Wp,
            'vae_latent_shape [C,F,H,W] (vae.z)': vae_shape,
            'vae_video_shape [3,T,H,W] (vae.video)': video_shape,
            'dit_timesteps': c['dit_timesteps'],
            'dit_context': 't5.prompt.context (trimmed); WanModel pads it to text_len with zeros',
            'sample_solver': 'unipc (Wan FlowUniPCMultistepScheduler, bh2, order 2, predict_x0; port: wan_torch.FlowUniPC)',
            'sampling_steps': c['sampling_steps'],
            'shift': c['shift'],
            'guide_scale': c['guide_scale'],
            "seed (noise = torch.randn(shape, generator=torch.Generator('cpu').manual_seed(seed)))": c['seed'],
            'weight_seeds': c['weight_seeds'],
            'input_seed': c['input_seed'],
            'vae_safetensors_contains_encoder': False,
            'vae_video_fraction_clamped (|vae.decoder_raw_out| > 1)': frac_clamped,
        },
        'scheduler': {'timesteps': ts, 'sigmas': [float(s) for s in sg], 'steps': steps_info},
        'f32_vs_f64': f64,
        'tensors': {k: {'shape': list(v.shape), 'dtype': 'F32' if v.is_floating_point() else 'I32', 'description': describe(k)}
                    for k, v in sorted(gold.items())},
    }
    meta['files'] = {}
    for rel in ['golden.safetensors', 'model_index.json', 'scheduler/scheduler_config.json', 'text_encoder/config.json',
                'text_encoder/model.safetensors', 'transformer/config.json', 'transformer/diffusion_pytorch_model.safetensors',
                'vae/config.json', 'vae/diffusion_pytorch_model.safetensors']:
        p = os.path.join(out_dir, rel)
        meta['files'][rel] = {'bytes': os.path.getsize(p), 'sha256': sha256(p)}
    write_json(os.path.join(out_dir, 'golden.json'), meta)

    total = sum(v['bytes'] for v in meta['files'].values()) + os.path.getsize(os.path.join(out_dir, 'golden.json'))
    worst = max(f64.items(), key=lambda kv: kv[1]['max_abs'])
    print(f'wrote {out_dir}: {len(gold)} tensors, {total / 1e6:.2f} MB; latents dit {dit_shape} vae {vae_shape} '
          f'sample {lat_shape}, vae video {video_shape}, '
          f'timesteps {ts}; video clamped {frac_clamped:.1%}; worst f32 vs f64 {worst[0]} {worst[1]["max_abs"]:.2e}')
    for k in ['t5.prompt.context', f'dit.{tag0}.out', 'vae.video', 'sample.final_latent', 'sample.video']:
        print(f'  |{k}| max {res[k].abs().max().item():.3f}  f32-f64 {f64[k]["max_abs"]:.2e}')


if __name__ == '__main__':
    main()
