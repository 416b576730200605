"""IKD-MIL building blocks: losses, metrics, mask handling, the side-output net, the segmenter files, role reversal."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fbta.seg import SegmenterError, load_segmenter
from fbta.seg.dataset import MaskError, PatchSet, patch_masks, read_mask
from fbta.seg.distill import DistillOptions, fit_distill
from fbta.seg.losses import distill_dice_loss, gmp, soft_dice, teacher_dice_loss, weak_dice, weighted_ce
from fbta.seg.metrics import f1_iou, hausdorff, score_image, score_maps
from fbta.seg.model import save_segmenter
from fbta.seg.network import SegOutput, SideOutputNet, create_segnet
from fbta.seg.train import FitOptions, fit_teacher


def _out(*maps: torch.Tensor) -> SegOutput:
    return SegOutput(list(maps[:3]), maps[3])


# ------------------------------------------------------------------------------------------ losses

def test_soft_dice_is_zero_for_a_perfect_map_and_high_for_the_inverse():
    t = torch.zeros(2, 1, 8, 8)
    t[:, :, :4] = 1
    assert soft_dice(t, t).max() < 1e-6
    assert soft_dice(1 - t, t).min() > 0.95


def test_weak_dice_inverts_negative_images():
    p = torch.zeros(2, 1, 4, 4)  # predicts background everywhere
    ones = torch.ones_like(p)
    loss = weak_dice(p, ones, torch.tensor([True, False]))
    assert loss[0] > 0.9 and loss[1] < 1e-6  # wrong on the positive image, right on the negative one


def test_teacher_dice_rewards_maps_that_follow_the_image_label():
    labels = torch.tensor([1.0, 0.0])
    good = torch.stack([torch.full((1, 8, 8), 0.95), torch.full((1, 8, 8), 0.05)])
    bad = 1 - good
    assert teacher_dice_loss(_out(good, good, good, good), labels) < 0.5
    assert teacher_dice_loss(_out(bad, bad, bad, bad), labels) > 6  # 4 maps × 2 images, each ≈ 0.9


def test_generalised_mean_pooling_sits_between_mean_and_max():
    p = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])
    assert gmp(p, 1.0).item() == pytest.approx(0.25, abs=1e-4)
    assert 0.25 < gmp(p, 4.0).item() < 1.0
    assert gmp(p, 64.0).item() > 0.95


def test_fusion_kd_targets_the_teacher_fused_map_and_blockwise_its_sides():
    labels = torch.tensor([1.0])
    t_side = torch.zeros(1, 1, 4, 4)
    t_fused = torch.ones(1, 1, 4, 4)
    teacher = _out(t_side, t_side, t_side, t_fused)
    student = _out(t_fused, t_fused, t_fused, t_fused)  # matches the fused map everywhere
    assert distill_dice_loss(student, teacher, labels, "fusion") < 1e-5
    assert distill_dice_loss(student, teacher, labels, "blockwise") > 2.5  # three sides disagree
    with pytest.raises(ValueError, match="fusion or blockwise"):
        distill_dice_loss(student, teacher, labels, "nope")


def test_weighted_ce_thresholds_the_pseudo_label_and_damps_disagreeing_pixels():
    teacher = torch.full((1, 1, 2, 2), 0.6)  # ≥ 0.5 → label 1 (the authors' .long() would give 0)
    agree = torch.full((1, 1, 2, 2), 0.9)
    assert weighted_ce(agree, teacher).item() == pytest.approx(-math.log(0.9), rel=1e-4)  # single class: w = 1
    teacher2 = torch.tensor([[[[0.9, 0.9], [0.1, 0.1]]]])
    student = torch.tensor([[[[0.9, 0.1], [0.1, 0.1]]]])  # one pixel disagrees
    plain = torch.nn.functional.binary_cross_entropy(student, (teacher2 >= 0.5).float())
    assert weighted_ce(student, teacher2).item() < plain.item()  # the noisy pixel weighs less


# ------------------------------------------------------------------------------------------ metrics

def test_f1_iou_counts_and_empty_maps():
    pred = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), bool)
    pred[:2] = True  # 8 px
    truth[:1] = True  # 4 px inside
    f1, iou = f1_iou(pred, truth)
    assert f1 == pytest.approx(8 / 12) and iou == pytest.approx(4 / 8)
    assert f1_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == (1.0, 1.0)


def test_hausdorff_of_shifted_squares_and_empty_prediction():
    a = np.zeros((32, 32), bool)
    b = np.zeros((32, 32), bool)
    a[4:8, 4:8] = True
    b[4:8, 14:18] = True
    assert hausdorff(a, b) == pytest.approx(10.0)
    assert hausdorff(np.zeros_like(a), b) == pytest.approx(math.hypot(32, 32))


def test_score_image_uses_tumour_f1_on_positives_and_background_f1_on_negatives():
    truth = np.zeros((64, 64), bool)
    truth[:, :32] = True
    perfect = truth.astype(np.float32)
    s = score_image(perfect, truth)
    assert s.positive and s.f1 > 0.97 and s.hausdorff <= 2
    neg = score_image(np.zeros((64, 64), np.float32), np.zeros((64, 64), bool))
    assert not neg.positive and neg.f1 == 1.0 and math.isnan(neg.hausdorff)
    fp = score_image(np.ones((64, 64), np.float32), np.zeros((64, 64), bool))
    assert fp.f1 == 0.0 and fp.iou == 0.0  # tumour called everywhere on a negative image
    both = score_maps(np.stack([perfect, np.ones((64, 64), np.float32)]), np.stack([truth, np.zeros_like(truth)]))
    assert both.n == 2 and both.n_pos == 1 and both.f1 == pytest.approx((s.f1 + 0.0) / 2)


def test_gaussian_smoothing_removes_isolated_speckle_before_thresholding():
    prob = np.zeros((64, 64), np.float32)
    prob[10, 10] = 1.0  # a single confident pixel
    assert score_image(prob, np.zeros((64, 64), bool), sigma=3.0).f1 == 1.0
    assert score_image(prob, np.zeros((64, 64), bool), sigma=0.0).f1 < 1.0


# ------------------------------------------------------------------------------------------ masks

def test_patch_masks_maps_level0_patches_onto_a_downsampled_mask():
    mask = np.zeros((64, 128), bool)  # level 0 is 2048×1024 at downsample 16
    mask[16:32, 32:48] = True  # level-0 x 512..768, y 256..512
    coords = np.array([[512, 256], [0, 0], [384, 256]])
    pm = patch_masks(mask, coords, 256, (2048, 1024), 256)
    assert pm.shape == (3, 256, 256)
    assert pm[0].all() and not pm[1].any()
    assert pm[2].mean() == pytest.approx(0.5)  # half of that patch overlaps
    with pytest.raises(MaskError, match="aspect ratio"):
        patch_masks(mask, coords, 256, (2048, 2048), 256)


def test_read_mask_png_tiff_and_binary_masks(tmp_path: Path):
    import tifffile

    arr = np.zeros((8, 8), np.uint8)
    arr[:4] = 255
    arr[4, 0] = 100  # antialiased edge of a 0–255 mask: not tumour
    Image.fromarray(arr).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "b.tif", (arr > 127).astype(np.uint8))  # a 0/1 label mask
    assert read_mask(tmp_path / "a.png").sum() == 32
    assert read_mask(tmp_path / "b.tif").sum() == 32
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(MaskError, match="c.png"):
        read_mask(tmp_path / "c.png")


# ------------------------------------------------------------------------------------------ network

def _net(fusion: str = "fixed") -> SideOutputNet:
    torch.manual_seed(0)
    return SideOutputNet("test_efficientnet", (0, 1, 2), fusion, (0.3, 0.3, 0.4))


def test_side_outputs_are_probabilities_at_input_size_and_fused_is_their_weighted_sum():
    net = _net().eval()
    x = net.normalise(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
    out = net(x)
    assert len(out.sides) == 3 and all(s.shape == (2, 1, 64, 64) for s in out.sides)
    assert all(0 <= s.min() and s.max() <= 1 for s in out.maps())
    expected = 0.3 * out.sides[0] + 0.3 * out.sides[1] + 0.4 * out.sides[2]
    assert torch.allclose(out.fused, expected, atol=1e-6)
    assert len(net.backbone.blocks) == 3  # deeper blocks pruned: no compute spent on them


def test_learnable_fusion_starts_at_the_fixed_weights_and_trains():
    net = _net("learnable")
    assert torch.allclose(net.fusion_weights, torch.tensor([0.3, 0.3, 0.4]), atol=1e-6)
    out = net(net.normalise(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)))
    out.fused.mean().backward()
    assert net.fusion_logits.grad is not None and float(net.fusion_weights.sum().detach()) == pytest.approx(1.0)


def test_create_segnet_copies_the_extractor_weights_into_the_backbone():
    from fbta.features import create_extractor

    net, weights_id = create_segnet("test_efficientnet", "random:3", [0, 1, 2], "fixed", [0.3, 0.3, 0.4])
    ext = create_extractor("test_efficientnet", weights="random:3")
    assert "random" in weights_id
    assert torch.equal(net.backbone.conv_stem.weight, ext.trunk.conv_stem.weight)
    with pytest.raises(ValueError, match="stages"):
        SideOutputNet("test_efficientnet", (0, 1, 2), "fixed", (0.5, 0.5))


def test_segmenter_round_trip_and_clear_errors(tmp_path: Path):
    net = _net().eval()
    save_segmenter(tmp_path / "m", net, {"role": "teacher", "input_size": 32, "val_f1": 0.5})
    seg = load_segmenter(tmp_path / "m")
    patches = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    probs = seg.predict(patches)
    assert probs.shape == (3, 48, 48) and probs.dtype == np.float32  # at the patches' own size
    again = type(seg).from_files(tmp_path / "m/meta.json", tmp_path / "m/best.pt")
    assert np.array_equal(again.predict(patches), probs)
    assert [p.name for p in seg.files] == ["meta.json", "best.pt"]
    with pytest.raises(SegmenterError, match="no trained segmenter"):
        load_segmenter(tmp_path / "nothing")
    meta = json.loads((tmp_path / "m/meta.json").read_text())
    meta["net"]["arch"] = "test_resnet"
    (tmp_path / "m/meta.json").write_text(json.dumps(meta))
    with pytest.raises(SegmenterError, match="does not fit"):
        load_segmenter(tmp_path / "m")
    with pytest.raises(ValueError, match="uint8"):
        seg.predict(patches.astype(np.float32))


# ------------------------------------------------------------------------------------------ training

def _toy_set(n: int = 8, seed: int = 0) -> PatchSet:
    """Dark-blob patches: positives carry a dark square (their pixel mask), negatives are plain pink."""
    rng = np.random.default_rng(seed)
    images = np.full((n, 32, 32, 3), (220, 150, 190), np.uint8) + rng.integers(0, 10, (n, 32, 32, 3)).astype(np.uint8)
    masks = np.zeros((n, 32, 32), bool)
    labels = np.arange(n) % 2
    for i in np.flatnonzero(labels):
        masks[i, 8:24, 8:24] = True
        images[i, 8:24, 8:24] = (60, 30, 90)
    return PatchSet.from_arrays(images, labels, masks)


def _opts(epochs: int) -> FitOptions:
    return FitOptions(epochs=epochs, lr=1e-3, weight_decay=0.0, batch_size=4, seed=0, sigma=1.0)


def test_teacher_fit_keeps_the_best_validation_epoch():
    torch.manual_seed(0)
    net = _net()
    res = fit_teacher(net, _toy_set(8), _toy_set(4, seed=1), _opts(2), torch.device("cpu"))
    assert len(res.history) == 2
    assert res.best.f1 == max(e.val.f1 for e in res.history)
    assert res.history[res.best_epoch - 1].val.f1 == res.best.f1


def test_role_reversal_swaps_when_the_student_beats_the_best_and_never_crashes_when_it_does_not():
    train, val = _toy_set(8), _toy_set(4, seed=1)
    dopts = DistillOptions(reversal_start=1, reversal_every=1)
    torch.manual_seed(0)
    teacher, student = _net(), _net()
    beaten = fit_distill(teacher, student, -1.0, train, val, _opts(2), dopts, torch.device("cpu"))
    assert len(beaten.extra["reversals"]) >= 1 and beaten.extra["beat_teacher"]
    assert beaten.history[0].extra["reversal"] == 1.0  # epoch 1 beat F1 −1 and was checked
    torch.manual_seed(0)
    never = fit_distill(_net(), _net(), 2.0, train, val, _opts(2), dopts, torch.device("cpu"))
    assert never.extra["reversals"] == [] and not never.extra["beat_teacher"]
    assert never.best.f1 == max(e.val.f1 for e in never.history)  # the best student is still returned
    off = fit_distill(_net(), _net(), -1.0, train, val, _opts(2),
                      DistillOptions(role_reversal=False, weighted_ce=False, kd="blockwise"), torch.device("cpu"))
    assert off.extra["reversals"] == []
