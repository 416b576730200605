"""``fbta seg-distill``: IKD-MIL stage 2 — fusion-knowledge distillation → ``models/seg_student``.

Reads the patch caches and the frozen teacher written by ``fbta seg-teacher``,
distils (fusion KD + OEEM-weighted CE, role reversal on a schedule), keeps the
student with the best validation F1 among the epochs that beat both trivial
baselines, scores it on the test split (``segmentation.student.*`` in
``reports/metrics/seg_distill.json`` and ``reports/metrics.json``) beside the
teacher and the baselines, writes its pseudo-masks of the training patches,
overlays of image, ground truth, teacher and student, and slide-level maps of
a few test slides (``reports/plots/segmentation/slides/seg_slide_<id>.png``).
One MLflow run, with per-epoch curves.
"""
from __future__ import annotations

import copy
import platform
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from fbta.config import InputError, save_config
from fbta.io.metrics import publish_metrics
from fbta.seg.distill import DistillOptions, fit_distill
from fbta.seg.model import META, load_segmenter, predict_fused, save_segmenter
from fbta.seg.network import create_segnet
from fbta.seg.overlays import save_test_overlays
from fbta.seg.metrics import selection_floor
from fbta.stages.seg_common import baselines_of, check_config, describe, fit_options, log_outcome, resumable, metrics_entry, \
    no_beat_line, patch_sets, resolve_device, scores_table, write_history, write_pseudo_masks, write_slide_maps
from fbta.seg.train import evaluate
from fbta.training.loop import seed_everything
from fbta.stages.common import out_dir
from fbta.slide_status import StageReport
from fbta.tracking import stage_run


