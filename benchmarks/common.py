"""Shared by the benchmark scripts: machine description, JSON report, BENCHMARKS.md row."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


BENCH_OUT_ENV = "FBTA_BENCH_OUT"


def record(name: str, payload: dict[str, Any], headline: str) -> Path:
    """Write reports/bench/<name>.json and append a row to BENCHMARKS.md."""
    from fbta.io.atomic import atomic_write_text

    command = command_line()
    # this run's date and command always win: a payload carried over from an earlier run (a resumed
    # protocol's results file) must not stamp the row with that run's date or command
    payload = {"machine": machine(), **payload, "benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M"),
               "command": command}
    elsewhere = os.environ.get(BENCH_OUT_ENV)  # a caller collecting results (gpu_check.py): no BENCHMARKS.md row
    out = (Path(elsewhere) if elsewhere else ROOT / "reports" / "bench") / f"{name}.json"
    atomic_write_text(out, json.dumps(payload, indent=2))
    if elsewhere:
        print(f"\n{name}: {headline}\n→ {out}")
        return out
    append_row(name, payload["date"], payload["machine"], command, headline)
    print(f"\n{name}: {headline}\n→ {out.relative_to(ROOT)}, BENCHMARKS.md")
    return out


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def append_row(name: str, date: str, machine_desc: str, command: str, headline: str) -> None:
    """One row of BENCHMARKS.md per (benchmark, command): a re-run replaces its own older row, so every row
    is the latest result of exactly the command it shows (created with its header if missing)."""
    from fbta.io.atomic import atomic_write_text

    table = ROOT / "BENCHMARKS.md"
    if not table.exists():
        table.write_text("# Benchmarks\n\nRatios measured side by side in one run (absolute times on shared "
                         "machines are noisy). Each row: `reports/bench/<name>.json`, the latest run of its "
                         "command.\n\n| date | benchmark | machine | command | result |\n|---|---|---|---|---|\n")
    row = f"| {date} | {name} | {machine_desc} | `{command}` | {headline} |\n"
    lines = table.read_text().splitlines(keepends=True)
    same = f"| {name} | "
    kept = [ln for ln in lines if not (same in ln and f"| `{command}` |" in ln)]
    atomic_write_text(table, "".join(kept) + row)
