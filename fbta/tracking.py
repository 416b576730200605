"""MLflow tracking (⚑): one run per stage execution, params = the resolved config, metrics per epoch.

Why the explicit ``MlflowClient`` instead of ``mlflow.start_run``: no global
active run or tracking URI leaks between stages, tests or threads; each stage
says which store it writes to. The backend is SQLite (MLflow 3 refuses the
``./mlruns`` file store) and a new experiment keeps its artefacts under
``tracking.artifact_root`` as an absolute file URI, so runs started from
another working directory land in the same place. Telemetry is off unless the
user explicitly turned it on.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from fbta.config import InputError
from fbta.io.store import redact_url, store_lock

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported anywhere through us

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
_QUIET = ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration")


class TrackingError(InputError):
    """The tracking store cannot be opened or written (exit code 2 from the CLI)."""


def flatten(cfg: DictConfig | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train.lr": "0.0002", ...}``: nested config → MLflow params (lists as JSON)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    items: dict[str, str] = {}
    for k, v in data.items():  # type: ignore[union-attr]
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            items.update(flatten(v, key))
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple, Mapping)) else str(v)
            items[key] = redact_url(text)[:MAX_PARAM_CHARS]  # a password in a store URL goes no further
    return items


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Run:
    """A handle on one MLflow run; every method is a no-op when tracking is disabled (``run_id`` None)."""

    def __init__(self, client: Any = None, run_id: Optional[str] = None) -> None:
        self.client, self.run_id = client, run_id
        self._warned = False

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _guard(self, what: str, method: str, *args: Any, **kwargs: Any) -> None:
        """Call ``client.<method>``; logging must not throw away hours of training: warn once and carry on."""
        if not self.active:
            return
        try:
            getattr(self.client, method)(self.run_id, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any store error
            if not self._warned:
                print(f"tracking: could not log {what} to MLflow ({type(exc).__name__}: {exc}); "
                      "results are still written to disk", file=sys.stderr, flush=True)
                self._warned = True

    def log_params(self, params: Mapping[str, str]) -> None:
        if not self.active:  # tracking off: not even MLflow's import (2 s) is paid
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self._guard("params", "log_batch", params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.active:  # tracking off: not even MLflow's import (2 s) is paid
            return
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and not math.isnan(v)]
        self._guard("metrics", "log_batch", metrics=items)

    def log_epoch(self, record: Any) -> dict[str, float]:
        """One training epoch's record (fbta.training.loop.Epoch) as metrics at step = its number; returns them."""
        row = {k: v for k, v in record.as_row().items() if k not in ("epoch", "best")}
        self.log_metrics(row, step=record.epoch)
        return row

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:  # tracking off: not even MLflow's import (2 s) is paid
            return
        from mlflow.entities import RunTag

        self._guard("tags", "log_batch", tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if Path(path).exists():
            self._guard(f"artifact {path}", "log_artifact", str(path), artifact_path)


def ensure_experiment(client: Any, name: str, artifact_root: str | Path) -> str:
    """The experiment's id, creating it with artefacts under ``artifact_root`` (absolute file URI) if new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment '{name}' is deleted; restore it or set tracking.experiment")
        return exp.experiment_id
    root = Path(artifact_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=root.as_uri())


@contextlib.contextmanager
def stage_run(cfg: DictConfig, stage: str, run_name: str, tags: Mapping[str, Any] | None = None) -> Iterator[Run]:
    """One MLflow run around a stage: FINISHED on success, FAILED on an error, KILLED on Ctrl-C."""
    t = cfg.tracking
    if not t.enabled:
        yield Run()
        return
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from mlflow.tracking import MlflowClient

        with store_lock(t.uri):  # two stages starting on a fresh mlflow.db would both create its schema
            client = MlflowClient(tracking_uri=t.uri)
            exp_id = ensure_experiment(client, t.experiment, t.artifact_root)
        all_tags = {"fbta.stage": stage, **(tags or {})}
        commit = _git_commit()
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        created = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    except TrackingError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad URI, locked or foreign database, …
        raise TrackingError(f"MLflow store {t.uri}: {type(exc).__name__}: {str(exc).splitlines()[0]} "
                            "(set tracking.uri, or tracking.enabled=false)") from exc
    run = Run(client, created.info.run_id)
    run.log_params(flatten(cfg))
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        with contextlib.suppress(Exception):
            client.set_terminated(run.run_id, status)
