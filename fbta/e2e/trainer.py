"""The FBTA training loop: epochs of pseudo-bag steps, EMA teachers, validation on the deployed path.

Why validate through the translator: what ships is ``MIL*(translator(F_FB))``
over cached frozen features (METHODS.md A, inference), so model selection and
early stopping judge exactly that, never the end-to-end view.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fbta.e2e.classifier import SlideClassifier
from fbta.e2e.pseudobags import EpochPlan, PseudoBags
from fbta.e2e.step import FBTAModels, StepOptions, fbta_step
from fbta.features.registry import Extractor
from fbta.mil.data import BagDataset
from fbta.mil.metrics import Scores, score
from fbta.mil.resume import Resumable
from fbta.mil.train import Epoch, FitResult, _better, predict

EMA_EVERY = ("epoch", "step")


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
    balanced: bool = True
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


def _snapshot(m: FBTAModels) -> dict[str, dict[str, torch.Tensor]]:
    def cpu(mod: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in mod.state_dict().items()}

    return {"mil": cpu(m.mil_ema), "translator": cpu(m.translator), "extractor": cpu(m.tfe_ema)}


def fit_fbta(m: FBTAModels, train: PseudoBags, val: BagDataset, classes: list[str], o: FBTAOptions,
             device: torch.device,
             on_epoch: Callable[[Epoch, Optional[dict[str, dict[str, torch.Tensor]]]], None] | None = None,
             resume: Optional[Resumable] = None) -> FitResult:
    """Train in place; ``on_epoch(epoch, best_states_or_None)`` after every epoch (states only when improved).

    ``best_states`` = ``{"mil": MIL*, "translator": f_T, "extractor": TFE*}`` state dicts; ``resume``
    saves the run after every epoch and continues a killed one (subsets are seeded per epoch, so the
    pseudo-bags it sees are those of an uninterrupted run).
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"training needs train and validation slides (got {len(train)} and {len(val)})")
    if o.ema_every not in EMA_EVERY:
        raise ValueError(f"fbta.ema_every='{o.ema_every}' must be one of {', '.join(EMA_EVERY)}")
    from tqdm.auto import tqdm

    for mod in (m.mil, m.translator, m.tfe, m.mil_ema, m.tfe_ema):
        mod.to(device)
    optimiser = _optimiser(m, o)
    plan = EpochPlan(train.labels, o.seed, o.balanced)
    # the loader's own generator: worker seeds must not draw from the global RNG that dropout uses, or a
    # resumed run (whose persistent workers start at a later epoch) would drift from an uninterrupted one
    loader = DataLoader(train, batch_size=None, sampler=plan, num_workers=o.num_workers,
                        persistent_workers=o.num_workers > 0, prefetch_factor=o.prefetch if o.num_workers > 0 else None,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(o.seed + 3))
    gen = torch.Generator().manual_seed(o.seed + 2)  # augmentation draws, apart from dropout's global RNG
    history: list[Epoch] = []
    best_scores: Optional[Scores] = None
    best_epoch, best_states, since_best, start = 0, _snapshot(m), 0, 0
    if resume is not None:
        parts = {"mil": m.mil, "translator": m.translator, "tfe": m.tfe, "mil_ema": m.mil_ema, "tfe_ema": m.tfe_ema}
        point = resume.start(parts, {"adam": optimiser}, {"augment": gen}, o.patience, o.epochs)
        if point is not None:
            history, best_epoch, best_states, best_scores, since_best, start = point
    resumed_from = start
    bar = tqdm(range(start, o.epochs), desc="train fbta", unit="epoch", disable=not o.progress,
               dynamic_ncols=True, initial=start, total=o.epochs)
    for epoch in bar:
        t_epoch = time.perf_counter()
        plan.set_epoch(epoch)
        train_mode(m)
        rows: list[dict[str, float]] = []
        t_ready = time.perf_counter()
        for bag in loader:
            wait = time.perf_counter() - t_ready
            optimiser.zero_grad(set_to_none=True)
            stats = fbta_step(m, bag, epoch / o.epochs, o.step, device, gen)
            optimiser.step()
            if o.ema_every == "step":
                m.update_ema(o.ema_alpha)
            rows.append({**stats, "sampling_s": wait, "read_s": bag.read_seconds})
            t_ready = time.perf_counter()
        if o.ema_every == "epoch":
            m.update_ema(o.ema_alpha)
        probs, _ = predict(deployed(m, classes), val, device)
        val_scores = score(val.labels, probs)
        improved = _better(val_scores, best_scores)
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        extra = {k: mean[k] for k in ("l_cls", "l_dist", "l_cons", "extractor_s", "translator_s", "mil_s",
                                      "sampling_s", "read_s", "n_subset", "n_patches")}
        record = Epoch(epoch, mean["loss"], mean["correct"], val_scores, time.perf_counter() - t_epoch, improved,
                       extra=extra)
        history.append(record)
        if improved:
            best_scores, best_epoch, since_best = val_scores, epoch, 0
            best_states = _snapshot(m)
        else:
            since_best += 1
        bar.set_postfix(loss=f"{record.train_loss:.3f}", dist=f"{extra['l_dist']:.2g}",
                        val_auc=f"{val_scores.auc:.3f}", best=best_epoch)
        if on_epoch is not None:
            on_epoch(record, best_states if improved else None)
        if resume is not None:
            resume.save(epoch, history, best_epoch, best_states, since_best)
        if since_best >= o.patience:
            break
    bar.close()
    return FitResult(history, best_epoch, best_states, o.epochs, resumed_from)  # type: ignore[arg-type]
