"""``fbta-pipeline``: the dvc.yaml DAG scheduled by Prefect (retries, UI, per-slide fan-out).

Run it directly (``python flows/pipeline.py [stage ...]``, an ephemeral Prefect
server) or through the deployment ``fbta-pipeline/local`` (``make serve``, then
``prefect deployment run 'fbta-pipeline/local'``).

How a stage runs — DVC stays the owner of the data DAG:
- an ordinary stage is one task, ``dvc repro --single-item <stage>``: DVC
  decides whether it is stale, runs its ``cmd`` from dvc.yaml and records it;
- a per-slide stage (``flows.per_slide``: tile, extract, cluster) that DVC finds
  stale is fanned out: one task per slide (or per ``flows.slides_per_task``
  slides) runs the stage's own ``cmd`` with ``run.slides=[<id>] run.strict=true``
  (retried, at most ``flows.slide_concurrency`` at once; the task runner is
  ``flows.task_runner``), then the stage's ``cmd`` runs once over
  the cohort — every slide is now up to date, so it only writes the stage's
  status report — and ``dvc commit`` records the outputs in dvc.lock and the
  cache, so ``dvc status`` is clean afterwards exactly as after ``dvc repro``.
A slide that still fails after its retries is reported (log + a Prefect
artifact), not fatal, unless ``run.strict`` is true in params.yaml.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # flows/ modules import each other by file name (deployments load them by path)
    sys.path.insert(0, str(HERE))

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from dag import Stage, load_dag, outputs_only_changed, sh, stage_changes, tool  # noqa: E402

DEFAULT_PROJECT = HERE.parent


def _tail(text: str, n: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@task(name="dvc-stage", task_run_name="{stage}")
def repro_stage(project: str, stage: str) -> str:
    """One DVC stage as DVC runs it (skipped by DVC itself when nothing it depends on changed)."""
    out = sh([tool("dvc"), "repro", "--single-item", stage], Path(project))
    get_run_logger().info("%s", _tail(out))
    return "up to date" if f"Stage '{stage}' didn't change" in out else "ran"


@task(name="slide", task_run_name="{stage}:{label}")
def slide_task(project: str, stage: str, cmd: str, slides: list[str], label: str) -> list[str]:
    """The stage's own command restricted to these slides; strict, so a failed slide fails — and
    retries — the task, while the slides it already finished are skipped by the stage on the retry."""
    subset = "run.slides=[" + ",".join(f"'{s}'" for s in slides) + "]"  # quoted: ids like 001 stay strings
    out = sh(f"{cmd} {shlex.quote(subset)} run.strict=true run.progress=false", Path(project))
    get_run_logger().info("%s", _tail(out, 5))
    return slides


@task(name="record-stage", task_run_name="record:{stage}")
def record_stage(project: str, stage: str, cmd: str) -> str:
    """Whole-cohort pass (writes the stage's status report; every slide is already done) + ``dvc commit``."""
    out = sh(f"{cmd} run.progress=false", Path(project))
    sh([tool("dvc"), "commit", "--force", "--quiet", stage], Path(project))
    get_run_logger().info("%s", _tail(out, 8))
    return _tail(out, 1)


def slide_ids(project: Path, stage: str) -> list[str]:
    """The slides a per-slide stage works on: cluster reads feature files, tile/extract the cohort."""
    from fbta.config import load_config
    from fbta.io.h5 import feature_files
    from fbta.slides.cohort import discover
    from fbta.stages.common import features_dir

    cfg = load_config(project / "params.yaml")
    if stage == "cluster":
        return sorted(feature_files(project / features_dir(cfg)))
    return [e.slide_id for e in discover(project / cfg.data.slides, project / cfg.data.labels)]


def make_task_runner(flows_cfg: Any) -> Any:
    """The per-slide task runner: local threads (default) or a Dask cluster (``prefect-dask``, issue #8)."""
    if flows_cfg.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=max(1, int(flows_cfg.slide_concurrency)))
    if flows_cfg.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner  # type: ignore[import-not-found]
        except ImportError as exc:
            raise RuntimeError("flows.task_runner=dask needs prefect-dask (issue #8); it is not installed") from exc
        return DaskTaskRunner(address=flows_cfg.dask_address) if flows_cfg.dask_address else DaskTaskRunner()
    raise ValueError(f"params.yaml: flows.task_runner must be thread or dask, not {flows_cfg.task_runner!r}")


