"""Helpers for the fault tests: real `fbta` processes, killed or starved for real.

Why subprocesses: SIGKILL, a file-size limit or another user id only mean
something for a whole process; nothing here patches the code under test.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
MODEL = "test_resnet"


def cohort_overrides(root: Path, *extra: str) -> list[str]:
    """Every stage pointed at ``root``; the tiny random-weight extractor; MLflow inside ``root``."""
    return [f"data.slides={root / 'slides'}", f"data.labels={root / 'labels.csv'}", f"data.out={root / 'out'}",
            f"data.masks={root / 'masks'}", "run.progress=false", f"extract.model={MODEL}",
            "extract.weights=random", "extract.batch_size=8", "extract.num_workers=0", "extract.amp=false",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"tracking.artifact_root={root / 'mlruns'}", *extra]


def fbta_cmd(stage: str, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "fbta", stage, *overrides, "--params", str(ROOT / "params.yaml")]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
            "OMP_NUM_THREADS": "1"}


def run(stage: str, overrides: Sequence[str], cwd: Path, preexec: Optional[Callable[[], None]] = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(fbta_cmd(stage, overrides), cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def kill_when(stage: str, overrides: Sequence[str], cwd: Path, ready: Callable[[], bool],
              timeout: float = 600) -> str:
    """Start the stage, SIGKILL it the moment ``ready()`` holds; returns its stderr so far."""
    proc = subprocess.Popen(fbta_cmd(stage, overrides), cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"fbta {stage} ended (rc {proc.returncode}) before the kill point:\n"
                                     f"{proc.stderr.read() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise AssertionError(f"fbta {stage} never reached the kill point")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return proc.stderr.read() if proc.stderr else ""


def file_size_limit(max_bytes: int) -> Callable[[], None]:
    """preexec: no file this process writes may grow past ``max_bytes`` (writes then fail with EFBIG)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
    return apply


def file_modes_apply() -> None:
    """preexec: file permissions bind even for root (drop CAP_DAC_OVERRIDE, _READ_SEARCH, CAP_FOWNER).

    Why: CI may run as root, which ignores a read-only folder; a process whose
    capability bounding set lacks these is held to the modes like any user.
    """
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def digests(folder: Path, pattern: str = "*.h5") -> dict[str, str]:
    """name → sha256 of every finished output in ``folder`` (the 'nothing lost or changed' check)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))
            if not p.name.startswith(".")}


def leftovers(folder: Path) -> list[str]:
    """Temp files and locks a finished run must not leave behind."""
    return sorted(p.name for p in folder.rglob(".*") if p.suffix in (".tmp", ".lock"))
