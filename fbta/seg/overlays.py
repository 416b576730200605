"""Overlay PNGs: a patch, its ground truth and each model's fused map side by side.

Each map panel is the probability (turbo colours, half transparent) over the
patch with the outline of the thresholded prediction (after the same Gaussian
smoothing the metrics use), so what is drawn is what is scored; its title
carries that patch's score (tumour F1 on positive and ambiguous patches,
background F1 on negative ones). The caption names the patch's weak-label
group; an ambiguous patch is drawn when there is room.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from fbta.io.atomic import atomic_path
from fbta.seg.metrics import AMBIGUOUS, GROUP_NAMES, NEG, POS, binarise, score_image

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
    for name, p in maps.items():
        sc = score_image(p, truth, sigma, threshold)
        title = f"{name} {'tumour' if sc.positive else 'bg'} F1 {sc.f1:.2f}"
        panels.append((title, _panel(image, p, binarise(p, sigma, threshold), (255, 255, 255))))
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
    """One PNG per patch (``<name>.png``) plus ``overview.png`` stacking them; returns the paths written.

    PNGs already in ``dest`` are removed first: a previous run's patches must not pass for this run's."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.png"):
        old.unlink()
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


def pick_patches(labels: np.ndarray, k: int, seed: int = 0, group: np.ndarray | None = None) -> np.ndarray:
    """Up to k patch indices, seeded: positives first (about two thirds), then negatives; with ``group``, one
    ambiguous patch among them when k ≥ 3 and there is one."""
    rng = np.random.default_rng(seed)
    if group is None:
        group = np.where(labels > 0.5, POS, NEG)
    pos, neg, amb = (np.flatnonzero(group == g) for g in (POS, NEG, AMBIGUOUS))
    n_amb = 1 if k >= 3 and len(amb) else 0
    room = k - n_amb
    n_pos = min(len(pos), max(room - room // 3, room - len(neg)))
    chosen = list(rng.choice(pos, n_pos, replace=False)) + list(rng.choice(neg, min(len(neg), room - n_pos), replace=False))
    chosen += list(rng.choice(amb, n_amb, replace=False)) if n_amb else []
    return np.array(sorted(chosen), dtype=np.int64)


def save_test_overlays(dest: Path, test: "PatchSet", maps: Mapping[str, np.ndarray], k: int, seed: int,
                       sigma: float, threshold: float) -> list[Path]:
    """Overlays of ``k`` test patches (positives first): image, ground truth and each map of ``maps`` (per patch)."""
    pick = pick_patches(test.labels, k, seed, getattr(test, "group", None))
    names = [f"{test.slide_ids[i]}_{test.coords[i][0]}_{test.coords[i][1]}" for i in pick]
    groups = getattr(test, "group", np.where(test.labels > 0.5, POS, NEG))
    captions = [f"{test.slide_ids[i]} ({test.coords[i][0]}, {test.coords[i][1]}), {GROUP_NAMES[int(groups[i])]}, "
                f"tumour {test.fraction[i]:.0%}" for i in pick]
    return save_overlays(dest, test.images[pick], test.masks[pick], {k_: v[pick] for k_, v in maps.items()},
                         names, captions, sigma, threshold)
