"""Pieces shared by the attention modules."""
from __future__ import annotations

from typing import Optional

from ..ops._checks import NORMS
from .adaln import HeadNorm


def check_qk_norm(owner: str, kind) -> Optional[str]:
    """``qk_norm``: None, ``"layer"`` or ``"rms"`` (checked before the module builds anything)."""
    if kind is not None and (not isinstance(kind, str) or kind not in NORMS):
        raise ValueError(f"{owner}: qk_norm must be None, 'layer' or 'rms', got {kind!r}")
    return kind


def qk_norms(kind: Optional[str], head_dim: int, eps: float, owner: str,
             backend: Optional[str] = None, **factory):
    """``(norm_q, norm_k)``: per-head ``LayerNorm``/``RMSNorm`` over ``head_dim`` (as CogVideoX /
    Wan normalise q and k) as :class:`~vidgen_kernels.nn.HeadNorm`, or ``(None, None)`` for
    ``kind=None``."""
    if check_qk_norm(owner, kind) is None:
        return None, None
    return (HeadNorm(head_dim, kind, eps, backend=backend, **factory),
            HeadNorm(head_dim, kind, eps, backend=backend, **factory))
