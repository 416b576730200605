"""CLAM/TRIDENT-compatible HDF5 files between stages (⚑ files contract).

coords/<slide_id>.h5: dataset ``coords`` (N×2 int64, level-0 top-left x, y)
with CLAM's and TRIDENT's attributes. Files are written atomically, and a file
counts as complete only if it opens, has its datasets and carries the
``fbta_complete`` marker written last.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import h5py
import numpy as np

from fbta.io.atomic import atomic_write_bytes


@contextlib.contextmanager
def _new_h5(dest: Path) -> Iterator[h5py.File]:
    """An HDF5 file built in memory, then written to ``dest`` atomically in one plain write.

    Why not let HDF5 write the file itself: after a failed write (disk full,
    file-size or quota limit) the HDF5 library retries its flush on close and
    can crash the process; a plain write of finished bytes fails cleanly with an
    ``OSError`` the stage turns into one clear message. Per-slide files are
    small (N patches × D floats), so holding one in memory costs little.
    """
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        yield f
    atomic_write_bytes(dest, buf.getbuffer())


def write_coords(dest: Path, coords: np.ndarray, attrs: Mapping[str, Any]) -> None:
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with _new_h5(dest) as f:
        ds = f.create_dataset("coords", data=coords, maxshape=(None, 2), track_times=False)
        for k, v in attrs.items():
            ds.attrs[k] = _h5(v)
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


def _h5(v: Any) -> Any:
    """Plain Python → HDF5 attribute: a ``str`` subclass (a schema Choice) as the plain string h5py can store."""
    return str.__str__(v) if isinstance(v, str) and type(v) is not str else v


def _py(v: Any) -> Any:
    """HDF5 attribute → plain Python (numpy scalars, arrays, bytes)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


# -- features ------------------------------------------------------------------------------
# features/<extractor>/h5_files/<slide_id>.h5: ``features`` float32 N×D and ``coords`` N×2 in
# the same order (CLAM's layout; TRIDENT's is the same file without the h5_files level).


