"""Plumbing shared by ``fbta seg-teacher`` and ``fbta seg-distill``: config checks, patch caches, outputs."""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fbta.config import ConfigError, InputError
from fbta.device import resolve_device  # noqa: F401 (re-exported: one resolver)
from fbta.io.atomic import atomic_path
from fbta.io.metrics import write_csv
from fbta.mil.splits import resolve_split
from fbta.seg.dataset import SPLITS, CohortPaths, PatchSet, SlidePatchIndex, WeakLabelOptions, cache_complete, \
    cache_path, fingerprint, index_cohort, label_stats, select, write_cache
from fbta.seg.metrics import AMBIGUOUS, POS, SegScores, baseline_scores, binarise
from fbta.seg.model import predict_fused
from fbta.seg.network import SideOutputNet
from fbta.seg.train import SegOptions
from fbta.slides.cohort import CohortError, read_labels
from fbta.stages.common import out_dir
from fbta.stages.milrun import split_params
from fbta.slide_status import StageReport
from fbta.training.loop import Epoch
from fbta.training.resume import RESUME, Resumable


def check_config(cfg: DictConfig) -> None:
    """Values the schema's types cannot check; one ConfigError line each."""
    s = cfg.seg
    if len(s.fusion_weights) != len(s.out_indices):
        raise ConfigError(f"seg.fusion_weights has {len(s.fusion_weights)} values for {len(s.out_indices)} "
                          "seg.out_indices stages")
    if s.batch_size < 2:
        raise ConfigError(f"seg.batch_size must be ≥ 2 (BatchNorm), got {s.batch_size}")
    ranges = {"seg.min_tumour_fraction": (s.min_tumour_fraction, 0.0, 1.0),
              "seg.negative_margin": (s.negative_margin, 0.0, 8.0), "seg.colour_jitter": (s.colour_jitter, 0.0, 0.5), "seg.hed_sigma": (s.hed_sigma, 0.0, 0.5)}
    for key, (value, lo, hi) in ranges.items():
        if not lo <= float(value) <= hi:
            raise ConfigError(f"{key}={value} must be within [{lo}, {hi}]")
    for key in ("max_ambiguous", "slide_maps", "slide_map_max_patches"):
        if int(s[key]) < 0:
            raise ConfigError(f"seg.{key} must be ≥ 0, got {s[key]}")
    if s.slide_map_px < 64:
        raise ConfigError(f"seg.slide_map_px must be ≥ 64, got {s.slide_map_px}")
    if s.input_size and s.input_size % 8:
        raise ConfigError(f"seg.input_size must be a multiple of 8 (or 0 for the patch size), got {s.input_size}")
    from fbta.features import list_extractors

    if s.backbone not in list_extractors():
        raise ConfigError(f"seg.backbone='{s.backbone}' is not an extractor; choose one of {', '.join(list_extractors())}")


def fit_options(cfg: DictConfig, stage: str) -> SegOptions:
    s = cfg.seg
    sub = s.teacher if stage == "teacher" else s.distill
    return SegOptions(epochs=sub.epochs, lr=sub.lr, weight_decay=sub.weight_decay, batch_size=s.batch_size,
                      input_size=s.input_size, augment=s.augment, colour=s.colour_jitter, hed_sigma=s.hed_sigma,
                      seed=sub.seed, sigma=s.sigma,
                      threshold=s.threshold, progress=cfg.run.progress,
                      loss=s.teacher.loss, gmp_r=s.teacher.gmp_r)




@dataclass
class SegData:
    """What both seg stages start from."""

    sets: dict[str, PatchSet]  # the cached train / val / test patch sets
    fingerprint: str
    stats: dict[str, dict[str, Any]]  # weak-label statistics per split (every tiled patch, and what was cached)
    index: list[SlidePatchIndex]  # every usable slide: coords, tumour shares, groups, mask


def weak_label_options(cfg: DictConfig) -> WeakLabelOptions:
    s = cfg.seg
    return WeakLabelOptions(float(s.min_tumour_fraction), float(s.negative_margin), tuple(s.normal_labels),
                            float(s.neg_per_pos), int(s.max_train), int(s.max_val), int(s.max_test),
                            int(s.max_ambiguous), int(s.data_seed))


def cohort_paths(cfg: DictConfig) -> CohortPaths:
    d = cfg.data
    return CohortPaths(Path(d.labels), Path(d.slides), Path(d.out), Path(d.masks) if d.masks else None)


