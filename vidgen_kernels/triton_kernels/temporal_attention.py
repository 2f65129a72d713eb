"""Triton backend of causal temporal attention (``vidgen_kernels.ops.temporal_attention``).

Implements the kernel contract documented at the top of ``vidgen_kernels/ops/temporal_attention.py``
(``temporal_attn_fwd`` / ``temporal_attn_bwd``, same argument order as ``kernel_fwd_torch`` /
``kernel_bwd_torch``).

Resident kernels (every sequence held on chip)
----------------------------------------------
* **A sequence** is one ``(b, s, h)``: ``T_k <= 128`` rows of ``D <= 256`` values, read in place
  from the frame-major ``[B, T, S, H, D]`` tensors through their five strides (any strides,
  non-unit last stride included; no copies). The whole key/value sequence is held on chip:
  ``TP = next_power_of_2(T_k)`` rows, ``BLOCK_D = next_power_of_2(D)`` columns (masked), both
  floored so that every ``tl.dot`` operand has >= 16 rows / columns.
* **Many short sequences per program**, two ways, with sequences numbered
  ``n = (b * S + s) * H + h`` (consecutive n are adjacent in memory for the usual layouts):

  - *packing*: when ``TP < 16`` (``T_k <= 8``), ``P = 16 // TP`` sequences share one 16-row tile
    (row ``r`` is frame ``r % TP`` of sequence ``r // TP``) and the score tile is masked
    block-diagonally. The 16-row minimum of ``tl.dot`` is then filled with real rows instead of
    padding, so T = 1..8 costs one MMA tile per ``P`` sequences;
  - *a loop*: each program walks ``SEQ_GROUPS`` consecutive tiles. Default: about 128 frame rows
    per program (``SEQ_GROUPS = 128 // tile rows``: 8 tiles for ``T_k <= 16``, 4 for 32, 2 for 64,
    1 for 128), halved while that would leave fewer than ~1024 programs (so small problems still
    fill every SM). The row / column offset vectors and the RoPE column indices are computed once
    per program; per tile only the (b, s, h) decomposition of ``P`` sequence numbers changes. The
    sequence loop is the kernel's innermost ``scf.for``, so Triton's software pipeliner issues the
    next tile's loads (cp.async) while the current one computes (``num_stages = 2``; 1 when a
    program has a single tile or the key tile is >= 32 KiB, see :func:`_default_stages`). A loop
    (rather than a 3-D ``[G, T, D]`` tile) keeps the register footprint independent of ``G``.

  Example, ``T_k = 16``, fp16, 32k sequences: 4096 programs of 8 sequences; ``T_k = 4``: 4
  sequences per tile, 8 tiles per program, 32 sequences per program.
* **Queries in blocks of ``BLOCK_M = min(next_pow2(T_q) (>= 16), 64)`` rows**, unrolled
  (``tl.static_range``, so the sequence loop stays innermost): keys / values (and in the backward
  their gradient accumulators) stay resident while the program walks ``ceil(T_q / BLOCK_M)``
  query blocks, so at ``T_k = 128`` the score tile is ``64 x 128``, and a streaming step with one
  new frame uses a ``16 x T_k`` tile. Every query block sees every key of its sequence, so the
  backward computes ``dq`` of a block completely and accumulates ``dk`` / ``dv`` over blocks in
  registers: no atomics, no second kernel, one program per sequence group.
* **Fused RoPE**: with tables, q / k are loaded as two ``[rows, BLOCK_D / 2]`` tiles, ``a`` and
  ``b``, holding the two members of each rotation pair: half-split (``x[i]``, ``x[i + D/2]``) as
  two loads, interleaved (``x[2i]``, ``x[2i+1]``) as one coalesced full-row load split with
  ``tl.reshape`` + ``tl.split``. The rotation is then elementwise in fp32
  (``a' = a cos - b sin``, ``b' = b cos + a sin``, cos / sin rows at ``q_offset + i`` for queries
  and ``j`` for keys), rounded to the input dtype, and the scores are
  ``dot(qa', ka'^T) + dot(qb', kb'^T)``. The backward forms ``dq`` / ``dk`` as ``a`` / ``b`` halves
  and rotates them by the negative angle before storing (``tl.join`` re-interleaves).
* **Numerics**: scores, softmax, ``lse`` (natural log, stored fp32) and all accumulations are fp32
  (``exp2`` with ``log2(e)`` folded into the scale). For fp16 / bf16 the probabilities ``p`` and
  ``ds`` are rounded to the input dtype for the tensor-core dots (as flash-attention does); fp32
  inputs use ``input_precision="ieee"`` dots (no TF32), matching the fp32 contract to ~1e-6.
  The resident backward holds every key of its rows, so its ``p`` is renormalised over the row
  and ``delta = sum_j p dp`` of that ``p`` (``rope_tiles.whole_row_probs_ds``), not
  ``rowsum(dout * out)`` of the 16-bit output, whose rounding dq multiplied by the keys' common
  component (fp16 dq at 50x the reference's error for keys sharing an offset of 30); the tiled
  backward (FlashAttention-2 style) keeps ``rowsum(dout * out)``.
* **Masked entries send no gradient**: ``ds = where(visible, p (dp - delta), 0)``, not
  ``p (dp - delta)``: a NaN ``dp`` / ``delta`` (a NaN in a query's dout) reaches no key the
  query cannot see (a later frame; in a packed tile, another sequence), as in the reference.
* **Non-finite values in packed tiles**: the products that sum over rows (``p v``; ``p^T do``,
  ``ds k``, ``ds^T q``) see the other sequences' rows through exact zeros, and ``0 * inf`` is
  NaN. So with ``P > 1`` their row operands are cleaned (inf / NaN -> 0) and the damage is put
  back per sequence: the forward sets column ``c`` of a sequence's output rows to NaN where its
  ``v[:, c]`` has an inf / NaN (an unpacked tile makes the same entries non-finite, some of
  them +-inf rather than NaN); the backward sets all gradients of a sequence with an inf / NaN
  anywhere in its q, k, v or dout rows to NaN (per-row flags, then a ``[P, TP]`` max). Only
  packed builds carry this code (``P`` is a constexpr); its sm_90 builds do not spill, the
  sm_80 bf16 ``D = 128`` RoPE backward spills ~300 B (aot_check).
* Sequence numbers and all row offsets are int64 (``b * stride_b`` etc. can exceed 2^31); the
  column offsets are int64 too (a transposed layout can have a huge last-dim stride); they are
  hoisted out of the loops. Nothing is allocated per call; no host synchronisation.
* ``num_warps``: 4 for small tiles, 8 once the key tile ``tile rows x BLOCK_D`` reaches 4096
  elements (both passes). Chosen from ptxas register / spill reports of sm_90 builds (no GPU
  timing was available): with 4 warps the 32 x 128 and 64 x 64 forward already spill; 16 warps
  do not reduce the backward's spills at ``T_k = 128``.
* Shared memory: if a pipelined build does not fit the device (``OutOfResources``), the launch is
  retried with fewer stages, once per configuration (:func:`._launch.launch`). Unpipelined 16-bit
  builds need at most ~208 KiB on sm_90 and ~160 KiB on sm_80 (backward, ``T_k = 128``,
  ``D = 256``); float32 tiles are capped by :data:`MAX_TILE_FP32` so that they fit both. GPUs
  with less than :data:`FULL_SHARED` per block (~99 KiB: sm_86 / sm_89 / sm_120) take float32
  tiles of at most :data:`SMALL_TILE_FP32` elements and, at ``D > 128``, 16-bit
  ``T_k <= SMALL_T_WIDE`` (:func:`tile_error`, from sm_86 and sm_120 builds); the launchers ask
  the device's shared memory and run the tiled kernels (below) beyond them. A build that still
  does not fit with one stage is a ValueError that says so (:func:`_launch_or_explain`).
* Tuning knobs (keyword-only, for benchmarks): ``tiled``, ``seqs_per_program``, ``num_warps``,
  ``block_m``, ``block_n``, ``num_stages``.

Tiled kernels (sequences the resident ones cannot hold)
-------------------------------------------------------
The design above needs the whole key / value sequence on chip: ``T_k <= RESIDENT_MAX_T`` (128)
and, in float32, a padded key tile within :func:`tile_error`'s shared-memory rule (T_k <= 32 at
D = 256, <= 64 at 128, <= 128 at 64; less on ~99 KiB GPUs). Beyond that the launchers run three
FlashAttention-2 style kernels instead, same contract, same in-place strided reads and fused
rotation (``tiled=True`` forces them, ``tiled=False`` refuses to):

* ``_tiled_fwd_kernel``: one program per (sequence, query block of ``BLOCK_M`` frames), the
  query block's programs adjacent (its keys / values shared in L2); it walks key blocks of
  ``BLOCK_N`` frames up to the causal limit of the block's last query with the online softmax
  (fp32 running max / sum, ``exp2``), and writes ``out`` and ``lse``.
* ``_tiled_bwd_dq_kernel``: the same grid; ``delta = rowsum(dout * out)`` (written to a
  ``[B * S * H, T_q]`` float32 buffer, the one allocation), then ``dq`` over the visible key
  blocks, rotated back by the negative angle.
* ``_tiled_bwd_dkdv_kernel``: one program per (sequence, key block), accumulating ``dk`` / ``dv``
  in fp32 registers over the query blocks that see the block (from the first causal one): no
  atomics. Masked entries send no gradient (``where``), as above.

Tiles (:data:`_TILED_TILES`): fp16 / bf16 forward 64 x 64 (D <= 128) / 64 x 32 (D = 256), dq
64 x 64 / 32 x 64 / 32 x 32, dk / dv 32 x 64 (D <= 128) / 16 x 32 (D = 256) on sm_90 and
32 x 32 / 16 x 32 on mma.sync GPUs (sm_80 - sm_89, sm_120); float32 16 - 32 rows. They are the
largest tiles with the fewest spills in AOT builds (sm_90a, sm_80, sm_86; triton 3.9; RoPE,
causal): fp16 / bf16 spill at most ~120 B at D <= 128 and ~600-700 B in the D = 256 dk / dv
kernel; float32 dk / dv spills ~300 B at D = 128 and 1.1 KB (sm_90) - 3.4 KB (sm_80) at D = 256.
Every build fits the shared memory of sm_80 / sm_90 and of ~99 KiB GPUs (the 16-bit D = 256
forward takes 32 x 32 there).

Which kernels run (``tiled=None``): the tiled ones beyond the resident limits, and also where
the resident builds spill heavily (:data:`_TILED_FROM`, by T_k padded to a power of two): the
backward from T_k > 32 on mma.sync GPUs (sm_80 - sm_89, sm_120; resident 6-24 KB of stack per
thread, tiled <= 112 B) and T_k > 64 on sm_90 (1.3 KB vs 40 B at D = 128), the forward from
T_k > 64 on mma.sync GPUs (1.1-1.4 KB vs 0), and in float32 at the largest resident tiles (8192 elements: 5-12 KB
vs <= 3.4 KB; the backward on mma.sync GPUs from 4096 elements: 5 KB vs <= 296 B). The forward and the backward choose independently (one contract:
``out`` / ``lse`` of either serve both backwards). A rule from compiler reports only: no GPU
timing was available, so where the crossover lies in time is unknown.

Limits: ``D <= 256`` (:data:`MAX_D`), any ``T``; beyond ``D`` a ``ValueError``. Any ``D >= 1``
below that works (small D are padded to 32 columns).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..backends import triton_interpret
from ._launch import device_ctx, launch, mma_sync_arch, target_arch, target_shared_memory
from .rope_tiles import (load_pair, pair_scores, masked_ds, masked_probs, store_pair,
                         whole_row_probs_ds)

__all__ = ["temporal_attn_fwd", "temporal_attn_bwd", "tiled_kernels", "RESIDENT_MAX_T", "MAX_D", "MAX_TILE_FP32",
           "FULL_SHARED", "SMALL_TILE_FP32", "SMALL_T_WIDE", "tile_error"]

RESIDENT_MAX_T = 128  # longest key sequence the resident kernels hold on chip
MAX_D = 256
_MIN_ROWS = 16  # tl.dot needs M, N, K >= 16
# float32 key tiles (rows x columns, padded to powers of two) at most this many elements: fp32
# dots (DOT_PREC="ieee") stage their operands through shared memory, and larger tiles do not fit
# (aot_check, triton 3.6 / 3.9: T_k 128 x D 128 needs 224 KiB in the backward, over sm_80's
# 163 KiB; 64 x 256 and 128 x 256 exceed sm_90's 227 KiB). 16-bit tiles fit up to
# RESIDENT_MAX_T x MAX_D. Beyond these the launchers run the tiled kernels.
MAX_TILE_FP32 = 8192
# Those limits need FULL_SHARED bytes of shared memory per block (sm_80 / sm_87: 163 KiB; sm_90 /
# sm_100: 227 KiB). GPUs with less (~99 KiB: sm_86 / sm_89 / sm_120 / sm_121, the RTX and L4 / L40
# cards) take float32 tiles of at most SMALL_TILE_FP32 elements and, at head_dim > 128, 16-bit
# sequences of at most SMALL_T_WIDE frames: sm_86 and sm_120 builds, unpipelined (aot_check,
# triton 3.9): float32 128 x 64 needs 128 KiB in the backward, 64 x 128 144 KiB, 32 x 256 132 KiB;
# 16-bit 64 x 256 104 KiB (without RoPE); everything within these limits fits 99 KiB.
FULL_SHARED = 166912
SMALL_TILE_FP32 = 4096
SMALL_T_WIDE = 32


def tile_error(Tk: int, D: int, dtype, shared: int | None = None) -> str | None:
    """Why a ``dtype`` sequence of ``Tk`` keys of head_dim ``D`` does not fit the shared memory of
    a GPU with ``shared`` bytes per block (None: one with FULL_SHARED or more) as a resident
    tile, or None. The launchers run the tiled kernels where it is not None (they are called
    with concrete sizes, also under torch.compile: the custom ops are opaque to it)."""
    small = shared is not None and shared < FULL_SHARED
    rows, cols = max(triton.next_power_of_2(Tk), _MIN_ROWS), max(triton.next_power_of_2(D), 2 * _MIN_ROWS)
    if dtype == torch.float32:
        lim = SMALL_TILE_FP32 if small else MAX_TILE_FP32
        if rows * cols <= lim:
            return None
        what = f"float32 T_k x head_dim (each padded to a power of two) <= {lim}"
    elif small and cols > 128 and Tk > SMALL_T_WIDE:
        what = f"fp16 / bf16 T_k <= {SMALL_T_WIDE} at head_dim > 128"
    else:
        return None
    where = (f" on a GPU with {shared} B of shared memory per block (< {FULL_SHARED})" if small
             else "")
    return f"{what}{where} (the tiles' shared memory), got T_k={Tk}, head_dim={D}"


_MIN_PROGRAMS = 1024  # below this many programs, SEQ_GROUPS is reduced
_ROWS_PER_PROGRAM = 128
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bsh(n, SH, H):
    """Sequence number(s) n = (b * S + s) * H + h -> (b, s, h) (int64)."""
    b = n // SH
    rem = n - b * SH
    s = rem // H
    return b, s, rem - s * H


@triton.jit
def _load_table(COS, SIN, pos, ok, d_half, sc_t, sc_d, ss_t, ss_d, HALF):
    """cos / sin rows at positions ``pos`` ([rows, BLOCK_H], fp32, 0 outside)."""
    m = ok[:, None] & (d_half[None, :] < HALF)
    c = tl.load(COS + pos[:, None] * sc_t + d_half[None, :] * sc_d, mask=m, other=0.0)
    s = tl.load(SIN + pos[:, None] * ss_t + d_half[None, :] * ss_d, mask=m, other=0.0)
    return c, s


@triton.jit
def _rotate(a, b, c, s):
    """Rotate pairs (a, b) by the angle with cosine c and sine s (fp32)."""
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    return a * c - b * s, b * c + a * s


@triton.jit
def _seq_any(bad, TP: tl.constexpr):
    """Packed tiles: ``bad`` (int32, rows ``[P * TP, ...]``, sequence ``r // TP`` at row ``r``) ->
    for every row, whether any row of its sequence is set (per column for 2-D ``bad``)."""
    R: tl.constexpr = bad.shape[0]
    P: tl.constexpr = R // TP
    if len(bad.shape) == 1:
        any_ = tl.max(tl.reshape(bad, [P, TP]), axis=1)
        return tl.reshape(tl.broadcast_to(any_[:, None], [P, TP]), [R]) != 0
    else:
        N: tl.constexpr = bad.shape[1]
        any_ = tl.max(tl.reshape(bad, [P, TP, N]), axis=1)
        return tl.reshape(tl.broadcast_to(any_[:, None, :], [P, TP, N]), [R, N]) != 0


@triton.jit
def _finite(x):
    """``(x with its inf / NaN entries set to 0, int32 mask of those entries)``."""
    bad = ~(tl.abs(x.to(tl.float32)) < float("inf"))  # NaN compares false
    return tl.where(bad, 0.0, x).to(x.dtype), bad.to(tl.int32)


@triton.jit
def _finite_rows(x, bad_rows):
    """:func:`_finite` reduced to rows: ``(x cleaned, bad_rows | row of x has an inf / NaN)``."""
    x, bad = _finite(x)
    return x, tl.maximum(bad_rows, tl.max(bad, axis=1))


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _temporal_attn_fwd_kernel(
    Q, K, V, COS, SIN, OUT, LSE,
    NSEQ, SH, H, Tq, Tk, D, HALF, q_offset, qk_scale2,  # qk_scale2 = scale * log2(e)
    sq_b, sq_t, sq_s, sq_h, sq_d,
    sk_b, sk_t, sk_s, sk_h, sk_d,
    sv_b, sv_t, sv_s, sv_h, sv_d,
    so_b, so_t, so_s, so_h, so_d,
    sl_b, sl_s, sl_h, sl_t,
    sc_t, sc_d, ss_t, ss_d,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    TP: tl.constexpr,  # rows per sequence in the tile (next_pow2(Tk), or less when packed)
    BLOCK_T: tl.constexpr,  # key tile rows = P * TP, P sequences packed
    BLOCK_M: tl.constexpr,  # query rows per block (== BLOCK_T when packed)
    NQB: tl.constexpr,  # query blocks (BLOCK_M * NQB >= Tq)
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    SEQ_GROUPS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    P: tl.constexpr = BLOCK_T // TP
    dt = OUT.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)

    rk = tl.arange(0, BLOCK_T)
    kseq = rk // TP
    kt = rk % TP
    rq = tl.arange(0, BLOCK_M)
    qseq = rq // TP
    qt0 = rq % TP
    d_full = tl.arange(0, BLOCK_D).to(tl.int64)
    d_half = tl.arange(0, BLOCK_H).to(tl.int64)
    kt64 = kt.to(tl.int64)

    for g in range(SEQ_GROUPS):
        n0 = (pid * SEQ_GROUPS + g) * P
        # ---- keys / values of the P sequences of this tile, resident for all query blocks
        nk = n0 + kseq
        k_ok = (nk < NSEQ) & (kt < Tk)
        b, s, h = _bsh(tl.minimum(nk, NSEQ - 1), SH, H)
        k_off = b * sk_b + s * sk_s + h * sk_h + kt64 * sk_t
        v_off = b * sv_b + s * sv_s + h * sv_h + kt64 * sv_t
        ka, kb = load_pair(K, k_off, k_ok, d_full, d_half, sk_d, D, HALF,
                            ROPE, INTERLEAVED, BLOCK_H)
        if ROPE:
            c, sn = _load_table(COS, SIN, kt, k_ok, d_half, sc_t, sc_d, ss_t, ss_d, HALF)
            ra, rb = _rotate(ka, kb, c, sn)
            ka = ra.to(dt)
            kb = rb.to(dt)
        v = tl.load(V + v_off[:, None] + d_full[None, :] * sv_d,
                    mask=k_ok[:, None] & (d_full[None, :] < D), other=0.0)
        if P > 1:
            # packed tiles: a non-finite v[j, c] must reach column c of its own sequence's rows
            # only (as 0 * inf does in an unpacked tile), not the others' through the zero blocks
            v, v_bad = _finite(v)
            v_poison = _seq_any(v_bad, TP)

        for qi in tl.static_range(NQB):  # unrolled: the sequence loop stays innermost
            qt = qi * BLOCK_M + qt0
            nq = n0 + qseq
            q_ok = (nq < NSEQ) & (qt < Tq)
            qb_, qs_, qh_ = _bsh(tl.minimum(nq, NSEQ - 1), SH, H)
            qt64 = qt.to(tl.int64)
            q_off = qb_ * sq_b + qs_ * sq_s + qh_ * sq_h + qt64 * sq_t
            o_off = qb_ * so_b + qs_ * so_s + qh_ * so_h + qt64 * so_t
            l_off = qb_ * sl_b + qs_ * sl_s + qh_ * sl_h + qt64 * sl_t
            qa, qb = load_pair(Q, q_off, q_ok, d_full, d_half, sq_d, D, HALF,
                                ROPE, INTERLEAVED, BLOCK_H)
            if ROPE:
                cq, sq = _load_table(COS, SIN, q_offset + qt, q_ok, d_half, sc_t, sc_d, ss_t,
                                     ss_d, HALF)
                rqa, rqb = _rotate(qa, qb, cq, sq)
                qa = rqa.to(dt)
                qb = rqb.to(dt)

            z = pair_scores(qa, qb, ka, kb, ROPE, DOT_PREC) * qk_scale2
            visible = kt[None, :] < Tk
            if P > 1:
                visible = visible & (qseq[:, None] == kseq[None, :])
            if CAUSAL:
                visible = visible & (kt[None, :] <= q_offset + qt[:, None])
            z = tl.where(visible, z, float("-inf"))
            m = tl.max(z, axis=1)  # finite: key 0 of the row's own sequence is always visible
            p = tl.exp2(z - m[:, None])
            l_sum = tl.sum(p, axis=1)
            acc = tl.dot(p.to(dt), v, input_precision=DOT_PREC)
            if P > 1:  # (NQB == 1: the tile's rows)
                acc = tl.where(v_poison, float("nan"), acc)
            o = acc / l_sum[:, None]
            tl.store(OUT + o_off[:, None] + d_full[None, :] * so_d, o.to(dt),
                     mask=q_ok[:, None] & (d_full[None, :] < D))
            tl.store(LSE + l_off, (m + tl.log2(l_sum)) * 0.6931471805599453, mask=q_ok)


@triton.jit
def _temporal_attn_bwd_kernel(
    DO, Q, K, V, COS, SIN, LSE, DQ, DK, DV,
    NSEQ, SH, H, Tq, Tk, D, HALF, q_offset, scale, qk_scale2,
    sdo_b, sdo_t, sdo_s, sdo_h, sdo_d,
    sq_b, sq_t, sq_s, sq_h, sq_d,
    sk_b, sk_t, sk_s, sk_h, sk_d,
    sv_b, sv_t, sv_s, sv_h, sv_d,
    sl_b, sl_s, sl_h, sl_t,
    sdq_b, sdq_t, sdq_s, sdq_h, sdq_d,
    sdk_b, sdk_t, sdk_s, sdk_h, sdk_d,
    sdv_b, sdv_t, sdv_s, sdv_h, sdv_d,
    sc_t, sc_d, ss_t, ss_d,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    TP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, NQB: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    SEQ_GROUPS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    P: tl.constexpr = BLOCK_T // TP
    dt = DQ.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)

    rk = tl.arange(0, BLOCK_T)
    kseq = rk // TP
    kt = rk % TP
    rq = tl.arange(0, BLOCK_M)
    qseq = rq // TP
    qt0 = rq % TP
    d_full = tl.arange(0, BLOCK_D).to(tl.int64)
    d_half = tl.arange(0, BLOCK_H).to(tl.int64)
    kt64 = kt.to(tl.int64)

    for g in range(SEQ_GROUPS):
        n0 = (pid * SEQ_GROUPS + g) * P
        nk = n0 + kseq
        k_ok = (nk < NSEQ) & (kt < Tk)
        b, s, h = _bsh(tl.minimum(nk, NSEQ - 1), SH, H)
        k_off = b * sk_b + s * sk_s + h * sk_h + kt64 * sk_t
        v_off = b * sv_b + s * sv_s + h * sv_h + kt64 * sv_t
        ka, kb = load_pair(K, k_off, k_ok, d_full, d_half, sk_d, D, HALF,
                            ROPE, INTERLEAVED, BLOCK_H)
        if ROPE:
            ck, sk = _load_table(COS, SIN, kt, k_ok, d_half, sc_t, sc_d, ss_t, ss_d, HALF)
            ra, rb = _rotate(ka, kb, ck, sk)
            ka = ra.to(dt)
            kb = rb.to(dt)
        v = tl.load(V + v_off[:, None] + d_full[None, :] * sv_d,
                    mask=k_ok[:, None] & (d_full[None, :] < D), other=0.0)
        # Packed tiles (P > 1): the dots that sum over rows (p^T do, ds k, ds^T q) would carry an
        # inf / NaN of one sequence into the tile's others (0 * inf in the zero blocks). Their
        # operands are cleaned, and all gradients of a sequence with a non-finite q, k, v or
        # dout row are set to NaN instead ("bad": per row, then per sequence).
        bad = tl.zeros([BLOCK_T], dtype=tl.int32)
        if P > 1:
            ka, bad = _finite_rows(ka, bad)
            if ROPE:
                kb, bad = _finite_rows(kb, bad)
            v, bad = _finite_rows(v, bad)
        if ROPE:
            dka = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
            dkb = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        else:
            dka = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            dkb = dka  # unused without ROPE
        dv = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)

        for qi in tl.static_range(NQB):  # unrolled: the sequence loop stays innermost
            qt = qi * BLOCK_M + qt0
            nq = n0 + qseq
            q_ok = (nq < NSEQ) & (qt < Tq)
            qb_, qs_, qh_ = _bsh(tl.minimum(nq, NSEQ - 1), SH, H)
            qt64 = qt.to(tl.int64)
            q_off = qb_ * sq_b + qs_ * sq_s + qh_ * sq_h + qt64 * sq_t
            do_off = qb_ * sdo_b + qs_ * sdo_s + qh_ * sdo_h + qt64 * sdo_t
            l_off = qb_ * sl_b + qs_ * sl_s + qh_ * sl_h + qt64 * sl_t
            dq_off = qb_ * sdq_b + qs_ * sdq_s + qh_ * sdq_h + qt64 * sdq_t
            qa, qb = load_pair(Q, q_off, q_ok, d_full, d_half, sq_d, D, HALF,
                                ROPE, INTERLEAVED, BLOCK_H)
            if ROPE:
                cq, sq = _load_table(COS, SIN, q_offset + qt, q_ok, d_half, sc_t, sc_d, ss_t,
                                     ss_d, HALF)
                rqa, rqb = _rotate(qa, qb, cq, sq)
                qa = rqa.to(dt)
                qb = rqb.to(dt)
            dmask = q_ok[:, None] & (d_full[None, :] < D)
            do = tl.load(DO + do_off[:, None] + d_full[None, :] * sdo_d, mask=dmask, other=0.0)
            lse = tl.load(LSE + l_off, mask=q_ok, other=0.0)
            if P > 1:  # (NQB == 1: these are the tile's rows)
                qa, bad = _finite_rows(qa, bad)
                if ROPE:
                    qb, bad = _finite_rows(qb, bad)
                do, bad = _finite_rows(do, bad)
                bad = _seq_any(bad, TP).to(tl.int32)

            z = pair_scores(qa, qb, ka, kb, ROPE, DOT_PREC) * qk_scale2
            visible = q_ok[:, None] & (kt[None, :] < Tk)
            if P > 1:
                visible = visible & (qseq[:, None] == kseq[None, :])
            if CAUSAL:
                visible = visible & (kt[None, :] <= q_offset + qt[:, None])
            # (masked entries, a later frame or in a packed tile another sequence, send nothing)
            # (every key of the row is here: delta from p itself, not from the 16-bit out)
            p, ds = whole_row_probs_ds(z, visible, lse * 1.4426950408889634, do, v, DOT_PREC)
            dv += tl.dot(tl.trans(p.to(dt)), do, input_precision=DOT_PREC)
            ds = ds.to(dt)
            # dq of this block is complete: every key of its sequence is in this program
            dqa = tl.dot(ds, ka, input_precision=DOT_PREC) * scale
            dsT = tl.trans(ds)
            dka += tl.dot(dsT, qa, input_precision=DOT_PREC)
            if ROPE:
                dqb = tl.dot(ds, kb, input_precision=DOT_PREC) * scale
                dkb += tl.dot(dsT, qb, input_precision=DOT_PREC)
                # reload the (L1/L2-resident) table rows rather than keep them live
                cq, sq = _load_table(COS, SIN, q_offset + qt, q_ok, d_half, sc_t, sc_d, ss_t,
                                     ss_d, HALF)
                dqa, dqb = _rotate(dqa, dqb, cq, -sq)
                if P > 1:
                    dqa = tl.where(bad[:, None] != 0, float("nan"), dqa)
                    dqb = tl.where(bad[:, None] != 0, float("nan"), dqb)
                store_pair(DQ, dq_off, q_ok, d_full, d_half, sdq_d, D, HALF,
                            dqa.to(dt), dqb.to(dt), ROPE, INTERLEAVED, BLOCK_D)
            else:
                if P > 1:
                    dqa = tl.where(bad[:, None] != 0, float("nan"), dqa)
                store_pair(DQ, dq_off, q_ok, d_full, d_half, sdq_d, D, HALF,
                            dqa.to(dt), dqa.to(dt), ROPE, INTERLEAVED, BLOCK_D)

        b, s, h = _bsh(tl.minimum(nk, NSEQ - 1), SH, H)
        dk_off = b * sdk_b + s * sdk_s + h * sdk_h + kt64 * sdk_t
        dv_off = b * sdv_b + s * sdv_s + h * sdv_h + kt64 * sdv_t
        dka = dka * scale
        if ROPE:
            dkb = dkb * scale
            ck, sk = _load_table(COS, SIN, kt, k_ok, d_half, sc_t, sc_d, ss_t, ss_d, HALF)
            dka, dkb = _rotate(dka, dkb, ck, -sk)
        if P > 1:
            dka = tl.where(bad[:, None] != 0, float("nan"), dka)
            dkb = tl.where(bad[:, None] != 0, float("nan"), dkb)
            dv = tl.where(bad[:, None] != 0, float("nan"), dv)
        store_pair(DK, dk_off, k_ok, d_full, d_half, sdk_d, D, HALF, dka.to(dt), dkb.to(dt),
                    ROPE, INTERLEAVED, BLOCK_D)
        tl.store(DV + dv_off[:, None] + d_full[None, :] * sdv_d, dv.to(dt),
                 mask=k_ok[:, None] & (d_full[None, :] < D))


# ----------------------------------------------------------------------------------------------
# tiled kernels: sequences too long (or tiles too large) to hold on chip
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rot_rows(X, row_off, pos, ok, COS, SIN, d_full, d_half, sd, D, HALF,
                   sc_t, sc_d, ss_t, ss_d, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    """Rows of q or k as pair halves, rotated at positions ``pos`` (rounded back to X's dtype)."""
    a, b = load_pair(X, row_off, ok, d_full, d_half, sd, D, HALF, ROPE, INTERLEAVED, BLOCK_H)
    if ROPE:
        c, s = _load_table(COS, SIN, pos, ok, d_half, sc_t, sc_d, ss_t, ss_d, HALF)
        ra, rb = _rotate(a, b, c, s)
        a = ra.to(X.dtype.element_ty)
        b = rb.to(X.dtype.element_ty)
    return a, b


@triton.jit
def _load_kv_block(K, V, k_base, v_base, kt, Tk, COS, SIN, d_full, d_half, sk_t, sk_d, sv_t,
                   sv_d, D, HALF, sc_t, sc_d, ss_t, ss_d, ROPE: tl.constexpr,
                   INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr):
    """Key rows ``kt`` of one sequence as rotated pair halves, and its value rows (0 past Tk)."""
    k_ok = kt < Tk
    kt64 = kt.to(tl.int64)
    ka, kb = _load_rot_rows(K, k_base + kt64 * sk_t, kt, k_ok, COS, SIN, d_full, d_half, sk_d, D,
                            HALF, sc_t, sc_d, ss_t, ss_d, ROPE, INTERLEAVED, BLOCK_H)
    v = tl.load(V + (v_base + kt64 * sv_t)[:, None] + d_full[None, :] * sv_d,
                mask=k_ok[:, None] & (d_full[None, :] < D), other=0.0)
    return ka, kb, v, k_ok


@triton.jit
def _tile_scores(qa, qb, ka, kb, qt, kt, q_ok, k_ok, q_offset, qk_scale2, CAUSAL: tl.constexpr,
                 ROPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores (log2 units) of a (query block, key block) tile and which of them are visible."""
    z = pair_scores(qa, qb, ka, kb, ROPE, DOT_PREC) * qk_scale2
    visible = q_ok[:, None] & k_ok[None, :]
    if CAUSAL:
        visible = visible & (kt[None, :] <= q_offset + qt[:, None])
    return z, visible


@triton.jit
def _tiled_fwd_kernel(
    Q, K, V, COS, SIN, OUT, LSE,
    SH, H, Tq, Tk, D, HALF, q_offset, qk_scale2,  # qk_scale2 = scale * log2(e)
    sq_b, sq_t, sq_s, sq_h, sq_d,
    sk_b, sk_t, sk_s, sk_h, sk_d,
    sv_b, sv_t, sv_s, sv_h, sv_d,
    so_b, so_t, so_s, so_h, so_d,
    sl_b, sl_s, sl_h, sl_t,
    sc_t, sc_d, ss_t, ss_d,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NQB,  # query blocks per sequence (a runtime int: no build per sequence length)
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (sequence, query block): the online softmax over key blocks."""
    dt = OUT.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    n = pid // NQB  # the NQB blocks of a sequence are consecutive programs (k / v shared in L2)
    qi = pid - n * NQB
    b, s, h = _bsh(n, SH, H)
    d_full = tl.arange(0, BLOCK_D).to(tl.int64)
    d_half = tl.arange(0, BLOCK_H).to(tl.int64)
    qt = qi * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = qt < Tq
    qt64 = qt.to(tl.int64)
    qa, qb = _load_rot_rows(Q, b * sq_b + s * sq_s + h * sq_h + qt64 * sq_t, q_offset + qt, q_ok,
                            COS, SIN, d_full, d_half, sq_d, D, HALF, sc_t, sc_d, ss_t, ss_d,
                            ROPE, INTERLEAVED, BLOCK_H)
    k_base = b * sk_b + s * sk_s + h * sk_h
    v_base = b * sv_b + s * sv_s + h * sv_h
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = Tk
    if CAUSAL:  # the block's last query sees keys up to q_offset + its frame
        hi = tl.minimum(Tk, q_offset + (qi + 1) * BLOCK_M)
    for j0 in range(0, hi, BLOCK_N):
        kt = j0 + tl.arange(0, BLOCK_N)
        ka, kb, v, k_ok = _load_kv_block(K, V, k_base, v_base, kt, Tk, COS, SIN, d_full, d_half,
                                         sk_t, sk_d, sv_t, sv_d, D, HALF, sc_t, sc_d, ss_t, ss_d,
                                         ROPE, INTERLEAVED, BLOCK_H)
        # (padding query rows see the keys too: their row maxima stay finite)
        z, visible = _tile_scores(qa, qb, ka, kb, qt, kt, qt >= 0, k_ok, q_offset, qk_scale2,
                                  CAUSAL, ROPE, DOT_PREC)
        z = tl.where(visible, z, float("-inf"))
        # finite from the first block on: key 0 is visible to every row (padding rows included)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=DOT_PREC)
        m_i = m_new
    o_off = b * so_b + s * so_s + h * so_h + qt64 * so_t
    tl.store(OUT + o_off[:, None] + d_full[None, :] * so_d, (acc / l_i[:, None]).to(dt),
             mask=q_ok[:, None] & (d_full[None, :] < D))
    tl.store(LSE + b * sl_b + s * sl_s + h * sl_h + qt64 * sl_t,
             (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=q_ok)


@triton.jit
def _tiled_bwd_dq_kernel(
    DO, Q, K, V, COS, SIN, OUT, LSE, DQ, DELTA,
    SH, H, Tq, Tk, D, HALF, q_offset, scale, qk_scale2,
    sdo_b, sdo_t, sdo_s, sdo_h, sdo_d,
    sq_b, sq_t, sq_s, sq_h, sq_d,
    sk_b, sk_t, sk_s, sk_h, sk_d,
    sv_b, sv_t, sv_s, sv_h, sv_d,
    so_b, so_t, so_s, so_h, so_d,
    sl_b, sl_s, sl_h, sl_t,
    sdq_b, sdq_t, sdq_s, sdq_h, sdq_d,
    sc_t, sc_d, ss_t, ss_d,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NQB,  # query blocks per sequence (a runtime int: no build per sequence length)
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (sequence, query block): dq over the visible key blocks; also writes
    ``delta = rowsum(dout * out)`` (``DELTA``: ``[sequences, T_q]`` fp32) for the dk / dv kernel."""
    dt = DQ.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    n = pid // NQB
    qi = pid - n * NQB
    b, s, h = _bsh(n, SH, H)
    d_full = tl.arange(0, BLOCK_D).to(tl.int64)
    d_half = tl.arange(0, BLOCK_H).to(tl.int64)
    qt = qi * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = qt < Tq
    qt64 = qt.to(tl.int64)
    qa, qb = _load_rot_rows(Q, b * sq_b + s * sq_s + h * sq_h + qt64 * sq_t, q_offset + qt, q_ok,
                            COS, SIN, d_full, d_half, sq_d, D, HALF, sc_t, sc_d, ss_t, ss_d,
                            ROPE, INTERLEAVED, BLOCK_H)
    dmask = q_ok[:, None] & (d_full[None, :] < D)
    do = tl.load(DO + (b * sdo_b + s * sdo_s + h * sdo_h + qt64 * sdo_t)[:, None]
                 + d_full[None, :] * sdo_d, mask=dmask, other=0.0)
    o = tl.load(OUT + (b * so_b + s * so_s + h * so_h + qt64 * so_t)[:, None]
                + d_full[None, :] * so_d, mask=dmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + n * Tq + qt64, delta, mask=q_ok)
    lse2 = tl.load(LSE + b * sl_b + s * sl_s + h * sl_h + qt64 * sl_t, mask=q_ok,
                   other=0.0) * 1.4426950408889634
    k_base = b * sk_b + s * sk_s + h * sk_h
    v_base = b * sv_b + s * sv_s + h * sv_h
    dqa = tl.zeros([BLOCK_M, BLOCK_H if ROPE else BLOCK_D], dtype=tl.float32)
    dqb = tl.zeros([BLOCK_M, BLOCK_H if ROPE else BLOCK_D], dtype=tl.float32)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, q_offset + (qi + 1) * BLOCK_M)
    for j0 in range(0, hi, BLOCK_N):
        kt = j0 + tl.arange(0, BLOCK_N)
        ka, kb, v, k_ok = _load_kv_block(K, V, k_base, v_base, kt, Tk, COS, SIN, d_full, d_half,
                                         sk_t, sk_d, sv_t, sv_d, D, HALF, sc_t, sc_d, ss_t, ss_d,
                                         ROPE, INTERLEAVED, BLOCK_H)
        z, visible = _tile_scores(qa, qb, ka, kb, qt, kt, q_ok, k_ok, q_offset, qk_scale2,
                                  CAUSAL, ROPE, DOT_PREC)
        ds = masked_ds(masked_probs(z, visible, lse2), visible, do, v, delta, DOT_PREC).to(dt)
        dqa += tl.dot(ds, ka, input_precision=DOT_PREC)
        if ROPE:
            dqb += tl.dot(ds, kb, input_precision=DOT_PREC)
    dqa = dqa * scale
    if ROPE:
        dqb = dqb * scale
        c, sn = _load_table(COS, SIN, q_offset + qt, q_ok, d_half, sc_t, sc_d, ss_t, ss_d, HALF)
        dqa, dqb = _rotate(dqa, dqb, c, -sn)
    store_pair(DQ, b * sdq_b + s * sdq_s + h * sdq_h + qt64 * sdq_t, q_ok, d_full, d_half,
               sdq_d, D, HALF, dqa.to(dt), dqb.to(dt), ROPE, INTERLEAVED, BLOCK_D)


@triton.jit
def _tiled_bwd_dkdv_kernel(
    DO, Q, K, V, COS, SIN, LSE, DELTA, DK, DV,
    SH, H, Tq, Tk, D, HALF, q_offset, scale, qk_scale2,
    sdo_b, sdo_t, sdo_s, sdo_h, sdo_d,
    sq_b, sq_t, sq_s, sq_h, sq_d,
    sk_b, sk_t, sk_s, sk_h, sk_d,
    sv_b, sv_t, sv_s, sv_h, sv_d,
    sl_b, sl_s, sl_h, sl_t,
    sdk_b, sdk_t, sdk_s, sdk_h, sdk_d,
    sdv_b, sdv_t, sdv_s, sdv_h, sdv_d,
    sc_t, sc_d, ss_t, ss_d,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NKB,  # key blocks per sequence (a runtime int)
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (sequence, key block): dk / dv accumulated over the query blocks that see
    the block (fp32 registers, no atomics); reads the ``DELTA`` the dq kernel wrote."""
    dt = DK.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    n = pid // NKB
    kj = pid - n * NKB
    b, s, h = _bsh(n, SH, H)
    d_full = tl.arange(0, BLOCK_D).to(tl.int64)
    d_half = tl.arange(0, BLOCK_H).to(tl.int64)
    kt = kj * BLOCK_N + tl.arange(0, BLOCK_N)
    kt64 = kt.to(tl.int64)
    ka, kb, v, k_ok = _load_kv_block(K, V, b * sk_b + s * sk_s + h * sk_h,
                                     b * sv_b + s * sv_s + h * sv_h, kt, Tk, COS, SIN, d_full,
                                     d_half, sk_t, sk_d, sv_t, sv_d, D, HALF, sc_t, sc_d, ss_t,
                                     ss_d, ROPE, INTERLEAVED, BLOCK_H)
    q_base = b * sq_b + s * sq_s + h * sq_h
    do_base = b * sdo_b + s * sdo_s + h * sdo_h
    l_base = b * sl_b + s * sl_s + h * sl_h
    dka = tl.zeros([BLOCK_N, BLOCK_H if ROPE else BLOCK_D], dtype=tl.float32)
    dkb = tl.zeros([BLOCK_N, BLOCK_H if ROPE else BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # queries before frame kj * BLOCK_N - q_offset see none of these keys
        lo = (tl.maximum(kj * BLOCK_N - q_offset, 0) // BLOCK_M) * BLOCK_M
    for i0 in range(lo, Tq, BLOCK_M):
        qt = i0 + tl.arange(0, BLOCK_M)
        q_ok = qt < Tq
        qt64 = qt.to(tl.int64)
        qa, qb = _load_rot_rows(Q, q_base + qt64 * sq_t, q_offset + qt, q_ok, COS, SIN, d_full,
                                d_half, sq_d, D, HALF, sc_t, sc_d, ss_t, ss_d,
                                ROPE, INTERLEAVED, BLOCK_H)
        do = tl.load(DO + (do_base + qt64 * sdo_t)[:, None] + d_full[None, :] * sdo_d,
                     mask=q_ok[:, None] & (d_full[None, :] < D), other=0.0)
        lse2 = tl.load(LSE + l_base + qt64 * sl_t, mask=q_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + n * Tq + qt64, mask=q_ok, other=0.0)
        z, visible = _tile_scores(qa, qb, ka, kb, qt, kt, q_ok, k_ok, q_offset, qk_scale2,
                                  CAUSAL, ROPE, DOT_PREC)
        p = masked_probs(z, visible, lse2)
        dv += tl.dot(tl.trans(p.to(dt)), do, input_precision=DOT_PREC)
        dsT = tl.trans(masked_ds(p, visible, do, v, delta, DOT_PREC).to(dt))
        dka += tl.dot(dsT, qa, input_precision=DOT_PREC)
        if ROPE:
            dkb += tl.dot(dsT, qb, input_precision=DOT_PREC)
    dka = dka * scale
    if ROPE:
        dkb = dkb * scale
        c, sn = _load_table(COS, SIN, kt, k_ok, d_half, sc_t, sc_d, ss_t, ss_d, HALF)
        dka, dkb = _rotate(dka, dkb, c, -sn)
    store_pair(DK, b * sdk_b + s * sdk_s + h * sdk_h + kt64 * sdk_t, k_ok, d_full, d_half, sdk_d,
               D, HALF, dka.to(dt), dkb.to(dt), ROPE, INTERLEAVED, BLOCK_D)
    tl.store(DV + (b * sdv_b + s * sdv_s + h * sdv_h + kt64 * sdv_t)[:, None]
             + d_full[None, :] * sdv_d, dv.to(dt), mask=k_ok[:, None] & (d_full[None, :] < D))



# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def _check_tensor(op: str, name: str, t, shape, dtype, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")


# Padded T_k from which the launchers take the tiled kernels although the resident ones fit, per
# pass and GPU kind: there the resident builds spill heavily (AOT builds, triton 3.9, bf16, RoPE,
# causal; ``benchmarks/results/triton-aot-2026-12-07-tiled/``): on mma.sync GPUs (sm_80 - sm_89,
# sm_120) the backward 6-12 KB of stack per thread at T_k = 64 and 12-24 KB at 128, the forward
# 1.1-1.4 KB at 128; on sm_90 the backward 0.3-1.3 KB at 128. The tiled kernels spill at most
# 112 B there. (sm_100 takes the sm_90 entry unmeasured.) float32 (every GPU, both passes): resident key tiles (padded T_k x head_dim) of
# _TILED_FROM_FP32 elements, the largest the shared memory allows, spill 5-12 KB (T_k 64 x 128,
# 128 x 64, 32 x 256), the tiled kernels at most 3.4 KB (dk / dv at D = 256; 0-320 B below).
# (A rule from compiler reports: no GPU timing was available.)
_TILED_FROM = {"mma_sync": {"fwd": 128, "bwd": 64}, "wgmma": {"fwd": None, "bwd": 128}}
# float32 tile elements (rows x BLOCK_D) from which the tiled kernels run: the backward on
# mma.sync GPUs from 4096 (T_k = 32 at D = 128: its resident build spilled 5 KB on sm_80 once
# it renormalised p over the row, 2026-12-08; the tiled ones <= 296 B there), else 8192
_TILED_FROM_FP32 = {"mma_sync": {"fwd": 8192, "bwd": 4096}, "wgmma": {"fwd": 8192, "bwd": 8192}}


_FORCED: list = [None]  # the choice tiled_kernels() imposes on tiled=None launches (None: decide)


@contextlib.contextmanager
def tiled_kernels(enabled: bool | None = True):
    """Within the context, launches that leave ``tiled`` to the launcher (the op's always do)
    take the tiled kernels (``True``), the resident ones (``False``: a ValueError where they do
    not fit) or decide as usual (``None``). For benchmarks and tests that compare the two sets;
    process-wide, not thread-safe. The backward runs its own launch: keep it inside too."""
    prev = _FORCED[0]
    _FORCED[0] = enabled
    try:
        yield
    finally:
        _FORCED[0] = prev


def _resident_spills(op: str, Tk: int, q) -> bool:
    """Whether the resident build of ``op``'s pass at ``Tk`` frames spills enough on q's GPU
    that the tiled kernels are taken instead (:data:`_TILED_FROM`, :data:`_TILED_FROM_FP32`)."""
    rows = max(triton.next_power_of_2(Tk), _MIN_ROWS)
    kind = "mma_sync" if mma_sync_arch(target_arch(q)) else "wgmma"
    pass_ = "bwd" if op.endswith("_bwd") else "fwd"
    if q.dtype == torch.float32 and rows * max(triton.next_power_of_2(q.shape[-1]),
                                               2 * _MIN_ROWS) >= _TILED_FROM_FP32[kind][pass_]:
        return True
    lim = _TILED_FROM[kind][pass_]
    return lim is not None and rows >= lim


def _config(op: str, q, k, v, cos, sin, q_offset: int, tiled, seqs_per_program, num_warps,
            block_m, block_n, num_stages):
    """Validate the common inputs; return the launch configuration: the resident kernels when
    the sequence fits on chip (``tiled=None`` decides; False insists, True forces the tiled
    ones), else the tiled kernels (:func:`_tiled_config`)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5:
            raise ValueError(f"{op}: {name} must be a 5-D [B, T, S, H, D] tensor")
    if q.dtype not in _DTYPES:
        raise TypeError(f"{op}: dtype must be one of {_DTYPES}, got {q.dtype}")
    B, Tq, S, H, D = q.shape
    Tk = k.shape[1]
    _check_tensor(op, "k", k, (B, Tk, S, H, D), q.dtype, q.device)
    _check_tensor(op, "v", v, (B, Tk, S, H, D), q.dtype, q.device)
    if q_offset < 0 or q_offset + Tq != Tk:
        raise ValueError(f"{op}: need q_offset >= 0 and q_offset + T_q == T_k, got "
                         f"q_offset={q_offset}, T_q={Tq}, T_k={Tk}")
    if D > MAX_D:
        raise ValueError(f"{op}: the triton kernels support head_dim D <= {MAX_D}, got D={D}")
    rope = cos is not None
    if rope != (sin is not None):
        raise ValueError(f"{op}: cos and sin must be given together")
    if rope:
        if D % 2:
            raise ValueError(f"{op}: RoPE needs an even head_dim, got D={D}")
        for name, t in (("cos", cos), ("sin", sin)):
            if (not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < Tk
                    or t.shape[1] != D // 2 or t.dtype != torch.float32):
                raise ValueError(f"{op}: {name} must be a float32 [>= T_k, D/2] = [{Tk}, {D // 2}] "
                                 f"table, got {tuple(t.shape)} {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    why = (f"T_k <= {RESIDENT_MAX_T} frames, got T_k={Tk}" if Tk > RESIDENT_MAX_T
           else tile_error(Tk, D, q.dtype, target_shared_memory(q)))
    if tiled is None:
        tiled = _FORCED[0]
    if tiled is None:
        tiled = why is not None or _resident_spills(op, Tk, q)
    elif not tiled and why is not None:
        raise ValueError(f"{op}: the resident kernels (tiled=False) hold the whole sequence on "
                         f"chip and support {why}")
    common = dict(B=B, Tq=Tq, Tk=Tk, S=S, H=H, D=D, nseq=B * S * H, rope=rope, tiled=bool(tiled))
    if tiled:
        if seqs_per_program is not None:
            raise ValueError(f"{op}: seqs_per_program applies to the resident kernels only "
                             f"(the tiled ones run a program per sequence and block)")
        return dict(common, **_tiled_config(op, q, common["nseq"], Tq, Tk, D, block_m, block_n,
                                             num_warps, num_stages))
    if block_n is not None:
        raise ValueError(f"{op}: block_n applies to the tiled kernels only (the resident ones "
                         f"hold every key)")

    block_d = max(triton.next_power_of_2(D), 2 * _MIN_ROWS)  # halves >= 16 columns for RoPE
    tp = triton.next_power_of_2(Tk)
    block_t = max(tp, _MIN_ROWS)  # packs block_t // tp sequences when Tk < 16
    if tp < block_t:
        block_m = block_t  # packed tiles: queries and keys share the row layout
    else:
        tq_pad = max(triton.next_power_of_2(Tq), _MIN_ROWS)
        block_m = min(tq_pad, 64 if block_m is None else int(block_m))
        if block_m < _MIN_ROWS or block_m & (block_m - 1):
            raise ValueError(f"{op}: block_m must be a power of two >= 16, got {block_m}")
    nqb = triton.cdiv(Tq, block_m) if tp >= block_t else 1
    nseq = B * S * H
    pack = block_t // tp
    tiles = triton.cdiv(nseq, pack)
    if seqs_per_program is None:
        groups = max(1, _ROWS_PER_PROGRAM // block_t)
        while groups > 1 and triton.cdiv(tiles, groups) < _MIN_PROGRAMS:
            groups //= 2
    else:
        if int(seqs_per_program) < 1:
            raise ValueError(f"{op}: seqs_per_program must be >= 1, got {seqs_per_program}")
        groups = max(1, int(seqs_per_program) // pack)  # tiles per program
    if num_warps is None:
        # 8 warps once the key tile reaches 4096 elements (32 x 128, 64 x 64, ...), else 4: with
        # 4 warps the sm_90 build of the 32 x 128 / 64 x 64 forward already spills registers.
        # The backward holds more accumulators: with 32 x 64 key and query tiles (T = 32,
        # D = 64) its sm_90 bf16 build spills 424 bytes of stack with 4 warps, 200 with 8
        # (aot_check, triton 3.9; forward: none either way). Chosen from builds, not timings.
        big = block_t * block_d >= 4096 or (op.endswith("_bwd") and block_m >= 32
                                            and block_t * block_d >= 2048)
        num_warps = 8 if big else 4
    if num_stages is None:
        num_stages = _default_stages(groups, block_t * block_d * q.element_size())
    return dict(
        common,
        grid=(triton.cdiv(tiles, groups),),
        meta=dict(TP=min(tp, block_t), BLOCK_T=block_t, BLOCK_M=block_m, NQB=nqb,
                  BLOCK_D=block_d, BLOCK_H=block_d // 2, SEQ_GROUPS=groups,
                  DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                  num_warps=int(num_warps), num_stages=int(num_stages)),
    )


# Tiles of the tiled kernels, (BLOCK_M, BLOCK_N, num_warps) by kernel, dtype class and padded
# head dim (64 stands for <= 64). BLOCK_M counts query rows, BLOCK_N key rows (dk / dv: the
# resident key block and the query rows per step). Chosen from AOT builds (aot_check's
# compiler, triton 3.9, RoPE, sm_90a and sm_80; no GPU timing was available) as the largest
# tiles with the fewest spilled bytes, see the module docstring.
_TILED_TILES = {
    "16": {"fwd": {64: (64, 64, 8), 128: (64, 64, 8), 256: (64, 32, 8)},
           "dq": {64: (64, 64, 8), 128: (32, 64, 8), 256: (32, 32, 4)},
           "dkdv": {64: (32, 64, 8), 128: (32, 64, 8), 256: (16, 32, 4)}},
    "32": {"fwd": {64: (32, 32, 8), 128: (32, 32, 8), 256: (16, 16, 8)},
           "dq": {64: (16, 32, 8), 128: (16, 16, 8), 256: (16, 16, 8)},
           "dkdv": {64: (16, 16, 8), 128: (16, 16, 8), 256: (16, 16, 8)}},
}
# mma.sync GPUs (sm_80 - sm_89, sm_120): the 16-bit dk / dv tiles above spill 200 B - 1 KB there
_TILED_TILES_SM80_DKDV = {64: (32, 32, 4), 128: (16, 32, 4), 256: (16, 32, 4)}


def _tiled_tiles(kernel: str, q, D: int, block_m, block_n, num_warps):
    """``(BLOCK_M, BLOCK_N, num_warps)`` of tiled ``kernel`` (``"fwd"``, ``"dq"``, ``"dkdv"``)
    for q's dtype, head dim and GPU (:data:`_TILED_TILES`); 16 x 16 under the interpreter
    (tests: several blocks at small T). The keyword arguments override."""
    block_d = max(triton.next_power_of_2(D), 64)
    if triton_interpret():
        bm, bn, warps = 16, 16, 4
    else:
        wide = q.dtype != torch.float32
        bm, bn, warps = _TILED_TILES["16" if wide else "32"][kernel][block_d]
        if wide and kernel == "dkdv" and mma_sync_arch(target_arch(q)):
            bm, bn, warps = _TILED_TILES_SM80_DKDV[block_d]
        shared = target_shared_memory(q)
        if wide and kernel == "fwd" and block_d == 256 and shared is not None \
                and shared < FULL_SHARED:  # 64 x 32 needs ~100 KiB at two stages
            bm, bn, warps = 32, 32, 4
    bm = bm if block_m is None else int(block_m)
    bn = bn if block_n is None else int(block_n)
    for name, val in (("block_m", bm), ("block_n", bn)):
        if val < _MIN_ROWS or val & (val - 1):
            raise ValueError(f"triton temporal attention: {name} must be a power of two >= 16, "
                             f"got {val}")
    return bm, bn, int(num_warps or warps)


def _tiled_config(op: str, q, nseq: int, Tq: int, Tk: int, D: int, block_m, block_n, num_warps,
                  num_stages):
    """Grid and meta-parameters of the tiled kernels: one program per (sequence, query block)
    (forward, dq) or (sequence, key block) (dk / dv), for ``nseq`` sequences."""
    block_d = max(triton.next_power_of_2(D), 2 * _MIN_ROWS)
    out = {}
    for kernel in (("dq", "dkdv") if op.endswith("_bwd") else ("fwd",)):
        bm, bn, warps = _tiled_tiles(kernel, q, D, block_m, block_n, num_warps)
        if block_m is None:  # streaming steps: a few new frames
            bm = min(bm, max(triton.next_power_of_2(Tq), _MIN_ROWS))
        meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_H=block_d // 2,
                    DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                    num_warps=warps, num_stages=2 if num_stages is None else int(num_stages))
        if kernel == "dkdv":
            meta["NKB"] = triton.cdiv(Tk, bn)
            grid = (nseq * meta["NKB"],)
        else:
            meta["NQB"] = triton.cdiv(Tq, bm)
            grid = (nseq * meta["NQB"],)
        out[kernel] = dict(grid=grid, meta=meta)
    return out


def _launch_or_explain(kernel, cfg, args, meta, q, op: str) -> None:
    """:func:`._launch.launch`; a build that does not fit this GPU's shared memory even with one
    stage (:func:`tile_error` and the tiled kernels' tiles let none through on the GPUs they
    were checked for) becomes a ValueError that says so and what to do, not Triton's
    OutOfResources."""
    try:
        launch(kernel, cfg["grid"], args, meta, q.device)
    except OutOfResources as e:
        if cfg["tiled"]:  # tiles independent of T: smaller blocks fit
            hint = "smaller block_m / block_n (tiled kernels) fit"
        elif q.dtype == torch.float32:
            hint = "fp16 / bf16 (torch.autocast) fit more"
        else:
            hint = "fewer frames or a smaller head_dim fit"
        raise ValueError(
            f"{op}: T_k={cfg['Tk']} x head_dim={cfg['D']} in {q.dtype} needs {e.required} B of "
            f"shared memory per block, this GPU allows {e.limit} B (Triton OutOfResources); "
            f"{hint}; or use backend='reference'") from e


def _default_stages(groups: int, tile_bytes: int) -> int:
    """Software-pipelining depth of the sequence loop (loads of the next tiles are issued while
    the current one computes; each extra stage buffers them in shared memory)."""
    if groups == 1:
        return 1  # nothing to pipeline
    # From sm_90 builds (triton 3.6): with 2 stages a 64 x 256 fp16 tile needs ~208-232 KiB of
    # shared memory (over the 227 KiB limit in the backward), 64 x 128 fp16 ~104-120 KiB; fp32
    # 64 x 128 tiles need > 227 KiB already with 3 stages. Large tiles therefore run unpipelined.
    if tile_bytes >= 32 * 1024:
        return 1
    return 2


def _table_strides(cos, sin):
    if cos is None:
        return (0, 0, 0, 0)
    return (*cos.stride(), *sin.stride())


def temporal_attn_fwd(q, k, v, cos, sin, out, lse, causal: bool, interleaved: bool, q_offset: int,
                      scale: float, *, tiled=None, seqs_per_program=None, num_warps=None,
                      block_m=None, block_n=None, num_stages=None) -> None:
    """Forward kernel contract (see ``vidgen_kernels.ops.temporal_attention``); fills out, lse.

    Keyword-only knobs (benchmarks / tests): ``tiled`` (None: the resident kernels when the
    sequence fits on chip, else the tiled ones; True / False forces one), ``seqs_per_program``
    (resident: sequences per program, default about 128 frame rows), ``num_warps``, ``block_m``
    (query rows per block), ``block_n`` (tiled: key rows per block), ``num_stages``.
    """
    op = "triton temporal_attn_fwd"
    cfg = _config(op, q, k, v, cos, sin, int(q_offset), tiled, seqs_per_program, num_warps,
                  block_m, block_n, num_stages)
    B, Tq, S, H, D = cfg["B"], cfg["Tq"], cfg["S"], cfg["H"], cfg["D"]
    _check_tensor(op, "out", out, (B, Tq, S, H, D), q.dtype, q.device)
    _check_tensor(op, "lse", lse, (B, S, H, Tq), torch.float32, q.device)
    if cfg["nseq"] == 0 or Tq == 0 or D == 0:
        return
    tabs = (cos if cfg["rope"] else q, sin if cfg["rope"] else q)
    flags = dict(CAUSAL=bool(causal), ROPE=cfg["rope"], INTERLEAVED=bool(interleaved))
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
               *_table_strides(cos, sin))
    with device_ctx(q):
        if cfg["tiled"]:
            args = (q, k, v, *tabs, out, lse, S * H, H, Tq, cfg["Tk"], D, D // 2, int(q_offset),
                    float(scale) * _LOG2E, *strides)
            t = cfg["fwd"]
            _launch_or_explain(_tiled_fwd_kernel, dict(cfg, grid=t["grid"]), args,
                               dict(t["meta"], **flags), q, op)
            return
        args = (q, k, v, *tabs, out, lse, cfg["nseq"], S * H, H, Tq, cfg["Tk"], D, D // 2,
                int(q_offset), float(scale) * _LOG2E, *strides)
        _launch_or_explain(_temporal_attn_fwd_kernel, cfg, args, dict(cfg["meta"], **flags), q, op)


def temporal_attn_bwd(dout, q, k, v, cos, sin, out, lse, dq, dk, dv, causal: bool,
                      interleaved: bool, q_offset: int, scale: float, *, tiled=None,
                      seqs_per_program=None, num_warps=None, block_m=None, block_n=None,
                      num_stages=None) -> None:
    """Backward kernel contract (see ``vidgen_kernels.ops.temporal_attention``); writes every
    element of dq, dk, dv. Same keyword-only knobs as :func:`temporal_attn_fwd`. The tiled
    path runs two kernels (dq, which also writes ``delta``, then dk / dv) and allocates that
    ``[B * S * H, T_q]`` float32 ``delta``."""
    op = "triton temporal_attn_bwd"
    cfg = _config(op, q, k, v, cos, sin, int(q_offset), tiled, seqs_per_program, num_warps,
                  block_m, block_n, num_stages)
    B, Tq, Tk, S, H, D = cfg["B"], cfg["Tq"], cfg["Tk"], cfg["S"], cfg["H"], cfg["D"]
    _check_tensor(op, "dout", dout, (B, Tq, S, H, D), q.dtype, q.device)
    _check_tensor(op, "out", out, (B, Tq, S, H, D), q.dtype, q.device)
    _check_tensor(op, "lse", lse, (B, S, H, Tq), torch.float32, q.device)
    _check_tensor(op, "dq", dq, (B, Tq, S, H, D), q.dtype, q.device)
    _check_tensor(op, "dk", dk, (B, Tk, S, H, D), q.dtype, q.device)
    _check_tensor(op, "dv", dv, (B, Tk, S, H, D), q.dtype, q.device)
    if cfg["nseq"] == 0 or Tq == 0 or D == 0:
        return
    tabs = (cos if cfg["rope"] else q, sin if cfg["rope"] else q)
    flags = dict(CAUSAL=bool(causal), ROPE=cfg["rope"], INTERLEAVED=bool(interleaved))
    sizes = (S * H, H, Tq, Tk, D, D // 2, int(q_offset), float(scale), float(scale) * _LOG2E)
    with device_ctx(q):
        if cfg["tiled"]:
            delta = torch.empty((cfg["nseq"], Tq), dtype=torch.float32, device=q.device)
            t = cfg["dq"]
            args = (dout, q, k, v, *tabs, out, lse, dq, delta, *sizes,
                    *dout.stride(), *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                    *lse.stride(), *dq.stride(), *_table_strides(cos, sin))
            _launch_or_explain(_tiled_bwd_dq_kernel, dict(cfg, grid=t["grid"]), args,
                               dict(t["meta"], **flags), q, op)
            t = cfg["dkdv"]
            args = (dout, q, k, v, *tabs, lse, delta, dk, dv, *sizes,
                    *dout.stride(), *q.stride(), *k.stride(), *v.stride(), *lse.stride(),
                    *dk.stride(), *dv.stride(), *_table_strides(cos, sin))
            _launch_or_explain(_tiled_bwd_dkdv_kernel, dict(cfg, grid=t["grid"]), args,
                               dict(t["meta"], **flags), q, op)
            return
        args = (  # (no out: delta comes from the rows' p)
            dout, q, k, v, *tabs, lse, dq, dk, dv, cfg["nseq"], *sizes,
            *dout.stride(), *q.stride(), *k.stride(), *v.stride(), *lse.stride(),
            *dq.stride(), *dk.stride(), *dv.stride(),
            *_table_strides(cos, sin),
        )
        _launch_or_explain(_temporal_attn_bwd_kernel, cfg, args, dict(cfg["meta"], **flags), q, op)
