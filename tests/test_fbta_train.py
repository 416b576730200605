"""Specification of `fbta train train.method=fbta` and `fbta infer` on a small real cohort.

Real Aperio-style slides (``fbta synth``), real tiling, real features from
timm's tiny ``test_efficientnet``, real KMeans, real patch reads in a worker
process: the whole FBTA path, just small.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fbta.cli import main
from fbta.e2e.classifier import load_classifier
from fbta.features.registry import create_extractor
from fbta.io.h5 import read_features

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(ROOT / "params.yaml")]
TINY = ["extract.model=test_efficientnet", "extract.weights=random", "extract.num_workers=0", "cluster.n_clusters=4",
        "mil.kwargs.hidden=32", "mil.kwargs.attn_dim=16", "train.device=cpu", "fbta.train_blocks=2", "fbta.k=3", "fbta.hidden=64",
        "fbta.num_workers=1", "infer.num_workers=0", "infer.batch_size=16"]


def fbta(*args: str) -> int:
    return main([*args, *PARAMS])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[str]]:
    """8 slides (4/4; train 4, val 2, test 2) tiled, extracted and clustered once for the module."""
    d = tmp_path_factory.mktemp("fbta")
    ov = [f"data.slides={d}/slides", f"data.labels={d}/labels.csv", f"data.masks={d}/masks", f"data.out={d}/out",
          "run.progress=false", "tracking.enabled=false", *TINY]
    assert fbta("synth", *ov, "synth.n_slides=8", "synth.width=1280", "synth.height=1280") == 0
    for stage in ("tile", "extract", "cluster"):
        assert fbta(stage, *ov) == 0
    return d, ov


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> tuple[Path, list[str]]:
    """An FBTA ABMIL trained for 2 epochs on a copy of the cohort (shared: copy before writing)."""
    d, ov = cohort
    out = tmp_path_factory.mktemp("trained") / "out"
    shutil.copytree(d / "out", out)
    ov = [o for o in ov if not o.startswith("data.out=")] + [f"data.out={out}"]
    assert fbta("train", *ov, "train.method=fbta", "fbta.epochs=2", "train.patience=2") == 0
    return out, ov


def test_fbta_training_writes_the_deployable_model_and_its_history(trained) -> None:
    out, _ = trained
    folder = out / "models" / "fbta_abmil"
    assert {"best.pt", "translator.pt", "extractor.pt", "meta.json", "history.csv"} <= {p.name for p in folder.iterdir()}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["complete"] and meta["method"] == "fbta" and meta["weights"] == "ema" and meta["standardize"]
    head = torch.load(folder / "best.pt", weights_only=True)
    assert head["in_mean"].abs().sum() > 0 and (head["in_std"] > 0).all()  # the training slides' feature stats
    assert meta["translator"] == {"dim": 256, "k": 3, "hidden": 64, "layernorm": False}
    assert meta["extractor"]["trained_units"] == ["conv_head", "bn2"] and meta["n_clusters"] == 4
    header = (folder / "history.csv").read_text().splitlines()[0].split(",")
    for col in ("l_cls", "l_dist", "l_cons", "extractor_s", "translator_s", "mil_s", "sampling_s", "n_subset",
                "l_cls_fb", "l_cls_eb", "l_cls_tb", "gap_ratio", "tfe_drift", "tumour_share", "ema_decay"):
        assert col in header
    model = load_classifier(folder)
    feats, _, _ = read_features(next((out / "features" / "test_efficientnet" / "h5_files").glob("*.h5")))
    p = model.predict_proba(feats)
    assert p.shape == (2,) and abs(p.sum() - 1) < 1e-5


def test_every_epoch_records_the_diagnostics_and_the_selection_rule_holds(trained) -> None:
    import csv

    out, _ = trained
    folder = out / "models" / "fbta_abmil"
    rows = list(csv.DictReader(open(folder / "history.csv")))
    assert len(rows) == 2
    for r in rows:
        assert float(r["l_cls"]) == pytest.approx(sum(float(r[f"l_cls_{v}"]) for v in ("fb", "eb", "tb")), rel=1e-4)
        # TFE* moved, so the gap is measured (its size says little after 2 epochs of a random tiny extractor)
        assert float(r["tfe_drift"]) > 0 and 0 < float(r["gap_ratio"]) < float("inf")
        assert 0.0 <= float(r["tumour_share"]) <= 1.0  # the synthetic cohort has masks
    # per-epoch EMA with warm-up (params.yaml): decays 1/10, 2/11
    assert [float(r["ema_decay"]) for r in rows] == pytest.approx([0.1, 2 / 11], rel=1e-4)
    # 2 epochs < train.min_epochs=3: epoch 0 is never best, the run keeps its last epoch
    assert [int(r["best"]) for r in rows] == [0, 1]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["epoch"] == 1 and meta["ema_every"] == "epoch" and meta["ema_warmup"] is True


def test_the_ema_extractor_moved_only_in_its_trained_units(trained) -> None:
    out, _ = trained
    tfe_star = torch.load(out / "models" / "fbta_abmil" / "extractor.pt", weights_only=True)
    start = create_extractor("test_efficientnet", weights="random").state_dict()
    moved = {k.split(".")[1] for k, v in tfe_star.items() if v.is_floating_point() and not torch.equal(v, start[k])}
    assert moved and moved <= {"conv_head", "bn2"}


def test_infer_scores_the_translator_path_and_the_reextraction_it_replaces(trained, tmp_path: Path) -> None:
    src, ov = trained
    out = tmp_path / "out"
    shutil.copytree(src, out)
    ov = [o for o in ov if not o.startswith("data.out=")] + [f"data.out={out}"]
    assert fbta("infer", *ov, "train.method=fbta") == 0
    m = json.loads((out / "reports" / "metrics.json").read_text())["classification"]
    assert {"fbta", "fbta_reextract"} <= set(m)
    assert m["fbta"]["n"] == m["fbta_reextract"]["n"] == 2
    assert 0.0 <= m["fbta_reextract"]["agreement"] <= 1.0 and m["fbta_reextract"]["speedup_translator"] > 1
    frag = json.loads((out / "reports" / "metrics" / "infer_fbta.json").read_text())
    assert frag["classification"]["fbta"] == m["fbta"]
    assert fbta("infer", *ov, "train.method=fbta", "infer.reextract=false") == 0  # no stale re-extraction left
    assert not list((out / "reports").rglob("*fbta_reextract*"))
    assert (out / "reports" / "metrics" / "infer_fbta.json").is_file()


def test_frozen_extractor_ablation_keeps_the_extractor_as_it_was(cohort, tmp_path: Path) -> None:
    d, ov = cohort
    shutil.copytree(d / "out", tmp_path / "out")
    ov = [o for o in ov if not o.startswith("data.out=")] + [f"data.out={tmp_path}/out"]
    assert fbta("train", *ov, "train.method=fbta", "fbta.trainable_extractor=false", "fbta.epochs=1") == 0
    tfe_star = torch.load(tmp_path / "out/models/fbta_abmil/extractor.pt", weights_only=True)
    start = create_extractor("test_efficientnet", weights="random").state_dict()
    assert all(torch.equal(v, start[k]) for k, v in tfe_star.items())
    meta = json.loads((tmp_path / "out/models/fbta_abmil/meta.json").read_text())
    assert meta["extractor_steps"] == 0 and meta["extractor_steps_at_best"] == 0  # the head took steps, the extractor none


def test_extractor_every_three_slides_gives_the_extractor_a_third_of_the_steps_and_it_still_learns(
        cohort, tmp_path: Path) -> None:
    d, ov = cohort  # 4 training slides: updates after slides 3 and 4 (an epoch's last applies what is set aside)
    shutil.copytree(d / "out", tmp_path / "out")
    ov = [o for o in ov if not o.startswith("data.out=")] + [f"data.out={tmp_path}/out"]
    assert fbta("train", *ov, "train.method=fbta", "fbta.extractor_every=3", "fbta.epochs=1") == 0
    meta = json.loads((tmp_path / "out/models/fbta_abmil/meta.json").read_text())
    assert meta["extractor_steps"] == 2 and meta["extractor"]["steps_per_epoch"] == 4  # head: 4 steps
    last = torch.load(tmp_path / "out/models/fbta_abmil/extractor_last.pt", weights_only=True)
    start = create_extractor("test_efficientnet", weights="random").state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in last.items() if k.startswith("trunk.conv_head"))
    assert fbta("train", *ov, "train.method=fbta", "fbta.extractor_every=0") == 2


def test_fbta_without_clusters_or_with_another_c_stops_before_training(cohort, tmp_path: Path, capsys) -> None:
    d, ov = cohort
    shutil.copytree(d / "out", tmp_path / "out")
    ov = [o for o in ov if not o.startswith("data.out=")] + [f"data.out={tmp_path}/out"]
    assert fbta("train", *ov, "train.method=fbta", "cluster.n_clusters=6") == 2
    assert "but cluster.n_clusters=6" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "out" / "clusters")
    assert fbta("train", *ov, "train.method=fbta") == 2
    assert "run `fbta cluster` first" in capsys.readouterr().err


def test_bad_fbta_choices_are_one_line_errors(cohort, capsys) -> None:
    _, ov = cohort
    assert fbta("train", *ov, "train.method=fbta", "fbta.views=[eb,xb]") == 2
    assert "fbta.views" in capsys.readouterr().err
    assert fbta("infer", *ov, "train.method=vanilla") == 2
    assert "set train.method=fbta" in capsys.readouterr().err


def test_fbta_on_features_cached_at_another_input_size_stops_and_names_both_sizes(cohort, capsys) -> None:
    _, ov = cohort  # the cohort's features are at the params' 112 px; a 96-px TFE would be another feature space
    for method in ("fbta", "e2e"):
        assert fbta("train", *ov, f"train.method={method}", "extract.input_size=96") == 2
        err = capsys.readouterr().err
        assert "extracted at 112 px but extract.input_size=96" in err and "set extract.input_size=112" in err


def test_the_registered_fbta_classifier_is_translator_plus_ema_mil_and_answers_like_the_folder(trained, tmp_path) -> None:
    import mlflow.pyfunc
    import numpy as np
    from mlflow.tracking import MlflowClient

    out, ov = trained
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns",
             "tracking.enabled=true", f"data.out={tmp_path}/out"]
    folder = out / "models" / "fbta_abmil"
    assert fbta("register", *ov, *store, "train.method=fbta", "register.models=[classifier]",
                f"register.classifier={folder}") == 0
    mv = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_model_version_by_alias("fbta-classifier", "champion")
    assert mv.tags["fbta.method"] == "fbta"
    model = mlflow.pyfunc.load_model(mv.source)
    assert {p.name for p in model.unwrap_python_model().clf.files} == {"meta.json", "best.pt", "translator.pt"}
    bag, _, _ = read_features(next((out / "features" / "test_efficientnet" / "h5_files").glob("*.h5")))
    np.testing.assert_allclose(model.predict(bag).to_numpy()[0], load_classifier(folder).predict_proba(bag),
                               rtol=1e-5, atol=1e-6)
    decision = json.loads((tmp_path / "out/reports/registry/fbta-classifier.json").read_text())
    assert decision["decision"] == "promoted" and decision["aliases"]["champion"] == str(mv.version)


def test_fbta_training_killed_after_an_epoch_resumes_and_ends_with_the_models_of_an_uninterrupted_run(
        cohort, tmp_path) -> None:
    """SIGKILL mid-run, same command again: translator, TFE* and MIL* equal an uninterrupted run's, bit for bit."""
    from faultkit import env, kill_when

    d, ov = cohort
    runs = {}
    for name in ("ref", "killed"):
        out = tmp_path / name
        shutil.copytree(d / "out", out, ignore=shutil.ignore_patterns("models"))
        runs[name] = [o for o in ov if not o.startswith("data.out=")] + [
            f"data.out={out}", "train.method=fbta", "fbta.epochs=4", "train.patience=4"]
    def train(argv: list[str]) -> subprocess.CompletedProcess:  # both runs as processes: same thread settings
        return subprocess.run([sys.executable, "-m", "fbta", "train", *argv, *PARAMS], cwd=tmp_path, env=env(),
                              capture_output=True, text=True, timeout=600)

    assert train(runs["ref"]).returncode == 0
    folder = tmp_path / "killed" / "models" / "fbta_abmil"

    def saved_epoch() -> int:
        try:
            return int(torch.load(folder / "resume.pt", weights_only=True)["epoch"])
        except Exception:  # not written yet
            return -1

    kill_when("train", runs["killed"], tmp_path, lambda: saved_epoch() >= 0)
    assert saved_epoch() in (0, 1, 2)
    again = train(runs["killed"])
    assert again.returncode == 0, again.stderr
    assert "resuming after epoch" in again.stdout and not (folder / "resume.pt").exists()
    for f in ("best.pt", "translator.pt", "extractor.pt"):
        a = torch.load(folder / f, weights_only=True)
        b = torch.load(tmp_path / "ref" / "models" / "fbta_abmil" / f, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_the_end_to_end_bound_trains_whole_bags_and_is_scored_by_reextraction(cohort, tmp_path: Path) -> None:
    """`train.method=e2e`: the extractor on every patch of a bag, an identity translator, TFE* selected and last,
    the step count in meta.json; `fbta infer` gives its real score as e2e_reextract."""
    d, ov = cohort
    shutil.copytree(d / "out", tmp_path / "out")
    ov = [o for o in ov if not o.startswith("data.out=")] + [f"data.out={tmp_path}/out"]
    assert fbta("train", *ov, "train.method=e2e", "fbta.epochs=2", "train.min_epochs=0", "fbta.max_bag=12") == 0
    folder = tmp_path / "out" / "models" / "e2e_abmil"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["method"] == "e2e" and meta["translator"]["k"] == 1
    assert meta["extractor_steps"] == 2 * 4 and meta["extractor_steps_at_best"] == 4 * (meta["epoch"] + 1)
    translator = torch.load(folder / "translator.pt", weights_only=True)
    assert all(float(v.abs().sum()) == 0 for k, v in translator.items() if k.startswith("w2"))  # still the identity
    start = create_extractor("test_efficientnet", weights="random").state_dict()
    last = torch.load(folder / "extractor_last.pt", weights_only=True)
    assert any(not torch.equal(v, start[k]) for k, v in last.items() if v.is_floating_point())
    rows = list(csv.DictReader((folder / "history.csv").open()))
    # whole bags capped at max_bag (FBTA's C·M = 4 here: a pseudo-bag would average ≤ 4 patches)
    assert all(4 < float(r["n_subset"]) <= 12 for r in rows)
    assert all(float(r["l_dist"]) == 0.0 for r in rows)
    assert fbta("infer", *ov, "train.method=e2e") == 0
    m = json.loads((tmp_path / "out" / "reports" / "metrics.json").read_text())["classification"]
    assert {"e2e", "e2e_reextract"} <= set(m) and m["e2e_reextract"]["n"] == 2
