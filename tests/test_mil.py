"""Specification of the MIL heads (fbta.mil) and of the selective scan under MambaMIL.

A head takes one slide's bag of N instance features (N×D or 1×N×D) and returns
``MILOutput(logits 1×n_classes, scores N)``. Sizes are small (D=32, and narrow
internal widths where a test trains) so the file runs in seconds on 2 cores;
one smoke test uses realistic sizes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from fbta.mil import (
    DEFAULT_MIL, MILHead, MILOutput, create_mil, fused_scan_available, list_mil, register_mil,
    selective_scan, selective_scan_chunked, selective_scan_ref,
)
from fbta.mil import registry
from fbta.mil.mambamil import SRMamba, strided_order
from fbta.mil.scan import DEFAULT_CHUNK
from fbta.mil.transmil import NystromAttention

HEADS = ["abmil", "abmil_plain", "transmil", "mambamil"]
ORDER_SENSITIVE = ["transmil", "mambamil"]  # positional conv (PPEG) / sequential scan: order matters by design
D = 32
N_CLASSES = 3


def make_head(name: str, n_classes: int = N_CLASSES, **kwargs: object) -> MILHead:
    torch.manual_seed(0)
    return create_mil(name, D, n_classes, **kwargs).eval()


@pytest.fixture(scope="module")
def heads() -> dict[str, MILHead]:
    return {name: make_head(name) for name in HEADS}


# --- registry -----------------------------------------------------------------------------------

def test_registry_offers_the_four_heads_with_gated_abmil_as_default() -> None:
    assert set(HEADS) <= set(list_mil())
    assert list_mil() == sorted(list_mil())
    assert DEFAULT_MIL == "abmil"
    assert create_mil("abmil", D, 2).gated and not create_mil("abmil_plain", D, 2).gated


def test_unknown_name_is_a_clear_error_listing_the_names() -> None:
    with pytest.raises(ValueError, match=r"unknown MIL head 'clam'.*available: abmil, abmil_plain, mambamil, transmil"):
        create_mil("clam", D, 2)


def test_heads_record_their_configuration_and_take_kwargs() -> None:
    for name in HEADS:
        head = create_mil(name, D, 4, dropout=0.1)
        assert isinstance(head, MILHead)
        assert (head.in_dim, head.n_classes, head.dropout) == (D, 4, 0.1)
    with pytest.raises(TypeError):
        create_mil("abmil", D, 2, no_such_option=1)


def test_a_new_head_is_one_decorated_builder() -> None:
    class MeanPool(MILHead):
        def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.0) -> None:
            super().__init__(in_dim, n_classes, dropout)
            self.fc = torch.nn.Linear(in_dim, n_classes)

        def forward(self, bag: torch.Tensor) -> MILOutput:
            bag = self.as_bag(bag)
            return MILOutput(self.fc(bag.mean(1)), torch.full(bag.shape[1:2], 1 / bag.shape[1]))

    @register_mil("test_meanpool")
    def build(in_dim: int, n_classes: int, **kw: object) -> MeanPool:
        return MeanPool(in_dim, n_classes, **kw)  # type: ignore[arg-type]

    try:
        assert "test_meanpool" in list_mil()
        assert create_mil("test_meanpool", D, 2)(torch.randn(5, D)).logits.shape == (1, 2)
        with pytest.raises(ValueError, match="already registered"):
            register_mil("test_meanpool")(lambda *a, **k: None)  # type: ignore[arg-type,return-value]
    finally:
        registry._BUILDERS.pop("test_meanpool", None)


# --- one interface ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 37])
@pytest.mark.parametrize("name", HEADS)
def test_output_shapes_for_small_and_odd_bags(heads: dict[str, MILHead], name: str, n: int) -> None:
    bag = torch.randn(n, D)
    with torch.no_grad():
        out = heads[name](bag)
        batched = heads[name](bag.unsqueeze(0))
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (1, N_CLASSES) and out.scores.shape == (n,)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.scores).all()
    torch.testing.assert_close(batched.logits, out.logits)  # N×D and 1×N×D are the same slide
    torch.testing.assert_close(out.probs.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("name,n", [("abmil", 3000), ("abmil_plain", 3000), ("transmil", 3000), ("mambamil", 2000)])
def test_large_bags(heads: dict[str, MILHead], name: str, n: int) -> None:
    """TransMIL switches to Nyström attention above 256 tokens; MambaMIL scans 2000 positions."""
    with torch.no_grad():
        out = heads[name](torch.randn(n, D))
    assert out.logits.shape == (1, N_CLASSES) and out.scores.shape == (n,)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", HEADS)
def test_scores_are_a_distribution_over_instances(heads: dict[str, MILHead], name: str) -> None:
    """Every built-in head's scores are attention weights: non-negative, summing to 1 over the bag."""
    with torch.no_grad():
        scores = heads[name](torch.randn(50, D)).scores
    assert (scores >= 0).all()
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0))


