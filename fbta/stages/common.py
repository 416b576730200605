"""Plumbing shared by stage runners: output paths and progress bars."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, TypeVar

from omegaconf import DictConfig
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from fbta.slide_status import StageReport

T = TypeVar("T")


def out_dir(cfg: DictConfig, *parts: str) -> Path:
    """A folder under ``data.out`` (created)."""
    p = Path(cfg.data.out, *parts)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from fbta.io.lock import raise_if_storage

        raise_if_storage(exc, p)
        raise
    return p


def progress(items: Iterable[T], cfg: DictConfig, desc: str, total: int | None = None, unit: str = "slide") -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, unit=unit, disable=not cfg.run.progress, dynamic_ncols=True)


def features_dir(cfg: DictConfig) -> Path:
    """Where frozen features are read from: ``data.features`` if set, else this run's own."""
    if cfg.data.features:
        return Path(cfg.data.features)
    return Path(cfg.data.out, "features", cfg.extract.model)


def clusters_dir(cfg: DictConfig) -> Path:
    """Where ``fbta cluster`` writes, and FBTA reads, per-slide KMeans: ``clusters/<features folder name>``."""
    return Path(cfg.data.out, "clusters", features_dir(cfg).name if cfg.data.features else cfg.extract.model)


def tile_failure(cfg: DictConfig, slide_id: str) -> str | None:
    """Why ``fbta tile`` failed on a slide, if it did (so later stages can say so)."""
    import json

    status = Path(cfg.data.out, "reports", "status", "tile.json")
    try:
        slides = json.loads(status.read_text())["slides"]
    except (OSError, ValueError, KeyError):
        return None
    return next((s["reason"] for s in slides if s["slide_id"] == slide_id and s["status"] == "failed"), None)


def only_slides(cfg: DictConfig, slide_ids: Iterable[str], source: str) -> set[str] | None:
    """The ``run.slides`` subset (None: every slide), checked against the ids a stage can see.

    Why: the Prefect flow fans a per-slide stage out one slide per task; a typo'd
    id must fail loudly instead of silently processing nothing.
    """
    wanted = list(cfg.run.slides or [])
    if not wanted:
        return None
    known = set(slide_ids)
    unknown = [s for s in wanted if s not in known]
    if unknown:
        from fbta.config import ConfigError

        raise ConfigError(f"run.slides: unknown slide id(s) {', '.join(unknown)} (not in {source})")
    return set(wanted)


@contextlib.contextmanager
def stop_on_storage_error(report: "StageReport", cfg: DictConfig, folder: Path) -> Iterator[None]:
    """Around a per-slide loop: a full, read-only or forbidden output folder ends the stage in one line.

    The per-slide report is saved first if it still fits (on a full disk it may not;
    that must not hide why the stage stopped).
    """
    from fbta.io.lock import StorageError, raise_if_storage

    try:
        yield
    except StorageError:
        with contextlib.suppress(OSError):
            report.write(out_dir(cfg, "reports", "status") / f"{report.stage}.json")
        raise
    except OSError as exc:  # e.g. the lock beside an output could not be made
        raise_if_storage(exc, folder, report.stage)
        raise
