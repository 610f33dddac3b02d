"""Loss curves of a run (log.jsonl) -> docs/images/training-loss.svg (VAE panel + DiT panel).

    /usr/bin/python3 training/plot.py --run training/runs/demo --out docs/images/training-loss.svg
"""
import argparse
import json
import os

import viz

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--run', default=os.path.join(HERE, 'runs/demo'))
    ap.add_argument('--out', default=os.path.join(os.path.dirname(HERE), 'docs/images/training-loss.svg'))
    a = ap.parse_args()
    rows = [json.loads(line) for line in open(os.path.join(a.run, 'log.jsonl'))]
    vae = [r for r in rows if r['phase'] == 'vae']
    dit = [r for r in rows if r['phase'] == 'dit']
    # keep the last record per step (a resumed run may repeat steps)
    vae = list({r['step']: r for r in vae}.values())
    dit = list({r['step']: r for r in dit}.values())
    panels = []
    if vae:
        panels.append(dict(title='VAE (encoder + decoder)', ylabel='reconstruction loss (per pixel, [-1, 1] scale)', series=[
            ('L1', [r['step'] for r in vae], [r['l1'] for r in vae], '#1f77b4'),
            ('MSE', [r['step'] for r in vae], [r['mse'] for r in vae], '#ff7f0e'),
        ]))
    if dit:
        v = [r for r in dit if 'val_loss' in r]
        panels.append(dict(title='DiT + UMT5 (flow matching, shift 5)', ylabel='velocity MSE', series=[
            ('train (batch mean)', [r['step'] for r in dit], [r['loss'] for r in dit], '#1f77b4'),
            ('val, seen combos (EMA)', [r['step'] for r in v], [r['val_loss'] for r in v], '#2ca02c'),
            ('val, held-out combos (EMA)', [r['step'] for r in v], [r['heldout_loss'] for r in v], '#d62728', '5,3'),
        ]))
    viz.svg_plot(panels, a.out)
    print('wrote', a.out)


if __name__ == '__main__':
    main()
