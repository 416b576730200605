"""How visible is the demo cohort's tumour signal to a *frozen* ImageNet extractor?

The demo exists to show whether end-to-end training helps, so a frozen
extractor must see the tumour texture only weakly. For each
``synth.tumour_contrast`` this draws tumour-rich synthetic slides, takes
256-px patches wholly inside tumour or wholly outside it, embeds them with the
frozen demo extractor and reports the 5-fold cross-validated AUC of a
supervised linear probe (an upper bound on what a frozen-feature MIL can
exploit per patch). 0.5 = invisible, 1.0 = trivially separable.

    .venv/bin/python benchmarks/synth_difficulty.py --contrasts 0,0.1,0.15,0.2,0.3,0.5,1
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from common import record

from fbta.features.registry import create_extractor
from fbta.synth.slide import make_slide


def patches(contrast: float, seed: int, side: int = 2048, size: int = 256) -> tuple[list[np.ndarray], list[bool]]:
    rgb, tissue, tumour = make_slide(np.random.default_rng(seed), side, side, True, 0.35, contrast=contrast)
    out, labels = [], []
    for y in range(0, side - size, size // 2):
        for x in range(0, side - size, size // 2):
            t, u = tissue[y:y + size, x:x + size].mean(), tumour[y:y + size, x:x + size].mean()
            if t > 0.9 and (u > 0.9 or u == 0):
                out.append(rgb[y:y + size, x:x + size])
                labels.append(bool(u > 0.9))
    return out, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contrasts", default="0,0.1,0.15,0.2,0.3,0.5,1")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--per-class", type=int, default=80)
    args = ap.parse_args()
    ext = create_extractor(args.model)
    rows = []
    for c in [float(v) for v in args.contrasts.split(",")]:
        pix, lab = [], []
        for s in range(3):
            p, l = patches(c, 100 + s)
            pix += p
            lab += l
        lab_a = np.array(lab)
        idx = np.r_[np.flatnonzero(lab_a)[: args.per_class], np.flatnonzero(~lab_a)[: args.per_class]]
        x = torch.from_numpy(np.stack([pix[i] for i in idx]))
        with torch.inference_mode():
            feats = torch.cat([ext(ext.preprocess(x[i:i + 32])) for i in range(0, len(x), 32)]).numpy()
        y = lab_a[idx]
        auc = cross_val_score(LogisticRegression(C=0.1, max_iter=3000), feats, y, cv=5, scoring="roc_auc").mean()
        rows.append({"tumour_contrast": c, "tumour_patches": int(y.sum()), "normal_patches": int((~y).sum()),
                     "frozen_linear_probe_auc": round(float(auc), 3)})
        print(f"contrast {c:<5}: frozen linear-probe AUC {auc:.3f} ({y.sum()} tumour / {(~y).sum()} normal patches)")
    record("synth_difficulty", {"model": args.model, "rows": rows},
           "frozen linear-probe patch AUC by synth.tumour_contrast: "
           + ", ".join(f"{r['tumour_contrast']:g}→{r['frozen_linear_probe_auc']:.2f}" for r in rows))


if __name__ == "__main__":
    main()
