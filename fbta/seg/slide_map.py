"""Slide-level segmentation maps: a model's patch predictions stitched over the slide image.

For one slide: every tiled patch (or a seeded sample of ``max_patches`` of
them) is read at the tiling's resolution, the segmenter's fused map is
predicted at patch size, shrunk to the patch's footprint on the slide image
and pasted there (overlaps averaged). What is drawn:

- the slide image (read at ``max_px`` from the slide; else the tiling
  thumbnail ``reports/plots/thumbnails/<slide_id>.png``; else white),
- the tumour probability in turbo colours, half transparent, on tiled tissue,
- beside it, the prediction as scored (σ-smoothed, thresholded per patch)
  tinted orange; both panels carry the annotation outline in black,
- a colour bar and a caption with the slide-level Dice of prediction vs
  annotation over the tiled area (a picture's check, not a reported metric).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import binary_dilation

from fbta.io.atomic import atomic_path
from fbta.mil.heatmap import patch_boxes
from fbta.seg.metrics import binarise

BAR_H = 14
PRED_RGB = (255, 140, 0)


@dataclass
class SlideMapInfo:
    slide_id: str
    patches: int  # patches drawn
    tiled: int  # patches the tiling has
    background: str  # slide | thumbnail | blank
    dice: Optional[float]  # prediction vs annotation over the tiled area (None without annotated tumour)
    tumour_px: float  # share of the tiled area predicted tumour


def _background(slide_path: Optional[Path], csv_mpp: Optional[float], coords_mpp: Optional[float],
                thumb: Optional[Path], dims0: tuple[float, float], max_px: int) -> tuple[Image.Image, float, str]:
    """(image, level-0 px per image px, source)."""
    if slide_path is not None and Path(slide_path).exists():
        try:
            from fbta.slides.reader import open_slide

            with open_slide(slide_path, csv_mpp, coords_mpp) as slide:
                w0, h0 = slide.dimensions
                rgb, scale = slide.read_at_mpp(slide.mpp * max(w0, h0) / max_px)
                return Image.fromarray(rgb).convert("RGB"), scale, "slide"
        except Exception:  # noqa: BLE001 - a picture must not fail the stage: fall back to the thumbnail
            pass
    if thumb is not None and thumb.exists():
        img = Image.open(thumb).convert("RGB")
        return img, dims0[0] / img.width, "thumbnail"
    scale = max(dims0) / max_px
    return Image.new("RGB", (max(1, round(dims0[0] / scale)), max(1, round(dims0[1] / scale))), "white"), scale, "blank"


def stitch(probs: np.ndarray, preds: np.ndarray, boxes: np.ndarray, total: np.ndarray, count: np.ndarray,
           pred: np.ndarray) -> None:
    """Paste patch maps (B×P×P probabilities and booleans) into image-size sums, counts and prediction, in place."""
    for prob, pb, (x0, y0, x1, y1) in zip(probs, preds, boxes):
        bw, bh = int(x1 - x0), int(y1 - y0)
        if bw <= 0 or bh <= 0:
            continue
        small = np.asarray(Image.fromarray(prob.astype(np.float32), mode="F").resize((bw, bh), Image.BILINEAR))
        total[y0:y1, x0:x1] += small
        count[y0:y1, x0:x1] += 1
        pred[y0:y1, x0:x1] |= np.asarray(Image.fromarray(pb.astype(np.uint8) * 255).resize((bw, bh), Image.NEAREST)) > 127


def _edges(mask: np.ndarray, width: int) -> np.ndarray:
    m = np.pad(mask, 1, mode="edge")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    edge = mask & ~inner
    return binary_dilation(edge, iterations=max(0, width - 1)) if width > 1 else edge


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def draw(background: Image.Image, prob: np.ndarray, pred: np.ndarray, covered: np.ndarray,
         annotation: Optional[np.ndarray], caption: str, alpha: float = 0.5) -> Image.Image:
    """Two panels side by side, then a colour bar and the caption.

    Left: the fused probability (turbo, half transparent) on the tiled area. Right: the prediction as scored
    (per-patch σ-smoothed, thresholded maps) tinted orange. Both carry the annotation outline in black, and
    the tiled area's outline in grey.
    """
    import matplotlib

    cmap = matplotlib.colormaps["turbo"]
    base = np.asarray(background.convert("RGB"), np.float32)
    h, w = base.shape[:2]
    a = np.where(covered, alpha, 0.0)[..., None]
    left = base * (1 - a) + cmap(np.clip(prob, 0, 1))[..., :3] * 255 * a
    right = base.copy()
    right[pred] = 0.45 * right[pred] + 0.55 * np.array(PRED_RGB, np.float32)
    width = max(1, round(max(h, w) / 400))
    tiled = _edges(covered, width)
    truth = _resize_mask(annotation, (w, h)) if annotation is not None and annotation.any() else None
    for panel in (left, right):
        panel[tiled] = (150, 150, 150)
        if truth is not None:
            panel[_edges(truth, width)] = (0, 0, 0)
    gap = 8
    lines = _wrap(caption, max(20, (2 * w + gap) // 6))
    canvas = Image.new("RGB", (2 * w + gap, h + BAR_H + 4 + 13 * len(lines)), "white")
    for i, panel in enumerate((left, right)):
        canvas.paste(Image.fromarray(panel.round().clip(0, 255).astype(np.uint8)), (i * (w + gap), 0))
    bar_w = max(16, min(w - 80, 256))
    bar = (cmap(np.linspace(0, 1, bar_w))[None, :, :3] * 255).repeat(BAR_H - 4, 0).astype(np.uint8)
    canvas.paste(Image.fromarray(bar), (40, h + 2))
    d = ImageDraw.Draw(canvas)
    d.text((4, h + 1), "p=0", fill="black")
    d.text((44 + bar_w, h + 1), "p=1", fill="black")
    d.rectangle([w + gap + 4, h + 3, w + gap + 14, h + BAR_H - 2], fill=PRED_RGB)
    d.text((w + gap + 20, h + 1), "predicted tumour (as scored)", fill="black")
    for i, line in enumerate(lines):
        d.text((4, h + BAR_H + 2 + 13 * i), line, fill="black")
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return [part for para in text.split("\n") for part in (textwrap.wrap(para, width) or [""])]


def predict_slide(slide_id: str, slide_path: Optional[Path], coords: np.ndarray, attrs: dict[str, Any],
                  predict: Callable[[np.ndarray], np.ndarray], *, csv_mpp: Optional[float] = None,
                  thumbnail: Optional[Path] = None, max_px: int = 1024, max_patches: int = 4000, seed: int = 0,
                  sigma: float = 3.0, threshold: float = 0.5, batch: int = 64):  # noqa: ANN201
    """The model's patch predictions stitched over the slide at ≤ ``max_px``.

    Returns (background image, level-0 px per map px, background source, mean probability map,
    prediction map as scored, covered-by-patches map, indices of the patches drawn).
    """
    from fbta.features.extract import SlidePatches

    if slide_path is None:
        raise ValueError(f"{slide_id}: no slide file to read patches from")
    coords = np.asarray(coords, np.int64)
    size0 = float(attrs.get("patch_size_level0", attrs["patch_size"]))
    ds = attrs.get("downsample", [1.0, 1.0])
    dims0 = (float(attrs["level_dim"][0] * ds[0]), float(attrs["level_dim"][1] * ds[1]))
    img, scale, source = _background(slide_path, csv_mpp, float(attrs.get("mpp", 0)) or None, thumbnail, dims0, max_px)
    keep = np.arange(len(coords))
    if max_patches and len(coords) > max_patches:
        keep = np.sort(np.random.default_rng(seed).choice(len(coords), max_patches, replace=False))
    reader = SlidePatches(Path(slide_path), coords[keep], attrs, csv_mpp)
    boxes = patch_boxes(coords[keep], size0, scale, (img.height, img.width))
    shape = (img.height, img.width)
    total, count, pred = np.zeros(shape, np.float32), np.zeros(shape, np.int32), np.zeros(shape, bool)
    for i in range(0, len(keep), batch):
        x = np.stack([reader[j].numpy() for j in range(i, min(i + batch, len(keep)))])
        probs = predict(x)
        bins = np.stack([binarise(p, sigma, threshold) for p in probs])
        stitch(probs, bins, boxes[i:i + len(x)], total, count, pred)
    if getattr(reader, "_slide", None) is not None:
        reader._slide.close()
    covered = count > 0
    prob = np.divide(total, count, out=np.zeros_like(total), where=covered)
    return img, scale, source, prob, pred, covered, keep


def slide_map(slide_id: str, slide_path: Optional[Path], coords: np.ndarray, attrs: dict[str, Any],
              predict: Callable[[np.ndarray], np.ndarray], *, csv_mpp: Optional[float] = None,
              annotation: Optional[np.ndarray] = None, thumbnail: Optional[Path] = None, max_px: int = 1024,
              max_patches: int = 4000, seed: int = 0, sigma: float = 3.0, threshold: float = 0.5,
              batch: int = 64, label: str = "", model: str = "student") -> tuple[Image.Image, SlideMapInfo]:
    """The stitched map of one slide; ``predict``: uint8 B×P×P×3 patches → float B×P×P probabilities."""
    img, _, source, prob, pred, covered, keep = predict_slide(
        slide_id, slide_path, coords, attrs, predict, csv_mpp=csv_mpp, thumbnail=thumbnail, max_px=max_px,
        max_patches=max_patches, seed=seed, sigma=sigma, threshold=threshold, batch=batch)
    coords = np.asarray(coords, np.int64)
    dice = None  # meaningful only where there is tumour to find; on a clean slide the predicted share says it all
    if annotation is not None and annotation.any():
        truth = _resize_mask(annotation, (img.width, img.height)) & covered
        inter, denom = float((pred & truth).sum()), float(pred.sum() + truth.sum())
        dice = 1.0 if denom == 0 else 2 * inter / denom
    tumour_px = float(pred.sum() / max(covered.sum(), 1))
    drawn = f"{len(keep)} of {len(coords)} patches" if len(keep) < len(coords) else f"{len(coords)} patches"
    # ASCII only: PIL's default bitmap font has no glyphs for dashes, sigma or >=
    caption = (f"{slide_id}{f' ({label})' if label else ''}: {model} fused map over {drawn}; predicted tumour "
               f"{tumour_px:.0%} of tiled area" + (f"; slide Dice vs annotation {dice:.3f}" if dice is not None else "")
               + f"\nleft: probability; right: prediction as scored (smoothed sigma={sigma:g}, p >= {threshold:g}); "
               "black: annotation outline; grey: tiled area")
    pic = draw(img, prob, pred, covered, annotation, caption)
    return pic, SlideMapInfo(slide_id, int(len(keep)), int(len(coords)), source, dice, tumour_px)


def save_slide_map(dest: Path, pic: Image.Image) -> Path:
    with atomic_path(dest, suffix=".png") as tmp:
        pic.save(tmp, format="PNG")
    return dest


def pick_slides(entries: list[tuple[str, bool]], k: int) -> list[str]:
    """Up to ``k`` slide ids from (slide_id, has tumour annotation): annotated ones first, plus one without
    tumour when there is room (false positives show there), in id order."""
    if k <= 0:
        return []
    tumour = sorted(s for s, t in entries if t)
    clean = sorted(s for s, t in entries if not t)
    n_clean = 1 if clean and k > 1 else (k if not tumour else 0)
    chosen = tumour[:k - n_clean] + clean[:n_clean]
    if len(chosen) < k:  # too few annotated slides: fill with clean ones
        chosen += [s for s in clean if s not in chosen][:k - len(chosen)]
    return chosen
