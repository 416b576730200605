"""Print what the pipeline produced under ``data.out``: per-stage status and metrics.

``make demo`` ends with this so the user sees results, not just logs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fbta.config import ConfigError, load_config


PATCH_STAGES = {"tile", "extract"}  # the stages that make patches; others' counts are not news


def summarise(out: Path, with_metrics: bool = True) -> str:
    lines: list[str] = []
    status_dir = out / "reports" / "status"
    order = ["tile", "extract", "cluster", "train", "heatmap"]
    rank = lambda p: order.index(p.stem) if p.stem in order else len(order)  # noqa: E731 - DAG order first
    for path in sorted(status_dir.glob("*.json"), key=lambda p: (rank(p), p.stem)):
        rep = json.loads(path.read_text())
        c = rep["counts"]
        lines.append(f"{rep['stage']:<10} done {c['done']:>4}  skipped {c['skipped']:>4}  failed {c['failed']:>4}")
        patches = [s["info"].get("patches") for s in rep["slides"] if s["info"].get("patches") is not None]
        if patches and rep["stage"] in PATCH_STAGES:
            lines.append(f"{'':<10} patches per slide: min {min(patches)}, median {sorted(patches)[len(patches) // 2]}, "
                         f"max {max(patches)}, total {sum(patches)}")
    metrics = out / "reports" / "metrics.json"
    if with_metrics and metrics.exists():
        results = json.loads(metrics.read_text())
        lines.append(results_table(results))
        note = small_test_note(results)
        if note:
            lines.append(note)
    return "\n".join(lines) if lines else f"no reports under {out}/reports yet"


def results_table(metrics: dict[str, Any]) -> str:
    """Classification and segmentation variants as rows, metrics as columns (what a reader compares)."""
    lines: list[str] = []
    for section, cols in (("classification", ("auc", "acc", "f1")), ("segmentation", ("f1", "iou"))):
        rows = metrics.get(section) or {}
        if not rows:
            continue
        width = max(len(section), *(len(k) for k in rows))
        lines.append(f"{section:<{width}}  " + "  ".join(f"{c:>6}" for c in cols) + "  detail")
        for variant in sorted(rows):
            entry = rows[variant] if isinstance(rows[variant], dict) else {}
            vals = "  ".join(f"{entry[c]:>6.3f}" if isinstance(entry.get(c), (int, float)) else f"{'-':>6}" for c in cols)
            extra = ", ".join(f"{k}={entry[k]}" for k in sorted(entry) if k not in cols and not isinstance(entry[k], dict))
            lines.append(f"{variant:<{width}}  {vals}  {extra}")
        lines.append("")
    return "\n".join(lines).rstrip() or "no classification or segmentation metrics yet"


SMALL_TEST = 40  # below this, one misranked slide moves a balanced split's AUC by > 0.05 (2/n)


def small_test_note(results: dict) -> str:
    """A warning when the classification test split is too small to rank methods on."""
    ns = [int(v["n"]) for v in results.get("classification", {}).values() if isinstance(v, dict) and v.get("n")]
    if not ns or min(ns) >= SMALL_TEST:
        return ""
    return (f"note: {min(ns)} test slides cannot rank methods (one slide moves AUC by up to "
            f"{2 / min(ns):.2f} with balanced classes); compare vanilla and FBTA with "
            "benchmarks/fbta_protocol.py (k-fold or few-shot, paired deltas) — figures in BENCHMARKS.md")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config("params.yaml", argv if argv is not None else sys.argv[1:])
    except ConfigError as exc:
        print(f"fbta.results: error: {exc}", file=sys.stderr)
        return 2
    print(summarise(Path(cfg.data.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
