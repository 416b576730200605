"""Metrics (fbta.mil.metrics) agree with scikit-learn; metrics.json is merged, never clobbered; splits behave."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from fbta.config import InputError
from fbta.io.metrics import publish_metrics, rebuild_metrics
from fbta.mil.heatmap import localisation, normalise, patch_fraction_inside
from fbta.mil.metrics import accuracy, binary_auc, confusion_matrix, macro_f1, roc_auc, roc_points, score
from fbta.mil.splits import SplitParams, draw, fold_assignment, resolve_split
from fbta.slides.cohort import CohortError, SlideEntry

rng = np.random.default_rng(0)


def test_binary_auc_matches_sklearn_including_ties() -> None:
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        s = rng.integers(0, 5, 40).astype(float)  # many ties
        assert binary_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert binary_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert binary_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0


def test_auc_is_undefined_not_an_exception_when_one_class_is_missing() -> None:
    assert math.isnan(binary_auc([1, 1, 1], [0.2, 0.5, 0.9]))
    assert math.isnan(roc_auc(np.array([0, 0]), np.array([[0.6, 0.4], [0.3, 0.7]])))


def test_binary_roc_auc_uses_the_second_class_probability() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    y = np.array([0, 1, 1, 0])
    assert roc_auc(y, probs) == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))


def test_multiclass_auc_is_one_vs_rest_macro_like_sklearn() -> None:
    for _ in range(10):
        y = np.concatenate([np.arange(4), rng.integers(0, 4, 36)])
        p = rng.dirichlet(np.ones(4), 40)
        assert roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_multiclass_auc_skips_classes_absent_from_the_truth() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])  # class 2 never occurs
    p = rng.dirichlet(np.ones(3), 6)
    expected = np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in (0, 1)])
    assert roc_auc(y, p) == pytest.approx(expected)


def test_accuracy_macro_f1_and_confusion_match_sklearn() -> None:
    for _ in range(10):
        y, q = rng.integers(0, 3, 30), rng.integers(0, 3, 30)
        assert accuracy(y, q) == pytest.approx(skm.accuracy_score(y, q))
        assert macro_f1(y, q, 3) == pytest.approx(skm.f1_score(y, q, average="macro"))
        assert (confusion_matrix(y, q, 3) == skm.confusion_matrix(y, q, labels=[0, 1, 2])).all()
    # a class never predicted nor present is not averaged in (sklearn's default labels)
    assert macro_f1([0, 1, 1], [0, 1, 0], 3) == pytest.approx(skm.f1_score([0, 1, 1], [0, 1, 0], average="macro"))


def test_score_bundles_auc_acc_f1_and_cross_entropy() -> None:
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    s = score(np.array([0, 1, 0]), probs)
    assert s.auc == pytest.approx(skm.roc_auc_score([0, 1, 0], probs[:, 1]))
    assert s.acc == pytest.approx(2 / 3) and s.n == 3
    assert s.loss == pytest.approx(skm.log_loss([0, 1, 0], probs))


def test_roc_points_binary_and_one_vs_rest() -> None:
    y = np.array([0, 1, 0, 1])
    pts = roc_points(y, np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]), ["normal", "tumour"])
    assert {p["class"] for p in pts} == {"tumour"} and pts[0]["fpr"] == 0.0 and pts[-1]["tpr"] == 1.0
    pts3 = roc_points(np.array([0, 1, 2, 2]), rng.dirichlet(np.ones(3), 4), ["a", "b", "c"])
    assert {p["class"] for p in pts3} == {"a", "b", "c"}


def test_metrics_json_is_the_merge_of_the_fragments_and_a_broken_fragment_is_named(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    publish_metrics(reports, "seg_teacher", {"segmentation": {"teacher": {"f1": 0.8}}})
    publish_metrics(reports, "evaluate_vanilla", {"classification": {"vanilla": {"auc": 0.9}}})
    publish_metrics(reports, "infer_fbta", {"classification": {"vanilla": {"acc": 0.7}, "fbta": {"auc": 0.95}}})
    assert json.loads((reports / "metrics.json").read_text()) == {
        "segmentation": {"teacher": {"f1": 0.8}},
        "classification": {"vanilla": {"auc": 0.9, "acc": 0.7}, "fbta": {"auc": 0.95}},
    }
    (reports / "metrics" / "infer_fbta.json").unlink()  # a stage removed: its keys go with it
    assert rebuild_metrics(reports)["classification"] == {"vanilla": {"auc": 0.9}}
    (reports / "metrics" / "seg_teacher.json").write_text("{not json")
    before = (reports / "metrics.json").read_text()
    with pytest.raises(InputError, match="seg_teacher.json: not valid JSON"):
        publish_metrics(reports, "evaluate_vanilla", {"classification": {"vanilla": {"auc": 0.8}}})
    assert (reports / "metrics.json").read_text() == before  # nothing half-merged


def entries(n_per_class: dict[str, int], **extra) -> dict[str, SlideEntry]:
    out = {}
    for label, n in n_per_class.items():
        for i in range(n):
            sid = f"{label}_{i:02d}"
            out[sid] = SlideEntry(sid, Path(sid), label=label, **extra)
    return out


def test_drawn_split_is_stratified_seeded_and_keeps_every_class_in_train() -> None:
    params = SplitParams(None, 5, 0.2, 0.2, seed=3)
    cohort = entries({"a": 10, "b": 5, "c": 3})
    rows = draw(cohort, params)
    assert rows == draw(cohort, params)  # same seed, same split
    assert rows != draw(cohort, SplitParams(None, 5, 0.2, 0.2, seed=4))
    for label, n_test in (("a", 2), ("b", 1), ("c", 1)):
        parts = [r["split"] for r in rows.values() if r["label"] == label]
        assert parts.count("test") == n_test and parts.count("val") >= 1 and parts.count("train") >= 1
    folds = [int(r["fold"]) for r in rows.values()]
    assert sorted(set(folds)) == [0, 1, 2, 3, 4] and max(map(folds.count, set(folds))) - min(
        map(folds.count, set(folds))) <= 1


def test_fold_k_tests_on_k_and_validates_on_the_next_fold() -> None:
    folds = {"s0": 0, "s1": 1, "s2": 2, "s3": 0, "s4": 1, "s5": 2}
    assert fold_assignment(folds, 2) == {"s0": "val", "s1": "train", "s2": "test", "s3": "val", "s4": "train",
                                         "s5": "test"}
    with pytest.raises(CohortError, match="train.fold=7"):
        fold_assignment(folds, 7)


def test_labels_csv_split_column_wins_and_must_be_complete(tmp_path: Path) -> None:
    cohort = entries({"a": 3, "b": 3}, split="train")
    cohort["a_00"] = SlideEntry("a_00", Path("a_00"), label="a", split="test")
    split = resolve_split(cohort, "labels.csv", tmp_path, SplitParams(None, 5, 0.2, 0.2, 0))
    assert split.ids("test") == ["a_00"] and "column split" in split.source
    assert not (tmp_path / "splits").exists()  # nothing drawn
    cohort["b_00"] = SlideEntry("b_00", Path("b_00"), label="b", split=None)
    with pytest.raises(CohortError, match="column 'split' is empty for 1 labelled slide"):
        resolve_split(cohort, "labels.csv", tmp_path, SplitParams(None, 5, 0.2, 0.2, 0))


def test_heatmap_values_and_localisation_figures() -> None:
    assert normalise(np.array([3.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]
    assert normalise(np.array([2.0, 4.0, 3.0]), "minmax").tolist() == [0.0, 1.0, 0.5]
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True  # level 0 is 128×128 at downsample 16; the top-left 64×64 is annotated
    coords = np.array([[0, 0], [64, 64], [32, 32], [96, 0]])
    frac = patch_fraction_inside(mask, coords, 32, 128)
    assert frac.tolist() == [1.0, 0.0, 1.0, 0.0]
    loc = localisation(np.array([0.5, 0.1, 0.3, 0.1]), frac)
    assert loc.auc == 1.0 and loc.n_inside == 2 and loc.n_border == 0 and loc.top10_inside == 1.0
    assert loc.mean_inside == pytest.approx(0.4 / 0.25) and loc.mean_outside == pytest.approx(0.1 / 0.25)


def test_roc_points_are_every_threshold_of_each_present_class_one_vs_rest() -> None:
    """The ROC files (roc_<variant>.csv) hold every point, per class present, thresholds capped at 1.
    Defects guarded (survivors of `make mutate`): the positives taken as the other classes, a class with no
    slide ending the loop (break) instead of being skipped, intermediate points dropped (drop_intermediate),
    the threshold column renamed, sklearn's infinite first threshold left above 1."""
    y = np.array([0, 0, 2, 2, 2, 0, 2, 0])  # class 1 ("b") has no slide: skipped, and "c" still drawn after it
    p = np.array([[.7, .1, .2], [.6, .2, .2], [.2, .1, .7], [.3, .1, .6], [.5, .1, .4], [.4, .2, .4],
                  [.1, .1, .8], [.5, .3, .2]])
    rows = roc_points(y, p, ["a", "b", "c"])
    assert {r["class"] for r in rows} == {"a", "c"} and all(set(r) == {"class", "fpr", "tpr", "threshold"} for r in rows)
    for c, name in ((0, "a"), (2, "c")):
        fpr, tpr, thr = skm.roc_curve(y == c, p[:, c], drop_intermediate=False)
        got = [r for r in rows if r["class"] == name]
        assert [(r["fpr"], r["tpr"]) for r in got] == list(zip(fpr.tolist(), tpr.tolist()))
        assert got[0]["threshold"] == 1.0 and [r["threshold"] for r in got[1:]] == thr[1:].tolist()
    assert len([r for r in rows if r["class"] == "c"]) > len(skm.roc_curve(y == 2, p[:, 2])[0])  # none dropped
    binary = roc_points(np.array([0, 1, 1, 0]), np.array([[.8, .2], [.3, .7], [.4, .6], [.6, .4]]), ["n", "t"])
    assert {r["class"] for r in binary} == {"t"} and binary[-1] == {"class": "t", "fpr": 1.0, "tpr": 1.0,
                                                                    "threshold": 0.2}


def test_auc_with_a_single_negative_is_defined_and_mismatched_probabilities_are_refused() -> None:
    """Survivors of `make mutate`: one negative slide treated as 'class missing' (NaN), and a probability table
    of another length than the labels accepted when it is 2-D (or refused without saying what)."""
    assert binary_auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
    with pytest.raises(ValueError, match=r"n×C with n=3, got \(2, 2\)"):
        roc_auc(np.array([0, 1, 1]), np.array([[0.6, 0.4], [0.3, 0.7]]))
