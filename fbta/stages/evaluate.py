"""``fbta evaluate``: the trained model on the test split → ⚑ ``reports/metrics.json`` and plots.

Merges ``classification.<variant>.{auc,acc,f1,arch,n,epoch}`` into
metrics.json (other keys untouched; the same keys go to the DVC fragment
``reports/metrics/evaluate_<variant>.json``), and writes for ``dvc plots``:
``reports/plots/roc_<variant>.csv`` (fpr, tpr), ``predictions_<variant>.csv``
(one row per slide: actual, predicted, probabilities — DVC's confusion
template), plus ``reports/confusion_<variant>.json`` (the matrix) and a ROC
PNG. Refuses to score a slide the model was trained or selected on.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fbta.config import ConfigError
from fbta.io.atomic import atomic_write_text
from fbta.e2e.classifier import load_classifier
from fbta.io.metrics import publish_metrics, write_csv
from fbta.mil.checkpoint import CheckpointError
from fbta.mil.data import BagDataset, BagItem
from fbta.mil.metrics import Scores, confusion_matrix, roc_points, score
from fbta.mil.plots import save_roc
from fbta.mil.train import predict, resolve_device
from fbta.slides.cohort import CohortError
from fbta.stages.common import features_dir, out_dir
from fbta.stages.milrun import check_method_and_arch, load_cohort, model_folder, variant
from fbta.tracking import stage_run


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def held_out(cfg: DictConfig, meta: dict, folder: Path) -> tuple[str, list[BagItem], list[str]]:
    """The ``evaluate.split`` slides with features, refusing any the model was trained or selected on."""
    part = cfg.evaluate.split
    if part not in ("test", "val"):
        raise ConfigError(f"evaluate.split='{part}' must be test or val")
    split, cohort = load_cohort(cfg)
    if list(meta["classes"]) != cohort.classes:
        raise CheckpointError(f"{folder}: model classes {meta['classes']} differ from labels.csv's {cohort.classes}")
    if int(meta["in_dim"]) != cohort.in_dim:
        raise CheckpointError(f"{features_dir(cfg)}: {cohort.in_dim}-d features, but the model in {folder} was "
                              f"trained on {meta['in_dim']}-d ones; set data.features / extract.model to match")
    for sid, why in sorted(cohort.missing.items()):
        if split.assignment.get(sid) == part:  # scored on fewer slides: say which and why
            print(f"note: {part} slide {sid} left out: {why}", file=sys.stderr, flush=True)
    items = cohort.parts[part]
    if not items:
        raise CohortError(f"no {part} slide with features to evaluate (split from {split.source})")
    used = set(meta["split"]["train"]) | (set(meta["split"]["val"]) if part == "test" else set())
    leaked = sorted(it.slide_id for it in items if it.slide_id in used)
    if leaked:
        raise CheckpointError(f"{folder}: {part} slide(s) {', '.join(leaked[:5])} were used to train or select "
                              f"this model (split changed since training?); retrain with the current split")
    return part, items, cohort.classes


def variant_files(cfg: DictConfig, name: str) -> dict[str, Path]:
    """Where a scored variant's ROC, predictions and confusion files go (written by :func:`report_variant`)."""
    reports, plots = out_dir(cfg, "reports"), out_dir(cfg, "reports", "plots")
    return {"roc_csv": plots / f"roc_{name}.csv", "roc_png": plots / f"roc_{name}.png",
            "predictions": plots / f"predictions_{name}.csv", "confusion": reports / f"confusion_{name}.json"}


def report_variant(cfg: DictConfig, variant_name: str, part: str, items: list[BagItem], classes: list[str],
                   probs: np.ndarray, meta: dict, extra: dict | None = None, fragment: str = "evaluate") -> Scores:
    """⚑ ``classification.<variant>`` into metrics.json (+ fragment), ROC/predictions/confusion files, MLflow run."""
    name = variant_name if part == "test" else f"{variant_name}_val"
    y = np.array([it.label for it in items], dtype=np.int64)
    s = score(y, probs)
    pred = probs.argmax(1)
    cm = confusion_matrix(y, pred, len(classes))
    entry = {"auc": _finite(s.auc), "acc": _finite(s.acc), "f1": _finite(s.f1), "arch": meta["arch"],
             "n": s.n, "epoch": meta.get("epoch"), **(extra or {})}
    files = variant_files(cfg, name)
    publish_metrics(out_dir(cfg, "reports"), f"{fragment}_{name}", {"classification": {name: entry}})
    roc = roc_points(y, probs, classes)
    write_csv(files["roc_csv"], roc, ["fpr", "tpr", "threshold", "class"])
    write_csv(files["predictions"], [
        {"slide_id": it.slide_id, "actual": classes[it.label], "predicted": classes[int(q)],
         **{f"prob_{c}": float(p[i]) for i, c in enumerate(classes)}}
        for it, q, p in zip(items, pred, probs)])
    atomic_write_text(files["confusion"], json.dumps(
        {"classes": classes, "rows": "actual", "columns": "predicted", "matrix": cm.tolist(),
         "arch": meta["arch"], "split": part}, indent=2) + "\n")
    save_roc(roc, files["roc_png"], f"{name} {meta['arch']} ({part}, n={s.n}): AUC {s.auc:.3f}")

    tags = {"fbta.method": meta.get("method", ""), "fbta.arch": meta["arch"], "fbta.variant": name,
            "fbta.train_run_id": meta.get("mlflow_run_id") or "", "fbta.data_out": cfg.data.out}
    with stage_run(cfg, fragment, f"{fragment}-{name}-{meta['arch']}", tags) as mlrun:
        mlrun.log_metrics({f"{part}_auc": s.auc, f"{part}_acc": s.acc, f"{part}_f1": s.f1, f"{part}_loss": s.loss,
                           **{k: v for k, v in (extra or {}).items() if isinstance(v, (int, float))}})
        for f in files.values():
            mlrun.log_artifact(f, "evaluation")

    print(f"{fragment}: {name} {meta['arch']} on {s.n} {part} slides — AUC {s.auc:.3f}, accuracy {s.acc:.3f}, "
          f"macro-F1 {s.f1:.3f}", flush=True)
    corner = "actual \\ predicted"
    first, width = max(len(corner), *map(len, classes)) + 2, max(map(len, classes)) + 2
    print("  " + corner.ljust(first) + "".join(c.rjust(width) for c in classes))
    for c, row in zip(classes, cm):
        print("  " + c.ljust(first) + "".join(str(v).rjust(width) for v in row))
    return s


def run(cfg: DictConfig) -> int:
    """The trained model's deployed path (FBTA: translator → EMA MIL) on the held-out slides."""
    check_method_and_arch(cfg)
    folder = model_folder(cfg)
    device = resolve_device(cfg.train.device, "train.device")
    model = load_classifier(folder, device)
    part, items, classes = held_out(cfg, model.meta, folder)
    probs, _ = predict(model, BagDataset(items), device)
    report_variant(cfg, variant(cfg), part, items, classes, probs, model.meta)
    return 0
