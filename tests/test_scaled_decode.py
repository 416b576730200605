"""Patches 2×/4× below a JPEG level (a 40× slide read at 20× and 10×) come from DCT-scaled tile decodes that
agree with an area-average downsample — or, wherever that does not apply, from today's read + resize."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fbta.config import SCALED_DECODE_ENV, load_config
from fbta.slides import tiled
from fbta.slides.reader import open_slide
from fbta.slides.tiled import area_average, psnr
from fbta.synth.cohort import write_aperio_tiff
from fbta.synth.texture import SOURCE
from fbta.tiling.tiler import tile_slide

# what docs/slide-reading.md states (measured: reports/bench/reader.json, "scaled_agreement")
RGB_MAX_DIFF, RGB_MIN_PSNR = 24, 48.0  # 4:4:4: the reduced IDCT is the area average up to rounding and
# clipping (it clips the average of overshooting JPEG ringing near 0 or 255; the full decode clips each pixel)
YCC_MIN_PSNR = 32.0  # 4:2:0 tiles: chroma at its stored resolution instead of interpolated, then averaged


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    """Real H&E pixels (CMU-1), 1536 × 2048, taken as a 40× scan (0.25 µm/px): detail down to the pixel."""
    with Image.open(SOURCE) as im:
        return np.asarray(im.convert("RGB"))[:2048, :1536].copy()


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory, texture: np.ndarray):
    """``pyramids(chroma_subsampled, downsamples)``: the texture written as an Aperio-style 40× pyramid, once."""
    folder, made = tmp_path_factory.mktemp("s40"), {}

    def make(chroma_subsampled: bool = False, downsamples: tuple[int, ...] = (1, 4, 16)) -> Path:
        key = (chroma_subsampled, downsamples)
        if key not in made:
            made[key] = folder / f"s40_{'ycc' if chroma_subsampled else 'rgb'}_{len(downsamples)}.svs"
            write_aperio_tiff(made[key], texture, mpp=0.25, downsamples=downsamples, quality=80,
                              chroma_subsampled=chroma_subsampled)  # default: RGB-coded 4:4:4, as CMU-1's
        return made[key]
    return make


@pytest.fixture(scope="module")
def slide40(pyramids) -> Path:
    return pyramids()


def grid(path: Path, target_mpp: float, patch: int = 256) -> tuple[np.ndarray, int, int, int]:
    """The tiler's coords at ``target_mpp`` (every position), with its level, read size and patch size."""
    cfg = load_config(None, [f"tile.target_mpp={target_mpp}", "tile.min_tissue=0", f"tile.patch_size={patch}"])
    with open_slide(path) as s:
        t = tile_slide(s, cfg.tissue, cfg.tile)
    return t.coords, int(t.attrs["patch_level"]), int(t.attrs["level_patch_size"]), int(t.attrs["patch_size"])


def scaled_vs_area_average(path: Path, target_mpp: float, patch: int, scale: int) -> list[tuple[float, int]]:
    """(PSNR, max |Δ|) of every scaled patch against the area average of OpenSlide's full-size read."""
    coords, level, read, size = grid(path, target_mpp, patch)
    assert read == size * scale and len(coords) >= 2
    out = []
    with open_slide(path) as fast, open_slide(path, reader="openslide") as ref:
        for x, y in coords:
            got = fast.read_scaled(int(x), int(y), level, read, size)
            assert got is not None, f"({x}, {y}) was not read by the scaled path"
            want = area_average(ref.read_region(int(x), int(y), level, read, read), scale)
            out.append((psnr(got, want), int(np.abs(got - want).max())))
    return out


# (target µm/px, pyramid downsamples, patch px, DCT scale): 20× from level 0; 10× and 5× from a pyramid
# without a 4× level; 5× from the 4× level
CASES = [(0.5, (1, 4, 16), 256, 2), (1.0, (1,), 128, 4), (2.0, (1,), 64, 8), (2.0, (1, 4, 16), 64, 2)]


