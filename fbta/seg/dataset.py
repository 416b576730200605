"""The segmentation patch set: tiled patches with weak (image-level) labels and evaluation-only pixel masks.

Why a cache: training epochs would otherwise re-read and re-decode every JPEG
tile; the selected patches of each split are read once from the slides and kept
as uint8 in ``<data.out>/seg/patches/<split>.h5`` (written atomically, with a
fingerprint of everything that decides its content, so a re-run with the same
inputs skips it). The pixel mask stored beside each patch is used for metrics
only — the training code never reads it.

Weak labels, as patch datasets define them (METHODS.md B, "how positive is
thresholded is the dataset's" — [choice], configurable):

- **positive**: annotated tumour share ≥ ``seg.min_tumour_fraction``
  (default 0.5: the broadcast all-ones target the teacher learns from is then
  right on at least half of every positive patch's pixels; the same "at least
  half inside" rule as the heatmap localisation figures). 0 restores the old
  "any tumour pixel" rule, under which an all-tumour map beat the models;
- **negative**: no tumour at all — normal slides, and tumour-free regions of
  tumour slides; with ``seg.negative_margin`` > 0 also none within that many
  patch sides around the patch (annotation outlines are drawn loosely);
- **ambiguous**: everything in between. Never trained on (a teacher's
  broadcast all-ones target would be wrong on most of their pixels; as extra
  distillation data, against the teacher's map, they made students worse:
  README § Segmentation); up to ``seg.max_ambiguous`` of them per
  validation/test split are cached and scored as their own group
  (``ambiguous_f1``), outside the selection score.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from fbta.io.atomic import atomic_path
from fbta.io.h5 import coords_complete, read_coords
from fbta.io.masks import MASK_SUFFIXES, MaskError, find_mask, read_mask  # noqa: F401 (re-exported)
from fbta.seg.metrics import AMBIGUOUS, NEG, POS
from fbta.slides.cohort import CohortError, SlideEntry, read_labels

SPLITS = ("train", "val", "test")
CACHE_VERSION = 2  # 2: weak-label groups (positive / negative / ambiguous)


def patch_masks(mask: np.ndarray, coords: np.ndarray, size0: float, dims0: tuple[int, int], out: int) -> np.ndarray:
    """N×out×out bool: each patch's region of ``mask`` (any downsample of level 0), nearest-neighbour sampled."""
    w0, h0 = dims0
    sx, sy = w0 / mask.shape[1], h0 / mask.shape[0]
    if abs(sx / sy - 1) > 0.05:
        raise MaskError(f"mask shape {mask.shape} does not have the slide's aspect ratio ({w0}×{h0})")
    offs = (np.arange(out) + 0.5) * (size0 / out)  # level-0 offsets of the output pixel centres
    res = np.empty((len(coords), out, out), bool)
    for i, (x, y) in enumerate(np.asarray(coords, np.int64)):
        cols = np.clip(((x + offs) / sx).astype(np.int64), 0, mask.shape[1] - 1)
        rows = np.clip(((y + offs) / sy).astype(np.int64), 0, mask.shape[0] - 1)
        res[i] = mask[np.ix_(rows, cols)]
    return res


@dataclass(frozen=True)
class WeakLabelOptions:
    """How patches get weak labels and which are cached (``seg.*``, turned into this at the stage door)."""

    min_tumour_fraction: float = 0.5  # positive: tumour share ≥ this
    negative_margin: float = 0.0  # negatives also tumour-free this many patch sides around
    normal_labels: tuple[str, ...] = ("normal",)  # slide labels that need no mask (all negative)
    neg_per_pos: float = 1.0
    max_train: int = 0  # caps on positives + negatives per split (0: none)
    max_val: int = 0
    max_test: int = 0
    max_ambiguous: int = 32  # ambiguous patches scored per val/test split (never trained on)
    data_seed: int = 0

    def cap(self, part: str) -> int:
        return {"train": self.max_train, "val": self.max_val, "test": self.max_test}[part]


@dataclass(frozen=True)
class CohortPaths:
    """Where the cohort's labels, slides, coords (``out``/coords) and masks are."""

    labels: Path
    slides: Path
    out: Path
    masks: Optional[Path]


