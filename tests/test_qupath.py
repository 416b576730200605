"""QuPath round trip (issue #19.1): masks out as GeoJSON objects QuPath reads, annotations back in as masks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from fbta.cli import main
from fbta.config import load_config
from fbta.io.masks import read_mask
from fbta.io.qupath import feature, geometry_to_mask, mask_to_geometry, patch_features, read_annotation_mask, \
    write_geojson
from fbta.slides.reader import open_slide
from fbta.tiling.tiler import tile_slide

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(ROOT / "params.yaml")]
SMALL = ["synth.n_slides=4", "synth.width=1536", "synth.height=1536", "run.progress=false", "tracking.enabled=false"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def blobs(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Ragged pieces with holes, islands in holes, single pixels and pixels touching only at a corner."""
    rng = np.random.default_rng(seed)
    m = ndi.gaussian_filter(rng.random(shape), 3) > 0.5
    m |= rng.random(shape) > 0.995
    m[20:80, 20:80] = True
    m[30:70, 30:70] = False
    m[45:55, 45:55] = True
    m[5, 5] = m[6, 6] = True
    return m


@pytest.mark.parametrize("seed", [0, 1])
def test_a_mask_goes_to_polygons_and_back_unchanged(seed: int) -> None:
    m = blobs((160, 240), seed)
    geom = mask_to_geometry(m, 16.0)
    assert geom.is_valid and all(p.is_valid for p in geom.geoms)
    assert any(len(p.interiors) for p in geom.geoms)  # holes kept
    assert iou(geometry_to_mask(geom, m.shape, 16.0), m) == 1.0


def test_the_real_slides_tissue_mask_round_trips(real_slide: Path) -> None:
    cfg = load_config(None)
    with open_slide(real_slide) as s:
        t = tile_slide(s, cfg.tissue, cfg.tile)
    geom = mask_to_geometry(t.mask, t.mask_scale)
    back = geometry_to_mask(geom, t.mask.shape, t.mask_scale)
    assert geom.is_valid and np.array_equal(back, t.mask)  # README: exact (IoU 1.0); was IoU ≥ 0.99
    w0, h0 = 2220, 2967  # level-0 pixels: polygons lie on the slide, not on the mask's grid
    x0, y0, x1, y1 = geom.bounds
    assert 0 <= x0 < x1 <= w0 and 0 <= y0 < y1 <= h0 and x1 > 0.5 * w0


def test_objects_carry_what_qupath_reads(tmp_path: Path) -> None:
    geom = mask_to_geometry(blobs((60, 60), 0), 4.0)
    objs = [feature(geom.geoms[0], "annotation", "Tissue")]
    objs += patch_features(np.array([[0, 0], [256, 0]]), 256.0, {"score": np.array([0.2, 0.9])}, ["tumour"] * 2)
    path = write_geojson(tmp_path / "s.geojson", objs)
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 3
    ann, det = doc["features"][0], doc["features"][2]
    assert ann["properties"]["objectType"] == "annotation" and ann["geometry"]["type"] == "Polygon"
    assert ann["properties"]["classification"] == {"name": "Tissue", "color": [80, 180, 80]}
    assert det["properties"]["objectType"] == "detection"
    assert det["properties"]["measurements"] == {"score": 0.9}
    assert det["geometry"]["coordinates"][0][:4] == [[512.0, 0.0], [512.0, 256.0], [256.0, 256.0], [256.0, 0.0]]
    assert len({f["id"] for f in doc["features"]}) == 3


def qupath_export(objects: list[dict], path: Path) -> Path:
    """What QuPath's File › Export objects as GeoJSON writes: a FeatureCollection, 'Tumor' class, plus noise."""
    path.write_text(json.dumps({"type": "FeatureCollection", "features": objects}))
    return path


def test_tumor_annotations_exported_from_qupath_become_the_mask(tmp_path: Path) -> None:
    truth = blobs((96, 128), 3)  # at 1/16 of a 2048 × 1536 slide
    tumour = [feature(p, "annotation", "Tumor") for p in mask_to_geometry(truth, 16.0).geoms]
    other = feature(mask_to_geometry(~truth, 16.0).geoms[0], "annotation", "Stroma")
    cells = patch_features(np.array([[0, 0]]), 256.0, None, ["Tumor"])  # a detection, not an annotation
    path = qupath_export(tumour + [other] + cells, tmp_path / "s.geojson")
    got = read_annotation_mask(path, (2048, 1536), 16.0)
    assert got.shape == truth.shape and iou(got, truth) == 1.0
    assert (read_mask(path, (2048, 1536)) == got).all()  # the one mask reader of every stage


@pytest.mark.parametrize("content, problem", [("{not json", "not a readable GeoJSON"),
                                              ('{"type": "Feature"}', "no usable geometry")])
