"""Benchmarks of causal temporal attention (``vidgen_kernels.temporal_attention``).

Run::

    python -m pytest benchmarks/test_bench_temporal_attention.py --benchmark-json /tmp/t.json  # full
    python -m pytest benchmarks/test_bench_temporal_attention.py --quick                        # smoke
    python benchmarks/summarize.py /tmp/t.json                                                  # tables

Cases: direction (fwd, fwd+bwd) x shape ``(B, T, S, H, D)`` in
``(2, 16, 32x32, 16, 64)``, ``(1, 13, 30x45, 30, 64)``, ``(1, 32, 16x16, 8, 64)`` (and on CUDA
``(1, 128, 16x16, 8, 64)`` and ``(1, 256, 16x16, 8, 64)``: where the Triton backend's tiled
kernels take over from its resident ones, and beyond the resident limit)
x device (fp32 on CPU, bf16 on CUDA) x contender, causal, no RoPE (the peers have none). Each (direction, shape,
dtype, device) is one pytest-benchmark group. Contenders:

* every kernel backend of the op on the device (``cpu``; ``triton`` on CUDA): ``q, k, v`` are
  ``[B, T, S, H, D]`` tensors as separate q/k/v projections reshape to, read in place;
* on CUDA ``triton-tiled`` / ``triton-resident``: the ``triton`` backend with one of its two kernel
  sets forced (``triton_kernels.temporal_attention.tiled_kernels``; resident skips where it does
  not fit), to measure where the launchers should switch (set from spill reports so far);
* ``reference``: ``temporal_attention_reference``, which permutes to ``[B, S, H, T, D]`` (copies),
  attends with a materialised masked softmax in fp32 and permutes back: the permutes are timed;
* ``torch.compile``: ``torch.compile(temporal_attention_reference, dynamic=False)`` (compiled and
  warmed up per case, outside the timed region; permutes included, as inductor sees them);
* ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on ``[B*S, H, T, D]``
  inputs permuted and made contiguous *before* timing (what the seed design would need
  upstream is not charged to it). 4-D, so SDPA may pick its fused kernels (flash / memory-
  efficient / cuDNN on a GPU, flash on the CPU): up to 2026-12-06 the peer got 3-D
  ``[B*S*H, T, D]`` inputs, which every fused SDPA kernel refuses, so it ran the math backend;
* ``matmul-softmax``: ``softmax((q @ k^T) * scale masked) @ v`` on the same pre-permuted inputs;
* ``copy``: a tensor copy moving ``bytes_moved`` bytes (the bandwidth limit of a fused kernel).

Paired speedup: the kernel backend's case also times its calls and the reference's in
interleaved pairs on the same inputs (``common.paired_speedup``; 6 pairs on CPU, 10 on CUDA):
``extra_info["paired_vs_reference"]``, the median of ``t_reference / t_kernel``, steadier than the
ratio of two medians timed minutes apart on a shared machine; ``summarize.py`` prints it.

For fwd+bwd the leaves are the inputs each contender takes (``[B, T, S, H, D]`` or the
pre-permuted ``[B*S, H, T, D]``) and the timed unit is forward + ``torch.autograd.grad``.

Work model (``extra_info``): ``flops`` = 4 * B*S*H * T^2 * D for the forward (two matmuls),
4 * B*S*H * T(T+1)/2 * D for causal attention (the masked pairs are not counted), times 3.5 for fwd+bwd (backward = 2.5x
forward, flash-attention's convention); ``gflops`` = flops / median. ``bytes_moved`` (what
``summarize.py`` turns into GB/s) is the minimum traffic of a fused kernel, ``A = B*T*S*H*D *
sizeof(dtype)``: fwd 4A (read q, k, v; write out), fwd+bwd 12A (+ read dout, q, k, v, out;
write dq, dk, dv); the fp32 ``lse`` (A / D) is not counted.

Timing: as ``test_bench_adaln.py`` (``benchmarks/common.py``): calibration, then
``benchmark.pedantic`` with rounds sized for a target time; CUDA with the synchronising timer and
CUDA-event cross-check; inputs rotated over enough copies to exceed 2x the last-level cache.
The full CPU shapes are big (one fp32 ``[B, T, S, H, D]`` tensor of the first shape is 134 MB and
one fwd+bwd call takes seconds on a 2-core VM), so the full CPU policy here is shorter than
adaln's: one untimed call, one calibration call, at least 3 timed rounds, ~1 s target.
Each non-reference contender is checked against the reference once before timing (outputs, and
gradients for fwd+bwd; the reference results are computed once per group and reused).
Unavailable contenders are skipped with the reason, never failed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import common
from common import COMPILE, COPY, REFERENCE
from vidgen_kernels import BackendUnavailableError

OP = "temporal_attention"
SDPA = "sdpa"
MATMUL = "matmul-softmax"
# kernel backends of this op per device type (no CUDA C++ backend; Triton on CPU only runs in
# the interpreter: not a performance path)
KERNEL_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton",)}
# CUDA: the Triton backend with one of its two kernel sets forced (``tiled_kernels``), to find
# the crossover its launchers should use (chosen from compiler spill reports so far)
FORCED = {"triton-tiled": True, "triton-resident": False}
# (B, T, (Sh, Sw), H, D)
FULL_SHAPES = ((2, 16, (32, 32), 16, 64), (1, 13, (30, 45), 30, 64), (1, 32, (16, 16), 8, 64))
QUICK_SHAPES = ((1, 8, (8, 8), 4, 64),)
# CUDA only (full runs): a sequence longer than the Triton backend's resident kernels hold
# (T_k > 128): its tiled kernels run
LONG_SHAPES = {"cuda": ((1, 128, (16, 16), 8, 64), (1, 256, (16, 16), 8, 64))}
PERMUTED = (SDPA, MATMUL)  # contenders fed pre-permuted [B*S, H, T, D] inputs


def contenders(device_type: str) -> tuple[str, ...]:
    forced = tuple(FORCED) if device_type == "cuda" else ()
    return (*KERNEL_BACKENDS[device_type], *forced, COMPILE, REFERENCE, SDPA, MATMUL, COPY)


@dataclass(frozen=True)
class Case:
    direction: str
    shape: tuple  # (B, T, (Sh, Sw), H, D)
    device: str
    dtype: torch.dtype
    contender: str
    causal: bool = True

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        B, T, (sh, sw), H, D = self.shape
        return B, T, sh * sw, H, D

    @property
    def grid(self) -> str:
        return f"{self.shape[2][0]}x{self.shape[2][1]}"

    @property
    def id(self) -> str:
        B, T, _, H, D = self.shape
        return (f"{OP}-{self.direction}-B{B}xT{T}xS{self.grid}xH{H}xD{D}-"
                f"{common.dtype_name(self.dtype)}-{self.device}-{self.contender}")

    @property
    def group(self) -> str:
        B, T, _, H, D = self.shape
        return (f"{OP} {self.direction} B={B} T={T} S={self.grid} H={H} D={D} "
                f"{common.dtype_name(self.dtype)} {self.device}")

    @property
    def backward(self) -> bool:
        return self.direction == "fwd+bwd"


def make_cases(quick: bool, devices) -> list[Case]:
    def shapes(dev):
        return QUICK_SHAPES if quick else FULL_SHAPES + LONG_SHAPES.get(dev, ())
    return [Case(direction, shape, dev, common.DTYPES[dev], c)
            for dev in devices for shape in shapes(dev) for direction in common.DIRECTIONS
            for c in contenders(dev)]


def pytest_generate_tests(metafunc):
    common.parametrize_cases(metafunc, make_cases)


# ----------------------------------------------------------------------------------------------
# work model
# ----------------------------------------------------------------------------------------------
def flops(case: Case) -> int:
    B, T, S, H, D = case.dims
    # causal: the T (T + 1) / 2 (query, key) pairs a frame sees (the diagonal included)
    f = 4 * B * S * H * D * (T * (T + 1) // 2 if case.causal else T * T)
    return int(f * 3.5) if case.backward else f


def bytes_moved(case: Case) -> tuple[int, str]:
    B, T, S, H, D = case.dims
    s = torch.empty((), dtype=case.dtype).element_size()
    A = B * T * S * H * D * s
    if case.backward:
        return 12 * A, ("12 x B*T*S*H*D*s (fwd: read q, k, v; write out | bwd: read dout, q, k, v, "
                        "out; write dq, dk, dv); fp32 lse not counted")
    return 4 * A, "4 x B*T*S*H*D*s (read q, k, v; write out)"


def set_bytes(case: Case) -> int:
    """Bytes of the activation tensors of one input set (what a cache could keep warm)."""
    B, T, S, H, D = case.dims
    n = 4 if case.backward else 3
    return n * B * T * S * H * D * torch.empty((), dtype=case.dtype).element_size()


# ----------------------------------------------------------------------------------------------
# inputs and contenders
# ----------------------------------------------------------------------------------------------
def _to_seq(t: torch.Tensor) -> torch.Tensor:
    """[B, T, S, H, D] -> contiguous [B*S, H, T, D]: 4-D, the layout SDPA's fused kernels take
    (flash, memory-efficient and cuDNN refuse 3-D [B*S*H, T, D] inputs, which silently ran the
    math backend: a handicapped peer)."""
    B, T, S, H, D = t.shape
    return t.permute(0, 2, 3, 1, 4).reshape(B * S, H, T, D).contiguous()


def _from_seq(t: torch.Tensor, dims) -> torch.Tensor:
    B, T, S, H, D = dims
    return t.view(B, S, H, T, D).permute(0, 3, 1, 2, 4)


def make_inputs(case: Case, seed: int) -> dict:
    """q, k, v (and dout) ``[B, T, S, H, D]`` contiguous; permuted contenders get their
    ``[B*S, H, T, D]`` copies instead (made here, outside the timed region)."""
    B, T, S, H, D = case.dims
    g = torch.Generator(device=case.device).manual_seed(4321 + seed)
    kw = dict(device=case.device, dtype=case.dtype, generator=g)
    inp = {n: torch.randn(B, T, S, H, D, **kw) for n in ("q", "k", "v")}
    if case.backward:
        inp["dout"] = torch.randn(B, T, S, H, D, **kw)
    if case.contender in PERMUTED:
        inp = {n: _to_seq(t) for n, t in inp.items()}
    for n in ("q", "k", "v"):
        inp[n].requires_grad_(case.backward)
    return inp


def _matmul_softmax(q, k, v, causal: bool):
    T = q.shape[-2]
    z = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
        z = z.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(z, dim=-1), v)


def _backend(case: Case) -> str:
    """The op's backend a kernel contender runs (the forced Triton variants run ``triton``)."""
    return "triton" if case.contender in FORCED else case.contender


