"""MLflow pyfunc models: a trained model folder → one self-contained, servable MLflow model.

Why pyfunc (STACK.md): ``mlflow.pytorch`` exports with fixed shapes, and MIL
bags vary in length. The model's files (``meta.json``, ``best.pt`` and, for
FBTA, ``translator.pt``) ship as artefacts and are loaded by the same loaders
the stages use (``torch.load(weights_only=True)``), so the served model is the
evaluated one. The model is saved "from code" (``_classifier_model.py`` /
``_segmenter_model.py``), so loading it unpickles nothing.

- ``fbta-classifier``: a bag of frozen features (N×D float32) → one row of
  class probabilities (translator → EMA MIL for FBTA; MIL alone for vanilla).
- ``fbta-segmenter``: patches (B×H×W×3 uint8) → fused tumour probabilities
  (B×H×W float32).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Optional

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in stage logs
import mlflow.pyfunc  # noqa: E402

CLASSIFIER, SEGMENTER = "classifier", "segmenter"
KINDS = (CLASSIFIER, SEGMENTER)
_HERE = Path(__file__).resolve().parent
_CODE = {CLASSIFIER: _HERE / "_classifier_model.py", SEGMENTER: _HERE / "_segmenter_model.py"}


def load_folder(kind: str, folder: str | Path, device: str = "cpu") -> Any:
    """The in-process model of a folder: a ``SlideClassifier`` or a ``Segmenter`` (contracts.md)."""
    if kind == CLASSIFIER:
        from fbta.e2e.classifier import load_classifier

        return load_classifier(folder, device=device)
    if kind == SEGMENTER:
        from fbta.seg import load_segmenter

        return load_segmenter(folder, device=device)
    raise ValueError(f"unknown model kind '{kind}' (one of {', '.join(KINDS)})")


def _artifact_folder(artifacts: dict[str, str]) -> Path:
    """MLflow copies every artefact to ``<model>/artifacts/<file name>``: together they are the model folder."""
    folders = {Path(p).parent for p in artifacts.values()}
    if len(folders) != 1:
        raise RuntimeError(f"model artefacts are not in one folder: {sorted(map(str, folders))}")
    return folders.pop()


def _bad_input(msg: str) -> Exception:
    """An error the scoring server answers with HTTP 400 (not 500)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(msg, error_code=INVALID_PARAMETER_VALUE)


def as_array(model_input: Any) -> np.ndarray:
    """Request payloads (ndarray, DataFrame, list, ``{"bag": …}``) → one NumPy array."""
    import pandas as pd

    if isinstance(model_input, dict):
        if len(model_input) != 1:
            raise _bad_input(f"expected one input array, got keys {sorted(model_input)}")
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.to_numpy()
    if hasattr(model_input, "detach"):  # a torch tensor
        model_input = model_input.detach().cpu().numpy()
    return np.asarray(model_input)


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc body of ``fbta-classifier``: one bag in, one row of class probabilities out."""

    clf: Any = None
    # the input schema is the model signature (below), not type hints on predict(): without this MLflow
    # wraps predict() for type-hint validation and warns on every class definition
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from fbta.e2e.classifier import load_classifier

        device = (context.model_config or {}).get("device", "cpu")
        self.clf = load_classifier(_artifact_folder(context.artifacts), device=device)

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import pandas as pd

        bag = as_array(model_input).astype(np.float32, copy=False)
        if bag.ndim == 3 and bag.shape[0] == 1:
            bag = bag[0]
        if bag.ndim != 2 or bag.shape[1] != self.clf.in_dim or len(bag) == 0:
            raise _bad_input(f"expected one bag of N×{self.clf.in_dim} frozen features (N ≥ 1), "
                             f"got shape {bag.shape}")
        if not np.isfinite(bag).all():
            raise _bad_input("the bag contains NaN or inf features")
        probs = self.clf.predict_proba(bag)
        return pd.DataFrame([probs.astype(np.float64)], columns=self.clf.classes)


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """pyfunc body of ``fbta-segmenter``: RGB patches in, fused tumour probability maps out."""

    seg: Any = None
    _skip_type_hint_validation = True  # as ClassifierModel

    def load_context(self, context: Any) -> None:
        from fbta.seg import load_segmenter

        device = (context.model_config or {}).get("device", "cpu")
        self.seg = load_segmenter(_artifact_folder(context.artifacts), device=device)

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        patches = as_array(model_input)
        if patches.ndim == 3:
            patches = patches[None]
        if patches.ndim != 4 or patches.shape[-1] != 3:
            raise _bad_input(f"expected RGB patches B×H×W×3, got shape {patches.shape}")
        if patches.dtype != np.uint8:
            if patches.size and (patches.min() < 0 or patches.max() > 255):
                raise _bad_input("patch values must lie in 0..255")
            patches = patches.astype(np.uint8)
        return np.asarray(self.seg.predict(patches), dtype=np.float32)


def signature(kind: str, model: Any) -> Any:
    """Input/output schema: a bag N×D float32 → class columns; patches B×H×W×3 uint8 → B×H×W float32."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    if kind == CLASSIFIER:
        return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(model.in_dim)))]),
                              outputs=Schema([ColSpec("double", c) for c in model.classes]))
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]))


def input_example(kind: str, model: Any) -> np.ndarray:
    """A small valid input: MLflow runs the model on it when saving, so a model that cannot predict is never logged."""
    if kind == CLASSIFIER:
        return np.zeros((4, int(model.in_dim)), np.float32)
    return np.full((1, 64, 64, 3), 200, np.uint8)


def requirements() -> list[str]:
    """What the model needs at serve time (served with ``--env-manager local`` inside the fbta venv)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("fbta", "mlflow", "torch", "timm", "numpy", "pandas"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs


def save_pyfunc(kind: str, model: Any, dest: Path, metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write an MLflow model folder for ``model`` (already loaded, so a broken folder fails here, not at serve)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind '{kind}' (one of {', '.join(KINDS)})")
    files = [Path(f) for f in model.files]
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"model files share a name: {names}")
    mlflow.pyfunc.save_model(
        path=str(dest), python_model=str(_CODE[kind]), artifacts={f.name: str(f) for f in files},
        signature=signature(kind, model), input_example=input_example(kind, model), pip_requirements=requirements(),
        metadata={"fbta_kind": kind, "python": platform.python_version(), **(metadata or {})},
    )
    return dest
