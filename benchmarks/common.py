"""Shared helpers of the vidgen-kernels benchmark suite (pytest-benchmark).

What lives here, so that later benchmark files (other ops, the full report) reuse it:

* the case description (:class:`Case`) and the pytest-benchmark group / id naming;
* the byte model (:func:`bytes_moved`): what a fused kernel must at least read and write;
* input construction in the DiT layout (``shift/scale/gate`` are views from ``mod.chunk(6, -1)``)
  with buffer rotation so that repeated calls do not hit a warm last-level cache;
* the contenders' callables (kernel backend, eager reference, ``torch.compile`` of the reference,
  plain copy of the same byte count);
* timing policy (warm-up, rounds, iterations per round) for CPU and CUDA, the CUDA timer that
  synchronises once per timed batch, and the environment description (device name, versions).

Byte model (``bytes_moved``)
----------------------------
Only the ``[B, N, C]`` activation tensors are counted, each once, in the dtype of the case
(``s`` bytes per element, ``A = B * N * C * s``):

==========================  =========  ===============================================  ======
op                          direction  tensors                                          bytes
==========================  =========  ===============================================  ======
adaln_modulate              fwd        read x; write out                                2 A
adaln_modulate              fwd+bwd    fwd + read dout, x; write dx                     5 A
gated_residual_adaln        fwd        read x, y; write h, out                          4 A
gated_residual_adaln        fwd+bwd    fwd + read dout, dh, h, y; write dx, dy          10 A
==========================  =========  ===============================================  ======

Not counted (all O(B*C) or O(B*N), under 0.5 % of the total for C >= 1152): the ``[B, 6C]``
modulation tensor and its gradient, the per-row fp32 ``mean``/``rstd`` the forward saves for
the backward, and the partial-sum buffers of the parameter-gradient reductions. The backward is
counted as recomputing ``xhat`` from the saved input (``x`` or ``h``) and the row statistics, as
the kernel contract in ``vidgen_kernels/ops/adaln.py`` does; an implementation that also saves
``out``/``xhat`` moves more than this minimum.

The copy contender times ``dst.copy_(src)`` with ``src``/``dst`` 1-D contiguous tensors of the
case's dtype with ``bytes_moved / (2 * s)`` elements each: it reads and writes exactly
``bytes_moved`` bytes, so ``GB/s(contender) / GB/s(copy)`` is the fraction of the attainable
bandwidth the contender reaches. ``dst`` is preallocated (a copy into a fresh tensor would also
time the allocation).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import itertools
import math
import os
import platform
import time
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------
OPS = ("adaln_modulate", "gated_residual_adaln")
DIRECTIONS = ("fwd", "fwd+bwd")
# kernel backends benchmarked per device type ("triton" on CPU only runs under the interpreter:
# not a performance path, so it is not benchmarked there)
KERNEL_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# contender name of torch.compile(reference function) and of the plain copy
COMPILE = "torch.compile"
REFERENCE = "reference"
COPY = "copy"
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
FULL_SHAPES = ((2, 4096, 1152), (2, 4096, 3072))  # (B, N, C): DiT-XL/2 and a 3072-wide DiT
QUICK_SHAPES = ((2, 256, 384),)
EPS = 1e-6


def contenders(device_type: str) -> tuple[str, ...]:
    """All contender names of a device type, in the order the summary lists them."""
    return (*KERNEL_BACKENDS[device_type], COMPILE, REFERENCE, COPY)


def bench_devices(config) -> tuple[str, ...]:
    """Devices selected by ``--bench-device`` (conftest): auto/all = cpu, plus cuda if visible."""
    want = config.getoption("--bench-device")
    if want in ("cpu", "cuda"):
        return (want,)
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def parametrize_cases(metafunc, cases_of: Callable) -> None:
    """The ``pytest_generate_tests`` of a benchmark file: its ``case`` argument over
    ``cases_of(quick, devices)`` (``--quick``, ``--bench-device``), with the cases' ids."""
    if "case" in metafunc.fixturenames:
        cases = cases_of(metafunc.config.getoption("--quick"), bench_devices(metafunc.config))
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Case:
    op: str
    direction: str
    shape: tuple[int, int, int]
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype
    contender: str

    @property
    def id(self) -> str:
        B, N, C = self.shape
        return (f"{self.op}-{self.direction}-B{B}xN{N}xC{C}-{dtype_name(self.dtype)}-"
                f"{self.device}-{self.contender}")

    @property
    def group(self) -> str:
        """pytest-benchmark group: the contenders of one (op, direction, shape, dtype, device)."""
        B, N, C = self.shape
        return f"{self.op} {self.direction} B={B} N={N} C={C} {dtype_name(self.dtype)} {self.device}"

    @property
    def gated(self) -> bool:
        return self.op == "gated_residual_adaln"

    @property
    def backward(self) -> bool:
        return self.direction == "fwd+bwd"


