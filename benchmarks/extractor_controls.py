"""The controls that say what FBTA's extractor *could* learn (issue #29; METHODS.md A, "the controls").

- **Patch targets** from the annotation masks (evaluation only: nothing here is
  shipped): a patch whose tumour share is ≥ ``min_share`` carries its slide's
  label; a tumour-free patch carries the label of the class whose slides have
  no tumour, if the cohort has one (detection: normal vs tumour); every other
  patch is left out. So on a detection cohort the targets are tumour vs
  normal, on a subtyping cohort (tumour in both classes) subtype A vs B tumour.
- **Probe**: standardised logistic regression on one representation of those
  patches, fitted on the training slides' patches, scored (AUC) on the test
  slides' — the held-out tumour-patch probe of an extractor.
- **Held-out-only probe**: the same regression fitted *and* scored on the test
  slides alone, by slide-grouped cross-validation. An extractor trained on the
  training slides can make *them* separable along directions that do not
  carry over (their own idiosyncrasies); the first probe, fitted on those
  slides, inherits that, this one does not: it asks only whether slides the
  extractor never saw are linearly separable in its space.
- **Oracle**: FBTA's extractor *configuration* (same backbone, input size,
  trainable units, BatchNorm mode, learning rate, weight decay, augmentation,
  bag size C·M and number of steps) trained on those patch targets with a
  linear head. If even the oracle does not move the probe, the configuration
  cannot represent the signal, whatever FBTA does with slide labels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from fbta.e2e.pseudobags import patch_attrs
from fbta.e2e.trainer import prepare_tfe
from fbta.features.augment import Augment
from fbta.features.extract import SlidePatches
from fbta.features.registry import Extractor, create_extractor
from fbta.io.h5 import feature_file_attrs, read_features, write_features
from fbta.seg.dataset import _level0_dims, find_mask, patch_masks, read_mask


@dataclass(frozen=True)
class ExtractorConfig:
    """FBTA's trainable-extractor configuration: what the oracle must share with it to answer for it."""

    model: str = "efficientnet_lite0"
    weights: Optional[str] = None
    input_size: int = 112
    train_blocks: int = 3  # -1: every unit
    freeze_bn: bool = True  # BatchNorm in eval mode with the pretrained statistics
    lr: float = 1.5e-5
    weight_decay: float = 1e-5
    head_lr: float = 2e-4  # the MIL head's lr in FBTA (train.lr)
    bag: int = 16  # patches per step (FBTA: C·M)
    steps: int = 432
    augment: Augment = Augment()
    slides_per_step: int = 1  # 1: one slide's patches a step, as FBTA's; more: that many slides, both classes

    @classmethod
    def of(cls, cfg: DictConfig, steps: int) -> "ExtractorConfig":
        """The configuration ``fbta train train.method=fbta`` would give its TFE under ``cfg``."""
        f = cfg.fbta
        aug = Augment(**OmegaConf.to_container(f.augment, resolve=True))  # type: ignore[arg-type]
        return cls(cfg.extract.model, cfg.extract.weights, int(cfg.extract.input_size), int(f.train_blocks),
                   bool(f.freeze_bn), float(f.extractor_lr), float(cfg.train.weight_decay), float(cfg.train.lr),
                   int(cfg.cluster.n_clusters) * int(f.m), int(steps), aug)

    def describe(self) -> dict:
        return {"model": self.model, "input_size": self.input_size, "train_blocks": self.train_blocks,
                "freeze_bn": self.freeze_bn, "lr": self.lr, "bag": self.bag, "steps": self.steps,
                "hed_sigma": self.augment.hed_sigma, "slides_per_step": self.slides_per_step}


