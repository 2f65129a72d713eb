"""AdaLN-Zero modules built on the fused ops.

* :class:`AdaLNZero`: DiT's ``SiLU -> Linear(cond, 6 * dim)`` (zero-initialised) producing
  shift/scale/gate for the attention and the MLP sublayers, with the fused norm + modulation.
* :class:`LayerNormZero`: CogVideoX's ``CogVideoXLayerNormZero`` (same parameter names, same
  outputs), modulating video and text tokens with their own shift/scale/gate in one call.
* :class:`HeadNorm`: per-head QK LayerNorm / RMSNorm (``nn.LayerNorm`` / ``nn.RMSNorm`` drop-in)
  on the same kernel (no modulation), saving only its input and row statistics for backward.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import current_backend
from ..ops._checks import (autocast_dtype, check_backend_arg, check_eps, check_flags,
                           check_norm_kind, check_sizes)
from ..ops.adaln import adaln_modulate, gated_residual_adaln
from ._common import check_cond
from ._init import ZeroLinear


class AdaLNParams(NamedTuple):
    """The six modulation tensors, each ``[B, C]`` (or per-frame ``[B, F, C]``), strided views of
    one projection output (never copied)."""

    shift_msa: Tensor
    scale_msa: Tensor
    gate_msa: Tensor
    shift_mlp: Tensor
    scale_mlp: Tensor
    gate_mlp: Tensor


class AdaLNZero(nn.Module):
    """DiT AdaLN-Zero: ``SiLU -> Linear(cond_dim, 6 * dim)``, zero-initialised.

    Usage in a DiT block (x ``[B, N, dim]``, c ``[B, cond_dim]`` or per-frame ``[B, F, cond_dim]``)::

        p = self.adaln(c)
        a = self.attn(self.adaln.modulate_msa(x, p))          # norm1(x) * (1 + scale) + shift
        x, m = self.adaln.residual_mlp(x, a, p)               # x + gate * a, then norm2 + modulation
        x = self.adaln.residual_out(x, self.mlp(m), p)        # x + gate_mlp * mlp

    Where another AdaLN's modulation follows a residual (the next sublayer or block),
    ``next_adaln.residual_msa(x, y, p.gate_mlp, p_next)`` fuses the two.

    Under ``torch.autocast`` the Linear's bf16 modulation (and bf16 sublayer outputs) meet an
    fp32 stream as in DiT's eager formulas: the ops promote to fp32.

    Args:
        dim: channels C of the token stream.
        cond_dim: channels of the conditioning vector (default ``dim``).
        norm: ``"layer"`` (DiT) or ``"rms"``.
        eps: norm epsilon (DiT: 1e-6).
        elementwise_affine: learnable ``[C]`` weight/bias in the norm (DiT: off).
    """

    def __init__(self, dim: int, cond_dim: Optional[int] = None, *, norm: str = "layer",
                 eps: float = 1e-6, elementwise_affine: bool = False, device=None, dtype=None):
        super().__init__()
        check_sizes("AdaLNZero", dim=dim, **({} if cond_dim is None else {"cond_dim": cond_dim}))
        check_flags("AdaLNZero", elementwise_affine=elementwise_affine)
        check_norm_kind("AdaLNZero", norm)
        eps = check_eps("AdaLNZero", eps)
        fk = {"device": device, "dtype": dtype}
        self.dim, self.norm, self.eps = dim, norm, eps
        self.act = nn.SiLU()
        self.linear = ZeroLinear(cond_dim or dim, 6 * dim, **fk)  # zeros, also after a reset
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim, **fk))
            self.bias = nn.Parameter(torch.zeros(dim, **fk))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """The construction-time values: norm weight ones and bias zeros (``linear``, a
        :class:`ZeroLinear`, resets itself to zeros)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.dim}, norm={self.norm!r}, eps={self.eps}, "
                f"elementwise_affine={self.weight is not None}")

    def forward(self, c: Tensor) -> AdaLNParams:
        """``c`` ``[B, cond_dim]`` or ``[B, F, cond_dim]`` -> the six ``[B, (F,) dim]`` views."""
        check_cond("AdaLNZero", c, self.linear, "c")
        return AdaLNParams(*self.linear(self.act(c)).chunk(6, dim=-1))

    def _kw(self):
        return {"weight": self.weight, "bias": self.bias, "eps": self.eps, "norm": self.norm}

    def modulate_msa(self, x: Tensor, p: AdaLNParams) -> Tensor:
        """Input of the attention sublayer: ``norm(x) * (1 + scale_msa) + shift_msa``."""
        return adaln_modulate(x, p.shift_msa, p.scale_msa, **self._kw())

    def residual_msa(self, x: Tensor, y: Tensor, gate: Tensor, p: AdaLNParams) -> tuple[Tensor, Tensor]:
        """An earlier sublayer's residual ``h = x + gate * y`` (its gate, e.g. the previous
        block's ``gate_mlp``) fused into this attention input ``norm(h) * (1 + scale_msa) +
        shift_msa``; returns ``(h, attn_in)``: :meth:`residual_out` then :meth:`modulate_msa` in
        one pass."""
        return gated_residual_adaln(x, y, gate, p.shift_msa, p.scale_msa, **self._kw())

    def residual_mlp(self, x: Tensor, attn_out: Tensor, p: AdaLNParams) -> tuple[Tensor, Tensor]:
        """``h = x + gate_msa * attn_out`` and the MLP input ``norm(h) * (1 + scale_mlp) +
        shift_mlp``, fused; returns ``(h, mlp_in)``."""
        return gated_residual_adaln(x, attn_out, p.gate_msa, p.shift_mlp, p.scale_mlp, **self._kw())

    @staticmethod
    def residual_out(x: Tensor, mlp_out: Tensor, p: AdaLNParams) -> Tensor:
        """``x + gate_mlp * mlp_out`` (per-frame gates broadcast over their tokens)."""
        return gated_add(x, mlp_out, p.gate_mlp)


