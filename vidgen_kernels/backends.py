"""The one place where a kernel backend is chosen.

Backends:

============  ==========================================  =============================
name          what                                        runs on
============  ==========================================  =============================
reference     pure PyTorch (autograd, torch.compile-able)  any device, any float dtype
cpu           C++ kernels (OpenMP, vectorised)            CPU tensors
cuda          CUDA C++ kernels                            CUDA tensors
triton        Triton kernels                              CUDA tensors (CPU tensors only
                                                          under ``TRITON_INTERPRET=1``)
============  ==========================================  =============================

Selection, highest priority first: the per-call ``backend=`` argument, the innermost
``use_backend(...)`` context, the ``VIDGEN_KERNELS_BACKEND`` environment variable, ``"auto"``.
``auto`` picks the fastest usable backend for the tensors' device and dtype (see ``AUTO_ORDER``).

The kernels have a backward but no forward-mode derivative, and ``torch.library`` custom ops do
not run under ``torch.func.grad`` / ``vjp`` / ``jacrev``: where an op's inputs are under forward-mode
AD (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad`` dual tensors) or a
``torch.func`` gradient transform, ``auto`` takes ``reference`` (plain PyTorch, which every
transform follows exactly) and a named kernel backend raises ``BackendUnavailableError``
(``torch.func.vmap`` alone stays on the kernels). See :func:`autodiff_transform`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Iterator

import torch
import torch.autograd.forward_ad as _fwAD

from . import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")
CHOICES = ("auto",) + BACKENDS

# Preference of ``auto`` per device type. Kernel backends come first; ``reference`` is the fallback.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run these tensors here (the message says why)."""


class _Local(threading.local):
    """Per-thread state; ``__init__`` runs in each thread at its first access, so reading the
    stack never creates it: a lazy ``if not hasattr(...): create`` traced by torch.compile was a
    side effect and a guard that failed on the next call (one recompile in a fresh thread)."""

    def __init__(self):
        self.stack: list[tuple[str]] = []


_local = _Local()


def _stack() -> list[tuple[str]]:
    return _local.stack


