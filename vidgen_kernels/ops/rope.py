"""Rotary-embedding conventions shared by the attention ops: the rotation written in PyTorch and
the canonicalisation of cos/sin tables.

Tables are ``[L, D/2]`` (one angle per rotation pair) or diffusers' ``[L, D]`` repeated layout
(each angle twice: ``repeat_interleave(2)`` for interleaved pairs, ``cat([f, f])`` for half-split).
Pairs are ``(x[2i], x[2i+1])`` when ``interleaved`` (GPT-J / CogVideoX / Wan / HunyuanVideo) and
``(x[i], x[i + D/2])`` otherwise (rotate_half / NeoX). Rotation of a pair ``(a, b)`` by angle
``t``: ``(a cos t - b sin t, b cos t + a sin t)``, i.e. diffusers' ``x * cos + rotate(x) * sin``.

Public (issue 3, bottom of this module):

* ``rope3d_freqs(frames, height, width, head_dim, *, theta, axes_dims, device) -> (cos, sin)``:
  ``[frames*height*width, D/2]`` float32 tables (diffusers' ``get_3d_rotary_pos_embed``), cached.
* ``apply_rope(x, cos, sin, *, interleaved=True, offset=0, backend=None)``: ``x [B, S, H, D]``
  rotated at positions ``offset .. offset + L - 1``, out of place; backends reference / cpu /
  cuda / triton through the custom op ``vidgen_kernels::rope_apply`` (kernel contract below),
  whose backward is the same op with ``conj`` flipped. ``apply_rope_reference``: the reference.
"""
from __future__ import annotations

import functools as _functools
import math
import operator as _operator
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from ._checks import check_sizes
from ._eager import _plain_eager, eager_op
from ..backends import may_fall_back, resolve as _resolve_backend


