"""FBTA held to METHODS.md A (issue #14): L_dist's scale, the shared EMA, the selection rule, the diagnostics.

Hand-computed numbers and tiny modules; the vanilla trainer runs on the
synthetic feature cohort of tests/milcohort.py (seconds on 2 cores).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fbta.cli import main
from fbta.e2e.diagnostics import gap_and_drift, patches_on_tumour, summed_norm_ratio, tumour_share
from fbta.e2e.step import FBTAModels, StepOptions, distillation_loss, fbta_step
from fbta.e2e.trainer import prepare_tfe
from fbta.e2e.translator import Translator
from fbta.features.registry import create_extractor
from fbta.mil import create_mil
from fbta.mil.metrics import Scores
from fbta.mil.train import AUCSelection as Selection
from fbta.training.ema import EMA, ema_decay
from fbta.training.loop import Epoch
from milcohort import SMALL_HEADS, make_cohort

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- L_dist


def test_l_dist_sums_squares_over_d_then_averages_over_instances_and_heads() -> None:
    target = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [-2.0, 0.0, 0.5, 3.0]])  # n=3, D=4
    diff = torch.tensor([
        [[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]],  # head 1: ‖·‖² = 1, 4, 4 → mean 3
        [[0.0, 0.0, 0.0, 3.0], [1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],  # head 2: 9, 2, 0 → mean 11/3
    ])
    l_dist = distillation_loss(target + diff, target)
    assert l_dist.item() == pytest.approx((3.0 + 11.0 / 3.0) / 2.0, rel=1e-6)  # 10/3
    assert l_dist.item() == pytest.approx(4 * (target + diff - target).pow(2).mean().item(), rel=1e-6)  # D × MSE


def _models(k: int = 3) -> FBTAModels:
    torch.manual_seed(0)
    tfe = create_extractor("test_efficientnet", weights="random")
    prepare_tfe(tfe, trainable=True, train_blocks=2, freeze_bn=True)
    return FBTAModels(create_mil("abmil", tfe.dim, 2, hidden=16, attn_dim=8), Translator(tfe.dim, k=k), tfe)


def test_the_step_reports_l_dist_at_the_spec_scale() -> None:
    """Heads h_k = x + c_k (W2 = 0, b2 = c_k) and TFE* = FFE: L_dist = 1/K Σ_k ‖c_k‖², whatever C·M is."""
    from fbta.e2e.pseudobags import PseudoBag

    m = _models(k=3)
    d = m.tfe.dim
    with torch.no_grad():
        for k in range(3):
            m.translator.b2[k].fill_(0.1 * (k + 1))
    pixels = torch.randint(0, 256, (24, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        frozen = m.tfe_ema(m.tfe_ema.preprocess(pixels))
    idx = torch.arange(0, 24, 3)
    bag = PseudoBag(0, torch.tensor(1), frozen, idx, pixels[idx], 0.0)
    stats = fbta_step(m, bag, 0.0, StepOptions(), torch.device("cpu"), torch.Generator().manual_seed(0))
    expected = d * 0.01 * (1 + 4 + 9) / 3  # ‖c_k‖² = D·(0.1k)², averaged over the 3 heads
    assert stats["l_dist"] == pytest.approx(expected, rel=1e-3)
    assert {"l_cls_fb", "l_cls_eb", "l_cls_tb"} <= set(stats)
    assert stats["l_cls"] == pytest.approx(stats["l_cls_fb"] + stats["l_cls_eb"] + stats["l_cls_tb"], rel=1e-5)



def test_the_end_to_end_bound_step_has_one_view_and_no_translator_term() -> None:
    """distill=False, views (eb,): L = CE(MIL(TFE(aug X)), y) only — the translator gets no gradient, TFE* is
    never run (a defect that kept L_dist or the frozen view would show up in l_dist or in l_cls)."""
    from fbta.e2e.pseudobags import PseudoBag

    m = _models(k=3)
    pixels = torch.randint(0, 256, (12, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        frozen = m.tfe_ema(m.tfe_ema.preprocess(pixels))
    bag = PseudoBag(0, torch.tensor(1), frozen, torch.arange(12), pixels, 0.0)
    stats = fbta_step(m, bag, 0.5, StepOptions(views=("eb",), consistency=False, distill=False), torch.device("cpu"),
                      torch.Generator().manual_seed(0))
    assert stats["l_dist"] == 0.0 and stats["l_cons"] == 0.0
    assert stats["l_cls"] == pytest.approx(stats["l_cls_eb"]) and "l_cls_tb" not in stats
    assert all(p.grad is None for p in m.translator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.tfe.parameters())

# ----------------------------------------------------------------------------- EMA


def test_ema_warmup_is_min_alpha_and_one_plus_n_over_ten_plus_n() -> None:
    assert [ema_decay(0.9, n, True) for n in range(3)] == pytest.approx([0.1, 2 / 11, 0.25])
    assert ema_decay(0.9, 79, True) < 0.9 and ema_decay(0.9, 80, True) == pytest.approx(0.9)
    assert ema_decay(0.9, 500, True) == 0.9 and ema_decay(0.9, 0, False) == 0.9


def _bn(weight: float, mean: float, batches: int) -> torch.nn.BatchNorm1d:
    bn = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.fill_(weight)
        bn.running_mean.fill_(mean)
        bn.num_batches_tracked.fill_(batches)
    return bn


def test_one_ema_averages_float_buffers_copies_integer_ones_and_counts_its_updates() -> None:
    teacher, student = _bn(1.0, 0.0, 0), _bn(3.0, 10.0, 7)
    ema = EMA([(teacher, student)], 0.9, every="epoch", warmup=False)
    ema.after_step()  # per epoch: a step changes nothing
    assert teacher.weight[0].item() == 1.0 and int(ema.n_updates) == 0
    ema.after_epoch()
    torch.testing.assert_close(teacher.weight, torch.full((3,), 1.2))
    torch.testing.assert_close(teacher.running_mean, torch.full((3,), 1.0))  # averaged, not copied
    assert teacher.num_batches_tracked.item() == 7 and int(ema.n_updates) == 1
    assert set(ema.state_dict()) == {"n_updates"}  # the teachers are the caller's modules, saved on their own

    per_step = EMA([(_bn(1.0, 0.0, 0), student)], 0.9, every="step", warmup=True)
    per_step.after_step()
    per_step.after_step()
    per_step.after_epoch()  # per step: the epoch end adds nothing
    assert int(per_step.n_updates) == 2 and per_step.last_decay == pytest.approx(2 / 11)
    resumed = EMA([(_bn(1.0, 0.0, 0), student)], 0.9, every="step", warmup=True)
    resumed.load_state_dict(per_step.state_dict())  # what resume.pt restores
    assert resumed.decay() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="alpha"):
        EMA([(teacher, student)], 1.0)
    with pytest.raises(ValueError, match="epoch, step"):
        EMA([(teacher, student)], 0.9, every="batch")


def test_fbta_uses_the_shared_ema_for_both_teachers() -> None:
    m = _models()
    ema = EMA(m.teachers(), 0.5, warmup=False)
    with torch.no_grad():
        for p in list(m.mil.parameters()) + list(m.tfe.parameters()):
            p.add_(1.0)
    before = next(m.tfe_ema.parameters()).clone()
    ema.after_epoch()
    torch.testing.assert_close(next(m.tfe_ema.parameters()), before + 0.5)
    assert all(not p.requires_grad for p in m.tfe_ema.parameters())

# ----------------------------------------------------------------------------- selection


def _s(auc: float, loss: float) -> Scores:
    return Scores(auc=auc, acc=0.5, f1=0.5, loss=loss, n=4)



def judge(sel: Selection, epoch: int, val: object) -> bool:
    """One epoch's validation scores offered to the selection, as the loop does."""
    return sel.judge(Epoch(epoch, 0.0, val, 0.0), lambda: {"epoch": epoch})

