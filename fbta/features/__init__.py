"""Patch features: extractor registry with offline weights, per-slide KMeans and pseudo-bags.

Names are imported lazily so that ``fbta.features.kmeans`` (the ``cluster``
stage) does not pay for importing timm.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Extractor": "registry",
    "Preprocess": "registry",
    "create_extractor": "registry",
    "list_extractors": "registry",
    "register_extractor": "registry",
    "WeightsError": "weights",
    "cluster_bag": "kmeans",
    "stratified_pseudo_bag": "kmeans",
    "random_pseudo_bag": "kmeans",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fbta.features' has no attribute {name!r}")
    return getattr(import_module(f"fbta.features.{_EXPORTS[name]}"), name)
