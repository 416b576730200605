"""Faults injected into real runs: SIGKILL mid-stage, a full disk, a forbidden folder, two runs at once.

What must hold every time: no partial HDF5 is ever taken for a finished one,
finished slides are not redone, a re-run ends exactly where an uninterrupted
run ends, and outputs written before the fault are byte-identical after it.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from faultkit import (
    MODEL,
    cohort_overrides,
    digests,
    env,
    fbta_cmd,
    file_modes_apply,
    file_size_limit,
    kill_when,
    leftovers,
    run,
)

from fbta.cli import main
from fbta.io.h5 import coords_complete, features_complete, read_coords, read_features

N_SLIDES = 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Six synthetic Aperio slides, tiled once, plus a reference extraction nobody interrupts."""
    root = tmp_path_factory.mktemp("faults")
    o = cohort_overrides(root)
    assert main(["synth", *o, f"synth.n_slides={N_SLIDES}", "synth.width=2048", "synth.height=2048"]) == 0
    assert main(["tile", *o]) == 0
    ref = cohort_overrides(root, f"data.out={root / 'ref'}")
    shutil.copytree(root / "out" / "coords", root / "ref" / "coords")
    assert main(["extract", *ref]) == 0
    return root


def fresh_copy(cohort: Path, dest: Path, features: bool = False) -> Path:
    """A project of its own: the cohort's slides and coords (and, optionally, the reference features)."""
    for name in ("slides", "masks", "labels.csv"):
        src = cohort / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    shutil.copytree(cohort / "out" / "coords", dest / "out" / "coords")
    if features:
        shutil.copytree(cohort / "ref" / "features", dest / "out" / "features")
    return dest


def feats_dir(root: Path) -> Path:
    return root / "out" / "features" / MODEL / "h5_files"


def assert_same_features(root: Path, cohort: Path) -> None:
    ref = cohort / "ref" / "features" / MODEL / "h5_files"
    got = sorted(p.name for p in feats_dir(root).glob("*.h5"))
    assert got == sorted(p.name for p in ref.glob("*.h5"))
    for name in got:
        a, ca, _ = read_features(feats_dir(root) / name)
        b, cb, _ = read_features(ref / name)
        assert np.array_equal(ca, cb)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def status(root: Path, stage: str) -> dict[str, list[str]]:
    slides = json.loads((root / "out" / "reports" / "status" / f"{stage}.json").read_text())["slides"]
    out: dict[str, list[str]] = {}
    for s in slides:
        out.setdefault(s["status"], []).append(s["slide_id"])
    return out


# -- SIGKILL ---------------------------------------------------------------------------------------------


