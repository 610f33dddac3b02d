"""Train the demo model: VAE (encoder + decoder), then latents, then UMT5 + DiT jointly.

    /usr/bin/python3 training/train.py --run training/runs/demo [--threads 2] [phases...]

phases (default: all, in order): vae, encode, vae_dec, dit. Every phase is resumable: it checkpoints into the
run folder and, when restarted, continues from the last checkpoint with the same data stream (batch
k is a pure function of (seed, k)). A finished phase is skipped. Logs: <run>/log.jsonl (one line
per logged step), <run>/timing.json (wall seconds per phase, summed over resumes).

Matmuls: Debian's torch links the reference BLAS (libblas.so.3 alternative), ~15x slower than
OpenBLAS for the DiT. If /usr/lib/x86_64-linux-gnu/openblas-pthread exists (apt-get install
libopenblas0-pthread) this script re-executes itself with it first on LD_LIBRARY_PATH (no system
change). Convolutions use oneDNN either way.
"""
import os
import sys

if __name__ == '__main__':
    from openblas import reexec_with_openblas
    reexec_with_openblas()

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402
import tokenizer  # noqa: E402
from wan_torch import UMT5Encoder, WanDiT, WanVAE  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Configuration (the model configs are written verbatim into the exported config.json files)

VAE_CFG = {
    '_class_name': 'AutoencoderKLWan', '_diffusers_version': '0.33.0.dev0',
    'attn_scales': [], 'base_dim': 8, 'dim_mult': [1, 2, 4, 4], 'dropout': 0.0,
    'num_res_blocks': 2, 'temperal_downsample': [False, True, True], 'z_dim': 16,
}
DIT_CFG = {
    '_class_name': 'WanTransformer3DModel', '_diffusers_version': '0.33.0.dev0',
    'added_kv_proj_dim': None, 'attention_head_dim': 64, 'cross_attn_norm': True, 'eps': 1e-6,
    'ffn_dim': 768, 'freq_dim': 256, 'image_dim': None, 'in_channels': 16, 'num_attention_heads': 3,
    'num_layers': 4, 'out_channels': 16, 'patch_size': [1, 2, 2], 'qk_norm': 'rms_norm_across_heads',
    'rope_max_seq_len': 1024, 'text_dim': 64,
}
T5_CFG = {
    'architectures': ['UMT5EncoderModel'], 'classifier_dropout': 0.0, 'd_ff': 128, 'd_kv': 16, 'd_model': 64,
    'decoder_start_token_id': 0, 'dense_act_fn': 'gelu_new', 'dropout_rate': 0.0, 'eos_token_id': 1,
    'feed_forward_proj': 'gated-gelu', 'initializer_factor': 1.0, 'is_encoder_decoder': True, 'is_gated_act': True,
    'layer_norm_epsilon': 1e-6, 'model_type': 'umt5', 'num_decoder_layers': 2, 'num_heads': 4, 'num_layers': 2,
    'output_past': True, 'pad_token_id': 0, 'relative_attention_max_distance': 128,
    'relative_attention_num_buckets': 32, 'scalable_attention': True, 'tie_word_embeddings': False,
    'tokenizer_class': 'T5Tokenizer', 'torch_dtype': 'float32', 'transformers_version': '4.49.0', 'use_cache': True,
    'vocab_size': len(tokenizer.VOCAB),
}
TRAIN = dict(
    seed=20250611,
    # VAE: phase 1 on 32x32 crops of 5-frame windows (4x cheaper), phase 2 on whole 9-frame 64x64 clips
    vae_crop_steps=1500, vae_crop_batch=8, vae_full_steps=300, vae_full_batch=2,
    vae_lr=6e-4, vae_kl=1e-4, vae_warmup=100, vae_clip=5.0, vae_sample=True, vae_zero_init=True,
    vae_logvar_init=-8.0, vae_fg_weight=5.0,
    # decoder fine-tune (encoder frozen) on whole clips with a milder foreground weight
    vae_dec_steps=300, vae_dec_lr=2e-4, vae_dec_fg_weight=2.0,
    # latents
    n_train_clips=5000, n_val_clips=128, encode_batch=16,
    # DiT + UMT5
    dit_steps=5200, dit_batch=48, dit_lr=4e-4, dit_warmup=200, dit_min_lr_frac=0.1, weight_decay=0.01,
    # text_len: Wan's is 512 (the context zero-padded to 512 rows); the grammar's captions are <= 12
    # tokens and 16 rows make a DiT step ~1.5x cheaper (0.62 vs 0.93 s on one thread), which is what
    # lets the whole recipe fit the 2-hour budget (docs/training.md).
    grad_clip=1.0, ema=0.999, shift=5.0, caption_dropout=0.1, text_len=16,
    # fraction of dropped captions that use Wan's default (Chinese) negative prompt instead of ""
    wan_negative_frac=0.2,
    log_every=25, ckpt_every=250, probe_every=1300,
)
NEGATIVE_WAN = ('色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，'
                '多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走')


