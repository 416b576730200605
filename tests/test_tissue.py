"""Tissue detection, one filter per behaviour: what counts as tissue and what does not."""
from __future__ import annotations

import numpy as np
import pytest

from fbta.schema import TissueCfg
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


# -- issue #20: red/violet ink, fat, and the real slide ----------------------------------------------------


@pytest.mark.parametrize("ink", [(200, 45, 65), (150, 30, 50), (120, 55, 170), (100, 40, 140)],
                         ids=["red", "dark-red", "violet", "purple"])
def test_red_and_violet_pen_strokes_on_glass_are_not_tissue(ink):
    """The case from the field: a tile of marker strokes on glass came out 54 % tissue."""
    rng = np.random.default_rng(0)
    img = np.clip(242 + rng.normal(0, 2, (200, 300, 3)), 0, 255).astype(np.uint8)
    for y in range(20, 180, 40):  # four hand-drawn-ish strokes
        img[y:y + 10, 20:280] = np.clip(np.array(ink) + rng.integers(-8, 8, (10, 260, 3)), 0, 255)
    assert tissue_mask(img, MPP, CFG).mean() < 0.01


def test_the_real_slide_keeps_its_tissue_under_every_ink_rule(real_slide):
    """No H&E pixel of the real CMU-1 slide reads as ink (bluish-grey fibres once did, as 'green')."""
    from fbta.slides.reader import open_slide

    with open_slide(real_slide) as s:
        img, ds = s.read_at_mpp(MPP)
    with_pen = tissue_mask(img, s.mpp * ds, CFG)
    without = tissue_mask(img, s.mpp * ds, TissueCfg(remove_pen=False))
    assert (without & ~with_pen).sum() < 0.001 * without.sum()
    assert pen_mask(img)[without].mean() < 0.001


def adipose(shape_um: tuple[int, int], cell_um: int = 70, septum_um: int = 4, seed: int = 0) -> np.ndarray:
    """Fat at 1 µm/px: empty Voronoi vacuoles framed by thin pink septa, on white."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    h, w = shape_um
    seeds = np.zeros((h, w), np.int32)
    n = h * w // cell_um ** 2
    seeds[rng.integers(0, h, n), rng.integers(0, w, n)] = np.arange(1, n + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    cells = seeds[iy, ix]
    septa = (cells != np.roll(cells, 1, 0)) | (cells != np.roll(cells, 1, 1))
    septa = ndi.binary_dilation(septa, iterations=septum_um // 2)
    img = np.full((h, w, 3), (244, 244, 246), np.float32)
    img[septa] = (225, 140, 180)
    return img + rng.normal(0, 2, img.shape)


def test_pale_fat_is_tissue_though_its_septa_are_one_pixel_at_mask_resolution():
    full = np.full((1600, 2400, 3), 244.0) + np.random.default_rng(1).normal(0, 2, (1600, 2400, 3))
    full[200:1400, 400:2000] = adipose((1200, 1600))
    low = np.clip(full.reshape(400, 4, 600, 4, 3).mean((1, 3)), 0, 255).astype(np.uint8)  # the 4 µm/px level
    fat = truth((400, 600), (100, 50, 500, 350))
    assert iou(tissue_mask(low, MPP, CFG), fat) > 0.8
    assert not tissue_mask(low, MPP, TissueCfg(thin_um=0)).any()  # what the median filter alone leaves
    assert not (tissue_mask(low, MPP, CFG) & ~fat).any()  # the glass around it stays glass


def test_dust_on_glass_is_not_a_net_of_strands():
    rng = np.random.default_rng(2)
    img = np.clip(242 + rng.normal(0, 3, (300, 300, 3)), 0, 255).astype(np.uint8)
    ys, xs = rng.integers(0, 300, 150), rng.integers(0, 300, 150)  # sparse specks, 1 px each
    img[ys, xs] = (200, 150, 170)
    assert not tissue_mask(img, MPP, CFG).any()


def test_red_ink_starts_strictly_above_r_120_and_the_closing_disk_includes_its_rim() -> None:
    """Exact boundaries (survivors of `make mutate`). Defects guarded: `r ≥ 120` flags darker red-brown tissue
    as ink; a disk without its rim (`<` for `≤`) closes gaps one pixel narrower than `tissue.close_um` says."""
    from fbta.tiling.tissue import _disk

    px = np.array([[[120, 30, 40], [121, 30, 40]]], np.uint8)  # G < 0.3 R and B < 0.45 R: red ink hues
    assert pen_mask(px).tolist() == [[False, True]]
    assert _disk(2).astype(int).tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0],
                                             [0, 0, 1, 0, 0]]
    assert _disk(0).tolist() == [[True]]


def test_background_open_to_any_image_edge_is_never_a_hole_however_small() -> None:
    """Survivors of `make mutate`: the left edge's column not checked (a 1-px strip of glass along it would be
    filled as a hole), or edge-touching background treated as holes everywhere (glass around a small piece of
    tissue filled in)."""
    m = np.ones((40, 40), bool)
    m[5:35, 0] = False  # glass touching the left edge only (not the top or bottom row)
    assert not fill_holes(m, max_hole_px=10_000)[5:35, 0].any()
    piece = np.zeros((40, 40), bool)
    piece[10:30, 10:30] = True
    assert (fill_holes(piece, max_hole_px=10_000) == piece).all()


def test_dark_debris_stays_excluded_when_pen_ink_is_removed_too() -> None:
    """Defect guarded (a `make mutate` survivor): the pen-ink exclusion assigned instead of added, so dark,
    saturated debris (every channel below black_value) came back as tissue whenever the slide had ink."""
    box = (60, 40, 200, 160)
    img = pink_on_white(300, 200, box)
    img[60:140, 20:50] = (38, 4, 20)  # dark red debris on glass: saturated, every channel < 40
    img[30:170, 240:255] = (20, 150, 60)  # green ink elsewhere
    mask = tissue_mask(img, MPP, CFG)
    assert not mask[60:140, 20:50].any() and not mask[:, 235:260].any()
    assert iou(mask, truth((200, 300), box)) > 0.9
