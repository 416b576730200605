"""`make screenshots`: the dashboards users live in, on a real demo run, seen in a real headless Chromium.

Builds a small demo project in build/screenshots/ (8 synthetic slides, the pipeline's own params.yaml
with smaller budgets), then on 127.0.0.1 only:

1. a Prefect server, and the `fbta-pipeline` flow run against it up to `evaluate` (per-slide task runs
   for tile, extract, cluster);
2. `fbta register` (the vanilla model → `fbta-classifier@champion`, with its model card) into the
   project's MLflow store, and `fbta tune train.method=fbta` (an Optuna study over C, M, K);
3. the MLflow UI, optuna-dashboard and the Prefect UI, each page loaded in headless Chromium
   (Debian's `chromium`), its rendered DOM checked for what a user comes to see — the alias and the
   model card, the study's C/M/K parameters and the importance plot, the flow run's per-slide task
   runs — and a screenshot written to docs/img/.

A page that does not show its items fails the script (exit 1) naming the page and the missing item.
Nothing leaves 127.0.0.1; Chromium runs with its background networking off.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IMG = ROOT / "docs" / "img"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1440,1000"]


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_DISABLE_TELEMETRY": "true",
         "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
         "GIT_AUTHOR_NAME": "demo", "GIT_AUTHOR_EMAIL": "demo@localhost", "GIT_COMMITTER_NAME": "demo",
         "GIT_COMMITTER_EMAIL": "demo@localhost"}
    e.update(extra)
    return e


def sh(cwd: Path, *args: str, environ: dict[str, str] | None = None, timeout: float = 1800) -> str:
    print("$", " ".join(args), flush=True)
    p = subprocess.run(list(args), cwd=cwd, env=environ or env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"screenshots: {' '.join(args)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshots: {what} did not answer at {url} within {timeout:.0f} s")
        time.sleep(1)


@contextlib.contextmanager
def server(args: list[str], log: Path, cwd: Path, environ: dict[str, str]) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        p = subprocess.Popen(args, cwd=cwd, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield p
        finally:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def demo_project(ws: Path) -> Path:
    """The user's project, small: the demo cohort stage kept, budgets cut so the whole run takes minutes."""
    proj = ws / "project"
    proj.mkdir(parents=True)
    shutil.copytree(ROOT / "fbta", proj / "fbta", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["synth"].update(n_slides=8, width=1536, height=1536)
    p["run"]["progress"] = False
    p["train"].update(epochs=4, patience=4, min_epochs=1)
    p["flows"].update(slide_concurrency=2, slides_per_task=1)
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (proj / ".gitignore").write_text("__pycache__/\n")
    sh(proj, "git", "init", "-q")
    sh(proj, str(BIN / "dvc"), "init", "-q")
    sh(proj, str(BIN / "dvc"), "config", "core.analytics", "false")
    return proj


def prefect_api(api: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(f"{api}/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def page(url: str, png: Path, must_show: list[str], profile: Path, budget_ms: int = 20000) -> None:
    """Load ``url`` in headless Chromium: its rendered DOM must contain every item; then a screenshot."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    missing = [m for m in must_show if m not in dom]
    if missing:
        (png.with_suffix(".html")).write_text(dom)
        raise SystemExit(f"screenshots: {url} does not show {missing} (DOM: {png.with_suffix('.html')})")
    subprocess.run([*common, f"--screenshot={png}", url], capture_output=True, text=True, timeout=180, check=True)
    print(f"  {png.relative_to(ROOT)}: shows {must_show}", flush=True)


def copy_plots(proj: Path) -> None:
    """The pipeline's own pictures for the docs: the ROC and one tumour slide's heatmap."""
    plots = proj / "data" / "reports" / "plots"
    shutil.copy(plots / "roc_vanilla.png", IMG / "roc_vanilla.png")
    labels = (proj / "data" / "labels.csv").read_text().splitlines()
    tumour = [ln.split(",")[0] for ln in labels[1:] if ",tumour" in ln]
    maps = sorted((plots / "heatmaps" / "vanilla_abmil").glob("*.png"), key=lambda p: p.stem not in tumour)
    from PIL import Image

    with Image.open(maps[0]) as im:  # a web-sized copy: the stage writes it at full thumbnail resolution
        im.thumbnail((720, 720))
        im.convert("RGB").quantize(colors=128).save(IMG / "heatmap.png", optimize=True)
    print(f"  docs/img/roc_vanilla.png, docs/img/heatmap.png ({maps[0].stem})", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "screenshots", help="the demo project's folder")
    ap.add_argument("--trials", type=int, default=4, help="Optuna trials of the FBTA study")
    args = ap.parse_args(argv)
    if not (shutil.which("chromium") or Path("/usr/bin/chromium").exists()):
        print("screenshots: needs Debian's chromium (apt-get install -y chromium)", file=sys.stderr)
        return 2
    ws = args.work.resolve()
    shutil.rmtree(ws, ignore_errors=True)
    IMG.mkdir(parents=True, exist_ok=True)
    proj = demo_project(ws)
    ports = {k: free_port() for k in ("prefect", "mlflow", "optuna")}
    api = f"http://127.0.0.1:{ports['prefect']}/api"
    penv = env(PREFECT_HOME=str(ws / "prefect-home"), PREFECT_API_URL=api)
    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    with server([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports["prefect"])],
                ws / "prefect.log", proj, penv):
        wait_for(f"{api}/health", "the Prefect server")
        sh(proj, sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from pipeline import "
           "pipeline_flow; print(pipeline_flow(project=sys.argv[2], targets=['cluster', 'evaluate', 'heatmap']))",
           str(ROOT / "flows"), str(proj), environ=penv)
        copy_plots(proj)
        sh(proj, str(BIN / "fbta"), "register", "train.method=vanilla", "register.models=[classifier]")
        sh(proj, str(BIN / "fbta"), "tune", "train.method=fbta", f"tune.n_trials={args.trials}", "tune.epochs=2",
           f"tune.startup_trials={args.trials}", "tune.n_clusters=[4,8]", "tune.m=[1,2]", "tune.k=[2,4]",
           "tune.extractor_lr=[]", "tune.translator_lr=[]", "tune.lr=[0.0001,0.001]", "fbta.train_blocks=1")
        flow_run = prefect_api(api, "flow_runs/filter", {"flow_runs": {"name": {}}, "sort": "START_TIME_DESC",
                                                          "limit": 20})
        parent = next(r for r in flow_run if r.get("parent_task_run_id") is None and r["state_type"] == "COMPLETED")
        tile_flow = next(r for r in flow_run if r["name"] == "tile" and r["state_type"] == "COMPLETED")
        tasks = [t["name"] for t in prefect_api(api, "task_runs/filter", {"flow_runs": {"id": {"any_": [tile_flow["id"]]}}})]
        slide_tasks = sorted(t for t in tasks if t.startswith("tile:"))[:2]
        base = f"http://127.0.0.1:{ports['prefect']}"
        page(f"{base}/runs/flow-run/{parent['id']}", IMG / "prefect-flow-run.png", ["fbta-pipeline"], profile)
        page(f"{base}/runs/flow-run/{tile_flow['id']}?tab=Task+Runs", IMG / "prefect-per-slide-tasks.png", slide_tasks,
             profile)

    menv = env()
    with server([str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{proj}/mlflow.db",
                 "--default-artifact-root", str(proj / "mlruns"), "--host", "127.0.0.1", "--port", str(ports["mlflow"])],
                ws / "mlflow.log", proj, menv):
        base = f"http://127.0.0.1:{ports['mlflow']}"
        wait_for(f"{base}/health", "the MLflow UI")
        page(f"{base}/#/models/fbta-classifier", IMG / "mlflow-registered-model.png", ["fbta-classifier", "champion"],
             profile)
        page(f"{base}/#/models/fbta-classifier/versions/1", IMG / "mlflow-model-card.png",
             ["champion", "feature extractor", "efficientnet_lite0", "training cohort"], profile)

    with server([str(BIN / "optuna-dashboard"), f"sqlite:///{proj}/optuna.db", "--host", "127.0.0.1", "--port",
                 str(ports["optuna"])], ws / "optuna.log", proj, menv):
        base = f"http://127.0.0.1:{ports['optuna']}"
        wait_for(f"{base}/api/studies", "optuna-dashboard")
        with urllib.request.urlopen(f"{base}/api/studies", timeout=10) as r:
            study = json.loads(r.read())["study_summaries"][0]
        sid = study["study_id"]
        page(f"{base}/dashboard/studies/{sid}", IMG / "optuna-study.png",
             ["cluster.n_clusters", "fbta.m", "fbta.k", "Hyperparameter Importance", "Best Trial"], profile)
        page(f"{base}/dashboard/studies/{sid}/analytics", IMG / "optuna-analytics.png",
             ["Contour", "cluster.n_clusters", "fbta.k"], profile)
    shutil.rmtree(profile, ignore_errors=True)
    print(f"screenshots: 6 pages checked, pictures in {IMG.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
