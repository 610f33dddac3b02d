"""Export a training run to weights/demo/ in the diffusers layout (like test/fixtures/golden/tiny).

    /usr/bin/python3 training/export.py --run training/runs/demo --out weights/demo \
        [--steps 20 --guidance 3.5 --shift 5 --fps 8] [--dtype F32|BF16]

Writes model_index.json, transformer/, vae/ (encoder + decoder, latents_mean/std), text_encoder/,
scheduler/, tokenizer/ and smart_diffusion.json (the recommended generation defaults the engine
honours). The DiT and UMT5 weights are the EMA weights. Weights are plain safetensors (st.py).
"""
import argparse
import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import st  # noqa: E402
import tokenizer  # noqa: E402
from train import DIT_CFG, T5_CFG, TRAIN, VAE_CFG  # noqa: E402

ROOT = os.path.dirname(HERE)

SCHEDULER_CFG = {
    '_class_name': 'UniPCMultistepScheduler', '_diffusers_version': '0.33.0.dev0',
    'beta_end': 0.02, 'beta_schedule': 'linear', 'beta_start': 0.0001, 'disable_corrector': [],
    'dynamic_thresholding_ratio': 0.995, 'final_sigmas_type': 'zero', 'flow_shift': 5.0, 'lower_order_final': True,
    'num_train_timesteps': 1000, 'predict_x0': True, 'prediction_type': 'flow_prediction',
    'rescale_betas_zero_snr': False, 'sample_max_value': 1.0, 'solver_order': 2, 'solver_p': None,
    'solver_type': 'bh2', 'steps_offset': 0, 'thresholding': False, 'timestep_spacing': 'linspace',
    'trained_betas': None, 'use_beta_sigmas': False, 'use_exponential_sigmas': False, 'use_flow_sigmas': True,
    'use_karras_sigmas': False,
}


def dump(obj, path):
    with open(path, 'w', encoding='utf-8') as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write('\n')


def export(run, out, steps, guidance, shift, fps, dtype='F32'):
    # the settings the run was trained with (train.py writes them; --override may have changed them)
    cfg_path = os.path.join(run, 'config.json')
    run_cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    TRAIN_ = dict(TRAIN, **run_cfg.get('TRAIN', {}))
    DIT_CFG_, T5_CFG_, VAE_CFG_ = run_cfg.get('DIT_CFG', DIT_CFG), run_cfg.get('T5_CFG', T5_CFG), run_cfg.get('VAE_CFG', VAE_CFG)
    lat = torch.load(os.path.join(run, 'latents.pt'))
    # the decoder fine-tuned by the vae_dec phase when present (its encoder is the vae phase's)
    vp = os.path.join(run, 'vae_dec.pt')
    vae_sd = torch.load(vp if os.path.exists(vp) else os.path.join(run, 'vae.pt'))['model']
    ck = torch.load(os.path.join(run, 'dit.pt'))
    if os.path.isdir(out):
        for name in ['transformer', 'vae', 'text_encoder', 'scheduler', 'tokenizer']:
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in ['transformer', 'vae', 'text_encoder', 'scheduler', 'tokenizer']:
        os.makedirs(os.path.join(out, name), exist_ok=True)
    dump({'_class_name': 'WanPipeline', '_diffusers_version': '0.33.0.dev0',
          'scheduler': ['diffusers', 'UniPCMultistepScheduler'],
          'text_encoder': ['transformers', 'UMT5EncoderModel'],
          'tokenizer': ['transformers', 'T5TokenizerFast'],
          'transformer': ['diffusers', 'WanTransformer3DModel'],
          'vae': ['diffusers', 'AutoencoderKLWan']}, os.path.join(out, 'model_index.json'))
    meta = {'format': 'pt', 'source': 'smart-diffusion training/ (synthetic shapes demo model)'}
    dump(DIT_CFG_, os.path.join(out, 'transformer/config.json'))
    st.save(ck['ema_dit'], os.path.join(out, 'transformer/diffusion_pytorch_model.safetensors'), dtype, meta)
    vcfg = dict(VAE_CFG_, latents_mean=lat['latents_mean'], latents_std=lat['latents_std'])
    dump(vcfg, os.path.join(out, 'vae/config.json'))
    st.save(vae_sd, os.path.join(out, 'vae/diffusion_pytorch_model.safetensors'), dtype, meta)
    dump(T5_CFG_, os.path.join(out, 'text_encoder/config.json'))
    st.save(ck['ema_t5'], os.path.join(out, 'text_encoder/model.safetensors'), dtype, meta)
    dump(dict(SCHEDULER_CFG, flow_shift=float(shift)), os.path.join(out, 'scheduler/scheduler_config.json'))
    tokenizer.write(os.path.join(out, 'tokenizer'), TRAIN_['text_len'])
    dump({'text_len': TRAIN_['text_len'], 'height': 64, 'width': 64, 'num_frames': 9,
          'num_inference_steps': steps, 'guidance_scale': guidance, 'shift': shift, 'fps': fps,
          'negative_prompt': ''}, os.path.join(out, 'smart_diffusion.json'))
    total = 0
    for dp, _, fs in os.walk(out):
        for f in fs:
            total += os.path.getsize(os.path.join(dp, f))
    print(f'exported {run} -> {out} ({total / 1e6:.2f} MB, dtype {dtype}, dit step {ck["step"]})')
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--run', default=os.path.join(HERE, 'runs/demo'))
    ap.add_argument('--out', default=os.path.join(ROOT, 'weights/demo'))
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--guidance', type=float, default=3.5)  # best of 3 / 3.5 / 4 / 5 for the shipped model (docs/training.md)
    ap.add_argument('--shift', type=float, default=5.0)
    ap.add_argument('--fps', type=int, default=8)
    ap.add_argument('--dtype', default='F32', choices=['F32', 'BF16'])
    a = ap.parse_args()
    export(a.run, a.out, a.steps, a.guidance, a.shift, a.fps, a.dtype)


if __name__ == '__main__':
    main()
