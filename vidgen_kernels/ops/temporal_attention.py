"""Causal temporal attention: attention along the frame axis for every (batch, spatial position,
head), read in place from the frame-major ``[B, T, S, H, D]`` layout, with optional fused 1D RoPE
over frames and streaming (queries for the newest frames against cached past keys/values).

Layers, top to bottom: the public ``temporal_attention`` (checks, table canonicalisation,
backend choice); the PyTorch reference (the seed design: permute, rotate, masked softmax
attention, permute back); two custom ops ``vidgen_kernels::temporal_attn_fwd`` / ``_bwd`` with
fake implementations and autograd; ``kernel_fwd_torch`` / ``kernel_bwd_torch``: the contract
below in PyTorch, the oracle for each backend's raw kernels.

Kernel contract (``cpu`` and ``triton`` implement it, same argument order)
--------------------------------------------------------------------------
``fwd(q, k, v, cos, sin, out, lse, causal, interleaved, q_offset, scale)``

* ``q``: ``[B, Tq, S, H, D]``, ``k``, ``v``: ``[B, Tk, S, H, D]``, one dtype ``T``, any strides
  (a non-unit last stride included), ``Tk = q_offset + Tq``.
* ``cos``, ``sin``: ``None`` (no rotation) or ``[Tk, D/2]`` float32 contiguous; D is even then.
* ``out``: ``[B, Tq, S, H, D]`` contiguous ``T``; ``lse``: ``[B, S, H, Tq]`` contiguous float32.
* For every ``(b, s, h)``: ``qr_i = round_T(rot(q[b, i, s, h], q_offset + i))``,
  ``kr_j = round_T(rot(k[b, j, s, h], j))`` (no rotation without tables; ``rot`` as in
  ``ops/rope.py``, fp32 math); ``z_ij = scale * <qr_i, kr_j>`` (fp32 accumulation), masked out when
  ``causal and j > q_offset + i``; ``p = softmax_j(z)``; ``out_i = sum_j p_ij v_j``;
  ``lse_i = log(sum_j exp(z_ij))`` over unmasked j (natural log). Every row has at least one key.

``bwd(dout, q, k, v, cos, sin, out, lse, dq, dk, dv, causal, interleaved, q_offset, scale)``

* ``dout``: ``[B, Tq, S, H, D]`` any strides ``T``; the rest as in the forward.
* ``dq``: ``[B, Tq, S, H, D]``, ``dk``, ``dv``: ``[B, Tk, S, H, D]``, contiguous ``T``, every element
  written (not zeroed beforehand).
* Math (fp32): ``delta_i = <dout_i, out_i>`` (a kernel that holds whole rows may use the equal
  ``sum_j p_ij dp_ij`` instead, with ``p`` renormalised over the row, as the C++ CPU kernel and
  the resident Triton kernels do: then it need not read ``out``, and ``sum_j ds_ij`` is 0 to
  rounding, which the 16-bit ``out`` does not give);
  ``p_ij = exp(z_ij - lse_i)`` (0 where masked);
  ``dv_j = sum_i p_ij dout_i``; ``dp_ij = <dout_i, v_j>``; ``ds_ij = p_ij (dp_ij - delta_i)``;
  ``dqr_i = scale sum_j ds_ij kr_j``; ``dkr_j = scale sum_i ds_ij qr_i``;
  ``dq_i = rot(dqr_i, -(q_offset + i))``, ``dk_j = rot(dkr_j, -j)``.

Nothing but q, k, v, out and lse is saved for backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._eager import differentiable_vjp, eager_op
from ..backends import may_fall_back, resolve
from ._checks import (autocast_dtype, cast_floating, check_flags, check_qkv, check_sizes,
                      softmax_scale_or_default)
from .rope import canon_table, check_rope_pair, rotate, table_grads, unrotate

__all__ = ["temporal_attention", "temporal_attention_reference"]

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
# Longest key sequence (frames) and head_dim each backend takes (None: no limit); beyond them
# ``auto`` falls back to the reference and an explicitly named backend raises. The Triton
# kernels hold sequences of up to 128 frames on chip and walk longer ones (or tiles too large
# for the GPU's shared memory) in blocks, so they have no frame limit.
MAX_T = {"cpu": None, "triton": None}
MAX_D = {"cpu": None, "triton": 256}


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, cos, sin, q_offset, causal, interleaved, softmax_scale, op):
    check_flags(op, causal=causal, interleaved=interleaved)
    check_qkv(q, k, v, "[B, T, S, H, D]", op)
    B, Tq, S, H, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3], k.shape[4]) != (B, S, H, D):
        raise ValueError(f"{op}: k/v must be [B, T_k, S, H, D] = [{B}, T_k, {S}, {H}, {D}] to match "
                         f"q {tuple(q.shape)}, got {tuple(k.shape)}")
    if D == 0 or Tq == 0:
        raise ValueError(f"{op}: q must have T >= 1 frames and D >= 1, got shape {tuple(q.shape)}")
    check_sizes(op, 0, q_offset=q_offset)
    Tk = k.shape[1]
    if q_offset + Tq != Tk:
        raise ValueError(f"{op}: q_offset + T_q must equal T_k (q holds the newest frames of the "
                         f"k/v sequence), got q_offset={int(q_offset)}, T_q={int(Tq)}, "
                         f"T_k={int(Tk)}")
    softmax_scale = softmax_scale_or_default(softmax_scale, D, op)
    if check_rope_pair(cos, sin, op) is not None:
        if D % 2:
            raise ValueError(f"{op}: RoPE needs an even head_dim, got D={D}")
        fp64 = q.dtype == torch.float64  # (only reference runs fp64: it keeps fp64 tables)
        cos = canon_table("cos", cos, D, Tk, q.device, op, interleaved, fp64)
        sin = canon_table("sin", sin, D, Tk, q.device, op, interleaved, fp64)
    return cos, sin, float(softmax_scale)


# ----------------------------------------------------------------------------------------------
# reference (the seed design) and the contract in PyTorch
# ----------------------------------------------------------------------------------------------
def _to_seq(t: Tensor) -> Tensor:
    """[B, T, S, H, D] -> [B, S, H, T, D] (a permuted copy: the cost the kernels avoid)."""
    return t.permute(0, 2, 3, 1, 4).contiguous()


def _attend(q, k, v, cos, sin, causal, interleaved, q_offset, scale):
    """Materialised attention on [B, S, H, T, D]; returns (out, lse, qr, kr) in fp32 math."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if cos is not None:
        q = rotate(q, cos[q_offset:], sin[q_offset:], interleaved)
        k = rotate(k, cos, sin, interleaved)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    z = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(Tq, device=q.device)[:, None] + q_offset
        j = torch.arange(Tk, device=q.device)[None, :]
        z = z.masked_fill(j > i, float("-inf"))
    lse = torch.logsumexp(z, dim=-1)
    out = torch.matmul(torch.softmax(z, dim=-1), v.to(acc))
    return out, lse, q, k