def make_cases(quick: bool, devices: tuple[str, ...]) -> list[Case]:
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    return [Case(op, direction, shape, dev, DTYPES[dev], c)
            for dev in devices for op in OPS for direction in DIRECTIONS for shape in shapes
            for c in contenders(dev)]


# ----------------------------------------------------------------------------------------------
# byte model
# ----------------------------------------------------------------------------------------------
# (number of [B, N, C] activation passes, what they are); see the module docstring
_PASSES = {
    ("adaln_modulate", "fwd"): (2, "read x; write out"),
    ("adaln_modulate", "fwd+bwd"): (5, "fwd: read x; write out | bwd: read dout, x; write dx"),
    ("gated_residual_adaln", "fwd"): (4, "read x, y; write h, out"),
    ("gated_residual_adaln", "fwd+bwd"): (
        10, "fwd: read x, y; write h, out | bwd: read dout, dh, h, y; write dx, dy"),
}


def bytes_moved(case: Case) -> tuple[int, str]:
    """(bytes, description) of the minimum traffic of the op (activations only)."""
    B, N, C = case.shape
    s = torch.empty((), dtype=case.dtype).element_size()
    passes, what = _PASSES[(case.op, case.direction)]
    return passes * B * N * C * s, f"{passes} x B*N*C*{s} B ({what}); [B,6C] params and [B,N] stats not counted"


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    name = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name} ({os.cpu_count()} logical CPUs)"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_model()


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # not installed, or broken install
        triton_version = None
    import vidgen_kernels
    return {"torch_version": torch.__version__, "triton_version": triton_version,
            "vidgen_kernels_version": getattr(vidgen_kernels, "__version__", None),
            "cuda_version": torch.version.cuda}


NOISY_SHARE = 0.10  # other processes' CPU share above which a CPU case is flagged as noisy
NOISY_CASES: list[tuple[str, float]] = []  # (case id, share), filled by the tests


class ForeignCpu:
    """Share of all CPU time that *other* processes used between ``__init__`` and ``stop()``
    (Linux ``/proc``; ``None`` elsewhere). CPU timings taken while it is well above 0 are
    suspect: with OpenMP's barriers, a thread that loses its core stalls the whole region."""

    def __init__(self):
        self._t0 = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                s = f.read().rsplit(")", 1)[1].split()
            return sum(v), v[3] + v[4], int(s[11]) + int(s[12])  # total, idle+iowait, self u+s
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> float | None:
        t1 = self._read()
        if self._t0 is None or t1 is None or t1[0] <= self._t0[0]:
            return None
        total = t1[0] - self._t0[0]
        busy = total - (t1[1] - self._t0[1])
        other = busy - (t1[2] - self._t0[2])
        return round(max(0.0, other / total), 3)


