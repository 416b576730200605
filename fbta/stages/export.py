"""``fbta export``: this run's features and coords in TRIDENT's folder tree (for TRIDENT-reading tools).

``<data.out>/<export.dest>/<mag>x_<ps>px_<overlap>px_overlap/features_<extractor>/<id>.h5`` and
``.../patches/<id>_patches.h5``, hard-linked by default (no extra space; a copy
across file systems). The files are ours, unchanged: they already carry
TRIDENT's attributes. Slides without features are listed, the batch goes on.
"""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from fbta.config import InputError
from fbta.io.h5 import coords_complete, feature_files, features_complete, read_coords
from fbta.io.trident import export_slide
from fbta.stages.common import features_dir, only_slides, out_dir, progress
from fbta.slide_status import StageReport


def run(cfg: DictConfig) -> int:
    report = StageReport("export")
    folder = features_dir(cfg)
    files = feature_files(folder)
    if not files:
        raise InputError(f"{folder}: no feature files to export (run `fbta extract`, or set data.features)")
    subset = only_slides(cfg, files, str(folder))
    ids = [sid for sid in files if subset is None or sid in subset]
    extractor = cfg.extract.model if not cfg.data.features else folder.name.removeprefix("features_")
    dest = out_dir(cfg, cfg.export.dest)
    print(f"export: {len(ids)} slide(s) of {folder} → {dest} (TRIDENT layout, {cfg.export.link})", flush=True)
    roots: set[str] = set()
    for sid in progress(ids, cfg, "export"):
        t0 = time.perf_counter()
        feats = files[sid]
        if feats.suffix != ".h5" or not features_complete(feats):
            report.failed(sid, f"{feats}: not a complete fbta feature file (TRIDENT needs features + coords in .h5)")
            continue
        coords = Path(cfg.data.out, "coords", f"{sid}.h5")
        if not coords_complete(coords):
            coords = feats  # a feature file carries the coords dataset with its attributes
        try:
            _, attrs = read_coords(coords)
            fpath, ppath = export_slide(sid, feats, coords, attrs, extractor, dest, cfg.export.link)
        except (OSError, KeyError) as exc:
            report.failed(sid, f"{feats}: {exc}", time.perf_counter() - t0)
            continue
        roots.add(str(fpath.parent.parent))
        report.done(sid, time.perf_counter() - t0, features=str(fpath), patches=str(ppath))
    report.write(out_dir(cfg, "reports", "status") / "export.json")
    print(report.summary())
    for root in sorted(roots):
        print(f"export: TRIDENT tree {root} (e.g. torchmil TridentWSIDataset(base_path='{root}/', "
              f"feature_extractor='{extractor}', ...))")
    return report.exit_code(cfg.run.strict)
