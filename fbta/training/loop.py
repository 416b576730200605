"""One training loop for every trainer: epochs, steps, progress, EMA, selection, resume, history, hooks.

A trainer — vanilla MIL (fbta/mil/train.py), FBTA (fbta/e2e/trainer.py), the
IKD-MIL teacher and student (fbta/seg/train.py, fbta/seg/distill.py) — supplies
a :class:`Method` (its batches, its step = forward + loss, its validation, the
weights it would deploy) and a selection rule; :func:`fit_loop` owns the rest,
so progress bars, early stopping, the EMA, resume after SIGKILL, the per-epoch
record and the ``on_epoch`` hook (MLflow, checkpoints, Optuna pruning) behave
the same for all four. The loop also owns the bookkeeping a step should not
read like: bf16 autocast around the forward, ``backward``, the optimiser step,
and where the time went (waiting for data, backward).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol

import numpy as np
import torch
from torch import Tensor

from fbta.training.ema import EMA
from fbta.training.resume import Parts, Resumable

State = dict[str, Any]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (all devices); ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@dataclass
class Epoch:
    """One row of the training history (history.csv, MLflow, the hook)."""

    epoch: int
    train_loss: float
    val: Any  # the method's validation scores (Scores, SegScores): a dataclass with as_dict(prefix)
    seconds: float
    best: bool = False
    extra: dict[str, float] = field(default_factory=dict)  # method-specific (loss terms, time split, EMA decay)
    train_acc: Optional[float] = None  # slide classifiers only

    def as_row(self) -> dict[str, float]:
        row: dict[str, float] = {"epoch": self.epoch, "train_loss": self.train_loss}
        if self.train_acc is not None:
            row["train_acc"] = self.train_acc
        return {**row, **self.val.as_dict("val_"), "seconds": self.seconds, "best": int(self.best), **self.extra}


def history_to_json(history: list[Epoch]) -> str:
    return json.dumps([{**asdict(e), "val": asdict(e.val)} for e in history])


def history_from_json(text: str, scores_type: type) -> list[Epoch]:
    return [Epoch(**{**r, "val": scores_type(**r["val"])}) for r in json.loads(text)]


class Selection(Protocol):
    """Which epoch is deployed, and when to stop (AUC with patience for slides; F1 above baselines for maps)."""

    best: Optional[Epoch]

    def judge(self, record: Epoch, snapshot: Callable[[], State]) -> bool: ...  # True: the new best

    @property
    def stop(self) -> bool: ...

    def chosen(self) -> tuple[Epoch, State]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], history: list[Epoch]) -> None: ...


class Method:
    """What a trainer supplies to :func:`fit_loop`. Override the first five; the rest have defaults."""

    scores_type: type  # the validation scores' dataclass (history in resume.pt)
    optimiser: torch.optim.Optimizer  # the current one (IKD-MIL replaces it at a role reversal)

    def parts(self) -> Parts:
        """(modules, optimisers, generators) a resumed run must get back, by name (the EMA teachers: the loop's)."""
        raise NotImplementedError

    def batches(self, epoch: int) -> Iterable[Any]:
        """Put the models in training mode and yield the epoch's batches."""
        raise NotImplementedError

    def step(self, batch: Any, epoch: int) -> tuple[Tensor, dict[str, float]]:
        """Forward and loss of one batch: (the loss to backpropagate, per-step figures to average)."""
        raise NotImplementedError

    def validate(self) -> Any:
        """The validation scores of the model as it would be deployed now."""
        raise NotImplementedError

    def snapshot(self) -> State:
        """The weights to deploy if this epoch is chosen."""
        raise NotImplementedError

    def epoch_extra(self, rows: list[dict[str, float]], val: Any) -> dict[str, float]:
        """The epoch's method-specific figures (history columns) from its steps' figures."""
        return {}

    def after_judge(self, record: Epoch, improved: bool, snapshot: Callable[[], State]) -> list[str]:
        """After selection, before the hook (IKD-MIL: role reversal); returns lines to print."""
        return []

    def postfix(self, record: Epoch) -> dict[str, str]:
        return {"loss": f"{record.train_loss:.3f}"}

    def lines(self, record: Epoch, selection: Selection) -> list[str]:
        """Lines printed under the progress bar after every epoch (none by default)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Method state beyond parts() that resume.pt must keep (weights-only types)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def result_extra(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class LoopOptions:
    epochs: int
    desc: str = "train"
    progress: bool = True
    first_epoch: int = 0  # the number of the first epoch in records (IKD-MIL counts from 1)
    amp: bool = False  # bf16 autocast around each step's forward and loss
    device: torch.device = torch.device("cpu")


@dataclass
class FitResult:
    history: list[Epoch]
    best_epoch: int  # the chosen epoch's number
    best_state: State  # the weights to deploy (EMA weights when the method deploys its EMA)
    planned_epochs: int
    resumed_from: int = 0  # epochs run before this process (> 0: they came from resume.pt)
    extra: dict[str, Any] = field(default_factory=dict)  # the method's (IKD-MIL: reversals, baselines)

    @property
    def best(self) -> Epoch:
        return next(e for e in self.history if e.epoch == self.best_epoch)

    @property
    def stopped_early(self) -> bool:
        return len(self.history) < self.planned_epochs


def _sync(device: torch.device) -> float:
    """A timestamp that includes queued GPU work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def once(fn: Callable[[], State]) -> Callable[[], State]:
    """``fn`` called at most once (one copy of the weights per epoch, shared by selection and the method)."""
    memo: list[State] = []

    def call() -> State:
        if not memo:
            memo.append(fn())
        return memo[0]
    return call


def fit_loop(method: Method, opts: LoopOptions, selection: Selection, ema: Optional[EMA] = None,
             resume: Optional[Resumable] = None,
             on_epoch: Optional[Callable[[Epoch, Optional[State]], None]] = None) -> FitResult:
    """Run ``opts.epochs`` epochs of ``method`` (fewer when ``selection.stop``); ``on_epoch(record, state_or_None)``
    after each (the deployable state only when the epoch is the new best, so the caller can checkpoint at once).
    ``resume`` saves the run after every epoch and continues a killed one from its last finished epoch."""
    from tqdm.auto import tqdm

    def parts() -> Parts:  # the method's, plus the EMA the loop owns: its teachers and its update count
        modules, optimisers, generators = method.parts()
        if ema is not None:
            modules = {**modules, **{f"ema_teacher{i}": t for i, (t, _) in enumerate(ema.pairs)}, "ema_state": ema}
        return modules, optimisers, generators

    history: list[Epoch] = []
    start = 0
    if resume is not None:
        payload = resume.load(opts.desc)
        if payload is not None:
            Resumable.restore(payload, parts())
            history = history_from_json(payload["history"], method.scores_type)
            selection.load_state_dict(payload["selection"], history)
            method.load_state_dict(payload["method"])
            start = opts.epochs if selection.stop else payload["epoch"] + 1
            print(f"{opts.desc}: resuming after epoch {payload['epoch'] + opts.first_epoch} from {resume.path}",
                  flush=True)
    resumed_from = start
    device = opts.device
    bar = tqdm(range(start, opts.epochs), desc=opts.desc, unit="epoch", disable=not opts.progress,
               dynamic_ncols=True, initial=start, total=opts.epochs)
    for i in bar:
        number = i + opts.first_epoch
        t0 = time.perf_counter()
        rows: list[dict[str, float]] = []
        t_ready = time.perf_counter()
        for batch in method.batches(i):
            wait = time.perf_counter() - t_ready
            optimiser = method.optimiser
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.amp):
                loss, stats = method.step(batch, i)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{opts.desc} epoch {number}: training loss is {loss.item()} "
                                         "(lower the learning rate?)")
            t_back = _sync(device)
            loss.backward()
            backward_s = _sync(device) - t_back
            optimiser.step()
            if ema is not None:
                ema.after_step()
            rows.append({"loss": loss.item(), **stats, "data_s": wait, "backward_s": backward_s})
            t_ready = time.perf_counter()
        if ema is not None:
            ema.after_epoch()
        train_s = time.perf_counter() - t0
        val = method.validate()
        acc = float(np.mean([r["correct"] for r in rows])) if rows and "correct" in rows[0] else None
        record = Epoch(number, float(np.mean([r["loss"] for r in rows])) if rows else math.nan, val, 0.0,
                       train_acc=acc, extra={"train_seconds": round(train_s, 3), **method.epoch_extra(rows, val)})
        if ema is not None:
            record.extra["ema_decay"] = ema.last_decay  # the decay of the epoch's last update
        snapshot = once(method.snapshot)
        record.best = selection.judge(record, snapshot)
        notes = method.after_judge(record, record.best, snapshot)
        record.seconds = time.perf_counter() - t0
        history.append(record)
        bar.set_postfix({**method.postfix(record), "best": selection.best.epoch if selection.best else "none"})
        for line in method.lines(record, selection) + notes:
            bar.write(line)
        if on_epoch is not None:
            on_epoch(record, snapshot() if record.best else None)
        if resume is not None:
            resume.save(i, history_to_json(history), parts(), selection.state_dict(), method.state_dict())
        if selection.stop:
            break
    bar.close()
    if not history:
        raise ValueError(f"{opts.desc}: epochs must be ≥ 1 (got {opts.epochs})")
    best, state = selection.chosen()
    return FitResult(history, best.epoch, state, opts.epochs, resumed_from, method.result_extra())
