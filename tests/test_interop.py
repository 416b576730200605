"""Our files read by someone else's loader, and their layouts read by us.

The third-party reader is torchmil's ``TridentWSIDataset`` (Apache-2, a pinned
test dependency): it is what a user of TRIDENT-style folders would load our
output with. CLAM's ``pt_files`` are written the way CLAM writes them
(``torch.save`` of the N×D tensor).
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fbta.cli import main
from fbta.io.h5 import feature_files, read_coords, read_features
from milcohort import SMALL_HEADS, make_cohort

torchmil = pytest.importorskip("torchmil.datasets", reason="torchmil is a pinned test dependency (make venv)")

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(ROOT / "params.yaml")]
MODEL = "test_resnet"


def fbta(*args: str) -> int:
    return main([*args, *PARAMS])


def labels_csv(path: Path, ids: list[str], labels: list[int]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label"])
        w.writerows(zip(ids, labels))
    return path


def trident_dataset(base: Path, extractor: str, labels: Path, patch_size: int):  # noqa: ANN201
    return torchmil.TridentWSIDataset(base_path=f"{base}/", labels_path=str(labels), feature_extractor=extractor,
                                      patch_size=patch_size, wsi_name_col="slide_id", wsi_label_col="label",
                                      bag_keys=["X", "Y", "adj", "coords"])


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, real_slide: Path) -> dict[str, Path]:
    """The real CMU-1 region tiled and extracted by the real stages (random test_resnet weights)."""
    root = tmp_path_factory.mktemp("interop")
    slides = root / "slides"
    slides.mkdir()
    (slides / real_slide.name).symlink_to(real_slide)
    ov = [f"data.slides={slides}", f"data.labels={root / 'none.csv'}", f"data.out={root / 'out'}",
          "run.progress=false", f"extract.model={MODEL}", "extract.weights=random", "extract.batch_size=16",
          "extract.num_workers=0", "extract.device=cpu"]
    assert fbta("tile", *ov) == 0 and fbta("extract", *ov) == 0
    return {"root": root, "out": root / "out", "ov": ov, "sid": real_slide.stem}  # type: ignore[dict-item]


def test_export_gives_a_trident_tree_that_torchmil_reads_back_exactly(extracted, capsys) -> None:
    out, sid = extracted["out"], extracted["sid"]
    capsys.readouterr()
    assert fbta("export", *extracted["ov"]) == 0
    printed = capsys.readouterr().out
    feats, coords, _ = read_features(out / f"features/{MODEL}/h5_files/{sid}.h5")
    _, attrs = read_coords(out / f"coords/{sid}.h5")
    base = out / "trident" / f"{attrs['target_magnification']}x_{attrs['patch_size']}px_{attrs['overlap']}px_overlap"
    assert base.name == "20x_256px_0px_overlap" and str(base) in printed
    assert (base / f"features_{MODEL}/{sid}.h5").samefile(out / f"features/{MODEL}/h5_files/{sid}.h5")  # a link
    assert (base / f"patches/{sid}_patches.h5").is_file()
    ds = trident_dataset(base, MODEL, labels_csv(extracted["root"] / "labels.csv", [sid], [1]),
                         attrs["patch_size_level0"])
    bag = ds[0]
    np.testing.assert_array_equal(bag["X"].numpy(), feats)
    np.testing.assert_array_equal(bag["coords"].numpy(), coords // attrs["patch_size_level0"])
    assert int(bag["Y"]) == 1 and bag["adj"].shape == (len(feats), len(feats))
    # TRIDENT's documented attributes on the patches file, as its slide encoders read them
    with h5py.File(base / f"patches/{sid}_patches.h5") as f:
        for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap"):
            assert key in f["coords"].attrs, key
    # a second export is idempotent (links replaced atomically, nothing duplicated)
    assert fbta("export", *extracted["ov"], "export.link=copy") == 0
    assert sorted(p.name for p in (base / f"features_{MODEL}").iterdir()) == [f"{sid}.h5"]


def test_export_refuses_an_unknown_link_mode_in_one_line(extracted, capsys) -> None:
    assert fbta("export", *extracted["ov"], "export.link=teleport") == 2
    assert "export.link='teleport' must be one of hardlink, symlink, copy" in capsys.readouterr().err


def as_trident(root: Path) -> Path:
    """Move the toy cohort's feature files into TRIDENT's tree, the way TRIDENT writes it."""
    base = root / "tri" / "20x_256px_0px_overlap"
    feats, patches = base / "features_toy", base / "patches"
    feats.mkdir(parents=True)
    patches.mkdir()
    for p in sorted((root / "features/h5_files").glob("*.h5")):
        shutil.move(p, feats / p.name)
        with h5py.File(feats / p.name) as src, h5py.File(patches / f"{p.stem}_patches.h5", "w") as dst:
            c = dst.create_dataset("coords", data=src["coords"][:])
            c.attrs.update({"patch_size": 256, "patch_size_level0": 256, "level0_magnification": 20,
                            "target_magnification": 20, "overlap": 0, "name": p.stem})
    shutil.rmtree(root / "features")
    return base


def test_a_trident_tree_that_torchmil_reads_is_trained_on_by_fbta(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"] + ["train.epochs=2"]
    base = as_trident(tmp_path)
    with open(tmp_path / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    ds = trident_dataset(base, "toy", labels_csv(tmp_path / "tm.csv", [r["slide_id"] for r in rows],
                                                 [int(r["label"] == "tumour") for r in rows]), 256)
    assert len(ds) == 8  # the third-party reader accepts the tree we are about to train on
    ov = [o for o in ov if not o.startswith("data.features=")]
    assert fbta("train", *ov, f"data.features={base}") == 2  # the tiling root, not a features folder
    assert "set data.features to " + str(base / "features_toy") in capsys.readouterr().err
    assert fbta("train", *ov, f"data.features={base / 'features_toy'}") == 0
    assert fbta("evaluate", *ov, f"data.features={base / 'features_toy'}") == 0
    metrics = json.loads((tmp_path / "out/reports/metrics.json").read_text())
    assert metrics["classification"]["vanilla"]["n"] == 2  # both test slides scored from the TRIDENT files


def test_clam_pt_files_train_and_a_stage_that_needs_coords_says_they_are_missing(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"] + ["train.epochs=2"]
    h5s, pts = tmp_path / "features/h5_files", tmp_path / "features/pt_files"
    pts.mkdir()
    expected = {}
    for p in sorted(h5s.glob("*.h5")):
        feats, _, _ = read_features(p)
        torch.save(torch.from_numpy(feats), pts / f"{p.stem}.pt")  # CLAM: torch.save(features, pt_path)
        expected[p.stem] = feats
    shutil.rmtree(h5s)
    files = feature_files(tmp_path / "features")
    assert sorted(files) == sorted(expected) and all(f.suffix == ".pt" for f in files.values())
    feats, _, attrs = read_features(files["s00"])
    np.testing.assert_array_equal(feats, expected["s00"])
    assert attrs["fbta_coords"] == "missing"
    assert fbta("train", *ov) == 0 and fbta("evaluate", *ov) == 0
    capsys.readouterr()
    assert fbta("heatmap", *ov, "heatmap.slides=[s00]", "run.strict=true") == 1
    err = capsys.readouterr().err
    assert f"{files['s00']}: no patch coordinates" in err and "a heatmap needs them" in err


def test_a_pt_file_that_is_not_a_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "pt_files" / "x.pt"
    bad.parent.mkdir()
    torch.save({"features": torch.zeros(3, 4)}, bad)
    with pytest.raises(ValueError, match=r"x\.pt: a CLAM \.pt feature file holds one N×D tensor, found dict"):
        read_features(bad)
