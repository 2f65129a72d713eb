"""Fused AdaLN modulation: every backend against the PyTorch reference, forward and backward.

Each case builds its inputs from float64 leaves; the kernel runs in the tested dtype and is
compared with the reference in float64 (``ref_hi``) under flash-attention's rule, using the
reference run in the tested dtype (``ref_lo``) as the yardstick.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

import vidgen_kernels as vk
from helpers import assert_close_rule, backend_params


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    N: int
    C: int
    shift: str = "chunk"  # chunk ([B,1,C] view of mod.chunk), BC, 1C, C, F<k>, BNC, 1NC
    scale: str = "chunk"
    gate: str = "chunk"
    gated: bool = False
    affine: bool = False
    norm: str = "layer"
    x_layout: str = "contig"  # contig, T (last stride != 1), S (every other channel)
    param_f32: bool = False  # fp32 modulation params with a low-precision x (Wan style)
    big: bool = False  # too large for the Triton interpreter

    def __str__(self):
        return "-".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items()
                        if v != Case.__dataclass_fields__[k].default or k in "BNC")


CASES = [
    Case(2, 12, 7),
    Case(2, 12, 7, gated=True, affine=True),
    Case(1, 1, 1, shift="BC", scale="BC", gate="BC", gated=True, affine=True),
    Case(1, 5, 1, norm="rms", affine=True),
    Case(2, 15, 33, shift="F5", scale="F3", gate="F15", gated=True, norm="rms"),
    Case(3, 16, 24, shift="BNC", scale="F4", gate="1C", gated=True, affine=True),
    Case(2, 9, 20, shift="1NC", scale="C", gate="1NC", gated=True),
    Case(2, 10, 40, shift="F2", scale="F2", gate="F2", gated=True, affine=True, x_layout="T"),
    Case(2, 8, 31, shift="BC", scale="chunk", x_layout="S", affine=True, norm="rms"),
    Case(2, 6, 100, gated=True, affine=True, param_f32=True),
    Case(2, 4, 1000, gated=True, affine=True),
    Case(2, 3, 1000, shift="BNC", scale="BNC", gate="BNC", gated=True, norm="rms", x_layout="T"),
    Case(1, 3, 3072, gated=True, affine=True, big=True),
    Case(2, 37, 128, shift="F37", scale="1C", gate="F1", gated=True, norm="rms", big=True),
    Case(2, 300, 64, shift="F3", scale="F4", gate="F5", gated=True, affine=True, big=True),
]


def _param_leaf(form: str, B: int, N: int, C: int, gen):
    if form == "BC":
        return torch.randn(B, C, generator=gen, dtype=torch.float64)
    if form == "1C":
        return torch.randn(1, C, generator=gen, dtype=torch.float64)
    if form == "C":
        return torch.randn(C, generator=gen, dtype=torch.float64)
    if form == "BNC":
        return torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    if form == "1NC":
        return torch.randn(1, N, C, generator=gen, dtype=torch.float64)
    if form.startswith("F"):
        return torch.randn(B, int(form[1:]), C, generator=gen, dtype=torch.float64)
    raise AssertionError(form)


def make_leaves(case: Case, seed=0):
    """float64 leaves: x, y, mod (the [B, 6C] projection chunks come from), params, affine."""
    gen = torch.Generator().manual_seed(seed)
    B, N, C = case.B, case.N, case.C
    lv = {
        "x": torch.randn(B, N, C, generator=gen, dtype=torch.float64) * 2 + 0.5,
        "y": torch.randn(B, N, C, generator=gen, dtype=torch.float64),
        "mod": torch.randn(B, 6 * C, generator=gen, dtype=torch.float64) * 0.5,
    }
    for name in ("shift", "scale", "gate"):
        form = getattr(case, name)
        if form != "chunk":
            lv[name] = _param_leaf(form, B, N, C, gen) * 0.5
    if case.affine:
        lv["weight"] = 1 + 0.3 * torch.randn(C, generator=gen, dtype=torch.float64)
        lv["bias"] = 0.3 * torch.randn(C, generator=gen, dtype=torch.float64)
    return lv


def cast_leaves(lv, dtype, device, case: Case):
    out = {}
    for k, v in lv.items():
        dt = dtype
        if case.param_f32 and k in ("mod", "shift", "scale", "gate") and dtype != torch.float64:
            dt = torch.float32
        out[k] = v.to(device=device, dtype=dt).requires_grad_()
    return out


def _layout(t, how):
    """Same values as ``t`` [B, N, C] in a non-contiguous layout (gradients flow to ``t``)."""
    if how == "contig":
        return t
    if how == "T":  # [B, C, N] storage, viewed [B, N, C]: last-dim stride N
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "S":  # every other channel of a [B, N, 2C] buffer: last-dim stride 2
        B, N, C = t.shape
        return torch.stack([t, torch.zeros_like(t)], -1).view(B, N, 2 * C)[..., ::2]
    raise AssertionError(how)


def build_args(lv, case: Case):
    chunks = lv["mod"].chunk(6, dim=-1)
    p = {}
    for i, name in enumerate(("shift", "scale", "gate")):
        p[name] = chunks[i].unsqueeze(1) if getattr(case, name) == "chunk" else lv[name]
    x = _layout(lv["x"], case.x_layout)
    y = _layout(lv["y"], case.x_layout)
    kw = {"weight": lv.get("weight"), "bias": lv.get("bias"), "norm": case.norm, "eps": 1e-5}
    return x, y, p, kw


def run(lv, case: Case, backend):
    x, y, p, kw = build_args(lv, case)
    if case.gated:
        return vk.gated_residual_adaln(x, y, p["gate"], p["shift"], p["scale"], backend=backend, **kw)
    return (vk.adaln_modulate(x, p["shift"], p["scale"], backend=backend, **kw),)


def fwd_bwd(lv, case, backend, cot_seed=1):
    outs = run(lv, case, backend)
    gen = torch.Generator().manual_seed(cot_seed)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    leaves = [v for v in lv.values()]
    grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True)
    return outs, dict(zip(lv.keys(), grads))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend,device,dtype", backend_params())
def test_matches_reference(backend, device, dtype, case):
    if case.big and backend == "triton" and device == "cpu":
        pytest.skip("too large for the Triton interpreter")
    lv = make_leaves(case)
    hi_outs, hi_grads = fwd_bwd(cast_leaves(lv, torch.float64, device, case), case, "reference")
    lo_outs, lo_grads = fwd_bwd(cast_leaves(lv, dtype, device, case), case, "reference")
    k_outs, k_grads = fwd_bwd(cast_leaves(lv, dtype, device, case), case, backend)
    names = ["h", "out"] if case.gated else ["out"]
    for n, got, hi, lo in zip(names, k_outs, hi_outs, lo_outs):
        assert got.is_contiguous()
        assert_close_rule(got, hi, lo, f"forward {n}")
    for k in lv:
        if hi_grads[k] is None:
            assert k_grads[k] is None or not k_grads[k].abs().sum(), f"grad {k}"
            continue
        assert k_grads[k] is not None, f"no gradient for {k}"
        assert_close_rule(k_grads[k], hi_grads[k], lo_grads[k], f"grad {k}")


@pytest.mark.parametrize("backend,device,dtype", backend_params((torch.float32,)))
def test_partial_grads_only(backend, device, dtype):
    """Only some inputs require grad: the others get None and the rest is still right."""
    case = Case(2, 12, 9, shift="BC", scale="F3", gate="F4", gated=True, affine=True)
    lv = make_leaves(case)
    ref = cast_leaves(lv, dtype, device, case)
    got = cast_leaves(lv, dtype, device, case)
    for d in (ref, got):
        for k in ("x", "shift", "weight", "mod"):  # mod: unused by this case
            d[k].requires_grad_(False)
    r_outs = run(ref, case, "reference")
    k_outs = run(got, case, backend)
    want = [k for k in lv if ref[k].requires_grad]
    gr = torch.autograd.grad(r_outs[1].sum(), [ref[k] for k in want])
    gk = torch.autograd.grad(k_outs[1].sum(), [got[k] for k in want])
    for k, a, b in zip(want, gr, gk):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"grad {k}")



@pytest.mark.parametrize("backend,device,dtype", backend_params((torch.float32,)))
def test_gated_loss_on_h_only_leaves_modulation_grads_none(backend, device, dtype):
    """``gated_residual_adaln`` with a loss on ``h = x + gate * y`` only: x, y and gate get
    their gradients, shift / scale / weight / bias get None as on the reference, where the
    kernels gave zero tensors (AdamW then decays and moves a parameter the loss never
    reached); and ``h`` does not require grad when none of x, y, gate does. (Eager: a compiled
    graph's backward gets a zero tangent for every output, on the reference too.)"""
    g = torch.Generator().manual_seed(0)
    B, N, C = 2, 4, 5
    base = [torch.randn(s, generator=g) for s in ((B, N, C), (B, N, C), (B, C), (B, C), (B, C),
                                                  (C,), (C,))]
    fn = vk.gated_residual_adaln
    x, y, gate, shift, scale, w, b = [t.to(device, dtype).clone().requires_grad_() for t in base]
    h, out = fn(x, y, gate, shift, scale, weight=w, bias=b, backend=backend)
    h.sum().backward()
    assert all(t.grad is None for t in (shift, scale, w, b))
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    torch.testing.assert_close(gate.grad, y.detach().sum(1))
    plain = [t.to(device, dtype).clone() for t in base]
    h, out = fn(*plain[:3], plain[3].requires_grad_(), plain[4], backend=backend)
    assert not h.requires_grad and out.requires_grad

@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_gradcheck_cpu_float64(norm):
    if "cpu" not in vk.available_backends("cpu"):
        pytest.skip("cpu backend not built")
    case = Case(2, 6, 5, shift="F3", scale="BC", gate="F2", gated=True, affine=True, norm=norm)
    lv = make_leaves(case)
    keys = list(lv)

    def f(*vals):
        return run(dict(zip(keys, vals)), case, "cpu")

    vals = [v.clone().requires_grad_() for v in lv.values()]
    assert torch.autograd.gradcheck(f, vals, eps=1e-6, atol=1e-4, rtol=1e-3)


def test_backward_chunks_follow_the_current_thread_count():
    """The CPU backward's chunking follows torch.get_num_threads() at each call (it was cached
    at the first backward: after a first call with 1 thread, 8 threads got 4 tasks)."""
    from vidgen_kernels.ops import adaln as A
    dev = torch.device("cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = A._rows_per_chunk(4, 4096, dev, [])
        torch.set_num_threads(4)
        four = A._rows_per_chunk(4, 4096, dev, [])
    finally:
        torch.set_num_threads(before)
    assert (one, four) == (4096, 1024)

@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_op_plumbing_large_chunks(backend):
    """The custom ops with the PyTorch contract oracle (``torch``) and the C++ kernel, where the
    backward's chunks straddle parameter rows (N/F not a multiple of rows_per_chunk)."""
    if backend == "cpu" and "cpu" not in vk.available_backends("cpu"):
        pytest.skip("cpu backend not built")
    B, N, C = 2, 601, 9
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(B, N, C, generator=g).requires_grad_() for _ in range(2))
    gate = torch.randn(B, 1, C, generator=g).requires_grad_()
    shift = torch.randn(1, 1, C, generator=g).requires_grad_()
    scale = torch.randn(B, N, C, generator=g).requires_grad_()
    w, b = torch.randn(C, generator=g).requires_grad_(), torch.randn(C, generator=g).requires_grad_()
    ins = [x, y, gate, shift, scale, w, b]
    out, h, mean, rstd = torch.ops.vidgen_kernels.adaln_fwd(x, y, gate, shift, scale, w, b, 1e-6, False, backend)
    hr, outr = vk.gated_residual_adaln_reference(x, y, gate, shift, scale, weight=w, bias=b)
    torch.testing.assert_close(out, outr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, hr)
    gk = torch.autograd.grad((out * outr.detach().cos()).sum() + h.sum(), ins)
    gr = torch.autograd.grad((outr * outr.detach().cos()).sum() + hr.sum(), ins)
    for a, r in zip(gk, gr):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_strided_params_are_read_in_place():
    """The chunk views of the modulation go to the kernel as they are: no copy op is dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if "cpu" not in vk.available_backends("cpu"):
        pytest.skip("cpu backend not built")
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    B, N, C = 2, 8, 16
    x = torch.randn(B, C, N).transpose(1, 2)  # non-contiguous
    y = torch.randn(B, N, C)
    mod = torch.randn(B, 6 * C)
    shift, scale, gate = mod.chunk(6, -1)[:3]
    with Record():
        vk.gated_residual_adaln(x, y, gate, shift, scale, backend="cpu")
    copies = [s for s in seen if any(k in s for k in ("clone", "copy", "contiguous", "_to_copy"))]
    assert not copies, copies
    assert any("adaln_fwd" in s for s in seen), seen


@pytest.mark.parametrize("C", [64, 1152, 4097])
@pytest.mark.parametrize("backend,device,dtype", backend_params((torch.float32,)))
def test_constant_rows_normalise_to_zero(backend, device, dtype, C):
    """A LayerNorm row of one value v normalises to exactly 0 (out = bias * (1 + scale) +
    shift), as in the reference, and its gradients pass the flash rule against the float64
    reference (the fp32 reference's weight gradient is itself off there): the kernels' mean,
    a few ulp off v after the first pass, came back amplified by 1 / sqrt(eps) (cpu: 0.03 ..
    0.1 at C = 1152 .. 4097 with |v| ~ 30, Triton 0.004 .. 0.02; the CUDA kernel likewise)
    until the second pass's sum of deviations corrected it."""
    g = torch.Generator().manual_seed(C)
    B, N = 3, 5
    v = torch.randn(B, N, 1, generator=g) * 30
    x = v.expand(B, N, C).contiguous().to(device)
    y = torch.randn(B, N, C, generator=g).to(device)
    shift, scale, w, b = (torch.randn(*s, generator=g).to(device) for s in
                          ((B, C), (B, C), (C,), (C,)))
    gate = torch.zeros(B, C, device=device)  # h = x: the gated kernel's statistics too
    leaves = [t.clone().requires_grad_() for t in (x, y, gate, shift, scale, w, b)]

    def run(bk, x, y, gate, shift, scale, w, b):
        return (vk.adaln_modulate(x, shift, scale, weight=w, bias=b, eps=1e-6, backend=bk),
                *vk.gated_residual_adaln(x, y, gate, shift, scale, weight=w, bias=b, eps=1e-6,
                                         backend=bk))

    got = run(backend, *leaves)
    want_out = (b * (1 + scale[:, None]) + shift[:, None]).expand(B, N, C)
    for out in (got[0], got[2]):
        torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-5)
    cots = [torch.randn(t.shape, generator=g).to(device) for t in got]
    grads = {}
    for dt in (torch.float64, torch.float32):
        ref_leaves = [t.detach().to(dt).requires_grad_() for t in leaves]
        grads[dt] = torch.autograd.grad(run("reference", *ref_leaves), ref_leaves,
                                        [c.to(dt) for c in cots])
    for name, a, hi, lo in zip("x y gate shift scale w b".split(),
                               torch.autograd.grad(got, leaves, cots), *grads.values()):
        assert_close_rule(a, hi, lo, f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_per_frame_gate_with_broadcast_x_and_transposed_y(backend):
    """A per-frame gate ``[B, F, C]`` (1 < F < N) with x expanded along N (stride 0) and y
    transposed: the eager formula's result, forward and backward (the reference's per-frame
    reshape back to ``[B, N, C]`` raised "view size is not compatible" here, also on auto's
    reference fallbacks such as ``torch.func.grad``)."""
    if backend not in vk.available_backends("cpu"):
        pytest.skip(f"{backend} backend not built")
    g = torch.Generator().manual_seed(3)
    B, N, C, F = 2, 8, 16, 4
    x0 = torch.randn(B, 1, C, generator=g, dtype=torch.float64)
    y0 = torch.randn(B, C, N, generator=g, dtype=torch.float64)
    gate, shift, scale = (torch.randn(B, k, C, generator=g, dtype=torch.float64)
                          for k in (F, 1, 1))
    leaves = [t.float().requires_grad_() for t in (x0, y0, gate)]

    def call(x0, y0, gate, fn):
        return fn(x0.expand(B, N, C), y0.transpose(1, 2), gate, shift.to(x0), scale.to(x0))

    def eager(x, y, gate, shift, scale):
        h = x + (gate[:, :, None] * y.reshape(B, F, N // F, C)).reshape(B, N, C)
        return h, torch.nn.functional.layer_norm(h, (C,), eps=1e-6) * (1 + scale) + shift

    got = call(*leaves, lambda *a: vk.gated_residual_adaln(*a, backend=backend))
    hi = [t.detach().double().requires_grad_() for t in leaves]
    want = call(*hi, eager)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(got, leaves, [c.float() for c in cot])
    gw = torch.autograd.grad(want, hi, cot)
    for a, b in zip(ga, gw):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# backend registry
# ----------------------------------------------------------------------------------------------
def test_available_backends_and_auto(monkeypatch):
    avail = vk.available_backends()
    assert "reference" in avail
    assert set(avail) <= set(vk.BACKENDS)
    monkeypatch.delenv("VIDGEN_KERNELS_BACKEND", raising=False)
    x = torch.randn(1, 4, 8)
    s = torch.randn(1, 8)
    want = "cpu" if "cpu" in vk.available_backends("cpu") else "reference"
    from vidgen_kernels.ops.adaln import _resolve
    assert _resolve(x, None, "t") == want
    assert _resolve(x.double(), None, "t") == want  # cpu takes float64 too
    with vk.use_backend("reference"):
        assert vk.current_backend() == "reference"
        assert _resolve(x, None, "t") == "reference"
        with vk.use_backend("auto"):
            assert _resolve(x, None, "t") == want
        assert _resolve(x, "auto", "t") == want  # per-call beats the context
    monkeypatch.setenv("VIDGEN_KERNELS_BACKEND", "reference")
    assert vk.current_backend() == "reference"
    assert _resolve(x, None, "t") == "reference"
    torch.testing.assert_close(vk.adaln_modulate(x, s, s), vk.adaln_modulate(x, s, s, backend="reference"))
    monkeypatch.setenv("VIDGEN_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VIDGEN_KERNELS_BACKEND"):
        vk.adaln_modulate(x, s, s)


def test_unavailable_backend_says_why():
    x, s = torch.randn(1, 4, 8), torch.randn(1, 8)
    with pytest.raises(vk.BackendUnavailableError, match="cuda.*(not built|without CUDA|no CUDA GPU|CUDA tensors)"):
        vk.adaln_modulate(x, s, s, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        vk.adaln_modulate(x, s, s, backend="tpu")
    with pytest.raises(ValueError, match="use_backend"):
        with vk.use_backend("nope"):
            pass


def test_backend_names_have_one_check_and_one_message():
    """Ops, use_backend, modules and model configs all reject a bad name with the same words."""
    from vidgen import models
    x, s = torch.randn(1, 4, 8), torch.randn(1, 8)
    tail = re.escape(f"one of {vk.backends.CHOICES}, got 'tpu'")
    cases = [
        (lambda: vk.adaln_modulate(x, s, s, backend="tpu"), r"adaln_modulate\(backend=\) must be " + tail),
        (lambda: vk.use_backend("tpu").__enter__(), r"use_backend\(name\) must be " + tail),
        (lambda: vk.nn.MoEFFN(8, 16, 4, backend="tpu"), "MoEFFN: backend must be None or " + tail),
        (lambda: models.VideoCausalDiT(models.VideoCausalDiTConfig(backend="tpu")),
         "^backend must be None or " + tail),
        (lambda: vk.backends.why_unavailable("tpu"), r"why_unavailable\(name\) must be " + tail),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()
    assert vk.backends.why_unavailable("auto") is None  # auto always runs (reference fallback)
    assert vk.backends.check_backend_name(None, allow_none=True) is None
    with pytest.raises(ValueError, match="backend must be one of"):
        vk.backends.check_backend_name(None)


@pytest.mark.triton
def test_triton_dtype_and_size_limits():
    from vidgen_kernels.backends import why_unavailable
    if why_unavailable("triton", "cpu"):
        pytest.skip(why_unavailable("triton", "cpu"))
    x, s = torch.randn(1, 2, 8, dtype=torch.float64), torch.randn(1, 8, dtype=torch.float64)
    with pytest.raises(vk.BackendUnavailableError, match="dtype torch.float64"):
        vk.adaln_modulate(x, s, s, backend="triton")
    xb, sb = torch.randn(1, 1, 16385), torch.randn(1, 16385)
    with pytest.raises(ValueError, match="C <= 16384"):
        vk.adaln_modulate(xb, sb, sb, backend="triton")
    with vk.use_backend("triton"):  # a default choice falls back instead of failing
        assert vk.adaln_modulate(xb, sb, sb).shape == xb.shape


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _bad_calls():
    x, y = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    s = torch.randn(2, 8)
    return [
        ("x must be \\[B, N, C\\], got shape \\(6, 8\\)", lambda: vk.adaln_modulate(x[0], s, s)),
        ("shift has 7 channels but x has C=8", lambda: vk.adaln_modulate(x, s[:, :7], s)),
        ("scale has 4 rows along the token axis, which does not divide N=6",
         lambda: vk.adaln_modulate(x, s, torch.randn(2, 4, 8))),
        ("shift has batch 3 but x has B=2", lambda: vk.adaln_modulate(x, torch.randn(3, 8), s)),
        ("shift must be .*got shape \\(2, 6, 8, 1\\)", lambda: vk.adaln_modulate(x, x[..., None], s)),
        ("x must be a floating tensor .*got dtype torch.int64",
         lambda: vk.adaln_modulate(x.long(), s, s)),
        ("scale must be a floating tensor, got dtype torch.int32",
         lambda: vk.adaln_modulate(x, s, s.int())),
        ("shift must have x's dtype \\(torch.float16\\) or float32, got torch.float64",
         lambda: vk.adaln_modulate(x.half(), s.double(), s.half())),
        ("norm must be one of \\('layer', 'rms'\\), got 'batch'",
         lambda: vk.adaln_modulate(x, s, s, norm="batch")),
        ("eps must be a finite Python float / int >= 0, got -1 \\(int\\)",
         lambda: vk.adaln_modulate(x, s, s, eps=-1)),
        # numpy scalars are not taken (torch.compile traces these checks): the message says why
        ("eps must be a finite Python float / int >= 0, got .*1e-05.* \\(float32\\)",
         lambda: vk.adaln_modulate(x, s, s, eps=np.float32(1e-5))),
        ("eps must be a finite Python float / int >= 0, got inf \\(float\\)",
         lambda: vk.gated_residual_adaln(x, y, s, s, s, eps=float("inf"))),
        ("weight must be \\[C\\] = \\[8\\], got shape \\(7,\\)",
         lambda: vk.adaln_modulate(x, s, s, weight=torch.ones(7))),
        ("y must have x's shape \\(2, 6, 8\\), got \\(2, 5, 8\\)",
         lambda: vk.gated_residual_adaln(x, y[:, :5], s, s, s)),
        ("y must have x's dtype", lambda: vk.gated_residual_adaln(x, y.double(), s, s, s)),
        ("gate has 7 channels", lambda: vk.gated_residual_adaln(x, y, s[:, :7], s, s)),
        ("x must be a torch.Tensor, got list", lambda: vk.adaln_modulate([1.0], s, s)),
        ("shift must have x's dtype \\(torch.bfloat16\\) or float32, got torch.float16",
         lambda: vk.adaln_modulate(x.bfloat16(), s.half(), s)),
        ("x must have C >= 1", lambda: vk.adaln_modulate(torch.randn(2, 6, 0), s[:, :0], s[:, :0])),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_input_raises_clear_error(i, backend):
    match, call = _bad_calls()[i]
    with vk.use_backend(backend):
        with pytest.raises((ValueError, TypeError), match=match):
            call()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed devices need a CUDA GPU")
def test_mixed_devices_raise():
    x = torch.randn(2, 6, 8, device="cuda")
    with pytest.raises(ValueError, match="shift is on cpu but x is on cuda"):
        vk.adaln_modulate(x, torch.randn(2, 8), torch.randn(2, 8, device="cuda"))


def test_mixed_devices_raise_meta():
    """Device mismatch checked without a GPU: a 'meta' tensor against a CPU one."""
    x = torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match="scale is on meta but x is on cpu"):
        vk.adaln_modulate(x, torch.randn(2, 8), torch.randn(2, 8, device="meta"))


@pytest.mark.parametrize("form", [(2, 8), (2, 3, 8), (2, 0, 8)])
def test_empty_tokens(form):
    """N = 0 tokens: empty outputs and zero parameter gradients for every modulation form,
    per-token ``[B, N, C] = [2, 0, 8]`` included (it raised "0 rows along the token axis, which
    does not divide N=0", and its backward divided by zero)."""
    for backend in vk.available_backends("cpu"):
        x = torch.randn(2, 0, 8, requires_grad=True)
        s = torch.randn(*form, requires_grad=True)
        out = vk.adaln_modulate(x, s, s, backend=backend)
        assert out.shape == (2, 0, 8)
        out.sum().backward()
        assert torch.equal(s.grad, torch.zeros_like(s))
        g = torch.randn(*form, requires_grad=True)
        h, m = vk.gated_residual_adaln(x, torch.randn(2, 0, 8), g, s, s, backend=backend)
        assert h.shape == m.shape == (2, 0, 8)
        dg, ds = torch.autograd.grad((h.sum() + m.sum()), (g, s))
        assert torch.equal(dg, torch.zeros_like(g)) and torch.equal(ds, torch.zeros_like(s))


# ----------------------------------------------------------------------------------------------
# float64: statistics and partial gradient buffers in double precision
# ----------------------------------------------------------------------------------------------
FP64_BACKENDS = ["torch"] + [b for b in ("cpu",) if b in vk.available_backends("cpu")]


def _fp64_large_mean_leaves(form: str, gated: bool, affine: bool, seed=0):
    """float64 leaves with |mean| >> spread (1000 +- 0.01): float32 statistics lose the spread."""
    g = torch.Generator().manual_seed(seed)
    B, N, C = 2, 6, 8
    lv = {"x": 1000 + 1e-2 * torch.randn(B, N, C, generator=g, dtype=torch.float64)}
    if gated:
        lv["y"] = 1e-2 * torch.randn(B, N, C, generator=g, dtype=torch.float64)
    shapes = {"BC": (B, C), "F3": (B, 3, C), "C": (C,)}
    for k in ("shift", "scale") + (("gate",) if gated else ()):
        lv[k] = 0.5 * torch.randn(shapes[form], generator=g, dtype=torch.float64)
    if affine:
        lv["weight"] = 1 + 0.3 * torch.randn(C, generator=g, dtype=torch.float64)
        lv["bias"] = 0.3 * torch.randn(C, generator=g, dtype=torch.float64)
    return {k: v.requires_grad_() for k, v in lv.items()}


def _fp64_call(backend, norm, gated):
    def f(x, *rest):
        if gated:
            y, shift, scale, gate, *wb = rest
        else:
            shift, scale, *wb = rest
        kw = dict(zip(("weight", "bias"), wb))
        if backend == "torch":  # the kernel contract in PyTorch, through the custom ops
            out, h, _, _ = torch.ops.vidgen_kernels.adaln_fwd(
                x, y if gated else None, _canon(gate, x) if gated else None, _canon(shift, x),
                _canon(scale, x), kw.get("weight"), kw.get("bias"), 1e-6, norm == "rms", "torch")
            return (h, out) if gated else out
        if gated:
            return vk.gated_residual_adaln(x, y, gate, shift, scale, norm=norm, backend=backend, **kw)
        return vk.adaln_modulate(x, shift, scale, norm=norm, backend=backend, **kw)
    return f


def _canon(p, x):
    from vidgen_kernels.ops.adaln import _canon_param
    return _canon_param("p", p, x, "test")


@pytest.mark.parametrize("form", ["BC", "F3", "C"])
@pytest.mark.parametrize("gated,affine", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("backend", ["reference"] + FP64_BACKENDS)
def test_float64_large_mean_gradcheck(backend, norm, gated, affine, form):
    """float64 keeps mean / rstd in float64 from forward to backward: with float32 statistics
    the backward normalised with a mean off by ~1e-4 of a 1e-2 spread (wrong gradients).
    (eps 1e-5: with gradcheck's 1e-6 the rounding of h ~ 1000 to float64 already shows in the
    central differences of the gate; the reference case shows the check is well posed.)"""
    lv = _fp64_large_mean_leaves(form, gated, affine)
    assert torch.autograd.gradcheck(_fp64_call(backend, norm, gated), tuple(lv.values()), eps=1e-5)


@pytest.mark.parametrize("form", ["BC", "F3", "C"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_float64_grads_match_reference_to_double_precision(backend, norm, gated, form):
    """The kernels' float64 gradients (parameter gradients summed over tokens included) equal
    the reference's to ~1e-10 relative: no float32 statistics or partial buffers on the way."""
    for large_mean in (False, True):
        lv = _fp64_large_mean_leaves(form, gated, affine=True, seed=1)
        if not large_mean:
            with torch.no_grad():
                lv["x"].sub_(1000).mul_(200)
        keys = list(lv)
        f = _fp64_call(backend, norm, gated)
        ref = _fp64_call("reference", norm, gated)
        outs, outs_r = f(*lv.values()), ref(*lv.values())
        outs, outs_r = (outs, outs_r) if gated else ((outs,), (outs_r,))
        g = torch.Generator().manual_seed(2)
        cots = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
        got = torch.autograd.grad(outs, tuple(lv.values()), cots)
        want = torch.autograd.grad(outs_r, tuple(lv.values()), cots)
        for name, a, b in zip(("h", "out") if gated else ("out",), outs, outs_r):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * b.abs().max().item(),
                                       msg=f"{name} (large_mean={large_mean})")
        for k, a, b in zip(keys, got, want):
            assert a.dtype == torch.float64, k
            tol = 1e-10 * b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=1e-10, atol=tol,
                                       msg=lambda m, k=k: f"grad {k} (large_mean={large_mean}): {m}")


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_float64_statistics_and_fake_dtypes(backend):
    """The forward op returns float64 statistics for float64 inputs (float32 otherwise), and its
    fake implementation agrees (opcheck)."""
    g = torch.Generator().manual_seed(0)
    for dtype, stats in ((torch.float64, torch.float64), (torch.float32, torch.float32)):
        x, y = (torch.randn(2, 6, 5, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
        gate, shift = (torch.randn(2, 3, 5, generator=g, dtype=dtype, requires_grad=True)
                       for _ in range(2))
        scale = torch.randn(1, 6, 5, generator=g, dtype=dtype, requires_grad=True)
        w = torch.randn(5, generator=g, dtype=dtype, requires_grad=True)
        args = (x, y, gate, shift, scale, w, None, 1e-6, False, backend)
        _, _, mean, rstd = torch.ops.vidgen_kernels.adaln_fwd(*args)
        assert mean.dtype == rstd.dtype == stats
        torch.library.opcheck(torch.ops.vidgen_kernels.adaln_fwd.default, args)


# ----------------------------------------------------------------------------------------------
# shift / scale / gate of different dtypes (each x's dtype or float32)
# ----------------------------------------------------------------------------------------------
MIXED_PARAMS = [  # x dtype, gated, dtypes of shift / scale / gate ("x": x's dtype)
    (torch.bfloat16, False, ("f32", "x", None)),
    (torch.float16, False, ("x", "f32", None)),
    (torch.bfloat16, True, ("f32", "x", "x")),
    (torch.float16, True, ("x", "x", "f32")),
]


@pytest.mark.parametrize("xdt,gated,pdts", MIXED_PARAMS,
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple)
                         else "-".join(map(str, v)))
@pytest.mark.parametrize("backend", ["reference"] + [
    b for b in ("cpu", "triton") if b in vk.available_backends("cpu")])
def test_mixed_param_dtypes_match_reference(backend, xdt, gated, pdts):
    """fp32 shift with an x-dtype scale (or gate) is taken as the docs say: the kernels then run
    with all three in float32, each gradient in its own tensor's dtype."""
    g = torch.Generator().manual_seed(4)
    B, N, C = 2, 6, 24
    x = (torch.randn(B, N, C, generator=g) * 2 + 0.5).to(xdt).requires_grad_()
    y = torch.randn(B, N, C, generator=g).to(xdt).requires_grad_()
    shapes = {"shift": (B, C), "scale": (B, 3, C), "gate": (1, C)}
    ps = {}
    for k, dt in zip(("shift", "scale", "gate"), pdts):
        if dt is not None:
            ps[k] = (0.5 * torch.randn(shapes[k], generator=g)).to(
                xdt if dt == "x" else torch.float32).requires_grad_()
    w = (1 + 0.3 * torch.randn(C, generator=g)).requires_grad_()  # fp32 affine
    b = (0.3 * torch.randn(C, generator=g)).to(xdt).requires_grad_()
    kw = {"weight": w, "bias": b, "eps": 1e-5}
    leaves = [x, y, *ps.values(), w, b] if gated else [x, *ps.values(), w, b]
    if gated:
        got = vk.gated_residual_adaln(x, y, ps["gate"], ps["shift"], ps["scale"], backend=backend, **kw)
        want = vk.gated_residual_adaln_reference(x, y, ps["gate"], ps["shift"], ps["scale"], **kw)
    else:
        got = (vk.adaln_modulate(x, ps["shift"], ps["scale"], backend=backend, **kw),)
        want = (vk.adaln_modulate_reference(x, ps["shift"], ps["scale"], **kw),)
    cots = [torch.randn(o.shape, generator=g).to(xdt) for o in want]
    gk = torch.autograd.grad(got, leaves, cots)
    gr = torch.autograd.grad(want, leaves, cots)
    tol = {"rtol": 2e-2, "atol": 2e-2}
    for a, r in zip(got, want):
        assert a.dtype == xdt
        torch.testing.assert_close(a, r, **tol)
    for leaf, a, r in zip(leaves, gk, gr):
        assert a.dtype == leaf.dtype
        scale_ = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2 * scale_)


# ----------------------------------------------------------------------------------------------
# torch.autocast: eager type promotion of the operands
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + [
    b for b in ("cpu",) if b in vk.available_backends("cpu")])
def test_autocast_promotes_as_eager(backend):
    """Under bf16 autocast (CPU) bf16 modulation with an fp32 x, or a bf16 y with an fp32 x,
    run as on the promoted operands (fp32), gradients in each leaf's dtype; float64 tensors are
    left alone (and still refused), and outside autocast the strict dtype errors stay."""
    g = torch.Generator().manual_seed(5)
    B, N, C = 2, 6, 16

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    for xdt, ydt, pdt in ((torch.float32, torch.float32, torch.bfloat16),
                          (torch.float32, torch.bfloat16, torch.bfloat16),
                          (torch.bfloat16, torch.float32, torch.bfloat16),
                          (torch.bfloat16, torch.bfloat16, torch.float16)):
        x, y = rnd(B, N, C, dtype=xdt), rnd(B, N, C, dtype=ydt)
        gate, shift, scale = rnd(B, C, dtype=pdt), rnd(B, 3, C, dtype=pdt), rnd(C, dtype=pdt)
        w, b = rnd(C, dtype=pdt), rnd(C)

        def promoted(p, xd):  # as eager type promotion, but x's dtype and float32 stay
            return p if p.dtype in (xd, torch.float32) else p.to(torch.promote_types(p.dtype, xd))
        hd = torch.promote_types(xdt, ydt)
        calls = [  # (op, leaves, the leaves explicitly promoted, output dtypes)
            (lambda x, shift, scale, w, b: (vk.adaln_modulate(
                x, shift, scale, weight=w, bias=b, backend=backend),),
             (x, shift, scale, w, b),
             (x, *(promoted(t, xdt) for t in (shift, scale, w, b))), (xdt,)),
            (lambda x, y, gate, shift, scale, w, b: vk.gated_residual_adaln(
                x, y, gate, shift, scale, weight=w, bias=b, backend=backend),
             (x, y, gate, shift, scale, w, b),
             (x.to(hd), y.to(hd), *(promoted(t, hd) for t in (gate, shift, scale, w, b))),
             (hd, hd)),
        ]
        for op, leaves, explicit, dts in calls:
            if any(t.dtype not in (xdt, torch.float32) for t in leaves[1:]) or \
                    (len(leaves) == 7 and xdt != ydt):
                with pytest.raises(TypeError):  # outside autocast: strict
                    op(*leaves)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = op(*leaves)
            want = op(*explicit)
            assert tuple(o.dtype for o in got) == dts
            cots = [torch.randn(o.shape, generator=g).to(o.dtype) for o in want]
            gk = torch.autograd.grad(got, leaves, cots)
            gw = torch.autograd.grad(want, leaves, cots)
            for a, r in zip(got, want):
                torch.testing.assert_close(a, r, rtol=0, atol=0)
            for leaf, a, r in zip(leaves, gk, gw):
                assert a.dtype == leaf.dtype
                torch.testing.assert_close(a, r)
    x, s64 = torch.randn(B, N, C), torch.randn(B, C, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="shift must have x's dtype \\(torch.float32\\) or "
                                            "float32, got torch.float64"):
            vk.adaln_modulate(x, s64, s64.float(), backend=backend)


@pytest.mark.parametrize("fp32_param", ["shift", "scale", "gate"])
@pytest.mark.parametrize("backend", FP64_BACKENDS[1:])
def test_float64_mixed_param_dtypes(backend, fp32_param):
    """A float64 x with one fp32 parameter and the others float64: the kernels and the
    reference take all three in float64 (not float32), so the result and gradients agree to
    double precision, the fp32 parameter's gradient in fp32. (The reference formed
    ``1 + scale`` of an fp32 scale in fp32: 1e-7 off.)"""
    lv = _fp64_large_mean_leaves("F3", gated=True, affine=True, seed=3)
    lv[fp32_param] = lv[fp32_param].detach().float().requires_grad_()
    f, ref = _fp64_call(backend, "layer", True), _fp64_call("reference", "layer", True)
    outs, outs_r = f(*lv.values()), ref(*lv.values())
    g = torch.Generator().manual_seed(4)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    got = torch.autograd.grad(outs, tuple(lv.values()), cots)
    want = torch.autograd.grad(outs_r, tuple(lv.values()), cots)
    for a, b in zip(outs + got, outs_r + want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * b.abs().max().item())
    assert got[list(lv).index(fp32_param)].dtype == torch.float32


def test_cpu_kernel_checks_statistics_dtype():
    """The C++ kernels take float64 statistics for float64 inputs, float32 otherwise."""
    if "cpu" not in vk.available_backends("cpu"):
        pytest.skip("cpu backend not built")
    from vidgen_kernels import _ext
    x, p = torch.randn(1, 2, 4, dtype=torch.float64), torch.zeros(1, 1, 4, dtype=torch.float64)
    s32, s64 = torch.empty(1, 2), torch.empty(1, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="mean must be Double for inputs of dtype Double, got Float"):
        _ext.C.adaln_fwd_cpu(x, None, None, p, p, None, None, torch.empty_like(x), None, s32, s64,
                             1e-6, False)
    with pytest.raises(RuntimeError, match="rstd must be Float for inputs of dtype Float, got Double"):
        _ext.C.adaln_fwd_cpu(x.float(), None, None, p.float(), p.float(), None, None,
                             torch.empty_like(x.float()), None, s32, s64, 1e-6, False)
    dx, dw = torch.empty_like(x), torch.empty(1, 1, 4)  # a float32 partial dweight for float64
    with pytest.raises(RuntimeError, match="dweight must be a contiguous Double tensor"):
        _ext.C.adaln_bwd_cpu(x, None, x, None, None, p, p[0, 0], None, s64, s64, dx, None, None,
                             None, None, dw, None, 1, 1, 2, 2, False)


@pytest.mark.parametrize("backend,device,dtype", backend_params())
def test_gated_h_equals_the_eager_sum_bit_for_bit(backend, device, dtype):
    """``h = round_T(x + gate * y)`` with the product and the sum each rounded in fp32, as the
    contract says and eager PyTorch computes it: bit for bit, not to a tolerance. (On a GPU,
    Triton contracted the two into one FMA, a 1-ulp difference in 23 % of fp32 values; its
    forward now compiles with enable_fp_fusion=False; the CUDA kernel rounds explicitly.)"""
    g = torch.Generator().manual_seed(3)
    B, N, C = 2, 6, 40
    x, y = (torch.randn(B, N, C, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    gate, shift, scale = (torch.randn(B, C, generator=g).to(device=device, dtype=dtype)
                          for _ in range(3))
    h, _ = vk.gated_residual_adaln(x, y, gate, shift, scale, backend=backend)
    want = (x.float() + gate.float()[:, None] * y.float()).to(dtype)
    assert torch.equal(h, want), (h.float() - want.float()).abs().max().item()