def lr_at(step, total, base, warmup, min_frac):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


class Run:
    def __init__(self, path):
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.log_fh = open(os.path.join(path, 'log.jsonl'), 'a')
        tp = os.path.join(path, 'timing.json')
        self.timing = json.load(open(tp)) if os.path.exists(tp) else {}

    def log(self, **kw):
        self.log_fh.write(json.dumps(kw) + '\n')
        self.log_fh.flush()

    def add_time(self, phase, seconds, threads):
        tp = os.path.join(self.path, 'timing.json')
        if os.path.exists(tp):  # re-read: another process (a concurrent phase) may have written it
            self.timing = json.load(open(tp))
        t = self.timing.setdefault(phase, {'wall_s': 0.0, 'threads': threads})
        t['wall_s'] += seconds
        t['threads'] = threads
        json.dump(self.timing, open(os.path.join(self.path, 'timing.json'), 'w'), indent=1)

    def p(self, name):
        return os.path.join(self.path, name)


def save_atomic(obj, path):
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# VAE

def vae_batch(step, full):
    """Deterministic batch for VAE step `step`: [B, 3, T, S, S]."""
    rng = np.random.default_rng([TRAIN['seed'], 1, step])
    clips = []
    B = TRAIN['vae_full_batch'] if full else TRAIN['vae_crop_batch']
    bgn = []
    for _ in range(B):
        spec = data.clip_spec(int(rng.integers(10 ** 9)), 'train')
        bgn.append(spec['background'])
        clip = data.render(spec)
        if not full:
            s = int(rng.integers(0, 5))
            clip = clip[:, s:s + 5]
            px, py = data.positions(spec)
            cx = px[s + 2] + rng.uniform(-8, 8)
            cy = py[s + 2] + rng.uniform(-8, 8)
            x0 = int(np.clip(round(cx - 16), 0, 32))
            y0 = int(np.clip(round(cy - 16), 0, 32))
            clip = clip[:, :, y0:y0 + 32, x0:x0 + 32]
        clips.append(clip)
    bgs = np.stack([np.array(data.BACKGROUNDS[s], np.float32) * 2 - 1 for s in bgn])[:, :, None, None, None]
    return torch.from_numpy(np.stack(clips)), torch.from_numpy(bgs)


