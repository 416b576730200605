"""``fbta predict``: batch inference on a folder of new slides with the champion classifier.

tile → extract (the ``fbta tile`` / ``fbta extract`` stages themselves, pointed
at ``predict.slides`` with outputs in ``predict.out``, so they resume and
report per-slide failures the same way) → the registered pyfunc model
(``models:/fbta-classifier@champion`` by default: translator → EMA MIL on the
cached frozen features, no patch re-read) → one row per slide in
``<data.out>/reports/predictions/<predict.name>.{csv,json}``. A slide that
could not be tiled or extracted gets a ``failed`` row with the reason.
The model's extractor (recorded at ``fbta register``) must be the one that
made the new features: another extractor's features would be silently wrong.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from omegaconf import DictConfig

from fbta.config import ConfigError, InputError
from fbta.io.atomic import atomic_write_text
from fbta.io.metrics import write_csv
from fbta.mil.data import check_bag
from fbta.stages.common import out_dir
from fbta.slide_status import StageReport
from fbta.tracking import stage_run
from fbta.tune.space import with_values


@dataclass
class Model:
    """A loaded classifier: probabilities of one bag, its classes, where it came from."""

    predict_proba: Callable[[np.ndarray], np.ndarray]
    classes: list[str]
    in_dim: int
    info: dict[str, Any] = field(default_factory=dict)  # uri, name, version, run id, extractor …


def slides_config(cfg: DictConfig) -> DictConfig:
    """The config ``tile``/``extract`` run with for the new slides (outputs under ``predict.out``)."""
    p = cfg.predict
    if not Path(p.slides).is_dir():
        raise InputError(f"{p.slides}: slide folder not found (set predict.slides)")
    if p.labels and not Path(p.labels).is_file():
        raise InputError(f"{p.labels}: predict.labels file not found")
    return with_values(cfg, {
        "data.slides": str(p.slides), "data.labels": str(p.labels or Path(p.slides, "labels.csv")),
        "data.out": str(p.out or Path(cfg.data.out, "predict")), "data.features": None, "data.masks": None,
    })


def prepare(cfg: DictConfig) -> DictConfig:
    """Tile and extract the new slides (resumable: complete outputs are skipped)."""
    from fbta.stages import extract, tile

    scfg = slides_config(cfg)
    tile.run(scfg)
    extract.run(scfg)
    return scfg


def load_model(cfg: DictConfig, dst: Path) -> Model:
    """``predict.model``: a registry / run URI (downloaded, loaded as pyfunc) or a model folder."""
    uri = str(cfg.predict.model)
    if "://" in uri or uri.startswith(("models:/", "runs:/")):
        return _load_pyfunc(cfg, uri, dst)
    from fbta.e2e.classifier import load_classifier
    from fbta.registry.publish import extractor_of

    clf = load_classifier(uri)
    return Model(clf.predict_proba, clf.classes, clf.in_dim,
                 {"uri": str(Path(uri).resolve()), **{f"fbta.{k}": v for k, v in extractor_of(clf.meta).items()}})


def _load_pyfunc(cfg: DictConfig, uri: str, dst: Path) -> Model:
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from fbta.registry.publish import resolve_model_uri

    if not cfg.tracking.uri:
        raise ConfigError(f"predict.model={uri} needs tracking.uri (the MLflow store holding the registry)")
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    source, mv = resolve_model_uri(client, uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                    tracking_uri=cfg.tracking.uri)
    except Exception as exc:  # noqa: BLE001 - missing artefacts, bad URI
        raise InputError(f"{uri}: cannot download the model ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    model = mlflow.pyfunc.load_model(local)
    clf = model.unwrap_python_model().clf

    def proba(bag: np.ndarray) -> np.ndarray:
        return model.predict(bag).to_numpy(dtype=np.float64)[0]

    info: dict[str, Any] = {"uri": uri, "source": source}
    if mv is not None:
        info.update({"name": mv.name, "version": str(mv.version), "run_id": mv.run_id,
                     **{k: v for k, v in (mv.tags or {}).items() if k.startswith("fbta.")}})
    return Model(proba, list(clf.classes), int(clf.in_dim), info)


def check_features(model: Model, attrs: dict[str, Any], path: Path) -> None:
    """The new features must come from the extractor (and weights) the model was trained on."""
    for key in ("extractor", "weights"):
        want, got = model.info.get(f"fbta.{key}"), attrs.get(key)
        if want and got and str(want) != str(got):
            raise InputError(f"{path}: features made with {key} '{got}', but the model was trained on '{want}' "
                             f"features; set extract.{'model' if key == 'extractor' else 'weights'} to match")


def classify(cfg: DictConfig, scfg: DictConfig, model: Model) -> tuple[list[dict[str, Any]], StageReport]:
    """One row per new slide: probabilities and the predicted class, or why it has none."""
    from fbta.io.h5 import read_features
    from fbta.slides.cohort import discover
    from fbta.stages.common import features_dir, tile_failure

    feats = features_dir(scfg) / "h5_files"
    extract_status = _failures(Path(scfg.data.out, "reports", "status", "extract.json"))
    report = StageReport("predict")
    rows: list[dict[str, Any]] = []
    for entry in discover(scfg.data.slides, scfg.data.labels):
        sid = entry.slide_id
        row: dict[str, Any] = {"slide_id": sid, "label": entry.label or "", "status": "done", "predicted": "",
                               "n_patches": 0, **{f"prob_{c}": "" for c in model.classes}, "reason": ""}
        path = feats / f"{sid}.h5"
        try:
            if not path.is_file():
                why = tile_failure(scfg, sid) or extract_status.get(sid) or "no features"
                raise InputError(why)
            bag, _, attrs = read_features(path)
            check_features(model, attrs, path)
            check_bag(path, bag, model.in_dim)  # before the pyfunc, whose own check would end the batch
            probs = model.predict_proba(bag)
        except (InputError, OSError, KeyError, ValueError) as exc:
            if isinstance(exc, InputError) and "trained on" in str(exc):
                raise  # the wrong extractor for every slide: one clear error, not N failed rows
            row.update(status="failed", reason=str(exc))
            report.failed(sid, str(exc))
            rows.append(row)
            continue
        row.update(predicted=model.classes[int(np.argmax(probs))], n_patches=int(len(bag)),
                   **{f"prob_{c}": round(float(p), 6) for c, p in zip(model.classes, probs)})
        report.done(sid, 0.0, predicted=row["predicted"], patches=int(len(bag)))
        rows.append(row)
    return rows, report


def _failures(status: Path) -> dict[str, str]:
    try:
        return {s["slide_id"]: s["reason"] for s in json.loads(status.read_text())["slides"] if s["status"] == "failed"}
    except (OSError, ValueError, KeyError):
        return {}


def write_predictions(cfg: DictConfig, scfg: DictConfig, model: Model, rows: list[dict[str, Any]]) -> Path:
    """``reports/predictions/<name>.csv`` and ``.json`` under ``data.out``; the JSON path."""
    dest = out_dir(cfg, "reports", "predictions")
    name = cfg.predict.name
    fields = ["slide_id", "label", "status", "predicted", *[f"prob_{c}" for c in model.classes], "n_patches", "reason"]
    write_csv(dest / f"{name}.csv", rows, fields)
    payload = {"model": model.info, "classes": model.classes, "slides_folder": str(scfg.data.slides),
               "features": str(Path(scfg.data.out, "features", scfg.extract.model)),
               "counts": {s: sum(r["status"] == s for r in rows) for s in ("done", "failed")}, "slides": rows}
    atomic_write_text(dest / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    return dest / f"{name}.json"


def check_extractor(cfg: DictConfig, model: Model) -> None:
    """Fail before extracting anything when ``extract.model`` is not the model's extractor."""
    want = model.info.get("fbta.extractor")
    if want and want != cfg.extract.model:
        raise ConfigError(f"{model.info.get('uri')} was trained on '{want}' features but extract.model="
                          f"{cfg.extract.model}; run with extract.model={want}")