@dataclass
class SlidePatchIndex:
    """One slide's tiled patches with their tumour share (what selection needs)."""

    entry: SlideEntry
    split: str
    coords: np.ndarray  # N×2 level-0
    attrs: dict[str, Any]
    fraction: np.ndarray  # N, tumour share of each patch
    mask: Optional[np.ndarray]  # slide mask (None: a normal slide without one → all negative)
    group: np.ndarray  # N, NEG / POS / AMBIGUOUS (fbta.seg.metrics)


def weak_groups(fraction: np.ndarray, min_fraction: float, near: Optional[np.ndarray] = None) -> np.ndarray:
    """Each patch's weak-label group from its tumour share (and the share in its margin window, if any).

    Positive: share ≥ ``min_fraction`` and > 0; negative: share 0 (and none in the
    margin window); ambiguous: the rest.
    """
    f = np.asarray(fraction, np.float64)
    g = np.full(len(f), AMBIGUOUS, np.uint8)
    g[(f >= min_fraction) & (f > 0)] = POS
    clean = f <= 0
    if near is not None:
        clean &= np.asarray(near) <= 0
    g[clean] = NEG
    return g


def label_stats(index: list["SlidePatchIndex"]) -> dict[str, dict[str, float]]:
    """Per split, over every tiled patch: positive / negative / ambiguous counts, median tumour share of positives."""
    out: dict[str, dict[str, float]] = {}
    for part in SPLITS:
        sls = [sl for sl in index if sl.split == part]
        g = np.concatenate([sl.group for sl in sls]) if sls else np.zeros(0, np.uint8)
        f = np.concatenate([sl.fraction for sl in sls]) if sls else np.zeros(0)
        pos = f[g == POS]
        out[part] = {"slides": len(sls), "positive": int((g == POS).sum()), "negative": int((g == NEG).sum()),
                     "ambiguous": int((g == AMBIGUOUS).sum()),
                     "median_share_positive": round(float(np.median(pos)), 4) if len(pos) else float("nan")}
    return out


def index_cohort(paths: CohortPaths, split: dict[str, str], weak: WeakLabelOptions
                 ) -> tuple[list[SlidePatchIndex], dict[str, str]]:
    """Every labelled slide with coords and a usable mask; the reason for every slide left out."""
    entries = read_labels(paths.labels, paths.slides)
    normal = set(weak.normal_labels)
    out: list[SlidePatchIndex] = []
    missing: dict[str, str] = {}
    for sid, entry in sorted(entries.items()):
        part = split.get(sid)
        if part is None:
            continue
        coords_path = Path(paths.out, "coords", f"{sid}.h5")
        if not coords_complete(coords_path):
            missing[sid] = f"{coords_path}: no complete coords file (run `fbta tile`)"
            continue
        coords, attrs = read_coords(coords_path)
        mask_path = find_mask(paths.masks, sid)
        if mask_path is None and entry.label not in normal:
            missing[sid] = (f"no annotation mask {sid}.png/.tif/.geojson in data.masks={paths.masks} and label "
                            f"'{entry.label}' is not in seg.normal_labels: patch labels unknown")
            continue
        mask = read_mask(mask_path, _level0_dims(attrs)) if mask_path is not None else None
        size0 = float(attrs.get("patch_size_level0", attrs["patch_size"]))
        out_px = int(attrs["patch_size"])
        near = None
        if mask is None:
            fraction = np.zeros(len(coords))
        else:
            dims0 = _level0_dims(attrs)
            try:
                fraction = np.concatenate([patch_masks(mask, coords[i:i + 256], size0, dims0, out_px).mean(axis=(1, 2))
                                           for i in range(0, len(coords), 256)] or [np.zeros(0)])
                margin = float(weak.negative_margin) * size0
                if margin > 0:  # tumour share of the window grown by the margin on every side
                    near = np.concatenate([patch_masks(mask, coords[i:i + 256] - margin, size0 + 2 * margin, dims0,
                                                       64).mean(axis=(1, 2))
                                           for i in range(0, len(coords), 256)] or [np.zeros(0)])
            except MaskError as exc:
                raise MaskError(f"{mask_path}: {exc}") from None
        group = weak_groups(fraction, float(weak.min_tumour_fraction), near)
        out.append(SlidePatchIndex(entry, part, coords, attrs, fraction, mask, group))
    return out, missing


