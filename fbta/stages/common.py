"""Plumbing shared by stage runners: output paths and progress bars."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, TypeVar

from omegaconf import DictConfig
from tqdm.auto import tqdm

T = TypeVar("T")


def out_dir(cfg: DictConfig, *parts: str) -> Path:
    """A folder under ``data.out`` (created)."""
    p = Path(cfg.data.out, *parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def progress(items: Iterable[T], cfg: DictConfig, desc: str, total: int | None = None, unit: str = "slide") -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, unit=unit, disable=not cfg.run.progress, dynamic_ncols=True)
