"""``fbta seg-teacher``: IKD-MIL stage 1 — the patch caches, then the MIL teacher → ``models/seg_teacher``.

Builds ``seg/patches/{train,val,test}.h5`` (skipped when up to date) from weak
patch labels (positive / negative / ambiguous, printed per split), trains the
side-output network from broadcast patch labels (best epoch by validation F1
among the epochs that beat both trivial baselines), scores it and the trivial
all-background / all-tumour maps on the test split (``segmentation.teacher.*``
and ``segmentation.baseline_all_{background,tumour}.*`` in
``reports/metrics/seg_teacher.json`` and ``reports/metrics.json``), writes the
teacher's pseudo-masks of the training patches and a few overlay PNGs. One
MLflow run, with per-epoch curves.
"""
from __future__ import annotations

import platform
import time

import torch
from omegaconf import DictConfig

from fbta.config import save_config
from fbta.io.metrics import publish_metrics
from fbta.seg.model import META, save_segmenter
from fbta.seg.network import create_segnet
from fbta.seg.overlays import save_test_overlays
from fbta.stages.seg_common import baseline_entries, baselines_of, check_config, describe, fit_options, log_outcome, resumable, \
    metrics_entry, no_beat_line, patch_sets, resolve_device, scores_table, write_history, write_pseudo_masks
from fbta.seg.train import evaluate, fit_teacher
from fbta.training.loop import seed_everything
from fbta.stages.common import out_dir
from fbta.slide_status import StageReport
from fbta.tracking import stage_run


def run(cfg: DictConfig) -> int:
    check_config(cfg)
    s = cfg.seg
    report = StageReport("seg_teacher")
    data = patch_sets(cfg, report, build=True)
    sets, fp = data.sets, data.fingerprint
    print(f"seg-teacher: {describe(sets)}", flush=True)
    device = resolve_device(s.device, "seg.device")
    opts = fit_options(cfg, "teacher")
    seed_everything(opts.seed, s.deterministic)
    net, weights_id = create_segnet(s.backbone, s.weights, s.out_indices, s.fusion, s.fusion_weights)
    folder = out_dir(cfg, "models", "seg_teacher")
    (folder / META).unlink(missing_ok=True)  # incomplete until this run's first best epoch
    meta = {"role": "teacher", "backbone": s.backbone, "weights": weights_id, "input_size": s.input_size,
            "patch_size": int(sets["train"].images.shape[1]), "sigma": s.sigma, "threshold": s.threshold,
            "loss": s.teacher.loss, "patches_fingerprint": fp, "seed": opts.seed, "device": str(device),
            "counts": {p: ps.counts() for p, ps in sets.items()}, "labels": data.stats,
            "min_tumour_fraction": s.min_tumour_fraction, "negative_margin": s.negative_margin,
            "torch": torch.__version__, "python": platform.python_version()}
    started = time.time()
    with stage_run(cfg, "seg_teacher", "seg-teacher", {"fbta.seg.role": "teacher"}) as mlrun:
        meta["mlflow_run_id"] = mlrun.run_id
        mlrun.log_metrics({f"labels_{p}_{k}": v for p, st in data.stats.items() for k, v in st.items()
                           if isinstance(v, (int, float))})

        def on_epoch(ep, improved: bool) -> None:  # noqa: ANN001
            mlrun.log_epoch(ep)
            if improved:
                save_segmenter(folder, net, {**meta, "epoch": ep.epoch, "val_f1": ep.val.f1, "beats_baselines": True,
                                             "complete": False})

        resume = resumable(cfg, folder, fp)
        result = fit_teacher(net, sets["train"], sets["val"], opts, device, on_epoch, resume=resume)
        for ep in result.history[:result.resumed_from]:  # this MLflow run gets the whole curve
            mlrun.log_epoch(ep)
        net.load_state_dict(result.best_state)
        beats = bool(result.extra["beats_baselines"])
        test, test_probs = evaluate(net, sets["test"], opts, device)
        base_test = baselines_of(sets["test"], s.sigma, s.threshold)
        base_val = {f"baseline_{k}": v for k, v in result.extra["baselines"].items()}
        per_epoch = sum(e.as_row()["train_seconds"] for e in result.history) / len(result.history)
        final = {**meta, "epoch": result.best_epoch, "val_f1": result.best.val.f1, "val_iou": result.best.val.iou,
                 "beats_baselines": beats, "baseline_val_f1": round(result.extra["floor"], 6),
                 "baselines_val": {k: v.as_dict() for k, v in base_val.items()},
                 "test": test.as_dict(), "epochs_run": len(result.history), "seconds_per_epoch": round(per_epoch, 2),
                 "seconds": round(time.time() - started, 2), "complete": True}
        save_segmenter(folder, net, final)
        write_history(cfg, folder, "seg_teacher", result.history)
        if resume is not None:
            resume.finish()
        save_config(cfg, folder / "config.yaml")
        write_pseudo_masks(out_dir(cfg, "seg", "pseudo_masks") / "teacher_train.h5", net, sets["train"], opts,
                           device, "seg_teacher")
        plots = save_test_overlays(out_dir(cfg, "reports", "plots", "segmentation", "teacher"), sets["test"],
                                   {"teacher": test_probs}, s.overlays, s.data_seed, s.sigma, s.threshold)
        entry = metrics_entry(test, {"val_f1": round(result.best.val.f1, 6), "epoch": result.best_epoch,
                                     "beats_baselines": bool(beats),
                                     "seconds_per_epoch": round(per_epoch, 2)})
        publish_metrics(out_dir(cfg, "reports"), "seg_teacher",
                        {"segmentation": {"teacher": entry, **baseline_entries(base_test, base_val)}})
        log_outcome(mlrun, folder, result.best_epoch, result.best.val.f1, test, plots[-1] if plots else None,
                    beats_baselines=float(beats), baseline_val_f1=result.extra["floor"],
                    **{f"{k}_test_f1": v.f1 for k, v in base_test.items()})
    report.write(out_dir(cfg, "reports", "status") / "seg_teacher.json")
    print(scores_table("seg-teacher: test scores beside the trivial baselines (same patches, same metric)",
                       {**base_test, "teacher": test}), flush=True)
    if not beats:
        print(no_beat_line("seg-teacher", result), flush=True)
    print(f"seg-teacher: best epoch {result.best_epoch} (val F1 {result.best.val.f1:.3f}, baselines {result.extra['floor']:.3f}); "
          f"test F1 {test.f1:.3f}, IoU {test.iou:.3f}, Hausdorff {test.hausdorff:.1f} px; {per_epoch:.1f} s/epoch "
          f"(training); model → {folder}", flush=True)
    if report.count("failed"):
        print(report.summary(), flush=True)
    return report.exit_code(cfg.run.strict)
