"""Vanilla MIL training on frozen features: one slide per step, early stopping on validation AUC.

Why these choices (CLAM/ABMIL practice, METHODS.md A):
- batch = one slide, because bags differ in size;
- class-balanced sampling with replacement (weights 1/class count), because
  cohorts are rarely balanced and one step sees one class;
- Adam with weight decay, the usual MIL optimiser;
- early stopping on validation AUC (ties broken by the lower validation loss,
  so a model that already separates the classes keeps improving its
  calibration instead of freezing at the first epoch that reached AUC 1);
- no selection before ``train.min_epochs`` (:class:`Selection`): on a small
  validation split the untrained epoch 0 often reaches the best AUC by chance;
- an optional EMA of the weights (``train.ema``): FBTA deploys an EMA MIL, so
  the baseline can be compared like for like. When on, validation and the
  saved checkpoint use the EMA weights. Both trainers use the one :class:`EMA`
  (same update, same period and warm-up options), so a comparison that sets
  ``train.ema_*`` equal to ``fbta.ema_*`` gives both arms identical teachers.

The epochs themselves run in the one loop (fbta/training/loop.py); this module
supplies the vanilla step (one slide, cross-entropy), validation and the
AUC selection rule FBTA shares.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from fbta.device import resolve_device  # noqa: F401 (re-exported: one resolver)
from fbta.mil.data import BagDataset
from fbta.mil.metrics import Scores, score
from fbta.mil.registry import MILHead
from fbta.training.ema import EMA, frozen_copy
from fbta.training.loop import Epoch, FitResult, LoopOptions, Method, State, fit_loop
from fbta.training.resume import Parts, Resumable


class AUCSelection:
    """Best-epoch choice and early stopping for slide classifiers (vanilla and FBTA alike).

    - Epochs ``0 … first_eligible − 1`` never become "best" and do not count
      toward ``patience``; ``first_eligible = min(min_epochs, epochs − 1)``, so a run
      shorter than ``min_epochs`` still selects its last (most trained) epoch.
    - From there, a higher validation AUC wins (NaN AUC counts as −∞). On equal
      AUC the later epoch wins only if its validation loss is lower (:func:`_better`).
    """

    def __init__(self, patience: int, min_epochs: int, epochs: int) -> None:
        self.patience = int(patience)
        self.first_eligible = max(0, min(int(min_epochs), int(epochs) - 1))
        self.best: Optional[Epoch] = None
        self.best_state: State = {}
        self.since_best = 0

    @property
    def best_epoch(self) -> int:
        return self.best.epoch if self.best is not None else 0

    def judge(self, record: Epoch, snapshot: Callable[[], State]) -> bool:
        """Record an epoch's validation scores; True if it is the new best (its weights are then kept)."""
        if record.epoch < self.first_eligible:
            return False
        if _better(record.val, self.best.val if self.best is not None else None):
            self.best, self.best_state, self.since_best = record, snapshot(), 0
            return True
        self.since_best += 1
        return False

    @property
    def stop(self) -> bool:
        return self.since_best >= self.patience

    def chosen(self) -> tuple[Epoch, State]:
        assert self.best is not None, "no epoch was eligible (epochs must be ≥ 1)"
        return self.best, self.best_state

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best.epoch if self.best is not None else -1, "state": self.best_state,
                "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any], history: list[Epoch]) -> None:
        self.best = next((e for e in history if e.epoch == state["best"]), None)
        self.best_state, self.since_best = state["state"], int(state["since_best"])


@dataclass(frozen=True)
class FitOptions:
    epochs: int
    patience: int
    lr: float
    weight_decay: float
    ema_alpha: Optional[float] = None  # None: no EMA
    ema_every: str = "epoch"  # epoch | step: when the EMA is updated
    ema_warmup: bool = False  # decay min(α, (1+n)/(10+n)) for the n-th update (our choice)
    min_epochs: int = 0  # epochs before this one are never "best" nor count toward patience
    balanced: bool = True
    seed: int = 0
    num_workers: int = 0
    progress: bool = True


def make_sampler(labels: np.ndarray, balanced: bool, generator: torch.Generator) -> Sampler[int]:
    """Class-balanced (weights 1/class count, with replacement) or a plain shuffle; one epoch = len(labels) draws."""
    if not balanced:
        return RandomSampler(range(len(labels)), generator=generator)
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=generator)