def wait_for_quiet(max_wait_s: float, window_s: float = 1.0, threshold: float = NOISY_SHARE) -> float:
    """Sleep (at most ``max_wait_s``) until other processes use at most ``threshold`` of the CPU
    over a ``window_s`` window; returns the seconds waited (for ``--wait-quiet``)."""
    t0 = time.perf_counter()
    while True:
        f = ForeignCpu()
        time.sleep(window_s)
        share = f.stop()
        waited = time.perf_counter() - t0
        if share is None or share <= threshold or waited >= max_wait_s:
            return waited


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes(device: str) -> int:
    """Size of the cache a repeated call could be served from (CPU L3 / GPU L2)."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                           "L2_cache_size", 50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(os.path.join(base, idx, "size")) as f:
                    txt = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


_MALLOC_REUSE = {"enabled": False}


def enable_malloc_reuse() -> bool:
    """Make glibc serve large CPU allocations from the (never trimmed) heap instead of fresh mmaps.

    PyTorch's CPU allocator calls ``posix_memalign``; glibc maps every block over 32 MiB with a
    fresh ``mmap`` and unmaps it on free, so each call that allocates a ``[B, N, C]`` output pays
    the page faults of first-touching it again (on the 2-core VM this suite was written on, that
    made a 75 MB ``clone`` 7x slower than a ``copy_`` into a preallocated tensor). Turning mmap
    off and trimming off makes freed blocks reusable, like the CUDA caching allocator, so the
    timings measure the kernels. Every contender runs under the same setting; ``--system-malloc``
    keeps glibc's defaults. Returns whether the setting took effect.
    """
    if _MALLOC_REUSE["enabled"]:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    _MALLOC_REUSE["enabled"] = ok
    return ok


def malloc_reuse_enabled() -> bool:
    return _MALLOC_REUSE["enabled"]


# ----------------------------------------------------------------------------------------------
# inputs and contenders
# ----------------------------------------------------------------------------------------------
def make_inputs(case: Case, seed: int) -> dict:
    """One input set in the DiT layout. ``shift/scale/gate`` are views of ``mod`` [B, 6C]
    (``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, -1)``):
    ``adaln_modulate`` gets ``(shift_msa, scale_msa)``; ``gated_residual_adaln`` is the
    attention -> MLP boundary ``h = x + gate_msa * y``, ``out = modulate(h, shift_mlp, scale_mlp)``.
    For fwd+bwd, ``x``, ``y`` and ``mod`` are leaves that require grad and ``dout`` (and ``dh``)
    are the incoming gradients."""
    B, N, C = case.shape
    g = torch.Generator(device=case.device).manual_seed(1234 + seed)
    kw = dict(device=case.device, dtype=case.dtype, generator=g)
    rg = case.backward
    inp = {"x": torch.randn(B, N, C, **kw).requires_grad_(rg)}
    if case.gated:
        inp["y"] = torch.randn(B, N, C, **kw).requires_grad_(rg)
    inp["mod"] = (0.5 * torch.randn(B, 6 * C, **kw)).requires_grad_(rg)
    ch = inp["mod"].chunk(6, dim=-1)
    if case.gated:
        inp.update(gate=ch[2], shift=ch[3], scale=ch[4])
    else:
        inp.update(shift=ch[0], scale=ch[1])
    if rg:
        inp["dout"] = torch.randn(B, N, C, **kw)
        if case.gated:
            inp["dh"] = torch.randn(B, N, C, **kw)
    return inp


def input_set_bytes(case: Case) -> int:
    """Bytes of the [B, N, C] tensors of one input set (what a cache could keep warm)."""
    B, N, C = case.shape
    n = 1 + case.gated
    if case.backward:
        n *= 2
    return n * B * N * C * torch.empty((), dtype=case.dtype).element_size()


def rotation_sets(set_bytes: int, device: str, max_sets: int = 8) -> int:
    """How many input sets to cycle through so that one set is evicted from the last-level
    cache before it is used again (>= 2x the cache size in total)."""
    return max(1, min(max_sets, math.ceil(2 * last_level_cache_bytes(device) / max(set_bytes, 1))))


def reference_fn(op: str) -> Callable:
    import vidgen_kernels as vk
    return vk.adaln_modulate_reference if op == "adaln_modulate" else vk.gated_residual_adaln_reference


def op_fn(case: Case, compiled: Optional[Callable] = None) -> Callable:
    """``f(inputs) -> tuple of outputs`` for a non-copy contender."""
    import vidgen_kernels as vk
    if case.contender == COMPILE:
        assert compiled is not None
        base, kw = compiled, dict(eps=EPS)
    elif case.op == "adaln_modulate":
        base, kw = vk.adaln_modulate, dict(eps=EPS, backend=case.contender)
    else:
        base, kw = vk.gated_residual_adaln, dict(eps=EPS, backend=case.contender)

    if case.gated:
        def f(i):
            return tuple(base(i["x"], i["y"], i["gate"], i["shift"], i["scale"], **kw))
    else:
        def f(i):
            return (base(i["x"], i["shift"], i["scale"], **kw),)
    return f


def grad_leaves(case: Case, inp: dict) -> tuple:
    return (inp["x"], inp["y"], inp["mod"]) if case.gated else (inp["x"], inp["mod"])


def grad_outputs(case: Case, inp: dict) -> tuple:
    return (inp["dh"], inp["dout"]) if case.gated else (inp["dout"],)


def step_fn(case: Case, f: Callable, inp: dict) -> Callable[[], object]:
    """The timed unit of one input set: forward, or forward + backward of all leaves
    (``torch.autograd.grad``, so nothing accumulates into ``.grad``)."""
    if not case.backward:
        return lambda: f(inp)
    leaves, gouts = grad_leaves(case, inp), grad_outputs(case, inp)

    def run():
        outs = f(inp)
        return torch.autograd.grad(outs, leaves, gouts)
    return run


def copy_bytes_step(nbytes: int, dtype: torch.dtype, device: str, seed: int) -> Callable[[], object]:
    """The bandwidth peer: a copy that reads nbytes/2 and writes nbytes/2 (moves ``nbytes``)."""
    s = torch.empty((), dtype=dtype).element_size()
    n = max(1, nbytes // (2 * s))
    g = torch.Generator(device=device).manual_seed(99 + seed)
    src = torch.randn(n, device=device, dtype=dtype, generator=g)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch outside the timed region
    return lambda: dst.copy_(src)


def copy_step(case: Case, seed: int) -> Callable[[], object]:
    return copy_bytes_step(bytes_moved(case)[0], case.dtype, case.device, seed)


def rotate(fns: list[Callable[[], object]]) -> Callable[[], object]:
    if len(fns) == 1:
        return fns[0]
    nxt = itertools.cycle(fns).__next__
    return lambda: nxt()()


def max_rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| over a tuple of tensors (fp32 math)."""
    worst = 0.0
    for a, b in zip(got, ref):
        a, b = a.detach().float(), b.detach().float()
        scale = b.abs().max().item() or 1.0
        worst = max(worst, (a - b).abs().max().item() / scale)
    return worst


TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def assert_rel_err(case, got, want, peer: str = "the reference", factor: float = 1.0) -> float:
    """:func:`max_rel_err` of a contender's results against ``peer``'s, asserted within
    ``TOLERANCE[case.dtype] * factor`` (the check before timing). Returns the error."""
    err = max_rel_err(got, want)
    tol = TOLERANCE[case.dtype] * factor
    assert err <= tol, f"{case.id}: max relative error {err:.3g} vs {peer} exceeds {tol:g}"
    return err


def check_against_reference(case: Case, f: Callable, inp: dict) -> float:
    """Run the contender once and compare outputs (and gradients) with the reference function;
    raises AssertionError if off by more than the dtype's tolerance. Returns the error."""
    ref = op_fn(Case(case.op, case.direction, case.shape, case.device, case.dtype, REFERENCE))
    got_o, ref_o = f(inp), ref(inp)
    got, want = list(got_o), list(ref_o)
    if case.backward:
        leaves, gouts = grad_leaves(case, inp), grad_outputs(case, inp)
        got += torch.autograd.grad(got_o, leaves, gouts)
        want += torch.autograd.grad(ref_o, leaves, gouts)
    return assert_rel_err(case, got, want)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_sync_timer() -> float:
    """Host clock read after draining the GPU queue. As pytest-benchmark's timer with
    ``iterations=k`` it synchronises once before and once after each batch of k launches, and
    pytest-benchmark divides the batch time by k: its stats are per-call times."""
    torch.cuda.synchronize()
    return time.perf_counter()


