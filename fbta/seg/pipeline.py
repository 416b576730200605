"""Plumbing shared by ``fbta seg-teacher`` and ``fbta seg-distill``: config checks, patch caches, outputs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from omegaconf import DictConfig

from fbta.config import ConfigError, InputError
from fbta.io.atomic import atomic_path
from fbta.io.reports import write_csv
from fbta.mil.splits import resolve_split
from fbta.seg.dataset import SPLITS, PatchSet, cache_complete, cache_path, fingerprint, index_cohort, select, \
    write_cache
from fbta.seg.metrics import binarise
from fbta.seg.model import predict_fused
from fbta.seg.network import SideOutputNet
from fbta.seg.train import EpochLog, FitOptions
from fbta.slides.cohort import CohortError, read_labels
from fbta.stages.common import out_dir
from fbta.stages.milrun import split_params
from fbta.status import StageReport


def check_config(cfg: DictConfig) -> None:
    """Values the schema's types cannot check; one ConfigError line each."""
    s = cfg.seg
    choices = {"seg.fusion": (s.fusion, ("fixed", "learnable")), "seg.teacher.loss": (s.teacher.loss, ("dice", "gmp_bce")),
               "seg.distill.kd": (s.distill.kd, ("fusion", "blockwise")),
               "seg.distill.init": (s.distill.init, ("backbone", "teacher"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}='{value}' must be one of {', '.join(allowed)}")
    if len(s.fusion_weights) != len(s.out_indices):
        raise ConfigError(f"seg.fusion_weights has {len(s.fusion_weights)} values for {len(s.out_indices)} "
                          "seg.out_indices stages")
    if s.batch_size < 2:
        raise ConfigError(f"seg.batch_size must be ≥ 2 (BatchNorm), got {s.batch_size}")
    if s.input_size and s.input_size % 8:
        raise ConfigError(f"seg.input_size must be a multiple of 8 (or 0 for the patch size), got {s.input_size}")
    from fbta.features import list_extractors

    if s.backbone not in list_extractors():
        raise ConfigError(f"seg.backbone='{s.backbone}' is not an extractor; choose one of {', '.join(list_extractors())}")


def fit_options(cfg: DictConfig, stage: str) -> FitOptions:
    s = cfg.seg
    sub = s.teacher if stage == "teacher" else s.distill
    return FitOptions(epochs=sub.epochs, lr=sub.lr, weight_decay=sub.weight_decay, batch_size=s.batch_size,
                      input_size=s.input_size, augment=s.augment, seed=sub.seed, sigma=s.sigma,
                      threshold=s.threshold, progress=cfg.run.progress,
                      loss=s.teacher.loss, gmp_r=s.teacher.gmp_r)


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def patch_sets(cfg: DictConfig, report: StageReport, build: bool) -> tuple[dict[str, PatchSet], str]:
    """The cached train/val/test patch sets, built (or checked up to date when ``build`` is False)."""
    labels = Path(cfg.data.labels)
    if not labels.exists():
        raise CohortError(f"{labels}: labels file not found (set data.labels)")
    entries = read_labels(labels, cfg.data.slides)
    split = resolve_split(entries, labels, cfg.data.out, split_params(cfg)).assignment
    index, missing = index_cohort(cfg, split)
    for sid, why in missing.items():
        report.failed(sid, why)
    fp = fingerprint(index, cfg)
    sets: dict[str, PatchSet] = {}
    for k, part in enumerate(SPLITS):
        path = cache_path(cfg.data.out, part)
        if not cache_complete(path, fp):
            if not build:
                raise InputError(f"{path}: missing or made from other inputs/parameters; run `fbta seg-teacher` first")
            keep = select(index, part, cfg, k)
            t0 = time.perf_counter()
            n = write_cache(path, index, keep, fp, cfg.seg.min_tumour_fraction)
            print(f"seg: cached {n} {part} patches → {path} ({time.perf_counter() - t0:.1f} s)", flush=True)
        sets[part] = PatchSet(path)
    for sl in index:
        report.done(sl.entry.slide_id, 0.0, split=sl.split, patches=int(len(sl.coords)),
                    positive=int((sl.fraction > cfg.seg.min_tumour_fraction).sum()))
    train, val = sets["train"], sets["val"]
    if train.labels.min() == train.labels.max():
        raise CohortError(f"{train.path}: the training patches are all {'positive' if train.labels[0] else 'negative'}; "
                          "weak supervision needs both (check data.masks and seg.normal_labels)")
    if len(val) == 0 or not val.labels.any():
        raise CohortError(f"{val.path}: no positive validation patch; model selection by F1 needs some")
    return sets, fp


def describe(sets: dict[str, PatchSet]) -> str:
    return " · ".join(f"{p} {ps.counts()['patches']} ({ps.counts()['positive']} positive, "
                      f"{ps.counts()['slides']} slides)" for p, ps in sets.items())


def write_pseudo_masks(dest: Path, net: SideOutputNet, ps: PatchSet, opts: FitOptions, device: torch.device,
                       source: str) -> None:
    """Fused maps of the training patches (uint8 probability ×255) and their σ-smoothed, thresholded masks."""
    probs = predict_fused(net, ps.images, opts.input_size, device)
    with atomic_path(dest, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("probs", data=np.round(probs * 255).astype(np.uint8), chunks=(1, *probs.shape[1:]),
                         compression="lzf")
        f.create_dataset("masks", data=np.stack([binarise(p, opts.sigma, opts.threshold) for p in probs]).astype(np.uint8),
                         chunks=(1, *probs.shape[1:]), compression="lzf")
        f.create_dataset("slide_id", data=np.array(ps.slide_ids, dtype=h5py.string_dtype()))
        f.create_dataset("coords", data=ps.coords)
        f.create_dataset("labels", data=ps.labels.astype(np.uint8))
        f.attrs.update({"model": source, "sigma": opts.sigma, "threshold": opts.threshold,
                        "patches_fingerprint": ps.fingerprint, "fbta_complete": True})


def write_history(cfg: DictConfig, folder: Path, name: str, history: list[EpochLog]) -> list[dict[str, Any]]:
    rows = [e.as_row() for e in history]
    write_csv(folder / "history.csv", rows)
    write_csv(out_dir(cfg, "reports", "plots") / f"{name}.csv", rows)
    return rows


def metrics_entry(scores: Any, extra: dict[str, Any]) -> dict[str, Any]:
    d = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in scores.as_dict().items()}
    return {**d, **extra}


def log_outcome(mlrun: Any, folder: Path, best_epoch: int, best_val_f1: float, test: Any, overview: Path,
                **metrics: float) -> None:
    """A finished seg stage's MLflow record: best epoch, test scores, the model folder's files, the overlays."""
    from fbta.seg.model import META, WEIGHTS

    mlrun.log_metrics({"best_epoch": best_epoch, "best_val_f1": best_val_f1, **metrics,
                       **{f"test_{k}": v for k, v in test.as_dict().items()}})
    for f in (WEIGHTS, META, "history.csv", "config.yaml"):
        mlrun.log_artifact(folder / f, "model")
    mlrun.log_artifact(overview, "plots")
