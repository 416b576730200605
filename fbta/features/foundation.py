"""Pathology foundation encoders from local weight files: UNI, UNI2-h, Virchow2, H-optimus-0, Phikon-v2, GigaPath,
CONCH (its vision tower).

Each entry rebuilds the published architecture in timm (the keyword arguments of
the model card's ``timm.create_model`` call), its preprocessing (input size,
mean/std) and which token or pooling gives the feature. Weights never come from
a hub (most are gated, and no code path may need the internet): pass the file —
``extract.model=uni extract.weights=/models/uni/pytorch_model.bin`` (or
``.safetensors``), or put it at ``$FBTA_WEIGHTS_DIR/<name>.<ext>``. Without one
the error names the file expected and where it is published. Phikon-v2 is
published in Hugging Face ``transformers`` (Dinov2) naming and is converted to
timm's on load. CONCH is published as a whole CoCa model (vision tower, text
tower, captioning decoder); its tile feature is the vision tower's contrastive
attentional pooling of the ViT-B/16 tokens at 448 px, after its LayerNorm and
before the image–text projection (what ``encode_image(proj_contrast=False,
normalize=False)`` returns, 512-d); only ``visual.*`` is read from the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import timm
import torch
from torch import Tensor, nn

from fbta.features.base import Extractor, register_extractor
from fbta.features.weights import WeightSource, load_into, parse_random, resolve_weights

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class Encoder:
    name: str
    publisher: str  # where the weights are published (the user fetches them once, with access)
    arch: str  # timm architecture
    kwargs: dict[str, Any]
    dim: int
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    input_size: int = 224
    pool: str = "token"  # token: the class token after the final norm | cls+mean: [class token, mean patch token]
    #                      | attn: CONCH's attentional pooler (one learned query) + LayerNorm
    prefix_tokens: int = 1  # class + register tokens before the patch tokens (cls+mean)
    naming: str = "timm"  # timm | hf_dinov2 (converted on load) | conch (visual.* of the CoCa checkpoint)
    notes: dict[str, str] = field(default_factory=dict)


def _swiglu() -> dict[str, Any]:
    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}


ENCODERS: dict[str, Encoder] = {e.name: e for e in (
    Encoder("uni", "MahmoodLab/UNI on Hugging Face (pytorch_model.bin)", "vit_large_patch16_224",
            {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}, 1024),
    Encoder("uni2_h", "MahmoodLab/UNI2-h on Hugging Face (pytorch_model.bin)", "vit_giant_patch14_224",
            {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
             "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
             "dynamic_img_size": True, **_swiglu()}, 1536),
    Encoder("virchow2", "paige-ai/Virchow2 on Hugging Face (pytorch_model.bin)", "vit_huge_patch14_224",
            {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, "global_pool": "",
             "dynamic_img_size": True, **_swiglu()}, 2560, pool="cls+mean", prefix_tokens=5),
    Encoder("h_optimus_0", "bioptimus/H-optimus-0 on Hugging Face (pytorch_model.bin)",
            "vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
            1536, mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517)),
    Encoder("gigapath", "prov-gigapath/prov-gigapath on Hugging Face (pytorch_model.bin, the tile encoder)",
            "vit_giant_patch14_dinov2",
            {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
             "init_values": 1e-5, "mlp_ratio": 5.33334}, 1536),
    Encoder("phikon_v2", "owkin/phikon-v2 on Hugging Face (model.safetensors, transformers Dinov2 naming)",
            "vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5}, 1024,
            naming="hf_dinov2"),
    Encoder("conch_v1", "MahmoodLab/CONCH on Hugging Face (pytorch_model.bin, the whole CoCa model)",
            "vit_base_patch16_224", {"img_size": 448, "patch_size": 16, "dynamic_img_size": True}, 512,
            mean=OPENAI_CLIP[0], std=OPENAI_CLIP[1], input_size=448, pool="attn", naming="conch"),
)}


class ClsMeanPool(nn.Module):
    """Virchow2's tile embedding: the class token next to the mean of the patch tokens (registers skipped)."""

    def __init__(self, net: nn.Module, prefix_tokens: int) -> None:
        super().__init__()
        self.net = net
        self.prefix_tokens = int(prefix_tokens)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.net.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.prefix_tokens:].mean(1)], dim=-1)