def op_fn(case: Case, compiled=None):
    """``f(inputs) -> output`` of a contender."""
    import vidgen_kernels as vk
    causal = case.causal
    if case.contender == COMPILE:
        return lambda i: compiled(i["q"], i["k"], i["v"], causal=causal)
    if case.contender == REFERENCE:
        return lambda i: vk.temporal_attention_reference(i["q"], i["k"], i["v"], causal=causal)
    if case.contender == SDPA:
        return lambda i: F.scaled_dot_product_attention(i["q"], i["k"], i["v"], is_causal=causal)
    if case.contender == MATMUL:
        return lambda i: _matmul_softmax(i["q"], i["k"], i["v"], causal)
    backend = _backend(case)
    return lambda i: vk.temporal_attention(i["q"], i["k"], i["v"], causal=causal, backend=backend)


def step_fn(case: Case, f, inp: dict):
    """The timed unit: forward, or forward + ``torch.autograd.grad`` of q, k, v."""
    if not case.backward:
        return lambda: f(inp)
    leaves = (inp["q"], inp["k"], inp["v"])

    def run():
        return torch.autograd.grad(f(inp), leaves, inp["dout"])
    return run


def _results(case: Case, f, inp: dict) -> list[torch.Tensor]:
    """Output (and q/k/v gradients) in the [B, T, S, H, D] layout."""
    out = f(inp)
    res = [out]
    if case.backward:
        res += list(torch.autograd.grad(out, (inp["q"], inp["k"], inp["v"]), inp["dout"]))
    if case.contender in PERMUTED:
        res = [_from_seq(t, case.dims) for t in res]
    return [t.detach() for t in res]


