"""``fbta extract``: frozen features for every tiled slide → features/<model>/h5_files/<slide_id>.h5."""
from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from fbta.config import save_config
from fbta.device import fit_workers, resolve_device
from fbta.features.extract import CohortPatches, SlidePatches, extract_cohort, features_fingerprint
from fbta.features.registry import create_extractor
from fbta.io.h5 import coords_complete, features_complete, read_coords, write_features
from fbta.io.lock import claimed_ahead, raise_if_storage
from fbta.slides.cohort import discover
from fbta.stages.common import only_slides, out_dir, stop_on_storage_error, tile_failure
from fbta.slide_status import StageReport


def input_size_note(size: int, native: int) -> str:
    """Say so when patches are shrunk below the extractor's own input: a CPU economy that costs accuracy."""
    if size >= native:
        return ""
    return (f"note: patches are resized to {size} px, below the {native} px the weights were trained at "
            "(extract.input_size): a CPU economy that blurs nuclear-scale detail and costs accuracy (measured: "
            "docs/methods/fbta-controls.md); extract.input_size=0 uses the model's own size")


def run(cfg: DictConfig) -> int:
    device = resolve_device(cfg.extract.device, "extract.device")
    workers = fit_workers(cfg.extract.num_workers, "extract.num_workers")
    extractor = create_extractor(cfg.extract.model, weights=cfg.extract.weights, trainable=False, device=device,
                                 input_size=cfg.extract.input_size)
    coords_dir = out_dir(cfg, "coords")
    feats_dir = out_dir(cfg, "features", cfg.extract.model, "h5_files")
    report = StageReport("extract")
    todo = []
    entries = discover(cfg.data.slides, cfg.data.labels)
    subset = only_slides(cfg, (e.slide_id for e in entries), f"{cfg.data.slides} / {cfg.data.labels}")
    for entry in (e for e in entries if subset is None or e.slide_id in subset):
        cpath = coords_dir / f"{entry.slide_id}.h5"
        if not coords_complete(cpath):
            why = tile_failure(cfg, entry.slide_id)
            report.failed(entry.slide_id, f"not tiled ({why})" if why else f"{cpath}: no coords; run `fbta tile` first")
            continue
        coords, attrs = read_coords(cpath)
        fp = features_fingerprint(extractor, attrs)
        dest = feats_dir / f"{entry.slide_id}.h5"
        if features_complete(dest, {"fbta_params": fp}):
            report.skipped(entry.slide_id, "up to date", patches=len(coords))
            continue
        todo.append((entry, coords, attrs, fp, dest))
    print(f"extract: {cfg.extract.model} ({extractor.dim}-d, weights {extractor.weights_id}) on {device}; "
          f"{len(todo)} slides to do, {report.count('skipped')} up to date")
    note = input_size_note(extractor.input_size, getattr(extractor, "native_input_size", extractor.input_size))
    if note:
        print(f"extract: {note}", flush=True)
    total = sum(len(c) for _, c, _, _, _ in todo)
    data = CohortPatches([SlidePatches(e.path, c, a, e.mpp) for e, c, a, _, _ in todo])
    held: dict[int, tuple[Callable[[], None], float]] = {}  # slide → (release its lock, when it was claimed)
    with tqdm(total=total, unit="patch", desc="extract", disable=not cfg.run.progress, dynamic_ncols=True) as bar:
        def skip(j: int, why: str) -> None:
            report.skipped(todo[j][0].slide_id, why, patches=len(todo[j][1]))
            bar.update(len(todo[j][1]))

        def order(slides: list[int], busy: Optional[list[int]]) -> Iterator[int]:
            """Each slide's lock is taken as the loader reaches it; ``busy``: where slides another run
            holds go (None: wait for them)."""
            for j, release in claimed_ahead(slides, dest_of=lambda j: todo[j][4],
                                            is_done=lambda j: features_complete(todo[j][4], {"fbta_params": todo[j][3]}),
                                            on_skip=skip, log=tqdm.write, busy=busy):
                held[j] = (release, time.perf_counter())
                bar.set_postfix_str(todo[j][0].slide_id)
                yield j

        def on_slide(j: int, feats: Optional[np.ndarray], error: str) -> None:
            entry, coords, attrs, fp, dest = todo[j]
            release, t0 = held.pop(j)
            try:
                if feats is None:
                    report.failed(entry.slide_id, error, time.perf_counter() - t0)
                elif not np.isfinite(feats).all():
                    report.failed(entry.slide_id, f"{entry.path}: ValueError: the model produced NaN/inf features",
                                  time.perf_counter() - t0)
                else:
                    write(entry, coords, attrs, fp, dest, feats, t0)
            finally:
                release()

        def write(entry, coords, attrs, fp, dest, feats, t0) -> None:  # noqa: ANN001
            try:
                write_features(dest, feats, coords, {
                    **extractor.describe(), "fbta_params": fp, "slide_id": entry.slide_id,
                    "target_mpp": attrs["target_mpp"], "patch_size": attrs["patch_size"],
                    "mean": extractor.mean, "std": extractor.std,
                }, coords_attrs=attrs)
            except OSError as exc:
                raise_if_storage(exc, dest, "extract")
                report.failed(entry.slide_id, f"{dest}: {type(exc).__name__}: {exc}", time.perf_counter() - t0)
                return
            dt = time.perf_counter() - t0
            report.done(entry.slide_id, dt, patches=len(coords), patches_per_s=round(len(coords) / max(dt, 1e-9), 1))

        with stop_on_storage_error(report, cfg, feats_dir):
            busy: list[int] = []
            try:  # first every slide nobody else holds, then (holding no lock) the ones another run had
                for slides, wait_list in ((list(range(len(todo))), busy), (busy, None)):
                    if not slides:
                        continue
                    extract_cohort(data, order(slides, wait_list), extractor, device, cfg.extract.batch_size,
                                   workers, on_slide, cfg.extract.amp, on_batch=bar.update)
            finally:
                for release, _ in held.values():  # a stage stopped by a full disk lets go of what it claimed
                    release()
    save_config(cfg, feats_dir.parent / "config.yaml")
    report.write(out_dir(cfg, "reports", "status") / "extract.json")
    print(report.summary())
    return report.exit_code(cfg.run.strict)

