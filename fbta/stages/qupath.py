"""``fbta qupath``: per slide, one GeoJSON file QuPath imports → ``qupath/<slide_id>.geojson``.

In QuPath: open the slide, then File › Import objects (or drag the file onto the
viewer). Each file holds, in level-0 pixel coordinates:

- **Tissue** annotations: the tissue mask the tiling used (same ``tissue.*``), holes kept;
- the **patch grid** as detections; with a trained classifier (``models/<method>_<arch>``)
  each patch carries its instance score (``score``, and ``score_rank`` within the slide) as
  measurements and is classified with the slide's predicted class;
- **Tumor** annotations: the segmentation student's predicted tumour (``models/seg_student``),
  its patch maps stitched over the slide and thresholded as the metrics are.

What QuPath users draw or correct comes back as ``data.masks/<slide_id>.geojson``
(File › Export objects as GeoJSON): every stage that reads annotation masks reads those.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig

from fbta.config import save_config
from fbta.io.h5 import coords_complete, feature_files, read_coords, read_features
from fbta.io.qupath import feature, mask_to_geometry, patch_features, write_geojson
from fbta.slides.cohort import read_labels
from fbta.slides.reader import open_slide
from fbta.stages.common import features_dir, only_slides, out_dir, progress
from fbta.slide_status import StageReport
from fbta.tiling.tiler import tile_slide


def _classifier(cfg: DictConfig) -> Optional[Any]:
    from fbta.e2e.classifier import load_classifier
    from fbta.stages.milrun import model_folder

    folder = model_folder(cfg)
    return load_classifier(folder) if cfg.qupath.scores and (folder / "meta.json").exists() else None


def _segmenter(cfg: DictConfig) -> Optional[Any]:
    from fbta.seg.model import META, load_segmenter

    folder = Path(cfg.data.out, "models", "seg_student")
    return load_segmenter(folder) if cfg.qupath.tumour and (folder / META).exists() else None


def slide_objects(cfg: DictConfig, entry: Any, coords: np.ndarray, attrs: dict[str, Any], classifier: Any,
                  segmenter: Any, features: dict[str, Path]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The QuPath objects of one slide and a summary of what went in."""
    feats: list[dict[str, Any]] = []
    with open_slide(entry.path, entry.mpp, cfg.tile.default_mpp) as slide:
        tiling = tile_slide(slide, cfg.tissue, cfg.tile)
    tissue = mask_to_geometry(tiling.mask, tiling.mask_scale)
    feats += [feature(p, "annotation", "Tissue") for p in tissue.geoms]
    size0 = float(attrs.get("patch_size_level0", attrs["patch_size"]))
    info: dict[str, Any] = {"tissue_polygons": len(tissue.geoms), "patches": int(len(coords))}
    scores, names = None, None
    if classifier is not None and entry.slide_id in features:
        fx, fcoords, _ = read_features(features[entry.slide_id])
        if len(fcoords) == len(coords) and np.array_equal(fcoords, coords):
            out = classifier.forward(fx)
            s = out.scores.float().detach().cpu().numpy().reshape(-1)
            rank = np.argsort(np.argsort(s)) / max(len(s) - 1, 1)
            scores = {"score": s, "score_rank": rank}
            pred = classifier.classes[int(out.probs.float().detach().cpu().numpy().reshape(-1).argmax())]
            names = [pred] * len(coords)
            info["predicted"] = pred
    if cfg.qupath.patches:
        feats += patch_features(coords, size0, scores, names)
    if segmenter is not None:
        from fbta.seg.slide_map import predict_slide

        s = cfg.seg
        _, scale, _, _, pred_map, _, _ = predict_slide(
            entry.slide_id, entry.path, coords, attrs, segmenter.predict, csv_mpp=entry.mpp,
            max_px=cfg.qupath.tumour_px, max_patches=0, sigma=s.sigma, threshold=s.threshold)
        tumour = mask_to_geometry(pred_map, scale)
        feats += [feature(p, "annotation", "Tumor") for p in tumour.geoms]
        info["tumour_polygons"] = len(tumour.geoms)
    return feats, info


def run(cfg: DictConfig) -> int:
    report = StageReport("qupath")
    entries = read_labels(cfg.data.labels, cfg.data.slides)
    wanted = set(cfg.qupath.slides) if cfg.qupath.slides else None
    subset = only_slides(cfg, entries, str(cfg.data.labels))
    ids = [sid for sid in sorted(entries) if (wanted is None or sid in wanted) and (subset is None or sid in subset)]
    dest = out_dir(cfg, cfg.qupath.dest)
    classifier, segmenter = _classifier(cfg), _segmenter(cfg)
    features = feature_files(features_dir(cfg)) if classifier is not None else {}
    print(f"qupath: {len(ids)} slide(s) → {dest}; patch scores from "
          f"{'the trained ' + cfg.train.method + ' ' + cfg.mil.arch if classifier is not None else 'no model'}; "
          f"tumour from {'models/seg_student' if segmenter is not None else 'no segmenter'}", flush=True)
    for sid in progress(ids, cfg, "qupath"):
        t0 = time.perf_counter()
        coords_path = Path(cfg.data.out, "coords", f"{sid}.h5")
        if not coords_complete(coords_path):
            report.failed(sid, f"{coords_path}: no complete coords file (run `fbta tile`)")
            continue
        try:
            coords, attrs = read_coords(coords_path)
            objects, info = slide_objects(cfg, entries[sid], coords, attrs, classifier, segmenter, features)
            path = write_geojson(dest / f"{sid}.geojson", objects)
        except Exception as exc:  # noqa: BLE001 - one slide's problem, one line; the batch goes on
            report.failed(sid, f"{entries[sid].path}: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
            continue
        report.done(sid, time.perf_counter() - t0, objects=len(objects), file=str(path), **info)
    save_config(cfg, dest / "config.yaml")
    report.write(out_dir(cfg, "reports", "status") / "qupath.json")
    print(report.summary())
    return report.exit_code(cfg.run.strict)
