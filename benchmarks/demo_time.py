"""``make demo`` from a fresh clone: wall seconds of the set-up and of each DVC stage, to one JSON.

⚑ target (issue #28): the whole demo ≤ 10 min on 2 cores after set-up. The
steps are ``make demo``'s: set-up (``make venv``: the pinned stack from
requirements.lock; then ``dvc init`` where ``.dvc/`` is not tracked), every stage of ``dvc repro`` in the order
DVC runs them (one ``dvc repro``, each stage timed from its "Running stage"
line to the next), then the results table (``python -m fbta.results``). The clone is of this
checkout's HEAD (committed work only), in a temporary folder.

``--venv PATH`` reuses an installed environment instead of building one (set-up
then times ``dvc init`` only, and says so): its editable install points
elsewhere, so the clone goes first on PYTHONPATH. The machine's load (load
average; other processes' CPU from /proc/stat while each step ran) is recorded
beside each time: on a shared machine the times are only as idle as it was.

    .venv/bin/python benchmarks/demo_time.py                 # fresh clone, fresh .venv (network or wheels)
    .venv/bin/python benchmarks/demo_time.py --venv .venv    # fresh clone, this checkout's environment
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, record
from reader_procs import busy_jiffies

TARGET_S = 600.0


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Run ``cmd``; its wall seconds, exit code and the machine's busy cores meanwhile (ours included)."""
    b0, _ = busy_jiffies()
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    b1, _ = busy_jiffies()
    return {"seconds": round(wall, 1), "rc": rc, "loadavg_1min_at_start": round(load0, 2),
            "machine_busy_cores": round((b1 - b0) / os.sysconf("SC_CLK_TCK") / max(wall, 1e-9), 2)}


