"""Report files several stages share: ``reports/metrics.json`` is merged into, never overwritten.

Why a lock: ``dvc exp run --jobs`` or two shells may evaluate at once; the
read-modify-write of metrics.json is serialised with ``flock`` on a sidecar
file, and the write itself is atomic, so a reader never sees half a file and
no writer drops another's keys.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from fbta.io.atomic import atomic_write_text


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` merged into ``base`` (nested dicts merged key by key, other values replaced)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def merge_json(path: str | Path, update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into the JSON object at ``path`` (created if missing); return the result.

    A file that exists but is not a JSON object is an error, not something to
    overwrite: it holds other stages' results.
    """
    path = Path(path)
    with _locked(path):
        current: dict[str, Any] = {}
        if path.exists():
            try:
                current = json.loads(path.read_text() or "{}")
            except ValueError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc}); fix or remove it — it is not overwritten") from None
            if not isinstance(current, dict):
                raise ValueError(f"{path}: expected a JSON object, found {type(current).__name__}")
        merged = deep_merge(current, update)
        atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return merged


def write_csv(dest: str | Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> None:
    """Rows → CSV with a header, atomically (DVC plots read these)."""
    fields = list(fields or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(dest, buf.getvalue())


def publish_metrics(reports_dir: str | Path, fragment: str, update: Mapping[str, Any]) -> Path:
    """Write ``reports/metrics/<fragment>.json`` and merge the same keys into ``reports/metrics.json``.

    Why both: DVC lets only one stage own a file, so each stage declares its own
    fragment as its DVC metrics and the ``report`` stage rebuilds metrics.json
    from all fragments; a user running one command by hand still sees
    metrics.json updated at once.
    """
    reports_dir = Path(reports_dir)
    dest = reports_dir / "metrics" / f"{fragment}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, json.dumps(dict(update), indent=2, sort_keys=True) + "\n")
    merge_json(reports_dir / "metrics.json", update)
    return dest
