"""ABMIL — attention-based deep MIL (Ilse et al., 2018), gated and plain.

The slide embedding is an attention-weighted mean of the instance embeddings,
so the prediction does not depend on the order of the patches (permutation
invariant) and the attention weights are a heatmap for free.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fbta.mil.registry import MILHead, MILOutput, register_mil


class AttentionPool(nn.Module):
    """Attention pooling of Ilse et al. (2018): a_n = softmax_n(w·(tanh(V h_n) ⊙ σ(U h_n))), M = Σ a_n h_n.

    ``gated=False`` drops the σ(U h) gate. Shared by ABMIL and MambaMIL.
    Returns (M: 1×dim, a: N — softmax weights, summing to 1).
    """

    def __init__(self, dim: int, hidden: int = 256, gated: bool = True) -> None:
        super().__init__()
        self.gated = gated
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden) if gated else None
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h: 1×N×dim."""
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        weights = self.w(a).squeeze(-1).softmax(dim=-1)  # 1×N
        pooled = torch.bmm(weights.unsqueeze(1), h).squeeze(1)  # 1×dim
        return pooled, weights.squeeze(0)


class ABMIL(MILHead):
    """Linear(D, hidden)→ReLU→Dropout; attention pooling over instances; Linear(hidden, n_classes).

    ``scores`` are the softmax attention weights a_n (≥ 0, summing to 1 over the
    bag), still attached to the graph.
    """

    def __init__(
        self, in_dim: int, n_classes: int, *, hidden: int = 512, attn_dim: int = 256,
        gated: bool = True, dropout: float = 0.25,
    ) -> None:
        super().__init__(in_dim, n_classes, dropout)
        self.gated = gated
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = AttentionPool(hidden, attn_dim, gated=gated)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: Tensor) -> MILOutput:
        h = self.embed_bag(bag, self.embed)  # 1×N×hidden
        pooled, weights = self.attention(h)
        return MILOutput(self.classifier(pooled), weights)


@register_mil("abmil")
def abmil(in_dim: int, n_classes: int, **kwargs: object) -> ABMIL:
    """Gated-attention ABMIL, the default head."""
    kwargs.setdefault("gated", True)
    return ABMIL(in_dim, n_classes, **kwargs)  # type: ignore[arg-type]


@register_mil("abmil_plain")
def abmil_plain(in_dim: int, n_classes: int, **kwargs: object) -> ABMIL:
    """ABMIL with the ungated attention w·tanh(V h)."""
    kwargs.setdefault("gated", False)
    return ABMIL(in_dim, n_classes, **kwargs)  # type: ignore[arg-type]
