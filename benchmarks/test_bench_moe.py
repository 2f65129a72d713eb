"""Benchmarks of the grouped-GEMM MoE FFN (``vidgen_kernels.moe_ffn``).

Run::

    python -m pytest benchmarks/test_bench_moe.py --benchmark-json /tmp/m.json   # full
    python -m pytest benchmarks/test_bench_moe.py --quick                         # smoke
    python benchmarks/summarize.py /tmp/m.json                                    # tables

Cases: direction (fwd, fwd+bwd, jvp) x shape ``(E, C, F, N)`` x device x contender, top-2 routing,
``gelu`` (tanh), biases on, router logits random normal (roughly balanced experts).
CPU (fp32): ``(4, 512, 2048, 4096)``, ``(8, 512, 2048, 4096)`` (the issue's CPU set) and the
many-small-experts set ``(32|64, 256, 512, 2048|8192)``. GPU (bf16): E in {4, 8, 16},
C=1152, F=4608, N in {4096, 16384}. Each (direction, shape, dtype, device) is one
pytest-benchmark group. Contenders:

* every kernel backend of ``moe_ffn`` on the device (``cpu``; ``triton`` on CUDA);
* on CUDA (fwd, fwd+bwd) ``triton-small-tiles``: the ``triton`` backend with the grouped GEMMs'
  first tiles (``gemm_tiles(small=True)``: 64 x 64 x 32, and 32-row weight-gradient tiles that
  compile to ``mma.sync`` on Hopper), against which the current tensor-core tiles (chosen from
  compiler reports, not yet timed) are judged;
* ``reference``: ``moe_ffn_reference``, the seed's per-expert loop with boolean-mask gathers
  (one ``mask.any()`` host sync per expert and slot on GPU);
* ``torch.compile``: ``torch.compile(moe_ffn_reference, dynamic=True)`` (fwd and fwd+bwd, on
  ``COMPILE_SHAPES`` only: compiling takes 10-30 s per case; skipped under ``--quick``). The loop
  breaks the graph at every ``mask.any()``; ``dynamic=True`` compiles each piece once for any
  token count (with static shapes every routing recompiles, and dynamo gives up after 8), so the
  compiled pieces are reused across routings; compiled outside the timed region;
* ``padded-bmm``: route, sort, scatter the tokens into a ``[E, capacity, C]`` buffer padded to
  the largest expert (``capacity`` read on the host: one sync), two ``torch.bmm``, gather back,
  weighted sum (PyTorch autograd);
* ``grouped_mm``: the same pipeline as the kernel backends with the contract's PyTorch kernels
  (``moe_pipeline(..., "torch")``): ``torch._grouped_mm`` for the expert GEMMs where it applies;
* ``dense``: a reference point (not a ceiling: its bias add and tanh-GELU are unfused eager
  passes): one dense FFN of the same total work, ``[N*k, C] @ [C, F]`` ->
  gelu -> ``@ [F, C]`` (no routing, no permutation), with bias.

The timed unit is the forward, or forward + ``torch.autograd.grad`` of every leaf (x, router
logits, w1, w2, b1, b2; dense: x, its weights and biases). Work model (``extra_info``):
``flops`` = ``4 * N * k * C * F`` for the forward (two GEMMs over the N*k routed rows), times 3
for fwd+bwd, times 2 for jvp; ``gflops`` = flops / median.

Direction ``jvp``: ``torch.func.jvp`` w.r.t. x and the router logits along random tangents (what
sCM / MeanFlow training of a MoE DiT runs: the tangent enters a MoE layer on its input, and on
the logits through the router), on fewer shapes (``JVP_SHAPES``). Contenders there: the kernel
backends (their forward-mode path), ``reference`` (jvp of the seed's loop: what ``auto`` ran under
jvp before the kernels had a forward-mode derivative), ``grouped_mm`` (the same forward-mode
stages on the contract's PyTorch kernels) and ``dense`` (jvp of the dense FFN; tangent on x);
``padded-bmm`` routes through a custom op without a forward-mode derivative and is left out.
Work: the forward's two GEMMs plus the tangent's two. Timing: ``common.measure`` (calibration, then
``benchmark.pedantic``), ``common.policy`` shortened for the full CPU shapes (calls of 0.1-3 s).
Every non-reference MoE contender is checked against the reference once before timing (the
reference's results are computed once per group and reused).

Paired speedup: in the kernel backend's case the kernel and the dense FFN (the reference point) are also
timed in interleaved pairs (``common.paired_speedup``; 4 pairs on CPU, 10 on CUDA):
``extra_info["paired_vs_dense"]`` = median of ``t_dense / t_kernel`` (the CPU target, "within
1.2x of the dense GEMM", is this >= 1 / 1.2 = 0.83). Separately timed medians on the shared
2-core VM drift by up to 30 % between cases; a pair sees one machine state.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import common
from common import COMPILE, REFERENCE

OP = "moe_ffn"
PADDED = "padded-bmm"
GROUPED = "grouped_mm"
DENSE = "dense"
TOP_K = 2
ACT = "gelu"
KERNEL_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}  # cuda: what auto picks on a GPU
# CUDA: the triton backend with the grouped GEMMs' first (small) tiles, a variant of ours
SMALL_TILES = "triton-small-tiles"
FULL_SHAPES = {
    "cpu": ((4, 512, 2048, 4096), (8, 512, 2048, 4096), (32, 256, 512, 2048),
            (64, 256, 512, 2048), (32, 256, 512, 8192), (64, 256, 512, 8192)),
    "cuda": tuple((E, 1152, 4608, N) for E in (4, 8, 16) for N in (4096, 16384)),
}
QUICK_SHAPES = {"cpu": ((4, 64, 256, 512), (32, 32, 64, 512)),
                "cuda": ((8, 256, 1024, 2048),)}
JVP = "jvp"
DIRECTIONS = (*common.DIRECTIONS, JVP)
JVP_SHAPES = {"cpu": ((8, 512, 2048, 4096), (64, 256, 512, 2048)),
              "cuda": ((8, 1152, 4608, 16384),)}
_JVP_WRT = ("x", "router_logits")  # the inputs with a tangent (dense: x only)
# the shapes with a torch.compile contender (fwd, fwd+bwd): the CPU set; one GPU shape
COMPILE_SHAPES = {"cpu": ((4, 512, 2048, 4096), (8, 512, 2048, 4096)),
                  "cuda": ((8, 1152, 4608, 16384),)}


def contenders(device_type: str, direction: str = "fwd", shape: tuple = ()) -> tuple[str, ...]:
    if direction == JVP:
        return (*KERNEL_BACKENDS[device_type], REFERENCE, GROUPED, DENSE)
    small = (SMALL_TILES,) if device_type == "cuda" else ()
    comp = (COMPILE,) if shape in COMPILE_SHAPES[device_type] else ()
    return (*KERNEL_BACKENDS[device_type], *small, REFERENCE, *comp, PADDED, GROUPED, DENSE)


@dataclass(frozen=True)
class Case:
    direction: str
    shape: tuple  # (E, C, F, N)
    device: str
    dtype: torch.dtype
    contender: str

    @property
    def id(self) -> str:
        E, C, F_, N = self.shape
        return (f"{OP}-{self.direction}-E{E}xC{C}xF{F_}xN{N}-{common.dtype_name(self.dtype)}-"
                f"{self.device}-{self.contender}")

    @property
    def group(self) -> str:
        E, C, F_, N = self.shape
        return (f"{OP} {self.direction} E={E} C={C} F={F_} N={N} top{TOP_K} "
                f"{common.dtype_name(self.dtype)} {self.device}")

    @property
    def backward(self) -> bool:
        return self.direction == "fwd+bwd"


def make_cases(quick: bool, devices) -> list[Case]:
    def shapes(dev, direction):
        if quick:
            return QUICK_SHAPES[dev]
        return JVP_SHAPES[dev] if direction == JVP else FULL_SHAPES[dev]
    return [Case(direction, shape, dev, common.DTYPES[dev], c)
            for dev in devices for direction in DIRECTIONS for shape in shapes(dev, direction)
            for c in contenders(dev, direction, shape)]


def pytest_generate_tests(metafunc):
    common.parametrize_cases(metafunc, make_cases)


def flops(case: Case) -> int:
    E, C, F_, N = case.shape
    f = 4 * N * TOP_K * C * F_
    return 3 * f if case.backward else 2 * f if case.direction == JVP else f


# ----------------------------------------------------------------------------------------------
# inputs and contenders
# ----------------------------------------------------------------------------------------------
def make_inputs(case: Case, seed: int) -> dict:
    E, C, F_, N = case.shape
    g = torch.Generator(device=case.device).manual_seed(777 + seed)
    kw = dict(device=case.device, dtype=case.dtype, generator=g)
    if case.contender == DENSE:
        inp = dict(x=torch.randn(N * TOP_K, C, **kw), w1=torch.randn(C, F_, **kw) * C ** -0.5,
                   w2=torch.randn(F_, C, **kw) * F_ ** -0.5, b1=torch.randn(F_, **kw) * 0.1,
                   b2=torch.randn(C, **kw) * 0.1)
    else:
        inp = dict(x=torch.randn(N, C, **kw), router_logits=torch.randn(N, E, **kw),
                   w1=torch.randn(E, C, F_, **kw) * C ** -0.5,
                   w2=torch.randn(E, F_, C, **kw) * F_ ** -0.5,
                   b1=torch.randn(E, F_, **kw) * 0.1, b2=torch.randn(E, C, **kw) * 0.1)
    for t in inp.values():
        t.requires_grad_(case.backward)
    if case.backward:
        rows = inp["x"].shape[0]
        inp["dout"] = torch.randn(rows, C, **kw)
    if case.direction == JVP:
        inp["tangents"] = {k: torch.randn(inp[k].shape, **kw) for k in _JVP_WRT if k in inp}
    return inp


def padded_bmm(x, router_logits, w1, w2, b1, b2):
    """Route and sort as the pipeline, then a ``[E, capacity, C]`` padded buffer and bmm."""
    from vidgen_kernels.ops import moe as M
    N, C = x.shape
    E = w1.shape[0]
    w, idx = torch.ops.vidgen_kernels.moe_route(router_logits, TOP_K, True, "torch")
    order, tok, pos, counts, offs = M.kernel_sort_torch(idx, E)
    cap = int(counts.max())  # host sync
    seg = M.segment_ids(offs, N * TOP_K)
    slot = torch.arange(N * TOP_K, device=x.device) - (offs - counts)[seg]
    dst = seg * cap + slot
    xp = x.new_zeros(E * cap, C).index_copy(0, dst, x.index_select(0, tok))
    h = torch.baddbmm(b1.unsqueeze(1), xp.view(E, cap, C), w1)
    h = F.gelu(h, approximate="tanh")
    y = torch.baddbmm(b2.unsqueeze(1), h, w2).view(E * cap, C).index_select(0, dst)
    ws = w.reshape(-1).index_select(0, order).to(y.dtype)
    out = x.new_zeros(N, C).index_add(0, tok, y * ws.unsqueeze(1))
    return out


def op_fn(case: Case):
    """``f(inputs) -> output tensor`` of a contender."""
    import vidgen_kernels as vk
    from vidgen_kernels.ops import moe as M
    if case.contender == DENSE:
        return lambda i: F.linear(F.gelu(i["x"] @ i["w1"] + i["b1"], approximate="tanh"),
                                  i["w2"].t(), i["b2"])
    args = lambda i: (i["x"], i["router_logits"], i["w1"], i["w2"])  # noqa: E731
    if case.contender in (REFERENCE, COMPILE):  # COMPILE: this, compiled by _bench
        return lambda i: vk.moe_ffn_reference(*args(i), top_k=TOP_K, activation=ACT, b1=i["b1"],
                                              b2=i["b2"]).out
    if case.contender == PADDED:
        return lambda i: padded_bmm(*args(i), i["b1"], i["b2"])
    if case.contender == GROUPED:
        fad = case.direction == JVP  # (the custom ops drop tangents: the forward-mode stages)
        return lambda i: M.moe_pipeline(*args(i), i["b1"], i["b2"], TOP_K, ACT, True, None,
                                        "torch", forward_ad=fad)[0]
    backend = _backend(case)
    return lambda i: vk.moe_ffn(*args(i), top_k=TOP_K, activation=ACT, b1=i["b1"], b2=i["b2"],
                                backend=backend).out


def _backend(case: Case) -> str:
    """The op's backend a kernel contender runs (the small-tiles variant runs ``triton``)."""
    return "triton" if case.contender == SMALL_TILES else case.contender


