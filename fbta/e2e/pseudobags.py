"""Per-slide, per-epoch pseudo-bags for FBTA (METHODS.md A.1–3), read ahead in worker processes.

Why workers: every step needs C·M patches decoded from the slide file. A
``DataLoader`` over an *epoch plan* of (slide, seed) pairs lets worker
processes draw the subset and decode its JPEG tiles while the main process
runs the previous step, so patch reading does not stall training. Each worker
opens a slide once and keeps the handle.

Why explicit seeds: the subset of epoch e for slide i is drawn from
``default_rng([seed, e, i])``, so a run repeats exactly whatever the number of
workers or the order they finish in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from fbta.choices import Sampling
from fbta.config import InputError
from fbta.features.extract import SlidePatches
from fbta.features.kmeans import random_pseudo_bag, stratified_pseudo_bag
from fbta.e2e.diagnostics import slide_on_tumour
from fbta.io.h5 import _py, patch_attrs, read_coords, read_features, require_coords  # noqa: F401 (patch_attrs re-exported)
from fbta.mil.data import BagItem

SAMPLING = Sampling.values()  # the schema's choices (fbta/choices.py), as plain strings


class ClusterError(InputError):
    """A slide's cached clusters are missing or do not belong to its features (run ``fbta cluster``; exit 2)."""


@dataclass(frozen=True)
class SlideSource:
    """What drawing a pseudo-bag of one slide needs: its features, its clusters and the slide file."""

    item: BagItem
    slide_path: Path
    clusters_path: Path
    csv_mpp: Optional[float] = None
    mask_path: Optional[Path] = None  # data.masks/<slide_id>.png if there is one (tumour_share diagnostic)


class PseudoBag(NamedTuple):
    """One step's input: the whole frozen bag, the drawn subset's indices and its patch pixels."""

    index: int  # position of the slide in the dataset
    label: Tensor  # 0-d long
    features: Tensor  # N×D float32, F_FB (all patches, cached)
    idx: Tensor  # |idx| int64 indices into features/coords, ascending
    pixels: Tensor  # |idx|×H×W×3 uint8, X_SB, same order as idx
    read_seconds: float  # worker time to draw the subset and decode its patches
    n_tumour: float = float("nan")  # drawn patches whose centre is on annotated tumour (NaN: slide has no mask)


def read_cluster_labels(path: Path, n_patches: int, n_clusters: int) -> np.ndarray:
    """Per-patch cluster labels, checked against the features they should belong to."""
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("fbta_complete", False) or "labels" not in f:
                raise ClusterError(f"{path}: incomplete clusters file; re-run `fbta cluster`")
            asked = _py(f.attrs.get("n_clusters_requested"))
            labels = np.asarray(f["labels"][:], dtype=np.int64)
    except FileNotFoundError:
        raise ClusterError(f"{path}: no clusters for this slide; run `fbta cluster` first") from None
    except OSError as exc:
        raise ClusterError(f"{path}: unreadable clusters file ({exc}); re-run `fbta cluster`") from None
    if asked is not None and int(asked) != n_clusters:
        raise ClusterError(f"{path}: clustered with C={asked} but cluster.n_clusters={n_clusters}; "
                           "re-run `fbta cluster` with the same parameters")
    if labels.shape[0] != n_patches:
        raise ClusterError(f"{path}: {labels.shape[0]} cluster labels for {n_patches} patches "
                           "(features changed since clustering); re-run `fbta cluster`")
    return labels


def draw_subset(labels: np.ndarray, m: int, sampling: str, rng: np.random.Generator,
                max_bag: int = 0) -> np.ndarray:
    """M per cluster (stratified), the same number of patches uniformly (the ablation), or every patch (``all``:
    the end-to-end bound's whole bag; a uniform subset of ``max_bag`` when the slide has more, 0: no cap)."""
    if sampling == "all":
        n = labels.size
        return random_pseudo_bag(n, n if max_bag <= 0 else min(n, max_bag), rng)
    if sampling == "kmeans":
        return stratified_pseudo_bag(labels, m, rng)
    if sampling == "random":
        size = int(np.minimum(np.bincount(labels), m).sum())  # exactly what stratified sampling would draw
        return random_pseudo_bag(labels.size, size, rng)
    raise ValueError(f"fbta.sampling='{sampling}' must be one of {', '.join(SAMPLING)}")


