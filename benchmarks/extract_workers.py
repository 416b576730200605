"""Sizing loader workers for a GPU: reader patches/s per worker, and persistent vs per-slide workers.

Side by side in one run, on the same generated slides and coords, with the
real extractor (efficientnet_lite0, offline ImageNet weights, at the CPU demo's
112 px input unless ``--input-size``; issue #28):

1. **Reader throughput per worker**: one cohort loader (``CohortPatches``)
   drained with no model, for 0 (main process), 1, 2, … workers — patches/s and
   patches/s per worker. A GPU that runs the extractor at F patches/s needs
   about F / (per-worker figure) workers.
2. **Extraction throughput per worker count**: the stage's path
   (``extract_cohort``, one persistent loader) with the model, per worker count —
   on a CPU the workers and the model share the cores.
3. **Persistent vs restarted workers**: the stage's path (one loader for the
   cohort, workers live across slides, ``extract_cohort``) against a fresh
   loader per slide (``extract_patches``, what the stage did before), with the
   same model, batch size and workers, over many small slides — where worker
   start-up and the empty pipeline at each slide boundary cost most.

    .venv/bin/python benchmarks/extract_workers.py                       # CPU: 12 slides of 2048² px
    .venv/bin/python benchmarks/extract_workers.py --workers 0 2 4 8 16 --slides 32 --device cuda
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from common import record

from fbta.config import load_config
from fbta.device import resolve_device
from fbta.features.extract import CohortPatches, SlidePatches, _collate, extract_cohort, extract_patches
from fbta.features.registry import create_extractor
from fbta.slides.reader import open_slide
from fbta.synth.cohort import write_aperio_tiff
from fbta.synth.slide import make_slide
from fbta.tiling.tiler import tile_slide


def make_slides(folder: Path, n: int, side: int) -> list[SlidePatches]:
    cfg = load_config(None)
    out = []
    for i in range(n):
        path = folder / f"s{i:02d}.svs"
        rgb, _, _ = make_slide(np.random.default_rng(i), side, side, positive=bool(i % 2), tumour_fraction=0.2)
        write_aperio_tiff(path, rgb, mpp=0.5)
        with open_slide(path) as s:
            tiling = tile_slide(s, cfg.tissue, cfg.tile)
        out.append(SlidePatches(path, tiling.coords, tiling.attrs))
    return out


def drain(data: CohortPatches, workers: int, batch: int) -> float:
    """Patches/s of reading + decoding alone, one loader over the cohort."""
    loader = DataLoader(data, batch_size=batch, num_workers=workers, collate_fn=_collate,
                        prefetch_factor=4 if workers else None)
    t0, n = time.perf_counter(), 0
    for js, _, _, _ in loader:
        n += len(js)
    return n / (time.perf_counter() - t0)


def per_slide(slides: list[SlidePatches], extractor, device, batch: int, workers: int) -> tuple[float, list]:  # noqa: ANN001
    t0 = time.perf_counter()
    feats = [extract_patches(s, extractor, device, batch, workers) for s in slides]
    return sum(map(len, slides)) / (time.perf_counter() - t0), feats


def persistent(slides: list[SlidePatches], extractor, device, batch: int, workers: int) -> tuple[float, list]:  # noqa: ANN001
    got: dict[int, np.ndarray] = {}
    t0 = time.perf_counter()
    extract_cohort(CohortPatches(slides), range(len(slides)), extractor, device, batch, workers,
                   lambda j, f, e: got.__setitem__(j, f))
    return sum(map(len, slides)) / (time.perf_counter() - t0), [got[j] for j in range(len(slides))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--side", type=int, default=2048, help="level-0 side of each generated slide (px)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--model", default="efficientnet_lite0", help="test_* models: random weights")
    ap.add_argument("--input-size", type=int, default=112, help="px the network sees (params.yaml's demo value)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    extractor = create_extractor(args.model, weights="random" if args.model.startswith("test_") else None,
                                 trainable=False, device=device, input_size=args.input_size)
    load = os.getloadavg()
    compare_workers = max(w for w in args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        slides = make_slides(Path(tmp), args.slides, args.side)
        n = sum(map(len, slides))
        print(f"{args.slides} slides of {args.side}² px, {n} patches; {args.model} on {device}")
        reader = {}
        for w in args.workers:
            rates = [drain(CohortPatches(slides), w, args.batch_size) for _ in range(args.rounds)]
            reader[w] = float(np.median(rates))
            print(f"reader, {w} worker(s): {reader[w]:.0f} patches/s ({reader[w] / max(w, 1):.0f} per worker)")
        e2e = {}
        for w in args.workers:
            e2e[w] = float(np.median([persistent(slides, extractor, device, args.batch_size, w)[0]
                                      for _ in range(args.rounds)]))
            print(f"extraction ({args.model}, {args.input_size} px), {w} worker(s): {e2e[w]:.1f} patches/s")
        old, new, maxdiff = [], [], 0.0
        for r in range(args.rounds):  # alternate, so drift on a noisy machine hits both arms
            a, fa = per_slide(slides, extractor, device, args.batch_size, compare_workers)
            b, fb = persistent(slides, extractor, device, args.batch_size, compare_workers)
            old.append(a)
            new.append(b)
            maxdiff = max(maxdiff, max(float(np.abs(x - y).max()) for x, y in zip(fa, fb) if len(x)))
            print(f"round {r + 1}: per-slide loaders {a:.0f} patches/s, one persistent loader {b:.0f} "
                  f"(× {b / a:.2f})")
    ratios = [b / a for a, b in zip(old, new)]
    record("extract_workers", {
        "slides": args.slides, "side_px": args.side, "patches": n, "model": args.model, "device": str(device),
        "weights": extractor.weights_id, "input_size": args.input_size, "cpu_cores": os.cpu_count(),
        "loadavg_at_start": [round(v, 2) for v in load], "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
        "extract_patches_per_s": {str(w): round(v, 1) for w, v in e2e.items()},
        "batch_size": args.batch_size, "reader_patches_per_s": {str(w): round(v, 1) for w, v in reader.items()},
        "reader_patches_per_s_per_worker": {str(w): round(v / max(w, 1), 1) for w, v in reader.items()},
        "compare_workers": compare_workers, "per_slide_patches_per_s": [round(v, 1) for v in old],
        "persistent_patches_per_s": [round(v, 1) for v in new], "ratio_per_round": [round(v, 3) for v in ratios],
        "max_abs_feature_difference": maxdiff,
    }, f"persistent loader / per-slide loaders = {np.median(ratios):.2f}× ({compare_workers} workers, "
       f"{args.slides} slides × {n // args.slides} patches, max |Δfeature| {maxdiff:.1g}); reader per worker: "
       + ", ".join(f"{w}w {reader[w] / max(w, 1):.0f}/s" for w in args.workers)
       + f"; extraction ({args.model} {args.input_size} px): "
       + ", ".join(f"{w}w {e2e[w]:.0f}/s" for w in args.workers))


if __name__ == "__main__":
    main()
