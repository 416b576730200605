"""The expensive alternative to translation: re-encode every patch of a slide with the EMA extractor TFE*.

Why keep it: it is what the translator replaces (METHODS.md A, inference),
so it measures two things — how faithful the translator is (same predictions?)
and how much time it saves (the paper: 120 min vs 27 s, ≈ 200×).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from fbta.e2e.classifier import SlideClassifier
from fbta.e2e.pseudobags import patch_attrs
from fbta.features.extract import SlidePatches, extract_patches
from fbta.features.registry import Extractor
from fbta.io.h5 import read_features


@dataclass
class Timed:
    probs: np.ndarray  # n_classes
    seconds: float
    patches: int


def translate_slide(model: SlideClassifier, features_path: Path) -> Timed:
    """Deployed path, end to end: read the cached frozen features, translate, EMA MIL."""
    t0 = time.perf_counter()
    feats, _, _ = read_features(features_path)
    probs = model.predict_proba(feats)
    return Timed(probs, time.perf_counter() - t0, len(feats))


def reextract_slide(model: SlideClassifier, tfe_ema: Extractor, features_path: Path, slide_path: Path,
                    csv_mpp: Optional[float], device: torch.device, batch_size: int, num_workers: int,
                    amp: bool = True, on_batch: Callable[[int], None] | None = None) -> Timed:
    """Comparison path, end to end: read and decode every patch, TFE* features, EMA MIL (no translator)."""
    t0 = time.perf_counter()
    _, coords, attrs = read_features(features_path)
    patches = SlidePatches(slide_path, coords, patch_attrs(features_path, attrs), csv_mpp)
    feats = extract_patches(patches, tfe_ema, device, batch_size, num_workers, amp, on_batch)
    with torch.no_grad():
        probs = model.head(torch.from_numpy(feats).to(device)).probs.float().cpu().numpy()[0]
    return Timed(probs, time.perf_counter() - t0, len(coords))
