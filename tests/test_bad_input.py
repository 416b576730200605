"""Bad input suite (issue #8): each bad input is one clear line naming the thing, and a cohort carries on.

Every case runs the real ``fbta`` CLI (in process) on real files: the real Aperio
slide and the real corrupt ``broken.svs`` from ../shared/data, synthetic Aperio
slides from ``fbta synth``, PNG/TIFF rasters, HDF5 feature files written by the
real writers, torch checkpoints saved by ``fbta train``. Outputs written before
a bad input arrives are hashed before and after: none may change.

| #  | case (input)                                   | expected behaviour                                                    |
|----|------------------------------------------------|-----------------------------------------------------------------------|
| 1  | corrupt slide (broken.svs; truncated .svs)     | tile: that slide fails, "<path>: corrupt or unsupported slide file"   |
| 1b | level-0 tiles spoiled after tiling             | extract: that slide fails, "<path>: read failed at (x, y) level 0: …" |
|    |                                                | on one line, also when a DataLoader worker found it                   |
| 2  | zero-byte slide                                | tile: "<path>: empty file (0 bytes)"                                  |
| 3  | no tissue (all-white PNG)                      | tile: "<path>: no tissue patches (tissue mask covers 0.0%; …)"        |
| 4  | slide smaller than one patch (100×100 PNG)     | tile: "<path>: slide is 100×100 px, smaller than one patch (…)"       |
| 5  | no MPP anywhere (PNG, TIFF)                    | tile: "<path>: no MPP (µm/px) in the slide metadata; set an 'mpp' …"; |
|    |                                                | following that advice (tile.default_mpp) tiles it                     |
| 6a | labels.csv row without a slide file            | tile: "<slides>/<id>: file not found"                                 |
| 6b | labels.csv: duplicate id, ``path`` outside the | exit 2, "<csv>[:line]: …" before anything is read or written          |
|    | slide folder, UTF-16, Latin-1                  |                                                                       |
| 6c | a label seen only in the test split            | train: exit 2, "… for class(es) rare; check labels.csv's split …"     |
| 7  | 8-d features, model trained on 16-d            | evaluate: exit 2 naming the folder and both sizes;                    |
|    |                                                | heatmap: that slide fails, "<file>: 8-d features, the model …"        |
| 7b | one 8-d file among 16-d ones                   | train: exit 2 naming the odd file(s) and sizes; no model written      |
| 8  | NaN/inf in a feature file                      | train: slide left out, "<file>: features contain NaN or inf …", the   |
|    |                                                | rest trains (finite weights); evaluate notes it; cluster and predict  |
|    |                                                | fail that slide only                                                  |
| 9  | params typo (trian.lr, train.lrr)              | exit 2, "<source>: unknown key 'trian.lr' (did you mean 'train.lr'?)" |
| 10 | checkpoint / extractor weights that are not a  | exit 2, "<file>: not a plain state dict: it holds a pickled Python    |
|    | state dict (object, code, wrapped, truncated)  | object (…)"; no pickled code runs                                     |

Per-slide failures (1-6a, 7 heatmap, 8) leave the other slides processed, exit 0
(1 with ``run.strict=true``), and nothing written before changes.
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from conftest import SHARED_SLIDES, pink_on_white
from fbta.cli import main
from fbta.io.h5 import read_features, write_features
from milcohort import SMALL_HEADS, make_cohort

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(ROOT / "params.yaml")]
EXTRACT = ["extract.model=test_resnet", "extract.weights=random", "extract.device=cpu", "extract.batch_size=16"]


def fbta(*args: str) -> int:
    return main([*args, *PARAMS])


# -- helpers ---------------------------------------------------------------------------------------------


def digests(root: Path, *patterns: str) -> dict[str, str]:
    """sha256 of every file matching ``patterns`` under ``root`` (what must survive a bad input untouched)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pattern in patterns for p in sorted(root.glob(pattern)) if p.is_file()}