def test_a_broken_geojson_is_one_line_naming_the_file(tmp_path: Path, content: str, problem: str) -> None:
    from fbta.io.masks import MaskError

    path = tmp_path / "s.geojson"
    path.write_text(content.replace('"Feature"}', '"Feature", "properties": {"classification": {"name": "Tumor"}}}'))
    with pytest.raises(MaskError, match=problem) as exc:
        read_mask(path, (100, 100))
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_segmentation_weak_labels_are_the_same_from_a_png_or_its_qupath_export(tmp_path: Path) -> None:
    d = [f"data.out={tmp_path}/out", f"data.slides={tmp_path}/slides", f"data.labels={tmp_path}/labels.csv",
         f"data.masks={tmp_path}/masks"]
    assert main(["synth", *d, *SMALL, *PARAMS]) == 0 and main(["tile", *d, *SMALL, *PARAMS]) == 0
    from fbta.seg.dataset import index_cohort
    from fbta.stages.seg_common import cohort_paths, weak_label_options

    labels = [ln.split(",") for ln in (tmp_path / "labels.csv").read_text().splitlines()[1:]]
    split = {sid: part for sid, _, part in labels}
    cfg = load_config(ROOT / "params.yaml", d + SMALL)
    png, _ = index_cohort(cohort_paths(cfg), split, weak_label_options(cfg))
    geo = tmp_path / "geo"
    geo.mkdir()
    for png_mask in (tmp_path / "masks").glob("*.png"):
        m = np.asarray(Image.open(png_mask).convert("L")) > 127
        scale = 1536 / m.shape[1]
        objs = [feature(p, "annotation", "Tumor") for p in mask_to_geometry(m, scale).geoms]
        qupath_export(objs, geo / f"{png_mask.stem}.geojson")
    cfg_geo = load_config(ROOT / "params.yaml", d + SMALL + [f"data.masks={geo}"])
    gj, _ = index_cohort(cohort_paths(cfg_geo), split, weak_label_options(cfg_geo))
    assert [i.entry.slide_id for i in png] == [i.entry.slide_id for i in gj]
    for a, b in zip(png, gj):
        assert np.abs(a.fraction - b.fraction).max() < 0.02 and (a.group == b.group).mean() > 0.97


def test_fbta_qupath_writes_one_file_per_slide_with_tissue_and_patches(tmp_path: Path, capsys) -> None:
    d = [f"data.out={tmp_path}/out", f"data.slides={tmp_path}/slides", f"data.labels={tmp_path}/labels.csv",
         f"data.masks={tmp_path}/masks"]
    assert main(["synth", *d, *SMALL, *PARAMS]) == 0 and main(["tile", *d, *SMALL, *PARAMS]) == 0
    (tmp_path / "out/coords/synth_001.h5").write_bytes(b"")  # one slide's coords lost: that slide fails alone
    assert main(["qupath", *d, *SMALL, *PARAMS]) == 0
    files = sorted((tmp_path / "out/qupath").glob("*.geojson"))
    assert [f.stem for f in files] == ["synth_000", "synth_002", "synth_003"]
    doc = json.loads(files[0].read_text())
    kinds = [(f["properties"]["objectType"], f["properties"]["classification"]["name"]) for f in doc["features"]]
    assert ("annotation", "Tissue") in kinds and ("detection", "Patch") in kinds
    status = json.loads((tmp_path / "out/reports/status/qupath.json").read_text())
    failed = [s for s in status["slides"] if s["status"] == "failed"]
    assert [s["slide_id"] for s in failed] == ["synth_001"] and "run `fbta tile`" in failed[0]["reason"]


def test_the_students_predicted_tumour_is_exported_as_tumor_annotations(tmp_path: Path) -> None:
    """A student whose fused map is all ones on every patch: its 'Tumor' polygons cover the tiled patches."""
    import torch

    from fbta.seg.model import save_segmenter
    from fbta.seg.network import create_segnet

    d = [f"data.out={tmp_path}/out", f"data.slides={tmp_path}/slides", f"data.labels={tmp_path}/labels.csv",
         f"data.masks={tmp_path}/masks"]
    assert main(["synth", *d, *SMALL, *PARAMS]) == 0 and main(["tile", *d, *SMALL, *PARAMS]) == 0
    net, _ = create_segnet("test_efficientnet", "random", [0, 1, 2], "fixed", [0.3, 0.3, 0.4])
    with torch.no_grad():
        for side in net.sides:
            side.weight.zero_()
            side.bias.fill_(20.0)  # sigmoid ≈ 1 everywhere
    save_segmenter(tmp_path / "out/models/seg_student", net, {"role": "student", "input_size": 64})
    assert main(["qupath", *d, *SMALL, "qupath.slides=[synth_000]", "qupath.tumour_px=512", *PARAMS]) == 0
    doc = json.loads((tmp_path / "out/qupath/synth_000.geojson").read_text())
    from shapely.geometry import box, shape
    from shapely.ops import unary_union

    tumour = unary_union([shape(f["geometry"]) for f in doc["features"]
                          if f["properties"]["classification"]["name"] == "Tumor"])
    patches = unary_union([box(*shape(f["geometry"]).bounds) for f in doc["features"]
                           if f["properties"]["objectType"] == "detection"])
    assert tumour.area > 0 and tumour.intersection(patches).area / patches.area > 0.95
