"""IKD-MIL stage 1: the MIL teacher trained from broadcast patch labels, best epoch by validation F1.

Also the pieces stage 2 shares: seeded shuffling, augmentation (flips, rot90,
mild colour/HED jitter), validation scoring, and checkpoint selection. Pixel
masks are only ever touched by :func:`evaluate`; ambiguous patches never reach
a training batch. The epochs run in the one training loop (fbta/training/loop.py),
which also makes both stages resumable after a kill.

Selection (:class:`BaselineSelection`): the best validation ``f1`` among the epochs
that beat both trivial baselines (all-background, all-tumour maps) on the same
validation patches. Until one does, there is no best; if none ever does, the
best-scoring epoch is kept as a fallback and the result says
``beats_baselines=False`` — the registry refuses to promote such a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from fbta.seg import augment as aug
from fbta.seg.dataset import PatchSet
from fbta.seg.losses import teacher_dice_loss, teacher_gmp_bce_loss
from fbta.seg.metrics import SegScores, baseline_scores, score_maps, selection_floor
from fbta.seg.model import net_input, predict_fused
from fbta.seg.network import SideOutputNet
from fbta.training.loop import Epoch, FitResult, LoopOptions, Method, fit_loop
from fbta.training.resume import Parts, Resumable

State = dict[str, Tensor]


@dataclass
class SegOptions:
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int = 16
    input_size: int = 0
    augment: bool = True  # flips + 90° rotations
    colour: float = 0.0  # brightness/contrast/saturation jitter amplitude (0 = off)
    hed_sigma: float = 0.0  # HED stain jitter σ (0 = off)
    seed: int = 0
    sigma: float = 3.0
    threshold: float = 0.5
    progress: bool = False
    loss: str = "dice"  # teacher: dice | gmp_bce
    gmp_r: float = 4.0


class BaselineSelection:
    """The best epoch by validation ``f1`` among those above ``floor``; a fallback (best overall) meanwhile.

    States are copied only when an epoch becomes the best (or, while nothing beats
    the floor, the best fallback), through the ``snapshot`` callable. Never stops early.
    """

    stop = False

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self.best: Optional[Epoch] = None
        self.best_state: Optional[State] = None
        self.fallback: Optional[Epoch] = None
        self.fallback_state: Optional[State] = None

    def judge(self, ep: Epoch, snapshot: Callable[[], State]) -> bool:
        """Record an epoch; True when it is the new selected best (ties keep the earlier epoch)."""
        f1 = ep.val.f1
        if f1 > self.floor and (self.best is None or f1 > self.best.val.f1):
            self.best, self.best_state = ep, snapshot()
            self.fallback = self.fallback_state = None
            return True
        if self.best is None and (self.fallback is None or f1 > self.fallback.val.f1
                                  or math.isnan(self.fallback.val.f1)):
            self.fallback, self.fallback_state = ep, snapshot()
        return False

    @property
    def beats_baselines(self) -> bool:
        return self.best is not None

    def chosen(self) -> tuple[Epoch, State]:
        ep, st = (self.best, self.best_state) if self.best is not None else (self.fallback, self.fallback_state)
        assert ep is not None and st is not None, "no epoch was offered (epochs must be ≥ 1)"
        return ep, st

    def state_dict(self) -> dict[str, Any]:
        def num(e: Optional[Epoch]) -> int:
            return e.epoch if e is not None else -1
        return {"best": num(self.best), "best_state": self.best_state or {}, "fallback": num(self.fallback),
                "fallback_state": self.fallback_state or {}}

    def load_state_dict(self, state: dict[str, Any], history: list[Epoch]) -> None:
        by_number = {e.epoch: e for e in history}
        self.best, self.fallback = by_number.get(state["best"]), by_number.get(state["fallback"])
        self.best_state = state["best_state"] if self.best is not None else None
        self.fallback_state = state["fallback_state"] if self.fallback is not None else None


def validation_floor(val: PatchSet, opts: SegOptions, floor: Optional[float] = None
                     ) -> tuple[float, dict[str, SegScores]]:
    """The trivial baselines on the validation patches and the score to beat (``floor`` overrides it)."""
    base = baseline_scores(val.masks, opts.sigma, opts.threshold, val.group)
    return (selection_floor(base) if floor is None else float(floor)), base


def epoch_line(stage: str, ep: Epoch, epochs: int, floor: float, selected: bool, note: str = "") -> str:
    """One line per epoch: loss, validation score vs the baselines, wall time."""
    beats = "beats baselines" if ep.val.f1 > floor else "≤ baselines"
    return (f"{stage}: epoch {ep.epoch}/{epochs}  loss {ep.train_loss:.4f}  val F1 {ep.val.f1:.3f} "
            f"(baselines {floor:.3f}: {beats})  {ep.seconds:.1f} s{'  ← selected' if selected else ''}{note}")


def state_copy(net: torch.nn.Module) -> State:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[np.ndarray]:
    """Shuffled index batches; the last short batch is dropped when there is more than one batch
    (a 1-image batch would make BatchNorm statistics meaningless)."""
    order = torch.randperm(n, generator=gen).numpy()
    stop = n - n % batch_size if n > batch_size else n
    for i in range(0, stop, batch_size):
        yield np.sort(order[i:i + batch_size])


def train_batches(ps: PatchSet, opts: SegOptions, gen: torch.Generator, device: torch.device,
                  net: SideOutputNet) -> Iterator[tuple[Tensor, Tensor]]:
    """(normalised input, labels) per batch of trainable (positive/negative) patches; masks are never read."""
    usable = ps.trainable()
    for pick in batches(len(usable), opts.batch_size, gen):
        idx = usable[pick]
        x = torch.from_numpy(ps.images[idx])
        if opts.augment:
            x = aug.geometric(x, gen)
        x = x.to(device)
        if opts.colour > 0 or opts.hed_sigma > 0:
            x = aug.colour(x.permute(0, 3, 1, 2).float().div_(255.0), opts.colour, opts.hed_sigma, gen)
        yield net_input(net, x, opts.input_size), torch.from_numpy(ps.labels[idx]).to(device)


def evaluate(net: SideOutputNet, ps: PatchSet, opts: SegOptions, device: torch.device) -> tuple[SegScores, np.ndarray]:
    """Scores per weak-label group (ambiguous patches outside ``f1``/``iou``) and the fused maps."""
    probs = predict_fused(net, ps.images, opts.input_size, device, batch_size=max(opts.batch_size, 32))
    return score_maps(probs, ps.masks, opts.sigma, opts.threshold, ps.group), probs


def make_optimizer(net: SideOutputNet, opts: SegOptions) -> torch.optim.Optimizer:
    return torch.optim.Adam(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)


class SegMethod(Method):
    """What both IKD-MIL stages share: shuffled patch batches, validation F1 vs the baselines, one line per epoch."""

    scores_type = SegScores
    stage = "seg"

    def __init__(self, net: SideOutputNet, train: PatchSet, val: PatchSet, opts: SegOptions, device: torch.device,
                 floor: Optional[float]) -> None:
        self.net, self.train, self.val, self.opts, self.device = net.to(device), train, val, opts, device
        self.gen = torch.Generator().manual_seed(opts.seed)
        self.optimiser = make_optimizer(net, opts)
        self.floor, self.baselines = validation_floor(val, opts, floor)

    def parts(self) -> Parts:
        return {"net": self.net}, {"adam": self.optimiser}, {"batches": self.gen}

    def batches(self, epoch: int) -> Iterable[Any]:
        self.net.train()
        return train_batches(self.train, self.opts, self.gen, self.device, self.net)

    def validate(self) -> SegScores:
        return evaluate(self.net, self.val, self.opts, self.device)[0]

    def snapshot(self) -> State:
        return state_copy(self.net)

    def epoch_extra(self, rows: list[dict[str, float]], val: Any) -> dict[str, float]:
        return {"baseline_val_f1": round(self.floor, 6), "beats_baselines": float(val.f1 > self.floor)}

    def postfix(self, record: Epoch) -> dict[str, str]:
        return {"loss": f"{record.train_loss:.3f}", "val_f1": f"{record.val.f1:.3f}"}

    def lines(self, record: Epoch, selection: Any) -> list[str]:
        return [epoch_line(self.stage, record, self.opts.epochs, self.floor, record.best)]

    def result_extra(self) -> dict[str, Any]:
        return {"floor": self.floor, "baselines": self.baselines}


class SegTeacher(SegMethod):
    stage = "seg-teacher"

    def step(self, batch: Any, epoch: int) -> tuple[Tensor, dict[str, float]]:
        x, y = batch
        out = self.net(x)
        o = self.opts
        return (teacher_dice_loss(out, y) if o.loss == "dice" else teacher_gmp_bce_loss(out, y, o.gmp_r)), {}


def run_seg(method: SegMethod, opts: SegOptions, device: torch.device,
            on_epoch: Optional[Callable[[Epoch, bool], None]], resume: Optional[Resumable]) -> FitResult:
    """Both stages' epochs in the one loop; ``on_epoch(epoch, improved)``; adds ``beats_baselines`` to extra."""
    selection = BaselineSelection(method.floor)
    hook = (lambda ep, state: on_epoch(ep, state is not None)) if on_epoch is not None else None
    result = fit_loop(method, LoopOptions(opts.epochs, method.stage, opts.progress, first_epoch=1, device=device),
                      selection, None, resume, hook)
    result.extra["beats_baselines"] = selection.beats_baselines
    return result


def fit_teacher(net: SideOutputNet, train: PatchSet, val: PatchSet, opts: SegOptions, device: torch.device,
                on_epoch: Optional[Callable[[Epoch, bool], None]] = None,
                floor: Optional[float] = None, resume: Optional[Resumable] = None) -> FitResult:
    """Train on broadcast labels; keep the best validation F1 among epochs beating the baselines (first on ties).

    ``floor``: the score to beat; None = the better trivial baseline on ``val``. ``result.extra``:
    ``beats_baselines``, ``floor``, ``baselines`` (on ``val``).
    """
    if opts.loss not in ("dice", "gmp_bce"):
        raise ValueError(f"seg.teacher.loss='{opts.loss}' must be dice or gmp_bce")
    return run_seg(SegTeacher(net, train, val, opts, device, floor), opts, device, on_epoch, resume)
