"""Thumbnail PNG with tissue contours and the patch grid: the first thing to look at."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage.measure import find_contours

from fbta.io.atomic import atomic_path
from fbta.slides.reader import Slide
from fbta.tiling.tiler import Tiling

CONTOUR = (0, 170, 0)
PATCH = (30, 80, 220)


def draw_thumbnail(slide: Slide, tiling: Tiling, max_px: int) -> Image.Image:
    w0, h0 = slide.dimensions
    thumb_mpp = max(slide.mpp * max(w0, h0) / max_px, slide.mpp)
    rgb, scale = slide.read_at_mpp(thumb_mpp)  # level-0 px per thumbnail px
    img = Image.fromarray(rgb).convert("RGB")
    draw = ImageDraw.Draw(img)
    size = tiling.attrs["patch_size_level0"] / scale
    for x, y in tiling.coords / scale:
        draw.rectangle([x, y, x + size, y + size], outline=PATCH, width=1)
    ratio = tiling.mask_scale / scale  # mask px → thumbnail px
    padded = np.pad(tiling.mask.astype(np.float32), 1)
    width = max(2, round(max(img.size) / 400))
    for contour in find_contours(padded, 0.5):
        pts = [((c - 1 + 0.5) * ratio, (r - 1 + 0.5) * ratio) for r, c in contour]
        if len(pts) > 1:
            draw.line(pts + [pts[0]], fill=CONTOUR, width=width)
    return img


def save_thumbnail(slide: Slide, tiling: Tiling, dest: Path, max_px: int) -> None:
    img = draw_thumbnail(slide, tiling, max_px)
    with atomic_path(dest, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
