"""vidgen-kernels: fused kernels for video diffusion transformers.

Public API::

    adaln_modulate(x, shift, scale, *, weight=None, bias=None, eps=1e-6, norm="layer")
    gated_residual_adaln(x, y, gate, shift, scale, *, ...) -> (h, out)
    use_backend(name)            # context manager
    available_backends(device=None)
    vidgen_kernels.nn.AdaLNZero, vidgen_kernels.nn.LayerNormZero

``python -m vidgen_kernels`` prints which backends this install has.
"""
from . import _ext
from .backends import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    current_backend,
    use_backend,
)
from .ops.adaln import (
    adaln_modulate,
    adaln_modulate_reference,
    gated_residual_adaln,
    gated_residual_adaln_reference,
)
from . import nn  # noqa: E402  (modules use the functions above)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "adaln_modulate",
    "adaln_modulate_reference",
    "available_backends",
    "current_backend",
    "gated_residual_adaln",
    "gated_residual_adaln_reference",
    "nn",
    "use_backend",
]


def extension_status() -> str:
    """One line on the compiled extension: built (with or without CUDA) or why not."""
    if _ext.C is None:
        return f"compiled extension not built ({_ext.IMPORT_ERROR}); pure-PyTorch and Triton paths only"
    return "compiled extension built: cpu kernels" + (" + cuda kernels" if _ext.has_cuda() else "")