@torch.no_grad()
def predict(model: Any, dataset: BagDataset, device: torch.device) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n×C) and instance scores (one array of N per slide), in eval mode.

    ``model`` is a :class:`MILHead` or anything called the same way (an FBTA
    translator → MIL classifier).
    """
    was_training = bool(getattr(model, "training", False))
    if isinstance(model, nn.Module):
        model.eval()
    probs, scores = [], []
    for i in range(len(dataset)):
        bag, _ = dataset[i]
        out = model(bag.to(device))
        probs.append(out.probs.float().cpu().numpy()[0])
        scores.append(out.scores.detach().float().cpu().numpy())
    if isinstance(model, nn.Module):
        model.train(was_training)
    return np.stack(probs) if probs else np.zeros((0, model.n_classes)), scores


def _better(val: Scores, best: Optional[Scores]) -> bool:
    """Higher validation AUC wins; equal AUC (or AUC undefined on both) → lower validation loss wins."""
    if best is None:
        return True
    a = val.auc if not math.isnan(val.auc) else -math.inf
    b = best.auc if not math.isnan(best.auc) else -math.inf
    return a > b or (a == b and val.loss < best.loss)


def cpu_state(module: nn.Module) -> State:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class VanillaMIL(Method):
    """One slide per step, cross-entropy on its label; validation (and deployment) through the EMA when on."""

    scores_type = Scores

    def __init__(self, model: MILHead, train: BagDataset, val: BagDataset, opts: FitOptions,
                 device: torch.device) -> None:
        self.model, self.val, self.device = model.to(device), val, device
        self.teacher = frozen_copy(model) if opts.ema_alpha is not None else None
        self.ema = EMA([(self.teacher, model)], opts.ema_alpha, opts.ema_every, opts.ema_warmup) \
            if self.teacher is not None else None
        self.optimiser = torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        self.loss_fn = nn.CrossEntropyLoss()
        # own generators for the sampling order and the loader's worker seeds, so that neither draws from the
        # global RNG that dropout uses: in-memory and worker-streamed bags then give the same run
        self.sample_gen = torch.Generator().manual_seed(opts.seed)
        self.loader_gen = torch.Generator().manual_seed(opts.seed + 1)
        self.loader = DataLoader(train, batch_size=None, num_workers=opts.num_workers,
                                 sampler=make_sampler(train.labels, opts.balanced, self.sample_gen),
                                 generator=self.loader_gen, pin_memory=device.type == "cuda",
                                 persistent_workers=opts.num_workers > 0)

    @property
    def judged(self) -> nn.Module:
        return self.teacher if self.teacher is not None else self.model

    def parts(self) -> Parts:
        return {"model": self.model}, {"adam": self.optimiser}, \
            {"sampler": self.sample_gen, "loader": self.loader_gen}

    def batches(self, epoch: int) -> Iterable[Any]:
        self.model.train()
        return self.loader

    def step(self, batch: Any, epoch: int) -> tuple[Tensor, dict[str, float]]:
        bag, y = batch
        bag, y = bag.to(self.device, non_blocking=True), y.to(self.device).view(1)
        out = self.model(bag)
        return self.loss_fn(out.logits, y), {"correct": float(out.logits.argmax(-1).item() == y.item())}

    def validate(self) -> Scores:
        probs, _ = predict(self.judged, self.val, self.device)
        return score(self.val.labels, probs)

    def snapshot(self) -> State:
        return cpu_state(self.judged)

    def postfix(self, record: Epoch) -> dict[str, str]:
        return {"loss": f"{record.train_loss:.3f}", "val_auc": f"{record.val.auc:.3f}",
                "val_loss": f"{record.val.loss:.3f}"}


def fit(model: MILHead, train: BagDataset, val: BagDataset, opts: FitOptions, device: torch.device,
        on_epoch: Callable[[Epoch, Optional[State]], None] | None = None,
        resume: Optional[Resumable] = None) -> FitResult:
    """Train ``model`` in place; ``on_epoch(epoch, best_state_or_None)`` runs after every epoch.

    ``best_state`` is passed only when the epoch improved, so the caller can
    checkpoint at once (a killed run keeps its best model so far); ``resume``
    saves the whole run after every epoch and continues a killed one.
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"training needs train and validation slides (got {len(train)} and {len(val)})")
    method = VanillaMIL(model, train, val, opts, device)
    return fit_loop(method, LoopOptions(opts.epochs, "train", opts.progress, device=device),
                    AUCSelection(opts.patience, opts.min_epochs, opts.epochs), method.ema, resume, on_epoch)