@flow(name="fbta-per-slide", flow_run_name="{stage}")
def per_slide_flow(project: str, stage: str, cmd: str, ids: list[str], status_file: str, retries: int = 2,
                   retry_delay_s: float = 5.0, slides_per_task: int = 1) -> dict[str, list[str]]:
    """Map the stage over slides (bounded by the task runner), then record it; failed slides are returned."""
    logger = get_run_logger()
    one = slide_task.with_options(retries=retries, retry_delay_seconds=retry_delay_s)
    n = max(1, int(slides_per_task))
    groups = [ids[i:i + n] for i in range(0, len(ids), n)]
    labels = [g[0] if len(g) == 1 else f"{g[0]}..{g[-1]}" for g in groups]
    futures = one.map(project, stage, cmd, groups, labels)
    for fut in futures:
        fut.wait()
    record_stage(project, stage, cmd)
    failed = _failed_slides(Path(status_file))  # per slide, from the stage's own report (groups may mix)
    done = [s for s in ids if s not in failed]
    if failed:
        logger.warning("%s: %d slide(s) failed after %d retries: %s", stage, len(failed), retries, ", ".join(failed))
        create_markdown_artifact(
            key=f"{stage.replace('_', '-')}-failed-slides",
            markdown=f"### {stage}: failed slides\n\n" + "\n".join(f"- `{s}`" for s in failed)
            + "\n\nReasons: the task logs, and `reports/status/" + f"{stage}.json` under data.out.",
            description=f"{stage}: slides that failed after retries",
        )
    return {"done": done, "failed": failed}


def _failed_slides(status_file: Path) -> list[str]:
    try:
        return [s["slide_id"] for s in json.loads(status_file.read_text())["slides"] if s["status"] == "failed"]
    except (OSError, ValueError, KeyError):
        return []


@flow(name="fbta-pipeline", log_prints=True)
def pipeline_flow(project: str = str(DEFAULT_PROJECT), targets: Optional[list[str]] = None) -> dict[str, str]:
    """Bring ``targets`` (default: every stage of dvc.yaml) and what they depend on up to date."""
    from fbta.config import load_config

    logger = get_run_logger()
    root = Path(project).resolve()
    cfg = load_config(root / "params.yaml")
    stages: list[Stage] = load_dag(root, targets or ())
    logger.info("DAG from %s/dvc.yaml: %s", root, " → ".join(s.name for s in stages))
    runner = make_task_runner(cfg.flows)
    results: dict[str, str] = {}
    for st in stages:
        if st.name not in cfg.flows.per_slide:
            task_ = repro_stage.with_options(retries=cfg.flows.stage_retries)
            results[st.name] = task_(str(root), st.name)
            continue
        changes = stage_changes(root, st.name)
        if not changes:
            results[st.name] = "up to date"
            logger.info("%s: up to date (dvc status)", st.name)
        elif outputs_only_changed(changes):  # inputs as recorded: let DVC restore or re-run it
            results[st.name] = repro_stage(str(root), st.name)
        else:
            ids = slide_ids(root, st.name)
            sub = per_slide_flow.with_options(task_runner=runner)
            status_file = root / cfg.data.out / "reports" / "status" / f"{st.name}.json"
            outcome = sub(str(root), st.name, st.cmd, ids, str(status_file), cfg.flows.retries,
                          cfg.flows.retry_delay_s, cfg.flows.slides_per_task)
            results[st.name] = f"{len(outcome['done'])} slides done, {len(outcome['failed'])} failed" + (
                f" ({', '.join(outcome['failed'])})" if outcome["failed"] else "")
        logger.info("%s: %s", st.name, results[st.name])
    return results


if __name__ == "__main__":
    print(pipeline_flow(targets=sys.argv[1:] or None))
