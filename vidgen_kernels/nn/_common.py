"""Pieces shared by the attention modules."""
from __future__ import annotations

from typing import Optional

from .adaln import HeadNorm


def qk_norms(kind: Optional[str], head_dim: int, eps: float, owner: str,
             backend: Optional[str] = None, **factory):
    """``(norm_q, norm_k)``: per-head ``LayerNorm``/``RMSNorm`` over ``head_dim`` (as CogVideoX /
    Wan normalise q and k) as :class:`~vidgen_kernels.nn.HeadNorm`, or ``(None, None)`` for
    ``kind=None``."""
    if kind in ("layer", "rms"):
        return (HeadNorm(head_dim, kind, eps, backend=backend, **factory),
                HeadNorm(head_dim, kind, eps, backend=backend, **factory))
    if kind is None:
        return None, None
    raise ValueError(f"{owner}: qk_norm must be None, 'layer' or 'rms', got {kind!r}")
