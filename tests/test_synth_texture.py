"""The real-texture demo cohort (synth.style=texture): CMU-1 H&E mosaic, tumour cytology, per-slide stain."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from fbta.schema import SynthCfg
from fbta.synth import make_cohort
from fbta.synth.cohort import slide_rng
from fbta.synth.texture import SOURCE, load_source, make_texture_slide, to_od


def test_source_ships_with_the_package_and_has_tissue_windows() -> None:
    rgb, corners = load_source()
    assert SOURCE.is_file() and rgb.shape[2] == 3 and len(corners) > 100


def test_missing_source_names_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_source(str(tmp_path / "nope.jpg"))


def test_same_seed_positive_and_negative_differ_only_inside_the_tumour() -> None:
    pos, tissue, tumour = make_texture_slide(slide_rng(3, 1), 1024, 1024, True, 0.4, strength=0.5)
    neg, tissue_neg, tumour_neg = make_texture_slide(slide_rng(3, 1), 1024, 1024, False, 0.4, strength=0.5)
    assert np.array_equal(tissue, tissue_neg) and not tumour_neg.any()
    assert 0.25 < tumour.sum() / tissue.sum() < 0.55 and not (tumour & ~tissue).any()
    far = ~ndi.binary_dilation(tumour, iterations=16)
    assert np.array_equal(pos[far], neg[far])
    inner = ndi.binary_erosion(tumour, iterations=8)
    h_pos, h_neg = to_od(pos[inner][None])[0, :, 0], to_od(neg[inner][None])[0, :, 0]
    e_pos, e_neg = to_od(pos[inner][None])[0, :, 1], to_od(neg[inner][None])[0, :, 1]
    assert h_pos.mean() > 1.2 * h_neg.mean()  # hyperchromatic, enlarged nuclei
    assert e_pos.mean() < e_neg.mean()  # paler eosin


def test_tumour_borders_are_ragged_so_many_patches_are_partly_tumour() -> None:
    _, tissue, tumour = make_texture_slide(slide_rng(0, 4), 2048, 2048, True, 0.5)
    shares = []
    for y in range(0, 2048, 256):
        for x in range(0, 2048, 256):
            if tissue[y:y + 256, x:x + 256].mean() > 0.5:
                shares.append(tumour[y:y + 256, x:x + 256].mean())
    shares = np.array(shares)
    partial = ((shares > 0.05) & (shares < 0.95)).sum()
    assert partial >= 0.2 * (shares > 0.05).sum(), shares


def test_stain_differs_between_slides() -> None:
    means = [make_texture_slide(slide_rng(0, i), 768, 768, False, 0.0)[0] for i in range(4)]
    tissue_means = [to_od(m.reshape(1, -1, 3))[0].mean(0)[:2] for m in means]
    assert np.ptp(np.array(tissue_means)[:, 0]) > 0.02  # haematoxylin density varies slide to slide


def test_cohort_defaults_to_texture_and_is_deterministic(tmp_path) -> None:
    cfg = SynthCfg(n_slides=2, width=768, height=768, seed=5, tumour_fraction=0.5)
    assert cfg.style == "texture"
    a = make_cohort(cfg, tmp_path / "a", tmp_path / "a.csv", tmp_path / "am", progress=False)
    b = make_cohort(cfg, tmp_path / "b", tmp_path / "b.csv", tmp_path / "bm", progress=False)
    assert [r["n_tumour_px"] for r in a] == [r["n_tumour_px"] for r in b]
    assert (tmp_path / "a" / "synth_000.svs").read_bytes() == (tmp_path / "b" / "synth_000.svs").read_bytes()
    with pytest.raises(ValueError, match="synth.style"):
        make_cohort(SynthCfg(n_slides=1, width=256, height=256, style="paint"), tmp_path / "c", tmp_path / "c.csv",
                    None, progress=False)


def test_subtypes_carry_the_same_tumour_and_differ_only_in_its_nuclei() -> None:
    """synth.design=subtyping: both classes have tumour in the same place (masks for both); subtype_b's nuclei
    are vesicular (a pale core inside the rim), so inside the tumour its darkest nuclear haematoxylin is
    lower while the tissue's median stays put — and outside the tumour the two slides are identical."""
    a, tissue_a, tumour_a = make_texture_slide(slide_rng(3, 2), 1024, 1024, False, 0.7, strength=0.3,
                                               subtype_delta=0.5)
    b, tissue_b, tumour_b = make_texture_slide(slide_rng(3, 2), 1024, 1024, True, 0.7, strength=0.3,
                                               subtype_delta=0.5)
    assert np.array_equal(tumour_a, tumour_b) and tumour_a.sum() > 0.5 * tissue_a.sum()
    far = ~ndi.binary_dilation(tumour_a, iterations=16)
    assert np.array_equal(a[far], b[far])
    inner = ndi.binary_erosion(tumour_a, iterations=8)
    h_a, h_b = to_od(a)[..., 0][inner], to_od(b)[..., 0][inner]
    assert np.percentile(h_b, 99) < 0.9 * np.percentile(h_a, 99)  # paler nuclear cores
    assert abs(np.median(h_b) - np.median(h_a)) < 0.1 * np.median(h_a)  # a subtle change, not a colour shift
    same, _, _ = make_texture_slide(slide_rng(3, 2), 1024, 1024, True, 0.7, strength=0.3, subtype_delta=0.0)
    assert np.abs(same.astype(int) - a.astype(int)).max() <= 1  # delta 0: the subtypes are one (up to rounding)


def test_a_subtyping_cohort_labels_two_subtypes_and_masks_both(tmp_path) -> None:
    cfg = SynthCfg(n_slides=4, width=640, height=640, design="subtyping", subtype_delta=0.4, tumour_fraction=0.6)
    rows = make_cohort(cfg, tmp_path / "slides", tmp_path / "labels.csv", tmp_path / "masks", progress=False)
    assert sorted({r["label"] for r in rows}) == ["subtype_a", "subtype_b"]
    assert all(r["n_tumour_px"] > 0 for r in rows)
