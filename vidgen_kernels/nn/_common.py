"""Pieces shared by the modules."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops._checks import NORMS, autocast_dtype


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
    from .adaln import HeadNorm  # (here: adaln imports this module's checks)
    if check_qk_norm(owner, kind) is None:
        return None, None
    return (HeadNorm(head_dim, kind, eps, backend=backend, **factory),
            HeadNorm(head_dim, kind, eps, backend=backend, **factory))


def check_tokens(owner: str, x, dim: int, layout: str, param: Tensor) -> None:
    """The ``x`` of an attention module's forward, checked before the projections run (which
    raised ``'list' object has no attribute 'dim'`` or torch's ``mat1 and mat2 must have the
    same dtype``): a floating tensor (TypeError, in the messages of ``ops._checks.check_qkv``),
    3-D ``[B, N, C]`` with ``C == dim`` (ValueError; ``layout`` describes it), and of the
    module's parameter dtype (``param``'s; TypeError, worded as ``vidgen.models``' input checks),
    except under ``torch.autocast`` for x's device, where the projections run in the autocast
    dtype and mixed dtypes are legal."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: x must be a floating tensor, got dtype {x.dtype}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{owner}: x must be {layout}, got shape {tuple(x.shape)}")
    check_param_dtype(owner, x, param)


def check_param_dtype(owner: str, x: Tensor, param: Tensor, name: str = "x") -> None:
    """A floating input ``name`` of the module's parameter dtype (``param``'s), except under
    ``torch.autocast`` for its device: a TypeError saying what to do (torch's own ``mat1 and
    mat2 must have the same dtype`` names neither the input nor the module)."""
    # (a quantized layer's integer weight takes floating x: no check against it)
    if param.is_floating_point() and x.dtype != param.dtype and autocast_dtype(x) is None:
        raise TypeError(f"{owner}: {name} has dtype {x.dtype} but the module's parameters are "
                        f"{param.dtype}: pass {name}.to({param.dtype}) or run the module under "
                        f"torch.autocast")


def in_recompute() -> bool:
    """Whether this eager forward runs inside a backward pass: an activation-checkpoint
    recompute of a forward that has already run (whose attributes it must not overwrite)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def check_cond(owner: str, c, linear, name: str) -> None:
    """A conditioning input ``name`` (``[..., in_features]``, e.g. AdaLN's ``c`` / ``temb``)
    before the modulation ``linear`` runs (torch's ``mat1 and mat2 shapes cannot be multiplied``
    or ``"silu_cpu" not implemented for 'Long'`` named neither the input nor the module): a
    floating tensor (TypeError) whose last dim is the Linear's ``in_features`` (ValueError), of
    its weight's dtype. A replaced ``linear`` (a LoRA wrapper) without ``in_features`` / a
    ``weight`` tensor is checked for what it has."""
    if not isinstance(c, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(c).__name__}")
    if not c.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating tensor, got dtype {c.dtype}")
    dim = getattr(linear, "in_features", None)
    if isinstance(dim, int) and (c.dim() < 1 or c.shape[-1] != dim):
        raise ValueError(f"{owner}: {name} must be [..., {dim}] (its last dim the module's "
                         f"conditioning width {dim}), got shape {tuple(c.shape)}")
    weight = getattr(linear, "weight", None)
    if isinstance(weight, Tensor):
        check_param_dtype(owner, c, weight, name)
