"""How hard is a cohort, and is its signal learnable? Three numbers that bound any MIL comparison.

1. **Pooled frozen probe** (slide level): mean-pooled frozen features →
   standardised logistic regression, repeated stratified 5-fold CV AUC. Near
   0.5: frozen features carry no slide signal (no MIL method can show off);
   near 1.0: a frozen baseline saturates and end-to-end training has nothing
   left to add. A cohort on which FBTA should help sits in between.
2. **Frozen patch probe** (patch level): tumour patches (tumour share ≥
   ``--min-share`` by the annotation masks) vs patches of normal slides, a
   logistic regression fitted on half the slides' patches, scored on the
   other half's.
3. **Oracle**: the same extractor fine-tuned with patch labels (evaluation
   only — it uses the masks) at ``--input-size``; patch AUC on the held-out
   slides and slide AUC from the mean of each slide's top-decile patch
   probabilities. High: the signal is there for end-to-end training to find.
   Note: this oracle trains *every* unit at lr 1e-4 with BatchNorm in train
   mode — not FBTA's extractor configuration — so it bounds what the cohort
   holds, not what FBTA's configuration can learn. The protocol's ``oracle``
   arm (benchmarks/protocol_controls.py) and benchmarks/extractor_sweep.py
   train exactly FBTA's configuration; use those to judge a configuration.

    python benchmarks/cohort_difficulty.py --data /tmp/c60 --input-size 112
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common import record
from extractor_controls import tumour_share as mask_share

from fbta.features.augment import Augment
from fbta.e2e.pseudobags import patch_attrs
from fbta.features.extract import SlidePatches
from fbta.features.registry import create_extractor
from fbta.io.h5 import read_features
from fbta.slides.cohort import read_labels


def tumour_share(masks: Path, slide_id: str, coords: np.ndarray, attrs: dict) -> np.ndarray:
    """Annotated tumour share of each patch (0 where the slide has no mask: a normal slide)."""
    share = mask_share(masks, slide_id, coords, attrs)
    return share if share is not None else np.zeros(len(coords), np.float32)


def pooled_probe(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Mean-pooled features → logistic regression; mean CV AUC over 5 repeats of stratified 5-fold."""
    cv = RepeatedStratifiedKFold(n_splits=5, n_repeats=5, random_state=seed)
    aucs = []
    for r in range(5):
        folds = list(cv.split(x, y))[r * 5:(r + 1) * 5]
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
        scores = cross_val_predict(model, x, y, cv=folds, method="decision_function")
        aucs.append(roc_auc_score(y, scores))
    return float(np.mean(aucs))


def load_pixels(entry, coords: np.ndarray, attrs: dict, take: np.ndarray) -> torch.Tensor:
    ds = SlidePatches(entry.path, coords[take], attrs, entry.mpp)
    return torch.stack([ds[i] for i in range(len(ds))]) if len(ds) else torch.empty(0, 1, 1, 3, dtype=torch.uint8)


