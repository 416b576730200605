"""Microns per pixel, resolved in the contract's order, never guessed silently.

vendor property → TIFF resolution tags → labels.csv ``mpp`` → ``tile.default_mpp``
→ a per-slide error. MPP drives magnification; a wrong one silently tiles at
the wrong scale, so every value is range-checked and its source recorded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

PLAUSIBLE_MPP = (0.05, 50.0)  # scanners: ~0.1–1 µm/px; coarser only for thumbnails


class MppError(ValueError):
    pass


def _plausible(v: Optional[float]) -> Optional[float]:
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1] else None


def mpp_from_vendor(props: Mapping[str, Any]) -> Optional[float]:
    x, y = _plausible(props.get("openslide.mpp-x")), _plausible(props.get("openslide.mpp-y"))
    return x if x is not None else y


def mpp_from_tiff_tags(props: Mapping[str, Any] | None) -> Optional[float]:
    """XResolution + ResolutionUnit → µm/px; unit 'none' and 72-dpi defaults are ignored."""
    if not props:
        return None
    # OpenSlide exposes tags as "tiff.XResolution"; tifffile as "XResolution".
    xres = props.get("tiff.XResolution", props.get("XResolution"))
    unit = props.get("tiff.ResolutionUnit", props.get("ResolutionUnit"))
    if xres is None or unit is None:
        return None
    if isinstance(xres, tuple):
        xres = xres[0] / xres[1] if xres[1] else 0
    try:
        xres = float(xres)
    except (TypeError, ValueError):
        return None
    unit_name = str(getattr(unit, "name", unit)).lower()
    if xres <= 0:
        return None
    if unit_name in {"inch", "2"}:
        return _plausible(25400.0 / xres)
    if unit_name in {"centimeter", "centimetre", "3"}:
        return _plausible(10000.0 / xres)
    return None


def resolve_mpp(
    path: Path,
    props: Mapping[str, Any],
    tiff_tags: Mapping[str, Any] | None,
    csv_mpp: Optional[float],
    default_mpp: Optional[float],
) -> tuple[float, str]:
    """(mpp, source) following the ⚑ order; MppError names the slide and the fixes."""
    for source, value in (
        ("vendor", mpp_from_vendor(props)),
        ("tiff-tags", mpp_from_tiff_tags(tiff_tags if tiff_tags is not None else props)),
        ("labels.csv", _plausible(csv_mpp)),
        ("tile.default_mpp", _plausible(default_mpp)),
    ):
        if value is not None:
            return value, source
    if csv_mpp is not None or default_mpp is not None:
        bad = csv_mpp if csv_mpp is not None else default_mpp
        raise MppError(f"{path}: MPP {bad} is outside the plausible range {PLAUSIBLE_MPP} µm/px")
    raise MppError(
        f"{path}: no MPP (µm/px) in the slide metadata; set an 'mpp' column in labels.csv or tile.default_mpp"
    )
