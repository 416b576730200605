"""``make serve``: a local Prefect server on 127.0.0.1 plus the process that runs its deployments.

``prefect deployment run 'fbta-pipeline/local'`` only schedules a run; this
process polls for it and executes it. The deployments are the ones declared in
``prefect.yaml`` (one list, shared with the work-pool route
``prefect deploy --all`` + ``prefect worker start --pool fbta``); an entry whose
flow file does not exist yet is reported and skipped.

    python flows/serve.py [--port 4200] [--no-server]   # --no-server: use $PREFECT_API_URL
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def offline_env(prefect_home: Path) -> None:
    """Analytics off, state inside the project (or the caller's PREFECT_HOME)."""
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # issue #27: 20 s is too short


def wait_healthy(api_url: str, timeout_s: float = 300.0, proc: Optional[subprocess.Popen] = None) -> None:
    """Poll ``<api>/health`` until the server answers or exits (cold start ~15 s on 2 idle cores, minutes busy)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server at {api_url} not healthy after {timeout_s:.0f} s")


def start_server(host: str, port: int) -> subprocess.Popen:
    prefect = Path(sys.executable).parent / "prefect"
    cmd = [str(prefect) if prefect.exists() else "prefect", "server", "start", "--host", host, "--port", str(port)]
    return subprocess.Popen(cmd, stdout=sys.stdout, stderr=sys.stderr)


def deployments(prefect_yaml: Path = ROOT / "prefect.yaml") -> list[Any]:
    """``RunnerDeployment``s for every prefect.yaml entry whose flow file exists."""
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load(prefect_yaml.read_text())
    out = []
    for d in spec.get("deployments", []):
        path, _, _ = d["entrypoint"].partition(":")
        if not (ROOT / path).exists():
            print(f"serve: skipping deployment '{d['name']}': {path} does not exist yet", flush=True)
            continue
        fl = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        out.append(fl.to_deployment(name=d["name"], description=d.get("description"), tags=d.get("tags"),
                                    parameters=d.get("parameters") or {}))
        print(f"serve: deployment '{fl.name}/{d['name']}' ({d['entrypoint']})", flush=True)
    return out


def run_runner() -> int:
    """The polling process itself (a child of main): serve every deployment until interrupted."""
    from prefect import serve  # after PREFECT_API_URL is set: settings are read at import

    deps = deployments()
    if not deps:
        print("serve: no deployments to serve", file=sys.stderr)
        return 2
    serve(*deps, print_starting_message=True)
    return 0


def stop(proc: Optional[subprocess.Popen], sig: int, grace_s: float) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Optional[list[str]] = None) -> int:
    """Supervise server and runner as children, so Ctrl-C / SIGTERM stops both, runner first.

    Why children: the runner pauses its deployments through the API when it
    stops, so the server must outlive it; and Prefect's runner replaces the
    SIGTERM handler of whatever process calls ``serve()``.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=4200)
    ap.add_argument("--no-server", action="store_true", help="use the server at $PREFECT_API_URL")
    ap.add_argument("--runner-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    offline_env(ROOT / ".prefect")
    if args.runner_only:
        return run_runner()
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    server = runner = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill <pid>`: run the finally below
    try:
        if not args.no_server:
            os.environ["PREFECT_API_URL"] = f"http://{args.host}:{args.port}/api"
            server = start_server(args.host, args.port)
        elif not os.environ.get("PREFECT_API_URL"):
            print("serve: --no-server needs PREFECT_API_URL", file=sys.stderr)
            return 2
        wait_healthy(os.environ["PREFECT_API_URL"], proc=server)
        print(f"serve: Prefect API {os.environ['PREFECT_API_URL']} (UI: {os.environ['PREFECT_API_URL'][:-4]})",
              flush=True)
        runner = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--runner-only"], cwd=ROOT)
        return runner.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(runner, signal.SIGTERM, 5)  # its own handler pauses the deployments; it need not exit cleanly
        stop(server, signal.SIGTERM, 20)


if __name__ == "__main__":
    sys.exit(main())
