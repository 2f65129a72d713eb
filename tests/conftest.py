"""Test set-up: Triton runs on CPU tensors through its interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence here; the interpreter is
then patched to compute as a GPU does (interp_fixes.py: bf16 arithmetic, scalar loop bounds)
and to check every load and store (interp_memcheck.py: an access outside the kernel's tensor
arguments, an illegal memory access on a GPU, and a byte that two programs of a launch touch
with a store among them, a race on a GPU, raise) before any kernel runs.
"""
import os

import pytest
import torch
import torch.utils.deterministic

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Uninitialized memory poisoned: torch.empty & co. fill floats with NaN and integers with
    # their maximum (torch's deterministic mode, warnings only: nothing here needs it to raise).
    # On a GPU an output buffer that a kernel reads before writing holds whatever the caching
    # allocator left there; on the CPU a fresh allocation is mostly zero pages, which hid such a
    # read. (Not on a GPU machine: there memory is reused anyway, and deterministic mode would
    # change the cuBLAS / scatter paths the CUDA tests check.)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import interp_fixes
        interp_fixes.install()
        import interp_memcheck  # bounds and races of every interpreted load / store
        interp_memcheck.install()
    except ImportError:  # triton not installed: its tests skip
        pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (``item.rep_call``): fixtures read in teardown
    whether the test body passed (e.g. to check what it launched only then)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
