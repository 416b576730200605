"""`fbta tune` over FBTA's C, M, K on a small real cohort, and the winner registered as one pyfunc model.

Real Aperio-style slides (`fbta synth`), tiling, timm's tiny `test_efficientnet`
features, KMeans per C inside the study, FBTA training per trial, then
`fbta register` of the best trial's folder: the pyfunc must ship the
translator and the EMA MIL and answer exactly like the folder model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from fbta.cli import main

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(ROOT / "params.yaml")]
TINY = ["extract.model=test_efficientnet", "extract.weights=random", "extract.num_workers=0",
        "mil.kwargs.hidden=32", "mil.kwargs.attn_dim=16", "train.device=cpu", "fbta.train_blocks=2",
        "fbta.num_workers=1"]


def fbta(*args: str) -> int:
    return main([*args, *PARAMS])


@pytest.mark.slow  # synth + tile + extract of 8 slides and two FBTA trainings: minutes on 2 cores
def test_fbta_study_tunes_c_m_k_and_its_best_model_registers_as_one_pyfunc(tmp_path: Path) -> None:
    import mlflow.pyfunc

    from fbta.e2e.classifier import load_classifier
    from fbta.io.h5 import read_features

    d = tmp_path
    ov = [f"data.slides={d}/slides", f"data.labels={d}/labels.csv", f"data.masks={d}/masks", f"data.out={d}/out",
          "run.progress=false", f"tracking.uri=sqlite:///{d}/mlflow.db", f"tracking.artifact_root={d}/mlruns", *TINY]
    assert fbta("synth", *ov, "synth.n_slides=8", "synth.width=1280", "synth.height=1280") == 0
    for stage in ("tile", "extract"):
        assert fbta(stage, *ov) == 0
    tune = ["train.method=fbta", f"tune.storage=sqlite:///{d}/optuna.db", "tune.study=s", "tune.n_trials=2",
            "tune.epochs=2", "tune.startup_trials=2", "tune.n_clusters=[2,4]", "tune.m=[1,2]", "tune.k=[2,3]",
            "tune.lr=[0.0002]", "tune.extractor_lr=[]", "tune.translator_lr=[0.0001,0.001]"]
    assert fbta("tune", *ov, *tune) == 0

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{d}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        assert set(t.params) == {"cluster.n_clusters", "fbta.m", "fbta.k", "fbta.translator_lr"}
        meta = json.loads((d / f"out/tune/s/trial_{t.number:04d}/models/fbta_abmil/meta.json").read_text())
        assert meta["n_clusters"] == t.params["cluster.n_clusters"] and meta["translator"]["k"] == t.params["fbta.k"]
        assert meta["fbta"]["epochs"] == 2 and meta["epochs_run"] <= 2  # tune.epochs, not params.yaml's fbta.epochs
        clusters = d / f"out/tune/s/trial_{t.number:04d}/clusters/test_efficientnet"
        assert clusters.is_symlink() and clusters.resolve().parent.parent.name == f"C{t.params['cluster.n_clusters']}"
    best = json.loads((d / "out/tune/s/best.json").read_text())
    assert best["params"]["train.lr"] == 0.0002  # a one-value list is fixed, and written back with the rest

    folder = Path(best["best_trial_dir"]) / "models/fbta_abmil"
    assert fbta("register", *ov, "register.models=[classifier]", f"register.classifier={folder}") == 0
    mv = MlflowClient(f"sqlite:///{d}/mlflow.db").get_model_version_by_alias("fbta-classifier", "champion")
    assert mv.tags["fbta.method"] == "fbta" and mv.tags["fbta.extractor"] == "test_efficientnet"
    model = mlflow.pyfunc.load_model(mv.source)
    shipped = {Path(p).name for p in model.unwrap_python_model().clf.files}
    assert shipped == {"meta.json", "best.pt", "translator.pt"}  # translator + EMA MIL, nothing else
    bag, _, _ = read_features(next((d / "out/features/test_efficientnet/h5_files").glob("*.h5")))
    np.testing.assert_allclose(model.predict(bag).to_numpy()[0], load_classifier(folder).predict_proba(bag),
                               rtol=1e-5, atol=1e-6)
