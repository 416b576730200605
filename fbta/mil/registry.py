"""MIL heads: one interface, one registry, one factory (timm style).

Why: FBTA is plug-and-play over MIL heads (METHODS.md A), so the trainer, the
EMA copy, inference and heatmaps all talk to a :class:`MILHead` through
``head(bag) -> MILOutput`` and never to a concrete class; ``mil.arch`` in
params.yaml names the head and :func:`create_mil` builds it. Adding a head is
one ``@register_mil("name")`` builder.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

DEFAULT_MIL = "abmil"
MILBuilder = Callable[..., "MILHead"]
_BUILDERS: dict[str, MILBuilder] = {}


class MILOutput(NamedTuple):
    """What a head returns for one slide.

    logits: 1×n_classes, before softmax.
    scores: N, one number per instance (patch) in the bag's order, higher = more
        important to the slide's prediction; what they are is head-specific
        (see each head's docstring) — for heatmaps, rank or percentile them.
    """

    logits: Tensor
    scores: Tensor

    @property
    def probs(self) -> Tensor:
        """Class probabilities, 1×n_classes."""
        return self.logits.softmax(dim=-1)


class MILHead(nn.Module):
    """Base class: a bag of N instance features (one slide) → slide logits + per-instance scores.

    ``bag`` is N×D or 1×N×D: one slide per call, as in FBTA (batch = 1 WSI),
    because bags of different slides have different N.

    Every head first standardises its input per feature with ``in_mean`` /
    ``in_std`` (buffers, identity until :meth:`set_input_stats`): frozen CNN
    features share a large common component, and without removing it a head
    sits on a loss plateau for many epochs before attention finds the signal.
    The statistics travel in the state dict, so every bag the head sees — frozen,
    end-to-end or translated, in training, evaluation or a served model — is
    standardised the same way.
    """

    def __init__(self, in_dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 1:
            raise ValueError(f"MIL head needs in_dim ≥ 1 and n_classes ≥ 1, got {in_dim}, {n_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MIL head dropout must be in [0, 1), got {dropout}")
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        self.dropout = float(dropout)
        self.register_buffer("in_mean", torch.zeros(self.in_dim))
        self.register_buffer("in_std", torch.ones(self.in_dim))
        self._register_load_state_dict_pre_hook(_identity_stats_if_absent, with_module=True)

    @torch.no_grad()
    def set_input_stats(self, mean: Tensor, std: Tensor, eps: float = 1e-6) -> None:
        """Per-feature mean and standard deviation of the training instances (see the class docstring)."""
        if mean.shape != (self.in_dim,) or std.shape != (self.in_dim,):
            raise ValueError(f"input stats must have shape ({self.in_dim},), got {tuple(mean.shape)}, {tuple(std.shape)}")
        self.in_mean.copy_(mean)
        self.in_std.copy_(std.clamp_min(eps))

    def as_bag(self, bag: Tensor) -> Tensor:
        """Validate one slide's bag and return it standardised, as 1×N×D."""
        return (self.check_bag(bag) - self.in_mean) / self.in_std

    def embed_bag(self, bag: Tensor, embed: nn.Sequential) -> Tensor:
        """``embed(standardised bag)`` with the standardisation folded into ``embed``'s first Linear.

        ``W·((x − μ)/σ) + b = (W/σ)·x + (b − W·μ/σ)``: the same numbers, but autograd keeps the raw
        bag (which the caller holds anyway) instead of a standardised N×D copy — over FBTA's frozen
        bag of all N patches that copy is a quarter of the step's memory per instance.
        """
        x = self.check_bag(bag)
        first = embed[0]
        w = first.weight / self.in_std
        b = first.bias - w @ self.in_mean if first.bias is not None else -(w @ self.in_mean)
        return embed[1:](nn.functional.linear(x, w, b))

    def check_bag(self, bag: Tensor) -> Tensor:
        """Validate one slide's bag and return it as 1×N×D (not standardised)."""
        if bag.ndim == 2:
            bag = bag.unsqueeze(0)
        if bag.ndim != 3 or bag.shape[0] != 1:
            raise ValueError(f"{type(self).__name__}: a bag is one slide, N×D or 1×N×D; "
                             f"got shape {tuple(bag.shape)}")
        if bag.shape[2] != self.in_dim:
            raise ValueError(f"{type(self).__name__}: instances have {bag.shape[2]} features, "
                             f"head was built for in_dim={self.in_dim}")
        if bag.shape[1] == 0:
            raise ValueError(f"{type(self).__name__}: empty bag (a slide with no patches)")
        if not bag.is_floating_point():
            raise ValueError(f"{type(self).__name__}: bag must be floating point, got {bag.dtype}")
        return bag

    def forward(self, bag: Tensor) -> MILOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, n_classes={self.n_classes}, dropout={self.dropout}"


def _identity_stats_if_absent(head: MILHead, state_dict: dict, prefix: str, *_: object) -> None:
    """Checkpoints written before heads carried input statistics load as 'no standardisation'."""
    for name, fill in (("in_mean", 0.0), ("in_std", 1.0)):
        state_dict.setdefault(prefix + name, torch.full((head.in_dim,), fill))


def register_mil(name: str) -> Callable[[MILBuilder], MILBuilder]:
    """Decorator registering ``builder(in_dim, n_classes, **kwargs) -> MILHead`` under ``name``."""

    def deco(builder: MILBuilder) -> MILBuilder:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"MIL head {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return deco


def list_mil() -> list[str]:
    """Names accepted by :func:`create_mil`, sorted."""
    return sorted(_BUILDERS)


def create_mil(name: str, in_dim: int, n_classes: int, **kwargs: object) -> MILHead:
    """Build the MIL head registered as ``name``; kwargs go to its constructor (e.g. ``dropout=0.1``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown MIL head {name!r}; available: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](in_dim, n_classes, **kwargs)