def patch_sets(cfg: DictConfig, report: StageReport, build: bool) -> SegData:
    """The cached train/val/test patch sets (built, or checked up to date when ``build`` is False), their
    fingerprint, and the weak-label statistics over every tiled patch of each split (printed)."""
    labels = Path(cfg.data.labels)
    if not labels.exists():
        raise CohortError(f"{labels}: labels file not found (set data.labels)")
    entries = read_labels(labels, cfg.data.slides)
    split = resolve_split(entries, labels, cfg.data.out, split_params(cfg)).assignment
    weak = weak_label_options(cfg)
    index, missing = index_cohort(cohort_paths(cfg), split, weak)
    for sid, why in missing.items():
        report.failed(sid, why)
    fp = fingerprint(index, weak)
    sets: dict[str, PatchSet] = {}
    for k, part in enumerate(SPLITS):
        path = cache_path(cfg.data.out, part)
        if not cache_complete(path, fp):
            if not build:
                raise InputError(f"{path}: missing or made from other inputs/parameters; run `fbta seg-teacher` first")
            keep = select(index, part, weak, k)
            t0 = time.perf_counter()
            n = write_cache(path, index, keep, fp)
            print(f"seg: cached {n} {part} patches → {path} ({time.perf_counter() - t0:.1f} s)", flush=True)
        sets[part] = PatchSet(path)
    for sl in index:
        report.done(sl.entry.slide_id, 0.0, split=sl.split, patches=int(len(sl.coords)),
                    positive=int((sl.group == POS).sum()), ambiguous=int((sl.group == AMBIGUOUS).sum()))
    stats = label_stats(index)
    for part, ps in sets.items():
        stats[part]["cached"] = ps.counts()
    print(label_lines(stats, cfg.seg.min_tumour_fraction, cfg.seg.negative_margin), flush=True)
    train, val = sets["train"], sets["val"]
    if len(train) == 0 or train.labels.min() == train.labels.max():
        what = "empty" if len(train) == 0 else f"all {'positive' if train.labels[0] else 'negative'}"
        raise CohortError(f"{train.path}: the training patches are {what}; weak supervision needs both "
                          f"(check data.masks, seg.normal_labels and seg.min_tumour_fraction={cfg.seg.min_tumour_fraction})")
    if len(val) == 0 or not (val.group == POS).any():
        raise CohortError(f"{val.path}: no positive validation patch (tumour share ≥ seg.min_tumour_fraction="
                          f"{cfg.seg.min_tumour_fraction}); model selection by F1 needs some")
    return SegData(sets, fp, stats, index)


def label_lines(stats: Mapping[str, Mapping[str, Any]], min_fraction: float, margin: float) -> str:
    """The weak-label statistics a person checks before trusting any score (one line per split)."""
    neg = "no tumour" + (f" within {margin:g} patch side(s)" if margin > 0 else "")
    lines = [f"seg: weak labels — positive: tumour share ≥ {min_fraction:g}; negative: {neg}; "
             "ambiguous: in between (never trained on, scored as their own group)"]
    for part, st in stats.items():
        med = st["median_share_positive"]
        c = st.get("cached", {})
        lines.append(f"seg:   {part:<5} {st['slides']:>3} slides: {st['positive']} positive (median share "
                     f"{'-' if isinstance(med, float) and math.isnan(med) else f'{med:.2f}'}), {st['negative']} negative, "
                     f"{st['ambiguous']} ambiguous → kept {c.get('positive', 0)} + {c.get('negative', 0)} + "
                     f"{c.get('ambiguous', 0)}")
    return "\n".join(lines)


def describe(sets: dict[str, PatchSet]) -> str:
    return " · ".join(f"{p} {ps.counts()['patches']} ({ps.counts()['positive']} positive, "
                      f"{ps.counts()['ambiguous']} ambiguous, {ps.counts()['slides']} slides)" for p, ps in sets.items())


def baselines_of(ps: PatchSet, sigma: float, threshold: float) -> dict[str, SegScores]:
    """``{"baseline_all_background": …, "baseline_all_tumour": …}`` on one patch set."""
    return {f"baseline_{k}": v for k, v in baseline_scores(ps.masks, sigma, threshold, ps.group).items()}


TABLE_COLS = (("f1", "F1"), ("iou", "IoU"), ("tumour_f1_pos", "tF1+"), ("tumour_iou_pos", "tIoU+"),
              ("background_f1_neg", "bF1-"), ("ambiguous_f1", "ambF1"), ("hausdorff", "HD px"))


def scores_table(title: str, rows: Mapping[str, SegScores]) -> str:
    """Models and the trivial baselines side by side, scored on the same patches."""
    width = max(len(k) for k in rows)
    head = f"{'':<{width}}  " + "  ".join(f"{h:>6}" for _, h in TABLE_COLS)
    lines = [title, head]
    for name, sc in rows.items():
        d = sc.as_dict()
        vals = "  ".join("     -" if d[k] is None or (isinstance(d[k], float) and math.isnan(d[k]))
                         else (f"{d[k]:>6.1f}" if k == "hausdorff" else f"{d[k]:>6.3f}") for k, _ in TABLE_COLS)
        lines.append(f"{name:<{width}}  {vals}")
    any_sc = next(iter(rows.values()))
    lines.append(f"(F1/IoU: mean over {any_sc.n} patches — tumour class on {any_sc.n_pos} positives (tF1+), background "
                 f"class on {any_sc.n_neg} negatives (bF1-); ambF1 on {any_sc.n_ambiguous} ambiguous patches, "
                 "outside the mean)")
    return "\n".join(lines)


