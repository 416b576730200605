"""Instance-score heatmaps: each patch coloured by its MIL score over the slide image, plus a colour bar.

Why percentiles by default: what a head's scores are differs (softmax
attention summing to 1, class-token attention, …) and their scale shrinks as
bags grow, so the colour is the patch's rank within its slide (CLAM does the
same); ``minmax`` keeps the shape of the distribution instead.
Localisation figures (:func:`localisation`) compare the scores with an
annotation mask: does the model look where the tumour is?
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.stats import rankdata

from fbta.choices import HeatmapNormalize
from fbta.mil.metrics import binary_auc

LEGEND_W = 96  # px added on the right for the colour bar
CAPTION_H = 22  # px added at the bottom for the caption
NORMALISE = HeatmapNormalize.values()  # the schema's choices (fbta/choices.py), as plain strings


def normalise(scores: np.ndarray, how: str = "percentile") -> np.ndarray:
    """Scores → [0, 1]: percentile rank within the slide (ties averaged) or min–max."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if how not in NORMALISE:
        raise ValueError(f"heatmap normalisation '{how}' is not one of {', '.join(NORMALISE)}")
    if len(s) == 1:
        return np.ones(1)
    if how == "percentile":
        return (rankdata(s) - 1) / (len(s) - 1)
    span = s.max() - s.min()
    return (s - s.min()) / span if span > 0 else np.full_like(s, 0.5)


def patch_boxes(coords: np.ndarray, size0: float, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """Level-0 patches (top-left x, y; side ``size0``) → integer boxes (x0, y0, x1, y1) in image px, clipped."""
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2) / scale
    side = size0 / scale
    boxes = np.stack([np.floor(c[:, 0]), np.floor(c[:, 1]), np.ceil(c[:, 0] + side), np.ceil(c[:, 1] + side)], 1)
    h, w = shape
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    return boxes.astype(np.int64)


def score_canvas(boxes: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean value per pixel where patches overlap (H×W float) and the covered pixels (H×W bool)."""
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.int32)
    for (x0, y0, x1, y1), v in zip(boxes, values):
        total[y0:y1, x0:x1] += v
        count[y0:y1, x0:x1] += 1
    covered = count > 0
    return np.divide(total, count, out=np.zeros_like(total), where=covered), covered


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def _legend(height: int, cmap, label: str, ticks: tuple[str, str, str]) -> Image.Image:
    """A white panel with a vertical colour bar (1 at the top, 0 at the bottom) and tick labels."""
    panel = Image.new("RGB", (LEGEND_W, height), "white")
    draw = ImageDraw.Draw(panel)
    font = _font(11)
    top, bottom = 26, max(27, height - 14)
    bar = np.linspace(1.0, 0.0, bottom - top)[:, None].repeat(18, 1)
    panel.paste(Image.fromarray((cmap(bar)[..., :3] * 255).astype(np.uint8)), (10, top))
    draw.rectangle([10, top, 28, bottom - 1], outline="black")
    draw.text((6, 6), label, fill="black", font=font)
    for frac, text in zip((0.0, 0.5, 1.0), ticks):
        y = round(top + frac * (bottom - top - 1))
        draw.line([28, y, 33, y], fill="black")
        draw.text((36, y - 6), text, fill="black", font=font)
    return panel


def draw_heatmap(background: Image.Image, coords: np.ndarray, size0: float, scale: float, values: np.ndarray,
                 *, cmap: str = "turbo", alpha: float = 0.5, label: str = "score", caption: str = "",
                 ticks: tuple[str, str, str] = ("high", "", "low"),
                 annotation: Optional[np.ndarray] = None) -> Image.Image:
    """The slide image with patches coloured by ``values`` ∈ [0, 1], a colour bar, a caption.

    ``scale``: level-0 pixels per background pixel. ``annotation``: an optional
    boolean mask (any size, same aspect) whose outline is drawn in black.
    Output size: (width + LEGEND_W, height + CAPTION_H).
    """
    import matplotlib

    colormap = matplotlib.colormaps[cmap]
    base = np.asarray(background.convert("RGB"), dtype=np.float64)
    h, w = base.shape[:2]
    canvas, covered = score_canvas(patch_boxes(coords, size0, scale, (h, w)), np.clip(values, 0, 1), (h, w))
    colours = colormap(canvas)[..., :3] * 255
    a = np.where(covered, float(alpha), 0.0)[..., None]
    img = Image.fromarray((base * (1 - a) + colours * a).round().astype(np.uint8))
    if annotation is not None and annotation.any():
        _outline(img, annotation)
    out = Image.new("RGB", (w + LEGEND_W, h + CAPTION_H), "white")
    out.paste(img, (0, 0))
    out.paste(_legend(h, colormap, label, ticks), (w, 0))
    ImageDraw.Draw(out).text((4, h + 4), caption, fill="black", font=_font(12))
    return out


def _outline(img: Image.Image, mask: np.ndarray) -> None:
    from skimage.measure import find_contours

    ry, rx = img.height / mask.shape[0], img.width / mask.shape[1]
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 500))
    for contour in find_contours(np.pad(mask.astype(np.float32), 1), 0.5):
        pts = [((c - 1 + 0.5) * rx, (r - 1 + 0.5) * ry) for r, c in contour]
        if len(pts) > 1:
            draw.line(pts, fill="black", width=width)


@dataclass(frozen=True)
class Localisation:
    """How instance scores relate to an annotation.

    Patches at least half inside the annotation count as inside, patches with
    none of it as outside; border patches (partly inside) are left out of the
    comparison, since either answer is right for them.
    """

    n_inside: int
    n_outside: int
    n_border: int
    auc: float  # P(score of an inside patch > score of an outside one); 0.5 = blind, 1 = perfect
    mean_inside: float  # mean score × N (1 = uniform attention)
    mean_outside: float
    top10_inside: float  # share of the top-10% scored patches that are inside or border


def patch_fraction_inside(mask: np.ndarray, coords: np.ndarray, size0: float, level0_w: float) -> np.ndarray:
    """Fraction of each patch covered by ``mask`` (a boolean array at any downsample of level 0)."""
    scale = level0_w / mask.shape[1]
    boxes = patch_boxes(coords, size0, scale, mask.shape)
    integral = np.pad(mask.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    x0, y0, x1, y1 = boxes.T
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area


def localisation(scores: np.ndarray, fraction: np.ndarray) -> Localisation:
    """Compare scores (N) with each patch's fraction inside the annotated region (N, in [0, 1])."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    f = np.asarray(fraction, dtype=np.float64).ravel()
    inside, outside = f >= 0.5, f <= 0.0
    judged = inside | outside
    rel = s / s.mean() if s.mean() > 0 else s
    k = max(1, round(0.1 * len(s)))
    top = np.argsort(-s, kind="stable")[:k]
    return Localisation(int(inside.sum()), int(outside.sum()), int((~judged).sum()),
                        binary_auc(inside[judged], s[judged]),
                        float(rel[inside].mean()) if inside.any() else float("nan"),
                        float(rel[outside].mean()) if outside.any() else float("nan"),
                        float((f[top] > 0).mean()))
