"""Prefect orchestration: the DAG comes from dvc.yaml, deployments from prefect.yaml, and a real
local server runs `prefect deployment run 'fbta-pipeline/local'` to Completed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import pink_on_white

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "flows"))

from dag import StageFailed, load_dag  # noqa: E402


def test_dag_is_dvc_yaml_in_dependency_order():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stages = load_dag(ROOT)
    assert [s.name for s in stages] and {s.name for s in stages} == {n for n, st in spec.items() if st.get("cmd")}
    seen: set[str] = set()
    for s in stages:
        assert set(s.upstream) <= seen, f"{s.name} scheduled before its upstream {set(s.upstream) - seen}"
        assert s.cmd.split()[0] in {"fbta", "dvc", "python"}, s.cmd
        seen.add(s.name)
    by_name = {s.name: s for s in stages}
    assert by_name["tile"].upstream == ("synth",) and "extract" in by_name["cluster"].upstream
    assert [s.name for s in load_dag(ROOT, ["cluster"])] == ["synth", "tile", "extract", "cluster"]
    with pytest.raises(StageFailed, match="no stage nope"):
        load_dag(ROOT, ["nope"])


def test_task_runner_is_configurable():
    from omegaconf import OmegaConf
    from pipeline import make_task_runner
    from prefect.task_runners import ThreadPoolTaskRunner

    from fbta.config import load_config

    cfg = load_config(ROOT / "params.yaml", ["flows.slide_concurrency=3"])
    runner = make_task_runner(cfg.flows)
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3
    bad = OmegaConf.create({"task_runner": "celery", "slide_concurrency": 1, "dask_address": None})
    with pytest.raises(ValueError, match="thread or dask"):
        make_task_runner(bad)


def test_prefect_yaml_lists_loadable_flows_under_their_names():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entries = {d["entrypoint"]: d for d in spec["deployments"]}
    assert "flows/pipeline.py:pipeline_flow" in entries
    expect = {"flows/pipeline.py:pipeline_flow": "fbta-pipeline"}
    for entrypoint, d in entries.items():
        path = ROOT / entrypoint.partition(":")[0]
        if not path.exists():  # flows/tune.py and flows/batch_infer.py come with the lifecycle work
            continue
        fl = load_flow_from_entrypoint(str(ROOT / entrypoint))
        assert d["name"] == "local" and fl.name.startswith("fbta-"), (entrypoint, fl.name)
        if entrypoint in expect:
            assert fl.name == expect[entrypoint]


# --- the real thing: a Prefect server on 127.0.0.1, flows/serve.py polling, a deployment run ---------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(extra)
    return env


def _sh(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    p = subprocess.run(list(args), cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(args)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def users_project(dest: Path) -> Path:
    """The user's day (README): their cohort under `dvc add`, params.yaml pointing at it, synth removed."""
    dest.mkdir(parents=True)
    shutil.copytree(ROOT / "fbta", dest / "fbta", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(slides="cohorts/x/slides", labels="cohorts/x/labels.csv", masks="cohorts/x/masks")
    params["run"]["progress"] = False
    params["flows"].update(retries=1, retry_delay_s=0.0, slide_concurrency=3, slides_per_task=1)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cohort = dest / "cohorts" / "x"
    (cohort / "slides").mkdir(parents=True)
    (cohort / "masks").mkdir()
    (cohort / "masks" / ".gitkeep").touch()  # no annotations: heatmap's localisation is skipped
    for i in range(2):  # plain images without MPP metadata: labels.csv gives it
        Image.fromarray(pink_on_white(1536, 1024, (256, 256, 1280, 768), seed=i)).save(
            cohort / "slides" / f"biopsy_{i}.png")
    (cohort / "slides" / "broken.svs").write_bytes(b"II*\x00" + os.urandom(4096))  # corrupt: reported, not fatal
    (cohort / "labels.csv").write_text("slide_id,label,mpp\nbiopsy_0,tumour,0.5\nbiopsy_1,normal,0.5\nbroken,normal,0.5\n")
    (dest / ".gitignore").write_text("__pycache__/\n")
    dvc = str(BIN / "dvc")
    _sh(dest, "git", "init", "-q")
    _sh(dest, dvc, "init", "-q")
    _sh(dest, dvc, "config", "core.analytics", "false")
    _sh(dest, dvc, "config", "cache.type", "hardlink,symlink")
    _sh(dest, dvc, "remove", "synth")
    _sh(dest, dvc, "add", "cohorts/x/slides", "cohorts/x/masks", "cohorts/x/labels.csv")
    return dest


def _task_runs(api: str, name: str) -> list[dict]:
    body = json.dumps({"task_runs": {"name": {"any_": [name]}}}).encode()
    req = urllib.request.Request(f"{api}/task_runs/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_deployment_run_on_a_local_server_completes_with_per_slide_fanout(tmp_path: Path):
    proj = users_project(tmp_path / "proj")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([sys.executable, str(ROOT / "flows" / "serve.py"), "--port", str(port)], cwd=ROOT,
                             env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # until serve.py says its deployments are served (or exits)
        while "being served" not in (tmp_path / "serve.log").read_text():
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve.py did not start serving in 300 s"
            time.sleep(1)
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "fbta-pipeline/local",
                              "--param", f"project={json.dumps(str(proj))}", "--param", 'targets=["tile"]',
                              "--watch", "--watch-interval", "2", "--watch-timeout", "500"],
                             cwd=ROOT, env={**env, "PREFECT_API_URL": api}, capture_output=True, text=True, timeout=600)
        served = (tmp_path / "serve.log").read_text()
        assert run.returncode == 0 and "Completed" in run.stdout, f"{run.stdout[-2000:]}\n--- serve.py:\n{served[-4000:]}"
        broken = _task_runs(api, "tile:broken")
        assert len(broken) == 1 and broken[0]["run_count"] == 2, broken  # 1 try + flows.retries=1
        assert broken[0]["state_type"] == "FAILED"
        good = _task_runs(api, "tile:biopsy_0")
        assert good and good[0]["state_type"] == "COMPLETED"
    finally:
        serve.terminate()  # serve.py stops its runner, then its server
        try:
            serve.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        log.close()
    status = json.loads((proj / "data/reports/status/tile.json").read_text())
    assert status["counts"]["failed"] == 1 and status["counts"]["done"] + status["counts"]["skipped"] == 2
    assert sorted(p.stem for p in (proj / "data/coords").glob("*.h5")) == ["biopsy_0", "biopsy_1"]
    status = _sh(proj, str(BIN / "dvc"), "status", "tile", "cohorts/x/slides.dvc")
    assert "Data and pipelines are up to date" in status, status  # recorded like dvc repro
    assert "tile" in yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
