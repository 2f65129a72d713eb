"""Fused AdaLN modulation: ``norm(x) * (1 + scale) + shift``, optionally fused with the gated
residual ``h = x + gate * y`` of the DiT sublayer boundary.

Layers of this module, top to bottom:

* public functions ``adaln_modulate`` / ``gated_residual_adaln``: argument checks, broadcast
  canonicalisation (views only), backend choice;
* the PyTorch reference (``adaln_modulate_reference``, ``gated_residual_adaln_reference``): the
  ``reference`` backend and the oracle of the tests;
* two custom ops ``vidgen_kernels::adaln_fwd`` / ``vidgen_kernels::adaln_bwd`` with fake
  implementations and autograd, which run one of the kernel backends (cpu / cuda / triton);
* ``kernel_fwd_torch`` / ``kernel_bwd_torch``: the kernel contract below written in PyTorch, the
  oracle against which each backend's raw kernels are tested.

Kernel contract (what ``cpu``, ``cuda`` and ``triton`` implement, same argument order)
-------------------------------------------------------------------------------------
``fwd(x, y, gate, shift, scale, weight, bias, out, h, mean, rstd, eps, is_rms)``

* ``x``: ``[B, N, C]``, any strides (stride 0 and a non-unit last stride included), dtype ``T``.
* ``y``: ``None`` or ``[B, N, C]`` any strides, dtype ``T``. Gated mode iff ``y is not None``.
* ``shift``, ``scale``, ``gate``: ``[Bp, F, C]`` with ``Bp in {1, B}``, ``F`` divides ``N``, any
  strides; token ``n`` of batch ``b`` reads row ``[b if Bp == B else 0, n // (N // F)]``. All three
  share one dtype ``P in {T, float32}`` (the public ops cast mixed ones to float32, float64 for a
  float64 ``x``); ``gate`` is ``None`` unless gated.
* ``weight``, ``bias``: ``None`` or ``[C]`` any stride, dtype ``T`` or ``float32``.
* ``out``: ``[B, N, C]`` contiguous, dtype ``T``; ``h``: ``None`` or ``[B, N, C]`` contiguous ``T``.
* ``mean``, ``rstd``: ``[B, N]`` contiguous of the accumulation dtype ``A``: float32, float64 when
  ``T`` is float64 (only the ``cpu`` backend takes float64); ``mean`` is written as 0 for rms.
* Math in ``A``: ``h = round_T(x + gate * y)`` (gated; the product and the sum each rounded in
  ``A``, no FMA, so fp32 ``h`` is eager ``x + gate * y`` bit for bit; the rounded ``h`` is what is
  normalised),
  layer: ``mu = mean_c(h)``, ``rstd = 1/sqrt(mean_c((h - mu)^2) + eps)``; rms: ``mu = 0``,
  ``rstd = 1/sqrt(mean_c(h^2) + eps)``; ``xhat = (h - mu) * rstd``; ``nrm = xhat * w + b``
  (w = 1, b = 0 when absent); ``out = nrm * (1 + scale) + shift``.

``bwd(dout, dh, hx, y, gate, scale, weight, bias, mean, rstd, dx, dy, dgate, dshift, dscale,
dweight, dbias, tpr_gate, tpr_shift, tpr_scale, rows_per_chunk, is_rms)``

* ``dout``: ``[B, N, C]`` any strides ``T``; ``dh``: ``None`` or ``[B, N, C]`` any strides ``T``
  (gradient flowing into the ``h`` output); ``hx``: the normalised tensor (``x``, or ``h`` when
  gated), any strides ``T``; ``y``, ``gate``, ``scale``, ``weight``, ``bias``, ``mean``, ``rstd``
  as in the forward.
* Row gradient: ``dn = dout * (1 + scale)``, ``dxhat = dn * w``; layer:
  ``g = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat))``; rms:
  ``g = rstd * (dxhat - xhat * mean_c(dxhat * xhat))``; then ``g += dh`` when given.
* Outputs are preallocated and NOT zeroed: the kernel writes every element of each one given.

  - ``dx``: ``[B, N, C]`` contiguous ``T`` = ``g`` (always given).
  - ``dy``: ``None`` or ``[B, N, C]`` contiguous ``T`` = ``g * gate``.
  - ``dgate`` (``g * y``), ``dshift`` (``dout``), ``dscale`` (``dout * nrm``): each ``None``, or a
    per-token buffer ``[B, N, C]`` contiguous (any float dtype, element ``[b, n, c]``), or a
    partial buffer ``[B, NC, 2, C]`` contiguous of dtype ``A`` with ``R = rows_per_chunk``,
    ``NC = ceil(N / R)``. Chunk ``c`` of batch ``b`` covers rows ``c*R .. min(c*R+R, N)-1``; with
    ``tpr`` the matching ``tpr_*`` argument (tokens per parameter row, ``R <= tpr`` guaranteed)
    and ``g_lo = (c*R) // tpr``: slot 0 sums the rows with ``n // tpr == g_lo``, slot 1 the rows
    with ``n // tpr == g_lo + 1`` (zeros if none).
  - ``dweight`` (``dn * xhat``), ``dbias`` (``dn``): ``None`` or partial ``[B, NC, C]`` of dtype
    ``A``, the sum over the chunk's rows.

One program (thread block, OpenMP task) per ``(b, chunk)`` walks its rows in order, so the
broadcast-parameter reductions happen in registers, and only ``B * NC`` partial rows are written.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ..backends import may_fall_back, resolve
from ._checks import NORMS, autocast_dtype, check_eps, check_norm_kind
from ._eager import differentiable_vjp, eager_op

__all__ = [
    "adaln_modulate",
    "gated_residual_adaln",
    "adaln_modulate_reference",
    "gated_residual_adaln_reference",
    "NORMS",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Kernel backends and the input dtypes they take (checked before dispatch).
SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
MAX_C = {"cpu": None, "cuda": 16384, "triton": 16384}


# ----------------------------------------------------------------------------------------------
# argument checks and broadcast canonicalisation (views only, never copies)
# ----------------------------------------------------------------------------------------------
def _check_x(name: str, x, op: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (float16/bfloat16/float32/float64), "
                        f"got dtype {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be [B, N, C], got shape {tuple(x.shape)} ({x.dim()}-D)")
    if x.shape[2] == 0:
        raise ValueError(f"{op}: {name} must have C >= 1 channels, got shape {tuple(x.shape)}")
    return x


def _check_same_device(name: str, t: Tensor, x: Tensor, op: str):
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; "
                         "all tensors must be on one device")


def _check_aux(name: str, t, x: Tensor, op: str, what: str = "a torch.Tensor"):
    """Type, device and dtype (x's or float32) of a modulation or affine tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be {what}, got {type(t).__name__}")
    _check_same_device(name, t, x, op)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor, got dtype {t.dtype}")
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{op}: {name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")


def _canon_param(name: str, p, x: Tensor, op: str) -> Tensor:
    """``[C]``, ``[Bp, C]``, ``[Bp, F, C]`` -> a ``[Bp, F, C]`` view (Bp in {1, B}, F | N)."""
    B, N, C = x.shape
    _check_aux(name, p, x, op)

    def expected():  # formatted only when raising: under torch.compile(dynamic=True) an f-string
        # of the sizes specialises them, after which dynamo answers `Bp in (1, B)` wrongly
        return (f"[C], [B, C], [B, 1, C], [B, F, C] with F dividing N, or [B, N, C] "
                f"(B={B}, N={N}, C={C})")
    if p.dim() == 1:
        p = p.view(1, 1, -1)
    elif p.dim() == 2:
        p = p.unsqueeze(1)
    elif p.dim() != 3:
        raise ValueError(f"{op}: {name} must be {expected()}, got shape {tuple(p.shape)}")
    Bp, Fp, Cp = p.shape
    if Cp != C:
        raise ValueError(f"{op}: {name} has {Cp} channels but x has C={C}; expected {expected()}")
    if not (Bp == 1 or Bp == B):  # (not `in`: False on symbolic sizes under dynamic compile)
        raise ValueError(f"{op}: {name} has batch {Bp} but x has B={B} (1 broadcasts); "
                         f"expected {expected()}")
    if Fp != N and (Fp == 0 or N % Fp != 0):  # (Fp == N: per token, also for N = 0)
        raise ValueError(f"{op}: {name} has {Fp} rows along the token axis, which does not divide "
                         f"N={N}; expected {expected()}")
    return p


def _check_affine(name: str, w, x: Tensor, op: str) -> Optional[Tensor]:
    if w is None:
        return None
    _check_aux(name, w, x, op, "a torch.Tensor or None")
    if w.dim() != 1 or w.shape[0] != x.shape[2]:
        raise ValueError(f"{op}: {name} must be [C] = [{x.shape[2]}], got shape {tuple(w.shape)}")
    return w


def _check_norm(norm, eps, op: str) -> bool:
    """``norm`` and ``eps`` checked as the modules check them; True for RMSNorm."""
    check_norm_kind(op, norm)
    check_eps(op, eps)
    return norm == "rms"


# ----------------------------------------------------------------------------------------------
# PyTorch reference (fp32 math, result in x's dtype)
# ----------------------------------------------------------------------------------------------
def _rows(p: Tensor, t: Tensor, fn):
    """Apply ``fn(t_view, p_row)`` with ``p`` [Bp, F, C] broadcast over the N/F tokens of each row
    of ``t`` [B, N, C], without materialising the broadcast."""
    B, N, C = t.shape
    Fp = p.shape[1]
    if Fp == 1 or Fp == N:
        return fn(t, p)
    # (splitting N always views; merging fn's result back may not: x + g * y takes its layout
    # from x and y, and a stride-0 x with a transposed y gives one whose F and N / F dims
    # cannot merge)
    return fn(t.view(B, Fp, N // Fp, C), p.unsqueeze(2)).reshape(B, N, C)


def _acc(t: Tensor) -> Tensor:
    """Upcast half precision to fp32 for the math; fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype ``A`` for inputs of ``dtype``: float64 for float64, else
    float32. Row statistics and partial parameter-gradient buffers are stored in it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ref_norm(h32: Tensor, weight, bias, eps: float, is_rms: bool) -> Tensor:
    C = h32.shape[-1]
    w = _acc(weight).to(h32.dtype) if weight is not None else None
    b = _acc(bias).to(h32.dtype) if bias is not None else None
    if not is_rms:
        return F.layer_norm(h32, (C,), w, b, eps)
    n = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        n = n * w
    if b is not None:
        n = n + b
    return n


def _ref_modulate(x: Tensor, shift3: Tensor, scale3: Tensor, weight, bias, eps, is_rms) -> Tensor:
    n = _ref_norm(_acc(x), weight, bias, eps, is_rms)
    # in n's dtype (fp32, fp64 for fp64 x: an fp32 scale is widened before 1 + scale)
    n = _rows(scale3, n, lambda t, s: t * (1 + s.to(t.dtype)))
    n = _rows(shift3, n, lambda t, s: t + s.to(t.dtype))
    return n.to(x.dtype)


def _ref_gated(x: Tensor, y: Tensor, gate3: Tensor) -> Tensor:
    y32 = _acc(y)
    return _rows(gate3, y32, lambda t, g: _acc(x).view(t.shape) + _acc(g) * t).view(x.shape).to(x.dtype)


def adaln_modulate_reference(x, shift, scale, *, weight=None, bias=None, eps=1e-6, norm="layer"):
    """PyTorch reference of :func:`adaln_modulate` (fp32 math, output in ``x.dtype``)."""
    op = "adaln_modulate_reference"
    x = _check_x("x", x, op)
    is_rms = _check_norm(norm, eps, op)
    shift3, scale3 = _canon_param("shift", shift, x, op), _canon_param("scale", scale, x, op)
    weight, bias = _check_affine("weight", weight, x, op), _check_affine("bias", bias, x, op)
    return _ref_modulate(x, shift3, scale3, weight, bias, eps, is_rms)


def gated_residual_adaln_reference(x, y, gate, shift, scale, *, weight=None, bias=None, eps=1e-6,
                                   norm="layer"):
    """PyTorch reference of :func:`gated_residual_adaln`: ``h = x + gate * y`` (fp32 math, rounded
    to ``x.dtype``), ``out = adaln_modulate_reference(h, ...)``; returns ``(h, out)``."""
    op = "gated_residual_adaln_reference"
    x = _check_x("x", x, op)
    _check_y(y, x, op)
    is_rms = _check_norm(norm, eps, op)
    gate3 = _canon_param("gate", gate, x, op)
    shift3, scale3 = _canon_param("shift", shift, x, op), _canon_param("scale", scale, x, op)
    weight, bias = _check_affine("weight", weight, x, op), _check_affine("bias", bias, x, op)
    h = _ref_gated(x, y, gate3)
    return h, _ref_modulate(h, shift3, scale3, weight, bias, eps, is_rms)


def _check_y(y, x: Tensor, op: str):
    if not isinstance(y, Tensor):
        raise TypeError(f"{op}: y must be a torch.Tensor, got {type(y).__name__}")
    _check_same_device("y", y, x, op)
    if y.dtype != x.dtype:
        raise TypeError(f"{op}: y must have x's dtype {x.dtype}, got {y.dtype}")
    if y.shape != x.shape:
        raise ValueError(f"{op}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")


# ----------------------------------------------------------------------------------------------
# kernel contract in PyTorch (test oracle for raw backend kernels)
# ----------------------------------------------------------------------------------------------
def _expand_rows(p: Optional[Tensor], B: int, N: int, dtype=torch.float32) -> Optional[Tensor]:
    if p is None:
        return None
    tpr = 1 if p.shape[1] == N else N // p.shape[1]  # (per token, N = 0 included: 1)
    return p.to(dtype).repeat_interleave(tpr, dim=1).expand(B, N, p.shape[2])


def kernel_fwd_torch(x, y, gate, shift, scale, weight, bias, out, h, mean, rstd, eps, is_rms):
    """The forward kernel contract (module docstring) in PyTorch; fills the given outputs."""
    B, N, C = x.shape
    A = _acc_dtype(x.dtype)
    hx = x.to(A)
    if y is not None:
        hh = (hx + _expand_rows(gate, B, N, A) * y.to(A)).to(x.dtype)
        h.copy_(hh)
        hx = hh.to(A)
    if is_rms:
        mu = torch.zeros(B, N, 1, dtype=A, device=x.device)
        rs = torch.rsqrt(hx.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mu = hx.mean(-1, keepdim=True)
        rs = torch.rsqrt((hx - mu).pow(2).mean(-1, keepdim=True) + eps)
    nrm = (hx - mu) * rs
    if weight is not None:
        nrm = nrm * weight.to(A)
    if bias is not None:
        nrm = nrm + bias.to(A)
    out.copy_(nrm * (1 + _expand_rows(scale, B, N, A)) + _expand_rows(shift, B, N, A))
    mean.copy_(mu[..., 0])
    rstd.copy_(rs[..., 0])


def _fill_partial(buf: Tensor, v: Tensor, tpr: int, R: int):
    """Write the contract's per-token values ``v`` [B, N, C] (dtype ``A``) into ``buf``."""
    B, N, C = v.shape
    if buf.dim() == 3:
        buf.copy_(v)
        return
    NC = buf.shape[1]
    n = torch.arange(N, device=v.device)
    c = n // R
    hi = ((n // tpr) != ((c * R) // tpr))[None, :, None]
    buf.zero_()
    # where, not v * hi: a NaN / inf of v must land in its own slot only, as in the kernels
    buf[:, :, 0].index_add_(1, c, torch.where(hi, 0, v))
    buf[:, :, 1].index_add_(1, c, torch.where(hi, v, 0))
    assert NC == (N + R - 1) // R


def kernel_bwd_torch(dout, dh, hx, y, gate, scale, weight, bias, mean, rstd, dx, dy, dgate, dshift,
                     dscale, dweight, dbias, tpr_gate, tpr_shift, tpr_scale, rows_per_chunk, is_rms):
    """The backward kernel contract (module docstring) in PyTorch; fills the given outputs."""
    B, N, C = hx.shape
    R = rows_per_chunk
    A = _acc_dtype(hx.dtype)
    h32 = hx.to(A)
    xhat = (h32 - mean[..., None].to(A)) * rstd[..., None].to(A)
    w = weight.to(A) if weight is not None else torch.ones(C, dtype=A, device=hx.device)
    nrm = xhat * w + (bias.to(A) if bias is not None else 0)
    do = dout.to(A)
    dn = do * (1 + _expand_rows(scale, B, N, A))
    dxh = dn * w
    proj = (dxh * xhat).mean(-1, keepdim=True)
    g = dxh - xhat * proj
    if not is_rms:
        g = g - dxh.mean(-1, keepdim=True)
    g = g * rstd[..., None]
    if dh is not None:
        g = g + dh.to(A)
    dx.copy_(g)
    if dy is not None:
        dy.copy_(g * _expand_rows(gate, B, N, A))
    if dgate is not None:
        _fill_partial(dgate, g * y.to(A), tpr_gate, R)
    if dshift is not None:
        _fill_partial(dshift, do, tpr_shift, R)
    if dscale is not None:
        _fill_partial(dscale, do * nrm, tpr_scale, R)
    c = torch.arange(N, device=hx.device) // R
    for buf, v in ((dweight, dn * xhat), (dbias, dn)):
        if buf is not None:
            buf.zero_()
            buf.index_add_(1, c, v.to(buf.dtype))


# ----------------------------------------------------------------------------------------------
# kernel backends
# ----------------------------------------------------------------------------------------------
def _kernels(backend: str):
    """(fwd, bwd) raw kernels of ``backend``, following the contract above."""
    if backend == "cpu":
        return _ext.C.adaln_fwd_cpu, _ext.C.adaln_bwd_cpu
    if backend == "cuda":
        def fwd(*args):
            _ext.C.adaln_fwd_cuda(*args, torch.cuda.current_stream(args[0].device).cuda_stream)

        def bwd(*args):
            _ext.C.adaln_bwd_cuda(*args, torch.cuda.current_stream(args[0].device).cuda_stream)
        return fwd, bwd
    if backend == "triton":
        from ..triton_kernels import adaln as tk
        return tk.adaln_fwd, tk.adaln_bwd
    if backend == "torch":  # the contract oracle; used by tests of the op plumbing
        return kernel_fwd_torch, kernel_bwd_torch
    raise ValueError(f"unknown kernel backend {backend!r}")


@functools.lru_cache(maxsize=None)
def _cuda_slots(index: Optional[int]) -> int:
    return 4 * torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count


def _parallel_slots(device_type: str, index: Optional[int]) -> int:
    """How many programs a backward launch should aim for on this device (CPU: the current
    thread count, read per call: a cached one kept the first backward's, e.g. 4 tasks for 8
    threads after a first call under set_num_threads(1))."""
    if device_type == "cuda":
        return _cuda_slots(index)
    return 4 * torch.get_num_threads()


def _rows_per_chunk(B: int, N: int, device: torch.device, tprs: list[int]) -> int:
    target = _parallel_slots(device.type, device.index if device.type == "cuda" else None)
    R = max(1, -(-B * N // target))
    if tprs:
        R = min(R, min(tprs))
    return R


def _param_grad_buffer(Bp: int, Fp: int, B: int, N: int, C: int, NC: int, dtype, acc, device):
    """The kernel's output for one parameter gradient: per token [B, N, C] (in ``dtype``, or the
    accumulation dtype ``acc`` when it still has to be summed over B), else partial sums
    [B, NC, 2, C] in ``acc``."""
    if Fp == N:
        return torch.empty(B, N, C, dtype=dtype if Bp == B else acc, device=device)
    return torch.empty(B, NC, 2, C, dtype=acc, device=device)


def _reduce_param(buf: Tensor, Bp: int, Fp: int, N: int, R: int, dtype) -> Tensor:
    """Partial [B, NC, 2, C] (or per-token [B, N, C]) buffer -> gradient [Bp, F, C] in ``dtype``."""
    B, C = buf.shape[0], buf.shape[-1]
    if buf.dim() == 3:
        g = buf
    else:
        tpr = N // Fp
        if tpr % R == 0:  # chunks never straddle two rows: slot 1 is all zeros
            g = buf[:, :, 0].view(B, Fp, tpr // R, C).sum(2)
        else:
            NC = buf.shape[1]
            glo = (torch.arange(NC, device=buf.device) * R) // tpr
            g = torch.zeros(B, Fp, C, dtype=buf.dtype, device=buf.device)
            # slot 1 of a chunk in the last row holds zeros (no rows beyond N): clamping is exact
            g.index_add_(1, glo, buf[:, :, 0]).index_add_(1, (glo + 1).clamp_(max=Fp - 1), buf[:, :, 1])
    if Bp == 1 and B != 1:
        g = g.sum(0, keepdim=True)
    return g.to(dtype)


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
def _adaln_fwd_impl(x: Tensor, y: Optional[Tensor], gate: Optional[Tensor], shift: Tensor,
                    scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    is_rms: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(out, h, mean, rstd)``; ``h`` is an empty tensor unless gated (``y`` given)."""
    B, N, C = x.shape
    out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    h = torch.empty((B, N, C) if y is not None else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty((B, N), dtype=_acc_dtype(x.dtype), device=x.device)
    rstd = torch.empty_like(mean)
    if B * N > 0:
        fwd, _ = _kernels(backend)
        fwd(x, y, gate, shift, scale, weight, bias, out, h if y is not None else None, mean, rstd,
            float(eps), bool(is_rms))
    return out, h, mean, rstd


_adaln_fwd = torch.library.custom_op("vidgen_kernels::adaln_fwd", mutates_args=())(
    _adaln_fwd_impl)


@_adaln_fwd.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps, is_rms, backend):
    B, N, C = x.shape
    out = x.new_empty((B, N, C))
    h = x.new_empty((B, N, C) if y is not None else (0,))
    mean = x.new_empty((B, N), dtype=_acc_dtype(x.dtype))
    return out, h, mean, torch.empty_like(mean)


def _adaln_bwd_impl(dout: Tensor, dh: Optional[Tensor], hx: Tensor, y: Optional[Tensor],
                    gate: Optional[Tensor], scale: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], mean: Tensor, rstd: Tensor, shift_shape: list[int],
                    shift_dtype: torch.dtype, needs: list[bool], is_rms: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dy, dgate, dshift, dscale, dweight, dbias)``; the ones not asked for in
    ``needs`` (same order) are empty tensors."""
    B, N, C = hx.shape
    dev = hx.device
    _, need_y, need_gate, need_shift, need_scale, need_w, need_b = needs
    need_gate = need_gate and gate is not None
    need_y = need_y and y is not None
    need_w, need_b = need_w and weight is not None, need_b and bias is not None
    params = {"gate": gate.shape if need_gate else None,
              "shift": torch.Size(shift_shape) if need_shift else None,
              "scale": scale.shape if need_scale else None}
    tprs = [N // s[1] for s in params.values() if s is not None and s[1] != N]
    if need_w or need_b:
        tprs.append(N)
    R = _rows_per_chunk(B, N, dev, tprs) if N > 0 else 1
    NC = -(-N // R)
    dtypes = {"gate": gate.dtype if gate is not None else None, "shift": shift_dtype,
              "scale": scale.dtype}
    acc = _acc_dtype(hx.dtype)
    bufs = {k: _param_grad_buffer(s[0], s[1], B, N, C, NC, dtypes[k], acc, dev)
            if s is not None else None for k, s in params.items()}
    dx = torch.empty((B, N, C), dtype=hx.dtype, device=dev)
    dy = torch.empty((B, N, C), dtype=hx.dtype, device=dev) if need_y else None
    dwp = torch.empty((B, NC, C), dtype=acc, device=dev) if need_w else None
    dbp = torch.empty((B, NC, C), dtype=acc, device=dev) if need_b else None
    tpr = {k: (N // s[1] if s is not None and s[1] != N else 1) for k, s in params.items()}
    if B * N > 0:
        _, bwd = _kernels(backend)
        bwd(dout, dh, hx, y, gate, scale, weight, bias, mean, rstd, dx, dy, bufs["gate"],
            bufs["shift"], bufs["scale"], dwp, dbp, tpr["gate"], tpr["shift"], tpr["scale"], R,
            bool(is_rms))
    else:
        for b in (*bufs.values(), dwp, dbp):
            if b is not None:
                b.zero_()
    def empty():  # outputs may not alias each other: a fresh one each time
        return hx.new_empty(0)
    grads = {k: _reduce_param(bufs[k], s[0], s[1], N, R, dtypes[k]) if s is not None else empty()
             for k, s in params.items()}
    dw = dwp.sum((0, 1)).to(weight.dtype) if need_w else empty()
    db = dbp.sum((0, 1)).to(bias.dtype) if need_b else empty()
    return dx, dy if dy is not None else empty(), grads["gate"], grads["shift"], grads["scale"], dw, db


_adaln_bwd = torch.library.custom_op("vidgen_kernels::adaln_bwd", mutates_args=())(
    _adaln_bwd_impl)
_adaln_bwd_call = eager_op(_adaln_bwd, _adaln_bwd_impl)


@_adaln_bwd.register_fake
def _(dout, dh, hx, y, gate, scale, weight, bias, mean, rstd, shift_shape, shift_dtype, needs,
      is_rms, backend):
    _, need_y, need_gate, need_shift, need_scale, need_w, need_b = needs

    def empty():
        return hx.new_empty(0)
    return (
        hx.new_empty(hx.shape),
        hx.new_empty(hx.shape) if need_y and y is not None else empty(),
        gate.new_empty(gate.shape) if need_gate and gate is not None else empty(),
        hx.new_empty(shift_shape, dtype=shift_dtype) if need_shift else empty(),
        scale.new_empty(scale.shape) if need_scale else empty(),
        weight.new_empty(weight.shape) if need_w and weight is not None else empty(),
        bias.new_empty(bias.shape) if need_b and bias is not None else empty(),
    )


def _setup_context(ctx, inputs, output):
    x, y, gate, shift, scale, weight, bias, eps, is_rms, backend = inputs
    out, h, mean, rstd = output
    ctx.gated = y is not None
    ctx.save_for_backward(h if ctx.gated else x, y, gate, scale, weight, bias, mean, rstd)
    ctx.shift_shape = list(shift.shape)
    ctx.shift_dtype = shift.dtype
    ctx.is_rms = is_rms
    ctx.eps = eps
    ctx.backend = backend
    ctx.set_materialize_grads(False)
    if ctx.gated and not any(ctx.needs_input_grad[:3]):
        ctx.mark_non_differentiable(h)  # h = x + gate * y depends on none of the others


def _double_backward(ctx, dout, dh, hx, y, gate, scale, weight, bias):
    """The gradients as a graph (create_graph=True), from the reference. Gated, the saved h
    stands for x + gate * y: differentiating through it reaches this op's own backward, which
    carries the gradient on to x, y and gate."""
    nig = ctx.needs_input_grad
    # shift enters linearly: its gradient does not depend on its value
    shift = torch.zeros(ctx.shift_shape, dtype=ctx.shift_dtype, device=hx.device,
                        requires_grad=nig[3])
    need_h = nig[0] or (ctx.gated and (nig[1] or nig[2]))
    # (gated: differentiating w.r.t. scale / weight / bias themselves would run this op's
    # backward again through h, recursively; differentiable_vjp differentiates per-slot aliases)
    dhx, dshift, dscale, dw, db = differentiable_vjp(
        lambda hx, shift, scale, weight, bias: _ref_modulate(hx, shift, scale, weight, bias,
                                                             ctx.eps, ctx.is_rms),
        (hx, shift, scale, weight, bias), (need_h, nig[3], nig[4], nig[5], nig[6]), (dout,))
    dx = dy = dgate = None
    if ctx.gated and need_h:
        dh_total = dhx if dh is None else (dh if dhx is None else dhx + dh)
        if dh_total is not None:
            _, dy, dgate = differentiable_vjp(
                lambda _, y, gate: _ref_gated(torch.zeros_like(hx), y, gate), (None, y, gate),
                (False, nig[1], nig[2]), (dh_total,))
        dx = dh_total
    elif not ctx.gated:
        dx = dhx
    return (dx if nig[0] else None, dy, dgate, dshift, dscale, dw, db, None, None, None)


def _backward(ctx, dout, dh, _dmean, _drstd):
    hx, y, gate, scale, weight, bias, mean, rstd = ctx.saved_tensors
    if dout is None:  # only h reaches the loss: x, y and gate get a gradient, the rest none
        grads = _backward(ctx, torch.zeros_like(hx), dh, _dmean, _drstd)
        return grads[:3] + (None,) * (len(grads) - 3)
    if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
        return _double_backward(ctx, dout, dh, hx, y, gate, scale, weight, bias)
    nig = ctx.needs_input_grad
    needs = [nig[0], nig[1], nig[2], nig[3], nig[4], nig[5], nig[6]]
    dx, dy, dgate, dshift, dscale, dw, db = _adaln_bwd_call(
        dout, dh if ctx.gated else None, hx, y, gate, scale, weight, bias, mean, rstd,
        ctx.shift_shape, ctx.shift_dtype, needs, ctx.is_rms, ctx.backend)
    return (dx if nig[0] else None, dy if nig[1] else None, dgate if nig[2] else None,
            dshift if nig[3] else None, dscale if nig[4] else None, dw if nig[5] else None,
            db if nig[6] else None, None, None, None)


_adaln_fwd_call = eager_op(_adaln_fwd, _adaln_fwd_impl, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _resolve(x: Tensor, backend: Optional[str], op: str, tensors=()) -> str:
    name = resolve(backend, x.device, x.dtype, SUPPORTED_DTYPES, op, tensors)
    limit = MAX_C.get(name)
    if limit is not None and x.shape[2] > limit:
        if may_fall_back(backend):  # auto / context choice: fall back rather than fail
            return "reference"
        raise ValueError(f"{op}: backend {name!r} supports C <= {limit}, got C={x.shape[2]}")
    return name


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, *, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-6, norm: str = "layer",
                   backend: Optional[str] = None) -> Tensor:
    """``norm(x) * (1 + scale) + shift`` in one pass, statistics in fp32 (fp64 for fp64 x).

    Args:
        x: ``[B, N, C]`` (fp16/bf16/fp32, fp64 on ``cpu`` / ``reference``; any strides).
        shift, scale: ``[B, C]``, ``[B, 1, C]``, per-frame ``[B, F, C]`` (F divides N: each run
            of N/F consecutive tokens shares a row) or per-token ``[B, N, C]``; batch 1 (and
            ``[C]``) broadcasts. Each of dtype ``x.dtype`` or float32 (when they differ, the
            kernels take them all as float32, float64 for a float64 x). Strided views (the
            pieces of ``mod.chunk(6, -1)``) are read in place.
        weight, bias: optional ``[C]`` affine of the norm (LayerNorm as in CogVideoX), dtype
            ``x.dtype`` or float32.
        eps: added to the variance (layer) or mean square (rms); a Python float / int.
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).
        backend: ``None`` (current default, see ``vidgen_kernels.backends``) or a backend name.
    Returns:
        ``[B, N, C]`` contiguous, dtype of ``x``. Under ``torch.autocast`` for x's device the
        dtypes are promoted as eager arithmetic would (:func:`_autocast_promoted`), e.g. the bf16
        modulation of an autocast Linear with an fp32 x runs in fp32.
    """
    op = "adaln_modulate"
    x = _check_x("x", x, op)
    if autocast_dtype(x) is not None:
        x, _, (shift, scale, weight, bias) = _autocast_promoted(x, None, (shift, scale, weight, bias))
        with torch.autocast(x.device.type, enabled=False):
            return adaln_modulate(x, shift, scale, weight=weight, bias=bias, eps=eps, norm=norm,
                                  backend=backend)
    is_rms = _check_norm(norm, eps, op)
    shift3, scale3 = _canon_param("shift", shift, x, op), _canon_param("scale", scale, x, op)
    weight, bias = _check_affine("weight", weight, x, op), _check_affine("bias", bias, x, op)
    name = _resolve(x, backend, op, (x, shift3, scale3, weight, bias))
    if name == "reference":
        return _ref_modulate(x, shift3, scale3, weight, bias, eps, is_rms)
    shift3, scale3 = _one_param_dtype(x, shift3, scale3)
    out, _, _, _ = _adaln_fwd_call(x, None, None, shift3, scale3, weight, bias, float(eps),
                                   is_rms, name)
    return out


def gated_residual_adaln(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, *,
                         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                         eps: float = 1e-6, norm: str = "layer",
                         backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """The DiT sublayer boundary in one pass: ``h = x + gate * y``, ``out = norm(h) * (1 + scale)
    + shift``.

    Args:
        x, y: ``[B, N, C]`` residual stream and sublayer output (same dtype; any strides).
        gate, shift, scale: broadcast forms and dtypes as in :func:`adaln_modulate`.
        weight, bias, eps, norm, backend: as in :func:`adaln_modulate`.
    Returns:
        ``(h, out)``, both ``[B, N, C]`` contiguous in ``x.dtype``; ``h`` (rounded to ``x.dtype``)
        is the new residual stream and is what gets normalised. Under ``torch.autocast`` for x's
        device the dtypes are promoted as eager arithmetic would (:func:`_autocast_promoted`):
        a bf16 ``y`` with an fp32 ``x`` gives fp32 ``h`` and ``out``.
    """
    op = "gated_residual_adaln"
    x = _check_x("x", x, op)
    if autocast_dtype(x) is not None:
        x, y, (gate, shift, scale, weight, bias) = _autocast_promoted(
            x, y, (gate, shift, scale, weight, bias))
        with torch.autocast(x.device.type, enabled=False):
            return gated_residual_adaln(x, y, gate, shift, scale, weight=weight, bias=bias,
                                        eps=eps, norm=norm, backend=backend)
    _check_y(y, x, op)
    is_rms = _check_norm(norm, eps, op)
    gate3 = _canon_param("gate", gate, x, op)
    shift3, scale3 = _canon_param("shift", shift, x, op), _canon_param("scale", scale, x, op)
    weight, bias = _check_affine("weight", weight, x, op), _check_affine("bias", bias, x, op)
    name = _resolve(x, backend, op, (x, y, gate3, shift3, scale3, weight, bias))
    if name == "reference":
        h = _ref_gated(x, y, gate3)
        return h, _ref_modulate(h, shift3, scale3, weight, bias, eps, is_rms)
    gate3, shift3, scale3 = _one_param_dtype(x, gate3, shift3, scale3)
    out, h, _, _ = _adaln_fwd_call(x, y, gate3, shift3, scale3, weight, bias, float(eps),
                                   is_rms, name)
    return h, out


def _one_param_dtype(x: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
    """The modulation tensors (each already ``x.dtype`` or float32) in the one dtype the kernels
    take: as they are when they agree, else all cast to float32 (float64 for a float64 x), by
    differentiable casts (each gradient comes back in its own tensor's dtype). They are small
    ([B, C] / [B, F, C]); a per-token [B, N, C] one is copied, the price of the mixed choice."""
    if len({p.dtype for p in params}) == 1:
        return params
    dt = _acc_dtype(x.dtype)
    return tuple(p.to(dt) for p in params)


def _autocast_promoted(x: Tensor, y: Optional[Tensor], params: tuple) -> tuple:
    """``(x, y, params)`` with the dtypes eager type promotion would compute in, for the ops
    under ``torch.autocast`` (whose Linear layers hand bf16 modulation to an fp32 residual
    stream, where diffusers' and DiT's eager formulas promote):

    * ``x`` and ``y`` (when both given and different) to ``promote_types(x, y)``: a copy of an
      activation, as eager arithmetic would materialise;
    * each floating tensor of ``params`` (modulation / affine) whose dtype is neither x's (after
      the above) nor float32 to ``promote_types(p, x)``; float64 ones are left alone (as autocast
      leaves them), so the usual checks still report them.

    Differentiable casts (fp32 leaves get fp32 gradients); anything else is returned unchanged
    for the argument checks to report."""
    def floating(t) -> bool:
        return isinstance(t, Tensor) and t.is_floating_point()
    if floating(y) and y.dtype != x.dtype:
        dt = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dt), y.to(dt)
    keep = (x.dtype, torch.float32, torch.float64)
    return x, y, tuple(p.to(torch.promote_types(p.dtype, x.dtype))
                       if floating(p) and p.dtype not in keep else p for p in params)