def _leaves(inp):
    return [v for k, v in inp.items() if k not in ("dout", "tangents")]


def _jvp(f, inp):
    """``(out, tangent)`` of ``torch.func.jvp`` w.r.t. the inputs in ``inp["tangents"]``."""
    names = tuple(inp["tangents"])
    return torch.func.jvp(lambda *p: f(dict(inp, **dict(zip(names, p)))),
                          tuple(inp[k] for k in names), tuple(inp["tangents"].values()))


def step_fn(case: Case, f, inp: dict):
    if case.direction == JVP:
        return lambda: _jvp(f, inp)
    if not case.backward:
        return lambda: f(inp)
    leaves = _leaves(inp)

    def run():
        return torch.autograd.grad(f(inp), leaves, inp["dout"])
    return run


_REF_RESULTS: dict = {}  # the reference's results on the group's seed-0 inputs (one group kept)


def _results(case: Case, f, inp: dict) -> list:
    out = list(_jvp(f, inp)) if case.direction == JVP else [f(inp)]
    if case.backward:
        out += torch.autograd.grad(out[0], _leaves(inp), inp["dout"])
    return [t.detach() for t in out]


def check_against_reference(case: Case, f, inp: dict) -> float:
    """Max relative error of ``f`` vs the reference on ``inp`` (``make_inputs(case, 0)``: the
    same tensors for every contender of the group but dense, so the reference runs once per
    group, not once per contender: at E=64 its forward+backward takes seconds)."""
    if case.group not in _REF_RESULTS:
        _REF_RESULTS.clear()
        ref = op_fn(dataclasses.replace(case, contender=REFERENCE))
        _REF_RESULTS[case.group] = _results(case, ref, inp)
    got, want = _results(case, f, inp), _REF_RESULTS[case.group]
    return common.assert_rel_err(case, got, want, factor=10 if case.dtype != torch.float32 else 1)


