"""Scale-out (issue #8): the per-slide stages under Prefect's Dask task runner on a real
``distributed`` cluster give the thread runner's outputs, and the work really runs on the workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import psutil
import pytest
import yaml

from test_flows import _env, _free_port, _sh, users_project

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "flows"))

# The stage processes' BLAS/OpenMP threads, the same under both runners: a Dask nanny caps its workers (and
# so the `fbta` commands they start) at 1 thread unless these are set — as README says to do on worker nodes —
# and a different thread count changes float sums in the last bits.
STAGE_THREADS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}

# A real LocalCluster in its own process: like a remote `dask worker`, its workers cannot import flows/
# (spawned workers copy their parent's sys.path, and pytest's has flows/ on it), so the flow code must
# travel by value; and the nanny's environment rewrite stays out of this test process.
CLUSTER = textwrap.dedent("""
    import pathlib, sys
    from distributed import LocalCluster
    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster:
            pathlib.Path("address.tmp").write_text(cluster.scheduler_address)
            pathlib.Path("address.tmp").rename("address")
            sys.stdin.read()  # until the test closes our stdin
""")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two single-threaded worker processes on 127.0.0.1, a Client watching the scheduler's task stream."""
    from distributed import Client

    here = tmp_path_factory.mktemp("cluster")
    (here / "cluster.py").write_text(CLUSTER)
    env = {k: v for k, v in _env(**STAGE_THREADS).items() if k != "PYTHONPATH"}
    log = here / "cluster.log"  # the scheduler's, the workers' and their Prefect tasks' output
    log_file = log.open("w")
    proc = subprocess.Popen([sys.executable, "cluster.py"], cwd=here, env=env, stdin=subprocess.PIPE,
                            stdout=log_file, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300  # until the cluster writes its address (or exits)
        while not (here / "address").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        address = (here / "address").read_text()
        assert address.startswith("tcp://127.0.0.1:"), address
        with Client(address, timeout=120) as client:
            client.get_task_stream()  # installs the scheduler's task-stream plugin before any work
            yield {"address": address, "client": client, "workers": set(client.scheduler_info()["workers"]),
                   "log": log}
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


def _project(dest: Path, **flows: Any) -> Path:
    """test_flows' user project (2 good slides + a corrupt one), a tiny random extractor, these flows.* values."""
    proj = users_project(dest)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["extract"].update(model="test_efficientnet", weights="random", batch_size=16, num_workers=0)
    params["cluster"].update(n_clusters=4)
    params["flows"].update(flows)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


def _run_flows(projects: list[Path], targets: list[str], home: Path) -> tuple[list[dict], list[float], str]:
    """`pipeline_flow` over each project in turn in one fresh Python (one ephemeral Prefect server, as
    `python flows/pipeline.py` runs it): each run's results and wall time, and the whole output."""
    code = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(ROOT / 'flows')!r})
        from pipeline import pipeline_flow
        if __name__ == "__main__":
            for proj in {[str(p) for p in projects]!r}:
                t0 = time.monotonic()
                res = pipeline_flow(project=proj, targets={targets!r})
                print("RESULT", json.dumps({{"results": res, "wall_s": time.monotonic() - t0}}), flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=home.parent, capture_output=True, text=True, timeout=900,
                       env=_env(PREFECT_HOME=str(home), **STAGE_THREADS))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    runs = [json.loads(line.split(" ", 1)[1]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    return [r["results"] for r in runs], [r["wall_s"] for r in runs], out


def _slide_tasks(cluster: dict[str, Any], since: float) -> list[dict]:
    """The Prefect 'slide' tasks the Dask scheduler ran since ``since`` (its own task stream)."""
    return [r for r in cluster["client"].get_task_stream(start=since) if "slide_task" in str(r["key"])]


def _coords(proj: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted((proj / "data/coords").glob("*.h5")):
        with h5py.File(f, "r") as h:
            out[f.stem] = h["coords"][:]
    return out


def _h5_arrays(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for f in sorted(folder.rglob("*.h5")):
        with h5py.File(f, "r") as h:
            out[str(f.relative_to(folder))] = {k: h[k][:] for k in h.keys() if isinstance(h[k], h5py.Dataset)}
    return out


def _counts(proj: Path, stage: str) -> dict[str, int]:
    return json.loads((proj / "data/reports/status" / f"{stage}.json").read_text())["counts"]


# --- the runner's settings, checked against real sockets and processes -------------------------------------

def _flows(**over: Any) -> Any:
    from fbta.config import load_config

    return load_config(ROOT / "params.yaml", [f"flows.{k}={v}" for k, v in over.items()]).flows


def test_dask_runner_takes_its_scheduler_from_flows_dask_address():
    from pipeline import local_cluster_kwargs, make_task_runner
    from prefect_dask import DaskTaskRunner

    runner = make_task_runner(_flows(task_runner="dask", dask_address="tcp://10.0.0.5:8786"))
    assert isinstance(runner, DaskTaskRunner) and runner.address == "tcp://10.0.0.5:8786"
    local = make_task_runner(_flows(task_runner="dask", slide_concurrency=3))
    assert local.address is None and local.cluster_kwargs == local_cluster_kwargs(_flows(slide_concurrency=3))
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["threads_per_worker"] == 1


def test_a_scheduler_address_where_nothing_listens_fails_in_one_line():
    from pipeline import check_scheduler

    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(RuntimeError) as err:
        check_scheduler(address, timeout_s=2)
    msg = str(err.value)
    assert "\n" not in msg and f"flows.dask_address={address}" in msg and "no Dask scheduler answers" in msg


def test_a_remote_scheduler_with_a_prefect_api_only_this_host_reaches_is_refused():
    from pipeline import check_api_reachable, check_dask, workers_report_here
    from prefect.settings import PREFECT_API_URL

    remote = _flows(task_runner="dask", dask_address="tcp://10.0.0.5:8786")
    for check in (check_api_reachable, check_dask):  # check_dask: what pipeline_flow runs before any stage
        with pytest.raises(RuntimeError) as err:
            check(remote, "http://127.0.0.1:8925/api")
        assert "\n" not in str(err.value) and "flows.dask_address=tcp://10.0.0.5:8786" in str(err.value)
        assert "PREFECT_API_URL" in str(err.value)
    check_api_reachable(remote, "http://10.0.0.1:4200/api")  # a server the workers can reach: fine
    check_api_reachable(_flows(task_runner="dask"), "http://127.0.0.1:8925/api")  # the local cluster: fine
    with workers_report_here("http://127.0.0.1:8925/api"):  # what travels to the workers with each task
        assert PREFECT_API_URL.value() == "http://127.0.0.1:8925/api"


def test_the_temporary_local_cluster_listens_only_on_loopback_and_leaves_our_environment_alone():
    from pipeline import local_cluster_kwargs, start_local_cluster

    before = dict(os.environ)
    me = psutil.Process()
    with start_local_cluster(**local_cluster_kwargs(_flows(slide_concurrency=2))) as cluster:
        assert len(cluster.workers) == 2
        pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
        listening = [c.laddr for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in pids]
        assert listening and {a.ip for a in listening} == {"127.0.0.1"}, listening
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        from distributed import Client

        with Client(cluster) as client:  # the stage commands a worker starts get this process's thread settings
            worker_caps = client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
        assert set(worker_caps.values()) == {before.get("OMP_NUM_THREADS")}
    assert dict(os.environ) == before  # the nanny's pre-spawn rewrite (OMP_NUM_THREADS=1 …) was undone


# --- the per-slide stages on a real cluster ----------------------------------------------------------------

def test_per_slide_tiles_run_on_the_dask_workers_at_flows_dask_address(tmp_path: Path, cluster: dict[str, Any]):
    proj = _project(tmp_path / "proj", task_runner="dask", dask_address=cluster["address"], retries=1)
    since = time.time()
    (results,), _, out = _run_flows([proj], ["tile"], tmp_path / "prefect-home")
    assert results == {"tile": "2 slides done, 1 failed (broken)"}  # Prefect task results came back from Dask
    ran = _slide_tasks(cluster, since)
    assert len(ran) == 3, [r["key"] for r in ran]  # one Dask task per slide (Prefect's retry runs inside it)
    assert {r["worker"] for r in ran} == cluster["workers"]  # both worker processes took slides
    worker_log = cluster["log"].read_text()
    assert worker_log.count("on Dask worker tcp://127.0.0.1:") >= 3, worker_log[-3000:]
    assert out.count("Starting temporary server") == 1  # the flow's ephemeral Prefect server ...
    assert "Starting temporary server" not in worker_log  # ... is the one the workers reported to
    assert _counts(proj, "tile")["failed"] == 1
    assert sorted(_coords(proj)) == ["biopsy_0", "biopsy_1"]
    status = _sh(proj, str(BIN / "dvc"), "status", "tile")
    assert "Data and pipelines are up to date" in status, status  # recorded as after dvc repro


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tile_extract_cluster_on_dask_equal_the_thread_runner(tmp_path: Path, cluster: dict[str, Any]):
    threads = _project(tmp_path / "threads", task_runner="thread", slide_concurrency=2, retries=1)
    dask = _project(tmp_path / "dask", task_runner="dask", dask_address=cluster["address"], retries=1)
    since = time.time()
    (by_threads, by_dask), walls, out = _run_flows([threads, dask], ["cluster"], tmp_path / "prefect-home")
    print(f"per-slide tile+extract+cluster: thread runner {walls[0]:.1f} s, Dask (2 workers) {walls[1]:.1f} s")
    assert by_threads == by_dask and by_dask["tile"] == "2 slides done, 1 failed (broken)", (by_threads, by_dask)
    ran = _slide_tasks(cluster, since)
    assert len(ran) == 3 + 3 + 2 and {r["worker"] for r in ran} == cluster["workers"]  # tile, extract, cluster
    for stage in ("tile", "extract", "cluster"):
        assert _counts(threads, stage) == _counts(dask, stage), stage
    a, b = _coords(threads), _coords(dask)
    assert sorted(a) == sorted(b) == ["biopsy_0", "biopsy_1"]
    assert all(np.array_equal(a[s], b[s]) for s in a)
    for outs in ("data/features", "data/clusters"):
        fa, fb = _h5_arrays(threads / outs), _h5_arrays(dask / outs)
        assert sorted(fa) == sorted(fb) and len(fa) >= 2, (outs, sorted(fa), sorted(fb))
        for name in fa:
            assert fa[name].keys() == fb[name].keys(), name
            for key in fa[name]:
                assert np.array_equal(fa[name][key], fb[name][key]), f"{outs}/{name}:{key} differs thread vs dask"


@pytest.mark.slow
def test_with_no_dask_address_the_flow_runs_its_own_local_cluster_on_loopback(tmp_path: Path):
    proj = _project(tmp_path / "proj", task_runner="dask", dask_address=None, slide_concurrency=2, retries=1)
    (results,), (wall,), out = _run_flows([proj], ["tile"], tmp_path / "prefect-home")
    print(f"tile on a temporary LocalCluster: {wall:.1f} s")
    assert results == {"tile": "2 slides done, 1 failed (broken)"}
    assert "Dask: temporary LocalCluster at tcp://127.0.0.1:" in out and "2 worker process(es)" in out
    workers = {line.split("on Dask worker ")[1].split()[0] for line in out.splitlines() if "on Dask worker " in line}
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers), workers
    assert out.count("Starting temporary server") == 1  # the workers reported to the flow's own server
    assert sorted(_coords(proj)) == ["biopsy_0", "biopsy_1"] and _counts(proj, "tile")["failed"] == 1
