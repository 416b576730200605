"""The fast tiled-TIFF reader returns what OpenSlide's read_region returns, or lets OpenSlide read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fbta.slides.reader import SlideError, open_slide
from fbta.synth.cohort import write_aperio_tiff


def random_regions(dims: tuple[int, int], n: int, step: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):  # some regions start before the origin or run past the edge
        x, y = int(rng.integers(-120, dims[0])), int(rng.integers(-120, dims[1]))
        yield x - x % step, y - y % step, int(rng.integers(1, 400)), int(rng.integers(1, 400))


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    rgb = (rng.integers(0, 255, (1, 1, 3)) + rng.integers(-40, 40, (1536, 1280, 3))).clip(0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("tiled") / "pyramid.svs"
    write_aperio_tiff(path, rgb, mpp=0.5, downsamples=(1, 4, 16))
    return path


def test_real_aperio_slide_reads_pixel_equal_to_openslide(real_slide: Path):
    """Defect guarded: a fast path decoding JPEG tiles another way than OpenSlide (another IDCT, chroma upsampling
    or YCbCr→RGB conversion) differs by 1–4 grey levels — the old `max |Δ| ≤ 4` passed it; README claims |Δ| 0."""
    with open_slide(real_slide) as fast, open_slide(real_slide, reader="openslide") as ref:
        assert fast.fast_levels == [0] and ref.fast_levels == []
        for x, y, w, h in random_regions(fast.dimensions, 60):
            a, b = fast.read_region(x, y, 0, w, h), ref.read_region(x, y, 0, w, h)
            assert a.shape == b.shape == (h, w, 3) and a.dtype == np.uint8
            assert np.array_equal(a, b), (x, y, w, h)  # README: pixel-equal, max |Δ| 0


def test_every_pyramid_level_on_its_pixel_grid_reads_like_openslide(pyramid: Path):
    """Defect guarded: a tile pasted one pixel off, or a reduced level decoded differently, on any level."""
    with open_slide(pyramid) as fast, open_slide(pyramid, reader="openslide") as ref:
        assert fast.fast_levels == [0, 1, 2]
        for level, lvl in enumerate(fast.levels):
            for x, y, w, h in random_regions(fast.dimensions, 25, step=int(lvl.downsample), seed=level):
                a, b = fast.read_region(x, y, level, w, h), ref.read_region(x, y, level, w, h)
                assert np.array_equal(a, b), (level, x, y, w, h)  # README: max |Δ| 0


def test_regions_off_a_levels_pixel_grid_are_left_to_openslide(pyramid: Path):
    """OpenSlide interpolates sub-pixel offsets; copying tiles would shift the patch instead."""
    with open_slide(pyramid) as fast, open_slide(pyramid, reader="openslide") as ref:
        a, b = fast.read_region(1001, 777, 1, 120, 90), ref.read_region(1001, 777, 1, 120, 90)
        assert np.array_equal(a, b)


def test_outside_the_slide_reads_white(pyramid: Path):
    with open_slide(pyramid) as s:
        w, h = s.dimensions
        assert (s.read_region(w + 10, 0, 0, 64, 64) == 255).all()
        edge = s.read_region(w - 32, h - 32, 0, 64, 64)
        assert (edge[32:] == 255).all() and (edge[:, 32:] == 255).all() and not (edge[:32, :32] == 255).all()


def test_overlapping_patches_come_from_the_tile_cache(pyramid: Path):
    from fbta.slides import tiled

    tiled.clear_cache()
    with open_slide(pyramid) as s:
        s.read_region(0, 0, 0, 256, 256)
        cached = dict(tiled._cache)
        s.read_region(16, 16, 0, 200, 200)  # inside the same tile: no new decode
        assert tiled._cache.keys() == cached.keys()
        assert all(tiled._cache[k] is v for k, v in cached.items())


def test_the_tile_cache_is_bounded_over_every_open_slide(pyramid: Path, tmp_path: Path, monkeypatch):
    import shutil

    from fbta.slides import tiled

    copies = [shutil.copy(pyramid, tmp_path / f"s{i}.svs") for i in range(3)]
    tiled.clear_cache()
    monkeypatch.setattr(tiled, "CACHE_BYTES", 3 * 256 * 256 * 3)  # three tiles
    slides = [open_slide(p) for p in copies]
    for s in slides:
        s.read_region(0, 0, 0, 512, 256)  # two tiles each
    assert len(tiled._cache) == 3 and tiled._cache_bytes <= tiled.CACHE_BYTES
    for s in slides:
        s.close()


def test_a_level_that_disagrees_with_openslide_is_switched_off(tmp_path: Path):
    """Uncompressed YCbCr tiles: OpenSlide converts to RGB, the raw tile would not — the self-check notices."""
    import tifffile

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    path = tmp_path / "ycbcr.tif"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="ycbcr", subsampling=(1, 1), compression=None,
                     metadata=None)
    with open_slide(path, default_mpp=0.5) as fast, open_slide(path, default_mpp=0.5, reader="openslide") as ref:
        assert fast.vendor == "generic-tiff" and fast.fast_levels == [0]  # layout accepted, not yet checked
        a = fast.read_region(10, 20, 0, 300, 200)
        assert np.array_equal(a, ref.read_region(10, 20, 0, 300, 200))
        assert 0 not in fast.fast_levels


def test_a_tile_that_does_not_decode_is_left_to_openslide_which_names_the_file(pyramid: Path, tmp_path: Path):
    import tifffile

    broken = tmp_path / "broken_tile.svs"
    data = bytearray(pyramid.read_bytes())
    with tifffile.TiffFile(pyramid) as tif:
        page = tif.pages[0]
        off, n = page.dataoffsets[7], page.databytecounts[7]
    data[off:off + n] = b"\x00" * n  # tile 7 of level 0 is no JPEG at all
    broken.write_bytes(bytes(data))
    with open_slide(broken) as s:
        x, y = 256 * (7 % 5), 256 * (7 // 5)  # 1280 px wide: 5 tiles across
        with pytest.raises(SlideError, match=r"broken_tile\.svs: read failed at \(512, 256\) level 0"):
            s.read_region(x, y, 0, 64, 64)
        assert s.read_region(0, 0, 0, 64, 64).shape == (64, 64, 3)  # the rest of the slide still reads


def test_unknown_reader_is_a_clear_error(real_slide: Path):
    with pytest.raises(ValueError, match="reader='fast'"):
        open_slide(real_slide, reader="fast")


def test_the_environment_switch_sends_every_read_through_openslide(real_slide: Path, monkeypatch):
    monkeypatch.setenv("FBTA_SLIDE_READER", "openslide")
    with open_slide(real_slide) as s:
        assert s.fast_levels == []
    monkeypatch.setenv("FBTA_SLIDE_READER", "auto")
    with open_slide(real_slide) as s:
        assert s.fast_levels == [0]
