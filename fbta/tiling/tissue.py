"""Tissue detection: small filters with one job each, composed in ``tissue_mask``.

Works on a low-resolution RGB image (``tissue.mask_mpp`` µm/px). All sizes are
given in microns and converted with the image's MPP, so the same parameters
work on a 2 mm biopsy crop and a 25 mm resection (CLAM's pixel-area
thresholds assume a full slide and find nothing on small ones).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ×255: stained tissue is coloured, glass and background are grey/white."""
    rgb = rgb.astype(np.int16)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) * 255 // np.maximum(mx, 1), 0)
    return sat.astype(np.uint8)


def dark_mask(rgb: np.ndarray, black_value: int) -> np.ndarray:
    """Black borders, slide edges and debris: every channel below ``black_value``."""
    return rgb.max(axis=2) < black_value


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Green, blue and black-ish marker ink, which H&E never produces.

    Green: G dominates R and B. Blue: B well above both R and G (hematoxylin is
    purple, B only slightly above R). Thresholds chosen on pen colours that
    saturate strongly away from the eosin/hematoxylin axis.
    """
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    green = (g > r + 15) & (g >= b - 5)
    blue = (b > r + 50) & (b > g + 25)
    return green | blue


def otsu_threshold(sat: np.ndarray, floor: int) -> int:
    """Otsu on saturation with a floor, so a blank slide does not threshold its noise."""
    if sat.max() <= floor:
        return floor
    return max(int(threshold_otsu(sat)), floor)


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def close(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Bridge the thin gaps between tissue fragments (fat, tears)."""
    if radius_px < 1:
        return mask
    pad = radius_px + 1
    padded = np.pad(mask, pad)
    closed = ndi.binary_closing(padded, structure=_disk(radius_px))
    return closed[pad:-pad, pad:-pad]


def fill_holes(mask: np.ndarray, max_hole_px: int) -> np.ndarray:
    """Fill holes smaller than ``max_hole_px``; keep big ones (lumens, real gaps)."""
    holes = ~mask & ~_touching_border(~mask)
    lab, n = ndi.label(holes)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    small = sizes <= max_hole_px
    small[0] = False
    return mask | small[lab]


def remove_small(mask: np.ndarray, min_area_px: int) -> np.ndarray:
    """Drop specks and dust below ``min_area_px``."""
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_area_px
    keep[0] = False
    return keep[lab]


def _touching_border(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    keep = np.zeros(n + 1, bool)
    keep[border] = True
    keep[0] = False
    return keep[lab]


def tissue_mask(rgb: np.ndarray, mpp: float, cfg) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image whose pixels are ``mpp`` µm.

    saturation → median → threshold (Otsu with floor, or fixed) → minus dark
    and pen pixels → closing → hole filling → small-object removal.
    """
    um_px = lambda um: int(round(um / mpp))  # noqa: E731 - µm to mask pixels
    area_px = lambda um2: int(round(um2 / (mpp * mpp)))  # noqa: E731
    sat = saturation(rgb)
    k = um_px(cfg.median_um)
    if k >= 3:
        sat = ndi.median_filter(sat, size=k | 1)
    thr = cfg.sat_threshold if cfg.sat_threshold is not None else otsu_threshold(sat, cfg.sat_min)
    mask = sat > thr
    excluded = dark_mask(rgb, cfg.black_value)
    if cfg.remove_pen:
        excluded |= ndi.binary_dilation(pen_mask(rgb), iterations=2)
    mask &= ~excluded
    mask = close(mask, um_px(cfg.close_um))
    mask &= ~excluded  # closing must not bridge back into ink or borders
    mask = fill_holes(mask, area_px(cfg.max_hole_um2))
    return remove_small(mask, max(area_px(cfg.min_area_um2), 1))
