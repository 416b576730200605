"""Bags of frozen features for slide-level MIL: one item = one slide's N×D features and its class.

Why one slide per item: bags differ in size (tens to tens of thousands of
patches), so the batch is the slide (METHODS.md A). Bags are read from the
CLAM/TRIDENT HDF5 files on demand (DataLoader workers) or held in memory when
the cohort is small (``train.preload``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from fbta.config import InputError
from fbta.io.h5 import feature_files, read_features
from fbta.mil.splits import Split
from fbta.slides.cohort import CohortError, SlideEntry


FINITE_CHUNK = 65536  # rows read at once by the NaN/inf check


class FeaturesError(InputError):
    """A feature file that must not be trained or scored on (NaN/inf); the message names the file."""


def check_bag(path: Path, feats: np.ndarray, in_dim: Optional[int] = None) -> None:
    """Refuse, naming the file, a bag no model should see: wrong feature size, no patches, NaN/inf.

    Why one place: training, heatmaps and batch inference must say the same
    thing about the same bad file.
    """
    if in_dim is not None and feats.shape[1] != in_dim:
        raise FeaturesError(f"{path}: {feats.shape[1]}-d features, the model expects {in_dim}-d")
    if len(feats) == 0:
        raise FeaturesError(f"{path}: no patches")
    if not np.isfinite(feats).all():
        raise FeaturesError(f"{path}: features contain NaN or inf; re-extract this slide")


@dataclass(frozen=True)
class BagItem:
    slide_id: str
    path: Path
    label: int  # class index into the sorted class names
    n: int  # instances in the bag


@dataclass
class Cohort:
    """The labelled slides with features, per split, and what was left out and why."""

    classes: list[str]
    in_dim: int
    parts: dict[str, list[BagItem]]  # train | val | test → items
    missing: dict[str, str] = field(default_factory=dict)  # slide_id → reason (no usable features)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split, slides per class name (what a pathologist checks first)."""
        return {p: {c: sum(it.label == i for it in items) for i, c in enumerate(self.classes)}
                for p, items in self.parts.items()}


def feature_stats(items: Sequence[BagItem]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation over every instance of ``items`` (streamed, float64).

    The standard deviation is floored at its median over features: CNN features
    have dead (ReLU) units that hardly vary in the frozen features, and dividing
    by their near-zero spread would blow up the same units when FBTA's trainable
    extractor moves them (L_cls of the end-to-end view in the hundreds).
    """
    total, sq, n = 0.0, 0.0, 0
    for it in items:
        feats = BagDataset._read(it)
        f = feats.numpy().astype(np.float64)
        total, sq, n = total + f.sum(0), sq + (f * f).sum(0), n + len(f)
    if n == 0:
        raise ValueError("no instances to compute feature statistics from")
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, max(float(np.median(std)), 1e-6)).astype(np.float32)


def bag_shape(path: Path, check_finite: bool = False) -> tuple[int, int]:
    """(N, D) of a feature file; with ``check_finite``, also refuse NaN/inf (read in row chunks).

    Why check up front: one NaN feature turns every loss and gradient it touches
    into NaN, so a bag with one must be left out before training starts.
    """
    if Path(path).suffix == ".pt":  # CLAM's pt_files: one tensor, read whole
        feats = read_features(path)[0]
        if check_finite and not np.isfinite(feats).all():
            raise FeaturesError(f"{path}: features contain NaN or inf; re-extract this slide")
        return int(feats.shape[0]), int(feats.shape[1])
    with h5py.File(path, "r") as f:
        if "features" not in f:
            raise KeyError("no 'features' dataset")
        ds = f["features"]
        shape = ds.shape
        if "coords" in f and len(shape) >= 1 and f["coords"].shape[:1] != shape[:1]:
            raise FeaturesError(f"{path}: {shape[0]} feature rows but {f['coords'].shape[0]} coords (a damaged "
                                "copy, or a file from another tool); re-extract this slide")
        if check_finite and len(shape) in (2, 3):
            for start in range(0, shape[0], FINITE_CHUNK):
                bad = ~np.isfinite(np.asarray(ds[start:start + FINITE_CHUNK], dtype=np.float32))
                if bad.any():
                    first = start + int(np.flatnonzero(bad.reshape(len(bad), -1).any(1))[0])
                    raise FeaturesError(f"{path}: features contain NaN or inf (first in row {first}); "
                                        "re-extract this slide")
    if len(shape) == 3 and shape[1] == 1:
        return int(shape[0]), int(shape[2])
    if len(shape) != 2:
        raise ValueError(f"features have shape {shape}, expected N×D")
    return int(shape[0]), int(shape[1])


def build_cohort(entries: Mapping[str, SlideEntry], split: Split, classes: Sequence[str],
                 features_folder: Path) -> Cohort:
    """Match labelled, split slides to their feature files; record the ones without usable features."""
    files = feature_files(features_folder)
    index = {c: i for i, c in enumerate(classes)}
    parts: dict[str, list[BagItem]] = {"train": [], "val": [], "test": []}
    missing: dict[str, str] = {}
    dims: dict[int, list[str]] = {}
    for sid, part in sorted(split.assignment.items()):
        if sid not in files:
            missing[sid] = f"no feature file in {features_folder}"
            continue
        try:
            n, d = bag_shape(files[sid], check_finite=True)
        except FeaturesError as exc:
            missing[sid] = str(exc)
            continue
        except (OSError, KeyError, ValueError) as exc:
            missing[sid] = f"{files[sid]}: unreadable features ({exc})"
            continue
        if n == 0:
            missing[sid] = f"{files[sid]}: empty bag (no patches)"
            continue
        dims.setdefault(d, []).append(sid)
        parts[part].append(BagItem(sid, files[sid], index[entries[sid].label], n))  # type: ignore[index]
    if len(dims) > 1:  # which size is right is the user's call: name the odd files, train on none
        by_count = sorted(dims.items(), key=lambda kv: -len(kv[1]))
        raise CohortError(f"{features_folder}: feature files disagree on the feature size: " + "; ".join(
            f"{d}-d in {len(ids)} file(s) ({', '.join(ids[:3])}{', …' if len(ids) > 3 else ''})"
            for d, ids in by_count) + "; re-extract the odd ones with one extractor")
    if not dims:
        raise CohortError(f"{features_folder}: none of the {len(split.assignment)} labelled slides has "
                          f"features; run `fbta extract` or set data.features")
    return Cohort(list(classes), next(iter(dims)), parts, missing)


class BagDataset(Dataset):
    """``dataset[i] -> (bag N×D float32, label 0-d long)`` for the slides in ``items``."""

    def __init__(self, items: Sequence[BagItem], preload: bool = False) -> None:
        self.items = list(items)
        self._cache: list[torch.Tensor] | None = [self._read(it) for it in self.items] if preload else None

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def _read(item: BagItem) -> torch.Tensor:
        try:
            feats, _, _ = read_features(item.path)
        except (OSError, KeyError, ValueError) as exc:  # changed since build_cohort checked it: still one line
            raise FeaturesError(f"{item.path}: unreadable features ({exc})") from None
        check_bag(item.path, feats)  # the file may have changed since build_cohort checked it
        return torch.from_numpy(feats)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        bag = self._cache[i] if self._cache is not None else self._read(self.items[i])
        return bag, torch.tensor(self.items[i].label, dtype=torch.long)

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items], dtype=np.int64)