def gated_add(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """``x + gate * y`` for ``x, y`` ``[B, N, C]`` and ``gate`` in any form :func:`adaln_modulate`
    accepts (``[C]``, ``[B, C]``, ``[B, F, C]`` with F | N, ``[B, N, C]``; batch 1 broadcasts).
    The result has x's dtype, as :func:`gated_residual_adaln`'s ``h`` (an fp32 gate does not turn
    a 16-bit residual stream into fp32); under ``torch.autocast`` eager promotion, as there."""
    op = "AdaLNZero.residual_out"
    for name, t in (("x", x), ("y", y), ("gate", gate)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, N, C], got shape {tuple(x.shape)}")
    for name, t in (("x", x), ("y", y), ("gate", gate)):  # as gated_residual_adaln checks them
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    B, N, C = x.shape
    if y.shape != x.shape:
        raise ValueError(f"{op}: y (the sublayer output) must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(y.shape)}")
    g = gate.view(1, 1, -1) if gate.dim() == 1 else gate.unsqueeze(1) if gate.dim() == 2 else gate
    if g.dim() != 3 or not (g.shape[0] == 1 or g.shape[0] == B) or g.shape[2] != C or g.shape[1] == 0 \
            or N % g.shape[1]:
        raise ValueError(f"{op}: gate must be [C], [B, C], [B, F, C] with F dividing N, or "
                         f"[B, N, C] (B={B}, N={N}, C={C}), got shape {tuple(gate.shape)}")
    Fg = g.shape[1]
    if Fg == 1 or Fg == N:
        out = x + g * y
    else:
        out = (x.reshape(B, Fg, N // Fg, C) + g.unsqueeze(2) * y.reshape(B, Fg, N // Fg, C)
               ).reshape(B, N, C)
    return out if autocast_dtype(x) is not None else out.to(x.dtype)


class LayerNormZero(nn.Module):
    """CogVideoX's ``CogVideoXLayerNormZero`` on the fused kernel (drop-in: same parameters).

    ``linear(silu(temb)).chunk(6)`` gives shift, scale, gate (video) and enc_shift, enc_scale,
    enc_gate (text); both streams go through the same LayerNorm (eps 1e-5, affine on). Under
    ``torch.autocast`` the Linear's bf16 chunks modulate an fp32 stream in fp32, as diffusers'
    eager formula promotes.

    Args:
        conditioning_dim: channels of ``temb``.
        embedding_dim: channels C of the token streams.
        elementwise_affine, eps, bias: as in diffusers.
        norm: ``"layer"`` (CogVideoX) or ``"rms"``.
    """

    def __init__(self, conditioning_dim: int, embedding_dim: int, elementwise_affine: bool = True,
                 eps: float = 1e-5, bias: bool = True, *, norm: str = "layer", device=None,
                 dtype=None):
        super().__init__()
        check_sizes("LayerNormZero", conditioning_dim=conditioning_dim,
                    embedding_dim=embedding_dim)
        check_flags("LayerNormZero", elementwise_affine=elementwise_affine, bias=bias)
        check_norm_kind("LayerNormZero", norm)
        eps = check_eps("LayerNormZero", eps)
        fk = {"device": device, "dtype": dtype}
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_dim, 6 * embedding_dim, bias=bias, **fk)
        self.norm = nn.LayerNorm(embedding_dim, eps=eps, elementwise_affine=elementwise_affine, **fk)
        self.norm_type = norm

    def extra_repr(self) -> str:  # (``norm`` holds the parameters; norm_type says which norm runs)
        return f"norm_type={self.norm_type!r}"

    def _kw(self):
        return {"weight": self.norm.weight, "bias": self.norm.bias, "eps": self.norm.eps,
                "norm": self.norm_type}

    def _chunks(self, temb: Tensor):
        check_cond("LayerNormZero", temb, self.linear, "temb")
        return self.linear(self.silu(temb)).chunk(6, dim=-1)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor):
        """hidden_states ``[B, Nv, C]``, encoder_hidden_states ``[B, Nt, C]``, temb ``[B, D]``.

        Returns ``(norm_hidden, norm_encoder, gate [B, 1, C], enc_gate [B, 1, C])`` as diffusers.
        """
        shift, scale, gate, e_shift, e_scale, e_gate = self._chunks(temb)
        kw = self._kw()
        h = adaln_modulate(hidden_states, shift, scale, **kw)
        e = adaln_modulate(encoder_hidden_states, e_shift, e_scale, **kw)
        return h, e, gate.unsqueeze(-2), e_gate.unsqueeze(-2)

    def forward_residual(self, hidden_states: Tensor, encoder_hidden_states: Tensor,
                         attn_hidden_states: Tensor, attn_encoder_hidden_states: Tensor,
                         gate: Tensor, enc_gate: Tensor, temb: Tensor):
        """The residual of the previous sublayer fused with this norm::

            hidden = hidden + gate * attn_hidden        (text stream likewise with enc_gate)
            norm_hidden, norm_encoder, gate2, enc_gate2 = self(hidden, encoder_hidden, temb)

        Returns ``(hidden, encoder_hidden, norm_hidden, norm_encoder, gate2, enc_gate2)``.
        """
        shift, scale, gate2, e_shift, e_scale, e_gate2 = self._chunks(temb)
        kw = self._kw()
        h, nh = gated_residual_adaln(hidden_states, attn_hidden_states, gate, shift, scale, **kw)
        e, ne = gated_residual_adaln(encoder_hidden_states, attn_encoder_hidden_states, enc_gate,
                                     e_shift, e_scale, **kw)
        return h, e, nh, ne, gate2.unsqueeze(-2), e_gate2.unsqueeze(-2)


