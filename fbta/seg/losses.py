"""IKD-MIL losses (METHODS.md B), summed over the images of a batch as in the authors' code.

Why summed, not averaged: the authors add the weighted cross-entropy with
weight ``2·B`` next to Dice terms summed over the B images; keeping their
reduction keeps their balance between the two.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fbta.choices import CEForm
from fbta.seg.network import SegOutput

EPS = 1e-6


def soft_dice(p: Tensor, t: Tensor, smooth: float = 1.0) -> Tensor:
    """Per-image ``1 − (2Σpt + s)/(Σp + Σt + s)`` for B×1×H×W maps → B."""
    p, t = p.flatten(1), t.flatten(1)
    return 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def weak_dice(p: Tensor, target: Tensor, positive: Tensor) -> Tensor:
    """Dice vs ``target`` on positive images, Dice of the inverted maps vs all-ones on negative ones (→ B)."""
    pos = soft_dice(p, target)
    neg = soft_dice(1 - p, torch.ones_like(p))
    return torch.where(positive, pos, neg)


def teacher_dice_loss(out: SegOutput, labels: Tensor) -> Tensor:
    """Σ over {s1, s2, s3, f} and the batch of Dice vs the broadcast image label."""
    positive = labels > 0.5
    ones = torch.ones_like(out.fused)
    return sum(weak_dice(m, ones, positive).sum() for m in out.maps())  # type: ignore[return-value]


def gmp(p: Tensor, r: float) -> Tensor:
    """Generalised-mean pooling ``(mean pʳ)^(1/r)`` of each map → B (r=1: mean, r→∞: max)."""
    return p.clamp_min(EPS).pow(r).flatten(1).mean(1).pow(1.0 / r)


def teacher_gmp_bce_loss(out: SegOutput, labels: Tensor, r: float = 4.0) -> Tensor:
    """The DWS-MIL / SA-MIL / Swin-MIL alternative: BCE of each map's generalised mean vs the label, summed."""
    return sum(F.binary_cross_entropy(gmp(m, r).clamp(EPS, 1 - EPS), labels, reduction="sum")
               for m in out.maps())  # type: ignore[return-value]


def distill_dice_loss(student: SegOutput, teacher: SegOutput, labels: Tensor, kd: str = "fusion") -> Tensor:
    """Fusion KD: every student map vs the teacher's fused map (positives) or all-zero (negatives).

    ``kd="blockwise"`` (the ablation): student sᵢ vs teacher sᵢ and student f vs teacher f.
    """
    positive = labels > 0.5
    if kd == "fusion":
        targets: Sequence[Tensor] = [teacher.fused] * 4
    elif kd == "blockwise":
        targets = teacher.maps()
    else:
        raise ValueError(f"seg.distill.kd='{kd}' must be fusion or blockwise")
    return sum(weak_dice(m, t.detach(), positive).sum() for m, t in zip(student.maps(), targets))  # type: ignore


CE_FORMS = CEForm.values()  # the schema's choices (fbta/choices.py), as plain strings


def pixel_ce(p: Tensor, y: Tensor, form: str = "authors") -> Tensor:
    """Per-pixel cross-entropy of probability map ``p`` against 0/1 labels ``y``.

    ``authors``: the authors' code feeds (1 − p, p) to a softmax cross-entropy as
    if they were logits: ℓ = softplus(∓(2p − 1)), bounded in [0.31, 1.31] with a
    bounded gradient, so the OEEM weights softmax(−ℓ) stay within e¹ of each other.
    ``bce``: the textbook binary CE on probabilities, unbounded — its softmax(−ℓ)
    weights put nearly all the mass on the already-easy pixels.
    """
    if form == "authors":
        margin = (2 * p - 1) * (2 * y - 1)  # logit of the labelled class minus the other's
        return F.softplus(-margin)
    if form == "bce":
        return F.binary_cross_entropy(p.clamp(EPS, 1 - EPS), y, reduction="none")
    raise ValueError(f"seg.distill.ce_form='{form}' must be one of {', '.join(CE_FORMS)}")


def weighted_ce(p: Tensor, teacher_fused: Tensor, threshold: float = 0.5, form: str = "authors") -> Tensor:
    """OEEM-style weighted pixel cross-entropy of ``p`` vs the teacher's pseudo-label, mean over pixels and batch.

    Pseudo-label: teacher map ≥ threshold (the authors' ``.long()`` truncation
    makes nearly every label 0). Weights: softmax(−ℓ) over each image's pixels,
    rescaled to mean 1 and detached, so agreeing pixels weigh more and noisy
    ones are damped; 1 everywhere on an image whose pseudo-label has one class.
    ℓ: :func:`pixel_ce` (``form``; the authors' bounded form by default).
    """
    y = (teacher_fused.detach() >= threshold).float()
    loss = pixel_ce(p, y, form).flatten(1)  # B×HW
    w = torch.softmax(-loss.detach(), dim=1)
    w = w / w.mean(1, keepdim=True)
    yf = y.flatten(1)
    single = (yf.min(1).values == yf.max(1).values).unsqueeze(1)
    w = torch.where(single, torch.ones_like(w), w)
    return (w * loss).mean()
