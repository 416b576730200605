"""Atomic writes: a failed write leaves the old file untouched, and outputs get normal permissions."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fbta.io.atomic import atomic_path, atomic_write_text


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path):
    dest = tmp_path / "out.txt"
    atomic_write_text(dest, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert dest.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_outputs_follow_the_umask_not_mkstemps_0600(tmp_path: Path):
    mask = os.umask(0)
    os.umask(mask)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
