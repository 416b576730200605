"""A trained segmenter on disk and in memory: ``best.pt`` (state dict) + ``meta.json`` (how to rebuild it).

The same two files are what MLflow ships, so ``Segmenter.from_files`` rebuilds
a model from downloaded artefacts exactly as ``load_segmenter`` does from a
model folder; weights load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fbta.config import InputError
from fbta.io.atomic import atomic_path, atomic_write_text
from fbta.seg.network import SideOutputNet, build_from_spec

WEIGHTS = "best.pt"
META = "meta.json"
META_VERSION = 1


class SegmenterError(InputError):
    """A segmentation model folder that is missing or does not fit its metadata (exit code 2)."""


def net_input(net: SideOutputNet, patches: Tensor, input_size: int) -> Tensor:
    """uint8 B×H×W×3 → normalised B×3×s×s at the network's input size (antialiased when shrinking)."""
    x = net.normalise(patches)
    if input_size and tuple(x.shape[-2:]) != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.inference_mode()
def predict_fused(net: SideOutputNet, patches: np.ndarray | Tensor, input_size: int, device: torch.device | str,
                  batch_size: int = 32) -> np.ndarray:
    """Fused tumour probabilities (float32 B×H×W at the patches' own size) of uint8 B×H×W×3 patches."""
    was_training = net.training
    net.eval()
    arr = torch.as_tensor(np.asarray(patches)) if not isinstance(patches, Tensor) else patches
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != torch.uint8:
        raise ValueError(f"expected uint8 patches B×H×W×3, got {tuple(arr.shape)} {arr.dtype}")
    h, w = arr.shape[1:3]
    out = np.empty((len(arr), h, w), np.float32)
    for i in range(0, len(arr), batch_size):
        x = net_input(net, arr[i:i + batch_size].to(device), input_size)
        f = net(x).fused
        if tuple(f.shape[-2:]) != (h, w):
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        out[i:i + len(x)] = f[:, 0].float().cpu().numpy()
    net.train(was_training)
    return out


def save_segmenter(folder: Path, net: SideOutputNet, meta: dict[str, Any]) -> None:
    """Weights then metadata, each atomically (meta last: a folder with meta.json is complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS, suffix=".pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    payload = {"version": META_VERSION, **meta, "net": net.spec()}
    atomic_write_text(folder / META, json.dumps(payload, indent=2))


class Segmenter:
    """A trained side-output network: ``.predict(uint8 B×H×W×3) → float32 B×H×W`` fused tumour probabilities."""

    def __init__(self, net: SideOutputNet, meta: dict[str, Any], files: list[Path], device: torch.device) -> None:
        self.net, self.meta, self.files, self.device = net, meta, files, device
        self.input_size = int(meta.get("input_size") or 0)

    def predict(self, patches: np.ndarray | Tensor, batch_size: int = 32) -> np.ndarray:
        return predict_fused(self.net, patches, self.input_size, self.device, batch_size)

    @classmethod
    def from_files(cls, meta_path: str | Path, best_path: str | Path, device: str | torch.device = "cpu") -> "Segmenter":
        meta_path, best_path = Path(meta_path), Path(best_path)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise SegmenterError(f"{meta_path.parent}: no trained segmenter ({meta_path.name} missing); "
                                 "run `fbta seg-teacher` / `fbta seg-distill` first") from None
        except ValueError as exc:
            raise SegmenterError(f"{meta_path}: not valid JSON ({exc})") from None
        spec = meta.get("net")
        if not isinstance(spec, dict) or not {"arch", "out_indices", "fusion", "fusion_weights"} <= set(spec):
            raise SegmenterError(f"{meta_path}: missing or incomplete 'net' entry (arch, out_indices, fusion, …)")
        net = build_from_spec(spec)
        try:
            state = torch.load(best_path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except FileNotFoundError:
            raise SegmenterError(f"{best_path}: weights missing beside {meta_path.name}") from None
        except RuntimeError as exc:
            raise SegmenterError(f"{best_path}: does not fit a {spec['arch']} side-output net "
                                 f"({str(exc).splitlines()[0]})") from None
        device = torch.device(device)
        return cls(net.to(device).eval(), meta, [meta_path, best_path], device)


def load_segmenter(folder: str | Path, device: str | torch.device = "cpu") -> Segmenter:
    """``models/seg_teacher`` or ``models/seg_student`` → a Segmenter in eval mode."""
    folder = Path(folder)
    return Segmenter.from_files(folder / META, folder / WEIGHTS, device)
