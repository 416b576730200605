"""One device resolver for every stage: ``auto`` = CUDA when torch sees a GPU, else CPU.

A device the machine does not have is refused here, at the stage door, with the
setting's name (a ConfigError: one line, exit code 2) — not deep inside the first ``.to()``.
"""
from __future__ import annotations

import torch

from fbta.config import ConfigError


def resolve_device(name: str | torch.device, setting: str = "device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` | ``meta`` → torch.device; ``setting`` names it in errors."""
    if isinstance(name, torch.device):
        dev = name
    elif str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(name))
        except RuntimeError as exc:
            raise ConfigError(f"{setting}='{name}': not a device (auto, cpu, cuda, cuda:N, mps)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting}='{name}': this machine has no CUDA device torch can use "
                             f"(torch {torch.__version__}); use {setting}=auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{setting}='{name}': only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{setting}='{name}': MPS is not available on this machine")
    return dev