def oracle(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, model: str, input_size: int,
           epochs: int, seed: int) -> np.ndarray:
    """Fine-tune ``model`` + a linear head on patch labels; tumour probabilities of ``test_x``."""
    torch.manual_seed(seed)
    ext = create_extractor(model, trainable=True, input_size=input_size)
    head = torch.nn.Linear(ext.dim, 1)
    opt = torch.optim.Adam([{"params": ext.parameters(), "lr": 1e-4}, {"params": head.parameters(), "lr": 1e-3}])
    aug, gen = Augment(), torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        ext.train()
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), 32):
            b = order[i:i + 32]
            x = train_x[b].permute(0, 3, 1, 2).float().div(255)
            logit = head(ext(ext.preprocess(aug(x, gen)))).squeeze(1)
            loss = F.binary_cross_entropy_with_logits(logit, train_y[b].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    ext.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(test_x), 64):
            x = test_x[i:i + 64].permute(0, 3, 1, 2).float().div(255)
            out.append(torch.sigmoid(head(ext(ext.preprocess(x))).squeeze(1)))
    return torch.cat(out).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="cohort data.out: labels.csv, slides/, masks/, features/")
    p.add_argument("--features", default="efficientnet_lite0")
    p.add_argument("--input-size", type=int, default=112, help="oracle input px (the CPU FBTA setting)")
    p.add_argument("--min-share", type=float, default=0.5)
    p.add_argument("--per-slide", type=int, default=12, help="oracle patches per slide and class")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    entries = read_labels(args.data / "labels.csv", args.data / "slides")
    h5 = args.data / "features" / args.features / "h5_files"
    classes = sorted({e.label for e in entries.values()})
    rng = np.random.default_rng(args.seed)
    ids = sorted(entries)
    half = set(rng.permutation(ids)[: len(ids) // 2].tolist())  # patch probe / oracle: train on these slides
    pooled, ys, patches = [], [], {"train": ([], []), "test": ([], [])}
    oracle_x = {"train": [], "test": []}
    oracle_y = {"train": [], "test": []}
    test_slide: list[str] = []
    t0 = time.perf_counter()
    for sid in ids:
        e = entries[sid]
        feats, coords, attrs = read_features(h5 / f"{sid}.h5")
        pa = patch_attrs(h5 / f"{sid}.h5", attrs)
        share = tumour_share(args.data / "masks", sid, coords, pa)
        pooled.append(feats.mean(0))
        ys.append(classes.index(e.label))
        part = "train" if sid in half else "test"
        keep = (share >= args.min_share) | (share == 0)
        patches[part][0].append(feats[keep])
        patches[part][1].append((share[keep] >= args.min_share).astype(int))
        if part == "train":  # oracle training patches: balanced tumour / non-tumour per slide
            pick = np.concatenate([rng.permutation(np.flatnonzero(share >= args.min_share))[:args.per_slide],
                                   rng.permutation(np.flatnonzero(share == 0))[:args.per_slide]])
        else:
            pick = rng.permutation(len(coords))[:3 * args.per_slide]
        oracle_x[part].append(load_pixels(e, coords, pa, pick))
        oracle_y[part].append(share[pick])
        test_slide += [sid] * (len(pick) if part == "test" else 0)
    y = np.array(ys)
    result: dict = {"slides": len(ids), "classes": classes, "pooled_probe_auc": round(pooled_probe(np.stack(pooled), y), 4)}
    px = {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in patches.items()}
    scaler = StandardScaler().fit(px["train"][0])
    clf = LogisticRegression(C=0.1, max_iter=5000).fit(scaler.transform(px["train"][0]), px["train"][1])
    result["patch_probe_auc"] = round(float(roc_auc_score(px["test"][1], clf.decision_function(
        scaler.transform(px["test"][0])))), 4)
    result["patches"] = {k: int(len(v[1])) for k, v in px.items()}
    tx, ty = torch.cat(oracle_x["train"]), torch.from_numpy((np.concatenate(oracle_y["train"]) >= args.min_share))
    vx, vshare = torch.cat(oracle_x["test"]), np.concatenate(oracle_y["test"])
    t1 = time.perf_counter()
    prob = oracle(tx, ty, vx, args.features, args.input_size, args.epochs, args.seed)
    clean = (vshare >= args.min_share) | (vshare == 0)
    result["oracle_patch_auc"] = round(float(roc_auc_score(vshare[clean] >= args.min_share, prob[clean])), 4)
    slide_score, slide_y = [], []
    for sid in sorted(set(test_slide)):
        sel = np.array([s == sid for s in test_slide])
        top = np.sort(prob[sel])[::-1][: max(1, sel.sum() // 10)]
        slide_score.append(float(top.mean()))
        slide_y.append(classes.index(entries[sid].label))
    result["oracle_slide_auc"] = round(float(roc_auc_score(slide_y, slide_score)), 4)
    result.update(oracle_train_patches=int(len(tx)), oracle_seconds=round(time.perf_counter() - t1, 1),
                  seconds=round(time.perf_counter() - t0, 1), input_size=args.input_size, min_share=args.min_share)
    print(result)
    record("cohort_difficulty", result,
           f"{len(ids)} slides, {args.features}: pooled frozen probe AUC {result['pooled_probe_auc']} (slide, 5×5-fold CV); "
           f"frozen patch probe {result['patch_probe_auc']}; oracle (fine-tuned on patch labels, {args.input_size} px, "
           f"{args.epochs} epochs) patch AUC {result['oracle_patch_auc']}, slide AUC {result['oracle_slide_auc']}")


if __name__ == "__main__":
    main()
