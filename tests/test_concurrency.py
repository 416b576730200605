"""Specification of concurrent workers: real processes on one Optuna study and one MLflow registry.

Each worker is a separate Python process that imports the project, signals
that it is ready and waits for a shared "go" file, so the processes really
open the same fresh SQLite stores in the same instant (imports alone take
seconds on 2 cores and would otherwise stagger them).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from fbta.cli import main
from fbta.config import load_config
from fbta.io.lock import file_lock
from fbta.registry.promote import lock_file, promote
from milcohort import SMALL_HEADS, make_cohort

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / "params.yaml")
STUDY = "fbta-toy-vanilla-abmil"

# a worker: import everything first, say "ready", wait for "go", then run one `fbta` command
WORKER = """
import pathlib, sys, time
from fbta.cli import main
import fbta.stages.register, fbta.stages.tune, fbta.stages.tune_study, mlflow, optuna, torch
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.005)
sys.exit(main(sys.argv[3:]))
"""


def release_together(root: Path, argvs: list[list[str]], code: str = WORKER) -> list[subprocess.Popen]:
    """Start one process per argv, wait until all are ready, then release them at the same moment."""
    go = root / "go"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root / f"ready{i}"), str(go), *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
             for i, argv in enumerate(argvs)]
    deadline = time.time() + 180
    while not all((root / f"ready{i}").exists() for i in range(len(argvs))):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a worker did not start"
        time.sleep(0.05)
    go.touch()
    return procs


def outcomes(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit code, output) of each process."""
    outs = [p.communicate(timeout=600)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outs)]


@pytest.mark.slow  # two `fbta tune` processes (imports, training): ~60 s on a busy 2-core box
def test_two_tune_workers_share_one_study_without_lock_errors_or_duplicate_trials(tmp_path: Path) -> None:
    ov = [o for o in make_cohort(tmp_path) + SMALL_HEADS["abmil"] if o != "tracking.enabled=false"]
    ov += [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns",
           f"tune.storage=sqlite:///{tmp_path}/optuna.db", "tune.dataset=toy", "tune.epochs=2",
           "tune.startup_trials=1", "tune.warmup_epochs=0", "tune.lr=[0.00005,0.001]", "tune.n_trials=2"]
    # both stores are fresh: the workers race to create their schemas, the study and the experiment
    results = outcomes(release_together(tmp_path, [["tune", "--params", PARAMS, *ov]] * 2))
    for rc, out in results:
        assert rc == 0, out[-3000:]
        assert "database is locked" not in out and "Traceback" not in out, out[-3000:]
    ran = [{int(n) for n in re.findall(r"^tune: trial (\d+):", out, re.M)} for _, out in results]
    to_run = [int(re.search(r"(\d+) to run", out).group(1)) for _, out in results]  # type: ignore[union-attr]
    assert [len(r) for r in ran] == to_run and all(to_run)  # each worker ran its own count of trials
    assert not ran[0] & ran[1]  # no trial number was handed to both
    asked = sum(to_run)

    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.trials
    assert sorted(t.number for t in trials) == list(range(asked))  # the sum of both, no number twice
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    lrs = [t.params["train.lr"] for t in trials]
    assert len(set(lrs)) == len(lrs)  # the workers did not draw the same configurations

    folder = tmp_path / f"out/tune/{STUDY}"
    best = json.loads((folder / "best.json").read_text())  # written last by the worker that finished last
    assert best["best_trial"] == study.best_trial.number and best["best_value"] == study.best_value
    assert best["params"] == study.best_trial.params and sum(best["trials"].values()) == asked
    assert load_config(folder / "best_params.yaml").train.lr == study.best_trial.params["train.lr"]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("fbta").experiment_id], max_results=100)
    parents = {r.info.run_id for r in runs if r.data.tags.get("fbta.stage") == "tune"}
    nested = [r for r in runs if r.data.tags.get("fbta.stage") == "tune-trial"]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in nested) == list(range(asked))
    assert all(r.data.tags["mlflow.parentRunId"] in parents for r in nested)
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in nested}


