"""Resumable training: a killed ``fbta train`` continues from its last finished epoch, exactly.

Why a ``resume.pt`` apart from ``best.pt``: best.pt is the deployable weights
(a plain state dict); resume.pt is everything else a run needs to go on as if
never stopped — live and EMA weights, optimiser moments, every RNG stream
(global torch/NumPy/Python, the sampler's and augmentation's generators),
the history and the early-stopping counters. It is written atomically after
every epoch, loaded with ``weights_only=True`` (RNG states are stored as
tensors and plain ints), used only when its fingerprint matches the run's
configuration, and deleted once training completes. A run killed mid-epoch
repeats that epoch from its start.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from fbta.io.atomic import atomic_path
from fbta.mil.metrics import Scores


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


RESUME = "resume.pt"
VERSION = 1


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [int(pos), int(has_gauss), float(gauss)], "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_to_json(ep: Any) -> dict[str, Any]:
    return {"epoch": ep.epoch, "train_loss": ep.train_loss, "train_acc": ep.train_acc, "val": asdict(ep.val),
            "seconds": ep.seconds, "best": ep.best, "extra": ep.extra}


class Resumable:
    """The run's moving parts, registered by ``start`` before the first epoch; ``save`` after each."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = Path(path), fingerprint
        self.modules: dict[str, nn.Module] = {}
        self.optimisers: dict[str, torch.optim.Optimizer] = {}
        self.generators: dict[str, torch.Generator] = {}

    def save(self, epoch: int, history: list[Any], best_epoch: int, best_state: dict[str, Any],
             since_best: int) -> None:
        """Everything to go on from ``epoch + 1``; atomic, so a kill while saving keeps the previous one."""
        payload = {
            "version": VERSION, "fingerprint": self.fingerprint, "epoch": epoch,
            "history": json.dumps([epoch_to_json(e) for e in history]),
            "best_epoch": best_epoch, "best_state": best_state, "since_best": since_best,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimisers": {k: o.state_dict() for k, o in self.optimisers.items()},
            "generators": {k: g.get_state() for k, g in self.generators.items()},
            "rng": _rng_state(),
        }
        with atomic_path(self.path, suffix=".pt") as tmp:
            torch.save(payload, tmp)

    def start(self, modules: dict[str, nn.Module], optimisers: dict[str, torch.optim.Optimizer],
              generators: dict[str, torch.Generator], patience: int, epochs: int,
              log: Any = print) -> Optional[tuple[list[Any], int, Any, Scores, int, int]]:
        """Register the run's moving parts (``save`` writes them) and load a matching resume.pt into them.

        Returns (history, best epoch, best state, best scores, epochs since best, first epoch to run),
        or None to start afresh.
        """
        self.modules, self.optimisers, self.generators = modules, optimisers, generators
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable: it cannot be trusted, and the epochs are cheap to redo
            log(f"train: ignoring {self.path} ({type(exc).__name__}: {exc}); starting afresh")
            return None
        if payload.get("version") != VERSION or payload.get("fingerprint") != self.fingerprint:
            log(f"train: {self.path} is from another configuration; starting afresh")
            return None
        for k, m in modules.items():
            m.load_state_dict(payload["modules"][k])
        for k, o in optimisers.items():
            o.load_state_dict(payload["optimisers"][k])
        for k, g in generators.items():
            g.set_state(payload["generators"][k])
        _set_rng_state(payload["rng"])
        log(f"train: resuming after epoch {payload['epoch']} from {self.path}")
        history, best, since_best = history_from_json(json.loads(payload["history"])), payload["best_epoch"], \
            payload["since_best"]
        first = epochs if since_best >= patience else payload["epoch"] + 1  # killed after its last epoch: none left
        return history, best, payload["best_state"], history[best].val, since_best, first

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def history_from_json(rows: list[dict[str, Any]]) -> list[Epoch]:
    return [Epoch(r["epoch"], r["train_loss"], r["train_acc"], Scores(**r["val"]), r["seconds"], r["best"],
                  r["extra"]) for r in rows]
