"""Launch helpers shared by the Triton launchers: the device a launch runs on, the GPU
architecture it compiles for (to pick tile sizes per architecture) and a launch that falls back
to fewer pipeline stages when a build does not fit the GPU's shared memory."""
from __future__ import annotations

import contextlib
import functools

import torch
from triton.runtime.errors import OutOfResources


def device_ctx(t: torch.Tensor):
    """Context that makes ``t``'s GPU the current device for a launch. Triton launches on the
    current device and its current stream, not on the device of the pointers it is given: a
    tensor on ``cuda:1`` launched while ``cuda:0`` is current would run on the wrong GPU (an
    illegal memory access without peer access). Every launcher enters it around its launches."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def target_arch(t: torch.Tensor) -> int:
    """Compute capability as ``10 * major + minor`` (80 = A100, 90 = H100 / H200) of ``t``'s GPU.

    For a tensor that is not on a CUDA device (``aot_check``'s ahead-of-time builds, where a
    stand-in driver names the target) it is the target of Triton's active driver, and 90 when
    there is none (the interpreter, whose launchers use their own tiles anyway)."""
    if t.is_cuda:
        index = t.device.index
        return _cuda_arch(torch.cuda.current_device() if index is None else index)
    try:
        from triton.runtime import driver
        return int(driver.active.get_current_target().arch)
    except Exception:  # noqa: BLE001 - no driver (CPU-only triton): the default tiles
        return 90


def mma_sync_arch(arch: int) -> bool:
    """Whether Triton's dots on ``arch`` (``10 * major + minor``) are Ampere-style ``mma.sync``
    (sm_80 - sm_89 and the consumer Blackwell sm_120 / sm_121), not Hopper's wgmma (sm_90) or
    datacenter Blackwell's tcgen05 (sm_100 / sm_103): tiles tuned for one spill on the other."""
    return arch < 90 or arch >= 120


def target_shared_memory(t: torch.Tensor) -> int | None:
    """Shared memory per block (opt-in maximum, bytes) of ``t``'s GPU, what Triton checks a build
    against. For a tensor not on a CUDA device: the ``shared_memory`` the active driver reports
    (``aot_check``'s stand-in for a target), else None (the interpreter: no limit)."""
    if t.is_cuda:
        from ..backends import shared_memory_per_block
        return shared_memory_per_block(t.device)
    try:
        from triton.runtime import driver
        return getattr(driver.active, "shared_memory", None)
    except Exception:  # noqa: BLE001 - no driver (CPU-only triton)
        return None


# num_stages that failed with OutOfResources (shared memory) for a kernel config, per device
_STAGES_FALLBACK: dict = {}


def _fallback_key(kernel, args, meta: dict, device):
    dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
    return kernel.__name__, device, dtypes, tuple(sorted(meta.items()))


def launch(kernel, grid, args, meta: dict, device) -> None:
    """``kernel[grid](*args, **meta)``; if the pipelined build does not fit the GPU's shared
    memory (``OutOfResources``), fall back to fewer ``meta["num_stages"]`` (remembered per
    kernel, config, tensor dtypes and device, so the retry happens once: an fp32 build that
    does not fit leaves the 16-bit builds of the same config alone). Raises when one stage does
    not fit."""
    key = None
    if _STAGES_FALLBACK:
        key = _fallback_key(kernel, args, meta, device)
        meta = dict(meta, num_stages=_STAGES_FALLBACK.get(key, meta["num_stages"]))
    while True:
        try:
            kernel[grid](*args, **meta)
            return
        except OutOfResources:
            if meta["num_stages"] <= 1:
                raise
            if key is None:
                key = _fallback_key(kernel, args, meta, device)
            meta = dict(meta, num_stages=meta["num_stages"] - 1)
            _STAGES_FALLBACK[key] = meta["num_stages"]
