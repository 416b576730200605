"""DVC as users drive it: `dvc add` + a local remote round trip, param changes, `dvc exp run -S`.

Every test works in a throw-away git+DVC project holding this repo's dvc.yaml
and sources (tests/test_pipeline.py's style), never in the repo's own data/.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import pink_on_white

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost", DO_NOT_TRACK="1")
    return env


def sh(cwd: Path, *args: str) -> str:
    proc = subprocess.run(list(args), cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, str(BIN / "dvc"), *args)


def make_project(dest: Path) -> Path:
    """Repo sources + dvc.yaml + a 3-slide, random-weights params.yaml, as a fresh git+DVC repo."""
    dest.mkdir(parents=True)
    shutil.copytree(ROOT / "fbta", dest / "fbta", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"].update(n_slides=3, width=1024, height=1024)
    params["run"]["progress"] = False
    params["extract"].update(model="test_efficientnet", weights="random", num_workers=0)
    params["cluster"]["n_clusters"] = 8
    params["tracking"]["enabled"] = False
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text("__pycache__/\n")
    sh(dest, "git", "init", "-q")
    dvc(dest, "init", "-q")
    dvc(dest, "config", "core.analytics", "false")
    return dest


def md5s(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dvc_add_slides_and_stage_outputs_round_trip_through_a_local_remote(tmp_path: Path):
    proj = make_project(tmp_path / "proj")
    dvc(proj, "config", "cache.type", "hardlink,symlink")  # README: gigabytes of slides are linked, not copied
    raw = proj / "cohort" / "slides"  # a user's own slide folder, versioned with `dvc add`
    raw.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(pink_on_white(640, 480, (100, 100, 400, 300), seed=i)).save(raw / f"biopsy_{i}.png")
    dvc(proj, "add", "cohort/slides")
    assert (proj / "cohort" / "slides.dvc").exists()
    for f in raw.iterdir():  # linked into the cache: no second copy of the bytes
        assert f.is_symlink() or f.stat().st_nlink >= 2, f"{f} was copied, not linked"
    dvc(proj, "repro", "synth")  # a stage's outputs live in the cache too
    before = {"cohort/slides": md5s(raw), "data/slides": md5s(proj / "data/slides")}
    assert len(before["data/slides"]) >= 3

    remote = tmp_path / "remote"
    dvc(proj, "remote", "add", "-d", "local", str(remote))
    assert "pushed" in dvc(proj, "push")
    assert any(remote.rglob("*")), "nothing reached the remote"
    shutil.rmtree(proj / ".dvc" / "cache")
    shutil.rmtree(raw)
    shutil.rmtree(proj / "data")
    assert "not in cache" in dvc(proj, "status", "synth", "cohort/slides.dvc")
    dvc(proj, "pull", "synth", "cohort/slides.dvc")
    after = {"cohort/slides": md5s(raw), "data/slides": md5s(proj / "data/slides")}
    assert after == before
    assert "Data and pipelines are up to date" in dvc(proj, "status", "synth", "cohort/slides.dvc")
    assert "Cache and remote 'local' are in sync" in dvc(proj, "status", "--cloud", "synth", "cohort/slides.dvc")

    # `dvc exp run -S <FBTA param>`: accepted (the key exists in params.yaml) and nothing that does not
    # read it re-runs; the experiment records the value.
    sh(proj, "git", "add", "-A")
    sh(proj, "git", "commit", "-qm", "cohort")
    out = dvc(proj, "exp", "run", "-S", "fbta.m=2", "synth")
    assert "Stage 'synth' didn't change, skipping" in out and "Running stage" not in out
    rows = list(csv.DictReader(io.StringIO(dvc(proj, "exp", "show", "--no-pager", "--csv"))))
    assert "fbta.m" in rows[0] and {r["fbta.m"] for r in rows} >= {"2"}


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synth → tile → extract → cluster reproduced and committed once (the FBTA strata exist)."""
    proj = make_project(tmp_path_factory.mktemp("dvcparams") / "proj")
    dvc(proj, "repro", "cluster")
    sh(proj, "git", "add", "-A")
    sh(proj, "git", "commit", "-qm", "pipeline up to cluster")
    return proj


