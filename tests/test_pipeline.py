"""The stages chained the way users run them: `fbta synth` → `fbta tile`, and `dvc repro` itself."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fbta.cli import main
from fbta.io.h5 import read_coords

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["synth.n_slides=4", "synth.width=1536", "synth.height=1536", "run.progress=false"]


def test_synth_then_tile_covers_every_demo_slide(tmp_path: Path, capsys):
    d = [f"data.slides={tmp_path}/slides", f"data.labels={tmp_path}/labels.csv", f"data.masks={tmp_path}/masks",
         f"data.out={tmp_path}/out"]
    assert main(["synth", *d, *SMALL]) == 0
    assert main(["tile", *d, *SMALL, "run.strict=true"]) == 0
    assert "4 done" in capsys.readouterr().out
    for i in range(4):
        coords, attrs = read_coords(tmp_path / f"out/coords/synth_{i:03d}.h5")
        assert len(coords) > 5 and attrs["vendor"] == "aperio" and attrs["mpp_source"] == "vendor"


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    """A throw-away git+DVC project holding this repo's pipeline definition and sources."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(ROOT / "fbta", proj / "fbta", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"].update(n_slides=2, width=1536, height=1536)
    params["run"]["progress"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    env = _env()
    for cmd in (["git", "init", "-q"], [_bin("dvc"), "init", "-q"], [_bin("dvc"), "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=proj, check=True, env=env)
    return proj


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost")
    return env


def test_dvc_repro_runs_synth_and_tile_and_reruns_only_what_changed(dvc_project: Path):
    run = lambda *a: subprocess.run([_bin("dvc"), *a], cwd=dvc_project, env=_env(), capture_output=True,  # noqa: E731
                                    text=True, check=True).stdout
    run("repro", "tile")
    assert len(list((dvc_project / "data/coords").glob("synth_*.h5"))) == 2
    assert "up to date" in run("status", "tile") or "Data and pipelines are up to date" in run("status", "tile")
    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    params["tile"]["min_tissue"] = 0.5  # a tiling parameter: synth must not re-run
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params))
    out = run("repro", "tile")
    assert "Stage 'synth' didn't change, skipping" in out and "Running stage 'tile'" in out