def repro(clone: Path, env: dict[str, str], dvc: str, log: Path, budget_s: float) -> tuple[dict[str, dict], int]:
    """``dvc repro`` as ``make demo`` runs it, each stage timed from its "Running stage" line to the next;
    stopped (its whole process group) after ``budget_s``, the stage then running marked ``cut_off``."""
    marks: list[tuple[str, float, int, float]] = []  # (stage, time, machine busy jiffies, 1-min load)
    with log.open("a") as out, subprocess.Popen([dvc, "repro"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True, bufsize=1,
                                                 start_new_session=True) as proc:
        timer = threading.Timer(budget_s, os.killpg, (proc.pid, signal.SIGTERM))
        timer.start()
        for line in proc.stdout:
            out.write(line)
            out.flush()
            m = re.match(r"Running stage '([^']+)'", line)
            if m:
                marks.append((m[1], time.perf_counter(), busy_jiffies()[0], os.getloadavg()[0]))
                print(f"{time.strftime('%H:%M:%S')} {m[1]}", flush=True)
        rc = proc.wait()
        cut = not timer.is_alive() and rc != 0
        timer.cancel()
    marks.append(("", time.perf_counter(), busy_jiffies()[0], os.getloadavg()[0]))
    tick = os.sysconf("SC_CLK_TCK")
    stages = {a[0]: {"seconds": round(b[1] - a[1], 1), "loadavg_1min_at_start": round(a[3], 2),
                     "machine_busy_cores": round((b[2] - a[2]) / tick / max(b[1] - a[1], 1e-9), 2)}
              for a, b in zip(marks, marks[1:])}
    if cut and stages:
        stages[marks[-2][0]]["cut_off"] = True
    return stages, 0 if cut else rc


def from_log(log: Path) -> dict[str, dict]:
    """Stage times from the "HH:MM:SS stage" lines this script prints, for a run stopped from outside:
    the stage running at the end is timed up to now and marked ``cut_off``."""
    marks = [(m[2], time.mktime(time.strptime(time.strftime("%Y-%m-%d ") + m[1], "%Y-%m-%d %H:%M:%S")))
             for m in re.finditer(r"^(\d\d:\d\d:\d\d) (\S+)$", log.read_text(), re.M)]
    marks.append(("", time.time()))
    stages = {a[0]: {"seconds": round(b[1] - a[1], 1)} for a, b in zip(marks, marks[1:])}
    if stages:
        stages[marks[-2][0]]["cut_off"] = True
    return stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, help="reuse this environment instead of building .venv (set-up untimed)")
    ap.add_argument("--keep", type=Path, help="clone here and keep it (default: a temporary folder)")
    ap.add_argument("--budget-min", type=float, default=120.0, help="stop dvc repro after this many minutes")
    ap.add_argument("--from-log", type=Path, help="record the stage times a stopped run of this script printed")
    args = ap.parse_args()
    if args.from_log is not None:
        stages = from_log(args.from_log)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.keep / "fbta", capture_output=True,
                              text=True).stdout.strip() if args.keep else ""  # the stopped run's clone
        report({f"stage_{k}": {**v, "rc": 0} for k, v in stages.items()}, list(stages),
               f"reused environment; stopped from outside, times from {args.from_log}", head, None)
        return
    work = Path(tempfile.mkdtemp(prefix="fbta-demo-")) if args.keep is None else args.keep
    clone, log = work / "fbta", work / "demo.log"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FBTA_BENCH_OUT", None)
    steps: dict[str, dict] = {}
    if args.venv is not None:
        venv = args.venv.resolve()
        env["PYTHONPATH"] = str(clone)  # the reused env's editable install points at its own checkout
        setup_note = f"reused {venv} (set-up = dvc init only)"
    else:
        steps["setup_make_venv"] = timed(["make", "venv"], clone, env, log)
        venv = clone / ".venv"
        setup_note = "make venv from requirements.lock"
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    dvc = str(venv / "bin" / "dvc")
    if not (clone / ".dvc").is_dir():  # as make demo: a checkout that tracks .dvc/ is initialised already
        steps["setup_dvc_init"] = timed([dvc, "init", "-q"], clone, env, log)
    subprocess.run([dvc, "config", "core.analytics", "false"], cwd=clone, env=env, check=True)
    stages, rc = repro(clone, env, dvc, log, args.budget_min * 60)
    order = list(stages)
    steps.update({f"stage_{k}": {**v, "rc": rc if k == order[-1] else 0} for k, v in stages.items()})
    if rc and not order:  # dvc failed before its first stage
        steps["dvc_repro"] = {"seconds": 0.0, "rc": rc}
    if not any(v.get("cut_off") for v in steps.values()):
        steps["results_table"] = timed([str(venv / "bin" / "python"), "-m", "fbta.results"], clone, env, log)
    failed = report(steps, order, setup_note, head, log)
    if args.keep is None and not failed:
        shutil.rmtree(work, ignore_errors=True)


def report(steps: dict[str, dict], order: list[str], setup_note: str, head: str, log: Path | None) -> list[str]:
    """demo_time.json (+ its BENCHMARKS row); the failed steps."""
    after_setup = sum(v["seconds"] for k, v in steps.items() if not k.startswith("setup"))
    failed = [k for k, v in steps.items() if v["rc"] != 0]
    cut = [k.removeprefix("stage_") for k, v in steps.items() if v.get("cut_off")]
    record("demo_time", {"clone_commit": head, "setup": setup_note, "steps": steps, "stage_order": order,
                         "seconds_after_setup": round(after_setup, 1), "target_seconds_after_setup": TARGET_S,
                         "complete": not cut and not failed, "failed_steps": failed, "log": str(log),
                         "cpu_cores": os.cpu_count(), "loadavg_at_end": [round(v, 2) for v in os.getloadavg()]},
           f"make demo from a fresh clone ({setup_note}): {after_setup / 60:.1f} min after set-up over "
           f"{len(order)} stages (target ≤ {TARGET_S / 60:.0f} min)"
           + (f", CUT OFF during {cut[0]} — a lower bound" if cut else "") + "; slowest: "
           + ", ".join(f"{k.removeprefix('stage_')} {v['seconds']:.0f} s" for k, v in
                       sorted(steps.items(), key=lambda kv: -kv[1]["seconds"])[:3])
           + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return failed


if __name__ == "__main__":
    main()
