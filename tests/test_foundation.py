"""Pathology foundation encoders (issue #19.2): published architectures, sizes and weight naming, offline.

The big ViTs are built on the ``meta`` device (shapes only, no memory) so the
suite can check a 1.1 B-parameter encoder in a second on a CPU.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fbta.cli import main
from fbta.features.foundation import ENCODERS, build_encoder, from_conch, from_hf_dinov2
from fbta.features.registry import create_extractor, list_extractors
from fbta.features.weights import WeightsError, load_into

ROOT = Path(__file__).resolve().parents[1]

# published feature size and parameter count (model cards), and a tensor shape only the right build has
PUBLISHED = {
    "uni": (1024, 303e6, ("pos_embed", (1, 197, 1024))),
    "uni2_h": (1536, 681e6, ("reg_token", (1, 8, 1536))),
    "virchow2": (2560, 632e6, ("blocks.0.mlp.fc1.weight", (6832, 1280))),
    "h_optimus_0": (1536, 1.13e9, ("reg_token", (1, 4, 1536))),
    "gigapath": (1536, 1.13e9, ("patch_embed.proj.weight", (1536, 3, 16, 16))),
    "phikon_v2": (1024, 303e6, ("pos_embed", (1, 197, 1024))),
    "conch_v1": (512, 88e6, ("trunk.pos_embed", (1, 785, 768))),  # ViT-B/16 at 448 px + the contrastive pooler
}


def on_meta(name: str):  # noqa: ANN201
    with torch.device("meta"):
        return build_encoder(ENCODERS[name], "random", False)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_encoder_has_the_published_size_and_feature(name: str) -> None:
    dim, params, (key, shape) = PUBLISHED[name]
    ext = on_meta(name)
    assert ext.dim == dim and name in list_extractors()
    assert abs(sum(p.numel() for p in ext.parameters()) / params - 1) < 0.02
    net = getattr(ext.trunk, "net", ext.trunk)
    assert tuple(net.state_dict()[key].shape) == shape
    with torch.device("meta"):
        out = ext(torch.zeros(2, 3, ext.input_size, ext.input_size))
    assert tuple(out.shape) == (2, dim)


def test_h_optimus_0_uses_its_own_stain_statistics() -> None:
    ext = on_meta("h_optimus_0")
    assert ext.mean == (0.707223, 0.578729, 0.703617) and ext.std == (0.211883, 0.230117, 0.177517)
    assert on_meta("uni").mean == (0.485, 0.456, 0.406)


# The tensors each published timm checkpoint holds, written from the model cards' architecture (depth, width,
# MLP hidden size, LayerScale, register tokens, patch size) and NOT read back from the network under test: the
# network must accept exactly these names and shapes. (depth, dim, mlp fc1 rows, fc2 columns, reg tokens,
# pos-embed tokens, patch px)
TIMM_CHECKPOINTS = {
    "uni": (24, 1024, 4096, 4096, 0, 197, 16),            # ViT-L/16, LayerScale (init_values 1e-5)
    "virchow2": (32, 1280, 6832, 3416, 4, 261, 14),       # ViT-H/14, SwiGLU packed (fc1 = 2 × 3416), 4 registers
    "gigapath": (40, 1536, 8192, 4096, 0, 197, 16),       # ViT-g/14-style at patch 16, SwiGLU packed
}


def published_timm_state_dict(name: str) -> dict[str, torch.Tensor]:
    depth, d, fc1, fc2, regs, pos, px = TIMM_CHECKPOINTS[name]
    e = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    sd = {"cls_token": e(1, 1, d), "pos_embed": e(1, pos, d), "patch_embed.proj.weight": e(d, 3, px, px),
          "patch_embed.proj.bias": e(d), "norm.weight": e(d), "norm.bias": e(d)}
    if regs:
        sd["reg_token"] = e(1, regs, d)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": e(d), b + "norm1.bias": e(d), b + "attn.qkv.weight": e(3 * d, d),
                   b + "attn.qkv.bias": e(3 * d), b + "attn.proj.weight": e(d, d), b + "attn.proj.bias": e(d),
                   b + "ls1.gamma": e(d), b + "norm2.weight": e(d), b + "norm2.bias": e(d),
                   b + "mlp.fc1.weight": e(fc1, d), b + "mlp.fc1.bias": e(fc1), b + "mlp.fc2.weight": e(d, fc2),
                   b + "mlp.fc2.bias": e(d), b + "ls2.gamma": e(d)})
    return sd


@pytest.mark.parametrize("name", sorted(TIMM_CHECKPOINTS))
def test_a_timm_named_checkpoint_loads_with_no_missing_or_unexpected_tensor(name: str) -> None:
    """Defect guarded: the encoder is built with another depth, width, MLP, no LayerScale or no registers — the
    real checkpoint would then not load (before, the test fed the network its own state dict: it could not fail)."""
    ext = on_meta(name)
    net = getattr(ext.trunk, "net", ext.trunk)
    published = published_timm_state_dict(name)
    published["head.weight"] = torch.empty(0, device="meta")  # some releases keep an empty head
    load_into(net, published, name=name, source="test", ignore_prefixes=("head.",))  # as build_encoder does


@pytest.mark.parametrize("change", ["drop LayerScale", "one block short", "no register tokens", "narrower MLP"])
def test_a_checkpoint_of_another_build_is_refused_by_name_and_shape(change: str) -> None:
    """The check above can fail: each of these differences is one clear WeightsError, never a partial load."""
    name = "virchow2"
    sd = published_timm_state_dict(name)
    if change == "drop LayerScale":
        sd = {k: v for k, v in sd.items() if ".ls" not in k}
    elif change == "one block short":
        sd = {k: v for k, v in sd.items() if not k.startswith("blocks.31.")}
    elif change == "no register tokens":
        del sd["reg_token"]
    else:
        sd["blocks.0.mlp.fc1.weight"] = torch.empty(5120, 1280, device="meta")
    net = getattr(on_meta(name).trunk, "net", on_meta(name).trunk)
    with pytest.raises(WeightsError, match="virchow2: weights from test do not fit"):
        load_into(net, sd, name=name, source="test")


def hf_dinov2_state_dict(depth: int = 24, d: int = 1024, tokens: int = 197) -> dict[str, torch.Tensor]:
    """Phikon-v2's published tensor names and shapes (transformers Dinov2Model, ViT-L/16)."""
    e = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    sd = {"embeddings.cls_token": e(1, 1, d), "embeddings.mask_token": e(1, d),
          "embeddings.position_embeddings": e(1, tokens, d),
          "embeddings.patch_embeddings.projection.weight": e(d, 3, 16, 16),
          "embeddings.patch_embeddings.projection.bias": e(d), "layernorm.weight": e(d), "layernorm.bias": e(d)}
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = e(d), e(d)
        for n in ("query", "key", "value"):
            sd[p + f"attention.attention.{n}.weight"], sd[p + f"attention.attention.{n}.bias"] = e(d, d), e(d)
        sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = e(d, d), e(d)
        sd[p + "layer_scale1.lambda1"], sd[p + "layer_scale2.lambda1"] = e(d), e(d)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = e(4 * d, d), e(4 * d)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = e(d, 4 * d), e(d)
    return sd


