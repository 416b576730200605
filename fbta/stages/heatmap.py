"""``fbta heatmap``: the trained head's instance scores over each slide → PNGs + localisation figures.

``reports/plots/heatmaps/<method>_<arch>/<slide_id>.png`` for every slide with
features (or ``heatmap.slides``). The image under the patches is read from the
slide at ``heatmap.max_px``, else the tiling thumbnail, else blank. Where
``data.masks`` has the slide's annotation, its outline is drawn and the
scores are compared with it (``localisation.json``): AUC of scores vs
patch-in-annotation and relative attention inside/outside.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from fbta.config import ConfigError, InputError, save_config
from fbta.io.atomic import atomic_path, atomic_write_text
from fbta.io.h5 import feature_file_attrs, feature_files, read_features, require_coords
from fbta.io.masks import find_mask, read_mask
from fbta.e2e.classifier import load_classifier
from fbta.mil.data import check_bag
from fbta.mil.heatmap import draw_heatmap, localisation, normalise, patch_fraction_inside
from fbta.mil.train import resolve_device
from fbta.slides.cohort import CohortError, discover
from fbta.slides.reader import open_slide
from fbta.stages.common import features_dir, out_dir, progress
from fbta.stages.milrun import check_method_and_arch, model_folder, variant
from fbta.slide_status import StageReport
from fbta.tracking import stage_run


def geometry(coords: np.ndarray, attrs: dict[str, Any]) -> tuple[float, tuple[float, float]]:
    """(patch side in level-0 px, level-0 (width, height)) from CLAM/TRIDENT coords attributes."""
    ds = attrs.get("downsample", [1.0, 1.0])
    ds = ds if isinstance(ds, (list, tuple)) else [ds, ds]
    size0 = attrs.get("patch_size_level0") or (attrs["patch_size"] * ds[0] if "patch_size" in attrs else None)
    if size0 is None:  # no attributes: the grid step
        xs = np.unique(coords[:, 0])
        size0 = float(np.diff(xs).min()) if len(xs) > 1 else 256.0
    if "level_dim" in attrs:
        dims = (attrs["level_dim"][0] * ds[0], attrs["level_dim"][1] * ds[1])
    else:
        dims = (coords[:, 0].max() + size0, coords[:, 1].max() + size0)
    return float(size0), (float(dims[0]), float(dims[1]))


def background(cfg: DictConfig, sid: str, slide_path: Path | None, mpp: float | None,
               dims: tuple[float, float]) -> tuple[Image.Image, float, str]:
    """(image, level-0 px per image px, source): the slide itself, the tiling thumbnail, or white."""
    max_px = cfg.heatmap.max_px
    if slide_path is not None and slide_path.exists():
        try:
            with open_slide(slide_path, mpp, cfg.tile.default_mpp) as slide:
                w0, h0 = slide.dimensions
                rgb, scale = slide.read_at_mpp(slide.mpp * max(w0, h0) / max_px)
                return Image.fromarray(rgb), scale, "slide"
        except Exception:  # noqa: BLE001 - fall back to the thumbnail
            pass
    thumb = Path(cfg.data.out, "reports", "plots", "thumbnails", f"{sid}.png")
    if thumb.exists():
        img = Image.open(thumb).convert("RGB")
        return img, dims[0] / img.width, "thumbnail"
    scale = max(dims) / max_px
    return Image.new("RGB", (max(1, round(dims[0] / scale)), max(1, round(dims[1] / scale))), "white"), scale, "blank"


def _coords_attrs(path: Path) -> dict[str, Any]:
    return feature_file_attrs(path)[1]


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


def _mask(cfg: DictConfig, sid: str, dims0: tuple[float, float]) -> np.ndarray | None:
    p = find_mask(cfg.data.masks, sid)
    return read_mask(p, dims0) if p is not None else None


def run(cfg: DictConfig) -> int:
    check_method_and_arch(cfg)
    h = cfg.heatmap
    import matplotlib

    if h.cmap not in matplotlib.colormaps:
        raise ConfigError(f"heatmap.cmap='{h.cmap}' is not a matplotlib colormap (e.g. turbo, jet, viridis)")
    folder = model_folder(cfg)
    device = resolve_device(cfg.train.device, "train.device")
    head = load_classifier(folder, device)  # FBTA: translator → EMA MIL, as deployed
    meta = head.meta
    files = feature_files(features_dir(cfg))
    wanted = list(h.slides) or sorted(files)
    unknown = [s for s in wanted if s not in files]
    if unknown:
        raise CohortError(f"heatmap.slides: no features for {', '.join(unknown)} in {features_dir(cfg)}")
    labels = Path(cfg.data.labels)
    entries = {e.slide_id: e for e in discover(cfg.data.slides, labels if labels.exists() else None)}
    dest_dir = out_dir(cfg, "reports", "plots", "heatmaps", model_folder(cfg).name)
    report = StageReport("heatmap")
    local: dict[str, dict[str, Any]] = {}
    classes = meta["classes"]
    for sid in progress(wanted, cfg, "heatmap"):
        t0 = time.perf_counter()
        try:
            feats, coords, fattrs = read_features(files[sid])
            require_coords(files[sid], fattrs, "a heatmap")
            check_bag(files[sid], feats, head.in_dim)
            attrs = _coords_attrs(files[sid])
            with torch.no_grad():
                out = head(torch.from_numpy(feats).to(device))
            scores = out.scores.float().cpu().numpy()
            probs = out.probs.float().cpu().numpy()[0]
            size0, dims = geometry(coords, attrs)
            entry = entries.get(sid)
            img, scale, source = background(cfg, sid, entry.path if entry else None, entry.mpp if entry else None, dims)
            mask = _mask(cfg, sid, dims)
            pred = int(probs.argmax())
            caption = (f"{sid}  label {entry.label if entry and entry.label else '?'}  predicted {classes[pred]} "
                       f"({probs[pred]:.2f})  {meta['arch']}")
            ticks = ("100%", "50%", "0%") if h.normalize == "percentile" else ("max", "", "min")
            pic = draw_heatmap(img, coords, size0, scale, normalise(scores, h.normalize), cmap=h.cmap,
                               alpha=h.alpha, label="score rank" if h.normalize == "percentile" else "score",
                               caption=caption, ticks=ticks, annotation=mask)
            with atomic_path(dest_dir / f"{sid}.png", suffix=".png") as tmp:
                pic.save(tmp, format="PNG")
            info: dict[str, Any] = {"patches": len(scores), "background": source, "predicted": classes[pred]}
            if mask is not None and mask.any():
                loc = localisation(scores, patch_fraction_inside(mask, coords, size0, dims[0]))
                local[sid] = {"label": entry.label if entry else None, **loc.__dict__}
                info["localisation_auc"] = loc.auc
        except InputError as exc:
            report.failed(sid, str(exc), time.perf_counter() - t0)
            continue
        except Exception as exc:  # one slide must not stop the others
            report.failed(sid, f"{files[sid]}: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
            continue
        report.done(sid, time.perf_counter() - t0, **info)
    summary = _summarise(local)
    atomic_write_text(dest_dir / "localisation.json", json.dumps(
        _json_safe({"summary": summary, "slides": local}), indent=2) + "\n")
    save_config(cfg, dest_dir / "config.yaml")
    report.write(out_dir(cfg, "reports", "status") / "heatmap.json")
    tags = {"fbta.method": meta["method"], "fbta.arch": meta["arch"], "fbta.train_run_id": meta.get("mlflow_run_id") or ""}
    with stage_run(cfg, "heatmap", f"heatmap-{variant(cfg)}-{meta['arch']}", tags) as mlrun:
        mlrun.log_metrics({f"localisation_{k}": v for k, v in summary.items() if isinstance(v, float)})
        mlrun.log_artifact(dest_dir / "localisation.json", "heatmaps")
        for s in report.slides:
            if s.status == "done":
                mlrun.log_artifact(dest_dir / f"{s.slide_id}.png", "heatmaps")
    print(report.summary())
    if summary.get("n_slides"):
        print(f"heatmap: on {summary['n_slides']} annotated slides, scores vs annotation: mean AUC "
              f"{summary['auc']:.3f}; relative attention inside {summary['mean_inside']:.2f}× vs outside "
              f"{summary['mean_outside']:.2f}×; top-10% patches inside {summary['top10_inside']:.0%}")
    print(f"heatmap: → {dest_dir}")
    return report.exit_code(cfg.run.strict)


def _summarise(local: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over the annotated slides (NaNs skipped)."""
    keys = ("auc", "mean_inside", "mean_outside", "top10_inside")
    out: dict[str, Any] = {"n_slides": len(local)}
    for k in keys:
        vals = [v[k] for v in local.values() if v[k] is not None and not math.isnan(v[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out
