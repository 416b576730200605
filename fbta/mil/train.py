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
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from fbta.device import resolve_device  # noqa: F401 (re-exported: one resolver)
from fbta.mil.data import BagDataset
from fbta.mil.metrics import Scores, score
from fbta.mil.registry import MILHead
from fbta.mil.resume import Epoch, Resumable  # noqa: F401 (Epoch re-exported: the history row)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (all devices); ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False




EMA_EVERY = ("epoch", "step")


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

    One implementation for both trainers (vanilla MIL: ``[(MIL*, MIL)]``; FBTA:
    ``[(MIL*, MIL), (TFE*, TFE)]``). The teachers are the caller's modules (not
    registered here); this module's only state is the update counter ``n_updates``,
    a buffer, so registering it with :class:`~fbta.mil.resume.Resumable` puts it in
    resume.pt and a resumed run continues the warm-up where it stopped.
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


class Selection:
    """Best-epoch choice and early stopping, the same for both trainers.

    - Epochs ``0 … first_eligible − 1`` never become "best" and do not count
      toward ``patience``; ``first_eligible = min(min_epochs, epochs − 1)``, so a run
      shorter than ``min_epochs`` still selects its last (most trained) epoch.
    - From there, a higher validation AUC wins (NaN AUC counts as −∞). On equal
      AUC the later epoch wins only if its validation loss is lower (the
      existing tie rule of :func:`_better`, kept).
    """

    def __init__(self, patience: int, min_epochs: int, epochs: int) -> None:
        self.patience = int(patience)
        self.first_eligible = max(0, min(int(min_epochs), int(epochs) - 1))
        self.best_scores: Optional[Scores] = None
        self.best_epoch, self.since_best = 0, 0

    def restore(self, history: list["Epoch"], best_epoch: int, since_best: int) -> None:
        """State of a resumed run (from resume.pt); no best yet if the saved best epoch was never one."""
        self.best_epoch, self.since_best = best_epoch, since_best
        self.best_scores = history[best_epoch].val if history and history[best_epoch].best else None

    def judge(self, epoch: int, val: Scores) -> bool:
        """Record epoch ``epoch``'s validation scores; True if it is the new best."""
        if epoch < self.first_eligible:
            return False
        if _better(val, self.best_scores):
            self.best_scores, self.best_epoch, self.since_best = val, epoch, 0
            return True
        self.since_best += 1
        return False

    @property
    def stop(self) -> bool:
        return self.since_best >= self.patience


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
    teacher = frozen_copy(model) if opts.ema_alpha is not None else None
    ema = EMA([(teacher, model)], opts.ema_alpha, opts.ema_every, opts.ema_warmup) if teacher is not None else None
    optimiser = torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    # own generators for the sampling order and the loader's worker seeds, so that neither draws from the
    # global RNG that dropout uses: in-memory and worker-streamed bags then give the same run
    sample_gen, loader_gen = torch.Generator().manual_seed(opts.seed), torch.Generator().manual_seed(opts.seed + 1)
    loader = DataLoader(train, batch_size=None, num_workers=opts.num_workers,
                        sampler=make_sampler(train.labels, opts.balanced, sample_gen), generator=loader_gen,
                        pin_memory=device.type == "cuda", persistent_workers=opts.num_workers > 0)
    history: list[Epoch] = []
    select = Selection(opts.patience, opts.min_epochs, opts.epochs)
    best_state: dict[str, torch.Tensor] = {}
    start = 0
    if resume is not None:
        emas = {"ema": teacher, "ema_state": ema} if ema is not None else {}
        point = resume.start({"model": model, **emas}, {"adam": optimiser},
                             {"sampler": sample_gen, "loader": loader_gen}, opts.patience, opts.epochs)
        if point is not None:
            history, best_epoch, best_state, _, since_best, start = point
            select.restore(history, best_epoch, since_best)
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
                ema.after_step()
            losses.append(loss.item())
            correct += int(out.logits.argmax(-1).item() == y.item())
        if ema is not None:
            ema.after_epoch()
        judged = teacher if teacher is not None else model
        probs, _ = predict(judged, val, device)
        val_scores = score(val.labels, probs)
        improved = select.judge(epoch, val_scores)
        extra = {"ema_decay": ema.last_decay} if ema is not None else {}
        record = Epoch(epoch, float(np.mean(losses)), correct / len(losses), val_scores,
                       time.perf_counter() - t0, improved, extra=extra)
        history.append(record)
        if improved:
            best_state = {k: v.detach().cpu().clone() for k, v in judged.state_dict().items()}
        bar.set_postfix(loss=f"{record.train_loss:.3f}", val_auc=f"{val_scores.auc:.3f}",
                        val_loss=f"{val_scores.loss:.3f}", best=select.best_epoch)
        if on_epoch is not None:
            on_epoch(record, best_state if improved else None)
        if resume is not None:
            resume.save(epoch, history, select.best_epoch, best_state, select.since_best)
        if select.stop:
            break
    bar.close()
    return FitResult(history, select.best_epoch, best_state, opts.epochs, resumed_from)
