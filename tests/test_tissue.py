"""Tissue detection, one filter per behaviour: what counts as tissue and what does not."""
from __future__ import annotations

import numpy as np
import pytest

from fbta.config import TissueCfg
from fbta.tiling.tissue import fill_holes, pen_mask, remove_small, tissue_mask

from conftest import pink_on_white

MPP = 4.0  # µm per mask pixel, the default tissue.mask_mpp
CFG = TissueCfg()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


def truth(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros(shape, bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = np.clip(240 + rng.normal(0, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass, MPP, CFG).any()


def test_a_piece_of_tissue_on_white_is_found():
    box = (60, 40, 240, 160)
    mask = tissue_mask(pink_on_white(300, 200, box), MPP, CFG)
    assert iou(mask, truth((200, 300), box)) > 0.9


def test_black_border_is_not_tissue():
    box = (60, 40, 240, 160)
    img = pink_on_white(300, 200, box)
    img[:, :15] = 10  # scanner edge
    mask = tissue_mask(img, MPP, CFG)
    assert not mask[:, :15].any() and iou(mask, truth((200, 300), box)) > 0.9


@pytest.mark.parametrize("ink", [(20, 150, 60), (30, 50, 190)], ids=["green", "blue"])
def test_pen_marks_on_glass_are_not_tissue(ink):
    box = (60, 40, 200, 160)
    img = pink_on_white(300, 200, box)
    img[30:170, 240:255] = ink
    mask = tissue_mask(img, MPP, CFG)
    assert not mask[:, 235:260].any()
    assert pen_mask(img)[30:170, 240:255].all() and not pen_mask(img)[50:150, 70:190].any()


def test_hematoxylin_purple_is_not_mistaken_for_pen():
    purple = np.zeros((10, 10, 3), np.uint8) + np.array([110, 60, 160], np.uint8)
    assert not pen_mask(purple).any()


def test_specks_are_removed_and_small_holes_filled_but_lumens_kept():
    m = np.zeros((100, 100), bool)
    m[10:90, 10:90] = True
    m[40:43, 40:43] = False  # small hole: filled
    m[60:80, 20:40] = False  # big lumen: kept
    m[2:4, 95:97] = True  # speck: removed
    out = remove_small(fill_holes(m, max_hole_px=50), min_area_px=20)
    assert out[41, 41] and not out[70, 30] and not out[3, 96]


def test_sizes_are_physical_so_small_crops_keep_their_tissue():
    """A 0.3 mm piece survives at any mask resolution (CLAM's pixel areas would drop it)."""
    for mpp in (2.0, 4.0, 8.0):
        side = int(300 / mpp)
        img = pink_on_white(side * 3, side * 3, (side, side, 2 * side, 2 * side))
        assert tissue_mask(img, mpp, CFG).sum() > 0.8 * side * side
