"""Contact sheets (PNG / GIF) and an SVG loss plot, with PIL only."""
import numpy as np
from PIL import Image, ImageDraw


def to_uint8(clip):
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    c = np.asarray(clip, dtype=np.float32)
    return (np.clip((c + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8).transpose(1, 2, 3, 0)


def _wrap(text, width):
    words, lines, cur = text.split(), [], ''
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = (cur + ' ' + w).strip()
    lines.append(cur)
    return lines


def contact_sheet(clips, labels, path, scale=2, label_w=190):
    """One row per clip: label, then its frames side by side."""
    T, H, W = clips[0].shape[1:]
    h, w = H * scale, W * scale
    pad = 4
    img = Image.new('RGB', (label_w + T * (w + pad) + pad, len(clips) * (h + pad) + pad), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for r, (clip, lab) in enumerate(zip(clips, labels)):
        y = pad + r * (h + pad)
        for j, line in enumerate(_wrap(lab, 30)[:h // 12]):
            d.text((4, y + 2 + 12 * j), line, fill=(0, 0, 0))
        fr = to_uint8(clip)
        for t in range(T):
            im = Image.fromarray(fr[t]).resize((w, h), Image.NEAREST)
            img.paste(im, (label_w + pad + t * (w + pad), y))
    img.save(path)


def grid_gif(clips, path, scale=2, cols=4, ms=120):
    T, H, W = clips[0].shape[1:]
    rows = (len(clips) + cols - 1) // cols
    frames = []
    for t in range(T):
        img = Image.new('RGB', (cols * (W * scale + 2), rows * (H * scale + 2)), (255, 255, 255))
        for k, clip in enumerate(clips):
            fr = to_uint8(clip)[t]
            img.paste(Image.fromarray(fr).resize((W * scale, H * scale), Image.NEAREST),
                      ((k % cols) * (W * scale + 2), (k // cols) * (H * scale + 2)))
        frames.append(img)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms, loop=0)


def _svg_panel(series, title, xlabel, ylabel, logy, ox, width, height):
    """SVG elements of one line-plot panel at x offset ox. series: (name, xs, ys, color[, dash])."""
    L, R, T, B = 70, 20, 40, 50
    xs_all = np.concatenate([np.asarray(s[1], float) for s in series])
    ys_all = np.concatenate([np.asarray(s[2], float) for s in series])
    ys_all = ys_all[np.isfinite(ys_all) & ((ys_all > 0) if logy else True)]
    x0, x1 = float(xs_all.min()), float(xs_all.max())
    fy = np.log10 if logy else (lambda v: v)
    y0, y1 = float(fy(ys_all.min())), float(fy(ys_all.max()))
    if logy:
        y0, y1 = np.floor(y0 * 4) / 4, np.ceil(y1 * 4) / 4
    if y1 == y0:
        y1 = y0 + 1
    X = lambda v: ox + L + (v - x0) / max(x1 - x0, 1e-9) * (width - L - R)  # noqa: E731
    Y = lambda v: T + (1 - (fy(v) - y0) / (y1 - y0)) * (height - T - B)  # noqa: E731
    out = [f'<text x="{ox + (L + width - R) / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
           f'<rect x="{ox + L}" y="{T}" width="{width - L - R}" height="{height - T - B}" fill="none" stroke="#444"/>']
    if logy:
        ticks = [10 ** k * m for k in range(int(np.floor(y0)) - 1, int(np.ceil(y1)) + 1) for m in (1, 2, 5)
                 if y0 - 1e-9 <= np.log10(10 ** k * m) <= y1 + 1e-9]
    else:
        ticks = list(np.linspace(10 ** y0 if False else y0, y1, 6))
    for tv in ticks:
        yy = Y(tv)
        out.append(f'<line x1="{ox + L}" x2="{ox + width - R}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{ox + L - 6}" y="{yy + 4:.1f}" text-anchor="end">{tv:g}</text>')
    for tv in np.linspace(x0, x1, 6):
        xx = X(tv)
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{T}" y2="{height - B}" stroke="#eee"/>')
        out.append(f'<text x="{xx:.1f}" y="{height - B + 16}" text-anchor="middle">{tv:.0f}</text>')
    out.append(f'<text x="{ox + (L + width - R) / 2}" y="{height - 12}" text-anchor="middle">{xlabel}</text>')
    cy = (T + height - B) / 2
    out.append(f'<text x="{ox + 16}" y="{cy}" text-anchor="middle" transform="rotate(-90 {ox + 16} {cy})">{ylabel}</text>')
    for k, s in enumerate(series):
        name, xs, ys, color = s[:4]
        dash = f' stroke-dasharray="{s[4]}"' if len(s) > 4 and s[4] else ''
        pts = [(X(a), Y(b)) for a, b in zip(xs, ys) if np.isfinite(b) and (b > 0 or not logy)]
        d = ' '.join(f'{a:.1f},{b:.1f}' for a, b in pts)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} points="{d}"/>')
        out.append(f'<line x1="{ox + width - R - 200}" x2="{ox + width - R - 186}" y1="{T + 12 + 17 * k}" y2="{T + 12 + 17 * k}" stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{ox + width - R - 180}" y="{T + 16 + 17 * k}">{name}</text>')
    return out


def svg_plot(panels, path, width=560, height=400):
    """panels: list of dict(series=[...], title=, xlabel=, ylabel=, logy=). Side by side in one SVG."""
    W = width * len(panels)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{height}" fill="white"/>']
    for i, p in enumerate(panels):
        out += _svg_panel(p['series'], p['title'], p.get('xlabel', 'step'), p.get('ylabel', 'loss'), p.get('logy', True),
                          i * width, width, height)
    out.append('</svg>')
    with open(path, 'w') as fh:
        fh.write('\n'.join(out) + '\n')
