"""``fbta-tune``: the Optuna study of ``fbta tune`` as a Prefect flow, then the best trial's model registered.

Run it directly (``python flows/tune.py [key=value ...]``, an ephemeral Prefect
server) or through the deployment ``fbta-tune/local`` (``make serve``, then
``prefect deployment run 'fbta-tune/local' --param overrides='["tune.n_trials=4"]'``).
The study is the stage layer's (fbta/stages/tune_study.py; resumable: a re-run continues
it); registering the best trial's model goes through ``fbta register``, whose
promotion rule moves ``@champion`` only if that model beats the current one.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # before prefect reads its settings:
# its 20 s default times out on a busy machine (issue #27); an explicit value in the environment wins

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

DEFAULT_PARAMS = str(Path(__file__).resolve().parent.parent / "params.yaml")


def _cfg(params: str, overrides: list[str]) -> Any:
    from fbta.config import load_config

    return load_config(params, overrides)


@task(name="tune-study", task_run_name="study")
def run_study(params: str, overrides: list[str]) -> dict[str, Any]:
    """``fbta tune``: trials until the study has ``tune.n_trials`` finished; the best trial's summary."""
    from fbta.stages import tune
    from fbta.stages.common import out_dir
    from fbta.stages.tune_study import study_name

    cfg = _cfg(params, overrides)
    if tune.run(cfg) != 0:
        raise RuntimeError("fbta tune: no trial finished (see the log)")
    return json.loads((out_dir(cfg, "tune", study_name(cfg)) / "best.json").read_text())


@task(name="register-best", task_run_name="register:{kind}")
def register_best(params: str, overrides: list[str], model_dir: str, kind: str = "classifier") -> dict[str, Any]:
    """``fbta register`` on the best trial's model folder: promoted only if it beats ``@champion``."""
    from fbta.stages import register
    from fbta.stages.common import out_dir

    cfg = _cfg(params, [*overrides, f"register.models=[{kind}]", f"register.{kind}={model_dir}"])
    register.run(cfg)
    name = cfg.register.classifier_name if kind == "classifier" else cfg.register.segmenter_name
    return json.loads((out_dir(cfg, "reports", "registry") / f"{name}.json").read_text())


@flow(name="fbta-tune", log_prints=True)
def tune_flow(params: str = DEFAULT_PARAMS, overrides: Optional[list[str]] = None,
              register_best_model: bool = True) -> dict[str, Any]:
    """The study, then (``register_best_model``) the best trial's classifier proposed for ``@champion``."""
    from fbta.stages.milrun import model_folder
    from fbta.tune.space import with_values

    overrides = list(overrides or [])
    best = run_study(params, overrides)
    log = get_run_logger()
    log.info("best trial #%s: val_auc %.4f with %s", best["best_trial"], best["best_value"], best["overrides"])
    result: dict[str, Any] = {"tune": best}
    if register_best_model and best.get("best_trial_dir"):
        cfg = with_values(_cfg(params, overrides), {"data.out": best["best_trial_dir"]})
        decision = register_best(params, overrides, str(model_folder(cfg)))
        log.info("registry: %s (%s)", decision["decision"], decision["reason"])
        result["registry"] = decision
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in best["params"].items())
    create_markdown_artifact(
        key="fbta-tune-best", description=f"best trial of {best['study']}",
        markdown=(f"### {best['study']}: best trial #{best['best_trial']} — val AUC {best['best_value']:.4f}\n\n"
                  f"| parameter | value |\n|---|---|\n{rows}\n\n`{best['dvc']}`\n\n"
                  + (f"Registry: **{result['registry']['decision']}** — {result['registry']['reason']}\n"
                     if "registry" in result else "")))
    return result


if __name__ == "__main__":
    tune_flow(overrides=sys.argv[1:])
