"""``fbta synth``: write the embedded demo cohort to ``data.slides`` / ``data.labels`` / ``data.masks``."""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from fbta.config import save_config
from fbta.synth.cohort import make_cohort


def run(cfg: DictConfig) -> int:
    slides = Path(cfg.data.slides)
    masks = Path(cfg.data.masks) if cfg.data.masks else None
    t0 = time.perf_counter()
    rows = make_cohort(cfg.synth, slides, Path(cfg.data.labels), masks, progress=cfg.run.progress)
    save_config(cfg, slides / "config.yaml")
    counts = {lab: sum(r["label"] == lab for r in rows) for lab in sorted({r["label"] for r in rows})}
    splits = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    print(
        f"synth: {len(rows)} slides ({', '.join(f'{v} {k}' for k, v in counts.items())}; "
        f"train/val/test {splits['train']}/{splits['val']}/{splits['test']}) → {slides} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0
