"""`mlflow models serve -m models:/fbta-classifier@champion --env-manager local` answers a bag of features.

Real parts only: a vanilla ABMIL trained by `fbta train` on the tiny feature
cohort, `fbta register` into a SQLite MLflow store, the MLflow scoring server
as a subprocess on a free 127.0.0.1 port, and HTTP requests to it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fbta.cli import main
from milcohort import SMALL_HEADS, make_cohort

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(ROOT / "params.yaml")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float = 300.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"server did not answer {url} in {seconds:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow  # ~30 s of CPU (train, register, server start); over a minute on a busy 2-core box
def test_served_champion_answers_a_bag_like_the_model_in_process(tmp_path: Path) -> None:
    from fbta.e2e.classifier import load_classifier

    ov = make_cohort(tmp_path) + SMALL_HEADS["abmil"]
    ov = [o for o in ov if o != "tracking.enabled=false"]
    db = tmp_path / "mlflow.db"
    ov += [f"tracking.uri=sqlite:///{db}", f"tracking.artifact_root={tmp_path}/mlruns", "register.models=[classifier]"]
    assert main(["train", *ov, "train.epochs=3", "train.patience=3", "train.lr=0.001", *PARAMS]) == 0
    assert main(["register", *ov, *PARAMS]) == 0
    reg = json.loads((tmp_path / "out/reports/registry/fbta-classifier.json").read_text())
    assert reg["decision"] == "promoted" and reg["aliases"] == {"champion": "1"}

    port = free_port()
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}  # the server runs `uvicorn` from PATH
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(venv_bin / "mlflow"), "models", "serve", "-m", "models:/fbta-classifier@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", proc, log)
        bag = np.random.default_rng(7).normal(size=(37, 16)).astype(np.float32)
        bag[:5] += 2.0  # a few "tumour" instances, as in the cohort
        status, body = post(f"http://127.0.0.1:{port}/invocations", {"inputs": bag.tolist()})
        assert status == 200, body
        (row,) = body["predictions"]
        assert set(row) == {"normal", "tumour"}
        probs = np.array([row["normal"], row["tumour"]])
        assert abs(probs.sum() - 1.0) < 1e-5
        want = load_classifier(tmp_path / "out/models/vanilla_abmil").predict_proba(bag)
        np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)

        status, body = post(f"http://127.0.0.1:{port}/invocations", {"inputs": np.zeros((4, 3)).tolist()})
        assert status == 400 and "16" in body.get("message", "")  # wrong feature size: a client error, not a 500
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker (own session, started here)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with pytest.raises(ConnectionError):
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            raise AssertionError("the server is still listening")
