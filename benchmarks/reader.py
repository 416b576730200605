"""Patch reading: our tiled-TIFF fast path vs OpenSlide ``read_region`` + RGB, same slide and coords, one run.

⚑ target (issue #17): ≥ 2× OpenSlide patches/s per process. Measured on the
real Aperio slide in ../shared/data/slides (240 px JPEG tiles) and a generated
tiled-JPEG pyramid (256 px tiles), reading 256 px level-0 patches at the
tiler's coordinates, in tiling order (neighbours share tiles, as in
extraction) and shuffled (no tile reuse). Rounds alternate the two readers;
the ratio is the median over rounds. With ``--procs 2`` each of two processes
reads the whole list (aggregate patches/s). Also the pixel agreement (max abs
difference and PSNR) on every patch read.

⚑ target (issue #28): a 40× slide read at 20× by DCT-scaled decode ≥ 4× OpenSlide
level-0 ``read_region`` + resize per process (``scaled_40x``). The slide: real H&E
pixels (the CMU-1 region in fbta/synth/assets, mirrored to ``--side40``) taken as a
0.25 µm/px scan, written as an Aperio-style pyramid in two tile layouts —
RGB-coded 4:4:4 (CMU-1's) and YCbCr 4:2:0. Three readers on the tiler's 20×
coords, rounds alternating: OpenSlide 512 px + PIL resize, today's reader
(``scaled_decode=False``: tiles + resize) and the DCT-scaled path. Pixel agreement
of the two fast paths with the area average of OpenSlide's full read and of the
pixels before JPEG (the true 20× image); the cosine similarity of
efficientnet_lite0 features (offline ImageNet weights) of the same patches, scaled
vs today's path, at 224 px (the model's own) and 112 px (the CPU demo's input).

    .venv/bin/python benchmarks/reader.py
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, record

from fbta.config import load_config
from fbta.slides.reader import open_slide
from fbta.slides.tiled import area_average, psnr
from fbta.synth.cohort import write_aperio_tiff
from fbta.synth.slide import make_slide
from fbta.tiling.tiler import tile_slide

REAL = ROOT.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"
LAYOUTS = {"rgb444_q90": dict(quality=90), "ycc420_q70": dict(quality=70, chroma_subsampled=True)}


def read_all(path: str, coords: np.ndarray, size: int, reader: str, out: int = 0) -> float:
    """Patches/s reading every coordinate once in this process (open included, like a worker).

    ``out``: patches of ``size`` level-0 px resized to ``out`` px (``read_patch``), else ``read_region``.
    """
    t0 = time.perf_counter()
    if reader == "openslide-raw":  # the baseline the issue names: read_region + RGB conversion
        import openslide

        osr = openslide.OpenSlide(path)
        for x, y in coords:
            np.asarray(osr.read_region((int(x), int(y)), 0, (size, size)))[..., :3].copy()
        osr.close()
    elif reader == "openslide-resize":  # #28's baseline: level-0 read_region of `size`, resized to `out`
        import openslide
        from PIL import Image

        osr = openslide.OpenSlide(path)
        for x, y in coords:
            rgb = Image.fromarray(np.asarray(osr.read_region((int(x), int(y)), 0, (size, size)))[..., :3])
            np.asarray(rgb.resize((out, out), Image.BILINEAR))
        osr.close()
    else:
        from fbta.slides import tiled

        tiled.clear_cache()  # no tile decoded by an earlier round may be served from memory
        how = {"reader": "auto", "scaled_decode": reader == "scaled"} if reader in ("today", "scaled") else \
            {"reader": reader}
        with open_slide(path, **how) as s:
            for x, y in coords:
                if out:
                    s.read_patch(int(x), int(y), 0, size, out)
                else:
                    s.read_region(int(x), int(y), 0, size, size)
    return len(coords) / (time.perf_counter() - t0)


def parallel(path: str, coords: np.ndarray, size: int, reader: str, procs: int, out: int = 0) -> float:
    """Aggregate patches/s of ``procs`` processes each reading all coords."""
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.apply(read_all, (path, coords[:8], size, reader, out))  # warm imports in the workers
        t0 = time.perf_counter()
        pool.starmap(read_all, [(path, coords, size, reader, out)] * procs)
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


def mirrored(texture: np.ndarray, side: int) -> np.ndarray:
    """``side``² px of real texture: the image reflected at its edges as often as needed (no seams)."""
    reps = (-(-side // texture.shape[0]), -(-side // texture.shape[1]))
    rows = [np.concatenate([texture if (i + j) % 2 == 0 else texture[:, ::-1] for j in range(reps[1])], 1)
            for i in range(reps[0])]
    big = np.concatenate([r if i % 2 == 0 else r[::-1] for i, r in enumerate(rows)], 0)
    return np.ascontiguousarray(big[:side, :side])


def scaled_agreement(path: str, coords: np.ndarray, truth: np.ndarray) -> dict:
    """Scaled and today's 20× patches vs the area average of OpenSlide's 40× read and of the pixels before JPEG."""
    rows: dict[str, list] = {k: [] for k in ("scaled_vs_area", "today_vs_area", "scaled_vs_truth", "today_vs_truth")}
    worst: dict[str, float] = {k: 0.0 for k in rows}
    with open_slide(path) as fast, open_slide(path, scaled_decode=False) as today, \
            open_slide(path, reader="openslide") as ref:
        for x, y in coords:
            x, y = int(x), int(y)
            got = {"scaled": fast.read_scaled(x, y, 0, 512, 256), "today": today.read_patch(x, y, 0, 512, 256)}
            if got["scaled"] is None:  # a patch running past the slide's edge: read + resize, as today
                continue
            refs = {"area": area_average(ref.read_region(x, y, 0, 512, 512), 2),
                    "truth": area_average(truth[y:y + 512, x:x + 512], 2)}
            for (a, img), (b, want) in ((a, b) for a in got.items() for b in refs.items()):
                rows[f"{a}_vs_{b}"].append(psnr(img, want))
                worst[f"{a}_vs_{b}"] = max(worst[f"{a}_vs_{b}"], float(np.abs(img - want).max()))
    return {"patches_scaled": len(rows["scaled_vs_area"]), "patches": int(len(coords)),
            **{k: {"psnr_db_min": round(min(v), 2), "psnr_db_median": round(float(np.median(v)), 2),
                   "max_abs_diff": round(worst[k], 2)} for k, v in rows.items()}}


def feature_cosine(path: str, coords: np.ndarray, sizes: tuple[int, ...] = (224, 112)) -> dict:
    """Cosine similarity of efficientnet_lite0 features (offline ImageNet weights), scaled vs today's patches."""
    import torch

    from fbta.features.registry import create_extractor

    with open_slide(path) as fast, open_slide(path, scaled_decode=False) as today:
        pix = {name: torch.from_numpy(np.stack([s.read_patch(int(x), int(y), 0, 512, 256) for x, y in coords]))
               for name, s in (("scaled", fast), ("today", today))}
    out = {}
    for size in sizes:
        ext = create_extractor("efficientnet_lite0", weights=None, trainable=False, input_size=size)
        with torch.inference_mode():
            f = {k: torch.cat([ext(ext.preprocess(v[i:i + 32])) for i in range(0, len(v), 32)]) for k, v in pix.items()}
        cos = torch.nn.functional.cosine_similarity(f["scaled"], f["today"], dim=1).numpy()
        out[f"input_{size}px"] = {"mean": round(float(cos.mean()), 5), "min": round(float(cos.min()), 5),
                                  "patches": int(len(cos)), "weights": ext.weights_id}
        print(f"features at {size} px: cosine scaled vs today mean {cos.mean():.4f}, min {cos.min():.4f}", flush=True)
    return out


