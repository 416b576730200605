"""Tiling stays cheap: seconds to tile a 20,000 × 20,000 px slide (coordinates from a low-res mask).

We time ``tile_slide`` (mask + grid) and the thumbnail separately, on a
generated 20x Aperio pyramid (levels 1, 4, 16), and, in the same run, the work
the next stage does with its output: reading every patch it emitted (the
pipeline's reader, one process). The ratio says what tiling adds to a slide's
cost; no reference figure from another tool enters it.

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
            # the work the next stage does with the output: read every emitted patch once
            a = tiling.attrs
            t0 = time.perf_counter()
            for x, y in tiling.coords:
                s.read_patch(int(x), int(y), a["patch_level"], a["level_patch_size"], a["patch_size"])
            t_read = time.perf_counter() - t0
    t_tile = float(np.median(times))
    print(f"{args.side}² px slide: {len(tiling.coords)} patches; tile_slide {t_tile:.2f} s (median of {args.repeats}), "
          f"thumbnail {np.median(thumbs):.2f} s; reading its patches once {t_read:.1f} s")
    record("tile", {
        "slide_side_px": args.side, "patches": int(len(tiling.coords)), "tile_seconds": [round(t, 3) for t in times],
        "thumbnail_seconds": [round(t, 3) for t in thumbs], "read_patches_seconds": round(t_read, 2),
        "tile_over_patch_read": round(t_tile / t_read, 4), "slide_generation_seconds": round(t_make, 1),
    }, f"{args.side}² px: tile_slide {t_tile:.2f} s (median of {args.repeats}; + thumbnail {np.median(thumbs):.2f} s) "
       f"for {len(tiling.coords)} patches = {t_tile / t_read:.3f} × reading those patches once ({t_read:.1f} s)")


if __name__ == "__main__":
    main()
