"""Overlay PNGs: a patch, its ground truth and each model's fused map side by side.

Each map panel is the probability (turbo colours, half transparent) over the
patch with the outline of the thresholded prediction (after the same Gaussian
smoothing the metrics use), so what is drawn is what is scored.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from fbta.io.atomic import atomic_path
from fbta.seg.metrics import binarise

if TYPE_CHECKING:
    from fbta.seg.dataset import PatchSet

CAPTION_H = 18


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boolean edge pixels of a boolean mask (4-neighbourhood)."""
    m = np.pad(mask, 1, mode="edge")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def _panel(image: np.ndarray, prob: np.ndarray | None, mask: np.ndarray | None, edge: tuple[int, int, int]) -> np.ndarray:
    import matplotlib

    out = image.astype(np.float32)
    if prob is not None:
        colours = matplotlib.colormaps["turbo"](np.clip(prob, 0, 1))[..., :3] * 255
        out = 0.5 * out + 0.5 * colours
    if mask is not None:
        if prob is None:  # ground truth: tint the tumour
            out[mask] = 0.6 * out[mask] + 0.4 * np.array([255, 0, 0])
        out[_outline(mask)] = edge
    return out.round().clip(0, 255).astype(np.uint8)


def overlay(image: np.ndarray, truth: np.ndarray, maps: Mapping[str, np.ndarray], caption: str,
            sigma: float = 3.0, threshold: float = 0.5) -> Image.Image:
    """One row: image | ground truth | one panel per named map."""
    panels = [("image", _panel(image, None, None, (0, 0, 0))),
              ("ground truth", _panel(image, None, truth.astype(bool), (255, 0, 0)))]
    panels += [(name, _panel(image, p, binarise(p, sigma, threshold), (255, 255, 255))) for name, p in maps.items()]
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (w * len(panels), h + 2 * CAPTION_H), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, arr) in enumerate(panels):
        canvas.paste(Image.fromarray(arr), (i * w, CAPTION_H))
        draw.text((i * w + 4, 3), name, fill="black")
    draw.text((4, h + CAPTION_H + 3), caption, fill="black")
    return canvas


def save_overlays(dest: Path, images: np.ndarray, truths: np.ndarray, maps: Mapping[str, np.ndarray],
                  names: Sequence[str], captions: Sequence[str], sigma: float = 3.0, threshold: float = 0.5) -> list[Path]:
    """One PNG per patch (``<name>.png``) plus ``overview.png`` stacking them; returns the paths written."""
    dest.mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    for i, name in enumerate(names):
        img = overlay(images[i], truths[i], {k: v[i] for k, v in maps.items()}, captions[i], sigma, threshold)
        p = dest / f"{name}.png"
        with atomic_path(p, suffix=".png") as tmp:
            img.save(tmp, format="PNG")
        rows.append(img)
        paths.append(p)
    if rows:
        grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
        y = 0
        for r in rows:
            grid.paste(r, (0, y))
            y += r.height
        with atomic_path(dest / "overview.png", suffix=".png") as tmp:
            grid.save(tmp, format="PNG")
        paths.append(dest / "overview.png")
    return paths


def pick_patches(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Up to k patch indices, positives first (about two thirds), seeded."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels > 0.5), np.flatnonzero(labels <= 0.5)
    n_pos = min(len(pos), max(k - k // 3, k - len(neg)))
    chosen = list(rng.choice(pos, n_pos, replace=False)) + list(rng.choice(neg, min(len(neg), k - n_pos), replace=False))
    return np.array(sorted(chosen), dtype=np.int64)


def save_test_overlays(dest: Path, test: "PatchSet", maps: Mapping[str, np.ndarray], k: int, seed: int,
                       sigma: float, threshold: float) -> list[Path]:
    """Overlays of ``k`` test patches (positives first): image, ground truth and each map of ``maps`` (per patch)."""
    pick = pick_patches(test.labels, k, seed)
    names = [f"{test.slide_ids[i]}_{test.coords[i][0]}_{test.coords[i][1]}" for i in pick]
    captions = [f"{test.slide_ids[i]} ({test.coords[i][0]}, {test.coords[i][1]}), tumour {test.fraction[i]:.0%}"
                for i in pick]
    return save_overlays(dest, test.images[pick], test.masks[pick], {k_: v[pick] for k_, v in maps.items()},
                         names, captions, sigma, threshold)