@pytest.mark.parametrize("target_mpp, downsamples, patch, scale", CASES)
def test_a_40x_slide_below_its_levels_reads_as_the_area_average_of_the_full_decode(
        pyramids, target_mpp: float, downsamples: tuple[int, ...], patch: int, scale: int):
    for p, worst in scaled_vs_area_average(pyramids(False, downsamples), target_mpp, patch, scale):
        assert p >= RGB_MIN_PSNR and worst <= RGB_MAX_DIFF


@pytest.mark.parametrize("target_mpp, downsamples, patch, scale", CASES)
def test_chroma_subsampled_tiles_agree_within_the_stated_psnr(
        pyramids, target_mpp: float, downsamples: tuple[int, ...], patch: int, scale: int):
    assert all(p >= YCC_MIN_PSNR for p, _ in scaled_vs_area_average(pyramids(True, downsamples), target_mpp,
                                                                    patch, scale))


@pytest.mark.parametrize("chroma_subsampled", [False, True])
def test_scaled_reads_are_closer_to_the_true_20x_pixels_than_read_and_resize(pyramids, texture: np.ndarray,
                                                                             chroma_subsampled: bool):
    """Truth: the area average of the pixels before JPEG. The bilinear resize blurs more than it averages."""
    path = pyramids(chroma_subsampled)
    coords, level, read, size = grid(path, 0.5)
    with open_slide(path) as fast, open_slide(path, scaled_decode=False) as today:
        for x, y in coords:
            truth = area_average(texture[y:y + read, x:x + read], 2)
            assert psnr(fast.read_patch(x, y, level, read, size), truth) > psnr(
                today.read_patch(x, y, level, read, size), truth)


def test_the_real_aperio_slide_at_10x_reads_through_its_jpeg_tables(real_slide: Path):
    """CMU-1: abbreviated JPEG tiles (tables in JPEGTables), RGB-coded without a colour marker."""
    coords, level, read, size = grid(real_slide, 1.0)  # 0.499 µm/px: within tolerance of 2×, so 512 px
    assert read == 512
    with open_slide(real_slide) as fast, open_slide(real_slide, reader="openslide") as ref:
        for x, y in coords[:12]:
            got = fast.read_scaled(int(x), int(y), level, read, size)
            want = area_average(ref.read_region(int(x), int(y), level, read, read), 2)
            assert got is not None and psnr(got, want) >= RGB_MIN_PSNR and np.abs(got - want).max() <= RGB_MAX_DIFF


def test_where_the_scaled_path_does_not_apply_today_s_path_reads(slide40: Path):
    with open_slide(slide40) as fast, open_slide(slide40, scaled_decode=False) as today:
        w, h = fast.dimensions
        for x, y, read, size in [(512, 512, 384, 256),  # 1.5×: no DCT scale
                                 (w - 256, 0, 512, 256),  # runs past the right edge
                                 (513, 512, 512, 256),  # off the 1/2 grid
                                 (0, 0, 256, 256)]:  # no downsample at all
            assert fast.read_scaled(x, y, 0, read, size) is None
            assert np.array_equal(fast.read_patch(x, y, 0, read, size), today.read_patch(x, y, 0, read, size))


def test_tiles_that_are_not_jpeg_are_read_and_resized(tmp_path: Path, texture: np.ndarray):
    import tifffile

    path = tmp_path / "deflate.tif"
    tifffile.imwrite(path, texture[:1024, :1024], tile=(256, 256), compression="zlib", photometric="rgb",
                     metadata=None)
    with open_slide(path, default_mpp=0.25) as s, open_slide(path, default_mpp=0.25, scaled_decode=False) as t:
        assert s.fast_levels == [0] and s.read_scaled(0, 0, 0, 512, 256) is None
        assert np.array_equal(s.read_patch(0, 0, 0, 512, 256), t.read_patch(0, 0, 0, 512, 256))