def test_phikon_v2s_transformers_checkpoint_converts_to_timm_and_loads_exactly() -> None:
    converted = from_hf_dinov2(hf_dinov2_state_dict())
    ext = on_meta("phikon_v2")
    load_into(ext.trunk, converted, name="phikon_v2", source="test")  # raises on any missing/unexpected/shape
    assert tuple(converted["blocks.0.attn.qkv.weight"].shape) == (3072, 1024)


def test_q_k_v_are_fused_in_that_order() -> None:
    d = 4
    sd = {f"encoder.layer.0.attention.attention.{n}.weight": torch.full((d, d), float(i))
          for i, n in enumerate(("query", "key", "value"))}
    qkv = from_hf_dinov2(sd)["blocks.0.attn.qkv.weight"]
    assert qkv[:d].eq(0).all() and qkv[d:2 * d].eq(1).all() and qkv[2 * d:].eq(2).all()


def test_without_a_weight_file_the_error_names_the_file_and_where_it_is_published(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FBTA_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError) as exc:
        with torch.device("meta"):
            create_extractor("virchow2")
    msg = str(exc.value)
    assert "paige-ai/Virchow2" in msg and str(tmp_path / "virchow2.pth") in msg and "extract.weights=" in msg
    assert "\n" not in msg


def test_fbta_trains_end_to_end_with_a_vit_extractor(tmp_path: Path) -> None:
    """The paper's transformer extractor path (ViT-B/32 in the paper; timm's tiny ViT here)."""
    ov = [f"data.slides={tmp_path}/slides", f"data.labels={tmp_path}/labels.csv", f"data.masks={tmp_path}/masks",
          f"data.out={tmp_path}/out", "run.progress=false", "tracking.enabled=false", "extract.model=test_vit",
          "extract.weights=random", "extract.num_workers=0", "cluster.n_clusters=4", "mil.kwargs.hidden=32",
          "mil.kwargs.attn_dim=16", "train.device=cpu", "fbta.train_blocks=2", "fbta.k=3", "fbta.hidden=64",
          "fbta.num_workers=0", "fbta.epochs=1", "train.patience=1", "train.min_epochs=0", "infer.num_workers=0"]
    run = lambda *a: main([*a, *ov, "--params", str(ROOT / "params.yaml")])  # noqa: E731
    assert run("synth", "synth.n_slides=8", "synth.width=1024", "synth.height=1024") == 0
    for stage in ("tile", "extract", "cluster"):
        assert run(stage) == 0
    assert run("train", "train.method=fbta") == 0 and run("infer", "train.method=fbta") == 0
    assert (tmp_path / "out/models/fbta_abmil/translator.pt").exists()