class AttentionPoolHead(nn.Module):
    """CONCH's tile embedding: learned queries attend over the ViT tokens, then a LayerNorm.

    Names follow the published checkpoint (``attn_pool_contrast.query``, ``.attn``
    with separate q/k/v projections because keys are 768-d and queries 512-d,
    ``.ln_q``, ``.ln_k``; ``ln_contrast``) so that its ``visual.*`` tensors load as they are.
    """

    def __init__(self, net: nn.Module, dim: int, heads: int = 8, queries: int = 1) -> None:
        super().__init__()
        self.trunk = net
        width = int(net.num_features)
        self.attn_pool_contrast = _QueryPool(dim, width, heads, queries)
        self.ln_contrast = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


class _QueryPool(nn.Module):
    def __init__(self, dim: int, context: int, heads: int, queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context, vdim=context, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context)

    def forward(self, tokens: Tensor) -> Tensor:
        keys = self.ln_k(tokens)
        q = self.ln_q(self.query).unsqueeze(0).expand(len(tokens), -1, -1)
        return self.attn(q, keys, keys, need_weights=False)[0]


CONCH_UNUSED = ("attn_pool_caption.", "ln_caption.", "proj_contrast")  # captioning and the image–text projection


def from_conch(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The vision tower's tensors of a CONCH (CoCa) checkpoint, without the ``visual.`` prefix; the text tower,
    the captioning pooler and the contrastive projection are dropped (a tile feature uses none of them)."""
    out = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return {k: v for k, v in out.items() if not k.startswith(CONCH_UNUSED)}


_HF = [  # transformers Dinov2 name → timm ViT name (qkv handled apart)
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^encoder\.layer\.(\d+)\.norm(1|2)\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layer\.(\d+)\.layer_scale(1|2)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc(1|2)\.(weight|bias)$", r"blocks.\1.mlp.fc\2.\3"),
    (r"^layernorm\.(weight|bias)$", r"norm.\1"),
]


def from_hf_dinov2(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A transformers ``Dinov2Model`` state dict in timm ViT names: q, k, v fused into qkv; mask token dropped."""
    sd = {k[len("dinov2."):] if k.startswith("dinov2.") else k: v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        if k == "embeddings.mask_token":
            continue
        for pat, rep in _HF:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            out[k] = v  # left as is: load_into names it if the architecture has no such tensor
    for (layer, kind), parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


def build_encoder(spec: Encoder, weights: Optional[str], trainable: bool) -> Extractor:
    """The published architecture, weights from the given file (or seeded random for ``weights=random``)."""
    seed = parse_random(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed or 0)
        net = timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.kwargs)
        trunk: nn.Module = (ClsMeanPool(net, spec.prefix_tokens) if spec.pool == "cls+mean"
                            else AttentionPoolHead(net, spec.dim) if spec.pool == "attn" else net)
    source = WeightSource(spec.name, f"the {spec.name} weights published as {spec.publisher}")
    resolved = resolve_weights(weights, source)
    if resolved.state_dict is not None:
        sd = (from_hf_dinov2(resolved.state_dict) if spec.naming == "hf_dinov2"
              else from_conch(resolved.state_dict) if spec.naming == "conch" else dict(resolved.state_dict))
        target = trunk.net if isinstance(trunk, ClsMeanPool) else trunk
        load_into(target, sd, name=spec.name, source=resolved.weights_id, ignore_prefixes=("head.",))
    return Extractor(trunk, name=spec.name, arch=spec.arch, dim=spec.dim, input_size=spec.input_size,
                     mean=spec.mean, std=spec.std, weights_id=resolved.weights_id)


def _entry(spec: Encoder) -> Callable[[Optional[str], bool], Extractor]:
    def build(weights: Optional[str], trainable: bool) -> Extractor:
        return build_encoder(spec, weights, trainable)

    build.__doc__ = f"{spec.name}: {spec.arch} ({spec.dim}-d, {spec.pool}); weights: {spec.publisher}."
    return build


for _spec in ENCODERS.values():
    register_extractor(_spec.name)(_entry(_spec))