def temporal_attention_reference(q, k, v, *, causal=True, cos=None, sin=None, interleaved=True,
                                 q_offset=0, softmax_scale=None):
    """The seed design in PyTorch: permute to ``[B, S, H, T, D]``, rotate, masked softmax
    attention (fp32 math), permute back. Returns ``[B, T_q, S, H, D]`` in q's dtype."""
    op = "temporal_attention_reference"
    cos, sin, scale = _check_inputs(q, k, v, cos, sin, q_offset, causal, interleaved,
                                    softmax_scale, op)
    out, _, _, _ = _attend(_to_seq(q), _to_seq(k), _to_seq(v), cos, sin, causal, interleaved,
                           q_offset, scale)
    return out.to(q.dtype).permute(0, 3, 1, 2, 4).contiguous()


def kernel_fwd_torch(q, k, v, cos, sin, out, lse, causal, interleaved, q_offset, scale):
    """The forward contract (module docstring) in PyTorch; fills ``out`` and ``lse``."""
    o, l_, _, _ = _attend(_to_seq(q), _to_seq(k), _to_seq(v), cos, sin, causal, interleaved,
                          q_offset, scale)
    out.copy_(o.permute(0, 3, 1, 2, 4))
    lse.copy_(l_)


def kernel_bwd_torch(dout, q, k, v, cos, sin, out, lse, dq, dk, dv, causal, interleaved, q_offset,
                     scale):
    """The backward contract (module docstring) in PyTorch; fills ``dq``, ``dk``, ``dv``."""
    qs, ks, vs = _to_seq(q), _to_seq(k), _to_seq(v)
    do, o = _to_seq(dout).float(), _to_seq(out).float()
    Tq, Tk = qs.shape[-2], ks.shape[-2]
    if cos is not None:
        qs = rotate(qs, cos[q_offset:], sin[q_offset:], interleaved)
        ks = rotate(ks, cos, sin, interleaved)
    qf, kf, vf = qs.float(), ks.float(), vs.float()
    z = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    p = torch.exp(z - lse[..., None])
    if causal:
        i = torch.arange(Tq, device=q.device)[:, None] + q_offset
        j = torch.arange(Tk, device=q.device)[None, :]
        p = p.masked_fill(j > i, 0.0)
    delta = (do * o).sum(-1, keepdim=True)
    dvv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (torch.matmul(do, vf.transpose(-1, -2)) - delta)
    if causal:  # masked entries send no gradient, even a NaN one
        ds = ds.masked_fill(j > i, 0.0)
    dqr = torch.matmul(ds, kf) * scale
    dkr = torch.matmul(ds.transpose(-1, -2), qf) * scale
    if cos is not None:
        dqr = unrotate(dqr, cos[q_offset:], sin[q_offset:], interleaved)
        dkr = unrotate(dkr, cos, sin, interleaved)
    for dst, src in ((dq, dqr), (dk, dkr), (dv, dvv)):
        dst.copy_(src.permute(0, 3, 1, 2, 4))


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
def _kernels(backend: str):
    if backend == "cpu":
        from .. import _ext
        return _ext.C.temporal_attn_fwd_cpu, _ext.C.temporal_attn_bwd_cpu
    if backend == "triton":
        from ..triton_kernels import temporal_attention as tk
        return tk.temporal_attn_fwd, tk.temporal_attn_bwd
    if backend == "torch":  # the contract oracle; tests of the op plumbing
        return kernel_fwd_torch, kernel_bwd_torch
    raise ValueError(f"unknown kernel backend {backend!r}")


