"""Patch augmentation for training on pixels: FBTA's end-to-end view X_SB (METHODS.md A.4) and the
IKD-MIL segmentation patches (our choice in both; the authors' IKD-MIL code uses none).

Why these and why batched on the device: a trainable extractor sees few
patches per step (FBTA: C·M per slide), so cheap label-preserving variety matters —
flips and 90° rotations (tissue has no orientation), mild brightness/contrast/
saturation/hue jitter, and HED stain jitter (scanner and staining variation,
Tellez et al. 2019). Each is a small function over a float B×3×H×W batch in
[0, 1], drawn per patch from an explicit generator, so a seeded run repeats.
The distillation target TFE*(X_SB) always sees the *non-augmented* patches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical density, RGB columns.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_GREY = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Augment:
    """Parameters of the patch augmentation; ``Augment(**cfg.fbta.augment)``."""

    flip: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    hed_sigma: float = 0.03

    def __call__(self, x: Tensor, gen: Optional[torch.Generator] = None) -> Tensor:
        """Augment a float B×3×H×W batch in [0, 1]; returns a new tensor, clamped to [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"augment expects float B×3×H×W in [0, 1], got {tuple(x.shape)} {x.dtype}")
        if self.flip:
            x = random_flips(x, gen)
        if self.rot90:
            x = random_rot90(x, gen)
        if self.hed_sigma > 0:
            x = hed_jitter(x, self.hed_sigma, gen)
        if self.brightness > 0:
            x = x * _uniform(x, 1 - self.brightness, 1 + self.brightness, gen)
        if self.contrast > 0:
            mean = grey(x).mean(dim=(-2, -1), keepdim=True)
            x = mean + (x - mean) * _uniform(x, 1 - self.contrast, 1 + self.contrast, gen)
        if self.saturation > 0:
            g = grey(x)
            x = g + (x - g) * _uniform(x, 1 - self.saturation, 1 + self.saturation, gen)
        if self.hue > 0:
            x = hue_shift(x, _uniform(x, -self.hue, self.hue, gen))
        return x.clamp_(0.0, 1.0)


def _uniform(x: Tensor, lo: float, hi: float, gen: Optional[torch.Generator]) -> Tensor:
    """One factor per image, shaped B×1×1×1, on x's device."""
    u = torch.rand(x.shape[0], 1, 1, 1, generator=gen)
    return (lo + (hi - lo) * u).to(x.device, x.dtype)


def grey(x: Tensor) -> Tensor:
    """Luma (ITU-R 601), B×1×H×W."""
    w = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def random_flips(x: Tensor, gen: Optional[torch.Generator] = None) -> Tensor:
    """Independent horizontal and vertical flips, each with probability 1/2 per patch."""
    h = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device).view(-1, 1, 1, 1)
    v = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device).view(-1, 1, 1, 1)
    x = torch.where(h, x.flip(-1), x)
    return torch.where(v, x.flip(-2), x)


def random_rot90(x: Tensor, gen: Optional[torch.Generator] = None) -> Tensor:
    """A random multiple of 90° per patch (square patches only; others pass through)."""
    if x.shape[-1] != x.shape[-2]:
        return x
    k = torch.randint(0, 4, (x.shape[0],), generator=gen)
    out = x.clone()
    for turns in range(1, 4):
        sel = (k == turns).nonzero().flatten().to(x.device)
        if sel.numel():
            out[sel] = torch.rot90(x[sel], turns, dims=(-2, -1))
    return out


def hue_shift(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate chroma in YIQ space by ``shift`` turns (B×1×1×1); luma is unchanged."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=x.dtype, device=x.device)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    angle = shift.view(-1) * 2 * math.pi
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq)


def hed_jitter(x: Tensor, sigma: float, gen: Optional[torch.Generator] = None) -> Tensor:
    """Per-patch stain jitter: each HED channel scaled by U(1±σ) and shifted by U(±σ) in optical density."""
    b = x.shape[0]
    m_in = _HED_FROM_RGB.to(x.device, x.dtype)
    m_out = _RGB_FROM_HED.to(x.device, x.dtype)
    od = -torch.log(x.clamp_min(1.0 / 255.0))
    hed = torch.einsum("bchw,cd->bdhw", od, m_in)
    alpha = (1 + sigma * (2 * torch.rand(b, 3, 1, 1, generator=gen) - 1)).to(x.device, x.dtype)
    beta = (sigma * (2 * torch.rand(b, 3, 1, 1, generator=gen) - 1)).to(x.device, x.dtype)
    od = torch.einsum("bdhw,dc->bchw", hed * alpha + beta, m_out)
    return torch.exp(-od.clamp_min(0.0))