def test_extract_killed_after_its_first_slide_resumes_without_redoing_it_and_ends_like_an_uninterrupted_run(
        cohort, tmp_path):
    root = fresh_copy(cohort, tmp_path)
    folder = feats_dir(root)
    finished = lambda: folder.is_dir() and any(features_complete(p) for p in folder.glob("*.h5"))  # noqa: E731
    kill_when("extract", cohort_overrides(root), tmp_path, finished)

    complete = {p.name for p in folder.glob("*.h5") if features_complete(p)}
    assert 1 <= len(complete) < N_SLIDES, "killed midway"
    assert all(features_complete(p) for p in folder.glob("*.h5")), "no partial file under a final name"
    before = digests(folder)
    rerun = run("extract", cohort_overrides(root), tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    st = status(root, "extract")
    assert sorted(st["skipped"]) == sorted(n[:-3] for n in complete)  # finished slides are not redone
    assert len(st["done"]) == N_SLIDES - len(complete)
    after = digests(folder)
    assert {k: after[k] for k in before} == before
    assert leftovers(root / "out") == []  # the killed writer's temp file and lock are gone
    assert_same_features(root, cohort)


def test_tile_killed_midway_resumes_and_ends_with_the_same_coords(cohort, tmp_path):
    root = fresh_copy(cohort, tmp_path)
    shutil.rmtree(root / "out" / "coords")
    coords = root / "out" / "coords"
    finished = lambda: coords.is_dir() and any(coords_complete(p) for p in coords.glob("*.h5"))  # noqa: E731
    kill_when("tile", cohort_overrides(root, "tile.thumbnail_px=2048"), tmp_path, finished)
    done_before = {p.name for p in coords.glob("*.h5")}
    assert 1 <= len(done_before) < N_SLIDES
    rerun = run("tile", cohort_overrides(root, "tile.thumbnail_px=2048"), tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert len(status(root, "tile")["skipped"]) == len(done_before)
    for p in sorted((cohort / "out" / "coords").glob("*.h5")):
        assert np.array_equal(read_coords(coords / p.name)[0], read_coords(p)[0])
    assert leftovers(root / "out") == []


@pytest.fixture(scope="module")
def mil_features(tmp_path_factory) -> Path:
    from milcohort import make_cohort

    root = tmp_path_factory.mktemp("milfaults")
    make_cohort(root, n_per_class=8)
    return root


def train_overrides(root: Path, out: Path) -> list[str]:
    from milcohort import SMALL_HEADS

    return [f"data.features={root / 'features'}", f"data.labels={root / 'labels.csv'}", f"data.out={out}",
            "run.progress=false", "train.epochs=14", "train.patience=100", "train.device=cpu", "mil.dropout=0.25",
            "train.ema=true", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", f"tracking.artifact_root={out / 'mlruns'}",
            *SMALL_HEADS["abmil"]]


def resume_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:  # not there yet
        return -1


def test_training_killed_midway_resumes_from_its_last_epoch_with_the_same_rng_and_ends_with_the_same_model(
        mil_features, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = run("train", train_overrides(mil_features, ref_out), tmp_path)
    assert ref.returncode == 0, ref.stderr
    folder = out / "models" / "vanilla_abmil"
    kill_when("train", train_overrides(mil_features, out), tmp_path, lambda: resume_epoch(folder / "resume.pt") >= 4)
    killed_at = resume_epoch(folder / "resume.pt")
    assert 4 <= killed_at < 13
    again = run("train", train_overrides(mil_features, out), tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resuming after epoch {killed_at}" in again.stdout
    assert not (folder / "resume.pt").exists()  # a completed run leaves no resume state behind
    a = torch.load(folder / "best.pt", weights_only=True)
    b = torch.load(ref_out / "models" / "vanilla_abmil" / "best.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def curve(p: Path) -> list[dict[str, str]]:  # every column but the wall time of an epoch
        return [{k: v for k, v in row.items() if k not in ("seconds", "train_seconds")} for row in csv.DictReader(p.open())]

    resumed = curve(folder / "history.csv")
    assert len(resumed) == 14 and resumed == curve(ref_out / "models" / "vanilla_abmil" / "history.csv")


def test_a_resume_file_from_other_settings_is_ignored_and_training_starts_afresh(mil_features, tmp_path):
    out = tmp_path / "out"
    folder = out / "models" / "vanilla_abmil"
    kill_when("train", train_overrides(mil_features, out), tmp_path, lambda: resume_epoch(folder / "resume.pt") >= 1)
    again = run("train", [*train_overrides(mil_features, out), "train.lr=0.001", "train.epochs=3"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "from another configuration; starting afresh" in again.stdout
    assert "resuming" not in again.stdout


# -- full disk, forbidden folder ----------------------------------------------------------------------------


def _one_line_storage_error(proc: subprocess.CompletedProcess, why: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and why in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_a_full_disk_stops_extract_with_one_line_and_keeps_every_finished_file(cohort, tmp_path):
    root = fresh_copy(cohort, tmp_path, features=True)
    folder = feats_dir(root)
    victims = sorted(folder.glob("*.h5"))[3:]
    for p in victims:  # three slides still to do
        p.unlink()
    before = digests(folder)
    limit = min(os.path.getsize(cohort / "ref" / "features" / MODEL / "h5_files" / p.name) for p in victims) // 2
    proc = run("extract", cohort_overrides(root), tmp_path, preexec=file_size_limit(limit))
    line = _one_line_storage_error(proc, "file size limit reached")
    assert str(folder) in line and "re-run `fbta extract`" in line
    assert digests(folder) == before  # nothing lost, nothing half-written under a final name
    assert [p for p in folder.iterdir() if p.name.endswith(".tmp")] == []
    proc = run("extract", cohort_overrides(root), tmp_path)  # space again: it finishes the rest
    assert proc.returncode == 0 and len(status(root, "extract")["done"]) == len(victims)
    assert_same_features(root, cohort)


def _tmpfs(size: str) -> Path | None:
    mnt = Path(tempfile.mkdtemp(prefix="fbta-full-"))
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                              capture_output=True).returncode == 0
    return mnt if ok else None


def test_no_space_left_on_a_real_small_filesystem_is_one_line_and_loses_nothing(cohort, tmp_path):
    mnt = _tmpfs("140k")  # the coords (80 kB) and about two feature files
    if mnt is None:
        pytest.skip("mounting a small tmpfs needs root (the file-size-limit test covers the same path)")
    try:
        out = mnt / "out"
        shutil.copytree(cohort / "out" / "coords", out / "coords")
        o = [*cohort_overrides(cohort), f"data.out={out}"]
        proc = run("extract", o, tmp_path)
        line = _one_line_storage_error(proc, "no space left on the device")
        done = [p for p in (out / "features" / MODEL / "h5_files").glob("*.h5")]
        assert all(features_complete(p) for p in done) and len(done) < N_SLIDES
        assert f"{out}" in line
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()


def test_a_read_only_output_folder_is_one_line_permission_error_and_loses_nothing(cohort, tmp_path):
    root = fresh_copy(cohort, tmp_path, features=True)
    folder = feats_dir(root)
    for p in sorted(folder.glob("*.h5"))[3:]:
        p.unlink()
    before = digests(folder)
    os.chmod(folder, 0o555)
    try:
        proc = run("extract", cohort_overrides(root), tmp_path, preexec=file_modes_apply)
    finally:
        os.chmod(folder, 0o755)
    line = _one_line_storage_error(proc, "permission denied")
    assert str(folder) in line
    assert digests(folder) == before


# -- two runs at once ---------------------------------------------------------------------------------------


def test_two_extract_runs_on_one_cohort_split_the_slides_and_neither_writes_a_slide_twice(cohort, tmp_path):
    root = fresh_copy(cohort, tmp_path)
    procs = [subprocess.Popen(fbta_cmd("extract", cohort_overrides(root)), cwd=tmp_path, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    n_done = [int(re.search(r"(\d+) done", out).group(1)) for out, _ in outs]  # each run's own summary line
    assert sum(n_done) == N_SLIDES, outs  # every slide extracted exactly once, by one of the two
    assert min(n_done) >= 1, "the two runs worked side by side"
    assert leftovers(root / "out") == []
    assert_same_features(root, cohort)


def test_a_lock_left_by_a_killed_run_is_cleared_by_the_next_run(cohort, tmp_path):
    root = fresh_copy(cohort, tmp_path)
    folder = feats_dir(root)
    folder.mkdir(parents=True)
    first = sorted(p.stem for p in (root / "out" / "coords").glob("*.h5"))[0]
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    (folder / f".{first}.h5.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                                          "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    (folder / f".{first}.h5.abc123.tmp").write_bytes(b"half a file")
    proc = run("extract", cohort_overrides(root), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"cleared a stale lock on {first}.h5 (left by pid {dead.pid}" in proc.stdout + proc.stderr
    assert leftovers(root / "out") == [] and features_complete(folder / f"{first}.h5")
