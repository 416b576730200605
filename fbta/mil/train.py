"""Vanilla MIL training on frozen features: one slide per step, early stopping on validation AUC.

Why these choices (CLAM/ABMIL practice, METHODS.md A):
- batch = one slide, because bags differ in size;
- class-balanced sampling with replacement (weights 1/class count), because
  cohorts are rarely balanced and one step sees one class;
- Adam with weight decay, the usual MIL optimiser;
- early stopping on validation AUC (ties broken by the lower validation loss,
  so a model that already separates the classes keeps improving its
  calibration instead of freezing at the first epoch that reached AUC 1);
- an optional EMA of the weights (``train.ema``): FBTA deploys an EMA MIL, so
  the baseline can be compared like for like. When on, validation and the
  saved checkpoint use the EMA weights.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from fbta.mil.data import BagDataset
from fbta.mil.metrics import Scores, score
from fbta.mil.registry import MILHead
from fbta.mil.resume import Resumable


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (all devices); ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class EMA:
    """Exponential moving average of a head's weights: θ_ema ← α θ_ema + (1 − α) θ after every step."""

    def __init__(self, model: nn.Module, alpha: float) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"EMA alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.alpha)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


@dataclass(frozen=True)
class FitOptions:
    epochs: int
    patience: int
    lr: float
    weight_decay: float
    ema_alpha: Optional[float] = None  # None: no EMA
    balanced: bool = True
    seed: int = 0
    num_workers: int = 0
    progress: bool = True


@dataclass
class Epoch:
    """One row of the training history."""

    epoch: int
    train_loss: float
    train_acc: float
    val: Scores
    seconds: float
    best: bool = False
    extra: dict[str, float] = field(default_factory=dict)  # method-specific (FBTA: loss terms, step-time split)

    def as_row(self) -> dict[str, float]:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "train_acc": self.train_acc,
                **self.val.as_dict("val_"), "seconds": self.seconds, "best": int(self.best), **self.extra}


@dataclass
class FitResult:
    history: list[Epoch]
    best_epoch: int
    best_state: dict[str, torch.Tensor]  # the weights to deploy (EMA weights when EMA is on)
    planned_epochs: int
    resumed_from: int = 0  # first epoch this process ran (> 0: the earlier ones came from resume.pt)

    @property
    def best(self) -> Epoch:
        return self.history[self.best_epoch]

    @property
    def stopped_early(self) -> bool:
        return len(self.history) < self.planned_epochs


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


def fit(model: MILHead, train: BagDataset, val: BagDataset, opts: FitOptions, device: torch.device,
        on_epoch: Callable[[Epoch, Optional[dict[str, torch.Tensor]]], None] | None = None,
        resume: Optional[Resumable] = None) -> FitResult:
    """Train ``model`` in place; ``on_epoch(epoch, best_state_or_None)`` runs after every epoch.

    ``best_state`` is passed only when the epoch improved, so the caller can
    checkpoint at once (a killed run keeps its best model so far); ``resume``
    saves the whole run after every epoch and continues a killed one.
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"training needs train and validation slides (got {len(train)} and {len(val)})")
    from tqdm.auto import tqdm

    model.to(device)
    ema = EMA(model, opts.ema_alpha) if opts.ema_alpha is not None else None
    optimiser = torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    # own generators for the sampling order and the loader's worker seeds, so that neither draws from the
    # global RNG that dropout uses: in-memory and worker-streamed bags then give the same run
    sample_gen, loader_gen = torch.Generator().manual_seed(opts.seed), torch.Generator().manual_seed(opts.seed + 1)
    loader = DataLoader(train, batch_size=None, num_workers=opts.num_workers,
                        sampler=make_sampler(train.labels, opts.balanced, sample_gen), generator=loader_gen,
                        pin_memory=device.type == "cuda", persistent_workers=opts.num_workers > 0)
    history: list[Epoch] = []
    best_scores: Optional[Scores] = None
    best_epoch, best_state, since_best, start = 0, {}, 0, 0
    if resume is not None:
        point = resume.start({"model": model, **({"ema": ema.model} if ema is not None else {})}, {"adam": optimiser},
                             {"sampler": sample_gen, "loader": loader_gen}, opts.patience, opts.epochs)
        if point is not None:
            history, best_epoch, best_state, best_scores, since_best, start = point
    resumed_from = start
    bar = tqdm(range(start, opts.epochs), desc="train", unit="epoch", disable=not opts.progress,
               dynamic_ncols=True, initial=start, total=opts.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        losses, correct = [], 0
        for bag, y in loader:
            bag, y = bag.to(device, non_blocking=True), y.to(device).view(1)
            out = model(bag)
            loss = loss_fn(out.logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}: training loss is {loss.item()} (lower train.lr?)")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if ema is not None:
                ema.update(model)
            losses.append(loss.item())
            correct += int(out.logits.argmax(-1).item() == y.item())
        judged = ema.model if ema is not None else model
        probs, _ = predict(judged, val, device)
        val_scores = score(val.labels, probs)
        improved = _better(val_scores, best_scores)
        record = Epoch(epoch, float(np.mean(losses)), correct / len(losses), val_scores,
                       time.perf_counter() - t0, improved)
        history.append(record)
        if improved:
            best_scores, best_epoch, since_best = val_scores, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in judged.state_dict().items()}
        else:
            since_best += 1
        bar.set_postfix(loss=f"{record.train_loss:.3f}", val_auc=f"{val_scores.auc:.3f}",
                        val_loss=f"{val_scores.loss:.3f}", best=best_epoch)
        if on_epoch is not None:
            on_epoch(record, best_state if improved else None)
        if resume is not None:
            resume.save(epoch, history, best_epoch, best_state, since_best)
        if since_best >= opts.patience:
            break
    bar.close()
    return FitResult(history, best_epoch, best_state, opts.epochs, resumed_from)
