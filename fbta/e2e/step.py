"""One FBTA optimisation step on one slide: three views, three losses, one backward (METHODS.md A).

    F_FB = cached frozen features of all N patches
    F_SB = F_FB[idx]                       the pseudo-bag's frozen features
    F_EB = TFE(aug(X_SB))                  end-to-end bag
    h_k  = translator heads on F_SB        F_TB = mean_k h_k
    L_dist = 1/K Σ_k ‖h_k − TFE*(X_SB)‖²   (X_SB not augmented)
    L_cls  = Σ_v CE(MIL(F_v), y)
    L_cons = Σ_v 1 − cos(softmax MIL(F_v), softmax MIL*(F_v))
    L = L_dist + L_cls + (t/T)·L_cons

``‖·‖²`` is the spec's: each instance's squared L2 norm **summed over the
feature dimension D**, then averaged over the C·M instances and the K heads
(:func:`distillation_loss`). Averaging over D as well (an element-wise MSE)
would shrink the term ~D-fold (1/1280 for EfficientNet-Lite0) and leave the
translator to L_cls alone, so F_TB would never approach TFE*.

The EMA teachers (MIL*, TFE*) are updated by the training loop through the one
:class:`fbta.training.ema.EMA` (the vanilla trainer's too), not here; bf16
autocast, ``backward`` and the time split are the loop's too (fbta/training/loop.py,
fbta/e2e/timing.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fbta.choices import View
from fbta.features.augment import Augment
from fbta.e2e.pseudobags import PseudoBag
from fbta.e2e.timing import fbta_timer, split
from fbta.e2e.translator import Translator
from fbta.features.registry import Extractor
from fbta.mil.registry import MILHead
from fbta.training.ema import ema_update, frozen_copy as _frozen_copy

VIEWS = View.values()  # the schema's choices (fbta/choices.py), as plain strings


@dataclass
class FBTAModels:
    """The trained modules and their EMA teachers (``*`` in METHODS.md)."""

    mil: MILHead
    translator: Translator
    tfe: Extractor
    mil_ema: MILHead = field(init=False)
    tfe_ema: Extractor = field(init=False)

    def __post_init__(self) -> None:
        self.mil_ema = frozen_copy(self.mil)
        self.tfe_ema = frozen_copy(self.tfe)

    def teachers(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, student) pairs for :class:`fbta.training.ema.EMA`."""
        return [(self.mil_ema, self.mil), (self.tfe_ema, self.tfe)]

    def update_ema(self, alpha: float) -> None:
        """``ema = α·ema + (1−α)·model`` for MIL* and TFE*, buffers included (integer buffers copied)."""
        for teacher, student in self.teachers():
            ema_update(teacher, student, alpha)


@dataclass(frozen=True)
class StepOptions:
    views: Sequence[str] = VIEWS  # which bags enter L_cls and L_cons
    consistency: bool = True  # the EMA term L_cons
    distill: bool = True  # the translator and L_dist (False: the end-to-end bound, which has no translator)
    augment: Augment = Augment()
    amp: bool = False  # bfloat16 autocast on CUDA (where bf16 is supported)
    amp_on_cpu: bool = False  # the same autocast on CPU: tests and the GPU check's CPU dry run exercise the path


def frozen_copy(model: nn.Module) -> nn.Module:
    """A gradient-free eval-mode copy (the EMA teacher starts equal to its student)."""
    ema = _frozen_copy(model)
    if isinstance(ema, Extractor):
        ema.set_trainable(False)
    return ema


def autocast_enabled(opts: StepOptions, device: torch.device) -> bool:
    """bf16 autocast where asked: on CUDA when the GPU supports bf16, on CPU only with ``amp_on_cpu``."""
    if not opts.amp:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and opts.amp_on_cpu


def distillation_loss(heads: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_dist = 1/K Σ_k mean_n ‖h_k(F_SB)_n − TFE*(X_SB)_n‖²`` for K×n×D heads and an n×D target.

    The squared L2 norm is summed over D, then averaged over the n instances and the K heads.
    """
    return (heads - target.unsqueeze(0)).pow(2).sum(-1).mean()


def fbta_losses(m: FBTAModels, bag: PseudoBag, t_over_T: float, opts: StepOptions, device: torch.device,
                gen: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Three views, three losses: ``(L, its terms)``. The training loop owns autocast, ``backward`` and timing."""
    y = bag.label.to(device).view(1)
    f_fb = bag.features.to(device, non_blocking=True)  # frozen bag F_FB (all N patches)
    f_sb = f_fb[bag.idx.to(device)]  # the pseudo-bag's frozen features F_SB
    x_sb = bag.pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)  # X_SB in [0, 1]
    f_eb = m.tfe(m.tfe.preprocess(opts.augment(x_sb, gen))).float()  # end-to-end bag F_EB
    bags = {"fb": f_fb, "eb": f_eb}
    l_dist = torch.zeros((), device=device)
    if opts.distill:
        with torch.no_grad():
            target = m.tfe_ema(m.tfe_ema.preprocess(x_sb)).float()  # TFE*(X_SB), not augmented
        heads = m.translator.heads(f_sb).float()  # K×n×D
        bags["tb"] = heads.mean(0)  # translation bag F_TB
        l_dist = distillation_loss(heads, target)
    l_cls = torch.zeros((), device=device)
    l_cons = torch.zeros((), device=device)
    per_view: dict[str, torch.Tensor] = {}  # CE of each view (diagnostics)
    correct = 0.0
    for v in opts.views:
        logits = m.mil(bags[v]).logits.float()
        per_view[f"l_cls_{v}"] = ce = F.cross_entropy(logits, y)
        l_cls = l_cls + ce
        if opts.consistency:
            with torch.no_grad():
                teacher = m.mil_ema(bags[v]).logits.float().softmax(-1)
            l_cons = l_cons + (1.0 - F.cosine_similarity(logits.softmax(-1), teacher, dim=-1)).mean()
        if len(per_view) == 1:  # train accuracy: the first view's prediction
            correct = float(int(logits.detach().argmax(-1).item()) == int(y.item()))
    loss = l_dist + l_cls + t_over_T * l_cons
    if not torch.isfinite(loss):
        raise FloatingPointError(f"FBTA loss is {loss.item()} (L_dist {l_dist.item():.4g}, L_cls {l_cls.item():.4g}, "
                                 f"L_cons {l_cons.item():.4g}); lower the learning rates")
    return loss, {"l_cls": l_cls.item(), "l_dist": l_dist.item(), "l_cons": l_cons.item(),
                  **{k: c.item() for k, c in per_view.items()}, "correct": correct,
                  "n_subset": float(bag.idx.numel()), "n_patches": float(f_fb.shape[0])}


def fbta_step(m: FBTAModels, bag: PseudoBag, t_over_T: float, opts: StepOptions, device: torch.device,
              gen: Optional[torch.Generator] = None) -> dict[str, float]:
    """One step as the training loop runs it — autocast, :func:`fbta_losses`, one ``backward`` (no optimiser
    step) — with the time split; for tests and benchmarks that look at a single step."""
    with fbta_timer(m, device) as timer:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_enabled(opts, device)):
            loss, terms = fbta_losses(m, bag, t_over_T, opts, device, gen)
        t0 = time.perf_counter()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        backward_s = time.perf_counter() - t0
        return {"loss": loss.item(), **terms, **split(timer.forward(), backward_s)}
