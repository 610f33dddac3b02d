"""Prove that training/wan_torch.py computes what the official Wan 2.1 code computes.

Loads the tiny golden model folder (test/fixtures/golden/tiny) into the PyTorch port and compares
every golden tensor (T5, DiT incl. intermediates at t=999 and t=437.5, VAE decode incl.
intermediates, the 4-step UniPC CFG sample and its decoded video) at <= 1e-4 abs (the golden README
suggests 1e-4 per component and 1e-3 end to end; the port holds 1e-4 everywhere). Also checks two things the goldens do not
cover: the compact cross-attention path used for training (one zero row with a ln(count) key bias)
against the padded path, and the whole-sequence VAE encoder / decoder against the official chunked
feature-cache path.

Usage: /usr/bin/python3 training/check_golden.py [--model DIR]   (exit status 1 on any failure)
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402
from wan_torch import UMT5Encoder, WanDiT, WanVAE, sample_cfg, rope_tables, t5_relative_buckets, wan_flow_schedule  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_models(d):
    cfg = lambda p: json.load(open(os.path.join(d, p)))  # noqa: E731
    t5 = UMT5Encoder(cfg('text_encoder/config.json'))
    dit = WanDiT(cfg('transformer/config.json'))
    vae = WanVAE(cfg('vae/config.json'))
    for m, f, strict in [(t5, 'text_encoder/model.safetensors', True),
                         (dit, 'transformer/diffusion_pytorch_model.safetensors', True),
                         (vae, 'vae/diffusion_pytorch_model.safetensors', False)]:
        sd = st.load(os.path.join(d, f))
        missing, unexpected = m.load_state_dict(sd, strict=False)
        if unexpected:
            raise SystemExit(f'{f}: unexpected keys {unexpected[:5]}')
        if strict and missing:
            raise SystemExit(f'{f}: missing keys {missing[:5]}')
        if not strict:
            miss = [k for k in missing if not k.startswith(('encoder.', 'quant_conv.'))]
            if miss:
                raise SystemExit(f'{f}: missing decoder keys {miss[:5]}')
    return t5.eval(), dit.eval(), vae.eval()


class Report:
    def __init__(self):
        self.rows = []
        self.fail = 0

    def cmp(self, name, got, want, tol=1e-4):
        got = got.detach().to(torch.float64).reshape(want.shape)
        want = want.to(torch.float64)
        err = (got - want).abs().max().item() if want.numel() else 0.0
        ok = err <= tol
        self.fail += not ok
        self.rows.append((name, tuple(want.shape), err, tol, ok))
        print(f'{"ok  " if ok else "FAIL"} {name:42s} {str(tuple(want.shape)):20s} max|err| {err:.3e}  (tol {tol:g})')
        return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--model', default=os.path.join(ROOT, 'test/fixtures/golden/tiny'))
    ap.add_argument('--json', default=None, help='write the table as JSON here')
    a = ap.parse_args()
    torch.set_num_threads(1)
    G = st.load(os.path.join(a.model, 'golden.safetensors'))
    meta = json.load(open(os.path.join(a.model, 'golden.json')))
    s = meta['settings']
    text_len = s['text_len (max_sequence_length)']
    t5, dit, vae = load_models(a.model)
    R = Report()
    with torch.no_grad():
        # ---------------- T5
        R.cmp('t5.relative_buckets', t5_relative_buckets(text_len, text_len), G['t5.relative_buckets'], 0)
        R.cmp('t5.block0_position_bias', t5.encoder.block[0].layer[0].SelfAttention.position_bias(text_len, 'cpu'),
              G['t5.block0_position_bias'], 0)
        ctx = {}
        for p in ['prompt', 'negative']:
            ids = G[f't5.{p}.input_ids'].long()
            mask = G[f't5.{p}.attention_mask'].long()
            tr = {}
            h = t5(ids, mask, tr)
            for i in range(2):
                R.cmp(f't5.{p}.block{i}_out', tr[f'block{i}_out'], G[f't5.{p}.block{i}_out'])
            R.cmp(f't5.{p}.last_hidden_state', h, G[f't5.{p}.last_hidden_state'])
            L = int(mask.sum())
            R.cmp(f't5.{p}.context', h[0, :L], G[f't5.{p}.context'])
            ctx[p] = G[f't5.{p}.context'][None]  # trimmed [1, L, d]
        pad = torch.nn.functional.pad
        R.cmp('t5.prompt.context_padded', pad(ctx['prompt'], (0, 0, 0, text_len - ctx['prompt'].shape[1]))[0],
              G['t5.prompt.context_padded'])

        # ---------------- DiT
        x = G['dit.x'][None]
        F_, H, W = x.shape[2], x.shape[3] // 2, x.shape[4] // 2
        cos, sin = rope_tables(dit.head_dim, F_, H, W)
        R.cmp('dit.rope_cos', cos, G['dit.rope_cos'])
        R.cmp('dit.rope_sin', sin, G['dit.rope_sin'])
        cpad = G['t5.prompt.context_padded'][None]
        for tag in ['t999', 't437_5']:
            t = G[f'dit.{tag}.timestep'].float()
            tr = {}
            out = dit(x, t, cpad, text_len, trace=tr)
            if tag == 't999':
                for k in ['time_sinusoid', 'e', 'e0', 'context_embedded', 'patch_tokens', 'block0_self_attn_out',
                          'block0_cross_attn_out', 'block0_ffn_out', 'block0_out', 'block1_out', 'head_out']:
                    R.cmp(f'dit.{tag}.{k}', tr[k], G[f'dit.{tag}.{k}'])
            R.cmp(f'dit.{tag}.out', out[0], G[f'dit.{tag}.out'])
            # compact context path (training): trimmed context + one zero row with a ln(count) bias
            out_c = dit(x, t, ctx['prompt'], text_len)
            R.cmp(f'dit.{tag}.out (compact context path)', out_c[0], G[f'dit.{tag}.out'])

        # ---------------- scheduler
        ts, sg = wan_flow_schedule(s['sampling_steps'], s['shift'])
        R.cmp('sched.timesteps', torch.tensor(ts, dtype=torch.float64), G['sched.timesteps'], 0)
        R.cmp('sched.sigmas', torch.tensor([float(v) for v in sg]), G['sched.sigmas'], 0)

        # ---------------- VAE decode (official chunked path and whole-sequence path)
        z = G['vae.z'][None]
        for chunked in [True, False]:
            tag = 'chunked' if chunked else 'whole'
            tr = {}
            raw = vae.decode_raw(vae.denormalize(z), chunked=chunked, trace=tr)
            for k in ['post_quant_conv_out', 'decoder_conv_in_out', 'decoder_mid_out', 'decoder_up0_out']:
                R.cmp(f'vae.{k} ({tag})', tr[k], G[f'vae.{k}'])
            R.cmp(f'vae.decoder_raw_out ({tag})', raw, G['vae.decoder_raw_out'])
            R.cmp(f'vae.video ({tag})', raw.clamp(-1, 1)[0], G['vae.video'])

        # ---------------- full CFG sample (4 UniPC steps)
        tr = {}
        lat = sample_cfg(dit, ctx['prompt'], ctx['negative'], G['sample.noise'][None], s['sampling_steps'], s['shift'],
                         s['guide_scale'], text_len, trace=tr)
        for i in range(1, s['sampling_steps'] + 1):
            for k in ['noise_pred_cond', 'noise_pred_uncond', 'x0_pred']:
                R.cmp(f'sample.step{i}.{k}', tr[f'step{i}.{k}'][0], G[f'sample.step{i}.{k}'])
            R.cmp(f'sample.latent_after_step{i}', tr[f'latent_after_step{i}'][0], G[f'sample.latent_after_step{i}'])
        R.cmp('sample.final_latent', lat[0], G['sample.final_latent'])
        video = vae.decode(lat, chunked=True)
        R.cmp('sample.video', video[0], G['sample.video'])

        # ---------------- VAE encoder: whole-sequence vs the official chunked (1, 4, 4) path
        g = torch.Generator().manual_seed(7)
        enc = WanVAE(vae.cfg)
        for p in enc.parameters():  # random but O(1) activations
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1))
        clip = torch.rand(1, 3, 9, 64, 64, generator=g) * 2 - 1
        mu_w, lv_w = enc.encode_moments(clip, chunked=False)
        mu_c, lv_c = enc.encode_moments(clip, chunked=True)
        R.cmp('vae.encode mu (whole vs chunked)', mu_w, mu_c, 1e-5)
        R.cmp('vae.encode logvar (whole vs chunked)', lv_w, lv_c, 1e-5)
        R.cmp('vae.decode (whole vs chunked, random weights)', enc.decode_raw(mu_w), enc.decode_raw(mu_w, chunked=True), 1e-5)
    worst = max(r[2] for r in R.rows)
    print(f'\n{len(R.rows)} comparisons, {R.fail} failed; worst max|err| {worst:.3e}')
    if a.json:
        json.dump([{'name': n, 'shape': list(sh), 'max_abs_err': e, 'tol': t, 'ok': ok} for n, sh, e, t, ok in R.rows],
                  open(a.json, 'w'), indent=1)
    sys.exit(1 if R.fail else 0)


if __name__ == '__main__':
    main()
