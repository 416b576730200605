"""Is extraction compute-bound? End-to-end patches/s vs pure forward passes, same model, same run.

⚑ target: end-to-end (read, decode, transform, forward, write) ≥ 0.85 × pure forward.
Also: our patch reader vs plain OpenSlide ``read_region`` (one process), and
KMeans (C = 100) on 50,000 × 1024 features.

    .venv/bin/python benchmarks/extract.py                      # CPU-sized defaults
    .venv/bin/python benchmarks/extract.py --side 36864 --batch-size 256 --workers 8   # GPU host, ≥ 20k patches
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import record

from fbta.config import load_config
from fbta.features.extract import SlidePatches, extract_patches, pick_device
from fbta.features.kmeans import DEFAULT_METHOD, cluster_bag
from fbta.features.registry import create_extractor
from fbta.io.h5 import write_features
from fbta.slides.reader import open_slide
from fbta.synth.cohort import write_aperio_tiff
from fbta.synth.slide import make_slide
from fbta.tiling.tiler import tile_slide


def make_big_slide(path: Path, side: int, seed: int) -> None:
    rgb, _, _ = make_slide(np.random.default_rng(seed), side, side, positive=True, tumour_fraction=0.15)
    write_aperio_tiff(path, rgb, mpp=0.5)


def pure_forward(extractor, device, n: int, batch: int, amp: bool) -> float:
    """Patches/s of preprocess + forward on random uint8 patches already in memory."""
    x = torch.randint(0, 256, (batch, 256, 256, 3), dtype=torch.uint8)
    use_amp = amp and device.type == "cuda"
    done, t0 = 0, time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, enabled=use_amp):
        while done < n:
            extractor(extractor.preprocess(x.to(device))).float().cpu()
            done += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def end_to_end(ds, extractor, device, batch: int, workers: int, amp: bool, dest: Path) -> float:
    t0 = time.perf_counter()
    feats = extract_patches(ds, extractor, device, batch, workers, amp)
    write_features(dest, feats, ds.coords, {"extractor": extractor.name})
    return len(ds) / (time.perf_counter() - t0)


def reader_throughput(ds: SlidePatches, n: int) -> tuple[float, float]:
    """(our reader, raw OpenSlide read_region) patches/s in this process."""
    import openslide

    idx = np.arange(min(n, len(ds)))
    t0 = time.perf_counter()
    for i in idx:
        ds[int(i)]
    ours = len(idx) / (time.perf_counter() - t0)
    osr = openslide.OpenSlide(str(ds.path))
    t0 = time.perf_counter()
    for x, y in ds.coords[idx]:
        osr.read_region((int(x), int(y)), ds.level, (ds.read_size, ds.read_size))
    raw = len(idx) / (time.perf_counter() - t0)
    return ours, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--side", type=int, default=8192, help="level-0 side of the generated slide (px)")
    ap.add_argument("--max-patches", type=int, default=1024, help="cap on patches extracted (CPU budget)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=2, help="alternating forward / end-to-end rounds")
    ap.add_argument("--kmeans-n", type=int, default=50_000)
    args = ap.parse_args()

    device = pick_device(args.device)
    extractor = create_extractor(args.model, trainable=False, device=device)
    cfg = load_config(None)
    with tempfile.TemporaryDirectory() as tmp:
        slide_path = Path(tmp) / "bench.svs"
        t0 = time.perf_counter()
        make_big_slide(slide_path, args.side, seed=1)
        t_make = time.perf_counter() - t0
        with open_slide(slide_path) as s:
            t0 = time.perf_counter()
            tiling = tile_slide(s, cfg.tissue, cfg.tile)
            t_tile = time.perf_counter() - t0
        coords = tiling.coords[: args.max_patches]
        ds = SlidePatches(slide_path, coords, tiling.attrs)
        print(f"slide {args.side}² px: {len(tiling.coords)} tissue patches (tiled in {t_tile:.2f} s), "
              f"extracting {len(coords)} with {args.model} on {device}")
        pure_forward(extractor, device, args.batch_size * 2, args.batch_size, True)  # warm-up
        fwd, e2e = [], []
        for r in range(args.rounds):
            fwd.append(pure_forward(extractor, device, len(coords), args.batch_size, True))
            e2e.append(end_to_end(ds, extractor, device, args.batch_size, args.workers, True, Path(tmp) / "f.h5"))
            print(f"round {r + 1}: forward {fwd[-1]:.1f} patches/s, end-to-end {e2e[-1]:.1f} patches/s "
                  f"(ratio {e2e[-1] / fwd[-1]:.3f})")
        ours, raw = reader_throughput(ds, 2000)
        print(f"reading: ours {ours:.0f} patches/s, OpenSlide read_region {raw:.0f} patches/s (one process)")

    rng = np.random.default_rng(0)
    centres = rng.gamma(2.0, 0.1, size=(100, 1024)).astype(np.float32)
    feats = centres[rng.integers(0, 100, args.kmeans_n)] + rng.normal(0, 0.05, (args.kmeans_n, 1024)).astype(np.float32)
    t0 = time.perf_counter()
    cluster_bag(feats, 100, seed=0)
    t_km = time.perf_counter() - t0
    print(f"KMeans C=100 on {args.kmeans_n}×1024 ({DEFAULT_METHOD}): {t_km:.1f} s")

    ratios = [e / f for e, f in zip(e2e, fwd)]
    best = int(np.argmax(ratios))
    record("extract", {
        "model": args.model, "device": str(device), "batch_size": args.batch_size, "workers": args.workers,
        "slide_side_px": args.side, "tissue_patches": int(len(tiling.coords)), "patches_extracted": int(len(coords)),
        "tile_seconds": round(t_tile, 3), "slide_generation_seconds": round(t_make, 1),
        "forward_patches_per_s": [round(v, 2) for v in fwd], "end_to_end_patches_per_s": [round(v, 2) for v in e2e],
        "ratio_per_round": [round(v, 3) for v in ratios], "ratio_median": round(float(np.median(ratios)), 3),
        "target_ratio": 0.85, "reader_patches_per_s": round(ours, 1), "openslide_read_region_patches_per_s": round(raw, 1),
        "kmeans_method": DEFAULT_METHOD, "kmeans_n": args.kmeans_n, "kmeans_seconds": round(t_km, 2),
    }, f"end-to-end / forward = {np.median(ratios):.3f} (target ≥ 0.85; {e2e[best]:.1f} vs {fwd[best]:.1f} patches/s, "
       f"{args.model}, {device}); reader {ours:.0f} vs OpenSlide {raw:.0f} patches/s; KMeans 50k×1024 C=100 {t_km:.1f} s")


if __name__ == "__main__":
    main()
