"""The stage door of FBTA: params.yaml → its models, pseudo-bag data and typed training options.

Kept apart from the stage runner so that tuning, benchmarks and tests build
exactly what ``fbta train train.method=fbta`` builds; the library below
(``fbta.e2e``) takes what this returns, never the config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from fbta.config import ConfigError
from fbta.device import fit_workers
from fbta.io.masks import find_mask
from fbta.features.augment import Augment
from fbta.e2e.diagnostics import ProbePatches, choose_probe
from fbta.e2e.pseudobags import PseudoBags, SlideSource
from fbta.e2e.step import VIEWS, FBTAModels, StepOptions
from fbta.e2e.trainer import FBTAOptions, prepare_tfe
from fbta.e2e.states import EXTRACTOR
from fbta.e2e.translator import Translator
from fbta.e2e.full import ValSlide
from fbta.features.registry import Extractor, create_extractor
from fbta.mil.data import BagItem
from fbta.mil.registry import MILHead
from fbta.slides.cohort import CohortError, read_labels
from fbta.stages.common import clusters_dir



def check_fbta_config(cfg: DictConfig) -> None:
    """The fbta.* values that have a fixed set of choices; one line per mistake (exit 2)."""
    f = cfg.fbta
    if not f.views:
        raise ConfigError(f"fbta.views is empty: choose a non-empty subset of {', '.join(VIEWS)}")
    if not 0.0 <= f.ema_alpha < 1.0:
        raise ConfigError(f"fbta.ema_alpha={f.ema_alpha} must be in [0, 1)")
    if f.m < 1 or f.k < 1 or f.extractor_every < 1:
        raise ConfigError(f"fbta.m={f.m}, fbta.k={f.k} and fbta.extractor_every={f.extractor_every} must be ≥ 1")
    if f.diag_slides < 0 or f.diag_patches < 0:
        raise ConfigError(f"fbta.diag_slides={f.diag_slides} and fbta.diag_patches={f.diag_patches} must be ≥ 0")


def slide_sources(cfg: DictConfig, items: Sequence[BagItem], missing_ok: bool = False) -> list[SlideSource]:
    """Each slide's file (for patch pixels), clusters (for the strata) and annotation mask, if any.

    ``missing_ok``: leave out slides whose file is not there (the validation probe) instead of failing.
    """
    entries = read_labels(cfg.data.labels, cfg.data.slides)
    folder = clusters_dir(cfg)
    masks = Path(cfg.data.masks) if cfg.data.masks else None
    out = []
    for it in items:
        entry = entries[it.slide_id]
        if not entry.path.exists():
            if missing_ok:
                continue
            raise CohortError(f"{entry.path}: slide file of '{it.slide_id}' not found; FBTA re-reads patches "
                              "of the training slides (set data.slides)")
        out.append(SlideSource(it, entry.path, folder / f"{it.slide_id}.h5", entry.mpp,
                               find_mask(masks, it.slide_id)))
    return out


def probe_patches(cfg: DictConfig, val_items: Sequence[BagItem]) -> Optional[ProbePatches]:
    """The fixed validation patches of the gap_ratio / tfe_drift diagnostics (None: fbta.diag_* = 0 or no slide)."""
    f = cfg.fbta
    return choose_probe(slide_sources(cfg, val_items, missing_ok=True), f.diag_slides, f.diag_patches,
                        cfg.train.seed)


def pseudo_bags(cfg: DictConfig, items: Sequence[BagItem], whole: bool = False) -> PseudoBags:
    """FBTA's pseudo-bags; ``whole``: every patch (at most ``fbta.max_bag``), the end-to-end bound's bags."""
    sampling = "all" if whole else str(cfg.fbta.sampling)
    return PseudoBags(slide_sources(cfg, items), cfg.fbta.m, sampling, cfg.cluster.n_clusters, cfg.fbta.max_bag)


def val_slides(cfg: DictConfig, items: Sequence[BagItem]) -> list[ValSlide]:
    """The validation slides' files for the end-to-end bound's re-extracting validation."""
    return [ValSlide(s.item.path, s.slide_path, s.csv_mpp) for s in slide_sources(cfg, items)]


def build_tfe(cfg: DictConfig, in_dim: int, device: torch.device, features: Mapping[str, Any]) -> tuple[Extractor, list[str]]:
    """The trainable extractor, initialised from the frozen one's weights; checked against the cached features
    (``features``: one training slide's h5 attributes) — the translator maps cached features into the trainable
    extractor's space, so both must come from the same model, weights and input size."""
    tfe = create_extractor(cfg.extract.model, weights=cfg.extract.weights, trainable=True, device=device,
                           input_size=cfg.extract.input_size)
    if tfe.dim != in_dim:
        raise ConfigError(f"extract.model={cfg.extract.model} gives {tfe.dim}-d features but the cached features "
                          f"are {in_dim}-d: FBTA's extractor must be the one that made them")
    weights = features.get("weights")
    if weights and weights != tfe.weights_id:
        raise ConfigError(f"the cached features were made with weights {weights} but extract.weights "
                          f"resolves to {tfe.weights_id}: re-run `fbta extract` or set extract.weights")
    size = int(features.get("input_size", 0))
    if size and size != tfe.input_size:
        raise ConfigError(f"the cached features were extracted at {size} px but extract.input_size="
                          f"{tfe.input_size}: FBTA's translator would bridge two input sizes, not frozen and "
                          f"trained features; set extract.input_size={size} or re-run `fbta extract` at "
                          f"{tfe.input_size} px")
    units = prepare_tfe(tfe, cfg.fbta.trainable_extractor, cfg.fbta.train_blocks, cfg.fbta.freeze_bn)
    return tfe, units


def build_models(cfg: DictConfig, head: MILHead, tfe: Extractor, identity: bool = False) -> FBTAModels:
    """Head, translator and TFE; ``identity``: a fixed identity translator (the end-to-end bound has none)."""
    f = cfg.fbta
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 7)  # translator init apart from the head's
        translator = Translator(head.in_dim, 1, 1) if identity else Translator(head.in_dim, f.k, f.hidden, f.layernorm)
    if identity:  # W2 = 0: h(x) = x, and it stays so
        translator.requires_grad_(False)
    return FBTAModels(head, translator, tfe)