def no_beat_line(stage: str, result: Any) -> str:
    """The ONE line a stage prints when no epoch beat the trivial baselines on validation."""
    baselines = result.extra.get("baselines") or {}
    best = max(baselines.items(), key=lambda kv: kv[1].f1)[0] if baselines else "baseline"
    return (f"{stage}: no epoch beat the trivial baselines on validation (best val F1 {result.best.val.f1:.3f} ≤ "
            f"{result.extra['floor']:.3f}, {best}); kept epoch {result.best_epoch} as a fallback marked "
            "beats_baselines=false — `fbta register` will not promote it")


def write_pseudo_masks(dest: Path, net: SideOutputNet, ps: PatchSet, opts: SegOptions, device: torch.device,
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


def resumable(cfg: DictConfig, folder: Path, *inputs: Any) -> Optional[Resumable]:
    """The stage's resume.pt (``seg.resume``), valid only for this seg configuration and these inputs."""
    if not cfg.seg.resume:
        return None
    blob = json.dumps({"seg": OmegaConf.to_container(cfg.seg, resolve=True), "inputs": inputs}, sort_keys=True,
                      default=str)
    return Resumable(folder / RESUME, hashlib.sha256(blob.encode()).hexdigest()[:16])


def write_history(cfg: DictConfig, folder: Path, name: str, history: list[Epoch]) -> list[dict[str, Any]]:
    rows = [e.as_row() for e in history]
    write_csv(folder / "history.csv", rows)
    write_csv(out_dir(cfg, "reports", "plots") / f"{name}.csv", rows)
    return rows


def metrics_entry(scores: Any, extra: dict[str, Any]) -> dict[str, Any]:
    d = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in scores.as_dict().items()}
    return {**d, **extra}


def baseline_entries(test: Mapping[str, SegScores], val: Mapping[str, SegScores]) -> dict[str, dict[str, Any]]:
    """``segmentation.baseline_*`` entries for metrics.json: test scores plus the validation F1 (the floor)."""
    return {k: metrics_entry(v, {"val_f1": round(val[k].f1, 6)}) for k, v in test.items()}


def log_outcome(mlrun: Any, folder: Path, best_epoch: int, best_val_f1: float, test: Any,
                overview: Optional[Path], **metrics: float) -> None:
    """A finished seg stage's MLflow record: best epoch, test scores, the model folder's files, the overlays."""
    from fbta.seg.model import META, WEIGHTS

    mlrun.log_metrics({"best_epoch": best_epoch, "best_val_f1": best_val_f1, **metrics,
                       **{f"test_{k}": v for k, v in test.as_dict().items()
                          if not (isinstance(v, float) and math.isnan(v))}})
    for f in (WEIGHTS, META, "history.csv", "config.yaml"):
        mlrun.log_artifact(folder / f, "model")
    if overview is not None:  # seg.overlays=0 draws none
        mlrun.log_artifact(overview, "plots")


def write_slide_maps(cfg: DictConfig, data: SegData, predict: Any, dest: Path, model: str, stage: str
                     ) -> list[dict[str, Any]]:
    """``dest/seg_slide_<slide_id>.png`` for up to ``seg.slide_maps`` test slides (annotated ones first)."""
    from dataclasses import asdict

    from fbta.seg.slide_map import pick_slides, save_slide_map, slide_map

    s = cfg.seg
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("seg_slide_*.png"):  # a previous run's slides must not linger beside this run's
        old.unlink()
    test = {sl.entry.slide_id: sl for sl in data.index if sl.split == "test"}
    chosen = pick_slides([(sid, sl.mask is not None and bool(sl.mask.any())) for sid, sl in test.items()],
                         int(s.slide_maps))
    infos: list[dict[str, Any]] = []
    for sid in chosen:
        sl = test[sid]
        t0 = time.perf_counter()
        try:
            pic, info = slide_map(sid, sl.entry.path, sl.coords, sl.attrs, predict, csv_mpp=sl.entry.mpp,
                                  annotation=sl.mask, thumbnail=Path(cfg.data.out, "reports", "plots", "thumbnails",
                                                                     f"{sid}.png"),
                                  max_px=int(s.slide_map_px), max_patches=int(s.slide_map_max_patches),
                                  seed=int(s.data_seed), sigma=float(s.sigma), threshold=float(s.threshold),
                                  label=str(sl.entry.label or ""), model=model)
            path = save_slide_map(dest / f"seg_slide_{sid}.png", pic)
        except Exception as exc:  # noqa: BLE001 - a picture must not throw away a trained model
            print(f"{stage}: slide map of {sid} not drawn ({type(exc).__name__}: {exc})", flush=True)
            continue
        infos.append({**asdict(info), "path": str(path), "seconds": round(time.perf_counter() - t0, 2)})
    if infos:
        print(f"{stage}: slide maps → {dest} (" + ", ".join(
            f"{i['slide_id']}: {i['patches']} patches" + (f", Dice {i['dice']:.3f}" if i["dice"] is not None else "")
            for i in infos) + ")", flush=True)
    return infos
