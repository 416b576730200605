"""Specification of the security defaults (SECURITY.md): loopback-only servers, no secrets in files or runs.

Servers are really started (optuna-dashboard and the flows' Dask LocalCluster
in the default suite; the MLflow UI and the Prefect server in the slow one) and their
listening sockets read back from the kernel through psutil. Secrets are fake
canary values put into a real `fbta train` process's environment; afterwards
nothing the run wrote, logged or printed may contain them.
"""
from __future__ import annotations

import ast
import ipaddress
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from milcohort import SMALL_HEADS, make_cohort

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVER = re.compile(r"prefect server start|flows/serve\.py|optuna-dashboard|mlflow (ui|server|models serve)\b"
                    r"|\buvicorn\b|\bgunicorn\b|dask[- ]scheduler|jupyter")
ANY_ADDRESS = re.compile(r"0\.0\.0\.0|\[::\]|--host[ =]::(\s|$)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def makefile_recipes() -> dict[str, str]:
    """``target → recipe`` with continuation lines joined (what `make` would run)."""
    recipes: dict[str, list[str]] = {}
    target = None
    for line in (ROOT / "Makefile").read_text().replace("\\\n", " ").splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+):(?!=)", line)
        if m:
            target = m.group(1)
            recipes[target] = []
        elif line.startswith("\t") and target and not line.strip().startswith("@echo"):
            recipes[target].append(line.strip())
    return {t: " ; ".join(lines) for t, lines in recipes.items()}


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of ``pid`` and its descendants."""
    root = psutil.Process(pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def wait_listening(proc: subprocess.Popen, port: int, log: Path, seconds: float = 300) -> set[tuple[str, int]]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        found = listening(proc.pid)
        if any(p == port for _, p in found):
            return found
        time.sleep(0.3)
    raise AssertionError(f"nothing listened on port {port} within {seconds:.0f} s:\n{log.read_text()[-3000:]}")


def only_loopback(found: set[tuple[str, int]]) -> bool:
    return bool(found) and all(ipaddress.ip_address(ip).is_loopback for ip, _ in found)


def start(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    log = cwd / f"{Path(cmd[0]).name}-{len(list(cwd.glob('*.log')))}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers (own session, started here)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def recipe_command(target: str, port_var: str, port: int) -> list[str]:
    """The Makefile recipe of ``target`` as argv, with the venv's executables and a free port."""
    server = makefile_recipes()[target].split(" ; ")[-1]  # the last command starts the server
    line = server.replace("$(BIN)", str(BIN)).replace(f"$({port_var})", str(port))
    line = line.replace("$(CURDIR)", ".")
    assert "$(" not in line, line
    return shlex.split(line)


# --- servers bind 127.0.0.1 --------------------------------------------------------------------------------------

def test_every_server_command_in_the_makefile_names_127_0_0_1_and_no_doc_binds_all_interfaces() -> None:
    servers = {t: r for t, r in makefile_recipes().items() if SERVER.search(r)}
    assert {"serve", "dashboard", "mlflow-ui"} <= set(servers)
    for target, recipe in servers.items():
        assert re.search(r"(--host|-h)[ =]127\.0\.0\.1\b", recipe), f"make {target} does not bind 127.0.0.1: {recipe}"
    docs = ["Makefile", "README.md", "flows/README.md", "prefect.yaml", "Dockerfile", "params.yaml", "dvc.yaml",
            *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]  # the docs site too
    for name in docs:
        for n, line in enumerate((ROOT / name).read_text().splitlines(), 1):
            assert not (SERVER.search(line) and ANY_ADDRESS.search(line)), f"{name}:{n} binds every interface: {line}"
            if SERVER.search(line) and re.search(r"--host[ =](\S+)", line):
                host = re.search(r"--host[ =](\S+)", line).group(1)  # type: ignore[union-attr]
                # a doc may show a multi-node set-up on a private network (the Dask scheduler); never a public one
                assert host == "127.0.0.1" or ipaddress.ip_address(host).is_private, f"{name}:{n} binds {host}: {line}"


