"""The cohort: which slides exist, their labels, splits and per-slide overrides.

``labels.csv`` has ``slide_id,label`` and optional ``split``, ``fold``, ``mpp``,
``path``. Slide-level stages (tile, extract) work on every slide file in the
folder, using CSV columns where a row exists; training needs the labels.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fbta.slides.reader import SLIDE_EXTENSIONS

REQUIRED = ("slide_id", "label")
OPTIONAL = ("split", "fold", "mpp", "path")
SPLITS = ("train", "val", "test")


class CohortError(ValueError):
    """A labels.csv that cannot be trusted; the message names the file, row and column."""


@dataclass(frozen=True)
class SlideEntry:
    slide_id: str
    path: Path
    label: Optional[str] = None
    split: Optional[str] = None
    fold: Optional[int] = None
    mpp: Optional[float] = None


def read_labels(csv_path: str | Path, slides_dir: str | Path) -> dict[str, SlideEntry]:
    """Parse and validate labels.csv; slide paths resolved inside ``slides_dir``."""
    csv_path, slides_dir = Path(csv_path), Path(slides_dir)
    text = _utf8_text(csv_path)
    rows = list(csv.DictReader(text.splitlines()))
    header = rows[0].keys() if rows else next(csv.reader(text.splitlines()), [])
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise CohortError(f"{csv_path}: missing column(s) {', '.join(missing)} (need slide_id,label)")
    entries: dict[str, SlideEntry] = {}
    first_line: dict[str, int] = {}
    for i, row in enumerate(rows, start=2):
        sid = (row.get("slide_id") or "").strip()
        where = f"{csv_path}:{i}"
        if not sid:
            raise CohortError(f"{where}: empty slide_id")
        if sid in entries:
            raise CohortError(f"{where}: duplicate slide_id '{sid}' (first on line {first_line[sid]}); "
                              "one row per slide")
        first_line[sid] = i
        label = (row.get("label") or "").strip() or None
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise CohortError(f"{where}: split '{split}' is not one of {', '.join(SPLITS)}")
        entries[sid] = SlideEntry(
            slide_id=sid,
            path=_slide_path(row.get("path"), sid, slides_dir, where),
            label=label,
            split=split,
            fold=_number(row.get("fold"), int, "fold", where),
            mpp=_number(row.get("mpp"), float, "mpp", where),
        )
    return entries


def _utf8_text(csv_path: Path) -> str:
    """The CSV's text; anything but UTF-8 is refused with the line and byte, since a guess could mangle ids."""
    raw = csv_path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (b"\x00" in raw[:4096]):
        raise CohortError(f"{csv_path}: UTF-16 text, not UTF-8; save it as UTF-8 CSV")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CohortError(f"{csv_path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start}, perhaps Latin-1/Windows-1252); save it as UTF-8 CSV") from None


def _number(raw: Optional[str], kind: type, name: str, where: str):  # -> int | float | None
    raw = (raw or "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise CohortError(f"{where}: column '{name}' has '{raw}', not a number") from None
    if isinstance(value, float) and (not math.isfinite(value) or value <= 0):
        raise CohortError(f"{where}: column '{name}' must be a positive number, got '{raw}'")
    return value


def _slide_path(raw: Optional[str], sid: str, slides_dir: Path, where: str) -> Path:
    """Explicit ``path`` (relative, must stay inside the slide folder) or ``<slide_id>.*``."""
    raw = (raw or "").strip()
    if raw:
        p = Path(raw)
        resolved = (slides_dir / p).resolve()
        if p.is_absolute() or not resolved.is_relative_to(slides_dir.resolve()):
            raise CohortError(f"{where}: path '{raw}' leaves the slide folder {slides_dir}; give a path inside it")
        return slides_dir / p
    matches = sorted(q for q in slides_dir.glob(f"{sid}.*") if q.suffix.lower() in SLIDE_EXTENSIONS)
    return matches[0] if matches else slides_dir / sid


def discover(slides_dir: str | Path, labels_csv: str | Path | None) -> list[SlideEntry]:
    """Every slide to process: files in the folder ∪ rows of labels.csv (sorted by id)."""
    slides_dir = Path(slides_dir)
    entries: dict[str, SlideEntry] = {}
    if labels_csv is not None and Path(labels_csv).exists():
        entries.update(read_labels(labels_csv, slides_dir))
    by_path = {e.path.resolve() for e in entries.values()}
    if slides_dir.is_dir():
        for f in sorted(slides_dir.iterdir()):
            if f.is_file() and f.suffix.lower() in SLIDE_EXTENSIONS and not f.name.startswith("."):
                if f.resolve() not in by_path and f.stem not in entries:
                    entries[f.stem] = SlideEntry(slide_id=f.stem, path=f)
    return [entries[k] for k in sorted(entries)]