def _unavailable(case: Case) -> str | None:
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if case.contender in (REFERENCE, PADDED, DENSE, COMPILE):
        return None
    if case.contender == GROUPED:
        return None if hasattr(torch, "_grouped_mm") else "torch._grouped_mm not in this torch"
    return common.kernel_unavailable(_backend(case), case.device, "moe_route_{backend}", "MoE")


def test_moe(benchmark, case: Case, request):
    if case.contender != SMALL_TILES:
        return _bench(benchmark, case, request)
    from vidgen_kernels.triton_kernels.moe import gemm_tiles
    with gemm_tiles(small=True):  # forward and backward launches alike
        _bench(benchmark, case, request)


def _bench(benchmark, case: Case, request):
    benchmark.group = case.group
    why = _unavailable(case)
    if why is not None:
        pytest.skip(f"{case.contender} unavailable on {case.device}: {why}")
    quick = request.config.getoption("--quick")
    if quick and case.contender == COMPILE:
        pytest.skip("--quick: torch.compile contender skipped (compiling takes 10-30 s per case)")
    pol = common.heavy_policy(quick, case.device)
    if case.device == "cpu" and not quick and case.contender != DENSE:
        # the check against the reference (or, for the reference, its run for the check cache)
        # already called this contender in this process: no separate untimed call (calls of up
        # to 4 s; the calibration call before the rounds stays)
        pol = dataclasses.replace(pol, warmup_calls=0)
    info = {}
    sets = [make_inputs(case, 0)]
    f = op_fn(case)
    if case.contender == COMPILE:
        compiled, info["compile_s"] = common.compile_contender(
            f, lambda c: step_fn(case, c, sets[0])(), case.device, dynamic=True)
        f = compiled
    if case.contender not in (REFERENCE, DENSE):
        info["max_rel_err_vs_reference"] = check_against_reference(case, f, sets[0])
    steps = [step_fn(case, f, s) for s in sets]
    call = common.rotate(steps)
    common.measure(benchmark, request, call, case.device, pol, case.id, info)
    ours = case.contender in KERNEL_BACKENDS[case.device] or case.contender == SMALL_TILES
    if ours:  # vs the dense FFN, in interleaved pairs
        dc = dataclasses.replace(case, contender=DENSE)
        dense_step = step_fn(dc, op_fn(dc), make_inputs(dc, 0))
        dense_step()  # warm-up
        pairs = 1 if quick else (10 if case.device == "cuda" else 4)
        info.update(common.paired_speedup(call, dense_step, case.device, pairs, "paired_vs_dense"))
        del dense_step
    fl = flops(case)
    info["gflops"], info["gflops_cuda_events"] = common.per_second(fl, info)
    E, C, F_, N = case.shape
    info.update(
        op=OP, direction=case.direction, contender=case.contender,
        backend=_backend(case) if ours else None,
        dtype=common.dtype_name(case.dtype), shape=[E, C, F_, N], top_k=TOP_K, activation=ACT,
        device=case.device, device_name=common.device_name(case.device), flops=fl,
        matmul_peak_flops=common.matmul_peak_flops(case.device, case.dtype),
        flops_counted="4*N*k*C*F" + (" * 3 (fwd+bwd)" if case.backward else
                                     " * 2 (jvp: primal + tangent)" if case.direction == JVP
                                     else ""),
        input_sets=len(sets),
    )
    benchmark.extra_info.update(info)
    del call, steps, sets, f
    common.release(case.device, case.contender == COMPILE)
