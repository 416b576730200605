"""How much slide-level signal do frozen features carry? Pooled features → logistic regression, k-fold CV.

A cohort on which this scores ~0.5 cannot show any MIL method off from frozen
features alone; it bounds what "vanilla vs FBTA" can mean on that cohort.

    python benchmarks/slide_signal.py --data /tmp/c48
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common import record

from fbta.io.h5 import read_features


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="cohort folder: labels.csv, features/<model>/h5_files")
    p.add_argument("--features", default="efficientnet_lite0")
    p.add_argument("--folds", type=int, default=6)
    args = p.parse_args()
    rows = list(csv.DictReader((args.data / "labels.csv").open()))
    classes = sorted({r["label"] for r in rows})
    pooled: dict[str, list[np.ndarray]] = {"mean": [], "max": []}
    y = []
    for r in rows:
        feats, _, _ = read_features(args.data / "features" / args.features / "h5_files" / f"{r['slide_id']}.h5")
        pooled["mean"].append(feats.mean(0))
        pooled["max"].append(feats.max(0))
        y.append(classes.index(r["label"]))
    labels = np.array(y)
    cv = StratifiedKFold(args.folds, shuffle=True, random_state=0)
    result: dict[str, object] = {"slides": len(labels), "folds": args.folds}
    for name, xs in pooled.items():
        for c in (0.01, 0.1, 1.0):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
            scores = cross_val_predict(model, np.stack(xs), labels, cv=cv, method="decision_function")
            result[f"{name}_C{c}"] = round(float(roc_auc_score(labels, scores)), 4)
    print(result)
    best = max(v for k, v in result.items() if k.startswith(("mean", "max")))  # type: ignore[type-var]
    record("slide_signal", result, f"{len(labels)} slides, {args.features}: pooled frozen features → logistic "
           f"regression, {args.folds}-fold CV AUC mean-pool {result['mean_C0.1']}, max-pool {result['max_C0.1']} "
           f"(best over C {best})")


if __name__ == "__main__":
    main()
