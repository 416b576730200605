"""``fbta tune``: an Optuna study over C, M, K and learning rates; best values → a params file.

One trial = one ``fbta train`` in ``<data.out>/tune/<study>/trial_NNNN`` with
per-epoch validation AUC reported for median pruning (fbta/stages/tune_study.py).
``tune.n_trials`` counts the study's finished trials, so re-running the same
command continues a study instead of starting over; the best values go to
``<data.out>/tune/<study>/best_params.yaml`` and ``best.json``. Watch it with
``optuna-dashboard sqlite:///optuna.db --host 127.0.0.1`` (``make dashboard``).
"""
from __future__ import annotations

import time

from omegaconf import DictConfig

from fbta.io.store import redact_url
from fbta.stages.common import out_dir
from fbta.stages.milrun import check_method_and_arch
from fbta.tracking import stage_run
from fbta.tune.space import search_space


def _catchable() -> tuple[type[BaseException], ...]:
    """Errors that end one trial, not the study: a diverging learning rate, a configuration too big for memory."""
    import torch

    return (FloatingPointError, MemoryError, torch.OutOfMemoryError)


def run(cfg: DictConfig) -> int:
    check_method_and_arch(cfg)
    from fbta.stages.tune_study import finished, make_objective, open_study, study_name, write_best

    t = cfg.tune
    space = search_space(cfg.tune, cfg.train.method)
    name = study_name(cfg)
    study = open_study(cfg, name)
    study.set_user_attr("fbta.metric", "val_auc")
    study.set_user_attr("fbta.method", cfg.train.method)
    study.set_user_attr("fbta.arch", cfg.mil.arch)
    study.set_user_attr("fbta.space", space.describe())
    study_dir = out_dir(cfg, "tune", name)
    done = finished(study)
    todo = max(0, t.n_trials - done)
    print(f"tune: study '{name}' in {redact_url(t.storage)}: {done} finished trial(s), {todo} to run "
          f"(tune.n_trials={t.n_trials}); space {space.describe()}", flush=True)
    tags = {"fbta.method": cfg.train.method, "fbta.arch": cfg.mil.arch, "optuna.study": name,
            "optuna.storage": redact_url(t.storage), "fbta.data_out": cfg.data.out}
    started = time.time()
    with stage_run(cfg, "tune", f"tune-{name}", tags) as mlrun:
        exp_id = mlrun.client.get_run(mlrun.run_id).info.experiment_id if mlrun.active else None
        if todo:
            study.optimize(make_objective(cfg, space, study_dir, mlrun, exp_id), n_trials=todo,
                           timeout=t.timeout, catch=_catchable(), gc_after_trial=True)
        summary = write_best(cfg, study, space, study_dir)
        if summary is not None:
            mlrun.log_metrics({"best_val_auc": summary["best_value"], "best_trial": summary["best_trial"]})
            mlrun.log_params({f"best.{k}": str(v) for k, v in summary["params"].items()})
            mlrun.log_artifact(study_dir / "best_params.yaml", "tune")
            mlrun.log_artifact(study_dir / "best.json", "tune")
    if summary is None:
        print(f"tune: no trial of '{name}' finished; nothing written", flush=True)
        return 1
    print(f"tune: trials {summary['trials']} in {time.time() - started:.0f} s; best #{summary['best_trial']} "
          f"val_auc {summary['best_value']:.4f} with {' '.join(summary['overrides'])}", flush=True)
    print(f"tune: best params → {study_dir / 'best_params.yaml'} (fbta train --params …); {summary['dvc']}", flush=True)
    return 0
