"""FBTA as a method of the one training loop: pseudo-bag steps, EMA teachers, validation on the deployed path.

Why validate through the translator: what ships is ``MIL*(translator(F_FB))``
over cached frozen features (METHODS.md A, inference), so model selection and
early stopping judge exactly that, never the end-to-end view.

Shared with the vanilla trainer through fbta/training/loop.py, so a comparison
differs only in the method: the same EMA (:class:`~fbta.training.ema.EMA`: per
epoch or per step, α, optional warm-up; its update count is saved in
resume.pt) and the same selection rule (:class:`~fbta.mil.train.AUCSelection`:
nothing before ``train.min_epochs`` is "best" or counts toward patience).

Every epoch's record (``extra``: history.csv, MLflow, the progress bar) carries
the diagnostics of fbta/e2e/diagnostics.py: ``gap_ratio`` and ``tfe_drift`` on
fixed validation patches, ``l_cls_fb|eb|tb``, ``l_dist``, ``l_cons`` (means over
the epoch's steps), ``tumour_share`` of the pseudo-bags, ``ema_decay`` and the
step-time split (fbta/e2e/timing.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fbta.e2e.accumulate import ExtractorEvery
from fbta.e2e.classifier import SlideClassifier
from fbta.e2e.diagnostics import ProbePatches, gap_and_drift, tumour_share
from fbta.e2e.pseudobags import EpochPlan, PseudoBags
from fbta.e2e.step import FBTAModels, StepOptions, autocast_enabled, fbta_losses
from fbta.e2e.timing import PARTS, fbta_timer, split
from fbta.features.registry import Extractor
from fbta.mil.data import BagDataset
from fbta.mil.metrics import Scores, score
from fbta.mil.train import AUCSelection, cpu_state, predict
from fbta.training.ema import EMA, EMA_EVERY
from fbta.training.loop import Epoch, FitResult, LoopOptions, Method, State, fit_loop
from fbta.training.resume import Parts, Resumable


@dataclass(frozen=True)
class FBTAOptions:
    epochs: int
    patience: int
    lr: float  # MIL head
    translator_lr: float
    extractor_lr: float
    weight_decay: float
    ema_alpha: float
    ema_every: str = "epoch"
    ema_warmup: bool = False  # decay min(α, (1+n)/(10+n)) for the n-th update (our choice)
    min_epochs: int = 0  # epochs before this one are never "best" nor count toward patience
    balanced: bool = True
    bags_per_slide: int = 1  # steps per training slide and epoch
    extractor_every: int = 1  # the extractor steps once every S slides (fbta/e2e/accumulate.py); 1: every slide
    seed: int = 0
    num_workers: int = 2
    prefetch: int = 2
    progress: bool = True
    step: StepOptions = StepOptions()


def prepare_tfe(tfe: Extractor, trainable: bool, train_blocks: int, freeze_bn: bool) -> list[str]:
    """Make the extractor (partly) trainable; returns the names of the trained units.

    ``train_blocks = n`` trains only the last n units (top-level layers, with
    block sequences split into their blocks) — the frozen prefix then stores no
    activations, which is what makes a CPU demo affordable. ``freeze_bn`` keeps
    BatchNorm statistics at their pretrained values: a pseudo-bag of a few
    dozen patches is a poor batch to re-estimate them from.
    """
    tfe.set_trainable(trainable)
    tfe.freeze_bn = bool(freeze_bn)  # read by train_mode()
    if not trainable:
        return []
    units = extractor_units(tfe.trunk)
    if train_blocks >= 0:
        frozen, units = units[:max(0, len(units) - train_blocks)], units[max(0, len(units) - train_blocks):]
        for _, mod in frozen:
            mod.requires_grad_(False)
    return [name for name, _ in units]


def extractor_units(trunk: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children with parameters, sequences (``blocks``, ``layer3``) split into their blocks."""
    units: list[tuple[str, nn.Module]] = []
    for name, child in trunk.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            units += [(f"{name}.{n}", c) for n, c in child.named_children() if any(True for _ in c.parameters())]
        elif any(True for _ in child.parameters()):
            units.append((name, child))
    return units


def train_mode(m: FBTAModels) -> None:
    m.mil.train()
    m.translator.train()
    m.tfe.train()
    if getattr(m.tfe, "freeze_bn", False):
        for mod in m.tfe.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()


def deployed(m: FBTAModels, classes: list[str]) -> SlideClassifier:
    """The path that ships: translator → EMA MIL, on cached frozen features."""
    meta = {"classes": classes, "in_dim": m.translator.dim}
    return SlideClassifier(m.mil_ema, m.translator, meta, [], next(m.mil.parameters()).device)


def _optimiser(m: FBTAModels, o: FBTAOptions) -> torch.optim.Optimizer:
    groups = [{"params": list(m.mil.parameters()), "lr": o.lr},
              {"params": list(m.translator.parameters()), "lr": o.translator_lr}]
    tfe_params = [p for p in m.tfe.parameters() if p.requires_grad]
    if tfe_params:
        groups.append({"params": tfe_params, "lr": o.extractor_lr})
    return torch.optim.Adam(groups, weight_decay=o.weight_decay)


