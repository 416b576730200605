"""The extractor controls' patch targets and probes (benchmarks/extractor_controls.py), as specifications."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # appended: benchmarks/fbta.py must not shadow the package

from extractor_controls import patch_targets, probe_auc, probe_auc_within  # noqa: E402


def test_detection_targets_are_tumour_vs_normal_and_leave_mixed_patches_out() -> None:
    shares = {"n1": np.array([0.0, 0.0]), "t1": np.array([0.0, 0.3, 0.9])}
    y = patch_targets(shares, {"n1": 0, "t1": 1}, {"n1": 2, "t1": 3})
    assert y["n1"].tolist() == [0, 0]
    assert y["t1"].tolist() == [0, -1, 1]  # a tumour-free patch of a tumour slide is normal tissue


def test_subtyping_targets_are_the_slides_subtype_on_tumour_patches_only() -> None:
    shares = {"a": np.array([0.0, 0.8]), "b": np.array([0.6, 0.1])}
    y = patch_targets(shares, {"a": 0, "b": 1}, {"a": 2, "b": 2})
    assert y["a"].tolist() == [-1, 0]
    assert y["b"].tolist() == [1, -1]


def _slides(rng: np.random.Generator, n_slides: int, per_slide: int, signal_dim: int) -> tuple:
    """Patches of ``n_slides`` slides whose class is readable along ``signal_dim`` only, plus per-slide offsets."""
    y = np.repeat(np.arange(n_slides) % 2, per_slide)
    groups = np.repeat(np.arange(n_slides), per_slide)
    x = rng.normal(size=(len(y), 6)) + rng.normal(scale=0.5, size=(n_slides, 6))[groups]
    x[:, signal_dim] += 2.0 * y
    return x, y, groups


def test_held_out_only_probe_reads_what_unseen_slides_carry_not_what_training_slides_taught() -> None:
    rng = np.random.default_rng(0)
    train_x, train_y, _ = _slides(rng, 20, 12, signal_dim=0)  # an extractor that made ITS slides separable on dim 0
    test_x, test_y, test_g = _slides(rng, 16, 12, signal_dim=1)  # unseen slides are separable on dim 1 only
    fitted_on_train = probe_auc((train_x, train_y), (test_x, test_y))
    within = probe_auc_within(test_x, test_y, test_g)
    assert fitted_on_train < 0.65
    assert within > 0.85


def test_held_out_only_probe_never_scores_a_slide_it_was_fitted_on() -> None:
    n_slides, per_slide = 16, 10
    y = np.repeat(np.arange(n_slides) % 2, per_slide)
    groups = np.repeat(np.arange(n_slides), per_slide)
    x = np.eye(n_slides)[groups] * 5.0  # each slide its own direction: memorisable, nothing shared across slides
    # fitted on patches of the scored slides this would be ~1.0; on other slides only, every score ties
    assert probe_auc_within(x, y, groups) == pytest.approx(0.5)


def test_held_out_only_probe_needs_two_slides_of_each_class_and_says_how_many_it_has() -> None:
    groups = np.repeat(np.arange(4), 10)
    with pytest.raises(ValueError, match=r"two slides of each class, has \[3, 1\]"):
        probe_auc_within(np.zeros((40, 3)), (groups == 3).astype(int), groups)
    # two slides a class: two folds, each scoring one slide of each class
    x = np.repeat(np.array([[0.0], [0.1], [1.0], [1.1]]), 10, axis=0)
    assert probe_auc_within(x, (groups >= 2).astype(int), groups) == pytest.approx(1.0)


def _patch_set(rng: np.random.Generator, n_slides: int, per_slide: int) -> "PatchSet":
    """Tiny patches whose class shows in their brightness; cached features that carry nothing (all zeros)."""
    import torch
    from extractor_controls import PatchSet

    y = np.repeat(np.arange(n_slides) % 2, per_slide)
    pixels = rng.integers(0, 140, size=(len(y), 32, 32, 3)) + 100 * y[:, None, None, None]
    return PatchSet(torch.as_tensor(pixels, dtype=torch.uint8), y, np.repeat(np.arange(n_slides), per_slide),
                    np.zeros((len(y), 4), dtype=np.float32))


def test_frozen_probe_is_encoded_at_the_sweeps_size_when_the_cached_features_are_at_another() -> None:
    from extractor_controls import frozen_patch_probes

    rng = np.random.default_rng(0)
    train, test = _patch_set(rng, 8, 4), _patch_set(rng, 8, 4)
    # cached at the sweep's size: the cached (empty) features are the baseline — nothing to read
    assert frozen_patch_probes("efficientnet_lite0", "random", {64}, 64, train, test) == (0.5, 0.5)
    # cached at 112 px, the sweep at 64: the frozen extractor is run at 64 px and sees the brightness
    fitted, heldout = frozen_patch_probes("efficientnet_lite0", "random", {112}, 64, train, test)
    assert fitted > 0.9 and heldout is not None and heldout > 0.9


def test_oracle_one_slide_bag_is_one_slide_and_a_mixed_bag_shares_its_slides_evenly_between_the_classes() -> None:
    from extractor_controls import _mixed_picks, _one_slide_picks

    by_class = {0: [f"a{i}" for i in range(10)], 1: [f"b{i}" for i in range(10)]}
    of_slide = {s: np.arange(k * 5, k * 5 + 5) for k, s in enumerate(by_class[0] + by_class[1])}
    slide_of = {int(i): s for s, ix in of_slide.items() for i in ix}
    rng = np.random.default_rng(0)
    for _ in range(20):
        one = _one_slide_picks(by_class, of_slide, 16, rng)
        assert len(one) == 16 and len({slide_of[int(i)] for i in one}) == 1
        mixed = _mixed_picks(by_class, of_slide, 16, 16, rng)
        slides = [slide_of[int(i)] for i in mixed]
        assert len(mixed) == 16 and len(set(slides)) == 16
        assert sum(s.startswith("a") for s in slides) == 8
        four = [slide_of[int(i)] for i in _mixed_picks(by_class, of_slide, 16, 4, rng)]  # fbta.extractor_every=4
        assert sorted(four.count(s) for s in set(four)) == [4, 4, 4, 4] and sum(s.startswith("a") for s in four) == 8
    few = {0: ["a0", "a1"], 1: ["b0"]}  # fewer slides than the class's share: slides repeat, the balance holds
    picks = [slide_of[int(i)] for i in _mixed_picks(few, of_slide, 6, 6, rng)]
    assert sum(s.startswith("a") for s in picks) == 3 and picks.count("b0") == 3
