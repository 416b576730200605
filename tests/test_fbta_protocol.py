"""benchmarks/fbta_protocol.py (and its protocol_design.py, protocol_stats.py): splits, paired bootstrap,
baselines, and one real unit through the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import protocol_design as design  # noqa: E402
import protocol_stats as stats  # noqa: E402

from milcohort import SMALL_HEADS, make_cohort  # noqa: E402


def _labels(n_a: int = 13, n_b: int = 9) -> dict[str, str]:
    return {**{f"a{i:02d}": "alpha" for i in range(n_a)}, **{f"b{i:02d}": "beta" for i in range(n_b)}}


# -- splits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("val", ["fold", "slice"])
def test_kfold_is_stratified_disjoint_and_tests_every_slide_exactly_once(val: str) -> None:
    labels = _labels()
    splits = design.kfold_splits(labels, k=5, seed=3, val=val)
    assert list(splits) == [f"fold{i}" for i in range(5)]
    tested = Counter(s for part in splits.values() for s, p in part.items() if p == "test")
    assert set(tested) == set(labels) and set(tested.values()) == {1}  # every slide tested exactly once
    for name, part in splits.items():
        assert set(part) == set(labels) and set(part.values()) == {"train", "val", "test"}  # a partition
        for p in ("test", "val"):
            per_class = Counter(labels[s] for s, q in part.items() if q == p)
            # stratified: each class's share of the part within one slide of its cohort share
            assert abs(per_class["alpha"] - 13 / 5) <= 1 and abs(per_class["beta"] - 9 / 5) <= 1 or p == "val"
            assert set(per_class) == {"alpha", "beta"}
    if val == "fold":  # the project's train.fold convention: val = the next fold's test slides
        for i in range(5):
            test_next = {s for s, p in splits[f"fold{(i + 1) % 5}"].items() if p == "test"}
            assert {s for s, p in splits[f"fold{i}"].items() if p == "val"} == test_next
    assert design.kfold_splits(labels, k=5, seed=3, val=val) == splits  # seeded
    assert design.kfold_splits(labels, k=5, seed=4, val=val) != splits


def test_fewshot_draws_exact_counts_per_class_and_test_everything_else() -> None:
    labels = _labels(20, 18)
    draws = design.fewshot_splits(labels, draws=4, train_per_class=10, val_per_class=5, seed=0)
    assert list(draws) == ["draw0", "draw1", "draw2", "draw3"]
    for part in draws.values():
        c = Counter((labels[s], p) for s, p in part.items())
        assert c[("alpha", "train")] == c[("beta", "train")] == 10
        assert c[("alpha", "val")] == c[("beta", "val")] == 5
        assert c[("alpha", "test")] == 5 and c[("beta", "test")] == 3
    assert len({tuple(sorted(p.items())) for p in draws.values()}) == 4  # draws differ
    assert design.fewshot_splits(labels, draws=4, seed=0) == draws  # seeded by draw
    assert design.fewshot_splits(labels, draws=2, seed=0) == {k: draws[k] for k in ("draw0", "draw1")}
    with pytest.raises(ValueError, match="no test slide"):
        design.fewshot_splits(_labels(20, 15), train_per_class=10, val_per_class=5)


def test_a_split_without_a_training_class_is_refused() -> None:
    with pytest.raises(ValueError, match="no training slide"):
        design.kfold_splits(_labels(10, 2), k=5)


def test_split_labels_csv_has_one_split_column_and_keeps_mpp() -> None:
    rows = {"s1": {"slide_id": "s1", "label": "x", "mpp": "0.25", "fold": "3"},
            "s2": {"slide_id": "s2", "label": "y", "mpp": "", "fold": "1"}}
    text = design.split_labels_csv({"s2": "test", "s1": "train"}, rows)
    assert text.splitlines() == ["slide_id,label,split,mpp", "s1,x,train,0.25", "s2,y,test,"]


# -- statistics -------------------------------------------------------------------------------


def test_bootstrap_of_constant_differences_has_zero_width() -> None:
    r = stats.paired_bootstrap([0.07] * 12, n_boot=2000, seed=1)
    assert r["n"] == 12 and r["mean"] == pytest.approx(0.07) and r["lo"] == r["mean"] == r["hi"]
    one = stats.paired_bootstrap([-0.2])
    assert one["lo"] == one["hi"] == one["mean"] == -0.2


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    d = np.random.default_rng(0).normal(0.05, 0.1, 15).tolist()
    a, b = stats.paired_bootstrap(d, seed=7), stats.paired_bootstrap(d, seed=7)
    assert a == b
    c = stats.paired_bootstrap(d, seed=8)
    assert c["mean"] == a["mean"] and (c["lo"], c["hi"]) != (a["lo"], a["hi"])
    assert a["lo"] < a["mean"] < a["hi"]
    se = np.std(d, ddof=1) / np.sqrt(len(d))  # the percentile interval ≈ mean ± 1.96 se for a normal sample
    assert a["hi"] - a["lo"] == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert stats.paired_bootstrap([0.1, float("nan"), 0.1])["n"] == 2
    assert stats.paired_bootstrap([])["n"] == 0


def test_pairs_follow_the_arms() -> None:
    arms = [design.parse_arm(s) for s in ["abmil:vanilla", "abmil:fbta", "transmil:vanilla", "transmil:fbta",
                                      "mambamil:fbta", "abmil:fbta:fbta.views=[fb,eb]",
                                      "abmil:fbta:fbta.k=20;fbta.m=2", "abmil:vanilla:train.ema=true"]]
    assert arms[6].overrides == ("fbta.k=20", "fbta.m=2") and arms[5].overrides == ("fbta.views=[fb,eb]",)
    assert design.pairs_of(arms) == [("abmil:fbta", "abmil:vanilla"), ("transmil:fbta", "transmil:vanilla"),
                                 ("abmil:fbta:fbta.views=[fb,eb]", "abmil:fbta"),
                                 ("abmil:fbta:fbta.views=[fb,eb]", "abmil:vanilla"),
                                 ("abmil:fbta:fbta.k=20;fbta.m=2", "abmil:fbta"),
                                 ("abmil:fbta:fbta.k=20;fbta.m=2", "abmil:vanilla"),
                                 ("abmil:vanilla:train.ema=true", "abmil:vanilla")]
    assert len({a.slug for a in arms}) == len(arms)
    for bad in ("abmil", "abmil:other", "abmil:fbta:train.seed=3", "abmil:fbta:data.out=/x", "abmil:fbta:k"):
        with pytest.raises(ValueError):
            design.parse_arm(bad)


def test_the_controls_pair_with_vanilla_and_fbta_with_the_bound() -> None:
    arms = [design.parse_arm(s) for s in ["abmil:vanilla", "abmil:fbta", "abmil:e2e", "abmil:oracle"]]
    assert design.pairs_of(arms) == [("abmil:fbta", "abmil:vanilla"), ("abmil:e2e", "abmil:vanilla"),
                                     ("abmil:oracle", "abmil:vanilla"), ("abmil:fbta", "abmil:e2e")]


def test_recovered_share_is_the_ratio_of_mean_gains_and_none_without_an_end_to_end_gain() -> None:
    from protocol_controls import recovered_share

    def units(fbta: list[float], e2e: list[float]) -> dict:
        out = {}
        for i, (f, e) in enumerate(zip(fbta, e2e)):
            for arm, auc in (("abmil:vanilla", 0.6), ("abmil:fbta", f), ("abmil:e2e", e)):
                out[f"{arm}|fold{i}"] = {"arm": arm, "method": arm.split(":")[1], "split": f"fold{i}", "seed": 0,
                                         "test": {arm.split(":")[1]: {"auc": auc}}}
        return out

    r = recovered_share(units([0.65, 0.7, 0.7], [0.7, 0.8, 0.8]), "abmil", n_boot=500)
    assert r["n"] == 3 and r["share"] == pytest.approx((0.25 / 3) / (0.5 / 3), abs=1e-3)  # 0.5, not mean of ratios
    assert r["lo"] <= r["share"] <= r["hi"]
    none = recovered_share(units([0.65, 0.7], [0.6, 0.55]), "abmil", n_boot=100)
    assert none["share"] is None and none["e2e_minus_vanilla"] < 0  # nothing to recover: no share, not a ratio
    assert recovered_share({}, "abmil") is None


def test_paired_table_matches_units_on_split_and_seed() -> None:
    def unit(arm: str, split: str, seed: int, auc: float) -> dict:
        method = arm.split(":")[1]
        return {"arm": arm, "method": method, "split": split, "seed": seed,
                "test": {method: {"auc": auc, "acc": 0.5, "f1": 0.5}}}

    units = {}
    for split in ("fold0", "fold1"):
        for seed in (0, 1):
            units[stats.unit_key("abmil:vanilla", split, seed)] = unit("abmil:vanilla", split, seed, 0.6 + seed / 10)
            units[stats.unit_key("abmil:fbta", split, seed)] = unit("abmil:fbta", split, seed, 0.7 + seed / 10)
    units.pop(stats.unit_key("abmil:vanilla", "fold1", 1))  # an unmatched unit is left out of the pairing
    units[stats.unit_key("abmil:vanilla", "fold0", 0)]["test"]["vanilla"]["acc"] = 0.0  # a zero is a value, not missing
    baselines = {s: {"probe": {"auc": 0.65, "acc": 0.5, "f1": 0.4}} for s in ("fold0", "fold1")}
    rows = stats.paired_table(units, [("abmil:fbta", "abmil:vanilla"), ("abmil:vanilla", "[probe]")], baselines, 500, 0)
    assert rows[0]["auc"]["n"] == 3 and rows[0]["auc"]["mean"] == pytest.approx(0.1)
    assert rows[0]["auc"]["lo"] == pytest.approx(0.1) and rows[0]["auc_wins"] == [3, 0, 0]
    assert rows[0]["acc"]["n"] == 3 and rows[0]["acc"]["mean"] == pytest.approx(0.5 / 3)
    assert rows[1]["acc"]["n"] == 3 and rows[1]["acc"]["mean"] == pytest.approx(-0.5 / 3)
    assert rows[1]["auc"]["n"] == 3 and rows[1]["auc"]["mean"] == pytest.approx((-0.05 * 2 + 0.05) / 3)
    summary = stats.summarise(units, ["abmil:vanilla", "abmil:fbta"], baselines)
    assert summary["abmil:fbta"]["units"] == 4 and summary["[probe]"]["auc"][0] == pytest.approx(0.65)
    table = stats.markdown(summary, rows, "t")
    assert "abmil:fbta − abmil:vanilla" in table and "+0.100 [+0.100, +0.100]" in table


# -- baselines --------------------------------------------------------------------------------


def test_pooled_probe_fits_on_train_only_and_scores_the_test_split() -> None:
    rng = np.random.default_rng(0)
    labels = {f"s{i:02d}": ("pos" if i % 2 else "neg") for i in range(30)}
    x = {s: rng.normal(size=8) + (1.5 if lab == "pos" else 0.0) for s, lab in labels.items()}
    part = {s: "test" if i < 10 else "val" if i < 16 else "train" for i, s in enumerate(sorted(labels))}
    r = stats.pooled_probe(x, part, labels, ["neg", "pos"])
    assert r["C"] in stats.PROBE_GRID and r["n"] == 10 and r["auc"] > 0.8 and r["acc"] >= 0.7
    fixed = stats.pooled_probe(x, part, labels, ["neg", "pos"], c=1.0)
    assert fixed["C"] == 1.0
    flipped = {s: ("pos" if lab == "neg" else "neg") if part[s] == "test" else lab for s, lab in labels.items()}
    assert stats.pooled_probe(x, part, flipped, ["neg", "pos"], c=1.0)["auc"] == pytest.approx(1 - fixed["auc"])


def test_constant_baselines_have_chance_auc_and_the_class_share_as_accuracy() -> None:
    labels = {"a": "neg", "b": "neg", "c": "neg", "d": "pos", "e": "pos"}
    part = dict.fromkeys(labels, "test")
    b = stats.constant_baselines(part, labels, ["neg", "pos"])
    assert b["all-neg"]["auc"] == 0.5 and b["all-neg"]["acc"] == pytest.approx(0.6)
    assert b["all-pos"]["acc"] == pytest.approx(0.4)
    assert b["all-pos"]["f1"] == pytest.approx((0 + 2 * 0.4 / 1.4) / 2)  # macro-F1, sklearn's convention


def test_history_diagnostics_tolerate_missing_columns_and_files(tmp_path: Path) -> None:
    assert stats.history_diagnostics(tmp_path / "none.csv") == {}
    h = tmp_path / "history.csv"
    h.write_text("epoch,val_auc,l_dist,l_cls_fb,gap_ratio,seconds\n0,0.5,2.0,0.7,0.9,1.0\n1,0.6,1.0,0.6,0.5,1.2\n")
    assert stats.history_diagnostics(h) == {"l_dist": 1.0, "l_cls_fb": 0.6, "gap_ratio": 0.5}


def _has_key(dotted: str) -> bool:
    from omegaconf import OmegaConf

    from fbta.config import load_config

    return OmegaConf.select(load_config(None), dotted, default="absent") != "absent"


def test_budget_is_resolved_per_arm_and_differences_are_warned() -> None:
    params = ROOT / "params.yaml"
    common = design.mirror_epochs(["train.epochs=3", "train.patience=3", "train.ema=false", "fbta.ema_alpha=0.9"])
    assert "fbta.epochs=3" in common
    b = {"abmil:vanilla": design.budget_of(params, common, "vanilla"),
         "abmil:fbta": design.budget_of(params, common, "fbta")}
    assert b["abmil:vanilla"]["epochs"] == b["abmil:fbta"]["epochs"] == 3
    assert b["abmil:fbta"]["ema"]["alpha"] == 0.9 and b["abmil:vanilla"]["ema"] is None
    warnings = design.budget_warnings(b)
    assert any("differ in ema" in w for w in warnings) and not any("differ in epochs" in w for w in warnings)
    same = ["train.ema=true", "train.ema_alpha=0.9"] + [
        kv for kv in ("train.ema_every=epoch", "fbta.ema_every=epoch", "train.ema_warmup=true", "fbta.ema_warmup=true")
        if _has_key(kv.split("=")[0])]
    if _has_key("train.ema_every"):  # the shared EMA options (vanilla = FBTA) exist in this fbta/config.py
        b = {"v": design.budget_of(params, common + same, "vanilla"),
             "f": design.budget_of(params, common + same, "fbta")}
        assert not any("differ in ema" in w for w in design.budget_warnings(b))
    other = {"a": design.budget_of(params, common + ["train.ema=true"], "vanilla"),
             "b": design.budget_of(params, common + ["train.ema=true", "train.ema_alpha=0.5"], "vanilla")}
    assert any("differ in ema" in w for w in design.budget_warnings(other))
    assert not design.budget_warnings(other, {"b": ["train.ema_alpha=0.5"]})  # the arm's own override is its point


# -- one real unit ----------------------------------------------------------------------------


def test_one_vanilla_unit_end_to_end_through_the_cli_and_a_resumed_protocol_skips_it(tmp_path: Path) -> None:
    """abmil:vanilla on fold 0 of a 4-fold CV of the 16-slide toy cohort, 2 epochs; then the same command again."""
    ov = make_cohort(tmp_path / "cohort", n_per_class=8)
    c = tmp_path / "cohort"
    results = tmp_path / "protocol.json"
    common = [*SMALL_HEADS["abmil"], "train.device=cpu", "train.preload=true", "train.num_workers=0",
              "train.epochs=2", "train.patience=2", *(["train.min_epochs=0"] if _has_key("train.min_epochs") else [])]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fbta_protocol.py"), "--protocol", "kfold", "--folds", "4",
           "--data", str(c), "--features", str(c / "features"), "--out", str(tmp_path / "runs"),
           "--results", str(results), "--arms", "abmil:vanilla", "--seeds", "0", "--splits", "fold0",
           "--boot", "200", "--set", *common]
    assert any(o.startswith("data.features=") for o in ov)
    t0 = time.time()
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    res = json.loads(results.read_text())
    u = res["units"]["abmil:vanilla|fold0|seed0"]
    assert set(u["test"]["vanilla"]) >= {"auc", "acc", "f1", "n"} and u["test"]["vanilla"]["n"] == 4
    assert u["epochs_run"] == 2 and u["best_epoch"] in (0, 1) and u["seconds_per_epoch"] > 0
    assert u["val_auc"] is not None and u["wall_seconds"] >= u["train_seconds"] > 0
    assert "fbta.epochs=2" in res["settings"]["common_overrides"]  # the budget is mirrored to FBTA arms
    assert set(res["baselines"]["fold0"]) == {"all-normal", "all-tumour", "probe"}
    assert res["baselines"]["fold0"]["all-normal"]["acc"] == 0.5
    assert res["paired"][0]["a"] == "abmil:vanilla" and res["paired"][0]["b"] == "[probe]"
    expected = design.kfold_splits({f"s{i:02d}": "tumour" if i % 2 else "normal" for i in range(16)}, 4)["fold0"]
    assert sorted(res["splits"]["fold0"]["test"]) == sorted(s for s, p in expected.items() if p == "test")
    labels_csv = tmp_path / "runs" / "kfold" / "splits" / "fold0" / "labels.csv"
    assert labels_csv.read_text().splitlines()[0] == "slide_id,label,split"
    assert not list((Path(u["folder"]) / "models").rglob("*.pt"))  # models pruned by default
    assert "| abmil:vanilla | 1 |" in res["table_md"] and "[probe]" in res["table_md"]
    print(f"tiny unit: {u['wall_seconds']} s (protocol process {wall:.1f} s)")

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done before, skipped" in again.stdout
    assert json.loads(results.read_text())["units"]["abmil:vanilla|fold0|seed0"] == u

    changed = subprocess.run([*cmd, "train.lr=0.001"], capture_output=True, text=True, cwd=ROOT)
    assert changed.returncode == 2 and "other settings" in changed.stderr


@pytest.mark.slow
def test_vanilla_fbta_and_the_controls_on_a_real_tiny_cohort_pair_up(tmp_path: Path) -> None:
    """synth → tile → extract → cluster (12 small slides, timm's tiny test_efficientnet), then the protocol with
    abmil:vanilla, abmil:fbta and the controls (abmil:e2e, abmil:oracle) on fold 0 of a 3-fold CV (4 test
    slides), 2 epochs each, FBTA also re-extracted, every extractor probed."""
    from fbta.cli import main

    tiny = ["extract.model=test_efficientnet", "extract.weights=random", "extract.num_workers=0",
            "cluster.n_clusters=4", "train.device=cpu", "fbta.train_blocks=2", "fbta.k=3", "fbta.hidden=64",
            "fbta.num_workers=1", "infer.num_workers=0", "infer.batch_size=16"]
    d = tmp_path / "c"
    ov = [f"data.slides={d}/slides", f"data.labels={d}/labels.csv", f"data.masks={d}/masks", f"data.out={d}",
          "run.progress=false", "tracking.enabled=false", *tiny]
    params = ["--params", str(ROOT / "params.yaml")]
    assert main(["synth", *ov, "synth.n_slides=12", "synth.width=1280", "synth.height=1280", *params]) == 0
    for stage in ("tile", "extract", "cluster"):
        assert main([stage, *ov, *params]) == 0
    results = tmp_path / "protocol.json"
    common = [*tiny, "mil.kwargs.hidden=32", "mil.kwargs.attn_dim=16", "train.epochs=2", "train.patience=2",
              *(["train.min_epochs=0"] if _has_key("train.min_epochs") else [])]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fbta_protocol.py"), "--protocol", "kfold", "--folds", "3",
           "--data", str(d), "--out", str(tmp_path / "runs"), "--results", str(results), "--reextract",
           "--arms", "abmil:vanilla", "abmil:fbta", "abmil:e2e", "abmil:oracle", "--seeds", "0", "--splits", "fold0",
           "--boot", "200", "--probe-patches", "4", "--set", *common]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(results.read_text())
    f = res["units"]["abmil:fbta|fold0|seed0"]
    assert {"fbta", "fbta_reextract"} <= set(f["test"]) and f["epochs_run"] == 2
    assert {"l_dist", "l_cons"} <= set(f["diagnostics"])
    v = res["units"]["abmil:vanilla|fold0|seed0"]
    assert v["test"]["vanilla"]["n"] == f["test"]["fbta"]["n"]  # the same test slides
    pair = next(p for p in res["paired"] if p["b"] == "abmil:vanilla" and p["a"] == "abmil:fbta")
    assert pair["auc"]["n"] == 1
    for arm in ("abmil:fbta", "abmil:e2e", "abmil:oracle"):  # each extractor probed both ways, beside the frozen one
        pr = res["units"][f"{arm}|fold0|seed0"]["probe"]
        assert {"frozen", "selected", "frozen_heldout", "selected_heldout", "steps_selected"} <= set(pr), (arm, pr)
        assert 0.0 <= pr["selected"] <= 1.0 and pr["steps_selected"] > 0
    assert "held-out-only" in res["table_md"]
    print(res["table_md"])