def _candidate(src: Path, dest: Path, val_auc: float) -> Path:
    """A copy of a trained model folder whose meta.json claims ``val_auc`` (promotion reads nothing else)."""
    import shutil

    shutil.copytree(src, dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta.update(val_auc=val_auc, val_loss=0.5)
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


@pytest.mark.slow  # trains a model, then two `fbta register` processes: ~40 s on a busy 2-core box
def test_two_registrations_racing_in_separate_processes_leave_one_consistent_champion(tmp_path: Path) -> None:
    ov = make_cohort(tmp_path) + SMALL_HEADS["abmil"]
    assert main(["train", "--params", PARAMS, *ov, "train.epochs=2", "train.lr=0.001"]) == 0
    model = tmp_path / "out/models/vanilla_abmil"
    uri, name = f"sqlite:///{tmp_path}/mlflow.db", "clf-race"
    reg = [o for o in ov if o != "tracking.enabled=false" and not o.startswith("data.out=")]
    reg += [f"tracking.uri={uri}", f"tracking.artifact_root={tmp_path}/mlruns", "register.models=[classifier]",
            f"register.classifier_name={name}"]
    old = _candidate(model, tmp_path / "old", 0.7)
    assert main(["register", "--params", PARAMS, *reg, f"data.out={tmp_path}/r0", f"register.classifier={old}"]) == 0

    lock = lock_file(uri, tmp_path, name)
    commands = [["register", "--params", PARAMS, *reg, f"data.out={tmp_path}/r{auc}",
                 f"register.classifier={_candidate(model, tmp_path / str(auc), auc)}"] for auc in (0.8, 0.9)]
    client = MlflowClient(uri)
    with file_lock(lock):  # a promotion in progress: both must register, then wait here, then race for the lock
        procs = release_together(tmp_path, commands)
        deadline = time.time() + 240
        while len(client.search_model_versions(f"name='{name}'")) < 3:
            assert time.time() < deadline and all(p.poll() is None for p in procs), outcomes(procs)
            time.sleep(0.2)
        time.sleep(1.0)
        assert all(p.poll() is None for p in procs)  # both registered and wait for the lock, neither decided
        assert not [f for auc in (0.8, 0.9) for f in (tmp_path / f"r{auc}/reports/registry").glob("*.json")]
    for rc, out in outcomes(procs):
        assert rc == 0, out[-3000:]

    by_auc = {float(mv.tags["fbta.val_auc"]): str(mv.version) for mv in client.search_model_versions(f"name='{name}'")}
    decisions = {auc: json.loads((tmp_path / f"r{auc}/reports/registry/{name}.json").read_text()) for auc in (0.8, 0.9)}
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    assert aliases["champion"] == by_auc[0.9]  # the best candidate wins, whichever got the lock first
    assert decisions[0.9]["decision"] == "promoted"
    assert aliases["previous"] == decisions[0.9]["champion_before"]["version"]  # the champion it displaced
    if decisions[0.8]["decision"] == "promoted":  # 0.8 went first: it beat 0.7, then 0.9 beat it
        assert decisions[0.8]["champion_before"]["version"] == by_auc[0.7] and aliases["previous"] == by_auc[0.8]
    else:  # 0.9 went first: 0.8 was judged against 0.9, not against the old champion
        assert decisions[0.8]["champion_before"]["version"] == by_auc[0.9] and aliases["previous"] == by_auc[0.7]
    assert decisions[0.9]["aliases"] == aliases or decisions[0.8]["aliases"] == aliases  # the later one saw the end


def at_the_lock(root: Path, n: int) -> int:
    """How many promoters have entered ``promote`` (each touches ``ready<i>.at_lock`` just before): its first
    step is to take the lock, which the test holds — so a second later they are all waiting on it."""
    return sum(1 for i in range(n) if (root / f"ready{i}.at_lock").exists())


PROMOTER = """
import json, pathlib, sys, time
from mlflow.tracking import MlflowClient
from fbta.registry.promote import promote
ready, go, uri, name, version, lock = sys.argv[1:7]
client = MlflowClient(uri)
client.get_registered_model(name)  # the store is open before the race starts
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.005)
pathlib.Path(ready + ".at_lock").touch()
print(json.dumps(promote(client, name, "classifier", version, pathlib.Path(lock))))
"""


def test_two_processes_promoting_at_the_same_moment_leave_the_better_one_champion(tmp_path: Path) -> None:
    uri, name = f"sqlite:///{tmp_path}/mlflow.db", "clf-procs"
    client = MlflowClient(uri)
    client.create_registered_model(name)
    for auc in ("0.7", "0.8", "0.9"):  # v1 is the champion; v2 and v3 are promoted by two processes at once
        client.create_model_version(name, str(tmp_path), tags={"fbta.val_auc": auc, "fbta.val_loss": "0.5"})
    lock = lock_file(uri, tmp_path, name)
    assert promote(client, name, "classifier", "1", lock)["decision"] == "promoted"
    with file_lock(lock):  # a promotion in progress: both processes must queue behind it, then race for the lock
        procs = release_together(tmp_path, [[uri, name, v, str(lock)] for v in ("2", "3")], PROMOTER)
        deadline = time.time() + 120
        while at_the_lock(tmp_path, 2) < 2:
            assert time.time() < deadline and all(p.poll() is None for p in procs), outcomes(procs)
            time.sleep(0.05)
        time.sleep(1.0)
        assert all(p.poll() is None for p in procs)  # both wait for the lock; neither has decided
    results = outcomes(procs)
    assert all(rc == 0 for rc, _ in results), [out[-2000:] for _, out in results]
    d2, d3 = (json.loads(out.strip().splitlines()[-1]) for _, out in results)
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    assert aliases["champion"] == "3" and d3["decision"] == "promoted"  # the better one, whoever went first
    assert aliases["previous"] == d3["champion_before"]["version"]  # the champion v3 displaced
    if d2["decision"] == "promoted":  # v2 went first: it beat v1, then v3 beat it
        assert d2["champion_before"]["version"] == "1" and aliases["previous"] == "2"
    else:  # v3 went first: v2 was judged against v3, not against the old champion
        assert d2["champion_before"]["version"] == "3" and aliases["previous"] == "1"
    assert aliases in (d2["aliases"], d3["aliases"])  # the one that went second saw the final state


def test_a_promotion_lock_held_by_a_killed_process_does_not_block_the_next_promotion(tmp_path: Path) -> None:
    uri, name = f"sqlite:///{tmp_path}/mlflow.db", "clf-stale"
    client = MlflowClient(uri)
    client.create_registered_model(name)
    for auc in ("0.7", "0.9"):
        client.create_model_version(name, str(tmp_path), tags={"fbta.val_auc": auc})
    lock = lock_file(uri, tmp_path, name)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from fbta.io.lock import file_lock\n"
                               "with file_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)",
                               str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # type: ignore[union-attr]
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies inside the critical section, leaving the lock file behind
        holder.wait(30)
    assert lock.exists()
    started = time.time()
    assert promote(client, name, "classifier", "1", lock)["decision"] == "promoted"
    assert promote(client, name, "classifier", "2", lock)["aliases"] == {"champion": "2", "previous": "1"}
    # a stale lock would block forever (pytest-timeout); two SQLite promotions take seconds, more on a busy box
    assert time.time() - started < 240  # not blocked by the dead holder


def test_two_processes_opening_one_fresh_study_at_once_both_get_their_own_trial(tmp_path: Path) -> None:
    """The cheap core of the tune race (no training): fresh Optuna and MLflow SQLite stores, two openers."""
    code = ("import pathlib, sys, time\nfrom fbta.config import load_config\nfrom fbta.stages.tune_study import open_study\n"
            "from fbta.tracking import stage_run\n"
            "cfg = load_config(sys.argv[3], sys.argv[4:])\npathlib.Path(sys.argv[1]).touch()\n"
            "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.005)\n"
            "s = open_study(cfg, 'race')\n"
            "with stage_run(cfg, 'tune', 'race'):\n    t = s.ask()\n    s.tell(t, 0.5)\nprint('trial', t.number)")
    ov = [f"tune.storage=sqlite:///{tmp_path}/optuna.db", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
          f"tracking.artifact_root={tmp_path}/mlruns"]
    results = outcomes(release_together(tmp_path, [[PARAMS, *ov]] * 2, code))
    assert all(rc == 0 for rc, _ in results), [out[-2000:] for _, out in results]
    assert sorted(int(out.split("trial")[-1]) for _, out in results) == [0, 1]
    study = optuna.load_study(study_name="race", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # both stage runs on the store both created at once
    exp = client.get_experiment_by_name("fbta")
    assert exp is not None and len(client.search_runs([exp.experiment_id])) == 2
