"""A trained MIL head on disk: ``best.pt`` (a plain state dict) + ``meta.json`` (how to rebuild it).

Why a plain state dict: ``torch.load(weights_only=True)`` refuses pickled code,
so a checkpoint from elsewhere cannot run anything on load. Everything needed
to rebuild the head (arch, in_dim, classes, constructor options) and to audit
it (epoch, validation AUC, the exact split) lives in human-readable JSON.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from fbta.config import InputError
from fbta.features.weights import unpickling_refusal
from fbta.io.atomic import atomic_path, atomic_write_text
from fbta.mil.registry import MILHead, create_mil

WEIGHTS = "best.pt"
META = "meta.json"
META_VERSION = 1


class CheckpointError(InputError):
    """A model folder that is missing or does not fit its metadata."""


def model_dir(out: str | Path, method: str, arch: str, fold: int | None = None) -> Path:
    """``<data.out>/models/<method>_<arch>[_fold<k>]``."""
    return Path(out, "models", f"{method}_{arch}" + (f"_fold{fold}" if fold is not None else ""))


def save_checkpoint(folder: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write weights then metadata, each atomically (meta last: a folder with meta.json is complete)."""
    with atomic_path(folder / WEIGHTS, suffix=".pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
    atomic_write_text(folder / META, json.dumps({"version": META_VERSION, **meta}, indent=2))


def read_meta(folder: Path) -> dict[str, Any]:
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no trained model ({META} missing); run `fbta train` first") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    for key in ("arch", "in_dim", "classes", "mil_kwargs"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing '{key}'")
    return meta


def load_weights(module: torch.nn.Module, path: Path, device: torch.device | str, what: str) -> torch.nn.Module:
    """``weights_only`` load of a plain state dict into ``module``; a missing or mismatched file is one CheckpointError."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} weights missing") from None
    except pickle.UnpicklingError as exc:  # pickled code or objects: weights_only refuses to run them
        raise CheckpointError(f"{path}: not a plain state dict: it holds {unpickling_refusal(exc)}, which "
                              "weights_only loading refuses to run; re-save it with torch.save(model.state_dict(), "
                              "path)") from None
    except Exception as exc:  # noqa: BLE001 - truncated files, not a torch file at all, …
        raise CheckpointError(f"{path}: not a loadable torch checkpoint, truncated or corrupt "
                              f"({type(exc).__name__}: {_first_sentence(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None) \
            if isinstance(state, dict) else None
        kind = f"a dict whose '{inner}' is not a tensor" if inner is not None else f"a {type(state).__name__}"
        raise CheckpointError(f"{path}: not a plain state dict ({kind}); save model.state_dict() itself")
    try:
        module.load_state_dict(state)
    except (RuntimeError, AttributeError, TypeError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:] if lines[0].startswith("Error(s) in loading") else lines[:1])
        detail = detail if len(detail) <= 240 else detail[:240] + "…"
        raise CheckpointError(f"{path}: does not fit the {what} ({detail})") from None
    return module.to(device).eval()


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no message"
    return text.split(". ")[0].rstrip(".")


def load_head(folder: Path, device: torch.device | str = "cpu") -> tuple[MILHead, dict[str, Any]]:
    """Rebuild the head from ``meta.json`` and load ``best.pt`` with ``weights_only=True``; eval mode."""
    folder = Path(folder)
    meta = read_meta(folder)
    head = create_mil(meta["arch"], int(meta["in_dim"]), len(meta["classes"]), **meta["mil_kwargs"])
    return load_weights(head, folder / WEIGHTS, device, f"{meta['arch']} head"), meta  # type: ignore[return-value]