def test_epochs_before_min_epochs_are_never_best_and_do_not_count_toward_patience() -> None:
    sel = Selection(patience=2, min_epochs=3, epochs=20)
    assert [judge(sel, e, _s(1.0, 0.1)) for e in range(3)] == [False, False, False]  # even a perfect epoch 0
    assert sel.since_best == 0 and not sel.stop and sel.best is None
    assert judge(sel, 3, _s(0.6, 0.9)) and sel.best_epoch == 3  # the first eligible epoch is the first best
    assert not judge(sel, 4, _s(0.6, 0.95))  # tie on AUC, higher loss: the earlier epoch stays
    assert judge(sel, 5, _s(0.6, 0.5)) and sel.best_epoch == 5  # tie on AUC, lower loss: the later wins
    assert not judge(sel, 6, _s(0.5, 0.1)) and not judge(sel, 7, _s(float("nan"), 0.1)) and sel.stop


def test_a_run_shorter_than_min_epochs_selects_its_last_epoch() -> None:
    sel = Selection(patience=5, min_epochs=3, epochs=2)
    assert not judge(sel, 0, _s(1.0, 0.1)) and judge(sel, 1, _s(0.5, 1.0)) and sel.best_epoch == 1
    assert judge(Selection(patience=5, min_epochs=0, epochs=4), 0, _s(0.5, 1.0))  # min_epochs 0: the old rule


