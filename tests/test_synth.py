"""Specification of the embedded synthetic cohort (``fbta synth``).

The demo cohort stands in for a real one, so it must look like one to every
stage (Aperio files, MPP, pyramid, labels with splits, masks) and its class
signal must be sparse nuclear morphology — never colour or tissue amount.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from fbta.schema import SynthCfg
from fbta.synth import assign_labels, assign_splits, make_cohort, make_slide, write_aperio_tiff
from fbta.synth.cohort import slide_rng

openslide = pytest.importorskip("openslide")

W, H = 1024, 1280  # not square: masks must keep level 0's aspect ratio


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cohort")
    cfg = SynthCfg(n_slides=6, width=W, height=H, seed=11, tumour_contrast=1.0, style="drawn")  # full contrast
    records = make_cohort(cfg, root / "slides", root / "labels.csv", root / "masks", progress=False)
    arrays = [make_slide(slide_rng(cfg.seed, i), W, H, r["label"] == "tumour", cfg.tumour_fraction,
                         contrast=cfg.tumour_contrast) for i, r in enumerate(records)]
    return dict(cfg=cfg, root=root, records=records, arrays=arrays)


def read_labels(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_slide_opens_as_aperio_with_mpp_and_three_levels(cohort: dict) -> None:
    rec, (rgb, _, _) = cohort["records"][0], cohort["arrays"][0]
    slide = openslide.OpenSlide(rec["path"])
    props = slide.properties
    assert props["openslide.vendor"] == "aperio"
    assert float(props["openslide.mpp-x"]) == pytest.approx(cohort["cfg"].mpp)
    assert float(props["openslide.mpp-y"]) == pytest.approx(cohort["cfg"].mpp)
    assert props["openslide.objective-power"] == "20"
    assert slide.dimensions == (W, H)
    assert slide.level_count == 3
    assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    level0 = np.asarray(slide.read_region((0, 0), 0, (W, H)).convert("RGB")).astype(np.int16)
    err = np.abs(level0 - rgb)
    assert err.mean() < 3.0  # JPEG, nothing more
    assert np.abs(level0.mean(axis=(0, 1)) - rgb.mean(axis=(0, 1))).max() < 1.0


def test_writer_is_atomic_and_derives_objective_power(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (600, 520, 3), dtype=np.uint8)
    path = tmp_path / "x.svs"
    write_aperio_tiff(path, rgb, mpp=0.25)
    slide = openslide.OpenSlide(str(path))
    assert slide.properties["openslide.vendor"] == "aperio"
    assert slide.properties["openslide.objective-power"] == "40"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert slide.level_count == 3
    assert [p.name for p in tmp_path.iterdir()] == ["x.svs"]  # no temp file left behind


def test_same_seed_same_cohort_and_other_seed_differs(cohort: dict, tmp_path: Path) -> None:
    cfg = cohort["cfg"]
    again = make_cohort(cfg, tmp_path / "s", tmp_path / "labels.csv", None, progress=False)
    assert (tmp_path / "labels.csv").read_text() == (cohort["root"] / "labels.csv").read_text()
    assert [r["n_tumour_px"] for r in again] == [r["n_tumour_px"] for r in cohort["records"]]
    rgb0 = cohort["arrays"][2][0]
    rgb1, tissue1, tumour1 = make_slide(slide_rng(cfg.seed, 2), W, H, again[2]["label"] == "tumour", cfg.tumour_fraction)
    assert np.array_equal(rgb0, rgb1) and np.array_equal(cohort["arrays"][2][1], tissue1)
    other = make_slide(slide_rng(cfg.seed + 1, 2), W, H, again[2]["label"] == "tumour", cfg.tumour_fraction)[0]
    assert np.abs(other.astype(np.int16) - rgb0).mean() > 10


def test_labels_csv_has_both_classes_in_every_split(cohort: dict) -> None:
    rows = read_labels(cohort["root"] / "labels.csv")
    assert list(rows[0]) == ["slide_id", "label", "split"]
    assert [r["slide_id"] for r in rows] == [r["slide_id"] for r in cohort["records"]]
    assert {r["label"] for r in rows} == {"normal", "tumour"}
    assert sum(r["label"] == "tumour" for r in rows) == 3  # positive_fraction 0.5 of 6
    for split in ("train", "val", "test"):
        assert {r["label"] for r in rows if r["split"] == split} == {"normal", "tumour"}, split
    for rec in cohort["records"]:
        assert Path(rec["path"]).name == f"{rec['slide_id']}.svs"


def test_default_cohort_splits_are_stratified_and_deterministic() -> None:
    labels = assign_labels(24, 0.5, seed=0)
    splits = assign_splits(labels, 0.25, 0.25, seed=0)
    assert splits == assign_splits(labels, 0.25, 0.25, seed=0)
    assert labels == assign_labels(24, 0.5, seed=0) and labels != assign_labels(24, 0.5, seed=1)
    for cls in ("normal", "tumour"):
        counts = [sum(lab == cls and sp == split for lab, sp in zip(labels, splits)) for split in ("train", "val", "test")]
        assert counts == [6, 3, 3]


def test_masks_match_level0_and_mark_tumour_inside_tissue(cohort: dict) -> None:
    ds = cohort["cfg"].mask_downsample
    for rec, (_, tissue, tumour) in zip(cohort["records"], cohort["arrays"]):
        mask = np.asarray(Image.open(cohort["root"] / "masks" / f"{rec['slide_id']}.png"))
        assert mask.dtype == np.uint8 and mask.shape == (-(-H // ds), -(-W // ds))
        assert mask.shape[1] / mask.shape[0] == pytest.approx(W / H, rel=0.02)
        assert set(np.unique(mask)) <= {0, 255}
        if rec["label"] == "normal":
            assert not mask.any() and not tumour.any() and rec["n_tumour_px"] == 0
            continue
        assert mask.any()
        assert rec["tumour_fraction"] == pytest.approx(cohort["cfg"].tumour_fraction, abs=0.04)
        assert not (tumour & ~tissue).any()
        tissue_small = tissue.reshape(H // ds, ds, W // ds, ds).any(axis=(1, 3))
        assert not ((mask > 0) & ~tissue_small).any()
        assert ndi.label(mask > 0)[1] <= 6  # a few compact regions, not confetti


def test_tissue_area_is_matched_between_classes(cohort: dict) -> None:
    frac = {lab: [r["tissue_fraction"] for r in cohort["records"] if r["label"] == lab] for lab in ("normal", "tumour")}
    for values in frac.values():
        assert all(0.35 < v < 0.65 for v in values)
    assert abs(np.mean(frac["tumour"]) - np.mean(frac["normal"])) < 0.08


def nuclear_blob_areas(rgb: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Areas of dark (hematoxylin) blobs whose centre lies in ``region``."""
    red = ndi.gaussian_filter(rgb[..., 0].astype(np.float32), 1.0)
    lab, n = ndi.label(red < 150)
    idx = np.arange(1, n + 1)
    areas = ndi.sum_labels(np.ones_like(red), lab, idx)
    cy, cx = np.array(ndi.center_of_mass(np.ones_like(red), lab, idx)).round().astype(int).T
    return areas[(areas >= 20) & region[cy, cx]]


