"""``fbta cluster``: per-slide KMeans on frozen features → clusters/<model>/<slide_id>.h5.

Computed once and cached: FBTA's sampler then draws M patches per cluster
every epoch without touching the features again.
"""
from __future__ import annotations

import time

from omegaconf import DictConfig
from tqdm.auto import tqdm

from fbta.config import save_config
from fbta.device import resolve_device
from fbta.features.kmeans import cluster_bag
from fbta.io.h5 import clusters_complete, feature_file_attrs, feature_files, read_features, write_clusters
from fbta.io.lock import claimed, raise_if_storage
from fbta.stages.common import clusters_dir, features_dir, only_slides, out_dir, progress, stop_on_storage_error
from fbta.slide_status import StageReport


def run(cfg: DictConfig) -> int:
    feats_dir = features_dir(cfg)
    dest_dir = clusters_dir(cfg)
    dest_dir.mkdir(parents=True, exist_ok=True)
    report = StageReport("cluster")
    c = cfg.cluster
    device = resolve_device(c.device, "cluster.device")
    files = feature_files(feats_dir)
    subset = only_slides(cfg, files, str(feats_dir))
    files = {k: v for k, v in files.items() if subset is None or k in subset}
    if not files:
        print(f"cluster: no feature files in {feats_dir}; run `fbta extract` or set data.features", flush=True)
    todo = []
    for slide_id, fpath in files.items():
        try:
            source = str(feature_file_attrs(fpath)[0].get("fbta_params", ""))
        except Exception as exc:
            report.failed(slide_id, f"{fpath}: {type(exc).__name__}: {exc}")
            continue
        expect = {"n_clusters_requested": c.n_clusters, "seed": c.seed, "method": c.method, "features_params": source}
        dest = dest_dir / f"{slide_id}.h5"
        if clusters_complete(dest, expect):
            report.skipped(slide_id, "up to date")
        else:
            todo.append((slide_id, fpath, dest, expect))
    work = claimed(todo, dest_of=lambda t: t[2], is_done=lambda t: clusters_complete(t[2], t[3]),
                   on_skip=lambda t, why: report.skipped(t[0], why), log=tqdm.write)
    with stop_on_storage_error(report, cfg, dest_dir):
        for slide_id, fpath, dest, expect in progress(work, cfg, "cluster", total=len(todo)):
            t0 = time.perf_counter()
            try:
                feats, _, _ = read_features(fpath)
                labels, centroids = cluster_bag(feats, c.n_clusters, c.seed, method=c.method, device=device)
            except Exception as exc:
                report.failed(slide_id, f"{fpath}: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
                continue
            try:
                write_clusters(dest, labels, centroids, {**expect, "n_clusters": len(centroids),
                                                         "features_file": str(fpath), "n_patches": len(feats),
                                                         "device": device.type})
            except OSError as exc:  # a full or read-only disk stops the stage
                raise_if_storage(exc, dest, "cluster")
                report.failed(slide_id, f"{dest}: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
                continue
            report.done(slide_id, time.perf_counter() - t0, patches=len(feats), clusters=len(centroids))
    save_config(cfg, dest_dir / "config.yaml")
    report.write(out_dir(cfg, "reports", "status") / "cluster.json")
    print(report.summary())
    return report.exit_code(cfg.run.strict)
