"""``fbta-batch-infer``: new slides → tile → extract → the ``@champion`` classifier → predictions.

Run it directly (``python flows/batch_infer.py /path/to/slides [key=value ...]``)
or through the deployment ``fbta-batch-infer/local`` (``make serve``, then
``prefect deployment run 'fbta-batch-infer/local' --param slides=/path/to/slides``).
Each step is the library's own stage (``fbta tile`` / ``fbta extract`` pointed
at the new slides, then ``fbta predict``'s classification), so outputs,
resumption and per-slide failure reports are those of ``fbta predict``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # before prefect reads its settings:
# its 20 s default times out on a busy machine (issue #27); an explicit value in the environment wins

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_table_artifact  # noqa: E402

DEFAULT_PARAMS = str(Path(__file__).resolve().parent.parent / "params.yaml")


def _cfg(params: str, overrides: list[str]) -> Any:
    from fbta.config import load_config

    return load_config(params, overrides)


@task(name="predict-tile", task_run_name="tile")
def tile_slides(params: str, overrides: list[str]) -> int:
    from fbta.stages import tile
    from fbta.stages.predict import slides_config

    return tile.run(slides_config(_cfg(params, overrides)))


@task(name="predict-extract", task_run_name="extract")
def extract_slides(params: str, overrides: list[str]) -> int:
    from fbta.stages import extract
    from fbta.stages.predict import slides_config

    return extract.run(slides_config(_cfg(params, overrides)))


@task(name="predict-classify", task_run_name="classify")
def classify_slides(params: str, overrides: list[str]) -> dict[str, Any]:
    """The model is loaded here and its extractor checked against the features before any slide is scored."""
    import tempfile

    from fbta.stages.predict import check_extractor, load_model, predict_slides, slides_config

    cfg = _cfg(params, overrides)
    with tempfile.TemporaryDirectory(prefix="fbta-model-") as tmp:
        model = load_model(cfg, Path(tmp))
        check_extractor(cfg, model)
        path = predict_slides(cfg, slides_config(cfg), model)
    return {"path": str(path), **json.loads(path.read_text())}


@flow(name="fbta-batch-infer", log_prints=True)
def batch_infer_flow(slides: Optional[str] = None, model: Optional[str] = None, name: Optional[str] = None,
                     params: str = DEFAULT_PARAMS, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """``slides`` / ``model`` / ``name`` default to ``predict.*`` in params.yaml (model: the @champion)."""
    ov = list(overrides or [])
    ov += [f"predict.{k}={v}" for k, v in (("slides", slides), ("model", model), ("name", name)) if v]
    tile_slides(params, ov)
    extract_slides(params, ov)
    result = classify_slides(params, ov)
    classes = result["classes"]
    create_table_artifact(
        key="fbta-predictions", description=f"{result['counts']} with {result['model'].get('uri')}",
        table=[{"slide": r["slide_id"], "status": r["status"], "predicted": r["predicted"],
                **{c: r[f"prob_{c}"] for c in classes}, "reason": r["reason"]} for r in result["slides"]])
    get_run_logger().info("predictions: %s → %s", result["counts"], result["path"])
    return {"path": result["path"], "counts": result["counts"], "model": result["model"]}


if __name__ == "__main__":
    batch_infer_flow(slides=sys.argv[1] if len(sys.argv) > 1 else None, overrides=sys.argv[2:])
