"""A degenerate segmenter (no epoch beat the trivial baselines) is never promoted to @champion (#15)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from fbta.registry.promote import TAG, promote, refusal
from fbta.registry.publish import version_tags

ROOT = Path(__file__).resolve().parents[1]


def test_refusal_reads_the_beats_baselines_flag_of_segmenters_only():
    assert refusal("segmenter", {TAG + "beats_baselines": "False", TAG + "baseline_val_f1": "0.5"}).startswith(
        "degenerate segmenter")
    assert "0.5000" in refusal("segmenter", {TAG + "beats_baselines": "false", TAG + "baseline_val_f1": "0.5"})
    assert refusal("segmenter", {TAG + "beats_baselines": "True"}) is None
    assert refusal("segmenter", {}) is None  # registered before the flag existed: the usual rule
    assert refusal("classifier", {TAG + "beats_baselines": "False"}) is None


def test_version_tags_carry_the_flag_from_meta_json(tmp_path: Path):
    tags = version_tags("segmenter", tmp_path, {"val_f1": 0.7, "beats_baselines": False, "baseline_val_f1": 0.5}, "x")
    assert tags[TAG + "beats_baselines"] == "False" and tags[TAG + "val_f1"] == "0.7"
    assert refusal("segmenter", tags) is not None


class FakeClient:
    """Just what ``promote`` calls, in memory."""

    def __init__(self, versions: dict[str, dict[str, str]], champion: str | None = None) -> None:
        self.versions, self.aliases = versions, ({"champion": champion} if champion else {})

    def get_model_version(self, name: str, version: str):
        return SimpleNamespace(version=version, tags=self.versions[version])

    def get_model_version_by_alias(self, name: str, alias: str):
        from mlflow.exceptions import MlflowException

        if alias not in self.aliases:
            raise MlflowException(f"no alias {alias}")
        return self.get_model_version(name, self.aliases[alias])

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.aliases[alias] = str(version)

    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self.versions[version][key] = value

    def get_registered_model(self, name: str):
        return SimpleNamespace(aliases=dict(self.aliases))


@pytest.mark.parametrize("champion", [None, "1"])
def test_promotion_refuses_a_degenerate_segmenter_even_with_a_better_score(tmp_path: Path, champion):
    client = FakeClient({"1": {TAG + "val_f1": "0.55"},
                         "2": {TAG + "val_f1": "0.9", TAG + "beats_baselines": "False", TAG + "baseline_val_f1": "0.95"}},
                        champion)
    d = promote(client, "seg", "segmenter", "2", tmp_path / ".lock")
    assert d["decision"] == "rejected" and "degenerate segmenter" in d["reason"] and d["refused"]
    assert client.aliases.get("champion") == champion  # nothing moved
    assert client.versions["2"][TAG + "decision"] == "rejected"
    ok = FakeClient({"1": {TAG + "val_f1": "0.55"}, "2": {TAG + "val_f1": "0.9", TAG + "beats_baselines": "True"}},
                    champion)
    assert promote(ok, "seg", "segmenter", "2", tmp_path / ".lock")["decision"] == "promoted"


# In CI (was slow-only; the fast test above uses an in-memory client): ~17 s idle, a SQLite MLflow store + a pyfunc
def test_fbta_register_does_not_make_a_degenerate_segmenter_champion(tmp_path: Path, capsys):
    """Through the real command and a real SQLite registry. Defects guarded: the flag lost between meta.json and
    the version's tags (publish), or `promote` reading another tag — the better-scoring degenerate model would
    then be @champion in the store, whatever an in-memory client says."""
    from fbta.cli import main
    from fbta.seg.model import save_segmenter
    from fbta.seg.network import SideOutputNet

    net = SideOutputNet("test_efficientnet", (0, 1, 2))
    save_segmenter(tmp_path / "seg", net, {"val_f1": 0.8, "input_size": 32, "beats_baselines": False,
                                           "baseline_val_f1": 0.85})
    ov = [f"data.out={tmp_path}/out", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
          f"tracking.artifact_root={tmp_path}/mlruns", "register.models=[segmenter]",
          f"register.segmenter={tmp_path}/seg", "register.segmenter_name=seg-degenerate", "run.progress=false"]
    assert main(["register", *ov, "--params", str(ROOT / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "rejected" in out and "degenerate segmenter" in out
    d = json.loads((tmp_path / "out/reports/registry/seg-degenerate.json").read_text())
    assert d["decision"] == "rejected" and "champion" not in d["aliases"]
    from mlflow.tracking import MlflowClient

    store = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # what the store itself says, read afresh
    assert "champion" not in store.get_registered_model("seg-degenerate").aliases
    (v,) = store.search_model_versions("name='seg-degenerate'")
    assert v.tags[TAG + "beats_baselines"] == "False" and v.tags[TAG + "decision"] == "rejected"
