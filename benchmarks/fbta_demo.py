"""Vanilla vs FBTA on the demo cohort, and the paper's ablations, same frozen extractor, same splits.

Each run trains into its own folder under --out (features and clusters of the
pipeline's data/ are shared read-only), then scores the held-out test split
with `fbta evaluate` (vanilla) or `fbta infer` (FBTA: translator path, and
optionally TFE* re-extraction). Model selection uses the validation split
only. Results accumulate in reports/bench/fbta_demo.json (a run already there
is not redone), and a table is printed.

    .venv/bin/python benchmarks/fbta_demo.py --runs abmil:fbta:0 abmil:vanilla:0 abmil:fbta:0:views=[eb]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from common import ROOT, record

RESULTS = ROOT / "reports" / "bench" / "fbta_demo.json"


def run_one(spec: str, data: Path, out_root: Path, epochs: int, reextract: bool) -> dict:
    """``arch:method:seed[:key=value,...]`` → train + evaluate/infer; the metrics."""
    arch, method, seed, *rest = spec.split(":")
    extra = [kv for part in rest for kv in part.split(";") if kv]
    name = spec.replace(":", "_").replace("=", "-").replace("[", "").replace("]", "").replace(",", "+").replace(";", "_")
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    clusters = out / "clusters"
    if not clusters.exists():
        clusters.symlink_to(data / "clusters")
    common = [f"data.out={out}", f"data.features={data}/features/efficientnet_lite0", f"data.slides={data}/slides",
              f"data.labels={data}/labels.csv", "tracking.enabled=false",
              "run.progress=false", f"mil.arch={arch}", f"train.method={method}", f"train.seed={seed}", *extra]
    if method == "fbta":
        common += [f"fbta.epochs={epochs}", f"train.patience={epochs}"]
    t0 = time.time()
    subprocess.run([str(ROOT / ".venv/bin/fbta"), "train", *common], check=True, cwd=ROOT)
    train_s = time.time() - t0
    if method == "fbta":
        subprocess.run([str(ROOT / ".venv/bin/fbta"), "infer", *common, f"infer.reextract={str(reextract).lower()}"],
                       check=True, cwd=ROOT)
    else:
        subprocess.run([str(ROOT / ".venv/bin/fbta"), "evaluate", *common], check=True, cwd=ROOT)
    meta = json.loads((out / "models" / f"{method}_{arch}" / "meta.json").read_text())
    metrics = json.loads((out / "reports" / "metrics.json").read_text())["classification"]
    return {"spec": spec, "arch": arch, "method": method, "seed": int(seed), "extra": extra,
            "val_auc": meta["val_auc"], "best_epoch": meta["epoch"], "epochs_run": meta["epochs_run"],
            "train_seconds": round(train_s, 1), "test": metrics}


def table(results: dict[str, dict]) -> str:
    lines = ["| run | val AUC | test AUC | test ACC | test F1 | re-extract AUC | agreement | s/run |", "|---|---|---|---|---|---|---|---|"]
    for spec, r in results.items():
        main = r["test"].get(r["method"], {})
        re_ = r["test"].get(f"{r['method']}_reextract", {})
        lines.append(f"| {spec} | {r['val_auc']:.3f} | {main.get('auc')} | {main.get('acc')} | {main.get('f1')} | "
                     f"{re_.get('auc', '')} | {re_.get('agreement', '')} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def group_of(r: dict) -> str:
    return f"{r['arch']} {r['method']}" + (f" {' '.join(r['extra'])}" if r["extra"] else "")


def grouped(results: dict[str, dict]) -> str:
    """Mean ± standard deviation over seeds of test AUC / ACC / F1 (and val AUC) per arch, method and switch."""
    groups: dict[str, list[dict]] = {}
    for r in results.values():
        groups.setdefault(group_of(r), []).append(r)
    lines = ["| arch, method | seeds | val AUC | test AUC | test ACC | test F1 |", "|---|---|---|---|---|---|"]
    for key, rs in groups.items():
        cell = lambda xs: f"{np.mean(xs):.3f} ± {np.std(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"  # noqa: E731
        test = [r["test"][r["method"]] for r in rs]
        lines.append(f"| {key} | {len(rs)} | {cell([r['val_auc'] for r in rs])} | {cell([t['auc'] for t in test])} | "
                     f"{cell([t['acc'] for t in test])} | {cell([t['f1'] for t in test])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="arch:method:seed[:key=value;key=value]")
    p.add_argument("--epochs", type=int, default=6, help="FBTA epochs (vanilla uses params.yaml's)")
    p.add_argument("--reextract", nargs="*", default=[], help="runs that also score TFE* re-extraction")
    p.add_argument("--data", type=Path, default=ROOT / "data",
                   help="a cohort's data.out after synth/tile/extract/cluster (slides/, labels.csv, features/, clusters/)")
    p.add_argument("--out", type=Path, default=Path("/tmp/fbta_demo"))
    args = p.parse_args()
    results = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else {}
    for spec in args.runs:
        if spec in results:
            continue
        print(f"== {spec}", flush=True)
        results[spec] = run_one(spec, args.data, args.out, args.epochs, spec in args.reextract)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"runs": results}, indent=2))
        print(table({spec: results[spec]}), flush=True)
    print(table(results))
    print(grouped(results))
    groups: dict[str, list[float]] = {}
    for r in results.values():
        groups.setdefault(group_of(r), []).append(r["test"][r["method"]]["auc"])
    headline = "; ".join(f"{k}: test AUC {np.mean(v):.2f}±{np.std(v):.2f} (n={len(v)})" for k, v in groups.items())
    record("fbta_demo", {"runs": results, "epochs": args.epochs, "data": str(args.data)}, headline)


if __name__ == "__main__":
    main()
