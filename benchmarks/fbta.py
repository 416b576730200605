"""FBTA's performance contracts, measured side by side (⚑ ARCHITECTURE.md).

1. Memory: peak memory of one FBTA step on an N = 50,000-instance slide vs an
   N = 2,000 one, same C·M (target ≤ 1.25×, beyond the frozen-feature bytes).
   Each N runs in its own process; on CPU peak RSS (ru_maxrss), on GPU
   torch.cuda.max_memory_allocated.
2. Inference: translator path (read cached features → translate → MIL) vs
   re-extraction (read + decode every patch → TFE* → MIL) on the same slides
   (target ≥ 200×, the paper's 120 min vs 27 s).
3. Step time split: extractor / translator / MIL / sampling (waiting for the
   worker that draws and decodes the pseudo-bag).

    .venv/bin/python benchmarks/fbta.py                       # CPU-sized
    .venv/bin/python benchmarks/fbta.py --cm 200 --patches 2000 --device cuda   # GPU host
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, record

from fbta.features.augment import Augment
from fbta.e2e.classifier import SlideClassifier
from fbta.e2e.pseudobags import PseudoBag
from fbta.e2e.reextract import reextract_slide, translate_slide
from fbta.e2e.step import FBTAModels, StepOptions, fbta_step
from fbta.e2e.trainer import prepare_tfe
from fbta.e2e.translator import Translator
from fbta.features.registry import create_extractor
from fbta.io.h5 import write_features
from fbta.mil import create_mil


def _models(model: str, k: int, hidden: int, arch: str, device: torch.device, train_blocks: int,
            input_size: int | None = None) -> FBTAModels:
    tfe = create_extractor(model, weights="random", device=device, input_size=input_size or None)
    prepare_tfe(tfe, trainable=True, train_blocks=train_blocks, freeze_bn=True)
    head = create_mil(arch, tfe.dim, 2)
    m = FBTAModels(head, Translator(tfe.dim, k, hidden), tfe)
    for mod in (m.mil, m.translator, m.mil_ema, m.tfe_ema):
        mod.to(device)
    return m


def memory_child(args: argparse.Namespace) -> None:
    """One process, one N: build, load N frozen features, run two steps, print peak memory beyond the features."""
    device = torch.device(args.device)
    m = _models(args.model, args.k, args.hidden, args.arch, device, args.train_blocks, args.input_size)
    opt = torch.optim.Adam([p for p in list(m.mil.parameters()) + list(m.translator.parameters())
                            + list(m.tfe.parameters()) if p.requires_grad])
    feats = torch.randn(args.n, m.tfe.dim)
    pixels = torch.randint(0, 256, (args.cm, 256, 256, 3), dtype=torch.uint8)
    idx = torch.from_numpy(np.sort(np.random.default_rng(0).choice(args.n, args.cm, replace=False)))
    bag = PseudoBag(0, torch.tensor(1), feats, idx, pixels, 0.0)
    feature_bytes = feats.numel() * 4
    before = _rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(2):  # the second step includes Adam's state, as in training
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        fbta_step(m, bag, 0.5, StepOptions(augment=Augment()), device)
        opt.step()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"n": args.n, "cm": args.cm, "peak_bytes": peak, "feature_bytes": feature_bytes,
                      "before_step_bytes": before, "step_s": times[-1]}))


def _rss() -> int:
    """Resident set size now (Linux /proc), bytes."""
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(args: argparse.Namespace, n: int, cm: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child-memory", "--n", str(n), "--cm", str(cm or args.cm), "--model", args.model,
           "--k", str(args.k), "--hidden", str(args.hidden), "--arch", args.arch, "--device", args.device,
           "--train-blocks", str(args.train_blocks), "--input-size", str(args.input_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT / "benchmarks")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_model(args: argparse.Namespace) -> dict:
    """Fit the step's peak ≈ a + b·C·M + c·N over a grid, one fresh process per point (beyond the features).

    b: bytes per pseudo-bag patch (pixels, extractor activations kept for backward); c: bytes per instance of
    the frozen bag (the MIL head's activations over all N, kept for backward of L_cls(F_FB)).
    """
    points = []
    for cm in args.fit_cm:
        for n in args.fit_n:
            r = measure_memory(args, n, cm)
            points.append({"cm": cm, "n": n, "net_bytes": r["peak_bytes"] - r["feature_bytes"], "step_s": r["step_s"]})
            print(f"  C·M {cm:>4}, N {n:>6}: {points[-1]['net_bytes'] / 2**20:8.1f} MiB beyond the features", flush=True)
    x = np.array([[1.0, p["cm"], p["n"]] for p in points])
    y = np.array([p["net_bytes"] for p in points], dtype=np.float64)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ coef
    r2 = 1.0 - float(((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-9))
    a, b, c = (float(v) for v in coef)
    return {"points": points, "a_bytes": a, "b_bytes_per_patch": b, "c_bytes_per_instance": c, "r2": r2,
            "settings": {"model": args.model, "input_size": args.input_size, "train_blocks": args.train_blocks,
                         "arch": args.arch, "k": args.k, "hidden": args.hidden, "device": args.device}}


def inference_ratio(args: argparse.Namespace) -> dict:
    """Same slides, both paths, end to end, alternating; min over rounds of each."""
    from fbta.synth.cohort import write_aperio_tiff
    from fbta.synth.slide import make_slide

    device = torch.device(args.device)
    tfe = create_extractor(args.model, weights="random", device=device).eval()
    head = create_mil(args.arch, tfe.dim, 2).to(device).eval()
    translator = Translator(tfe.dim, args.k, args.hidden).to(device).eval()
    model = SlideClassifier(head, translator, {"classes": ["a", "b"], "in_dim": tfe.dim}, [], device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        side = int(np.ceil(np.sqrt(args.patches))) * 256
        slide = tmp / "slide.svs"
        rgb, _, _ = make_slide(np.random.default_rng(0), side, side, positive=True, tumour_fraction=0.15)
        write_aperio_tiff(slide, rgb, mpp=0.5)
        del rgb
        xs, ys = np.meshgrid(np.arange(0, side, 256), np.arange(0, side, 256))
        coords = np.stack([xs.ravel(), ys.ravel()], 1)[:args.patches].astype(np.int64)
        feats_path = tmp / "slide.h5"
        write_features(feats_path, np.random.default_rng(1).normal(size=(len(coords), tfe.dim)).astype(np.float32),
                       coords, {"extractor": args.model}, coords_attrs={"patch_level": 0, "patch_size": 256})
        translate_slide(model, feats_path)  # warm-up (allocator, lazy imports), both paths
        reextract_slide(model, tfe, feats_path, slide, None, device, args.batch_size, args.workers)
        for r in range(args.rounds):
            t = translate_slide(model, feats_path)
            e = reextract_slide(model, tfe, feats_path, slide, None, device, args.batch_size, args.workers)
            rows.append({"round": r, "translator_s": t.seconds, "reextract_s": e.seconds, "ratio": e.seconds / t.seconds})
            print(f"  round {r}: translator {t.seconds:.3f} s, re-extraction {e.seconds:.1f} s → {rows[-1]['ratio']:.0f}×")
    t_min = min(r["translator_s"] for r in rows)
    e_min = min(r["reextract_s"] for r in rows)
    return {"patches": len(coords), "model": args.model, "k": args.k, "hidden": translator.hidden,
            "rounds": rows, "translator_s": t_min, "reextract_s": e_min, "ratio": e_min / t_min}


def step_split(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    m = _models(args.model, args.k, args.hidden, args.arch, device, args.train_blocks)
    feats = torch.randn(2000, m.tfe.dim)
    bag = PseudoBag(0, torch.tensor(1), feats, torch.arange(args.cm) * (2000 // args.cm),
                    torch.randint(0, 256, (args.cm, 256, 256, 3), dtype=torch.uint8), 0.0)
    fbta_step(m, bag, 0.5, StepOptions(), device)  # warm-up
    stats = [fbta_step(m, bag, 0.5, StepOptions(), device) for _ in range(args.rounds)]
    return {k: float(np.median([s[k] for s in stats])) for k in ("extractor_s", "translator_s", "mil_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0", help="extractor (random weights: timing only)")
    p.add_argument("--reextract-model", default="resnet50_trunc", help="extractor for the inference ratio")
    p.add_argument("--arch", default="abmil")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--hidden", type=int, default=0)
    p.add_argument("--cm", type=int, default=32, help="C·M patches per step")
    p.add_argument("--train-blocks", type=int, default=-1)
    p.add_argument("--small-n", type=int, default=2000)
    p.add_argument("--big-n", type=int, default=50000)
    p.add_argument("--patches", type=int, default=400, help="patches of the inference-ratio slide")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--input-size", type=int, default=0, help="extractor input size (0: the model's own)")
    p.add_argument("--fit", action="store_true", help="only the memory model: a + b·C·M + c·N over --fit-n × --fit-cm")
    p.add_argument("--fit-n", type=int, nargs="+", default=[2000, 20000, 50000])
    p.add_argument("--fit-cm", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--name", default="fbta", help="results: reports/bench/<name>.json")
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        memory_child(args)
        return
    if args.fit:
        print(f"memory model: one FBTA step, {args.model} at {args.input_size or 'its own size'} px, train_blocks "
              f"{args.train_blocks}, {args.arch}, {args.device}")
        fit = memory_model(args)
        mib = 2 ** 20
        record(args.name, {"memory_model": fit, "args": vars(args)},
               f"step peak beyond the features ≈ {fit['a_bytes'] / mib:.0f} MiB + {fit['b_bytes_per_patch'] / mib:.2f} "
               f"MiB·C·M + {fit['c_bytes_per_instance'] / 1024:.2f} KiB·N (R² {fit['r2']:.3f}; {args.model}, "
               f"{args.input_size or 'own'} px, train_blocks {args.train_blocks}, {args.device}; N {args.fit_n}, "
               f"C·M {args.fit_cm})")
        return

    print(f"memory: one FBTA step, C·M = {args.cm}, {args.model}, {args.arch}, N = {args.small_n} vs {args.big_n}")
    small, big = measure_memory(args, args.small_n), measure_memory(args, args.big_n)
    net = [r["peak_bytes"] - r["feature_bytes"] for r in (small, big)]
    mem_ratio = net[1] / net[0]
    step = [r["peak_bytes"] - r["before_step_bytes"] for r in (small, big)]
    step_ratio = step[1] / step[0]
    print(f"  peak beyond features: {net[0] / 2**20:.0f} MiB vs {net[1] / 2**20:.0f} MiB → {mem_ratio:.3f}×")
    print(f"  the step's own peak (over memory held before it): {step[0] / 2**20:.0f} MiB vs "
          f"{step[1] / 2**20:.0f} MiB → {step_ratio:.3f}×")
    print(f"inference: translator vs re-extraction, {args.reextract_model}, {args.patches} patches")
    inf_args = argparse.Namespace(**{**vars(args), "model": args.reextract_model})
    inf = inference_ratio(inf_args)
    print("step split (median of rounds):")
    split = step_split(args)
    print("  " + ", ".join(f"{k} {v:.3f} s" for k, v in split.items()))
    headline = (f"step memory N={args.big_n} / N={args.small_n} = {mem_ratio:.3f} (target ≤ 1.25; the step's own "
                f"increment {step_ratio:.2f}×; C·M={args.cm}, "
                f"{args.model}, {args.device}); translator vs re-extraction = {inf['ratio']:.0f}× (target ≥ 200; "
                f"{args.reextract_model}, {inf['patches']} patches, K={args.k}, hidden {inf['hidden']}); step split "
                + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in split.items()))
    record("fbta", {"memory": {"small": small, "big": big, "ratio": mem_ratio, "step_increment_ratio": step_ratio},
                    "inference": inf, "step_split": split, "args": vars(args)}, headline)


if __name__ == "__main__":
    main()
