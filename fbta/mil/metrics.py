"""Slide-level classification metrics (⚑ reports: AUC one-vs-rest macro, F1 macro).

Why our own AUC instead of calling ``sklearn.metrics.roc_auc_score`` directly:
a validation split of a small cohort often lacks a class, and sklearn then
raises; training must carry on (the AUC is simply undefined, NaN), and the
multi-class macro average is taken over the classes that can be scored.
The tests check every function against scikit-learn where both are defined.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata


def binary_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U, ties counted half); NaN if only one class is present."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUC of the second (positive) class's probability. More classes: one-vs-rest macro AUC.

    ``probs`` is n×C. Classes absent from ``y_true`` (or present alone) are left
    out of the macro mean; NaN if no class can be scored.
    """
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probs must be n×C with n={len(y)}, got {p.shape}")
    if p.shape[1] == 2:
        return binary_auc(y == 1, p[:, 1])
    per_class = [binary_auc(y == c, p[:, c]) for c in range(p.shape[1])]
    scored = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(scored)) if scored else math.nan


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y, q = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    return float((y == q).mean()) if len(y) else math.nan


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """C×C counts, rows = true class, columns = predicted class (sklearn's layout)."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int).ravel(), np.asarray(y_pred, int).ravel()), 1)
    return cm


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in truth or prediction (sklearn's default)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    if not present.any():
        return math.nan
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean())


def roc_points(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> list[dict[str, object]]:
    """ROC curve rows ``{class, fpr, tpr, threshold}``: the positive class when binary, else one-vs-rest per class."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(probs, dtype=np.float64)
    classes = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    rows: list[dict[str, object]] = []
    for c in classes:
        positive = y == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, thr = roc_curve(positive, p[:, c], drop_intermediate=False)
        rows.extend({"class": class_names[c], "fpr": float(a), "tpr": float(b), "threshold": float(min(t, 1.0))}
                    for a, b, t in zip(fpr, tpr, thr))
    return rows


@dataclass(frozen=True)
class Scores:
    """The slide-level figures reported per split: AUC, accuracy, macro-F1, mean cross-entropy."""

    auc: float
    acc: float
    f1: float
    loss: float
    n: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def score(y_true: np.ndarray, probs: np.ndarray) -> Scores:
    """All figures from true class indices (n) and class probabilities (n×C)."""
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(probs, dtype=np.float64)
    pred = p.argmax(1)
    picked = np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)
    loss = float(-np.log(picked).mean()) if len(y) else math.nan
    return Scores(roc_auc(y, p), accuracy(y, pred), macro_f1(y, pred, p.shape[1]), loss, len(y))
