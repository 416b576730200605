"""Frozen-feature extraction: coords → patches → backbone → features HDF5.

Compute-bound by design: DataLoader workers each open the slide once and only
read + decode JPEG tiles; resizing and normalisation run batched on the model's
device; the model runs in inference mode (autocast on GPU). The target is
end-to-end throughput ≥ 0.85 × pure forward throughput (benchmarks/extract.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fbta.features.registry import Extractor
from fbta.device import resolve_device
from fbta.slides.reader import Slide, open_slide


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


pick_device = resolve_device  # the name earlier code imported


def features_fingerprint(extractor: Extractor, coords_attrs: dict[str, Any]) -> str:
    """Changes when the backbone, its weights or the coordinates change."""
    blob = json.dumps([extractor.describe(), coords_attrs.get("fbta_params")], sort_keys=True, default=str)
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
