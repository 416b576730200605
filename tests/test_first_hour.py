"""The first hour on someone else's cohort (issue #20): no tracebacks, no degenerate models, no silent defaults.

Each case runs the real ``fbta`` CLI on real files written by the real writers
(tests/milcohort.py's feature cohort), as a new user would meet it.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from fbta.cli import main
from fbta.device import fit_workers
from fbta.results import summarise
from milcohort import SMALL_HEADS, make_cohort

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(ROOT / "params.yaml")]


def fbta(*args: str) -> int:
    return main([*args, *PARAMS])


def test_a_feature_file_whose_coords_and_features_disagree_is_left_out_by_name_and_the_rest_trains(
        tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=8) + SMALL_HEADS["abmil"] + ["train.epochs=2"]
    bad = tmp_path / "features/h5_files/s02.h5"
    with h5py.File(bad, "a") as f:  # a damaged copy: one coordinate row short
        coords = f["coords"][:-1]
        del f["coords"]
        f["coords"] = coords
    assert fbta("train", *ov) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    status = json.loads((tmp_path / "out/reports/status/train.json").read_text())
    s02 = {s["slide_id"]: s for s in status["slides"]}["s02"]
    reason = s02["reason"]
    assert s02["status"] == "failed" and sum(reason in line for line in err.splitlines()) == 1
    assert reason.startswith(f"{bad}: ") and "feature rows but" in reason and "coords" in reason
    split = json.loads((tmp_path / "out/models/vanilla_abmil/meta.json").read_text())["split"]
    assert "s02" not in split["train"]


@pytest.mark.parametrize("where", ["everywhere", "in the training split"])
def test_a_cohort_with_one_class_is_refused_naming_the_labels_file(tmp_path: Path, capsys, where: str) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"] + ["train.epochs=1"]
    labels = tmp_path / "labels.csv"
    lines = labels.read_text().splitlines()
    if where == "everywhere":
        lines = [lines[0]] + [ln.replace(",normal,", ",tumour,") for ln in lines[1:]]
    else:  # normal slides only in val/test
        lines = [lines[0]] + [ln for ln in lines[1:] if not (",normal,train" in ln)]
    labels.write_text("\n".join(lines) + "\n")
    assert fbta("train", *ov) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fbta train: error: ")
    if where == "everywhere":
        assert f"{labels}: classification needs at least 2 classes; the label column has 'tumour'" in err[0]
    else:
        assert "no training slide with features for class(es) normal" in err[0]
    assert not list((tmp_path / "out").rglob("best.pt"))


def test_every_command_says_which_params_are_in_force(tmp_path: Path, capsys, monkeypatch) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + ["cluster.n_clusters=4"]
    assert fbta("cluster", *ov) == 0
    assert f"fbta cluster: params {ROOT / 'params.yaml'} + {len(ov)} override(s)" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # a folder without params.yaml: the schema's GPU defaults, said out loud
    assert main(["cluster", *ov]) == 0
    out = capsys.readouterr().out
    assert f"params: built-in defaults + {len(ov)} override(s) — no params.yaml in {tmp_path}" in out
    assert "GPU-sized" in out and "--params" in out


def test_more_loader_workers_than_cores_are_capped_and_said_once(capsys) -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    assert fit_workers(cores + 3, "test.num_workers_a") == cores
    assert fit_workers(cores + 5, "test.num_workers_a") == cores
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"test.num_workers_a={cores + 3} > {cores} usable CPU core(s) here: using {cores}"]
    assert fit_workers(0, "test.num_workers_b") == 0 and fit_workers(1, "test.num_workers_b") == 1


def test_the_summary_shows_patches_per_slide_only_for_stages_that_make_patches(tmp_path: Path) -> None:
    status = tmp_path / "reports/status"
    status.mkdir(parents=True)
    for stage in ("tile", "train", "heatmap"):
        slides = [{"slide_id": f"s{i}", "status": "done", "info": {"patches": 10 + i}} for i in range(3)]
        (status / f"{stage}.json").write_text(json.dumps(
            {"stage": stage, "counts": {"done": 3, "skipped": 0, "failed": 0}, "slides": slides}))
    text = summarise(tmp_path).splitlines()
    assert [ln.split()[0] for ln in text if not ln.startswith(" ")] == ["tile", "train", "heatmap"]
    assert sum("patches per slide" in ln for ln in text) == 1
    assert "patches per slide" in text[1] and text[0].startswith("tile")


def test_selecting_on_a_handful_of_validation_slides_comes_with_a_hint(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"] + ["train.epochs=2"]
    assert fbta("train", *ov) == 0
    out = capsys.readouterr().out
    assert "train: note: 2 validation slide(s) — one slide moves val AUC by up to 1.00" in out
    assert "benchmarks/fbta_protocol.py" in out


def test_no_hint_when_the_validation_split_can_select() -> None:
    from fbta.stages.train import selection_note

    assert selection_note(40) == "" and "coin toss" in selection_note(6)
    assert np.isclose(float(selection_note(8).split("up to ")[1].split(",")[0]), 0.25)


def test_minus_one_workers_means_the_machines_usable_cores() -> None:
    import os

    assert fit_workers(-1, "test.num_workers_c") == len(os.sched_getaffinity(0))