def init_vae(vae):
    """Start every block as the identity so the deep causal VAE trains fast from scratch:
    * attention output projection = 0 (as Wan's AttentionBlock);
    * second conv of every residual block = 0 (zero-init residual branch) when in == out;
    * downsample3d time_conv = identity on the middle tap, upsample3d time_conv = identity on the
      current frame for both output halves (Wan's Resample.init_weight / init_weight2)."""
    from wan_torch import AttentionBlock, ResidualBlock, Resample
    for m in vae.modules():
        if isinstance(m, AttentionBlock):
            nn.init.zeros_(m.proj.weight)
            nn.init.zeros_(m.proj.bias)
        elif isinstance(m, ResidualBlock) and m.conv_shortcut is None and TRAIN['vae_zero_init']:
            nn.init.zeros_(m.conv2.weight)
            nn.init.zeros_(m.conv2.bias)
        elif isinstance(m, Resample) and hasattr(m, 'time_conv') and TRAIN['vae_zero_init']:
            w = m.time_conv.weight  # [out, in, 3, 1, 1]
            with torch.no_grad():
                w.zero_()
                c = w.shape[1]
                if m.mode == 'downsample3d':
                    w[:, :, 1, 0, 0] = torch.eye(c)
                else:
                    w[:c, :, 2, 0, 0] = torch.eye(c)
                    w[c:, :, 2, 0, 0] = torch.eye(c)
                m.time_conv.bias.zero_()
    # near-deterministic start: posterior log-variance bias -8 (std 0.018); the KL term may raise it
    with torch.no_grad():
        vae.quant_conv.bias[vae.z_dim:] = TRAIN['vae_logvar_init']


