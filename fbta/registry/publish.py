"""A model folder → an MLflow model in a run's artefacts → a registered model version with its metrics.

Why through ``MlflowClient`` (like ``fbta.tracking``): no global tracking URI or
active run leaks between stages and tests. The pyfunc folder is written
locally, uploaded as run artefacts, and the version's source is that artefact
location, so ``models:/<name>@champion`` resolves with nothing but the store.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fbta.io.h5 import feature_file_attrs, feature_files
from fbta.registry.pyfunc import load_folder, save_pyfunc
from fbta.registry.promote import TAG, candidate_metrics, ensure_registered_model, files_sha256, find_version

DESCRIPTIONS = {
    "classifier": "Slide classifier: a bag of frozen patch features (N×D float32) → class probabilities "
                  "(FBTA: K-head translator → EMA MIL; vanilla: MIL).",
    "segmenter": "IKD-MIL tumour segmenter: RGB patches (B×H×W×3 uint8) → fused tumour probabilities (B×H×W).",
}


@dataclass
class Registered:
    version: str
    created: bool  # False: a version with the same files already existed and is re-used
    metrics: dict[str, float]
    tags: dict[str, str]


def extractor_of(meta: dict[str, Any]) -> dict[str, str]:
    """Which frozen extractor (name, weights) produced the training features, when its files are readable."""
    folder = meta.get("features")
    if not folder:
        return {}
    try:
        first = next(iter(feature_files(Path(folder)).values()))
        attrs = feature_file_attrs(first)[0]
        return {k: str(attrs[k]) for k in ("extractor", "weights") if k in attrs}
    except (StopIteration, OSError, KeyError):
        return {}


def version_tags(kind: str, folder: Path, meta: dict[str, Any], sha: str) -> dict[str, str]:
    """What a later promotion or ``fbta predict`` needs to know about the version."""
    tags = {TAG + k: repr(v) if isinstance(v, float) else str(v) for k, v in candidate_metrics(kind, meta).items()}
    tags[TAG + "sha256"] = sha
    tags[TAG + "kind"] = kind
    tags[TAG + "folder"] = str(folder.resolve())
    for key in ("method", "arch", "in_dim", "epoch", "mlflow_run_id", "beats_baselines", "baseline_val_f1"):
        if meta.get(key) is not None:
            tags[TAG + key] = str(meta[key])
    if "classes" in meta:
        tags[TAG + "classes"] = json.dumps(list(meta["classes"]))
    val = (meta.get("split") or {}).get("val")
    if val:
        tags[TAG + "val_split"] = hashlib.sha256("\n".join(sorted(val)).encode()).hexdigest()[:16]
    for k, v in extractor_of(meta).items():
        tags[TAG + k] = v
    return tags


def model_card(kind: str, meta: dict[str, Any], tags: dict[str, str]) -> str:
    """MODEL_CARD.md of a registered version: what it takes, what it was trained on, how well, from which code."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        code = version("fbta")
    except PackageNotFoundError:
        code = "unknown"
    ext = extractor_of(meta)
    split = meta.get("split") or {}
    metrics = candidate_metrics(kind, meta)
    lines = [f"# {meta.get('method', kind)} {meta.get('arch', '')} ({kind})", "", DESCRIPTIONS[kind], "",
             "| | |", "|---|---|"]
    rows = [("input", "N×D float32 frozen patch features of one slide (`features` of a CLAM/TRIDENT .h5)"
             if kind == "classifier" else "B×H×W×3 uint8 RGB patches"),
            ("feature extractor", ext.get("extractor", meta.get("extractor", "?"))),
            ("extractor weights", ext.get("weights", "?")),
            ("feature size D", meta.get("in_dim", "?")),
            ("target MPP (µm/px)", meta.get("target_mpp", "as the features' coords file says")),
            ("classes", ", ".join(map(str, meta.get("classes", []))) or "tumour probability"),
            ("training cohort", f"{len(split.get('train', []))} train / {len(split.get('val', []))} val / "
                                f"{len(split.get('test', []))} test slides" if split else meta.get("counts", "?")),
            ("labels file", meta.get("labels", "?")),
            ("validation", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in metrics.items()) or "?"),
            ("model files sha256", tags.get(TAG + "sha256", "?")),
            ("code", f"fbta {code}, torch {meta.get('torch', '?')}, Python {platform.python_version()}")]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def register_folder(client: Any, run_id: str, kind: str, folder: Path, name: str,
                    device: str = "cpu") -> Registered:
    """Load the folder's model (so a broken one fails here), log it as pyfunc, register a version."""
    model = load_folder(kind, folder, device=device)
    meta = dict(model.meta)
    sha = files_sha256([Path(f) for f in model.files])
    tags = version_tags(kind, Path(folder), meta, sha)
    ensure_registered_model(client, name, DESCRIPTIONS[kind])
    existing = find_version(client, name, sha)
    if existing is not None:
        return Registered(str(existing.version), False, candidate_metrics(kind, meta), tags)
    with tempfile.TemporaryDirectory(prefix="fbta-pyfunc-") as tmp:
        local = save_pyfunc(kind, model, Path(tmp) / kind, metadata={"fbta_sha256": sha})
        card = model_card(kind, meta, tags)
        (local / "MODEL_CARD.md").write_text(card)
        client.log_artifacts(run_id, str(local), artifact_path=kind)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{kind}"
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags, description=card)
    return Registered(str(mv.version), True, candidate_metrics(kind, meta), tags)


def default_folder(cfg: Any, kind: str) -> Path:
    """``register.classifier`` / ``register.segmenter``, else the folders the training stages write."""
    from fbta.mil.checkpoint import model_dir

    r = cfg.register
    if kind == "classifier":
        return Path(r.classifier) if r.classifier else model_dir(cfg.data.out, cfg.train.method, cfg.mil.arch,
                                                                 cfg.train.fold)
    return Path(r.segmenter) if r.segmenter else Path(cfg.data.out, "models", "seg_student")


def resolve_model_uri(client: Any, uri: str) -> tuple[str, Optional[Any]]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → (artefact source, model version)."""
    from mlflow.exceptions import MlflowException

    from fbta.config import InputError

    if not uri.startswith("models:/"):
        return uri, None
    ref = uri[len("models:/"):].strip("/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = ref.rpartition("/")
            mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise InputError(f"{uri}: no such registered model version ({str(exc).splitlines()[0]}); "
                         "run `fbta register` first") from None
    return mv.source, mv