def test_the_tools_default_to_loopback_when_no_host_is_given() -> None:
    import mlflow.cli
    import mlflow.models.cli
    from prefect.settings.models.server.api import ServerAPISettings

    for name in ("ui", "server"):
        cmd = mlflow.cli.cli.get_command(None, name)  # type: ignore[arg-type]
        assert {p.name: p.default for p in cmd.params}["host"] == "127.0.0.1", f"mlflow {name}"
    assert {p.name: p.default for p in mlflow.models.cli.serve.params}["host"] == "127.0.0.1"
    assert ServerAPISettings.model_fields["host"].default == "127.0.0.1"  # `prefect server start`
    serve_py = ast.parse((ROOT / "flows/serve.py").read_text())
    hosts = [kw.value.value for call in ast.walk(serve_py) if isinstance(call, ast.Call)
             and call.args and isinstance(call.args[0], ast.Constant) and call.args[0].value == "--host"
             for kw in call.keywords if kw.arg == "default" and isinstance(kw.value, ast.Constant)]
    assert hosts == ["127.0.0.1"]  # `python flows/serve.py` without --host


def test_make_dashboard_and_a_bare_optuna_dashboard_listen_on_loopback_only(tmp_path: Path) -> None:
    import optuna

    for db in ("optuna.db", "other.db"):  # a tune study exists (optuna-dashboard does not create the schema)
        optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / db}")
    port, bare_port = free_port(), free_port()
    made, made_log = start(recipe_command("dashboard", "DASHBOARD_PORT", port), tmp_path)  # sqlite:///optuna.db here
    bare, bare_log = start([str(BIN / "optuna-dashboard"), f"sqlite:///{tmp_path}/other.db", "--port", str(bare_port)],
                           tmp_path)
    try:
        found = wait_listening(made, port, made_log)
        assert only_loopback(found), found
        found = wait_listening(bare, bare_port, bare_log)
        assert only_loopback(found), found  # a user who forgets --host is still not reachable from outside
    finally:
        stop(made)
        stop(bare)


@pytest.mark.slow  # the MLflow UI migrates a fresh store, the Prefect server starts cold: ~1 min on 2 cores
def test_make_mlflow_ui_and_the_prefect_server_of_make_serve_listen_on_loopback_only(tmp_path: Path) -> None:
    mlflow_port, prefect_port = free_port(), free_port()
    (tmp_path / "mlruns").mkdir()
    ui, ui_log = start(recipe_command("mlflow-ui", "MLFLOW_PORT", mlflow_port), tmp_path)
    prefect_cmd = [a for a in recipe_command("serve", "PREFECT_PORT", prefect_port) if not a.startswith("PREFECT_HOME=")]
    assert prefect_cmd[1].endswith("flows/serve.py") and "--host" in prefect_cmd
    host = prefect_cmd[prefect_cmd.index("--host") + 1]
    server, server_log = start([str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
                               tmp_path, {"PREFECT_HOME": str(tmp_path / "prefect"),
                                          "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"})
    try:
        for proc, port, log in ((ui, mlflow_port, ui_log), (server, prefect_port, server_log)):
            found = wait_listening(proc, port, log)
            assert only_loopback(found), found
    finally:
        stop(ui)
        stop(server)


def test_the_flows_temporary_dask_cluster_listens_on_loopback_only() -> None:
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "flows"))
    from pipeline import local_cluster_kwargs, start_local_cluster

    with start_local_cluster(**local_cluster_kwargs(SimpleNamespace(slide_concurrency=1))) as cluster:
        found = listening(os.getpid())
        assert any(p == int(cluster.scheduler_address.rsplit(":", 1)[1]) for _, p in found)
        assert only_loopback(found), found


# --- no secrets in files, logs or runs --------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key setting": re.compile(r"aws_secret_access_key\s*[=:]\s*\S", re.I),
    "private key": re.compile(r"-----BEGIN ([A-Z]+ )?PRIVATE KEY( BLOCK)?-----"),
    "credential assignment": re.compile(
        r"\b(password|passwd|secret|token|api[_-]?key|access[_-]?key)\b[\"']?\s*[:=]\s*[\"']?"
        r"(?![\s\"'`$<{(]|\*+\b|null\b|none\b|true\b|false\b)[^\s\"'`]{6,}", re.I),
    "password in a URL": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@\"']+:(?!\*+@)[^/\s@\"']+@", re.I),
    "service token": re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|xox[abprs]-[A-Za-z0-9-]{10,}|hf_[A-Za-z0-9]{30,})"),
}
SECRET_FILES = re.compile(r"(^|/)(\.env(\..*)?|id_[rd]sa|.*\.pem|.*\.key|\.netrc|\.pgpass|credentials)$")