def estimate_call_s(fn: Callable[[], object], device: str, warmup: int, calls: int) -> float:
    """Per-call time for sizing the rounds: ``warmup`` untimed calls (first-call costs: JIT,
    autotuning, allocator growth), then the median of ``calls`` timed calls (CPU) or one batch of
    ``calls`` calls between two synchronisations divided by ``calls`` (CUDA)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device == "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        return (time.perf_counter() - t0) / calls
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def cuda_event_per_call_ms(fn: Callable[[], object], k: int, reps: int) -> float:
    """Median over ``reps`` batches of (CUDA-event time of k back-to-back calls) / k, in ms."""
    per = sorted(_time_batch(fn, "cuda", k) * 1e3 for _ in range(reps))
    return per[len(per) // 2]


@dataclass(frozen=True)
class Policy:
    """How long to measure. CPU: one call per round (iterations=1), rounds sized so the timed
    region lasts about ``target_s``. CUDA: ``iterations`` calls per round with one synchronise per
    round, sized so a round lasts about ``batch_s``."""
    warmup_calls: int  # untimed calls before calibration
    calibration_calls: int  # timed calls that size the rounds (also warm-up)
    warmup_rounds: int  # pedantic's warm-up rounds (of `iterations` calls each)
    min_rounds: int
    max_rounds: int
    target_s: float
    batch_s: float = 2e-3
    max_iterations: int = 1000


def policy(quick: bool, device: str) -> Policy:
    if device == "cuda":
        if quick:
            return Policy(3, 10, warmup_rounds=1, min_rounds=5, max_rounds=20, target_s=0.05)
        return Policy(5, 20, warmup_rounds=3, min_rounds=20, max_rounds=200, target_s=0.5)
    if quick:
        return Policy(1, 1, warmup_rounds=1, min_rounds=5, max_rounds=30, target_s=0.1)
    return Policy(1, 2, warmup_rounds=1, min_rounds=7, max_rounds=100, target_s=1.2)


def heavy_policy(quick: bool, device: str, max_rounds: int = 30) -> Policy:
    """:func:`policy` shortened for full-size cases whose calls take long (CPU: 0.1 - 5 s;
    CUDA: whole blocks and models of 10 ms - 2 s). CPU: one untimed call, one calibration call,
    3 to ``max_rounds`` timed rounds, about 1 s of timing. CUDA: two untimed calls, three
    calibration calls, one warm-up round, 5 to ``max_rounds`` rounds, about 1 s of timing (the
    plain CUDA policy's 25 calls before timing and 20-round minimum would take a minute per case
    for a 1 s model forward; the lent GPU gives a whole run about 10 minutes)."""
    pol = policy(quick, device)
    if quick:
        return pol
    if device == "cpu":
        return dataclasses.replace(pol, warmup_calls=1, calibration_calls=1, warmup_rounds=0,
                                   min_rounds=3, max_rounds=max_rounds, target_s=1.0)
    return dataclasses.replace(pol, warmup_calls=2, calibration_calls=3, warmup_rounds=1,
                               min_rounds=5, max_rounds=max_rounds, target_s=1.0)


def kernel_unavailable(backend: str, device: str, ext_symbol: str, what: str) -> Optional[str]:
    """Why kernel ``backend`` cannot run on ``device`` (None if it can); for the compiled
    backends also when the built extension predates the op (``ext_symbol`` missing)."""
    from vidgen_kernels.backends import why_unavailable
    why = why_unavailable(backend, device)
    if why is None and backend in ("cpu", "cuda"):
        from vidgen_kernels import _ext
        if not hasattr(_ext.C, ext_symbol.format(backend=backend)):
            why = f"the built extension has no {what} kernel (rebuild it)"
    return why


def plan(pol: Policy, device: str, call_s: float) -> tuple[int, int]:
    """(rounds, iterations per round) for a call that takes about ``call_s`` seconds."""
    call_s = max(call_s, 1e-7)
    iterations = 1
    if device == "cuda":
        iterations = max(1, min(pol.max_iterations, math.ceil(pol.batch_s / call_s)))
    rounds = max(pol.min_rounds, min(pol.max_rounds, math.ceil(pol.target_s / (call_s * iterations))))
    return rounds, iterations


# ----------------------------------------------------------------------------------------------
# the timed part of a benchmark case, shared by every op's benchmark file
# ----------------------------------------------------------------------------------------------
def measure(benchmark, request, call: Callable[[], object], device: str, pol: Policy,
            case_id: str, info: dict) -> Optional[float]:
    """Calibrates, plans and times ``call`` with pytest-benchmark (optionally after waiting for a
    quiet CPU: ``--wait-quiet``). Adds the timing fields to ``info`` (median_ms, rounds, timer,
    threads, other processes' CPU share, versions; ``median_ms_cuda_events`` on CUDA) and flags
    the case as noisy when other processes used the CPU. Returns the median seconds per call
    (None under ``--benchmark-disable``)."""
    call_s = estimate_call_s(call, device, pol.warmup_calls, pol.calibration_calls)
    rounds, iterations = plan(pol, device, call_s)
    if device == "cuda":
        benchmark._timer = cuda_sync_timer  # sync once per batch of `iterations` calls
    wait = request.config.getoption("--wait-quiet")
    if wait > 0:
        info["waited_for_quiet_s"] = round(wait_for_quiet(wait), 1)
    foreign = ForeignCpu()  # other processes' CPU use during the timed region
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=pol.warmup_rounds)
    other_share = foreign.stop()

    stats = getattr(benchmark, "stats", None)
    median_s = stats.stats.median if stats is not None else None
    info.update(
        median_ms=median_s * 1e3 if median_s else None,
        rounds=rounds,
        iterations_per_round=iterations,
        timer="cuda_sync_timer (sync once per round)" if device == "cuda" else "perf_counter",
        torch_threads=torch.get_num_threads(),
        quick=bool(request.config.getoption("--quick")),  # (summaries say: not a measurement)
        malloc_reuse=malloc_reuse_enabled() if device == "cpu" else None,
        other_processes_cpu_share=other_share,
        **versions(),
    )
    if device == "cuda" and median_s:
        # (3 reps for calls over 0.2 s, the diffusers models and DiT blocks: at 5-20 more full
        # calls each, the cross-check took a budgeted GPU run's time from the other families)
        info["median_ms_cuda_events"] = cuda_event_per_call_ms(
            call, iterations, reps=3 if call_s > 0.2 else max(5, min(rounds, 20)))
    if other_share is not None and other_share > NOISY_SHARE:
        NOISY_CASES.append((case_id, other_share))
    return median_s


def paired_speedup(ours: Callable[[], object], peer: Callable[[], object], device: str,
                   pairs: int, key: str) -> dict:
    """Speedup of ``ours`` over ``peer`` measured in interleaved pairs in one process: each pair
    times one call of each (the order alternating between pairs, so that neither always runs
    first), and the result is the median over the pairs of ``t_peer / t_ours``. Slow drift of
    the machine (other tenants, frequency, a noisy minute) hits both calls of a pair alike, so
    this ratio is steadier than the ratio of two medians timed minutes apart. Returns the
    ``extra_info`` entries ``{key: median, key + "_min": ..., key + "_max": ...,
    "paired_pairs": n}`` (None values when ``pairs`` is 0); ``summarize.py`` prints every
    ``paired_vs_<peer>`` key under the group's table (``summarize.PAIRED_PEERS`` names the
    peers).

    On CUDA each side of a pair is a batch of calls timed with CUDA events and one sync (enough
    calls for ~2 ms of GPU time, the same count for both sides): a per-call sync would add its
    launch + sync latency (15-30 us) to every call and understate the speedup of short kernels.
    On the CPU a side is one call (perf_counter)."""
    reps = 1
    if device == "cuda" and pairs:  # calibrate the batch once, from one call of the faster side
        reps = max(1, min(200, int(2e-3 / max(1e-6, min(_time_batch(ours, device, 1),
                                                          _time_batch(peer, device, 1))))))
    ratios = []
    for i in range(pairs):
        t = {}
        for name, fn in ((("ours", ours), ("peer", peer)) if i % 2 == 0 else
                         (("peer", peer), ("ours", ours))):
            t[name] = _time_batch(fn, device, reps)
        ratios.append(t["peer"] / t["ours"])
    ratios.sort()
    n = len(ratios)
    median = None
    if n:
        median = ratios[n // 2] if n % 2 else 0.5 * (ratios[n // 2 - 1] + ratios[n // 2])
    return {key: median, f"{key}_min": ratios[0] if n else None,
            f"{key}_max": ratios[-1] if n else None, "paired_pairs": n, f"{key}_reps": reps}


def _time_batch(fn: Callable[[], object], device: str, reps: int) -> float:
    """Seconds per call of ``reps`` back-to-back calls of ``fn`` (CUDA events on CUDA, one
    synchronisation at the end; perf_counter elsewhere)."""
    synchronize(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def per_second(amount: Optional[float], info: dict, scale: float = 1e9) -> tuple[Optional[float], Optional[float]]:
    """``amount`` / median and / CUDA-event median (``info`` as filled by :func:`measure`), in
    units of ``scale`` per second: (GB/s or GFLOP/s, the same from CUDA events or None)."""
    ms, ev = info.get("median_ms"), info.get("median_ms_cuda_events")
    if not amount:
        return None, None
    return (amount / (ms * 1e-3) / scale if ms else None,
            amount / (ev * 1e-3) / scale if ev else None)


_MATMUL_PEAK: dict = {}


def matmul_peak_flops(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul (``torch.mm`` of two ``n x n`` matrices in ``dtype`` on
    ``device``), measured: the practical GEMM peak that attention and GEMM rows are set against
    (``extra_info["matmul_peak_flops"]``).
    Once per (device, dtype) per process: ``n`` doubles from 256 until one call takes >= 20 ms
    on CPU / 2 ms on CUDA (at most 8192), then the best of 5 batches of 3 calls."""
    key = (device, dtype)
    if key not in _MATMUL_PEAK:
        target = 2e-3 if device == "cuda" else 2e-2
        n = 256
        while True:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            step = functools.partial(torch.mm, a, b)
            step()  # warm-up (library selection, page faults)
            if _time_batch(step, device, 1) >= target or n >= 8192:
                break
            n *= 2
        best = min(_time_batch(step, device, 3) for _ in range(5))
        _MATMUL_PEAK[key] = 2 * n ** 3 / best
        del a, b
    return _MATMUL_PEAK[key]


