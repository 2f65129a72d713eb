"""pytest configuration of the benchmark suite.

Options (besides pytest-benchmark's own ``--benchmark-*``):

* ``--quick``: one small shape and few rounds (CI smoke test; well under a minute on CPU).
* ``--bench-device {auto,cpu,cuda,all}``: devices to benchmark. ``auto`` (default) = CPU, plus
  CUDA when a GPU is visible; ``all`` is the same; ``cpu`` / ``cuda`` restrict to one.
* ``--wait-quiet SECONDS``: before each timed region wait (at most SECONDS) until other
  processes use under 10 % of the CPU; for shared machines.
* ``--system-malloc``: keep glibc's allocator defaults on CPU (see
  ``common.enable_malloc_reuse`` for what the default changes and why).
"""
from __future__ import annotations

import os
import sys

import pytest


_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
# common.py (first); in a source checkout also the checkout root (last), for vidgen_kernels when it
# is not pip-installed. Installed as vidgen_kernels._bench_suite (python -m vidgen_kernels.bench),
# _ROOT is the vidgen_kernels package folder itself: not added.
_PATHS = [_HERE] + ([_ROOT] if os.path.isdir(os.path.join(_ROOT, "vidgen_kernels")) else [])
for p in _PATHS:
    if p not in sys.path:
        sys.path.insert(0 if p == _HERE else len(sys.path), p)


def _add(group, *args, **kwargs):
    try:
        group.addoption(*args, **kwargs)
    except ValueError:  # already registered by another conftest of the same session
        pass


def pytest_addoption(parser):
    group = parser.getgroup("vidgen-kernels benchmarks")
    _add(group, "--quick", action="store_true", default=False,
         help="benchmarks: one small shape and few rounds (smoke test)")
    _add(group, "--bench-device", default="auto", choices=("auto", "all", "cpu", "cuda"),
         help="benchmarks: devices to run (auto/all = cpu, plus cuda when a GPU is visible)")
    _add(group, "--wait-quiet", type=float, default=0.0, metavar="SECONDS",
         help="benchmarks: before each timed region, wait up to SECONDS until other processes "
              "use < 10%% of the CPU (shared machines; default 0 = no wait)")
    _add(group, "--system-malloc", action="store_true", default=False,
         help="benchmarks: keep glibc's malloc defaults (fresh mmap + page faults per large "
              "CPU allocation) instead of heap reuse")


def pytest_configure(config):
    if not config.getoption("--system-malloc"):
        import common
        common.enable_malloc_reuse()


_RUNNING: list = [None]  # node id of the benchmark in progress (None between tests)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _RUNNING[0] = item.nodeid
    outcome = yield
    if outcome.excinfo is None:  # an interrupted (or failed) case leaves its id set
        _RUNNING[0] = None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Before pytest-benchmark writes its JSON, drop what an interrupted run (SIGINT from
    ``gpu.sh``'s budget, Ctrl-C) left half-measured: the case the stop landed in (fewer rounds
    than asked; ``gpu.sh``'s second pass re-runs the cases the JSON lacks) and any case with no
    round at all (pytest-benchmark's JSON writer failed on those, ``min()`` of an empty sequence,
    and wrote no file)."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None:
        cut = _RUNNING[0] if exitstatus == pytest.ExitCode.INTERRUPTED else None
        bs.benchmarks[:] = [b for b in bs.benchmarks if b and b.fullname != cut]
    yield


def pytest_report_header(config):
    import torch
    import common
    import vidgen_kernels as vk
    v = common.versions()
    lines = [
        f"vidgen-kernels benchmarks: {'quick' if config.getoption('--quick') else 'full'} mode, "
        f"devices {', '.join(common.bench_devices(config))}",
        f"  cpu: {common.cpu_model()}, torch threads {torch.get_num_threads()}, "
        f"malloc reuse {'on' if common.malloc_reuse_enabled() else 'off'}",
        f"  torch {v['torch_version']}, triton {v['triton_version']}, {vk.extension_status()}",
        f"  backends: cpu -> {vk.available_backends('cpu')}",
    ]
    if torch.cuda.is_available():
        lines.append(f"  cuda: {torch.cuda.get_device_name()} -> {vk.available_backends('cuda')}")
    else:
        lines.append("  cuda: no GPU visible (CUDA cases not generated)")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    import common
    if common.NOISY_CASES:
        tr = terminalreporter
        tr.write_sep("-", "vidgen-kernels benchmarks: noisy cases", yellow=True)
        tr.write_line(f"other processes used more than {common.NOISY_SHARE:.0%} of the CPU time "
                      f"during {len(common.NOISY_CASES)} case(s); their timings are suspect:")
        for cid, share in common.NOISY_CASES:
            tr.write_line(f"  {share:5.0%}  {cid}")
