"""A tiny synthetic feature cohort for the MIL stage tests (train, evaluate, heatmap).

16 slides × 30 instances × 16-d Gaussian features on a 6×5 patch grid; a
tumour slide has 5 instances shifted by +2 in every dimension (the "tumour
patches"), and its annotation mask covers exactly those patches. Written with
the real writers (``fbta.io.h5.write_features``, a labels.csv, mask PNGs).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from fbta.io.h5 import write_features

D, N, K = 16, 30, 5  # feature size, instances per slide, shifted instances per tumour slide
PATCH, COLS, ROWS = 256, 6, 5
WIDTH, HEIGHT = 2048, 1536  # level-0 size (the grid sits inside it)
MASK_DS = 16
# narrow heads: the tests check behaviour, not capacity, and must run in seconds on 2 cores
SMALL_HEADS = {
    "abmil": ["mil.kwargs.hidden=32", "mil.kwargs.attn_dim=16"],
    "abmil_plain": ["mil.kwargs.hidden=32", "mil.kwargs.attn_dim=16"],
    "transmil": ["mil.kwargs.dim=32", "mil.kwargs.heads=4", "mil.kwargs.landmarks=16"],
    "mambamil": ["mil.kwargs.dim=32", "mil.kwargs.attn_dim=16"],
}


def make_cohort(root: Path, n_per_class: int = 8, split_column: bool = True, seed: int = 0) -> list[str]:
    """Write the cohort under ``root``; return the CLI overrides that point every stage at it."""
    rng = np.random.default_rng(seed)
    feats_dir = root / "features" / "h5_files"
    masks = root / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    grid = np.array([(c * PATCH + 128, r * PATCH + 128) for r in range(ROWS) for c in range(COLS)], np.int64)
    q = max(1, n_per_class // 4)  # per class, in slide order: train, then q val, then q test
    split = ["train"] * (n_per_class - 2 * q) + ["val"] * q + ["test"] * q
    rows = []
    for i in range(2 * n_per_class):
        label = "tumour" if i % 2 else "normal"
        x = rng.normal(size=(N, D)).astype(np.float32)
        mask = np.zeros((HEIGHT // MASK_DS, WIDTH // MASK_DS), np.uint8)
        if label == "tumour":
            hot = rng.choice(N, K, replace=False)
            x[hot] += 2.0
            for cx, cy in grid[hot] // MASK_DS:
                mask[cy:cy + PATCH // MASK_DS, cx:cx + PATCH // MASK_DS] = 255
        sid = f"s{i:02d}"
        write_features(feats_dir / f"{sid}.h5", x, grid, {"extractor": "toy", "dim": D},
                       coords_attrs={"patch_size": PATCH, "patch_size_level0": PATCH, "downsample": [1.0, 1.0],
                                     "level_dim": [WIDTH, HEIGHT], "patch_level": 0})
        Image.fromarray(mask).save(masks / f"{sid}.png")
        rows.append({"slide_id": sid, "label": label, "split": split[i // 2]})
    fields = ["slide_id", "label"] + (["split"] if split_column else [])
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return [f"data.out={root}/out", f"data.labels={root}/labels.csv", f"data.slides={root}/slides",
            f"data.features={root}/features", f"data.masks={root}/masks", "run.progress=false",
            "tracking.enabled=false", "train.preload=true", "train.num_workers=0", "train.device=cpu",
            "heatmap.max_px=512"]