def test_a_resumed_selection_without_a_best_yet_has_none() -> None:
    rows = [Epoch(e, 1.0, _s(0.9, 0.5), 1.0, best=False, train_acc=0.5) for e in range(2)]
    sel = Selection(patience=5, min_epochs=3, epochs=10)
    sel.load_state_dict({"best": -1, "state": {}, "since_best": 0}, rows)
    assert sel.best is None and judge(sel, 3, _s(0.1, 9.0))  # epoch 0's AUC 0.9 was never "best"
    rows[1].best = True
    sel.load_state_dict({"best": 1, "state": {}, "since_best": 2}, rows)
    assert sel.best is rows[1] and sel.since_best == 2

# ----------------------------------------------------------------------------- the vanilla trainer


def _history(out: Path, name: str = "vanilla_abmil") -> list[dict[str, str]]:
    with open(out / "models" / name / "history.csv") as fh:
        return list(csv.DictReader(fh))


def test_vanilla_gets_the_same_ema_options_and_selection_as_fbta(tmp_path: Path) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"]
    args = ["train", *ov, "train.epochs=5", "train.patience=5", "train.min_epochs=3", "train.ema=true",
            "train.ema_alpha=0.9", "train.ema_every=epoch", "train.ema_warmup=true", "--params", str(ROOT / "params.yaml")]
    assert main(args) == 0
    rows = _history(tmp_path / "out")
    assert [float(r["ema_decay"]) for r in rows] == pytest.approx([0.1, 2 / 11, 0.25, 4 / 13, 5 / 14], rel=1e-5)
    assert [int(r["best"]) for r in rows][:3] == [0, 0, 0] and sum(int(r["best"]) for r in rows) >= 1
    meta = json.loads((tmp_path / "out/models/vanilla_abmil/meta.json").read_text())
    assert meta["epoch"] >= 3 and meta["ema_every"] == "epoch" and meta["ema_warmup"] is True
    assert meta["min_epochs"] == 3 and meta["weights"] == "ema"


def test_bad_vanilla_ema_choices_are_one_line_errors(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=4)
    assert main(["train", *ov, "train.ema_every=batch", "--params", str(ROOT / "params.yaml")]) == 2
    assert "train.ema_every='batch' must be one of epoch, step" in capsys.readouterr().err