def canon_table(name: str, t, D: int, min_len: int, device, op: str, interleaved: bool,
                keep_fp64: bool = False) -> Tensor:
    """``[L, D/2]`` or ``[L, D]`` table -> ``[L, D/2]`` float32 contiguous on ``device``
    (float64 for a float64 table when ``keep_fp64``: fp64 inputs, whose backends compute in
    fp64).

    The tables are tiny (L * D/2 values); converting them is not a copy of activations.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {device}")
    # explicit == (not `in`): under torch.compile(dynamic=True) `in` on symbolic sizes is False
    if t.dim() != 2 or not (t.shape[1] == D // 2 or t.shape[1] == D):
        raise ValueError(f"{op}: {name} must be [L, D/2] = [L, {D // 2}] or [L, D] = [L, {D}], "
                         f"got shape {tuple(t.shape)}")
    if t.shape[0] < min_len:
        raise ValueError(f"{op}: {name} has {t.shape[0]} positions but {min_len} are needed")
    if t.shape[1] == D:
        check_repeated_layout(name, t[:min_len], D, interleaved, op)
        a, b = (t[:, ::2], t[:, 1::2]) if interleaved else (t[:, : D // 2], t[:, D // 2:])
        # a table that requires grad is read as the mean of its two (equal) copies, exactly the
        # same values, so each copy gets half the gradient and an optimizer step keeps the layout
        # (reading one copy left the other's gradient 0, and the next call's check failed)
        t = (a + b) * 0.5 if t.requires_grad else a
    dtype = torch.float64 if keep_fp64 and t.dtype == torch.float64 else torch.float32
    return t[:min_len].to(dtype).contiguous()


def check_repeated_layout(name: str, t: Tensor, D: int, interleaved: bool, op: str) -> None:
    """Raise ``ValueError`` when the ``[L, D]`` table ``t`` is not the repeated layout that
    ``interleaved`` names: ``t[:, 2i] == t[:, 2i+1]`` (``repeat_interleave(2)``) when interleaved,
    ``t[:, i] == t[:, i + D/2]`` (``cat([f, f])``) otherwise. Without it the other layout is
    read silently (wrong angles: every pair rotated by some other pair's angle).

    Checked on plain eager CPU tensors only, where reading the table is cheap and synchronous.
    On CUDA it would cost a host sync (or extra launches) per call, and under ``torch.compile``
    / ``torch.func`` / fake modes the values are not there: those calls trust the flag.
    NaN in both copies of an angle counts as equal (a NaN table stays the caller's business)."""
    if t.device.type != "cpu" or t.numel() == 0 or not _plain_eager((t,)):
        return
    a, b = (t[:, 0::2], t[:, 1::2]) if interleaved else (t[:, : D // 2], t[:, D // 2:])
    ne = a != b  # (the NaN-aware test only when something differs: one pass in the common case)
    if bool(ne.any()) and bool((ne & ~(a.isnan() & b.isnan())).any()):
        want, other = ((f"interleaved=True ({name}[:, 2i] == {name}[:, 2i+1], repeat_interleave(2))",
                        "a cat([f, f]) table is the half-split layout, interleaved=False")
                       if interleaved else
                       (f"interleaved=False ({name}[:, i] == {name}[:, i + D/2], cat([f, f]))",
                        "a repeat_interleave(2) table is the interleaved layout, interleaved=True"))
        raise ValueError(f"{op}: {name} is [L, D] = {tuple(t.shape)} but not the repeated layout "
                         f"of {want}; {other}. Pass the interleaved flag that matches the "
                         f"table, or the [L, D/2] table (one angle per rotation pair)")


def rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate ``x [..., L, D]`` by the ``[L, D/2]`` angles (fp32 math, result in x's dtype)."""
    xf = x if x.dtype == torch.float64 else x.float()
    c, s = cos.to(xf.dtype), sin.to(xf.dtype)
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2).to(x.dtype)
    h = x.shape[-1] // 2
    a, b = xf[..., :h], xf[..., h:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1).to(x.dtype)


def unrotate(g: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Gradient of :func:`rotate` (rotation by the negative angle)."""
    return rotate(g, cos, -sin, interleaved)


def table_grads(x: Tensor, gx: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, dim: int,
                offset: int) -> tuple[Tensor, Tensor]:
    """Gradients ``(dcos, dsin)`` ``[L, D/2]`` (fp32, fp64 for fp64 x) of a loss w.r.t. the
    tables that rotated ``x``'s positions ``offset .. offset + L - 1`` along ``dim`` (the last
    dim is D), given ``gx``, the loss's gradient w.r.t. the *unrotated* ``x`` (what the attention
    kernels' backward returns, ``R^T g`` per pair for ``R = [[c, -s], [s, c]]``). The gradient
    w.r.t. the rotated values is ``g = R gx / (c^2 + s^2)``: tables need not be a pure rotation
    (learned tables after an optimizer step, xPos-style scales), only ``c^2 + s^2 > 0`` (a pair
    with ``c = s = 0`` erases its input, ``gx`` holds nothing of ``g`` there, and its table
    gradient is returned as 0). Then, per pair ``(a, b) -> (a c - b s, b c + a s)``,
    ``dc = ga a + gb b`` and ``ds = gb a - ga b``, summed over every dim but ``dim`` and D.
    Plain PyTorch over x-sized fp32 temporaries: run only when a table requires grad."""
    L = cos.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c, s = cos.to(acc), sin.to(acc)
    xs = x.narrow(dim, offset, L).movedim(dim, -2).to(acc)
    gr = rotate(gx.narrow(dim, offset, L).movedim(dim, -2).to(acc), c, s, interleaved)
    n = c * c + s * s
    inv = torch.where(n > 0, 1 / n, torch.zeros_like(n))  # [L, D/2]
    if interleaved:
        a, b, ga, gb = xs[..., 0::2], xs[..., 1::2], gr[..., 0::2], gr[..., 1::2]
    else:
        h = x.shape[-1] // 2
        a, b, ga, gb = xs[..., :h], xs[..., h:], gr[..., :h], gr[..., h:]
    lead = tuple(range(xs.dim() - 2))
    return (ga * a + gb * b).sum(lead) * inv, (gb * a - ga * b).sum(lead) * inv


def check_rope_pair(cos, sin, op: str) -> Optional[tuple]:
    """``(cos, sin)``, or None for no tables; both or neither, and two tensors of one dtype and
    shape (one table in the ``[L, D/2]`` layout and the other ``[L, D]``, or two precisions, is a
    mistake in one of them)."""
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: cos and sin must be given together, got "
                         f"cos={'None' if cos is None else 'tensor'}, "
                         f"sin={'None' if sin is None else 'tensor'}")
    if isinstance(cos, Tensor) and isinstance(sin, Tensor):
        if cos.dtype != sin.dtype:
            raise TypeError(f"{op}: cos and sin must share one dtype, got cos {cos.dtype}, "
                            f"sin {sin.dtype}")
        if cos.shape != sin.shape:
            raise ValueError(f"{op}: cos and sin must have the same shape, got cos "
                             f"{tuple(cos.shape)}, sin {tuple(sin.shape)}")
    return None if cos is None else (cos, sin)


# ==============================================================================================
# rope3d_freqs and apply_rope (issue 3)
# ==============================================================================================
# Kernel contract (what ``cpu``, ``cuda``, ``triton`` and the ``torch`` oracle implement)
# ---------------------------------------------------------------------------------------
# ``rope(x, cos, sin, out, offset, interleaved, conj)``
#
# * ``x``: ``[B, S, H, D]``, any strides (0 and non-unit last strides included), dtype ``T``
#   (cpu: fp32/fp16/bf16/fp64; cuda, triton: fp32/fp16/bf16); ``D`` even.
# * ``cos``, ``sin``: ``[L, D/2]`` float32 contiguous (float64 when ``x`` is float64 and the
#   user's tables are: cpu and the oracle rotate with them exactly), ``0 <= offset``,
#   ``offset + L <= S``.
# * ``out``: ``[B, S, H, D]`` contiguous ``T``, not overlapping ``x``; every element is written.
# * ``out[b, s, h] = rot(x[b, s, h], s - offset)`` for ``offset <= s < offset + L``, else an exact
#   copy of ``x[b, s, h]`` (bit-identical). ``rot`` rotates each pair ``(a, b)`` (``(x[2i],
#   x[2i+1])`` interleaved, ``(x[i], x[i + D/2])`` half-split) by angle ``t`` with ``c = cos[., i]``,
#   ``s = sin[., i]`` (``s = -sin`` when ``conj``): ``(a c - b s, b c + a s)``, fp32 math (fp64 for
#   fp64 ``x``) with each product and the sum rounded (no FMA contraction), then rounded once to
#   ``T``: every backend equals the ``torch`` oracle bit for bit (NaN results aside: a NaN is a
#   NaN, its sign and payload bits may differ, as they do between torch's own CPU kernels).
#
# The backward of the op is the same kernel with ``conj`` flipped (rotation by the negative angle;
# untouched positions pass the gradient through).
ROPE_SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def default_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """CogVideoX's split of the head dim over (t, h, w): ``(D/4, 3D/8, 3D/8)``."""
    return head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3


def _canon_device(device) -> torch.device:
    if device is None:
        device = torch.device("cpu")
    else:
        try:  # (an int is a CUDA index, as for torch's factories)
            device = torch.device("cuda", device) if isinstance(device, int) and \
                not isinstance(device, bool) else torch.device(device)
        except (TypeError, RuntimeError) as e:  # torch's message names no argument
            raise (TypeError if isinstance(e, TypeError) else ValueError)(
                f"rope3d_freqs: device must be a torch.device, a device string such as "
                f"'cuda:0', or a CUDA index, got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():  # (torch raised AssertionError / RuntimeError)
            raise ValueError(f"rope3d_freqs: device {str(device)!r} but no CUDA GPU is available "
                             f"to this torch (torch.cuda.is_available() is False)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif not 0 <= device.index < torch.cuda.device_count():
            raise ValueError(f"rope3d_freqs: device {str(device)!r} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def check_theta(theta, op: str, name: str = "theta") -> None:
    """A RoPE base: a finite Python number > 0 (0, negative, NaN or inf give NaN tables)."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {theta!r}")


def tables_cacheable() -> bool:
    """Whether RoPE tables built now may be cached for later calls: not while ``torch.compile``
    / ``torch.export`` traces, nor under a fake or proxy dispatch mode (``FakeTensorMode``,
    ``make_fx``), whose tensors would be handed to every later eager call. Build cached tables
    under ``torch.inference_mode(False)``: a table first built inside ``inference_mode``
    (sampling) must not be an inference tensor, which a later training call could not save for
    backward."""
    if torch.compiler.is_compiling():
        return False
    get, key = torch._C._get_dispatch_mode, torch._C._TorchDispatchModeKey
    return get(key.FAKE) is None and get(key.PROXY) is None  # (a user's logging mode is fine)


@_functools.lru_cache(maxsize=64)
def _rope3d_freqs_cached(frames: int, height: int, width: int, axes: tuple[int, int, int],
                         theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    grids = (frames, height, width)
    angles = []
    for n, dim in zip(grids, axes):
        # theta^(-2i/dim) per axis (diffusers get_1d_rotary_pos_embed), in float64
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles.append(torch.outer(torch.arange(n, dtype=torch.float64), inv))  # [n, dim/2]
    at, ah, aw = angles
    F_, H_, W_ = grids
    ang = torch.cat([at[:, None, None, :].expand(F_, H_, W_, -1),
                     ah[None, :, None, :].expand(F_, H_, W_, -1),
                     aw[None, None, :, :].expand(F_, H_, W_, -1)], dim=-1)
    ang = ang.reshape(F_ * H_ * W_, -1)
    return (ang.cos().to(torch.float32).to(device).contiguous(),
            ang.sin().to(torch.float32).to(device).contiguous())


def rope3d_freqs(frames: int, height: int, width: int, head_dim: int, *, theta: float = 10000.0,
                 axes_dims=None, device=None) -> tuple[Tensor, Tensor]:
    """3D RoPE tables of a ``frames x height x width`` latent grid (diffusers'
    ``get_3d_rotary_pos_embed`` in the ``[L, D/2]`` layout).

    Args:
        frames, height, width: grid sizes (``frames=1``: 2D; ``height=width=1``: 1D over frames).
        head_dim: ``D`` (even).
        theta: RoPE base.
        axes_dims: ``(d_t, d_h, d_w)``, each even, summing to ``D``; default CogVideoX's
            ``(D/4, 3D/8, 3D/8)``. Axis ``a`` uses frequencies ``theta^(-2i/d_a)``; the pairs are
            laid out ``[t | h | w]``.
        device: where the tables live (default CPU).
    Returns:
        ``(cos, sin)``, each ``[frames*height*width, D/2]`` float32, one angle per rotation pair,
        positions frame-major (t, then h, then w). Expand to diffusers' ``[L, D]`` layout with
        ``repeat_interleave(2, -1)`` (interleaved pairs).

    The tables are cached per ``(grid, dims, theta, device)``: repeated calls return the SAME
    tensors (ordinary tensors, also when first built under ``torch.inference_mode``; threads
    racing on a key's first call may each get their own equal copy). Do not
    modify them in place (``.clone()`` first if you need to). Under ``torch.compile`` /
    ``torch.export`` or a dispatch mode (``FakeTensorMode``, ``make_fx``) they are computed
    there, not cached.
    """
    op = "rope3d_freqs"
    check_sizes(op, frames=frames, height=height, width=width)
    check_sizes(op, minimum=2, head_dim=head_dim)
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim must be even, got {head_dim}")
    check_theta(theta, op)
    if axes_dims is None:
        axes = default_axes_dims(head_dim)
        if sum(axes) != head_dim or any(a % 2 for a in axes):
            raise ValueError(f"{op}: the default axes_dims (D/4, 3D/8, 3D/8) = {axes} do not split "
                             f"head_dim={head_dim} into even parts; pass axes_dims explicitly")
    else:
        try:  # ints only (numpy / torch integers too): 8.7 or "8" is not silently truncated
            axes = tuple(_operator.index(a) for a in axes_dims if not isinstance(a, bool))
            if len(axes) != len(axes_dims):
                raise TypeError
        except TypeError:
            raise ValueError(f"{op}: axes_dims must be 3 even ints summing to head_dim={head_dim}, "
                             f"got {axes_dims!r}") from None
        if len(axes) != 3 or any(a < 0 or a % 2 for a in axes) or sum(axes) != head_dim:
            raise ValueError(f"{op}: axes_dims must be 3 even ints >= 0 summing to "
                             f"head_dim={head_dim}, got {tuple(axes_dims)}")
    args = (frames, height, width, axes, float(theta), _canon_device(device))
    if not tables_cacheable():  # traced: computed inside the graph / the mode, never cached
        return _rope3d_freqs_cached.__wrapped__(*args)
    with torch.inference_mode(False):
        return _rope3d_freqs_cached(*args)


# ----------------------------------------------------------------------------------------------
# apply_rope: checks, reference, kernel contract oracle, custom op
# ----------------------------------------------------------------------------------------------
def _check_apply_args(x, cos, sin, interleaved, offset, op: str):
    """Validate; returns ``(cos, sin)`` canonical ``[L, D/2]`` float32 contiguous (float64 for
    float64 tables with a float64 x; differentiable views / copies of the given tables)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be a floating tensor (float16/bfloat16/float32/float64), "
                        f"got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [B, S, H, D], got shape {tuple(x.shape)} ({x.dim()}-D)")
    B, S, H, D = x.shape
    if D == 0 or D % 2:
        raise ValueError(f"{op}: head dim D of x must be even and >= 2, got shape {tuple(x.shape)}")
    check_sizes(op, 0, offset=offset)
    if not isinstance(interleaved, bool):
        raise TypeError(f"{op}: interleaved must be a bool, got {type(interleaved).__name__}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    check_rope_pair(cos, sin, op)
    L = cos.shape[0] if cos.dim() >= 1 else 0
    if cos.dim() == 2 and L > S - offset:
        # (ints: a symbolic size in an f-string hid this message under torch.compile(dynamic);
        # so did a tuple in it on torch 2.11: the shape is formatted element by element)
        raise ValueError(f"{op}: the tables have {int(L)} positions but x has only S - offset = "
                         f"{int(S)} - {int(offset)} = {int(S - offset)} positions from offset on "
                         f"(x shape ({int(B)}, {int(S)}, {int(H)}, {int(D)}))")
    fp64 = x.dtype == torch.float64  # fp64 x computes in fp64: keep fp64 tables exact
    c = canon_table("cos", cos, D, L, x.device, op, interleaved, fp64)
    s = canon_table("sin", sin, D, L, x.device, op, interleaved, fp64)
    return c, s


def _ref_apply(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, offset: int) -> Tensor:
    L = cos.shape[0]
    S = x.shape[1]
    mid = rotate(x[:, offset:offset + L], cos[:, None, :], sin[:, None, :], interleaved)
    if L == S:
        return mid.contiguous()
    return torch.cat([x[:, :offset], mid, x[:, offset + L:]], dim=1)


def apply_rope_reference(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = True,
                         offset: int = 0) -> Tensor:
    """PyTorch reference of :func:`apply_rope` (fp32 math, fp64 for fp64 ``x``)."""
    c, s = _check_apply_args(x, cos, sin, interleaved, offset, "apply_rope_reference")
    return _ref_apply(x, c, s, interleaved, offset)


def rope_kernel_torch(x, cos, sin, out, offset, interleaved, conj):
    """The kernel contract (above) in PyTorch; fills ``out``."""
    out.copy_(x)
    L = cos.shape[0]
    if L:
        out[:, offset:offset + L] = rotate(x[:, offset:offset + L], cos[:, None, :],
                                           (-sin if conj else sin)[:, None, :], interleaved)


def _rope_kernel(backend: str):
    if backend == "cpu":
        return _ext.C.rope_cpu
    if backend == "cuda":
        def k(x, *args):
            _ext.C.rope_cuda(x, *args, torch.cuda.current_stream(x.device).cuda_stream)
        return k
    if backend == "triton":
        from ..triton_kernels import rope as tk
        return tk.rope
    if backend == "torch":
        return rope_kernel_torch
    raise ValueError(f"unknown kernel backend {backend!r}")


def _rope_apply_impl(x: Tensor, cos: Tensor, sin: Tensor, offset: int, interleaved: bool,
                     conj: bool, backend: str) -> Tensor:
    """Out-of-place rotation (kernel contract above); returns ``[B, S, H, D]`` contiguous."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        _rope_kernel(backend)(x, cos, sin, out, int(offset), bool(interleaved), bool(conj))
    return out


_rope_apply = torch.library.custom_op("vidgen_kernels::rope_apply",
                                      mutates_args=())(_rope_apply_impl)


@_rope_apply.register_fake
def _(x, cos, sin, offset, interleaved, conj, backend):
    return x.new_empty(x.shape)


def _rope_setup_context(ctx, inputs, output):
    x, cos, sin, offset, interleaved, conj, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.args = (offset, interleaved, conj, backend)


def _rope_backward(ctx, dout):
    cos, sin = ctx.saved_tensors
    offset, interleaved, conj, backend = ctx.args
    dx = _rope_apply_call(dout, cos, sin, offset, interleaved, not conj, backend)
    return dx, None, None, None, None, None, None


_rope_apply_call = eager_op(_rope_apply, _rope_apply_impl, _rope_setup_context, _rope_backward)


def _resolve_rope(backend: Optional[str], x: Tensor, op: str, tensors=()) -> str:
    name = _resolve_backend(backend, x.device, x.dtype, ROPE_SUPPORTED_DTYPES, op, tensors)
    symbol = {"cpu": "rope_cpu", "cuda": "rope_cuda"}.get(name)
    if symbol is not None and not hasattr(_ext.C, symbol):  # an extension built before RoPE
        if may_fall_back(backend):
            return "reference"
        from ..backends import BackendUnavailableError
        raise BackendUnavailableError(f"{op}: backend {name!r} cannot run here: the compiled "
                                      f"extension has no {symbol} (rebuild it)")
    return name


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = True, offset: int = 0,
               backend: Optional[str] = None) -> Tensor:
    """Rotary embedding of ``x`` at positions ``offset .. offset + L - 1``, out of place.

    Args:
        x: ``[B, S, H, D]`` (fp16/bf16/fp32/fp64; any strides, e.g. ``qkv[:, :, 1]`` of a fused
            ``[B, S, 3, H, D]`` projection or ``[B, H, S, D]`` transposed). ``D`` even.
        cos, sin: ``[L, D/2]`` (one angle per pair, e.g. :func:`rope3d_freqs`) or diffusers'
            ``[L, D]`` repeated layout; same shape, dtype and device as each other, ``x``'s
            device; ``L <= S - offset``. Tables that require grad (learned frequencies) get
            their gradient: such calls run the PyTorch reference (the kernels take the tables
            as constants).
        interleaved: pairs ``(x[2i], x[2i+1])`` (CogVideoX / Wan / HunyuanVideo) if True, else
            ``(x[i], x[i + D/2])`` (rotate_half).
        offset: first rotated position (e.g. the text length when text comes first); positions
            outside ``offset .. offset + L - 1`` (a text prefix or suffix) are copied unchanged.
        backend: ``None`` (current default) or a backend name (see ``vidgen_kernels.backends``).
    Returns:
        ``[B, S, H, D]`` contiguous, dtype of ``x``; differentiable w.r.t. ``x`` (and the tables
        where they require grad).
    """
    op = "apply_rope"
    c, s = _check_apply_args(x, cos, sin, interleaved, offset, op)
    name = _resolve_rope(backend, x, op, (x, c, s))
    if name == "reference" or (torch.is_grad_enabled() and (c.requires_grad or s.requires_grad)):
        return _ref_apply(x, c, s, interleaved, offset)
    return _rope_apply_call(x, c, s, offset, interleaved, False, name)
