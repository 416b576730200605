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

Scale-out (``flows.task_runner: dask``, ``prefect-dask``): the per-slide tasks run on
Dask workers — a temporary LocalCluster of ``flows.slide_concurrency`` single-threaded
worker processes on 127.0.0.1 (one per pipeline run, shared by its per-slide stages), or
the scheduler at ``flows.dask_address``. Each task shells out to ``fbta <stage>`` in the
project directory, so every worker needs the same project path (shared storage) and the
same venv; the record pass and ``dvc commit`` stay in the flow's process. The flow code
travels to the workers by value (cloudpickle), so ``flows/`` need not be importable there.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shlex
import socket
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # flows/ modules import each other by file name (deployments load them by path)
    sys.path.insert(0, str(HERE))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # before prefect reads its settings:
# its 20 s default times out on a busy machine (issue #27); an explicit value in the environment wins

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
    get_run_logger().info("%s on %s", label, _where())
    out = sh(f"{cmd} {shlex.quote(subset)} run.strict=true run.progress=false", Path(project))
    get_run_logger().info("%s", _tail(out, 5))
    return slides


def _where() -> str:
    """The Dask worker (or local process) running a task: a slide that fails on one node only shows it."""
    try:
        from distributed import get_worker

        return f"Dask worker {get_worker().address}"
    except (ImportError, ValueError):
        return f"pid {os.getpid()} (no Dask worker)"


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


def make_task_runner(flows_cfg: Any, address: Optional[str] = None) -> Any:
    """The per-slide task runner: local threads (default) or Dask (``prefect-dask``): the scheduler at
    ``address`` / ``flows.dask_address``, else a temporary LocalCluster made by the runner itself."""
    if flows_cfg.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=max(1, int(flows_cfg.slide_concurrency)))
    if flows_cfg.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner  # type: ignore[import-not-found]
        except ImportError as exc:
            raise RuntimeError("flows.task_runner=dask needs prefect-dask (pip install -r requirements.lock)") from exc
        _ship_flow_code_by_value()
        address = address or flows_cfg.dask_address
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_class=start_local_cluster, cluster_kwargs=local_cluster_kwargs(flows_cfg))
    raise ValueError(f"params.yaml: flows.task_runner must be thread or dask, not {flows_cfg.task_runner!r}")


def local_cluster_kwargs(flows_cfg: Any) -> dict[str, Any]:
    """One single-threaded worker process per concurrent slide task; scheduler, workers and the
    HTTP/dashboard port on 127.0.0.1 (a random port: no clash with another cluster's 8787)."""
    return {"n_workers": max(1, int(flows_cfg.slide_concurrency)), "threads_per_worker": 1, "processes": True,
            "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}


_DASK_THREAD_CAPS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def start_local_cluster(**kwargs: Any) -> Any:
    """A ``distributed.LocalCluster`` whose workers run stage commands as the thread runner does.

    Dask's nanny caps OMP/MKL/OpenBLAS at 1 thread for its workers — and for the stage processes
    they start — by writing them into *this* process's environment before spawning; here those caps
    are not set and the environment is restored, so the stages (and later ones) keep their threads.
    """
    import dask
    import distributed

    saved = dict(os.environ)
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": None for k in _DASK_THREAD_CAPS}):
            return distributed.LocalCluster(**kwargs)
    finally:  # key by key: never an empty environment for another thread starting a process
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


@contextmanager
def open_task_runner(flows_cfg: Any) -> Iterator[Any]:
    """The runner for one pipeline run: with Dask and no address, one LocalCluster serves all its
    per-slide stages (workers start once, not once per stage) and is shut down afterwards."""
    if flows_cfg.task_runner == "dask" and not flows_cfg.dask_address:
        with start_local_cluster(**local_cluster_kwargs(flows_cfg)) as cluster:
            get_run_logger().info("Dask: temporary LocalCluster at %s, %d worker process(es)",
                                  cluster.scheduler_address, len(cluster.workers))
            yield make_task_runner(flows_cfg, cluster.scheduler_address)
        return
    yield make_task_runner(flows_cfg)


def check_dask(flows_cfg: Any, api_url: str) -> None:
    """Before any stage runs: the Prefect API reachable by the workers and the scheduler at
    ``flows.dask_address`` answering — each failure one line naming the setting."""
    check_api_reachable(flows_cfg, api_url)
    if flows_cfg.dask_address:
        check_scheduler(flows_cfg.dask_address)


def check_scheduler(address: str, timeout_s: float = 10.0) -> None:
    """Fail in one line when nothing listens at ``flows.dask_address`` (Dask would retry for 30 s, then
    raise deep inside the first task submission)."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    protocol, loc = parse_address(address)
    if protocol not in ("tcp", "tls"):
        return
    host, port = parse_host_port(loc)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise RuntimeError(f"params.yaml: flows.dask_address={address}: no Dask scheduler answers there "
                           f"({exc.strerror or exc})") from None


def _is_loopback(host: Optional[str]) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host or "localhost")).is_loopback
    except (OSError, ValueError):
        return False


def check_api_reachable(flows_cfg: Any, api_url: str) -> None:
    """Workers on other hosts cannot report to a Prefect API on this host's loopback (the ephemeral
    server, ``make serve``): refuse that pairing instead of losing their task runs and logs."""
    from urllib.parse import urlsplit

    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    address = flows_cfg.dask_address
    if not address or parse_address(address)[0] not in ("tcp", "tls"):
        return
    if not _is_loopback(parse_host_port(parse_address(address)[1])[0]) and _is_loopback(urlsplit(api_url).hostname):
        raise RuntimeError(
            f"params.yaml: flows.dask_address={address} is another host, but the Prefect API {api_url} "
            "is only reachable on this one: start `prefect server start --host <this host's address>` "
            "and set PREFECT_API_URL=http://<this host's address>:4200/api")


@contextmanager
def workers_report_here(api_url: str) -> Iterator[None]:
    """Pin the Prefect API URL in the settings that travel with every Dask task, so workers report task
    runs and logs to this flow's server — without it, a flow on Prefect's ephemeral server leaves the
    URL unset and each worker process starts its own throw-away server (and database)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


