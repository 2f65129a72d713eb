"""Benchmarks of fused AdaLN modulation: ``adaln_modulate`` and ``gated_residual_adaln``.

Run::

    python -m pytest benchmarks/test_bench_adaln.py --benchmark-json /tmp/b.json   # full
    python -m pytest benchmarks/test_bench_adaln.py --quick                         # smoke test
    python benchmarks/summarize.py /tmp/b.json                                      # tables

Cases: op x direction (fwd, fwd+bwd) x shape (B=2, N=4096, C in {1152, 3072}) x device (fp32 on
CPU, bf16 on CUDA) x contender. Contenders: every kernel backend of the device (``cpu``; ``cuda``,
``triton``), the eager reference (``backend="reference"``), ``torch.compile`` of the reference
function (compiled and warmed up per case, outside the timed region) and ``copy``: a
``dst.copy_(src)`` moving the byte count of ``common.bytes_moved`` (the bandwidth limit).
Each (op, direction, shape, dtype, device) is one pytest-benchmark group.

Timing
------
* CPU: one untimed call and two timed calibration calls (which size R), then
  ``benchmark.pedantic(call, rounds=R, iterations=1, warmup_rounds=1)`` with R chosen so the
  timed region lasts about 1.2 s (7 <= R <= 100); ``--quick``: 0.1 s, 5 <= R <= 30.
* CUDA: the fixture's timer is replaced by ``common.cuda_sync_timer`` (synchronise, then read the
  host clock) and ``pedantic(call, iterations=k, ...)`` times k back-to-back launches per round:
  one synchronise per batch, and pytest-benchmark divides each round by k, so its stats are
  per-call times. ``extra_info["median_ms_cuda_events"]`` cross-checks with CUDA events.
* ``extra_info["other_processes_cpu_share"]``: share of all CPU time other processes used during
  the timed region (noise indicator; the terminal summary lists cases where it exceeded 10 %).
* Inputs rotate over enough copies to exceed 2x the last-level cache (CPU L3 / GPU L2).
* Each non-reference contender is checked against the reference function once, outside the
  timed region (outputs, and gradients for fwd+bwd); a mismatch fails the case.

Unavailable contenders (backend not built / no GPU / ``torch.compile`` failing) are skipped with
the reason, never failed.
"""
from __future__ import annotations


import pytest
import torch

import common
from common import COMPILE, COPY, REFERENCE, Case
from vidgen_kernels import BackendUnavailableError


def pytest_generate_tests(metafunc):
    common.parametrize_cases(metafunc, common.make_cases)


def _unavailable(case: Case) -> str | None:
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if case.contender in (REFERENCE, COMPILE, COPY):
        return None
    from vidgen_kernels.backends import why_unavailable
    return why_unavailable(case.contender, case.device)


def _compile(case: Case, inp: dict):
    """torch.compile of the reference function, compiled and warmed up on ``inp``."""
    return common.compile_contender(
        common.reference_fn(case.op),
        lambda c: common.step_fn(case, common.op_fn(case, c), inp)(), case.device)


def test_adaln(benchmark, case: Case, request):
    benchmark.group = case.group
    why = _unavailable(case)
    if why is not None:
        pytest.skip(f"{case.contender} unavailable on {case.device}: {why}")

    quick = request.config.getoption("--quick")
    pol = common.policy(quick, case.device)
    nbytes, bytes_desc = common.bytes_moved(case)
    info = {}

    if case.contender == COPY:
        n_sets = common.rotation_sets(nbytes, case.device)
        steps = [common.copy_step(case, i) for i in range(n_sets)]
    else:
        n_sets = common.rotation_sets(common.input_set_bytes(case), case.device)
        sets = [common.make_inputs(case, i) for i in range(n_sets)]
        compiled = None
        if case.contender == COMPILE:
            compiled, info["compile_s"] = _compile(case, sets[0])
        f = common.op_fn(case, compiled)
        if case.contender != REFERENCE:
            try:
                info["max_rel_err_vs_reference"] = common.check_against_reference(case, f, sets[0])
            except (NotImplementedError, BackendUnavailableError) as e:
                pytest.skip(f"{case.contender} cannot run this case: {type(e).__name__}: {e}")
        steps = [common.step_fn(case, f, s) for s in sets]
    call = common.rotate(steps)

    median_s = common.measure(benchmark, request, call, case.device, pol, case.id, info)
    B, N, C = case.shape
    info["gbps"], info["gbps_cuda_events"] = common.per_second(nbytes, info)
    info.update(
        op=case.op,
        direction=case.direction,
        contender=case.contender,
        backend=(case.contender if case.contender not in (COMPILE, COPY) else
                 f"{REFERENCE} (torch.compile)" if case.contender == COMPILE else None),
        dtype=common.dtype_name(case.dtype),
        shape=[B, N, C],
        device=case.device,
        device_name=common.device_name(case.device),
        bytes_moved=nbytes,
        bytes_counted=bytes_desc,
        input_sets=n_sets,
    )
    benchmark.extra_info.update(info)
    del call, steps, median_s
    common.release(case.device, case.contender == COMPILE)