def bench_scaled(layout: str, path: Path, truth: np.ndarray, rounds: int, procs: int, n_features: int) -> dict:
    """20× patches of a 40× slide: OpenSlide + resize vs today's reader vs DCT-scaled, per process."""
    coords = slide_coords(path, 256, 100_000)
    out: dict = {"layout": layout, "patches": int(len(coords)), "read_px": 512, "patch_px": 256,
                 "agreement": scaled_agreement(str(path), coords, truth)}
    arms = ("openslide-resize", "today", "scaled")
    rates: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(rounds):
        for arm in arms:
            rates[arm].append(read_all(str(path), coords, 512, arm, out=256))
    med = {a: float(np.median(v)) for a, v in rates.items()}
    ratio = {f"scaled_vs_{a.replace('-', '_')}": round(float(np.median([s / b for s, b in zip(rates["scaled"], v)])), 3)
             for a, v in rates.items() if a != "scaled"}
    out.update({"patches_per_s": {a: [round(v, 1) for v in vs] for a, vs in rates.items()}, "ratio_median": ratio})
    print(f"40× {layout} at 20×: OpenSlide+resize {med['openslide-resize']:.0f}, today {med['today']:.0f}, "
          f"scaled {med['scaled']:.0f} patches/s per process ({ratio['scaled_vs_openslide_resize']:.2f}× "
          f"OpenSlide+resize, {ratio['scaled_vs_today']:.2f}× today)", flush=True)
    if procs > 1:
        agg = parallel(str(path), coords, 512, "scaled", procs, out=256)
        out[f"scaled_{procs}_processes_patches_per_s"] = round(agg, 1)
    if n_features:
        pick = coords[np.random.default_rng(0).permutation(len(coords))[:n_features]]
        out["feature_cosine_scaled_vs_today"] = feature_cosine(str(path), pick)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=4096, help="level-0 side of the generated pyramid (px)")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--max-patches", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--side40", type=int, default=6144, help="level-0 side of the generated 40× slide (px)")
    ap.add_argument("--features", type=int, default=96, help="patches whose features are compared (0: skip)")
    args = ap.parse_args()
    load = os.getloadavg()
    rows = []
    if REAL.exists():
        rows.append(bench("cmu-1-small-region.svs", REAL, args.patch, args.max_patches, args.rounds, args.procs))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pyramid.svs"
        rgb, _, _ = make_slide(np.random.default_rng(1), args.side, args.side, positive=True, tumour_fraction=0.15)
        write_aperio_tiff(path, rgb, mpp=0.5)
        rows.append(bench(f"generated {args.side}² pyramid", path, args.patch, args.max_patches, args.rounds,
                          args.procs))
        from PIL import Image

        from fbta.synth.texture import SOURCE

        with Image.open(SOURCE) as im:
            truth = mirrored(np.asarray(im.convert("RGB")), args.side40)
        scaled = []
        for layout, how in LAYOUTS.items():
            path40 = Path(tmp) / f"s40_{layout}.svs"
            write_aperio_tiff(path40, truth, mpp=0.25, **how)
            scaled.append(bench_scaled(layout, path40, truth, args.rounds, args.procs, args.features))
    worst = min(min(r["tiling_order"]["ratio_median"], r["shuffled"]["ratio_median"]) for r in rows)
    head = "; ".join(f"{r['slide']}: {r['tiling_order']['ratio_median']:.2f}× in tiling order, "
                     f"{r['shuffled']['ratio_median']:.2f}× shuffled"
                     + (f", {r[f'{args.procs}_processes']['ratio']:.2f}× with {args.procs} processes"
                        if f"{args.procs}_processes" in r else "")
                     + f", max |Δ| {r['max_abs_diff']}" for r in rows)
    head40 = "; ".join(
        f"{r['layout']}: {r['ratio_median']['scaled_vs_openslide_resize']:.2f}× OpenSlide+resize, "
        f"{r['ratio_median']['scaled_vs_today']:.2f}× today's, {r['agreement']['scaled_vs_area']['psnr_db_min']:.1f} dB "
        f"min vs area average" + (f", feature cosine {r['feature_cosine_scaled_vs_today']['input_224px']['mean']:.4f}"
                                   if "feature_cosine_scaled_vs_today" in r else "") for r in scaled)
    record("reader", {"rows": rows, "target_ratio": 2.0, "worst_ratio": round(worst, 3), "scaled_40x": scaled,
                      "scaled_target_ratio": 4.0, "loadavg_at_start": [round(v, 2) for v in load],
                      "loadavg_at_end": [round(v, 2) for v in os.getloadavg()]},
           f"fast tiled reader vs OpenSlide read_region+RGB (patches/s, same coords): {head} (target ≥ 2×); "
           f"40× slide at 20×, DCT-scaled decode: {head40} (target ≥ 4×)")


if __name__ == "__main__":
    main()
