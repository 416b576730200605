"""The end-to-end bound (``train.method=e2e``): what FBTA approximates, trained the expensive way.

Why it exists: FBTA claims to recover the gain of training the extractor end
to end on slide labels at a fraction of the cost. Whether a cohort *has* such a
gain, and how much of it FBTA recovers, can only be told against the real
thing: the same trainable extractor (same units, learning rate, BatchNorm mode,
augmentation and EMA as FBTA's TFE) fed **whole bags** — every patch of the
slide, at most ``fbta.max_bag`` — into one MIL head with slide labels, with no
pseudo-bags, no translator and no frozen view (METHODS.md A, "the controls").

It is FBTA's own method class with three differences, so the two cannot drift
apart: the bag is ``sampling=all``, the step has one view (``eb``) and no
``L_dist`` / ``L_cons``, and validation re-extracts every validation patch with
the EMA extractor TFE* (the only way this model can be deployed) instead of
translating cached frozen features. The model folder has FBTA's layout
(``extractor.pt`` = TFE*, ``best.pt`` = MIL*, an identity ``translator.pt``),
so ``fbta infer`` scores it: ``classification.e2e_reextract`` is its real
test score, ``classification.e2e`` its head on frozen features (a diagnostic).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from fbta.e2e.diagnostics import ProbePatches
from fbta.e2e.pseudobags import PseudoBags
from fbta.e2e.reextract import reextract_slide
from fbta.e2e.trainer import FBTA, FBTAOptions, deployed
from fbta.e2e.step import FBTAModels
from fbta.mil.data import BagDataset
from fbta.mil.metrics import Scores, score
from fbta.mil.train import AUCSelection
from fbta.training.loop import Epoch, FitResult, LoopOptions, fit_loop
from fbta.training.resume import Resumable


@dataclass(frozen=True)
class ValSlide:
    """A validation slide as re-extraction needs it: its feature file (coords), slide file and MPP override."""

    features_path: Path
    slide_path: Path
    csv_mpp: Optional[float] = None


class FullE2E(FBTA):
    """FBTA's loop with whole bags, one view, no translator; validated by re-extracting with TFE*."""

    def __init__(self, m: FBTAModels, train: PseudoBags, val: BagDataset, val_slides: Sequence[ValSlide],
                 classes: list[str], o: FBTAOptions, device: torch.device, probe: Optional[ProbePatches],
                 batch_size: int = 64) -> None:
        if len(val_slides) != len(val):
            raise ValueError(f"{len(val_slides)} validation slide files for {len(val)} validation bags")
        super().__init__(m, train, val, classes, o, device, probe)
        self.val_slides, self.batch_size = list(val_slides), int(batch_size)

    def validate(self) -> Scores:
        model = deployed(self.m, self.classes)
        probs = np.stack([reextract_slide(model, self.m.tfe_ema, v.features_path, v.slide_path, v.csv_mpp,
                                          self.device, self.batch_size, 0, amp=False).probs
                          for v in self.val_slides])
        return score(self.val.labels, probs)

    def epoch_extra(self, rows: list[dict[str, float]], val: object) -> dict[str, float]:
        extra = super().epoch_extra(rows, val)
        extra.pop("gap_ratio", None)  # no translator: its gap to TFE* means nothing here
        return extra


def fit_e2e(m: FBTAModels, train: PseudoBags, val: BagDataset, val_slides: Sequence[ValSlide], classes: list[str],
            o: FBTAOptions, device: torch.device,
            on_epoch: Callable[[Epoch, Optional[dict[str, dict[str, torch.Tensor]]]], None] | None = None,
            resume: Optional[Resumable] = None, probe: Optional[ProbePatches] = None) -> FitResult:
    """Train the end-to-end bound in place; the same hook, resume and selection as :func:`fbta.e2e.trainer.fit_fbta`."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"training needs train and validation slides (got {len(train)} and {len(val)})")
    if train.sampling != "all" or tuple(o.step.views) != ("eb",) or o.step.distill or o.step.consistency:
        raise ValueError("the end-to-end bound trains whole bags (sampling=all) on the eb view only, "
                         "with no L_dist and no L_cons")
    method = FullE2E(m, train, val, val_slides, classes, o, device, probe)
    loop = LoopOptions(o.epochs, "train e2e", o.progress, amp=False, device=device)
    try:
        return fit_loop(method, loop, AUCSelection(o.patience, o.min_epochs, o.epochs), method.ema, resume, on_epoch)
    finally:
        method.timer.close()
