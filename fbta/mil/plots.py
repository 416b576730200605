"""Small report figures: training curves and ROC curves (PNG, for MLflow and the reports folder)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from fbta.io.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; never opens a window
    import matplotlib.pyplot as plt

    return plt


def save_curves(rows: Sequence[Mapping[str, float]], dest: Path, title: str) -> None:
    """Loss (train, val) and validation AUC/F1 per epoch, the best epoch marked."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    ax1.plot(epochs, [r["train_loss"] for r in rows], label="train loss")
    ax1.plot(epochs, [r["val_loss"] for r in rows], label="val loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [r["val_auc"] for r in rows], label="val AUC")
    ax2.plot(epochs, [r["val_f1"] for r in rows], label="val macro-F1", alpha=0.7)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_xlabel("epoch")
    ax2.legend(loc="lower right")
    best = [r["epoch"] for r in rows if r.get("best")]
    if best:
        for ax in (ax1, ax2):
            ax.axvline(best[-1], color="grey", ls=":", lw=1)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def save_roc(points: Sequence[Mapping[str, object]], dest: Path, title: str) -> None:
    """ROC curve(s) from :func:`fbta.mil.metrics.roc_points` rows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    for name in dict.fromkeys(str(p["class"]) for p in points):
        sel = [p for p in points if p["class"] == name]
        ax.plot([p["fpr"] for p in sel], [p["tpr"] for p in sel], label=name, drawstyle="steps-post")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    if points:
        ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