def test_transmil_scores_are_detached_class_token_attention(heads: dict[str, MILHead]) -> None:
    bag = torch.randn(10, D, requires_grad=True)  # 10 → padded to 16 tokens: copies' attention is folded back
    out = heads["transmil"](bag)
    assert out.scores.shape == (10,) and not out.scores.requires_grad
    assert out.logits.requires_grad


@pytest.mark.parametrize("name", HEADS)
def test_malformed_bags_are_refused(heads: dict[str, MILHead], name: str) -> None:
    with pytest.raises(ValueError, match="one slide"):
        heads[name](torch.randn(2, 5, D))
    with pytest.raises(ValueError, match="in_dim"):
        heads[name](torch.randn(5, D + 1))
    with pytest.raises(ValueError, match="empty bag"):
        heads[name](torch.randn(0, D))


# --- instance order -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["abmil", "abmil_plain"])
def test_abmil_ignores_instance_order_and_its_scores_follow_the_instances(heads: dict[str, MILHead], name: str) -> None:
    bag = torch.randn(37, D)
    perm = torch.randperm(37)
    with torch.no_grad():
        out, shuffled = heads[name](bag), heads[name](bag[perm])
    torch.testing.assert_close(shuffled.logits, out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled.scores, out.scores[perm], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ORDER_SENSITIVE)
def test_transmil_and_mambamil_depend_on_instance_order(heads: dict[str, MILHead], name: str) -> None:
    """Not a defect: PPEG gives TransMIL positions and a scan reads MambaMIL's bag in order."""
    bag = torch.randn(37, D)
    with torch.no_grad():
        a, b = heads[name](bag).logits, heads[name](bag.flip(0)).logits
    assert not torch.allclose(a, b, atol=1e-6)


def test_strided_order_interleaves_by_rate() -> None:
    assert strided_order(25, 10).tolist() == [0, 10, 20, 1, 11, 21, 2, 12, 22, 3, 13, 23, 4, 14, 24,
                                              5, 15, 6, 16, 7, 17, 8, 18, 9, 19]
    assert strided_order(7, 10).tolist() == list(range(7))
    assert sorted(strided_order(1001, 5).tolist()) == list(range(1001))


def test_srmamba_second_branch_reads_the_bag_in_strided_order() -> None:
    """Perturb instance 20 of 30 (rate 10). In order, it can only reach instances ≥ 20; in strided
    order (0, 10, 20, 1, 11, …) it reaches everything after it. So exactly instances 0 and 10,
    which precede it in both orders, must be unaffected — which also checks the un-reordering."""
    torch.manual_seed(0)
    block = SRMamba(16, rate=10).eval()
    h = torch.randn(1, 30, 16)
    moved = h.clone()
    moved[0, 20] += 1.0
    with torch.no_grad():
        changed = (block(h) - block(moved)).abs().amax(-1)[0] > 1e-6
    assert torch.nonzero(~changed).flatten().tolist() == [0, 10]


# --- training behaviour -------------------------------------------------------------------------

@pytest.mark.parametrize("name", HEADS)
def test_eval_mode_is_deterministic_and_train_mode_uses_dropout(name: str) -> None:
    head = make_head(name, dropout=0.5)
    bag = torch.randn(40, D)
    with torch.no_grad():
        torch.testing.assert_close(head(bag).logits, head(bag).logits, rtol=0, atol=0)
        head.train()
        assert not torch.equal(head(bag).logits, head(bag).logits)


