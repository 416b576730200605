"""Other tools' folder layouts: TRIDENT's output tree, and CLAM's ``pt_files``.

Our feature files already carry TRIDENT's attributes; only the folders differ:

    ours / CLAM:  features/<extractor>/h5_files/<id>.h5   coords/<id>.h5
    TRIDENT:      <mag>x_<ps>px_<overlap>px_overlap/features_<extractor>/<id>.h5
                  <mag>x_<ps>px_<overlap>px_overlap/patches/<id>_patches.h5

:func:`export_slide` links (or copies) one slide's files into TRIDENT's tree so
that TRIDENT-reading tools (torchmil's ``TridentWSIDataset``, TRIDENT's own
slide encoders) take them as they are; TRIDENT's tree is read as input by
pointing ``data.features`` at its ``features_<extractor>`` folder.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping
from fbta.choices import LinkMode

LINK_MODES = LinkMode.values()  # the schema's choices (fbta/choices.py), as plain strings


def trident_root_name(coords_attrs: Mapping[str, Any]) -> str:
    """``20x_256px_0px_overlap``: TRIDENT's folder for one tiling, from our coords attributes."""
    try:
        mag = int(coords_attrs["target_magnification"])
        ps = int(coords_attrs["patch_size"])
    except KeyError as exc:
        raise KeyError(f"coords attributes lack {exc} (tiled by an older fbta? re-run `fbta tile`)") from None
    return f"{mag}x_{ps}px_{int(coords_attrs.get('overlap', 0))}px_overlap"


def place(src: Path, dst: Path, mode: str = "hardlink") -> Path:
    """Put ``src`` at ``dst`` by hard link (copy across file systems), symlink or copy; atomic and idempotent.

    A hard link keeps the export valid if the run folder is moved and costs no
    space; it falls back to a copy where the two paths are on different devices.
    """
    if mode not in LINK_MODES:
        raise ValueError(f"export.link='{mode}' must be one of {', '.join(LINK_MODES)}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    if mode == "symlink":
        tmp.symlink_to(Path(os.path.relpath(src.resolve(), dst.parent.resolve())))
    else:
        try:
            if mode != "hardlink":
                raise OSError("copy requested")
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def export_slide(slide_id: str, features: Path, coords: Path, coords_attrs: Mapping[str, Any], extractor: str,
                 dest: Path, mode: str = "hardlink") -> tuple[Path, Path]:
    """Link one slide's feature and coords files into TRIDENT's tree under ``dest``; return both new paths."""
    root = dest / trident_root_name(coords_attrs)
    feats = place(features, root / f"features_{extractor}" / f"{slide_id}.h5", mode)
    patches = place(coords, root / "patches" / f"{slide_id}_patches.h5", mode)
    return feats, patches