def train_vae(run, threads):
    ck = run.p('vae.pt')
    total = TRAIN['vae_crop_steps'] + TRAIN['vae_full_steps']
    vae = WanVAE(VAE_CFG)
    torch.manual_seed(TRAIN['seed'])
    init_vae(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=TRAIN['vae_lr'], betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    if os.path.exists(ck):
        st_ = torch.load(ck)
        vae.load_state_dict(st_['model'])
        opt.load_state_dict(st_['opt'])
        step = st_['step']
        if step >= total:
            print(f'[vae] done ({step} steps)')
            return
        print(f'[vae] resuming at step {step}')
    t_start = time.time()
    t_last = t_start
    acc = []
    while step < total:
        full = step >= TRAIN['vae_crop_steps']
        x, bgs = vae_batch(step, full)
        lr = lr_at(step, total, TRAIN['vae_lr'], TRAIN['vae_warmup'], 0.1)
        for g in opt.param_groups:
            g['lr'] = lr
        gen = torch.Generator().manual_seed(TRAIN['seed'] * 7 + step)
        mu, logvar = vae.encode_moments(x)
        logvar = logvar.clamp(-30, 20)
        if TRAIN['vae_sample']:
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
        else:
            z = mu
        y = vae.decode_raw(z)
        # foreground weighting: pixels that differ from the clip's background count fg_weight times
        # (objects cover ~5-20 % of a frame; without this the AE sits long in a background-only plateau)
        w = 1.0 + (TRAIN['vae_fg_weight'] - 1.0) * ((x - bgs).abs().amax(dim=1, keepdim=True) > 0.05).float()
        w = w / w.mean()
        l1 = ((y - x).abs() * w).mean()
        l2 = ((y - x).pow(2) * w).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = l1 + l2 + TRAIN['vae_kl'] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(vae.parameters(), TRAIN['vae_clip'])
        opt.step()
        step += 1
        acc.append([l1.item(), l2.item(), kl.item()])
        if step % TRAIN['log_every'] == 0 or step == total:
            m = np.mean(acc, axis=0)
            acc = []
            now = time.time()
            run.log(phase='vae', step=step, l1=float(m[0]), mse=float(m[1]), kl=float(m[2]), lr=lr, grad_norm=float(gn),
                    stage='full' if full else 'crop', sec_per_step=(now - t_last) / TRAIN['log_every'])
            print(f'[vae] step {step}/{total} ({"full" if full else "crop"}) l1 {m[0]:.4f} mse {m[1]:.5f} kl {m[2]:.2f} '
                  f'lr {lr:.2e} {(now - t_last) / TRAIN["log_every"]:.2f}s/step', flush=True)
            t_last = now
        if step % TRAIN['ckpt_every'] == 0 or step == total:
            save_atomic({'model': vae.state_dict(), 'opt': opt.state_dict(), 'step': step}, ck)
            run.add_time('vae', time.time() - t_start, threads)
            t_start = time.time()
    run.add_time('vae', time.time() - t_start, threads)


def load_vae(run, final=True):
    """The trained VAE; with final=True the decoder fine-tuned by the vae_dec phase when present."""
    vae = WanVAE(VAE_CFG)
    p = run.p('vae_dec.pt')
    if final and os.path.exists(p) and torch.load(p)['step'] >= TRAIN['vae_dec_steps']:
        vae.load_state_dict(torch.load(p)['model'])
    else:
        vae.load_state_dict(torch.load(run.p('vae.pt'))['model'])
    return vae.eval()


def train_vae_decoder(run, threads):
    """Fine-tune the decoder (+ post_quant_conv) with the encoder frozen, on whole 9-frame 64x64
    clips with a milder foreground weight. The latents of the encode phase stay valid (the encoder
    does not change), so this may run before, after or beside the dit phase. It fixes what the
    strongly foreground-weighted phase left behind: black and dark-blue backgrounds decoded alike."""
    ck = run.p('vae_dec.pt')
    total = TRAIN['vae_dec_steps']
    vae = WanVAE(VAE_CFG)
    vae.load_state_dict(torch.load(run.p('vae.pt'))['model'])
    dec_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in dec_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(dec_params, lr=TRAIN['vae_dec_lr'], betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    if os.path.exists(ck):
        s_ = torch.load(ck)
        vae.load_state_dict(s_['model'])
        opt.load_state_dict(s_['opt'])
        step = s_['step']
        if step >= total:
            print(f'[vae_dec] done ({step} steps)')
            logged = [json.loads(x)['phase'] for x in open(run.p('log.jsonl'))]
            if 'vae_dec_recon' not in logged:
                recon_check(run, vae.eval(), 'vae_dec')
            return
        print(f'[vae_dec] resuming at step {step}')
    t_start = t_last = time.time()
    acc = []
    while step < total:
        x, bgs = vae_batch(10 ** 7 + step, True)
        lr = lr_at(step, total, TRAIN['vae_dec_lr'], 20, 0.1)
        for g in opt.param_groups:
            g['lr'] = lr
        with torch.no_grad():
            mu, _ = vae.encode_moments(x)
        y = vae.decode_raw(mu)
        w = 1.0 + (TRAIN['vae_dec_fg_weight'] - 1.0) * ((x - bgs).abs().amax(dim=1, keepdim=True) > 0.05).float()
        w = w / w.mean()
        l1 = ((y - x).abs() * w).mean()
        l2 = ((y - x).pow(2) * w).mean()
        loss = l1 + l2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(dec_params, TRAIN['vae_clip'])
        opt.step()
        step += 1
        acc.append([l1.item(), l2.item(), (y.detach() - x).abs().mean().item()])
        if step % TRAIN['log_every'] == 0 or step == total:
            m = np.mean(acc, axis=0)
            acc = []
            now = time.time()
            run.log(phase='vae_dec', step=step, l1=float(m[0]), mse=float(m[1]), l1_unweighted=float(m[2]), lr=lr,
                    grad_norm=float(gn), sec_per_step=(now - t_last) / TRAIN['log_every'])
            print(f'[vae_dec] step {step}/{total} l1 {m[0]:.4f} mse {m[1]:.5f} plain l1 {m[2]:.4f} lr {lr:.2e} '
                  f'{(now - t_last) / TRAIN["log_every"]:.2f}s/step', flush=True)
            t_last = now
        if step % TRAIN['ckpt_every'] == 0 or step == total:
            save_atomic({'model': vae.state_dict(), 'opt': opt.state_dict(), 'step': step}, ck)
            run.add_time('vae_dec', time.time() - t_start, threads)
            t_start = time.time()
    run.add_time('vae_dec', time.time() - t_start, threads)
    recon_check(run, vae.eval(), 'vae_dec')


@torch.no_grad()
def recon_check(run, vae, tag, n=48):
    """VAE round trip of n validation clips: MSE, PSNR and the eval detector on the reconstructions."""
    from eval import analyze
    L = torch.load(run.p('latents.pt'))
    vae.set_latent_stats(L['latents_mean'], L['latents_std'])
    ok_c, ok_d, mses, bg_err = [], [], [], []
    for s in range(0, n, 8):
        specs = L['val']['specs'][s:s + 8]
        x = torch.from_numpy(np.stack([data.render(sp) for sp in specs]))
        y = vae.decode(vae.normalize(L['val']['latents'][s:s + 8]))
        mses += (y - x).pow(2).mean(dim=(1, 2, 3, 4)).tolist()
        for sp, v in zip(specs, y.numpy()):
            a = analyze(v, sp['color'], sp['direction'], sp['background'])
            ok_c.append(a['color_ok'])
            ok_d.append(a['dir_ok'])
            corner = (v[:, :, :6, :6].mean(axis=(1, 2, 3)) + 1) / 2
            bg_err.append(float(np.abs(corner - np.array(data.BACKGROUNDS[sp['background']])).max()))
    res = dict(n=len(mses), mse=float(np.mean(mses)), psnr_db=float(np.mean([10 * math.log10(4.0 / m) for m in mses])),
               color_acc=float(np.mean(ok_c)), direction_acc=float(np.mean(ok_d)), bg_corner_max_err=float(np.mean(bg_err)))
    print(f'[{tag}] VAE round trip on {n} val clips: ' + ', '.join(f'{k} {v:.4f}' for k, v in res.items()), flush=True)
    run.log(phase=f'{tag}_recon', **res)
    return res


# ---------------------------------------------------------------------------------------------
# Latents

def encode_split(vae, split, n, combos=None, bs=16):
    specs = [data.clip_spec(i, split, combos) for i in range(n)]
    lats = []
    with torch.no_grad():
        for s in range(0, n, bs):
            x = torch.from_numpy(np.stack([data.render(sp) for sp in specs[s:s + bs]]))
            mu, _ = vae.encode_moments(x)
            lats.append(mu)
            if (s // bs) % 25 == 0:
                print(f'[encode] {split} {s + len(x)}/{n}', flush=True)
    return torch.cat(lats), specs


def encode_latents(run, threads):
    out = run.p('latents.pt')
    if os.path.exists(out):
        print('[encode] done')
        return
    t0 = time.time()
    vae = load_vae(run)
    held = data.load_heldout()
    res = {}
    for name, split, n, combos in [('train', 'train', TRAIN['n_train_clips'], None),
                                   ('val', 'val', TRAIN['n_val_clips'], None),
                                   ('heldout', 'eval', TRAIN['n_val_clips'], held)]:
        lat, specs = encode_split(vae, split, n, combos, TRAIN['encode_batch'])
        res[name] = {'latents': lat, 'captions': [s['caption'] for s in specs], 'specs': specs}
    tr = res['train']['latents']
    mean = tr.mean(dim=(0, 2, 3, 4))
    std = tr.std(dim=(0, 2, 3, 4))
    res['latents_mean'] = [round(float(v), 4) for v in mean]
    res['latents_std'] = [round(float(v), 4) for v in std]
    # reconstruction check on validation clips: the color/direction detector on VAE round trips
    from eval import analyze
    vae.set_latent_stats(res['latents_mean'], res['latents_std'])
    ok_c, ok_d, mses = [], [], []
    with torch.no_grad():
        for s in range(0, 48, 8):
            specs = res['val']['specs'][s:s + 8]
            x = torch.from_numpy(np.stack([data.render(sp) for sp in specs]))
            y = vae.decode(vae.normalize(res['val']['latents'][s:s + 8]))
            mses += (y - x).pow(2).mean(dim=(1, 2, 3, 4)).tolist()
            for sp, v in zip(specs, y.numpy()):
                a = analyze(v, sp['color'], sp['direction'], sp['background'])
                ok_c.append(a['color_ok'])
                ok_d.append(a['dir_ok'])
    psnr = float(np.mean([10 * math.log10(4.0 / m) for m in mses]))
    res['recon'] = dict(n=len(mses), mse=float(np.mean(mses)), psnr_db=psnr, color_acc=float(np.mean(ok_c)),
                        direction_acc=float(np.mean(ok_d)))
    print(f'[encode] latents mean {res["latents_mean"]}\n[encode] latents std {res["latents_std"]}')
    print(f'[encode] VAE round trip on {len(mses)} val clips: mse {np.mean(mses):.5f} psnr {psnr:.2f} dB, '
          f'detector color {np.mean(ok_c):.3f} direction {np.mean(ok_d):.3f}')
    run.log(phase='encode', **res['recon'], latents_mean=res['latents_mean'], latents_std=res['latents_std'])
    save_atomic(res, out)
    run.add_time('encode', time.time() - t0, threads)


# ---------------------------------------------------------------------------------------------
# DiT + UMT5

def init_t5(t5):
    c = T5_CFG
    f = c['initializer_factor']
    nn.init.normal_(t5.shared.weight, std=f * 1.0)
    for blk in t5.encoder.block:
        a = blk.layer[0].SelfAttention
        nn.init.normal_(a.q.weight, std=f * (c['d_model'] * c['d_kv']) ** -0.5)
        nn.init.normal_(a.k.weight, std=f * c['d_model'] ** -0.5)
        nn.init.normal_(a.v.weight, std=f * c['d_model'] ** -0.5)
        nn.init.normal_(a.o.weight, std=f * (c['num_heads'] * c['d_kv']) ** -0.5)
        nn.init.normal_(a.relative_attention_bias.weight, std=f * c['d_model'] ** -0.5)
        ff = blk.layer[1].DenseReluDense
        nn.init.normal_(ff.wi_0.weight, std=f * c['d_model'] ** -0.5)
        nn.init.normal_(ff.wi_1.weight, std=f * c['d_model'] ** -0.5)
        nn.init.normal_(ff.wo.weight, std=f * c['d_ff'] ** -0.5)


def init_dit(dit):
    # Wan's init_weights: xavier-uniform linears, zero biases, N(0, 0.02) embedders, zero head
    for m in dit.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.xavier_uniform_(dit.patch_embedding.weight.flatten(1))
    for m in dit.condition_embedder.text_embedder.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    for m in dit.condition_embedder.time_embedder.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    nn.init.zeros_(dit.proj_out.weight)


def truncate(ids, text_len):
    """As the engine's tokenizer (and Hugging Face truncation): at most text_len ids, </s> kept last."""
    return ids if len(ids) <= text_len else ids[:text_len - 1] + [ids[-1]]


def tokenize_all(texts):
    return [truncate(tokenizer.encode(t), TRAIN['text_len']) for t in texts]


def batch_ids(enc_list):
    L = max(len(e) for e in enc_list)
    ids = torch.zeros(len(enc_list), L, dtype=torch.long)
    mask = torch.zeros(len(enc_list), L, dtype=torch.long)
    for i, e in enumerate(enc_list):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    return ids, mask


def context(t5, ids, mask):
    """Wan: encoder output trimmed to the true length and zero-padded (= masked)."""
    h = t5(ids, mask)
    return h * mask[..., None].to(h.dtype)


def shifted_sigma(u, shift):
    return shift * u / (1 + (shift - 1) * u)


def dit_loss(t5, dit, x0, enc, gen, shift, text_len):
    B = x0.shape[0]
    u = torch.rand(B, generator=gen)
    sigma = shifted_sigma(u, shift)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(B, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    ids, mask = batch_ids(enc)
    v = dit(xt, sigma * 1000.0, context(t5, ids, mask), text_len)
    return F.mse_loss(v, noise - x0)


@torch.no_grad()
def val_loss(t5, dit, lat, captions, shift, text_len, n=128):
    """Deterministic flow-matching loss on fixed (sigma, noise) pairs: sigma on a grid over u."""
    gen = torch.Generator().manual_seed(999)
    x0 = lat[:n]
    B = x0.shape[0]
    u = (torch.arange(B, dtype=torch.float32) + 0.5) / B
    sigma = shifted_sigma(u, shift)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(B, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    ids, mask = batch_ids(tokenize_all(captions[:n]))
    v = dit(xt, sigma * 1000.0, context(t5, ids, mask), text_len)
    return F.mse_loss(v, noise - x0).item()


def train_dit(run, threads):
    ck = run.p('dit.pt')
    L = torch.load(run.p('latents.pt'))
    mean = torch.tensor(L['latents_mean']).view(1, -1, 1, 1, 1)
    std = torch.tensor(L['latents_std']).view(1, -1, 1, 1, 1)
    norm = lambda z: (z - mean) * (1.0 / std)  # noqa: E731
    lat = norm(L['train']['latents'])
    lat_val, lat_held = norm(L['val']['latents']), norm(L['heldout']['latents'])
    enc = tokenize_all(L['train']['captions'])
    enc_empty, enc_wan = tokenize_all(['', NEGATIVE_WAN])
    total, text_len, shift = TRAIN['dit_steps'], TRAIN['text_len'], TRAIN['shift']

    torch.manual_seed(TRAIN['seed'] + 2)
    t5, dit = UMT5Encoder(T5_CFG), WanDiT(DIT_CFG)
    init_t5(t5)
    init_dit(dit)
    params = list(t5.parameters()) + list(dit.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': TRAIN['weight_decay']},
                             {'params': no_decay, 'weight_decay': 0.0}], lr=TRAIN['dit_lr'], betas=(0.9, 0.99))
    ema_t5, ema_dit = copy.deepcopy(t5).eval(), copy.deepcopy(dit).eval()
    step = 0
    if os.path.exists(ck):
        s_ = torch.load(ck)
        t5.load_state_dict(s_['t5'])
        dit.load_state_dict(s_['dit'])
        ema_t5.load_state_dict(s_['ema_t5'])
        ema_dit.load_state_dict(s_['ema_dit'])
        opt.load_state_dict(s_['opt'])
        step = s_['step']
        if step >= total:
            print(f'[dit] done ({step} steps)')
            return
        print(f'[dit] resuming at step {step}')
    ema_params = list(ema_t5.parameters()) + list(ema_dit.parameters())
    n_dit = sum(p.numel() for p in dit.parameters())
    n_t5 = sum(p.numel() for p in t5.parameters())
    print(f'[dit] DiT {n_dit / 1e6:.3f}M params, UMT5 {n_t5 / 1e6:.3f}M params, {lat.shape[0]} training latents')
    t_start = time.time()
    t_last = t_start
    acc = []
    N = lat.shape[0]
    while step < total:
        rng = np.random.default_rng([TRAIN['seed'], 3, step])
        idx = rng.integers(0, N, TRAIN['dit_batch'])
        drop = rng.random(TRAIN['dit_batch']) < TRAIN['caption_dropout']
        wan = rng.random(TRAIN['dit_batch']) < TRAIN['wan_negative_frac']
        e = [(enc_wan if w else enc_empty) if d else enc[i] for i, d, w in zip(idx, drop, wan)]
        gen = torch.Generator().manual_seed(TRAIN['seed'] * 13 + step)
        lr = lr_at(step, total, TRAIN['dit_lr'], TRAIN['dit_warmup'], TRAIN['dit_min_lr_frac'])
        for g in opt.param_groups:
            g['lr'] = lr
        loss = dit_loss(t5, dit, lat[torch.from_numpy(idx)], e, gen, shift, text_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, TRAIN['grad_clip'])
        opt.step()
        with torch.no_grad():
            d = min(TRAIN['ema'], (1 + step) / (10 + step))
            for pe, p in zip(ema_params, params):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
        step += 1
        acc.append(loss.item())
        if step % TRAIN['log_every'] == 0 or step == total:
            now = time.time()
            rec = dict(phase='dit', step=step, loss=float(np.mean(acc)), lr=lr, grad_norm=float(gn),
                       sec_per_step=(now - t_last) / TRAIN['log_every'])
            acc = []
            if step % TRAIN['ckpt_every'] == 0 or step == total:
                rec['val_loss'] = val_loss(ema_t5, ema_dit, lat_val, L['val']['captions'], shift, text_len)
                rec['heldout_loss'] = val_loss(ema_t5, ema_dit, lat_held, L['heldout']['captions'], shift, text_len)
            run.log(**rec)
            print(f'[dit] step {step}/{total} loss {rec["loss"]:.4f} lr {lr:.2e} gn {float(gn):.2f} '
                  f'{rec["sec_per_step"]:.2f}s/step' + (f' val {rec["val_loss"]:.4f} heldout {rec["heldout_loss"]:.4f}' if 'val_loss' in rec else ''),
                  flush=True)
            t_last = time.time()
        if step % TRAIN['ckpt_every'] == 0 or step == total:
            save_atomic({'t5': t5.state_dict(), 'dit': dit.state_dict(), 'ema_t5': ema_t5.state_dict(),
                         'ema_dit': ema_dit.state_dict(), 'opt': opt.state_dict(), 'step': step}, ck)
            run.add_time('dit', time.time() - t_start, threads)
            t_start = time.time()
        if step % TRAIN['probe_every'] == 0 or step == total:
            probe(run, ema_t5, ema_dit, L, step)
            t_last = time.time()
    run.add_time('dit', time.time() - t_start, threads)


@torch.no_grad()
def probe(run, t5, dit, L, step):
    """Small generation check during training (not counted in the final eval)."""
    from eval import run_eval
    t0 = time.time()
    vae = load_vae(run)
    vae.set_latent_stats(L['latents_mean'], L['latents_std'])
    summary, _, _ = run_eval((t5, dit, vae), steps=10, guidance=5.0, shift=TRAIN['shift'], text_len=TRAIN['text_len'],
                             seeds_per_prompt=1, n_seen=20, verbose=False)
    s, h = summary['seen'], summary['heldout']
    print(f'[probe] step {step}: seen color {s["color_acc"]:.2f} dir {s["direction_acc"]:.2f} | heldout color '
          f'{h["color_acc"]:.2f} dir {h["direction_acc"]:.2f} ({time.time() - t0:.0f}s)', flush=True)
    run.log(phase='probe', step=step, seen=s, heldout=h, seconds=time.time() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--run', default=os.path.join(HERE, 'runs', 'demo'))
    ap.add_argument('--threads', type=int, default=2, help='torch threads (OpenBLAS stays at 1); 2 measured best on the 2-core machine')
    ap.add_argument('--override', default='{}', help='JSON dict merged into TRAIN (for short experiments)')
    ap.add_argument('--dit-override', default='{}', help='JSON dict merged into DIT_CFG (e.g. a wider DiT)')
    ap.add_argument('phases', nargs='*', default=['vae', 'encode', 'vae_dec', 'dit'])
    a = ap.parse_args()
    TRAIN.update(json.loads(a.override))
    DIT_CFG.update(json.loads(a.dit_override))
    torch.set_num_threads(a.threads)
    run = Run(a.run)
    json.dump({'TRAIN': TRAIN, 'VAE_CFG': VAE_CFG, 'DIT_CFG': DIT_CFG, 'T5_CFG': T5_CFG, 'threads': a.threads,
               'torch': torch.__version__, 'LD_LIBRARY_PATH': os.environ.get('LD_LIBRARY_PATH', '')},
              open(run.p('config.json'), 'w'), indent=1)
    for ph in a.phases:
        {'vae': train_vae, 'encode': encode_latents, 'vae_dec': train_vae_decoder, 'dit': train_dit}[ph](run, a.threads)


if __name__ == '__main__':
    main()
