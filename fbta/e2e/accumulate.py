"""The extractor steps once every S slides, on their averaged gradients; the head and translator every slide.

Why (issue #29, docs/methods/fbta-controls.md § 8): FBTA's step is one slide (batch = 1 WSI [paper]). On a
subtyping cohort every patch of that slide has the same class, so each extractor update only says "this slide
is class c": the patch-label oracle trained that way on 60 slides' tumour patches, every unit trainable, moved
the held-out patch probe by −0.03; the same oracle with each step's 16 patches drawn from 16 slides of both
classes moved it by +0.23. ``fbta.extractor_every = S`` gives FBTA's extractor that second kind of update
without changing anything else of the step: the MIL head and the translator still learn from every slide (the
paper's schedule, the same number of head steps as vanilla), the extractor's gradients are summed over S
consecutive slides of the shuffled epoch and applied once, averaged [choice]. S = 1 is the paper's schedule.

One Adam serves all three parameter groups as before: Adam leaves a parameter whose ``grad`` is None untouched
(its moments and step count too), so between extractor updates the extractor's gradients are set aside and its
parameters are skipped. The last slide of an epoch always applies what has been set aside, so no gradient
crosses an epoch boundary and a resumed run (resume.pt is written between epochs) equals an uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn


def extractor_updates(slides: int, every: int) -> int:
    """Extractor updates in an epoch of ``slides`` steps: one per ``every`` slides, the last one possibly short."""
    return -(-slides // every)


class ExtractorEvery:
    """``torch.optim.Adam``'s interface for the training loop; the extractor's group is stepped every ``every``
    calls of :meth:`step` and at each epoch's last (``per_epoch`` calls make an epoch)."""

    def __init__(self, adam: torch.optim.Optimizer, extractor: Sequence[nn.Parameter], every: int,
                 per_epoch: int) -> None:
        if every < 1:
            raise ValueError(f"fbta.extractor_every={every}: must be ≥ 1 (1: every slide, the paper's schedule)")
        self.adam, self.extractor, self.every, self.per_epoch = adam, list(extractor), int(every), int(per_epoch)
        self.calls = 0  # step() calls this epoch
        self.pending = 0  # slides whose extractor gradients are set aside
        self.sums: list[Tensor | None] = [None] * len(self.extractor)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adam.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.calls += 1
        self.pending += 1
        for i, p in enumerate(self.extractor):
            if p.grad is not None:
                self.sums[i] = p.grad.detach().clone() if self.sums[i] is None else self.sums[i].add_(p.grad)
        apply = self.pending == self.every or self.calls == self.per_epoch
        for p, s in zip(self.extractor, self.sums):
            p.grad = s.div_(self.pending) if apply and s is not None else None
        self.adam.step()
        if apply:
            self.sums = [None] * len(self.extractor)
            self.pending = 0
        if self.calls == self.per_epoch:
            self.calls = 0

    @property
    def extractor_updates_per_epoch(self) -> int:
        return extractor_updates(self.per_epoch, self.every)

    def state_dict(self) -> dict[str, Any]:
        return self.adam.state_dict()  # nothing is set aside between epochs, when resume.pt is written

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adam.load_state_dict(state)
