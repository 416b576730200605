"""Feature extraction: the contract's files, in coords order, resumable, readable by CLAM/TRIDENT tools."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fbta.cli import main
from fbta.config import load_config
from fbta.features.extract import SlidePatches, extract_patches
from fbta.features.registry import create_extractor
from fbta.io.h5 import feature_files, read_coords, read_features, write_features
from fbta.slides.reader import open_slide

ROOT = Path(__file__).resolve().parents[1]

MODEL = "test_resnet"


@pytest.fixture
def tiled(tmp_path: Path, real_slide: Path, broken_slide: Path) -> dict[str, Path]:
    slides = tmp_path / "slides"
    slides.mkdir()
    for p in (real_slide, broken_slide):
        (slides / p.name).symlink_to(p)
    d = {"slides": slides, "out": tmp_path / "out", "labels": tmp_path / "none.csv"}
    assert main(["tile", *overrides(d)]) == 0
    return d


def overrides(d: dict[str, Path], *extra: str) -> list[str]:
    return [f"data.slides={d['slides']}", f"data.labels={d['labels']}", f"data.out={d['out']}", "run.progress=false",
            f"extract.model={MODEL}", "extract.weights=random", "extract.batch_size=16", "extract.num_workers=0",
            *extra]


def test_features_file_matches_the_contract_and_the_coords_order(tiled, capsys):
    assert main(["extract", *overrides(tiled)]) == 0
    out = capsys.readouterr()
    assert "1 done" in out.out and "not tiled (" in out.err and "broken.svs: corrupt" in out.err
    fpath = tiled["out"] / f"features/{MODEL}/h5_files/cmu-1-small-region.h5"
    feats, coords, attrs = read_features(fpath)
    tile_coords, _ = read_coords(tiled["out"] / "coords/cmu-1-small-region.h5")
    assert feats.dtype == np.float32 and feats.shape == (len(tile_coords), 96)
    assert np.array_equal(coords, tile_coords)
    assert attrs["extractor"] == MODEL and attrs["target_mpp"] == 0.5 and "random" in attrs["weights"]
    with h5py.File(fpath) as f:
        assert f["coords"].attrs["patch_size"] == 256  # coords attributes travel with the features
    # row i is the feature of the patch at coords[i]
    assert attrs["input_size"] == load_config(ROOT / "params.yaml").extract.input_size  # extract.input_size reached the net
    ext = create_extractor(MODEL, weights="random", input_size=attrs["input_size"])
    with open_slide(tiled["slides"] / "cmu-1-small-region.svs") as s:
        x, y = coords[5]
        patch = torch.from_numpy(s.read_patch(int(x), int(y), 0, 256, 256))[None]
    with torch.inference_mode():
        direct = ext(ext.preprocess(patch)).numpy()[0]
    np.testing.assert_allclose(feats[5], direct, rtol=1e-4, atol=1e-4)


def test_worker_processes_give_the_same_features_as_the_main_process(tiled):
    coords, attrs = read_coords(tiled["out"] / "coords/cmu-1-small-region.h5")
    ds = SlidePatches(tiled["slides"] / "cmu-1-small-region.svs", coords[:12], attrs)
    ext = create_extractor(MODEL, weights="random")
    a = extract_patches(ds, ext, torch.device("cpu"), batch_size=5, num_workers=0)
    b = extract_patches(ds, ext, torch.device("cpu"), batch_size=4, num_workers=2)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rerun_skips_done_slides_and_a_new_model_gets_its_own_folder(tiled, capsys):
    main(["extract", *overrides(tiled)])
    fpath = tiled["out"] / f"features/{MODEL}/h5_files/cmu-1-small-region.h5"
    before = fpath.stat().st_mtime_ns
    capsys.readouterr()
    main(["extract", *overrides(tiled)])
    assert "1 skipped" in capsys.readouterr().out and fpath.stat().st_mtime_ns == before
    status = json.loads((tiled["out"] / "reports/status/extract.json").read_text())
    assert status["counts"]["skipped"] == 1


def test_cluster_stage_caches_labels_with_their_provenance(tiled, capsys):
    main(["extract", *overrides(tiled)])
    assert main(["cluster", *overrides(tiled, "cluster.n_clusters=8", "cluster.seed=3")]) == 0
    with h5py.File(tiled["out"] / f"clusters/{MODEL}/cmu-1-small-region.h5") as f:
        labels = f["labels"][:]
        assert f.attrs["n_clusters"] == 8 and f.attrs["seed"] == 3 and len(set(labels.tolist())) == 8
        assert "features_params" in f.attrs
    capsys.readouterr()
    main(["cluster", *overrides(tiled, "cluster.n_clusters=8", "cluster.seed=3")])
    assert "1 skipped" in capsys.readouterr().out


def test_existing_clam_and_trident_feature_folders_can_be_read(tmp_path: Path):
    rng = np.random.default_rng(0)
    feats, coords = rng.normal(size=(7, 1024)).astype(np.float32), rng.integers(0, 10_000, (7, 2))
    clam = tmp_path / "clam_feats" / "h5_files"
    clam.mkdir(parents=True)
    with h5py.File(clam / "TCGA-XX.h5", "w") as f:  # CLAM writes N×1024 features + coords, no attributes
        f["features"] = feats
        f["coords"] = coords
    trident = tmp_path / "features_uni_v1"
    write_features(trident / "slide_b.h5", feats[:3], coords[:3], {"extractor": "uni_v1"})
    for folder, sid, n in [(tmp_path / "clam_feats", "TCGA-XX", 7), (trident, "slide_b", 3)]:
        files = feature_files(folder)
        assert list(files) == [sid]
        f2, c2, _ = read_features(files[sid])
        np.testing.assert_array_equal(f2, feats[:n])
        np.testing.assert_array_equal(c2, coords[:n])


def test_cluster_runs_on_an_existing_clam_folder(tmp_path: Path):
    folder = tmp_path / "clam_feats"
    (folder / "h5_files").mkdir(parents=True)
    rng = np.random.default_rng(1)
    with h5py.File(folder / "h5_files" / "TCGA-YY.h5", "w") as f:
        f["features"] = rng.normal(size=(40, 32)).astype(np.float32)
        f["coords"] = rng.integers(0, 5000, (40, 2))
    out = tmp_path / "out"
    assert main(["cluster", f"data.features={folder}", f"data.out={out}", "cluster.n_clusters=5",
                 "run.progress=false", "run.strict=true"]) == 0
    with h5py.File(out / "clusters/clam_feats/TCGA-YY.h5") as f:
        assert f["labels"].shape == (40,) and f.attrs["n_clusters"] == 5
        assert f.attrs["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # cluster.device=auto reached it


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cluster_on_a_device_the_machine_lacks_is_one_line_naming_the_setting(tmp_path: Path, capsys):
    folder = tmp_path / "feats"
    write_features(folder / "s.h5", np.zeros((4, 8), np.float32), np.zeros((4, 2), np.int64), {"extractor": "x"})
    assert main(["cluster", f"data.features={folder}", f"data.out={tmp_path / 'out'}", "cluster.device=cuda",
                 "run.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "cluster.device='cuda'" in err and "no CUDA device" in err


def test_extract_says_when_patches_are_shrunk_below_the_models_own_input() -> None:
    from fbta.stages.extract import input_size_note

    assert "112 px, below the 224 px" in input_size_note(112, 224)
    assert input_size_note(224, 224) == "" and input_size_note(256, 224) == ""
