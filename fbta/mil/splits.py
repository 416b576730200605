"""Which slides train, validate and test a model — decided once, never re-drawn behind the user's back.

Source, in order: labels.csv's ``split`` column (or ``fold`` with
``train.fold``); otherwise a stratified split drawn once with
``train.split_seed`` and saved to ``<data.out>/splits/splits.csv`` (both a
train/val/test ``split`` and a K-``fold`` column), re-used by every later run.
A saved split that no longer matches labels.csv or the split parameters is an
error, not a silent re-draw: a test slide must never drift into training.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from fbta.io.atomic import atomic_write_text
from fbta.slides.cohort import SPLITS, CohortError, SlideEntry

COLUMNS = ("slide_id", "label", "split", "fold")


@dataclass(frozen=True)
class SplitParams:
    fold: Optional[int]
    n_folds: int
    val_fraction: float
    test_fraction: float
    seed: int

    def drawn_with(self) -> dict[str, object]:
        """What a drawn split depends on (``fold`` only picks from it)."""
        return {"n_folds": self.n_folds, "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction, "split_seed": self.seed}


@dataclass(frozen=True)
class Split:
    """slide_id → ``train|val|test`` for the labelled slides, and where that came from."""

    assignment: dict[str, str]
    source: str

    def ids(self, part: str) -> list[str]:
        return sorted(s for s, p in self.assignment.items() if p == part)


def classes_of(entries: Mapping[str, SlideEntry]) -> list[str]:
    """Class names in sorted order: class index i is ``classes[i]``."""
    return sorted({e.label for e in entries.values() if e.label})


def resolve_split(entries: Mapping[str, SlideEntry], labels_csv: str | Path, out: str | Path,
                  params: SplitParams) -> Split:
    """The split of every labelled slide (see module doc); raise CohortError when it cannot be trusted."""
    labelled = {sid: e for sid, e in sorted(entries.items()) if e.label}
    if not labelled:
        raise CohortError(f"{labels_csv}: no slide has a label")
    if params.fold is None:
        given = {sid: e.split for sid, e in labelled.items() if e.split}
        if given:
            _require_complete(given, labelled, "split", labels_csv)
            return Split(dict(given), f"{labels_csv} (column split)")
        saved = load_or_draw(labelled, Path(out, "splits", "splits.csv"), params)
        return Split({sid: row["split"] for sid, row in saved.items()}, str(Path(out, "splits", "splits.csv")))
    folds = {sid: e.fold for sid, e in labelled.items() if e.fold is not None}
    if folds:
        _require_complete(folds, labelled, "fold", labels_csv)
        source = f"{labels_csv} (column fold)"
    else:
        saved = load_or_draw(labelled, Path(out, "splits", "splits.csv"), params)
        folds = {sid: int(row["fold"]) for sid, row in saved.items()}
        source = str(Path(out, "splits", "splits.csv"))
    return Split(fold_assignment(folds, params.fold), f"{source}, fold {params.fold}")


def fold_assignment(folds: Mapping[str, int], k: int) -> dict[str, str]:
    """K-fold cross-validation: fold k tests, the next fold (cyclically) validates, the rest train."""
    ids = sorted(set(folds.values()))
    if len(ids) < 3:
        raise CohortError(f"k-fold needs at least 3 folds (test, val, train); found {len(ids)}: {ids}")
    if k not in ids:
        raise CohortError(f"train.fold={k} is not one of the folds {ids}")
    val = ids[(ids.index(k) + 1) % len(ids)]
    return {sid: "test" if f == k else "val" if f == val else "train" for sid, f in folds.items()}


def _require_complete(given: Mapping[str, object], labelled: Mapping[str, SlideEntry], column: str,
                      labels_csv: str | Path) -> None:
    missing = sorted(set(labelled) - set(given))
    if missing:
        raise CohortError(f"{labels_csv}: column '{column}' is empty for {len(missing)} labelled slide(s) "
                          f"(e.g. {', '.join(missing[:3])}); fill it for every labelled slide, or leave it "
                          f"empty everywhere to have a split drawn")


def load_or_draw(labelled: Mapping[str, SlideEntry], path: Path, params: SplitParams) -> dict[str, dict[str, str]]:
    """The saved split at ``path`` after checking it still fits, or a new one drawn and saved there."""
    meta_path = path.with_suffix(".json")
    if path.exists():
        rows = _read(path)
        _check_saved(rows, labelled, path, params, meta_path)
        print(f"split: re-using {path}", flush=True)
        return rows
    rows = draw(labelled, params)
    atomic_write_text(meta_path, json.dumps({**params.drawn_with(), "n_slides": len(rows)}, indent=2))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[sid] for sid in sorted(rows))
    atomic_write_text(path, buf.getvalue())
    print(f"split: drew a stratified split of {len(rows)} slides (split_seed {params.seed}) → {path}", flush=True)
    return rows


def draw(labelled: Mapping[str, SlideEntry], params: SplitParams) -> dict[str, dict[str, str]]:
    """Stratified train/val/test split and K folds, per class, from one seeded generator."""
    if params.n_folds < 3:
        raise CohortError(f"train.n_folds must be ≥ 3 (test, val, train), got {params.n_folds}")
    if params.val_fraction < 0 or params.test_fraction < 0 or params.val_fraction + params.test_fraction >= 1:
        raise CohortError(f"train.val_fraction and train.test_fraction must be ≥ 0 and sum to < 1, got "
                          f"{params.val_fraction} and {params.test_fraction}")
    rng = np.random.default_rng(params.seed)
    rows: dict[str, dict[str, str]] = {}
    fold_offset = 0
    for label in classes_of(labelled):
        ids = sorted(sid for sid, e in labelled.items() if e.label == label)
        n = len(ids)
        n_test, n_val = _part_sizes(n, params.val_fraction, params.test_fraction)
        order = [ids[i] for i in rng.permutation(n)]
        for i, sid in enumerate(order):
            part = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            rows[sid] = {"slide_id": sid, "label": label, "split": part, "fold": ""}
        for i, sid in enumerate(ids[j] for j in rng.permutation(n)):  # folds: round-robin over a fresh shuffle
            rows[sid]["fold"] = str((fold_offset + i) % params.n_folds)
        fold_offset += n
    return rows


def _part_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_test, n_val) for one class of n slides: rounded shares, ≥ 1 each when n ≥ 3, ≥ 1 left to train."""
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
    while n_test + n_val > n - 1 and n_test + n_val > 0:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


