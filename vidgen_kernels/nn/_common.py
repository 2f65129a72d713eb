"""Pieces shared by the attention modules."""
from __future__ import annotations

from typing import Optional

from torch import nn


def qk_norms(kind: Optional[str], head_dim: int, eps: float, owner: str, **factory):
    """``(norm_q, norm_k)``: per-head ``LayerNorm``/``RMSNorm`` over ``head_dim`` (as CogVideoX /
    Wan normalise q and k), or ``(None, None)`` for ``kind=None``."""
    if kind == "layer":
        return (nn.LayerNorm(head_dim, eps=eps, **factory),
                nn.LayerNorm(head_dim, eps=eps, **factory))
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=eps, **factory), nn.RMSNorm(head_dim, eps=eps, **factory)
    if kind is None:
        return None, None
    raise ValueError(f"{owner}: qk_norm must be None, 'layer' or 'rms', got {kind!r}")