def error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    """The stage's stderr: exactly one line, the CLI's error line."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fbta {command}: error: "), err
    return lines[0]


def statuses(out: Path, stage: str) -> dict[str, dict]:
    return {s["slide_id"]: s for s in json.loads((out / "reports/status" / f"{stage}.json").read_text())["slides"]}


def failure(out: Path, stage: str, slide_id: str, err: str) -> str:
    """The per-slide reason: one line in the stage report, and on exactly one stderr line."""
    s = statuses(out, stage)[slide_id]
    assert s["status"] == "failed" and "\n" not in s["reason"]
    assert "Traceback" not in err and sum(s["reason"] in line for line in err.splitlines()) == 1, err
    return s["reason"]


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def rewrite_features(path: Path, dim: int | None = None, poison: float | None = None) -> None:
    """Rewrite a feature file with the real writer: only its first ``dim`` columns, or one value set to ``poison``."""
    feats, coords, attrs = read_features(path)
    with h5py.File(path, "r") as f:
        coords_attrs = dict(f["coords"].attrs)
    feats = feats[:, :dim].copy() if dim else feats
    if poison is not None:
        feats[3, 2] = poison
    write_features(path, feats, coords, {**attrs, "dim": feats.shape[1]}, coords_attrs=coords_attrs)


def moved(ov: list[str], src: Path, dst: Path) -> list[str]:
    return [o.replace(str(src), str(dst)) for o in ov]


# -- slides: cases 1-6a ----------------------------------------------------------------------------------


def slide_ov(root: Path, *extra: str) -> list[str]:
    return [f"data.slides={root}/slides", f"data.labels={root}/labels.csv", f"data.out={root}/out",
            "run.progress=false", "tracking.enabled=false", *extra]


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, real_slide: Path) -> Path:
    """A cohort of the real Aperio slide, already tiled (shared, read-only: tests work on copies)."""
    root = tmp_path_factory.mktemp("tiled")
    (root / "slides").mkdir()
    (root / "slides/good.svs").symlink_to(real_slide)
    (root / "labels.csv").write_text("slide_id,label\ngood,normal\n")
    assert fbta("tile", *slide_ov(root)) == 0
    return root


def _broken(d: Path) -> Path:
    if not (SHARED_SLIDES / "broken.svs").exists():
        pytest.skip("broken.svs not found in ../shared/data/slides")
    (d / "broken.svs").symlink_to(SHARED_SLIDES / "broken.svs")
    return d / "broken.svs"


def _truncated(d: Path) -> Path:
    (d / "trunc.svs").write_bytes((SHARED_SLIDES / "cmu-1-small-region.svs").read_bytes()[:300_000])
    return d / "trunc.svs"


def _empty(d: Path) -> Path:
    (d / "empty.svs").write_bytes(b"")
    return d / "empty.svs"


def _png(name: str, rgb: np.ndarray) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        Image.fromarray(rgb).save(d / name)
        return d / name
    return make


def _tiff_without_mpp(d: Path) -> Path:
    tifffile.imwrite(d / "nompp_tif.tif", pink_on_white(1024, 768, (128, 128, 896, 640)))
    return d / "nompp_tif.tif"


BAD_SLIDES = [
    pytest.param("broken", _broken, None, "corrupt or unsupported slide file", id="1-corrupt-broken.svs"),
    pytest.param("trunc", _truncated, None, "corrupt or unsupported slide file", id="1-corrupt-truncated.svs"),
    pytest.param("empty", _empty, None, "empty file (0 bytes)", id="2-zero-byte"),
    pytest.param("blank", _png("blank.png", np.full((1024, 1024, 3), 242, np.uint8)), 0.5,
                 "no tissue patches (tissue mask covers 0.0%", id="3-no-tissue"),
    pytest.param("tiny", _png("tiny.png", pink_on_white(100, 100, (0, 0, 100, 100))), 0.5,
                 "slide is 100×100 px, smaller than one patch", id="4-smaller-than-a-patch"),
    pytest.param("nompp", _png("nompp.png", pink_on_white(1024, 768, (128, 128, 896, 640))), None,
                 "no MPP (µm/px) in the slide metadata; set an 'mpp' column in labels.csv or tile.default_mpp",
                 id="5-no-mpp-png"),
    pytest.param("nompp_tif", _tiff_without_mpp, None, "no MPP (µm/px) in the slide metadata", id="5-no-mpp-tiff"),
    pytest.param("ghost", lambda d: d / "ghost", None, "file not found", id="6a-unknown-slide-id"),
]


@pytest.mark.parametrize("sid, make, mpp, problem", BAD_SLIDES)
def test_a_bad_slide_fails_alone_in_one_line_and_the_good_slide_keeps_its_outputs(
        sid: str, make: Callable[[Path], Path], mpp: float | None, problem: str, tiled: Path, tmp_path: Path,
        capsys) -> None:
    root = copy_of(tiled, tmp_path / "c")
    before = digests(root / "out", "coords/*.h5", "reports/plots/thumbnails/*.png")
    bad = make(root / "slides")
    (root / "labels.csv").write_text(f"slide_id,label,mpp\ngood,normal,\n{sid},tumour,{mpp or ''}\n")
    capsys.readouterr()
    assert fbta("tile", *slide_ov(root)) == 0
    reason = failure(root / "out", "tile", sid, capsys.readouterr().err)
    assert reason.startswith(f"{bad}: ") and problem in reason
    assert statuses(root / "out", "tile")["good"]["status"] == "skipped"  # the cohort went on
    assert digests(root / "out", "coords/*.h5", "reports/plots/thumbnails/*.png") == before  # nothing new, nothing lost
    assert fbta("tile", *slide_ov(root), "run.strict=true") == 1


def test_a_slide_without_mpp_tiles_once_the_message_s_advice_is_followed(tiled: Path, tmp_path: Path) -> None:
    root = copy_of(tiled, tmp_path / "c")
    Image.fromarray(pink_on_white(1024, 768, (128, 128, 896, 640))).save(root / "slides/nompp.png")
    assert fbta("tile", *slide_ov(root)) == 0
    assert statuses(root / "out", "tile")["nompp"]["status"] == "failed"
    assert fbta("tile", *slide_ov(root, "tile.default_mpp=0.5"), "run.strict=true") == 0
    assert statuses(root / "out", "tile")["nompp"]["info"]["mpp_source"] == "tile.default_mpp"


def spoil_level0_tiles(svs: Path) -> None:
    """Overwrite every level-0 JPEG tile with 0xff bytes; the TIFF directory (and lower levels) stay intact."""
    with tifffile.TiffFile(svs) as tif:
        spans = list(zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts))
    with open(svs, "r+b") as fh:
        for offset, n in spans:
            fh.seek(offset)
            fh.write(b"\xff" * n)


def test_corrupt_tiles_found_by_an_extraction_worker_fail_that_slide_in_one_line(tmp_path: Path, capsys) -> None:
    ov = slide_ov(tmp_path, *EXTRACT, "extract.num_workers=1", f"data.masks={tmp_path}/masks")
    assert fbta("synth", *ov, "synth.n_slides=2", "synth.width=1536", "synth.height=1536") == 0
    assert fbta("tile", *ov) == 0
    assert fbta("extract", *ov, "run.slides=[synth_000]") == 0
    before = digests(tmp_path / "out", "coords/*.h5", "features/**/*.h5")
    spoil_level0_tiles(tmp_path / "slides/synth_001.svs")  # the disk rotted after tiling
    capsys.readouterr()
    assert fbta("extract", *ov) == 0
    reason = failure(tmp_path / "out", "extract", "synth_001", capsys.readouterr().err)
    assert str(tmp_path / "slides/synth_001.svs") in reason and "read failed at (" in reason and "level 0" in reason
    assert statuses(tmp_path / "out", "extract")["synth_000"]["status"] == "skipped"
    assert digests(tmp_path / "out", "coords/*.h5", "features/**/*.h5") == before


# -- labels.csv: cases 6b, 6c ----------------------------------------------------------------------------


@pytest.mark.parametrize("content, expected", [
    pytest.param(b"slide_id,label\ngood,normal\ngood,tumour\n",
                 ["labels.csv:3: duplicate slide_id 'good' (first on line 2)"], id="duplicate-id"),
    pytest.param(b"slide_id,label,path\ngood,normal,../../etc/passwd\n",
                 ["labels.csv:2: path '../../etc/passwd' leaves the slide folder"], id="path-traversal"),
    pytest.param(b"slide_id,label,path\ngood,normal,/etc/passwd\n",
                 ["labels.csv:2: path '/etc/passwd' leaves the slide folder"], id="absolute-path"),
    pytest.param("slide_id,label\ngood,normal\n".encode("utf-16"), ["labels.csv: UTF-16 text, not UTF-8"],
                 id="utf-16"),
    pytest.param("slide_id,label\ngood,normal\n".encode("utf-16-le"), ["labels.csv: UTF-16 text, not UTF-8"],
                 id="utf-16-without-bom"),
    pytest.param("slide_id,label\ngood,café\n".encode("latin-1"), ["labels.csv:2: not UTF-8 text (byte 0xe9"],
                 id="latin-1"),
])
def test_a_labels_csv_that_cannot_be_trusted_stops_the_stage_in_one_line_before_anything_is_written(
        content: bytes, expected: list[str], tiled: Path, tmp_path: Path, capsys) -> None:
    root = copy_of(tiled, tmp_path / "c")
    (root / "labels.csv").write_bytes(content)
    before = digests(root / "out", "**/*")
    capsys.readouterr()
    assert fbta("tile", *slide_ov(root)) == 2
    line = error_line(capsys, "tile")
    assert str(root / "labels.csv") in line and all(e in line for e in expected), line
    assert digests(root / "out", "**/*") == before


def test_a_label_seen_only_in_the_test_split_stops_training_naming_the_label(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"] + ["train.epochs=1"]
    labels = tmp_path / "labels.csv"
    assert "s06,normal,test" in labels.read_text()
    labels.write_text(labels.read_text().replace("s06,normal,test", "s06,rare,test"))
    assert fbta("train", *ov) == 2
    line = error_line(capsys, "train")
    assert "class(es) rare" in line and "split column" in line
    assert not list((tmp_path / "out").rglob("best.pt"))


# -- features: cases 7, 8 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """The tiny 16-d feature cohort with an ABMIL trained on it (shared, read-only: tests work on copies)."""
    root = tmp_path_factory.mktemp("trained")
    ov = make_cohort(root, n_per_class=4) + SMALL_HEADS["abmil"] + ["train.epochs=2"]
    assert fbta("train", *ov) == 0
    return root, ov


def workspace(trained: tuple[Path, list[str]], tmp_path: Path) -> tuple[Path, list[str]]:
    src, ov = trained
    return copy_of(src, tmp_path / "c"), moved(ov, src, tmp_path / "c")


def test_evaluate_refuses_features_of_another_size_than_the_model_in_one_line(trained, tmp_path: Path,
                                                                               capsys) -> None:
    root, ov = workspace(trained, tmp_path)
    for path in (root / "features/h5_files").glob("*.h5"):
        rewrite_features(path, dim=8)
    model = digests(root / "out", "models/**/*")
    capsys.readouterr()
    assert fbta("evaluate", *ov) == 2
    line = error_line(capsys, "evaluate")
    assert f"{root / 'features'}: 8-d features" in line and "trained on 16-d" in line
    assert digests(root / "out", "models/**/*") == model and not (root / "out/reports/metrics.json").exists()


def test_heatmap_fails_only_the_slide_whose_features_do_not_fit_the_model(trained, tmp_path: Path, capsys) -> None:
    root, ov = workspace(trained, tmp_path)
    odd = root / "features/h5_files/s07.h5"
    rewrite_features(odd, dim=8)
    capsys.readouterr()
    assert fbta("heatmap", *ov, "heatmap.slides=[s06,s07]") == 0
    reason = failure(root / "out", "heatmap", "s07", capsys.readouterr().err)
    assert reason == f"{odd}: 8-d features, the model expects 16-d"
    assert statuses(root / "out", "heatmap")["s06"]["status"] == "done"
    assert fbta("heatmap", *ov, "heatmap.slides=[s06,s07]", "run.strict=true") == 1


def test_training_refuses_a_cohort_whose_feature_files_disagree_on_the_size(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"] + ["train.epochs=1"]
    rewrite_features(tmp_path / "features/h5_files/s03.h5", dim=8)
    assert fbta("train", *ov) == 2
    line = error_line(capsys, "train")
    assert f"{tmp_path / 'features'}: feature files disagree on the feature size" in line
    assert "16-d in 7 file(s)" in line and "8-d in 1 file(s) (s03)" in line
    assert not list((tmp_path / "out").rglob("best.pt"))


def test_nan_or_inf_features_are_left_out_of_training_by_file_name_and_the_rest_trains(tmp_path: Path,
                                                                                       capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=8) + SMALL_HEADS["abmil"] + ["train.epochs=2"]
    feats = tmp_path / "features/h5_files"
    rewrite_features(feats / "s00.h5", poison=float("nan"))  # a training slide
    rewrite_features(feats / "s09.h5", poison=float("inf"))  # a validation slide
    before = digests(feats, "*.h5")
    capsys.readouterr()
    assert fbta("train", *ov) == 0
    err = capsys.readouterr().err
    for sid in ("s00", "s09"):
        assert failure(tmp_path / "out", "train", sid, err) == (
            f"{feats / sid}.h5: features contain NaN or inf (first in row 3); re-extract this slide")
    folder = tmp_path / "out/models/vanilla_abmil"
    split = json.loads((folder / "meta.json").read_text())["split"]
    assert "s00" not in split["train"] and "s09" not in split["val"] and len(split["train"]) == 7
    state = torch.load(folder / "best.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert digests(feats, "*.h5") == before
    assert fbta("train", *ov, "run.strict=true") == 1


def test_evaluate_scores_the_test_split_without_a_nan_slide_and_says_which(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=8) + SMALL_HEADS["abmil"] + ["train.epochs=2"]
    assert fbta("train", *ov) == 0
    bad = tmp_path / "features/h5_files/s13.h5"  # a test slide whose cached features rotted after training
    rewrite_features(bad, poison=float("nan"))
    capsys.readouterr()
    assert fbta("evaluate", *ov) == 0
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if "s13" in ln] == [
        f"note: test slide s13 left out: {bad}: features contain NaN or inf (first in row 3); re-extract this slide"]
    metrics = json.loads((tmp_path / "out/reports/metrics.json").read_text())["classification"]["vanilla"]
    assert metrics["n"] == 3


def test_cluster_fails_only_the_slide_with_nan_features(tmp_path: Path, capsys) -> None:
    ov = make_cohort(tmp_path, n_per_class=4)
    bad = tmp_path / "features/h5_files/s00.h5"
    rewrite_features(bad, poison=float("-inf"))
    capsys.readouterr()
    assert fbta("cluster", *ov) == 0
    reason = failure(tmp_path / "out", "cluster", "s00", capsys.readouterr().err)
    assert reason.startswith(f"{bad}: ") and "features contain NaN/inf in 1 of 30 rows" in reason
    done = [s for s, st in statuses(tmp_path / "out", "cluster").items() if st["status"] == "done"]
    assert len(done) == 7 and not (tmp_path / "out/clusters/features/s00.h5").exists()


def test_predict_fails_only_the_new_slide_whose_cached_features_are_nan_or_the_wrong_size(tmp_path: Path,
                                                                                          capsys) -> None:
    """The champion from the registry (pyfunc); its input check once raised past the per-slide handler."""
    ov = make_cohort(tmp_path, n_per_class=4) + SMALL_HEADS["abmil"] + [
        "train.epochs=2", "tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_root={tmp_path}/mlruns", "register.models=[classifier]", *EXTRACT,
        "extract.num_workers=0", f"predict.slides={tmp_path}/new", f"predict.out={tmp_path}/new_out"]
    for path in (tmp_path / "features/h5_files").glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f.attrs["extractor"] = "test_resnet"  # what predict checks the new features against
    assert fbta("train", *ov) == 0 and fbta("register", *ov) == 0
    (tmp_path / "new").mkdir()  # slides already archived; their features are in the predict cache
    (tmp_path / "new/labels.csv").write_text("slide_id,label\nn0,normal\nn1,tumour\nn2,normal\n")
    cache = tmp_path / "new_out/features/test_resnet/h5_files"
    cache.mkdir(parents=True)
    for new, old in (("n0", "s06"), ("n1", "s07"), ("n2", "s04")):
        shutil.copy(tmp_path / "features/h5_files" / f"{old}.h5", cache / f"{new}.h5")
    rewrite_features(cache / "n1.h5", poison=float("nan"))
    rewrite_features(cache / "n2.h5", dim=8)
    before = digests(cache, "*.h5")
    capsys.readouterr()
    assert fbta("predict", *ov) == 0
    assert "Traceback" not in capsys.readouterr().err
    with open(tmp_path / "out/reports/predictions/predictions.csv") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert rows["n0"]["status"] == "done" and rows["n0"]["predicted"] in ("normal", "tumour")
    assert rows["n1"]["status"] == "failed" and rows["n1"]["reason"] == (
        f"{cache / 'n1.h5'}: features contain NaN or inf; re-extract this slide")
    assert rows["n2"]["status"] == "failed" and rows["n2"]["reason"] == (
        f"{cache / 'n2.h5'}: 8-d features, the model expects 16-d")
    assert digests(cache, "*.h5") == before


# -- params: case 9 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where, typo, expected", [
    pytest.param("override", "trian.lr=0.001", "override 'trian.lr=0.001': unknown key 'trian.lr' "
                 "(did you mean 'train.lr'?)", id="override-section"),
    pytest.param("override", "train.lrr=0.001", "override 'train.lrr=0.001': unknown key 'train.lrr' "
                 "(did you mean 'train.lr'?)", id="override-key"),
    pytest.param("file", ("\ntrain:", "\ntrian:"), "unknown key 'trian.method' (did you mean 'train.method'?)",
                 id="params-file-section"),
    pytest.param("file", ("\n  lr: 0.001 ", "\n  lrr: 0.001 "), "unknown key 'train.lrr' (did you mean 'train.lr'?)",
                 id="params-file-key"),
])
def test_a_params_typo_is_one_line_naming_the_key_and_its_nearest_valid_name(
        where: str, typo, expected: str, tmp_path: Path, capsys) -> None:
    ov = [f"data.out={tmp_path}/out", "tracking.enabled=false"]
    if where == "override":
        args = ["train", *ov, typo, *PARAMS]
        source = ""
    else:
        text = (ROOT / "params.yaml").read_text()
        assert text.count(typo[0]) == 1
        params = tmp_path / "params.yaml"
        params.write_text(text.replace(*typo))
        args = ["train", *ov, "--params", str(params)]
        source = f"{params}: "
    assert main(args) == 2
    assert error_line(capsys, "train") == f"fbta train: error: {source}{expected}"
    assert not (tmp_path / "out").exists()


# -- checkpoints: case 10 --------------------------------------------------------------------------------


class NotAStateDict:
    """What a ``torch.save(model)``-style checkpoint holds: an arbitrary Python object."""

    def __init__(self) -> None:
        self.weights = [1.0, 2.0]


class RunsCodeOnLoad:
    """A pickle that creates ``marker`` if anything ever unpickles it without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return open, (self.marker, "w")