_REF_CACHE: dict = {}  # one group's reference results (outputs, gradients), reused by its cases


def check_against_reference(case: Case, f, inp: dict) -> float:
    ref_case = dataclasses.replace(case, contender=REFERENCE)
    key = (case.group, case.causal)
    if key not in _REF_CACHE:
        _REF_CACHE.clear()
        _REF_CACHE[key] = _results(ref_case, op_fn(ref_case), make_inputs(ref_case, 0))
    return common.assert_rel_err(case, _results(case, f, inp), _REF_CACHE[key])


def _unavailable(case: Case) -> str | None:
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if case.contender in (REFERENCE, COMPILE, SDPA, MATMUL, COPY):
        return None
    return common.kernel_unavailable(_backend(case), case.device, "temporal_attn_fwd_{backend}",
                                     "temporal attention")


def test_temporal_attention(benchmark, case: Case, request):
    if case.contender not in FORCED:
        return _bench(benchmark, case, request)
    from vidgen_kernels.triton_kernels.temporal_attention import tiled_kernels
    with tiled_kernels(FORCED[case.contender]):  # forward and backward launches alike
        try:
            _bench(benchmark, case, request)
        except ValueError as e:
            if "resident kernels (tiled=False)" not in str(e):
                raise  # (a tiled kernel that does not build is a failure, not a skip)
            pytest.skip(f"{case.contender} cannot run this case: {e}")


