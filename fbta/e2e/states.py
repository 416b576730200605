"""FBTA model-folder files beside best.pt/meta.json: the translator and TFE* (``extractor.pt``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fbta.e2e.translator import save_translator
from fbta.features.registry import Extractor, create_extractor
from fbta.io.atomic import atomic_path

EXTRACTOR = "extractor.pt"


def save_fbta_states(folder: Path, states: dict[str, dict[str, torch.Tensor]]) -> None:
    """translator.pt and extractor.pt (TFE*), written before best.pt/meta.json so meta.json stays the 'complete' mark."""
    save_translator(folder, None, states["translator"])  # type: ignore[arg-type]
    with atomic_path(Path(folder) / EXTRACTOR, suffix=".pt") as tmp:
        torch.save(states["extractor"], tmp)


EXTRACTOR_LAST = "extractor_last.pt"


def save_last_extractor(folder: Path, tfe_ema: torch.nn.Module) -> None:
    """TFE* as the last epoch left it (``extractor.pt`` is the selected epoch's): probes compare the two."""
    with atomic_path(Path(folder) / EXTRACTOR_LAST, suffix=".pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in tfe_ema.state_dict().items()}, tmp)


def load_ema_extractor(folder: Path, meta: dict[str, Any], device: torch.device, last: bool = False) -> Extractor:
    """TFE* of an FBTA model folder (for the re-extraction comparison), ``weights_only`` loading;
    ``last``: the last epoch's (``extractor_last.pt``) instead of the selected epoch's."""
    from fbta.mil.checkpoint import CheckpointError, load_weights

    spec = meta.get("extractor")
    if not spec:
        raise CheckpointError(f"{folder}: not an FBTA model (meta.json has no extractor)")
    tfe = create_extractor(spec["extractor"], weights="random", trainable=False, device=device,
                           input_size=spec.get("input_size"))
    file = EXTRACTOR_LAST if last else spec.get("file", EXTRACTOR)
    return load_weights(tfe, Path(folder) / file, device, f"{spec['extractor']} extractor")