def test_tumour_differs_in_nuclear_texture_not_in_colour() -> None:
    """The same seed as positive and negative slide differs only inside the tumour,
    and there only in nuclear morphology: mean colour within a few grey levels,
    nuclear blobs clearly larger."""
    d_rgb, d_sat, area_t, area_n = [], [], [], []
    for seed in range(3):
        rng = [seed, 99]
        pos, tissue, tumour = make_slide(np.random.default_rng(rng), 1024, 1024, True, 0.3)
        neg, tissue_neg, tumour_neg = make_slide(np.random.default_rng(rng), 1024, 1024, False, 0.3)
        assert np.array_equal(tissue, tissue_neg) and not tumour_neg.any()
        far = ~ndi.binary_dilation(tumour, iterations=32)
        assert np.array_equal(pos[far], neg[far])  # nothing but the tumour changes
        region = ndi.binary_erosion(tumour, iterations=8)
        a, b = pos[region].astype(np.float64), neg[region].astype(np.float64)
        d_rgb.append(a.mean(axis=0) - b.mean(axis=0))
        sat = [((x.max(1) - x.min(1)) / x.max(1)).mean() for x in (a, b)]  # HSV saturation
        d_sat.append(sat[0] - sat[1])
        area_t.append(nuclear_blob_areas(pos, region))
        area_n.append(nuclear_blob_areas(neg, region))
    assert np.abs(d_rgb).max() < 4.0, d_rgb  # each slide
    assert np.abs(np.mean(d_rgb, axis=0)).max() < 2.0, d_rgb  # on average
    assert abs(np.mean(d_sat)) < 0.02
    area_t, area_n = np.concatenate(area_t), np.concatenate(area_n)
    assert len(area_t) > 100 and len(area_n) > 100
    assert np.median(area_t) > 1.5 * np.median(area_n)


def test_negative_slides_carry_no_tumour_pattern() -> None:
    rgb, tissue, tumour = make_slide(np.random.default_rng(5), 1024, 1024, False, 0.3)
    assert not tumour.any()
    area = nuclear_blob_areas(rgb, ndi.binary_erosion(tissue, iterations=24))
    assert np.percentile(area, 90) < 260  # only small round nuclei (and lymphocytes, fibroblasts)


def test_pen_marks_and_borders_stay_off_tissue() -> None:
    ink_seen = dark_seen = False
    for seed in range(8):
        rgb, tissue, _ = make_slide(np.random.default_rng([seed, 3]), 768, 768, False, 0.0)
        r, g, b = (rgb[..., c].astype(np.int16) for c in range(3))
        ink = (b - r > 80) | (g - r > 30)
        dark = rgb.max(axis=-1) < 36  # the strip is 22-30 grey; stained tissue stays brighter
        ink_seen |= bool(ink.any())
        dark_seen |= bool(dark.any())
        near_tissue = ndi.binary_dilation(tissue, iterations=8)
        assert not (ink & near_tissue).any() and not (dark & near_tissue).any()
        assert rgb[~near_tissue & ~ink & ~dark].min(axis=-1).mean() > 225  # white glass
        assert 0.35 < tissue.mean() < 0.65
    assert ink_seen and dark_seen  # the artefacts do occur in a small cohort
