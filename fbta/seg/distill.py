"""IKD-MIL stage 2: fusion-knowledge distillation from a frozen teacher, with dynamic role reversal.

Per batch (teacher in eval mode, no gradients): Σ over {s1, s2, s3, f_student}
of Dice vs the teacher's fused map on positives (inverted Dice vs all-zero on
negatives), plus ``ce_weight · B ·`` the OEEM-weighted CE vs the teacher's
pseudo-label. Role reversal: the best validation F1 so far starts at the
teacher's; on the check epochs (``reversal_start``, then every
``reversal_every``), if a student beat it since the last check, that best
student becomes the frozen teacher and the old teacher becomes the trainable
student (fresh optimiser). If no student ever beats it, nothing is swapped —
the authors' code would load a checkpoint that was never written.

The student returned is selected like the teacher (``fbta.seg.train.Selection``):
best validation F1 among the epochs that beat both trivial baselines, else a
fallback flagged ``beats_baselines=False``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fbta.seg.dataset import PatchSet
from fbta.seg.losses import distill_dice_loss, weighted_ce
from fbta.seg.network import SideOutputNet
from fbta.seg.train import EpochLog, FitOptions, FitResult, Selection, State, epoch_bar, epoch_line, evaluate, \
    make_optimizer, state_copy, train_batches, validation_floor


@dataclass
class DistillOptions:
    kd: str = "fusion"  # fusion | blockwise
    weighted_ce: bool = False  # the authors' OEEM term; off by default (it holds the student at its teacher)
    ce_weight: float = 2.0  # × batch size
    role_reversal: bool = True
    reversal_start: int = 30
    reversal_every: int = 30
    ce_form: str = "authors"  # authors (softmax CE on (1 − p, p) as logits: bounded) | bce

    def check_epoch(self, epoch: int) -> bool:
        every = max(1, self.reversal_every)
        return self.role_reversal and epoch >= self.reversal_start and (epoch - self.reversal_start) % every == 0


def fit_distill(teacher: SideOutputNet, student: SideOutputNet, teacher_f1: float, train: PatchSet, val: PatchSet,
                opts: FitOptions, dopts: DistillOptions, device: torch.device,
                on_epoch: Optional[Callable[[EpochLog, bool], None]] = None,
                floor: Optional[float] = None) -> FitResult:
    """Distil; return the student with the best validation F1 among the epochs beating the trivial baselines
    (whether or not it beat the teacher). ``floor``: the score to beat; None = the better baseline on ``val``."""
    if dopts.kd not in ("fusion", "blockwise"):
        raise ValueError(f"seg.distill.kd='{dopts.kd}' must be fusion or blockwise")
    gen = torch.Generator().manual_seed(opts.seed)
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).requires_grad_(True)
    opt = make_optimizer(student, opts)
    best_so_far = teacher_f1  # the teacher's included (METHODS.md B)
    candidate: Optional[State] = None  # best student since the last check that beat best_so_far
    floor, baselines = validation_floor(val, opts, floor)
    sel = Selection(floor)
    history: list[EpochLog] = []
    reversals: list[dict[str, float]] = []
    bar = epoch_bar(opts, "seg-distill")
    for epoch in range(1, opts.epochs + 1):
        t0 = time.perf_counter()
        student.train()
        total, steps, ce_total = 0.0, 0, 0.0
        for x, y in train_batches(train, opts, gen, device, student):
            with torch.no_grad():
                t_out = teacher(x)
            s_out = student(x)
            loss = distill_dice_loss(s_out, t_out, y, dopts.kd)
            if dopts.weighted_ce:
                ce = weighted_ce(s_out.fused, t_out.fused, opts.threshold, dopts.ce_form)
                loss = loss + dopts.ce_weight * len(x) * ce
                ce_total += float(ce.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        train_s = time.perf_counter() - t0
        scores, _ = evaluate(student, val, opts, device)
        ep = EpochLog(epoch, total / max(steps, 1), scores, 0.0,
                      {"train_seconds": round(train_s, 2), "ce": round(ce_total / max(steps, 1), 6),
                       "baseline_val_f1": round(floor, 6), "beats_baselines": float(scores.f1 > floor)})
        copied: list[State] = []

        def epoch_state() -> State:  # one copy per epoch at most, taken before any swap
            if not copied:
                copied.append(state_copy(student))
            return copied[0]

        improved = sel.offer(ep, epoch_state)
        if scores.f1 > best_so_far:
            best_so_far, candidate = scores.f1, epoch_state()
        swapped = 0.0
        if dopts.check_epoch(epoch) and candidate is not None:
            old_teacher = state_copy(teacher)
            teacher.load_state_dict(candidate)
            teacher.eval().requires_grad_(False)
            student.load_state_dict(old_teacher)
            student.requires_grad_(True)
            opt = make_optimizer(student, opts)
            reversals.append({"epoch": epoch, "new_teacher_val_f1": round(best_so_far, 6)})
            candidate, swapped = None, 1.0
        ep.seconds = time.perf_counter() - t0
        ep.extra.update({"best_so_far": round(best_so_far, 6), "reversal": swapped})
        history.append(ep)
        if on_epoch is not None:
            on_epoch(ep, improved)
        bar.update(1)
        bar.set_postfix(loss=f"{ep.loss:.3f}", val_f1=f"{scores.f1:.3f}", best=f"{best_so_far:.3f}",
                        swaps=len(reversals))
        bar.write(epoch_line("seg-distill", ep, opts.epochs, floor, improved))
        if swapped:
            bar.write(f"seg-distill: epoch {epoch}: role reversal — the best student (val F1 {best_so_far:.3f}) "
                      "is now the teacher")
    bar.close()
    assert history, "seg.distill.epochs must be ≥ 1"
    return sel.result(history, baselines,
                      {"reversals": reversals, "best_val_f1_overall": best_so_far, "teacher_val_f1": teacher_f1,
                       "beat_teacher": best_so_far > teacher_f1})
