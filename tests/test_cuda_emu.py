"""The CUDA C++ kernels (csrc/*.cu) run on the CPU by the emulator of tests/cuda_emu.py.

Nothing CUDA runs on this project's CI machines, yet ``adaln_cuda.cu``, ``rope_cuda.cu`` and
``moe_cuda.cu`` are what the ``cuda`` backend launches on a GPU. Here their code (kernels and
host launchers, through the bindings of csrc/cuda_bindings.cpp) runs with one fiber per CUDA
thread, real ``__syncthreads`` / warp-shuffle semantics and the GPU's launch limits, on CPU
tensors, and is checked the way the other backends are: each public op with its kernels swapped
for the emulated CUDA ones (the op layer's own ``cuda`` code path: buffers, partial-gradient
reductions, the autograd Function), forward and backward, against the float64 reference under
flash-attention's rule, in fp32 / fp16 / bf16, with the threads of a block run in index order
and in reverse order (a missing barrier shows in one of the two).

Every test asserts that the emulator really ran kernels (its launch count), so a test cannot
pass on another backend's kernels.
"""
from __future__ import annotations

import shutil

import pytest
import torch

import cuda_emu
import test_adaln as TA
import test_huge_strides as TH
import test_moe as TM
import test_rope as TR
import vidgen_kernels as vk
from helpers import assert_close_rule
from vidgen_kernels.ops import adaln as adaln_ops
from vidgen_kernels.ops import moe as moe_ops
from vidgen_kernels.ops import rope as rope_ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["float32", "float16", "bfloat16"]

pytestmark = [
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                       reason="no C++ compiler to build the CUDA emulation"),
    pytest.mark.skipif("cpu" not in vk.available_backends("cpu"),
                       reason="the op layer's cpu backend (the C++ extension) is needed to route "
                              "the ops to the emulated kernels"),
]


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.load()


@pytest.fixture(params=["in-order", "reverse"])
def schedule(request, emu):
    emu.set_schedule(request.param == "reverse")
    yield request.param
    emu.set_schedule(False)


@pytest.fixture
def ran(emu):
    """Resets the emulator; after the test, asserts that it launched kernels."""
    emu.reset()
    emu.set_optin_smem(232448)
    yield emu
    assert emu.stats()["launches"] > 0, "the test ran no emulated CUDA kernel"


def _on_emu_for_cpu(monkeypatch, module, name: str, emulated):
    """Replace ``module.name`` (a backend name -> kernels function) so that ``"cpu"`` gives
    ``emulated`` and every other backend what it gave before."""
    orig = getattr(module, name)
    monkeypatch.setattr(module, name, lambda backend: emulated if backend == "cpu" else orig(backend))


@pytest.fixture
def adaln_on_emu(monkeypatch, emu):
    """``backend="cpu"`` of the AdaLN ops runs the emulated CUDA kernels."""
    _on_emu_for_cpu(monkeypatch, adaln_ops, "_kernels", (lambda *a: emu.adaln_fwd_cuda(*a, 0),
                                                         lambda *a: emu.adaln_bwd_cuda(*a, 0)))


@pytest.fixture
def rope_on_emu(monkeypatch, emu):
    _on_emu_for_cpu(monkeypatch, rope_ops, "_rope_kernel", lambda x, *a: emu.rope_cuda(x, *a, 0))


@pytest.fixture
def moe_on_emu(monkeypatch, emu):
    """``backend="cpu"`` of ``moe_ffn`` runs the ``cuda`` backend's kernel set: emulated CUDA
    routing / permutation / combine, PyTorch grouped GEMMs (Triton's are tested elsewhere)."""
    monkeypatch.setattr(moe_ops._CudaKernels, "_C", staticmethod(lambda: emu))
    monkeypatch.setattr(moe_ops._CudaKernels, "_stream", staticmethod(lambda t: 0))
    monkeypatch.setattr(moe_ops._CudaKernels, "_gemms", staticmethod(lambda: moe_ops._TorchKernels))
    _on_emu_for_cpu(monkeypatch, moe_ops, "_kernels", moe_ops._CudaKernels)


