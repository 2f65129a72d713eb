"""Fused RoPE-3D + flash attention (``vidgen_kernels.rope3d_attention``): every backend against
the float64 reference (forward and backward, flash-attention's 2x rule), an independent
diffusers-style formula, the frame-causal mask against an explicit boolean mask, the custom ops
(opcheck, torch.compile), saved-tensor bytes, bad input and the ``nn.RoPE3DAttention`` module.

Backends of the kernel path: ``torch`` (the kernel contract in PyTorch, reached through the
custom op), ``cpu`` (rotation + ATen's CPU flash-attention kernel; with ``frame_causal`` the C++
kernel of ``csrc/attention_cpu.cpp``, also tested directly, masked and not) and ``triton``
(interpreter on CPU: small shapes; bf16 with ``interp_fixes``' GPU-faithful bf16 arithmetic).
"""
from __future__ import annotations

import dataclasses
import math
import os
import traceback

import pytest
import torch
import torch.nn.functional as F

import vidgen_kernels as vk
import vidgen_kernels.ops.rope3d_attention as ra
from helpers import (assert_autocast_casts_qkv, assert_close_rule, backend_params, interp_fixes_skip,
                     scaled_tables)
from vidgen_kernels.backends import why_unavailable

FWD = torch.ops.vidgen_kernels.rope3d_attn_fwd
BWD = torch.ops.vidgen_kernels.rope3d_attn_bwd


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
def kernel_missing(backend: str, device: str = "cpu") -> str | None:
    if backend == "torch":
        return None
    if backend not in ra.SUPPORTED_DTYPES:
        return f"rope3d attention has no {backend!r} backend (on CUDA the triton kernel runs it)"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return why_unavailable(backend, device)


def kernel_params(dtypes=None, oracle=True):
    out = []
    if oracle:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            if dtypes is None or dt in dtypes:
                out.append(pytest.param("torch", "cpu", dt, id=f"torch-cpu-{str(dt)[6:]}"))
    for p in backend_params(dtypes):
        backend, device, dt = p.values
        marks = list(p.marks)
        why = kernel_missing(backend, device)
        if why and not any(m.name == "skip" for m in marks):
            marks.append(pytest.mark.skip(reason=f"{backend} on {device}: {why}"))
        out.append(pytest.param(backend, device, dt, marks=marks, id=p.id))
    return out


def sdpa_params(dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """``rope3d_attention_sdpa`` (apply_rope + SDPA: auto's path where no kernel takes a call),
    tested as one more backend."""
    return [pytest.param("sdpa", "cpu", dt, id=f"sdpa-cpu-{str(dt)[6:]}") for dt in dtypes]


def semantic_params():
    return [pytest.param("reference", "cpu", torch.float32, id="reference-cpu-float32")] + \
        kernel_params((torch.float32,)) + sdpa_params((torch.float32,))


def interp(backend, device):
    return backend == "triton" and device == "cpu"


def attn(q, k, v, backend, cos=None, sin=None, **kw):
    if backend == "torch":
        return op_fwd(q, k, v, "torch", cos, sin, **kw)[0]
    if backend == "sdpa":
        return vk.rope3d_attention_sdpa(q, k, v, cos, sin, **kw)
    return vk.rope3d_attention(q, k, v, cos, sin, backend=backend, **kw)


def op_fwd(q, k, v, backend, cos=None, sin=None, *, rope_offset=0, interleaved=True,
           frame_causal=False, tokens_per_frame=None, frames_per_block=1, softmax_scale=None):
    c, s, off, fl, fb, scale = ra._check_inputs(q, k, v, cos, sin, rope_offset, interleaved,
                                                frame_causal, tokens_per_frame, frames_per_block,
                                                softmax_scale, "test")
    return FWD(q, k, v, c, s, off, interleaved, off, fl, fb, scale, backend)


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    grid: tuple = (2, 3, 4)  # (frames, height, width) of the video tokens
    pre: int = 0  # text tokens before the video (rope_offset)
    suf: int = 0  # text tokens after the video
    table: str = "half"  # none, half ([L, D/2]), full ([L, D] repeated layout)
    interleaved: bool = True
    frame_causal: bool = False
    fpb: int = 1  # frames per block
    B: int = 1
    H: int = 2
    D: int = 32
    layout: str = "ccc"  # c contiguous, p fused qkv slot, t [B, H, S, D] transposed, d last stride != 1
    Sk: int | None = None  # cross-attention key length (table none)
    scale: float | None = None

    @property
    def L(self):
        f, h, w = self.grid
        return f * h * w

    @property
    def S(self):
        return self.pre + self.L + self.suf

    @property
    def tpf(self):
        return self.grid[1] * self.grid[2]

    def kw(self):
        return dict(rope_offset=self.pre, interleaved=self.interleaved,
                    frame_causal=self.frame_causal,
                    tokens_per_frame=self.tpf if self.frame_causal else None,
                    frames_per_block=self.fpb, softmax_scale=self.scale)

    def __str__(self):
        keep = ("grid", "pre", "suf")
        return "-".join(f"{k}={v}".replace(" ", "") for k, v in dataclasses.asdict(self).items()
                        if v != Case.__dataclass_fields__[k].default or k in keep)


CASES = [
    Case(pre=5, layout="ppp"),  # CogVideoX: text first, interleaved, [L, D/2]
    Case(suf=7, table="full", interleaved=False, layout="ttt"),  # Hunyuan: text last, half-split
    Case(grid=(3, 5, 7), pre=4, H=1, D=16, layout="pdt"),  # odd grid, S = 109
    Case(grid=(4, 2, 5), pre=6, frame_causal=True, H=1, layout="ppp"),
    Case(grid=(5, 3, 3), pre=3, suf=4, frame_causal=True, fpb=2, table="full", layout="tpc"),
    Case(grid=(3, 4, 4), table="none", frame_causal=True, D=16, layout="ccc"),
    Case(grid=(2, 4, 4), pre=2, H=1, D=64, layout="ppp", scale=0.07),
    Case(grid=(1, 37, 1), table="none", D=48, layout="dcc"),
    Case(grid=(1, 29, 1), table="none", Sk=45, layout="ctt"),  # cross-attention
    Case(grid=(2, 4, 4), pre=1, B=2, interleaved=False, layout="ccc"),  # S = 33
    Case(grid=(2, 2, 4), H=1, D=128, layout="ppp"),
    Case(grid=(4, 3, 2), pre=8, frame_causal=True, fpb=2, interleaved=False, layout="ttt"),
    Case(grid=(1, 3, 4), pre=2, suf=3, H=1, D=256, table="full", layout="ppp"),  # largest head_dim
]


def make_leaves(case: Case, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, S, H, D = case.B, case.S, case.H, case.D
    Sk = case.Sk or S
    lv = {"q": 1.5 * torch.randn(B, S, H, D, generator=g, dtype=torch.float64),
          "k": torch.randn(B, Sk, H, D, generator=g, dtype=torch.float64),
          "v": torch.randn(B, Sk, H, D, generator=g, dtype=torch.float64)}
    tabs = {}
    if case.table != "none":
        ang = (torch.rand(case.L, D // 2, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
        cos, sin = ang.cos().float(), ang.sin().float()
        if case.table == "full":
            cos, sin = repeat_table(cos, case.interleaved), repeat_table(sin, case.interleaved)
        tabs = {"cos": cos, "sin": sin}
    return lv, tabs


def repeat_table(t, interleaved):
    return t.repeat_interleave(2, dim=-1) if interleaved else torch.cat([t, t], dim=-1)


def layout(t, how, slot):
    if how == "c":
        return t
    if how == "p":  # slot of a fused [B, S, 3, H, D] projection
        parts = [torch.zeros_like(t)] * 3
        parts[slot] = t
        return torch.stack(parts, dim=2)[:, :, slot]
    if how == "t":  # [B, H, S, D] storage transposed back
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "d":  # last stride != 1
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise AssertionError(how)


def build(lv, tabs, case, dtype, device):
    leaves = {n: t.to(device=device, dtype=dtype).requires_grad_() for n, t in lv.items()}
    q, k, v = (layout(leaves[n], case.layout[i], i) for i, n in enumerate("qkv"))
    tabs = {n: t.to(device) for n, t in tabs.items()}
    return leaves, (q, k, v), tabs


def fwd_bwd(lv, tabs, case, backend, dtype, device):
    leaves, (q, k, v), tabs = build(lv, tabs, case, dtype, device)
    out = attn(q, k, v, backend, tabs.get("cos"), tabs.get("sin"), **case.kw())
    g = torch.Generator().manual_seed(1)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, list(leaves.values()), cot)
    return out, dict(zip(leaves, grads))


def yardstick(hi, *los):
    return max(los, key=lambda lo: (lo.double() - hi.double()).abs().max().item())


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend,device,dtype", kernel_params() + sdpa_params())
def test_matches_reference(backend, device, dtype, case):
    i = CASES.index(case)
    if interp(backend, device) and dtype == torch.float16 and i % 2:
        pytest.skip("Triton interpreter: fp16 on every other case only (time)")
    if backend == "torch" and dtype != torch.float32 and i % 3:
        pytest.skip("contract oracle: fp16/bf16 on every third case only (it is the yardstick)")
    lv, tabs = make_leaves(case)
    hi_out, hi_g = fwd_bwd(lv, tabs, case, "reference", torch.float64, device)
    lo_out, lo_g = fwd_bwd(lv, tabs, case, "reference", dtype, device)
    if dtype != torch.float32:
        or_out, or_g = fwd_bwd(lv, tabs, case, "torch", dtype, device)
        lo_out = yardstick(hi_out, lo_out, or_out)
        lo_g = {n: yardstick(hi_g[n], lo_g[n], or_g[n]) for n in lo_g}
    out, g = fwd_bwd(lv, tabs, case, backend, dtype, device)
    assert out.is_contiguous() and out.shape == (case.B, case.S, case.H, case.D)
    assert_close_rule(out, hi_out, lo_out, "forward out")
    for n in "qkv":
        assert_close_rule(g[n], hi_g[n], lo_g[n], f"grad {n}")


LSE_CASES = [CASES[0], CASES[4], CASES[8]]


@pytest.mark.parametrize("case", LSE_CASES, ids=str)
@pytest.mark.parametrize("backend,device,dtype", kernel_params((torch.float32,)))
def test_lse_matches_contract(backend, device, dtype, case):
    lv, tabs = make_leaves(case)
    _, (q, k, v), tabs = build(lv, tabs, case, dtype, device)
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = op_fwd(q, k, v, backend, tabs.get("cos"), tabs.get("sin"), **case.kw())
    assert lse.dtype == torch.float32 and lse.shape == (case.B, case.S, case.H)
    assert lse.is_contiguous() and out.is_contiguous()
    c, s, off, fl, fb, scale = ra._check_inputs(q, k, v, tabs.get("cos"), tabs.get("sin"),
                                                case.pre, case.interleaved, case.frame_causal,
                                                case.tpf, case.fpb, case.scale, "t")
    _, want, _, _ = ra._attend(q.double(), k.double(), v.double(), c, s, off, case.interleaved,
                               off, fl, fb, scale)
    torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# semantics: an independent formula, the mask, causality, tile skipping
# ----------------------------------------------------------------------------------------------
def diffusers_rope(x, cos, sin, interleaved):
    """diffusers' apply_rotary_emb (use_real=True) on [L, D] tables; x [..., L, D]."""
    if interleaved:
        x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        x_rot = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    else:
        x_real, x_imag = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
        x_rot = torch.cat([-x_imag, x_real], dim=-1)
    return x * cos + x_rot * sin


def rope3d_tables_f64(grid, D, theta, interleaved):
    """CogVideoX-style 3D table ([t | h | w] split of the head dim), [L, D] diffusers layout."""
    f, h, w = grid
    dt, dh = D // 4, 3 * D // 8
    dims = (dt, dh, D - dt - dh)
    pos = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w),
                                     indexing="ij"), -1).reshape(-1, 3).double()
    angs = []
    for a, d in enumerate(dims):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angs.append(torch.outer(pos[:, a], inv))
    ang = torch.cat(angs, -1)  # [L, D/2]
    if interleaved:
        return ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
    return torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)


