// Does a generated video follow its prompt? The measuring stick of the embedded demo model
// (weights/demo, trained by training/): prompts of the grammar
// `a {color} {shape} moving {direction} on a {background} background`, generated on the engine,
// then the object is found by its color in the decoded frames.
//
// The same detector as training/eval.py (thresholds included), so the Python-side evaluation of the
// port and this one on the engine measure the same thing:
// * object pixels: farther than BG_DIST from the prompt's background color (RGB in [0, 1]);
// * (a) color: each object pixel votes for the nearest of the 5 palette colors; the prompt's color must
//   win and the object must be visible (>= MIN_PIXELS object pixels per frame on average);
// * (b) direction: the centroid of the pixels near the prompt's color (within COLOR_DIST) is tracked
//   over the frames where it is visible; its displacement from the first to the last such frame must
//   point along the named direction (dominant axis and sign) and be >= MIN_TRAVEL pixels.
import { readFileSync } from 'node:fs';

const COLORS: Record<string, [number, number, number]> = {
  red: [0.95, 0.1, 0.1],
  green: [0.1, 0.85, 0.15],
  blue: [0.2, 0.45, 1.0],
  yellow: [1.0, 0.9, 0.1],
  white: [1.0, 1.0, 1.0],
};
const SHAPES = ['circle', 'square', 'triangle'] as const;
const DIRECTIONS: Record<string, [number, number]> = { left: [-1, 0], right: [1, 0], up: [0, -1], down: [0, 1] };
const BACKGROUNDS: Record<string, [number, number, number]> = {
  black: [0, 0, 0],
  gray: [0.5, 0.5, 0.5],
  'dark blue': [0.02, 0.04, 0.35],
};

const BG_DIST = 0.3;
const COLOR_DIST = 0.4;
const MIN_PIXELS = 12;
const MIN_TRAVEL = 8.0;

export interface DemoPrompt {
  split: 'seen' | 'heldout';
  color: string;
  shape: string;
  direction: string;
  background: string;
  prompt: string;
}

export interface Analysis {
  colorOk: boolean;
  dirOk: boolean;
  dominant: string | null;
  visible: boolean;
  displacement: [number, number];
  trackedFrames: number;
  objectPxPerFrame: number;
}

function caption(color: string, shape: string, direction: string, background: string): string {
  return `a ${color} ${shape} moving ${direction} on a ${background} background`;
}

/** video [3, T, H, W] in [-1, 1] (the pipeline's output) */
export function analyze(video: Float32Array, shape: readonly [number, number, number, number], color: string, direction: string, background: string): Analysis {
  const [C, T, H, W] = shape;
  if (C !== 3) throw new Error(`analyze: expected 3 channels, got ${C}`);
  const names = Object.keys(COLORS);
  const palette = names.map((n) => COLORS[n]!);
  const bg = BACKGROUNDS[background];
  if (!bg) throw new Error(`analyze: unknown background "${background}"`);
  const ci = names.indexOf(color);
  if (ci < 0) throw new Error(`analyze: unknown color "${color}"`);
  const plane = T * H * W;
  const votes = new Array<number>(names.length).fill(0);
  let objCount = 0;
  const cents: Array<[number, number, number]> = [];
  for (let t = 0; t < T; t++) {
    let sx = 0;
    let sy = 0;
    let n = 0;
    for (let y = 0; y < H; y++)
      for (let x = 0; x < W; x++) {
        const o = t * H * W + y * W + x;
        const r = (video[o]! + 1) / 2;
        const g = (video[plane + o]! + 1) / 2;
        const b = (video[2 * plane + o]! + 1) / 2;
        if (Math.hypot(r - bg[0], g - bg[1], b - bg[2]) <= BG_DIST) continue;
        objCount++;
        let best = 0;
        let bestD = Infinity;
        for (let k = 0; k < palette.length; k++) {
          const p = palette[k]!;
          const d = Math.hypot(r - p[0], g - p[1], b - p[2]);
          if (d < bestD) {
            bestD = d;
            best = k;
          }
          if (k === ci && d < COLOR_DIST) {
            sx += x;
            sy += y;
            n++;
          }
        }
        votes[best]!++;
      }
    if (n >= Math.max(3, Math.floor(MIN_PIXELS / 3))) cents.push([t, sx / n, sy / n]);
  }
  const visible = objCount / T >= MIN_PIXELS;
  let dominant: string | null = null;
  if (objCount > 0) {
    let bi = 0;
    for (let k = 1; k < votes.length; k++) if (votes[k]! > votes[bi]!) bi = k;
    dominant = names[bi]!;
  }
  let dirOk = false;
  let disp: [number, number] = [0, 0];
  if (cents.length >= 2) {
    const a = cents[0]!;
    const z = cents[cents.length - 1]!;
    disp = [z[1] - a[1], z[2] - a[2]];
    const [dx, dy] = DIRECTIONS[direction]!;
    const along = disp[0] * dx + disp[1] * dy;
    const across = Math.abs(disp[0] * dy) + Math.abs(disp[1] * dx);
    dirOk = along >= MIN_TRAVEL && along > across;
  }
  return {
    colorOk: visible && dominant === color,
    dirOk,
    dominant,
    visible,
    displacement: [Math.round(disp[0] * 10) / 10, Math.round(disp[1] * 10) / 10],
    trackedFrames: cents.length,
    objectPxPerFrame: Math.round((objCount / T) * 10) / 10,
  };
}

/** the held-out color x shape x direction combos (training/heldout.json's `combos`) */
export function loadHeldout(path: string): Array<[string, string, string]> {
  const j = JSON.parse(readFileSync(path, 'utf8')) as { combos: Array<[string, string, string]> };
  return j.combos;
}

/**
 * The evaluation prompts, deterministic: every held-out combo on each background in `heldoutBackgrounds`
 * (all three by default; a rotating one when `heldoutPerCombo` is 1), and seen combos covering every
 * color x direction pair once (20), on rotating backgrounds and shapes.
 */
export function demoPrompts(heldout: Array<[string, string, string]>, opts: { heldoutPerCombo?: 1 | 3 } = {}): DemoPrompt[] {
  const bgs = Object.keys(BACKGROUNDS);
  const held = new Set(heldout.map((c) => c.join('|')));
  const out: DemoPrompt[] = [];
  const per = opts.heldoutPerCombo ?? 3;
  heldout.forEach(([color, shape, direction], i) => {
    const list = per === 3 ? bgs : [bgs[i % 3]!];
    for (const background of list) out.push({ split: 'heldout', color, shape, direction, background, prompt: caption(color, shape, direction, background) });
  });
  let k = 0;
  for (const color of Object.keys(COLORS))
    for (const direction of Object.keys(DIRECTIONS)) {
      // a shape for which this combo was trained, rotating
      let shape = SHAPES[k % 3]!;
      for (let j = 0; j < 3 && held.has([color, shape, direction].join('|')); j++) shape = SHAPES[(k + j + 1) % 3]!;
      const background = bgs[k % 3]!;
      out.push({ split: 'seen', color, shape, direction, background, prompt: caption(color, shape, direction, background) });
      k++;
    }
  return out;
}

export function summarize(rows: Array<DemoPrompt & Analysis>) {
  const s = (split: string) => {
    const rs = rows.filter((r) => r.split === split);
    return {
      n: rs.length,
      colorAcc: rs.filter((r) => r.colorOk).length / Math.max(1, rs.length),
      directionAcc: rs.filter((r) => r.dirOk).length / Math.max(1, rs.length),
    };
  };
  return { seen: s('seen'), heldout: s('heldout') };
}
