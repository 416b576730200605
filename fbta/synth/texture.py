"""A slide built from real H&E texture (``synth.style: texture``): CMU-1 tissue, per-slide stain, tumour morphology.

Why: a CNN sees real tissue — nuclei, collagen, epidermis, tears — rather
than drawn dots, so frozen ImageNet features, fine-tuning and segmentation
meet the statistics they meet on real slides. The source is the CMU-1 small
region (OpenSlide's public Aperio test slide, ``assets/cmu1_region.jpg``).

How a slide is made (all from the slide's own RNG stream):
1. **Mosaic.** Irregular (Voronoi) cells of ~``CELL`` px, each filled from a
   random tissue-rich window of the source under a random flip/90° turn.
2. **Tumour** (positive slides): 1–3 regions covering ≈ ``tumour_fraction``
   of the tissue, with ragged, nest-scale borders (many patches are partly
   tumour, as at a real invasive front). Inside, nuclei are enlarged
   (grey dilation of the haematoxylin density) and hyperchromatic, eosin is
   reduced — the cytology of carcinoma — blended in by ``strength`` (0..1).
3. **Stain** per slide: haematoxylin and eosin densities scaled independently
   (different labs/scanners), so colour alone does not tell the class.
4. **Tissue shape** from :func:`fbta.synth.slide.tissue_geometry`; outside is glass.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from fbta.synth.slide import MID, lowfreq, tissue_geometry, tumour_geometry, upsample

SOURCE = Path(__file__).with_name("assets") / "cmu1_region.jpg"
CELL = 320  # mean mosaic cell spacing, level-0 px
WINDOW = 512  # source window per cell (a cell never reaches past it)
MIN_TISSUE = 0.8  # share of tissue a source window must hold
# Ruifrok & Johnston optical-density vectors (H, E, residual), as in skimage.color.rgb2hed
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
_HED /= np.linalg.norm(_HED, axis=1, keepdims=True)
_HED_INV = np.linalg.inv(_HED).astype(np.float32)
_DISK = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2.2  # nuclear growth footprint (round, not square)
_CORE = np.hypot(*np.mgrid[-1:2, -1:2]) <= 1.0  # a nucleus' interior: every pixel within 1 px is nuclear too
GLASS = np.array([242, 241, 244], dtype=np.float32)


@lru_cache(maxsize=2)
def load_source(path: str = str(SOURCE)) -> tuple[np.ndarray, np.ndarray]:
    """-> (source RGB uint8, top-left corners of tissue-rich WINDOW×WINDOW windows)."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"texture source {p} not found (synth.texture); it ships in fbta/synth/assets/")
    rgb = np.asarray(Image.open(p).convert("RGB"))
    if min(rgb.shape[:2]) < WINDOW:
        raise ValueError(f"texture source {p} is {rgb.shape[1]}×{rgb.shape[0]} px; need ≥ {WINDOW} px a side")
    small = rgb[::8, ::8].astype(np.float32)
    tissue = (small.max(-1) - small.min(-1)) > 25  # saturation-like: glass is grey-white
    share = ndi.uniform_filter(tissue.astype(np.float32), WINDOW // 8, mode="constant")
    ys, xs = np.nonzero(share >= MIN_TISSUE)
    corners = np.stack([ys * 8 - WINDOW // 2, xs * 8 - WINDOW // 2], 1)
    ok = (corners >= 0).all(1) & (corners[:, 0] + WINDOW <= rgb.shape[0]) & (corners[:, 1] + WINDOW <= rgb.shape[1])
    corners = corners[ok]
    if len(corners) == 0:
        raise ValueError(f"texture source {p} has no {WINDOW}px window with ≥ {MIN_TISSUE:.0%} tissue")
    return rgb, corners


def _d4(block: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations (k in 0..7)."""
    block = np.rot90(block, k % 4)
    return block[:, ::-1] if k >= 4 else block


def mosaic(rng: np.random.Generator, h: int, w: int, source: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Voronoi cells on a jittered grid, each a D4-transformed source window (uint8 H×W×3)."""
    gy, gx = np.meshgrid(np.arange(CELL // 2, h + CELL, CELL), np.arange(CELL // 2, w + CELL, CELL), indexing="ij")
    seeds = np.stack([gy.ravel(), gx.ravel()], 1) + rng.uniform(-0.4, 0.4, (gy.size, 2)) * CELL
    # nearest seed on a 1/8 grid (cells are ≥ 100 px: an 8 px staircase is invisible at patch scale)
    f = 8
    yy, xx = np.meshgrid(np.arange(-(-h // f)) * f + f / 2, np.arange(-(-w // f)) * f + f / 2, indexing="ij")
    from scipy.spatial import cKDTree

    _, lab_small = cKDTree(seeds).query(np.stack([yy.ravel(), xx.ravel()], 1))
    lab = np.repeat(np.repeat(lab_small.reshape(yy.shape), f, 0), f, 1)[:h, :w]
    out = np.zeros((h, w, 3), dtype=np.uint8)
    filled = np.zeros((h, w), dtype=bool)
    picks = rng.integers(0, len(corners), len(seeds))
    turns = rng.integers(0, 8, len(seeds))
    half = WINDOW // 2
    for i, (sy, sx) in enumerate(seeds):
        y0, x0 = int(round(sy)) - half, int(round(sx)) - half
        ys, xs = slice(max(0, y0), min(h, y0 + WINDOW)), slice(max(0, x0), min(w, x0 + WINDOW))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        cell = lab[ys, xs] == i
        if not cell.any():
            continue
        cy, cx = corners[picks[i]]
        block = _d4(source[cy:cy + WINDOW, cx:cx + WINDOW], int(turns[i]))
        sub = block[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        out[ys, xs][cell] = sub[cell]
        filled[ys, xs] |= cell
    if not filled.all():  # a cell corner past its window: the nearest filled pixel's colour
        idx = ndi.distance_transform_edt(~filled, return_distances=False, return_indices=True)
        out = out[idx[0], idx[1]]
    return out


def to_od(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 → stain densities (H, E, residual) per pixel, float32."""
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    return od @ _HED_INV


def from_od(dens: np.ndarray) -> np.ndarray:
    od = np.maximum(dens @ _HED, 0.0)
    return np.clip(255.0 * np.exp(-od), 0, 255)


def tumour_cytology(dens: np.ndarray, strength: float) -> np.ndarray:
    """Enlarged, hyperchromatic nuclei and paler eosin: the tumour look, scaled by ``strength`` (0..1)."""
    h = dens[..., 0]
    grown = ndi.grey_dilation(h, footprint=_DISK)
    out = dens.copy()
    out[..., 0] = (h + strength * (grown - h)) * (1.0 + 0.5 * strength)
    out[..., 1] = dens[..., 1] * (1.0 - 0.35 * strength)
    return out


def subtype_cytology(dens: np.ndarray, delta: float) -> np.ndarray:
    """The second subtype's nuclei: a little larger and vesicular (pale chromatin inside a dark rim), by ``delta``.

    Why this change: subtyping (LUAD/LUSC, STAD types) turns on nuclear-scale
    morphology in tumour-rich tissue of both classes, not on where tumour is.
    The rim and pale core are 1–2 px wide at 0.5 µm/px, so they blur away when
    a 256-px patch is shrunk for the extractor, and the larger-but-paler nuclei
    keep a slide's mean haematoxylin close to the other subtype's.
    """
    h = dens[..., 0]
    grown = h + 0.5 * delta * (ndi.grey_dilation(h, footprint=_DISK) - h)
    core = ndi.grey_erosion(grown, footprint=_CORE)
    out = dens.copy()
    out[..., 0] = grown - 0.6 * delta * np.maximum(core, 0.0)
    return out


def ragged_tumour(rng: np.random.Generator, tissue_mid: np.ndarray, fraction: float) -> np.ndarray:
    """Tumour on the MID grid: compact regions with nest-scale ragged borders and islands."""
    field, thr = tumour_geometry(rng, tissue_mid, fraction)
    if fraction <= 0:
        return np.zeros_like(tissue_mid)
    field = field + 0.22 * lowfreq(rng, field.shape, 10.0)  # ~40 µm-scale nests along the front
    field[~tissue_mid] = -10.0
    thr = float(np.quantile(field[tissue_mid], 1 - fraction))
    return (field > thr) & tissue_mid


def make_texture_slide(
    rng: np.random.Generator, width: int, height: int, positive: bool, tumour_fraction: float,
    strength: float = 0.5, stain_sd: float = 0.15, source: str = str(SOURCE), subtype_delta: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (rgb H×W×3 uint8, tissue mask, tumour mask) at level 0; negative slides have no tumour.

    ``subtype_delta`` set (the subtyping design): every slide has tumour on
    ``tumour_fraction`` of its tissue and ``positive`` means the second subtype,
    whose tumour nuclei also get :func:`subtype_cytology` with that delta.
    Independent sub-streams: the two versions of one seed share tissue shape,
    mosaic, stain (and, subtyping, the tumour's place), so the label is their only difference.
    """
    h, w = int(height), int(width)
    hm, wm = -(-h // MID), -(-w // MID)
    rng, rng_tumour, rng_mosaic, rng_stain = rng.spawn(4)
    src, corners = load_source(source)
    field, thr = tissue_geometry(rng, hm, wm)
    tissue_mid = field > thr
    subtyping = subtype_delta is not None
    frac = float(tumour_fraction) if positive or subtyping else 0.0
    tumour_mid = ragged_tumour(rng_tumour, tissue_mid, frac)
    tex = mosaic(rng_mosaic, h, w, src, corners)
    dens = to_od(tex)
    del tex
    if tumour_mid.any():
        soft = np.clip(upsample(tumour_mid.astype(np.float32), MID, h, w), 0, 1)[..., None]
        changed = tumour_cytology(dens, float(strength))
        if subtyping and positive:
            changed = subtype_cytology(changed, float(subtype_delta))
        dens = dens + soft * (changed - dens)
    scale = np.exp(rng_stain.normal(0.0, stain_sd, 3)).astype(np.float32)  # H, E, residual
    scale[2] = 1.0
    rgb_t = from_od(dens * scale)
    del dens
    edge = upsample(field, MID, h, w) - thr
    alpha = np.clip(edge * (1 / 0.004), 0, 1)[..., None].astype(np.float32)  # ~2 px soft tissue edge
    tissue = edge > 0
    glass = GLASS + rng.normal(0, 1.5, (1, 1, 3)).astype(np.float32)
    rgb = (alpha * rgb_t + (1 - alpha) * glass).astype(np.uint8)
    tumour = np.zeros((h, w), dtype=bool)
    if tumour_mid.any():
        tumour = (upsample(tumour_mid.astype(np.float32), MID, h, w) > 0.5) & tissue
    return rgb, tissue, tumour
