"""Triton backend of fused RoPE-3D + flash attention (``vidgen_kernels.ops.rope3d_attention``).

Implements the kernel contract documented at the top of ``vidgen_kernels/ops/rope3d_attention.py``
(``rope3d_attn_fwd`` / ``rope3d_attn_bwd`` / ``rope3d_attn_jvp``, same argument order as
``kernel_fwd_torch`` / ``kernel_bwd_torch`` / ``kernel_jvp_torch``; all return new tensors).

Design (FlashAttention-2)
-------------------------
* **Forward**: one program per (query block of ``BLOCK_M`` rows, b * H + h); it walks the key
  blocks of ``BLOCK_N`` rows with the online softmax (running max / sum in fp32, ``exp2`` with
  ``log2(e)`` folded into the scale) and writes ``out`` and the natural-log ``lse``.
* **Fused RoPE**: q / k tiles are loaded as two ``[rows, BLOCK_D / 2]`` halves ``a``, ``b`` (the
  two members of each rotation pair: interleaved = one coalesced full-row load split with
  ``tl.reshape`` + ``tl.split``; half-split = two loads), rotated elementwise in fp32 with the
  cos / sin rows of their positions (rows outside ``[rope_offset, rope_offset + L)`` load
  cos = 1, sin = 0: text tokens pass unrotated), rounded to the input dtype, and the scores are
  ``dot(qa, ka^T) + dot(qb, kb^T)``. Nothing rotated is ever written to memory.
* **Backward**: three kernels: ``delta = rowsum(dout * out)`` (preprocess), a dk / dv kernel (one
  program per key block, looping over query blocks, accumulating in fp32 registers; no
  atomics) and a dq kernel (one program per query block, looping over key blocks). Both
  re-rotate q / k on load and rotate ``dq`` / ``dk`` by the negative angle before storing
  (``tl.join`` re-interleaves). Only q, k, v, out, lse (and the tables) are read.
* **Forward-mode AD** (``rope3d_attn_jvp``): the forward kernel with ``JVP`` also loads the
  tangents of q / k / v (rotated like q / k) and carries ``mu = sum p dz`` and
  ``t = sum p (dz v + dv)`` through the online softmax, storing ``t / l - (mu / l) o``: one pass,
  four score dots and three value dots per tile, its own tiles (``_JVP_TILES``).
* **Frame-causal tile skipping**: a (query block, key block) pair whose key block lies entirely
  in the video range and whose first key's frame block is after the last video query's block
  is fully masked: the loops skip it (a scalar test per tile), so frame-causal attention costs
  roughly the visible fraction of the full work. Tiles that are partly visible apply the
  element mask of the contract.
* q / k / v / dout are read in place through their four strides (any layout); row offsets are
  int64. fp32 inputs use ``input_precision="ieee"`` dots (no TF32).
* Block sizes (``BLOCK_M x BLOCK_N``, warps; :func:`_tiles`), sm_90 and newer: forward 128 x 64
  for D <= 128 (4 warps at D = 64, 8 at D = 128), 64 x 32 for D = 256; backward (dk/dv and dq
  alike) 64 x 64 (D <= 64), 64 x 32 (D <= 128), 16 x 32 (D = 256), 8 warps from D = 64; fp32
  halves BLOCK_M; 32 x 32 under the interpreter (tests). Chosen from ahead-of-time sm_90a builds
  (``aot_check``: ``triton.compile`` for a ``GPUTarget``, ``ptxas -v``), bf16 with RoPE +
  frame-causal: no spills in the forward (12 bytes at D = 256), none in the backward at D = 64,
  88 bytes (dk/dv) / 0 (dq) at D = 128, ~850 bytes (dk/dv) at D = 256. On sm_80 - sm_89 and
  sm_120 / sm_121 (``mma.sync`` GPUs, :func:`._launch.mma_sync_arch`) with RoPE those tiles
  spill 0.2-4.4 KB per thread, so there the launchers take the per-kernel table
  ``_SM80_ROPE_TILES`` (dk/dv and dq tiles differ); without RoPE the sm_90 tiles spill at most
  8 bytes there and are kept. A forward build over the GPU's shared memory (D = 256 with two stages
  on sm_86 / sm_89) is retried with one stage (:func:`._launch.launch`).
  **No GPU timing was available**: not tuned by measurement; ``block_m`` / ``block_n`` /
  ``num_warps`` / ``num_stages`` are keyword-only knobs for benchmarks.

Limits: ``D <= 256`` (:data:`MAX_D`); any D works (padded to a power of two >= 32 columns).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import triton_interpret
from ._launch import device_ctx, launch, mma_sync_arch, target_arch
from .rope_tiles import load_pair, pair_scores, masked_ds, masked_probs, store_pair

__all__ = ["rope3d_attn_fwd", "rope3d_attn_bwd", "rope3d_attn_jvp", "MAX_D"]

MAX_D = 256
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _table(COS, SIN, pos, ok, d_half, sc_t, sc_d, ss_t, ss_d, HALF, rope_off, L):
    """cos / sin of token positions ``pos`` ([rows, BLOCK_H] fp32); identity (1, 0) for tokens
    outside the rotated range [rope_off, rope_off + L)."""
    rot = ok & (pos >= rope_off) & (pos < rope_off + L)
    t = (pos - rope_off).to(tl.int64)
    m = rot[:, None] & (d_half[None, :] < HALF)
    c = tl.load(COS + t[:, None] * sc_t + d_half[None, :] * sc_d, mask=m, other=1.0)
    s = tl.load(SIN + t[:, None] * ss_t + d_half[None, :] * ss_d, mask=m, other=0.0)
    return c, s


@triton.jit
def _load_rot(X, row_off, pos, ok, COS, SIN, d_full, d_half, sd, D, HALF, sc_t, sc_d, ss_t, ss_d,
              rope_off, L, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
              BLOCK_H: tl.constexpr):
    """Load rows and rotate them (fp32 math, rounded to X's dtype)."""
    a, b = load_pair(X, row_off, ok, d_full, d_half, sd, D, HALF, ROPE, INTERLEAVED, BLOCK_H)
    if ROPE:
        dt = X.dtype.element_ty
        c, s = _table(COS, SIN, pos, ok, d_half, sc_t, sc_d, ss_t, ss_d, HALF, rope_off, L)
        af = a.to(tl.float32)
        bf = b.to(tl.float32)
        a = (af * c - bf * s).to(dt)
        b = (bf * c + af * s).to(dt)
    return a, b


@triton.jit
def _allowed(rm, rn, fc_start, fc_end, fc_block):
    """Frame-causal element mask [rows, cols]: key is text, or both video and blk(k) <= blk(q)."""
    qv = (rm >= fc_start) & (rm < fc_end)
    kv = (rn >= fc_start) & (rn < fc_end)
    kt = (rn < fc_start) | (rn >= fc_end)
    qb = tl.maximum(rm - fc_start, 0) // fc_block
    kb = tl.maximum(rn - fc_start, 0) // fc_block
    return kt[None, :] | (qv[:, None] & kv[None, :] & (kb[None, :] <= qb[:, None]))


@triton.jit
def _max_qblock(m0, BLOCK_M: tl.constexpr, Sq, fc_start, fc_end, fc_block):
    """Frame block of the last video query in rows [m0, m0 + BLOCK_M); -1 if there is none."""
    hi = tl.minimum(tl.minimum(m0 + BLOCK_M, Sq), fc_end) - 1
    has = hi >= tl.maximum(m0, fc_start)
    return tl.where(has, tl.maximum(hi - fc_start, 0) // fc_block, -1)


@triton.jit
def _key_block_has_text(n0, BLOCK_N: tl.constexpr, Sk, fc_start, fc_end, fc_block):
    """(some key row of [n0, n0 + BLOCK_N) is text, frame block of the first video key)."""
    has_text = (n0 < fc_start) | (tl.minimum(n0 + BLOCK_N, Sk) > fc_end)
    return has_text, tl.maximum(n0 - fc_start, 0) // fc_block


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    Q, K, V, COS, SIN, OUT, LSE, DQ, DK, DV,
    Sq, Sk, H, D, HALF, L, rope_off, fc_start, fc_end, fc_block, qk_scale2, qk_scale,
    sq_b, sq_s, sq_h, sq_d,
    sk_b, sk_s, sk_h, sk_d,
    sv_b, sv_s, sv_h, sv_d,
    so_b, so_s, so_h, so_d,
    sl_b, sl_s, sl_h,
    sc_t, sc_d, ss_t, ss_d,
    sdq_b, sdq_s, sdq_h, sdq_d,
    sdk_b, sdk_s, sdk_h, sdk_d,
    sdv_b, sdv_s, sdv_h, sdv_d,
    ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, FRAME_CAUSAL: tl.constexpr,
    JVP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Forward: ``out`` and ``lse``. ``JVP``: instead, the tangent of ``out`` along the tangents
    DQ / DK / DV of q / k / v (any strides; stride 0 for a zero tangent), written to OUT (LSE is
    not touched): with ``dz = scale (<dqr, kr> + <qr, dkr>)`` (natural units), it accumulates
    ``sum_j p_j dz_j``, ``sum_j p_j dz_j v_j + p_j dv_j`` beside the online softmax and stores
    ``t / l - (mu / l) o``. The ``p dz`` products go through the dot in fp32 (tf32 for 16-bit
    inputs: ``dz`` has no bound, fp16 could overflow)."""
    dt = OUT.dtype.element_ty
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh - b * H
    d_full = tl.arange(0, BLOCK_D).to(tl.int64)
    d_half = tl.arange(0, BLOCK_H).to(tl.int64)

    rm = m0 + tl.arange(0, BLOCK_M)
    q_ok = rm < Sq
    rm64 = rm.to(tl.int64)
    qa, qb = _load_rot(Q, b * sq_b + h * sq_h + rm64 * sq_s, rm, q_ok, COS, SIN, d_full, d_half,
                       sq_d, D, HALF, sc_t, sc_d, ss_t, ss_d, rope_off, L,
                       ROPE, INTERLEAVED, BLOCK_H)
    k_base = b * sk_b + h * sk_h
    v_base = b * sv_b + h * sv_h
    if JVP:
        dqa, dqb = _load_rot(DQ, b * sdq_b + h * sdq_h + rm64 * sdq_s, rm, q_ok, COS, SIN, d_full,
                             d_half, sdq_d, D, HALF, sc_t, sc_d, ss_t, ss_d, rope_off, L,
                             ROPE, INTERLEAVED, BLOCK_H)
        mu_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        tacc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qmax = -1
    if FRAME_CAUSAL:
        qmax = _max_qblock(m0, BLOCK_M, Sq, fc_start, fc_end, fc_block)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, Sk, BLOCK_N):
        visit = True
        if FRAME_CAUSAL:
            has_text, kblk = _key_block_has_text(n0, BLOCK_N, Sk, fc_start, fc_end, fc_block)
            visit = has_text | (kblk <= qmax)
        if visit:
            rn = n0 + tl.arange(0, BLOCK_N)
            k_ok = rn < Sk
            rn64 = rn.to(tl.int64)
            ka, kb = _load_rot(K, k_base + rn64 * sk_s, rn, k_ok, COS, SIN, d_full, d_half, sk_d,
                               D, HALF, sc_t, sc_d, ss_t, ss_d, rope_off, L,
                               ROPE, INTERLEAVED, BLOCK_H)
            v = tl.load(V + v_base + rn64[:, None] * sv_s + d_full[None, :] * sv_d,
                        mask=k_ok[:, None] & (d_full[None, :] < D), other=0.0)
            z = pair_scores(qa, qb, ka, kb, ROPE, DOT_PREC) * qk_scale2
            valid = k_ok[None, :]
            if FRAME_CAUSAL:
                valid = valid & _allowed(rm, rn, fc_start, fc_end, fc_block)
            z = tl.where(valid, z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(z - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=DOT_PREC)
            if JVP:
                dka, dkb = _load_rot(DK, b * sdk_b + h * sdk_h + rn64 * sdk_s, rn, k_ok, COS,
                                     SIN, d_full, d_half, sdk_d, D, HALF, sc_t, sc_d, ss_t, ss_d,
                                     rope_off, L, ROPE, INTERLEAVED, BLOCK_H)
                dv = tl.load(DV + b * sdv_b + h * sdv_h + rn64[:, None] * sdv_s
                             + d_full[None, :] * sdv_d,
                             mask=k_ok[:, None] & (d_full[None, :] < D), other=0.0)
                dz = (pair_scores(dqa, dqb, ka, kb, ROPE, DOT_PREC)
                      + pair_scores(qa, qb, dka, dkb, ROPE, DOT_PREC)) * qk_scale
                pdz = p * dz  # 0 where masked (p = 0 there, dz finite)
                mu_i = mu_i * alpha + tl.sum(pdz, axis=1)
                tacc = tacc * alpha[:, None] + tl.dot(pdz, v.to(tl.float32),
                                                      input_precision=DOT_PREC) \
                    + tl.dot(p.to(dt), dv, input_precision=DOT_PREC)
            m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if JVP:
        o = tacc / l_safe[:, None] - (mu_i / l_safe)[:, None] * o
    tl.store(OUT + b * so_b + h * so_h + rm64[:, None] * so_s + d_full[None, :] * so_d,
             o.to(dt), mask=q_ok[:, None] & (d_full[None, :] < D))
    if not JVP:
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
        tl.store(LSE + b * sl_b + h * sl_h + rm64 * sl_s, lse, mask=q_ok)


@triton.jit
def _bwd_preprocess_kernel(
    DO, OUT, DELTA, Sq, H, D,
    sdo_b, sdo_s, sdo_h, sdo_d,
    so_b, so_s, so_h, so_d,
    sl_b, sl_s, sl_h,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = <dout_i, out_i> (fp32), stored like lse."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh - b * H
    rm = m0 + tl.arange(0, BLOCK_M)
    ok = rm < Sq
    rm64 = rm.to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    msk = ok[:, None] & (d[None, :] < D)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rm64[:, None] * sdo_s + d[None, :] * sdo_d,
                 mask=msk, other=0.0).to(tl.float32)
    o = tl.load(OUT + b * so_b + h * so_h + rm64[:, None] * so_s + d[None, :] * so_d,
                mask=msk, other=0.0).to(tl.float32)
    tl.store(DELTA + b * sl_b + h * sl_h + rm64 * sl_s, tl.sum(do * o, axis=1), mask=ok)


@triton.jit
def _bwd_dkdv_kernel(
    DO, Q, K, V, COS, SIN, LSE, DELTA, DK, DV,
    Sq, Sk, H, D, HALF, L, rope_off, fc_start, fc_end, fc_block, scale, qk_scale2,
    sdo_b, sdo_s, sdo_h, sdo_d,
    sq_b, sq_s, sq_h, sq_d,
    sk_b, sk_s, sk_h, sk_d,
    sv_b, sv_s, sv_h, sv_d,
    sl_b, sl_s, sl_h,
    sdk_b, sdk_s, sdk_h, sdk_d,
    sdv_b, sdv_s, sdv_h, sdv_d,
    sc_t, sc_d, ss_t, ss_d,
    ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, FRAME_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    dt = DK.dtype.element_ty
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh - b * H
    d_full = tl.arange(0, BLOCK_D).to(tl.int64)
    d_half = tl.arange(0, BLOCK_H).to(tl.int64)

    rn = n0 + tl.arange(0, BLOCK_N)
    k_ok = rn < Sk
    rn64 = rn.to(tl.int64)
    ka, kb = _load_rot(K, b * sk_b + h * sk_h + rn64 * sk_s, rn, k_ok, COS, SIN, d_full, d_half,
                       sk_d, D, HALF, sc_t, sc_d, ss_t, ss_d, rope_off, L,
                       ROPE, INTERLEAVED, BLOCK_H)
    v = tl.load(V + b * sv_b + h * sv_h + rn64[:, None] * sv_s + d_full[None, :] * sv_d,
                mask=k_ok[:, None] & (d_full[None, :] < D), other=0.0)
    if ROPE:
        dka = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        dkb = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    else:
        dka = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dkb = dka
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    has_text = True
    kblk = 0
    if FRAME_CAUSAL:
        has_text, kblk = _key_block_has_text(n0, BLOCK_N, Sk, fc_start, fc_end, fc_block)

    q_base = b * sq_b + h * sq_h
    do_base = b * sdo_b + h * sdo_h
    l_base = b * sl_b + h * sl_h
    for m0 in range(0, Sq, BLOCK_M):
        visit = True
        if FRAME_CAUSAL:
            visit = has_text | (kblk <= _max_qblock(m0, BLOCK_M, Sq, fc_start, fc_end, fc_block))
        if visit:
            rm = m0 + tl.arange(0, BLOCK_M)
            q_ok = rm < Sq
            rm64 = rm.to(tl.int64)
            qa, qb = _load_rot(Q, q_base + rm64 * sq_s, rm, q_ok, COS, SIN, d_full, d_half, sq_d,
                               D, HALF, sc_t, sc_d, ss_t, ss_d, rope_off, L,
                               ROPE, INTERLEAVED, BLOCK_H)
            do = tl.load(DO + do_base + rm64[:, None] * sdo_s + d_full[None, :] * sdo_d,
                         mask=q_ok[:, None] & (d_full[None, :] < D), other=0.0)
            lse = tl.load(LSE + l_base + rm64 * sl_s, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + l_base + rm64 * sl_s, mask=q_ok, other=0.0)
            z = pair_scores(qa, qb, ka, kb, ROPE, DOT_PREC) * qk_scale2
            valid = q_ok[:, None] & k_ok[None, :]
            if FRAME_CAUSAL:
                valid = valid & _allowed(rm, rn, fc_start, fc_end, fc_block)
            p = masked_probs(z, valid, lse * 1.4426950408889634)
            dv += tl.dot(tl.trans(p.to(dt)), do, input_precision=DOT_PREC)
            dsT = tl.trans(masked_ds(p, valid, do, v, delta, DOT_PREC).to(dt))
            dka += tl.dot(dsT, qa, input_precision=DOT_PREC)
            if ROPE:
                dkb += tl.dot(dsT, qb, input_precision=DOT_PREC)

    dk_off = b * sdk_b + h * sdk_h + rn64 * sdk_s
    dka = dka * scale
    if ROPE:
        dkb = dkb * scale
        c, s = _table(COS, SIN, rn, k_ok, d_half, sc_t, sc_d, ss_t, ss_d, HALF, rope_off, L)
        ra = dka * c + dkb * s  # rotation by the negative angle
        rb = dkb * c - dka * s
        dka = ra
        dkb = rb
    store_pair(DK, dk_off, k_ok, d_full, d_half, sdk_d, D, HALF, dka.to(dt), dkb.to(dt),
                ROPE, INTERLEAVED, BLOCK_D)
    tl.store(DV + b * sdv_b + h * sdv_h + rn64[:, None] * sdv_s + d_full[None, :] * sdv_d,
             dv.to(dt), mask=k_ok[:, None] & (d_full[None, :] < D))


@triton.jit
def _bwd_dq_kernel(
    DO, Q, K, V, COS, SIN, LSE, DELTA, DQ,
    Sq, Sk, H, D, HALF, L, rope_off, fc_start, fc_end, fc_block, scale, qk_scale2,
    sdo_b, sdo_s, sdo_h, sdo_d,
    sq_b, sq_s, sq_h, sq_d,
    sk_b, sk_s, sk_h, sk_d,
    sv_b, sv_s, sv_h, sv_d,
    sl_b, sl_s, sl_h,
    sdq_b, sdq_s, sdq_h, sdq_d,
    sc_t, sc_d, ss_t, ss_d,
    ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, FRAME_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    dt = DQ.dtype.element_ty
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh - b * H
    d_full = tl.arange(0, BLOCK_D).to(tl.int64)
    d_half = tl.arange(0, BLOCK_H).to(tl.int64)

    rm = m0 + tl.arange(0, BLOCK_M)
    q_ok = rm < Sq
    rm64 = rm.to(tl.int64)
    qa, qb = _load_rot(Q, b * sq_b + h * sq_h + rm64 * sq_s, rm, q_ok, COS, SIN, d_full, d_half,
                       sq_d, D, HALF, sc_t, sc_d, ss_t, ss_d, rope_off, L,
                       ROPE, INTERLEAVED, BLOCK_H)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rm64[:, None] * sdo_s + d_full[None, :] * sdo_d,
                 mask=q_ok[:, None] & (d_full[None, :] < D), other=0.0)
    l_off = b * sl_b + h * sl_h + rm64 * sl_s
    lse2 = tl.load(LSE + l_off, mask=q_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + l_off, mask=q_ok, other=0.0)
    if ROPE:
        dqa = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        dqb = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    else:
        dqa = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dqb = dqa
    qmax = -1
    if FRAME_CAUSAL:
        qmax = _max_qblock(m0, BLOCK_M, Sq, fc_start, fc_end, fc_block)
    k_base = b * sk_b + h * sk_h
    v_base = b * sv_b + h * sv_h
    for n0 in range(0, Sk, BLOCK_N):
        visit = True
        if FRAME_CAUSAL:
            has_text, kblk = _key_block_has_text(n0, BLOCK_N, Sk, fc_start, fc_end, fc_block)
            visit = has_text | (kblk <= qmax)
        if visit:
            rn = n0 + tl.arange(0, BLOCK_N)
            k_ok = rn < Sk
            rn64 = rn.to(tl.int64)
            ka, kb = _load_rot(K, k_base + rn64 * sk_s, rn, k_ok, COS, SIN, d_full, d_half, sk_d,
                               D, HALF, sc_t, sc_d, ss_t, ss_d, rope_off, L,
                               ROPE, INTERLEAVED, BLOCK_H)
            v = tl.load(V + v_base + rn64[:, None] * sv_s + d_full[None, :] * sv_d,
                        mask=k_ok[:, None] & (d_full[None, :] < D), other=0.0)
            z = pair_scores(qa, qb, ka, kb, ROPE, DOT_PREC) * qk_scale2
            valid = q_ok[:, None] & k_ok[None, :]
            if FRAME_CAUSAL:
                valid = valid & _allowed(rm, rn, fc_start, fc_end, fc_block)
            ds = masked_ds(masked_probs(z, valid, lse2), valid, do, v, delta, DOT_PREC).to(dt)
            dqa += tl.dot(ds, ka, input_precision=DOT_PREC)
            if ROPE:
                dqb += tl.dot(ds, kb, input_precision=DOT_PREC)

    dqa = dqa * scale
    if ROPE:
        dqb = dqb * scale
        c, s = _table(COS, SIN, rm, q_ok, d_half, sc_t, sc_d, ss_t, ss_d, HALF, rope_off, L)
        ra = dqa * c + dqb * s
        rb = dqb * c - dqa * s
        dqa = ra
        dqb = rb
    store_pair(DQ, b * sdq_b + h * sdq_h + rm64 * sdq_s, q_ok, d_full, d_half, sdq_d, D, HALF,
                dqa.to(dt), dqb.to(dt), ROPE, INTERLEAVED, BLOCK_D)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def _check(op, q, k, v, cos, sin, rope_offset, fc_start, fc_len, fc_block):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D [B, S, H, D] tensor")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: dtype must be one of {_DTYPES}, got {t.dtype}")
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(f"{op}: q, k, v must share dtype and device")
    B, Sq, H, D = q.shape
    if k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
        raise ValueError(f"{op}: k/v {tuple(k.shape)} do not match q {tuple(q.shape)}")
    if D > MAX_D:
        raise ValueError(f"{op}: the triton kernels support head_dim D <= {MAX_D}, got D={D}")
    rope = cos is not None
    if rope:
        L = cos.shape[0]
        for name, t in (("cos", cos), ("sin", sin)):
            if (t is None or t.dim() != 2 or t.shape != (L, D // 2) or t.dtype != torch.float32
                    or t.device != q.device):
                raise ValueError(f"{op}: {name} must be a float32 [L, D/2] table on q's device")
        if D % 2 or rope_offset + L > Sq or Sq != k.shape[1]:
            raise ValueError(f"{op}: bad RoPE configuration (D={D}, rope_offset={rope_offset}, "
                             f"L={L}, S_q={Sq}, S_k={k.shape[1]})")
    if fc_block and (Sq != k.shape[1] or fc_block < 1):
        raise ValueError(f"{op}: frame_causal needs S_q == S_k")


# Ampere / Ada / consumer Blackwell (sm_80 - sm_89, sm_120 / sm_121: mma.sync, no wgmma) with
# RoPE: (BLOCK_M, BLOCK_N, warps) for fp16 / bf16 by kernel and head-dim bucket. From sm_80
# builds (``ptxas -v`` through aot_check, interleaved RoPE + frame-causal, the most registers):
# the sm_90 tiles spill 0.2-4.4 KB per thread there (the rotated halves and their gradients stay
# live in registers), these at most 16 B in the forward / dq and 144 B (D = 64) / 0 (D = 128) /
# 344 B (D = 256) in dk/dv (triton 3.9; 3.6: at most 312 B). sm_120 builds (triton 3.9, bf16):
# the sm_90 tiles spill in 28 of 29 RoPE builds (dk/dv up to 1,240 B, dq 1,064 B, forward
# 840 B), these in 15 (dk/dv 584 B at D = 256, dq 144 B, forward 56 B). Without RoPE the sm_90
# tiles spill at most 8 B on sm_80 (48 B on sm_120) and are kept. Not timed on a GPU.
_SM80_ROPE_TILES = {
    "fwd": {64: (128, 32, 8), 128: (64, 64, 8), 256: (64, 32, 8)},
    # dk/dv: BLOCK_N keys per program, BLOCK_M queries per loop step; dq the other way round
    "dkdv": {64: (16, 32, 4), 128: (16, 32, 8), 256: (16, 16, 8)},
    "dq": {64: (128, 16, 8), 128: (32, 64, 8), 256: (32, 16, 8)},
}


# The forward kernel with JVP (forward-mode AD: q and its tangent, two accumulators live) for
# fp16 / bf16 by architecture and head-dim bucket, from bf16 frame-causal RoPE builds (``ptxas
# -v`` through aot_check's recorder, triton 3.9): sm_90 spills 0 / 216 / 496 bytes per thread at
# D = 64 / 128 / 256 (the forward's tiles: 80 / 712 / 4560), sm_80 248 / 696 / 504. The sm_80
# entry serves every mma.sync GPU (sm_80 - sm_89, sm_120 / sm_121). float32 takes BLOCK_N >= 32:
# the float32 D = 256 build with the sm_90 entry's 16 x 16 tile (BLOCK_M halved to its floor)
# crashed triton 3.9's LLVM on sm_90, sm_100 and sm_120 (an SLPVectorizer assertion: the process
# aborts); 16 x 32 builds (sm_90: 13,872 B of stack, a test path). Not timed.
_JVP_TILES = {90: {64: (128, 32, 8), 128: (64, 32, 8), 256: (16, 16, 4)},
              80: {64: (128, 32, 8), 128: (32, 64, 4), 256: (16, 32, 4)}}


def _tiles(kernel, q, rope, block_m=None, block_n=None, num_warps=None):
    """``(BLOCK_M, BLOCK_N, num_warps)`` of ``kernel`` (``"fwd"``, ``"jvp"``, ``"dkdv"`` or
    ``"dq"``) for ``q``'s head dim, dtype and GPU architecture; the keyword arguments override."""
    D, dtype = q.shape[-1], q.dtype
    block_d = max(triton.next_power_of_2(D), 32)
    if triton_interpret():
        bm, bn, warps = 32, 32, 4
    elif kernel == "jvp":
        bm, bn, warps = _JVP_TILES[80 if mma_sync_arch(target_arch(q)) else 90][max(block_d, 64)]
        if dtype == torch.float32:  # (BLOCK_N 16 at D = 256 aborts triton 3.9's LLVM, see above)
            bm, bn = max(16, bm // 2), max(bn, 32)
    else:
        if rope and mma_sync_arch(target_arch(q)):
            bm, bn, warps = _SM80_ROPE_TILES[kernel][max(block_d, 64)]
        else:  # sm_90: fewest spills in sm_90a builds (ptxas -v), see the module docstring
            warps = None
            if kernel == "fwd":
                bm, bn = (128, 64) if D <= 128 else (64, 32)
            else:
                bm, bn = (64, 64) if D <= 64 else (64, 32) if D <= 128 else (16, 32)
        if dtype == torch.float32:
            bm = max(16, bm // 2)
        if warps is None:  # sm_90: warps follow the (fp32-halved) tile
            warps = (8 if bm * block_d >= 128 * 128 else 4) if kernel == "fwd" else \
                (8 if block_d >= 64 else 4)
    bm = bm if block_m is None else int(block_m)
    bn = bn if block_n is None else int(block_n)
    for name, val in (("block_m", bm), ("block_n", bn)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"rope3d attention: {name} must be a power of two >= 16, got {val}")
    return bm, bn, int(num_warps or warps)


# CUDA's limit on grid.y: the kernels put (batch, head) on axis 1, so a launch covers at most
# this many (b, h) pairs and larger batches go in several launches over batch slices (views: the
# kernels take every tensor's strides)
_MAX_GRID_Y = 65535


def _batch_slices(B: int, H: int) -> list[slice]:
    """Batch ranges whose ``(b, h)`` pairs fit grid.y (one slice unless ``B * H > 65535``)."""
    n = max(1, _MAX_GRID_Y // max(H, 1))
    return [slice(b0, min(B, b0 + n)) for b0 in range(0, B, n)]


def _by_batch(B: int, H: int, *tensors):
    """``tensors`` (each with batch first) per launch: as they are when one launch fits grid.y
    (no view is made on the usual path), else their slices along :func:`_batch_slices`."""
    if B * H <= _MAX_GRID_Y:
        return [tensors]
    return [tuple(t[bs] for t in tensors) for bs in _batch_slices(B, H)]


def _common(q, cos, sin):
    D = q.shape[-1]
    block_d = max(triton.next_power_of_2(D), 32)
    rope = cos is not None
    tabs = (cos, sin) if rope else (q, q)
    tstrides = (*cos.stride(), *sin.stride()) if rope else (0, 0, 0, 0)
    return block_d, rope, tabs, tstrides


def _launch_fwd(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block, scale,
                tangents, block_m, block_n, num_warps, num_stages):
    """(out, lse) or, with ``tangents = (dq, dk, dv)``, (tangent of out, None)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    jvp = tangents is not None
    lse = out if jvp else torch.empty((B, Sq, H), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, None if jvp else lse
    block_d, rope, (c, s), tstr = _common(q, cos, sin)
    bm, bn, warps = _tiles("jvp" if jvp else "fwd", q, rope, block_m, block_n, num_warps)
    L = cos.shape[0] if rope else 0
    dq, dk, dv = tangents if jvp else (q, k, v)
    with device_ctx(q):
        for qb, kb, vb, ob, lb, dqb, dkb, dvb in _by_batch(B, H, q, k, v, out, lse, dq, dk, dv):
            # a build over the GPU's shared memory (sm_86 / sm_89: 99 KiB per block; D = 256
            # with two stages needs 100 KiB) retries unpipelined
            launch(_fwd_kernel, (triton.cdiv(Sq, bm), qb.shape[0] * H), (
                qb, kb, vb, c, s, ob, lb, dqb, dkb, dvb,
                Sq, Sk, H, D, D // 2, L, int(rope_offset), int(fc_start), int(fc_start + fc_len),
                max(int(fc_block), 1), float(scale) * _LOG2E, float(scale),
                *qb.stride(), *kb.stride(), *vb.stride(), *ob.stride(), *lb.stride()[:3], *tstr,
                *dqb.stride(), *dkb.stride(), *dvb.stride()),
                dict(ROPE=rope, INTERLEAVED=bool(interleaved), FRAME_CAUSAL=bool(fc_block),
                     JVP=jvp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_H=block_d // 2,
                     DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                     num_warps=warps, num_stages=int(num_stages or 2)), q.device)
    return out, None if jvp else lse


def rope3d_attn_fwd(q, k, v, cos, sin, rope_offset: int, interleaved: bool, fc_start: int,
                    fc_len: int, fc_block: int, scale: float, *, block_m=None, block_n=None,
                    num_warps=None, num_stages=None):
    """Forward contract (``vidgen_kernels.ops.rope3d_attention``) -> (out, lse)."""
    _check("triton rope3d_attn_fwd", q, k, v, cos, sin, rope_offset, fc_start, fc_len, fc_block)
    return _launch_fwd(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block,
                       scale, None, block_m, block_n, num_warps, num_stages)


def rope3d_attn_jvp(q, k, v, dq, dk, dv, cos, sin, rope_offset: int, interleaved: bool,
                    fc_start: int, fc_len: int, fc_block: int, scale: float, *, block_m=None,
                    block_n=None, num_warps=None, num_stages=None):
    """Forward-mode contract (``kernel_jvp_torch``): the tangent of out along ``dq, dk, dv``
    (shapes of q, k, v, their dtype, any strides) -> ``[B, Sq, H, D]`` contiguous. One pass
    of the forward kernel with ``JVP`` (tiles: ``_JVP_TILES``)."""
    op = "triton rope3d_attn_jvp"
    _check(op, q, k, v, cos, sin, rope_offset, fc_start, fc_len, fc_block)
    for name, t, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{op}: {name} must match {tuple(x.shape)} {x.dtype} on {x.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return _launch_fwd(q, k, v, cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block,
                       scale, (dq, dk, dv), block_m, block_n, num_warps, num_stages)[0]


def rope3d_attn_bwd(dout, q, k, v, cos, sin, out, lse, rope_offset: int, interleaved: bool,
                    fc_start: int, fc_len: int, fc_block: int, scale: float, *, block_m=None,
                    block_n=None, num_warps=None, num_stages=None):
    """Backward contract -> (dq, dk, dv), contiguous [B, S, H, D]."""
    op = "triton rope3d_attn_bwd"
    _check(op, q, k, v, cos, sin, rope_offset, fc_start, fc_len, fc_block)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (B, Sq, H):
        raise ValueError(f"{op}: dout/out must be {tuple(q.shape)} and lse {(B, Sq, H)}")
    dq = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Sk, H, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, Sk, H, D), dtype=q.dtype, device=q.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d, rope, (c, s), tstr = _common(q, cos, sin)
    tiles = {kern: _tiles(kern, q, rope, block_m, block_n, num_warps) for kern in ("dkdv", "dq")}
    L = cos.shape[0] if rope else 0
    # the dk/dv and dq kernels read delta through lse's strides: both contiguous (a [B, S, H]
    # float copy where a caller passes a strided lse, e.g. a transposed [B, H, S] one)
    lse = lse.contiguous()
    delta = torch.empty((B, Sq, H), dtype=torch.float32, device=q.device)
    fc_end = int(fc_start + fc_len)
    fcb = max(int(fc_block), 1)

    def meta(kern):
        bm, bn, warps = tiles[kern]
        return dict(ROPE=rope, INTERLEAVED=bool(interleaved), FRAME_CAUSAL=bool(fc_block),
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_H=block_d // 2,
                    DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                    num_warps=warps, num_stages=int(num_stages or 1))
    bm_q, bn_k = tiles["dq"][0], tiles["dkdv"][1]
    common = (Sq, Sk, H, D, D // 2, L, int(rope_offset), int(fc_start), fc_end, fcb,
              float(scale), float(scale) * _LOG2E)
    with device_ctx(q):
        for do_, q_, k_, v_, o_, l_, de_, dq_, dk_, dv_ in _by_batch(
                B, H, dout, q, k, v, out, lse, delta, dq, dk, dv):
            BH = q_.shape[0] * H
            _bwd_preprocess_kernel[(triton.cdiv(Sq, bm_q), BH)](
                do_, o_, de_, Sq, H, D, *do_.stride(), *o_.stride(), *de_.stride(),
                BLOCK_M=bm_q, BLOCK_D=block_d)
            _bwd_dkdv_kernel[(triton.cdiv(Sk, bn_k), BH)](
                do_, q_, k_, v_, c, s, l_, de_, dk_, dv_, *common,
                *do_.stride(), *q_.stride(), *k_.stride(), *v_.stride(), *l_.stride(),
                *dk_.stride(), *dv_.stride(), *tstr, **meta("dkdv"))
            _bwd_dq_kernel[(triton.cdiv(Sq, bm_q), BH)](
                do_, q_, k_, v_, c, s, l_, de_, dq_, *common,
                *do_.stride(), *q_.stride(), *k_.stride(), *v_.stride(), *l_.stride(),
                *dq_.stride(), *tstr, **meta("dq"))
    return dq, dk, dv
