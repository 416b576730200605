"""Specification of `fbta register`: pyfunc models in a real SQLite MLflow registry, alias promotion.

A real ABMIL is trained once on the tiny feature cohort (tests/milcohort.py);
candidates with other validation metrics are copies of its folder whose
meta.json states those metrics (promotion reads nothing else), so the rule is
tested exactly, on real registry versions and aliases.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fbta.cli import main
from fbta.io.lock import file_lock
from fbta.registry.promote import beats, lock_file, promote
from milcohort import SMALL_HEADS, make_cohort

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(ROOT / "params.yaml")]


def fbta(*args: str) -> int:
    return main([*args, *PARAMS])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """A trained vanilla ABMIL (tracking off while training: the registry tests bring their own store)."""
    root = tmp_path_factory.mktemp("reg")
    ov = make_cohort(root) + SMALL_HEADS["abmil"]
    assert fbta("train", *ov, "train.epochs=4", "train.patience=4", "train.lr=0.001") == 0
    return root, ov


@pytest.fixture(scope="module")
def shared_store(trained, tmp_path_factory) -> Path:
    """One real SQLite MLflow store for the module (creating one costs seconds); tests use their own model names."""
    return tmp_path_factory.mktemp("mlflow")


@dataclass
class Store:
    tmp: Path
    ov: list[str]
    name: str  # this test's registered classifier name
    uri: str


@pytest.fixture
def store(trained, shared_store: Path, tmp_path: Path, request) -> Store:
    """Per test: its own outputs folder and registered-model names in the shared store."""
    root, ov = trained
    name = f"clf-{request.node.name[5:40]}"
    ov = [o for o in ov if o not in ("tracking.enabled=false",) and not o.startswith("data.out=")]
    ov += [f"data.out={tmp_path}/out", f"tracking.uri=sqlite:///{shared_store}/mlflow.db",
           f"tracking.artifact_root={shared_store}/mlruns", "register.models=[classifier]",
           f"register.classifier={root}/out/models/vanilla_abmil", f"register.classifier_name={name}",
           f"register.segmenter_name=seg-{request.node.name[5:40]}"]
    return Store(tmp_path, ov, name, f"sqlite:///{shared_store}/mlflow.db")


def candidate(trained, dest: Path, **metrics: float) -> Path:
    """A copy of the trained model whose meta.json claims ``metrics``."""
    src = trained[0] / "out/models/vanilla_abmil"
    shutil.copytree(src, dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta.update(metrics)
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


def decision(st: Store) -> dict:
    return json.loads((st.tmp / "out/reports/registry" / f"{st.name}.json").read_text())


def test_beats_rule() -> None:
    assert beats("classifier", {"val_auc": 0.9}, {"val_auc": 0.8})[0]
    assert not beats("classifier", {"val_auc": 0.8}, {"val_auc": 0.9})[0]
    assert beats("classifier", {"val_auc": 0.9, "val_loss": 0.3}, {"val_auc": 0.9, "val_loss": 0.4})[0]
    assert not beats("classifier", {"val_auc": 0.9, "val_loss": 0.4}, {"val_auc": 0.9, "val_loss": 0.4})[0]
    assert not beats("classifier", {"val_auc": 0.9}, {})[0]  # an unmeasured champion is not beaten by default
    assert beats("segmenter", {"val_f1": 0.7}, {"val_f1": 0.6})[0]
    assert not beats("segmenter", {"val_f1": 0.6}, {"val_f1": 0.6})[0]


def test_first_version_becomes_champion_and_rerun_registers_nothing(store, capsys) -> None:
    tmp, ov, NAME = store.tmp, store.ov, store.name
    assert fbta("register", *ov) == 0
    d = decision(store)
    assert d["decision"] == "promoted" and d["reason"] == "no champion yet" and d["aliases"] == {"champion": "1"}
    assert f"{NAME} v1 → @champion" in capsys.readouterr().out
    client = MlflowClient(store.uri)
    mv = client.get_model_version_by_alias(NAME, "champion")
    assert float(mv.tags["fbta.val_auc"]) >= 0.0 and mv.tags["fbta.kind"] == "classifier" and "fbta.sha256" in mv.tags
    assert fbta("register", *ov) == 0
    assert decision(store)["decision"] == "unchanged" and decision(store)["new_version"] is False
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1


def test_better_candidate_takes_champion_and_old_one_becomes_previous_worse_one_is_rejected(trained, store, capsys):
    tmp, ov, NAME = store.tmp, store.ov, store.name
    assert fbta("register", *ov, f"register.classifier={candidate(trained, tmp / 'a', val_auc=0.80, val_loss=0.5)}") == 0
    assert fbta("register", *ov, f"register.classifier={candidate(trained, tmp / 'b', val_auc=0.90, val_loss=0.6)}") == 0
    d = decision(store)
    assert d["decision"] == "promoted" and d["aliases"] == {"champion": "2", "previous": "1"}
    assert d["candidate"]["val_auc"] == 0.9 and d["champion_before"] == {"version": "1", "val_auc": 0.8, "val_loss": 0.5}
    assert "val_auc 0.9000 > 0.8000" in d["reason"]

    assert fbta("register", *ov, f"register.classifier={candidate(trained, tmp / 'c', val_auc=0.85, val_loss=0.1)}") == 0
    d = decision(store)
    assert d["decision"] == "rejected" and d["aliases"] == {"champion": "2", "previous": "1"}
    assert "rejected against @champion v2" in capsys.readouterr().out
    client = MlflowClient(store.uri)
    assert client.get_model_version(NAME, "3").tags["fbta.decision"] == "rejected"

    # equal AUC: the lower validation loss wins
    assert fbta("register", *ov, f"register.classifier={candidate(trained, tmp / 'd', val_auc=0.90, val_loss=0.4)}") == 0
    d = decision(store)
    assert d["decision"] == "promoted" and d["aliases"] == {"champion": "4", "previous": "2"}
    assert "tied" in d["reason"]


def test_promotion_waits_for_the_lock_so_two_registrations_cannot_both_win(trained, store) -> None:
    tmp, ov, NAME = store.tmp, store.ov, store.name
    assert fbta("register", *ov, f"register.classifier={candidate(trained, tmp / 'a', val_auc=0.7)}") == 0
    assert fbta("register", *ov, "register.promote=false",
                f"register.classifier={candidate(trained, tmp / 'b', val_auc=0.9)}") == 0
    assert fbta("register", *ov, "register.promote=false",
                f"register.classifier={candidate(trained, tmp / 'c', val_auc=0.8)}") == 0
    uri = store.uri
    lock = lock_file(uri, tmp, NAME)
    assert lock.parent == Path(uri[len("sqlite:///"):]).parent
    results: dict[str, dict] = {}

    def go(version: str) -> None:
        results[version] = promote(MlflowClient(uri), NAME, "classifier", version, lock)

    with file_lock(lock):  # another promotion in progress: both must wait, not read the champion now
        threads = [threading.Thread(target=go, args=(v,)) for v in ("3", "2")]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert all(t.is_alive() for t in threads) and not results
    for t in threads:
        t.join(30)
    aliases = MlflowClient(uri).get_registered_model(NAME).aliases
    assert str(aliases["champion"]) == "2"  # whatever the order, the best (0.9) ends as champion
    assert {results["2"]["decision"], results["3"]["decision"]} <= {"promoted", "rejected"}
    assert results["2"]["decision"] == "promoted"


def test_registered_pyfunc_loads_by_alias_and_matches_the_folder_model(trained, store) -> None:
    import mlflow.pyfunc

    from fbta.e2e.classifier import load_classifier

    tmp, ov, NAME = store.tmp, store.ov, store.name
    assert fbta("register", *ov) == 0
    source = MlflowClient(store.uri).get_model_version_by_alias(NAME, "champion").source
    model = mlflow.pyfunc.load_model(source)
    bag = np.random.default_rng(1).normal(size=(23, 16)).astype(np.float32)
    got = model.predict(bag)
    want = load_classifier(trained[0] / "out/models/vanilla_abmil").predict_proba(bag)
    assert list(got.columns) == ["normal", "tumour"]
    np.testing.assert_allclose(got.to_numpy()[0], want, rtol=1e-5, atol=1e-6)
    assert abs(got.to_numpy().sum() - 1.0) < 1e-5
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="16"):
        model.predict(np.zeros((5, 3), np.float32))
    info = model.metadata
    assert info.signature is not None and info.saved_input_example_info is not None  # schema + example served
    import mlflow.artifacts

    card = Path(mlflow.artifacts.download_artifacts(f"{source}/MODEL_CARD.md", tracking_uri=store.uri)).read_text()
    for field in ("feature extractor", "extractor weights", "feature size D | 16", "classes | normal, tumour",
                  "training cohort", "validation", "model files sha256", "code | fbta"):
        assert field in card, field
    mv = MlflowClient(store.uri).get_model_version_by_alias(NAME, "champion")
    assert mv.description == card


def test_segmenter_is_registered_and_judged_on_val_f1(store, tmp_path: Path) -> None:
    from fbta.seg.model import load_segmenter, save_segmenter
    from fbta.seg.network import create_segnet

    tmp, ov, NAME = store.tmp, store.ov, store.name
    net, _ = create_segnet("test_resnet", "random", (0, 1, 2), "fixed", (0.3, 0.3, 0.4))
    for name, f1 in (("s1", 0.6), ("s2", 0.5)):
        save_segmenter(tmp / name, net, {"val_f1": f1, "input_size": 64})
        assert fbta("register", *ov, "register.models=[segmenter]", f"register.segmenter={tmp / name}") == 0
    seg_name = next(o.split("=", 1)[1] for o in ov if o.startswith("register.segmenter_name="))
    d = json.loads((tmp / "out/reports/registry" / f"{seg_name}.json").read_text())
    assert d["decision"] == "rejected" and d["metric"] == "val_f1" and d["aliases"] == {"champion": "1"}
    import mlflow.pyfunc

    source = MlflowClient(store.uri).get_model_version_by_alias(seg_name, "champion").source
    patches = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    got = mlflow.pyfunc.load_model(source).predict(patches)
    np.testing.assert_allclose(got, load_segmenter(tmp / "s1").predict(patches), rtol=1e-5, atol=1e-6)
    assert got.shape == (2, 64, 64) and got.dtype == np.float32


def test_missing_model_or_disabled_tracking_is_one_clear_error(store, capsys) -> None:
    tmp, ov, NAME = store.tmp, store.ov, store.name
    assert fbta("register", *ov, f"register.classifier={tmp}/nowhere") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: no trained classifier (meta.json missing)" in err[0]
    assert fbta("register", *ov, "tracking.enabled=false") == 2
    assert "tracking.enabled=true" in capsys.readouterr().err
