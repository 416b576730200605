"""One synthetic H&E slide: tissue geometry, a Beer-Lambert stain model, nuclei.

Why this design: colours come from optical densities (hematoxylin and eosin
vectors, per-slide jitter), so stain variation behaves like real slides and
tumour and normal tissue can be made to absorb the same light on average —
the class signal is then nuclear morphology only, never colour or tissue
amount. Large smooth fields live on a grid ``MID`` times coarser than level
0; level 0 is rendered in bands of ``BAND`` rows so float memory stays
bounded on 8192² slides (the returned arrays are uint8 / bool).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from fbta.synth.nuclei import NORMAL, TUMOUR, Population, blend, populate, smooth_noise, stamp_rows

MID = 4  # geometry / texture grid, relative to level 0
BAND = 512  # rows rendered at once
HEMATOXYLIN = np.array([0.60, 0.72, 0.35]) / np.linalg.norm([0.60, 0.72, 0.35])  # optical-density directions
EOSIN = np.array([0.12, 0.86, 0.49]) / np.linalg.norm([0.12, 0.86, 0.49])
PEN_OD = {"blue": np.array([1.6, 1.1, 0.35]), "green": np.array([1.3, 0.45, 1.0])}
MARGIN = 0.05  # tissue stays this fraction of the slide away from its edges
OFF = -10.0  # field value meaning "never tissue" (finite, so bilinear stays finite)


def upsample(low: np.ndarray, factor: int, height: int, width: int, y0: int = 0, y1: int | None = None) -> np.ndarray:
    """Rows y0:y1 of ``low`` bilinearly resized by ``factor`` (pixel centres aligned)."""
    y1 = height if y1 is None else y1

    def taps(lo: int, hi: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(lo, hi, dtype=np.float32) + 0.5) / factor - 0.5, 0, n - 1)
        i0 = np.floor(pos).astype(np.int64)
        return i0, np.minimum(i0 + 1, n - 1), (pos - i0).astype(np.float32)

    r0, r1, wy = taps(y0, y1, low.shape[0])
    c0, c1, wx = taps(0, width, low.shape[1])
    lo = int(r0[0])
    sub = low[lo:int(r1[-1]) + 1]  # the few coarse rows involved: widen them first (cheap)
    wide = sub[:, c0] * (1 - wx) + sub[:, c1] * wx
    return wide[r0 - lo] * (1 - wy)[:, None] + wide[r1 - lo] * wy[:, None]


def lowfreq(rng: np.random.Generator, shape: tuple[int, int], sigma: float, per_cell: float = 4.0) -> np.ndarray:
    """Smooth unit-std noise with correlation length ~sigma px, generated coarse for speed.

    The coarse grid has sigma/per_cell px cells; fields whose contours are drawn
    (fibres) need a finer grid, or bilinear kinks show up as dashes.
    """
    f = max(1, int(sigma // per_cell))
    small = (-(-shape[0] // f), -(-shape[1] // f))
    return upsample(smooth_noise(rng, small, sigma / f), f, *shape)


def tissue_geometry(rng: np.random.Generator, hm: int, wm: int) -> tuple[np.ndarray, float]:
    """A few smooth, blobby, irregular tissue pieces covering 42-56 % of the slide."""
    target = rng.uniform(0.42, 0.56)
    yy = np.linspace(0, 1, hm, dtype=np.float32)[:, None]
    xx = np.linspace(0, 1, wm, dtype=np.float32)[None, :]
    n = int(rng.integers(2, 5))
    cells = [(0.5, 0.3), (0.5, 0.7)] if n == 2 else [(0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7)]
    if n == 2 and rng.random() < 0.5:
        cells = [(x, y) for y, x in cells]
    order = rng.permutation(len(cells))[:n]
    shares = rng.dirichlet(np.full(n, 4.0))
    field = np.full((hm, wm), OFF, dtype=np.float32)
    for i, share in zip(order, shares):  # a handful of pieces: the loop is over shapes, not pixels
        cy, cx = np.array(cells[i]) + rng.uniform(-0.07, 0.07, 2)
        r = np.sqrt(0.8 * target * share / np.pi)
        asp, t = rng.uniform(1.0, 1.7), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = (yy - cy) * np.cos(t) - (xx - cx) * np.sin(t)
        un, vn = u / (r * np.sqrt(asp)), v / (r / np.sqrt(asp))
        phi = np.arctan2(vn, un)
        lobes = sum(rng.uniform(0.05, 0.16) / k * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5))
        np.maximum(field, 1 - (un * un + vn * vn) / (1 + lobes) ** 2, out=field)
    size = min(hm, wm)
    field += 0.4 * lowfreq(rng, (hm, wm), 0.07 * size) + 0.05 * smooth_noise(rng, (hm, wm), 1.5)
    edge = np.minimum(np.minimum(yy, 1 - yy), np.minimum(xx, 1 - xx))
    field -= 4 * np.clip((0.12 - edge) / (0.12 - MARGIN), 0, 1) ** 2  # curve away from the slide edges
    field[np.broadcast_to(edge < MARGIN, field.shape)] = OFF
    thr = float(np.quantile(field, 1 - target))
    return field, thr


def tumour_geometry(
    rng: np.random.Generator, tissue: np.ndarray, fraction: float
) -> tuple[np.ndarray, float]:
    """1-3 compact regions deep inside tissue covering ``fraction`` of the tissue area."""
    hm, wm = tissue.shape
    field = np.full((hm, wm), OFF, dtype=np.float32)
    if fraction <= 0 or not tissue.any():
        return field, 0.0
    depth = ndi.distance_transform_edt(tissue).astype(np.float64)
    p = depth.ravel() ** 3
    n = int(rng.integers(1, 4))
    seeds = rng.choice(p.size, size=n, replace=False, p=p / p.sum())
    shares = rng.dirichlet(np.full(n, 2.0))
    yy = np.arange(hm, dtype=np.float32)[:, None]
    xx = np.arange(wm, dtype=np.float32)[None, :]
    base = np.sqrt(fraction * tissue.sum() / np.pi)
    for seed, share in zip(seeds, shares):
        cy, cx = divmod(int(seed), wm)
        d = np.hypot(yy - cy, xx - cx) / (base * np.sqrt(share))
        np.maximum(field, 1 - d, out=field)
    field += 0.12 * lowfreq(rng, (hm, wm), 12.0) + 0.03 * smooth_noise(rng, (hm, wm), 1.5)
    field[~tissue] = OFF
    thr = float(np.quantile(field[tissue], 1 - fraction))
    return field, thr


def pen_mark(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """A short blue/green marker stroke on background, kept ≥ ~80 px from tissue."""
    hm, wm = tissue.shape
    clearance = ndi.distance_transform_edt(~tissue)
    free = np.flatnonzero(clearance.ravel() > 25)
    if free.size == 0:
        return np.zeros((hm, wm), dtype=np.float32)
    y, x = divmod(int(rng.choice(free)), wm)
    angle = rng.uniform(0, 2 * np.pi)
    steps = rng.normal(0, 0.12, 300).cumsum() + angle
    path_y = np.clip(y + np.cumsum(np.sin(steps)) * 0.5, 0, hm - 1)
    path_x = np.clip(x + np.cumsum(np.cos(steps)) * 0.5, 0, wm - 1)
    line = np.ones((hm, wm), dtype=bool)
    line[np.rint(path_y).astype(int), np.rint(path_x).astype(int)] = False
    dist = ndi.distance_transform_edt(line)
    width = rng.uniform(3.0, 7.0)  # half-width on the MID grid
    alpha = np.clip(width - dist, 0, 1) * rng.uniform(0.6, 0.95)
    alpha *= np.clip((clearance - 20) / 4, 0, 1)
    return alpha.astype(np.float32)


@dataclass
class Stain:
    """Per-slide stain variation: vectors, concentrations, background and artefacts."""

    h_vec: np.ndarray
    e_vec: np.ndarray
    h_scale: float
    e_level: float
    background: np.ndarray  # RGB of empty glass
    pen_od: np.ndarray | None
    border: tuple[str, float] | None  # (side, width fraction) of a dark strip

    @staticmethod
    def draw(rng: np.random.Generator) -> "Stain":
        def jitter(vec: np.ndarray) -> np.ndarray:
            v = np.abs(vec + rng.normal(0, 0.035, 3))
            return (v / np.linalg.norm(v)).astype(np.float32)

        pen = None
        if rng.random() < 0.4:
            pen = PEN_OD["blue" if rng.random() < 0.6 else "green"] * rng.uniform(0.8, 1.1)
        border = None
        if rng.random() < 0.3:
            border = (str(rng.choice(["top", "bottom", "left", "right"])), float(rng.uniform(0.008, 0.025)))
        return Stain(
            h_vec=jitter(HEMATOXYLIN), e_vec=jitter(EOSIN),
            h_scale=float(rng.uniform(0.85, 1.15)), e_level=float(rng.uniform(0.65, 0.9)),
            background=(rng.uniform(238, 248) + rng.normal(0, 1.5, 3)).astype(np.float32),
            pen_od=pen, border=border,
        )


def collagen(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Stroma texture (half resolution): wavy fibres as contour lines of smooth noise, with pale clefts.

    Returns a multiplicative eosin modulation around 1.
    """
    phase = lowfreq(rng, (h, w), 40.0, per_cell=12.0) + 0.03 * lowfreq(rng, (h, w), 8.0)
    out = _stripes(phase, 50.0)
    out *= np.clip(0.6 + 0.5 * lowfreq(rng, (h, w), 12.0), 0, 1)  # bundles fade in and out
    out *= 0.2
    out += 1
    out += 0.06 * smooth_noise(rng, (h, w), 0.8)
    del phase
    gaps = _stripes(lowfreq(rng, (h, w), 50.0, per_cell=12.0), 45.0)
    gaps = np.clip((gaps - 0.9) * 10, 0, 1)
    gaps *= lowfreq(rng, (h, w), 30.0) > 0.5  # tears of limited length, not endless lines
    out *= 1 - 0.75 * gaps
    return out


