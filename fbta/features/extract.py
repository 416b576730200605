"""Frozen-feature extraction: coords → patches → backbone → features HDF5.

Compute-bound by design: DataLoader workers each open the slide once and only
read + decode JPEG tiles; resizing and normalisation run batched on the model's
device; the model runs in inference mode (autocast on GPU). The target is
end-to-end throughput ≥ 0.85 × pure forward throughput (benchmarks/extract.py).
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fbta.features.registry import Extractor
from fbta.device import resolve_device
from fbta.slides.reader import Slide, dct_scale, open_slide, scaled_decode_default


class SlidePatches(Dataset):
    """Patches of one slide at its coords' target MPP, as uint8 H×W×3 tensors.

    The slide is opened lazily, once per worker process: OpenSlide handles are not
    shareable across fork, and re-opening per patch would dominate the cost.
    """

    def __init__(self, path: Path, coords: np.ndarray, attrs: dict[str, Any], csv_mpp: Optional[float] = None):
        self.path = Path(path)
        self.coords = np.asarray(coords, np.int64)
        self.level = int(attrs["patch_level"])
        self.read_size = int(attrs.get("level_patch_size", attrs["patch_size"]))
        self.patch_size = int(attrs["patch_size"])
        self.csv_mpp = csv_mpp
        self.mpp = float(attrs.get("mpp", 0)) or None
        self._slide: Optional[Slide] = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = open_slide(self.path, self.csv_mpp, self.mpp)
        x, y = self.coords[i]
        return torch.from_numpy(self._slide.read_patch(int(x), int(y), self.level, self.read_size, self.patch_size))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_slide": None}  # never ship an open handle to a worker

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


pick_device = resolve_device  # the name earlier code imported


def features_fingerprint(extractor: Extractor, coords_attrs: dict[str, Any]) -> str:
    """Changes when the backbone, its weights or the coordinates change — or, where patches are 2×/4×/8×
    below their level, the way they are decoded (``extract.scaled_decode``); elsewhere the switch changes
    nothing, and neither does the fingerprint."""
    parts = [extractor.describe(), coords_attrs.get("fbta_params")]
    scale = dct_scale(int(coords_attrs.get("level_patch_size", coords_attrs.get("patch_size", 0))),
                      int(coords_attrs.get("patch_size", 0)))
    if scale:
        parts.append(f"patch decode 1/{scale} {'dct' if scaled_decode_default() else 'resize'}")
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@torch.inference_mode()
def extract_patches(
    dataset: SlidePatches, extractor: Extractor, device: torch.device, batch_size: int, num_workers: int,
    amp: bool = True, on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Features (N×D float32) of every patch of ``dataset``, in coords order."""
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    out = np.empty((len(dataset), extractor.dim), np.float32)
    use_amp = amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    start = 0
    try:
        for batch in loader:
            x = extractor.preprocess(batch.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                feats = extractor(x)
            out[start : start + len(batch)] = feats.float().cpu().numpy()
            start += len(batch)
            if on_batch is not None:
                on_batch(len(batch))
    except Exception as exc:
        one_line = _from_worker(exc)
        if one_line is exc:
            raise
        raise one_line from exc
    return out


# -- a cohort behind one loader: workers persist across slides ---------------------------------------------


class CohortPatches(Dataset):
    """Every patch of several slides behind one flat index → (slide, patch, uint8 pixels, error text).

    Why one dataset for the cohort: one DataLoader whose workers live for the
    whole stage and prefetch across slide boundaries, so a GPU never waits for
    workers to start at each slide. A read error comes back as text with a blank
    patch (the slide fails, the loader goes on); each worker keeps at most
    ``keep_open`` slides open.
    """

    def __init__(self, slides: Sequence[SlidePatches], keep_open: int = 2) -> None:
        self.slides = list(slides)
        self.offsets = np.cumsum([0] + [len(s) for s in self.slides])
        self.keep_open = max(1, keep_open)
        self._open: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def indices(self, j: int) -> range:
        return range(int(self.offsets[j]), int(self.offsets[j + 1]))

    def __getitem__(self, g: int) -> tuple[int, int, torch.Tensor, str]:
        j = int(np.searchsorted(self.offsets, g, side="right")) - 1
        i, sp = g - int(self.offsets[j]), self.slides[j]
        self._open[j] = None
        self._open.move_to_end(j)
        while len(self._open) > self.keep_open:
            self.slides[self._open.popitem(last=False)[0]].close()
        try:
            return j, i, sp[i], ""
        except Exception as exc:  # noqa: BLE001 - the slide's failure, reported by the main process
            said = str(exc)
            return j, i, torch.zeros(sp.patch_size, sp.patch_size, 3, dtype=torch.uint8), \
                said if said.startswith(str(sp.path)) else f"{sp.path}: {type(exc).__name__}: {said}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}


def _collate(items: list[tuple[int, int, torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       list[str]]:
    j, i, px, err = zip(*items)
    return torch.tensor(j), torch.tensor(i), torch.stack(px), list(err)


class _Batches:
    """Index batches over the slides ``order`` yields, consumed lazily (the stage claims a slide's lock as the
    loader reaches it); batches run across slide boundaries."""

    def __init__(self, data: CohortPatches, order: Iterator[int], batch_size: int) -> None:
        self.data, self.order, self.batch_size = data, order, batch_size
        self.started: list[int] = []

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for j in self.order:
            self.started.append(j)
            for g in self.data.indices(j):
                batch.append(g)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch


@torch.inference_mode()
def extract_cohort(
    data: CohortPatches, order: Iterable[int], extractor: Extractor, device: torch.device, batch_size: int,
    num_workers: int, on_slide: Callable[[int, Optional[np.ndarray], str], None], amp: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Features of every slide ``order`` names, through one loader whose workers persist across slides.

    ``on_slide(j, features N×D | None, error)`` is called once per slide, as soon
    as its last patch is through (features None and the first error if any patch
    failed). Memory: the feature arrays of the slides in flight (≈ 2). A worker that
    dies (a segfault in a slide library) fails the slides in flight; a new loader
    takes the rest.
    """
    use_amp = amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    order = iter(order)
    while True:
        sampler = _Batches(data, order, batch_size)
        loader = DataLoader(data, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if num_workers > 0 else None)
        out: dict[int, np.ndarray] = {}
        seen: dict[int, int] = {}
        errors: dict[int, str] = {}
        done: set[int] = set()

        def finish(j: int) -> None:
            feats = out.pop(j, None)
            on_slide(j, None if j in errors else feats, errors.pop(j, ""))
            seen.pop(j, None)
            done.add(j)

        try:
            for js, idx, px, errs in loader:
                ok = [k for k, e in enumerate(errs) if not e]
                for k, e in enumerate(errs):
                    if e:
                        errors.setdefault(int(js[k]), e)
                if ok:
                    try:
                        x = extractor.preprocess(px[ok].to(device, non_blocking=True))
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                            feats = extractor(x).float().cpu().numpy()
                    except Exception as exc:  # noqa: BLE001 - the model failed on these slides' patches
                        feats = None
                        for j in {int(js[k]) for k in ok}:
                            errors.setdefault(j, f"{data.slides[j].path}: {type(exc).__name__}: {exc}")
                    for r, k in enumerate(ok):
                        j = int(js[k])
                        if feats is not None and j not in errors:
                            out.setdefault(j, np.empty((len(data.slides[j]), extractor.dim), np.float32))
                            out[j][int(idx[k])] = feats[r]
                for j in js.unique().tolist():
                    seen[j] = seen.get(j, 0) + int((js == j).sum())
                    if seen[j] == len(data.slides[j]):
                        finish(j)
                if on_batch is not None:
                    on_batch(len(js))
        except RuntimeError as exc:  # a worker died: the slides it was on fail, a new loader goes on
            if "worker" not in str(exc).lower():
                raise
            for j in [j for j in sampler.started if j not in done]:
                errors.setdefault(j, f"{data.slides[j].path}: a loader worker died while this slide was being read "
                                     f"({str(exc).splitlines()[0]})")
                finish(j)
            continue
        for j in sampler.started:  # slides with no patch at all
            if j not in done:
                on_slide(j, np.empty((0, extractor.dim), np.float32), "")
        return


def _from_worker(exc: Exception) -> Exception:
    """A DataLoader worker's error as its own one-line message, not torch's wrapped traceback.

    Why: a corrupt tile found by a worker is a per-slide failure; its reason goes
    into the stage report and on one stderr line, which the traceback would break.
    """
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = text.rstrip().splitlines()[-1]
    name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    msg = last[len(name):] if last.startswith(name) else last
    try:
        return type(exc)(msg)
    except Exception:  # noqa: BLE001 - an exception type with another constructor
        return RuntimeError(msg)