GiB = 1 << 30
MEM_HEADROOM = 2 * GiB  # workspaces, parameter gradients, outputs, allocator rounding


def free_bytes(device: str) -> Optional[int]:
    """What a new allocation can get on ``device``: CUDA's free memory once the caching
    allocator has returned its unused blocks; None on the CPU (its sizes are small: not
    checked)."""
    if device != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def no_room(what: str, need: int, device: str, estimate: str) -> Optional[str]:
    """Why ``what`` (estimated to need ``need`` bytes, ``estimate`` saying from what) cannot run
    on ``device`` now (a skip reason), or None: run it. Used before the calls that materialise
    ``S x S`` attention matrices at GPU sizes (a reference, SDPA's math backend)."""
    free = free_bytes(device)
    if free is None or need + MEM_HEADROOM <= free:
        return None
    return (f"{what} needs ~{need / GiB:.3g} GiB (estimate from the shapes: {estimate}) + "
            f"{MEM_HEADROOM / GiB:.3g} GiB headroom, {free / GiB:.3g} GiB free on {device}")


def free_after_oom(device: str) -> None:
    """Return what a failed (out-of-memory) call left cached, so the next step has it (call it
    after the ``except`` clause: until it ends, the traceback keeps the failed call's tensors)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def release(device: str, compiled: bool) -> None:
    """Frees what a case held (compiled graphs, cached GPU memory) before the next one."""
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def compile_contender(fn: Callable, warm: Callable[[Callable], object], device: str,
                      dynamic: bool = False):
    """``torch.compile(fn, dynamic=dynamic)``, compiled and warmed up by ``warm(compiled)``
    (which runs the timed step once: forward, and backward for fwd+bwd). ``dynamic=True`` where
    shapes inside ``fn`` depend on the data (the MoE reference's per-expert token counts: static
    shapes would recompile for every routing). Returns ``(compiled, seconds)``; skips the case
    with the reason when inductor or its toolchain fails (a missing contender, not a failed
    run)."""
    import pytest
    torch._dynamo.reset()  # one compilation per case; no cache carried over between shapes
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(fn, dynamic=dynamic)
        warm(compiled)
        synchronize(device)
    except Exception as e:
        torch._dynamo.reset()
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        pytest.skip(f"torch.compile failed: {type(e).__name__}: {msg}")
    return compiled, time.perf_counter() - t0


def count_saved_bytes(run: Callable[[], object], exclude=()) -> dict:
    """What autograd keeps for backward while ``run()`` executes a forward
    (``torch.autograd.graph.saved_tensors_hooks``):

    * ``saved_bytes``: every saved tensor's own bytes, counted once per save (a tensor saved by
      three ops counts three times; a view counts its own elements only);
    * ``activation_bytes``: the memory those saves keep alive: each distinct storage once, whole
      (saving a view of a fused ``qkv`` buffer keeps the whole buffer), without the storages of
      ``exclude`` (the parameters: they are not activations).
    """
    seen = []
    storages = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        seen.append(t.numel() * t.element_size())
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            storages[(st.data_ptr(), t.device)] = st.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return {"saved_bytes": sum(seen), "activation_bytes": sum(storages.values())}
