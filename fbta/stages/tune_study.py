"""The Optuna study of ``fbta tune``: TPE over C, M, K and learning rates, median pruning on validation AUC.

Why these choices:
- storage ``sqlite:///optuna.db`` (never MLflow's file: both own an
  ``alembic_version`` table), ``load_if_exists`` — re-running the same study
  name continues it up to ``tune.n_trials`` finished trials; a heartbeat marks
  trials of a killed process as failed and re-queues their parameters once;
- several workers may share one study (fbta/tune/storage.py: stores are
  created under a file lock, SQLite waits for writers); the trial number,
  unique in the storage, names a trial's folder and its MLflow run;
- TPE re-seeded from ``tune.seed`` and the trial number before each trial, so
  workers started together do not draw the same configurations and a
  resumed study does not replay its first random draws; median pruning on the
  per-epoch validation AUC reported by ``fbta.stages.train.run(on_epoch=…)``;
- each trial trains in its own folder ``<data.out>/tune/<study>/trial_NNNN``
  on the cohort's frozen features (no copy); per-C KMeans clusters are
  computed once into ``tune/<study>/clusters/C<c>`` and linked into trials;
- one nested MLflow run per trial under the study's run (Optuna 5 has no
  MLflow callback), with the trial's values as params and per-epoch metrics;
- the best values are written back as ``best_params.yaml`` (params.yaml shape,
  usable as ``fbta train --params``) and ``best.json`` (overrides for
  ``dvc exp run -S``).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from fbta.config import ConfigError
from fbta.io.atomic import atomic_write_text
from fbta.stages.common import clusters_dir, features_dir
from fbta.tracking import Run, flatten
from fbta.tune.space import Space, nested, suggest, with_values
from fbta.io.lock import file_lock
from fbta.io.store import redact_url, redact_url_in, sqlite_file, store_lock
from fbta.tune.storage import optuna_storage

METRIC = "val_auc"


def study_name(cfg: DictConfig) -> str:
    """``tune.study``, else ``fbta-<dataset>-<method>-<arch>`` (one study per dataset and MIL head)."""
    if cfg.tune.study:
        return str(cfg.tune.study)
    dataset = cfg.tune.dataset or Path(cfg.data.labels).resolve().parent.name or "cohort"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"fbta-{dataset}-{cfg.train.method}-{cfg.mil.arch}")


def check_storage(cfg: DictConfig) -> None:
    """Optuna and MLflow must not share one SQLite file."""
    a, b = sqlite_file(cfg.tune.storage), sqlite_file(cfg.tracking.uri)
    if a is not None and a == b:
        raise ConfigError(f"tune.storage and tracking.uri are the same SQLite file ({a}); give Optuna its own "
                          "(default sqlite:///optuna.db)")
    if a is not None:
        a.parent.mkdir(parents=True, exist_ok=True)


def trial_seeded_tpe(seed: int, n_startup_trials: int) -> Any:
    """TPE whose random state restarts from (seed, trial number) before every trial.

    One seed per process would give workers started together the same random
    draws (the same configurations twice); the trial number is unique in the
    storage, so draws differ between workers and stay reproducible for one.
    """
    import numpy as np
    import optuna

    class TrialSeededTPE(optuna.samplers.TPESampler):
        def before_trial(self, study: Any, trial: Any) -> None:
            super().before_trial(study, trial)
            state = np.random.SeedSequence([seed, trial.number]).generate_state(1)[0]
            for rng in (getattr(self, "_rng", None), getattr(getattr(self, "_random_sampler", None), "_rng", None)):
                if rng is not None:  # Optuna 5 internals; without them TPE keeps its one seed
                    rng.rng.seed(int(state))

    return TrialSeededTPE(seed=seed, n_startup_trials=n_startup_trials)


def open_study(cfg: DictConfig, name: str) -> Any:
    """Create or continue the study (seeded TPE, median pruner, heartbeat for killed trials).

    Also creates a SQLite MLflow store's schema and experiment under its lock
    (fbta/tune/storage.py), so workers starting together do not race there.
    """
    import warnings

    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    t = cfg.tune
    check_storage(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    try:
        with store_lock(t.storage), warnings.catch_warnings():
            # heartbeats are "experimental" in Optuna 5, and exactly what resuming needs
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna_storage(t.storage, heartbeat_interval=60, grace_period=180,
                                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
            study = optuna.create_study(
                study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                sampler=trial_seeded_tpe(t.seed, t.startup_trials),
                pruner=optuna.pruners.MedianPruner(n_startup_trials=t.startup_trials, n_warmup_steps=t.warmup_epochs),
            )
    except (optuna.exceptions.OptunaError, ImportError, ValueError, SQLAlchemyError) as exc:
        raise ConfigError(f"tune.storage={redact_url(t.storage)}: cannot open the Optuna study "
                          f"({type(exc).__name__}: {redact_url_in(str(exc).splitlines()[0], t.storage)})") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"study '{name}' in {redact_url(t.storage)} minimises; fbta tune maximises {METRIC}: "
                          "use another tune.study")
    return study


def _link_clusters(cfg: DictConfig, tcfg: DictConfig, study_dir: Path, feats: Path) -> None:
    """FBTA reads ``clusters_dir``: KMeans per C once per study, linked (or copied) into the trial."""
    from fbta.stages import cluster

    c = int(tcfg.cluster.n_clusters)
    ccfg = with_values(cfg, {"data.out": str(study_dir / "clusters" / f"C{c}"), "data.features": str(feats),
                             "cluster.n_clusters": c, "run.progress": False})
    with file_lock(study_dir / "clusters" / f".C{c}.lock"):  # another worker may be clustering the same C
        cluster.run(ccfg)
    src, dest = clusters_dir(ccfg), clusters_dir(tcfg)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        return
    try:
        os.symlink(src.resolve(), dest, target_is_directory=True)
    except OSError:
        shutil.copytree(src, dest)


def trial_config(cfg: DictConfig, values: dict[str, Any], trial_dir: Path) -> DictConfig:
    """The cohort's features and split, the trial's values, outputs in ``trial_dir``, no MLflow run of its own."""
    base = Path(cfg.data.out)
    extra: dict[str, Any] = {"data.out": str(trial_dir), "data.features": str(features_dir(cfg).resolve()),
                             "tracking.enabled": False}
    if cfg.tune.epochs:  # FBTA's own epoch count (fbta.epochs) would otherwise win over train.epochs
        extra["train.epochs"] = extra["fbta.epochs"] = int(cfg.tune.epochs)
    splits = base / "splits"
    if splits.is_dir() and not (trial_dir / "splits").exists():  # a drawn split: every trial uses the same one
        shutil.copytree(splits, trial_dir / "splits")
    return with_values(cfg, {**extra, **values})


def make_objective(cfg: DictConfig, space: Space, study_dir: Path, parent: Run,
                   experiment_id: Optional[str]) -> Callable[[Any], float]:
    """The objective: train one configuration, report per-epoch AUC for pruning, return the best val AUC."""
    import optuna

    from fbta.mil.checkpoint import read_meta
    from fbta.stages import train
    from fbta.stages.milrun import model_folder

    feats = features_dir(cfg).resolve()

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, space)
        trial_dir = study_dir / f"trial_{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        tcfg = trial_config(cfg, values, trial_dir)
        run = Run()
        if parent.active and experiment_id is not None:
            created = parent.client.create_run(experiment_id, run_name=f"{study_dir.name}-trial-{trial.number}", tags={
                "mlflow.parentRunId": parent.run_id, "fbta.stage": "tune-trial", "optuna.study": study_dir.name,
                "optuna.trial": str(trial.number)})
            run = Run(parent.client, created.info.run_id)
            run.log_params({**flatten(tcfg), **{f"trial.{k}": str(v) for k, v in values.items()}})
            trial.set_user_attr("mlflow_run_id", run.run_id)
        trial.set_user_attr("trial_dir", str(trial_dir))
        print(f"tune: trial {trial.number}: " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()), flush=True)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            run.log_metrics(metrics, step=epoch)
            auc = metrics.get(METRIC)
            if auc is None or not math.isfinite(auc):
                return
            trial.report(float(auc), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {METRIC} {auc:.3f} below the median of earlier trials")

        status = "FAILED"
        try:
            if tcfg.train.method == "fbta":
                _link_clusters(cfg, tcfg, study_dir, feats)
            train.run(tcfg, on_epoch=on_epoch)
            meta = read_meta(model_folder(tcfg))
            value = float(meta.get(METRIC, float("nan")))
            run.log_metrics({f"best_{METRIC}": value, "best_val_loss": float(meta.get("val_loss", float("nan"))),
                             "best_epoch": float(meta.get("epoch", -1))})
            run.set_tags({"optuna.state": "COMPLETE"})
            status = "FINISHED"
            return value
        except optuna.TrialPruned:
            run.set_tags({"optuna.state": "PRUNED"})
            status = "FINISHED"
            raise
        finally:
            if run.active:
                try:
                    run.client.set_terminated(run.run_id, status)
                except Exception:  # noqa: BLE001 - logging must not lose the trial
                    pass

    return objective


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_best(cfg: DictConfig, study: Any, space: Space, study_dir: Path) -> Optional[dict[str, Any]]:
    """``best_params.yaml`` (the params with the best values) and ``best.json``; None without a finished trial.

    Read and written under a lock in ``study_dir``: with several workers the
    last one to finish writes last and has seen every trial, so the files
    never go back to an older best.
    """
    with file_lock(study_dir / ".best.lock"):
        return _write_best(cfg, study, space, study_dir)


def _write_best(cfg: DictConfig, study: Any, space: Space, study_dir: Path) -> Optional[dict[str, Any]]:
    try:
        best = study.best_trial
    except ValueError:
        return None
    values = {**space.fixed, **best.params}
    full = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    merged = OmegaConf.merge(OmegaConf.create(full), OmegaConf.create(nested(values)))
    header = (f"# fbta tune: best trial #{best.number} of study '{study.study_name}' ({METRIC} {best.value:.4f}).\n"
              f"# Use: fbta train --params {study_dir / 'best_params.yaml'}  (or dvc exp run with best.json's "
              "overrides)\n")
    atomic_write_text(study_dir / "best_params.yaml", header + OmegaConf.to_yaml(merged))
    overrides = [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()]
    summary = {
        "study": study.study_name, "storage": redact_url(cfg.tune.storage), "metric": METRIC, "direction": "maximize",
        "best_trial": best.number, "best_value": best.value, "params": values, "overrides": overrides,
        "dvc": "dvc exp run " + " ".join(f"-S '{o}'" for o in overrides), "space": space.describe(),
        "trials": _state_counts(study), "best_trial_dir": best.user_attrs.get("trial_dir"),
        "best_mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
    }
    atomic_write_text(study_dir / "best.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _state_counts(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
