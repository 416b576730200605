"""What benchmarks/fbta_protocol.py compares, fixed before any unit runs: arms, splits, budget.

- arms: ``arch:method[:key=value;...]`` specs, their overrides checked, and the (A, B) pairs compared;
- splits: stratified k-fold CV or seeded few-shot draws (slide → train|val|test), and one split's labels.csv;
- budget: the epochs, patience, lr and EMA each arm will train with, resolved like the CLI, and differences
  between arms.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

import common  # noqa: F401  (project root first on sys.path: `fbta` is the package, not benchmarks/fbta.py)

FIXED_PREFIXES = ("data.", "train.method", "mil.arch", "train.seed", "train.fold")
# vanilla and fbta; e2e (the end-to-end bound) and oracle (patch targets): the controls, benchmarks/protocol_controls.py
METHODS = ("vanilla", "fbta", "e2e", "oracle")


# -- arms -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    spec: str
    arch: str
    method: str
    overrides: tuple[str, ...]

    @property
    def base(self) -> str:
        return f"{self.arch}:{self.method}"

    @property
    def slug(self) -> str:
        readable = re.sub(r"[^A-Za-z0-9.]+", "_", self.spec).strip("_")[:60]
        return f"{readable}-{hashlib.sha1(self.spec.encode()).hexdigest()[:6]}"


def parse_arm(spec: str) -> Arm:
    """``arch:method[:key=value;key=value]`` → an Arm (a ValueError names what is wrong)."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[0] or parts[1] not in METHODS:
        raise ValueError(f"arm '{spec}': expected arch:method[:key=value;...] with method one of {', '.join(METHODS)}")
    overrides = tuple(kv.strip() for kv in (parts[2] if len(parts) > 2 else "").split(";") if kv.strip())
    check_overrides(overrides, f"arm '{spec}'")
    return Arm(spec, parts[0], parts[1], overrides)


def check_overrides(overrides: Iterable[str], where: str) -> None:
    for kv in overrides:
        if "=" not in kv:
            raise ValueError(f"{where}: override '{kv}' is not key=value")
        key = kv.split("=", 1)[0].strip()
        if key.startswith(FIXED_PREFIXES):
            raise ValueError(f"{where}: '{key}' is set by the protocol for every unit (data, method, arch, seed, "
                             "split); use --data/--features/--labels, the arm's arch:method and --seeds")


def pairs_of(arms: Sequence[Arm]) -> list[tuple[str, str]]:
    """(A, B) comparisons, A − B: X:fbta, X:e2e, X:oracle − X:vanilla per head, X:fbta − X:e2e; an arm with
    overrides − its plain arch:method and, for a non-vanilla method, − X:vanilla too (an ablation such as
    ``abmil:fbta:fbta.trainable_extractor=false`` is read both against FBTA and against the baseline)."""
    specs = {a.spec for a in arms}
    out: list[tuple[str, str]] = []
    for a in arms:
        if a.overrides and a.base in specs:
            out.append((a.spec, a.base))
        if a.method != "vanilla" and f"{a.arch}:vanilla" in specs:
            out.append((a.spec, f"{a.arch}:vanilla"))
    out += [(f"{a.arch}:fbta", a.spec) for a in arms if a.spec == f"{a.arch}:e2e" and f"{a.arch}:fbta" in specs]
    return out


# -- splits -----------------------------------------------------------------------------------


