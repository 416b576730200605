"""Do patch reads scale across processes? 1 vs 2 reader processes splitting one slide's patches, and why not.

⚑ target (issue #28): on a slide of realistic size (≥ 2,000 patches) two
processes read ≥ 1.8× the patches/s of one. Each process is what a DataLoader
worker is: it opens the slide (OpenSlide + the TIFF's tile index + the
per-level check), starts with an empty tile cache, and reads every other
batch of 32 patches in tiling order. Rounds alternate 1 and 2 processes.

What could stop it, each measured in the same run:

- **the machine**: the CPU the other work on it leaves free (load average and
  /proc/stat busy share during each arm) — ``patches_per_cpu_s`` compares the
  processes' own CPU seconds, which no other load changes;
- **open cost**: seconds from ``open_slide`` to the first patch, per process;
- **per-process cache**: tiles decoded by both processes (neighbouring
  patches split across workers) — from the geometry: tiles each process's
  patches touch, summed, over the tiles one process touches;
- **file reads**: the seconds of seek + read of the tile bytes alone;
- **the GIL**: none between processes; the one process a DataLoader's results
  meet is measured by benchmarks/extract_workers.py.

    .venv/bin/python benchmarks/reader_procs.py
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import record
from reader import REAL, mirrored, slide_coords

from fbta.synth.cohort import write_aperio_tiff

BATCH = 32  # DataLoader batch: worker k reads batches k, k + n, k + 2n, ...


def worker(path: str, coords: np.ndarray, size: int) -> dict:
    """Open like a fresh loader worker, read ``coords``; wall and CPU seconds, open cost included."""
    from fbta.slides import tiled
    from fbta.slides.reader import open_slide

    tiled.clear_cache()
    t0, c0 = time.perf_counter(), time.process_time()
    with open_slide(path) as s:
        s.read_region(int(coords[0][0]), int(coords[0][1]), 0, size, size)  # the first patch runs the level check
        opened = time.perf_counter() - t0
        for x, y in coords[1:]:
            s.read_region(int(x), int(y), 0, size, size)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "open_s": opened}


def split(coords: np.ndarray, procs: int) -> list[np.ndarray]:
    batches = [coords[i:i + BATCH] for i in range(0, len(coords), BATCH)]
    return [np.concatenate(batches[k::procs]) for k in range(procs)]


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def run_arm(pool: mp.pool.Pool, path: str, coords: np.ndarray, size: int, procs: int) -> dict:
    parts = split(coords, procs)
    b0, t0, w0 = *busy_jiffies(), time.perf_counter()
    res = pool.starmap(worker, [(path, p, size) for p in parts], chunksize=1)
    wall = time.perf_counter() - w0
    b1, t1 = busy_jiffies()
    cpu = sum(r["cpu_s"] for r in res)
    tick = os.sysconf("SC_CLK_TCK")
    machine_busy_s = (b1 - b0) / tick
    return {"patches_per_s": len(coords) / wall, "cpu_s": cpu, "patches_per_cpu_s": len(coords) / cpu,
            "open_s": [round(r["open_s"], 4) for r in res], "wall_s": wall,
            # CPU seconds used by everything else on the machine while this arm ran, in cores
            "other_load_cores": max(0.0, machine_busy_s - cpu) / wall, "machine_busy_share": (b1 - b0) / max(t1 - t0, 1)}


def tiles_touched(path: str, coords: np.ndarray, size: int) -> int:
    from fbta.slides.reader import open_slide

    with open_slide(path) as s:
        page = s._tiles.pages[0]
        tw, th = page.tilewidth, page.tilelength
    return len({(tx, ty) for x, y in coords for tx in range(max(x, 0) // tw, (x + size - 1) // tw + 1)
                for ty in range(max(y, 0) // th, (y + size - 1) // th + 1)})


def file_read_s(path: str, coords: np.ndarray, size: int) -> float:
    """Seconds of seek + read of the tile bytes the patches touch (each tile once), no decoding."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page, fh = tif.pages[0], tif.filehandle
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        idx = sorted({ty * across + tx for x, y in coords for tx in range(max(x, 0) // tw, (x + size - 1) // tw + 1)
                      for ty in range(max(y, 0) // th, (y + size - 1) // th + 1)})
        t0 = time.perf_counter()
        for i in idx:
            fh.seek(page.dataoffsets[i])
            fh.read(page.databytecounts[i])
        return time.perf_counter() - t0


def bench(name: str, path: str, coords: np.ndarray, size: int, rounds: int) -> dict:
    arms: dict[int, list[dict]] = {1: [], 2: []}
    with mp.get_context("spawn").Pool(1) as one, mp.get_context("spawn").Pool(2) as two:
        for pool, n in ((one, 1), (two, 2)):  # imports and first-open warm-up outside the timing
            pool.starmap(worker, [(path, coords[:4], size)] * n, chunksize=1)
        for _ in range(rounds):
            for pool, n in ((one, 1), (two, 2)):
                arms[n].append(run_arm(pool, path, coords, size, n))
    med = {n: {k: float(np.median([r[k] for r in rs])) for k in ("patches_per_s", "patches_per_cpu_s",
                                                                  "other_load_cores", "machine_busy_share")}
           for n, rs in arms.items()}
    ratio = float(np.median([b["patches_per_s"] / a["patches_per_s"] for a, b in zip(arms[1], arms[2])]))
    cpu_ratio = med[2]["patches_per_cpu_s"] / med[1]["patches_per_cpu_s"]
    dup = sum(tiles_touched(path, p, size) for p in split(coords, 2)) / tiles_touched(path, coords, size)
    one_wall = float(np.median([r["wall_s"] for r in arms[1]]))
    out = {
        "slide": name, "patches": int(len(coords)), "patch_px": size, "rounds": rounds,
        "one_process": arms[1], "two_processes": arms[2], "median": {str(k): v for k, v in med.items()},
        "ratio_2_vs_1": round(ratio, 3), "ratio_patches_per_cpu_s_2_vs_1": round(cpu_ratio, 3),
        "open_share_of_one_process": round(float(np.median([r["open_s"][0] for r in arms[1]])) / one_wall, 4),
        "tile_decodes_2_vs_1": round(dup, 3),
        "file_read_share_of_one_process": round(file_read_s(path, coords, size) / one_wall, 4),
    }
    print(f"{name}: {len(coords)} patches; 1 process {med[1]['patches_per_s']:.0f}/s, 2 processes "
          f"{med[2]['patches_per_s']:.0f}/s (×{ratio:.2f}); per CPU-second ×{cpu_ratio:.2f}; other load "
          f"{med[1]['other_load_cores']:.2f} / {med[2]['other_load_cores']:.2f} cores; open {out['open_share_of_one_process']:.1%}"
          f", decodes ×{dup:.3f}, file reads {out['file_read_share_of_one_process']:.1%} of one process", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=14336, help="level-0 side of the generated 20× slide (px)")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    load = os.getloadavg()
    rows = []
    if REAL.exists():
        rows.append(bench("cmu-1-small-region.svs", str(REAL), slide_coords(REAL, args.patch, 100_000), args.patch,
                          args.rounds))
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        from fbta.synth.texture import SOURCE

        path = Path(tmp) / "big20x.svs"
        with Image.open(SOURCE) as im:
            write_aperio_tiff(path, mirrored(np.asarray(im.convert("RGB")), args.side), mpp=0.5)
        coords = slide_coords(path, args.patch, 1_000_000)
        rows.append(bench(f"generated {args.side}² 20× slide (real texture)", str(path), coords, args.patch,
                          args.rounds))
    big = rows[-1]
    record("reader_procs", {"rows": rows, "target_ratio": 1.8, "cpu_cores": os.cpu_count(),
                            "loadavg_at_start": [round(v, 2) for v in load],
                            "loadavg_at_end": [round(v, 2) for v in os.getloadavg()]},
           "; ".join(f"{r['slide']} ({r['patches']} patches): 2 processes {r['ratio_2_vs_1']:.2f}× one, "
                     f"{r['ratio_patches_per_cpu_s_2_vs_1']:.2f}× per CPU-second, other load "
                     f"{r['median']['2']['other_load_cores']:.1f} cores" for r in rows)
           + f" (target ≥ 1.8× on ≥ 2,000 patches: {big['ratio_2_vs_1']:.2f}×; {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
