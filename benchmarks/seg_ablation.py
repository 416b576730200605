"""IKD-MIL on the demo cohort: teacher vs student over seeds, role reversals, and the ablations.

Uses the patch caches of an already-run ``fbta seg-teacher`` (``--out``) and
the library directly (no MLflow). Per seed: a teacher, then a student with the
default method; on the ablation seeds (``--ablation-seeds``, default the first) also
the variants of ``--variants``: the authors' weighted CE on (``weighted_ce``; off by
default since #15), no role reversal, block-wise KD instead of fusion KD. The trivial all-background and
all-tumour maps are scored beside them on the same test patches, and every
row says whether its selected epoch beat them on validation. Writes the table
incrementally to reports/bench/seg_ablation.json and a row to BENCHMARKS.md at
the end.

    python benchmarks/seg_ablation.py --out /tmp/seg --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, record  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from fbta.config import load_config  # noqa: E402
from fbta.io.atomic import atomic_write_text  # noqa: E402
from fbta.training.loop import seed_everything  # noqa: E402
from fbta.seg.dataset import PatchSet, cache_path  # noqa: E402
from fbta.seg.metrics import SegScores  # noqa: E402
from fbta.seg.distill import DistillOptions, fit_distill  # noqa: E402
from fbta.seg.network import create_segnet  # noqa: E402
from fbta.stages.seg_common import baselines_of, fit_options, resolve_device  # noqa: E402
from fbta.seg.train import evaluate, fit_teacher  # noqa: E402

VARIANTS = {  # DistillOptions changes; "init" (backbone | teacher) is where the student starts
    "full": {},
    "init_teacher": {"init": "teacher"},
    "no_weighted_ce": {"weighted_ce": False},
    "weighted_ce": {"weighted_ce": True},  # the authors' OEEM term on (off by default since #15)
    "no_role_reversal": {"role_reversal": False},
    "blockwise_kd": {"kd": "blockwise"},
}


def groups(sc: SegScores) -> dict[str, float]:
    """Test scores overall and per weak-label group (positives, negatives, the ambiguous patches left out)."""
    return {"test_f1": sc.f1, "test_iou": sc.iou, "test_hausdorff": sc.hausdorff,
            "test_tumour_f1_pos": sc.tumour_f1_pos, "test_tumour_iou_pos": sc.tumour_iou_pos,
            "test_background_f1_neg": sc.background_f1_neg, "test_ambiguous_f1": sc.ambiguous_f1}


def train_teacher(cfg, sets: dict[str, PatchSet], seed: int, device, epochs: int | None = None):  # noqa: ANN001,ANN201
    """One seeded teacher (``epochs``: seg.teacher.epochs by default) → (net at its best epoch, fit, test, seconds)."""
    s = cfg.seg
    opts = fit_options(cfg, "teacher")
    opts.seed = seed
    if epochs is not None:
        opts.epochs = int(epochs)
    seed_everything(seed, s.deterministic)
    net, _ = create_segnet(s.backbone, s.weights, s.out_indices, s.fusion, s.fusion_weights)
    t0 = time.perf_counter()
    res = fit_teacher(net, sets["train"], sets["val"], opts, device)
    net.load_state_dict(res.best_state)
    test, _ = evaluate(net, sets["test"], opts, device)
    return net, res, test, time.perf_counter() - t0


def long_teacher(cfg, sets: dict[str, PatchSet], seed: int, device) -> dict:  # noqa: ANN001
    """The compute control: one teacher for teacher.epochs + distill.epochs epochs, best by validation F1."""
    epochs = int(cfg.seg.teacher.epochs) + int(cfg.seg.distill.epochs)
    _, res, test, seconds = train_teacher(cfg, sets, seed, device, epochs)
    return {"seed": seed, "model": "teacher", "variant": "long", "epochs": epochs, "val_f1": res.best.val.f1,
            **groups(test), "best_epoch": res.best_epoch, "beats_baselines": res.extra["beats_baselines"],
            "wall_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="data.out of a finished `fbta seg-teacher` run (its patch caches)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ablation-seeds", type=int, nargs="*", default=None, help="default: the first seed")
    ap.add_argument("--name", default="seg_ablation", help="results: reports/bench/<name>.json")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="student variants on the ablation seeds (full runs on every seed)")
    ap.add_argument("--long-teacher", action="store_true",
                    help="also a teacher trained teacher.epochs + distill.epochs epochs: the student's total budget, "
                         "so that distillation is compared with simply training longer")
    ap.add_argument("overrides", nargs="*", help="params overrides, e.g. seg.teacher.epochs=8")
    args = ap.parse_args()
    cfg = load_config(ROOT / "params.yaml", [f"data.out={args.out}", "run.progress=false", *args.overrides])
    s = cfg.seg
    sets = {p: PatchSet(cache_path(args.out, p)) for p in ("train", "val", "test")}
    device = resolve_device(s.device)
    ablation_seeds = args.seeds[:1] if args.ablation_seeds is None else args.ablation_seeds
    dest = ROOT / "reports" / "bench" / f"{args.name}.partial.json"
    final = ROOT / "reports" / "bench" / f"{args.name}.json"
    rows: list[dict] = []  # an interrupted run goes on; a finished one is extended (e.g. --long-teacher later)
    if dest.exists():
        rows = json.loads(dest.read_text())
    elif final.exists():
        rows = json.loads(final.read_text())["rows"]
    done = {(r["seed"], r["model"], r["variant"]) for r in rows}
    for name, sc in baselines_of(sets["test"], s.sigma, s.threshold).items():  # no training: once, seed "-"
        if ("-", name, "-") not in done:
            rows.append({"seed": "-", "model": name, "variant": "-", **groups(sc)})
            print(json.dumps(rows[-1]), flush=True)
    for seed in args.seeds:
        wanted = [v for v in VARIANTS if v == "full" or (seed in ablation_seeds and v in args.variants)]
        if args.long_teacher and (seed, "teacher", "long") not in done:
            rows.append(long_teacher(cfg, sets, seed, device))
            print(json.dumps(rows[-1]), flush=True)
            atomic_write_text(dest, json.dumps(rows, indent=2))
        if (seed, "teacher", "-") in done and all((seed, "student", v) in done for v in wanted):
            continue
        teacher, tr, t_test, t_seconds = train_teacher(cfg, sets, seed, device)
        t_epoch = sum(e.extra["train_seconds"] for e in tr.history) / len(tr.history)
        if (seed, "teacher", "-") not in done:  # same seed → the same teacher (deterministic)
            rows.append({"seed": seed, "model": "teacher", "variant": "-", "val_f1": tr.best.val.f1, **groups(t_test),
                         "best_epoch": tr.best_epoch,
                         "beats_baselines": tr.extra["beats_baselines"], "baseline_val_f1": tr.extra["floor"],
                         "s_per_epoch": round(t_epoch, 2), "wall_s": round(t_seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
        state = {k: v.clone() for k, v in teacher.state_dict().items()}
        for name, change in VARIANTS.items():
            if name not in wanted or (seed, "student", name) in done:
                continue
            d = s.distill
            base = dict(kd=d.kd, weighted_ce=d.weighted_ce, ce_weight=d.ce_weight, role_reversal=d.role_reversal,
                        reversal_start=d.reversal_start, reversal_every=d.reversal_every, ce_form=d.ce_form)
            change = dict(change)
            init = change.pop("init", d.init)
            dopts = DistillOptions(**{**base, **change})
            opts = fit_options(cfg, "distill")
            opts.seed = seed
            teacher.load_state_dict(state)
            seed_everything(seed, s.deterministic)
            student, _ = create_segnet(s.backbone, s.weights, s.out_indices, s.fusion, s.fusion_weights)
            if init == "teacher":
                student.load_state_dict(state)
            t0 = time.perf_counter()
            res = fit_distill(teacher, student, tr.best.val.f1, sets["train"], sets["val"], opts, dopts, device)
            student.load_state_dict(res.best_state)
            test, _ = evaluate(student, sets["test"], opts, device)
            epoch_s = sum(e.extra["train_seconds"] for e in res.history) / len(res.history)
            rows.append({"seed": seed, "model": "student", "variant": name, "val_f1": res.best.val.f1,
                         **groups(test), "best_epoch": res.best_epoch, "init": init, "reversals": len(res.extra["reversals"]),
                         "beats_baselines": res.extra["beats_baselines"], "baseline_val_f1": res.extra["floor"],
                         "beat_teacher_val": bool(res.extra["beat_teacher"]), "s_per_epoch": round(epoch_s, 2),
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
            atomic_write_text(dest, json.dumps(rows, indent=2))
    teachers = [r for r in rows if r["model"] == "teacher" and r["variant"] == "-"]
    fulls = [r for r in rows if r["variant"] == "full"]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    base = {r["model"]: r["test_f1"] for r in rows if r["model"].startswith("baseline_")}
    headline = (f"test F1 teacher {mean(teachers, 'test_f1'):.3f} vs student {mean(fulls, 'test_f1'):.3f}, IoU "
                f"{mean(teachers, 'test_iou'):.3f} vs {mean(fulls, 'test_iou'):.3f} over seeds {args.seeds}; "
                f"trivial maps: all-background {base.get('baseline_all_background', float('nan')):.3f}, all-tumour "
                f"{base.get('baseline_all_tumour', float('nan')):.3f}; {sum(r['reversals'] for r in fulls)} role "
                "reversal(s)")
    record(args.name, {"rows": rows, "params": {"seg": OmegaConf.to_container(cfg.seg)}}, headline)
    dest.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