# ----------------------------------------------------------------------------------------------
# AdaLN
# ----------------------------------------------------------------------------------------------
AC = TA.Case
# the CUDA launch paths by channel count: warp per row (C <= 256), block per row with 8 / 16 /
# 32 elements per thread (<= 2048 / 8192 / 16384) forward; 8 / 16 elements, up to 512 / 1024
# threads backward; VEC 1 (C not a multiple of 16 bytes) and the vector paths
ADALN_CASES = TA.CASES + [
    AC(2, 5, 260, shift="F5", scale="F1", gate="BC", gated=True, affine=True),
    AC(1, 4, 2056, gated=True, affine=True, norm="rms", x_layout="T"),
    AC(2, 3, 4104, shift="F3", scale="1C", gate="F1", gated=True, affine=True),
    AC(1, 3, 8200, gated=True, affine=True),
    AC(1, 2, 12290, shift="BNC", scale="F2", norm="rms"),
    AC(1, 2, 16384, shift="F2", scale="F1", gate="F1", gated=True, affine=True),
]


def _adaln_check(case, dtype):
    """test_adaln's check (the op, forward and backward, against the float64 reference) with the
    ``cpu`` backend's kernels replaced by the emulated CUDA ones (fixture ``adaln_on_emu``)."""
    TA.test_matches_reference("cpu", "cpu", dtype, case)


