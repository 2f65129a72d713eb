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

import gc
import time

import pytest
import torch

import common
from common import COMPILE, COPY, REFERENCE, Case
from vidgen_kernels import BackendUnavailableError


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = common.make_cases(metafunc.config.getoption("--quick"), common.bench_devices(metafunc.config))
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def _unavailable(case: Case) -> str | None:
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if case.contender in (REFERENCE, COMPILE, COPY):
        return None
    from vidgen_kernels.backends import why_unavailable
    return why_unavailable(case.contender, case.device)


def _compile(case: Case, inp: dict):
    """torch.compile of the reference function, compiled and warmed up on ``inp``."""
    torch._dynamo.reset()  # one compilation per case; no cache carried over between shapes
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(common.reference_fn(case.op), dynamic=False)
        f = common.op_fn(case, compiled)
        step = common.step_fn(case, f, inp)
        step()  # compiles the forward (and, for fwd+bwd, the backward)
        common.synchronize(case.device)
    except Exception as e:  # inductor/toolchain failure: a missing contender, not a failed run
        torch._dynamo.reset()
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        pytest.skip(f"torch.compile failed: {type(e).__name__}: {msg}")
    return compiled, time.perf_counter() - t0


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

    # calibration (doubles as warm-up), then the timed rounds
    call_s = common.estimate_call_s(call, case.device, pol.warmup_calls, pol.calibration_calls)
    rounds, iterations = common.plan(pol, case.device, call_s)
    if case.device == "cuda":
        benchmark._timer = common.cuda_sync_timer  # sync once per batch of `iterations` calls
    wait = request.config.getoption("--wait-quiet")
    if wait > 0:
        info["waited_for_quiet_s"] = round(common.wait_for_quiet(wait), 1)
    foreign = common.ForeignCpu()  # other processes' CPU use during the timed region
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=pol.warmup_rounds)
    other_share = foreign.stop()

    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    median_s = stats.stats.median if stats is not None else None
    B, N, C = case.shape
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
        median_ms=median_s * 1e3 if median_s else None,
        gbps=nbytes / median_s / 1e9 if median_s else None,
        rounds=rounds,
        iterations_per_round=iterations,
        input_sets=n_sets,
        timer="cuda_sync_timer (sync once per round)" if case.device == "cuda" else "perf_counter",
        torch_threads=torch.get_num_threads(),
        malloc_reuse=common.malloc_reuse_enabled() if case.device == "cpu" else None,
        other_processes_cpu_share=other_share,
        **common.versions(),
    )
    if case.device == "cuda" and median_s:
        ev_ms = common.cuda_event_per_call_ms(call, iterations, reps=max(5, min(rounds, 20)))
        info["median_ms_cuda_events"] = ev_ms
        info["gbps_cuda_events"] = nbytes / (ev_ms * 1e-3) / 1e9
    benchmark.extra_info.update(info)
    if other_share is not None and other_share > common.NOISY_SHARE:
        common.NOISY_CASES.append((case.id, other_share))

    del call, steps
    if case.contender == COMPILE:
        torch._dynamo.reset()
    gc.collect()
    if case.device == "cuda":
        torch.cuda.empty_cache()

