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

DCT-scaled reads (``read_scaled``): a 40× slide read at 20× (or 10×, 5×) needs
a 2×, 4× or 8× downsample of level 0. libjpeg decodes a JPEG tile straight at
1/2, 1/4 or 1/8 scale from its DCT coefficients (Pillow's draft mode); its
reduced IDCT outputs the averages of adjacent full-size outputs, so a scaled
tile is the area average of the full decode up to rounding — for a fraction
of the decode, with no resize. It applies to JPEG tiles whose size the scale
divides, inside the image, on the scaled grid; each (level, scale) is checked
once against an area average of OpenSlide's read (``scaled_check``).
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

# TIFF compression codes served fast: none, LZW, JPEG, deflate, Aperio JPEG 2000 (YCbCr, RGB)
FAST_COMPRESSIONS = {1, 5, 7, 8, 32946, 33003, 33005}
SELF_CHECK_MAX_DIFF = 4  # |fast − OpenSlide| allowed on the check tile (JPEG decoder rounding)
CACHE_BYTES = 64 << 20  # decoded tiles kept per process, over every open slide (FBTA keeps hundreds open)
DCT_SCALES = (2, 4, 8)  # libjpeg's power-of-two scaled decodes
JPEG = 7  # TIFF compression code of (new-style) JPEG
# scaled tile vs the area average of OpenSlide's full read on the check tile: a wrong colour space or one
# output pixel of shift scores 10–20 dB; the reduced IDCT's rounding (4:4:4, ≈ 55 dB) and chroma kept at its
# stored resolution instead of interpolated (4:2:0, ≈ 35–50 dB) score above (docs/slide-reading.md)
SCALED_CHECK_MIN_PSNR = 30.0
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, transform 0: RGB

_cache: "OrderedDict[tuple[str, int, int, int], np.ndarray]" = OrderedDict()
_cache_bytes = 0
_cache_lock = threading.Lock()


def _cache_get(key: tuple[str, int, int, int]) -> Optional[np.ndarray]:
    with _cache_lock:
        tile = _cache.get(key)
        if tile is not None:
            _cache.move_to_end(key)
        return tile


def _cache_put(key: tuple[str, int, int, int], tile: np.ndarray) -> None:
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
        self._scaled_checked: dict[tuple[int, int], bool] = {}  # (level, scale) -> passed the scaled check
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

    def _tile(self, level: int, index: int, scale: int = 1) -> np.ndarray:
        key = (self._key, level, index, scale)
        tile = _cache_get(key)
        if tile is not None:
            return tile
        page = self.pages[level]
        with self._lock:
            fh = self._tif.filehandle
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
        if scale == 1:
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            tile = np.asarray(segment).reshape(page.tilelength, page.tilewidth, -1)[..., :3]
        else:
            tile = decode_jpeg_scaled(data, page.jpegtables, int(page.photometric) == 2, scale,
                                      (page.tilewidth // scale, page.tilelength // scale))
        _cache_put(key, tile)
        return tile

    def read(self, level: int, lx: int, ly: int, width: int, height: int) -> np.ndarray:
        """RGB of ``width × height`` pixels of ``level`` from level coordinates (lx, ly); outside reads white."""
        page = self.pages[level]
        return self._assemble(level, 1, lx, ly, width, height, page.imagewidth, page.imagelength)

    def can_scale(self, level: int, lx: int, ly: int, width: int, height: int, scale: int) -> bool:
        """Whether ``read_scaled`` serves this region: JPEG tiles the scale divides, inside the image, on its grid."""
        page = self.pages[level] if self.usable(level) else None
        return (page is not None and scale in DCT_SCALES and int(page.compression) == JPEG
                and int(page.photometric) in (2, 6)  # RGB or YCbCr: what libjpeg's colour conversion knows
                and page.tilewidth % scale == 0 and page.tilelength % scale == 0 and lx % scale == 0
                and ly % scale == 0 and lx >= 0 and ly >= 0 and lx + width * scale <= page.imagewidth
                and ly + height * scale <= page.imagelength)

    def read_scaled(self, level: int, lx: int, ly: int, width: int, height: int, scale: int) -> np.ndarray:
        """``width × height`` pixels of ``level`` downsampled ``scale``× from level coordinates (lx, ly).

        Each tile is decoded at 1/scale in the DCT domain; call only where ``can_scale`` holds.
        """
        page = self.pages[level]
        return self._assemble(level, scale, lx // scale, ly // scale, width, height,
                              page.imagewidth // scale, page.imagelength // scale)

    def _assemble(self, level: int, scale: int, sx: int, sy: int, width: int, height: int,
                  iw: int, ih: int) -> np.ndarray:
        """Paste the tiles (decoded at 1/scale) under a region given on the 1/scale grid of ``level``."""
        page = self.pages[level]
        th, tw = page.tilelength // scale, page.tilewidth // scale
        across = -(-page.imagewidth // page.tilewidth)
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(sx, 0), max(sy, 0), min(sx + width, iw), min(sy + height, ih)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level, ty * across + tx, scale)
                # the part of this tile inside both the region and the image
                ax0, ay0 = max(x0, tx * tw), max(y0, ty * th)
                ax1, ay1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                out[ay0 - sy:ay1 - sy, ax0 - sx:ax1 - sx] = tile[ay0 - ty * th:ay1 - ty * th,
                                                                   ax0 - tx * tw:ax1 - tx * tw]
        return out

    def _check_region(self, level: int, multiple: int) -> tuple[int, int, int, int]:
        """An interior, tile-aligned region of about one tile (sides a multiple of ``multiple``)."""
        page = self.pages[level]
        tw, th = min(page.tilewidth, page.imagewidth), min(page.tilelength, page.imagelength)
        tw, th = tw - tw % multiple, th - th % multiple
        lx, ly = (page.imagewidth - tw) // 2, (page.imagelength - th) // 2
        return lx - lx % page.tilewidth, ly - ly % page.tilelength, tw, th

    def self_check(self, level: int, downsample: float, fallback: ReadFallback) -> bool:
        """Compare one interior tile with OpenSlide once per level; a mismatch disables the level."""
        if level in self._checked:
            return self._checked[level]
        lx, ly, tw, th = self._check_region(level, 1)
        try:
            fast = self.read(level, lx, ly, tw, th)
            ref = fallback(int(round(lx * downsample)), int(round(ly * downsample)), level, tw, th)
            ok = bool(np.abs(fast.astype(np.int16) - ref.astype(np.int16)).max() <= SELF_CHECK_MAX_DIFF)
        except Exception:
            ok = False
        self._checked[level] = ok
        return ok

    def scaled_check(self, level: int, scale: int, downsample: float, fallback: ReadFallback) -> bool:
        """Compare one interior tile decoded at 1/scale with the area average of OpenSlide's full read, once
        per (level, scale); a mismatch sends that scale back to full decode + resize for good."""
        if (level, scale) in self._scaled_checked:
            return self._scaled_checked[(level, scale)]
        lx, ly, tw, th = self._check_region(level, scale)
        try:
            fast = self.read_scaled(level, lx, ly, tw // scale, th // scale, scale)
            ref = area_average(fallback(int(round(lx * downsample)), int(round(ly * downsample)), level, tw, th),
                               scale)
            ok = psnr(fast, ref) >= SCALED_CHECK_MIN_PSNR
        except Exception:
            ok = False
        self._scaled_checked[(level, scale)] = ok
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


def area_average(img: np.ndarray, scale: int) -> np.ndarray:
    """Mean of each ``scale × scale`` block (float64): the reference a downsampled read is measured against."""
    h, w = img.shape[0] // scale, img.shape[1] // scale
    return img[:h * scale, :w * scale].reshape(h, scale, w, scale, -1).mean(axis=(1, 3))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit images in dB (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def decode_jpeg_scaled(data: bytes, tables: Optional[bytes], rgb: bool, scale: int,
                       size: tuple[int, int]) -> np.ndarray:
    """One TIFF JPEG tile decoded at 1/``scale`` in the DCT domain (libjpeg-turbo through Pillow's draft mode).

    A TIFF tile is an abbreviated JPEG stream: its quantisation and Huffman tables
    live in the page's JPEGTables, which go in front. TIFF says RGB vs YCbCr in
    its photometric tag, not in the stream; for RGB an Adobe marker with
    transform 0 tells libjpeg not to convert colours (a marker in the tile itself,
    read later, still wins).
    """
    head = b"\xff\xd8" + (_ADOBE_RGB if rgb else b"") + (tables[2:-2] if tables else b"")
    with Image.open(io.BytesIO(head + data[2:]), formats=["JPEG"]) as im:
        im.draft("RGB", size)
        if im.size != size or im.mode != "RGB":
            raise ValueError(f"JPEG tile decodes to {im.mode} {im.size} at 1/{scale}, expected RGB {size}")
        return np.asarray(im)
