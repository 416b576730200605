"""Fast patch reads for tiled TIFF pyramids (Aperio SVS, generic tiled TIFF): tiles straight from the file.

On a GPU host the CNN is no longer the bottleneck: ``openslide.read_region``
spends most of its time outside the JPEG decoder (cairo compositing, ARGB →
RGBA, a per-call cache lock). This reader looks up the tiles a patch touches
in the TIFF's own tile index, decodes them with tifffile/imagecodecs
(libjpeg-turbo), crops and pastes them, and keeps decoded tiles for overlapping
patches in one LRU cache per process (``CACHE_BYTES`` over all open slides:
FBTA's samplers keep every training slide open).

Safety: OpenSlide still opens the slide and supplies every piece of metadata
(levels, downsamples, MPP). A level is served fast only when a TIFF page has
exactly that level's size, three 8-bit samples, tiles and a compression
tifffile decodes; and on first use each level is checked against
``read_region`` on one tile (colour-space or layout surprises switch that
level back to OpenSlide for good). Anything else — other vendors, odd layouts,
a tile that fails to decode — is read by OpenSlide, which also raises the
error a user sees.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# TIFF compression codes served fast: none, LZW, JPEG, deflate, Aperio JPEG 2000 (YCbCr, RGB)
FAST_COMPRESSIONS = {1, 5, 7, 8, 32946, 33003, 33005}
SELF_CHECK_MAX_DIFF = 4  # |fast − OpenSlide| allowed on the check tile (JPEG decoder rounding)
CACHE_BYTES = 64 << 20  # decoded tiles kept per process, over every open slide (FBTA keeps hundreds open)

_cache: "OrderedDict[tuple[str, int, int], np.ndarray]" = OrderedDict()
_cache_bytes = 0
_cache_lock = threading.Lock()


def _cache_get(key: tuple[str, int, int]) -> Optional[np.ndarray]:
    with _cache_lock:
        tile = _cache.get(key)
        if tile is not None:
            _cache.move_to_end(key)
        return tile


def _cache_put(key: tuple[str, int, int], tile: np.ndarray) -> None:
    global _cache_bytes
    with _cache_lock:
        if key in _cache or tile.nbytes > CACHE_BYTES:
            return
        _cache[key] = tile
        _cache_bytes += tile.nbytes
        while _cache_bytes > CACHE_BYTES:
            _, old = _cache.popitem(last=False)
            _cache_bytes -= old.nbytes


def clear_cache() -> None:
    global _cache_bytes
    with _cache_lock:
        _cache.clear()
        _cache_bytes = 0

ReadFallback = Callable[[int, int, int, int, int], np.ndarray]  # (x0, y0, level, w, h) -> RGB, OpenSlide's


class TiledTiff:
    """Decoded-tile reads for the levels of one slide whose TIFF pages allow it."""

    def __init__(self, path: Path, level_sizes: list[tuple[int, int]]) -> None:
        import tifffile

        self.path = path
        self._tif = tifffile.TiffFile(str(path))
        self._lock = threading.Lock()  # one file handle: seek + read must not interleave
        st = Path(path).stat()
        self._key = f"{Path(path).resolve()}:{st.st_mtime_ns}:{st.st_size}"  # a rewritten file is another slide
        self._checked: dict[int, bool] = {}  # level -> passed the self-check
        self.pages: list[Optional[object]] = [self._page_for(w, h) for w, h in level_sizes]

    def _page_for(self, width: int, height: int) -> Optional[object]:
        for page in self._tif.pages:
            if (page.is_tiled and page.imagewidth == width and page.imagelength == height
                    and page.samplesperpixel == 3 and page.bitspersample == 8 and page.planarconfig == 1
                    and page.imagedepth == 1 and int(page.compression) in FAST_COMPRESSIONS):
                return page
        return None

    @property
    def fast_levels(self) -> list[int]:
        return [i for i, p in enumerate(self.pages) if p is not None and self._checked.get(i, True)]

    def usable(self, level: int) -> bool:
        return 0 <= level < len(self.pages) and self.pages[level] is not None and self._checked.get(level, True)

    def _tile(self, level: int, index: int) -> np.ndarray:
        key = (self._key, level, index)
        tile = _cache_get(key)
        if tile is not None:
            return tile
        page = self.pages[level]
        with self._lock:
            fh = self._tif.filehandle
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
        segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        tile = np.asarray(segment).reshape(page.tilelength, page.tilewidth, -1)[..., :3]
        _cache_put(key, tile)
        return tile

    def read(self, level: int, lx: int, ly: int, width: int, height: int) -> np.ndarray:
        """RGB of ``width × height`` pixels of ``level`` from level coordinates (lx, ly); outside reads white."""
        page = self.pages[level]
        th, tw = page.tilelength, page.tilewidth
        iw, ih = page.imagewidth, page.imagelength
        across = -(-iw // tw)
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + width, iw), min(ly + height, ih)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level, ty * across + tx)
                # the part of this tile inside both the region and the image
                ax0, ay0 = max(x0, tx * tw), max(y0, ty * th)
                ax1, ay1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                out[ay0 - ly:ay1 - ly, ax0 - lx:ax1 - lx] = tile[ay0 - ty * th:ay1 - ty * th,
                                                                   ax0 - tx * tw:ax1 - tx * tw]
        return out

    def self_check(self, level: int, downsample: float, fallback: ReadFallback) -> bool:
        """Compare one interior tile with OpenSlide once per level; a mismatch disables the level."""
        if level in self._checked:
            return self._checked[level]
        page = self.pages[level]
        tw, th = min(page.tilewidth, page.imagewidth), min(page.tilelength, page.imagelength)
        lx, ly = (page.imagewidth - tw) // 2, (page.imagelength - th) // 2
        lx, ly = lx - lx % page.tilewidth, ly - ly % page.tilelength
        try:
            fast = self.read(level, lx, ly, tw, th)
            ref = fallback(int(round(lx * downsample)), int(round(ly * downsample)), level, tw, th)
            ok = bool(np.abs(fast.astype(np.int16) - ref.astype(np.int16)).max() <= SELF_CHECK_MAX_DIFF)
        except Exception:
            ok = False
        self._checked[level] = ok
        return ok

    def close(self) -> None:
        self._tif.close()


def level_origin(x: int, y: int, downsample: float) -> Optional[tuple[int, int]]:
    """Level coordinates of a level-0 point when it sits on the level's pixel grid, else None.

    OpenSlide places a region at x / downsample with sub-pixel interpolation; only
    whole level pixels can be copied from tiles unchanged (level 0 always is).
    """
    lx, ly = x / downsample, y / downsample
    rx, ry = round(lx), round(ly)
    if abs(lx - rx) > 1e-6 or abs(ly - ry) > 1e-6:
        return None
    return int(rx), int(ry)