class PseudoBags(Dataset):
    """``dataset[(i, seed)] -> PseudoBag`` for slide ``i``, its subset drawn with ``seed``."""

    def __init__(self, sources: Sequence[SlideSource], m: int, sampling: str, n_clusters: int,
                 max_bag: int = 0) -> None:
        if m < 1:
            raise ValueError(f"fbta.m must be ≥ 1, got {m}")
        if sampling not in SAMPLING:
            raise ValueError(f"fbta.sampling='{sampling}' must be one of {', '.join(SAMPLING)}")
        self.sources, self.m, self.sampling, self.n_clusters = list(sources), m, sampling, n_clusters
        self.max_bag = int(max_bag)
        self._readers: dict[int, SlidePatches] = {}  # per worker: slide opened once
        for src in self.sources:  # fail before the first epoch, not in a worker hours later
            if sampling != "all":  # a whole bag needs no clusters
                read_cluster_labels(src.clusters_path, src.item.n, n_clusters)
        # per-patch "centre on tumour" flags of the slides with a mask (diagnostics only), computed once
        self.on_tumour: list[Optional[np.ndarray]] = [
            slide_on_tumour(src.mask_path, *read_coords(src.item.path)) if src.mask_path is not None else None
            for src in self.sources]

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.item.label for s in self.sources], dtype=np.int64)

    def __getitem__(self, key: tuple[int, int]) -> PseudoBag:
        i, seed = key
        src = self.sources[i]
        t0 = time.perf_counter()
        feats, coords, attrs = read_features(src.item.path)
        require_coords(src.item.path, attrs, "FBTA (it reads the pseudo-bags' patches from the slide)")
        if not np.isfinite(feats).all():
            raise ValueError(f"{src.item.path}: features contain NaN or inf")
        clusters = (np.zeros(len(feats), np.int64) if self.sampling == "all"
                    else read_cluster_labels(src.clusters_path, len(feats), self.n_clusters))
        idx = draw_subset(clusters, self.m, self.sampling, np.random.default_rng(seed), self.max_bag)
        reader = self._reader(i, coords, attrs)
        pixels = torch.stack([reader[int(j)] for j in idx])
        on = self.on_tumour[i]
        n_tumour = float(on[idx].sum()) if on is not None and len(on) == len(feats) else float("nan")
        return PseudoBag(i, torch.tensor(src.item.label), torch.from_numpy(feats), torch.from_numpy(idx),
                         pixels, time.perf_counter() - t0, n_tumour)

    def _reader(self, i: int, coords: np.ndarray, attrs: dict) -> SlidePatches:
        if i not in self._readers:
            src = self.sources[i]
            self._readers[i] = SlidePatches(src.slide_path, coords, patch_attrs(src.item.path, attrs), src.csv_mpp)
        return self._readers[i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}  # never ship open slide handles to a worker


class EpochPlan(Sampler):
    """Which slides an epoch visits, in what order, each with its own subset seed.

    Class-balanced draws with replacement (as the vanilla trainer) or a shuffle;
    ``per_slide`` pseudo-bags per slide and epoch (more extractor steps without
    more validation passes); call :meth:`set_epoch` before each epoch (the
    loader's workers persist).
    """

    def __init__(self, labels: np.ndarray, seed: int, balanced: bool = True, per_slide: int = 1) -> None:
        self.labels, self.seed, self.balanced, self.epoch = np.asarray(labels), int(seed), balanced, 0
        if per_slide < 1:
            raise ValueError(f"fbta.bags_per_slide must be ≥ 1, got {per_slide}")
        self.per_slide = int(per_slide)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels) * self.per_slide

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.labels)
        if self.balanced:
            counts = np.bincount(self.labels)
            p = 1.0 / counts[self.labels]
            order = rng.choice(n, size=n * self.per_slide, replace=True, p=p / p.sum())
        elif self.per_slide == 1:
            order = rng.permutation(n)
        else:
            order = np.concatenate([rng.permutation(n) for _ in range(self.per_slide)])
        for step, i in enumerate(order):
            yield int(i), int(np.random.SeedSequence([self.seed, self.epoch, step, int(i)]).generate_state(1)[0])
