"""Per-slide outcome of a stage: done / skipped / failed, with reasons.

A cohort run must not die on one bad slide; it reports every slide and exits
non-zero only when asked to be strict (``run.strict=true``).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fbta.io.atomic import atomic_write_text


@dataclass
class SlideStatus:
    slide_id: str
    status: str  # done | skipped | failed
    reason: str = ""
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageReport:
    stage: str
    slides: list[SlideStatus] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def done(self, slide_id: str, seconds: float = 0.0, **info: Any) -> None:
        self.slides.append(SlideStatus(slide_id, "done", "", round(seconds, 3), info))

    def skipped(self, slide_id: str, reason: str, **info: Any) -> None:
        self.slides.append(SlideStatus(slide_id, "skipped", reason, 0.0, info))

    def failed(self, slide_id: str, reason: str, seconds: float = 0.0) -> None:
        self.slides.append(SlideStatus(slide_id, "failed", reason, round(seconds, 3)))
        tqdm.write(f"[{self.stage}] FAILED {slide_id}: {reason}", file=sys.stderr)

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.slides)

    def summary(self) -> str:
        lines = [
            f"{self.stage}: {len(self.slides)} slides — {self.count('done')} done, "
            f"{self.count('skipped')} skipped, {self.count('failed')} failed "
            f"({time.time() - self.started:.1f} s)"
        ]
        for s in self.slides:
            if s.status != "done":
                lines.append(f"  {s.status:<8} {s.slide_id}: {s.reason}")
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        payload = {
            "stage": self.stage,
            "counts": {k: self.count(k) for k in ("done", "skipped", "failed")},
            "slides": [asdict(s) for s in self.slides],
        }
        atomic_write_text(path, json.dumps(payload, indent=2))

    def exit_code(self, strict: bool) -> int:
        return 1 if strict and self.count("failed") else 0
