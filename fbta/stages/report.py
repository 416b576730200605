"""``fbta report``: rebuild ``reports/metrics.json`` from every stage's fragment and print the results.

Why a rebuild: DVC lets one stage own one file, so each metrics-producing stage
declares only ``reports/metrics/<fragment>.json`` (``fbta.io.metrics.publish_metrics``)
and this last stage owns ``metrics.json`` (written only by ``fbta.io.metrics.rebuild_metrics``). Rebuilding from the fragments —
instead of merging into whatever is there — means a variant whose stage was
removed, or a stale key from an old run, does not linger in the metrics DVC
compares across experiments.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fbta.io.metrics import rebuild_metrics
from fbta.results import results_table, summarise


def run(cfg: DictConfig) -> int:
    reports = Path(cfg.data.out, "reports")
    frags = sorted((reports / "metrics").glob("*.json"))
    metrics = rebuild_metrics(reports)
    print(f"report: {reports / 'metrics.json'} rebuilt from {len(frags)} fragment(s)"
          + (f" ({', '.join(f.stem for f in frags)})" if frags else ""))
    status = summarise(Path(cfg.data.out), with_metrics=False)
    if not status.startswith("no reports"):
        print(status)
    print(results_table(metrics))
    return 0
