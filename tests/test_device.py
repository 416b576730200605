"""One device resolver; the GPU-only code paths (bf16 autocast, k-means device) exercised on CPU."""
from __future__ import annotations

import copy

import pytest
import torch

from fbta.config import ConfigError
from fbta.device import resolve_device
from fbta.e2e.pseudobags import PseudoBag
from fbta.e2e.step import FBTAModels, StepOptions, autocast_enabled, fbta_step
from fbta.e2e.trainer import prepare_tfe
from fbta.e2e.translator import Translator
from fbta.features.kmeans import cluster_bag
from fbta.features.registry import create_extractor
from fbta.mil import create_mil

NO_CUDA = not torch.cuda.is_available()


def test_auto_is_cuda_when_torch_sees_a_gpu_else_cpu():
    assert resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1", torch.device("cuda")])
def test_a_device_the_machine_lacks_is_refused_with_the_setting_named(name):
    with pytest.raises(ConfigError, match=r"train\.device='cuda(:1)?'.*no CUDA device"):
        resolve_device(name, "train.device")


def test_a_misspelt_device_is_a_config_error():
    with pytest.raises(ConfigError, match="extract.device='gpu': not a device"):
        resolve_device("gpu", "extract.device")


def test_every_stage_uses_the_one_resolver():
    from fbta.features import extract
    from fbta.mil import train
    from fbta.stages import seg_common as pipeline

    assert extract.pick_device is train.resolve_device is pipeline.resolve_device is resolve_device


def _models() -> FBTAModels:
    torch.manual_seed(0)
    tfe = create_extractor("test_efficientnet", weights="random")
    prepare_tfe(tfe, trainable=True, train_blocks=2, freeze_bn=True)
    return FBTAModels(create_mil("abmil", tfe.dim, 2, hidden=16, attn_dim=8), Translator(tfe.dim, k=3), tfe)


def _bag(m: FBTAModels) -> PseudoBag:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (24, 64, 64, 3), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        frozen = m.tfe_ema(m.tfe_ema.preprocess(pixels))
    idx = torch.arange(0, 24, 3)
    return PseudoBag(0, torch.tensor(1), frozen, idx, pixels[idx], 0.0)


def test_autocast_is_cuda_only_unless_the_cpu_path_is_asked_for():
    cpu = torch.device("cpu")
    assert not autocast_enabled(StepOptions(amp=True), cpu)
    assert autocast_enabled(StepOptions(amp=True, amp_on_cpu=True), cpu)
    assert not autocast_enabled(StepOptions(amp=False, amp_on_cpu=True), cpu)


def test_the_bf16_fbta_step_agrees_with_fp32_and_its_gradients_are_finite():
    """The step's GPU path (bf16 autocast) on CPU: the same losses within bf16 precision, finite gradients."""
    out = {}
    for name, opts in {"fp32": StepOptions(), "bf16": StepOptions(amp=True, amp_on_cpu=True)}.items():
        m = _models()
        bag = _bag(m)
        stats = fbta_step(m, bag, 0.5, opts, torch.device("cpu"), torch.Generator().manual_seed(0))
        grads = [p.grad for p in m.tfe.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
        out[name] = stats
    for key in ("l_cls", "l_cls_fb", "l_cls_eb", "l_cls_tb"):
        assert out["bf16"][key] == pytest.approx(out["fp32"][key], rel=0.05, abs=0.02), key
    assert out["bf16"]["l_dist"] == pytest.approx(out["fp32"]["l_dist"], rel=0.1, abs=0.05)


def test_bf16_translator_predictions_agree_with_fp32():
    """Deployed path MIL*(mean_k h_k(F_FB)) under bf16 autocast: same class, probabilities within 0.02."""
    m = _models()
    feats = torch.randn(300, m.tfe.dim, generator=torch.Generator().manual_seed(2))
    mil = copy.deepcopy(m.mil).eval()
    with torch.no_grad():
        p32 = torch.softmax(mil(m.translator(feats)).logits.float(), -1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p16 = torch.softmax(mil(m.translator(feats)).logits.float(), -1)
    assert p16.argmax(-1).item() == p32.argmax(-1).item()
    assert (p16 - p32).abs().max().item() < 0.02


def test_kmeans_runs_on_the_device_it_is_given():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)).numpy()
    labels, centroids = cluster_bag(x, 5, 0, method="torch", device=resolve_device("auto"))
    assert labels.shape == (200,) and centroids.shape == (5, 8)
    with pytest.raises(Exception):  # a device torch cannot compute on is not silently replaced by the CPU
        cluster_bag(x, 5, 0, method="torch", device="meta")


@pytest.mark.parametrize("arch", ["abmil", "transmil", "mambamil"])
def test_mil_heads_create_every_tensor_on_their_input_s_device(arch):
    """On the meta device any tensor made on the CPU inside forward (a missing ``device=``) raises."""
    head = create_mil(arch, 32, 2).to("meta").eval()
    out = head(torch.randn(37, 32, device="meta"))
    assert out.logits.device.type == "meta" and out.scores.device.type == "meta"


def test_the_translator_and_the_extractor_stay_on_their_device():
    tfe = create_extractor("test_efficientnet", weights="random").to("meta")
    x = torch.rand(3, 3, 64, 64, device="meta")
    feats = tfe(tfe.preprocess(x))
    tr = Translator(tfe.dim, k=3).to("meta")
    assert feats.device.type == "meta" and tr(feats).device.type == "meta" and tr.heads(feats).device.type == "meta"
