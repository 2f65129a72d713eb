"""Fused AdaLN modulation: every backend against the PyTorch reference, forward and backward.

Each case builds its inputs from float64 leaves; the kernel runs in the tested dtype and is
compared with the reference in float64 (``ref_hi``) under flash-attention's rule, using the
reference run in the tested dtype (``ref_lo``) as the yardstick.
"""
from __future__ import annotations

import dataclasses

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
        ("eps must be a finite number >= 0, got -1", lambda: vk.adaln_modulate(x, s, s, eps=-1)),
        ("weight must be \\[C\\] = \\[8\\], got shape \\(7,\\)",
         lambda: vk.adaln_modulate(x, s, s, weight=torch.ones(7))),
        ("y must have x's shape \\(2, 6, 8\\), got \\(2, 5, 8\\)",
         lambda: vk.gated_residual_adaln(x, y[:, :5], s, s, s)),
        ("y must have x's dtype", lambda: vk.gated_residual_adaln(x, y.double(), s, s, s)),
        ("gate has 7 channels", lambda: vk.gated_residual_adaln(x, y, s[:, :7], s, s)),
        ("x must be a torch.Tensor, got list", lambda: vk.adaln_modulate([1.0], s, s)),
        ("shift, scale \\(and gate\\) must share one dtype",
         lambda: vk.adaln_modulate(x.half(), s, s.half())),
        ("x must have C >= 1", lambda: vk.adaln_modulate(torch.randn(2, 6, 0), s[:, :0], s[:, :0])),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_input_raises_clear_error(i, backend):
    match, call = _bad_calls()[i]
    with vk.use_backend(backend):
        with pytest.raises((ValueError, TypeError), match=match):
            call()


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


def test_empty_tokens():
    for backend in vk.available_backends("cpu"):
        if backend == "triton":
            continue
        x = torch.randn(2, 0, 8, requires_grad=True)
        s = torch.randn(2, 8, requires_grad=True)
        out = vk.adaln_modulate(x, s, s, backend=backend)
        assert out.shape == (2, 0, 8)
        out.sum().backward()
        assert torch.equal(s.grad, torch.zeros_like(s))
