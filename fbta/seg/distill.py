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

The student returned is selected like the teacher (``fbta.seg.train.BaselineSelection``):
best validation F1 among the epochs that beat both trivial baselines, else a
fallback flagged ``beats_baselines=False``. The epochs run in the one training
loop; the role-reversal state (best so far, the candidate, the swaps) is saved in
resume.pt with the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from fbta.seg.dataset import PatchSet
from fbta.seg.losses import distill_dice_loss, weighted_ce
from fbta.seg.network import SideOutputNet
from fbta.seg.train import SegMethod, SegOptions, State, make_optimizer, run_seg, state_copy
from fbta.training.loop import Epoch, FitResult
from fbta.training.resume import Parts, Resumable


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


class SegDistill(SegMethod):
    """Fusion-KD (+ the optional weighted CE) from a frozen teacher; role reversal after selection."""

    stage = "seg-distill"

    def __init__(self, teacher: SideOutputNet, student: SideOutputNet, teacher_f1: float, train: PatchSet,
                 val: PatchSet, opts: SegOptions, dopts: DistillOptions, device: torch.device,
                 floor: Optional[float]) -> None:
        super().__init__(student, train, val, opts, device, floor)
        self.teacher, self.dopts, self.teacher_f1 = teacher.to(device).eval().requires_grad_(False), dopts, teacher_f1
        student.requires_grad_(True)
        self.best_so_far = teacher_f1  # the teacher's included (METHODS.md B)
        self.candidate: Optional[State] = None  # best student since the last check that beat best_so_far
        self.reversals: list[dict[str, float]] = []

    def parts(self) -> Parts:
        modules, optimisers, generators = super().parts()
        return {**modules, "teacher": self.teacher}, optimisers, generators

    def step(self, batch: Any, epoch: int) -> tuple[Tensor, dict[str, float]]:
        x, y = batch
        with torch.no_grad():
            t_out = self.teacher(x)
        s_out = self.net(x)
        loss = distill_dice_loss(s_out, t_out, y, self.dopts.kd)
        if not self.dopts.weighted_ce:
            return loss, {}
        ce = weighted_ce(s_out.fused, t_out.fused, self.opts.threshold, self.dopts.ce_form)
        return loss + self.dopts.ce_weight * len(x) * ce, {"ce": float(ce.detach())}

    def epoch_extra(self, rows: list[dict[str, float]], val: Any) -> dict[str, float]:
        ce = sum(r.get("ce", 0.0) for r in rows) / max(len(rows), 1)
        return {"ce": round(ce, 6), **super().epoch_extra(rows, val)}

    def after_judge(self, record: Epoch, improved: bool, snapshot: Callable[[], State]) -> list[str]:
        """Role reversal on the check epochs: the best student since the last check becomes the teacher."""
        if record.val.f1 > self.best_so_far:
            self.best_so_far, self.candidate = record.val.f1, snapshot()
        swapped = self.dopts.check_epoch(record.epoch) and self.candidate is not None
        if swapped:
            old_teacher = state_copy(self.teacher)
            self.teacher.load_state_dict(self.candidate)
            self.teacher.eval().requires_grad_(False)
            self.net.load_state_dict(old_teacher)
            self.net.requires_grad_(True)
            self.optimiser = make_optimizer(self.net, self.opts)
            self.reversals.append({"epoch": record.epoch, "new_teacher_val_f1": round(self.best_so_far, 6)})
            self.candidate = None
        record.extra.update({"best_so_far": round(self.best_so_far, 6), "reversal": float(swapped)})
        return [f"seg-distill: epoch {record.epoch}: role reversal — the best student (val F1 "
                f"{self.best_so_far:.3f}) is now the teacher"] if swapped else []

    def postfix(self, record: Epoch) -> dict[str, str]:
        return {**super().postfix(record), "best_f1": f"{self.best_so_far:.3f}", "swaps": str(len(self.reversals))}

    def state_dict(self) -> dict[str, Any]:
        return {"best_so_far": self.best_so_far, "candidate": self.candidate or {}, "reversals": self.reversals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_so_far, self.reversals = float(state["best_so_far"]), list(state["reversals"])
        self.candidate = state["candidate"] or None

    def result_extra(self) -> dict[str, Any]:
        return {**super().result_extra(), "reversals": self.reversals, "best_val_f1_overall": self.best_so_far,
                "teacher_val_f1": self.teacher_f1, "beat_teacher": self.best_so_far > self.teacher_f1}


def fit_distill(teacher: SideOutputNet, student: SideOutputNet, teacher_f1: float, train: PatchSet, val: PatchSet,
                opts: SegOptions, dopts: DistillOptions, device: torch.device,
                on_epoch: Optional[Callable[[Epoch, bool], None]] = None,
                floor: Optional[float] = None, resume: Optional[Resumable] = None) -> FitResult:
    """Distil; return the student with the best validation F1 among the epochs beating the trivial baselines
    (whether or not it beat the teacher). ``floor``: the score to beat; None = the better baseline on ``val``."""
    if dopts.kd not in ("fusion", "blockwise"):
        raise ValueError(f"seg.distill.kd='{dopts.kd}' must be fusion or blockwise")
    method = SegDistill(teacher, student, teacher_f1, train, val, opts, dopts, device, floor)
    return run_seg(method, opts, device, on_epoch, resume)
