"""Side-by-side KMeans timings that chose ``fbta.features.kmeans.DEFAULT_METHOD``.

Why: FBTA clusters every slide once (C = 100 on N×1024 frozen features), so the
cluster stage's cost over a cohort is this number times the slide count. Each
method runs on the same Gaussian-mixture bag; wall time, iterations and
inertia (float64, same formula for all) are reported together, because a fast
method only wins if its inertia is comparable.

    .venv/bin/python benchmarks/kmeans.py            # 50,000 and 5,000 × 1024, C = 100
    .venv/bin/python benchmarks/kmeans.py --sizes 50000 --methods torch,sklearn --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fbta.features.kmeans import DEFAULT_METHOD, inertia, torch_kmeans  # noqa: E402


def mixture(n: int, d: int, k: int, seed: int, separation: float = 0.1) -> np.ndarray:
    """Unequal, overlapping Gaussian clusters, non-negative like pooled CNN features.

    ``separation`` scales the centre spread; 0.1 overlaps enough that Lloyd needs
    tens of iterations (0.5 is separable and converges in ~4, which flatters everyone).
    """
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(k, 2.0))
    comp = rng.choice(k, size=n, p=weights)
    centres = rng.gamma(2.0, separation, size=(k, d)).astype(np.float32)
    spread = rng.uniform(0.3, 1.0, size=k).astype(np.float32)
    x = centres[comp] + rng.standard_normal((n, d), dtype=np.float32) * spread[comp, None]
    return np.maximum(x, 0.0, dtype=np.float32)


def _sk(kind: str, n_init: int, max_iter: int = 300, batch_size: int = 1024) -> Callable[..., Any]:
    def run(x: np.ndarray, c: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
        from sklearn.cluster import KMeans, MiniBatchKMeans
        from sklearn.exceptions import ConvergenceWarning

        if kind == "minibatch":
            km: Any = MiniBatchKMeans(n_clusters=c, n_init=n_init, random_state=seed, batch_size=batch_size,
                                      max_iter=100)
        else:
            km = KMeans(n_clusters=c, n_init=n_init, random_state=seed, algorithm=kind, max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = km.fit_predict(x)
        return labels, km.cluster_centers_, int(km.n_iter_)

    return run


def _torch(max_iter: int) -> Callable[..., Any]:
    def run(x: np.ndarray, c: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
        return torch_kmeans(x, c, seed, max_iter=max_iter, return_n_iter=True)

    return run


METHODS: dict[str, tuple[str, Callable[..., Any]]] = {
    "torch": ("torch k-means++ (greedy) + Lloyd, max_iter 100 [ours]", _torch(100)),
    "torch20": ("torch, max_iter 20", _torch(20)),
    "sklearn": ("sklearn KMeans lloyd n_init=1 (= 1.9 default 'auto')", _sk("lloyd", 1)),
    "elkan": ("sklearn KMeans elkan n_init=1", _sk("elkan", 1)),
    "sklearn10": ("sklearn KMeans lloyd n_init=10 (pre-1.4 default)", _sk("lloyd", 10)),
    "minibatch": ("sklearn MiniBatchKMeans batch 1024 n_init=1", _sk("minibatch", 1)),
    "minibatch4096": ("sklearn MiniBatchKMeans batch 4096 n_init=3", _sk("minibatch", 3, batch_size=4096)),
}


def real_features(folder: str, n: int) -> np.ndarray:
    """The first ``n`` rows of a feature folder's bags (CLAM/TRIDENT .h5, sorted by slide): real frozen features."""
    from fbta.io.h5 import feature_files, read_features

    parts, have = [], 0
    for path in feature_files(Path(folder)).values():
        feats, _, _ = read_features(path)
        parts.append(feats)
        have += len(feats)
        if have >= n:
            break
    x = np.concatenate(parts)
    if len(x) < n:
        raise SystemExit(f"{folder}: only {len(x)} feature rows, asked for N={n}")
    return np.ascontiguousarray(x[:n], dtype=np.float32)


