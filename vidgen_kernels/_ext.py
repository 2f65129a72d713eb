"""Loads the compiled extension ``vidgen_kernels._C`` if it was built.

Import never fails because of it: when the extension is missing, ``C`` is ``None`` and
``IMPORT_ERROR`` says why, so the pure-PyTorch and Triton paths stay usable.
"""
from __future__ import annotations

C = None
IMPORT_ERROR: str | None = None
import importlib
import importlib.util

import torch  # noqa: F401  (the extension links against torch's libraries)

if importlib.util.find_spec(f"{__package__}._C") is None:
    IMPORT_ERROR = "vidgen_kernels._C was not built (pip install --no-build-isolation . builds it)"
else:
    try:
        C = importlib.import_module(f"{__package__}._C")
    except ImportError as e:  # built against another torch, missing libgomp, ...
        IMPORT_ERROR = f"vidgen_kernels._C failed to load: {type(e).__name__}: {e}"


def has_cpu() -> bool:
    return C is not None


def has_cuda() -> bool:
    return C is not None and bool(getattr(C, "with_cuda", False))
