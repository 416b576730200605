"""TransMIL (Shao et al., 2021): a Transformer over the patches of a slide, with Nyström attention.

Full self-attention over a 10,000-patch slide is 10⁸ scores per head; the
Nyström approximation (Xiong et al., 2021) compresses keys and queries to m
landmarks and costs O(N·m). The PPEG layer gives the tokens a position
(depthwise convolutions on the patch sequence folded into a square), so
TransMIL is *not* invariant to the order of the instances.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fbta.mil.registry import MILHead, MILOutput, register_mil


def _pinv_iterative(a: Tensor, iters: int) -> Tensor:
    """Moore–Penrose pseudo-inverse of each m×m matrix by the iteration used in Nyströmformer.

    Z₀ = Aᵀ / (‖A‖₁‖A‖∞) per matrix, then Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ))).
    Only matmuls: differentiable and cheap, unlike an SVD-based pinv.
    """
    absval = a.abs()
    norm = absval.sum(-1).amax(-1, keepdim=True) * absval.sum(-2).amax(-1, keepdim=True)  # …×1
    z = a.transpose(-1, -2) / norm.unsqueeze(-1)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention with the value-path depthwise convolution of Nyströmformer.

    Landmarks are segment means of queries and keys over ``landmarks`` contiguous
    segments (unequal lengths when N is not a multiple; ``adaptive_avg_pool1d``).
    When the sequence has at most ``landmarks`` tokens it uses exact softmax
    attention instead (the approximation would not save anything and landmarks
    would be single tokens).
    """

    def __init__(
        self, dim: int, heads: int = 8, landmarks: int = 256, pinv_iters: int = 6,
        conv_kernel: int = 33, dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"NystromAttention: dim {dim} is not divisible by heads {heads}")
        self.heads, self.landmarks, self.pinv_iters = heads, landmarks, pinv_iters
        self.dim_head = dim // heads
        self.scale = self.dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        # one kernel per head along the sequence, shared by the head's channels
        self.value_conv = nn.Conv2d(
            heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads, bias=False,
        )

    def forward(self, x: Tensor, cls_attention: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """x: B×n×dim → (B×n×dim, optional B×n exact softmax attention of token 0, mean over heads)."""
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, self.dim_head).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q * self.scale
        if n <= self.landmarks:
            out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            q_l, k_l = (
                F.adaptive_avg_pool1d(t.reshape(b * self.heads, n, self.dim_head).transpose(1, 2), self.landmarks)
                .transpose(1, 2).reshape(b, self.heads, self.landmarks, self.dim_head)
                for t in (q, k)
            )
            kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)      # B×h×n×m
            kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)    # B×h×m×m
            kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)      # B×h×m×n
            out = kernel_1 @ (_pinv_iterative(kernel_2, self.pinv_iters) @ (kernel_3 @ v))
        out = out + self.value_conv(v)
        out = self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))
        cls = None
        if cls_attention:
            with torch.no_grad():
                cls = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2), dim=-1).squeeze(2).mean(1)  # B×n
        return out, cls


class TransLayer(nn.Module):
    """Pre-norm residual attention block: x + NystromAttention(LayerNorm(x))."""

    def __init__(self, dim: int, **attn_kwargs: object) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, **attn_kwargs)  # type: ignore[arg-type]

    def forward(self, x: Tensor, cls_attention: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        out, cls = self.attn(self.norm(x), cls_attention)
        return x + out, cls


class PPEG(nn.Module):
    """Pyramid position encoding: identity + depthwise 7×7, 5×5, 3×3 convs on the tokens folded into a square.

    The class token (position 0) is set aside and put back unchanged.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: Tensor, side: int) -> Tensor:
        b, n, c = x.shape
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(b, c, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILHead):
    """Linear(D, dim)+ReLU → square padding → [CLS] → TransLayer → PPEG → TransLayer → LayerNorm → Linear(CLS).

    The bag of N instances is padded to ⌈√N⌉² tokens by repeating its first
    instances, so it folds into a square for PPEG.

    ``scores``: the class token's attention over the instances in the *last*
    TransLayer, exact softmax(q_cls·Kᵀ/√d) (not the Nyström approximation, whose
    rows need not be non-negative), averaged over heads; the class token's
    attention to itself is dropped, the attention to a padding copy is added to
    the instance it repeats, and the result is renormalised to sum to 1.
    Computed without gradient (detached): heatmaps only.
    """

    def __init__(
        self, in_dim: int, n_classes: int, *, dim: int = 512, heads: int = 8, landmarks: int = 256,
        pinv_iters: int = 6, conv_kernel: int = 33, dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dim, n_classes, dropout)
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        attn = dict(heads=heads, landmarks=landmarks, pinv_iters=pinv_iters, conv_kernel=conv_kernel, dropout=dropout)
        self.layer1 = TransLayer(dim, **attn)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, **attn)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, bag: Tensor) -> MILOutput:
        h = self.embed_bag(bag, self.embed)  # 1×N×dim
        n = h.shape[1]
        side = math.isqrt(n - 1) + 1  # ⌈√N⌉
        source = torch.arange(side * side, device=h.device) % n  # token → instance it holds
        h = torch.cat([self.cls_token.to(h.dtype), h[:, source]], dim=1)
        h, _ = self.layer1(h)
        h = self.ppeg(h, side)
        h, cls_attn = self.layer2(h, cls_attention=True)
        logits = self.classifier(self.norm(h)[:, 0])
        assert cls_attn is not None
        scores = torch.zeros(n, dtype=cls_attn.dtype, device=h.device).index_add_(0, source, cls_attn[0, 1:])
        return MILOutput(logits, scores / scores.sum().clamp_min(torch.finfo(scores.dtype).tiny))


@register_mil("transmil")
def transmil(in_dim: int, n_classes: int, **kwargs: object) -> TransMIL:
    """TransMIL with 8 heads and 256 Nyström landmarks."""
    return TransMIL(in_dim, n_classes, **kwargs)  # type: ignore[arg-type]
