"""Specification of FBTA's parts (METHODS.md A): translator, augmentation, pseudo-bags, the step, EMA.

Small tensors and timm's tiny ``test_efficientnet``: every test runs in about a second.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fbta.config import InputError
from fbta.features.augment import Augment, hed_jitter, hue_shift
from fbta.e2e.pseudobags import ClusterError, EpochPlan, PseudoBag, draw_subset, read_cluster_labels
from fbta.e2e.step import FBTAModels, StepOptions, ema_update, fbta_step
from fbta.e2e.trainer import extractor_units, prepare_tfe
from fbta.e2e.translator import Translator
from fbta.features.registry import create_extractor
from fbta.mil import create_mil

# ----------------------------------------------------------------------------- translator


def test_untrained_translator_is_the_identity_so_fbta_starts_where_vanilla_mil_does() -> None:
    x = torch.randn(50, 32)
    t = Translator(32, k=10)
    torch.testing.assert_close(t(x), x, rtol=0, atol=1e-6)
    assert t.heads(x).shape == (10, 50, 32)


def test_translation_bag_is_the_mean_of_k_residual_heads_in_instance_order() -> None:
    torch.manual_seed(0)
    t = Translator(16, k=4, hidden=8, layernorm=True)
    for p in t.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(20, 16)
    heads = t.heads(x)
    for k in range(4):  # head k by hand: x + W2·GELU(W1·LN(x) + b1) + b2
        z = torch.nn.functional.layer_norm(x, (16,)) * t.norm_weight[k] + t.norm_bias[k]
        h = x + torch.nn.functional.gelu(z @ t.w1[k] + t.b1[k]) @ t.w2[k] + t.b2[k]
        torch.testing.assert_close(heads[k], h)
    torch.testing.assert_close(t(x), heads.mean(0))
    perm = torch.randperm(20)
    torch.testing.assert_close(t(x[perm]), t(x)[perm])  # instance-wise: order preserved


def test_big_slides_are_translated_in_chunks_with_the_same_result() -> None:
    t = Translator(8, k=3, hidden=4).eval()
    torch.nn.init.normal_(t.w2)
    x = torch.randn(3000, 8)
    with torch.no_grad():
        full = t.heads(x).mean(0)
        chunked = t(x)  # 2**24 // (3·4) = 1.4 M rows per chunk: force small chunks via a huge hidden below
    torch.testing.assert_close(chunked, full)
    big = Translator(8, k=64, hidden=1 << 16).eval()  # chunk = 4 rows
    with torch.no_grad():
        torch.testing.assert_close(big(x[:10]), big.heads(x[:10]).mean(0))


def test_translator_refuses_features_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="N×8"):
        Translator(8)(torch.randn(5, 9))

# ----------------------------------------------------------------------------- augmentation


def test_augmentation_is_seeded_keeps_shape_and_range() -> None:
    x = torch.rand(6, 3, 32, 32)
    a = Augment()
    y1 = a(x, torch.Generator().manual_seed(1))
    y2 = a(x, torch.Generator().manual_seed(1))
    assert torch.equal(y1, y2) and y1.shape == x.shape
    assert y1.min() >= 0 and y1.max() <= 1
    assert not torch.equal(y1, a(x, torch.Generator().manual_seed(2)))


def test_geometric_augmentation_only_moves_pixels() -> None:
    x = torch.rand(8, 3, 16, 16)
    y = Augment(brightness=0, contrast=0, saturation=0, hue=0, hed_sigma=0)(x, torch.Generator().manual_seed(0))
    for a, b in zip(x, y):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)


def test_colour_transforms_are_the_identity_at_zero_strength() -> None:
    x = torch.rand(4, 3, 8, 8) * 0.9 + 0.05
    torch.testing.assert_close(hue_shift(x, torch.zeros(4, 1, 1, 1)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(hed_jitter(x, 0.0), x, atol=1e-5, rtol=0)

# ----------------------------------------------------------------------------- pseudo-bags


def test_stratified_subset_takes_m_per_cluster_and_random_takes_as_many() -> None:
    labels = np.array([0] * 50 + [1] * 3 + [2] * 1 + [3] * 20)
    rng = np.random.default_rng(0)
    idx = draw_subset(labels, 2, "kmeans", rng)
    assert np.bincount(labels[idx], minlength=4).tolist() == [2, 2, 1, 2]  # a 1-patch cluster gives what it has
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    rand = draw_subset(labels, 2, "random", np.random.default_rng(0))
    assert len(rand) == len(idx) and len(set(rand.tolist())) == len(rand)
    again = draw_subset(labels, 2, "kmeans", np.random.default_rng(0))
    assert np.array_equal(idx, again)


def test_epoch_plan_is_seeded_balanced_and_differs_between_epochs() -> None:
    labels = np.array([0] * 18 + [1] * 2)
    plan = EpochPlan(labels, seed=3)
    e0 = list(plan)
    assert e0 == list(plan)
    plan.set_epoch(1)
    assert list(plan) != e0
    drawn = [labels[i] for ep in range(20) for i, _ in (plan.set_epoch(ep) or list(plan))]
    assert 0.35 < np.mean(drawn) < 0.65  # the minority class is drawn about as often as the majority


def _clusters(path: Path, labels: np.ndarray, asked: int) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("labels", data=labels)
        f.attrs["n_clusters_requested"] = asked
        f.attrs["fbta_complete"] = True
    return path


def test_stale_or_missing_clusters_are_refused_with_the_file_and_the_fix(tmp_path: Path) -> None:
    good = _clusters(tmp_path / "a.h5", np.arange(10) % 3, 3)
    assert read_cluster_labels(good, 10, 3).tolist() == (np.arange(10) % 3).tolist()
    with pytest.raises(ClusterError, match=r"C=3 but cluster.n_clusters=5.*fbta cluster"):
        read_cluster_labels(good, 10, 5)
    with pytest.raises(ClusterError, match="10 cluster labels for 12 patches"):
        read_cluster_labels(good, 12, 3)
    with pytest.raises(ClusterError, match="run `fbta cluster` first"):
        read_cluster_labels(tmp_path / "missing.h5", 10, 3)
    assert issubclass(ClusterError, InputError)  # → one line and exit code 2 from the CLI

# ----------------------------------------------------------------------------- the step


SMALL = {"abmil": {"hidden": 16, "attn_dim": 8}, "abmil_plain": {"hidden": 16, "attn_dim": 8},
         "transmil": {"dim": 32, "heads": 4, "landmarks": 16}, "mambamil": {"dim": 32, "attn_dim": 16}}


def _models(arch: str = "abmil", **mil_kwargs: float) -> FBTAModels:
    torch.manual_seed(0)
    tfe = create_extractor("test_efficientnet", weights="random")
    prepare_tfe(tfe, trainable=True, train_blocks=2, freeze_bn=True)
    head = create_mil(arch, tfe.dim, 2, **SMALL[arch], **mil_kwargs)
    return FBTAModels(head, Translator(tfe.dim, k=3), tfe)


def _bag(m: FBTAModels, n: int, n_sub: int) -> PseudoBag:
    """A pseudo-bag whose frozen features are the frozen extractor's, as in a real cache."""
    pixels = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        frozen = m.tfe_ema(m.tfe_ema.preprocess(pixels))
    idx = torch.arange(0, n, n // n_sub)[:n_sub]
    return PseudoBag(0, torch.tensor(1), frozen, idx, pixels[idx], 0.0)


def test_one_step_gives_every_trained_part_a_gradient_and_l_dist_starts_at_zero() -> None:
    m = _models()
    units = dict(extractor_units(m.tfe.trunk))
    stats = fbta_step(m, _bag(m, 40, 8), 0.5, StepOptions(), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert stats["l_dist"] < 1e-10  # identity translator, TFE* = TFE = FFE on the non-augmented patches
    assert stats["l_cls"] > 0 and stats["n_subset"] == 8 and stats["n_patches"] == 40
    assert all(p.grad is not None for p in m.mil.parameters() if p.requires_grad)
    assert m.translator.w2.grad is not None and m.translator.w2.grad.abs().sum() > 0  # via MIL(F_TB)
    trained = [n for n, mod in units.items() if any(p.requires_grad for p in mod.parameters())]
    assert trained == list(units)[-2:]  # train_blocks=2
    assert all(p.grad is None for n, mod in units.items() if n not in trained for p in mod.parameters())
    assert any(p.grad.abs().sum() > 0 for p in units[trained[0]].parameters())
    assert all(p.grad is None for p in m.tfe_ema.parameters()) and all(p.grad is None for p in m.mil_ema.parameters())


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_fbta_is_plug_and_play_over_every_mil_head(arch: str) -> None:
    m = _models(arch)
    stats = fbta_step(m, _bag(m, 40, 8), 0.5, StepOptions(), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["l_cls"] > 0
    assert all(p.grad is not None for p in m.mil.parameters() if p.requires_grad)
    assert m.translator.w2.grad.abs().sum() > 0


def test_eb_only_view_leaves_the_translator_to_l_dist_alone() -> None:
    m = _models()
    bag = _bag(m, 30, 6)  # frozen features from the initial extractor
    frozen_state = {k: v.clone() for k, v in m.tfe_ema.state_dict().items()}  # FFE = the initial TFE*
    with torch.no_grad():  # let the teacher drift so that L_dist is not zero
        for p in m.tfe_ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stats = fbta_step(m, bag, 0.0, StepOptions(views=("eb",)), torch.device("cpu"))
    assert stats["l_dist"] > 0
    assert m.translator.w2.grad is not None  # L_dist reaches it
    m.translator.zero_grad(set_to_none=True)
    # back to FFE (not to the TFE's state: its forward in train mode moved its BatchNorm statistics)
    m.tfe_ema.load_state_dict(frozen_state)
    again = fbta_step(m, bag, 0.0, StepOptions(views=("eb",)), torch.device("cpu"))
    assert again["l_dist"] < 1e-8
    assert m.translator.w2.grad.abs().max() < 1e-6  # no drift, no EB→translator path: nothing to learn


def test_the_subset_not_the_slide_sets_the_extractor_work() -> None:
    m = _models()
    small = fbta_step(m, _bag(m, 40, 8), 0.0, StepOptions(), torch.device("cpu"))
    big_bag = _bag(m, 40, 8)._replace(features=torch.randn(20000, m.tfe.dim))  # a 20,000-patch slide
    big = fbta_step(m, big_bag, 0.0, StepOptions(), torch.device("cpu"))
    assert small["n_subset"] == big["n_subset"] == 8 and big["n_patches"] == 20000


def test_ema_is_alpha_old_plus_one_minus_alpha_new_buffers_included() -> None:
    a, b = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(3.0)
        a.running_mean.fill_(0.0)
        b.running_mean.fill_(10.0)
        b.num_batches_tracked.fill_(7)
    ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight, torch.full((3,), 1.2))
    torch.testing.assert_close(a.running_mean, torch.full((3,), 1.0))
    assert a.num_batches_tracked.item() == 7
    with pytest.raises(ValueError, match="ema_alpha"):
        ema_update(a, b, 1.0)


def test_a_frozen_extractor_gets_no_optimiser_group_and_no_gradient() -> None:
    tfe = create_extractor("test_efficientnet", weights="random")
    assert prepare_tfe(tfe, trainable=False, train_blocks=-1, freeze_bn=True) == []
    assert not any(p.requires_grad for p in tfe.parameters()) and not tfe.training


def test_the_whole_bag_is_every_patch_or_a_uniform_subset_of_max_bag() -> None:
    labels = np.zeros(50, np.int64)  # clusters play no part in a whole bag
    assert np.array_equal(draw_subset(labels, 1, "all", np.random.default_rng(0)), np.arange(50))
    capped = draw_subset(labels, 1, "all", np.random.default_rng(0), max_bag=20)
    assert len(capped) == 20 and len(set(capped.tolist())) == 20 and np.all(np.diff(capped) > 0)
    # a cap above N is no cap (a defect that sampled with replacement would repeat patches here)
    assert np.array_equal(draw_subset(labels, 1, "all", np.random.default_rng(1), max_bag=80), np.arange(50))


def test_more_bags_per_slide_give_more_steps_each_with_its_own_subset_seed() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    plan = EpochPlan(labels, seed=0, balanced=False, per_slide=3)
    steps = list(plan)
    assert len(plan) == len(steps) == 15
    assert sorted(i for i, _ in steps) == sorted(list(range(5)) * 3)  # a shuffle per pass: each slide 3 times
    assert len({s for _, s in steps}) == 15  # no two steps draw the same pseudo-bag
    assert len(list(EpochPlan(labels, seed=0, balanced=True, per_slide=2))) == 10
    with pytest.raises(ValueError, match="bags_per_slide"):
        EpochPlan(labels, seed=0, per_slide=0)


@pytest.mark.parametrize("hidden, layernorm", [(0, False), (16, True)])
def test_a_saved_translator_is_rebuilt_from_meta_json_and_translates_the_same(tmp_path: Path, hidden: int,
                                                                                layernorm: bool) -> None:
    """What inference reads back (meta.json's `translator` + translator.pt). Defects guarded (no test in the
    translator's own set caught them under `make mutate`): a key renamed in `config()`, `hidden` or `layernorm`
    dropped when rebuilding — the weights would then not fit, or a different network would translate."""
    from fbta.e2e.translator import TRANSLATOR, build_translator, load_translator, save_translator

    torch.manual_seed(0)
    t = Translator(8, k=3, hidden=hidden, layernorm=layernorm)
    with torch.no_grad():
        for w in t.parameters():  # not the initial (near-identity) weights: a rebuilt default must differ
            w.normal_()
    assert t.config() == {"dim": 8, "k": 3, "hidden": hidden or 8, "layernorm": layernorm}  # hidden 0: = dim
    save_translator(tmp_path, t)
    meta = {"arch": "abmil", "in_dim": 8, "classes": ["a", "b"], "mil_kwargs": {}, "translator": t.config()}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert (tmp_path / TRANSLATOR).exists() and not list(tmp_path.glob("*.tmp"))
    back = load_translator(tmp_path)
    assert back is not None and back.config() == t.config()
    x = torch.randn(5, 8)
    assert torch.equal(back.eval()(x), t.eval()(x))
    assert build_translator({}) is None and build_translator({"translator": None}) is None


# ---- what `make mutate` left alive in step.py and translator.py (docs/testing.md: mutation testing)

def test_the_loss_is_l_dist_plus_l_cls_plus_t_over_T_times_l_cons_and_l_cons_is_zero_while_teacher_is_student(
        ) -> None:
    """METHODS.md A.6: L = L_dist + L_cls + (t/T)·L_cons. Defects guarded (survivors of `make mutate`): L_cls
    subtracted, L_cons measured as 2 − cos (a constant the gradient ignores but the logged term does not), the
    teacher's softmax over the wrong axis — with dropout off the EMA teacher starts equal to its student, so
    every view's consistency term is exactly 0 at the first step."""
    m = _models(dropout=0.0)
    bag = _bag(m, 40, 8)
    from fbta.e2e.step import fbta_losses
    loss, terms = fbta_losses(m, bag, 0.7, StepOptions(), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert terms["l_cons"] == pytest.approx(0.0, abs=1e-6)
    assert terms["l_cls"] == pytest.approx(sum(terms[f"l_cls_{v}"] for v in ("fb", "eb", "tb")), rel=1e-6)
    assert loss.item() == pytest.approx(terms["l_dist"] + terms["l_cls"] + 0.7 * terms["l_cons"], rel=1e-6)
    with torch.no_grad():  # a teacher that differs: L_cons > 0 and it enters with weight t/T
        for p in m.mil_ema.parameters():
            p.add_(0.5 * torch.randn_like(p))
    loss, terms = fbta_losses(m, bag, 0.7, StepOptions(), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert 0.0 < terms["l_cons"] <= 3.0  # 1 − cos of two probability vectors, summed over 3 views
    assert loss.item() == pytest.approx(terms["l_dist"] + terms["l_cls"] + 0.7 * terms["l_cons"], rel=1e-6)
    assert terms["correct"] in (0.0, 1.0)  # the first view's prediction against the label, for train_acc
    first_view = m.mil(bag.features).logits.argmax(-1).item()
    assert terms["correct"] == float(first_view == int(bag.label))


def test_the_augmented_view_draws_from_the_steps_generator_only() -> None:
    """Defect guarded: the augmentation's generator dropped (by fbta_losses or fbta_step), so X_SB's augmentation
    comes from the global RNG and a resumed or repeated run no longer draws the same views."""
    from fbta.e2e.step import fbta_losses
    m = _models(dropout=0.0)  # no dropout: it draws from the global RNG by design
    bag = _bag(m, 40, 8)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # anything else drawing from the global RNG must not matter
        loss, _ = fbta_losses(m, bag, 0.5, StepOptions(), torch.device("cpu"), torch.Generator().manual_seed(7))
        runs.append(loss.item())
    assert runs[0] == runs[1]
    stats = []
    for global_seed in (3, 4):
        torch.manual_seed(global_seed)
        stats.append(fbta_step(m, bag, 0.5, StepOptions(), torch.device("cpu"), torch.Generator().manual_seed(7)))
    assert stats[0]["loss"] == stats[1]["loss"] == pytest.approx(runs[0], rel=1e-6)
    times = {k: v for k, v in stats[0].items() if k.endswith("_s")}  # each part's forward + share of backward
    assert times and all(0.0 <= v < 600 for v in times.values()), times  # durations, not clock readings


def test_a_non_finite_loss_names_each_term_and_the_fix() -> None:
    from fbta.e2e.step import fbta_losses
    m = _models()
    bag = _bag(m, 20, 4)
    bag = bag._replace(features=bag.features * float("nan"))
    with pytest.raises(FloatingPointError, match=r"L_dist .*L_cls .*L_cons .*lower the learning rates"):
        fbta_losses(m, bag, 0.5, StepOptions(), torch.device("cpu"))


def test_bf16_autocast_on_cpu_only_when_asked_for() -> None:
    from fbta.e2e.step import autocast_enabled
    cpu = torch.device("cpu")
    assert autocast_enabled(StepOptions(amp=True, amp_on_cpu=True), cpu)
    assert not autocast_enabled(StepOptions(amp=True, amp_on_cpu=False), cpu)
    assert not autocast_enabled(StepOptions(amp=False, amp_on_cpu=True), cpu)


def test_models_update_ema_moves_both_teachers_by_alpha() -> None:
    m = _models()
    before = {k: v.clone() for k, v in m.mil_ema.state_dict().items()}
    with torch.no_grad():
        for p in m.mil.parameters():
            p.add_(1.0)
    m.update_ema(0.75)
    for k, v in m.mil_ema.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.75 * before[k] + 0.25 * m.mil.state_dict()[k], atol=1e-6), k


def test_the_translator_is_k_10_by_default_with_fan_in_init_and_no_norm_parameters_unless_asked() -> None:
    """METHODS.md A.3: K = 10 heads by default. Defects guarded: another default K; w1 drawn from
    U(bound, 1) instead of U(−bound, bound); LayerNorm parameters created (and saved) when layernorm is off."""
    torch.manual_seed(0)
    t = Translator(64)
    assert t.k == 10 and t.hidden == 64
    bound = 1.0 / 64 ** 0.5
    assert t.w1.abs().max() <= bound and t.w1.min() < 0 < t.w1.max()
    assert not any("norm" in k for k in t.state_dict())
    assert {"norm_weight", "norm_bias"} <= set(Translator(64, layernorm=True).state_dict())
    assert Translator(1, k=1).k == 1  # the smallest valid translator
    with pytest.raises(ValueError, match=r"dim=0, k=3"):
        Translator(0, k=3)


def test_a_one_slide_batch_translates_like_its_bag() -> None:
    """Defect guarded: the 1×N×D (batch of one slide) input no longer squeezed to N×D in forward or heads."""
    torch.manual_seed(0)
    t = Translator(8, k=3, hidden=4)
    with torch.no_grad():
        t.w2.normal_()
    x = torch.randn(5, 8)
    assert torch.equal(t(x[None]), t(x)) and t(x[None]).shape == (5, 8)
    assert torch.equal(t.heads(x[None]), t.heads(x)) and t.heads(x).shape == (3, 5, 8)


def test_save_translator_writes_the_state_it_is_given_and_a_missing_file_names_the_translator(
        tmp_path: Path) -> None:
    """The training loop saves the EMA-selected state, not the live module's. Defects guarded: ``state`` ignored;
    the error for a missing translator.pt not saying what is missing."""
    from fbta.e2e.translator import TRANSLATOR, load_translator, save_translator
    from fbta.mil.checkpoint import CheckpointError

    t = Translator(8, k=3)
    chosen = {k: torch.full_like(v, 0.5) for k, v in t.state_dict().items()}
    save_translator(tmp_path, t, state=chosen)
    meta = {"arch": "abmil", "in_dim": 8, "classes": ["a", "b"], "mil_kwargs": {}, "translator": t.config()}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    back = load_translator(tmp_path)
    assert all(torch.equal(v, chosen[k]) for k, v in back.state_dict().items())
    (tmp_path / TRANSLATOR).unlink()
    with pytest.raises(CheckpointError, match="translator weights missing"):
        load_translator(tmp_path)


def test_extractor_every_s_steps_the_extractor_on_the_mean_gradient_of_s_slides_and_the_head_on_each() -> None:
    """fbta.extractor_every: the extractor moves at calls S, 2S, … and at each epoch's last call, by one Adam
    step on the mean of the gradients set aside since its last step; the head moves at every call."""
    from fbta.e2e.accumulate import ExtractorEvery

    torch.manual_seed(0)
    head, ext = torch.nn.Linear(4, 2), torch.nn.Linear(3, 4)
    ref = torch.nn.Linear(3, 4)  # the extractor stepped by hand with the mean gradients
    ref.load_state_dict(ext.state_dict())
    groups = [{"params": list(head.parameters()), "lr": 1e-2}, {"params": list(ext.parameters()), "lr": 1e-3}]
    opt = ExtractorEvery(torch.optim.Adam(groups, weight_decay=1e-5), list(ext.parameters()), every=3, per_epoch=7)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, weight_decay=1e-5)
    set_aside: list[list[torch.Tensor]] = []
    for epoch in range(2):
        for call in range(1, 8):
            before_head = [p.detach().clone() for p in head.parameters()]
            before_ext = [p.detach().clone() for p in ext.parameters()]
            opt.zero_grad()
            x = torch.randn(5, 3)
            torch.nn.functional.cross_entropy(head(ext(x)), torch.randint(0, 2, (5,))).backward()
            set_aside.append([p.grad.detach().clone() for p in ext.parameters()])
            opt.step()
            assert all(not torch.equal(a, b) for a, b in zip(before_head, head.parameters()))
            moved = [not torch.equal(a, b) for a, b in zip(before_ext, ext.parameters())]
            if call in (3, 6, 7):  # every third slide, and the epoch's last: nothing crosses into the next epoch
                assert all(moved)
                ref_opt.zero_grad()
                for p, *grads in zip(ref.parameters(), *set_aside):
                    p.grad = torch.stack(grads).mean(0)
                ref_opt.step()
                set_aside = []
                for a, b in zip(ext.parameters(), ref.parameters()):
                    torch.testing.assert_close(a, b)
            else:
                assert not any(moved)
    assert opt.extractor_updates_per_epoch == 3
    with pytest.raises(ValueError, match="extractor_every=0"):
        ExtractorEvery(ref_opt, list(ref.parameters()), every=0, per_epoch=7)
