"""Specification of `fbta predict` (and the `fbta-batch-infer` flow): new slides → champion → predictions.

Real parts: synthetic Aperio slides read by OpenSlide, the real corrupt
`broken.svs`, a PNG without MPP, real tiling and feature extraction (timm's
tiny `test_resnet`, random weights: fast on 2 cores), a vanilla ABMIL trained by
`fbta train` on features that carry that extractor's provenance, registered in
a SQLite MLflow store and loaded back through `models:/fbta-classifier@champion`.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_SLIDES, pink_on_white
from fbta.cli import main
from fbta.io.h5 import read_features, write_features

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(ROOT / "params.yaml")]
EXTRACT = ["extract.model=test_resnet", "extract.weights=random", "extract.device=cpu", "extract.num_workers=0",
           "extract.batch_size=16"]


def fbta(*args: str) -> int:
    return main([*args, *PARAMS])


def feature_cohort(root: Path, n_per_class: int = 6, n: int = 20) -> None:
    """12 slides of test_resnet-sized features (with its provenance attributes) and a labels.csv with splits."""
    from fbta.features import create_extractor

    attrs = create_extractor("test_resnet", weights="random").describe()
    rng = np.random.default_rng(0)
    rows = ["slide_id,label,split"]
    split = ["train"] * (n_per_class - 2) + ["val"] * 2
    for i in range(2 * n_per_class):
        label = "tumour" if i % 2 else "normal"
        x = rng.normal(size=(n, attrs["dim"])).astype(np.float32)
        if label == "tumour":
            x[:4] += 1.5
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], 1).astype(np.int64)
        write_features(root / "features/h5_files" / f"t{i:02d}.h5", x, coords, attrs, {"patch_size": 256})
        rows.append(f"t{i:02d},{label},{split[i // 2]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> tuple[Path, list[str]]:
    """A registered champion and a folder of new slides (two good, one corrupt, one without MPP)."""
    root = tmp_path_factory.mktemp("predict")
    feature_cohort(root)
    ov = [f"data.out={root}/out", f"data.labels={root}/labels.csv", f"data.slides={root}/slides",
          f"data.features={root}/features", "run.progress=false", "train.preload=true", "train.num_workers=0",
          "train.device=cpu", "mil.kwargs.hidden=32", "mil.kwargs.attn_dim=16",
          f"tracking.uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_root={root}/mlruns",
          "register.models=[classifier]"]
    assert fbta("train", *ov, "train.epochs=3", "train.patience=3", "train.lr=0.001") == 0
    assert fbta("register", *ov) == 0

    new = root / "new_slides"
    assert fbta("synth", f"data.slides={new}", f"data.labels={new}/labels.csv", f"data.masks={root}/new_masks",
                "synth.n_slides=2", "synth.width=1536", "synth.height=1536", "run.progress=false") == 0
    if (SHARED_SLIDES / "broken.svs").exists():
        shutil.copy(SHARED_SLIDES / "broken.svs", new / "broken.svs")
    Image.fromarray(pink_on_white(1024, 768, (128, 128, 896, 640))).save(new / "nompp.png")
    ov += [f"predict.slides={new}", *EXTRACT]
    return root, ov


def rows_of(root: Path, name: str = "predictions") -> dict[str, dict[str, str]]:
    with open(root / "out/reports/predictions" / f"{name}.csv") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def test_new_slides_are_tiled_extracted_and_classified_by_the_champion(champion, capsys) -> None:
    from fbta.e2e.classifier import load_classifier

    root, ov = champion
    assert fbta("predict", *ov) == 0
    out = capsys.readouterr().out
    assert "classified with fbta-classifier v1" in out
    rows = rows_of(root)
    good = ["synth_000", "synth_001"]
    clf = load_classifier(root / "out/models/vanilla_abmil")
    for sid in good:
        r = rows[sid]
        assert r["status"] == "done" and r["label"] in ("normal", "tumour") and int(r["n_patches"]) > 5
        probs = np.array([float(r["prob_normal"]), float(r["prob_tumour"])])
        assert abs(probs.sum() - 1) < 1e-4 and r["predicted"] == ["normal", "tumour"][int(probs.argmax())]
        bag, _, attrs = read_features(root / "out/predict/features/test_resnet/h5_files" / f"{sid}.h5")
        assert attrs["extractor"] == "test_resnet"
        np.testing.assert_allclose(probs, clf.predict_proba(bag), atol=1e-5)  # the served path = the folder model
    assert rows["nompp"]["status"] == "failed" and "mpp" in rows["nompp"]["reason"].lower()
    if "broken" in rows:
        assert rows["broken"]["status"] == "failed" and "broken.svs" in rows["broken"]["reason"]
    report = json.loads((root / "out/reports/predictions/predictions.json").read_text())
    assert report["model"]["name"] == "fbta-classifier" and report["model"]["version"] == "1"
    assert report["model"]["uri"] == "models:/fbta-classifier@champion"
    assert report["counts"]["done"] == 2 and report["classes"] == ["normal", "tumour"]

    # a re-run resumes: nothing is tiled or extracted again, same predictions
    assert fbta("predict", *ov, "predict.name=again") == 0
    assert "2 up to date" in capsys.readouterr().out
    again = rows_of(root, "again")
    assert all(again[s]["prob_tumour"] == rows[s]["prob_tumour"] for s in good)


def test_a_model_folder_can_be_used_instead_of_the_registry(champion) -> None:
    root, ov = champion
    folder = root / "out/models/vanilla_abmil"
    assert fbta("predict", *ov, f"predict.model={folder}", "predict.name=folder", "tracking.enabled=false") == 0
    report = json.loads((root / "out/reports/predictions/folder.json").read_text())
    assert report["model"]["uri"] == str(folder.resolve()) and report["counts"]["done"] == 2


def test_features_of_another_extractor_or_a_missing_champion_are_one_clear_error(champion, capsys) -> None:
    root, ov = champion
    assert fbta("predict", *ov, "extract.model=test_vit") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on 'test_resnet' features but extract.model=test_vit" in err[0]
    assert fbta("predict", *ov, "predict.model=models:/nope@champion") == 2
    assert "models:/nope@champion: no such registered model version" in capsys.readouterr().err
    assert fbta("predict", *ov, f"predict.slides={root}/nowhere") == 2
    assert "nowhere: slide folder not found" in capsys.readouterr().err


@pytest.mark.slow  # starts Prefect's ephemeral API server (~20 s here)
def test_batch_infer_flow_runs_the_same_steps(champion, tmp_path: Path, monkeypatch) -> None:
    root, ov = champion
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    sys.path.insert(0, str(ROOT / "flows"))
    from batch_infer import batch_infer_flow
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):  # None: conftest's 300 s (busy 2-core box)
        result = batch_infer_flow(name="flow", params=PARAMS[1], overrides=ov)
    assert result["counts"]["done"] == 2 and Path(result["path"]).name == "flow.json"
    assert fbta("predict", *ov) == 0  # the CLI on the same slides (also when this test runs alone)
    assert rows_of(root, "flow")["synth_000"]["prob_tumour"] == rows_of(root)["synth_000"]["prob_tumour"]
