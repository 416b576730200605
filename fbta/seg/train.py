"""IKD-MIL stage 1: the MIL teacher trained from broadcast patch labels, best epoch by validation F1.

Also the pieces stage 2 shares: seeded shuffling, flip/rot90 augmentation,
validation scoring. Pixel masks are only ever touched by :func:`evaluate`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fbta.seg.dataset import PatchSet
from fbta.seg.losses import teacher_dice_loss, teacher_gmp_bce_loss
from fbta.seg.metrics import SegScores, score_maps
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
    augment: bool = True
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
    best_epoch: int
    best: SegScores
    history: list[EpochLog]
    extra: dict[str, object] = field(default_factory=dict)


def state_copy(net: torch.nn.Module) -> State:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[np.ndarray]:
    """Shuffled index batches; the last short batch is dropped when there is more than one batch
    (a 1-image batch would make BatchNorm statistics meaningless)."""
    order = torch.randperm(n, generator=gen).numpy()
    stop = n - n % batch_size if n > batch_size else n
    for i in range(0, stop, batch_size):
        yield np.sort(order[i:i + batch_size])


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Per-patch random horizontal/vertical flips and 90° rotations of uint8 B×H×W×3 (square) patches."""
    flips = torch.randint(0, 2, (len(x), 2), generator=gen)
    rots = torch.randint(0, 4, (len(x),), generator=gen)
    out = []
    for img, (fh, fv), k in zip(x, flips.tolist(), rots.tolist()):
        if fh:
            img = img.flip(1)
        if fv:
            img = img.flip(0)
        out.append(torch.rot90(img, k, (0, 1)) if k else img)
    return torch.stack(out)


def train_batches(ps: PatchSet, opts: FitOptions, gen: torch.Generator, device: torch.device,
                  net: SideOutputNet) -> Iterator[tuple[Tensor, Tensor]]:
    """(normalised input, labels) per batch; the pixel masks are never read here."""
    for idx in batches(len(ps), opts.batch_size, gen):
        x = torch.from_numpy(ps.images[idx])
        if opts.augment:
            x = augment(x, gen)
        yield net_input(net, x.to(device), opts.input_size), torch.from_numpy(ps.labels[idx]).to(device)


def evaluate(net: SideOutputNet, ps: PatchSet, opts: FitOptions, device: torch.device) -> tuple[SegScores, np.ndarray]:
    probs = predict_fused(net, ps.images, opts.input_size, device, batch_size=max(opts.batch_size, 32))
    return score_maps(probs, ps.masks, opts.sigma, opts.threshold), probs


def make_optimizer(net: SideOutputNet, opts: FitOptions) -> torch.optim.Optimizer:
    return torch.optim.Adam(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)


def epoch_bar(opts: FitOptions, desc: str) -> tqdm:
    return tqdm(total=opts.epochs, desc=desc, unit="epoch", disable=not opts.progress, dynamic_ncols=True)


def fit_teacher(net: SideOutputNet, train: PatchSet, val: PatchSet, opts: FitOptions, device: torch.device,
                on_epoch: Optional[Callable[[EpochLog, bool], None]] = None) -> FitResult:
    """Train on broadcast labels; keep the epoch with the best validation F1 (first one on ties)."""
    if opts.loss not in ("dice", "gmp_bce"):
        raise ValueError(f"seg.teacher.loss='{opts.loss}' must be dice or gmp_bce")
    gen = torch.Generator().manual_seed(opts.seed)
    net.to(device)
    opt = make_optimizer(net, opts)
    history: list[EpochLog] = []
    best: Optional[EpochLog] = None
    best_state: State = state_copy(net)
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
        ep = EpochLog(epoch, total / max(steps, 1), scores, time.perf_counter() - t0, {"train_seconds": round(train_s, 2)})
        history.append(ep)
        improved = best is None or scores.f1 > best.val.f1
        if improved:
            best, best_state = ep, state_copy(net)
        if on_epoch is not None:
            on_epoch(ep, improved)
        bar.update(1)
        bar.set_postfix(loss=f"{ep.loss:.3f}", val_f1=f"{scores.f1:.3f}", best=f"{best.val.f1:.3f}")
    bar.close()
    assert best is not None, "seg.teacher.epochs must be ≥ 1"
    return FitResult(best_state, best.epoch, best.val, history)


def clone_net(net: SideOutputNet) -> SideOutputNet:
    return copy.deepcopy(net)
