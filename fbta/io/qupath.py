"""QuPath round trip: masks and patches out as GeoJSON objects, annotations back in as masks.

QuPath (File › Import objects, or drag the file onto the slide) reads a GeoJSON
FeatureCollection in level-0 pixel coordinates; each Feature's ``properties``
carry ``objectType`` (``annotation`` | ``detection``), ``classification``
(``name``, ``color`` as [r, g, b]) and, for detections, ``measurements`` (a
name → number map). Annotations drawn or corrected in QuPath and exported
(File › Export objects as GeoJSON) come back through :func:`read_annotation_mask`.

Geometry: a mask pixel (r, c) covers level-0 [c·s, (c+1)·s) × [r·s, (r+1)·s) for a
mask of ``s`` level-0 pixels per pixel. Polygons follow the pixel edges exactly
(holes kept, pixels touching only at a corner stay apart as QuPath draws them);
rasterising them back (a pixel is in when its centre is) returns the same mask.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

TUMOUR_CLASSES = ("tumor", "tumour")  # QuPath's built-in "Tumor", and the British spelling; case-insensitive
COLOURS = {"Tissue": [80, 180, 80], "Tumor": [200, 0, 0], "Patch": [40, 90, 200]}


class AnnotationError(ValueError):
    """A GeoJSON file that cannot be used as an annotation; the message names the file."""


def mask_to_geometry(mask: np.ndarray, scale: float):  # noqa: ANN201 - shapely geometry
    """Polygons (holes kept) of a boolean mask, in level-0 pixels (``scale`` level-0 px per mask px)."""
    from shapely import box, union_all
    from shapely.geometry import MultiPolygon

    m = np.asarray(mask, bool)
    boxes = []
    # runs of mask pixels per row, merged down while the next rows repeat them (exact pixel edges)
    edges = np.diff(np.pad(m, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    open_runs: dict[tuple[int, int], int] = {}  # (c0, c1) -> first row
    for r in range(m.shape[0] + 1):
        runs = set()
        if r < m.shape[0]:
            starts, stops = np.flatnonzero(edges[r] == 1), np.flatnonzero(edges[r] == -1)
            runs = set(zip(starts.tolist(), stops.tolist()))
        for run in [k for k in open_runs if k not in runs]:
            r0 = open_runs.pop(run)
            boxes.append(box(run[0] * scale, r0 * scale, run[1] * scale, r * scale))
        for run in runs:
            open_runs.setdefault(run, r)
    if not boxes:
        return MultiPolygon()
    land = union_all(boxes).simplify(0)  # drop the collinear vertices the boxes leave
    polys = [g for g in getattr(land, "geoms", [land]) if g.geom_type == "Polygon" and not g.is_empty]
    return MultiPolygon(polys)


def geometry_to_mask(geom, shape: tuple[int, int], scale: float) -> np.ndarray:  # noqa: ANN001
    """Rasterise level-0 polygons onto a mask of ``shape`` (``scale`` level-0 px per mask px): pixel centres."""
    h, w = shape
    segs = []
    polys = [p for p in getattr(geom, "geoms", [geom]) if not p.is_empty and p.geom_type == "Polygon"]
    for poly in polys:
        for ring in (poly.exterior, *poly.interiors):
            xy = np.asarray(ring.coords, np.float64) / scale - 0.5  # pixel centres at integer coordinates
            segs.append(np.c_[xy[:-1], xy[1:]])
    acc = np.zeros((h, w + 1), np.uint8)
    if segs:
        e = np.concatenate(segs)  # x1 y1 x2 y2
        e = e[e[:, 1] != e[:, 3]]  # horizontal edges cross no row centre
        lo, hi = np.minimum(e[:, 1], e[:, 3]), np.maximum(e[:, 1], e[:, 3])
        r0 = np.clip(np.ceil(lo), 0, h).astype(np.int64)  # rows r with lo <= r < hi (half-open: no double count)
        r1 = np.clip(np.ceil(hi), 0, h).astype(np.int64)
        n = np.maximum(r1 - r0, 0)
        idx = np.repeat(np.arange(len(e)), n)
        rows = np.repeat(r0, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        x1, y1, x2, y2 = (e[idx, k] for k in range(4))
        xs = x1 + (rows - y1) * (x2 - x1) / (y2 - y1)
        first = np.clip(np.floor(xs).astype(np.int64) + 1, 0, w)  # first pixel centre right of the crossing
        np.bitwise_xor.at(acc, (rows, first), 1)  # even-odd: every crossing flips what lies to its right
    acc = np.bitwise_xor.accumulate(acc, axis=1)[:, :w].astype(bool)
    return acc


def feature(geom, object_type: str, name: str, measurements: Optional[dict[str, float]] = None,  # noqa: ANN001
            color: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """One QuPath object: ``objectType`` annotation | detection, a classification, optional measurements."""
    from shapely.geometry import mapping

    props: dict[str, Any] = {"objectType": object_type,
                             "classification": {"name": name, "color": list(color or COLOURS.get(name, [0, 0, 0]))},
                             "isLocked": False}
    if measurements:
        props["measurements"] = {k: float(v) for k, v in measurements.items()}
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": mapping(geom), "properties": props}


def patch_features(coords: np.ndarray, size0: float, scores: Optional[dict[str, np.ndarray]] = None,
                   classes: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """The patch grid as detections (squares in level-0 px), each with its scores as measurements."""
    from shapely.geometry import box

    out = []
    for i, (x, y) in enumerate(np.asarray(coords, np.float64)):
        m = {k: float(v[i]) for k, v in (scores or {}).items()}
        name = classes[i] if classes is not None else "Patch"
        out.append(feature(box(x, y, x + size0, y + size0), "detection", name, m))
    return out


def write_geojson(path: Path, features: Iterable[dict[str, Any]]) -> Path:
    """A FeatureCollection, written atomically."""
    from fbta.io.atomic import atomic_write_text

    atomic_write_text(Path(path), json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return Path(path)


def read_annotation_mask(path: Path, dims0: tuple[int, int], downsample: float = 16.0,
                         classes: Sequence[str] = TUMOUR_CLASSES):
    """A QuPath GeoJSON export → bool mask of the slide at ``downsample`` (level-0 px per pixel).

    Only annotations whose classification is one of ``classes`` (case-insensitive) count; other
    objects (tissue, detections, other classes) are ignored. Raises AnnotationError naming the file.
    """
    from shapely.geometry import shape as to_geom
    from shapely.ops import unary_union

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{path}: not a readable GeoJSON file ({type(exc).__name__}: {exc})") from None
    feats = doc.get("features", [doc] if doc.get("type") == "Feature" else None) if isinstance(doc, dict) else doc
    if not isinstance(feats, list):
        raise AnnotationError(f"{path}: expected a GeoJSON FeatureCollection or a list of Features")
    wanted = {c.lower() for c in classes}
    geoms = []
    for i, f in enumerate(feats):
        props = (f or {}).get("properties") or {}
        cls = props.get("classification") or {}
        name = (cls.get("name") if isinstance(cls, dict) else cls) or ""
        if props.get("objectType", "annotation") != "annotation" or str(name).lower() not in wanted:
            continue
        try:
            g = to_geom(f["geometry"])
        except Exception as exc:  # noqa: BLE001
            raise AnnotationError(f"{path}: feature {i} has no usable geometry ({type(exc).__name__}: {exc})") from None
        geoms.append(g if g.is_valid else g.buffer(0))
    w0, h0 = dims0
    shape = (max(1, int(round(h0 / downsample))), max(1, int(round(w0 / downsample))))
    return geometry_to_mask(unary_union(geoms), shape, w0 / shape[1]) if geoms else np.zeros(shape, bool)