def _set_param(proj: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params[section][key] = value
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# In CI (was slow-only: status + a dry run): README's "`cluster.*` reaches the clusters and what reads them",
# by a real `dvc repro` after a real params.yaml edit. ~60 s idle (the fixture: synth → tile → extract → cluster
# on 3 small slides). Defects guarded: a stage listing params it does not read (extract re-runs on a cluster
# change: minutes per slide on a real cohort), or cluster not listing cluster.* (a stale clustering is kept).
def test_changing_fbta_c_reruns_only_cluster(clustered: Path):
    out = dvc(clustered, "status", "synth", "tile", "extract", "cluster")
    assert "up to date" in out, out
    upstream = {s: md5s(clustered / "data" / d) for s, d in (("tile", "coords"), ("extract", "features"))}
    _set_param(clustered, "cluster", "n_clusters", 4)  # C, an FBTA parameter
    try:
        status = yaml.safe_load(dvc(clustered, "status", "--json", "synth", "tile", "extract", "cluster"))
        assert set(status) == {"cluster"}, status
        assert "changed deps" in str(status["cluster"]) and "params.yaml" in str(status["cluster"])
        ran = dvc(clustered, "repro", "cluster")  # for real: only cluster runs
        assert "Running stage 'cluster'" in ran, ran
        for stage in ("synth", "tile", "extract"):
            assert f"Stage '{stage}' didn't change, skipping" in ran and f"Running stage '{stage}'" not in ran
        assert {s: md5s(clustered / "data" / d) for s, d in (("tile", "coords"), ("extract", "features"))} == upstream
        assert "up to date" in dvc(clustered, "status", "synth", "tile", "extract", "cluster")
        recorded = yaml.safe_load((clustered / "dvc.lock").read_text())["stages"]["cluster"]["params"]["params.yaml"]
        assert recorded.get("cluster.n_clusters", recorded.get("cluster", {}).get("n_clusters")) == 4  # the new C
    finally:
        sh(clustered, "git", "checkout", "-q", "params.yaml", "dvc.lock")
        dvc(clustered, "checkout", "-q", "--force", "cluster")


@pytest.mark.slow
def test_dvc_exp_run_sets_an_fbta_param_and_reruns_only_its_dependents(clustered: Path):
    out = dvc(clustered, "exp", "run", "-S", "cluster.n_clusters=4", "cluster")
    assert "Running stage 'cluster'" in out
    assert "Stage 'extract' didn't change, skipping" in out and "Running stage 'extract'" not in out
    show = dvc(clustered, "exp", "show", "--no-pager", "--csv")
    assert ",4," in show  # the experiment's cluster.n_clusters
    sh(clustered, "git", "checkout", "-q", "params.yaml", "dvc.lock")
    dvc(clustered, "checkout", "-q", "--force", "cluster")


def test_fbta_params_reach_only_fbta_stages():
    """Changing fbta.m/k/lrs must not invalidate tiling, features, clusters or the vanilla baseline."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stages = {s.name: s for s in repo.index.stages}
        readers = {name for name, s in stages.items()
                   for p in s.params for key in (p.params if hasattr(p, "params") else [])
                   if key == "fbta" or key.startswith("fbta.")}
    untouched = {"synth", "tile", "extract", "cluster", "train_vanilla", "evaluate", "heatmap"} & set(stages)
    assert not readers & untouched, f"stages {readers & untouched} list fbta params but do not use FBTA"
    for name in readers:
        assert "fbta" in stages[name].cmd or "infer" in stages[name].cmd, (name, stages[name].cmd)


def test_fbta_section_is_settable_with_dvc_exp_run():
    """`dvc exp run -S fbta.m=2` needs the key in params.yaml (DVC overrides only existing keys)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert isinstance(params.get("fbta"), dict) and {"m", "k"} <= set(params["fbta"]), \
        "params.yaml has no fbta section with m and k"
    from fbta.config import load_config

    cfg = load_config(ROOT / "params.yaml", ["fbta.m=2", "fbta.k=5"])
    assert (cfg.fbta.m, cfg.fbta.k) == (2, 5)
    with pytest.raises(Exception, match="fbta.typo"):
        load_config(ROOT / "params.yaml", ["fbta.typo=1"])
    assert np.isfinite(cfg.fbta.translator_lr)


def test_every_stage_lists_every_fbta_module_its_command_runs():
    """A change to any module a stage imports (at the top or inside a function) must make `dvc status` say so."""
    sys.path.insert(0, str(ROOT / "tools"))
    import dvc_deps

    lacking = dvc_deps.missing()
    assert set(lacking) >= {"tile", "extract", "train_fbta", "seg_distill", "register"}
    assert not any(lacking.values()), {k: v for k, v in lacking.items() if v}
    # imports inside functions count: fbta/seg/dataset.py reads patches through one
    assert "fbta.features.extract" in dvc_deps.imported(ROOT / "fbta/seg/dataset.py", "fbta.seg.dataset")
    assert Path("fbta/features/extract.py") in dvc_deps.stage_code("seg-teacher")
    assert not dvc_deps.covered(Path("fbta/io/h5.py"), ["fbta/io.py", "fbta/i"])  # a folder, not a name prefix


def test_each_metrics_file_has_one_writing_stage():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    owners: dict[str, list[str]] = {}
    for name, st in spec.items():
        for entry in st.get("metrics", []) + st.get("outs", []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            if "metrics" in str(path):
                owners.setdefault(str(path), []).append(name)
    assert owners and all(len(v) == 1 for v in owners.values()), owners
