"""One device resolver for every stage: ``auto`` = CUDA when torch sees a GPU, else CPU.

A device the machine does not have is refused here, at the stage door, with the
setting's name (a ConfigError: one line, exit code 2) — not deep inside the first ``.to()``.
"""
from __future__ import annotations

import os

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


_said: set[str] = set()


def cpu_cores() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def fit_workers(n: int, setting: str) -> int:
    """Loader worker processes: ``-1`` = the usable cores; more than those is capped, said once per setting
    instead of PyTorch's per-loader warning ("This DataLoader will create 4 worker processes … suggested max 2")."""
    cores = cpu_cores()
    if int(n) < 0:  # -1: as many as the machine has (the schema default for patch readers)
        return cores
    n = int(n)
    if n > cores:
        if setting not in _said:
            _said.add(setting)
            print(f"{setting}={n} > {cores} usable CPU core(s) here: using {cores}", flush=True)
        return cores
    return n