def write_features(dest: Path, features: np.ndarray, coords: np.ndarray, attrs: Mapping[str, Any],
                   coords_attrs: Mapping[str, Any] | None = None) -> None:
    features = np.asarray(features, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(features) != len(coords):
        raise ValueError(f"{dest}: {len(features)} features for {len(coords)} coords")
    with _new_h5(dest) as f:
        f.create_dataset("features", data=features, track_times=False)
        c = f.create_dataset("coords", data=coords, track_times=False)
        for k, v in (coords_attrs or {}).items():
            c.attrs[k] = _h5(v)
        for k, v in attrs.items():
            f.attrs[k] = _h5(v)
        f.attrs["fbta_complete"] = True


def read_features(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features N×D float32, coords N×2, attrs) from an fbta, CLAM or TRIDENT ``.h5`` or a CLAM ``.pt`` file.

    A CLAM ``pt_files/<id>.pt`` holds only the N×D tensor; its coords come from
    the sibling ``h5_files/<id>.h5`` when CLAM wrote one, else they are missing
    (attrs ``fbta_coords = "missing"``): MIL training needs none, stages that
    read patches or draw maps refuse with :func:`require_coords`.
    """
    path = Path(path)
    if path.suffix == ".pt":
        return _read_clam_pt(path)
    with h5py.File(path, "r") as f:
        if "features" not in f:
            raise KeyError(f"{path}: no 'features' dataset (not a CLAM/TRIDENT feature file)")
        feats = np.asarray(f["features"][:], dtype=np.float32)
        if feats.ndim == 3 and feats.shape[1] == 1:  # some CLAM versions store N×1×D
            feats = feats[:, 0]
        coords = f["coords"][:].astype(np.int64) if "coords" in f else np.zeros((len(feats), 2), np.int64)
        attrs = {k: _py(v) for k, v in f.attrs.items()}
        if "coords" not in f:
            attrs["fbta_coords"] = "missing"
    if feats.ndim != 2 or len(coords) != len(feats):
        raise ValueError(f"{path}: features {feats.shape} and coords {coords.shape} do not match")
    return feats, coords, attrs


def _clam_twin(pt: Path) -> Path:
    """CLAM writes ``pt_files/<id>.pt`` beside ``h5_files/<id>.h5`` (features + coords)."""
    return pt.parent.parent / "h5_files" / f"{pt.stem}.h5"


def _read_clam_pt(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a pickle error, a truncated file: one line naming it
        raise ValueError(f"{path}: not a readable CLAM .pt feature file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: a CLAM .pt feature file holds one N×D tensor, found {type(obj).__name__}")
    feats = obj.detach().float().numpy()
    if feats.ndim == 3 and feats.shape[1] == 1:
        feats = feats[:, 0]
    if feats.ndim != 2:
        raise ValueError(f"{path}: features of shape {tuple(feats.shape)}, expected N×D")
    sibling = _clam_twin(path)
    attrs: dict[str, Any] = {"fbta_source": "clam_pt"}
    coords = np.zeros((len(feats), 2), np.int64)
    if sibling.is_file():
        with h5py.File(sibling, "r") as f:
            if "coords" in f and len(f["coords"]) == len(feats):
                coords = f["coords"][:].astype(np.int64)
            else:
                attrs["fbta_coords"] = "missing"
    else:
        attrs["fbta_coords"] = "missing"
    return np.ascontiguousarray(feats), coords, attrs


def feature_file_attrs(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(file attributes, coords attributes) of a feature file without reading the features; a CLAM ``.pt``
    has none of its own (its ``h5_files/`` twin's, if any)."""
    path = Path(path)
    if path.suffix == ".pt":
        path = _clam_twin(path)
        if not path.is_file():
            return {}, {}
    with h5py.File(path, "r") as f:
        coords = {k: _py(v) for k, v in f["coords"].attrs.items()} if "coords" in f else {}
        return {k: _py(v) for k, v in f.attrs.items()}, coords


def patch_attrs(features_path: Path, file_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """How to read patches back: the coords dataset's attributes (CLAM/TRIDENT keys, fbta's level_patch_size)."""
    attrs = feature_file_attrs(features_path)[1]
    for key in ("patch_level", "patch_size"):
        if key not in attrs and key in file_attrs:
            attrs[key] = file_attrs[key]
    if "patch_level" not in attrs or "patch_size" not in attrs:
        raise ValueError(f"{features_path}: coords carry no patch_level/patch_size; cannot read patches back "
                         "(point data.out at the run that tiled these slides)")
    return attrs


def require_coords(path: Path, attrs: Mapping[str, Any], why: str) -> None:
    """Refuse, naming the file, a feature file without patch coordinates where ``why`` needs them."""
    if attrs.get("fbta_coords") == "missing":
        raise ValueError(f"{path}: no patch coordinates (a CLAM .pt file without its h5_files/ twin); {why} needs "
                         "them — point data.features at a folder with .h5 files")


def features_complete(path: Path, expect: Optional[Mapping[str, Any]] = None) -> bool:
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("fbta_complete", False) or "features" not in f or "coords" not in f:
                return False
            if f["features"].shape[0] != f["coords"].shape[0]:
                return False
            return all(k in f.attrs and _py(f.attrs[k]) == v for k, v in (expect or {}).items())
    except (OSError, KeyError):
        return False


def feature_files(folder: Path) -> dict[str, Path]:
    """slide_id → feature file in an fbta/CLAM folder (``h5_files/``, else CLAM's ``pt_files/``) or a flat
    TRIDENT ``features_<encoder>/`` folder."""
    folder = Path(folder)
    for sub, pattern in ((folder / "h5_files", "*.h5"), (folder, "*.h5"), (folder / "pt_files", "*.pt")):
        if sub.is_dir():
            found = {p.stem: p for p in sorted(sub.glob(pattern)) if not p.name.startswith(".")}
            if found:
                return found
    return {}


def trident_hint(folder: Path) -> str:
    """When ``folder`` is a TRIDENT tiling root rather than a features folder: which folder to use instead."""
    subs = sorted(p.name for p in Path(folder).glob("features_*") if p.is_dir())
    return f" (a TRIDENT tree: set data.features to {folder}/{subs[0]})" if subs else ""


# -- clusters (fbta cluster) ----------------------------------------------------------------


def clusters_complete(path: Path, expect: Mapping[str, Any]) -> bool:
    """True if ``path`` is a finished clusters file made with ``expect`` (C, seed, method, features)."""
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("fbta_complete")) and all(_py(f.attrs.get(k)) == v for k, v in expect.items())
    except (OSError, KeyError):
        return False


def write_clusters(dest: Path, labels: np.ndarray, centroids: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """clusters/<model>/<slide_id>.h5: per-patch ``labels`` (coords order) and ``centroids``."""
    with _new_h5(dest) as f:
        f.create_dataset("labels", data=labels.astype(np.int32), track_times=False)
        f.create_dataset("centroids", data=centroids.astype(np.float32), track_times=False)
        for k, v in attrs.items():
            f.attrs[k] = _h5(v)
        f.attrs["fbta_complete"] = True
