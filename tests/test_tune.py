"""Specification of `fbta tune`: a real Optuna study in SQLite around the real training stage.

The tiny feature cohort (tests/milcohort.py) trains an ABMIL in about a
second per epoch; train.method=vanilla tunes train.lr. Two trials are queued
with known rates (1e-3 learns the cohort, 5e-5 does not) so median pruning is
observable; a second invocation continues the same study.
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

import optuna
import pytest
from mlflow.tracking import MlflowClient

from fbta.cli import main
from fbta.config import load_config
from fbta.stages.tune_study import open_study
from milcohort import SMALL_HEADS, make_cohort

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(ROOT / "params.yaml")]
STUDY = "fbta-toy-vanilla-abmil"


def fbta(*args: str) -> int:
    return main([*args, *PARAMS])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[Path, list[str]]:
    """Study run twice: 2 queued trials (one pruned), then continued to 3 finished trials."""
    root = tmp_path_factory.mktemp("tune")
    ov = [o for o in make_cohort(root) + SMALL_HEADS["abmil"] if o != "tracking.enabled=false"]
    ov += [f"tracking.uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_root={root}/mlruns",
           f"tune.storage=sqlite:///{root}/optuna.db", "tune.dataset=toy", "tune.epochs=4", "tune.startup_trials=1",
           "tune.warmup_epochs=0", "tune.lr=[0.00005,0.001]"]
    study = open_study(load_config(PARAMS[1], ov), STUDY)
    study.enqueue_trial({"train.lr": 1e-3})
    study.enqueue_trial({"train.lr": 5e-5})
    assert fbta("tune", *ov, "tune.n_trials=2") == 0
    assert fbta("tune", *ov, "tune.n_trials=3") == 0
    return root, ov


def test_trials_are_pruned_on_validation_auc_and_a_rerun_continues_the_study(tuned) -> None:
    root, _ = tuned
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{root}/optuna.db")
    states = [t.state.name for t in study.trials]
    assert len(states) == 3 and states[:2] == ["COMPLETE", "PRUNED"] and states[2] in ("COMPLETE", "PRUNED")
    first, pruned = study.trials[:2]
    assert first.params == {"train.lr": 1e-3} and max(first.intermediate_values.values()) == 1.0
    assert pruned.params == {"train.lr": 5e-5} and len(pruned.intermediate_values) < 4  # stopped early
    assert study.best_trial.number == 0 and study.best_value == 1.0
    meta = json.loads((root / f"out/tune/{STUDY}/trial_0000/models/vanilla_abmil/meta.json").read_text())
    assert meta["val_auc"] == study.best_value  # the objective is the saved model's validation AUC
    assert study.user_attrs["fbta.metric"] == "val_auc"


def test_best_values_are_written_back_as_a_params_file(tuned) -> None:
    root, _ = tuned
    folder = root / f"out/tune/{STUDY}"
    best = json.loads((folder / "best.json").read_text())
    assert best["best_trial"] == 0 and best["params"] == {"train.lr": 0.001}
    assert best["overrides"] == ["train.lr=0.001"] and "-S 'train.lr=0.001'" in best["dvc"]
    cfg = load_config(folder / "best_params.yaml")  # usable as `fbta train --params` (schema-valid)
    assert cfg.train.lr == 0.001 and cfg.train.epochs == load_config(PARAMS[1]).train.epochs  # tune.epochs not kept


def test_every_trial_is_a_nested_mlflow_run_under_its_study_run(tuned) -> None:
    root, _ = tuned
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("fbta")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("fbta.stage") == "tune"}
    trials = [r for r in runs if r.data.tags.get("fbta.stage") == "tune-trial"]
    assert len(parents) == 2 and len(trials) == 3  # two invocations, three trials
    assert all(t.data.tags["mlflow.parentRunId"] in parents for t in trials)
    by_trial = {int(t.data.tags["optuna.trial"]): t for t in trials}
    assert by_trial[1].data.tags["optuna.state"] == "PRUNED" and by_trial[0].data.tags["optuna.state"] == "COMPLETE"
    assert by_trial[0].data.params["trial.train.lr"] == "0.001" and by_trial[0].data.metrics["best_val_auc"] == 1.0
    history = client.get_metric_history(by_trial[0].info.run_id, "val_auc")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]  # per-epoch metrics
    assert not any(r.data.tags.get("fbta.stage") == "train" for r in runs)  # no extra stage run per trial


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_optuna_dashboard_shows_the_study(tuned) -> None:
    root, _ = tuned
    port = _free_port()
    exe = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen([str(exe), f"sqlite:///{root}/optuna.db", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, studies = time.time() + 300, None  # a condition: the dashboard answers (or exits)
        while time.time() < deadline and studies is None:
            assert proc.poll() is None, "optuna-dashboard exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    studies = json.loads(r.read())["study_summaries"]
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        assert studies is not None, "optuna-dashboard did not answer"
        (summary,) = [s for s in studies if s["study_name"] == STUDY]
        assert summary["directions"] == ["maximize"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=10) as r:
            detail = json.loads(r.read())
        assert detail["name"] == STUDY and len(detail["trials"]) == 3
        assert {t["state"] for t in detail["trials"]} >= {"Complete", "Pruned"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def test_nothing_to_tune_or_a_shared_sqlite_file_is_one_clear_error(tuned, capsys) -> None:
    root, ov = tuned
    assert fbta("tune", *ov, "tune.lr=[]") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to tune for train.method=vanilla" in err[0]
    assert fbta("tune", *ov, f"tune.storage=sqlite:///{root}/mlflow.db") == 2
    assert "same SQLite file" in capsys.readouterr().err
    assert fbta("tune", *ov, "tune.k=[0,5]", "train.method=fbta") == 2
    assert "tune.k=[0, 5]: choices must be positive integers" in capsys.readouterr().err


@pytest.mark.slow  # starts Prefect's ephemeral API server
def test_tune_flow_continues_the_study_and_proposes_the_best_model_for_champion(tuned, tmp_path, monkeypatch) -> None:
    root, ov = tuned
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.path.insert(0, str(ROOT / "flows"))
    from prefect.testing.utilities import prefect_test_harness
    from tune import tune_flow

    with prefect_test_harness(server_startup_timeout=None):  # None: conftest's 300 s (busy 2-core box)
        result = tune_flow(params=PARAMS[1], overrides=[*ov, "tune.n_trials=3", "register.models=[classifier]"])
    assert result["tune"]["best_trial"] == 0 and result["tune"]["trials"]["COMPLETE"] >= 1
    reg = result["registry"]
    assert reg["decision"] == "promoted" and reg["folder"].endswith("trial_0000/models/vanilla_abmil")
    mv = MlflowClient(f"sqlite:///{root}/mlflow.db").get_model_version_by_alias("fbta-classifier", "champion")
    assert mv.tags["fbta.val_auc"] == "1.0"


def test_a_trial_left_running_by_a_killed_process_is_failed_by_the_heartbeat_and_retried_once(tmp_path) -> None:
    """README: trials left running by a killed process are failed by the heartbeat and their parameters retried
    once. A real `fbta tune` is SIGKILLed inside its first trial; the store then says RUNNING forever. Only the
    passage of the grace period (180 s) is simulated, by ageing that trial's last heartbeat in the SQLite store.
    Defects guarded: no heartbeat (the trial stays RUNNING and is never retried), a retry with other parameters
    (the killed configuration is never measured), or the stale trial counted as finished."""
    import sqlite3

    from faultkit import kill_when

    ov = [o for o in make_cohort(tmp_path) + SMALL_HEADS["abmil"] if o != "tracking.enabled=false"]
    db = tmp_path / "optuna.db"
    ov += [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns",
           f"tune.storage=sqlite:///{db}", "tune.dataset=toy", "tune.startup_trials=1", "tune.warmup_epochs=0",
           "tune.lr=[0.00005,0.001]"]

    def beating() -> bool:  # the first trial runs: it has drawn its learning rate and recorded a heartbeat
        try:
            with sqlite3.connect(db, timeout=5) as con:
                return all(con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] > 0
                           for table in ("trial_heartbeats", "trial_params"))
        except sqlite3.Error:  # not created yet
            return False

    kill_when("tune", [*ov, "tune.n_trials=1", "tune.epochs=200"], tmp_path, beating)
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{db}")
    (killed,) = study.get_trials(deepcopy=False)
    assert killed.state == optuna.trial.TrialState.RUNNING and set(killed.params) == {"train.lr"}

    with sqlite3.connect(db) as con:  # 10 minutes pass (grace period 180 s)
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-600 seconds')")
    assert fbta("tune", *ov, "tune.n_trials=1", "tune.epochs=2") == 0
    trials = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{db}").get_trials(deepcopy=False)
    states = {t.number: t.state for t in trials}
    assert states[killed.number] == optuna.trial.TrialState.FAIL, states
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == killed.params
    assert len(trials) == 2  # the retry counted as the one finished trial asked for; nothing else ran