def _temporal_attn_fwd_impl(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor],
                            sin: Optional[Tensor], causal: bool, interleaved: bool, q_offset: int,
                            scale: float, backend: str) -> tuple[Tensor, Tensor]:
    B, Tq, S, H, D = q.shape
    out = torch.empty((B, Tq, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, S, H, Tq), dtype=torch.float32, device=q.device)
    if out.numel() > 0:
        fwd, _ = _kernels(backend)
        fwd(q, k, v, cos, sin, out, lse, causal, interleaved, q_offset, scale)
    return out, lse


_temporal_attn_fwd = torch.library.custom_op("vidgen_kernels::temporal_attn_fwd",
                                             mutates_args=())(_temporal_attn_fwd_impl)


@_temporal_attn_fwd.register_fake
def _(q, k, v, cos, sin, causal, interleaved, q_offset, scale, backend):
    B, Tq, S, H, D = q.shape
    return q.new_empty((B, Tq, S, H, D)), q.new_empty((B, S, H, Tq), dtype=torch.float32)


def _temporal_attn_bwd_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor],
                            sin: Optional[Tensor], out: Tensor, lse: Tensor, causal: bool,
                            interleaved: bool, q_offset: int, scale: float,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() > 0:
        _, bwd = _kernels(backend)
        bwd(dout, q, k, v, cos, sin, out, lse, dq, dk, dv, causal, interleaved, q_offset, scale)
    return dq, dk, dv


_temporal_attn_bwd = torch.library.custom_op("vidgen_kernels::temporal_attn_bwd",
                                             mutates_args=())(_temporal_attn_bwd_impl)
_temporal_attn_bwd_call = eager_op(_temporal_attn_bwd, _temporal_attn_bwd_impl)


@_temporal_attn_bwd.register_fake
def _(dout, q, k, v, cos, sin, out, lse, causal, interleaved, q_offset, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, causal, interleaved, q_offset, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cos, sin, out, lse)
    ctx.args = (causal, interleaved, q_offset, scale, backend)
    ctx.set_materialize_grads(False)  # no zero gradient is made for lse (an output for backward)


