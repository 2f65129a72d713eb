"""Triton backend of ``apply_rope`` (``vidgen_kernels.ops.rope``).

Implements the RoPE kernel contract written in ``vidgen_kernels/ops/rope.py``:
``rope(x, cos, sin, out, offset, interleaved, conj)``. One program per ``(b, s)`` token and block
of ``BLOCK_H`` heads holds ``[BLOCK_H, BLOCK_P]`` rotation pairs (``BLOCK_P = next_pow2(D/2)``).
Positions outside ``offset .. offset + L - 1`` are stored unchanged (exact copy, selected with
``tl.where``). Interleaved rows are loaded and stored whole (``[BLOCK_H, 2 * BLOCK_P]``) and
their pairs split / joined in registers (``tl.reshape`` + ``tl.split`` / ``tl.join``): a
unit-stride row then moves in wide vectors. ``CONJ`` (constexpr) rotates by the negative angle: the backward is the same kernel.
``x`` is read through explicit ``(b, s, h, d)`` strides; ``out`` is contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_ctx

__all__ = ["rope"]


@triton.jit
def _rope_kernel(
    X, COS, SIN, OUT,
    S, H, L, offset,
    sx_b, sx_s, sx_h, sx_d,
    D: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJ: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)  # b * S + s
    b = tok // S
    s = tok - b * S
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    p = tl.arange(0, BLOCK_P)
    HALF: tl.constexpr = D // 2
    mask = (hs[:, None] < H) & (p[None, :] < HALF)
    xrow = X + b * sx_b + s * sx_s + hs[:, None].to(tl.int64) * sx_h
    orow = OUT + tok * (H * D) + hs[:, None].to(tl.int64) * D
    if INTERLEAVED:
        # the whole row as one [BLOCK_H, 2 * BLOCK_P] tile, then its pairs (2p, 2p + 1) split
        # apart in registers: a unit-stride row loads and stores in wide vectors (two stride-2
        # loads of the pairs' halves would not)
        d = tl.arange(0, 2 * BLOCK_P)
        mask2 = (hs[:, None] < H) & (d[None, :] < D)
        x2 = tl.load(xrow + d[None, :].to(tl.int64) * sx_d, mask=mask2, other=0.0)
        a, bb = tl.split(tl.reshape(x2, (BLOCK_H, BLOCK_P, 2)))
    else:
        a = tl.load(xrow + p[None, :].to(tl.int64) * sx_d, mask=mask, other=0.0)
        bb = tl.load(xrow + (p + HALF)[None, :].to(tl.int64) * sx_d, mask=mask, other=0.0)
    j = s - offset
    inside = (j >= 0) & (j < L)
    jc = tl.where(inside, j, 0)
    jv = j + 0 * p  # the position as a vector: a vector mask (the interpreter rejects scalar & vector)
    tmask = (p < HALF) & (jv >= 0) & (jv < L)
    c = tl.load(COS + jc * HALF + p, mask=tmask, other=1.0)
    sn = tl.load(SIN + jc * HALF + p, mask=tmask, other=0.0)
    if CONJ:
        sn = -sn
    af = a.to(tl.float32)
    bf = bb.to(tl.float32)
    ra = af * c[None, :] - bf * sn[None, :]
    rb = bf * c[None, :] + af * sn[None, :]
    oa = tl.where(inside, ra.to(OUT.dtype.element_ty), a)
    ob = tl.where(inside, rb.to(OUT.dtype.element_ty), bb)
    if INTERLEAVED:
        tl.store(orow + d[None, :], tl.reshape(tl.join(oa, ob), (BLOCK_H, 2 * BLOCK_P)), mask=mask2)
    else:
        tl.store(orow + p[None, :], oa, mask=mask)
        tl.store(orow + (p + HALF)[None, :], ob, mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, offset: int,
         interleaved: bool, conj: bool) -> None:
    """Fill ``out`` [B, S, H, D] (contiguous) from ``x`` [B, S, H, D] (any strides) per the
    kernel contract; ``cos``/``sin`` are ``[L, D/2]`` float32 contiguous."""
    B, S, H, D = x.shape
    L = cos.shape[0]
    assert D % 2 == 0 and out.is_contiguous() and out.shape == x.shape and out.dtype == x.dtype
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32
    assert cos.is_contiguous() and sin.is_contiguous() and 0 <= offset and offset + L <= S
    if out.numel() == 0:
        return
    block_p = max(triton.next_power_of_2(D // 2), 1)
    block_h = max(1, min(triton.next_power_of_2(H), max(1, 2048 // block_p)))
    if L == 0:  # pointers must still be valid: point at a dummy table
        cos = sin = torch.ones(1, D // 2, dtype=torch.float32, device=x.device)
    grid = (B * S, triton.cdiv(H, block_h))
    with device_ctx(x):
        _rope_kernel[grid](
            x, cos, sin, out, S, H, L, offset,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            D=D, INTERLEAVED=bool(interleaved), CONJ=bool(conj), BLOCK_H=block_h,
            BLOCK_P=block_p, num_warps=4 if block_h * block_p >= 1024 else 2,
            enable_fp_fusion=False,  # a c - b s with each product rounded, as the contract
        )