def _level0_dims(attrs: dict[str, Any]) -> tuple[int, int]:
    """Level-0 width, height from the coords attributes (CLAM's level_dim × downsample)."""
    w, h = attrs["level_dim"]
    ds = attrs.get("downsample", [1.0, 1.0])
    return int(round(w * ds[0])), int(round(h * ds[1]))


def select(index: list[SlidePatchIndex], part: str, weak: WeakLabelOptions, seed_offset: int
           ) -> list[tuple[int, int]]:
    """(slide number, patch number) of the patches kept for ``part``: balanced, capped, seeded.

    Negatives are drawn uniformly from every tumour-free patch of the split —
    normal slides and the tumour-free regions of tumour slides alike. Ambiguous
    patches are never kept for training; validation and test keep up to
    ``seg.max_ambiguous`` of them (scored as their own group).
    """
    s = weak
    pos, neg, amb = [], [], []
    for si, sl in enumerate(index):
        if sl.split != part:
            continue
        for pi, g in enumerate(sl.group):
            (pos if g == POS else neg if g == NEG else amb).append((si, pi))
    rng = np.random.default_rng([int(s.data_seed), seed_offset])
    n_pos, n_neg = len(pos), len(neg)
    if s.neg_per_pos > 0 and n_pos:
        n_neg = min(n_neg, int(round(s.neg_per_pos * n_pos)))
    cap = s.cap(part)
    if cap and n_pos + n_neg > cap:
        k_pos = int(round(cap * n_pos / (n_pos + n_neg)))
        n_pos, n_neg = k_pos, cap - k_pos
    keep = [pos[i] for i in rng.choice(len(pos), n_pos, replace=False)] if n_pos else []
    keep += [neg[i] for i in rng.choice(len(neg), n_neg, replace=False)] if n_neg else []
    n_amb = 0 if part == "train" else min(len(amb), int(s.max_ambiguous))
    keep += [amb[i] for i in rng.choice(len(amb), n_amb, replace=False)] if n_amb else []
    return sorted(keep)


def fingerprint(index: list[SlidePatchIndex], weak: WeakLabelOptions) -> str:
    """Changes when the split, coords, masks or selection parameters change."""
    s = weak
    h = hashlib.sha1(json.dumps({
        "v": CACHE_VERSION, "min": s.min_tumour_fraction, "normal": list(s.normal_labels),
        "margin": s.negative_margin, "ambiguous": s.max_ambiguous, "neg_per_pos": s.neg_per_pos,
        "caps": [s.max_train, s.max_val, s.max_test], "seed": s.data_seed,
    }, sort_keys=True).encode())
    for sl in index:
        h.update(f"{sl.entry.slide_id}:{sl.split}:{sl.entry.path.name}:{sl.attrs.get('fbta_params')}".encode())
        h.update(np.ascontiguousarray(sl.coords).tobytes())
        h.update(b"-" if sl.mask is None else np.packbits(sl.mask).tobytes())
    return h.hexdigest()[:16]


def cache_path(out: str | Path, part: str) -> Path:
    return Path(out, "seg", "patches", f"{part}.h5")


def cache_complete(path: Path, fp: str) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("fbta_complete", False)) and f.attrs.get("fingerprint") == fp
    except OSError:
        return False


