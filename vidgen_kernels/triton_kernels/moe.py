"""Triton backend of the grouped-GEMM MoE (``vidgen_kernels.ops.moe``).

Implements the grouped-GEMM part of the MoE kernel contract (top of
``vidgen_kernels/ops/moe.py``): ``gmm``, ``gmm_act`` (bias + activation fused in the epilogue,
gated activations included) and ``gmm_wgrad``. Routing, the sort by expert and the permutations
use the contract's PyTorch implementations (``kernel_*_torch``): device ops with static shapes,
no host synchronisation.

Design
------
* **Grouped GEMM over expert segments** (``_gmm_kernel``): the P sorted rows are cut into
  ``BLOCK_M``-row tiles per expert (a tile never straddles two experts), numbered expert after
  expert; each program finds its tile's expert and first row from the cumulative ends ``offs``
  (one vector load and a prefix sum over the E experts: no tile table, no extra launches). The static tile count
  ``cdiv(P, BLOCK_M) + E`` bounds ``sum_e cdiv(count_e, BLOCK_M)`` (no host sync); programs of
  unused tile numbers exit. Grid: ``tiles * cdiv(M_out, BLOCK_N)`` programs, launched ``GROUP_M`` row tiles
  over every column block at a time (``_GROUP_M``: rows stay in L2). Each program computes a
  ``BLOCK_M x BLOCK_N`` tile of ``a_e @ w[e]`` with fp32 accumulation (``input_precision="ieee"``
  for fp32: no TF32), reading ``w`` through its three strides (so ``w.transpose(1, 2)`` serves
  the data-gradient GEMM ``dy @ w^T`` without a copy).
* **Epilogue**: ``+ bias[e]`` (read through both bias strides: a transposed, column-sliced or
  expanded (stride 0) ``[E, M]`` bias is used in place, no copy), the pre-activation is rounded
  to the output dtype and stored, then the activation (gelu tanh / gelu erf / silu, fp32 math)
  is applied and the hidden stored. Gated activations (swiglu / geglu): the program holds two
  accumulators, for columns ``j`` and ``j + F`` of ``w1[e]`` (the two halves), and stores
  ``act(a) * b``.
* **Weight gradient** (``_wgrad_kernel``): ``dW[e] = a_e^T dy_e`` with grid
  ``(E, cdiv(K, BLOCK_K), cdiv(M, BLOCK_N))``; each program loops over its expert's rows (bounds
  read from ``offs`` in the kernel: no host sync), empty experts store zeros.
* Row offsets are int64. Tiles (:func:`_tiles`, table ``_TILES_16BIT``): 16-bit operands take
  tensor-core GEMM tiles (128 x 128 x 64, 8 warps, 3 stages on Hopper, K step 32 on the
  mma.sync GPUs; 64-row tiles when experts average under 128 rows; gated activations half the
  columns), fp32 the first version's 64 x 64 x 32 (its ``ieee`` dots run on FMA units), the
  interpreter 16 x 32 x 32. Chosen from compiler reports (aot_check: every 16-bit sm_90 dot a
  wgmma, no spills), **not timed on a GPU yet**; ``gemm_tiles`` overrides them.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..backends import triton_interpret
from ..ops import moe as _moe
from ._launch import device_ctx, launch, mma_sync_arch, target_arch

_ACT_CODE = {None: 0, "gelu": 1, "gelu_exact": 2, "silu": 3}


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:  # gelu, tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = 0.5 * z * (2.0 * tl.sigmoid(2.0 * u))
    elif ACT == 2:  # gelu, erf
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:  # silu
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _gmm_kernel(A, W, Bias, Pre, Hid, offs,
                E, K, NOUT, NT, NB, s_am, s_ak, s_we, s_wk, s_wn, s_be, s_bn, s_pre, s_hid,
                ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                STORE_HID: tl.constexpr, DOT_PREC: tl.constexpr, GROUP_M: tl.constexpr,
                E_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    # one program per (row tile, column block) of the NT x NB grid, in launch order: GROUP_M row
    # tiles over every column block, then the next GROUP_M (the rows stay in L2 while the column
    # blocks of the expert's weight go by); GROUP_M = 0: column block after column block
    pid = tl.program_id(0)
    if GROUP_M == 0:
        pid_t = pid % NT
        pid_n = pid // NT
    else:
        per_group = GROUP_M * NB
        first = (pid // per_group) * GROUP_M
        size = tl.minimum(NT - first, GROUP_M)
        pid_t = first + (pid % per_group) % size
        pid_n = (pid % per_group) // size
    # the row tile's expert and first row, from the experts' ends ``offs`` (one vector of E_P2 >=
    # E entries): tiles are numbered expert after expert, cdiv(rows_e, BLOCK_M) each; numbers
    # past the last tile are unused (NT is a static upper bound: no host sync for the count)
    idx = tl.arange(0, E_P2)
    ends = tl.load(offs + idx, mask=idx < E, other=0).to(tl.int64)
    starts = tl.load(offs + idx - 1, mask=(idx > 0) & (idx < E), other=0).to(tl.int64)
    ntiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # 0 past E
    first_tile = tl.cumsum(ntiles, 0) - ntiles
    e = tl.sum((first_tile + ntiles <= pid_t).to(tl.int32), 0)  # experts wholly before pid_t
    mine = idx == e
    row0 = tl.sum(tl.where(mine, starts + (pid_t - first_tile) * BLOCK_M, 0), 0)
    if e < E:
        end = tl.sum(tl.where(mine, ends, 0), 0)
        rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < end
        # offsets in int64: a weight view's (K - 1) * s_wk (e.g. experts side by side in one
        # [C, E * F] projection) or an operand's column stride can pass 2**31 while each stride
        # fits the int32 Triton passes it as
        cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols < NOUT
        wbase = W + e.to(tl.int64) * s_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            kmask = ks < K
            a = tl.load(A + rows[:, None] * s_am + ks[None, :] * s_ak,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(wbase + ks[:, None] * s_wk + cols[None, :] * s_wn,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc += tl.dot(a, w, input_precision=DOT_PREC)
            if GATED:
                w2 = tl.load(wbase + ks[:, None] * s_wk + (cols + NOUT)[None, :] * s_wn,
                             mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc2 += tl.dot(a, w2, input_precision=DOT_PREC)
        out_ty = Pre.dtype.element_ty
        if HAS_BIAS:
            bbase = Bias + e.to(tl.int64) * s_be
            bias = tl.load(bbase + cols * s_bn, mask=cmask, other=0.0)
            acc += bias.to(tl.float32)[None, :]
            if GATED:
                bias2 = tl.load(bbase + (cols + NOUT) * s_bn, mask=cmask,
                                other=0.0)
                acc2 += bias2.to(tl.float32)[None, :]
        omask = rmask[:, None] & cmask[None, :]
        pre = acc.to(out_ty)
        tl.store(Pre + rows[:, None] * s_pre + cols[None, :], pre, mask=omask)
        if GATED:
            pre2 = acc2.to(out_ty)
            tl.store(Pre + rows[:, None] * s_pre + (cols + NOUT)[None, :], pre2, mask=omask)
        if STORE_HID:
            h = _act(pre.to(tl.float32), ACT)
            if GATED:
                h = h * pre2.to(tl.float32)
            tl.store(Hid + rows[:, None] * s_hid + cols[None, :], h.to(out_ty), mask=omask)


@triton.jit
def _wgrad_kernel(A, DY, OUT, offs, K, M, s_am, s_ak, s_dm, s_dn, s_oe, s_ok,
                  DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    end = tl.load(offs + e)
    start = tl.load(offs + e - 1, mask=e > 0, other=0)
    ks = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # int64 offsets, as in gmm
    ns = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    kmask = ks < K
    nmask = ns < M
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rs = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = rs < end
        a = tl.load(A + rs[None, :] * s_am + ks[:, None] * s_ak,
                    mask=kmask[:, None] & rmask[None, :], other=0.0)
        d = tl.load(DY + rs[:, None] * s_dm + ns[None, :] * s_dn,
                    mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.dot(a, d, input_precision=DOT_PREC)
    tl.store(OUT + e.to(tl.int64) * s_oe + ks[:, None] * s_ok + ns[None, :],
             acc.to(OUT.dtype.element_ty), mask=kmask[:, None] & nmask[None, :])


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the grouped GEMM, and (BLOCK_K,
# BLOCK_N, BLOCK_R, num_warps, num_stages) of the weight gradient, for 16-bit operands by GPU kind.
# Hopper (sm_90) runs a 16-bit dot on warpgroup MMA (wgmma) only when each warpgroup gets >= 64
# rows of it: the weight gradient's 32-row tiles of the first version compiled to mma.sync (the
# warp-level MMA, a fraction of wgmma's rate) and 64 x 64 x 32 is a small tile for either GPU kind.
# These are the usual tensor-core GEMM tiles, checked in sm_90 / sm_80 / sm_86 builds (aot_check:
# all dots wgmma on sm_90, no spills, 72-96 KiB of shared memory on sm_90 and 24-32 KiB on the
# mma.sync GPUs; a build over a GPU's limit, e.g. a larger tile forced by gemm_tiles, falls back
# to fewer stages, _launch.launch). NOT timed on a GPU yet:
# the first GPU session compares them with the first version's (``gemm_tiles``, the MoE
# benchmark's ``triton-small-tiles`` contender). Gated activations hold two accumulators: half
# BLOCK_N. Experts with few rows on average (P / E < 128) take 64-row tiles (half-empty 128-row
# tiles would waste the MMA).
_TILES_16BIT = {
    "wgmma": {"gmm": (128, 128, 64, 8, 3), "wgrad": (128, 128, 64, 8, 3)},
    "mma_sync": {"gmm": (128, 128, 32, 8, 3), "wgrad": (128, 128, 32, 8, 3)},
}
_TILES_FP32 = {"gmm": (64, 64, 32, 4, 3), "wgrad": (32, 64, 32, 4, 3)}  # ieee dots: FMA, no MMA
_TILES_INTERPRET = {"gmm": (16, 32, 32, 4, 1), "wgrad": (32, 32, 32, 4, 1)}
# the first version's tiles, for comparison on a GPU (gemm_tiles(small=True))
_TILES_SMALL = {"gmm": (64, 64, 32, 4, 3), "wgrad": (32, 64, 32, 4, 3)}
# Launch order of the grouped GEMM's programs: GROUP_M row tiles over every column block, then
# the next GROUP_M (Triton's matmul tutorial's grouping). The first version launched column block
# by column block (0 here): each block of w[e] went over every row tile, so at 32,768 rows x 1,152
# (75 MB of bf16 rows, more than an H100's 50 MB of L2) the rows would stream from memory once per
# column block (36 times at F = 4,608); grouped, each row tile is read about once while the
# expert's weight (10.6 MB at C = 1,152, F = 4,608) stays in L2. Not timed on a GPU yet.
_GROUP_M = 8
_FORCED: dict = {}  # kernel -> tile tuple imposed by gemm_tiles(); "group_m" -> GROUP_M


@contextlib.contextmanager
def gemm_tiles(gmm=None, wgrad=None, small=False, group_m=None):
    """Within the context, the grouped GEMM (``gmm``: ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages)``) and the weight gradient (``wgrad``: ``(BLOCK_K, BLOCK_N, BLOCK_R, num_warps,
    num_stages)``) use these tiles instead of the launcher's choice, and the grouped GEMM launches
    ``group_m`` row tiles per group (0: column block after column block). ``small=True``: the
    first version's 64 x 64 x 32 / 32 x 64 x 32 tiles and launch order (``group_m=0``). Tiles
    given here are used as given, for every dtype and activation (no halving of BLOCK_N for
    gated activations, no 64-row tiles for small experts). For benchmarks that compare tiles on
    a GPU; process-wide, not thread-safe; keep the backward inside too."""
    new = dict(_TILES_SMALL, group_m=0) if small else {}
    if group_m is not None:
        if isinstance(group_m, bool) or not isinstance(group_m, int) or group_m < 0:
            raise ValueError(f"gemm_tiles: group_m must be an int >= 0, got {group_m!r}")
        new["group_m"] = group_m
    for name, t in (("gmm", gmm), ("wgrad", wgrad)):
        if t is not None:
            t = tuple(int(v) for v in t)
            if len(t) != 5 or any(v < 1 for v in t) or any(v < 16 or v & (v - 1) for v in t[:3]):
                raise ValueError(f"gemm_tiles: {name} must be 5 positive ints (three powers of two "
                                 f">= 16, warps, stages), got {t}")
            new[name] = t
    prev = dict(_FORCED)
    _FORCED.clear()
    _FORCED.update(new)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(prev)


def _group_m() -> int:
    return _FORCED.get("group_m", _GROUP_M)


def _tiles(kernel: str, a: torch.Tensor, gated: bool = False, rows_per_expert: float = 0.0):
    """The tile tuple of ``kernel`` (``"gmm"`` / ``"wgrad"``) for operands like ``a``."""
    if kernel in _FORCED:
        return _FORCED[kernel]
    if triton_interpret():
        return _TILES_INTERPRET[kernel]
    if a.dtype == torch.float32:
        bm, bn, bk, warps, stages = _TILES_FP32[kernel]
    else:
        kind = "mma_sync" if mma_sync_arch(target_arch(a)) else "wgmma"
        bm, bn, bk, warps, stages = _TILES_16BIT[kind][kernel]
        if kernel == "gmm" and rows_per_expert < 128:
            bm, warps = 64, 4
    if kernel == "gmm" and gated:
        bn //= 2
    return bm, bn, bk, warps, stages


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_gmm(a, w, offs, bias, act, gated, store_hid):
    P, K = a.shape
    NW = w.shape[2]
    NOUT = NW // 2 if gated else NW
    pre = torch.empty((P, NW), dtype=a.dtype, device=a.device)
    hid = torch.empty((P, NOUT), dtype=a.dtype, device=a.device) if store_hid else pre
    if P == 0:
        return pre, hid
    E = w.shape[0]
    BM, BN, BK, warps, stages = _tiles("gmm", a, gated, P / max(E, 1))
    NT, NB = triton.cdiv(P, BM) + E, triton.cdiv(NOUT, BN)  # NT >= sum_e cdiv(rows_e, BM)
    if NT * NB >= 2 ** 31:  # program ids are int32
        raise ValueError(f"triton grouped GEMM: {NT} row tiles x {NB} column blocks exceed the "
                         f"2**31 - 1 programs of one launch (P={P}, E={E}, N={NOUT})")
    b = bias if bias is not None else pre
    # the bias is read through both of its strides (a transposed, sliced or expanded [E, M]
    # bias needs no copy; stride 0 broadcasts)
    s_be, s_bn = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    with device_ctx(a):
        launch(_gmm_kernel, (NT * NB,),
               (a, w, b, pre, hid, offs, E, K, NOUT, NT, NB, a.stride(0),
                a.stride(1), w.stride(0), w.stride(1), w.stride(2), s_be, s_bn, pre.stride(0),
                hid.stride(0)),
               dict(ACT=_ACT_CODE[act], GATED=gated, HAS_BIAS=bias is not None,
                    STORE_HID=store_hid, DOT_PREC=_prec(a.dtype), GROUP_M=_group_m(),
                    E_P2=max(triton.next_power_of_2(E), 2),
                    BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages),
               a.device)
    return pre, hid


def gmm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, bias=None) -> torch.Tensor:
    """``[P, M]``: rows of expert e times ``w[e]`` (``w`` ``[E, K, M]`` any strides), plus
    ``bias[e]`` (``[E, M]`` any strides, stride 0 included) in the epilogue when given."""
    pre, _ = _launch_gmm(a, w, offs, bias, None, False, False)
    return pre


def gmm_act(a, w, offs, bias, activation):
    gated = activation in _moe.GATED
    return _launch_gmm(a, w, offs, bias, _moe._base_act(activation), gated, True)


def gmm_wgrad(a: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, E: int) -> torch.Tensor:
    P, K = a.shape
    M = dy.shape[1]
    out = torch.empty((E, K, M), dtype=a.dtype, device=a.device)
    BK, BN, BR, warps, stages = _tiles("wgrad", a)
    grid = (E, triton.cdiv(K, BK), triton.cdiv(M, BN))
    with device_ctx(a):
        launch(_wgrad_kernel, grid,
               (a, dy, out, offs, K, M, a.stride(0), a.stride(1), dy.stride(0), dy.stride(1),
                out.stride(0), out.stride(1)),
               dict(DOT_PREC=_prec(a.dtype), BLOCK_K=BK, BLOCK_N=BN, BLOCK_R=BR,
                    num_warps=warps, num_stages=stages), a.device)
    return out


class TritonKernels(_moe._TorchKernels):
    """The MoE kernel set of the ``triton`` backend."""
    gmm = staticmethod(gmm)
    gmm_act = staticmethod(gmm_act)
    gmm_wgrad = staticmethod(gmm_wgrad)