@pytest.mark.parametrize("case", ADALN_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("programs", ["cpu", "h100"])
def test_adaln_matches_reference(adaln_on_emu, ran, monkeypatch, programs, dtype, case):
    """``programs``: how many backward programs the op layer aims for, hence rows per chunk: this
    machine's (4 x threads: several rows per program) or an H100's (4 x 132 SMs: one row)."""
    if programs == "h100":
        monkeypatch.setattr(adaln_ops, "_parallel_slots", lambda *a: 4 * 132)
    _adaln_check(case, dtype)


@pytest.mark.parametrize("C", [64, 1152, 4097, 12290])
def test_adaln_constant_rows(adaln_on_emu, ran, C):
    """test_adaln's constant-row check on the CUDA kernels (warp-per-row and the block paths
    with 8 / 16 / 32 elements per thread): the second reduction's sum of deviations corrects
    the mean, so a row of one value normalises to exactly 0."""
    TA.test_constant_rows_normalise_to_zero("cpu", "cpu", torch.float32, C)


@pytest.mark.parametrize("case", [c for c in ADALN_CASES if c.C in (7, 33, 1000, 260, 4104)], ids=str)
def test_adaln_reverse_schedule(adaln_on_emu, ran, schedule, case):
    _adaln_check(case, torch.float16)
    st = ran.stats()
    assert st["shuffles"] > 0
    if case.C > 256:  # block-per-row paths: a shared-memory step per reduction
        assert st["barriers"] > 0


@pytest.mark.parametrize("C,optin,path", [
    (1000, 232448, "default"),     # 5 x 4000 B: under 48 KiB
    (4104, 232448, "opt-in"),      # 82 KB: opt-in shared memory (H100)
    (4104, 65536, "in-place"),     # a device with 64 KiB: accumulate in the partial buffers
    (16384, 232448, "in-place"),   # 328 KB > 227 KiB: in place on every GPU
], ids=lambda v: str(v))
def test_adaln_backward_shared_memory_paths(adaln_on_emu, ran, C, optin, path):
    ran.set_optin_smem(optin)
    # five partial accumulators in the backward: dgate, dshift, dscale, dweight, dbias
    _adaln_check(TA.Case(2, 6, C, shift="F3", scale="F2", gate="F1", gated=True, affine=True),
                 torch.float32)
    smem = ran.stats()["max_dyn_smem"]
    if path == "default":
        assert 0 < smem <= 48 * 1024
    elif path == "opt-in":
        assert 48 * 1024 < smem <= optin
    else:
        assert smem == 0


def test_adaln_launch_rejects_too_many_channels(emu, ran):
    x = torch.randn(1, 2, 16385)
    p = torch.zeros(1, 1, 16385)
    out, mean, rstd = torch.empty_like(x), torch.empty(1, 2), torch.empty(1, 2)
    with pytest.raises(RuntimeError, match="C must be in"):
        emu.adaln_fwd_cuda(x, None, None, p, p, None, None, out, None, mean, rstd, 1e-6, False, 0)
    # and a valid call runs (the fixture asserts a launch)
    x = x[..., :16384].contiguous()
    p = p[..., :16384]
    out = torch.empty_like(x)
    emu.adaln_fwd_cuda(x, None, None, p, p, None, None, out, None, mean, rstd, 1e-6, False, 0)
    torch.testing.assert_close(out, vk.adaln_modulate_reference(x, p, p), atol=1e-4, rtol=1e-4)


# Raw kernels on guarded memory: every input a view whose storage has NaN around (between rows)
# or between (every other element) its elements, every output inside a buffer filled with a
# sentinel. A read of anything but the tensor's elements turns the result into NaN, a write
# outside an output changes a sentinel, an output element the kernel does not write keeps one.
SENTINEL = 1234.5
PAD = 16  # elements before and after each output (keeps 16-byte alignment)


def _nan_holed(vals: torch.Tensor, how: str) -> torch.Tensor:
    """``vals`` [..., C] as a view into NaN-filled storage: rows padded ("pad") or every other
    element ("holes")."""
    *lead, C = vals.shape
    if how == "pad":  # unit stride, 8 NaN after each row (the vector paths' case)
        big = torch.full((*lead, C + 8), float("nan"), dtype=vals.dtype)
        v = big[..., :C]
    else:
        big = torch.full((*lead, 2 * C), float("nan"), dtype=vals.dtype)
        v = big[..., ::2]
    v.copy_(vals)
    return v


class _Guarded:
    def __init__(self):
        self.bufs = []

    def out(self, shape, dtype):
        n = 1
        for d in shape:
            n *= d
        buf = torch.full((n + 2 * PAD,), SENTINEL, dtype=dtype)
        self.bufs.append((buf, n))
        return buf[PAD:PAD + n].view(shape)

    def check(self):
        for buf, n in self.bufs:
            assert torch.all(buf[:PAD] == SENTINEL) and torch.all(buf[PAD + n:] == SENTINEL), \
                "a kernel wrote outside its output"


@pytest.mark.parametrize("C", [7, 40, 264, 2056, 4104])
@pytest.mark.parametrize("how", ["pad", "holes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_adaln_kernels_touch_only_their_elements(emu, ran, dtype, how, C):
    g = torch.Generator().manual_seed(C)
    B, N, R = 2, 12, 3
    tpr = {"gate": 4, "shift": 6, "scale": 12}   # F = 3, 2, 1: chunks of 3 rows straddle rows of 4

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)
    x, y = _nan_holed(rnd(B, N, C), how), _nan_holed(rnd(B, N, C), how)
    gate, shift, scale = (_nan_holed(rnd(B, N // tpr[k], C, scale=0.5), how) for k in ("gate", "shift", "scale"))
    w32 = (1 + 0.3 * torch.randn(C, generator=g))
    weight, bias = _nan_holed(w32, how), _nan_holed(0.3 * torch.randn(C, generator=g), how)
    for is_rms in (False, True):
        gd = _Guarded()
        out, h = gd.out((B, N, C), dtype), gd.out((B, N, C), dtype)
        mean, rstd = gd.out((B, N), torch.float32), gd.out((B, N), torch.float32)
        emu.adaln_fwd_cuda(x, y, gate, shift, scale, weight, bias, out, h, mean, rstd, 1e-5, is_rms, 0)
        want = [torch.empty_like(t) for t in (out, h, mean, rstd)]
        adaln_ops.kernel_fwd_torch(x, y, gate, shift, scale, weight, bias, *want, 1e-5, is_rms)
        gd.check()
        tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        for name, got, w in zip(("out", "h", "mean", "rstd"), (out, h, mean, rstd), want):
            torch.testing.assert_close(got.float(), w.float(), atol=tol * 4, rtol=tol, msg=name)

        dout, dh = _nan_holed(rnd(B, N, C), how), _nan_holed(rnd(B, N, C), how)
        NC = -(-N // R)
        gd = _Guarded()
        dx, dy = gd.out((B, N, C), dtype), gd.out((B, N, C), dtype)
        parts = {k: gd.out((B, NC, 2, C), torch.float32) for k in ("gate", "shift", "scale")}
        dw, db = gd.out((B, NC, C), torch.float32), gd.out((B, NC, C), torch.float32)
        args = (dout, dh, h, y, gate, scale, weight, bias, mean, rstd)
        emu.adaln_bwd_cuda(*args, dx, dy, parts["gate"], parts["shift"], parts["scale"], dw, db,
                           tpr["gate"], tpr["shift"], tpr["scale"], R, is_rms, 0)
        gd.check()
        want = [torch.empty_like(t) for t in (dx, dy, parts["gate"], parts["shift"], parts["scale"], dw, db)]
        adaln_ops.kernel_bwd_torch(*args, *want, tpr["gate"], tpr["shift"], tpr["scale"], R, is_rms)
        for name, got, w in zip(("dx", "dy", "dgate", "dshift", "dscale", "dweight", "dbias"),
                                (dx, dy, parts["gate"], parts["shift"], parts["scale"], dw, db), want):
            scale_ = w.float().abs().max().item() + 1e-6
            torch.testing.assert_close(got.float(), w.float(), atol=tol * 8 * scale_, rtol=tol * 4, msg=name)


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------
R = TR.Case
ROPE_CASES = TR.CASES + [
    R(1, 2 * 3 * 4 + 3, 5, 128, offset=3, layout="qkv"),   # H * D/2 = 320 pairs > 256 threads
    R(2, 24, 1, 6, grid=(2, 3, 4), interleaved=False),      # 3 pairs: a 32-thread block, mostly idle
]


_TR_DIMS = TR._dims


def _rope_dims(case):
    return (2, 2, 2) if case.D == 6 else _TR_DIMS(case)


@pytest.mark.parametrize("case", ROPE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_rope_matches_reference(rope_on_emu, ran, monkeypatch, dtype, case):
    monkeypatch.setattr(TR, "_dims", _rope_dims)
    TR.test_matches_reference("cpu", "cpu", dtype, case)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_unaligned_base_and_reverse_schedule(rope_on_emu, ran, schedule, interleaved):
    """x starting one element into its storage: the paired-access path must not be taken."""
    g = torch.Generator().manual_seed(5)
    buf = torch.randn(2 * 11 * 3 * 8 + 1, generator=g).half()
    x = buf[1:].view(2, 11, 3, 8)
    cos, sin = vk.rope3d_freqs(1, 3, 3, 8, axes_dims=(0, 4, 4))
    got = vk.apply_rope(x, cos, sin, interleaved=interleaved, offset=2, backend="cpu")
    want = vk.apply_rope(x, cos, sin, interleaved=interleaved, offset=2, backend="reference")
    assert torch.equal(got, want)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_rope_huge_strides(rope_on_emu, ran, dim):
    """Elements more than 2**31 elements apart (each stride under 2**31): no int32 offset
    wraps (test_huge_strides.py)."""
    TH.test_apply_rope("cpu", "cpu", torch.float16, dim)


@pytest.mark.parametrize("how", ["pad", "holes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_rope_kernel_touches_only_its_elements(emu, ran, dtype, how):
    g = torch.Generator().manual_seed(11)
    B, S, H, D, off = 2, 17, 3, 10, 3
    x = _nan_holed(torch.randn(B, S, H, D, generator=g).to(dtype), how)
    cos, sin = vk.rope3d_freqs(2, 3, 2, D, axes_dims=(2, 4, 4))
    for inter in (True, False):
        for conj in (False, True):
            gd = _Guarded()
            out = gd.out((B, S, H, D), dtype)
            emu.rope_cuda(x, cos, sin, out, off, inter, conj, 0)
            gd.check()
            want = torch.empty_like(out)
            rope_ops.rope_kernel_torch(x, cos, sin, want, off, inter, conj)
            assert torch.equal(out, want), (inter, conj)


# ----------------------------------------------------------------------------------------------
# MoE routing / permutation / combine
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation,bias,top_k", TM.COMBOS, ids=TM.COMBO_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_moe_matches_reference(moe_on_emu, ran, dtype, activation, bias, top_k):
    TM.check("cpu", dtype, activation=activation, bias=bias, top_k=top_k)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in vk.available_backends("cpu"),
                    reason="Triton's interpreter is not available here")
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_moe_cuda_backend_as_on_a_gpu(moe_on_emu, ran, monkeypatch, dtype, activation):
    """The ``cuda`` backend's exact composition on a GPU: emulated CUDA routing / permutation /
    combine around Triton's grouped GEMMs (here in the interpreter)."""
    from helpers import interp_fixes_skip
    if dtype == torch.bfloat16 and interp_fixes_skip():
        pytest.skip(f"triton bf16 in the interpreter: {interp_fixes_skip()}")
    from vidgen_kernels.triton_kernels import moe as tk
    monkeypatch.setattr(moe_ops._CudaKernels, "_gemms", staticmethod(lambda: tk.TritonKernels))
    TM.check("cpu", dtype, N=13, C=16, F=24, E=4, top_k=2, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_moe_edge_cases(moe_on_emu, ran, dtype):
    TM.test_tied_logits_lowest_index_wins("cpu", "cpu", dtype)
    TM.test_single_expert("cpu", "cpu", dtype)
    TM.test_expert_index_routing("cpu", "cpu", dtype)
    TM.test_empty_experts("cpu", "cpu", dtype)
    TM.check("cpu", dtype, N=300, C=72, F=40, E=7, top_k=3)  # > 128 tokens: several route blocks


@pytest.mark.parametrize("huge", ["x", "w1", "w2"])
def test_moe_huge_strides(moe_on_emu, ran, huge):
    """Token rows / experts more than 2**31 elements apart (test_huge_strides.py)."""
    TH.test_moe("cpu", "cpu", torch.float16, huge)


@pytest.mark.parametrize("dim", [0, 1])
def test_adaln_huge_strides(adaln_on_emu, ran, dim):
    """x / y / modulation with batch or token strides that put elements more than 2**31
    elements apart (test_huge_strides.py)."""
    TH.test_adaln("cpu", "cpu", torch.float16, dim)


def test_moe_route_matches_cpu_kernel(emu, ran, schedule):
    """Routing is exact: the same experts and (to rounding) weights as the C++ CPU kernel, ties
    to the lowest index, for any E (no per-thread array), with and without renormalisation."""
    g = torch.Generator().manual_seed(7)
    for N, E, k in ((1, 1, 1), (200, 6, 2), (77, 64, 8), (33, 5, 5)):
        lg = torch.randn(N, E, generator=g).round(decimals=1)  # many ties
        # non-finite rows: NaN ranks above every number, as in torch.sort (the C++ kernels
        # used to skip NaN: other experts than the PyTorch path's, on CUDA repeated ones)
        special = (float("nan"), float("inf"), -float("inf"))
        for r in range(1, N, 3):
            lg[r, torch.randint(0, E, (2,), generator=g)] = special[r % 3]
        lg[N // 2] = float("nan")
        for norm in (True, False):
            w, idx = emu.moe_route_cuda(lg, k, norm, 0)
            w_ref, idx_ref = torch.ops.vidgen_kernels.moe_route(lg, k, norm, "cpu")
            _, idx_torch = torch.ops.vidgen_kernels.moe_route(lg, k, norm, "torch")
            assert torch.equal(idx_ref, idx_torch), (N, E, k, norm)
            assert torch.equal(idx, idx_ref), (N, E, k, norm)
            torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6, equal_nan=True)


def test_moe_gather_combine_strided(emu, ran):
    g = torch.Generator().manual_seed(8)
    for dt in DTYPES:
        src = torch.randn(40, 3 * 37, generator=g).to(dt)[:, ::3]   # column stride 3
        rows = torch.randint(0, 40, (55,), generator=g)
        torch.testing.assert_close(emu.moe_gather_cuda(src, rows, 0), src[rows], atol=0, rtol=0)
        y = torch.randn(60, 300, generator=g).to(dt)
        pos = torch.randint(0, 60, (25, 3), generator=g)
        w = torch.rand(25, 3, generator=g)
        want = (y.float()[pos] * w[..., None]).sum(1).to(dt)
        got = emu.moe_combine_cuda(y, pos, w, 0)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2 if dt != torch.float32 else 1e-5, rtol=1e-2)
        torch.testing.assert_close(emu.moe_combine_cuda(y, pos, None, 0).float(),
                                   y.float()[pos].sum(1).to(dt).float(), atol=1e-2, rtol=1e-2)


def test_kernel_image_check_binding(emu):
    # the binding behind backends.why_unavailable("cuda") on a GPU: "" = the kernels can run
    assert emu.cuda_kernel_image_error(0) == ""


@pytest.mark.parametrize("bad", [-1, 40])
def test_moe_gather_combine_trap_on_out_of_range_index(emu, bad):
    # the bindings are reachable by anyone (vidgen_kernels._C); an index outside the source's
    # rows must abort the kernel (a GPU's device-side trap), never read out of bounds
    src = torch.randn(40, 8)
    rows = torch.tensor([0, 39, bad, 1])
    with pytest.raises(RuntimeError, match="__trap"):
        emu.moe_gather_cuda(src, rows, 0)
    pos = torch.tensor([[0, 1], [bad, 2]])
    with pytest.raises(RuntimeError, match="__trap"):
        emu.moe_combine_cuda(src, pos, None, 0)
    emu.reset()
    # in range, right at the edges: no trap
    torch.testing.assert_close(emu.moe_gather_cuda(src, torch.tensor([0, 39]), 0), src[[0, 39]])


# ----------------------------------------------------------------------------------------------
# the emulator itself: it must catch what a GPU would
# ----------------------------------------------------------------------------------------------
def test_emulator_catches_a_missing_barrier(emu, ran, schedule):
    err, bad = emu.selftest("race")
    err2, good = emu.selftest("no_race")
    want = [float((t + 1) % 64) for _ in range(2) for t in range(64)]
    assert err == err2 == "cudaSuccess"
    assert good == want
    assert bad != want  # shared memory starts poisoned: the unsynchronised read sees it
    # static __shared__ arrays too, in every block: block 0 wrote its copy, block 1 reads NaN
    err, out = emu.selftest("uninit_static_smem")
    assert err == "cudaSuccess" and out[:64] == [1.0] * 64
    assert all(v != v for v in out[64:])


def test_emulator_warp_shuffles(emu, ran):
    err, out = emu.selftest("butterfly")
    assert err == "cudaSuccess" and out == [float(sum(range(32)))] * 32
    with pytest.raises(RuntimeError, match="deadlock: 16 lanes of warp 0"):
        emu.selftest("divergent_shuffle")
    with pytest.raises(RuntimeError, match="deadlock: 16 lanes of warp 1 .* do not exist"):
        emu.selftest("partial_warp_shuffle")


def test_emulator_launch_limits(emu, ran):
    assert emu.selftest("too_many_threads")[0] == "cudaErrorInvalidConfiguration"
    with pytest.raises(RuntimeError, match="256 threads per block, __launch_bounds__ 128"):
        emu.selftest("launch_bounds")
    assert emu.selftest("smem_without_optin")[0] == "cudaErrorInvalidValue"
    err, out = emu.selftest("smem_with_optin")
    assert err == "cudaSuccess" and out == [16384.0] * 32
    with pytest.raises(RuntimeError, match="write past the end of the 128 bytes"):
        emu.selftest("smem_overflow")
    with pytest.raises(RuntimeError, match="misaligned __ldg of 16 bytes"):
        emu.selftest("misaligned_ldg")


def test_emulator_conversions_match_torch(emu):
    """__float2half_rn / __half2float / __float2bfloat16_rn of the emulator, bit for bit against
    torch's conversions: every float16 value, and float32 values around every float16 / bfloat16
    rounding boundary (ties to even), subnormals, overflow to inf, NaN."""
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    f = h.view(torch.float16).float()
    back = emu.half_to_float(h.contiguous())
    assert torch.equal(back.isnan(), f.isnan())
    ok = ~f.isnan()
    assert torch.equal(back[ok].view(torch.int32), f[ok].view(torch.int32))
    # float32 values: every float16 value, the midpoints between neighbours, and one ulp around
    fin = f[torch.isfinite(f)].double().unique()
    mids = (fin[1:] + fin[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(200000, generator=g).double() * 10.0 ** torch.randint(-9, 6, (200000,), generator=g)
    xs = torch.cat([fin, mids, wide]).float()
    xs = torch.cat([xs, torch.nextafter(xs, torch.tensor(float("inf"))),
                    torch.nextafter(xs, torch.tensor(float("-inf"))),
                    torch.tensor([65504.0, 65519.99, 65520.0, 1e30, float("inf"), -float("inf"), 0.0, -0.0])])
    want = xs.half().view(torch.int16)
    got = emu.half_bits(xs.contiguous())
    assert torch.equal(got, want), (xs[got != want][:5], got[got != want][:5], want[got != want][:5])
    got_b = emu.bf16_bits(xs.contiguous())
    want_b = xs.bfloat16().view(torch.int16)
    assert torch.equal(got_b, want_b), xs[got_b != want_b][:5]
    nan = emu.half_bits(torch.tensor([float("nan")]))
    assert (int(nan[0]) & 0x7c00) == 0x7c00 and (int(nan[0]) & 0x3ff) != 0  # a NaN stays a NaN