@dataclass
class PatchSet:
    """Labelled patches of some slides: pixels (uint8 N×H×W×3), targets, their slide, frozen features."""

    pixels: torch.Tensor
    y: np.ndarray
    slide: np.ndarray
    frozen: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def tumour_share(masks: Optional[Path], slide_id: str, coords: np.ndarray, attrs: dict) -> Optional[np.ndarray]:
    """Annotated tumour share of each patch; None where the slide has no mask."""
    path = find_mask(masks, slide_id) if masks is not None else None
    if path is None:
        return None
    size0 = float(attrs.get("patch_size_level0", attrs["patch_size"]))
    return patch_masks(read_mask(path), coords, size0, _level0_dims(attrs), 32).mean(axis=(1, 2)).astype(np.float32)


def patch_targets(shares: dict[str, Optional[np.ndarray]], labels: dict[str, int], n_patches: dict[str, int],
                  min_share: float = 0.5) -> dict[str, np.ndarray]:
    """Per slide: each patch's class (−1: left out) by the rule in the module docstring."""
    tumour_free = [c for c in set(labels.values())
                   if all(shares[s] is None or not (shares[s] > 0).any() for s, c2 in labels.items() if c2 == c)]
    normal = tumour_free[0] if len(tumour_free) == 1 else None
    out = {}
    for sid, c in labels.items():
        share = shares[sid] if shares[sid] is not None else np.zeros(n_patches[sid], np.float32)
        y = np.full(len(share), -1, np.int64)
        y[share >= min_share] = c
        if normal is not None:
            y[share == 0] = normal
        out[sid] = y
    return out


def load_patches(slides: Sequence[tuple[str, Path, Path, Optional[float]]], targets: dict[str, np.ndarray],
                 per_slide: int, rng: np.random.Generator) -> PatchSet:
    """Up to ``per_slide`` labelled patches of each (slide_id, slide file, features file, csv mpp)."""
    pix, ys, sl, fr = [], [], [], []
    for sid, slide_path, h5, mpp in slides:
        feats, coords, attrs = read_features(h5)
        y = targets[sid]
        take = np.flatnonzero(y >= 0)
        if per_slide > 0 and len(take) > per_slide:
            take = np.sort(rng.choice(take, per_slide, replace=False))
        if len(take) == 0:
            continue
        ds = SlidePatches(slide_path, coords[take], patch_attrs(h5, attrs), mpp)
        pix.append(torch.stack([ds[i] for i in range(len(ds))]))
        ds.close()
        ys.append(y[take])
        sl += [sid] * len(take)
        fr.append(feats[take])
    return PatchSet(torch.cat(pix), np.concatenate(ys), np.array(sl), np.concatenate(fr))


def encode(ext: Extractor, pixels: torch.Tensor, batch: int = 64) -> np.ndarray:
    """Features of uint8 patches under ``ext`` in eval mode (no augmentation)."""
    ext.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            x = pixels[i:i + batch].permute(0, 3, 1, 2).float().div(255.0)
            out.append(ext(ext.preprocess(x)).float().numpy())
    return np.concatenate(out)


