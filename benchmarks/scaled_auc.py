"""Does DCT-scaled decode change what vanilla MIL learns? A paired run on a 40× demo cohort, read both ways.

Issue #28: speed must not change what the model sees. The demo cohort is
synthesised at 0.25 µm/px (``synth.mpp=0.25``, the texture at 40× pixel size) and
tiled at 0.5 µm/px, so every patch is a 2× downsample of level 0. The same
coords are extracted twice — ``extract.scaled_decode=true`` (DCT-scaled) and
``false`` (read + resize) — and vanilla MIL is trained and evaluated on each with
the same seeds and splits. Reported: test AUC per seed and arm, the paired
differences, and the cosine similarity of the two feature sets.

    .venv/bin/python benchmarks/scaled_auc.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, record


COHORT: list[str] = ["synth.mpp=0.25"]  # + the size options of main()


def fbta(args: list[str], data: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "fbta", *args, f"data.slides={data}/slides", f"data.labels={data}/labels.csv",
           f"data.masks={data}/masks", f"data.out={out}", "tracking.enabled=false", "run.progress=false",
           *COHORT, "--params", str(ROOT / "params.yaml")]
    subprocess.run(cmd, check=True, cwd=out, stdout=subprocess.DEVNULL)


def test_auc(out: Path) -> float:
    frags = sorted((out / "reports" / "metrics").glob("evaluate*.json"))
    entry = json.loads(frags[0].read_text())["classification"]
    return float(next(iter(entry.values()))["auc"])


def feature_cosine(a: Path, b: Path) -> dict[str, float]:
    import h5py

    cos = []
    for fa in sorted((a / "features").rglob("*.h5")):
        fb = b / fa.relative_to(a)
        with h5py.File(fa) as x, h5py.File(fb) as y:
            u, v = x["features"][:], y["features"][:]
        cos.extend((u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)))
    return {"mean": round(float(np.mean(cos)), 5), "min": round(float(np.min(cos)), 5), "patches": len(cos)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--slides", type=int, default=24, help="synth.n_slides (the demo's 24)")
    ap.add_argument("--side", type=int, default=3072, help="synth.width and height (px at 0.25 µm/px)")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides",
                    help="more synth.* overrides (a cohort vanilla can learn: an AUC check at chance shows nothing)")
    args = ap.parse_args()
    COHORT.extend([f"synth.n_slides={args.slides}", f"synth.width={args.side}", f"synth.height={args.side}",
                   *args.overrides])
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cohort"
        data.mkdir()
        fbta(["synth"], data, data)
        fbta(["tile"], data, data)
        arms = {"scaled": Path(tmp) / "scaled", "resize": Path(tmp) / "resize"}
        auc: dict[str, list[float]] = {k: [] for k in arms}
        for arm, out in arms.items():
            shutil.copytree(data / "coords", out / "coords")
            fbta(["extract", f"extract.scaled_decode={str(arm == 'scaled').lower()}"], data, out)
        for seed in args.seeds:
            for arm, out in arms.items():
                fbta(["train", "train.method=vanilla", f"train.seed={seed}"], data, out)
                fbta(["evaluate", "train.method=vanilla"], data, out)
                auc[arm].append(test_auc(out))
            print(f"seed {seed}: test AUC scaled {auc['scaled'][-1]:.3f}, read+resize {auc['resize'][-1]:.3f}",
                  flush=True)
        cos = feature_cosine(arms["scaled"], arms["resize"])
    diff = [a - b for a, b in zip(auc["scaled"], auc["resize"])]
    record("scaled_auc", {"seeds": args.seeds, "slides": args.slides, "side_px": args.side, "cohort": COHORT,
                          "test_auc": auc, "paired_difference": diff,
                          "feature_cosine": cos, "loadavg_at_start": [round(v, 2) for v in load]},
           f"vanilla MIL on a 40× demo cohort read at 20×: test AUC DCT-scaled {np.mean(auc['scaled']):.3f} vs "
           f"read+resize {np.mean(auc['resize']):.3f} (paired Δ {np.mean(diff):+.3f} over {len(diff)} seeds); "
           f"feature cosine mean {cos['mean']:.4f}")


if __name__ == "__main__":
    main()
