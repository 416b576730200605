"""Tiling stays cheap: seconds to tile a 20,000 × 20,000 px slide (coordinates from a low-res mask).

Reference (not run here, CLAM is GPL): CLAM's create_patches takes ~0.4 s for a
slide of this size plus start-up. We time ``tile_slide`` (mask + grid) and the
thumbnail separately, on a generated 20x Aperio pyramid (levels 1, 4, 16), and
report the ratio to reading the slide's level-0 pixels once, in the same run.

    .venv/bin/python benchmarks/tile.py            # 20480² px
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import record

from fbta.config import load_config
from fbta.slides.reader import open_slide
from fbta.synth.cohort import write_aperio_tiff
from fbta.synth.slide import make_slide
from fbta.tiling.thumbnail import draw_thumbnail
from fbta.tiling.tiler import tile_slide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=20480)
    ap.add_argument("--block", type=int, default=4096, help="generated block repeated to fill the slide")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.svs"
        t0 = time.perf_counter()
        block, _, _ = make_slide(np.random.default_rng(0), args.block, args.block, positive=True, tumour_fraction=0.15)
        reps = -(-args.side // args.block)
        rgb = np.tile(block, (reps, reps, 1))[: args.side, : args.side]
        write_aperio_tiff(path, rgb, mpp=0.5)
        del rgb
        t_make = time.perf_counter() - t0
        times, thumbs = [], []
        with open_slide(path) as s:
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                tiling = tile_slide(s, cfg.tissue, cfg.tile)
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                draw_thumbnail(s, tiling, cfg.tile.thumbnail_px)
                thumbs.append(time.perf_counter() - t0)
            # the cost tiling avoids: decoding level 0 once, 4096-px strips at a time
            w, h = s.dimensions
            t0 = time.perf_counter()
            for y in range(0, h, 4096):
                s.read_region(0, y, 0, w, min(4096, h - y))
            t_level0 = time.perf_counter() - t0
    t_tile = float(np.median(times))
    print(f"{args.side}² px slide: {len(tiling.coords)} patches; tile_slide {t_tile:.2f} s (median of {args.repeats}), "
          f"thumbnail {np.median(thumbs):.2f} s; reading level 0 once {t_level0:.1f} s")
    record("tile", {
        "slide_side_px": args.side, "patches": int(len(tiling.coords)), "tile_seconds": [round(t, 3) for t in times],
        "thumbnail_seconds": [round(t, 3) for t in thumbs], "read_level0_seconds": round(t_level0, 2),
        "tile_over_level0_read": round(t_tile / t_level0, 4), "slide_generation_seconds": round(t_make, 1),
        "clam_reference_seconds": 0.4,
    }, f"{args.side}² px: tile_slide {t_tile:.2f} s (+ thumbnail {np.median(thumbs):.2f} s) for {len(tiling.coords)} "
       f"patches = {t_tile / t_level0:.3f} × one level-0 read ({t_level0:.1f} s); CLAM reference ~0.4 s")


if __name__ == "__main__":
    main()