def test_a_scale_that_fails_its_check_is_sent_back_to_full_decode(real_slide: Path, monkeypatch):
    """Tell libjpeg the RGB-coded tiles are YCbCr (Adobe transform 1): colours go wrong, the check sees it."""
    monkeypatch.setattr(tiled, "_ADOBE_RGB", b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01")
    tiled.clear_cache()
    with open_slide(real_slide) as s, open_slide(real_slide, scaled_decode=False) as t:
        assert s.read_scaled(480, 480, 0, 512, 256) is None
        assert s._tiles._scaled_checked == {(0, 2): False} and s.fast_levels == [0]  # full-size reads stay fast
        assert np.array_equal(s.read_patch(480, 480, 0, 512, 256), t.read_patch(480, 480, 0, 512, 256))
    tiled.clear_cache()


def test_scaled_tiles_are_cached_beside_full_size_ones(slide40: Path):
    tiled.clear_cache()
    with open_slide(slide40) as s:
        s.read_patch(0, 0, 0, 512, 256)  # the checks decode their tiles at both sizes; the patch at 1/2
        scaled = {k: v for k, v in tiled._cache.items() if k[3] == 2}
        assert {v.shape for v in scaled.values()} == {(128, 128, 3)} and len(scaled) >= 4
        s.read_patch(0, 0, 0, 512, 256)
        assert all(tiled._cache[k] is v for k, v in scaled.items())
    tiled.clear_cache()


def test_the_config_switch_reaches_every_reader(slide40: Path, monkeypatch):
    monkeypatch.setenv(SCALED_DECODE_ENV, "1")  # restored after the test, whatever load_config exports
    load_config(None, ["extract.scaled_decode=false"])
    with open_slide(slide40) as off, open_slide(slide40, scaled_decode=True) as on:
        assert off.read_scaled(0, 0, 0, 512, 256) is None and on.read_scaled(0, 0, 0, 512, 256) is not None
    load_config(None)
    with open_slide(slide40) as s:
        assert s.read_scaled(0, 0, 0, 512, 256) is not None


def test_features_are_fingerprinted_with_the_decode_only_where_it_applies(monkeypatch):
    from fbta.features.extract import features_fingerprint
    from fbta.features.registry import create_extractor

    ext = create_extractor("test_resnet", weights="random", trainable=False)
    native = {"patch_size": 256, "level_patch_size": 256, "fbta_params": "abc"}
    below = {"patch_size": 256, "level_patch_size": 512, "fbta_params": "abc"}
    monkeypatch.setenv(SCALED_DECODE_ENV, "1")
    on = features_fingerprint(ext, native), features_fingerprint(ext, below)
    monkeypatch.setenv(SCALED_DECODE_ENV, "0")
    off = features_fingerprint(ext, native), features_fingerprint(ext, below)
    assert on[0] == off[0] and on[1] != off[1]


def test_a_scan_within_tolerance_of_a_power_of_two_reads_exactly_that_multiple():
    from fbta.slides.reader import read_size_for

    assert read_size_for(256, 0.5 / 0.2527, 1.0, 0.02) == 512  # a typical 40× MPP read at 20×: 2×, not 507 px
    assert read_size_for(256, 0.5 / 0.1235, 1.0, 0.02) == 1024  # an 80× scan at 20×
    assert read_size_for(256, 1.5, 1.0, 0.02) == 384  # 1.5× is no DCT scale: the ceiling, as before
    assert read_size_for(256, 2.2, 1.0, 0.02) == 564  # outside the tolerance: the exact size


def test_patches_are_writable_arrays_on_both_paths(slide40: Path):
    """torch.from_numpy warns on (and may not write to) a read-only array: both paths hand out their own."""
    with open_slide(slide40) as s, open_slide(slide40, scaled_decode=False) as t:
        assert s.read_patch(0, 0, 0, 512, 256).flags.writeable and t.read_patch(0, 0, 0, 512, 256).flags.writeable
