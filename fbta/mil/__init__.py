"""MIL heads for slide-level prediction from a bag of patch features: ABMIL, TransMIL, MambaMIL.

    from fbta.mil import create_mil, list_mil
    head = create_mil("abmil", in_dim=1024, n_classes=2)
    out = head(features)          # features: N×D for one slide
    out.logits, out.scores        # 1×n_classes, N per-instance scores (heatmaps)

Only torch is imported here (no timm, no mamba_ssm unless a GPU scan asks for it).
"""
from __future__ import annotations

from fbta.mil.registry import DEFAULT_MIL, MILHead, MILOutput, create_mil, list_mil, register_mil
from fbta.mil.abmil import ABMIL, AttentionPool
from fbta.mil.transmil import NystromAttention, TransMIL
from fbta.mil.mambamil import MambaMIL, SRMamba
from fbta.mil.scan import fused_scan_available, selective_scan, selective_scan_chunked, selective_scan_ref

__all__ = [
    "ABMIL", "AttentionPool", "DEFAULT_MIL", "MILHead", "MILOutput", "MambaMIL", "NystromAttention",
    "SRMamba", "TransMIL", "create_mil", "fused_scan_available", "list_mil", "register_mil",
    "selective_scan", "selective_scan_chunked", "selective_scan_ref",
]