@pytest.mark.parametrize("spoil, problem", [
    pytest.param(lambda p, m: torch.save(NotAStateDict(), p),
                 f"not a plain state dict: it holds a pickled Python object ({__name__}.NotAStateDict)",
                 id="pickled-object"),
    pytest.param(lambda p, m: torch.save(RunsCodeOnLoad(m), p),
                 "not a plain state dict: it holds a pickled Python object", id="pickle-that-runs-code"),
    pytest.param(lambda p, m: torch.save({"model": torch.load(p, weights_only=True), "epoch": 3}, p),
                 "not a plain state dict (a dict whose 'model' is not a tensor)", id="wrapped-state-dict"),
    pytest.param(lambda p, m: p.write_bytes(p.read_bytes()[:200]),
                 "not a loadable torch checkpoint, truncated or corrupt", id="truncated"),
])
def test_a_checkpoint_that_is_not_a_state_dict_is_refused_in_one_line_and_runs_nothing(
        spoil: Callable[[Path, Path], None], problem: str, trained, tmp_path: Path, capsys) -> None:
    root, ov = workspace(trained, tmp_path)
    best = root / "out/models/vanilla_abmil/best.pt"
    marker = tmp_path / "code-ran"
    spoil(best, marker)
    before = digests(root / "out", "models/**/*")
    capsys.readouterr()
    assert fbta("evaluate", *ov) == 2
    line = error_line(capsys, "evaluate")
    assert line.startswith(f"fbta evaluate: error: {best}: {problem}"), line
    assert not marker.exists()
    assert digests(root / "out", "models/**/*") == before and not (root / "out/reports/metrics.json").exists()


def test_extractor_weights_that_pickle_an_object_are_refused_in_one_line(tiled: Path, tmp_path: Path,
                                                                         capsys) -> None:
    root = copy_of(tiled, tmp_path / "c")
    weights = tmp_path / "weights.pth"
    torch.save(NotAStateDict(), weights)
    capsys.readouterr()
    assert fbta("extract", *slide_ov(root), *EXTRACT, f"extract.weights={weights}") == 2
    line = error_line(capsys, "extract")
    assert f"test_resnet: {weights} is not a plain state dict: it holds a pickled Python object" in line
    assert not (root / "out/features").exists()