def predict_slides(cfg: DictConfig, scfg: DictConfig, model: Model) -> Path:
    """Classify the already tiled/extracted new slides; write and return the predictions JSON."""
    rows, report = classify(cfg, scfg, model)
    path = write_predictions(cfg, scfg, model, rows)
    report.write(out_dir(scfg, "reports", "status") / "predict.json")
    tags = {"fbta.model_uri": model.info.get("uri", ""), "fbta.model_version": model.info.get("version", ""),
            "fbta.data_out": cfg.data.out}
    with stage_run(cfg, "predict", f"predict-{cfg.predict.name}", tags) as mlrun:
        mlrun.log_metrics({"slides_done": report.count("done"), "slides_failed": report.count("failed")})
        mlrun.log_artifact(path, "predictions")
        mlrun.log_artifact(path.with_suffix(".csv"), "predictions")
    what = f"{model.info.get('name')} v{model.info['version']}" if model.info.get("version") else model.info["uri"]
    print(f"predict: {report.count('done')} slide(s) classified with {what}, {report.count('failed')} failed "
          f"→ {path.with_suffix('.csv')}", flush=True)
    for r in rows:
        probs = " ".join(f"{c} {r[f'prob_{c}']:.3f}" for c in model.classes) if r["status"] == "done" else r["reason"]
        print(f"  {r['slide_id']:<24} {r['predicted'] or 'failed':<10} {probs}", flush=True)
    return path


def run(cfg: DictConfig, scfg: Optional[DictConfig] = None) -> int:
    """Load the model first (a wrong extractor fails before any extraction), then tile, extract, classify."""
    with tempfile.TemporaryDirectory(prefix="fbta-model-") as tmp:
        model = load_model(cfg, Path(tmp))
        check_extractor(cfg, model)
        scfg = scfg or prepare(cfg)
        path = predict_slides(cfg, scfg, model)
    failed = json.loads(path.read_text())["counts"]["failed"]
    return 1 if cfg.run.strict and failed else 0