@pytest.mark.parametrize("name", HEADS)
def test_gradients_reach_the_bag_and_every_parameter(name: str) -> None:
    """FBTA backpropagates through the MIL head into the trainable feature extractor."""
    head = make_head(name).train()
    bag = torch.randn(37, D, requires_grad=True)
    F.cross_entropy(head(bag).logits, torch.tensor([1])).backward()
    assert bag.grad is not None and torch.isfinite(bag.grad).all() and bag.grad.abs().sum() > 0
    missing = [n for n, p in head.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"


def _toy_bags(n_bags: int = 8, n_instances: int = 20, k: int = 3, shift: float = 3.0) -> list[tuple[torch.Tensor, int]]:
    """Positive bags hide k instances shifted along one direction; negatives are pure noise."""
    g = torch.Generator().manual_seed(0)
    direction = F.normalize(torch.randn(D, generator=g), dim=0)
    bags = []
    for i in range(n_bags):
        x, label = torch.randn(n_instances, D, generator=g), i % 2
        if label:
            x[torch.randperm(n_instances, generator=g)[:k]] += shift * direction
        bags.append((x, label))
    return bags


NARROW = {"abmil": {}, "abmil_plain": {}, "transmil": {"dim": 64}, "mambamil": {"dim": 64, "attn_dim": 32}}


@pytest.mark.parametrize("name", HEADS)
def test_each_head_can_fit_a_tiny_bag_problem(name: str) -> None:
    head = make_head(name, n_classes=2, **NARROW[name])
    bags = _toy_bags()
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    accuracy = 0.0
    for step in range(1, 151):
        head.train()
        opt.zero_grad()
        loss = sum(F.cross_entropy(head(x).logits, torch.tensor([y])) for x, y in bags) / len(bags)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            head.eval()
            with torch.no_grad():
                accuracy = sum(int(head(x).logits.argmax()) == y for x, y in bags) / len(bags)
            if accuracy == 1.0:
                break
    assert accuracy == 1.0, f"{name}: train accuracy {accuracy} after {step} Adam steps"


def test_realistic_sizes_smoke() -> None:
    """1024-d features (a truncated ResNet-50), default widths, a few hundred patches, forward + backward."""
    bag = torch.randn(300, 1024, requires_grad=True)
    for name in HEADS:
        torch.manual_seed(0)
        head = create_mil(name, 1024, 2)
        out = head(bag)
        out.logits.sum().backward()
        assert out.logits.shape == (1, 2) and out.scores.shape == (300,)
    assert bag.grad is not None and torch.isfinite(bag.grad).all()


def test_no_head_hard_codes_cuda() -> None:
    src = Path(__file__).resolve().parents[1] / "fbta" / "mil"
    offenders = [p.name for p in src.glob("*.py") if ".cuda(" in p.read_text()]
    assert not offenders


# --- Nyström attention --------------------------------------------------------------------------

def test_nystrom_attention_matches_exact_attention_when_landmarks_summarise_the_tokens() -> None:
    """With every token duplicated, the 16 segment means are the 16 distinct tokens, and Nyström
    attention equals softmax attention up to the 6-iteration pseudo-inverse (≈1 %)."""
    torch.manual_seed(0)
    nystrom = NystromAttention(32, heads=2, landmarks=16, dropout=0.0).eval()
    exact = NystromAttention(32, heads=2, landmarks=64, dropout=0.0).eval()  # n ≤ landmarks: exact path
    exact.load_state_dict(nystrom.state_dict())
    x = torch.randn(1, 16, 32).repeat_interleave(2, dim=1)
    with torch.no_grad():
        approx, reference = nystrom(x)[0], exact(x)[0]
    assert (approx - reference).abs().max() < 0.05 * reference.abs().max()


# --- selective scan -----------------------------------------------------------------------------

def _scan_inputs(
    length: int, dtype: torch.dtype, batch: int = 2, dm: int = 8, n: int = 4, seed: int = 0,
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    u, delta, z = rnd(batch, dm, length), 0.5 * rnd(batch, dm, length), rnd(batch, dm, length)
    B, C = rnd(batch, n, length), rnd(batch, n, length)
    A = -(torch.rand(dm, n, generator=g, dtype=dtype) * 16 + 0.1)  # strong and weak decays
    D, delta_bias = rnd(dm), 0.5 * rnd(dm) - 1.0
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]


def _scan_and_grads(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], inputs: list[torch.Tensor], **kw: object,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    y, last = fn(*inputs, return_last_state=True, **kw)
    grads = torch.autograd.grad(y.sin().sum() + last.cos().sum(), inputs)
    return y, last, grads


@pytest.mark.parametrize("length", [1, 37, DEFAULT_CHUNK, 1000])
def test_chunked_scan_equals_the_reference_loop_in_float64(length: int) -> None:
    """Lengths below, equal to and not a multiple of the chunk; outputs, last state and all gradients."""
    inputs = _scan_inputs(length, torch.float64)
    y_ref, last_ref, g_ref = _scan_and_grads(selective_scan_ref, inputs)
    y, last, g = _scan_and_grads(selective_scan_chunked, inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last, last_ref, rtol=1e-6, atol=1e-6)
    for name, a, b in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"gradient w.r.t. {name}")


def test_chunked_scan_equals_the_reference_loop_in_float32() -> None:
    inputs = _scan_inputs(1000, torch.float32)
    y_ref, last_ref, g_ref = _scan_and_grads(selective_scan_ref, inputs)
    y, last, g = _scan_and_grads(selective_scan_chunked, inputs, chunk=48)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, last_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("delta_shift", [-8.0, 8.0])
