"""CLAM/TRIDENT-compatible HDF5 files between stages (⚑ files contract).

coords/<slide_id>.h5: dataset ``coords`` (N×2 int64, level-0 top-left x, y)
with CLAM's and TRIDENT's attributes. Files are written atomically, and a file
counts as complete only if it opens, has its datasets and carries the
``fbta_complete`` marker written last.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import h5py
import numpy as np

from fbta.io.atomic import atomic_path


def write_coords(dest: Path, coords: np.ndarray, attrs: Mapping[str, Any]) -> None:
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with atomic_path(dest) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=coords, maxshape=(None, 2), track_times=False)
            for k, v in attrs.items():
                ds.attrs[k] = v
            f.attrs["fbta_complete"] = True


def read_coords(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with h5py.File(path, "r") as f:
        ds = f["coords"]
        return ds[:].astype(np.int64), {k: _py(v) for k, v in ds.attrs.items()}


def coords_complete(path: Path, expect: Optional[Mapping[str, Any]] = None) -> bool:
    """True if ``path`` is a finished coords file whose attributes match ``expect``."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("fbta_complete", False) or "coords" not in f:
                return False
            ds = f["coords"]
            if ds.ndim != 2 or ds.shape[1] != 2:
                return False
            attrs = ds.attrs
            return all(k in attrs and _py(attrs[k]) == v for k, v in (expect or {}).items())
    except (OSError, KeyError):
        return False


def _py(v: Any) -> Any:
    """HDF5 attribute → plain Python (numpy scalars, arrays, bytes)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v
