"""Argument checks shared by the attention ops: clear ``TypeError``/``ValueError`` messages that
name the argument, what it got and what was expected."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..backends import check_backend_name

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def autocast_dtype(t) -> Optional[torch.dtype]:
    """The autocast dtype when ``torch.autocast`` is on for tensor ``t``'s device, else None.

    The public ops then do what autocast does for the operands of GEMMs and SDPA: cast their
    floating tensor inputs to that dtype (differentiable casts: fp32 leaves get fp32 gradients)
    and run with autocast off, so that the result is exactly the op on the cast operands
    (autocast does not re-cast the reference paths' fp32 internals)."""
    if not isinstance(t, Tensor):
        return None
    dev = t.device.type
    if dev == "meta":  # autocast has no meta device (is_autocast_enabled raises for it)
        return None
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def check_flags(op: str, **flags) -> None:
    """Python bools only: a string such as ``"False"`` is truthy and would silently flip the
    flag."""
    for name, val in flags.items():
        if not isinstance(val, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(val).__name__} {val!r}")


def check_sizes(op: str, minimum: int = 1, **sizes) -> None:
    """Sizes: Python ints >= ``minimum`` (a negative or float size failed deep inside torch)."""
    for name, val in sizes.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < minimum:
            raise ValueError(f"{op}: {name} must be a Python int >= {minimum}, got {got_int(val)}")


def got_int(val) -> str:
    """What an int argument got, for its error message: the value, and its type when that is not
    int (``np.int64(2)`` alone reads as if the value were wrong, not its type)."""
    if isinstance(val, int) and not isinstance(val, bool):
        return repr(val)
    hint = " (a numpy / tensor integer: pass int(...))" if hasattr(val, "__index__") \
        and not isinstance(val, bool) else ""
    return f"{val!r} of type {type(val).__name__}{hint}"


NORMS = ("layer", "rms")


def check_eps(owner: str, eps, name: str = "eps") -> float:
    """A norm epsilon: a finite Python float / int >= 0 (a numpy or tensor scalar would be a
    guard torch.compile cannot trace). Modules check it where they are built, so that the error
    names the module, not the op of its first forward; the ops check it at each call."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"{owner}: {name} must be a finite Python float / int >= 0, got {eps!r} "
                         f"({type(eps).__name__})")
    return float(eps)


def check_norm_kind(owner: str, norm, name: str = "norm") -> str:
    """A normalisation kind: one of :data:`NORMS` (``"layer"`` or ``"rms"``)."""
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"{owner}: {name} must be one of {NORMS}, got {norm!r}")
    return norm


def check_backend_arg(owner: str, backend) -> None:
    """A module's ``backend=``: None (the package's selection) or one of the backend names,
    checked when the module is built rather than at its first forward."""
    check_backend_name(backend, f"{owner}: backend", allow_none=True)


def cast_floating(dtype: torch.dtype, *tensors):
    """The floating tensors among ``tensors`` cast to ``dtype`` as autocast casts an op's
    operands: float64 ones stay float64 (autocast leaves them alone too); anything else
    unchanged."""
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point()
                 and t.dtype not in (dtype, torch.float64) else t for t in tensors)


def check_qkv(q, k, v, layout: str, op: str) -> None:
    """q, k, v are float tensors of the rank of ``layout`` (e.g. ``"[B, S, H, D]"``), k and v of
    one shape, all of q's dtype and device."""
    rank = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating tensor, got dtype {t.dtype}")
        if t.dim() != rank:
            raise ValueError(f"{op}: {name} must be {layout} ({rank}-D), got shape "
                             f"{tuple(t.shape)} ({t.dim()}-D)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have one shape, got k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)}")


def softmax_scale_or_default(softmax_scale: Optional[float], D: int, op: str) -> float:
    """``softmax_scale`` as a float; ``1 / sqrt(D)`` when None."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not -math.inf < softmax_scale < math.inf:
        raise ValueError(f"{op}: softmax_scale must be a finite Python float / int or None, got "
                         f"{softmax_scale!r} ({type(softmax_scale).__name__})")
    return float(softmax_scale)