def explicit_mask(S, pre, L, tpf, fpb):
    """Boolean [S, S] mask from the rule in words, element by element."""
    m = torch.zeros(S, S, dtype=torch.bool)
    for i in range(S):
        for j in range(S):
            i_vid, j_vid = pre <= i < pre + L, pre <= j < pre + L
            if not j_vid:
                m[i, j] = True  # everyone sees text
            elif i_vid:
                m[i, j] = (j - pre) // (tpf * fpb) <= (i - pre) // (tpf * fpb)
    return m


def independent(q, k, v, cos_f, sin_f, pre, interleaved, mask):
    """From the spec alone: rotate the video slice with diffusers' formula, then SDPA (float64)
    with an explicit boolean mask."""
    q, k, v = (t.double() for t in (q, k, v))
    L = cos_f.shape[0]
    if L:
        c, s = cos_f[:, None, :], sin_f[:, None, :]
        q = torch.cat([q[:, :pre], diffusers_rope(q[:, pre:pre + L], c, s, interleaved), q[:, pre + L:]], 1)
        k = torch.cat([k[:, :pre], diffusers_rope(k[:, pre:pre + L], c, s, interleaved), k[:, pre + L:]], 1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask)
    return o.transpose(1, 2)


@pytest.mark.parametrize("fc", [None, 1, 2], ids=["full", "fc-fpb1", "fc-fpb2"])
@pytest.mark.parametrize("text", ["prefix", "suffix"])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("backend,device,dtype", semantic_params())
def test_matches_diffusers_formula_and_explicit_mask(backend, device, dtype, interleaved, text, fc):
    grid, D, H = (3, 2, 3), 32, 2
    if interp(backend, device) and (interleaved != (text == "prefix")):
        pytest.skip("Triton interpreter: two of the four convention/text combinations (time)")
    L = grid[0] * grid[1] * grid[2]
    pre, suf = (5, 0) if text == "prefix" else (0, 6)
    S = pre + L + suf
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, S, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    cos_f, sin_f = rope3d_tables_f64(grid, D, 10.0, interleaved)
    mask = explicit_mask(S, pre, L, grid[1] * grid[2], fc) if fc else None
    want = independent(q, k, v, cos_f, sin_f, pre, interleaved, mask)
    kw = dict(rope_offset=pre, interleaved=interleaved, frame_causal=fc is not None,
              tokens_per_frame=grid[1] * grid[2] if fc else None, frames_per_block=fc or 1)
    args = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    got = attn(*args, backend, cos_f.float().to(device), sin_f.float().to(device), **kw)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=2e-5)
    half = (lambda t: t[:, ::2]) if interleaved else (lambda t: t[:, :D // 2])  # noqa: E731
    got_h = attn(*args, backend, half(cos_f).float().to(device), half(sin_f).float().to(device), **kw)
    torch.testing.assert_close(got_h, got, rtol=0, atol=0)
    # backward against the same independent formula (autograd through diffusers' rotation + SDPA)
    args = [t.requires_grad_() for t in args]
    got = attn(*args, backend, cos_f.float().to(device), sin_f.float().to(device), **kw)
    dout = torch.randn(want.shape, generator=g, dtype=torch.float64)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in args)
    want_g = torch.autograd.grad(independent(q64, k64, v64, cos_f, sin_f, pre, interleaved, mask),
                                 (q64, k64, v64), dout)
    got_g = torch.autograd.grad(got, args, dout.to(device=device, dtype=got.dtype))
    for name, a, b in zip("qkv", got_g, want_g):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("pre,L,suf,tpf,fpb", [(0, 12, 0, 3, 1), (4, 12, 0, 2, 3), (3, 8, 5, 4, 2),
                                              (0, 9, 2, 3, 2)])
def test_frame_causal_mask_rule(pre, L, suf, tpf, fpb):
    S = pre + L + suf
    got = ra.frame_causal_mask(S, pre, L, tpf * fpb)
    assert torch.equal(got, explicit_mask(S, pre, L, tpf, fpb))
    assert got.any(dim=1).all()  # every query sees something
    # text queries see exactly the text; the first video block sees text + itself
    text = torch.ones(S, dtype=torch.bool)
    text[pre:pre + L] = False
    for i in range(S):
        if text[i]:
            assert torch.equal(got[i], text)


@pytest.mark.parametrize("backend,device,dtype", semantic_params())
def test_frame_causality_forward_and_backward(backend, device, dtype):
    """Changing tokens of frame block b changes no output of text or of blocks < b (bit for bit),
    and a loss on block b sends no gradient to k/v of later blocks."""
    pre, suf, fpb, D = 3, 2, 2, 32
    L, tpf = 24, 6  # 4 frames of 2 x 3 tokens
    S = pre + L + suf
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, S, 1, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    ang = torch.randn(L, D // 2, generator=g)
    kw = dict(rope_offset=pre, frame_causal=True, tokens_per_frame=tpf, frames_per_block=fpb)
    cs = (ang.cos().to(device), ang.sin().to(device))
    base = attn(q, k, v, backend, *cs, **kw)
    bt = tpf * fpb
    start = pre + bt  # block 1 onward
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, start:pre + L] += 3.0
    out = attn(q2, k2, v2, backend, *cs, **kw)
    earlier = torch.cat([torch.arange(0, start), torch.arange(pre + L, S)])
    assert torch.equal(out[:, earlier], base[:, earlier]), "text / block 0 changed"
    assert not torch.equal(out[:, start:pre + L], base[:, start:pre + L])
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    o = attn(qq, kk, vv, backend, *cs, **kw)
    dq, dk, dv = torch.autograd.grad(o[:, pre:pre + bt].sum(), (qq, kk, vv))
    assert not dk[:, start:pre + L].any() and not dv[:, start:pre + L].any()
    assert dv[:, :pre].abs().sum() > 0 and dv[:, pre + L:].abs().sum() > 0
    assert not dq[:, start:].any() and not dq[:, :pre].any()


@pytest.mark.parametrize("backend,device,dtype",
                         kernel_params((torch.float32,)) + sdpa_params((torch.float32,)))
def test_frame_causal_nan_reaches_no_masked_key(backend, device, dtype):
    """A NaN in the dout of a text query or of frame block 0 reaches no gradient of a key those
    queries cannot see (masked entries send no gradient, as the reference's masked softmax
    does): the Triton backward used to form ds = p * (dp - delta), 0 * NaN at masked entries,
    and so did ``rope3d_attention_sdpa`` with its ``S x S`` mask (SDPA's backward; now one call
    per frame block, over the keys the block may see)."""
    pre, L, suf, tpf, D = 3, 16, 2, 4, 16  # 4 frames of 4 tokens, one frame per block
    S = pre + L + suf
    g = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(1, S, 2, D, generator=g).to(device, dtype) for _ in range(4))
    ang = torch.randn(L, D // 2, generator=g)
    cs = (ang.cos().to(device), ang.sin().to(device))
    kw = dict(rope_offset=pre, frame_causal=True, tokens_per_frame=tpf)
    for row in (1, pre + 2):  # a text query; a query of frame 0
        d = dout.clone()
        d[0, row, 1, 5] = float("nan")
        grads = {}
        for b in ("reference", backend):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = attn(*leaves, b, *cs, **kw)
            grads[b] = torch.autograd.grad(out, leaves, d)
        for name, got, want in zip("qk", grads[backend], grads["reference"]):
            assert want.isnan().any() and not want.isnan().all()
            assert torch.equal(got.isnan(), want.isnan()), f"d{name}: NaN pattern (row {row})"
        # keys of frames 1.. (and, for the text query, all video keys) stay finite
        first_hidden = pre if row < pre else pre + tpf
        assert grads[backend][1][0, first_hidden:pre + L, 1].isfinite().all()


@pytest.mark.parametrize("pre,suf,tpf,fpb", [(3, 2, 4, 1), (0, 5, 6, 2), (4, 0, 3, 3),
                                             (2, 1, 5, 9), (4, 0, 3, 4), (0, 0, 4, 1)])
def test_sdpa_frame_causal_per_block_calls(monkeypatch, pre, suf, tpf, fpb):
    """``rope3d_attention_sdpa`` with ``frame_causal``: one unmasked SDPA call per frame block
    (plus one for text queries before and one after the video), each holding exactly the keys
    its queries may see, and no ``S x S`` mask; forward and backward match the reference (text
    prefix and suffix, a last block shorter than the others, one block longer than the video).
    Beyond ``_SDPA_MAX_BLOCK_CALLS`` blocks: one call with the mask, same result."""
    L = 6 * tpf
    S = pre + L + suf
    g = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(2, S, 3, 16, generator=g) for _ in range(4))
    ang = torch.randn(L, 8, generator=g)
    cs = (ang.cos(), ang.sin())
    kw = dict(rope_offset=pre, frame_causal=True, tokens_per_frame=tpf, frames_per_block=fpb)
    mask = ra.frame_causal_mask(S, pre, L, min(tpf * fpb, L))
    seen, masks = [], []
    real_sdpa, real_mask = ra._sdpa, ra.frame_causal_mask
    monkeypatch.setattr(ra, "_sdpa", lambda q, k, v, m, sc: seen.append(
        (q.shape[2], k.shape[2], m)) or real_sdpa(q, k, v, m, sc))
    monkeypatch.setattr(ra, "frame_causal_mask", lambda *a, **kw_: masks.append(1) or
                        real_mask(*a, **kw_))

    def run(backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attn(*leaves, backend, *cs, **kw)
        return (out, *torch.autograd.grad(out, leaves, dout))

    want = run("reference")
    masks.clear()
    got = run("sdpa")
    assert not masks and all(m is None for *_, m in seen)
    blocks = -(-L // (tpf * fpb))
    assert len(seen) == blocks + (pre > 0) + (suf > 0)
    # each call: as many keys as its queries may see (the mask's row count), no more
    assert sum(n for n, _, _ in seen) == S  # query rows
    firsts = [0] if pre else []
    firsts += list(range(pre, pre + L, tpf * fpb)) + ([pre + L] if suf else [])
    assert [n for _, n, _ in seen] == [int(mask[i].sum()) for i in firsts]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if fpb == 4:  # 6 frames in blocks of 4: the last block is shorter
        assert [n for n, _, _ in seen][-1] == 2 * tpf
    seen.clear()
    monkeypatch.setattr(ra, "_SDPA_MAX_BLOCK_CALLS", blocks - 1)
    got = run("sdpa")
    assert masks and len(seen) == 1 and seen[0][2] is not None
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sdpa_frame_causal_empty_sequence():
    """S = 0 with ``frame_causal``: the empty output, as the reference gives."""
    q = torch.zeros(1, 0, 2, 8)
    for f in (vk.rope3d_attention_sdpa, vk.rope3d_attention_reference):
        out = f(q, q, q, frame_causal=True, tokens_per_frame=4)
        assert out.shape == (1, 0, 2, 8)


def test_sdpa_frame_causal_compiles_once_for_every_video_length():
    """Under ``torch.compile(dynamic=True)`` the frame-causal rotation + SDPA is one graph for
    every video length (one call with the mask there: a loop over the blocks would pin the
    length, a recompile per length), equal to eager's per-block calls."""
    from torch._dynamo.testing import CompileCounter
    cnt = CompileCounter()

    def f(q, cos, sin):
        return vk.rope3d_attention_sdpa(q, q, q, cos, sin, rope_offset=3, frame_causal=True,
                                        tokens_per_frame=6)

    torch._dynamo.reset()
    c = torch.compile(f, fullgraph=True, dynamic=True, backend=cnt)
    g = torch.Generator().manual_seed(0)
    for frames in (4, 5, 7):
        cos, sin = vk.rope3d_freqs(frames, 2, 3, 16)
        q = torch.randn(1, 3 + 6 * frames, 2, 16, generator=g)
        torch.testing.assert_close(c(q, cos, sin), f(q, cos, sin), rtol=1e-5, atol=1e-6)
    assert cnt.frame_count == 1


@pytest.mark.triton
def test_triton_skips_fully_masked_tiles():
    """NaNs in keys/values of the last frame block poison every tile that reads them (0 * NaN);
    outputs of earlier blocks stay finite only because their fully masked key tiles are skipped
    (and the dq kernel skips them likewise; the dk/dv kernel skips early query tiles: NaN in
    dout of block 0 does not reach dk/dv of the last block)."""
    if why_unavailable("triton", "cpu"):
        pytest.skip(why_unavailable("triton", "cpu"))
    from vidgen_kernels.triton_kernels import rope3d_attention as tk
    S, H, D, tpf = 64, 1, 16, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, S, H, D, generator=g) for _ in range(3))
    ang = torch.randn(S, D // 2, generator=g)
    c, s = ang.cos(), ang.sin()
    args = (c, s, 0, True, 0, S, tpf, 0.25)
    kn, vn = k.clone(), v.clone()
    kn[:, 48:] = float("nan")
    vn[:, 48:] = float("nan")
    out, lse = tk.rope3d_attn_fwd(q, kn, vn, *args, block_m=16, block_n=16)
    ref, ref_lse = ra.kernel_fwd_torch(q, k, v, *args)
    assert torch.isfinite(out[:, :48]).all() and torch.isnan(out[:, 48:]).all()
    torch.testing.assert_close(out[:, :48], ref[:, :48], rtol=1e-5, atol=1e-5)
    do = torch.randn(out.shape, generator=g)
    dq, _, _ = tk.rope3d_attn_bwd(do, q, kn, vn, *args[:2], ref, ref_lse, *args[2:],
                                  block_m=16, block_n=16)
    want = ra.kernel_bwd_torch(do, q, k, v, *args[:2], ref, ref_lse, *args[2:])
    torch.testing.assert_close(dq[:, :48], want[0][:, :48], rtol=1e-5, atol=1e-5)
    don = do.clone()
    don[:, :16] = float("nan")
    _, dk, dv = tk.rope3d_attn_bwd(don, q, k, v, *args[:2], ref, ref_lse, *args[2:],
                                   block_m=16, block_n=16)
    torch.testing.assert_close(dk[:, 16:], want[1][:, 16:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv[:, 16:], want[2][:, 16:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
def test_triton_gpu_tiles_per_arch(monkeypatch, arch, rope, dtype):
    """The GPU tile choice (``_tiles``: sm_90 tiles, or the sm_80 table with RoPE, where dk/dv and
    dq get different tiles) run through the interpreter: the kernels agree with the contract
    with those tiles, frame-causal, at a size that is no multiple of them; in bf16 (the GPU's
    production dtype: bf16 tiles into the dots) too."""
    if why_unavailable("triton", "cpu"):
        pytest.skip(why_unavailable("triton", "cpu"))
    if dtype == torch.bfloat16 and interp_fixes_skip():
        pytest.skip(f"triton bf16 in the interpreter: {interp_fixes_skip()}")
    from vidgen_kernels.triton_kernels import rope3d_attention as tk
    S, H, D, tpf, text = 8 + 3 * 40, 1, 64, 40, 8
    q = torch.empty(0, 0, 0, D, dtype=torch.float16)
    monkeypatch.setattr(tk, "triton_interpret", lambda: False)
    monkeypatch.setattr(tk, "target_arch", lambda t: arch)
    tiles = {kern: tk._tiles(kern, q, rope) for kern in ("fwd", "dkdv", "dq")}
    if arch == 80 and rope:
        assert tiles == {k: v[64] for k, v in tk._SM80_ROPE_TILES.items()}
        assert tiles["dkdv"][:2] != tiles["dq"][:2]
    else:
        assert tiles == {"fwd": (128, 64, 4), "dkdv": (64, 64, 8), "dq": (64, 64, 8)}
    assert tk._tiles("dq", q.float(), rope)[0] == tiles["dq"][0] // 2  # fp32 halves BLOCK_M
    assert tk._tiles("fwd", q, rope, block_m=16, block_n=32, num_warps=2) == (16, 32, 2)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        tk._tiles("fwd", q, rope, block_n=24)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, S, H, D, generator=g).to(dtype) for _ in range(4))
    ang = torch.randn(S - text, D // 2, generator=g)
    c, s = (ang.cos(), ang.sin()) if rope else (None, None)
    args = (c, s, text, True, text, S - text, tpf, D ** -0.5)
    # bf16: the kernel rounds P (and the rotated q / k) to bf16 for its dots, the contract
    # computes in fp32 from the same bf16 inputs; a few bf16 ulps of the O(1) outputs
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    out, lse = tk.rope3d_attn_fwd(q, k, v, *args)
    ref, ref_lse = ra.kernel_fwd_torch(q, k, v, *args)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 1e-2)
    got = tk.rope3d_attn_bwd(do, q, k, v, *args[:2], ref, ref_lse, *args[2:])
    want = ra.kernel_bwd_torch(do, q, k, v, *args[:2], ref, ref_lse, *args[2:])
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.triton
def test_triton_backward_takes_a_strided_lse():
    """The backward kernels read delta (a contiguous buffer) through lse's strides: an lse that
    is a transposed [B, H, S] buffer (flash-attention's layout) gave wrong dq / dk / dv. The
    launcher now reads a contiguous lse: the gradients equal those from the contiguous one."""
    if why_unavailable("triton", "cpu"):
        pytest.skip(why_unavailable("triton", "cpu"))
    import vidgen_kernels.triton_kernels.rope3d_attention as tr
    g = torch.Generator().manual_seed(0)
    B, S, H, D = 2, 11, 3, 16
    q, k, v, do = (torch.randn(B, S, H, D, generator=g) for _ in range(4))
    ang = torch.randn(8, D // 2, generator=g)
    args = (ang.cos(), ang.sin(), 3, True, 3, 8, 4, 0.3)
    out, lse = tr.rope3d_attn_fwd(q, k, v, *args)
    lse_t = lse.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H] view of [B, H, S]
    assert not lse_t.is_contiguous() and torch.equal(lse_t, lse)
    want = tr.rope3d_attn_bwd(do, q, k, v, *args[:2], out, lse, *args[2:])
    got = tr.rope3d_attn_bwd(do, q, k, v, *args[:2], out, lse_t, *args[2:])
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.triton
def test_triton_batches_beyond_the_grid_y_limit(monkeypatch):
    """The kernels put (batch, head) on grid axis 1, which CUDA caps at 65535: larger B * H is
    launched over batch slices (views, no copy). With the cap lowered to 3 (H=2: one batch per
    launch) forward, backward and the jvp equal one launch."""
    if why_unavailable("triton", "cpu"):
        pytest.skip(why_unavailable("triton", "cpu"))
    import vidgen_kernels.triton_kernels.rope3d_attention as tr
    g = torch.Generator().manual_seed(0)
    B, S, H, D = 3, 10, 2, 16
    q, k, v, do, tq = (torch.randn(B, S, H, D, generator=g) for _ in range(5))
    ang = torch.randn(7, D // 2, generator=g)
    args = (ang.cos(), ang.sin(), 3, True, 3, 7, 0, 0.3)

    def run():
        out, lse = tr.rope3d_attn_fwd(q, k, v, *args)
        grads = tr.rope3d_attn_bwd(do, q, k, v, *args[:2], out, lse, *args[2:])
        tangent = tr.rope3d_attn_jvp(q, k, v, tq, tq, tq, *args)
        return (out, lse, *grads, tangent)
    want = run()
    assert len(tr._batch_slices(B, H)) == 1
    monkeypatch.setattr(tr, "_MAX_GRID_Y", 3)
    assert [s_.indices(B) for s_ in tr._batch_slices(B, H)] == [(0, 1, 1), (1, 2, 1), (2, 3, 1)]
    for a, b in zip(run(), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpu_path_without_apply_rope(monkeypatch):
    """The cpu backend rotates with vidgen_kernels.apply_rope when the install has it, else with
    the PyTorch rotation: both give the same result."""
    if kernel_missing("cpu"):
        pytest.skip(kernel_missing("cpu"))
    case = CASES[4]
    lv, tabs = make_leaves(case)
    with_rope = fwd_bwd(lv, tabs, case, "cpu", torch.float32, "cpu")
    monkeypatch.delattr(vk, "apply_rope", raising=False)
    without = fwd_bwd(lv, tabs, case, "cpu", torch.float32, "cpu")
    torch.testing.assert_close(with_rope[0], without[0], rtol=1e-6, atol=1e-6)
    for n in "qkv":
        torch.testing.assert_close(with_rope[1][n], without[1][n], rtol=1e-6, atol=1e-6)


# ---- the C++ kernel (csrc/attention_cpu.cpp): the cpu backend's frame-causal path -------------
CPP_CASES = [  # (B, H, D, pre, L (0: no table), suf, tokens per mask block (0: no mask), Sk)
    (2, 3, 16, 5, 24, 0, 0, None),  # no mask (the kernel also runs it; the backend uses ATen's)
    (1, 2, 32, 4, 40, 3, 8, None),  # text prefix and suffix, blocks of 8
    (2, 2, 64, 0, 33, 0, 11, None),  # video only, S = 33
    (1, 1, 16, 3, 60, 0, 20, None),  # B * H = 1: query rows split over chunks (partial dk / dv)
    (1, 2, 24, 6, 0, 0, 0, 45),  # cross-attention without a table, S_k != S_q
    (1, 1, 12, 0, 0, 0, 0, 1),  # a single key
]


def _cpp_call(q, k, v, do, cos, sin, pre, L, fb, inter, block_m):
    B, S, H, D = q.shape
    scale = D ** -0.5
    fl = L if L else S - pre
    args = (pre, inter, pre, fl, fb, scale)
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(B, S, H)
    C = vk._ext.C
    C.rope3d_attn_fwd_cpu(q, k, v, cos, sin, out, lse, *args, block_m)
    grads = tuple(torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))
    C.rope3d_attn_bwd_cpu(do, q, k, v, cos, sin, out, lse, *grads, *args, block_m)
    ref, ref_lse = ra.kernel_fwd_torch(q, k, v, cos, sin, pre, inter, pre, fl, fb, scale)
    want = ra.kernel_bwd_torch(do, q, k, v, cos, sin, out, lse, pre, inter, pre, fl, fb, scale)
    return (out, lse) + grads, (ref, ref_lse) + want


@pytest.mark.parametrize("block_m", [0, 7, 16])
@pytest.mark.parametrize("case", CPP_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpp_attention_kernel_contract(case, dtype, block_m):
    """The C++ kernel against the contract in PyTorch, forward (out, lse) and backward, masked
    and not, with a text prefix / suffix, chunked query rows, cross-attention and any block
    size; q / k / v / dout read in place from a fused [B, S, 4, H, D] buffer (non-contiguous)."""
    if kernel_missing("cpu"):
        pytest.skip(kernel_missing("cpu"))
    B, H, D, pre, L, suf, fb, Sk = case
    S = pre + (L or 17) + suf
    g = torch.Generator().manual_seed(len(S * "x") + D)
    buf = torch.randn(B, S, 4, H, D, generator=g).to(dtype)
    q, k, v, do = buf.unbind(2)
    if Sk is not None:
        k, v = torch.randn(2, B, Sk, H, D, generator=g).to(dtype).unbind(0)
    cos = sin = None
    if L:
        ang = torch.rand(L, D // 2, generator=g) * 6
        cos, sin = ang.cos(), ang.sin()
    for inter in (True, False):
        got, want = _cpp_call(q, k, v, do, cos, sin, pre, L, fb, inter, block_m)
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # same rounding points: only summation order
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous(), name
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol,
                                       msg=lambda m, n=name: f"{n} interleaved={inter}: {m}")


def test_cpp_attention_nan_and_blas_fallback(tmp_path):
    """NaN in a query row gives NaN in that row's output and lse (and not elsewhere); the
    at::mm fallback of the kernel's GEMM (VIDGEN_KERNELS_CPU_ATEN_GEMM=1, used where the torch
    build exports no BLAS sgemm_) gives the same numbers as the BLAS path."""
    if kernel_missing("cpu"):
        pytest.skip(kernel_missing("cpu"))
    import subprocess
    import sys
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g) for _ in range(3))
    q[0, 9, 1, 3] = float("nan")
    out, lse = ra._cpp_fwd(q, k, v, None, None, 0, True, 0, 40, 8, 0.25)
    assert out[0, 9, 1].isnan().all() and lse[0, 9, 1].isnan()
    out[0, 9, 1] = 0
    lse[0, 9, 1] = 0
    assert not out.isnan().any() and not lse.isnan().any()
    code = (
        "import torch, vidgen_kernels.ops.rope3d_attention as ra\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v, do = (torch.randn(1, 50, 2, 16, generator=g) for _ in range(4))\n"
        "ang = torch.rand(45, 8, generator=g)\n"
        "a = (ang.cos(), ang.sin(), 5, True, 5, 45, 9, 0.25)\n"
        "o, l = ra._cpp_fwd(q, k, v, *a)\n"
        "r = ra._cpp_bwd(do, q, k, v, *a[:2], o, l, *a[2:])\n"
        "torch.save([o, l, *r], __import__('sys').argv[1])\n"
        "print(ra._ext.C.attention_cpu_gemm())\n")
    res = []
    for env in ("0", "1"):
        path = str(tmp_path / f"r{env}.pt")
        r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                           env={**os.environ, "VIDGEN_KERNELS_CPU_ATEN_GEMM": env}, timeout=300)
        assert r.returncode == 0, r.stderr
        gemm = r.stdout.split()[-1]
        assert gemm == ("aten" if env == "1" else vk._ext.C.attention_cpu_gemm()), (env, gemm)
        res.append(torch.load(path))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpp_attention_infinite_score_matches_reference():
    """A +inf score (an inf in k) gives NaN output rows exactly where the reference's softmax
    does (exp(inf - inf)); the C++ kernel used to return finite rows there (a plain average of
    v: its vectorised exp turned the NaN into a weight). Finite rows agree. (Which gradient rows
    turn NaN then depends on which masked products an implementation forms: not compared.)"""
    if kernel_missing("cpu"):
        pytest.skip(kernel_missing("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, 16, generator=g) for _ in range(3))
    k[0, 3, 0, 0] = float("inf")
    kw = dict(frame_causal=True, tokens_per_frame=2)
    got, want = (vk.rope3d_attention(q, k, v, backend=b, **kw) for b in ("cpu", "reference"))
    assert want.isnan().any() and not want.isnan().all()
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)


def test_sdpa_frame_causal_output_is_contiguous():
    """``rope3d_attention_sdpa`` returns a contiguous ``[B, S, H, D]`` output, also from its
    per-block calls at head_dim 1 with q given as ``[B, H, S, D]`` transposed back (the
    concatenation of those blocks came out with ``[B, H, S, D]`` strides there)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 3, 21, 1, generator=g).transpose(1, 2)
    k, v = (torch.randn(3, 21, 3, 1, generator=g) for _ in range(2))
    kw = dict(frame_causal=True, tokens_per_frame=1)
    got = vk.rope3d_attention_sdpa(q, k, v, **kw)
    assert got.is_contiguous(), got.stride()
    torch.testing.assert_close(got, vk.rope3d_attention_reference(q, k, v, **kw))


@pytest.mark.parametrize("where,val", [("q", float("nan")), ("q", float("inf")),
                                       ("k", float("nan")), ("k", -float("inf"))])
def test_cpu_inference_keeps_nonfinite_rows(where, val):
    """The cpu backend's inference forward (nothing requires grad, unmasked, fp32: ATen's flash
    forward on the rotated q / k) gives NaN exactly where the reference and the training
    forward do when q or k holds a NaN / inf: ATen's fp32 kernel returned a row of zeros for
    such a query (an overflow hidden, and a result that depended on the grad mode), at least
    where the key length is under 16 (torch 2.13)."""
    if kernel_missing("cpu"):
        pytest.skip(kernel_missing("cpu"))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 11, 2, 16, generator=g) for _ in range(3))
    dict(q=q, k=k)[where][1, 7, 1, 3] = val
    cos, sin = vk.rope3d_freqs(1, 1, 5, 16)
    want = vk.rope3d_attention(q, k, v, cos, sin, rope_offset=4, backend="reference")
    assert want.isnan().any() and not want.isnan().all()
    train = vk.rope3d_attention(q.requires_grad_(), k, v, cos, sin, rope_offset=4, backend="cpu")
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = vk.rope3d_attention(q, k, v, cos, sin, rope_offset=4, backend="cpu")
        for out in (got, train.detach()):
            assert torch.equal(out.isnan(), want.isnan()), f"{mode.__name__}: NaN pattern"
            torch.testing.assert_close(out.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("where,val", [("q", float("nan")), ("k", -float("inf"))])
@pytest.mark.parametrize("frame_causal", [False, True])
def test_sdpa_path_keeps_nonfinite_rows(where, val, frame_causal, dtype):
    """rope3d_attention_sdpa (and auto's no-kernel path, which runs it: a head_dim over the
    kernels' limit, a CPU without the extension) gave zeros where the reference gives NaN for a
    NaN / inf in q or k (ATen's CPU flash kernels zero such a row, hiding an overflow). It now
    gives the reference's NaN pattern, with and without grad."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 11, 2, 16, generator=g).to(dtype) for _ in range(3))
    dict(q=q, k=k)[where][1, 7, 1, 3] = val
    cos, sin = vk.rope3d_freqs(3, 1, 2, 16)
    kw = dict(rope_offset=5, frame_causal=frame_causal, tokens_per_frame=2 if frame_causal else None)
    want = vk.rope3d_attention_reference(q, k, v, cos, sin, **kw)
    assert want.isnan().any() and not want.isnan().all()
    got = vk.rope3d_attention_sdpa(q, k, v, cos, sin, **kw)
    assert torch.equal(got.isnan(), want.isnan())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), **tol)
    # auto's no-kernel path (as on a CPU without the extension)
    with vk.use_backend("auto"):
        import vidgen_kernels.ops.rope3d_attention as ra
        lim = ra.MAX_D
        ra.MAX_D = {"cpu": 8, "triton": 8}
        try:
            fb = vk.rope3d_attention(q, k, v, cos, sin, **kw)
        finally:
            ra.MAX_D = lim
    assert torch.equal(fb.isnan(), want.isnan())
    # a training forward (through the twice-differentiable SDPA Function before) too
    out = vk.rope3d_attention_sdpa(q.clone().requires_grad_(), k, v, cos, sin, **kw)
    assert torch.equal(out.isnan(), want.isnan())


@pytest.mark.parametrize("backend,device,dtype", kernel_params((torch.float32,), oracle=False))
def test_frame_causal_broadcast_kv(backend, device, dtype):
    """k / v broadcast with stride 0 (one head expanded to H, as grouped-query attention does it,
    and one batch row expanded to B) are read in place and give the reference's result,
    forward and backward (the gradient of the expanded leaf sums over the broadcast)."""
    g = torch.Generator().manual_seed(5)
    B, H, D, pre, F_, tpf = 2, 3, 16, 4, 3, 6
    S = pre + F_ * tpf
    q = torch.randn(B, S, H, D, generator=g).to(device, dtype).requires_grad_()
    k1 = torch.randn(B, S, 1, D, generator=g).to(device, dtype).requires_grad_()
    v1 = torch.randn(1, S, H, D, generator=g).to(device, dtype).requires_grad_()
    ang = torch.rand(F_ * tpf, D // 2, generator=g).to(device)
    kw = dict(rope_offset=pre, frame_causal=True, tokens_per_frame=tpf)
    cot = torch.randn(B, S, H, D, generator=g).to(device, dtype)
    res = []
    for be in (backend, "reference"):
        k, v = k1.expand(B, S, H, D), v1.expand(B, S, H, D)
        out = attn(q, k, v, be, ang.cos(), ang.sin(), **kw)
        res.append((out, *torch.autograd.grad(out, (q, k1, v1), cot)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *res):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_cpu_kernel_routing(monkeypatch):
    """Which kernel the cpu backend runs: every call that may be differentiated runs the C++
    kernel forward and backward (ATen's flash forward's lse is too coarse for the backward,
    see test_cpu_fp32_gradients_within_rule_at_head_dim_128); a forward that nothing
    differentiates runs ATen's flash forward in fp32 with unit last strides, and the C++ kernel
    for a non-unit last stride (which ATen reads wrongly; read in place, no copy) and for
    fp16 / bf16. All match the reference."""
    if kernel_missing("cpu"):
        pytest.skip(kernel_missing("cpu"))
    calls = []
    for name in ("_cpp_fwd", "_cpp_bwd"):
        fn = getattr(ra, name)
        monkeypatch.setattr(ra, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    for case in (CASES[7], CASES[0]):  # a strided layout, a plain one
        calls.clear()
        lv, tabs = make_leaves(case)
        got = fwd_bwd(lv, tabs, case, "cpu", torch.float32, "cpu")
        want = fwd_bwd(lv, tabs, case, "reference", torch.float32, "cpu")
        assert calls == ["_cpp_fwd", "_cpp_bwd"], (case.layout, calls)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        for n in "qkv":
            torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-5, atol=1e-5)
    for case, dtype, want_calls in ((CASES[7], torch.float32, ["_cpp_fwd"]),
                                    (CASES[0], torch.float32, []),
                                    (CASES[0], torch.bfloat16, ["_cpp_fwd"])):
        calls.clear()
        lv, tabs = make_leaves(case)
        _, (q, k, v), t = build(lv, tabs, case, dtype, "cpu")
        with torch.no_grad():
            got = attn(q, k, v, "cpu", t.get("cos"), t.get("sin"), **case.kw())
            want = attn(q, k, v, "reference", t.get("cos"), t.get("sin"), **case.kw())
        assert calls == want_calls, (case.layout, dtype, calls)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("D", [80, 128])
def test_cpu_fp32_gradients_within_rule_at_head_dim_128(D):
    """fp32 training at head_dim 80 / 128 with peaked softmaxes (q, k ~ N(0, 5^2)): gradients
    within the 2x rule of the fp32 reference's own error. (On ATen's flash kernels they were at
    3-8x: its forward lse is a few ulp of the scores' magnitude off.)"""
    if kernel_missing("cpu"):
        pytest.skip(kernel_missing("cpu"))
    pre, grid, H = 16, (2, 16, 16), 2
    S = pre + grid[0] * grid[1] * grid[2]
    cos, sin = vk.rope3d_freqs(*grid, D, axes_dims=(D // 4 - D // 4 % 2, D // 4 + D // 4 % 2,
                                                   D // 2))
    g = torch.Generator().manual_seed(0)
    q0, k0 = (5 * torch.randn(1, S, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    v0, cot = (torch.randn(1, S, H, D, generator=g, dtype=torch.float64) for _ in range(2))

    def run(backend, dtype):
        q, k, v = (t.to(dtype).requires_grad_() for t in (q0, k0, v0))
        out = vk.rope3d_attention(q, k, v, cos.to(dtype), sin.to(dtype), rope_offset=pre,
                                  backend=backend)
        return (out, *torch.autograd.grad(out, (q, k, v), cot.to(dtype)))
    hi, lo, got = run("reference", torch.float64), run("reference", torch.float32), \
        run("cpu", torch.float32)
    for name, a, h, l_ in zip(("out", "dq", "dk", "dv"), got, hi, lo):
        assert_close_rule(a, h, l_, name)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_cpu_low_precision_inf_score_gives_nan_rows(dtype, grad):
    """fp16 / bf16 without a mask: an inf in q or k gives NaN rows exactly where the reference
    does. (ATen's reduced-precision CPU flash kernel returned rows of zeros there: an fp16
    overflow in the projection went unseen by NaN checks and GradScaler-style inf checks.)"""
    if kernel_missing("cpu"):
        pytest.skip(kernel_missing("cpu"))
    g = torch.Generator().manual_seed(0)
    for where in ("q", "k"):
        t = {n: torch.randn(1, 24, 1, 16, generator=g).to(dtype) for n in "qkv"}
        t[where][0, 5, 0, 3] = float("inf")
        for n in "qkv":
            t[n].requires_grad_(grad)
        got, want = (vk.rope3d_attention(t["q"], t["k"], t["v"], backend=b).detach()
                     for b in ("cpu", "reference"))
        assert want.isnan().any(), where
        assert torch.equal(got.isnan().any(-1), want.isnan().any(-1)), where
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=2e-2, atol=2e-2)


def test_cpu_frame_causal_builds_no_mask(monkeypatch):
    """The cpu backend's frame-causal path (forward and backward) never materialises the S x S
    mask: it runs with frame_causal_mask disabled and still matches the reference."""
    if kernel_missing("cpu"):
        pytest.skip(kernel_missing("cpu"))
    case = CASES[4]
    lv, tabs = make_leaves(case)
    want = fwd_bwd(lv, tabs, case, "reference", torch.float32, "cpu")

    def boom(*a, **k):
        raise AssertionError("frame_causal_mask called on the cpu path")
    monkeypatch.setattr(ra, "frame_causal_mask", boom)
    got = fwd_bwd(lv, tabs, case, "cpu", torch.float32, "cpu")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for n in "qkv":
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# memory: what is saved for backward
# ----------------------------------------------------------------------------------------------
def saved_bytes(fn, unique=False):
    """``fn()`` and the bytes of the tensors autograd saved while it ran; with ``unique`` a tensor
    saved more than once (the same data, shape, strides) counts once: what the device holds."""
    seen = {}

    def pack(t):
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) if unique else len(seen)
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("backend,device,dtype", kernel_params((torch.float32,), oracle=False))
def test_saved_tensors_bytes(backend, device, dtype):
    """The kernel path saves q, k, v, out, lse and the [L, D/2] tables: no S x S matrix, no
    rotated copies. The reference (materialised softmax) saves far more, so the bound bites."""
    case = Case(grid=(2, 4, 4), pre=16, H=2, D=32, frame_causal=True, layout="ppp")
    lv, tabs = make_leaves(case)
    _, (q, k, v), tabs = build(lv, tabs, case, dtype, device)
    out, nbytes = saved_bytes(lambda: attn(q, k, v, backend, tabs["cos"], tabs["sin"], **case.kw()))
    elt = q.element_size()
    allowed = (4 * q.numel() * elt + case.B * case.S * case.H * 4
               + 2 * case.L * (case.D // 2) * 4)
    assert 0 < nbytes <= allowed, (nbytes, allowed)
    _, ref_bytes = saved_bytes(lambda: attn(q, k, v, "reference", tabs["cos"], tabs["sin"], **case.kw()))
    assert ref_bytes > 1.5 * allowed, (ref_bytes, allowed)


# ----------------------------------------------------------------------------------------------
# bad input, backend choice
# ----------------------------------------------------------------------------------------------
def _bad_cases():
    x = torch.randn(1, 10, 2, 8)
    t = torch.randn(6, 4)
    return [
        ("rank", dict(q=x[0]), ValueError, "must be \\[B, S, H, D\\] \\(4-D\\)"),
        ("heads", dict(k=torch.randn(1, 10, 3, 8), v=torch.randn(1, 10, 3, 8)), ValueError, "heads"),
        ("head_dim", dict(k=torch.randn(1, 10, 2, 16), v=torch.randn(1, 10, 2, 16)), ValueError,
         "head_dim"),
        ("odd head_dim", dict(q=torch.randn(1, 10, 2, 7), k=torch.randn(1, 10, 2, 7),
                              v=torch.randn(1, 10, 2, 7), cos=torch.randn(6, 3), sin=torch.randn(6, 3)),
         ValueError, "even head_dim"),
        ("table too long", dict(cos=torch.randn(9, 4), sin=torch.randn(9, 4), rope_offset=2),
         ValueError, "S - rope_offset"),
        ("table width", dict(cos=torch.randn(6, 5), sin=torch.randn(6, 5)), ValueError, "\\[L, D/2\\]"),
        ("cos without sin", dict(cos=t, sin=None), ValueError, "together"),
        ("cos sin dtypes", dict(cos=t, sin=t.double()), TypeError, "share one dtype"),
        ("cos sin layouts", dict(cos=t, sin=t.repeat_interleave(2, -1)), ValueError,
         "same shape, got cos \\(6, 4\\), sin \\(6, 8\\)"),
        ("tokens_per_frame", dict(cos=t, sin=t, rope_offset=4, frame_causal=True, tokens_per_frame=4),
         ValueError, "does not divide"),
        ("tokens_per_frame missing", dict(frame_causal=True), ValueError, "tokens_per_frame"),
        ("frames_per_block", dict(frame_causal=True, tokens_per_frame=5, frames_per_block=0),
         ValueError, "frames_per_block"),
        ("dtype", dict(k=x.double(), v=x.double()), TypeError, "dtype"),
        ("int dtype", dict(q=x.int()), TypeError, "floating"),
        ("device", dict(k=x.to("meta"), v=x.to("meta")), ValueError, "is on meta"),
        ("rope cross-attention", dict(k=torch.randn(1, 12, 2, 8), v=torch.randn(1, 12, 2, 8),
                                      cos=t, sin=t), ValueError, "self-attention"),
        ("k v shapes", dict(v=torch.randn(1, 11, 2, 8)), ValueError, "one shape"),
        ("rope_offset", dict(rope_offset=-1), ValueError, "rope_offset"),
        ("scale", dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
        ("not a tensor", dict(q=[1.0]), TypeError, "torch.Tensor"),
    ]


@pytest.mark.parametrize("name,kw,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
@pytest.mark.parametrize("fn", ["rope3d_attention", "rope3d_attention_reference"])
def test_bad_input(fn, name, kw, exc, match):
    x = torch.randn(1, 10, 2, 8)
    args = dict(q=x, k=x, v=x, cos=None, sin=None)
    args.update(kw)
    q, k, v, cos, sin = (args.pop(n) for n in ("q", "k", "v", "cos", "sin"))
    with pytest.raises(exc, match=match):
        getattr(vk, fn)(q, k, v, cos, sin, **args)


@pytest.mark.parametrize("backend", ["reference", "cpu", "torch", "triton"])
def test_frames_per_block_longer_than_the_video(backend):
    """A block of more frames than the video is one block (the whole video): the same result
    as frames_per_block = frames, without a mask or index sized by tokens x frames_per_block
    (2**40 frames per block used to ask the reference for terabytes; 2**62 / 2**63 - 1 gave
    NaN on cpu (an int64 overflow in the C++ kernel's key range) or a raw pybind / Triton error
    for a block of 2**63 tokens or more)."""
    if kernel_missing(backend):
        pytest.skip(kernel_missing(backend))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 11, 2, 8, generator=g) for _ in range(3))
    kw = dict(rope_offset=3, frame_causal=True, tokens_per_frame=2)
    want = attn(q, k, v, backend, frames_per_block=4, **kw)
    for fpb in (5, 2 ** 40, 2 ** 62, 2 ** 63 - 1):
        torch.testing.assert_close(attn(q, k, v, backend, frames_per_block=fpb, **kw), want)
    if backend in ("cpu", "triton"):  # compiled: the custom op's implementation clamps
        for tpf in (1, 2):  # 2: the block's token count is past int64 (a raw schema error)
            kw1 = dict(rope_offset=3, frame_causal=True, tokens_per_frame=tpf)
            want1 = attn(q, k, v, backend, frames_per_block=8, **kw1)
            torch._dynamo.reset()
            f = torch.compile(lambda q, k, v: vk.rope3d_attention(
                q, k, v, backend=backend, frames_per_block=2 ** 63 - 1, **kw1), fullgraph=True)
            torch.testing.assert_close(f(q, k, v), want1)


def test_cpu_head_dim_limit():
    """The cpu backend's C++ kernel (frame_causal / strided inputs) takes head_dim < 4096: a
    named cpu backend says so with a ValueError (it raised a RuntimeError from C++), auto runs
    rotation + SDPA (``rope3d_attention_sdpa``)."""
    if kernel_missing("cpu"):
        pytest.skip(kernel_missing("cpu"))
    q = torch.randn(1, 4, 1, 4096)
    kw = dict(frame_causal=True, tokens_per_frame=2)
    with pytest.raises(ValueError, match="backend 'cpu' supports head_dim <= 4095, got 4096"):
        vk.rope3d_attention(q, q, q, backend="cpu", **kw)
    torch.testing.assert_close(vk.rope3d_attention(q, q, q, **kw),
                               vk.rope3d_attention_reference(q, q, q, **kw))
    assert torch.equal(vk.rope3d_attention(q, q, q, **kw), vk.rope3d_attention_sdpa(q, q, q, **kw))


def test_auto_without_a_kernel_runs_rotation_plus_sdpa(monkeypatch):
    """Where ``auto`` finds no kernel for a call (here a CPU without the compiled extension; on a
    GPU a T4 / V100, where the Triton kernels do not run), ``rope3d_attention`` runs
    ``rope3d_attention_sdpa``: it saves no ``S x S`` matrix per head for backward, where the
    reference saves several. Asked for by name or context, in fp64 and under ``torch.func``
    transforms it is still the reference."""
    monkeypatch.setattr(vk._ext, "has_cpu", lambda: False)
    calls = []
    real = ra._rotate_sdpa
    monkeypatch.setattr(ra, "_rotate_sdpa", lambda *a: calls.append(a) or real(*a))
    g = torch.Generator().manual_seed(0)
    B, pre, grid, H, D = 1, 4, (2, 4, 8), 4, 16
    cos, sin = vk.rope3d_freqs(*grid, D)
    S = pre + cos.shape[0]
    q, k, v = (torch.randn(B, S, H, D, generator=g).requires_grad_() for _ in range(3))
    for kw in (dict(rope_offset=pre), dict(rope_offset=pre, frame_causal=True, tokens_per_frame=32)):
        # (unique: SDPA's double-backward wrapper saves q / k / v that SDPA saves views of)
        out, nbytes = saved_bytes(lambda: vk.rope3d_attention(q, k, v, cos, sin, **kw), unique=True)
        assert len(calls) == 1
        torch.testing.assert_close(out, vk.rope3d_attention_sdpa(q, k, v, cos, sin, **kw),
                                   rtol=0, atol=0)
        calls.clear()
        want, ref_bytes = saved_bytes(lambda: vk.rope3d_attention(q, k, v, cos, sin,
                                                                  backend="reference", **kw))
        assert not calls
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), (q, k, v)),
                                   torch.autograd.grad(want.sum(), (q, k, v)))
        # rotated q / k, v, out, lse, the tables (counted once per use: PyTorch's rotation of
        # q and k saves each twice); the mask (fp32 [S, S], no B x H) when causal
        bound = 4 * q.numel() * 4 + B * S * H * 4 + 8 * cos.numel() * 4 + \
            (S * S * 4 if kw.get("frame_causal") else 0)
        assert 0 < nbytes <= bound < ref_bytes / 2, (nbytes, bound, ref_bytes)
    with vk.use_backend("reference"):
        vk.rope3d_attention(q, k, v, cos, sin, rope_offset=pre)
    qd = q.detach().double()
    vk.rope3d_attention(qd, qd, qd, cos, sin, rope_offset=pre)
    torch.func.grad(lambda q_: vk.rope3d_attention(q_, k, v, cos, sin, rope_offset=pre).sum())(q)
    torch.func.jvp(lambda q_: vk.rope3d_attention(q_, k, v, cos, sin, rope_offset=pre), (q,), (q,))
    assert not calls


def test_backend_choice():
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(vk.BackendUnavailableError, match="no implementation of this op"):
        vk.rope3d_attention(q, q, q, backend="cuda")
    for b in ("cpu", "triton"):
        if why_unavailable(b, "cpu") is None:
            with pytest.raises(vk.BackendUnavailableError, match="does not support dtype torch.float64"):
                vk.rope3d_attention(q.double(), q.double(), q.double(), backend=b)
    with vk.use_backend("auto"):
        torch.testing.assert_close(vk.rope3d_attention(q.double(), q.double(), q.double()),
                                   vk.rope3d_attention_reference(q.double(), q.double(), q.double()))
        if kernel_missing("cpu") is None:
            assert torch.equal(vk.rope3d_attention(q, q, q), vk.rope3d_attention(q, q, q, backend="cpu"))


@pytest.mark.triton
def test_triton_head_dim_limit():
    if why_unavailable("triton", "cpu"):
        pytest.skip(why_unavailable("triton", "cpu"))
    q = torch.randn(1, 3, 1, 272)
    with pytest.raises(ValueError, match="supports head_dim <= 256, got 272"):
        vk.rope3d_attention(q, q, q, backend="triton")
    with vk.use_backend("triton"):  # default choice: falls back to rotation + SDPA
        torch.testing.assert_close(vk.rope3d_attention(q, q, q), vk.rope3d_attention_reference(q, q, q))
        assert torch.equal(vk.rope3d_attention(q, q, q), vk.rope3d_attention_sdpa(q, q, q))


# ----------------------------------------------------------------------------------------------
# custom ops: opcheck, no copies, torch.compile
# ----------------------------------------------------------------------------------------------
OP_BACKENDS = [pytest.param(b, marks=[pytest.mark.skip(reason=kernel_missing(b))]
                            if kernel_missing(b) else []) for b in ("torch", "cpu", "triton")]


def _op_args(backend, rope, fc, grad=True):
    g = torch.Generator().manual_seed(0)
    B, S, H, D = 1, 20, 2, 16
    qkv = torch.randn(B, S, 3, H, D, generator=g)
    q, k, v = qkv.unbind(2)
    if grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    cos = sin = None
    if rope:
        ang = torch.randn(16, D // 2, generator=g)
        cos, sin = ang.cos(), ang.sin()
    return (q, k, v, cos, sin, 4 if rope else 0, rope == "interleaved", 4, 16, 8 if fc else 0,
            0.3, backend)


@pytest.mark.parametrize("rope,fc", [(None, False), ("interleaved", True), ("half", False)])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_opcheck(backend, rope, fc):
    if backend == "triton" and rope != "interleaved":
        pytest.skip("Triton interpreter: one configuration (time)")
    torch.library.opcheck(FWD.default, _op_args(backend, rope, fc))
    q, k, v, cos, sin, *rest = _op_args(backend, rope, fc, grad=False)
    out, lse = FWD(q, k, v, cos, sin, *rest)
    dout = torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(BWD.default, (dout, q, k, v, cos, sin, out, lse, *rest))


_COPY_OPS = ("clone", "copy", "contiguous", "_to_copy")


@pytest.mark.triton
@pytest.mark.parametrize("rope", [False, True])
def test_triton_reads_strided_inputs_in_place(rope):
    """Non-contiguous q/k/v/dout reach the Triton kernels as they are: no copy op is dispatched
    around or inside the custom ops (the interpreter's own host copies are left out)."""
    if why_unavailable("triton", "cpu"):
        pytest.skip(why_unavailable("triton", "cpu"))
    from torch.utils._python_dispatch import TorchDispatchMode
    g = torch.Generator().manual_seed(0)
    B, S, H, D = 1, 20, 2, 16
    q = torch.randn(B, S, 3, H, D, generator=g)[:, :, 0].requires_grad_()
    k = torch.randn(B, H, S, D, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, D, H, generator=g).transpose(-1, -2).requires_grad_()
    dout = torch.randn(B, H, S, D, generator=g).transpose(1, 2)
    tabs = ()
    if rope:
        ang = torch.randn(16, D // 2, generator=g)
        tabs = (ang.cos(), ang.sin())
    inner = {FWD.default: getattr(ra._rope3d_attn_fwd, "_init_fn", None),
             BWD.default: getattr(ra._rope3d_attn_bwd, "_init_fn", None)}
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if not (any(c in name for c in _COPY_OPS) and any(
                    "triton/runtime/interpreter" in f.filename.replace("\\", "/")
                    for f in traceback.extract_stack())):
                seen.append(name)
            if inner.get(func) is not None:
                with Record():
                    return inner[func](*args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Record():
        out = vk.rope3d_attention(q, k, v, *tabs, rope_offset=4 if rope else 0, backend="triton")
        torch.autograd.grad(out, (q, k, v), dout)
    assert any("rope3d_attn_fwd" in s for s in seen) and any("rope3d_attn_bwd" in s for s in seen)
    copies = [s for s in seen if any(c in s for c in _COPY_OPS)]
    assert not copies, copies


def _compile_backends():
    out = [pytest.param("reference"), pytest.param("auto-without-kernels")]
    for b in ("cpu", "triton"):
        why = kernel_missing(b)
        out.append(pytest.param(b, marks=[pytest.mark.skip(reason=why)] if why else []))
    return out


@pytest.mark.parametrize("frame_causal", [False, True])
def test_sdpa_fallback_double_backward(monkeypatch, frame_causal):
    """The no-kernel fallback (rotation + SDPA) is differentiable twice: a gradient penalty
    (``create_graph=True``) gets the reference's gradients (SDPA's fused backward has no
    derivative: this raised before), through ``auto`` without kernels and through
    ``rope3d_attention_sdpa``; an ordinary backward is still SDPA's own, bit for bit (with
    ``frame_causal``: one SDPA call per frame block)."""
    calls = []
    backend = _no_kernels("auto-without-kernels", monkeypatch, calls)
    g = torch.Generator().manual_seed(5)
    B, pre, grid, H, D = 1, 3, (2, 2, 3), 2, 16
    cos, sin = vk.rope3d_freqs(*grid, D)
    S = pre + cos.shape[0]
    base = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]
    w = torch.randn(B, S, H, D, generator=g)
    kw = dict(rope_offset=pre, frame_causal=frame_causal,
              tokens_per_frame=grid[1] * grid[2] if frame_causal else None)
    fns = {"auto": lambda *a: vk.rope3d_attention(*a, cos, sin, backend=backend, **kw),
           "sdpa": lambda *a: vk.rope3d_attention_sdpa(*a, cos, sin, **kw),
           "reference": lambda *a: vk.rope3d_attention(*a, cos, sin, backend="reference", **kw)}
    res = {}
    for name, f in fns.items():
        qkv = [t.clone().requires_grad_() for t in base]
        grads = torch.autograd.grad((f(*qkv) * w).sum(), qkv, create_graph=True)
        res[name] = torch.autograd.grad(sum(gr.square().sum() for gr in grads), qkv)
    assert calls, "auto did not take the rotation + SDPA fallback"
    for name in ("auto", "sdpa"):
        for got, want in zip(res[name], res["reference"]):
            assert want.abs().max() > 1e-3
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # an ordinary backward: SDPA's fused backward on the rotated q / k; a second one through the
    # retained graph (SDPA's inner graph is released after the first: it is recomputed)
    qkv = [t.clone().requires_grad_() for t in base]
    loss = (fns["sdpa"](*qkv) * w).sum()
    got = torch.autograd.grad(loss, qkv, retain_graph=True)
    for a, b in zip(torch.autograd.grad(loss, qkv), got):
        assert torch.equal(a, b)
    qkv2 = [t.clone().requires_grad_() for t in base]
    qh, kh, vh = (t.transpose(1, 2) for t in (*(vk.apply_rope(t, cos, sin, offset=pre)
                                                 for t in qkv2[:2]), qkv2[2]))
    # frame-causal: one SDPA call per block of queries over the keys they may see (the text
    # queries: the text keys; frame f: the text and frames 0 .. f)
    tpf = grid[1] * grid[2]
    calls = ([(0, pre, pre)] + [(a, a + tpf, a + tpf) for a in range(pre, S, tpf)]
             if frame_causal else [(0, S, S)])
    out = torch.cat([F.scaled_dot_product_attention(qh[:, :, a:b], kh[:, :, :n], vh[:, :, :n])
                     for a, b, n in calls], dim=2).transpose(1, 2)
    want = torch.autograd.grad((out * w).sum(), qkv2)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _no_kernels(backend, monkeypatch, calls):
    """``auto-without-kernels``: no kernel runs (no compiled extension), so ``auto`` runs rotation
    + SDPA, whose calls go to ``calls``; returns the backend name to pass."""
    if backend != "auto-without-kernels":
        return backend
    monkeypatch.setattr(vk._ext, "has_cpu", lambda: False)
    real = ra._rotate_sdpa
    monkeypatch.setattr(ra, "_rotate_sdpa", lambda *a: calls.append(1) or real(*a))
    return "auto"


@pytest.mark.parametrize("backend", _compile_backends())
def test_compile_fullgraph_matches_eager(backend, monkeypatch):
    calls = []
    backend = _no_kernels(backend, monkeypatch, calls)
    torch.manual_seed(0)
    C, H, pre, grid = 64, 2, 3, (2, 2, 3)
    L = grid[0] * grid[1] * grid[2]
    m = vk.nn.RoPE3DAttention(C, H, qk_norm="rms", backend=backend)
    cos_f, sin_f = rope3d_tables_f64(grid, C // H, 10000.0, True)
    cos, sin = cos_f.float(), sin_f.float()
    x = torch.randn(2, pre + L, C, requires_grad=True)

    def f(x):
        return m(x, cos, sin, rope_offset=pre, frame_causal=True, tokens_per_frame=6)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager = f(x)
    ge = torch.autograd.grad(eager.square().sum(), [x, m.qkv.weight])
    comp = compiled(x)
    gc = torch.autograd.grad(comp.square().sum(), [x, m.qkv.weight])
    assert bool(calls) == (backend == "auto")  # (eager, then traced)
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _table_grads(backend, device, dtype, tdtype, leaves, interleaved, fc, full, create_graph=False,
                 wrap=None):
    """Gradients (q, cos, sin) of ``<dout, attn(q, k, v, cos, sin)>`` with the tables as leaves
    that require grad (``full``: diffusers' ``[L, D]`` repeated layout)."""
    q64, k64, v64, ang, dout = leaves
    cos, sin = scaled_tables(ang)
    if full:
        cos, sin = repeat_table(cos, interleaved), repeat_table(sin, interleaved)
    cos, sin = (t.to(device, tdtype).requires_grad_() for t in (cos, sin))
    q = q64.to(device, dtype).requires_grad_()
    k, v = k64.to(device, dtype), v64.to(device, dtype)

    def f(q, k, v, cos, sin):
        return attn(q, k, v, backend, cos, sin, rope_offset=3, interleaved=interleaved,
                    frame_causal=fc, tokens_per_frame=2 if fc else None)
    out = (wrap(f) if wrap else f)(q, k, v, cos, sin)
    return torch.autograd.grad(out, (q, cos, sin), dout.to(device, dtype),
                               create_graph=create_graph)


def _table_leaves(S=15, L=10, H=2, D=16):
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, S, H, D, generator=g, dtype=torch.float64) for _ in range(4))
    return q, k, v, torch.randn(L, D // 2, generator=g, dtype=torch.float64) * 3, dout


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
@pytest.mark.parametrize("interleaved,fc,full", [(True, False, False), (False, True, True)],
                         ids=["interleaved", "half-frame_causal-full_table"])
@pytest.mark.parametrize("backend,device,dtype",
                         kernel_params((torch.float32, torch.float16)) + sdpa_params())
def test_table_gradients_match_reference(backend, device, dtype, interleaved, fc, full,
                                         create_graph):
    """cos / sin that require grad get the reference's gradient on every backend (the kernel
    backends used to return None for them without a word; then, for tables that are not a pure
    rotation, ``cos^2 + sin^2`` times it), in both table layouts, also under
    ``create_graph=True``."""
    leaves = _table_leaves()
    hi = _table_grads("reference", device, torch.float64, torch.float64, leaves, interleaved, fc,
                      full)
    lo = _table_grads("reference", device, dtype, torch.float32, leaves, interleaved, fc, full)
    got = _table_grads(backend, device, dtype, torch.float32, leaves, interleaved, fc, full,
                       create_graph)
    assert got[1].abs().max() > 0.1  # the test's tables do matter
    for name, a, h, l_ in zip(("q", "cos", "sin"), got, hi, lo):
        assert_close_rule(a.cpu(), h.cpu(), l_.cpu(), f"grad {name}")


@pytest.mark.parametrize("backend", _compile_backends()[1:])
def test_table_gradients_compiled(backend, monkeypatch):
    """The custom op's registered autograd (the path torch.compile takes) gives the tables their
    gradient too; so does rotation + SDPA compiled."""
    calls = []
    backend = _no_kernels(backend, monkeypatch, calls)
    leaves = _table_leaves(S=9, L=6, D=8)
    torch._dynamo.reset()
    compile_ = lambda f: torch.compile(f, fullgraph=True)  # noqa: E731
    got = _table_grads(backend, "cpu", torch.float32, torch.float32, leaves, True, True, False,
                       wrap=compile_)
    want = _table_grads("reference", "cpu", torch.float64, torch.float64, leaves, True, True, False)
    assert bool(calls) == (backend == "auto")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# nn.RoPE3DAttention
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qk_norm", [None, "layer", "rms"])
@pytest.mark.parametrize("backend,device,dtype", kernel_params((torch.float32,), oracle=False))
def test_module_matches_reference(backend, device, dtype, qk_norm):
    if interp(backend, device) and qk_norm == "layer":
        pytest.skip("Triton interpreter: two norms (time)")
    torch.manual_seed(0)
    C, H, pre, grid = 64, 2, 5, (2, 3, 3)
    L = grid[0] * grid[1] * grid[2]
    ref = vk.nn.RoPE3DAttention(C, H, qk_norm=qk_norm, backend="reference").to(device)
    mod = vk.nn.RoPE3DAttention(C, H, qk_norm=qk_norm, backend=backend).to(device)
    mod.load_state_dict(ref.state_dict())
    cos_f, sin_f = rope3d_tables_f64(grid, C // H, 10000.0, True)
    x = torch.randn(2, pre + L, C, device=device)
    cos, sin = cos_f.float().to(device), sin_f.float().to(device)  # (built on the CPU)
    for kw in (dict(), dict(frame_causal=True, tokens_per_frame=9)):
        xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        want = ref(xr, cos, sin, rope_offset=pre, **kw)
        got = mod(xm, cos, sin, rope_offset=pre, **kw)
        assert got.shape == (2, pre + L, C)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        (gr,) = torch.autograd.grad(want.square().sum(), xr)
        (gm,) = torch.autograd.grad(got.square().sum(), xm)
        torch.testing.assert_close(gm, gr, rtol=1e-4, atol=1e-5)


def test_module_parameters_and_errors():
    m = vk.nn.RoPE3DAttention(64, 4, qk_norm="layer")
    names = {n for n, _ in m.named_parameters()}
    assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "norm_q.weight",
            "norm_k.weight"} <= names
    assert m.head_dim == 16 and "num_heads=4" in repr(m)
    x = torch.randn(1, 10, 64)
    assert m(x).shape == (1, 10, 64)  # plain attention without tables
    with pytest.raises(ValueError, match="multiple of num_heads"):
        vk.nn.RoPE3DAttention(30, 4)
    with pytest.raises(ValueError, match="even head_dim"):
        vk.nn.RoPE3DAttention(12, 4)
    with pytest.raises(ValueError, match="qk_norm"):
        vk.nn.RoPE3DAttention(16, 2, qk_norm="batch")
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 10, 32))


@pytest.mark.parametrize("x,exc,match", [
    ([[1.0] * 64] * 10, TypeError, "RoPE3DAttention: x must be a torch.Tensor, got list"),
    (torch.ones(1, 10, 64, dtype=torch.int32), TypeError,
     "RoPE3DAttention: x must be a floating tensor, got dtype torch.int32"),
    (torch.randn(10, 64), ValueError, "x must be \\[B, S, C=64\\], got shape \\(10, 64\\)"),
    (torch.randn(1, 10, 32), ValueError, "x must be \\[B, S, C=64\\], got shape \\(1, 10, 32\\)"),
    (torch.randn(1, 10, 64, dtype=torch.float64), TypeError,
     "RoPE3DAttention: x has dtype torch.float64 but the module's parameters are torch.float32"),
    (torch.randn(1, 10, 64, dtype=torch.float16), TypeError,
     "x has dtype torch.float16 but the module's parameters are torch.float32"),
], ids=["list", "int", "2-D", "channels", "float64", "float16"])
def test_module_bad_x_raises_clear_error(x, exc, match):
    """x that is not a floating [B, S, C] tensor of the module's dtype: a TypeError /
    ValueError naming x at the top of forward (a list gave AttributeError "'list' object has no
    attribute 'dim'", a float64 or int x torch's "mat1 and mat2 must have the same dtype")."""
    m = vk.nn.RoPE3DAttention(64, 4, qk_norm="rms", backend="reference")
    with pytest.raises(exc, match=match):
        m(x)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_module_autocast_allows_mixed_dtypes(x_dtype):
    """Under torch.autocast for x's device an x whose dtype differs from the (fp32) parameters
    is legal (the projections run in the autocast dtype): no dtype error, a bf16 output close to
    the fp32 one, fp32 parameter gradients; outside autocast the mix is a TypeError again."""
    torch.manual_seed(0)
    m = vk.nn.RoPE3DAttention(64, 4, qk_norm="rms")
    cos, sin = vk.rope3d_freqs(2, 2, 2, 16)
    x = torch.randn(2, 3 + 8, 64)
    want = m(x, cos, sin, rope_offset=3)
    xa = x.to(x_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(xa, cos, sin, rope_offset=3)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
    got.float().sum().backward()
    assert m.qkv.weight.grad.dtype == torch.float32 and xa.grad.dtype == x_dtype
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16"):
        m(x.bfloat16(), cos, sin, rope_offset=3)


@pytest.mark.parametrize("backend,device,dtype", semantic_params())
def test_empty_batch(backend, device, dtype):
    q = torch.randn(0, 6, 2, 16, device=device, dtype=dtype, requires_grad=True)
    ang = torch.randn(4, 8, device=device)
    out = attn(q, q, q, backend, ang.cos(), ang.sin(), rope_offset=2, frame_causal=True,
               tokens_per_frame=2)
    assert out.shape == q.shape
    (g,) = torch.autograd.grad(out.sum(), q)
    assert g.shape == q.shape


@pytest.mark.parametrize("backend", ["cpu", "reference", "sdpa"])
def test_autocast_casts_qkv_like_sdpa(backend):
    """Under ``torch.autocast`` (bf16 on CPU), q, k, v are cast to the autocast dtype first, as
    autocast does for SDPA, and the op runs with autocast off: q / k from an fp32 norm with v
    from a bf16 projection (diffusers' CogVideoX under CUDA autocast: its nn.LayerNorm QK norms
    output fp32) give exactly the call on bf16 operands, and q / k get fp32 gradients. Outside
    autocast the mix stays a TypeError."""
    if backend == "cpu" and kernel_missing(backend):
        pytest.skip(kernel_missing(backend))
    g = torch.Generator().manual_seed(0)
    B, S, H, D, text = 1, 4 + 2 * 3 * 4, 2, 16, 4
    q, k = (torch.randn(B, S, H, D, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(B, S, H, D, generator=g).bfloat16().requires_grad_()
    cos, sin = vk.rope3d_freqs(2, 3, 4, D)
    assert_autocast_casts_qkv(lambda q_, k_, v_, **kw_: attn(q_, k_, v_, backend, cos, sin, **kw_),
                              q, k, v, rope_offset=text)


def test_float64_inputs_keep_float64_tables():
    """fp64 q / k / v with fp64 tables compute in fp64 throughout, as the docs say (the tables
    were rounded to fp32: ~1e-7 relative error, about 1e9 fp64 ulps, e.g. in a patched fp64 Wan
    model); temporal_attention likewise."""
    from vidgen_kernels.ops.rope import rotate
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    ang = torch.rand(20, 8, generator=g, dtype=torch.float64) * 50
    c, s = ang.cos(), ang.sin()
    heads = lambda t: t.transpose(1, 2)  # noqa: E731
    want = F.scaled_dot_product_attention(rotate(heads(q), c, s, True), rotate(heads(k), c, s, True),
                                          heads(v)).transpose(1, 2)
    torch.testing.assert_close(vk.rope3d_attention(q, k, v, c, s), want, rtol=1e-12, atol=1e-12)
    q5, k5, v5 = (torch.randn(1, 6, 3, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    per_seq = lambda t: t.permute(0, 2, 3, 1, 4)  # noqa: E731  [B, S, H, T, D]
    want = F.scaled_dot_product_attention(rotate(per_seq(q5), c[:6], s[:6], True),
                                          rotate(per_seq(k5), c[:6], s[:6], True), per_seq(v5),
                                          is_causal=True).permute(0, 3, 1, 2, 4)
    torch.testing.assert_close(vk.temporal_attention(q5, k5, v5, cos=c[:6], sin=s[:6]), want,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_low_precision_dq_with_keys_sharing_a_large_component(dtype):
    """Keys ``k = 300 u + noise`` (a common component, which the softmax ignores): the cpu
    backward's fp16 / bf16 dq within 2x the reference's error vs float64. With FlashAttention-2's
    delta = <dout, out> of the rounded out, the rounding came back in dq times the common
    component (fp16: 60x the reference's error; bf16: half of max |dq|); it now takes delta =
    sum_j p dp over the row its block holds, with p renormalised."""
    why = kernel_missing("cpu")
    if why:
        pytest.skip(why)
    g = torch.Generator().manual_seed(0)
    S, H, D = 64, 2, 64
    u = torch.randn(D, generator=g)
    q, v, dout = (torch.randn(1, S, H, D, generator=g).to(dtype) for _ in range(3))
    k = (300 * u + torch.randn(1, S, H, D, generator=g)).to(dtype)
    q64 = q.double().requires_grad_()
    vk.rope3d_attention(q64, k.double(), v.double(), backend="reference").backward(dout.double())
    errs = []
    for name in ("cpu", "reference"):
        qq = q.clone().requires_grad_()
        vk.rope3d_attention(qq, k, v, backend=name).backward(dout)
        errs.append((qq.grad.double() - q64.grad).abs().max().item())
    assert errs[0] <= 2 * errs[1], errs