class HeadNorm(nn.Module):
    """Per-head QK norm: LayerNorm (``kind="layer"``, weight + bias) or RMSNorm (``"rms"``,
    weight) over the last dim ``D`` of ``x [..., H, D]``, a drop-in for ``nn.LayerNorm(D)`` /
    ``nn.RMSNorm(D)`` (same parameter names and initialisation; the default ``eps`` is 1e-6, that
    of CogVideoX's and Wan's QK norms: pass ``eps=1e-5`` for ``nn.LayerNorm``'s default).

    Runs on the fused AdaLN kernel (:func:`vidgen_kernels.adaln_modulate` with zero shift and
    scale) over the ``[rows, H, D]`` view of ``x``, read in place (e.g. the q / k slices of a
    fused qkv projection), so backward keeps only ``x`` and the per-row fp32 statistics, where
    the eager ``nn.RMSNorm`` / ``nn.LayerNorm`` composites also save normalised copies. With the
    ``reference`` backend (``backend="reference"`` or ``use_backend("reference")``) it is exactly
    ``F.layer_norm`` / ``F.rms_norm``.

    Args:
        dim: ``D``.
        kind: ``"layer"`` or ``"rms"``.
        eps: added to the variance / mean square.
        backend: kernel backend (``None``: the package's selection).
    """

    def __init__(self, dim: int, kind: str = "rms", eps: float = 1e-6, *,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        check_sizes("HeadNorm", dim=dim)
        check_norm_kind("HeadNorm", kind, "kind")
        eps = check_eps("HeadNorm", eps)
        check_backend_arg("HeadNorm", backend)
        fk = {"device": device, "dtype": dtype}
        self.dim, self.kind, self.eps, self.backend = dim, kind, eps, backend
        self.normalized_shape = (dim,)
        self.weight = nn.Parameter(torch.ones(dim, **fk))
        if kind == "layer":
            self.bias = nn.Parameter(torch.zeros(dim, **fk))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """Weight ones, bias zeros (as ``nn.LayerNorm`` / ``nn.RMSNorm``)."""
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.dim}, kind={self.kind!r}, eps={self.eps}, backend={self.backend}"

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., D]`` (any strides) -> normalised ``[..., D]`` (contiguous, x's dtype)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"HeadNorm: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"HeadNorm: x must be a floating tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"HeadNorm: x must be [..., D={self.dim}], got {tuple(x.shape)}")
        name = self.backend if self.backend is not None else current_backend()
        if name == "reference" or x.dim() < 2 or x.numel() == 0:
            if self.kind == "layer":
                return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        # [rows, H, D]: a view, copied only when the leading dims cannot merge (reshape, not
        # view in a try: under torch.compile view's error is another exception type)
        x3 = x.reshape(-1, x.shape[-2], self.dim)
        zero = torch.zeros((), dtype=torch.float32, device=x.device).expand(self.dim)
        out = adaln_modulate(x3, zero, zero, weight=self.weight, bias=self.bias, eps=self.eps,
                             norm=self.kind, backend=self.backend)
        return out.view(x.shape)
