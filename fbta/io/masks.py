"""Annotation masks, one reader for every stage: PNG/TIFF rasters and QuPath GeoJSON exports.

⚑ cohort input: ``data.masks/<slide_id>.png|.tif|.tiff`` (any downsample of level 0, same
aspect ratio; 0/1 or 0–255) or ``<slide_id>.geojson`` — annotations drawn in QuPath and
exported with File › Export objects as GeoJSON, in level-0 pixels; annotations classified
"Tumor"/"Tumour" count (fbta.io.qupath). Segmentation weak labels, heatmap localisation and
FBTA's tumour-share diagnostic all read masks through here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".geojson")
GEOJSON_DOWNSAMPLE = 16.0  # level-0 px per pixel of a mask rasterised from GeoJSON (the synth masks' default)


class MaskError(ValueError):
    """An annotation mask that cannot be used; the message names the file."""


def find_mask(masks_dir: Optional[str | Path], slide_id: str) -> Optional[Path]:
    """``<masks>/<slide_id>.png|.tif|.tiff|.geojson`` if present (rasters first)."""
    if not masks_dir:
        return None
    for suffix in MASK_SUFFIXES:
        p = Path(masks_dir, slide_id + suffix)
        if p.is_file():
            return p
    return None


def read_mask(path: Path, dims0: Optional[tuple[float, float]] = None) -> np.ndarray:
    """Boolean H×W tumour mask. 0/1 rasters: non-zero is tumour; 0–255: > 127 (antialiased edges).

    GeoJSON needs the slide's level-0 ``dims0`` (width, height) and is rasterised at 1/16.
    """
    path = Path(path)
    if path.suffix.lower() == ".geojson":
        from fbta.io.qupath import AnnotationError, read_annotation_mask

        if dims0 is None:
            raise MaskError(f"{path}: a GeoJSON annotation needs the slide's level-0 size (coords attributes)")
        try:
            return read_annotation_mask(path, (int(round(dims0[0])), int(round(dims0[1]))), GEOJSON_DOWNSAMPLE)
        except AnnotationError as exc:
            raise MaskError(str(exc)) from None
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I;16", "I", "F") else im)
    except Exception:  # noqa: BLE001 - PIL cannot read some TIFF flavours; tifffile can
        try:
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        except Exception as exc:  # noqa: BLE001
            raise MaskError(f"{path}: not a readable PNG/TIFF mask ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] in (1, 3, 4) else arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise MaskError(f"{path}: expected a 2-D mask image, got shape {arr.shape}")
    return arr > 127 if arr.max() > 1 else arr > 0
