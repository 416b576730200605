"""``fbta report``: rebuild ``reports/metrics.json`` from every stage's fragment and print the results.

Why a rebuild: DVC lets one stage own one file, so each metrics-producing stage
declares only ``reports/metrics/<fragment>.json`` (``fbta.io.reports.publish_metrics``)
and this last stage owns ``metrics.json``. Rebuilding from the fragments —
instead of merging into whatever is there — means a variant whose stage was
removed, or a stale key from an old run, does not linger in the metrics DVC
compares across experiments.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fbta.config import InputError
from fbta.io.atomic import atomic_write_text
from fbta.io.reports import deep_merge
from fbta.summary import results_table, summarise


def rebuild(reports_dir: Path) -> dict[str, Any]:
    """Deep-merge ``reports/metrics/*.json`` (sorted by name) into ``reports/metrics.json``, atomically."""
    merged: dict[str, Any] = {}
    for frag in sorted((reports_dir / "metrics").glob("*.json")):
        try:
            data = json.loads(frag.read_text())
        except ValueError as exc:
            raise InputError(f"{frag}: not valid JSON ({exc}); re-run the stage that writes it") from None
        if not isinstance(data, dict):
            raise InputError(f"{frag}: expected a JSON object, found {type(data).__name__}")
        merged = deep_merge(merged, data)
    reports_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(reports_dir / "metrics.json", json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return merged


def run(cfg: DictConfig) -> int:
    reports = Path(cfg.data.out, "reports")
    frags = sorted((reports / "metrics").glob("*.json"))
    metrics = rebuild(reports)
    print(f"report: {reports / 'metrics.json'} rebuilt from {len(frags)} fragment(s)"
          + (f" ({', '.join(f.stem for f in frags)})" if frags else ""))
    status = summarise(Path(cfg.data.out), with_metrics=False)
    if not status.startswith("no reports"):
        print(status)
    print(results_table(metrics))
    return 0