def test_vanilla_resume_restores_the_ema_update_count(tmp_path: Path) -> None:
    """Interrupted after epoch 2 and resumed: the warm-up goes on at update 3, and the model is the uninterrupted one."""
    from fbta.mil.data import BagDataset, BagItem
    from fbta.mil.train import FitOptions, fit
    from fbta.training.loop import seed_everything
    from fbta.training.resume import Resumable

    make_cohort(tmp_path, n_per_class=4)
    labels = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "labels.csv"))}
    items = {part: [BagItem(s, tmp_path / "features/h5_files" / f"{s}.h5", int(r["label"] == "tumour"), 30)
                    for s, r in sorted(labels.items()) if r["split"] == part] for part in ("train", "val")}
    opts = FitOptions(epochs=6, patience=6, lr=1e-3, weight_decay=1e-5, ema_alpha=0.9, ema_every="epoch",
                      ema_warmup=True, min_epochs=2, progress=False)

    def run(resume: Resumable | None, stop_after: int | None = None):
        seed_everything(0)
        head = create_mil("abmil", 16, 2, hidden=32, attn_dim=16)

        def hook(ep, _state):
            if stop_after is not None and ep.epoch == stop_after + 1:
                raise KeyboardInterrupt  # "killed" during epoch stop_after + 1, after resume.pt of stop_after
        return fit(head, BagDataset(items["train"], True), BagDataset(items["val"], True), opts,
                   torch.device("cpu"), hook, resume)

    ref = run(None)
    path = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        run(Resumable(path, "fp"), stop_after=2)
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 2 and int(saved["modules"]["ema_state"]["n_updates"]) == 3
    again = run(Resumable(path, "fp"))
    assert again.resumed_from == 3
    assert [e.extra["ema_decay"] for e in again.history] == [e.extra["ema_decay"] for e in ref.history]
    assert again.best_epoch == ref.best_epoch >= 2
    assert all(torch.equal(again.best_state[k], ref.best_state[k]) for k in ref.best_state)

# ----------------------------------------------------------------------------- diagnostics


def test_a_patch_is_tumour_when_its_centre_pixel_is_on_the_mask_at_any_downsample() -> None:
    mask = np.zeros((64, 96), bool)  # level 0 is 1536×1024 at downsample 16
    mask[10:20, 30:40] = True  # level-0 x 480–640, y 160–320
    coords = np.array([[400, 100], [480, 160], [0, 0], [600, 300]])  # top-left; patch 128 px → centres +64
    assert patches_on_tumour(mask, coords, 128, (1536, 1024)).tolist() == [False, True, False, False]
    assert patches_on_tumour(mask[::2, ::2], coords, 128, (1536, 1024)).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="aspect ratio"):
        patches_on_tumour(np.zeros((64, 64), bool), coords, 128, (1536, 1024))


def test_tumour_share_pools_the_bags_of_slides_with_a_mask() -> None:
    assert tumour_share([2.0, float("nan"), 1.0], [8.0, 8.0, 4.0]) == pytest.approx(3 / 12)
    assert tumour_share([float("nan")], [8.0]) is None


def test_gap_ratio_is_one_for_an_identity_translator_and_drift_is_relative_to_the_frozen_features() -> None:
    a = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    c = torch.zeros(2, 2)
    assert summed_norm_ratio(a, b, c) == pytest.approx((5 + 1) / (0 + 3))  # ratio of summed norms
    assert math.isnan(summed_norm_ratio(a, c, c))

    from fbta.e2e.diagnostics import ProbePatches

    m = _models()
    pixels = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        frozen = m.tfe_ema(m.tfe_ema.preprocess(pixels))
    probe = ProbePatches(pixels, frozen, ["s"] * 6)
    same = gap_and_drift(m.tfe_ema, m.translator, probe, torch.device("cpu"))
    assert same["tfe_drift"] < 1e-5 and math.isnan(same["gap_ratio"])  # TFE* = FFE: no gap to measure
    with torch.no_grad():
        for p in m.tfe_ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = gap_and_drift(m.tfe_ema, m.translator, probe, torch.device("cpu"))
    assert moved["tfe_drift"] > 1e-3 and moved["gap_ratio"] == pytest.approx(1.0, abs=1e-6)  # identity f_T
    with torch.no_grad():  # a translator that adds exactly TFE* − FFE closes the gap
        star = m.tfe_ema(m.tfe_ema.preprocess(pixels))
    shift = (star - frozen).mean(0)
    with torch.no_grad():
        m.translator.b2.copy_(shift.expand_as(m.translator.b2[:, 0]).unsqueeze(1))
    closer = gap_and_drift(m.tfe_ema, m.translator, probe, torch.device("cpu"))
    assert closer["gap_ratio"] < moved["gap_ratio"]
