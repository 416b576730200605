"""Per-slide cost as the cohort grows: N = 1 → 10 → 40 demo slides through tile, extract, cluster, train.

Each N runs in a fresh output folder as real `fbta` processes (the user's
commands), on the same slides (slide i is identical whatever N). Reported per
stage: wall time per slide (start-up included), the stage's own per-slide
seconds (from reports/status/<stage>.json), bytes written per slide, and the
ratio of each to its N = 10 value — flat ratios mean cost grows linearly
with the cohort. Train (a fixed number of epochs) needs train and val slides
of both classes, so it starts at N = 10.

    python benchmarks/cost_growth.py [--sizes 1 10 40] [--work /tmp/cost_growth]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, record

PER_SLIDE = ("tile", "extract", "cluster")


def fbta(stage: str, *overrides: str) -> float:
    """Run one stage as the user would; its wall time in seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fbta", stage, *overrides, "--params", str(ROOT / "params.yaml")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"fbta {stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def labels_for(rows: list[dict], n: int, dest: Path) -> Path:
    """The first n slides with a split of our own: per class 60 % train, 20 % val, the rest test."""
    subset = rows[:n]
    out = []
    for label in sorted({r["label"] for r in subset}):
        mine = [r for r in subset if r["label"] == label]
        n_train, n_val = max(1, round(0.6 * len(mine))), max(1, round(0.2 * len(mine)))
        for i, r in enumerate(mine):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            out.append({"slide_id": r["slide_id"], "label": label, "split": split})
    with dest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "label", "split"])
        w.writeheader()
        w.writerows(sorted(out, key=lambda r: r["slide_id"]))
    return dest


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.h5")) if folder.is_dir() else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 40])
    p.add_argument("--work", type=Path, default=Path("/tmp/cost_growth"))
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    work, n_max = args.work, max(args.sizes)
    slides, all_labels = work / "slides", work / "labels.csv"
    if not all_labels.exists():
        fbta("synth", f"data.slides={slides}", f"data.labels={all_labels}", "data.masks=null",
             f"synth.n_slides={n_max}", "run.progress=false")
    rows = list(csv.DictReader(all_labels.open()))
    model = "efficientnet_lite0"
    results: dict[int, dict[str, dict[str, float]]] = {}
    for n in args.sizes:
        out, cohort = work / f"out_{n}", work / f"slides_{n}"  # a stage's cohort is every slide in data.slides
        cohort.mkdir(exist_ok=True)
        for r in rows[:n]:
            link = cohort / f"{r['slide_id']}.svs"
            if not link.exists():
                link.symlink_to(slides / link.name)
        labels = labels_for(rows, n, work / f"labels_{n}.csv")
        common = [f"data.slides={cohort}", f"data.labels={labels}", f"data.out={out}", "data.masks=null",
                  "run.progress=false", "tracking.enabled=false"]
        res: dict[str, dict[str, float]] = {}
        for stage in PER_SLIDE:
            wall = fbta(stage, *common)
            status = json.loads((out / "reports" / "status" / f"{stage}.json").read_text())
            done = [s for s in status["slides"] if s["status"] == "done"]
            sub = {"tile": "coords", "extract": f"features/{model}", "cluster": f"clusters/{model}"}[stage]
            res[stage] = {"wall_s": wall, "wall_per_slide_s": wall / n,
                          "own_per_slide_s": sum(s["seconds"] for s in done) / max(1, len(done)),
                          "bytes_per_slide": folder_bytes(out / sub) / n, "done": len(done)}
            print(f"N={n:>3} {stage:<8} wall {wall:7.1f} s  {wall / n:6.2f} s/slide  "
                  f"own {res[stage]['own_per_slide_s']:.2f} s/slide  {res[stage]['bytes_per_slide'] / 1e3:.0f} kB/slide",
                  flush=True)
        if n >= 10:
            wall = fbta("train", *common, f"train.epochs={args.epochs}", f"train.patience={args.epochs}",
                        "train.resume=false")
            hist = list(csv.DictReader((out / "models" / "vanilla_abmil" / "history.csv").open()))
            n_train = sum(r["split"] == "train" for r in csv.DictReader(labels.open()))
            per_epoch = sum(float(r["seconds"]) for r in hist) / len(hist)
            res["train"] = {"wall_s": wall, "wall_per_slide_s": wall / n, "epoch_s": per_epoch,
                            "epoch_per_train_slide_s": per_epoch / n_train}
            print(f"N={n:>3} train    wall {wall:7.1f} s  epoch {per_epoch:.2f} s = "
                  f"{per_epoch / n_train * 1e3:.1f} ms per training slide", flush=True)
        results[n] = res
    base = 10 if 10 in results else min(results)
    ratios = {n: {stage: {k: v / results[base][stage][k] for k, v in r.items()
                          if k in ("wall_per_slide_s", "own_per_slide_s", "epoch_per_train_slide_s")
                          and results[base].get(stage, {}).get(k)}
                  for stage, r in res.items() if stage in results[base]}
              for n, res in results.items()}
    hi = max(results)
    headline = (f"per-slide cost N={base}→{hi}: " + ", ".join(
        f"{s} {ratios[hi][s].get('own_per_slide_s', ratios[hi][s].get('epoch_per_train_slide_s', float('nan'))):.2f}×"
        for s in (*PER_SLIDE, "train") if s in ratios[hi])
        + f" (own s/slide); wall/slide N=1→{hi}: extract "
        f"{results[1]['extract']['wall_per_slide_s']:.1f}→{results[hi]['extract']['wall_per_slide_s']:.1f} s"
        if 1 in results else "")
    record("cost_growth", {"sizes": args.sizes, "results": results, "ratios_vs": base, "ratios": ratios}, headline)


if __name__ == "__main__":
    main()