def secret_findings(name: str, text: str) -> list[str]:
    return [f"{name}:{n}: {kind}" for n, line in enumerate(text.splitlines(), 1)
            for kind, rx in SECRET_PATTERNS.items() if rx.search(line)]


def test_the_secret_scanner_recognises_each_kind_of_secret() -> None:
    key = "A" + "KIA" + secrets.token_hex(8).upper()  # built here, so this file itself holds no such string
    samples = [f"key: {key}", "aws_secret_" + "access_key = abc", "-----BEGIN RSA " + "PRIVATE KEY-----",
               "pass" + "word: hunter22", "storage: postgresql://fbta:" + "hunter22@db/optuna",
               "gh" + "p_" + "a" * 36]
    assert [len(secret_findings("sample", s)) for s in samples] == [1, 1, 1, 1, 1, 1]
    assert secret_findings("ok", "storage: postgresql://fbta@db/optuna  # password from ~/.pgpass") == []
    assert secret_findings("ok", "tune.storage=postgresql://fbta:***@db/optuna") == []


def test_no_tracked_file_holds_a_secret() -> None:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = [f for f in out.splitlines() if f != "tests/test_security.py"]
    assert not [f for f in files if SECRET_FILES.search(f)], "a credentials file is tracked"
    findings = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096]:
            continue  # binary
        findings += secret_findings(name, data.decode("utf-8", "replace"))
    assert findings == []


def test_secrets_in_the_environment_never_reach_the_mlflow_store_outputs_or_logs(tmp_path: Path) -> None:
    canaries = {var: f"canary{secrets.token_hex(12)}" for var in (
        "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PREFECT_API_KEY",
        "HF_TOKEN", "PGPASSWORD", "DATABASE_URL")}
    ov = [o for o in make_cohort(tmp_path) + SMALL_HEADS["abmil"] if o != "tracking.enabled=false"]
    ov += [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns",
           "train.epochs=1", "tracking.enabled=true"]
    done = subprocess.run([sys.executable, "-m", "fbta", "train", "--params", str(ROOT / "params.yaml"), *ov],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, **canaries})
    assert done.returncode == 0, done.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fbta").experiment_id])
    assert run.data.params["train.epochs"] == "1"  # the run logged its params: there was something to leak into
    logged = " ".join([*run.data.params.values(), *run.data.tags.values(), done.stdout, done.stderr])
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in written) and any("mlruns" in p.parts for p in written)
    for var, value in canaries.items():
        assert value not in logged, f"${var} appears in the run's params, tags or output"
        leaked = [str(p.relative_to(tmp_path)) for p in written if value.encode() in p.read_bytes()]
        assert leaked == [], f"${var} was written to {leaked}"


def test_a_password_in_the_tune_storage_url_is_masked_in_the_error(tmp_path: Path, capsys) -> None:
    from fbta.cli import main

    password = f"pw{secrets.token_hex(8)}"
    rc = main(["tune", "--params", str(ROOT / "params.yaml"), "tracking.enabled=false", f"data.out={tmp_path}",
               f"tune.storage=postgresql://fbta:{password}@127.0.0.1:9/optuna"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cannot open the Optuna study" in err
    assert password not in err and "postgresql://fbta:***@127.0.0.1:9/optuna" in err


def test_an_environment_interpolation_in_params_is_refused_before_anything_is_logged(tmp_path: Path, capsys) -> None:
    from fbta.cli import main

    rc = main(["tile", "--params", str(ROOT / "params.yaml"), f"data.out={tmp_path}",
               "predict.name=${oc.env:AWS_SECRET_ACCESS_KEY}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "'predict.name': ${oc.env:…} is not allowed" in err and list(tmp_path.iterdir()) == []


def test_a_password_in_a_store_url_is_masked_in_the_params_mlflow_gets() -> None:
    from fbta.config import load_config
    from fbta.tracking import flatten

    cfg = load_config(ROOT / "params.yaml", ["tune.storage=postgresql://fbta:s3cret@db.local/optuna"])
    params = flatten(cfg)
    assert params["tune.storage"] == "postgresql://fbta:***@db.local/optuna"
    assert not any("s3cret" in v for v in params.values())
