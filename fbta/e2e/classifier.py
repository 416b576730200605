"""The deployable slide classifier: (translator →) MIL head over a bag of cached frozen features.

Why one object for both methods: evaluation, heatmaps, batch inference and the
MLflow pyfunc model all need "bag of frozen features in, class probabilities
out". A vanilla model folder has no translator (identity); an FBTA folder has
the K-head translator and the EMA MIL head (METHODS.md A, inference). No patch
is read and no CNN runs on this path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from fbta.e2e.translator import TRANSLATOR, Translator, build_translator
from fbta.mil.checkpoint import META, WEIGHTS, CheckpointError, load_weights, read_meta
from fbta.mil.registry import MILHead, MILOutput, create_mil


class SlideClassifier:
    """``predict_proba(bag N×D) -> (n_classes,)``; ``forward(bag) -> MILOutput`` for instance scores."""

    def __init__(self, head: MILHead, translator: Optional[Translator], meta: dict[str, Any],
                 files: list[Path], device: torch.device) -> None:
        self.head, self.translator, self.meta, self.files, self.device = head, translator, meta, files, device

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def n_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def in_dim(self) -> int:
        return int(self.meta["in_dim"])

    @classmethod
    def from_files(cls, meta_path: str | Path, best_path: str | Path, translator_path: str | Path | None = None,
                   device: torch.device | str = "cpu") -> "SlideClassifier":
        """Rebuild from the three files (as MLflow ships them as artefacts), loading with ``weights_only``."""
        meta_path, best_path = Path(meta_path), Path(best_path)
        device = torch.device(device)
        meta = read_meta(meta_path.parent) if meta_path.name == META else _read_json(meta_path)
        head = load_weights(create_mil(meta["arch"], int(meta["in_dim"]), len(meta["classes"]), **meta["mil_kwargs"]),
                            best_path, device, f"{meta['arch']} head")
        translator = build_translator(meta)
        files = [meta_path, best_path]
        if translator is not None:
            if translator_path is None:
                raise CheckpointError(f"{meta_path}: names a translator but no translator weights were given")
            translator = load_weights(translator, Path(translator_path), device, "translator")
            files.append(Path(translator_path))
        return cls(head, translator, meta, files, device)  # type: ignore[arg-type]

    @torch.no_grad()
    def forward(self, bag: Tensor | np.ndarray) -> MILOutput:
        x = torch.as_tensor(np.asarray(bag, dtype=np.float32) if isinstance(bag, np.ndarray) else bag)
        x = x.to(self.device, torch.float32)
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected a bag of N×{self.in_dim} frozen features, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("bag contains NaN or inf features")
        if self.translator is not None:
            x = self.translator(x)
        return self.head(x)

    __call__ = forward

    def predict_proba(self, bag: Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities of one slide, shape (n_classes,)."""
        return self.forward(bag).probs.float().cpu().numpy()[0]


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read model metadata ({exc})") from None


def load_classifier(folder: str | Path, device: torch.device | str = "cpu") -> SlideClassifier:
    """The classifier in a model folder (vanilla or FBTA), eval mode, ``weights_only`` loading."""
    folder = Path(folder)
    read_meta(folder)  # clear error when the folder holds no trained model
    translator = folder / TRANSLATOR
    return SlideClassifier.from_files(folder / META, folder / WEIGHTS,
                                      translator if translator.exists() else None, device)