def options(cfg: DictConfig, e2e: bool = False) -> FBTAOptions:
    """FBTA's typed options; ``e2e``: the end-to-end bound's (view eb only, no L_dist, no L_cons)."""
    f, t = cfg.fbta, cfg.train
    aug = Augment(**OmegaConf.to_container(f.augment, resolve=True))  # type: ignore[arg-type]
    if e2e:
        step = StepOptions(views=("eb",), consistency=False, distill=False, augment=aug, amp=f.amp)
    else:
        step = StepOptions(views=tuple(f.views), consistency=f.consistency, augment=aug, amp=f.amp)
    return FBTAOptions(epochs=f.epochs if f.epochs is not None else t.epochs, patience=t.patience, lr=t.lr, translator_lr=f.translator_lr,
                       extractor_lr=f.extractor_lr, weight_decay=t.weight_decay, ema_alpha=f.ema_alpha,
                       ema_every=f.ema_every, ema_warmup=f.ema_warmup, min_epochs=t.min_epochs,
                       balanced=t.balanced, bags_per_slide=f.bags_per_slide, extractor_every=f.extractor_every, seed=t.seed, num_workers=fit_workers(f.num_workers, "fbta.num_workers"),
                       prefetch=f.prefetch, progress=cfg.run.progress, step=step)


def fbta_meta(cfg: DictConfig, m: FBTAModels, units: list[str]) -> dict[str, Any]:
    """What meta.json adds for an FBTA model: the translator's shape and the EMA extractor's identity."""
    return {
        "translator": m.translator.config(),
        "extractor": {**m.tfe.describe(), "file": EXTRACTOR, "trained_units": units,
                      "trainable": bool(cfg.fbta.trainable_extractor)},
        "fbta": OmegaConf.to_container(cfg.fbta, resolve=True),
        "n_clusters": cfg.cluster.n_clusters,
    }
