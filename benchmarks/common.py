"""Shared by the benchmark scripts: the machine, the provenance, and one JSON per (benchmark, command).

Every figure in BENCHMARKS.md and in the docs' results pages is rendered from these JSONs by
``tools/gen_benchmarks.py``; nothing is appended to a table by hand. Layout of ``reports/bench/``:

- ``<name>.json`` — the latest run of benchmark ``<name>`` (scripts that resume, like
  ``fbta_protocol.py``, read it back as their state);
- ``<name>@<8 hex>.json`` — the latest run of each *other* command of the same name, keyed by a hash
  of its command line: a run with new arguments moves the previous ``<name>.json`` here instead of
  overwriting it, so a row never loses its JSON.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_OUT_ENV = "FBTA_BENCH_OUT"
BENCH_DIR = ROOT / "reports" / "bench"


def machine() -> str:
    """One-line description (kept for scripts that print it)."""
    return describe_machine(machine_info())


def machine_info() -> dict[str, Any]:
    """Where a figure was measured: absolute times mean nothing without it."""
    cuda = torch.cuda.is_available()
    return {"arch": platform.machine(), "cores": os.cpu_count(), "device": "cuda" if cuda else "cpu",
            "card": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__}


def describe_machine(m: dict[str, Any]) -> str:
    card = m.get("card") or ("no GPU" if m.get("device") == "cpu" else "GPU unknown")
    return f"{m.get('arch', '?')}, {m.get('cores', '?')} CPU cores, {card}, torch {m.get('torch', '?')}"


def git_commit() -> dict[str, Any]:
    """The code a figure came from: HEAD, and whether the work tree differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": head, "dirty": dirty}


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def command_key(command: str) -> str:
    """The 8-hex key of a command line in ``<name>@<key>.json``."""
    return hashlib.sha1(command.encode()).hexdigest()[:8]


def record(name: str, payload: dict[str, Any], headline: str) -> Path:
    """Write this run's JSON (provenance + payload + headline) and regenerate BENCHMARKS.md and the results pages.

    The provenance always wins over the payload: a payload carried over from an earlier run (a resumed
    protocol's results file) must not stamp this run with that run's date, command or machine."""
    from fbta.io.atomic import atomic_write_text

    command = command_line()
    extra_machine = payload.get("machine") if isinstance(payload.get("machine"), dict) else {}
    payload = {**payload, "benchmark": name, "command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
               **git_commit(), "machine": {**extra_machine, **machine_info()}, "headline": headline}
    elsewhere = os.environ.get(BENCH_OUT_ENV)  # a caller collecting results (gpu_check.py): no BENCHMARKS.md row
    if elsewhere:
        out = Path(elsewhere) / f"{name}.json"
        atomic_write_text(out, json.dumps(payload, indent=2))
        print(f"\n{name}: {headline}\n→ {out}")
        return out
    out = BENCH_DIR / f"{name}.json"
    keep_other_command(out, command)
    atomic_write_text(out, json.dumps(payload, indent=2))
    regenerate()
    print(f"\n{name}: {headline}\n→ {out.relative_to(ROOT)}, BENCHMARKS.md, docs/results/")
    return out


def keep_other_command(latest: Path, command: str) -> None:
    """Before ``latest`` is overwritten: move a run of another command aside to ``<name>@<key>.json``, and drop
    an older run of this same command kept there (this run supersedes it)."""
    same = latest.with_name(f"{latest.stem}@{command_key(command)}.json")
    if same.exists():
        same.unlink()
    if not latest.exists():
        return
    try:
        previous = json.loads(latest.read_text()).get("command")
    except (OSError, json.JSONDecodeError):
        previous = None
    if previous and previous != command:
        os.replace(latest, latest.with_name(f"{latest.stem}@{command_key(previous)}.json"))


def regenerate() -> None:
    """BENCHMARKS.md and docs/results/ from reports/bench/*.json (tools/gen_benchmarks.py)."""
    spec = importlib.util.spec_from_file_location("gen_benchmarks", ROOT / "tools" / "gen_benchmarks.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen_benchmarks"] = gen  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(gen)
    gen.write_all(ROOT)
