"""Joint text/video self-attention with fused RoPE-3D, built on
:func:`vidgen_kernels.rope3d_attention`.

:class:`RoPE3DAttention` is the attention sublayer of a CogVideoX / Wan / HunyuanVideo style
transformer block on ``[B, S, C]`` tokens::

    qkv = Linear(C, 3C)(x).view(B, S, 3, H, D)     # q, k, v: views, no permute copy
    q, k = norm_q(q), norm_k(k)                    # optional per-head QK LayerNorm / RMSNorm
    o = rope3d_attention(q, k, v, cos, sin, rope_offset=..., frame_causal=...)  # [B, S, H, D]
    out = Linear(C, C)(o.view(B, S, C))

The RoPE tables are arguments of ``forward`` (the model builds them once per resolution, e.g.
with diffusers' ``get_3d_rotary_pos_embed``): ``[L, D/2]`` or diffusers' ``[L, D]`` layout,
rotating tokens ``rope_offset .. rope_offset + L - 1``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ._common import check_qk_norm, check_tokens, qk_norms
from ..ops._checks import check_backend_arg, check_eps, check_flags, check_sizes
from ..ops.rope3d_attention import rope3d_attention

__all__ = ["RoPE3DAttention"]


class RoPE3DAttention(nn.Module):
    """Self-attention over ``[B, S, C]`` tokens with RoPE fused into the attention kernel.

    Args:
        dim: channels ``C``.
        num_heads: heads ``H`` (``head_dim = C / H``, even).
        qk_norm: ``None``, ``"layer"`` (LayerNorm over head_dim with affine weights, as
            CogVideoX) or ``"rms"`` (RMSNorm over head_dim), applied to q and k per head before
            the rotation.
        bias: biases of the qkv and output projections.
        interleaved: RoPE pairs ``(2i, 2i+1)`` (CogVideoX / Wan / Hunyuan) or ``(i, i + D/2)``.
        eps: epsilon of the QK norms.
        backend: kernel backend for every call (``None``: the package's selection).

    Parameters: ``qkv`` (``Linear(C, 3C)``, outputs ordered ``[q | k | v]``, each ``[H, D]``),
    ``proj`` (``Linear(C, C)``), ``norm_q`` / ``norm_k`` when ``qk_norm`` is set.
    """

    def __init__(self, dim: int, num_heads: int, *, qk_norm: Optional[str] = None,
                 bias: bool = True, interleaved: bool = True, eps: float = 1e-6,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        check_sizes("RoPE3DAttention", dim=dim, num_heads=num_heads)
        check_flags("RoPE3DAttention", bias=bias, interleaved=interleaved)
        if dim % num_heads:
            raise ValueError(f"RoPE3DAttention: dim={dim} must be a multiple of num_heads={num_heads}")
        head_dim = dim // num_heads
        if head_dim % 2:
            raise ValueError(f"RoPE3DAttention: RoPE needs an even head_dim, got {head_dim} "
                             f"(dim={dim}, num_heads={num_heads})")
        check_qk_norm("RoPE3DAttention", qk_norm)
        eps = check_eps("RoPE3DAttention", eps)
        check_backend_arg("RoPE3DAttention", backend)
        fk = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.qk_norm, self.interleaved, self.backend = qk_norm, bool(interleaved), backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias, **fk)
        self.proj = nn.Linear(dim, dim, bias=bias, **fk)
        self.norm_q, self.norm_k = qk_norms(qk_norm, head_dim, eps, "RoPE3DAttention", backend,
                                            **fk)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, qk_norm={self.qk_norm}, "
                f"interleaved={self.interleaved}, backend={self.backend}")

    def forward(self, x: Tensor, cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, *,
                rope_offset: int = 0, frame_causal: bool = False,
                tokens_per_frame: Optional[int] = None, frames_per_block: int = 1) -> Tensor:
        """``x [B, S, C]`` -> ``[B, S, C]``; the remaining arguments as in
        :func:`vidgen_kernels.rope3d_attention`."""
        check_tokens("RoPE3DAttention", x, self.dim, f"[B, S, C={self.dim}]", self.qkv.weight)
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).unbind(2)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        o = rope3d_attention(q, k, v, cos, sin, rope_offset=rope_offset,
                             interleaved=self.interleaved, frame_causal=frame_causal,
                             tokens_per_frame=tokens_per_frame, frames_per_block=frames_per_block,
                             backend=self.backend)
        return self.proj(o.view(B, S, C))
