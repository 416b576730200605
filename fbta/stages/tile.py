"""``fbta tile``: tissue detection + patch coordinates for every slide of the cohort."""
from __future__ import annotations

import time

from omegaconf import DictConfig
from tqdm.auto import tqdm

from fbta.config import save_config
from fbta.io.h5 import coords_complete, write_coords
from fbta.io.lock import StorageError, claimed, raise_if_storage
from fbta.slides.cohort import discover
from fbta.slides.reader import SlideError, open_slide
from fbta.stages.common import only_slides, out_dir, progress, stop_on_storage_error
from fbta.slide_status import StageReport
from fbta.tiling.thumbnail import save_thumbnail
from fbta.tiling.tiler import params_hash, tile_slide


def run(cfg: DictConfig) -> int:
    coords_dir = out_dir(cfg, "coords")
    thumbs_dir = out_dir(cfg, "reports", "plots", "thumbnails")
    entries = discover(cfg.data.slides, cfg.data.labels)
    subset = only_slides(cfg, (e.slide_id for e in entries), f"{cfg.data.slides} / {cfg.data.labels}")
    entries = [e for e in entries if subset is None or e.slide_id in subset]
    report = StageReport("tile")
    todo = []
    for entry in entries:
        dest = coords_dir / f"{entry.slide_id}.h5"
        fingerprint = params_hash(cfg.tissue, cfg.tile, (entry.mpp, cfg.tile.default_mpp))
        if coords_complete(dest, {"fbta_params": fingerprint}):
            report.skipped(entry.slide_id, "up to date")
        else:
            todo.append((entry, dest, fingerprint))
    work = claimed(todo, dest_of=lambda t: t[1], is_done=lambda t: coords_complete(t[1], {"fbta_params": t[2]}),
                   on_skip=lambda t, why: report.skipped(t[0].slide_id, why), log=tqdm.write)
    with stop_on_storage_error(report, cfg, coords_dir):
        for entry, dest, fingerprint in progress(work, cfg, "tile", total=len(todo)):
            t0 = time.perf_counter()
            try:
                with open_slide(entry.path, entry.mpp, cfg.tile.default_mpp) as slide:
                    tiling = tile_slide(slide, cfg.tissue, cfg.tile)
                    if len(tiling.coords) == 0:
                        raise SlideError(
                            f"{entry.path}: no tissue patches (tissue mask covers {tiling.mask.mean():.1%}; "
                            "check tissue.* and tile.min_tissue)"
                        )
                    try:
                        save_thumbnail(slide, tiling, thumbs_dir / f"{entry.slide_id}.png", cfg.tile.thumbnail_px)
                        write_coords(dest, tiling.coords, {**tiling.attrs, "fbta_params": fingerprint})
                    except OSError as exc:  # a full or read-only disk stops the stage
                        raise_if_storage(exc, dest, "tile")
                        raise
            except StorageError:
                raise
            except SlideError as exc:
                report.failed(entry.slide_id, str(exc), time.perf_counter() - t0)
                continue
            except Exception as exc:  # one odd slide must not stop a cohort
                report.failed(entry.slide_id, f"{entry.path}: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
                continue
            report.done(
                entry.slide_id, time.perf_counter() - t0,
                patches=int(len(tiling.coords)), mpp=tiling.attrs["mpp"], mpp_source=tiling.attrs["mpp_source"],
                level=tiling.attrs["patch_level"],
            )
    save_config(cfg, coords_dir / "config.yaml")
    report.write(out_dir(cfg, "reports", "status") / "tile.json")
    for s in report.slides:
        if s.status == "done":
            print(f"  done     {s.slide_id}: {s.info['patches']} patches (mpp {s.info['mpp']:.3f} from "
                  f"{s.info['mpp_source']}, level {s.info['level']}, {s.seconds:.2f} s)")
    print(report.summary())
    return report.exit_code(cfg.run.strict)
