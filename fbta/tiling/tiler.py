"""Tile one slide: tissue mask at low resolution → patch grid at the target MPP.

``tile_slide`` returns level-0 coordinates plus the CLAM and TRIDENT
attributes that let other tools read the patches back.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from fbta.slides.reader import Slide, SlideError, read_size_for
from fbta.tiling.grid import Grid, tissue_fraction
from fbta.tiling.tissue import tissue_mask


@dataclass
class Tiling:
    coords: np.ndarray  # N×2 int64, level-0 top-left (x, y)
    attrs: dict[str, Any]
    mask: np.ndarray  # tissue mask at ``mask_scale`` level-0 px per pixel
    mask_scale: float
    fractions: np.ndarray = field(default_factory=lambda: np.zeros(0))


def params_hash(tissue_cfg: Any, tile_cfg: Any, mpp_inputs: tuple[Optional[float], Optional[float]]) -> str:
    """Fingerprint of everything that changes coordinates (thumbnail size excluded)."""
    from omegaconf import OmegaConf

    tile = {k: v for k, v in OmegaConf.to_container(tile_cfg).items() if k != "thumbnail_px"}
    blob = json.dumps([OmegaConf.to_container(tissue_cfg), tile, list(mpp_inputs)], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def tile_slide(slide: Slide, tissue_cfg: Any, tile_cfg: Any) -> Tiling:
    """Coordinates of tissue patches of ``tile_cfg.patch_size`` px at ``tile_cfg.target_mpp``."""
    if slide.mpp > tile_cfg.target_mpp * (1 + tile_cfg.level_tolerance):
        raise SlideError(
            f"{slide.path}: scanned at {slide.mpp:.3f} µm/px, coarser than tile.target_mpp={tile_cfg.target_mpp}; "
            "lower the target magnification"
        )
    want = tile_cfg.target_mpp / slide.mpp
    level = slide.best_level(want, tile_cfg.level_tolerance)
    lvl = slide.levels[level]
    read_size = read_size_for(tile_cfg.patch_size, want, lvl.downsample, tile_cfg.level_tolerance)
    grid = Grid.for_read(tile_cfg.patch_size, tile_cfg.overlap, read_size, lvl.downsample)
    w0, h0 = slide.dimensions
    if w0 < grid.patch_size_level0 or h0 < grid.patch_size_level0:
        raise SlideError(
            f"{slide.path}: slide is {w0}×{h0} px, smaller than one patch ({grid.patch_size_level0:.0f} px at level 0)"
        )
    low, scale = slide.read_at_mpp(tissue_cfg.mask_mpp)
    mask = tissue_mask(low, slide.mpp * scale, tissue_cfg)
    cand = grid.candidates(w0, h0)
    frac = tissue_fraction(mask, cand, grid.patch_size_level0, scale)
    keep = frac >= tile_cfg.min_tissue
    attrs = {
        # CLAM
        "patch_size": int(tile_cfg.patch_size),
        "patch_level": int(level),
        "downsample": np.array([lvl.downsample, lvl.downsample], np.float64),
        "level_dim": np.array([lvl.width, lvl.height], np.int64),
        "downsampled_level_dim": np.array([lvl.width, lvl.height], np.int64),
        "name": slide.slide_id,
        # TRIDENT
        "patch_size_level0": int(round(grid.patch_size_level0)),
        "level0_magnification": int(round(10.0 / slide.mpp)),
        "target_magnification": int(round(10.0 / tile_cfg.target_mpp)),
        "overlap": int(tile_cfg.overlap),
        # fbta
        "mpp": float(slide.mpp),
        "mpp_source": slide.mpp_source,
        "target_mpp": float(tile_cfg.target_mpp),
        "level_patch_size": int(read_size),  # pixels to read at patch_level, then resize to patch_size
        "min_tissue": float(tile_cfg.min_tissue),
        "vendor": slide.vendor,
    }
    return Tiling(cand[keep], attrs, mask, scale, frac[keep])
