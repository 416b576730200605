"""Segmentation metrics of IKD-MIL (METHODS.md B, authors' ``valid.py``), per image then averaged.

Fused map → Gaussian filter σ = 3 → ≥ 0.5. Positive images (ground truth has
tumour): F1 and IoU of the tumour class, and the symmetric Hausdorff distance
between predicted and true tumour pixels. Negative images: F1 and IoU of the
background class. ``f1`` and ``iou`` are means over all images (the selection
score); ``hausdorff`` is the mean over positive images.

Differences from the authors' code, on purpose: Hausdorff is exact on pixel
sets (Euclidean distance transforms) instead of OpenCV contour points, and a
positive image with an empty prediction scores the image diagonal — the worst
possible distance — instead of the distance to an arbitrary (0, 0) point; their
mean divides the summed distance by all images and multiplies by 2, ours
averages over the positive images.

Patch groups (:data:`NEG`, :data:`POS`, :data:`AMBIGUOUS`, from the weak labels
of ``fbta.seg.dataset``): ``f1``/``iou`` — the selection score — average over
positives and negatives only; ambiguous patches (some tumour, less than
``seg.min_tumour_fraction``) are scored as their own group (tumour F1/IoU,
``ambiguous_f1``/``ambiguous_iou``) and never enter the mean.

Trivial baselines (:func:`baseline_scores`): an all-background and an
all-tumour map scored the same way on the same patches. A model that does not
beat both has learned nothing a constant cannot do; checkpoint selection only
considers epochs above them (:func:`selection_floor`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter


def binarise(prob: np.ndarray, sigma: float = 3.0, threshold: float = 0.5) -> np.ndarray:
    """H×W probabilities → smoothed and thresholded boolean map."""
    p = gaussian_filter(prob.astype(np.float32), sigma=sigma) if sigma > 0 else prob
    return p >= threshold


def f1_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """F1 and IoU of the ``True`` class; both 1.0 when neither map has any (nothing to find, nothing found)."""
    tp = float(np.logical_and(pred, truth).sum())
    fp = float(np.logical_and(pred, ~truth).sum())
    fn = float(np.logical_and(~pred, truth).sum())
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def hausdorff(pred: np.ndarray, truth: np.ndarray) -> float:
    """Symmetric Hausdorff distance (pixels) between two non-empty-truth boolean maps; diagonal if pred is empty."""
    if not pred.any():
        return float(math.hypot(*pred.shape))
    d_to_truth = distance_transform_edt(~truth)
    d_to_pred = distance_transform_edt(~pred)
    return float(max(d_to_truth[pred].max(), d_to_pred[truth].max()))


NEG, POS, AMBIGUOUS = 0, 1, 2  # weak-label groups of a patch (none / ≥ min share / in between)
GROUP_NAMES = {NEG: "negative", POS: "positive", AMBIGUOUS: "ambiguous"}
BASELINES = ("all_background", "all_tumour")


@dataclass
class ImageScore:
    positive: bool  # the ground truth has tumour: F1/IoU of the tumour class, else of the background class
    f1: float
    iou: float
    hausdorff: float  # nan on negative images


def score_image(prob: np.ndarray, truth: np.ndarray, sigma: float = 3.0, threshold: float = 0.5) -> ImageScore:
    pred = binarise(prob, sigma, threshold)
    truth = truth.astype(bool)
    if truth.any():
        f1, iou = f1_iou(pred, truth)
        return ImageScore(True, f1, iou, hausdorff(pred, truth))
    f1, iou = f1_iou(~pred, ~truth)
    return ImageScore(False, f1, iou, float("nan"))


@dataclass
class SegScores:
    f1: float  # mean over positive and negative images (the selection score)
    iou: float
    hausdorff: float  # mean over positive images
    tumour_f1_pos: float  # tumour-class F1 / IoU, mean over positive images
    tumour_iou_pos: float
    background_f1_neg: float  # background-class F1 / IoU, mean over negative images
    background_iou_neg: float
    ambiguous_f1: float  # tumour-class F1 / IoU on the ambiguous group (nan when there is none)
    ambiguous_iou: float
    n: int  # positive + negative images
    n_pos: int
    n_neg: int
    n_ambiguous: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {prefix + k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarise(scores: list[ImageScore], groups: Optional[Sequence[int]] = None) -> SegScores:
    """Means per group; ``groups`` (NEG/POS/AMBIGUOUS per image) defaults to POS where the truth has tumour."""
    def mean(xs: list[float]) -> float:
        return float(np.mean(xs)) if xs else float("nan")

    if groups is None:
        groups = [POS if s.positive else NEG for s in scores]
    if len(groups) != len(scores):
        raise ValueError(f"{len(groups)} groups for {len(scores)} images")
    pos = [s for s, g in zip(scores, groups) if g == POS]
    neg = [s for s, g in zip(scores, groups) if g == NEG]
    amb = [s for s, g in zip(scores, groups) if g == AMBIGUOUS]
    core = pos + neg
    return SegScores(
        f1=mean([s.f1 for s in core]), iou=mean([s.iou for s in core]),
        hausdorff=mean([s.hausdorff for s in pos]),
        tumour_f1_pos=mean([s.f1 for s in pos]), tumour_iou_pos=mean([s.iou for s in pos]),
        background_f1_neg=mean([s.f1 for s in neg]), background_iou_neg=mean([s.iou for s in neg]),
        ambiguous_f1=mean([s.f1 for s in amb]), ambiguous_iou=mean([s.iou for s in amb]),
        n=len(core), n_pos=len(pos), n_neg=len(neg), n_ambiguous=len(amb),
    )


def score_maps(probs: np.ndarray, truths: np.ndarray, sigma: float = 3.0, threshold: float = 0.5,
               groups: Optional[np.ndarray] = None) -> SegScores:
    """B×H×W fused probabilities vs B×H×W ground-truth masks → the averaged scores (per group when given)."""
    scores = [score_image(p, t, sigma, threshold) for p, t in zip(probs, truths)]
    return summarise(scores, None if groups is None else [int(g) for g in groups])


def baseline_scores(truths: np.ndarray, sigma: float = 3.0, threshold: float = 0.5,
                    groups: Optional[np.ndarray] = None) -> dict[str, SegScores]:
    """The all-background (0 everywhere) and all-tumour (1 everywhere) maps, scored like any model."""
    shape = truths.shape
    return {"all_background": score_maps(np.zeros(shape, np.float32), truths, sigma, threshold, groups),
            "all_tumour": score_maps(np.ones(shape, np.float32), truths, sigma, threshold, groups)}


def selection_floor(baselines: dict[str, SegScores]) -> float:
    """The validation score an epoch must beat to be selectable: the better trivial baseline's ``f1``."""
    vals = [s.f1 for s in baselines.values() if not math.isnan(s.f1)]
    return max(vals) if vals else float("-inf")