def check_backend_name(name, what: str = "backend", *, allow_none: bool = False):
    """``name`` if it is one of :data:`CHOICES` (or ``None`` with ``allow_none``), else a
    ``ValueError`` that starts with ``what`` (the argument, or the module that takes it). The one
    check of backend names: ops, ``use_backend``, the environment variable, modules and model
    configs all call it."""
    if name is None and allow_none:
        return None
    if not isinstance(name, str) or name not in CHOICES:
        either = "None or " if allow_none else ""
        raise ValueError(f"{what} must be {either}one of {CHOICES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ops called inside use backend ``name`` unless a call passes ``backend=``.

    The choice is per thread (each thread has its own), not per asyncio task: tasks of one
    event loop that enter different backends concurrently see each other's. Contexts exited out
    of order (a generator finalised late) each remove their own entry.

    >>> with vidgen_kernels.use_backend("reference"):
    ...     out = vidgen_kernels.adaln_modulate(x, shift, scale)
    """
    check_backend_name(name, "use_backend(name)")
    entry = (name,)  # a fresh tuple: this context's own entry, removed by identity on exit
    _stack().append(entry)
    try:
        yield
    finally:
        st = _stack()
        for i in range(len(st) - 1, -1, -1):  # the top one, unless contexts exit out of order
            if st[i] is entry:
                del st[i]
                break


def current_backend() -> str:
    """The backend in force when no ``backend=`` is passed: context, then env var, then ``auto``."""
    st = _stack()
    if st:
        return st[-1][0]
    env = os.environ.get("VIDGEN_KERNELS_BACKEND", "")
    if env:
        return check_backend_name(env, "environment variable VIDGEN_KERNELS_BACKEND")
    return "auto"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once, at import: the backend checks run inside torch.compile'd code, and torch 2.11's
# dynamo refuses to trace importlib.util.find_spec (it reached it through an lru_cache wrapper,
# which 2.11 traces into: every fullgraph compile of a fused op failed there).
HAS_TRITON = importlib.util.find_spec("triton") is not None


def why_unavailable(name: str, device: torch.device | str | None = None) -> str | None:
    """``None`` if backend ``name`` can run on ``device`` here, else the reason in words
    (``"auto"`` always can: it falls back to ``reference``)."""
    device = torch.device(device) if device is not None else None
    dev_type = device.type if device is not None else None
    if name == "reference":
        return None
    if name == "cpu":
        if not _ext.has_cpu():
            return f"the compiled extension vidgen_kernels._C is not loaded ({_ext.IMPORT_ERROR})"
        if dev_type not in (None, "cpu"):
            return f"backend 'cpu' runs CPU tensors, got tensors on {device}"
        return None
    if name == "cuda":
        if not _ext.has_cpu():
            return f"the compiled extension vidgen_kernels._C is not loaded ({_ext.IMPORT_ERROR})"
        if not _ext.has_cuda():
            return ("the extension was built without CUDA kernels (torch without CUDA, no nvcc, "
                    "or VIDGEN_KERNELS_BUILD_CUDA=0)")
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        if dev_type not in (None, "cuda"):
            return f"backend 'cuda' runs CUDA tensors, got tensors on {device}"
        return _cuda_image_error(device)
    return _why_unavailable_triton(name, dev_type, device)


_CUDA_IMAGE_ERRORS: dict[int, str | None] = {}


def _cuda_image_error(device: torch.device | None) -> str | None:
    """Why this build's CUDA kernels cannot run on ``device`` (None: they can), once per device:
    a build for sm_80 / sm_90 (+PTX) has no code a V100 or T4 can load, and its launches would
    fail with cudaErrorNoKernelImageForDevice; ``auto`` then takes the next backend."""
    return _cuda_image_error_at(device.index if device is not None else None)


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo``, which
    that call does and which adds ~1 s to ``import vidgen_kernels``: the same marking, which
    dynamo reads when it traces a call of ``fn`` (test_package pins it to torch's own)."""
    fn._dynamo_marked_constant = True
    return fn


# A constant to torch.compile: dynamo runs it once while tracing and folds the answer into the
# graph (no graph break under fullgraph=True), so a model whose first call is compiled still
# learns that a T4 / V100 cannot run this build's kernels. Dynamo guards nothing here, so the
# answer may depend only on the argument: for no device index (``"cuda"``) it is that of every
# visible GPU (the first that cannot run the kernels), never the current device at trace time.
@_assume_constant_result
def _cuda_image_error_at(known: int | None) -> str | None:
    return _first_gpu_error(_cuda_image_error_on, known)


def _first_gpu_error(check, known: int | None) -> str | None:
    """``check(known)``; for no index, the first visible GPU's non-None answer."""
    if known is None:
        return next((why for why in map(check, range(torch.cuda.device_count())) if why is not None),
                    None)
    return check(known)


def _cuda_image_error_on(index: int) -> str | None:
    if index not in _CUDA_IMAGE_ERRORS:
        check = getattr(_ext.C, "cuda_kernel_image_error", None)
        err = check(index) if check is not None else ""
        why = None
        if err:
            major, minor = torch.cuda.get_device_capability(index)
            why = (f"the extension's CUDA kernels cannot run on {torch.cuda.get_device_name(index)} "
                   f"(cuda:{index}, sm_{major}{minor}): {err}; rebuild with TORCH_CUDA_ARCH_LIST "
                   f"including {major}.{minor}")
        _CUDA_IMAGE_ERRORS[index] = why
    return _CUDA_IMAGE_ERRORS[index]


# Triton (>= 3.3) supports NVIDIA GPUs of compute capability 8.0 and newer. On older ones (T4,
# V100) it compiles tl.dot without tensor cores, and their 64-96 KiB of shared memory per block
# do not hold the attention kernels' tiles (ahead-of-time sm_75 builds: the RoPE-3D attention
# needs 72-96 KiB already at head_dim 64 in 16 bits, one pipeline stage).
TRITON_MIN_CAPABILITY = (8, 0)


def _triton_arch_error(device: torch.device | None) -> str | None:
    """Why the Triton kernels do not run on ``device``'s GPU (None: they do)."""
    return _triton_arch_error_at(device.index if device is not None else None)


@_assume_constant_result  # folded into compiled graphs, as _cuda_image_error_at
def _triton_arch_error_at(known: int | None) -> str | None:
    return _first_gpu_error(_triton_arch_error_on, known)


_TRITON_ARCH_ERRORS: dict[int, str | None] = {}


def _triton_arch_error_on(index: int) -> str | None:
    if index not in _TRITON_ARCH_ERRORS:
        cap = tuple(torch.cuda.get_device_capability(index))
        _TRITON_ARCH_ERRORS[index] = None if cap >= TRITON_MIN_CAPABILITY else (
            f"Triton supports compute capability >= {TRITON_MIN_CAPABILITY[0]}."
            f"{TRITON_MIN_CAPABILITY[1]}, {torch.cuda.get_device_name(index)} (cuda:{index}) is "
            f"sm_{cap[0]}{cap[1]}: no tensor cores for tl.dot there and too little shared memory "
            f"per block for the attention tiles")
    return _TRITON_ARCH_ERRORS[index]


def shared_memory_per_block(device: torch.device | None) -> int:
    """The most shared memory one thread block may use (opt-in) on ``device``'s GPU, in bytes;
    with no device index, the least over the visible GPUs. What Triton's launch checks a build
    against (``OutOfResources``); launchers whose tiles are sized by it ask here, outside their
    custom op, so that the answer is a constant in compiled graphs."""
    return _shared_memory_at(device.index if device is not None else None)


@_assume_constant_result
def _shared_memory_at(known: int | None) -> int:
    return min(map(_shared_memory_on, range(torch.cuda.device_count()) if known is None else (known,)),
               default=0)


_SHARED_MEMORY: dict[int, int] = {}


def _shared_memory_on(index: int) -> int:
    if index not in _SHARED_MEMORY:
        props = torch.cuda.get_device_properties(index)
        _SHARED_MEMORY[index] = int(getattr(props, "shared_memory_per_block_optin",
                                            props.shared_memory_per_block))
    return _SHARED_MEMORY[index]


def _why_unavailable_triton(name: str, dev_type, device) -> str | None:
    if name == "triton":
        if not HAS_TRITON:
            return "triton is not installed (pip install triton)"
        if dev_type == "cpu" or (dev_type is None and not torch.cuda.is_available()):
            if not triton_interpret():
                return ("Triton kernels run on CPU tensors only under the interpreter: "
                        "set TRITON_INTERPRET=1 before importing triton")
            return None
        if dev_type not in (None, "cuda"):
            return f"backend 'triton' runs CUDA tensors, got tensors on {device}"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        return _triton_arch_error(device)
    check_backend_name(name, "why_unavailable(name)")
    return None  # "auto": always runs (it falls back to "reference")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable here (for ``device`` if given), in ``BACKENDS`` order."""
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


try:  # private API; where a torch lacks it, any active torch.func transform counts
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _interpreters
    _KERNEL_FREE_TRANSFORMS = {
        torch._C._functorch.TransformType.Grad: "a torch.func gradient transform (grad / vjp / "
                                                "jacrev)",
        torch._C._functorch.TransformType.Jvp: "forward-mode AD (torch.func.jvp / jacfwd)"}
except (ImportError, AttributeError):  # pragma: no cover
    _interpreters, _KERNEL_FREE_TRANSFORMS = None, {}


_FORWARD_AD = "forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad)"
_FUNC_TRANSFORM = "a torch.func transform"  # compiled: dynamo cannot tell grad from vmap


def forward_ad_active() -> bool:
    """Inside a forward-mode AD dual level (``torch.func.jvp`` makes one)."""
    return getattr(_fwAD, "_current_level", 0) >= 0  # (unknown: assume so)


def _only_jvp_transform() -> bool:
    """The torch.func stack is one ``jvp`` and nothing else (no vmap / grad around or inside)."""
    if _interpreters is None:
        return False
    keys = [i.key() for i in _interpreters()]
    return keys == [torch._C._functorch.TransformType.Jvp]


def autodiff_transform(tensors, forward_ad: bool = False) -> str | None:
    """The autodiff, in words, that the kernels cannot follow and that applies to ``tensors``
    (an op's tensor inputs; ``None`` entries allowed), or ``None``.

    That is forward-mode AD (``torch.func.jvp`` / ``jacfwd``, or a ``torch.autograd.forward_ad``
    dual tensor among ``tensors``) or a ``torch.func`` gradient transform (``grad``, ``vjp``,
    ``jacrev``, ``hessian``). Under these the custom ops would silently drop the tangent (the
    result of ``jvp`` would be zero) or raise from inside PyTorch, so ``auto`` takes the
    ``reference`` path instead. Reverse-mode ``.backward()`` / ``torch.autograd.grad`` (also
    ``create_graph=True``), ``vmap`` and ``torch.export`` are not affected. Inside
    ``torch.compile`` only the transforms' presence is visible: there any ``torch.func``
    transform (``vmap`` included) counts. Costs about a microsecond when none applies.

    ``forward_ad=True`` (an op with its own forward-mode derivative: ``rope3d_attention``,
    ``moe_ffn``):
    eager forward-mode AD alone (one ``torch.func.jvp``, or a dual level without ``torch.func``)
    does not count; jvp combined with another transform (``jacfwd`` = vmap of jvp, jvp of jvp,
    hessian) and compiled jvp still do.
    """
    compiling = torch.compiler.is_compiling()
    functorch = torch._C._are_functorch_transforms_active()
    if forward_ad_active():  # inside a dual level (torch.func.jvp makes one)
        if forward_ad and not compiling and (not functorch or _only_jvp_transform()):
            return None
        if compiling or functorch:  # (unpack_dual has no batching rule under vmap)
            return _FORWARD_AD
        for t in tensors:
            if isinstance(t, torch.Tensor) and _fwAD.unpack_dual(t).tangent is not None:
                return _FORWARD_AD
    if functorch:
        if compiling or _interpreters is None:
            return _FUNC_TRANSFORM
        for interp in _interpreters():
            what = _KERNEL_FREE_TRANSFORMS.get(interp.key())
            if what is not None:
                return what
    return None  # vmap alone: the custom ops run under it


def may_fall_back(backend: str | None) -> bool:
    """Whether an op whose resolved kernel backend cannot take this call's size (a head_dim,
    T_k or C beyond the kernel's limit) runs ``reference`` instead of raising: yes when the
    caller named no backend (``None``: ``auto`` or a context / environment choice) or ``"auto"``;
    no for a backend named in the call."""
    return backend is None or backend == "auto"


def _why_with_needs(name: str, device: torch.device, needs: dict | None) -> str | None:
    """:func:`why_unavailable` of ``name``, and of every backend its implementation of the op
    also runs (``needs[name]``: the MoE's ``cuda`` backend runs Triton's grouped GEMMs)."""
    why = why_unavailable(name, device)
    if why is None and needs:
        for dep in needs.get(name, ()):
            dep_why = why_unavailable(dep, device)
            if dep_why is not None:
                return f"its {dep} kernels cannot run: {dep_why}"
    return why


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype,
            supported_dtypes: dict[str, tuple[torch.dtype, ...]], op: str,
            tensors=(), forward_ad: bool = False, needs: dict | None = None) -> str:
    """Turn ``backend`` (``None`` = current default) into a concrete backend for ``op``.

    ``supported_dtypes`` maps each kernel backend the op has to the dtypes it takes; ``tensors``
    are the op's tensor inputs (see :func:`autodiff_transform`: ``auto`` takes ``reference``
    under forward-mode AD or a ``torch.func`` gradient transform; ``forward_ad``: the op has
    its own forward-mode derivative, see there); ``needs`` maps a backend to the other backends
    the op's implementation on it also runs (it is available only where they all are).
    Raises ``BackendUnavailableError`` when an explicitly requested backend cannot run.
    """
    name = current_backend() if backend is None else check_backend_name(backend, f"{op}(backend=)")
    transform = autodiff_transform(tensors, forward_ad) if name != "reference" else None
    if transform is not None:
        if name == "auto":
            return "reference"
        if transform != _FUNC_TRANSFORM:  # (compiled, that may be vmap, which runs the kernels)
            why = ("the kernels have no forward-mode derivative" if "forward" in transform else
                   "torch.library custom ops do not run under torch.func gradient transforms")
            raise BackendUnavailableError(
                f"{op}: backend {name!r} cannot run under {transform}: {why}; use backend "
                "'auto' or 'reference' (plain PyTorch, exact under every transform)")
    if name == "auto":
        for cand in AUTO_ORDER.get(device.type, ("reference",)):
            if cand == "reference":
                return cand
            if cand in supported_dtypes and dtype in supported_dtypes[cand] \
                    and _why_with_needs(cand, device, needs) is None:
                return cand
        return "reference"
    if name == "reference":
        return name
    if name not in supported_dtypes:
        raise BackendUnavailableError(f"{op}: backend {name!r} has no implementation of this op")
    why = _why_with_needs(name, device, needs)
    if why is not None:
        raise BackendUnavailableError(f"{op}: backend {name!r} cannot run here: {why}")
    if dtype not in supported_dtypes[name]:
        raise BackendUnavailableError(
            f"{op}: backend {name!r} does not support dtype {dtype}; it supports "
            f"{[str(d) for d in supported_dtypes[name]]}")
    return name