def conch_state_dict() -> dict[str, torch.Tensor]:
    """CONCH's published CoCa checkpoint layout: visual.trunk (ViT-B/16, 448 px), the two attentional poolers,
    the contrastive LayerNorm and projection, and (a sample of) the text tower and decoder."""
    e = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    with torch.device("meta"):
        import timm

        vit = timm.create_model("vit_base_patch16_224", img_size=448, num_classes=0, dynamic_img_size=True)
    sd = {f"visual.trunk.{k}": torch.empty(v.shape, device="meta") for k, v in vit.state_dict().items()}
    for pool, d, q in (("contrast", 512, 1), ("caption", 768, 256)):
        p = f"visual.attn_pool_{pool}."
        sd |= {p + "query": e(q, d), p + "attn.q_proj_weight": e(d, d), p + "attn.k_proj_weight": e(d, 768),
               p + "attn.v_proj_weight": e(d, 768), p + "attn.in_proj_bias": e(3 * d),
               p + "attn.out_proj.weight": e(d, d), p + "attn.out_proj.bias": e(d),
               p + "ln_q.weight": e(d), p + "ln_q.bias": e(d), p + "ln_k.weight": e(768), p + "ln_k.bias": e(768),
               f"visual.ln_{pool}.weight": e(d), f"visual.ln_{pool}.bias": e(d)}
    sd |= {"visual.proj_contrast": e(512, 512), "logit_scale": e(()), "text.token_embedding.weight": e(32007, 768),
           "text.text_projection": e(768, 512), "text_decoder.ln_final.weight": e(768)}
    return sd


def test_conchs_coca_checkpoint_gives_its_vision_tower_exactly() -> None:
    ext = on_meta("conch_v1")
    vision = from_conch(conch_state_dict())
    assert not any(k.startswith(("text", "attn_pool_caption", "ln_caption", "proj_contrast")) for k in vision)
    load_into(ext.trunk, vision, name="conch_v1", source="test")  # raises on any missing/unexpected/shape
    assert ext.input_size == 448 and ext.mean == (0.48145466, 0.4578275, 0.40821073)


def test_conchs_pooler_is_a_real_attention_over_the_tokens() -> None:
    """On a small random build: the feature depends on the tokens and on the learned query."""
    ext = build_encoder(ENCODERS["conch_v1"], "random", False)
    x = torch.rand(2, 3, 64, 64)  # dynamic_img_size: any multiple of 16
    with torch.no_grad():
        a = ext.trunk(x)
        ext.trunk.attn_pool_contrast.query.add_(1.0)
        b = ext.trunk(x)
    assert a.shape == (2, 512) and not torch.allclose(a, b) and not torch.allclose(a[0], a[1])
