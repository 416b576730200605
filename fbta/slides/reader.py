"""Read whole-slide images through one small interface.

Vendor formats (SVS, NDPI, MRXS, ...) go through OpenSlide; plain TIFF, PNG and
JPEG become single-level slides. Everything returns RGB uint8 numpy arrays,
with coordinates always in level-0 pixels, as CLAM and TRIDENT expect.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from fbta.config import SCALED_DECODE_ENV
from fbta.slides.mpp import MppError, resolve_mpp
from fbta.slides.tiled import DCT_SCALES, TiledTiff, level_origin

OPENSLIDE_EXTENSIONS = {".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".tif", ".tiff", ".dcm"}
IMAGE_EXTENSIONS = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}
SLIDE_EXTENSIONS = OPENSLIDE_EXTENSIONS | IMAGE_EXTENSIONS

Image.MAX_IMAGE_PIXELS = None  # plain slides are legitimately gigapixel


class SlideError(RuntimeError):
    """A slide that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float


class Slide:
    """Common surface of every slide backend (level 0 = full resolution)."""

    path: Path
    mpp: float  # µm/px at level 0
    mpp_source: str  # where the MPP came from (vendor, tiff-tags, csv, default)
    vendor: str
    levels: list[Level]

    @property
    def slide_id(self) -> str:
        return self.path.stem

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB H×W×3 uint8 of ``width × height`` level pixels, top-left at level-0 (x, y)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- derived helpers --------------------------------------------------------------
    def best_level(self, downsample: float, tolerance: float = 0.02) -> int:
        """Coarsest level whose downsample does not exceed ``downsample`` (within tolerance).

        Reading from a level at most as coarse as wanted and resizing down keeps
        detail; reading a coarser level and upsampling would invent it.
        """
        best = 0
        for i, lvl in enumerate(self.levels):
            if lvl.downsample <= downsample * (1 + tolerance):
                best = i if lvl.downsample >= self.levels[best].downsample else best
        return best

    def read_patch(self, x: int, y: int, level: int, read_size: int, out_size: int) -> np.ndarray:
        """A square patch read at ``level`` and resized to ``out_size`` (the target MPP)."""
        img = self.read_region(x, y, level, read_size, read_size)
        if read_size != out_size:
            img = np.array(Image.fromarray(img).resize((out_size, out_size), Image.BILINEAR))  # writable, for torch
        return img

    def read_at_mpp(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at about ``mpp`` µm/px (or up to 2× coarser); returns (image, level-0 px per px).

        Used for tissue detection and thumbnails. Reads one pyramid level whole: the
        coarsest one at most 2× coarser than asked (a 20x Aperio slide has levels at
        4× and 16×; asking for 8× must not read the 4× level of a 100k-px slide),
        then shrinks it if it is finer than asked. Cost follows the low-resolution size.
        """
        want = max(mpp / self.mpp, 1.0)
        level = self.best_level(2 * want, tolerance=0.0)
        lvl = self.levels[level]
        img = self.read_region(0, 0, level, lvl.width, lvl.height)
        w0, h0 = self.dimensions
        if lvl.downsample >= want:
            return img, w0 / lvl.width
        out_w, out_h = max(1, round(w0 / want)), max(1, round(h0 / want))
        img = np.asarray(Image.fromarray(img).resize((out_w, out_h), Image.BILINEAR))
        return img, w0 / out_w


FAST_VENDORS = {"aperio", "generic-tiff"}  # TIFF pyramids whose tiles fbta.slides.tiled reads directly
READERS = ("auto", "openslide")
READER_ENV = "FBTA_SLIDE_READER"


def scaled_decode_default() -> bool:
    """``$FBTA_SCALED_DECODE``: on unless 0/false/no/off (fbta.config exports ``extract.scaled_decode`` there,
    so DataLoader workers, forked or spawned, read patches the way the config says)."""
    return os.environ.get(SCALED_DECODE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def dct_scale(read_size: int, out_size: int) -> int:
    """The DCT scale (2, 4, 8) that turns ``read_size`` level pixels into ``out_size``, else 0."""
    if out_size > 0 and read_size % out_size == 0 and read_size // out_size in DCT_SCALES:
        return read_size // out_size
    return 0


class OpenSlideSlide(Slide):
    """OpenSlide's metadata; pixels from the TIFF's own tiles where ``reader='auto'`` allows (fbta.slides.tiled)."""

    def __init__(self, path: Path, csv_mpp: Optional[float], default_mpp: Optional[float], reader: str = "auto",
                 scaled_decode: bool = True):
        import openslide

        self.path = path
        self.scaled_decode = scaled_decode
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(f"{path}: unsupported or corrupt slide file (OpenSlide: {exc or 'unsupported format'})") from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{path}: corrupt slide file (OpenSlide: {exc})") from exc
        props = dict(self._osr.properties)
        self.vendor = props.get("openslide.vendor", "unknown")
        self.levels = [
            Level(int(w), int(h), float(d))
            for (w, h), d in zip(self._osr.level_dimensions, self._osr.level_downsamples)
        ]
        self.mpp, self.mpp_source = resolve_mpp(path, props, None, csv_mpp, default_mpp)
        self._tiles = None
        if reader == "auto" and self.vendor in FAST_VENDORS:
            try:
                self._tiles = TiledTiff(path, [(lv.width, lv.height) for lv in self.levels])
            except Exception:  # tifffile cannot parse what OpenSlide can: OpenSlide reads everything
                self._tiles = None

    @property
    def fast_levels(self) -> list[int]:
        """Levels read straight from the TIFF's tiles (the rest go through OpenSlide)."""
        return self._tiles.fast_levels if self._tiles is not None else []

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        tiles = self._tiles
        if tiles is not None and tiles.usable(level):
            ds = self.levels[level].downsample
            origin = level_origin(x, y, ds)  # None off the level's pixel grid: OpenSlide interpolates there
            if origin is not None and tiles.self_check(level, ds, self._openslide_read):
                lx, ly = origin
                try:
                    return tiles.read(level, lx, ly, int(width), int(height))
                except Exception:  # a tile that does not decode: OpenSlide reads it or names the problem
                    pass
        return self._openslide_read(x, y, level, width, height)

    def read_patch(self, x: int, y: int, level: int, read_size: int, out_size: int) -> np.ndarray:
        """A patch downsampled 2×, 4× or 8× from a JPEG level comes from DCT-scaled tile decodes (no resize);
        anything else — or a scale whose check against OpenSlide failed — is read and resized as before."""
        scaled = self.read_scaled(x, y, level, read_size, out_size)
        return scaled if scaled is not None else super().read_patch(x, y, level, read_size, out_size)

    def read_scaled(self, x: int, y: int, level: int, read_size: int, out_size: int) -> Optional[np.ndarray]:
        """The DCT-scaled read of ``read_patch``, or None where it does not apply."""
        scale, tiles = dct_scale(read_size, out_size), self._tiles
        if not (self.scaled_decode and scale and tiles is not None and tiles.usable(level)):
            return None
        ds = self.levels[level].downsample
        origin = level_origin(x, y, ds)
        if origin is None or not tiles.can_scale(level, *origin, out_size, out_size, scale):
            return None
        if not (tiles.self_check(level, ds, self._openslide_read)
                and tiles.scaled_check(level, scale, ds, self._openslide_read)):
            return None
        try:
            return tiles.read_scaled(level, *origin, out_size, out_size, scale)
        except Exception:  # a tile that does not decode at scale: the full-size path reads it or names the problem
            return None

    def _openslide_read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        import openslide

        try:
            rgba = self._osr.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{self.path}: read failed at ({x}, {y}) level {level}: {exc}") from exc
        arr = np.array(rgba)  # one writable copy; the RGB view below avoids a second
        if arr[..., 3].min() == 255:  # fully opaque, the usual case
            return arr[..., :3]
        return _rgba_on_white(arr)

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
        self._osr.close()


class ImageSlide(Slide):
    """A plain raster (PNG/JPEG/non-pyramidal TIFF) as a single-level slide held in memory."""

    def __init__(self, path: Path, csv_mpp: Optional[float], default_mpp: Optional[float]):
        self.path = path
        self.vendor = "image"
        tiff_tags = None
        try:
            if path.suffix.lower() in {".tif", ".tiff"}:
                import tifffile

                with tifffile.TiffFile(path) as tif:
                    page = tif.pages[0]
                    tiff_tags = {t.name: t.value for t in page.tags.values()}
                    arr = page.asarray()
            else:
                with Image.open(path) as im:
                    arr = np.asarray(im.convert("RGB"))
        except Exception as exc:  # any decoder error means an unusable file
            raise SlideError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc
        self._img = _to_rgb(arr, path)
        h, w = self._img.shape[:2]
        self.levels = [Level(w, h, 1.0)]
        self.mpp, self.mpp_source = resolve_mpp(path, {}, tiff_tags, csv_mpp, default_mpp)

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        if level != 0:
            raise SlideError(f"{self.path}: single-level image has no level {level}")
        out = np.full((height, width, 3), 255, np.uint8)  # outside the image reads as background
        h, w = self._img.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._img[y0:y1, x0:x1]
        return out


def _to_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        else:
            raise SlideError(f"{path}: unsupported pixel type {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SlideError(f"{path}: unsupported image shape {arr.shape}")
    return _rgba_on_white(arr) if arr.shape[2] == 4 else np.ascontiguousarray(arr)


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite onto white: OpenSlide marks areas outside scanned tissue as transparent."""
    rgb = rgba[..., :3]
    if rgba.shape[-1] == 3:
        return np.ascontiguousarray(rgb)
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a)) // 255).astype(np.uint8)


def open_slide(path: str | Path, csv_mpp: Optional[float] = None, default_mpp: Optional[float] = None,
               reader: Optional[str] = None, scaled_decode: Optional[bool] = None) -> Slide:
    """Open ``path`` with the right backend and resolve its MPP, or raise SlideError.

    ``reader``: ``auto`` reads tiled TIFF/SVS pyramids straight from their tiles where that is
    verified to match OpenSlide (fbta.slides.tiled), ``openslide`` always uses ``read_region``;
    None: ``$FBTA_SLIDE_READER``, else ``auto`` (the switch reaches every stage and worker).
    ``scaled_decode``: patches 2×/4×/8× below a JPEG level decode in the DCT domain (``read_patch``);
    None: ``$FBTA_SCALED_DECODE`` (``extract.scaled_decode``), else on.
    """
    if scaled_decode is None:
        scaled_decode = scaled_decode_default()
    if reader is None:
        reader = os.environ.get(READER_ENV) or "auto"
    if reader not in READERS:
        raise ValueError(f"reader='{reader}' must be one of {', '.join(READERS)} (argument or ${READER_ENV})")
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: empty file (0 bytes)")
    suffix = path.suffix.lower()
    if suffix not in SLIDE_EXTENSIONS:
        raise SlideError(f"{path}: unsupported extension '{suffix}'")
    try:
        if suffix in OPENSLIDE_EXTENSIONS and _openslide_format(path) is not None:
            return OpenSlideSlide(path, csv_mpp, default_mpp, reader, scaled_decode)
        if suffix in IMAGE_EXTENSIONS:
            return ImageSlide(path, csv_mpp, default_mpp)
    except MppError as exc:
        raise SlideError(str(exc)) from exc
    raise SlideError(f"{path}: corrupt or unsupported slide file (OpenSlide does not recognise it)")


def _openslide_format(path: Path) -> Optional[str]:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


def read_size_for(patch_size: int, want: float, level_ds: float, tolerance: float) -> int:
    """Pixels to read at a level so that they cover ``patch_size`` target pixels.

    Within ``tolerance`` of 1×, 2×, 4× or 8× the read is exactly that multiple, as a pyramid level
    within tolerance counts as a match: a 40× scan at 0.2527 µm/px read at 0.5 µm/px reads 512 px,
    not 507, so that its patches can be decoded at 1/2 in the DCT domain (``OpenSlideSlide.read_patch``).
    """
    ratio = want / level_ds
    for scale in (1, *DCT_SCALES):
        if abs(ratio / scale - 1) <= tolerance:
            return patch_size * scale
    return int(math.ceil(patch_size * ratio - 1e-6))
