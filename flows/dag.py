"""The pipeline DAG as DVC sees it: stage names, commands and order read from ``dvc.yaml``.

Why read it from DVC instead of listing stages here: the DAG is defined once.
Prefect only schedules what ``dvc.yaml`` declares, with DVC's own parser (so
``${mil.arch}`` templating, ``foreach`` and dependency edges resolve exactly as
``dvc repro`` resolves them) and DVC's own bookkeeping (``dvc status``,
``dvc commit``) deciding what is stale and recording what ran.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    upstream: tuple[str, ...]  # stages whose outputs this one reads (direct edges)


class StageFailed(RuntimeError):
    """A stage command or DVC call exited non-zero; the message carries its last output lines."""


def tool(name: str) -> str:
    """An executable of this environment (dvc, fbta), even when the venv is not on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def env() -> dict[str, str]:
    """The stage environment: this venv first on PATH, telemetry off (offline)."""
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("DO_NOT_TRACK", "1")
    e.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    e.setdefault("HF_HUB_OFFLINE", "1")
    return e


def sh(args: Sequence[str] | str, cwd: Path) -> str:
    """Run a command in the project; raise StageFailed with its output tail when it fails."""
    proc = subprocess.run(args, cwd=cwd, env=env(), shell=isinstance(args, str), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        shown = args if isinstance(args, str) else shlex.join(args)
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise StageFailed(f"`{shown}` in {cwd} exited {proc.returncode}:\n{tail}")
    return proc.stdout


def load_dag(project: str | Path, targets: Iterable[str] = ()) -> list[Stage]:
    """Stages in an order ``dvc repro`` could run them: upstream first, ties in dvc.yaml order.

    ``targets`` limits the list to those stages and everything upstream of
    them (what ``dvc repro <target>`` would consider).
    """
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        stages = list(repo.index.stages)  # dvc.yaml stages and `dvc add`-ed .dvc files (no cmd)
        graph = repo.index.graph  # edge stage → stage it depends on
        position = {_name(s): i for i, s in enumerate(stages)}
        by_name = {_name(s): s for s in stages}
        wanted = set(by_name)
        targets = list(targets)
        if targets:
            unknown = [t for t in targets if t not in by_name]
            if unknown:
                raise StageFailed(f"{project}/dvc.yaml has no stage {', '.join(unknown)} "
                                  f"(stages: {', '.join(n for n, s in by_name.items() if s.cmd)})")
            wanted = set()
            for t in targets:
                wanted |= {_name(s) for s in nx.descendants(graph, by_name[t])} | {t}
        upstream_first = graph.reverse(copy=True)
        order = nx.lexicographical_topological_sort(upstream_first, key=lambda s: f"{position[_name(s)]:06d}")
        return [Stage(_name(s), _cmd(s.cmd), tuple(sorted(_name(u) for u in graph.successors(s) if u.cmd)))
                for s in order if _name(s) in wanted and s.cmd]


def _name(stage) -> str:  # noqa: ANN001 - a dvc Stage
    """A dvc.yaml stage's name; a .dvc file's path relative to the project (independent of the cwd)."""
    return getattr(stage, "name", None) or stage.relpath


def _cmd(cmd: str | list[str]) -> str:
    return cmd if isinstance(cmd, str) else " && ".join(cmd)


def stage_changes(project: Path, stage: str) -> list:
    """What ``dvc status`` reports for this one stage ([] when it is up to date)."""
    out = sh([tool("dvc"), "status", "--json", stage], project)
    status = json.loads(out.strip().splitlines()[-1] or "{}") if out.strip() else {}
    return status.get(stage, [])


def outputs_only_changed(changes: list) -> bool:
    """True when deps and params are as recorded and only outputs are missing/modified (a checkout case)."""
    keys = {k for c in changes if isinstance(c, dict) for k in c}
    return bool(changes) and keys <= {"changed outs"} and all(isinstance(c, dict) for c in changes)