def test_chunked_scan_handles_extreme_step_sizes(delta_shift: float) -> None:
    """Δ≈3e-4 (memory over the whole bag) and Δ≈8 (Δ·A down to −130 per step: decays that underflow)."""
    u, delta, A, B, C, D_, z, bias = (t.detach() for t in _scan_inputs(500, torch.float32))
    args = (u, delta, A, B, C, D_, z, bias + delta_shift)
    y = selective_scan_chunked(*args)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, selective_scan_ref(*args), rtol=1e-4, atol=1e-4)


def test_chunked_scan_passes_gradcheck() -> None:
    inputs = _scan_inputs(20, torch.float64, batch=1, dm=3, n=2)
    assert torch.autograd.gradcheck(lambda *a: selective_scan_chunked(*a, chunk=7), inputs)


def test_scan_keeps_half_precision_inputs_in_their_dtype() -> None:
    u, delta, A, B, C, D_, z, bias = (t.detach() for t in _scan_inputs(50, torch.float32))
    y = selective_scan_chunked(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), D_, z.bfloat16(), bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), selective_scan_ref(u, delta, A, B, C, D_, z, bias), rtol=0.05, atol=0.05)


def test_auto_scan_on_cpu_is_the_chunked_pytorch_scan() -> None:
    inputs = [t.detach() for t in _scan_inputs(100, torch.float32)]
    assert torch.equal(selective_scan(*inputs), selective_scan_chunked(*inputs))


_FUSED_MISSING = [why for absent, why in (
    (not torch.cuda.is_available(), "no CUDA device"),
    (not fused_scan_available(), "mamba_ssm is not installed (it builds only with CUDA; not in the pinned stack)"),
) if absent]


@pytest.mark.skipif(
    bool(_FUSED_MISSING), reason="the fused selective-scan kernel needs mamba_ssm on a GPU: " + "; ".join(_FUSED_MISSING),
)
def test_fused_cuda_kernel_agrees_with_the_pytorch_scan() -> None:
    inputs = [t.detach().cuda().requires_grad_() for t in _scan_inputs(1000, torch.float32)]
    y_fused, last_fused, g_fused = _scan_and_grads(selective_scan, inputs, impl="fused")
    y, last, g = _scan_and_grads(selective_scan, inputs, impl="chunked")
    torch.testing.assert_close(y_fused, y, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(last_fused, last, rtol=1e-3, atol=1e-3)
    for a, b in zip(g_fused, g):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


@pytest.mark.parametrize("name", HEADS)
def test_a_head_standardises_its_input_with_the_stats_it_carries(name: str) -> None:
    plain, fitted = make_head(name), make_head(name)
    mean, std = torch.linspace(-1, 1, D), torch.linspace(0.5, 2, D)
    fitted.set_input_stats(mean, std)
    bag = torch.randn(17, D) * std + mean
    torch.testing.assert_close(fitted(bag).logits, plain((bag - mean) / std).logits)
    reloaded = make_head(name)
    reloaded.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(reloaded(bag).logits, fitted(bag).logits)


def test_a_checkpoint_without_input_stats_loads_as_no_standardisation() -> None:
    head = make_head("abmil")
    old = {k: v for k, v in head.state_dict().items() if k not in ("in_mean", "in_std")}
    fresh = make_head("abmil")
    fresh.set_input_stats(torch.ones(D), torch.full((D,), 3.0))
    fresh.load_state_dict(old)
    assert torch.equal(fresh.in_mean, torch.zeros(D)) and torch.equal(fresh.in_std, torch.ones(D))


def test_feature_stats_stream_over_slides_and_floor_dead_units(tmp_path: Path) -> None:
    import numpy as np

    from fbta.io.h5 import write_features
    from fbta.mil.data import BagItem, feature_stats

    rng = np.random.default_rng(0)
    bags = [rng.normal(3.0, 2.0, size=(n, 8)).astype(np.float32) for n in (40, 70)]
    for b in bags:
        b[:, 0] = 0.0  # a dead ReLU unit: no spread in the frozen features
    items = []
    for i, b in enumerate(bags):
        write_features(tmp_path / f"s{i}.h5", b, np.zeros((len(b), 2)), {})
        items.append(BagItem(f"s{i}", tmp_path / f"s{i}.h5", 0, len(b)))
    mean, std = feature_stats(items)
    every = np.concatenate(bags)
    np.testing.assert_allclose(mean, every.mean(0), rtol=1e-5, atol=1e-5)
    true_std = every.std(0)
    floor = np.median(true_std)
    np.testing.assert_allclose(std, np.maximum(true_std, floor), rtol=1e-4)
    assert true_std[0] == 0 and std[0] == pytest.approx(floor, rel=1e-4)  # the dead unit is floored, not ~0
