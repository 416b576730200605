"""The one EMA implementation: teachers ``θ* ← α·θ* + (1−α)·θ``, per epoch or per optimiser step.

Used by vanilla MIL (``train.ema``: MIL*), FBTA (MIL*, TFE*) alike, so that a
comparison which sets ``train.ema_*`` equal to ``fbta.ema_*`` gives both arms
identical teachers. Buffers follow the parameters (floating ones averaged,
integer ones such as BatchNorm's ``num_batches_tracked`` copied). timm's
``ModelEmaV3`` was considered: it owns its copy of the model and one decay, where
FBTA needs two teachers sharing one update count (warm-up) saved in resume.pt.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from fbta.choices import EmaEvery

EMA_EVERY = EmaEvery.values()  # the schema's choices (fbta/choices.py), as plain strings


def frozen_copy(model: nn.Module) -> nn.Module:
    """A gradient-free eval-mode copy (an EMA teacher starts equal to its student)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, alpha: float) -> None:
    """``ema = α·ema + (1−α)·model`` for every parameter and floating buffer; integer buffers are copied."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"EMA decay (ema_alpha) must be in [0, 1), got {alpha}")
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - alpha)
    for e, b in zip(ema.buffers(), model.buffers()):
        if e.is_floating_point():
            e.lerp_(b.detach(), 1.0 - alpha)
        else:
            e.copy_(b)


def ema_decay(alpha: float, n: int, warmup: bool) -> float:
    """The decay of update number ``n`` (0-based): α, or with warm-up ``min(α, (1+n)/(10+n))``.

    The warm-up is our choice (METHODS.md A, EMA): over a short run a teacher
    updated with α = 0.9 once per epoch would stay near its random
    initialisation; with it the first updates follow the student closely
    (0.1, 0.18, 0.25, …) and the decay reaches α after (10α−1)/(1−α) updates (80 for 0.9).
    """
    return min(alpha, (1.0 + n) / (10.0 + n)) if warmup else alpha


class EMA(nn.Module):
    """EMA teachers for one or more students, updated per epoch or per optimiser step, with optional warm-up.

    The teachers are the caller's modules (not registered here); this module's
    only state is the update counter ``n_updates``, a buffer, so the loop saves it
    in resume.pt and a resumed run continues the warm-up where it stopped.
    """

    def __init__(self, pairs: Sequence[tuple[nn.Module, nn.Module]], alpha: float, every: str = "epoch",
                 warmup: bool = False) -> None:
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"EMA alpha must be in [0, 1), got {alpha}")
        if every not in EMA_EVERY:
            raise ValueError(f"EMA period '{every}' must be one of {', '.join(EMA_EVERY)}")
        self.pairs = list(pairs)  # (teacher, student): a plain list, so the teachers are not in this state_dict
        self.alpha, self.every, self.warmup = float(alpha), every, bool(warmup)
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.int64))
        self.last_decay = float("nan")

    def decay(self) -> float:
        """The decay the next update will use."""
        return ema_decay(self.alpha, int(self.n_updates.item()), self.warmup)

    def update(self) -> float:
        """One update of every teacher; returns the decay it used."""
        d = self.decay()
        for teacher, student in self.pairs:
            ema_update(teacher, student, d)
        self.n_updates += 1
        self.last_decay = d
        return d

    def after_step(self) -> None:
        if self.every == "step":
            self.update()

    def after_epoch(self) -> None:
        if self.every == "epoch":
            self.update()
