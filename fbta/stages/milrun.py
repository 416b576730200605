"""Plumbing shared by the MIL stages (train, evaluate, heatmap): method/arch checks, cohort, model folder."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fbta.config import ConfigError
from fbta.mil.checkpoint import model_dir
from fbta.mil.data import Cohort, build_cohort
from fbta.mil.splits import Split, SplitParams, classes_of, resolve_split
from fbta.io.h5 import feature_files, trident_hint
from fbta.slides.cohort import CohortError, read_labels
from fbta.stages.common import features_dir, tile_failure


def check_method_and_arch(cfg: DictConfig) -> None:
    """``mil.arch`` names a registered MIL head (``train.method`` is a schema choice); else one ConfigError line."""
    from fbta.mil import list_mil

    if cfg.mil.arch not in list_mil():
        raise ConfigError(f"mil.arch='{cfg.mil.arch}' is not a MIL head; choose one of {', '.join(list_mil())}")


def variant(cfg: DictConfig) -> str:
    """The model's name in reports: ``vanilla``, or ``vanilla_fold<k>`` for a cross-validation fold."""
    return cfg.train.method + (f"_fold{cfg.train.fold}" if cfg.train.fold is not None else "")


def model_folder(cfg: DictConfig) -> Path:
    return model_dir(cfg.data.out, cfg.train.method, cfg.mil.arch, cfg.train.fold)


def split_params(cfg: DictConfig) -> SplitParams:
    t = cfg.train
    return SplitParams(t.fold, t.n_folds, t.val_fraction, t.test_fraction, t.split_seed)


def load_cohort(cfg: DictConfig) -> tuple[Split, Cohort]:
    """labels.csv → split → slides with features, with a reason for every labelled slide left out."""
    labels = Path(cfg.data.labels)
    if not labels.exists():
        raise CohortError(f"{labels}: labels file not found (set data.labels)")
    entries = read_labels(labels, cfg.data.slides)
    split = resolve_split(entries, labels, cfg.data.out, split_params(cfg))
    folder = features_dir(cfg)
    if cfg.data.features and not feature_files(folder) and trident_hint(folder):
        raise CohortError(f"{folder}: no feature files{trident_hint(folder)}")
    cohort = build_cohort(entries, split, classes_of(entries), folder)
    for sid in list(cohort.missing):
        why = tile_failure(cfg, sid)
        if why:
            cohort.missing[sid] += f" (tiling failed: {why})"
    return split, cohort
