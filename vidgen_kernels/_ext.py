"""Loads the compiled extension ``vidgen_kernels._C`` if it was built.

Import never fails because of it: when the extension is missing, ``C`` is ``None`` and
``IMPORT_ERROR`` says why, so the pure-PyTorch and Triton paths stay usable.
"""
from __future__ import annotations

C = None
IMPORT_ERROR: str | None = None
import importlib
import importlib.util
import os

import torch  # noqa: F401  (the extension links against torch's libraries)


def missing_cpu_features(record: str, cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU features listed in ``record`` (the ``_C.cpu_features`` file the build writes: the
    features its ``-march`` flags let the compiler use) that the ``flags`` of ``cpuinfo`` lack.
    [] when either file is missing or unreadable (not Linux, an older build): nothing to check."""
    try:
        with open(record) as f:
            need = [w for line in f if not line.startswith("#") for w in line.split()]
        with open(cpuinfo) as f:
            have = next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), None)
    except OSError:
        return []
    return [] if have is None else [w for w in need if w not in have]


_spec = importlib.util.find_spec(f"{__package__}._C")
_record = os.path.join(os.path.dirname(_spec.origin), "_C.cpu_features") \
    if _spec is not None and _spec.origin else None
_skip = os.environ.get("VIDGEN_KERNELS_SKIP_CPU_CHECK", "") not in ("", "0")
_missing = missing_cpu_features(_record) if _record and not _skip else []
if _spec is None:
    IMPORT_ERROR = "vidgen_kernels._C was not built (pip install --no-build-isolation . builds it)"
elif _missing:  # loading it could already execute them (a SIGILL kills the process)
    IMPORT_ERROR = (f"vidgen_kernels._C was compiled for CPU features this CPU lacks "
                    f"({', '.join(_missing)}; the build's flags are in {_record}): rebuild it on "
                    f"this machine, or build a portable one, e.g. with "
                    f"VIDGEN_KERNELS_CPU_FLAGS=-march=x86-64-v3 (VIDGEN_KERNELS_SKIP_CPU_CHECK=1 "
                    f"loads it anyway)")
else:
    try:
        C = importlib.import_module(f"{__package__}._C")
    except ImportError as e:  # built against another torch, missing libgomp, ...
        IMPORT_ERROR = f"vidgen_kernels._C failed to load: {type(e).__name__}: {e}"


def has_cpu() -> bool:
    return C is not None


def has_cuda() -> bool:
    return C is not None and bool(getattr(C, "with_cuda", False))
