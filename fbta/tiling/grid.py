"""The patch grid: level-0 coordinates of tissue patches at a target MPP.

Cheap by design: coordinates come from the low-resolution tissue mask with a
summed-area table, so no level-0 pixel is read while tiling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """Geometry of the patch grid, in level-0 pixels."""

    patch_size: int  # output pixels at target_mpp
    patch_size_level0: float  # the same patch in level-0 pixels
    stride_level0: float

    @classmethod
    def for_read(cls, patch_size: int, overlap: int, read_size: int, level_downsample: float) -> "Grid":
        """Grid whose level-0 footprint is exactly what is read: ``read_size`` px at the level.

        Deriving the footprint from the read (not from target/mpp) snaps a 0.499 µm/px
        slide to 256-px steps at 0.5 µm/px instead of reading 256.5 px and blurring.
        """
        if not 0 <= overlap < patch_size:
            raise ValueError(f"tile.overlap must be in [0, patch_size), got {overlap}")
        scale = read_size * level_downsample / patch_size  # level-0 px per output px
        return cls(patch_size, read_size * level_downsample, (patch_size - overlap) * scale)

    def candidates(self, width0: int, height0: int) -> np.ndarray:
        """Top-left corners of every patch lying fully inside the slide (M×2 int64)."""
        ps = self.patch_size_level0
        xs = np.arange(0, width0 - ps + 1e-6, self.stride_level0)
        ys = np.arange(0, height0 - ps + 1e-6, self.stride_level0)
        gx, gy = np.meshgrid(np.floor(xs), np.floor(ys))
        return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)


def tissue_fraction(mask: np.ndarray, coords0: np.ndarray, size0: float, scale: float) -> np.ndarray:
    """Fraction of each patch's footprint that is tissue in ``mask``.

    ``scale`` = level-0 pixels per mask pixel. Uses a summed-area table, with
    footprints snapped to whole mask pixels (at least one).
    """
    if len(coords0) == 0:
        return np.zeros(0)
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0 = np.clip(np.round(coords0[:, 0] / scale).astype(int), 0, w - 1)
    y0 = np.clip(np.round(coords0[:, 1] / scale).astype(int), 0, h - 1)
    side = max(int(round(size0 / scale)), 1)
    x1, y1 = np.clip(x0 + side, 1, w), np.clip(y0 + side, 1, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return inside / area
