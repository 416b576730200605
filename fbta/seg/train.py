"""IKD-MIL stage 1: the MIL teacher trained from broadcast patch labels, best epoch by validation F1.

Also the pieces stage 2 shares: seeded shuffling, augmentation (flips, rot90,
mild colour/HED jitter), validation scoring, and checkpoint selection. Pixel
masks are only ever touched by :func:`evaluate`; ambiguous patches never reach
a training batch.

Selection (:class:`Selection`): the best validation ``f1`` among the epochs
that beat both trivial baselines (all-background, all-tumour maps) on the same
validation patches. Until one does, there is no best; if none ever does, the
best-scoring epoch is kept as a fallback and the result says
``beats_baselines=False`` — the registry refuses to promote such a model.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fbta.seg import augment as aug
from fbta.seg.dataset import PatchSet
from fbta.seg.losses import teacher_dice_loss, teacher_gmp_bce_loss
from fbta.seg.metrics import SegScores, baseline_scores, score_maps, selection_floor
from fbta.seg.model import net_input, predict_fused
from fbta.seg.network import SideOutputNet

State = dict[str, Tensor]


@dataclass
class FitOptions:
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


@dataclass
class EpochLog:
    epoch: int
    loss: float
    val: SegScores
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    def as_row(self) -> dict[str, float]:
        return {"epoch": self.epoch, "train_loss": round(self.loss, 6), **self.val.as_dict("val_"),
                "seconds": round(self.seconds, 2), **self.extra}


@dataclass
class FitResult:
    best_state: State
    best_epoch: int  # the selected epoch (the fallback one when beats_baselines is False)
    best: SegScores
    history: list[EpochLog]
    extra: dict[str, object] = field(default_factory=dict)
    beats_baselines: bool = True  # the selected epoch's val score beats both trivial baselines
    floor: float = float("-inf")  # the val score to beat: max over the baselines
    baselines: dict[str, SegScores] = field(default_factory=dict)  # on the validation patches


class Selection:
    """The best epoch by validation ``f1`` among those above ``floor``; a fallback (best overall) meanwhile.

    States are copied only when an epoch becomes the best (or, while nothing beats
    the floor, the best fallback), through the ``state`` callable.
    """

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self.best: Optional[EpochLog] = None
        self.best_state: Optional[State] = None
        self.fallback: Optional[EpochLog] = None
        self.fallback_state: Optional[State] = None

    def offer(self, ep: EpochLog, state: Callable[[], State]) -> bool:
        """Record an epoch; True when it is the new selected best (ties keep the earlier epoch)."""
        f1 = ep.val.f1
        if f1 > self.floor and (self.best is None or f1 > self.best.val.f1):
            self.best, self.best_state = ep, state()
            self.fallback = self.fallback_state = None
            return True
        if self.best is None and (self.fallback is None or f1 > self.fallback.val.f1
                                  or math.isnan(self.fallback.val.f1)):
            self.fallback, self.fallback_state = ep, state()
        return False

    @property
    def beats_baselines(self) -> bool:
        return self.best is not None

    def chosen(self) -> tuple[EpochLog, State]:
        ep, st = (self.best, self.best_state) if self.best is not None else (self.fallback, self.fallback_state)
        assert ep is not None and st is not None, "no epoch was offered (epochs must be ≥ 1)"
        return ep, st

    def result(self, history: list[EpochLog], baselines: dict[str, SegScores],
               extra: Optional[dict[str, object]] = None) -> FitResult:
        ep, st = self.chosen()
        return FitResult(st, ep.epoch, ep.val, history, dict(extra or {}), self.beats_baselines, self.floor, baselines)


def validation_floor(val: PatchSet, opts: FitOptions, floor: Optional[float] = None
                     ) -> tuple[float, dict[str, SegScores]]:
    """The trivial baselines on the validation patches and the score to beat (``floor`` overrides it)."""
    base = baseline_scores(val.masks, opts.sigma, opts.threshold, val.group)
    return (selection_floor(base) if floor is None else float(floor)), base


def epoch_line(stage: str, ep: EpochLog, epochs: int, floor: float, selected: bool, note: str = "") -> str:
    """One line per epoch: loss, validation score vs the baselines, wall time."""
    beats = "beats baselines" if ep.val.f1 > floor else "≤ baselines"
    return (f"{stage}: epoch {ep.epoch}/{epochs}  loss {ep.loss:.4f}  val F1 {ep.val.f1:.3f} "
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


augment = aug.geometric  # the name earlier code imported


def train_batches(ps: PatchSet, opts: FitOptions, gen: torch.Generator, device: torch.device,
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


def evaluate(net: SideOutputNet, ps: PatchSet, opts: FitOptions, device: torch.device) -> tuple[SegScores, np.ndarray]:
    """Scores per weak-label group (ambiguous patches outside ``f1``/``iou``) and the fused maps."""
    probs = predict_fused(net, ps.images, opts.input_size, device, batch_size=max(opts.batch_size, 32))
    return score_maps(probs, ps.masks, opts.sigma, opts.threshold, ps.group), probs


def make_optimizer(net: SideOutputNet, opts: FitOptions) -> torch.optim.Optimizer:
    return torch.optim.Adam(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)


def epoch_bar(opts: FitOptions, desc: str) -> tqdm:
    return tqdm(total=opts.epochs, desc=desc, unit="epoch", disable=not opts.progress, dynamic_ncols=True)


def fit_teacher(net: SideOutputNet, train: PatchSet, val: PatchSet, opts: FitOptions, device: torch.device,
                on_epoch: Optional[Callable[[EpochLog, bool], None]] = None,
                floor: Optional[float] = None) -> FitResult:
    """Train on broadcast labels; keep the best validation F1 among epochs beating the baselines (first on ties).

    ``floor``: the score to beat; None = the better trivial baseline on ``val``.
    """
    if opts.loss not in ("dice", "gmp_bce"):
        raise ValueError(f"seg.teacher.loss='{opts.loss}' must be dice or gmp_bce")
    gen = torch.Generator().manual_seed(opts.seed)
    net.to(device)
    opt = make_optimizer(net, opts)
    history: list[EpochLog] = []
    floor, baselines = validation_floor(val, opts, floor)
    sel = Selection(floor)
    bar = epoch_bar(opts, "seg-teacher")
    for epoch in range(1, opts.epochs + 1):
        t0 = time.perf_counter()
        net.train()
        total, steps = 0.0, 0
        for x, y in train_batches(train, opts, gen, device, net):
            out = net(x)
            loss = teacher_dice_loss(out, y) if opts.loss == "dice" else teacher_gmp_bce_loss(out, y, opts.gmp_r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        train_s = time.perf_counter() - t0
        scores, _ = evaluate(net, val, opts, device)
        ep = EpochLog(epoch, total / max(steps, 1), scores, time.perf_counter() - t0,
                      {"train_seconds": round(train_s, 2), "baseline_val_f1": round(floor, 6),
                       "beats_baselines": float(scores.f1 > floor)})
        history.append(ep)
        improved = sel.offer(ep, lambda: state_copy(net))
        if on_epoch is not None:
            on_epoch(ep, improved)
        bar.update(1)
        bar.set_postfix(loss=f"{ep.loss:.3f}", val_f1=f"{scores.f1:.3f}",
                        best=f"{sel.best.val.f1:.3f}" if sel.best else "none")
        bar.write(epoch_line("seg-teacher", ep, opts.epochs, floor, improved))
    bar.close()
    assert history, "seg.teacher.epochs must be ≥ 1"
    return sel.result(history, baselines)


def clone_net(net: SideOutputNet) -> SideOutputNet:
    return copy.deepcopy(net)
