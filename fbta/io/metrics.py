"""Report files several stages share: ``reports/metrics.json`` has one writer, :func:`rebuild_metrics`.

Each metrics-producing stage writes only its fragment ``reports/metrics/<stage>.json``
(the file it declares to DVC); metrics.json is always the merge of the fragments,
rebuilt by ``fbta report`` (its DVC owner) and, so that a stage run by hand shows up
at once, by :func:`publish_metrics` through the same function. The rebuild is
serialised by a lock (``dvc exp run --jobs`` or two shells may publish at once) and
written atomically, so a reader never sees half a file and a key no fragment
carries any more (a removed stage, an old run) does not linger.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from fbta.config import InputError
from fbta.io.atomic import atomic_write_text
from fbta.io.lock import file_lock


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` merged into ``base`` (nested dicts merged key by key, other values replaced)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def write_csv(dest: str | Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> None:
    """Rows → CSV with a header, atomically (DVC plots read these)."""
    fields = list(fields or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(dest, buf.getvalue())


def rebuild_metrics(reports_dir: str | Path) -> dict[str, Any]:
    """Deep-merge ``reports/metrics/*.json`` (sorted by name) into ``reports/metrics.json``, atomically, locked."""
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(reports_dir / ".metrics.json.lock"):
        merged: dict[str, Any] = {}
        for frag in sorted((reports_dir / "metrics").glob("*.json")):
            try:
                data = json.loads(frag.read_text())
            except ValueError as exc:
                raise InputError(f"{frag}: not valid JSON ({exc}); re-run the stage that writes it") from None
            if not isinstance(data, dict):
                raise InputError(f"{frag}: expected a JSON object, found {type(data).__name__}")
            merged = deep_merge(merged, data)
        atomic_write_text(reports_dir / "metrics.json", json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return merged


def publish_metrics(reports_dir: str | Path, fragment: str, update: Mapping[str, Any]) -> Path:
    """Write ``reports/metrics/<fragment>.json`` (the stage's DVC metrics), then rebuild ``reports/metrics.json``."""
    reports_dir = Path(reports_dir)
    dest = reports_dir / "metrics" / f"{fragment}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, json.dumps(dict(update), indent=2, sort_keys=True) + "\n")
    rebuild_metrics(reports_dir)
    return dest
