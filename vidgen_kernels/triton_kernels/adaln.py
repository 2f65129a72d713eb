"""Triton backend of fused AdaLN modulation (``vidgen_kernels.ops.adaln``).

Implements the kernel contract documented at the top of ``vidgen_kernels/ops/adaln.py``:

* ``adaln_fwd``: one program per token row ``(b, n)`` with the whole row in registers
  (``BLOCK_C = next_power_of_2(C)``, floored at 16), statistics in fp32. Gated mode forms
  ``h = round_T(x + gate * y)``, stores it, and normalises the rounded value.
* ``adaln_bwd``: one program per ``(b, chunk)`` of ``rows_per_chunk`` rows, walking the rows in
  order and keeping the partial sums of the broadcast-parameter gradients (dgate / dshift / dscale,
  two slots each) and of dweight / dbias in fp32 registers; per-token parameter gradients are
  stored directly.

Every feature is a ``tl.constexpr`` flag, so each combination compiles to a specialised kernel.
All inputs are read through explicit ``(b, n, c)`` strides (0 and non-unit last strides allowed);
broadcast parameters ``[Bp, F, C]`` are read at row ``[b or 0, n // tpr]`` with the batch stride
passed as 0 when ``Bp == 1``. Row offsets are computed in int64; column offsets in int32 unless a
last-dim stride is large enough to overflow it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_ctx

__all__ = ["adaln_fwd", "adaln_bwd", "MAX_C"]

MAX_C = 16384
_INT32_MAX = 2**31 - 1

# modes of a parameter gradient output in the backward kernel
_NONE, _PER_TOKEN, _PARTIAL = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _adaln_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, W, BIAS,  # inputs (Y / GATE / W / BIAS unused when absent)
    OUT, H, MEAN, RSTD,  # outputs: OUT, H [B, N, C] contiguous; MEAN, RSTD [B, N] (strided)
    N, C,
    sx_b, sx_n, sx_c,
    sy_b, sy_n, sy_c,
    sg_b, sg_f, sg_c, tpr_g,
    ssh_b, ssh_f, ssh_c, tpr_sh,
    ssc_b, ssc_f, ssc_c, tpr_sc,
    sw_c, sbias_c,
    sm_b, sm_n, sr_b, sr_n,
    eps,
    IS_RMS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COL64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row - b * N
    cols = tl.arange(0, BLOCK_C)
    if COL64:
        cols = cols.to(tl.int64)
    mask = cols < C

    hx = tl.load(X + b * sx_b + n * sx_n + cols * sx_c, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        yv = tl.load(Y + b * sy_b + n * sy_n + cols * sy_c, mask=mask, other=0.0).to(tl.float32)
        gv = tl.load(GATE + b * sg_b + (n // tpr_g) * sg_f + cols * sg_c, mask=mask,
                     other=0.0).to(tl.float32)
        hr = (hx + gv * yv).to(H.dtype.element_ty)
        tl.store(H + row * C + cols, hr, mask=mask)
        hx = hr.to(tl.float32)  # normalise the rounded residual stream

    if IS_RMS:
        mu = 0.0
        xc = hx
        var = tl.sum(hx * hx, axis=0) / C
    else:  # corrected two-pass: the sum of the deviations from the first mean m takes out m's
        # rounding (a row of one value: mean exact, variance 0; uncorrected, m's few ulp came
        # back amplified by 1 / sqrt(eps)). (tl.reduce of the pair: 2x the interpreter's time)
        m = tl.sum(hx, axis=0) / C
        xc = tl.where(mask, hx - m, 0.0)
        corr = tl.sum(xc, axis=0) / C
        q = tl.sum(xc * xc, axis=0)
        mu = m + corr
        var = tl.maximum(q / C - corr * corr, 0.0)
        xc = tl.where(mask, hx - mu, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + b * sm_b + n * sm_n, mu)
    tl.store(RSTD + b * sr_b + n * sr_n, rstd)

    nrm = xc * rstd
    if HAS_WEIGHT:
        nrm = nrm * tl.load(W + cols * sw_c, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        nrm = nrm + tl.load(BIAS + cols * sbias_c, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b * ssc_b + (n // tpr_sc) * ssc_f + cols * ssc_c, mask=mask,
                 other=0.0).to(tl.float32)
    sh = tl.load(SHIFT + b * ssh_b + (n // tpr_sh) * ssh_f + cols * ssh_c, mask=mask,
                 other=0.0).to(tl.float32)
    out = nrm * (1.0 + sc) + sh
    tl.store(OUT + row * C + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(
    DOUT, DH, HX, Y, GATE, SCALE, W, BIAS, MEAN, RSTD,  # inputs
    DX, DY, DGATE, DSHIFT, DSCALE, DW, DB,  # outputs (unused when absent)
    N, C, NC, R,
    sdo_b, sdo_n, sdo_c,
    sdh_b, sdh_n, sdh_c,
    shx_b, shx_n, shx_c,
    sy_b, sy_n, sy_c,
    sg_b, sg_f, sg_c, rtpr_g,  # gate strides and tokens per gate row (reading)
    ssc_b, ssc_f, ssc_c, rtpr_sc,  # scale strides and tokens per scale row (reading)
    sw_c, sbias_c,
    sm_b, sm_n, sr_b, sr_n,
    tpr_dg, tpr_dsh, tpr_dsc,  # tokens per row of the partial-gradient buffers (slot choice)
    IS_RMS: tl.constexpr,
    HAS_DH: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DY: tl.constexpr,
    DGATE_MODE: tl.constexpr,  # 0 none, 1 per token, 2 partial
    DGATE_SPLIT: tl.constexpr,  # partial and a chunk may straddle two parameter rows
    DSHIFT_MODE: tl.constexpr,
    DSHIFT_SPLIT: tl.constexpr,
    DSCALE_MODE: tl.constexpr,
    DSCALE_SPLIT: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    COL64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # = b * NC + chunk, also the partial-buffer row
    b = pid // NC
    chunk = pid - b * NC
    row_start = chunk * R
    n_rows = tl.minimum(N - row_start, R).to(tl.int32)
    cols = tl.arange(0, BLOCK_C)
    if COL64:
        cols = cols.to(tl.int64)
    mask = cols < C

    if HAS_WEIGHT:
        w = tl.load(W + cols * sw_c, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bia = tl.load(BIAS + cols * sbias_c, mask=mask, other=0.0).to(tl.float32)

    # fp32 register accumulators (slot 0 / slot 1 of the partial buffers)
    if DGATE_MODE == 2:
        glo_g = row_start // tpr_dg
        acc_g0 = tl.zeros([BLOCK_C], dtype=tl.float32)
        if DGATE_SPLIT:
            acc_g1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    if DSHIFT_MODE == 2:
        glo_sh = row_start // tpr_dsh
        acc_sh0 = tl.zeros([BLOCK_C], dtype=tl.float32)
        if DSHIFT_SPLIT:
            acc_sh1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    if DSCALE_MODE == 2:
        glo_sc = row_start // tpr_dsc
        acc_sc0 = tl.zeros([BLOCK_C], dtype=tl.float32)
        if DSCALE_SPLIT:
            acc_sc1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_DW:
        acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_DB:
        acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)

    for i in range(0, n_rows):
        n = row_start + i
        tok = (b * N + n) * C  # offset of the row in the contiguous [B, N, C] outputs
        hx = tl.load(HX + b * shx_b + n * shx_n + cols * shx_c, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + b * sr_b + n * sr_n)
        if IS_RMS:
            xhat = hx * rstd
        else:
            mu = tl.load(MEAN + b * sm_b + n * sm_n)
            xhat = tl.where(mask, (hx - mu) * rstd, 0.0)
        do = tl.load(DOUT + b * sdo_b + n * sdo_n + cols * sdo_c, mask=mask,
                     other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * ssc_b + (n // rtpr_sc) * ssc_f + cols * ssc_c, mask=mask,
                     other=0.0).to(tl.float32)
        dn = do * (1.0 + sc)
        if HAS_WEIGHT:
            dxhat = dn * w
        else:
            dxhat = dn
        c1 = tl.sum(dxhat * xhat, axis=0) / C
        if IS_RMS:
            g = (dxhat - xhat * c1) * rstd
        else:
            c2 = tl.sum(dxhat, axis=0) / C
            g = (dxhat - xhat * c1 - c2) * rstd
        if HAS_DH:
            g += tl.load(DH + b * sdh_b + n * sdh_n + cols * sdh_c, mask=mask,
                         other=0.0).to(tl.float32)
        tl.store(DX + tok + cols, g.to(DX.dtype.element_ty), mask=mask)
        if HAS_DY:
            gv = tl.load(GATE + b * sg_b + (n // rtpr_g) * sg_f + cols * sg_c, mask=mask,
                         other=0.0).to(tl.float32)
            tl.store(DY + tok + cols, (g * gv).to(DY.dtype.element_ty), mask=mask)

        if DGATE_MODE != 0:
            yv = tl.load(Y + b * sy_b + n * sy_n + cols * sy_c, mask=mask, other=0.0).to(tl.float32)
            v = g * yv
            if DGATE_MODE == 1:
                tl.store(DGATE + tok + cols, v.to(DGATE.dtype.element_ty), mask=mask)
            else:
                if DGATE_SPLIT:
                    hi = (n // tpr_dg) != glo_g
                    acc_g0 += tl.where(hi, 0.0, v)
                    acc_g1 += tl.where(hi, v, 0.0)
                else:
                    acc_g0 += v
        if DSHIFT_MODE == 1:
            tl.store(DSHIFT + tok + cols, do.to(DSHIFT.dtype.element_ty), mask=mask)
        if DSHIFT_MODE == 2:
            if DSHIFT_SPLIT:
                hi = (n // tpr_dsh) != glo_sh
                acc_sh0 += tl.where(hi, 0.0, do)
                acc_sh1 += tl.where(hi, do, 0.0)
            else:
                acc_sh0 += do
        if DSCALE_MODE != 0:
            nrm = xhat
            if HAS_WEIGHT:
                nrm = nrm * w
            if HAS_BIAS:
                nrm = nrm + bia
            v = do * nrm
            if DSCALE_MODE == 1:
                tl.store(DSCALE + tok + cols, v.to(DSCALE.dtype.element_ty), mask=mask)
            else:
                if DSCALE_SPLIT:
                    hi = (n // tpr_dsc) != glo_sc
                    acc_sc0 += tl.where(hi, 0.0, v)
                    acc_sc1 += tl.where(hi, v, 0.0)
                else:
                    acc_sc0 += v
        if HAS_DW:
            acc_w += dn * xhat
        if HAS_DB:
            acc_b += dn

    # partial buffers: [B, NC, 2, C] (row pid, two slots) and [B, NC, C] (row pid)
    zero = tl.zeros([BLOCK_C], dtype=tl.float32)
    if DGATE_MODE == 2:
        tl.store(DGATE + pid * 2 * C + cols, acc_g0, mask=mask)
        if DGATE_SPLIT:
            tl.store(DGATE + pid * 2 * C + C + cols, acc_g1, mask=mask)
        else:
            tl.store(DGATE + pid * 2 * C + C + cols, zero, mask=mask)
    if DSHIFT_MODE == 2:
        tl.store(DSHIFT + pid * 2 * C + cols, acc_sh0, mask=mask)
        if DSHIFT_SPLIT:
            tl.store(DSHIFT + pid * 2 * C + C + cols, acc_sh1, mask=mask)
        else:
            tl.store(DSHIFT + pid * 2 * C + C + cols, zero, mask=mask)
    if DSCALE_MODE == 2:
        tl.store(DSCALE + pid * 2 * C + cols, acc_sc0, mask=mask)
        if DSCALE_SPLIT:
            tl.store(DSCALE + pid * 2 * C + C + cols, acc_sc1, mask=mask)
        else:
            tl.store(DSCALE + pid * 2 * C + C + cols, zero, mask=mask)
    if HAS_DW:
        tl.store(DW + pid * C + cols, acc_w, mask=mask)
    if HAS_DB:
        tl.store(DB + pid * C + cols, acc_b, mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _block_c(C: int) -> int:
    if C > MAX_C:
        raise ValueError(f"triton adaln kernels support C <= {MAX_C}, got C={C}")
    return max(triton.next_power_of_2(C), 16)


def _fwd_warps(block_c: int) -> int:
    return min(max(block_c // 256, 1), 16)


def _bwd_warps(block_c: int) -> int:
    # up to 8 fp32 accumulator rows live across the loop: spread them over more threads
    return min(max(block_c // 128, 1), 16)



def _s3(t, dummy=(0, 0, 0)):
    return tuple(t.stride()) if t is not None else dummy


def _param(p, N: int):
    """(b-stride (0 when broadcast over batch), f-stride, c-stride, tokens per row)."""
    if p is None:
        return 0, 0, 0, 1
    Bp, Fp, _ = p.shape
    sb, sf, sc = p.stride()
    return (sb if Bp != 1 else 0), (sf if Fp != 1 else 0), sc, N // Fp


def _col64(C: int, *strides: int) -> bool:
    """Whether ``(C - 1) * stride`` of some last-dim stride overflows int32."""
    return any(abs(s) * (C - 1) > _INT32_MAX for s in strides)


def _check_contig(name: str, t, shape) -> None:
    if t is None:
        return
    if tuple(t.shape) != tuple(shape) or not t.is_contiguous():
        raise ValueError(f"triton adaln: {name} must be a contiguous {tuple(shape)} tensor, got "
                         f"shape {tuple(t.shape)} strides {tuple(t.stride())}")


def adaln_fwd(x, y, gate, shift, scale, weight, bias, out, h, mean, rstd, eps: float,
              is_rms: bool) -> None:
    """Forward kernel contract (see ``vidgen_kernels.ops.adaln``); fills out, h, mean, rstd."""
    B, N, C = x.shape
    BLOCK_C = _block_c(C)
    gated = y is not None
    if gated and (gate is None or h is None):
        raise ValueError("triton adaln_fwd: gated mode (y given) needs gate and h")
    _check_contig("out", out, (B, N, C))
    _check_contig("h", h if gated else None, (B, N, C))
    if B * N == 0:
        return
    sg = _param(gate if gated else None, N)
    ssh = _param(shift, N)
    ssc = _param(scale, N)
    sw = weight.stride(0) if weight is not None else 0
    sbias = bias.stride(0) if bias is not None else 0
    col64 = _col64(C, x.stride(2), y.stride(2) if gated else 0, sg[2], ssh[2], ssc[2], sw, sbias)
    with device_ctx(x):
        _adaln_fwd_kernel[(B * N,)](
            x, y if gated else x, gate if gated else x, shift, scale,
            weight if weight is not None else x, bias if bias is not None else x,
            out, h if gated else out, mean, rstd,
            N, C,
            *x.stride(), *_s3(y if gated else None),
            *sg, *ssh, *ssc,
            sw, sbias,
            mean.stride(0), mean.stride(1), rstd.stride(0), rstd.stride(1),
            float(eps),
            IS_RMS=bool(is_rms), HAS_GATE=gated, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, COL64=col64, BLOCK_C=BLOCK_C,
            num_warps=_fwd_warps(BLOCK_C),
            # h = x + gate * y rounded twice, as the contract and eager PyTorch (an FMA would
            # round once: 1 ulp off in ~23 % of fp32 values); the rest is memory-bound anyway
            enable_fp_fusion=False,
        )


def _grad_mode(name: str, buf, B: int, N: int, C: int, NC: int, tpr: int, R: int):
    """(mode, split) of a dgate/dshift/dscale output buffer."""
    if buf is None:
        return _NONE, False
    if buf.dim() == 3:
        _check_contig(name, buf, (B, N, C))
        return _PER_TOKEN, False
    _check_contig(name, buf, (B, NC, 2, C))
    if buf.dtype != torch.float32:
        raise ValueError(f"triton adaln_bwd: partial buffer {name} must be float32, "
                         f"got {buf.dtype}")
    if not 1 <= R <= tpr:
        raise ValueError(f"triton adaln_bwd: rows_per_chunk={R} must be in [1, tpr={tpr}] "
                         f"for {name}")
    return _PARTIAL, tpr % R != 0


def adaln_bwd(dout, dh, hx, y, gate, scale, weight, bias, mean, rstd, dx, dy, dgate, dshift, dscale,
              dweight, dbias, tpr_gate: int, tpr_shift: int, tpr_scale: int, rows_per_chunk: int,
              is_rms: bool) -> None:
    """Backward kernel contract (see ``vidgen_kernels.ops.adaln``); writes every element of every
    given output."""
    B, N, C = hx.shape
    BLOCK_C = _block_c(C)
    R = int(rows_per_chunk)
    if R < 1:
        raise ValueError(f"triton adaln_bwd: rows_per_chunk must be >= 1, got {R}")
    NC = -(-N // R)
    _check_contig("dx", dx, (B, N, C))
    _check_contig("dy", dy, (B, N, C))
    _check_contig("dweight", dweight, (B, NC, C))
    _check_contig("dbias", dbias, (B, NC, C))
    g_mode, g_split = _grad_mode("dgate", dgate, B, N, C, NC, int(tpr_gate), R)
    sh_mode, sh_split = _grad_mode("dshift", dshift, B, N, C, NC, int(tpr_shift), R)
    sc_mode, sc_split = _grad_mode("dscale", dscale, B, N, C, NC, int(tpr_scale), R)
    if dy is not None and gate is None:
        raise ValueError("triton adaln_bwd: dy needs gate")
    if dgate is not None and y is None:
        raise ValueError("triton adaln_bwd: dgate needs y")
    for name, buf in (("dweight", dweight), ("dbias", dbias)):
        if buf is not None and buf.dtype != torch.float32:
            raise ValueError(f"triton adaln_bwd: {name} partial buffer must be float32, "
                             f"got {buf.dtype}")
    if B * N == 0:
        return
    sg = _param(gate, N)
    ssc = _param(scale, N)
    sw = weight.stride(0) if weight is not None else 0
    sbias = bias.stride(0) if bias is not None else 0
    col64 = _col64(C, dout.stride(2), dh.stride(2) if dh is not None else 0, hx.stride(2),
                   y.stride(2) if y is not None else 0, sg[2], ssc[2], sw, sbias)
    d = hx  # stand-in for absent pointers (never dereferenced: the constexpr flags guard them)
    with device_ctx(hx):
        _adaln_bwd_kernel[(B * NC,)](
            dout, dh if dh is not None else d, hx, y if y is not None else d,
            gate if gate is not None else d, scale,
            weight if weight is not None else d, bias if bias is not None else d, mean, rstd,
            dx, dy if dy is not None else dx,
            dgate if dgate is not None else dx, dshift if dshift is not None else dx,
            dscale if dscale is not None else dx,
            dweight if dweight is not None else dx, dbias if dbias is not None else dx,
            N, C, NC, R,
            *dout.stride(), *_s3(dh), *hx.stride(), *_s3(y),
            *sg, *ssc,
            sw, sbias,
            mean.stride(0), mean.stride(1), rstd.stride(0), rstd.stride(1),
            int(tpr_gate), int(tpr_shift), int(tpr_scale),
            IS_RMS=bool(is_rms), HAS_DH=dh is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, HAS_DY=dy is not None,
            DGATE_MODE=g_mode, DGATE_SPLIT=g_split,
            DSHIFT_MODE=sh_mode, DSHIFT_SPLIT=sh_split,
            DSCALE_MODE=sc_mode, DSCALE_SPLIT=sc_split,
            HAS_DW=dweight is not None, HAS_DB=dbias is not None,
            COL64=col64, BLOCK_C=BLOCK_C,
            num_warps=_bwd_warps(BLOCK_C),
        )
