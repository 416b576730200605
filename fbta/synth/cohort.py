"""The embedded demo cohort (``fbta synth``): Aperio-style slides, labels and masks.

Why Aperio-style files: the rest of the pipeline must meet the same reader
path (OpenSlide, vendor properties, pyramid levels, MPP) as a real SVS
cohort, so the demo exercises the real code rather than a shortcut.
"""
from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fbta.choices import SynthStyle
from fbta.io.atomic import atomic_path
from fbta.synth.slide import make_slide
from fbta.synth.texture import SOURCE as TEXTURE_SOURCE, make_texture_slide

log = logging.getLogger(__name__)

LABELS = ("normal", "tumour")  # negative, positive (design: detection)
SUBTYPES = ("subtype_a", "subtype_b")  # design: subtyping (both carry tumour; masks mark it in both)
SPLITS = ("train", "val", "test")
STYLES = SynthStyle.values()  # the schema's choices (fbta/choices.py), as plain strings
_SLIDE_STREAM, _LABEL_STREAM = 1, 2  # RNG stream ids under the cohort seed


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename onto ``path`` (fbta.io.atomic): readers never see half a file."""
    with atomic_path(path, suffix=path.suffix) as tmp:
        write(tmp)


def _downsample(rgb: np.ndarray, factor: int, chunk_rows: int = 1024) -> np.ndarray:
    """Box-filter (area mean) downsample of a uint8 image, in row chunks to bound memory."""
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    out = np.empty((max(h, 1), max(w, 1)) + rgb.shape[2:], dtype=np.uint8)
    if h == 0 or w == 0:  # smaller than one block: a single mean pixel
        out[:] = np.round(rgb.reshape(-1, *rgb.shape[2:]).mean(axis=0)).astype(np.uint8)
        return out
    step = max(1, chunk_rows // factor)
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        block = rgb[r0 * factor:r1 * factor, :w * factor].reshape(r1 - r0, factor, w, factor, *rgb.shape[2:])
        total = block.sum(axis=(1, 3), dtype=np.uint32)
        out[r0:r1] = ((total + factor * factor // 2) // (factor * factor)).astype(np.uint8)
    return out


def write_aperio_tiff(
    path: Path,
    rgb: np.ndarray,
    mpp: float,
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    quality: int = 90,
    magnification: int | None = None,
    chroma_subsampled: bool = False,
) -> None:
    """Pyramidal tiled-JPEG TIFF that OpenSlide opens as vendor 'aperio' with openslide.mpp-x and objective-power.

    Every page carries an Aperio-convention ImageDescription and
    ``metadata=None`` (otherwise tifffile writes its own description and
    OpenSlide falls back to generic-tiff with one level). Tiles are JPEG with
    photometric RGB (RGB-coded, no chroma subsampling, so fine nuclear detail
    survives); TIFF resolution tags repeat the MPP for non-OpenSlide readers.
    ``chroma_subsampled``: YCbCr-coded with 4:2:0 chroma instead, the
    layout many scanner-written SVS files have (tests of readers that must handle both).
    """
    import tifffile

    path = Path(path)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 image, got {rgb.shape} {rgb.dtype}")
    if list(downsamples)[0] != 1 or any(b <= a for a, b in zip(downsamples, downsamples[1:])):
        raise ValueError(f"downsamples must start at 1 and increase: {downsamples}")
    h, w = rgb.shape[:2]
    mag = int(magnification) if magnification is not None else max(1, int(round(10.0 / mpp)))
    head = f"Aperio Image Library v10.0.0\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile})"
    big = rgb.nbytes > 2**31  # classic TIFF offsets stop at 4 GiB
    jpeg = dict(
        tile=(tile, tile), compression="jpeg", photometric="rgb", subsampling=(1, 1),
        compressionargs={"level": int(quality), "outcolorspace": "RGB"}, metadata=None,
        resolutionunit="CENTIMETER",
    )
    if chroma_subsampled:
        jpeg.update(subsampling=(2, 2), compressionargs={"level": int(quality)})  # RGB in, YCbCr stored

    def write(tmp: Path) -> None:
        level, prev_ds = rgb, 1
        with tifffile.TiffWriter(tmp, bigtiff=big) as tif:
            for ds in downsamples:
                if ds != prev_ds:  # build each level from the previous one when the ratio is whole
                    src, f = (level, ds // prev_ds) if ds % prev_ds == 0 else (rgb, ds)
                    level, prev_ds = _downsample(src, f), ds
                if ds == 1:
                    desc = f"{head} JPEG/RGB Q={quality}|AppMag = {mag}|MPP = {mpp:g}"
                else:
                    desc = f"{head} -> {level.shape[1]}x{level.shape[0]} JPEG/RGB Q={quality}"
                res = 1e4 / (mpp * w / level.shape[1])  # px per cm
                tif.write(level, description=desc, resolution=(res, res), **jpeg)

    _atomic_write(path, write)


def slide_rng(seed: int, index: int) -> np.random.Generator:
    """Slide ``index``'s own stream: generating one slide never depends on the others."""
    return np.random.default_rng([int(seed), _SLIDE_STREAM, int(index)])


def assign_labels(n: int, positive_fraction: float, seed: int) -> list[str]:
    """``round(n·fraction)`` tumour slides (at least one of each class when n ≥ 2), shuffled."""
    n_pos = int(round(n * positive_fraction))
    if n >= 2:
        n_pos = min(max(n_pos, 1), n - 1)
    rng = np.random.default_rng([int(seed), _LABEL_STREAM, 0])
    labels = np.array([LABELS[1]] * n_pos + [LABELS[0]] * (n - n_pos))
    return [str(x) for x in labels[rng.permutation(n)]]