def _backward(ctx, dout, _dlse):
    q, k, v, cos, sin, out, lse = ctx.saved_tensors
    if dout is None:
        return (None,) * 10
    causal, interleaved, q_offset, scale, _ = ctx.args
    if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
        grads = differentiable_vjp(
            lambda q, k, v, cos, sin: _attend(_to_seq(q), _to_seq(k), _to_seq(v), cos, sin,
                                              causal, interleaved, q_offset, scale)[0]
            .to(q.dtype).permute(0, 3, 1, 2, 4),
            (q, k, v, cos, sin), ctx.needs_input_grad[:5], (dout,))
        return grads + (None,) * 5
    dq, dk, dv = _temporal_attn_bwd_call(dout, q, k, v, cos, sin, out, lse, *ctx.args)
    dcos = dsin = None
    if cos is not None and any(ctx.needs_input_grad[3:5]):  # tables that require grad
        # k's frames 0 .. T_k - 1 use table rows 0 .., q's frames rows q_offset ..
        dcos, dsin = table_grads(k, dk, cos, sin, interleaved, 1, 0)
        qc, qs = table_grads(q, dq, cos[q_offset:], sin[q_offset:], interleaved, 1, 0)
        dcos = torch.cat([dcos[:q_offset], dcos[q_offset:] + qc]).to(cos.dtype)
        dsin = torch.cat([dsin[:q_offset], dsin[q_offset:] + qs]).to(sin.dtype)
    return dq, dk, dv, dcos, dsin, None, None, None, None, None


_temporal_attn_fwd_call = eager_op(_temporal_attn_fwd, _temporal_attn_fwd_impl, _setup_context,
                                   _backward)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def temporal_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                       cos: Optional[Tensor] = None, sin: Optional[Tensor] = None,
                       interleaved: bool = True, q_offset: int = 0,
                       softmax_scale: Optional[float] = None,
                       backend: Optional[str] = None) -> Tensor:
    """Attention along the frame axis for every (b, s, h), in place in the frame-major layout.

    Args:
        q: ``[B, T_q, S, H, D]`` (what a ``[B, T*S, H*D]`` projection reshapes to; any strides).
        k, v: ``[B, T_k, S, H, D]`` with ``T_k = q_offset + T_q``.
        causal: frame ``t`` attends to frames ``<= t`` (absolute positions); else bidirectional.
        cos, sin: optional 1D RoPE tables over frames, ``[L, D/2]`` or ``[L, D]`` (each angle
            repeated), ``L >= T_k``; q is rotated at frames ``q_offset ..``, k at ``0 ..``.
        interleaved: RoPE pairs ``(2i, 2i+1)`` (True) or ``(i, i + D/2)`` (half-split).
        q_offset: number of cached past frames in k/v before q's first frame (streaming).
        softmax_scale: default ``1 / sqrt(D)``.
        backend: ``None`` (current default) or a backend name.
    Returns:
        ``[B, T_q, S, H, D]`` contiguous, q's dtype. The output equals the last ``T_q`` frames
        of the full causal computation over ``T_k`` frames. Under ``torch.autocast`` for q's
        device, q, k and v are first cast to the autocast dtype, as SDPA's are.

    Gradients reach q, k, v and, where they require grad, the tables. A NaN / inf stays in its
    own (b, s, h) sequence on every backend (in Triton's packed tiles, ``T_k <= 8``, the
    backward then sets all of that sequence's gradients to NaN).
    """
    op = "temporal_attention"
    ac = autocast_dtype(q)
    if ac is not None:  # as autocast treats SDPA's q, k, v
        q, k, v = cast_floating(ac, q, k, v)
        with torch.autocast(q.device.type, enabled=False):
            return temporal_attention(q, k, v, causal=causal, cos=cos, sin=sin,
                                      interleaved=interleaved, q_offset=q_offset,
                                      softmax_scale=softmax_scale, backend=backend)
    cos, sin, scale = _check_inputs(q, k, v, cos, sin, q_offset, causal, interleaved,
                                    softmax_scale, op)
    name = resolve(backend, q.device, q.dtype, SUPPORTED_DTYPES, op, (q, k, v, cos, sin))
    Tk, D = k.shape[1], q.shape[-1]
    for limits, val, what in ((MAX_T, Tk, "T_k"), (MAX_D, D, "head_dim")):
        lim = limits.get(name)
        if lim is not None and val > lim:
            if may_fall_back(backend):
                name = "reference"
            else:
                raise ValueError(f"{op}: backend {name!r} supports {what} <= {lim}, got {val}")
    if name == "reference":
        out, _, _, _ = _attend(_to_seq(q), _to_seq(k), _to_seq(v), cos, sin, causal, interleaved,
                               q_offset, scale)
        return out.to(q.dtype).permute(0, 3, 1, 2, 4).contiguous()
    out, _ = _temporal_attn_fwd_call(q, k, v, cos, sin, bool(causal), bool(interleaved),
                                     int(q_offset), scale, name)
    return out
