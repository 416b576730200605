"""The segmentation patch set: tiled patches with weak (image-level) labels and evaluation-only pixel masks.

Why a cache: training epochs would otherwise re-read and re-decode every JPEG
tile; the selected patches of each split are read once from the slides and kept
as uint8 in ``<data.out>/seg/patches/<split>.h5`` (written atomically, with a
fingerprint of everything that decides its content, so a re-run with the same
inputs skips it). Labels come from annotation masks: a patch is positive when
its annotated tumour share exceeds ``seg.min_tumour_fraction`` (default 0: any
tumour pixel). The pixel mask stored beside it is used for metrics only — the
training code never reads it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from fbta.io.atomic import atomic_path
from fbta.io.h5 import coords_complete, read_coords
from fbta.slides.cohort import CohortError, SlideEntry, read_labels

MASK_SUFFIXES = (".png", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
CACHE_VERSION = 1


class MaskError(ValueError):
    """An annotation mask that cannot be used; the message names the file."""


def find_mask(masks_dir: Optional[str | Path], slide_id: str) -> Optional[Path]:
    """``<masks>/<slide_id>.png|.tif|.tiff`` if present (the ⚑ cohort-input mask convention)."""
    if not masks_dir:
        return None
    for suffix in MASK_SUFFIXES:
        p = Path(masks_dir, slide_id + suffix)
        if p.is_file():
            return p
    return None


def read_mask(path: Path) -> np.ndarray:
    """Boolean H×W tumour mask. 0/1 masks: non-zero is tumour; 0–255 masks: > 127 (antialiased edges)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I;16", "I", "F") else im)
    except Exception:  # noqa: BLE001 - PIL cannot read some TIFF flavours; tifffile can
        try:
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        except Exception as exc:  # noqa: BLE001
            raise MaskError(f"{path}: not a readable PNG/TIFF mask ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] in (1, 3, 4) else arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise MaskError(f"{path}: expected a 2-D mask image, got shape {arr.shape}")
    return arr > 127 if arr.max() > 1 else arr > 0


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


@dataclass
class SlidePatchIndex:
    """One slide's tiled patches with their tumour share (what selection needs)."""

    entry: SlideEntry
    split: str
    coords: np.ndarray  # N×2 level-0
    attrs: dict[str, Any]
    fraction: np.ndarray  # N, tumour share of each patch
    mask: Optional[np.ndarray]  # slide mask (None: a normal slide without one → all negative)


def index_cohort(cfg: DictConfig, split: dict[str, str]) -> tuple[list[SlidePatchIndex], dict[str, str]]:
    """Every labelled slide with coords and a usable mask; the reason for every slide left out."""
    entries = read_labels(cfg.data.labels, cfg.data.slides)
    normal = set(cfg.seg.normal_labels)
    out: list[SlidePatchIndex] = []
    missing: dict[str, str] = {}
    for sid, entry in sorted(entries.items()):
        part = split.get(sid)
        if part is None:
            continue
        coords_path = Path(cfg.data.out, "coords", f"{sid}.h5")
        if not coords_complete(coords_path):
            missing[sid] = f"{coords_path}: no complete coords file (run `fbta tile`)"
            continue
        coords, attrs = read_coords(coords_path)
        mask_path = find_mask(cfg.data.masks, sid)
        if mask_path is None and entry.label not in normal:
            missing[sid] = (f"no annotation mask {sid}.png/.tif in data.masks={cfg.data.masks} and label "
                            f"'{entry.label}' is not in seg.normal_labels: patch labels unknown")
            continue
        mask = read_mask(mask_path) if mask_path is not None else None
        size0 = float(attrs.get("patch_size_level0", attrs["patch_size"]))
        out_px = int(attrs["patch_size"])
        if mask is None:
            fraction = np.zeros(len(coords))
        else:
            dims0 = _level0_dims(attrs)
            try:
                fraction = np.concatenate([patch_masks(mask, coords[i:i + 256], size0, dims0, out_px).mean(axis=(1, 2))
                                           for i in range(0, len(coords), 256)] or [np.zeros(0)])
            except MaskError as exc:
                raise MaskError(f"{mask_path}: {exc}") from None
        out.append(SlidePatchIndex(entry, part, coords, attrs, fraction, mask))
    return out, missing


def _level0_dims(attrs: dict[str, Any]) -> tuple[int, int]:
    """Level-0 width, height from the coords attributes (CLAM's level_dim × downsample)."""
    w, h = attrs["level_dim"]
    ds = attrs.get("downsample", [1.0, 1.0])
    return int(round(w * ds[0])), int(round(h * ds[1]))


def select(index: list[SlidePatchIndex], part: str, cfg: DictConfig, seed_offset: int) -> list[tuple[int, int]]:
    """(slide number, patch number) of the patches kept for ``part``: balanced, capped, seeded.

    Negatives are drawn uniformly from every tumour-free patch of the split —
    normal slides and the tumour-free regions of tumour slides alike.
    """
    s = cfg.seg
    pos, neg = [], []
    for si, sl in enumerate(index):
        if sl.split != part:
            continue
        for pi, f in enumerate(sl.fraction):
            (pos if f > s.min_tumour_fraction else neg).append((si, pi))
    rng = np.random.default_rng([int(s.data_seed), seed_offset])
    n_pos, n_neg = len(pos), len(neg)
    if s.neg_per_pos > 0 and n_pos:
        n_neg = min(n_neg, int(round(s.neg_per_pos * n_pos)))
    cap = {"train": s.max_train, "val": s.max_val, "test": s.max_test}[part]
    if cap and n_pos + n_neg > cap:
        k_pos = int(round(cap * n_pos / (n_pos + n_neg)))
        n_pos, n_neg = k_pos, cap - k_pos
    keep = [pos[i] for i in rng.choice(len(pos), n_pos, replace=False)] if n_pos else []
    keep += [neg[i] for i in rng.choice(len(neg), n_neg, replace=False)] if n_neg else []
    return sorted(keep)


def fingerprint(index: list[SlidePatchIndex], cfg: DictConfig) -> str:
    """Changes when the split, coords, masks or selection parameters change."""
    s = cfg.seg
    h = hashlib.sha1(json.dumps({
        "v": CACHE_VERSION, "min": s.min_tumour_fraction, "normal": list(s.normal_labels),
        "neg_per_pos": s.neg_per_pos, "caps": [s.max_train, s.max_val, s.max_test], "seed": s.data_seed,
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
                min_fraction: float, on_patch: Any = None) -> int:
    """Read the kept patches from their slides and write images, labels and masks atomically."""
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
        labels, fractions = np.zeros(n, np.uint8), np.zeros(n, np.float32)
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
                labels[row] = sl.fraction[pi] > min_fraction
                fractions[row] = sl.fraction[pi]
                sids.append(sl.entry.slide_id)
                coords[row] = sl.coords[pi]
                row += 1
                if on_patch is not None:
                    on_patch(1)
        f.create_dataset("labels", data=labels)
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
                self.slide_ids: list[str] = [s.decode() if isinstance(s, bytes) else s for s in f["slide_id"][:]]
                self.coords: np.ndarray = f["coords"][:]
                self.fingerprint = str(f.attrs["fingerprint"])
        except (OSError, KeyError) as exc:
            raise CohortError(f"{self.path}: not a segmentation patch cache ({exc}); run `fbta seg-teacher`") from None

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        return {"patches": len(self), "positive": int(self.labels.sum()), "slides": len(set(self.slide_ids))}

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                    slide_ids: Optional[list[str]] = None) -> "PatchSet":
        """An in-memory set (notebooks, tests): uint8 N×H×W×3 images, N labels, N×H×W masks."""
        ps = cls.__new__(cls)
        ps.path = Path("<memory>")
        ps.images, ps.labels = np.asarray(images, np.uint8), np.asarray(labels, np.float32)
        ps.masks = np.asarray(masks, bool)
        ps.fraction = ps.masks.mean(axis=(1, 2)).astype(np.float32)
        ps.slide_ids = list(slide_ids or ["memory"] * len(ps.labels))
        ps.coords = np.zeros((len(ps.labels), 2), np.int64)
        ps.fingerprint = ""
        return ps