def run_one(key: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One method on one bag, in this (fresh) process: data and warm-up are not timed."""
    x = real_features(args.features, n) if args.features else mixture(n, args.dim, args.components, args.seed,
                                                                       args.separation)
    METHODS[key][1](x[:2000], 10, 0)  # warm up BLAS / OpenMP threads of this method
    t0 = time.perf_counter()
    labels, cent, n_iter = METHODS[key][1](x, args.clusters, args.seed)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "n_iter": n_iter, "inertia": inertia(x, labels, cent),
            "clusters_used": int(np.unique(labels).size), "load_avg_1m": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50000,5000", help="comma-separated N values")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--components", type=int, default=64, help="true mixture components")
    ap.add_argument("--separation", type=float, default=0.1, help="centre spread of the mixture")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (OMP/BLAS/torch)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per method (min and median kept)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--slow-max-n", type=int, default=20000,
                    help="run sklearn n_init=10 and elkan only for N ≤ this (slow, see report)")
    ap.add_argument("--features", default=None,
                    help="a feature folder (h5_files/*.h5): time on real frozen features instead of the mixture")
    ap.add_argument("--out", default="reports/bench/kmeans.json")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # child mode: one measurement, JSON on stdout
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args)))
        return 0

    # Every measurement runs in a fresh process: torch and scikit-learn each bring
    # their own OpenMP runtime, and idle spinning threads of one slow the other.
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    common = ["--dim", str(args.dim), "--clusters", str(args.clusters), "--components", str(args.components),
              "--separation", str(args.separation), "--seed", str(args.seed)]
    if args.features:
        common += ["--features", args.features]
        args.dim = int(real_features(args.features, 1).shape[1])
    threads = [int(t) for t in args.threads.split(",")]
    rows: list[dict[str, Any]] = []
    for n in [int(s) for s in args.sizes.split(",")]:
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {(k, t): [] for k in keys for t in threads}
        for rep in range(max(1, args.repeats)):
            for key, t in runs:
                slow = key in ("sklearn10", "elkan")
                if (slow and n > args.slow_max_n) or (key == "sklearn10" and rep > 0):
                    continue
                env = {**os.environ, **{v: str(t) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                             "MKL_NUM_THREADS")}}
                cmd = [sys.executable, __file__, "--one", key, str(n), *common]
                res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                runs[(key, t)].append(r)
                print(f"N={n:>6} rep {rep} thr {t} {METHODS[key][0]:<55} {r['wall_s']:>8.2f} s  "
                      f"iters {r['n_iter']:>4}  inertia {r['inertia']:.6e}  load {r['load_avg_1m']:.2f}", flush=True)
        for (key, t), rs in runs.items():
            if not rs:
                continue
            walls = [r["wall_s"] for r in rs]
            rows.append({"n": n, "d": args.dim, "c": args.clusters, "threads": t, "method": key,
                         "description": METHODS[key][0],
                         "wall_s": round(min(walls), 3), "wall_median_s": round(float(np.median(walls)), 3),
                         "wall_all_s": [round(w, 3) for w in walls], "n_iter": rs[0]["n_iter"],
                         "inertia": rs[0]["inertia"], "clusters_used": rs[0]["clusters_used"],
                         "load_avg_1m": [round(r["load_avg_1m"], 2) for r in rs]})
        best = min(r["inertia"] for r in rows if r["n"] == n)
        for r in rows:
            if r["n"] == n:
                r["inertia_rel_best"] = round(r["inertia"] / best, 5)

    import sklearn

    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "note": "shared machine: other processes ran during the benchmark (see load_avg_1m)"},
        "versions": {"torch": torch.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__},
        "data": (f"real frozen features from {args.features} (first N rows, slides in order)" if args.features else
                 f"Gaussian mixture, {args.components} components, separation {args.separation}, "
                 f"ReLU-clipped, seed {args.seed}"),
        "default_method": DEFAULT_METHOD, "rows": rows,
    }
    print(f"\n{'N':>6} {'thr':>3}  {'method':<55} {'min s':>7} {'median s':>8} {'iters':>6} {'inertia/best':>13}")
    for r in rows:
        print(f"{r['n']:>6} {r['threads']:>3}  {r['description']:<55} {r['wall_s']:>7.2f} {r['wall_median_s']:>8.2f} "
              f"{r['n_iter']:>6} {r['inertia_rel_best']:>13.5f}")
    from common import BENCH_DIR, record

    best = {r["method"]: r for r in rows if r["n"] == max(x["n"] for x in rows) and r["threads"] == 1}
    parts = [f"{k} {v['wall_s']:.1f} s (inertia ×{v['inertia_rel_best']:.4f})" for k, v in sorted(best.items())]
    headline = (f"C={args.clusters}, N={max(x['n'] for x in rows)}×{args.dim} "
                f"({'real features' if args.features else 'Gaussian mixture'}), 1 thread: " + "; ".join(parts)
                + f" → default `{DEFAULT_METHOD}`")
    out = Path(args.out).resolve()
    if out.parent == BENCH_DIR.resolve():  # a reports/bench/<name>.json: one JSON per command, BENCHMARKS.md row
        record(out.stem, report, headline)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out)
        print(f"{headline}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
