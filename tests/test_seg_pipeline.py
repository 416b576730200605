"""`fbta seg-teacher` → `fbta seg-distill` on a small real cohort (OpenSlide slides, PNG masks, MLflow sqlite)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from fbta.cli import main
from fbta.seg import load_segmenter

SMALL = ["synth.n_slides=8", "synth.width=1280", "synth.height=1280", "synth.tumour_fraction=0.3", "run.progress=false"]
TINY_NET = ["seg.backbone=test_efficientnet", "seg.weights=random", "seg.input_size=64", "seg.batch_size=4",
            "seg.max_train=16", "seg.max_val=8", "seg.max_test=8", "seg.overlays=3", "seg.device=cpu",
            "seg.teacher.epochs=2", "seg.distill.epochs=2", "seg.distill.reversal_start=1",
            "seg.distill.reversal_every=1", "seg.max_ambiguous=4", "seg.slide_maps=2", "seg.slide_map_px=256"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("segcohort")
    d = [f"data.slides={root}/slides", f"data.labels={root}/labels.csv", f"data.masks={root}/masks",
         f"data.out={root}/out", f"tracking.uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_root={root}/mlruns"]
    assert main(["synth", *d, *SMALL]) == 0
    assert main(["tile", *d, *SMALL]) == 0
    return d + SMALL + TINY_NET


# Long enough to learn the 8-slide cohort (measured: test F1 0.80 teacher and student vs 0.50 / 0.44 for the
# all-background / all-tumour maps), short enough for CI: ~50 s of training on 2 busy cores.
LEARN = ["seg.teacher.epochs=6", "seg.distill.epochs=4"]


# In CI (was slow-only): README's segmentation path end to end, teacher then fusion-KD student with role reversal
def test_teacher_then_distill_write_models_metrics_pseudo_masks_and_overlays(cohort: list[str], capsys):
    out = Path(cohort[3].split("=", 1)[1])
    assert main(["seg-teacher", *cohort, *LEARN]) == 0
    first = capsys.readouterr().out
    assert "cached" in first and "seg-teacher: best epoch" in first
    assert "seg: weak labels — positive: tumour share ≥ 0.5" in first and "ambiguous" in first
    assert "seg-teacher: epoch 6/6" in first and " s" in first  # one line per epoch with its wall time
    assert "baseline_all_background" in first and "baseline_all_tumour" in first  # the printed table
    assert main(["seg-distill", *cohort, *LEARN]) == 0
    second = capsys.readouterr().out
    assert "role reversal" in second and "baseline_all_tumour" in second and "seg-distill: slide maps" in second

    for role in ("teacher", "student"):
        meta = json.loads((out / f"models/seg_{role}/meta.json").read_text())
        assert meta["complete"] and 0 <= meta["val_f1"] <= 1 and meta["net"]["arch"] == "test_efficientnet"
    frag_t = json.loads((out / "reports/metrics/seg_teacher.json").read_text())
    frag_s = json.loads((out / "reports/metrics/seg_distill.json").read_text())
    merged = json.loads((out / "reports/metrics.json").read_text())
    for frag, role in ((frag_t, "teacher"), (frag_s, "student")):
        entry = frag["segmentation"][role]
        assert {"f1", "iou", "hausdorff", "tumour_f1_pos", "tumour_iou_pos", "background_f1_neg", "ambiguous_f1",
                "n", "n_pos", "n_neg", "n_ambiguous", "beats_baselines"} <= set(entry)
        assert entry["n"] == entry["n_pos"] + entry["n_neg"] <= 8 and entry["n_ambiguous"] <= 4
        assert merged["segmentation"][role] == entry
    assert isinstance(frag_s["segmentation"]["student"]["reversals"], int)
    for name in ("baseline_all_background", "baseline_all_tumour"):
        base = merged["segmentation"][name]
        assert {"f1", "iou", "tumour_f1_pos", "background_f1_neg", "val_f1"} <= set(base)
    assert merged["segmentation"]["baseline_all_background"]["tumour_f1_pos"] == 0.0
    assert merged["segmentation"]["baseline_all_background"]["background_f1_neg"] == 1.0
    # They must learn: defects guarded — a loss that ignores the labels or has its sign flipped, masks misaligned
    # with their patches, a student never trained (the trivial maps score ≈ 0.5 by construction, see README)
    trivial = max(merged["segmentation"][b]["f1"] for b in ("baseline_all_background", "baseline_all_tumour"))
    for role in ("teacher", "student"):
        entry = merged["segmentation"][role]
        assert entry["beats_baselines"] is True and entry["f1"] >= trivial + 0.15, (role, entry, trivial)
        assert entry["tumour_f1_pos"] > 0.5 and entry["background_f1_neg"] > 0.5, (role, entry)

    with h5py.File(out / "seg/patches/train.h5") as f:
        labels, n, group = f["labels"][:], len(f["images"]), f["group"][:]
        assert n <= 16 and 0 < labels.sum() < n and f["masks"].shape == (n, 256, 256)
        assert 2 not in group.tolist()  # ambiguous patches are never cached for training
        share = f["fraction"][:]
        assert (share[labels == 1] >= 0.5).all() and (share[labels == 0] == 0).all()
    for role in ("teacher", "student"):
        with h5py.File(out / f"seg/pseudo_masks/{role}_train.h5") as f:
            assert f["probs"].shape == (n, 256, 256) and f["probs"].dtype == np.uint8
    pngs = sorted(p.name for p in (out / "reports/plots/segmentation/student").glob("*.png"))
    assert "overview.png" in pngs and len(pngs) == 4
    maps = sorted((out / "reports/plots/segmentation/slides").glob("seg_slide_*.png"))
    assert 1 <= len(maps) <= 2
    for role in ("teacher", "student"):
        meta = json.loads((out / f"models/seg_{role}/meta.json").read_text())
        assert isinstance(meta["beats_baselines"], bool) and 0 <= meta["baseline_val_f1"] <= 1

    seg = load_segmenter(out / "models/seg_student")
    with h5py.File(out / "seg/patches/test.h5") as f:
        probs = seg.predict(f["images"][:2])
    assert probs.shape == (2, 256, 256) and 0 <= probs.min() and probs.max() <= 1

    assert main(["seg-teacher", *cohort, "seg.teacher.epochs=1"]) == 0  # caches up to date: not rebuilt
    assert "cached" not in capsys.readouterr().out


def test_bad_settings_and_missing_inputs_are_one_line_errors(tmp_path: Path, capsys):
    d = [f"data.out={tmp_path}/empty", "tracking.enabled=false", "run.progress=false"]
    assert main(["seg-teacher", *d, "seg.teacher.loss=focal"]) == 2
    assert "seg.teacher.loss='focal' must be one of dice, gmp_bce" in capsys.readouterr().err
    assert main(["seg-teacher", *d, "seg.fusion_weights=[0.5,0.5]"]) == 2
    assert "seg.fusion_weights has 2 values for 3" in capsys.readouterr().err
    assert main(["seg-distill", *d]) == 2
    err = capsys.readouterr().err
    assert "no trained segmenter" in err and "seg_teacher" in err and len(err.strip().splitlines()) == 1


# ~35 s (the module's cohort: synth + tile, then three short seg-teacher runs), kept in CI: a real SIGKILL
def test_seg_teacher_killed_midway_resumes_and_ends_with_the_model_of_an_uninterrupted_run(cohort: list[str],
                                                                                          tmp_path: Path):
    import shutil

    import torch
    from faultkit import kill_when, run

    from fbta.training.resume import RESUME

    out = Path(cohort[3].split("=", 1)[1])
    ov = [*cohort, "seg.teacher.epochs=12", "tracking.enabled=false"]
    folder = out / "models/seg_teacher"
    ref = run("seg-teacher", ov, tmp_path)
    assert ref.returncode == 0, ref.stderr
    shutil.copy(folder / "best.pt", tmp_path / "ref_best.pt")
    history = (folder / "history.csv").read_text().splitlines()

    def saved_epoch() -> int:
        try:
            return int(torch.load(folder / RESUME, weights_only=True)["epoch"])
        except Exception:  # not there yet, or being replaced
            return -1

    kill_when("seg-teacher", ov, tmp_path, lambda: saved_epoch() >= 2)
    killed_at = saved_epoch()
    assert 2 <= killed_at < 11
    again = run("seg-teacher", ov, tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"seg-teacher: resuming after epoch {killed_at + 1}" in again.stdout  # seg counts epochs from 1
    assert not (folder / RESUME).exists()
    a, b = torch.load(folder / "best.pt", weights_only=True), torch.load(tmp_path / "ref_best.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def curve(lines: list[str]) -> list[list[str]]:  # every column but the wall times
        head = lines[0].split(",")
        keep = [i for i, k in enumerate(head) if k not in ("seconds", "train_seconds")]
        return [[row.split(",")[i] for i in keep] for row in lines]
    assert curve((folder / "history.csv").read_text().splitlines()) == curve(history)
