"""One unit of benchmarks/fbta_protocol.py: an arm × split × seed, trained and tested through the CLI.

``vanilla``: ``fbta train`` + ``fbta evaluate``; ``fbta`` and ``e2e``: ``fbta train``
+ ``fbta infer`` (e2e's score is its re-extraction); ``oracle``: the in-process
control of benchmarks/protocol_controls.py, whose MIL head is a vanilla unit on
the oracle's features. Each unit's files live in ``<out>/<name>/<split>/<arm>/seed<k>/``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from common import ROOT
from protocol_controls import ProbeSets, extractor_probes, frozen_probes, run_oracle
from protocol_design import Arm
from protocol_stats import epoch_seconds, history_diagnostics

class UnitFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Context:
    out_root: Path
    params: Path
    data: Path
    slides: Path
    features: Path
    masks: Optional[Path]
    common: tuple[str, ...]
    reextract: bool
    keep_models: bool
    probes: Optional[ProbeSets] = None  # --probe-patches: the held-out patch probe of every extractor
    threads: int = 0  # torch threads per unit (--jobs > 1: 1, so parallel units do not fight over cores)


def _cli(args: list[str], log: Path, threads: int = 0) -> None:
    cmd = [sys.executable, "-m", "fbta", *args]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})}
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise UnitFailed(f"`fbta {args[0]}` exited {rc}; log {log}:\n{tail}")


def unit_overrides(ctx: Context, arm: Arm, seed: int, out: Path, labels_csv: Path) -> list[str]:
    fixed = [f"data.out={out}", f"data.labels={labels_csv}", f"data.slides={ctx.slides}",
             f"data.features={ctx.features}", f"data.masks={ctx.masks}" if ctx.masks else "data.masks=null",
             "tracking.enabled=false", "run.progress=false", f"mil.arch={arm.arch}", f"train.method={arm.method}",
             f"train.seed={seed}"]
    return [*ctx.common, *arm.overrides, *fixed]


def run_unit(ctx: Context, arm: Arm, split: str, seed: int, labels_csv: Path,
             part: Optional[dict[str, str]] = None) -> dict[str, Any]:
    out = ctx.out_root / split / arm.slug / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    clusters = out / "clusters"
    if not clusters.exists() and not clusters.is_symlink() and (ctx.data / "clusters").is_dir():
        clusters.symlink_to((ctx.data / "clusters").resolve())
    log = out / "log.txt"
    t0 = time.time()
    if arm.method == "oracle":
        if ctx.masks is None or ctx.probes is None or part is None:
            raise UnitFailed(f"{arm.spec}: the oracle needs annotation masks (--masks) and --probe-patches > 0")
        vanilla = Arm(arm.spec, arm.arch, "vanilla", arm.overrides)

        def head(features: Path) -> dict[str, Any]:  # the MIL head on the oracle's features, vanilla's budget
            own = Context(**{**ctx.__dict__, "features": features})
            return _train_and_test(own, vanilla, seed, out, labels_csv, log)

        torch_threads(ctx.threads)
        ov = [*ctx.common, *arm.overrides, f"train.seed={seed}"]
        res = run_oracle(ctx.params, ov, part, split, seed, ctx.probes, out, head)
        unit = {**res, "arm": arm.spec, "method": "oracle", "test": {"oracle": res["test"].get("vanilla", {})}}
        unit.pop("unit_test", None)
    else:
        unit = _train_and_test(ctx, arm, seed, out, labels_csv, log)
        unit.pop("unit_test")
        folder = out / "models" / f"{arm.method}_{arm.arch}"
        if ctx.probes is not None and part is not None and arm.method in ("fbta", "e2e"):
            torch_threads(ctx.threads)
            sets = ctx.probes.of(split, part)
            unit["probe"] = {**frozen_probes(sets), **extractor_probes(folder, sets)}
        if not ctx.keep_models:
            for p in folder.glob("*.pt"):
                p.unlink()
    unit.update(split=split, seed=seed, wall_seconds=round(time.time() - t0, 2), folder=str(out))
    return unit


def torch_threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _train_and_test(ctx: Context, arm: Arm, seed: int, out: Path, labels_csv: Path, log: Path) -> dict[str, Any]:
    """``fbta train`` then ``fbta infer`` (fbta, e2e) or ``fbta evaluate`` (vanilla): the unit's record."""
    ov = unit_overrides(ctx, arm, seed, out, labels_csv)
    params = ["--params", str(ctx.params)]
    t0 = time.time()
    _cli(["train", *ov, *params], log, ctx.threads)
    t_train = time.time() - t0
    if arm.method in ("fbta", "e2e"):  # e2e: re-extraction is its real score
        reextract = "true" if arm.method == "e2e" else str(ctx.reextract).lower()
        _cli(["infer", *ov, f"infer.reextract={reextract}", *params], log, ctx.threads)
    else:
        _cli(["evaluate", *ov, *params], log, ctx.threads)
    folder = out / "models" / f"{arm.method}_{arm.arch}"
    meta = json.loads((folder / "meta.json").read_text())
    cls = json.loads((out / "reports" / "metrics.json").read_text())["classification"]
    keep = ("auc", "acc", "f1", "n", "seconds", "speedup_translator", "agreement", "mean_abs_prob_gap")
    test = {v: {k: cls[v][k] for k in keep if k in cls[v]} for v in (arm.method, f"{arm.method}_reextract") if v in cls}
    if arm.method == "e2e":  # its deployable path is re-extraction; its head on frozen features is a diagnostic
        test = {"e2e": test.get("e2e_reextract", {}), "e2e_on_frozen": test.get("e2e", {})}
    epochs_run = int(meta.get("epochs_run", 0))
    per_epoch = epoch_seconds(folder / "history.csv")
    return {"arm": arm.spec, "arch": arm.arch, "method": arm.method, "overrides": list(arm.overrides),
            "test": test, "unit_test": test, "val_auc": meta.get("val_auc"),
            "best_epoch": meta.get("epoch"), "epochs_run": epochs_run, "stopped_early": meta.get("stopped_early"),
            "train_seconds": round(t_train, 2),
            "seconds_per_epoch": round(per_epoch if per_epoch is not None else t_train / max(epochs_run, 1), 3),
            "extractor_steps": meta.get("extractor_steps"),
            "diagnostics": history_diagnostics(folder / "history.csv")}


