"""Resumable training: a killed run continues from its last finished epoch, exactly.

Why a ``resume.pt`` apart from the deployed weights: those are a plain state
dict; resume.pt is everything else a run needs to go on as if never stopped —
live and EMA weights, optimiser moments, every RNG stream (global
torch/NumPy/Python, the sampler's and augmentation's generators), the history,
the selection state (best epoch and its weights, patience counter) and the
method's own state (IKD-MIL: the role-reversal candidate). It is written
atomically after every epoch, loaded with ``weights_only=True`` (RNG states are
stored as tensors and plain ints), used only when its fingerprint matches the
run's configuration, and deleted once training completes. A run killed
mid-epoch repeats that epoch from its start.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from fbta.io.atomic import atomic_path

RESUME = "resume.pt"
VERSION = 2  # 2: selection and method state as dicts (one loop for every trainer)


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


Parts = tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer], dict[str, torch.Generator]]


class Resumable:
    """Where one run's resume.pt lives and what it must match (``fingerprint``: the run's configuration)."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = Path(path), fingerprint

    def save(self, epoch: int, history_json: str, parts: Parts, selection: dict[str, Any],
             method: dict[str, Any]) -> None:
        """Everything to go on from ``epoch + 1``; atomic, so a kill while saving keeps the previous one."""
        modules, optimisers, generators = parts
        payload = {
            "version": VERSION, "fingerprint": self.fingerprint, "epoch": epoch, "history": history_json,
            "selection": selection, "method": method,
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimisers": {k: o.state_dict() for k, o in optimisers.items()},
            "generators": {k: g.get_state() for k, g in generators.items()},
            "rng": _rng_state(),
        }
        with atomic_path(self.path, suffix=".pt") as tmp:
            torch.save(payload, tmp)

    def load(self, who: str = "train", log: Callable[[str], Any] = print) -> Optional[dict[str, Any]]:
        """The saved payload if there is one from this configuration, else None (start afresh); ``who``
        starts the log lines (the stage)."""
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable: it cannot be trusted, and the epochs are cheap to redo
            log(f"{who}: ignoring {self.path} ({type(exc).__name__}: {exc}); starting afresh")
            return None
        if payload.get("version") != VERSION or payload.get("fingerprint") != self.fingerprint:
            log(f"{who}: {self.path} is from another configuration; starting afresh")
            return None
        return payload

    @staticmethod
    def restore(payload: dict[str, Any], parts: Parts) -> None:
        """Load the saved weights, optimiser moments and RNG streams into the run's moving parts."""
        modules, optimisers, generators = parts
        for k, m in modules.items():
            m.load_state_dict(payload["modules"][k])
        for k, o in optimisers.items():
            o.load_state_dict(payload["optimisers"][k])
        for k, g in generators.items():
            g.set_state(payload["generators"][k])
        _set_rng_state(payload["rng"])

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