def write_cache(path: Path, index: list[SlidePatchIndex], keep: list[tuple[int, int]], fp: str,
                on_patch: Any = None) -> int:
    """Read the kept patches from their slides and write images, weak labels, groups and masks atomically."""
    from fbta.features.extract import SlidePatches

    if not keep:
        raise CohortError(f"{path}: no patch selected for this split (no labelled slide with coords in it?)")
    sizes = {int(index[si].attrs["patch_size"]) for si, _ in keep}
    if len(sizes) != 1:
        raise CohortError(f"{path}: slides tiled at different patch sizes {sorted(sizes)}; re-tile with one")
    px = sizes.pop()
    n = len(keep)
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        images = f.create_dataset("images", (n, px, px, 3), np.uint8, chunks=(1, px, px, 3), compression="lzf")
        masks = f.create_dataset("masks", (n, px, px), np.uint8, chunks=(1, px, px), compression="lzf")
        labels, fractions, groups = np.zeros(n, np.uint8), np.zeros(n, np.float32), np.zeros(n, np.uint8)
        sids, coords = [], np.zeros((n, 2), np.int64)
        row = 0
        for si in sorted({si for si, _ in keep}):
            sl = index[si]
            idx = [pi for s2, pi in keep if s2 == si]
            reader = SlidePatches(sl.entry.path, sl.coords[idx], sl.attrs, sl.entry.mpp)
            size0 = float(sl.attrs.get("patch_size_level0", px))
            pm = (patch_masks(sl.mask, sl.coords[idx], size0, _level0_dims(sl.attrs), px) if sl.mask is not None
                  else np.zeros((len(idx), px, px), bool))
            for j, pi in enumerate(idx):
                images[row] = reader[j].numpy()
                masks[row] = pm[j]
                groups[row] = sl.group[pi]
                labels[row] = sl.group[pi] == POS
                fractions[row] = sl.fraction[pi]
                sids.append(sl.entry.slide_id)
                coords[row] = sl.coords[pi]
                row += 1
                if on_patch is not None:
                    on_patch(1)
        f.create_dataset("labels", data=labels)
        f.create_dataset("group", data=groups)
        f.create_dataset("fraction", data=fractions)
        f.create_dataset("slide_id", data=np.array(sids, dtype=h5py.string_dtype()))
        f.create_dataset("coords", data=coords)
        f.attrs["fingerprint"] = fp
        f.attrs["patch_size"] = px
        f.attrs["fbta_complete"] = True  # last: a file without it is incomplete
    return n


class PatchSet:
    """One cached split in memory: uint8 patches, weak labels, and pixel masks (for metrics only)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                if not f.attrs.get("fbta_complete", False):
                    raise CohortError(f"{self.path}: incomplete patch cache; re-run `fbta seg-teacher`")
                self.images: np.ndarray = f["images"][:]
                self.labels: np.ndarray = f["labels"][:].astype(np.float32)
                self.masks: np.ndarray = f["masks"][:].astype(bool)
                self.fraction: np.ndarray = f["fraction"][:]
                self.group: np.ndarray = f["group"][:].astype(np.uint8)
                self.slide_ids: list[str] = [s.decode() if isinstance(s, bytes) else s for s in f["slide_id"][:]]
                self.coords: np.ndarray = f["coords"][:]
                self.fingerprint = str(f.attrs["fingerprint"])
        except (OSError, KeyError) as exc:
            raise CohortError(f"{self.path}: not a segmentation patch cache ({exc}); run `fbta seg-teacher`") from None

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        return {"patches": len(self), "positive": int((self.group == POS).sum()),
                "negative": int((self.group == NEG).sum()), "ambiguous": int((self.group == AMBIGUOUS).sum()),
                "slides": len(set(self.slide_ids))}

    def trainable(self) -> np.ndarray:
        """Indices of the patches training may use: positives and negatives, never the ambiguous ones."""
        return np.flatnonzero(self.group != AMBIGUOUS)

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                    slide_ids: Optional[list[str]] = None, group: Optional[np.ndarray] = None) -> "PatchSet":
        """An in-memory set (notebooks, tests): uint8 N×H×W×3 images, N labels, N×H×W masks, optional groups
        (NEG/POS/AMBIGUOUS; default: the labels)."""
        ps = cls.__new__(cls)
        ps.path = Path("<memory>")
        ps.images, ps.labels = np.asarray(images, np.uint8), np.asarray(labels, np.float32)
        ps.masks = np.asarray(masks, bool)
        ps.group = (np.asarray(group, np.uint8) if group is not None
                    else np.where(ps.labels > 0.5, POS, NEG).astype(np.uint8))
        ps.fraction = ps.masks.mean(axis=(1, 2)).astype(np.float32)
        ps.slide_ids = list(slide_ids or ["memory"] * len(ps.labels))
        ps.coords = np.zeros((len(ps.labels), 2), np.int64)
        ps.fingerprint = ""
        return ps
