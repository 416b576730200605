"""Every entry point gives Prefect's ephemeral server time to start on a busy machine (issue #27).

Prefect 3.8 waits ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (default 20 s) for the throw-away
server that a flow run without ``PREFECT_API_URL`` starts; on two cores shared with another job that
start took longer and ``make test`` failed in tests/test_dask.py. The flows, ``make`` (serve, test, demo)
and the suite itself (conftest.py) raise it to 300 s — a wait bounded by the server answering its health
check, so nothing is slower when the machine is idle.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
READ = ("import sys; sys.path.insert(0, 'flows'); import {mod}\n"
        "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as S; print(S.value())")


def _without_var(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env.update(extra)
    return env


@pytest.mark.parametrize("mod", ["pipeline", "tune", "batch_infer"])
def test_a_flow_run_directly_waits_300_s_for_its_ephemeral_server(mod: str) -> None:
    """Defect guarded: a flow imports prefect before raising the wait, so Prefect's 20 s applies."""
    p = subprocess.run([sys.executable, "-c", READ.format(mod=mod)], cwd=ROOT, env=_without_var(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-1] == "300"


def test_a_users_own_value_wins_over_the_flows_default() -> None:
    p = subprocess.run([sys.executable, "-c", READ.format(mod="tune")], cwd=ROOT, env=_without_var(**{VAR: "45"}),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.split()[-1] == "45", p.stderr[-2000:]


def test_make_exports_the_wait_to_serve_test_and_demo() -> None:
    """Defect guarded: the Makefile sets the variable without exporting it (the recipes' processes never see it)."""
    show = "show-wait: ; @echo \"$$" + VAR + "\""
    p = subprocess.run(["make", "-s", f"--eval={show}", "show-wait"], cwd=ROOT, env=_without_var(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "300", p.stdout + p.stderr


def test_the_suite_runs_under_the_same_wait() -> None:
    assert int(os.environ[VAR]) >= 300


def test_the_suite_timer_reads_counts_seconds_and_slowest_tests_from_real_pytest_output(tmp_path: Path) -> None:
    """benchmarks/suite_time.py's record rests on parsing pytest's own summary and ``--durations`` table.

    Defect guarded: a summary regex that misses a count (a failed test reported as a pass) or a durations
    regex that reads nothing (an empty "slowest" list in the JSON)."""
    (tmp_path / "test_sample.py").write_text(
        "import time\n"
        "def test_slow():\n    time.sleep(0.3)\n"
        "def test_fails():\n    assert False\n"
        "def test_skipped():\n    import pytest; pytest.skip('x')\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15",
                        "test_sample.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from suite_time import parse_pytest
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    parsed = parse_pytest(p.stdout)
    assert parsed["counts"] == {"failed": 1, "passed": 1, "skipped": 1}, p.stdout[-2000:]
    assert parsed["pytest_seconds"] >= 0.3
    slowest = parsed["slowest"][0]
    assert slowest["test"] == "test_sample.py::test_slow" and slowest["phase"] == "call"
    assert slowest["seconds"] >= 0.3
