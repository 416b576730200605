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
    """Green, blue, red and violet marker ink: colours H&E does not reach at mask resolution.

    Green: G clearly above R and B. Blue: B well above both R and G (hematoxylin is
    purple, B only slightly above R). Red and violet lie on the eosin and
    hematoxylin hues but with far less green: on the real CMU-1 slide at 4 µm/px
    no tissue pixel has G < 0.265·R (red blood cells come closest) or, where B > R,
    G < 0.648·min(R, B) (the darkest nuclei); ink sits at ~0.2–0.45. Red blood
    cells flagged inside tissue are filled back as holes by ``tissue_mask``.
    """
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    green = (g > r + 15) & (g > b + 10)  # not g ≥ b − 5: bluish-grey tissue (101, 149, 153) has G ≈ B > R
    blue = (b > r + 50) & (b > g + 25)
    red = (r > 120) & (10 * g < 3 * r) & (100 * b < 45 * r)
    violet = (b > 120) & (r > 70) & (b > r + 25) & (2 * g < np.minimum(r, b))
    return green | blue | red | violet


def thin_tissue(sat: np.ndarray, floor: int, window_px: int, min_density: float, cell_px: int) -> np.ndarray:
    """Fat and loose connective tissue: a dense net of thin, faintly stained strands.

    Adipocytes are 50–150 µm empty vacuoles framed by few-µm pink septa; at mask
    resolution a septum is one pale pixel, which the median filter erases, so
    fat comes out as glass. Here the raw saturation above ``floor`` (glass stays
    below it) is counted in a ``window_px`` box: where at least ``min_density``
    of the pixels are strands, the strands and the vacuoles they enclose (holes
    up to ``cell_px``) are tissue — not the glass the box reaches past the net's
    edge. Glass noise and sparse dust stay far below that density.
    """
    if window_px < 3:
        return np.zeros(sat.shape, bool)
    strands = sat > floor
    dense = ndi.uniform_filter(strands.astype(np.float32), size=window_px, mode="constant") >= min_density
    # the net and the vacuoles it encloses (holes up to ``cell_px``), not the glass the box reaches past it
    return dense & fill_holes(strands, cell_px)


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

    saturation → median → threshold (Otsu with floor, or fixed), plus thin
    tissue (fat septa) → minus dark and pen pixels → closing → hole filling →
    small-object removal.
    """
    um_px = lambda um: int(round(um / mpp))  # noqa: E731 - µm to mask pixels
    area_px = lambda um2: int(round(um2 / (mpp * mpp)))  # noqa: E731
    sat = raw = saturation(rgb)
    k = um_px(cfg.median_um)
    if k >= 3:
        sat = ndi.median_filter(sat, size=k | 1)
    thr = cfg.sat_threshold if cfg.sat_threshold is not None else otsu_threshold(sat, cfg.sat_min)
    mask = sat > thr
    excluded = dark_mask(rgb, cfg.black_value)
    if cfg.remove_pen:
        excluded |= ndi.binary_dilation(pen_mask(rgb), iterations=2)
    if cfg.thin_um > 0:  # strands outside solid tissue, ink and borders only: none of those may widen the mask
        halo = ndi.binary_dilation(excluded, iterations=max(um_px(cfg.thin_um) // 2, 1))
        thin = thin_tissue(np.where(mask | halo, 0, raw), cfg.sat_min, um_px(cfg.thin_um), cfg.thin_density,
                           area_px(cfg.thin_cell_um2))
        mask |= thin & ~halo
    mask &= ~excluded
    mask = close(mask, um_px(cfg.close_um))
    mask &= ~excluded  # closing must not bridge back into ink or borders
    mask = fill_holes(mask, area_px(cfg.max_hole_um2))
    return remove_small(mask, max(area_px(cfg.min_area_um2), 1))
