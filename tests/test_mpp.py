"""MPP resolution follows the contract's order and never guesses silently."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from fbta.slides.mpp import MppError, mpp_from_tiff_tags, resolve_mpp
from fbta.slides.reader import SlideError, open_slide

P = Path("slide.svs")


def test_vendor_property_wins_over_everything():
    assert resolve_mpp(P, {"openslide.mpp-x": "0.2527"}, None, 0.9, 1.0) == (0.2527, "vendor")


def test_tiff_tags_in_centimetres_and_inches():
    assert mpp_from_tiff_tags({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}) == pytest.approx(0.5)
    assert mpp_from_tiff_tags({"XResolution": (50800, 1), "ResolutionUnit": 2}) == pytest.approx(0.5)


def test_tiff_tags_without_unit_or_at_screen_dpi_are_not_an_mpp():
    assert mpp_from_tiff_tags({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "none"}) is None
    assert mpp_from_tiff_tags({"XResolution": (72, 1), "ResolutionUnit": 2}) is None  # 352 µm/px


def test_csv_then_default_then_error():
    assert resolve_mpp(P, {}, {}, 0.5, 0.25) == (0.5, "labels.csv")
    assert resolve_mpp(P, {}, {}, None, 0.25) == (0.25, "tile.default_mpp")
    with pytest.raises(MppError, match=r"slide\.svs: no MPP .* labels\.csv or tile\.default_mpp"):
        resolve_mpp(P, {}, {}, None, None)


def test_implausible_csv_mpp_is_an_error_not_a_guess():
    with pytest.raises(MppError, match="outside the plausible range"):
        resolve_mpp(P, {}, {}, 500.0, None)


def test_plain_tiff_gets_mpp_from_its_resolution_tags(tmp_path: Path):
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, np.full((300, 400, 3), 200, np.uint8), resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        assert (s.mpp, s.mpp_source, s.vendor) == (pytest.approx(0.5), "tiff-tags", "image")
        assert s.dimensions == (400, 300)


def test_png_without_mpp_fails_naming_the_file_and_succeeds_with_csv_mpp(png_slide: Path):
    with pytest.raises(SlideError, match=r"plain\.png: no MPP"):
        open_slide(png_slide)
    with open_slide(png_slide, csv_mpp=0.5) as s:
        assert (s.mpp, s.mpp_source) == (0.5, "labels.csv")
