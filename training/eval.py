"""Python-side evaluation of the demo model: does the generated video follow the prompt?

For a fixed set of prompts (seen color x shape x direction combos and the held-out ones of
heldout.json, on every background) and fixed seeds, generate through the PyTorch port exactly as the
engine does (UMT5 on the tokenized prompt, trimmed + zero-padded to text_len; Wan's UniPC sampler
with CFG against the negative prompt ""; VAE decode, clamp), then find the object by its color:

* object pixels: farther than BG_DIST from the prompt's background color (RGB in [0, 1]);
* (a) color: each object pixel votes for the nearest of the 5 palette colors; the prompt's color
  must win the vote (and the object must be visible: >= MIN_PIXELS object pixels per frame on average);
* (b) direction: the centroid of the pixels near the prompt's color (within COLOR_DIST) is tracked
  over the frames where it is visible; its displacement from the first to the last such frame must
  point along the prompt's direction (dominant axis and sign) and be >= MIN_TRAVEL px.

Usage:
  /usr/bin/python3 training/eval.py --model weights/demo [--seeds 2] [--steps 20] [--guidance 5]
                                   [--shift 5] [--json out.json] [--sheet docs/images/samples.png]
Reads the recommended defaults from <model>/smart_diffusion.json when present.
"""
import os
import sys

if __name__ == '__main__':
    from openblas import reexec_with_openblas  # before torch: Debian's reference BLAS is ~10x slower
    reexec_with_openblas()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402
import tokenizer  # noqa: E402

BG_DIST = 0.30
COLOR_DIST = 0.40
MIN_PIXELS = 12
MIN_TRAVEL = 8.0
PALETTE = np.array([data.COLORS[c] for c in data.COLORS], np.float32)
COLOR_NAMES = list(data.COLORS)


