"""Where an FBTA step's time goes (extractor, translator, MIL), measured from outside the step.

Forward time per part comes from hooks around the parts' calls (module forward
hooks; the translator's ``heads``), so the step itself stays the pseudo-code of
METHODS.md A. The backward pass cannot be split by part without a profiler; it is
shared out by each part's forward share — rough, but honest about being so.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import torch
from torch import nn

PARTS = ("extractor", "translator", "mil")


class PartTimer:
    """Forward seconds per part between ``reset`` calls; hooks removed by ``close`` (or the ``with`` block)."""

    def __init__(self, modules: dict[str, list[nn.Module]], methods: dict[str, list[tuple[Any, str]]],
                 device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._open: dict[str, float] = {}
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, str]] = []
        for part, mods in modules.items():
            for mod in mods:
                self._handles.append(mod.register_forward_pre_hook(functools.partial(self._pre, part)))
                self._handles.append(mod.register_forward_hook(functools.partial(self._post, part)))
        for part, targets in methods.items():
            for obj, name in targets:
                setattr(obj, name, self._timed(part, getattr(obj, name)))
                self._patched.append((obj, name))

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _pre(self, part: str, *_: Any) -> None:
        self._open[part] = self._now()

    def _post(self, part: str, *_: Any) -> None:
        self.seconds[part] += self._now() - self._open.pop(part)

    def _timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            self._pre(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self._post(part)
        return call

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def forward(self) -> dict[str, float]:
        """This step's forward seconds per part (``fwd_<part>``)."""
        return {f"fwd_{p}": s for p, s in self.seconds.items()}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for obj, name in self._patched:
            delattr(obj, name)  # the instance attribute goes; the class's method shows through again
        self._handles, self._patched = [], []

    def __enter__(self) -> "PartTimer":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def split(forward: dict[str, float], backward_s: float) -> dict[str, float]:
    """``<part>_s`` = the part's forward time + the backward time × its share of the parts' forward time."""
    total = sum(max(forward[f"fwd_{p}"], 1e-9) for p in PARTS)
    return {f"{p}_s": forward[f"fwd_{p}"] + backward_s * max(forward[f"fwd_{p}"], 1e-9) / total for p in PARTS}


def fbta_timer(m: Any, device: torch.device) -> PartTimer:
    """The timer of an :class:`~fbta.e2e.step.FBTAModels`: TFE and TFE*, the translator heads, MIL and MIL*."""
    return PartTimer({"extractor": [m.tfe, m.tfe_ema], "mil": [m.mil, m.mil_ema]},
                     {"translator": [(m.translator, "heads")]}, device)