def _compile(case: Case, inp: dict):
    """torch.compile of the reference function, compiled and warmed up on ``inp``."""
    import vidgen_kernels as vk
    return common.compile_contender(vk.temporal_attention_reference,
                                    lambda c: step_fn(case, op_fn(case, c), inp)(), case.device)


def _bench(benchmark, case: Case, request):
    benchmark.group = case.group
    why = _unavailable(case)
    if why is not None:
        pytest.skip(f"{case.contender} unavailable on {case.device}: {why}")

    quick = request.config.getoption("--quick")
    if quick and case.contender == COMPILE:
        pytest.skip("--quick: torch.compile contender skipped (compiling takes 5-30 s per case on "
                    "CPU, the rest of the quick run a few seconds)")
    pol = common.heavy_policy(quick, case.device)
    nbytes, bytes_desc = bytes_moved(case)
    info = {}

    if case.contender == COPY:  # the bandwidth peer: a copy moving bytes_moved bytes
        n_sets = common.rotation_sets(nbytes, case.device)
        steps = [common.copy_bytes_step(nbytes, case.dtype, case.device, i) for i in range(n_sets)]
    else:
        n_sets = common.rotation_sets(set_bytes(case), case.device)
        sets = [make_inputs(case, i) for i in range(n_sets)]
        compiled = None
        if case.contender == COMPILE:
            compiled, info["compile_s"] = _compile(case, sets[0])
        f = op_fn(case, compiled)
        if case.contender != REFERENCE:
            try:
                info["max_rel_err_vs_reference"] = check_against_reference(case, f, sets[0])
            except (NotImplementedError, BackendUnavailableError) as e:
                pytest.skip(f"{case.contender} cannot run this case: {type(e).__name__}: {e}")
        steps = [step_fn(case, f, s) for s in sets]
        if case.contender in KERNEL_BACKENDS[case.device]:  # reference steps for the pairs
            ref_f = op_fn(dataclasses.replace(case, contender=REFERENCE))
            ref_steps = [step_fn(case, ref_f, s) for s in sets]
        del sets
    call = common.rotate(steps)

    median_s = common.measure(benchmark, request, call, case.device, pol, case.id, info)
    if case.contender in KERNEL_BACKENDS[case.device]:
        pairs = 1 if quick else (10 if case.device == "cuda" else 6)
        info.update(common.paired_speedup(call, common.rotate(ref_steps), case.device, pairs,
                                          "paired_vs_reference"))
        del ref_steps
    B, T, S, H, D = case.dims
    fl = None if case.contender == COPY else flops(case)
    info["gflops"], info["gflops_cuda_events"] = common.per_second(fl, info)
    info["gbps"], _ = common.per_second(nbytes, info)
    info.update(
        op=OP,
        direction=case.direction,
        contender=case.contender,
        backend=(case.contender if case.contender not in (COMPILE, SDPA, MATMUL, COPY) else
                 f"{REFERENCE} (torch.compile)" if case.contender == COMPILE else None),
        inputs=("[B*S, H, T, D] contiguous, permuted before timing" if case.contender in PERMUTED
                else "[B, T, S, H, D] contiguous"),
        causal=case.causal,
        dtype=common.dtype_name(case.dtype),
        shape=[B, T, S, H, D],
        spatial=case.grid,
        device=case.device,
        device_name=common.device_name(case.device),
        flops=fl,
        matmul_peak_flops=fl and common.matmul_peak_flops(case.device, case.dtype),
        flops_counted=("4*B*S*H*D" + (" * T(T+1)/2 (causal)" if case.causal else " * T^2") +
                       (" * 3.5 (fwd+bwd)" if case.backward else "")),
        bytes_moved=nbytes,
        bytes_counted=bytes_desc,
        input_sets=n_sets,
    )
    benchmark.extra_info.update(info)
    del call, steps, median_s
    common.release(case.device, case.contender == COMPILE)