class FBTA(Method):
    """One pseudo-bag per step (:func:`~fbta.e2e.step.fbta_losses`); validation through translator → MIL*."""

    scores_type = Scores

    def __init__(self, m: FBTAModels, train: PseudoBags, val: BagDataset, classes: list[str], o: FBTAOptions,
                 device: torch.device, probe: Optional[ProbePatches]) -> None:
        for mod in (m.mil, m.translator, m.tfe, m.mil_ema, m.tfe_ema):
            mod.to(device)
        self.m, self.val, self.classes, self.o, self.device, self.probe = m, val, classes, o, device, probe
        self.ema = EMA(m.teachers(), o.ema_alpha, o.ema_every, o.ema_warmup)
        self.plan = EpochPlan(train.labels, o.seed, o.balanced, o.bags_per_slide)
        self.optimiser = _optimiser(m, o)
        if o.extractor_every > 1:
            self.optimiser = ExtractorEvery(self.optimiser, [p for p in m.tfe.parameters() if p.requires_grad],
                                            o.extractor_every, len(self.plan))
        # the loader's own generator: worker seeds must not draw from the global RNG that dropout uses, or a
        # resumed run (whose persistent workers start at a later epoch) would drift from an uninterrupted one
        self.loader = DataLoader(train, batch_size=None, sampler=self.plan, num_workers=o.num_workers,
                                 persistent_workers=o.num_workers > 0,
                                 prefetch_factor=o.prefetch if o.num_workers > 0 else None,
                                 pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(o.seed + 3))
        self.gen = torch.Generator().manual_seed(o.seed + 2)  # augmentation draws, apart from dropout's global RNG
        self.timer = fbta_timer(m, device)

    def parts(self) -> Parts:
        m = self.m
        return {"mil": m.mil, "translator": m.translator, "tfe": m.tfe}, {"adam": self.optimiser}, \
            {"augment": self.gen}

    def batches(self, epoch: int) -> Iterable[Any]:
        self.plan.set_epoch(epoch)
        train_mode(self.m)
        return self.loader

    def step(self, bag: Any, epoch: int) -> tuple[Tensor, dict[str, float]]:
        self.timer.reset()
        loss, terms = fbta_losses(self.m, bag, epoch / self.o.epochs, self.o.step, self.device, self.gen)
        return loss, {**terms, **self.timer.forward(), "read_s": bag.read_seconds, "n_tumour": bag.n_tumour}

    def validate(self) -> Scores:
        probs, _ = predict(deployed(self.m, self.classes), self.val, self.device)
        return score(self.val.labels, probs)

    def snapshot(self) -> State:
        m = self.m
        return {"mil": cpu_state(m.mil_ema), "translator": cpu_state(m.translator), "extractor": cpu_state(m.tfe_ema)}

    def epoch_extra(self, rows: list[dict[str, float]], val: Any) -> dict[str, float]:
        """The epoch's means over steps (loss terms, per-view CE, time split), tumour share; gap and drift."""
        for r in rows:
            r.update(split(r, r["backward_s"]), sampling_s=r["data_s"])
        extra = {k: float(np.mean([r[k] for r in rows])) for k in _MEANS if rows and k in rows[0]}
        share = tumour_share([r["n_tumour"] for r in rows], [r["n_subset"] for r in rows])
        if share is not None:
            extra["tumour_share"] = share
        if self.probe is not None:
            extra.update(gap_and_drift(self.m.tfe_ema, self.m.translator, self.probe, self.device))
        return extra

    def postfix(self, record: Epoch) -> dict[str, str]:
        """The progress bar's short summary of an epoch."""
        e = record.extra
        out = {"loss": f"{record.train_loss:.3f}", "dist": f"{e['l_dist']:.3g}"}
        if "gap_ratio" in e:
            out["gap"] = f"{e['gap_ratio']:.2f}"
            out["drift"] = f"{e['tfe_drift']:.2g}"
        if "tumour_share" in e:
            out["tum"] = f"{e['tumour_share']:.2f}"
        out["val_auc"] = f"{record.val.auc:.3f}"
        return out


def fit_fbta(m: FBTAModels, train: PseudoBags, val: BagDataset, classes: list[str], o: FBTAOptions,
             device: torch.device,
             on_epoch: Callable[[Epoch, Optional[dict[str, dict[str, torch.Tensor]]]], None] | None = None,
             resume: Optional[Resumable] = None, probe: Optional[ProbePatches] = None) -> FitResult:
    """Train in place; ``on_epoch(epoch, best_states_or_None)`` after every epoch (states only when improved).

    ``best_states`` = ``{"mil": MIL*, "translator": f_T, "extractor": TFE*}`` state dicts; ``resume``
    saves the run after every epoch and continues a killed one (subsets are seeded per epoch, so the
    pseudo-bags it sees are those of an uninterrupted run); ``probe``: the validation patches of the
    ``gap_ratio`` / ``tfe_drift`` diagnostics (None: not measured).
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"training needs train and validation slides (got {len(train)} and {len(val)})")
    if o.ema_every not in EMA_EVERY:
        raise ValueError(f"fbta.ema_every='{o.ema_every}' must be one of {', '.join(EMA_EVERY)}")
    method = FBTA(m, train, val, classes, o, device, probe)
    loop = LoopOptions(o.epochs, "train fbta", o.progress, amp=autocast_enabled(o.step, device), device=device)
    try:
        return fit_loop(method, loop, AUCSelection(o.patience, o.min_epochs, o.epochs), method.ema, resume, on_epoch)
    finally:
        method.timer.close()


_MEANS = ("l_cls", "l_cls_fb", "l_cls_eb", "l_cls_tb", "l_dist", "l_cons", *(f"{p}_s" for p in PARTS),
          "sampling_s", "read_s", "n_subset", "n_patches")