def probe_auc(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    """Logistic-regression probe (C = 0.1 on standardised features), AUC on the held-out patches."""
    scaler = StandardScaler().fit(train[0])
    clf = LogisticRegression(C=0.1, max_iter=5000).fit(scaler.transform(train[0]), train[1])
    scores = clf.decision_function(scaler.transform(test[0]))
    if scores.ndim == 1:
        return float(roc_auc_score(test[1], scores))
    return float(roc_auc_score(test[1], scores, multi_class="ovr"))


def probe_auc_within(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 4, seed: int = 0) -> float:
    """Mean AUC of the same probe over slide-grouped, class-stratified folds of one patch set (no slide on both
    sides). Fewer folds when a class has fewer slides; ValueError when a class has fewer than two."""
    per_class = [len(set(groups[y == c].tolist())) for c in sorted(set(y.tolist()))]
    if len(per_class) < 2 or min(per_class) < 2:
        raise ValueError(f"held-out-only probe: needs two slides of each class, has {per_class} (slides per class)")
    splitter = StratifiedGroupKFold(n_splits=min(folds, min(per_class)), shuffle=True, random_state=seed)
    aucs = [probe_auc((x[fit], y[fit]), (x[score], y[score])) for fit, score in splitter.split(x, y, groups)
            if len(set(y[fit].tolist())) > 1 and len(set(y[score].tolist())) > 1]
    if not aucs:
        raise ValueError(f"held-out-only probe: no fold of {len(set(groups.tolist()))} slides has both classes")
    return float(np.mean(aucs))


def patch_probes(ext: Optional[Extractor], train: PatchSet, test: PatchSet) -> tuple[float, Optional[float]]:
    """Both probes of ``ext`` (None: the cached frozen features), each patch set encoded once: the held-out probe
    (fitted on ``train``, scored on ``test``) and the held-out-only one (None when the test slides are too few to
    split: fewer than two slides of a class), rounded to 4 digits."""
    x_test = test.frozen if ext is None else encode(ext, test.pixels)
    x_train = train.frozen if ext is None else encode(ext, train.pixels)
    fitted = round(probe_auc((x_train, train.y), (x_test, test.y)), 4)
    try:
        return fitted, round(probe_auc_within(x_test, test.y, test.slide), 4)
    except ValueError:
        return fitted, None


def frozen_patch_probes(model: str, weights: Optional[str], cached_sizes: set[int], size: int, train: PatchSet,
                        test: PatchSet) -> tuple[float, Optional[float]]:
    """The frozen features' probes at ``size`` px: the cached features when every slide's were extracted at that
    size, else the frozen extractor run at it — an oracle trained at 224 px is compared with frozen 224-px
    features, never with a cohort's cached 112-px ones."""
    if cached_sizes == {size}:
        return patch_probes(None, train, test)
    print(f"cached features are at {sorted(cached_sizes)} px: encoding the frozen probe at {size} px", flush=True)
    return patch_probes(create_extractor(model, weights=weights, trainable=False, input_size=size), train, test)


def trainable_extractor(cfg: ExtractorConfig) -> tuple[Extractor, list[str]]:
    ext = create_extractor(cfg.model, weights=cfg.weights, trainable=True, input_size=cfg.input_size)
    return ext, prepare_tfe(ext, True, cfg.train_blocks, cfg.freeze_bn)


def _train_mode(ext: Extractor, freeze_bn: bool) -> None:
    ext.train()
    if freeze_bn:
        for mod in ext.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()


def _one_slide_picks(by_class: dict[int, list[str]], of_slide: dict[str, np.ndarray], bag: int,
                     rng: np.random.Generator) -> np.ndarray:
    """``bag`` patches of one slide of a class drawn uniformly (FBTA's pseudo-bag)."""
    group = by_class[sorted(by_class)[int(rng.integers(len(by_class)))]]
    ix = of_slide[group[int(rng.integers(len(group)))]]
    return rng.choice(ix, bag, replace=len(ix) < bag)


def _mixed_picks(by_class: dict[int, list[str]], of_slide: dict[str, np.ndarray], bag: int, slides: int,
                 rng: np.random.Generator) -> np.ndarray:
    """``bag`` patches of ``slides`` slides, the slides split evenly between the classes (a class repeats a
    slide only where it has fewer than its share), ``bag // slides`` patches of each."""
    per = bag // slides
    picks: list[int] = []
    for k, c in enumerate(sorted(by_class)):
        share = slides // len(by_class) + (k < slides % len(by_class))
        group = by_class[c]
        for sid in rng.choice(group, share, replace=len(group) < share):
            ix = of_slide[str(sid)]
            if per == 1:
                picks.append(int(rng.choice(ix)))
            else:
                picks += [int(i) for i in rng.choice(ix, per, replace=len(ix) < per)]
    return np.array(picks)


def train_oracle(cfg: ExtractorConfig, train: PatchSet, seed: int,
                 probe_sets: Optional[tuple[PatchSet, PatchSet]] = None, probe_every: int = 0) -> tuple[Extractor, dict]:
    """FBTA's extractor configuration trained on patch targets for ``cfg.steps`` steps of ``cfg.bag`` patches.

    Each step's bag is ``cfg.bag`` patches of **one** slide, as FBTA's pseudo-bag is (so BatchNorm in train
    mode sees the same one-slide batches); slides are drawn class-balanced by their slide label. On a
    subtyping cohort every patch of such a bag has the same target, so each step only says "this slide is
    class c" — the configuration's batching, not its capacity, may be what stops it. ``cfg.slides_per_step``
    = S > 1 draws the ``cfg.bag`` patches from S slides, the classes sharing them evenly (S = bag: one patch
    of each, the ordinary way to train a patch classifier — the oracle that asks whether the extractor can
    represent the signal at all; S = 4: what ``fbta.extractor_every = 4`` gives FBTA's extractor). The same
    augmentation as FBTA's EB view. ``probe_every``: the held-out probe every that many steps (a curve: does
    the configuration keep learning, or has it stopped?).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    ext, units = trainable_extractor(cfg)
    n_classes = int(train.y.max()) + 1
    head = torch.nn.Linear(ext.dim, n_classes)
    params = [p for p in ext.parameters() if p.requires_grad]
    opt = torch.optim.Adam([{"params": params, "lr": cfg.lr}, {"params": head.parameters(), "lr": cfg.head_lr}],
                           weight_decay=cfg.weight_decay)
    slides = sorted(set(train.slide.tolist()))
    of_slide = {s: np.flatnonzero(train.slide == s) for s in slides}
    by_class: dict[int, list[str]] = {}
    for s in slides:  # a slide's class: its most frequent tumour-patch target (its slide label)
        by_class.setdefault(int(np.bincount(train.y[of_slide[s]]).argmax()), []).append(s)
    curve, losses, t0 = [], [], time.perf_counter()
    for step in range(cfg.steps):
        _train_mode(ext, cfg.freeze_bn)
        picks = (_mixed_picks(by_class, of_slide, cfg.bag, cfg.slides_per_step, rng) if cfg.slides_per_step > 1
                 else _one_slide_picks(by_class, of_slide, cfg.bag, rng))
        x = train.pixels[picks].permute(0, 3, 1, 2).float().div(255.0)
        logits = head(ext(ext.preprocess(cfg.augment(x, gen))))
        loss = F.cross_entropy(logits, torch.from_numpy(train.y[picks]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if probe_sets is not None and probe_every and (step + 1) % probe_every == 0 and step + 1 < cfg.steps:
            fitted, heldout = patch_probes(ext, *probe_sets)
            curve.append({"step": step + 1, "probe": fitted, "probe_heldout": heldout})
    ext.eval()
    info = {"units": units, "trainable_params": int(sum(p.numel() for p in params)), "steps": cfg.steps,
            "seconds": round(time.perf_counter() - t0, 1), "loss_first50": round(float(np.mean(losses[:50])), 4),
            "loss_last50": round(float(np.mean(losses[-50:])), 4), "curve": curve}
    return ext, info


def reextract(ext: Extractor, slides: Sequence[tuple[str, Path, Path, Optional[float]]], out: Path,
              batch: int = 64) -> Path:
    """Every patch of each slide re-encoded by ``ext`` into ``out/h5_files/<id>.h5`` (same coords and attrs)."""
    folder = out / "h5_files"
    folder.mkdir(parents=True, exist_ok=True)
    for sid, slide_path, h5, mpp in slides:
        _, coords, attrs = read_features(h5)
        ds = SlidePatches(slide_path, coords, patch_attrs(h5, attrs), mpp)
        pixels = torch.stack([ds[i] for i in range(len(ds))])
        ds.close()
        file_attrs, coords_attrs = feature_file_attrs(h5)
        write_features(folder / f"{sid}.h5", encode(ext, pixels, batch), coords,
                       {**file_attrs, "control": "oracle"}, coords_attrs)
    return folder.parent
