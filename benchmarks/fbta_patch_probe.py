"""Did end-to-end training improve the patch representation? A linear probe on tumour patches.

Slide-level AUC on a small cohort is dominated by a handful of slides; this
asks the question FBTA is about one level down. Patches get tumour labels from
the cohort's annotation masks (evaluation only — nothing here trains a model
that is shipped); a logistic-regression probe is fitted on the training
slides' patches and scored on the test slides' patches for three
representations of the same patches:

- frozen: the cached FFE features (what vanilla MIL sees);
- tfe_star: every patch re-encoded by the FBTA model's EMA extractor TFE*;
- translated: the translator's map of the frozen features (what the deployed
  FBTA path feeds the MIL head).

    python benchmarks/fbta_patch_probe.py --data /tmp/c48 --models /tmp/fbta_demo/abmil_fbta_0/models/fbta_abmil
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from common import record

from fbta.e2e.states import load_ema_extractor
from fbta.e2e.classifier import load_classifier
from fbta.e2e.pseudobags import patch_attrs
from fbta.features.extract import SlidePatches, extract_patches
from fbta.io.h5 import read_features
from fbta.seg.dataset import _level0_dims, find_mask, patch_masks, read_mask
from fbta.slides.cohort import read_labels


def tumour_labels(masks: Path, slide_id: str, coords: np.ndarray, attrs: dict) -> np.ndarray:
    """1 where a patch holds any annotated tumour (no mask: a normal slide, all 0)."""
    path = find_mask(masks, slide_id)
    if path is None:
        return np.zeros(len(coords), np.int64)
    size0 = float(attrs.get("patch_size_level0", attrs["patch_size"]))
    regions = patch_masks(read_mask(path), coords, size0, _level0_dims(attrs), 32)
    return regions.any(axis=(1, 2)).astype(np.int64)


def probe_auc(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    scaler = StandardScaler().fit(train[0])
    clf = LogisticRegression(C=0.1, max_iter=5000).fit(scaler.transform(train[0]), train[1])
    return float(roc_auc_score(test[1], clf.decision_function(scaler.transform(test[0]))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="cohort folder: labels.csv, slides/, masks/, features/")
    p.add_argument("--models", type=Path, nargs="+", required=True, help="FBTA model folders (meta.json, extractor.pt)")
    p.add_argument("--features", default="efficientnet_lite0")
    p.add_argument("--labels", type=Path, default=None,
                   help="labels.csv with the split the models were trained on (default: <data>/labels.csv); "
                        "e.g. a protocol unit's splits/<split>.csv, so that test slides are unseen")
    p.add_argument("--name", default="fbta_patch_probe", help="results: reports/bench/<name>.json")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    labels = args.labels or args.data / "labels.csv"
    rows = list(csv.DictReader(labels.open()))
    entries = read_labels(labels, args.data / "slides")
    h5 = args.data / "features" / args.features / "h5_files"
    device = torch.device("cpu")
    frozen: dict[str, dict[str, list]] = {"train": {"x": [], "y": []}, "test": {"x": [], "y": []}}
    slides = []
    for r in rows:
        if r["split"] not in frozen:
            continue
        feats, coords, attrs = read_features(h5 / f"{r['slide_id']}.h5")
        pa = patch_attrs(h5 / f"{r['slide_id']}.h5", attrs)
        y = tumour_labels(args.data / "masks", r["slide_id"], coords, pa)
        frozen[r["split"]]["x"].append(feats)
        frozen[r["split"]]["y"].append(y)
        slides.append((r, coords, pa))
    ys = {s: np.concatenate(v["y"]) for s, v in frozen.items()}
    xs = {s: np.concatenate(v["x"]) for s, v in frozen.items()}
    result = {"patches": {s: int(len(y)) for s, y in ys.items()}, "tumour": {s: int(y.sum()) for s, y in ys.items()},
              "frozen": probe_auc((xs["train"], ys["train"]), (xs["test"], ys["test"])), "models": {}}
    print(f"frozen features: probe AUC {result['frozen']:.3f} ({result['patches']} patches, tumour {result['tumour']})",
          flush=True)
    for folder in args.models:
        meta = json.loads((folder / "meta.json").read_text())
        clf = load_classifier(folder)
        tfe = load_ema_extractor(folder, meta, device)
        star: dict[str, list] = {"train": [], "test": []}
        for r, coords, pa in slides:
            ds = SlidePatches(entries[r["slide_id"]].path, coords, pa, entries[r["slide_id"]].mpp)
            star[r["split"]].append(extract_patches(ds, tfe, device, args.batch_size, 1))
        with torch.no_grad():
            tr = {s: clf.translator(torch.from_numpy(x)).numpy() for s, x in xs.items()}
        st = {s: np.concatenate(v) for s, v in star.items()}
        res = {"tfe_star": probe_auc((st["train"], ys["train"]), (st["test"], ys["test"])),
               "translated": probe_auc((tr["train"], ys["train"]), (tr["test"], ys["test"])),
               "fbta": {k: meta["fbta"].get(k) for k in ("views", "sampling", "trainable_extractor", "epochs",
                                                           "extractor_lr")},
               "seed": meta["seed"]}
        result["models"][str(folder)] = res
        print(f"{folder}: probe AUC TFE* {res['tfe_star']:.3f}, translated {res['translated']:.3f} "
              f"(frozen {result['frozen']:.3f})", flush=True)
    gains = [m["tfe_star"] - result["frozen"] for m in result["models"].values()]
    result["labels"] = str(labels)
    record(args.name, result, f"tumour-patch probe AUC (test slides): frozen {result['frozen']:.3f}; "
           + "; ".join(f"{Path(k).parent.parent.name}: TFE* {m['tfe_star']:.3f}, translated {m['translated']:.3f}"
                       for k, m in result["models"].items()) + f" (mean TFE* gain {np.mean(gains):+.3f})")


if __name__ == "__main__":
    main()
