"""What every patch extractor is, and the registry they are added to.

Kept apart from :mod:`fbta.features.registry` (which builds the built-in and
foundation extractors) so that modules registering extractors import this one
only: no module imports the registry that imports it back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Builder = Callable[[Optional[str], bool], "Extractor"]
_REGISTRY: dict[str, Builder] = {}


@dataclass(frozen=True)
class Preprocess:
    """uint8 patches → normalised float batch at ``input_size``; picklable for DataLoader workers.

    Kept apart from the model so a worker process gets three numbers, not a network.
    Runs on whatever device the input lives on (CPU workers or the GPU).
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, x: Tensor) -> Tensor:
        """Accept B×H×W×3 or B×3×H×W (or one image without B); uint8 in 0–255 or float in 0–1.

        A tensor with 3 both in dim 1 and in the last dim is read as channels-first.
        """
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(f"preprocess expects B×H×W×3 or B×3×H×W, got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            if x.shape[-1] != 3:
                raise ValueError(f"preprocess expects 3 colour channels, got shape {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(255.0)
        elif x.is_floating_point():
            x = x.to(torch.float32)
        else:
            raise ValueError(f"preprocess expects uint8 (0–255) or float (0–1) pixels, got {x.dtype}")
        s = self.input_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()


class Extractor(nn.Module):
    """A backbone mapping a normalised B×3×H×W batch to B×``dim`` features.

    A frozen extractor (``trainable=False``) stays in eval mode even when a parent
    module calls ``.train()``: a frozen feature extractor must not drift its
    BatchNorm statistics while the MIL head around it trains.
    """

    def __init__(
        self, trunk: nn.Module, *, name: str, arch: str, dim: int, input_size: int,
        mean: Sequence[float], std: Sequence[float], weights_id: str,
    ) -> None:
        super().__init__()
        self.trainable = True
        self.trunk = trunk
        self.name = name
        self.arch = arch
        self.dim = int(dim)
        self.input_size = int(input_size)
        self.mean: tuple[float, float, float] = tuple(float(v) for v in mean)  # type: ignore[assignment]
        self.std: tuple[float, float, float] = tuple(float(v) for v in std)  # type: ignore[assignment]
        self.weights_id = weights_id

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    @property
    def transform(self) -> Preprocess:
        """The picklable preprocessing callable (hand this to DataLoader workers)."""
        return Preprocess(self.input_size, self.mean, self.std)

    def preprocess(self, x: Tensor) -> Tensor:
        """uint8 B×H×W×3 / B×3×H×W → normalised float32 B×3×input_size×input_size."""
        return self.transform(x)

    def set_trainable(self, trainable: bool) -> "Extractor":
        """Frozen: eval mode, no gradients. Trainable: train mode, gradients on."""
        self.trainable = bool(trainable)
        self.requires_grad_(self.trainable)
        return self.train(self.trainable)

    def train(self, mode: bool = True) -> "Extractor":
        return super().train(bool(mode) and self.trainable)

    def describe(self) -> dict[str, Any]:
        """What a feature file should record about the extractor (h5 attributes, MLflow params)."""
        return {
            "extractor": self.name, "arch": self.arch, "dim": self.dim, "input_size": self.input_size,
            "mean": list(self.mean), "std": list(self.std), "weights": self.weights_id,
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, input_size={self.input_size}, weights={self.weights_id!r}"


# ----------------------------------------------------------------------------- registry

def register_extractor(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_extractor("x") def x(weights, trainable) -> Extractor``."""

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"extractor {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_extractors() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)
