"""Per-epoch FBTA diagnostics: is the translator closing the gap, how far has TFE* moved, what do pseudo-bags hold?

Why: an FBTA run can reach a good validation AUC while its translator does
nothing (F_TB ≈ F_FB), and nothing in the loss curve says so. METHODS.md A
gives the check: on validation patches ``‖F_TB − TFE*(X)‖ / ‖F_FB − TFE*(X)‖``
should fall well below 1. Measured every epoch on a fixed, seeded sample of
validation patches (:class:`ProbePatches`), read once as the pseudo-bag reader
reads them and never augmented:

- ``gap_ratio = Σ_i ‖F_TB,i − TFE*(X)_i‖ / Σ_i ‖F_FB,i − TFE*(X)_i‖`` — the ratio
  of the *summed* per-instance L2 norms (not the mean of per-instance ratios:
  early on TFE* ≈ FFE, and single near-zero denominators would dominate a mean);
  F_FB are the patches' cached frozen features, F_TB = mean_k h_k(F_FB), TFE* the
  EMA extractor. 1: the translator does nothing; 0: it reproduces TFE*. NaN while
  TFE* has not moved from FFE (``tfe_drift`` ≤ 1e-5, e.g. the frozen-TFE ablation).
- ``tfe_drift = Σ_i ‖TFE*(X)_i − FFE(X)_i‖ / Σ_i ‖FFE(X)_i‖`` — how far the EMA
  extractor has moved from the frozen one (same summed-norm convention). Its
  epoch-0 value is not exactly 0 when the cache was extracted under autocast.
- ``tumour_share`` (per epoch, from the pseudo-bags): the share of drawn patches
  whose centre lies on annotated tumour (``data.masks/<slide_id>.png`` at any
  downsample, same aspect ratio as level 0; a pixel > 127 is tumour, or > 0 for
  a 0/1 mask). Only slides with a mask count; absent when none has one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from fbta.io.masks import read_mask

from fbta.e2e.translator import Translator
from fbta.features.registry import Extractor

# ----------------------------------------------------------------------------- tumour share


def level0_dims(attrs: dict[str, Any]) -> Optional[tuple[float, float]]:
    """Level-0 width, height from the coords attributes (CLAM's ``level_dim`` × ``downsample``), if recorded."""
    if "level_dim" not in attrs:
        return None
    w, h = np.asarray(attrs["level_dim"], np.float64).ravel()[:2]
    ds = np.asarray(attrs.get("downsample", [1.0, 1.0]), np.float64).ravel()
    ds = np.broadcast_to(ds, (2,)) if ds.size == 1 else ds[:2]
    return float(w * ds[0]), float(h * ds[1])


def patches_on_tumour(mask: np.ndarray, coords: np.ndarray, size0: float, dims0: tuple[float, float]) -> np.ndarray:
    """N bools: is each patch's centre (level-0 top-left ``coords`` + size0/2) on the mask?

    Raises ValueError when the mask's aspect ratio is not the slide's (it would point at the wrong place).
    """
    w0, h0 = dims0
    sx, sy = w0 / mask.shape[1], h0 / mask.shape[0]
    if abs(sx / sy - 1) > 0.05:
        raise ValueError(f"mask shape {mask.shape} does not have the slide's aspect ratio ({w0:.0f}×{h0:.0f})")
    c = np.asarray(coords, np.float64).reshape(-1, 2) + size0 / 2.0
    cols = np.clip((c[:, 0] / sx).astype(np.int64), 0, mask.shape[1] - 1)
    rows = np.clip((c[:, 1] / sy).astype(np.int64), 0, mask.shape[0] - 1)
    return mask[rows, cols]


def slide_on_tumour(mask_path: Optional[Path], coords: np.ndarray, attrs: dict[str, Any]) -> Optional[np.ndarray]:
    """Per-patch on-tumour flags of one slide, or None (no mask, or no level-0 size recorded with the coords)."""
    if mask_path is None or not Path(mask_path).is_file():
        return None
    dims0 = level0_dims(attrs)
    if dims0 is None:
        return None
    size0 = float(attrs.get("patch_size_level0", attrs.get("patch_size", 0)))
    try:
        return patches_on_tumour(read_mask(Path(mask_path), dims0), coords, size0, dims0)
    except (OSError, ValueError) as exc:  # a diagnostic: say so once, never stop training for it
        print(f"train: {mask_path}: not used for tumour_share ({exc})", flush=True)
        return None


def tumour_share(n_tumour: Sequence[float], n_subset: Sequence[float]) -> Optional[float]:
    """Pooled share Σ tumour / Σ drawn over the bags of slides with a mask (NaN entries: no mask); None if none."""
    t = np.asarray(n_tumour, np.float64)
    n = np.asarray(n_subset, np.float64)
    known = ~np.isnan(t)
    if not known.any() or n[known].sum() == 0:
        return None
    return float(t[known].sum() / n[known].sum())

# ----------------------------------------------------------------------------- gap ratio and TFE drift


@dataclass
class ProbePatches:
    """A fixed sample of validation patches: their pixels (never augmented) and cached frozen features."""

    pixels: torch.Tensor  # P×H×W×3 uint8
    frozen: torch.Tensor  # P×D float32, FFE(X) from the feature cache
    slides: list[str]  # slide id of each patch

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


def choose_probe(sources: Sequence[Any], n_slides: int, n_patches: int, seed: int) -> Optional[ProbePatches]:
    """Up to ``n_patches`` patches from each of up to ``n_slides`` validation slides, drawn once with ``seed``.

    ``sources`` are :class:`~fbta.e2e.pseudobags.SlideSource` of validation slides whose
    files exist; patches are read with the pseudo-bag reader's own reader. None if nothing to draw.
    """
    from fbta.features.extract import SlidePatches
    from fbta.io.h5 import patch_attrs, read_features

    if n_slides <= 0 or n_patches <= 0 or not sources:
        return None
    rng = np.random.default_rng([int(seed), 0xD1A6])
    picked = sorted(rng.choice(len(sources), size=min(n_slides, len(sources)), replace=False).tolist())
    pixels, frozen, ids = [], [], []
    for i in picked:
        src = sources[i]
        feats, coords, attrs = read_features(src.item.path)
        idx = np.sort(rng.choice(len(feats), size=min(n_patches, len(feats)), replace=False))
        reader = SlidePatches(src.slide_path, coords, patch_attrs(src.item.path, attrs), src.csv_mpp)
        pixels += [reader[int(j)] for j in idx]
        frozen.append(torch.from_numpy(np.ascontiguousarray(feats[idx])))
        ids += [src.item.slide_id] * len(idx)
    if not pixels:
        return None
    return ProbePatches(torch.stack(pixels), torch.cat(frozen).float(), ids)


def summed_norm_ratio(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> float:
    """``Σ_i ‖a_i − c_i‖ / Σ_i ‖b_i − c_i‖`` (row-wise L2); NaN when the denominator is 0."""
    num = (a - c).norm(dim=1).sum()
    den = (b - c).norm(dim=1).sum()
    return float(num / den) if float(den) > 0 else float("nan")


@torch.no_grad()
def gap_and_drift(tfe_ema: Extractor, translator: Translator, probe: ProbePatches, device: torch.device,
                  batch: int = 32) -> dict[str, float]:
    """``gap_ratio`` and ``tfe_drift`` of the current TFE* and translator on the probe patches."""
    feats = []
    for i in range(0, len(probe), batch):
        x = probe.pixels[i:i + batch].to(device).permute(0, 3, 1, 2).float().div_(255.0)
        feats.append(tfe_ema(tfe_ema.preprocess(x)).float())
    star = torch.cat(feats)
    ffe = probe.frozen.to(device)
    was = translator.training
    translator.eval()
    f_tb = translator(ffe).float()
    translator.train(was)
    drift = summed_norm_ratio(star, torch.zeros_like(ffe), ffe)
    # TFE* still equal to FFE (frozen-TFE ablation, or no update yet): there is no gap to close, and the
    # ratio of two rounding-level norms would be noise
    gap = summed_norm_ratio(f_tb, ffe, star) if drift > 1e-5 else float("nan")
    return {"gap_ratio": gap, "tfe_drift": drift}