def _flow_api_url() -> str:
    """The Prefect API this flow run reports to (PREFECT_API_URL, or the ephemeral server it started)."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or FlowRunContext.get().client.api_url).rstrip("/")


def _ship_flow_code_by_value() -> None:
    """Pickle this module and flows/dag.py by value: Dask workers (a remote ``dask worker`` included)
    cannot import them by name — ``flows/`` is not a package and not on their path."""
    import cloudpickle

    import dag

    for mod in (sys.modules.get(__name__), dag):
        if mod is not None and mod.__name__ != "__main__":  # __main__ already travels by value
            cloudpickle.register_pickle_by_value(mod)


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
    make_task_runner(cfg.flows)  # an unknown flows.task_runner, or dask without prefect-dask, fails here
    if cfg.flows.task_runner == "dask" and any(s.name in cfg.flows.per_slide for s in stages):
        check_dask(cfg.flows, _flow_api_url())
    results: dict[str, str] = {}
    last_fan_out = max((i for i, s in enumerate(stages) if s.name in cfg.flows.per_slide), default=-1)
    with ExitStack() as held:  # the per-slide task runner (a temporary Dask cluster too): first use → last stage
        runner: Any = None
        for i, st in enumerate(stages):
            if i > last_fan_out:
                held.close()  # no idle Dask workers while training
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
                runner = runner or held.enter_context(open_task_runner(cfg.flows))
                results[st.name] = _fan_out(root, cfg, st, runner)
            logger.info("%s: %s", st.name, results[st.name])
    return results


def _fan_out(root: Path, cfg: Any, st: Stage, runner: Any) -> str:
    """One stale per-slide stage through ``per_slide_flow`` on ``runner``; its one-line outcome."""
    ids = slide_ids(root, st.name)
    sub = per_slide_flow.with_options(task_runner=runner)
    status_file = root / cfg.data.out / "reports" / "status" / f"{st.name}.json"
    with ExitStack() as ctx:
        if cfg.flows.task_runner == "dask":
            ctx.enter_context(workers_report_here(_flow_api_url()))
        outcome = sub(str(root), st.name, st.cmd, ids, str(status_file), cfg.flows.retries,
                      cfg.flows.retry_delay_s, cfg.flows.slides_per_task)
    return f"{len(outcome['done'])} slides done, {len(outcome['failed'])} failed" + (
        f" ({', '.join(outcome['failed'])})" if outcome["failed"] else "")


if __name__ == "__main__":
    print(pipeline_flow(targets=sys.argv[1:] or None))
