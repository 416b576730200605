"""``fbta <command> [key=value ...] [--params params.yaml]``: one command per stage.

Overrides are OmegaConf dot-lists validated against the schema; any config
error is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

from fbta.config import ConfigError, InputError, load_config
from fbta.slides.cohort import CohortError

# command → (module under fbta.stages, one-line help). DAG order.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "write the synthetic demo cohort (slides, labels.csv, masks)"),
    "tile": ("tile", "detect tissue and write patch coordinates per slide"),
    "extract": ("extract", "frozen patch features per slide (CLAM/TRIDENT HDF5)"),
    "cluster": ("cluster", "per-slide KMeans on frozen features (FBTA pseudo-bag strata)"),
    "train": ("train", "train a MIL head: on frozen features (train.method=vanilla) or end to end (train.method=fbta)"),
    "infer": ("infer", "FBTA model on held-out slides: translator path vs TFE* re-extraction → metrics.json"),
    "evaluate": ("evaluate", "test-split AUC/accuracy/F1 of the trained model → reports/metrics.json"),
    "heatmap": ("heatmap", "per-slide instance-score heatmaps of the trained model over the thumbnails"),
    "seg-teacher": ("seg_teacher", "IKD-MIL stage 1: patch caches + segmentation teacher from patch labels"),
    "seg-distill": ("seg_distill", "IKD-MIL stage 2: fusion-knowledge distillation with role reversal → student"),
    "register": ("register", "log models to the MLflow registry; move @champion only to a better one"),
    "tune": ("tune", "Optuna study over C, M, K and learning rates (sqlite:///optuna.db, resumable)"),
    "predict": ("predict", "batch inference on new slides with the champion: tile → extract → predictions"),
    "qupath": ("qupath", "per slide, GeoJSON for QuPath: tissue, patches with scores, predicted tumour"),
    "export": ("export", "features + coords in TRIDENT's folder tree, for TRIDENT-reading tools (links, no copies)"),
    "report": ("report", "rebuild reports/metrics.json from every stage's fragment; print the results table"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fbta",
        description="Whole-slide images to registered MIL models. Each command is one pipeline stage.",
        epilog="Example: fbta tile data.slides=/cohorts/x/slides data.out=/runs/x tile.target_mpp=1.0",
    )
    sub = p.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (_, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (OmegaConf dot-list)")
        sp.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def params_source(params: str, overrides: Sequence[str]) -> str:
    """Which parameters are in force — said at the start of every command, never silently the schema's."""
    path = Path(params)
    more = f" + {len(overrides)} override(s)" if overrides else ""
    if path.exists():
        return f"params {path.resolve()}{more}"
    return (f"params: built-in defaults{more} — no {params} in {Path.cwd()}, so the schema's GPU-sized values "
            "are in force (e.g. train.epochs=200); pass --params FILE to use a params file")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.params, args.overrides)
        print(f"fbta {args.command}: {params_source(args.params, args.overrides)}", flush=True)
        module = importlib.import_module(f"fbta.stages.{COMMANDS[args.command][0]}")
        return int(module.run(cfg) or 0)
    except (ConfigError, CohortError, InputError) as exc:
        print(f"fbta {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fbta {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
