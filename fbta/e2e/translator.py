"""The K-head residual translator f_T of FBTA (METHODS.md A.5).

Why it exists: the MIL head is trained on features of the *trainable*
extractor, but at inference we only have the cached *frozen* features of every
patch. The translator maps frozen features into the end-to-end space, so a
slide is classified from its cache in seconds instead of re-reading and
re-encoding tens of thousands of patches.

Each head is ``h_k(x) = x + W2·GELU(W1·LN?(x))``; the bag it produces is the
mean over heads, and during training each head regresses on its own to the EMA
extractor's features (``L_dist``). ``W2`` starts at zero, so the untrained
translator is the identity: an FBTA run starts exactly where vanilla MIL does.
All K heads run as one batched matmul (K×D×H weights), not a Python loop.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

TRANSLATOR = "translator.pt"


class Translator(nn.Module):
    """K parallel residual MLPs over instance features; order of instances is preserved."""

    def __init__(self, dim: int, k: int = 10, hidden: int = 0, layernorm: bool = False) -> None:
        super().__init__()
        if dim < 1 or k < 1:
            raise ValueError(f"translator needs dim ≥ 1 and k ≥ 1, got dim={dim}, k={k}")
        self.dim, self.k = int(dim), int(k)
        self.hidden = int(hidden) if hidden and hidden > 0 else int(dim)
        self.layernorm = bool(layernorm)
        h = self.hidden
        self.norm_weight = nn.Parameter(torch.ones(k, dim)) if layernorm else None
        self.norm_bias = nn.Parameter(torch.zeros(k, dim)) if layernorm else None
        self.w1 = nn.Parameter(torch.empty(k, dim, h))
        self.b1 = nn.Parameter(torch.zeros(k, 1, h))
        self.w2 = nn.Parameter(torch.zeros(k, h, dim))  # zero: identity at start
        self.b2 = nn.Parameter(torch.zeros(k, 1, dim))
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's default fan-in init, per head
        nn.init.uniform_(self.w1, -bound, bound)

    def config(self) -> dict[str, Any]:
        """What meta.json records to rebuild this translator."""
        return {"dim": self.dim, "k": self.k, "hidden": self.hidden, "layernorm": self.layernorm}

    def heads(self, x: Tensor) -> Tensor:
        """Every head's translation: N×D → K×N×D."""
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"translator expects N×{self.dim} features, got shape {tuple(x.shape)}")
        z = x.unsqueeze(0).expand(self.k, -1, -1)
        if self.layernorm:
            z = nn.functional.layer_norm(z, (self.dim,)) * self.norm_weight[:, None] + self.norm_bias[:, None]
        hidden = nn.functional.gelu(torch.baddbmm(self.b1, z, self.w1))
        return x.unsqueeze(0) + torch.baddbmm(self.b2, hidden, self.w2)

    def forward(self, x: Tensor) -> Tensor:
        """The translation bag F_TB = mean_k h_k(x), N×D (chunked over N to bound memory on big slides)."""
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        chunk = max(1, (1 << 24) // max(1, self.k * self.hidden))  # ≈ 64 MB of hidden activations per chunk
        if x.shape[0] <= chunk or torch.is_grad_enabled():
            return self.heads(x).mean(0)
        return torch.cat([self.heads(x[i:i + chunk]).mean(0) for i in range(0, x.shape[0], chunk)])


def save_translator(folder: Path, translator: Translator, state: Optional[dict[str, Tensor]] = None) -> None:
    """``translator.pt`` (plain state dict) beside the MIL head; its shape goes into meta.json by the caller."""
    from fbta.io.atomic import atomic_path

    sd = state if state is not None else translator.state_dict()
    with atomic_path(Path(folder) / TRANSLATOR, suffix=".pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in sd.items()}, tmp)


def build_translator(meta: dict[str, Any]) -> Optional[Translator]:
    """A translator shaped as ``meta["translator"]`` records, or None (a vanilla model has none)."""
    spec = meta.get("translator")
    if not spec:
        return None
    return Translator(int(spec["dim"]), int(spec["k"]), int(spec.get("hidden", 0)), bool(spec.get("layernorm", False)))


def load_translator(folder: Path, device: torch.device | str = "cpu") -> Optional[Translator]:
    """The trained translator of a model folder (``weights_only`` loading), or None for a vanilla model."""
    from fbta.mil.checkpoint import load_weights, read_meta

    translator = build_translator(read_meta(Path(folder)))
    if translator is None:
        return None
    return load_weights(translator, Path(folder) / TRANSLATOR, device, "translator")  # type: ignore[return-value]
