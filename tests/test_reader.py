"""Slides open through one interface; bad files give one clear line naming them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fbta.slides.reader import SlideError, open_slide, read_size_for


def test_real_aperio_slide_opens_with_vendor_mpp(real_slide: Path):
    with open_slide(real_slide) as s:
        assert s.vendor == "aperio" and s.mpp_source == "vendor"
        assert s.mpp == pytest.approx(0.499, abs=1e-3)
        assert s.dimensions == (2220, 2967)
        patch = s.read_region(100, 200, 0, 64, 32)
        assert patch.shape == (32, 64, 3) and patch.dtype == np.uint8


def test_corrupt_slide_is_one_line_naming_the_file(broken_slide: Path):
    with pytest.raises(SlideError) as exc:
        open_slide(broken_slide)
    msg = str(exc.value)
    assert "broken.svs" in msg and "corrupt" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "name, content, problem",
    [("empty.svs", b"", "empty file"), ("notes.txt", b"hello", "unsupported extension"),
     ("garbage.png", b"\x89PNG not really", "cannot decode")],
)
def test_bad_files(tmp_path: Path, name: str, content: bytes, problem: str):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(SlideError, match=problem):
        open_slide(p, csv_mpp=0.5)


def test_missing_file(tmp_path: Path):
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "nope.svs")


def test_image_slide_reads_outside_the_image_as_white(png_slide: Path):
    with open_slide(png_slide, csv_mpp=0.5) as s:
        patch = s.read_region(2018, 1526, 0, 50, 20)
        assert patch.shape == (20, 50, 3) and (patch[10:, 30:] == 255).all()


def test_read_size_matches_or_resizes():
    assert read_size_for(256, want=1.0, level_ds=1.0, tolerance=0.02) == 256
    assert read_size_for(256, want=2.0, level_ds=1.0, tolerance=0.02) == 512
    assert read_size_for(256, want=8.0, level_ds=4.0, tolerance=0.02) == 512
    assert read_size_for(256, want=1.01, level_ds=1.0, tolerance=0.02) == 256
