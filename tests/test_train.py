"""Specification of the MIL baseline stages: `fbta train`, `fbta evaluate`, `fbta heatmap`.

Everything runs for real on a tiny feature cohort (tests/milcohort.py): real
HDF5 files, real checkpoints, a real MLflow SQLite store in tmp_path.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from fbta.cli import main
from fbta.mil import list_mil
from fbta.mil.checkpoint import load_head
from fbta.mil.heatmap import CAPTION_H, LEGEND_W
from milcohort import SMALL_HEADS, make_cohort

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(ROOT / "params.yaml")]


def fbta(*args: str) -> int:
    return main([*args, *PARAMS])


def history(out: Path, name: str = "vanilla_abmil") -> list[dict[str, str]]:
    with open(out / "models" / name / "history.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """The cohort with an ABMIL trained to convergence on it (shared, read-only: copy before writing)."""
    root = tmp_path_factory.mktemp("cohort")
    ov = make_cohort(root) + SMALL_HEADS["abmil"]
    assert fbta("train", *ov, "train.epochs=25", "train.patience=25", "train.lr=0.001") == 0
    return root, ov


@pytest.fixture
def workspace(trained, tmp_path: Path) -> tuple[Path, list[str]]:
    """A private copy of the trained cohort's outputs."""
    root, ov = trained
    shutil.copytree(root / "out", tmp_path / "out")
    return tmp_path / "out", [o for o in ov if not o.startswith("data.out=")] + [f"data.out={tmp_path}/out"]


def test_abmil_learns_the_cohort_and_evaluate_reports_test_metrics(workspace) -> None:
    out, ov = workspace
    best = max(history(out), key=lambda r: int(r["best"]) * 1000 + int(r["epoch"]))
    assert float(best["val_auc"]) == 1.0
    assert fbta("evaluate", *ov) == 0
    m = json.loads((out / "reports/metrics.json").read_text())["classification"]["vanilla"]
    assert m["auc"] >= 0.9 and m["acc"] >= 0.75 and 0.0 <= m["f1"] <= 1.0 and m["arch"] == "abmil" and m["n"] == 4
    roc = list(csv.DictReader(open(out / "reports/plots/roc_vanilla.csv")))
    assert {"fpr", "tpr"} <= set(roc[0]) and float(roc[-1]["fpr"]) == 1.0 and float(roc[-1]["tpr"]) == 1.0
    confusion = json.loads((out / "reports/confusion_vanilla.json").read_text())
    assert confusion["classes"] == ["normal", "tumour"] and sum(map(sum, confusion["matrix"])) == 4
    preds = list(csv.DictReader(open(out / "reports/plots/predictions_vanilla.csv")))
    assert len(preds) == 4 and {"slide_id", "actual", "predicted", "prob_tumour"} <= set(preds[0])


def test_evaluate_rebuilds_metrics_json_keeping_the_other_stages_results(workspace) -> None:
    from fbta.io.metrics import publish_metrics

    out, ov = workspace
    publish_metrics(out / "reports", "infer_fbta", {"classification": {"fbta": {"auc": 0.5, "acc": 0.5, "f1": 0.5}}})
    publish_metrics(out / "reports", "seg_distill", {"segmentation": {"student": {"f1": 0.7, "iou": 0.6}}})
    assert fbta("evaluate", *ov) == 0
    merged = json.loads((out / "reports/metrics.json").read_text())
    assert merged["classification"]["fbta"] == {"auc": 0.5, "acc": 0.5, "f1": 0.5}
    assert merged["segmentation"] == {"student": {"f1": 0.7, "iou": 0.6}}
    assert set(merged["classification"]["vanilla"]) >= {"auc", "acc", "f1", "arch"}
    assert json.loads((out / "reports/metrics/evaluate_vanilla.json").read_text())["classification"]["vanilla"]