def _stripes(field: np.ndarray, k: float) -> np.ndarray:
    """cos(k·field): wavy lines along the field's contours, faded where they would alias."""
    gy, gx = np.gradient(field)
    freq = k * np.hypot(gy, gx)  # radians per px
    del gy, gx
    fade = np.clip((1.6 - freq) / 0.6, 0, 1)
    return np.cos(k * field) * fade


def _border_rows(stain: Stain, rng: np.random.Generator, h: int, w: int) -> np.ndarray | None:
    """Per-row (left/right) or per-column (top/bottom) depth of the dark strip, in px."""
    if stain.border is None:
        return None
    side, frac = stain.border
    n, full = (h, w) if side in ("left", "right") else (w, h)
    wave = upsample(rng.standard_normal((1, max(2, n // 64))).astype(np.float32), 64, 1, n)[0]
    return np.maximum(frac * full * (1 + 0.25 * wave), 2).astype(np.float32)


def _render_band(
    out: np.ndarray, y0: int, y1: int, alpha8: np.ndarray, stain: Stain, stroma: np.ndarray,
    pen: np.ndarray | None, pops: list[Population], border: np.ndarray | None, rng: np.random.Generator,
) -> None:
    """Level-0 pixels of rows y0:y1 via Beer-Lambert: RGB = background · exp(−OD), per channel."""
    h, w = out.shape[:2]
    alpha = alpha8[y0:y1].astype(np.float32) * np.float32(1 / 255)
    eosin = upsample(stroma, 2, h, w, y0, y1)
    eosin *= rng.standard_normal(eosin.shape, dtype=np.float32) * np.float32(0.06) + 1
    eosin *= alpha * np.float32(stain.e_level)
    hema = np.minimum(stamp_rows(pops, y0, y1, w), 2.5)  # overlaps darken, never to black
    hema += 0.03
    hema *= alpha * np.float32(stain.h_scale)
    ink = upsample(pen, MID, h, w, y0, y1) if pen is not None else None
    od = np.empty_like(hema)
    for c in range(3):
        np.multiply(hema, stain.h_vec[c], out=od)
        od += eosin * stain.e_vec[c]
        if ink is not None:
            od += ink * np.float32(stain.pen_od[c])
        np.exp(-od, out=od)
        od *= stain.background[c]
        od += 0.5
        out[y0:y1, :, c] = np.clip(od, 0, 255)
    if border is not None:
        side = stain.border[0]
        rows = np.arange(y0, y1)[:, None]
        cols = np.arange(w)[None, :]
        depth = {"left": cols < border[y0:y1, None], "right": cols >= w - border[y0:y1, None],
                 "top": rows < border[None, :], "bottom": rows >= h - border[None, :]}[side]
        out[y0:y1][depth] = (22 + 8 * rng.random((int(depth.sum()), 1))).astype(np.uint8)


def make_slide(
    rng: np.random.Generator, width: int, height: int, positive: bool, tumour_fraction: float,
    contrast: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (rgb H×W×3 uint8, tissue mask H×W bool, tumour mask H×W bool) at level 0.

    Negative slides have an empty tumour mask; positive ones carry tumour
    morphology on ≈ ``tumour_fraction`` of their tissue area. ``contrast``
    (0..1) blends tumour nuclei toward normal ones to make the task harder.

    Independent sub-streams make the tumour the only difference between the
    positive and negative versions of one seed: same stain, tissue, stroma and
    normal nuclei elsewhere (the tests use this as a colour counterfactual).
    """
    h, w = int(height), int(width)
    hm, wm = -(-h // MID), -(-w // MID)
    contrast = float(np.clip(contrast, 0.0, 1.0))
    rng, rng_tumour, rng_nuclei, rng_pixels = rng.spawn(4)
    stain = Stain.draw(rng)
    tissue_field, tissue_thr = tissue_geometry(rng, hm, wm)
    tissue_mid = tissue_field > tissue_thr
    frac = float(tumour_fraction) if positive else 0.0
    tumour_field, tumour_thr = tumour_geometry(rng_tumour, tissue_mid, frac)
    nests = 1 / (1 + np.exp(-2.0 * lowfreq(rng, (hm, wm), 9.0)))
    nests = 1 + contrast * ((0.35 + nests) / (0.35 + float(nests.mean())) - 1)
    cellularity = 0.35 + 0.65 / (1 + np.exp(-1.5 * lowfreq(rng, (hm, wm), 40.0)))
    pen = pen_mark(rng, tissue_mid) if stain.pen_od is not None else None
    tissue = np.empty((h, w), dtype=bool)
    tumour = np.zeros((h, w), dtype=bool)
    alpha8 = np.empty((h, w), dtype=np.uint8)  # soft tissue edge, kept for rendering
    for y0 in range(0, h, BAND):
        y1 = min(h, y0 + BAND)
        f = upsample(tissue_field, MID, h, w, y0, y1) - tissue_thr
        tissue[y0:y1] = f > 0
        alpha8[y0:y1] = np.where(f > 0, np.clip(f * (255 / 0.004), 1, 255), 0)  # ~2 px ramp
        if frac > 0:
            tumour[y0:y1] = (upsample(tumour_field, MID, h, w, y0, y1) > tumour_thr) & tissue[y0:y1]
    del tissue_field, tumour_field
    transmission = np.exp(-stain.e_level * stain.e_vec)
    pops = populate(rng_nuclei, tissue, tumour, cellularity, nests, MID, stain.h_vec * stain.h_scale, transmission,
                    tumour_kind=blend(NORMAL, TUMOUR, contrast))
    hf, wf = -(-h // 2), -(-w // 2)
    stroma = collagen(rng, hf, wf)
    stroma *= 1 + 0.12 * lowfreq(rng, (hf, wf), 60.0)
    border = _border_rows(stain, rng, h, w)
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    for y0 in range(0, h, BAND):
        _render_band(rgb, y0, min(h, y0 + BAND), alpha8, stain, stroma, pen, pops, border, rng_pixels)
    return rgb, tissue, tumour