def _read(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise CohortError(f"{path}: expected columns {','.join(COLUMNS)}, found {reader.fieldnames}")
        rows = {r["slide_id"]: r for r in reader}
    bad = sorted(s for s, r in rows.items() if r["split"] not in SPLITS)
    if bad:
        raise CohortError(f"{path}: split must be one of {', '.join(SPLITS)} (slide {bad[0]})")
    return rows


def _check_saved(rows: Mapping[str, Mapping[str, str]], labelled: Mapping[str, SlideEntry], path: Path,
                 params: SplitParams, meta_path: Path) -> None:
    fix = f"delete {path} (and {meta_path.name}) to draw a new split, or restore what it was drawn from"
    added, removed = sorted(set(labelled) - set(rows)), sorted(set(rows) - set(labelled))
    changed = sorted(s for s in set(rows) & set(labelled) if rows[s]["label"] != labelled[s].label)
    if added or removed or changed:
        what = [f"{len(v)} slide(s) {k} (e.g. {', '.join(v[:3])})"
                for k, v in (("added", added), ("removed", removed), ("relabelled", changed)) if v]
        raise CohortError(f"{path} was drawn for another labels.csv: {'; '.join(what)}; {fix}")
    try:
        drawn = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return  # a hand-made splits.csv: its rows are the truth
    differ = {k: (drawn.get(k), v) for k, v in params.drawn_with().items() if drawn.get(k) != v}
    if differ:
        desc = ", ".join(f"{k}={a} (params now {b})" for k, (a, b) in differ.items())
        raise CohortError(f"{path} was drawn with {desc}; {fix}")