def _moved(ov: list[str], tmp_path: Path, moves: dict[str, str]) -> list[str]:
    """The workspace's overrides with a copy of labels.csv in which the named slides changed split (and only them)."""
    src = Path(next(o for o in ov if o.startswith("data.labels=")).split("=", 1)[1])
    rows = list(csv.DictReader(open(src)))
    for r in rows:
        r["split"] = moves.get(r["slide_id"], r["split"])
    dst = tmp_path / "labels_moved.csv"
    with open(dst, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return [o for o in ov if not o.startswith("data.labels=")] + [f"data.labels={dst}"]


@pytest.mark.parametrize("moved_from, scored", [("train", "test"), ("val", "test"), ("train", "val")])
def test_evaluate_refuses_a_slide_the_model_was_trained_or_selected_on(workspace, tmp_path: Path, capsys,
                                                                       moved_from: str, scored: str) -> None:
    """README: `evaluate` refuses to score a slide the model was trained or selected on. Defect guarded: the
    split is re-read from labels.csv at evaluation time, so a slide relabelled into the scored split after training
    (or a split drawn again) would be scored although the model saw it — a leaked, optimistic metric."""
    out, ov = workspace
    meta = json.loads((out / "models/vanilla_abmil/meta.json").read_text())
    leaked = sorted(meta["split"][moved_from])[0]
    moved = _moved(ov, tmp_path, {leaked: scored})
    before = (out / "reports/metrics.json").read_text() if (out / "reports/metrics.json").exists() else None
    assert fbta("evaluate", *moved, f"evaluate.split={scored}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and leaked in err[0] and "were used to train or select this model" in err[0], err
    after = (out / "reports/metrics.json").read_text() if (out / "reports/metrics.json").exists() else None
    assert after == before  # nothing scored, nothing written


def test_evaluate_on_val_scores_the_slides_the_model_was_selected_on_but_never_its_training_slides(workspace,
                                                                                                  capsys) -> None:
    """The refusal is exact, not a blanket one: validation slides may be scored on `evaluate.split=val`."""
    out, ov = workspace
    assert fbta("evaluate", *ov, "evaluate.split=val") == 0
    meta = json.loads((out / "models/vanilla_abmil/meta.json").read_text())
    m = json.loads((out / "reports/metrics.json").read_text())["classification"]["vanilla_val"]
    assert m["n"] == len(meta["split"]["val"])


def test_training_writes_a_weights_only_checkpoint_with_its_metadata(workspace) -> None:
    out, _ = workspace
    folder = out / "models/vanilla_abmil"
    state = torch.load(folder / "best.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["classes"] == ["normal", "tumour"] and meta["in_dim"] == 16 and meta["arch"] == "abmil"
    assert meta["complete"] and meta["val_auc"] == 1.0 and isinstance(meta["epoch"], int)
    assert sorted(meta["split"]["test"]) == ["s12", "s13", "s14", "s15"]
    head, _ = load_head(folder)
    assert head(torch.randn(7, 16)).logits.shape == (1, 2)
    for f in ("config.yaml", "history.csv", "curves.png"):
        assert (folder / f).stat().st_size > 0
    assert (out / "reports/plots/train_vanilla.csv").read_text() == (folder / "history.csv").read_text()


def test_heatmaps_have_the_slide_image_size_plus_legend_and_find_the_shifted_instances(workspace) -> None:
    out, ov = workspace
    assert fbta("heatmap", *ov, "heatmap.slides=[s01,s02]") == 0
    folder = out / "reports/plots/heatmaps/vanilla_abmil"
    assert sorted(p.name for p in folder.glob("*.png")) == ["s01.png", "s02.png"]
    # no slide file and no thumbnail: a blank canvas of the level-0 size (2048×1536) at max_px=512
    assert Image.open(folder / "s01.png").size == (512 + LEGEND_W, 384 + CAPTION_H)
    local = json.loads((folder / "localisation.json").read_text())
    assert list(local["slides"]) == ["s01"]  # s02 is normal: an empty mask, nothing to compare
    assert local["slides"]["s01"]["n_inside"] == 5 and local["slides"]["s01"]["auc"] >= 0.9


def test_heatmap_draws_over_the_tiling_thumbnail_when_there_is_no_slide(workspace) -> None:
    out, ov = workspace
    thumbs = out / "reports/plots/thumbnails"
    thumbs.mkdir(parents=True)
    Image.new("RGB", (400, 300), (240, 200, 220)).save(thumbs / "s03.png")
    assert fbta("heatmap", *ov, "heatmap.slides=[s03]", "heatmap.normalize=minmax") == 0
    assert Image.open(out / "reports/plots/heatmaps/vanilla_abmil/s03.png").size == (400 + LEGEND_W, 300 + CAPTION_H)


@pytest.mark.parametrize("arch", list_mil())
def test_every_head_trains_two_epochs_and_draws_a_heatmap(arch: str, tmp_path: Path) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS[arch] + [f"mil.arch={arch}"]
    assert fbta("train", *ov, "train.epochs=2") == 0
    assert len(history(tmp_path / "out", f"vanilla_{arch}")) == 2
    assert fbta("heatmap", *ov, "heatmap.slides=[s01]") == 0
    assert (tmp_path / f"out/reports/plots/heatmaps/vanilla_{arch}/s01.png").exists()


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"]
    # lr=0: the weights never change. Epochs 0-2 (< train.min_epochs) are never best and not counted toward
    # patience, so epoch 3 is the best and training stops after `patience` more
    assert fbta("train", *ov, "train.epochs=50", "train.patience=3", "train.min_epochs=3", "train.lr=0") == 0
    rows = history(tmp_path / "out")
    assert [int(r["epoch"]) for r in rows] == list(range(7))
    assert [int(r["best"]) for r in rows] == [0, 0, 0, 1, 0, 0, 0]
    meta = json.loads((tmp_path / "out/models/vanilla_abmil/meta.json").read_text())
    assert meta["stopped_early"] and meta["epoch"] == 3 and meta["epochs_run"] == 7
    assert "stopped early after 7 epochs" in capsys.readouterr().out
    # min_epochs=0: the old rule, epoch 0 is the first best
    assert fbta("train", *ov, f"data.out={tmp_path}/old", "train.epochs=50", "train.patience=3", "train.min_epochs=0",
                "train.lr=0") == 0
    assert [int(r["best"]) for r in history(tmp_path / "old")] == [1, 0, 0, 0]


def test_same_seed_same_history_and_ema_is_what_gets_saved(tmp_path: Path) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"] + ["train.epochs=3"]
    runs = []
    # in memory, then streamed from HDF5 by a DataLoader worker: the same seed gives the same run
    for out, loading in (("a", "train.preload=true"), ("b", "train.preload=false")):
        assert fbta("train", *ov, f"data.out={tmp_path}/{out}", loading, "train.num_workers=1") == 0
        runs.append([{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in history(tmp_path / out)])
    assert runs[0] == runs[1]
    assert fbta("train", *ov, f"data.out={tmp_path}/ema", "train.ema=true", "train.ema_alpha=0.8") == 0
    meta = json.loads((tmp_path / "ema/models/vanilla_abmil/meta.json").read_text())
    assert meta["weights"] == "ema" and meta["ema_alpha"] == 0.8
    assert fbta("train", *ov, f"data.out={tmp_path}/raw", "train.ema=false") == 0
    meta = json.loads((tmp_path / "raw/models/vanilla_abmil/meta.json").read_text())
    assert meta["weights"] == "raw" and meta["ema_alpha"] is None and "ema_decay" not in history(tmp_path / "raw")[0]


def test_a_split_is_drawn_once_then_reused_and_a_conflicting_one_is_refused(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=5, split_column=False) + SMALL_HEADS["abmil"] + ["train.epochs=1"]
    assert fbta("train", *ov) == 0
    saved = tmp_path / "out/splits/splits.csv"
    first = saved.read_text()
    assert "drew a stratified split of 10 slides" in capsys.readouterr().out
    assert fbta("train", *ov, "train.seed=7") == 0  # a new training seed must not re-split
    assert saved.read_text() == first and "re-using" in capsys.readouterr().out
    assert fbta("train", *ov, "train.split_seed=1") == 2  # different split parameters: refused, not re-drawn
    assert "was drawn with split_seed=0 (params now 1)" in capsys.readouterr().err
    labels = (tmp_path / "labels.csv").read_text().replace("s00,normal", "s00,tumour")
    (tmp_path / "labels.csv").write_text(labels)
    assert fbta("train", *ov) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "relabelled (e.g. s00)" in err[0] and "delete" in err[0]
    assert saved.read_text() == first


def test_k_fold_training_uses_the_drawn_folds(tmp_path: Path) -> None:
    ov = make_cohort(tmp_path, n_per_class=5, split_column=False) + SMALL_HEADS["abmil"] + ["train.epochs=1"]
    assert fbta("train", *ov, "train.fold=2") == 0
    meta = json.loads((tmp_path / "out/models/vanilla_abmil_fold2/meta.json").read_text())
    folds = {r["slide_id"]: r["fold"] for r in csv.DictReader(open(tmp_path / "out/splits/splits.csv"))}
    assert sorted(meta["split"]["test"]) == sorted(s for s, f in folds.items() if f == "2")
    assert sorted(meta["split"]["val"]) == sorted(s for s, f in folds.items() if f == "3")


def test_mlflow_run_has_the_config_as_params_and_metrics_per_epoch(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    track = ["tracking.enabled=true", f"tracking.uri={uri}", f"tracking.artifact_root={tmp_path}/mlruns"]
    assert fbta("train", *ov, *track, "train.epochs=3") == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fbta")
    assert exp.artifact_location == (tmp_path / "mlruns").resolve().as_uri()
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["fbta.stage"] == "train"
    assert run.data.params["mil.arch"] == "abmil" and run.data.params["train.epochs"] == "3"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [0, 1, 2]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3
    assert {f.path for f in client.list_artifacts(run.info.run_id, "model")} >= {"model/best.pt", "model/meta.json",
                                                                                 "model/curves.png"}
    meta = json.loads((tmp_path / "out/models/vanilla_abmil/meta.json").read_text())
    assert meta["mlflow_run_id"] == run.info.run_id


@pytest.mark.parametrize("override, message", [
    ("mil.arch=nope", "mil.arch='nope' is not a MIL head"),
    ("train.method=fbta", "FBTA's extractor must be the one that made them"),
    ("train.method=other", "train.method='other' must be one of vanilla, fbta"),
    ("mil.kwargs.bogus=1", "mil.* does not fit mil.arch=abmil"),
])
def test_bad_method_or_head_is_one_line_and_exit_2(override: str, message: str, tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=4)
    assert fbta("train", *ov, override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out/models").exists() or not any((tmp_path / "out/models").rglob("best.pt"))


def test_a_slide_without_features_is_reported_and_strict_mode_fails_the_run(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"] + ["train.epochs=1"]
    (tmp_path / "features/h5_files/s00.h5").unlink()
    assert fbta("train", *ov) == 0
    status = json.loads((tmp_path / "out/reports/status/train.json").read_text())
    assert status["counts"] == {"done": 7, "skipped": 0, "failed": 1}
    assert "s00" in capsys.readouterr().err
    assert fbta("train", *ov, "run.strict=true") == 1


def test_evaluate_and_heatmap_without_a_trained_model_say_so(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=4)
    assert fbta("evaluate", *ov) == 2
    assert "run `fbta train` first" in capsys.readouterr().err
    assert fbta("heatmap", *ov) == 2
