"""Deterministic synthetic clips for the demo model.

A clip is 9 frames (4k+1) of 64x64 RGB in [-1, 1], layout [3, T, H, W] (channel-first, like the
engine's videos): one solid, anti-aliased shape moving in a straight line over a solid background,
captioned by the grammar

    a {color} {shape} moving {direction} on a {background} background

colors: red green blue yellow white; shapes: circle square triangle; directions: left right up down;
backgrounds: black, gray, dark blue. Per clip the object's size (radius 6-11 px), speed (total travel
24-40 px over the 9 frames, i.e. 3-5 px/frame) and start position vary; the object's centre stays
in frame (at most ~40 % of the radius may leave the frame at the ends of the path).

Held-out combinations: training/heldout.json lists color x shape x direction combos that never
appear in training (on any background); every color, shape and direction still appears in training.
Clip i of a split is a pure function of (split seed, i): `clip_spec(i, split)` / `render(spec)`.
"""
import itertools
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

FRAMES, SIZE = 9, 64

# colors in [0, 1] RGB; chosen so that each is far from every other color and from every background
COLORS = {
    'red': (0.95, 0.10, 0.10),
    'green': (0.10, 0.85, 0.15),
    'blue': (0.20, 0.45, 1.00),
    'yellow': (1.00, 0.90, 0.10),
    'white': (1.00, 1.00, 1.00),
}
SHAPES = ['circle', 'square', 'triangle']
DIRECTIONS = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}  # (dx, dy), y grows downward
BACKGROUNDS = {
    'black': (0.0, 0.0, 0.0),
    'gray': (0.5, 0.5, 0.5),
    'dark blue': (0.02, 0.04, 0.35),
}

RADIUS = (6.0, 11.0)
TRAVEL = (24.0, 40.0)
SUPERSAMPLE = 4

SEEDS = {'train': 1_000_003, 'val': 2_000_003, 'eval': 3_000_003}


def caption(color, shape, direction, background):
    return f'a {color} {shape} moving {direction} on a {background} background'


def load_heldout(path=os.path.join(HERE, 'heldout.json')):
    with open(path) as fh:
        h = json.load(fh)
    return [tuple(c) for c in h['combos']]


def all_combos():
    return list(itertools.product(COLORS, SHAPES, DIRECTIONS))


def train_combos(heldout=None):
    held = set(load_heldout() if heldout is None else heldout)
    return [c for c in all_combos() if c not in held]


def clip_spec(i, split='train', combos=None):
    """The i-th clip of a split: a dict with the caption fields and the geometry (deterministic)."""
    rng = np.random.default_rng([SEEDS[split], i])
    if combos is None:
        combos = train_combos() if split in ('train', 'val') else all_combos()
    color, shape, direction = combos[rng.integers(len(combos))]
    bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return spec_for(rng, color, shape, direction, bg)


def spec_for(rng, color, shape, direction, bg):
    r = float(rng.uniform(*RADIUS))
    travel = float(rng.uniform(*TRAVEL))
    dx, dy = DIRECTIONS[direction]
    m = 0.6 * r  # centre margin along the motion axis
    a0 = float(rng.uniform(m, SIZE - m - travel))  # start along the axis, moving towards +
    p = float(rng.uniform(r + 1, SIZE - r - 1))  # perpendicular coordinate
    if dx != 0:
        x0 = a0 if dx > 0 else SIZE - a0
        y0 = p
    else:
        y0 = a0 if dy > 0 else SIZE - a0
        x0 = p
    rot = float(rng.uniform(-0.25, 0.25))  # slight rotation of squares / triangles (radians)
    return dict(color=color, shape=shape, direction=direction, background=bg, radius=r, travel=travel,
                x0=x0, y0=y0, rot=rot, caption=caption(color, shape, direction, bg))


def _coverage(shape, cx, cy, r, rot, xs, ys):
    """Boolean inside-mask on the supersampled grid (xs, ys pixel-centre coordinates)."""
    X, Y = xs - cx, ys - cy
    c, s = np.cos(rot), np.sin(rot)
    u, v = c * X + s * Y, -s * X + c * Y
    if shape == 'circle':
        return u * u + v * v <= r * r
    if shape == 'square':
        h = 0.88 * r  # similar area to the circle
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == 'triangle':
        R = 1.25 * r  # circumradius; apex up
        # equilateral triangle with vertices at angles -90, 30, 150 degrees (y downward)
        inside = np.ones_like(u, dtype=bool)
        verts = [(R * np.cos(a), R * np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
        for k in range(3):
            (x1, y1), (x2, y2) = verts[k], verts[(k + 1) % 3]
            inside &= (x2 - x1) * (v - y1) - (y2 - y1) * (u - x1) >= 0
        return inside
    raise ValueError(shape)


_GRID = None


def _grid():
    global _GRID
    if _GRID is None:
        ss = SUPERSAMPLE
        off = (np.arange(ss) + 0.5) / ss
        coords = (np.arange(SIZE)[:, None] + off[None, :]).reshape(-1)  # pixel i covers [i, i+1)
        _GRID = np.meshgrid(coords, coords, indexing='xy')
    return _GRID


def positions(spec):
    dx, dy = DIRECTIONS[spec['direction']]
    t = np.arange(FRAMES) / (FRAMES - 1)
    return spec['x0'] + dx * spec['travel'] * t, spec['y0'] + dy * spec['travel'] * t


def render(spec):
    """float32 [3, FRAMES, SIZE, SIZE] in [-1, 1]."""
    xs, ys = _grid()
    ss = SUPERSAMPLE
    col = np.array(COLORS[spec['color']], np.float32)
    bg = np.array(BACKGROUNDS[spec['background']], np.float32)
    px, py = positions(spec)
    out = np.empty((3, FRAMES, SIZE, SIZE), np.float32)
    for f in range(FRAMES):
        m = _coverage(spec['shape'], px[f], py[f], spec['radius'], spec['rot'], xs, ys)
        a = m.reshape(SIZE, ss, SIZE, ss).mean(axis=(1, 3)).astype(np.float32)
        img = bg[:, None, None] * (1 - a) + col[:, None, None] * a
        out[:, f] = img * 2 - 1
    return out


def batch(indices, split='train'):
    specs = [clip_spec(i, split) for i in indices]
    return np.stack([render(s) for s in specs]), specs


if __name__ == '__main__':
    held = load_heldout()
    tc = train_combos()
    print(f'{len(all_combos())} color x shape x direction combos, {len(held)} held out, {len(tc)} for training')
    for k in ['color', 'shape', 'direction']:
        j = ['color', 'shape', 'direction'].index(k)
        vals = sorted({c[j] for c in tc})
        print(f'  training {k}s: {vals}')
    for i in range(3):
        s = clip_spec(i)
        print(s['caption'], {k: round(v, 2) for k, v in s.items() if isinstance(v, float)})