def analyze(video, color, direction, background):
    """video [3, T, H, W] in [-1, 1] -> dict(color_ok, dir_ok, dominant, displacement, ...)."""
    v = (np.asarray(video, np.float32) + 1) / 2  # [3, T, H, W] in [0, 1]
    rgb = v.transpose(1, 2, 3, 0)  # [T, H, W, 3]
    bg = np.array(data.BACKGROUNDS[background], np.float32)
    obj = np.linalg.norm(rgb - bg, axis=-1) > BG_DIST  # [T, H, W]
    d = np.linalg.norm(rgb[..., None, :] - PALETTE, axis=-1)  # [T, H, W, 5]
    nearest = d.argmin(-1)
    votes = np.bincount(nearest[obj], minlength=len(COLOR_NAMES))
    T = rgb.shape[0]
    visible = obj.sum() / T >= MIN_PIXELS
    dominant = COLOR_NAMES[int(votes.argmax())] if obj.any() else None
    color_ok = bool(visible and dominant == color)
    ci = COLOR_NAMES.index(color)
    tgt = obj & (d[..., ci] < COLOR_DIST)
    cents = []
    for t in range(T):
        ys, xs = np.nonzero(tgt[t])
        if len(xs) >= max(3, MIN_PIXELS // 3):
            cents.append((t, xs.mean(), ys.mean()))
    dir_ok, disp = False, (0.0, 0.0)
    if len(cents) >= 2:
        disp = (cents[-1][1] - cents[0][1], cents[-1][2] - cents[0][2])
        dx, dy = data.DIRECTIONS[direction]
        along = disp[0] * dx + disp[1] * dy
        across = abs(disp[0] * dy) + abs(disp[1] * dx)
        dir_ok = bool(along >= MIN_TRAVEL and along > across)
    return dict(color_ok=color_ok, dir_ok=dir_ok, dominant=dominant, visible=bool(visible),
                displacement=[round(float(disp[0]), 1), round(float(disp[1]), 1)], tracked_frames=len(cents),
                object_px_per_frame=round(float(obj.sum() / T), 1))


def eval_prompts(n_seen=30):
    """(seen, heldout) lists of (color, shape, direction, background); deterministic."""
    held = data.load_heldout()
    heldout = [(c, s, d, b) for (c, s, d) in held for b in data.BACKGROUNDS]
    train = data.train_combos(held)
    rng = np.random.default_rng(12345)
    seen = []
    # every color x direction at least once, on rotating backgrounds and shapes
    pairs = [(c, d) for c in data.COLORS for d in data.DIRECTIONS]
    rng.shuffle(pairs)
    for k, (c, d) in enumerate(pairs):
        opts = [x for x in train if x[0] == c and x[2] == d]
        combo = opts[rng.integers(len(opts))]
        seen.append((*combo, list(data.BACKGROUNDS)[k % 3]))
    while len(seen) < n_seen:
        combo = train[rng.integers(len(train))]
        seen.append((*combo, list(data.BACKGROUNDS)[rng.integers(3)]))
    return seen[:n_seen], heldout


def encode_prompts(t5, texts):
    """UMT5 context per prompt, trimmed to its length and zero-padded to the batch max: [N, L, d]."""
    enc = [tokenizer.encode(t) for t in texts]
    L = max(len(e) for e in enc)
    ids = torch.zeros(len(texts), L, dtype=torch.long)
    mask = torch.zeros(len(texts), L, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    h = t5(ids, mask)
    return h * mask[..., None].to(h.dtype)


@torch.no_grad()
def generate(models, texts, seeds, steps, guidance, shift, text_len, negative='', batch=64):
    """Videos [N, 3, 9, 64, 64] for texts[i] with noise from seeds[i] (torch.Generator, like Wan)."""
    from wan_torch import sample_cfg
    t5, dit, vae = models
    out = []
    for s in range(0, len(texts), batch):
        tx, sd = texts[s:s + batch], seeds[s:s + batch]
        ctx_c = encode_prompts(t5, tx)
        ctx_u = encode_prompts(t5, [negative] * len(tx))
        noise = torch.stack([torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(int(q))) for q in sd])
        lat = sample_cfg(dit, ctx_c, ctx_u, noise, steps, shift, guidance, text_len)
        for j in range(0, lat.shape[0], 8):
            out.append(vae.decode(lat[j:j + 8]))
    return torch.cat(out)


def run_eval(models, steps, guidance, shift, text_len, seeds_per_prompt=2, n_seen=30, negative='', verbose=True):
    seen, held = eval_prompts(n_seen)
    rows = []
    for split, plist in [('seen', seen), ('heldout', held)]:
        for k in range(seeds_per_prompt):
            for p in plist:
                rows.append(dict(split=split, color=p[0], shape=p[1], direction=p[2], background=p[3],
                                 prompt=data.caption(*p), seed=1000 + k))
    t0 = time.time()
    vids = generate(models, [r['prompt'] for r in rows], [r['seed'] for r in rows], steps, guidance, shift, text_len, negative)
    for r, v in zip(rows, vids):
        r.update(analyze(v.numpy(), r['color'], r['direction'], r['background']))
    summary = {}
    for split in ['seen', 'heldout']:
        rs = [r for r in rows if r['split'] == split]
        summary[split] = dict(n=len(rs), color_acc=float(np.mean([r['color_ok'] for r in rs])),
                              direction_acc=float(np.mean([r['dir_ok'] for r in rs])),
                              both_acc=float(np.mean([r['color_ok'] and r['dir_ok'] for r in rs])))
    summary['settings'] = dict(steps=steps, guidance=guidance, shift=shift, text_len=text_len, negative_prompt=negative,
                               seeds_per_prompt=seeds_per_prompt, seconds=round(time.time() - t0, 1))
    if verbose:
        for split in ['seen', 'heldout']:
            s = summary[split]
            print(f'{split:8s} n={s["n"]:3d}  color {100 * s["color_acc"]:5.1f}%  direction {100 * s["direction_acc"]:5.1f}%  both {100 * s["both_acc"]:5.1f}%')
    return summary, rows, vids


def load_model_dir(d):
    import st
    from wan_torch import UMT5Encoder, WanDiT, WanVAE
    cfg = lambda p: json.load(open(os.path.join(d, p)))  # noqa: E731
    t5, dit, vae = UMT5Encoder(cfg('text_encoder/config.json')), WanDiT(cfg('transformer/config.json')), WanVAE(cfg('vae/config.json'))
    t5.load_state_dict(st.load(os.path.join(d, 'text_encoder/model.safetensors')))
    dit.load_state_dict(st.load(os.path.join(d, 'transformer/diffusion_pytorch_model.safetensors')))
    vae.load_state_dict(st.load(os.path.join(d, 'vae/diffusion_pytorch_model.safetensors')))
    return t5.eval(), dit.eval(), vae.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--model', default=os.path.join(os.path.dirname(HERE), 'weights/demo'))
    ap.add_argument('--seeds', type=int, default=2)
    ap.add_argument('--steps', type=int)
    ap.add_argument('--guidance', type=float)
    ap.add_argument('--shift', type=float)
    ap.add_argument('--text-len', type=int)
    ap.add_argument('--negative', default=None)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--json', help='write the summary and per-prompt rows here')
    ap.add_argument('--sheet', help='write a contact sheet PNG (and a GIF beside it) of a few samples')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rec = {}
    p = os.path.join(a.model, 'smart_diffusion.json')
    if os.path.exists(p):
        rec = json.load(open(p))
    steps = a.steps or rec.get('num_inference_steps', 20)
    guidance = a.guidance if a.guidance is not None else rec.get('guidance_scale', 5.0)
    shift = a.shift if a.shift is not None else rec.get('shift', 5.0)
    text_len = a.text_len or rec.get('text_len', 512)
    negative = a.negative if a.negative is not None else rec.get('negative_prompt', '')
    models = load_model_dir(a.model)
    summary, rows, vids = run_eval(models, steps, guidance, shift, text_len, a.seeds, negative=negative)
    print(json.dumps(summary['settings']))
    if a.json:
        json.dump(dict(summary=summary, rows=rows), open(a.json, 'w'), indent=1)
    if a.sheet:
        import viz
        pick = []
        for split in ['seen', 'heldout']:
            idx = [i for i, r in enumerate(rows) if r['split'] == split and r['seed'] == 1000]
            pick += idx[:: max(1, len(idx) // 5)][:5]
        labels = [f'{"HELD-OUT: " if rows[i]["split"] == "heldout" else ""}{rows[i]["prompt"]}'
                  f' [{"ok" if rows[i]["color_ok"] else "color?"}/{"ok" if rows[i]["dir_ok"] else "dir?"}]' for i in pick]
        viz.contact_sheet([vids[i].numpy() for i in pick], labels, a.sheet)
        viz.grid_gif([vids[i].numpy() for i in pick], os.path.splitext(a.sheet)[0] + '.gif', cols=5)
        print('wrote', a.sheet)


if __name__ == '__main__':
    main()