def _by_class(labels: Mapping[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for sid in sorted(labels):
        groups.setdefault(labels[sid], []).append(sid)
    return dict(sorted(groups.items()))


def stratified_folds(labels: Mapping[str, str], k: int, seed: int) -> dict[str, int]:
    """slide → fold 0..k-1: per class a seeded shuffle dealt round-robin, continuing across classes (even sizes)."""
    if k < 3:
        raise ValueError(f"--folds must be ≥ 3 (test, val, train), got {k}")
    rng = np.random.default_rng(seed)
    fold: dict[str, int] = {}
    offset = 0
    for ids in _by_class(labels).values():
        for i, j in enumerate(rng.permutation(len(ids))):
            fold[ids[j]] = (offset + i) % k
        offset += len(ids)
    return fold


def kfold_splits(labels: Mapping[str, str], k: int = 5, seed: int = 0, val: str = "fold",
                 val_fraction: float = 0.2) -> dict[str, dict[str, str]]:
    """``fold<i>`` → slide → train|val|test: test = fold i; val = fold i+1 (``val='fold'``, the project's
    ``train.fold`` convention) or a stratified ``val_fraction`` of the other slides (``val='slice'``)."""
    if val not in ("fold", "slice"):
        raise ValueError(f"val must be 'fold' or 'slice', got {val!r}")
    fold = stratified_folds(labels, k, seed)
    splits: dict[str, dict[str, str]] = {}
    for i in range(k):
        if val == "fold":
            part = {s: "test" if f == i else "val" if f == (i + 1) % k else "train" for s, f in fold.items()}
        else:
            part = {s: "test" if f == i else "train" for s, f in fold.items()}
            rng = np.random.default_rng([seed, i])
            rest = {s: labels[s] for s, p in part.items() if p == "train"}
            for ids in _by_class(rest).values():
                n_val = min(max(1, round(len(ids) * val_fraction)), len(ids) - 1)
                for j in rng.permutation(len(ids))[:n_val]:
                    part[ids[j]] = "val"
        splits[f"fold{i}"] = dict(sorted(part.items()))
    check_splits(splits, labels)
    return splits


def fewshot_splits(labels: Mapping[str, str], draws: int = 5, train_per_class: int = 10, val_per_class: int = 5,
                   seed: int = 0) -> dict[str, dict[str, str]]:
    """``draw<d>`` → slide → part: per class ``train_per_class`` train and ``val_per_class`` val slides drawn at
    random (generator seeded by (seed, d)), every other slide test."""
    groups = _by_class(labels)
    short = {c: len(ids) for c, ids in groups.items() if len(ids) <= train_per_class + val_per_class}
    if short:
        raise ValueError(f"few-shot {train_per_class}+{val_per_class} per class leaves no test slide for "
                         + ", ".join(f"{c} ({n} slides)" for c, n in short.items()))
    splits: dict[str, dict[str, str]] = {}
    for d in range(draws):
        rng = np.random.default_rng([seed, d])
        part: dict[str, str] = {}
        for ids in groups.values():
            for rank, j in enumerate(rng.permutation(len(ids))):
                part[ids[j]] = "train" if rank < train_per_class else "val" if rank < train_per_class + val_per_class \
                    else "test"
        splits[f"draw{d}"] = dict(sorted(part.items()))
    check_splits(splits, labels)
    return splits


def check_splits(splits: Mapping[str, Mapping[str, str]], labels: Mapping[str, str]) -> None:
    """Every split trains on every class and has a val part; a test part without some class is only warned about."""
    classes = sorted(set(labels.values()))
    for name, part in splits.items():
        for p in ("train", "val"):
            have = {labels[s] for s, q in part.items() if q == p}
            if p == "train" and have != set(classes):
                raise ValueError(f"split {name}: no training slide of class(es) {sorted(set(classes) - have)}; "
                                 "too few slides per class for this protocol")
            if not have:
                raise ValueError(f"split {name}: empty val part (early stopping needs one)")
        test = {labels[s] for s, q in part.items() if q == "test"}
        if test != set(classes):
            print(f"warning: split {name}: test part lacks class(es) {sorted(set(classes) - test)} "
                  "(its AUC is undefined)", file=sys.stderr)


def split_labels_csv(part: Mapping[str, str], rows: Mapping[str, Mapping[str, str]]) -> str:
    """A labels.csv for one split: slide_id,label,split (+ the source's mpp/path columns)."""
    extra = [c for c in ("mpp", "path") if any((r.get(c) or "").strip() for r in rows.values())]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide_id", "label", "split", *extra])
    for sid in sorted(part):
        w.writerow([sid, rows[sid]["label"], part[sid], *[(rows[sid].get(c) or "").strip() for c in extra]])
    return buf.getvalue()


# -- budget -----------------------------------------------------------------------------------


def budget_of(params: Path, overrides: Sequence[str], method: str) -> dict[str, Any]:
    """What the arm will train with, resolved like the CLI does (a bad override fails here, before any unit)."""
    from omegaconf import OmegaConf

    from fbta.config import load_config

    cfg = load_config(params, overrides)
    sel = lambda key: OmegaConf.select(cfg, key, default=None)  # noqa: E731
    if method in ("fbta", "e2e"):  # the oracle's head trains as vanilla's does
        epochs = sel("fbta.epochs") if sel("fbta.epochs") is not None else sel("train.epochs")
        ema = {"alpha": sel("fbta.ema_alpha"), "every": sel("fbta.ema_every"), "warmup": sel("fbta.ema_warmup")}
    else:
        epochs = sel("train.epochs")
        ema = {"alpha": sel("train.ema_alpha"), "every": sel("train.ema_every") or "step",
               "warmup": sel("train.ema_warmup")} if sel("train.ema") else None
    # keys another version of fbta/config.py may lack read as None
    return {"epochs": epochs, "min_epochs": sel("train.min_epochs"), "patience": sel("train.patience"),
            "lr": sel("train.lr"), "balanced": sel("train.balanced"), "ema": ema, "device": sel("train.device")}


BUDGET_KEYS = {"epochs": ("train.epochs", "fbta.epochs"), "min_epochs": ("train.min_epochs",),
               "patience": ("train.patience",), "ema": ("train.ema", "fbta.ema_"), "lr": ("train.lr",)}


def budget_warnings(budget: Mapping[str, Mapping[str, Any]],
                    own: Optional[Mapping[str, Sequence[str]]] = None) -> list[str]:
    """Budget entries that differ between arms; an arm whose own overrides set that entry is not compared on it."""
    out = []
    for key, cfg_keys in BUDGET_KEYS.items():
        arms = {a: b for a, b in budget.items()
                if not any(kv.split("=", 1)[0].strip().startswith(cfg_keys) for kv in (own or {}).get(a, ()))}
        values = {json.dumps(b[key], sort_keys=True) for b in arms.values()}
        if len(values) > 1:
            per = ", ".join(f"{a}: {json.dumps(b[key])}" for a, b in arms.items())
            out.append(f"arms differ in {key} ({per})")
    return out


def mirror_epochs(common: list[str]) -> list[str]:
    keys = {kv.split("=", 1)[0].strip(): kv.split("=", 1)[1] for kv in common}
    if "train.epochs" in keys and "fbta.epochs" not in keys:
        print(f"budget: train.epochs={keys['train.epochs']} → also fbta.epochs={keys['train.epochs']}")
        return [*common, f"fbta.epochs={keys['train.epochs']}"]
    return common