def assign_splits(labels: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Stratified train/val/test: each class is split on its own so every split sees both.

    A split with a positive fraction gets at least one slide of each class
    when the class is large enough (train first, then test, then val).
    """
    rng = np.random.default_rng([int(seed), _LABEL_STREAM, 1])
    splits = [""] * len(labels)
    for cls in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == cls]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        n = len(idx)
        n_test = max(int(round(n * test_fraction)), int(test_fraction > 0 and n >= 2))
        n_val = max(int(round(n * val_fraction)), int(val_fraction > 0 and n >= 3))
        while n_test + n_val > max(n - 1, 0):  # keep at least one for training; val gives way first
            if n_val > 0 and (n_val >= n_test or n_test <= 1):
                n_val -= 1
            else:
                n_test -= 1
        for j, i in enumerate(idx):
            splits[i] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
        missing = [s for s, f in (("val", val_fraction), ("test", test_fraction)) if f > 0 and s not in
                   {splits[i] for i in idx}]
        if missing:
            log.warning("class %r has %d slide(s): no %s slide of that class", cls, n, "/".join(missing))
    return splits


def mask_image(mask: np.ndarray, downsample: int) -> np.ndarray:
    """Level-0 boolean mask -> uint8 0/255 at 1/downsample (majority of each block).

    The size is ceil(H/ds) × ceil(W/ds), so the aspect ratio is level 0's.
    """
    ds = max(1, int(downsample))
    h, w = mask.shape
    hs, ws = -(-h // ds), -(-w // ds)
    padded = np.zeros((hs * ds, ws * ds), dtype=bool)
    padded[:h, :w] = mask
    counts = padded.reshape(hs, ds, ws, ds).sum(axis=(1, 3), dtype=np.int32)
    return np.where(counts * 2 > ds * ds, 255, 0).astype(np.uint8)


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    _atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def _write_labels(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "label", "split"])
    for row in rows:
        writer.writerow([row["slide_id"], row["label"], row["split"]])
    _atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()))


def make_cohort(
    cfg: Any, slides_dir: Path, labels_csv: Path, masks_dir: Path | None, progress: bool = True
) -> list[dict]:
    """Writes <slides_dir>/<slide_id>.svs, labels.csv (slide_id,label,split), <masks_dir>/<slide_id>.png.

    Masks are the tumour ground truth at 1/cfg.mask_downsample (0/255 uint8,
    empty for normal slides). Returns one dict per slide (slide_id, label,
    split, n_tumour_px, …). Same cfg.seed → identical files.
    """
    from tqdm.auto import tqdm

    slides_dir, labels_csv = Path(slides_dir), Path(labels_csv)
    n, seed = int(cfg.n_slides), int(cfg.seed)
    if n < 1:
        raise ValueError(f"synth.n_slides must be ≥ 1, got {n}")
    contrast = float(cfg.tumour_contrast)
    design = str(getattr(cfg, "design", "detection"))
    names = SUBTYPES if design == "subtyping" else LABELS
    labels = [names[LABELS.index(x)] for x in assign_labels(n, float(cfg.positive_fraction), seed)]
    splits = assign_splits(labels, float(cfg.val_fraction), float(cfg.test_fraction), seed)
    slides_dir.mkdir(parents=True, exist_ok=True)
    style = str(getattr(cfg, "style", "drawn"))
    if style not in STYLES:
        raise ValueError(f"synth.style={style!r} must be one of {', '.join(STYLES)}")
    if design == "subtyping" and style != "texture":
        raise ValueError("synth.design=subtyping needs synth.style=texture (the subtypes differ in real nuclei)")
    delta = float(getattr(cfg, "subtype_delta", 0.5)) if design == "subtyping" else None

    def render(rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = (int(cfg.width), int(cfg.height), positive, float(cfg.tumour_fraction))
        if style == "drawn":
            return make_slide(rng, *size, contrast)
        return make_texture_slide(rng, *size, strength=contrast, stain_sd=float(cfg.stain_sd),
                                  source=str(cfg.texture or TEXTURE_SOURCE), subtype_delta=delta)

    records: list[dict] = []
    for i in tqdm(range(n), desc="synth", unit="slide", disable=not progress):
        start = time.perf_counter()
        slide_id = f"synth_{i:03d}"
        positive = labels[i] == names[1]
        rgb, tissue, tumour = render(slide_rng(seed, i), positive)
        path = slides_dir / f"{slide_id}.svs"
        write_aperio_tiff(path, rgb, float(cfg.mpp), quality=int(cfg.jpeg_quality))
        mask_path = None
        if masks_dir is not None:
            mask_path = Path(masks_dir) / f"{slide_id}.png"
            _write_png(mask_path, mask_image(tumour, int(cfg.mask_downsample)))
        n_tissue, n_tumour = int(tissue.sum()), int(tumour.sum())
        records.append(dict(
            slide_id=slide_id, label=labels[i], split=splits[i], path=str(path),
            mask_path=str(mask_path) if mask_path else None, width=int(cfg.width), height=int(cfg.height),
            mpp=float(cfg.mpp), n_tissue_px=n_tissue, n_tumour_px=n_tumour,
            tissue_fraction=n_tissue / tissue.size, tumour_fraction=n_tumour / max(n_tissue, 1),
            seconds=time.perf_counter() - start,
        ))
        del rgb, tissue, tumour
    _write_labels(labels_csv, records)
    log.info("synth: %d slides (%d %s) -> %s", n, labels.count(names[1]), names[1], slides_dir)
    return records
