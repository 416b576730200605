"""``fbta cluster``: per-slide KMeans on frozen features → clusters/<model>/<slide_id>.h5.

Computed once and cached: FBTA's sampler then draws M patches per cluster
every epoch without touching the features again.
"""
from __future__ import annotations

import time

import h5py
from omegaconf import DictConfig

from fbta.config import save_config
from fbta.features.kmeans import cluster_bag
from fbta.io.h5 import _py, clusters_complete, feature_files, read_features, write_clusters
from fbta.stages.common import clusters_dir, features_dir, only_slides, out_dir, progress
from fbta.status import StageReport


def run(cfg: DictConfig) -> int:
    feats_dir = features_dir(cfg)
    dest_dir = clusters_dir(cfg)
    dest_dir.mkdir(parents=True, exist_ok=True)
    report = StageReport("cluster")
    c = cfg.cluster
    files = feature_files(feats_dir)
    subset = only_slides(cfg, files, str(feats_dir))
    files = {k: v for k, v in files.items() if subset is None or k in subset}
    if not files:
        print(f"cluster: no feature files in {feats_dir}; run `fbta extract` or set data.features", flush=True)
    for slide_id, fpath in progress(files.items(), cfg, "cluster"):
        dest = dest_dir / f"{slide_id}.h5"
        t0 = time.perf_counter()
        try:
            with h5py.File(fpath, "r") as f:
                source = str(_py(f.attrs.get("fbta_params", "")))
            expect = {"n_clusters_requested": c.n_clusters, "seed": c.seed, "method": c.method, "features_params": source}
            if clusters_complete(dest, expect):
                report.skipped(slide_id, "up to date")
                continue
            feats, _, _ = read_features(fpath)
            labels, centroids = cluster_bag(feats, c.n_clusters, c.seed, method=c.method)
            write_clusters(dest, labels, centroids, {**expect, "n_clusters": len(centroids),
                                                     "features_file": str(fpath), "n_patches": len(feats)})
        except Exception as exc:
            report.failed(slide_id, f"{fpath}: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
            continue
        report.done(slide_id, time.perf_counter() - t0, patches=len(feats), clusters=len(centroids))
    save_config(cfg, dest_dir / "config.yaml")
    report.write(out_dir(cfg, "reports", "status") / "cluster.json")
    print(report.summary())
    return report.exit_code(cfg.run.strict)