def run(cfg: DictConfig) -> int:
    check_config(cfg)
    s, d = cfg.seg, cfg.seg.distill
    report = StageReport("seg_distill")
    device = resolve_device(s.device, "seg.device")
    teacher_dir = out_dir(cfg, "models", "seg_teacher")
    seg_teacher = load_segmenter(teacher_dir, device)
    data = patch_sets(cfg, report, build=False)
    sets, fp = data.sets, data.fingerprint
    if seg_teacher.meta.get("patches_fingerprint") != fp:
        raise InputError(f"{teacher_dir}: the teacher was trained on other patches; re-run `fbta seg-teacher`")
    if int(seg_teacher.meta.get("input_size") or 0) != int(s.input_size):
        raise InputError(f"{teacher_dir}: teacher input_size {seg_teacher.meta.get('input_size')} ≠ seg.input_size "
                         f"{s.input_size}; re-run `fbta seg-teacher`")
    print(f"seg-distill: {describe(sets)}", flush=True)
    opts = fit_options(cfg, "distill")
    teacher = seg_teacher.net
    teacher_val, _ = evaluate(teacher, sets["val"], opts, device)
    teacher_test, teacher_probs = evaluate(teacher, sets["test"], opts, device)
    base_val = baselines_of(sets["val"], s.sigma, s.threshold)
    base_test = baselines_of(sets["test"], s.sigma, s.threshold)
    floor = selection_floor(base_val)
    seed_everything(opts.seed, s.deterministic)
    if d.init == "teacher":
        student, weights_id = copy.deepcopy(teacher), seg_teacher.meta.get("weights")
    else:
        student, weights_id = create_segnet(s.backbone, s.weights, s.out_indices, s.fusion, s.fusion_weights)
    dopts = DistillOptions(d.kd, d.weighted_ce, d.ce_weight, d.role_reversal, d.reversal_start, d.reversal_every,
                           d.ce_form)
    folder = out_dir(cfg, "models", "seg_student")
    (folder / META).unlink(missing_ok=True)
    meta = {"role": "student", "backbone": s.backbone, "weights": weights_id, "input_size": s.input_size,
            "patch_size": int(sets["train"].images.shape[1]), "sigma": s.sigma, "threshold": s.threshold,
            "kd": d.kd, "weighted_ce": d.weighted_ce, "role_reversal": d.role_reversal, "init": d.init,
            "teacher": str(teacher_dir), "teacher_val_f1": round(teacher_val.f1, 6),
            "teacher_beats_baselines": bool(teacher_val.f1 > floor), "patches_fingerprint": fp,
            "seed": opts.seed, "device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    started = time.time()
    with stage_run(cfg, "seg_distill", "seg-distill", {"fbta.seg.role": "student", "fbta.seg.kd": d.kd}) as mlrun:
        meta["mlflow_run_id"] = mlrun.run_id

        def on_epoch(ep, improved: bool) -> None:  # noqa: ANN001
            mlrun.log_epoch(ep)

        resume = resumable(cfg, folder, fp, seg_teacher.meta)
        result = fit_distill(teacher, student, teacher_val.f1, sets["train"], sets["val"], opts, dopts, device, on_epoch,
                             floor=floor, resume=resume)
        for ep in result.history[:result.resumed_from]:  # this MLflow run gets the whole curve
            mlrun.log_epoch(ep)
        beats = bool(result.extra["beats_baselines"])
        student.load_state_dict(result.best_state)
        test, test_probs = evaluate(student, sets["test"], opts, device)
        reversals = result.extra["reversals"]
        per_epoch = sum(e.as_row()["train_seconds"] for e in result.history) / len(result.history)
        final = {**meta, "epoch": result.best_epoch, "val_f1": result.best.val.f1, "val_iou": result.best.val.iou,
                 "beats_baselines": beats, "baseline_val_f1": round(floor, 6),
                 "baselines_val": {k: v.as_dict() for k, v in base_val.items()}, "test": test.as_dict(),
                 "teacher_test": teacher_test.as_dict(), "reversals": reversals,
                 "beat_teacher": result.extra["beat_teacher"], "epochs_run": len(result.history),
                 "seconds_per_epoch": round(per_epoch, 2), "seconds": round(time.time() - started, 2), "complete": True}
        save_segmenter(folder, student, final)
        write_history(cfg, folder, "seg_distill", result.history)
        if resume is not None:
            resume.finish()
        save_config(cfg, folder / "config.yaml")
        write_pseudo_masks(out_dir(cfg, "seg", "pseudo_masks") / "student_train.h5", student, sets["train"], opts,
                           device, "seg_student")
        plots = save_test_overlays(out_dir(cfg, "reports", "plots", "segmentation", "student"), sets["test"],
                                   {"teacher": teacher_probs, "student": test_probs}, s.overlays, s.data_seed, s.sigma,
                                   s.threshold)
        maps = write_slide_maps(cfg, data, lambda x: predict_fused(student, x, opts.input_size, device),
                                out_dir(cfg, "reports", "plots", "segmentation", "slides"), "student", "seg-distill")
        for m in maps:
            mlrun.log_artifact(Path(m["path"]), "plots/slides")
        entry = metrics_entry(test, {"val_f1": round(result.best.val.f1, 6), "epoch": result.best_epoch,
                                     "reversals": len(reversals), "beat_teacher": bool(result.extra["beat_teacher"]),
                                     "teacher_val_f1": round(teacher_val.f1, 6), "kd": d.kd,
                                     "beats_baselines": beats,
                                     "weighted_ce": bool(d.weighted_ce), "role_reversal": bool(d.role_reversal),
                                     "seconds_per_epoch": round(per_epoch, 2)})
        publish_metrics(out_dir(cfg, "reports"), "seg_distill", {"segmentation": {"student": entry}})
        log_outcome(mlrun, folder, result.best_epoch, result.best.val.f1, test, plots[-1] if plots else None, reversals=len(reversals),
                    beats_baselines=float(beats), baseline_val_f1=floor)
    report.write(out_dir(cfg, "reports", "status") / "seg_distill.json")
    print(scores_table("seg-distill: test scores beside the teacher and the trivial baselines (same patches, same metric)",
                       {**base_test, "teacher": teacher_test, "student": test}), flush=True)
    if not beats:
        print(no_beat_line("seg-distill", result), flush=True)
    print(f"seg-distill: best epoch {result.best_epoch} (val F1 {result.best.val.f1:.3f}, teacher {teacher_val.f1:.3f}); "
          f"test F1 {test.f1:.3f} (teacher {teacher_test.f1:.3f}), IoU {test.iou:.3f} (teacher {teacher_test.iou:.3f}); "
          f"{len(reversals)} role reversal(s); {per_epoch:.1f} s/epoch (training); model → {folder}", flush=True)
    return report.exit_code(cfg.run.strict)
