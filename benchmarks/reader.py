"""Patch reading: our tiled-TIFF fast path vs OpenSlide ``read_region`` + RGB, same slide and coords, one run.

⚑ target (issue #17): ≥ 2× OpenSlide patches/s per process. Measured on the
real Aperio slide in ../shared/data/slides (240 px JPEG tiles) and a generated
tiled-JPEG pyramid (256 px tiles), reading 256 px level-0 patches at the
tiler's coordinates, in tiling order (neighbours share tiles, as in
extraction) and shuffled (no tile reuse). Rounds alternate the two readers;
the ratio is the median over rounds. With ``--procs 2`` each of two processes
reads the whole list (aggregate patches/s). Also the pixel agreement (max abs
difference and PSNR) on every patch read.

    .venv/bin/python benchmarks/reader.py
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, record

from fbta.config import load_config
from fbta.slides.reader import open_slide
from fbta.synth.cohort import write_aperio_tiff
from fbta.synth.slide import make_slide
from fbta.tiling.tiler import tile_slide

REAL = ROOT.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"


def read_all(path: str, coords: np.ndarray, size: int, reader: str) -> float:
    """Patches/s reading every coordinate once in this process (open included, like a worker)."""
    t0 = time.perf_counter()
    if reader == "openslide-raw":  # the baseline the issue names: read_region + RGB conversion
        import openslide

        osr = openslide.OpenSlide(path)
        for x, y in coords:
            np.asarray(osr.read_region((int(x), int(y)), 0, (size, size)))[..., :3].copy()
        osr.close()
    else:
        from fbta.slides import tiled

        tiled.clear_cache()  # no tile decoded by an earlier round may be served from memory
        with open_slide(path, reader=reader) as s:
            for x, y in coords:
                s.read_region(int(x), int(y), 0, size, size)
    return len(coords) / (time.perf_counter() - t0)


def parallel(path: str, coords: np.ndarray, size: int, reader: str, procs: int) -> float:
    """Aggregate patches/s of ``procs`` processes each reading all coords."""
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.apply(read_all, (path, coords[:8], size, reader))  # warm imports in the workers
        t0 = time.perf_counter()
        pool.starmap(read_all, [(path, coords, size, reader)] * procs)
        return procs * len(coords) / (time.perf_counter() - t0)


def agreement(path: str, coords: np.ndarray, size: int) -> dict[str, float]:
    worst, mse = 0, []
    with open_slide(path) as fast, open_slide(path, reader="openslide") as ref:
        fast_levels = fast.fast_levels
        for x, y in coords:
            a = fast.read_region(int(x), int(y), 0, size, size).astype(np.int16)
            b = ref.read_region(int(x), int(y), 0, size, size).astype(np.int16)
            worst = max(worst, int(np.abs(a - b).max()))
            mse.append(float(np.mean((a - b) ** 2.0)))
    m = float(np.mean(mse))
    return {"max_abs_diff": worst, "psnr_db": float("inf") if m == 0 else round(10 * np.log10(255 ** 2 / m), 2),
            "fast_levels": fast_levels}


def slide_coords(path: Path, size: int, limit: int) -> np.ndarray:
    cfg = load_config(None, [f"tile.patch_size={size}"])
    with open_slide(path, default_mpp=0.5) as s:
        coords = tile_slide(s, cfg.tissue, cfg.tile).coords
    if len(coords) < 16:  # a small region: every grid position, tissue or not
        with open_slide(path) as s:
            w, h = s.dimensions
        coords = np.array([(x, y) for y in range(0, h - size + 1, size // 2) for x in range(0, w - size + 1, size // 2)])
    return np.asarray(coords[:limit])


def bench(name: str, path: Path, size: int, limit: int, rounds: int, procs: int) -> dict:
    grid = slide_coords(path, size, limit)
    shuffled = grid[np.random.default_rng(0).permutation(len(grid))]
    out: dict = {"slide": name, "patches": int(len(grid)), "patch_px": size, **agreement(str(path), grid, size)}
    for order, coords in (("tiling_order", grid), ("shuffled", shuffled)):
        ours, raw = [], []
        for _ in range(rounds):
            raw.append(read_all(str(path), coords, size, "openslide-raw"))
            ours.append(read_all(str(path), coords, size, "auto"))
        ratio = float(np.median([a / b for a, b in zip(ours, raw)]))
        out[order] = {"ours_patches_per_s": [round(v, 1) for v in ours],
                      "openslide_patches_per_s": [round(v, 1) for v in raw], "ratio_median": round(ratio, 3)}
        print(f"{name} {order}: ours {np.median(ours):.0f} vs OpenSlide {np.median(raw):.0f} patches/s "
              f"(ratio {ratio:.2f}, one process)", flush=True)
    if procs > 1:
        raw_p = parallel(str(path), grid, size, "openslide-raw", procs)
        ours_p = parallel(str(path), grid, size, "auto", procs)
        out[f"{procs}_processes"] = {"ours_patches_per_s": round(ours_p, 1), "openslide_patches_per_s": round(raw_p, 1),
                                     "ratio": round(ours_p / raw_p, 3)}
        print(f"{name} {procs} processes: ours {ours_p:.0f} vs OpenSlide {raw_p:.0f} patches/s "
              f"(ratio {ours_p / raw_p:.2f})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=4096, help="level-0 side of the generated pyramid (px)")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--max-patches", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args()
    rows = []
    if REAL.exists():
        rows.append(bench("cmu-1-small-region.svs", REAL, args.patch, args.max_patches, args.rounds, args.procs))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pyramid.svs"
        rgb, _, _ = make_slide(np.random.default_rng(1), args.side, args.side, positive=True, tumour_fraction=0.15)
        write_aperio_tiff(path, rgb, mpp=0.5)
        rows.append(bench(f"generated {args.side}² pyramid", path, args.patch, args.max_patches, args.rounds,
                          args.procs))
    worst = min(min(r["tiling_order"]["ratio_median"], r["shuffled"]["ratio_median"]) for r in rows)
    head = "; ".join(f"{r['slide']}: {r['tiling_order']['ratio_median']:.2f}× in tiling order, "
                     f"{r['shuffled']['ratio_median']:.2f}× shuffled"
                     + (f", {r[f'{args.procs}_processes']['ratio']:.2f}× with {args.procs} processes"
                        if f"{args.procs}_processes" in r else "")
                     + f", max |Δ| {r['max_abs_diff']}" for r in rows)
    record("reader", {"rows": rows, "target_ratio": 2.0, "worst_ratio": round(worst, 3)},
           f"fast tiled reader vs OpenSlide read_region+RGB (patches/s, same coords): {head} (target ≥ 2×)")


if __name__ == "__main__":
    main()
