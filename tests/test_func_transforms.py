"""The ops beyond first-order reverse mode: forward-mode AD (``torch.func.jvp`` / ``jacfwd``,
``torch.autograd.forward_ad`` dual tensors), ``torch.func`` gradient transforms (``grad`` /
``vjp`` / ``jacrev``), eager and under ``torch.compile``, and double backward
(``create_graph=True``).

Before ``backends.autodiff_transform`` existed, ``jvp`` through any kernel backend returned a zero
tangent (the custom ops drop it), a dual tensor lost its tangent, and ``torch.func.grad`` raised
from inside PyTorch. Now ``auto`` takes the reference path there (checked against float64 central
differences, so a dropped tangent fails), a named kernel backend raises
``BackendUnavailableError`` naming the op and the transform, and ``vmap`` alone stays on the
kernels (``rope3d_attention`` and ``moe_ffn`` have their own forward-mode derivatives under jvp /
forward_ad alone: tests/test_rope3d_attention_jvp.py, tests/test_moe_jvp.py). Double backward used to raise at the second backward; the kernels' backward now
recomputes the reference's vector-Jacobian product as a graph when grad mode is on.
"""
import functools
import subprocess
import sys
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import vidgen_kernels as vk
from vidgen_kernels.backends import autodiff_transform, resolve
from helpers import CUDA_MARKS

pytestmark = pytest.mark.skipif("cpu" not in vk.available_backends("cpu"),
                                reason="the C++ CPU kernels are not built")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rnd(*shape, seed=0):
    # device="cpu" explicitly: the generator is a CPU one, also under a torch.device("cuda") context
    return torch.randn(*shape, generator=_g(seed), device="cpu")


def _as(p, *ts):
    """The closed-over constants in p's dtype (float64 for the central differences)."""
    return tuple(t.to(p.dtype) for t in ts)


# Case builders: (f(*inputs, backend=...), inputs). Odd sizes; strided / broadcast forms where
# the op takes them.
def _adaln_case(norm, gated):
    def f(x, y, gate, shift, scale, weight, bias, backend="cpu"):
        if gated:
            h, out = vk.gated_residual_adaln(x, y, gate, shift, scale, weight=weight, bias=bias,
                                             norm=norm, backend=backend)
            return h * out  # both outputs, so that dh reaches the backward too
        return vk.adaln_modulate(x, shift, scale, weight=weight, bias=bias, norm=norm,
                                 backend=backend)
    B, N, C = 2, 5, 7
    args = (_rnd(B, N, C), _rnd(B, N, C, seed=1), _rnd(B, 1, C, seed=2), _rnd(B, C, seed=3),
            _rnd(C, seed=4), _rnd(C, seed=5), _rnd(C, seed=6))
    return f, args


def _rope_case():
    cos, sin = vk.rope3d_freqs(1, 2, 3, 16)
    return (lambda x, backend="cpu": vk.apply_rope(x, cos.to(x.dtype), sin.to(x.dtype), offset=1,
                                                   interleaved=False, backend=backend)), \
        (_rnd(2, 3, 7, 16).transpose(1, 2),)


def _moe_case(activation):
    E, C, F = 3, 6, 5
    F1 = 2 * F if activation == "swiglu" else F

    # the router's math is fp32 by design (numerical differences w.r.t. the logits are noise in
    # float64): the logits are a constant here, and differentiated in test_double_backward_vs_reference
    logits = _rnd(7, E, seed=1)

    def f(x, w1, w2, b1, b2, backend="cpu"):
        r = vk.moe_ffn(x, logits, w1, w2, b1=b1, b2=b2, top_k=2, activation=activation,
                       backend=backend)
        return r.out.sum(-1) + r.aux_loss + r.z_loss
    return f, (_rnd(7, C), 0.5 * _rnd(E, C, F1, seed=2), 0.5 * _rnd(E, F, C, seed=3),
               _rnd(E, F1, seed=4), _rnd(E, C, seed=5))


def _attention_case(kind, device="cpu"):
    """(f, args): the tables are built on ``device`` (f closes over them), the args on the CPU."""
    if kind == "temporal":
        cos, sin = vk.rope3d_freqs(5, 1, 1, 16, axes_dims=(16, 0, 0), device=device)

        def f(q, k, v, backend):
            return vk.temporal_attention(q, k, v, cos=cos, sin=sin, q_offset=2, backend=backend)
        return f, (_rnd(1, 3, 4, 2, 16), _rnd(1, 5, 4, 2, 16, seed=1), _rnd(1, 5, 4, 2, 16, seed=2))
    cos, sin = vk.rope3d_freqs(3, 2, 2, 16, device=device)  # text 3 + 3 frames of 4 tokens
    qkv = _rnd(1, 15, 3, 2, 16, seed=1)  # k, v: strided slices of a fused projection

    def f(q, k, v, backend):
        return vk.rope3d_attention(q, k, v, cos, sin, rope_offset=3, frame_causal=kind == "causal",
                                   tokens_per_frame=4, backend=backend)
    return f, (_rnd(1, 15, 2, 16), qkv[:, :, 1], qkv[:, :, 2])


def _moe_router_case():
    E, C, F = 3, 6, 5

    def f(x, logits, w1, w2, backend):
        r = vk.moe_ffn(x, logits, w1, w2, top_k=2, activation="swiglu", backend=backend)
        return r.out + r.aux_loss + r.z_loss
    return f, (_rnd(7, C), _rnd(7, E, seed=1), 0.5 * _rnd(E, C, 2 * F, seed=2),
               0.5 * _rnd(E, F, C, seed=3))


def _one_input(build):
    """A builder of (f(p, backend), p): the case's first input varies, the others are closed
    over (cast to p's dtype: float64 for the central differences)."""
    def make():
        f, (p, *rest) = build()
        return (lambda p, backend: f(p, *_as(p, *rest), backend=backend)), p
    return make


CASES = {"adaln_modulate": _one_input(lambda: _adaln_case("layer", False)),
         "gated_residual_adaln": _one_input(lambda: _adaln_case("rms", True)),
         "apply_rope": _one_input(_rope_case),
         "rope3d_attention": _one_input(lambda: _attention_case("full")),
         "rope3d_attention_frame_causal": _one_input(lambda: _attention_case("causal")),
         "temporal_attention_streaming_rope": _one_input(lambda: _attention_case("temporal")),
         "moe_ffn": _one_input(_moe_router_case)}
OP = {k: k.split("_frame")[0].split("_streaming")[0] for k in CASES}


# Under a transform the ops run their reference, and moe_ffn's (the seed's per-expert loop) has
# data-dependent control flow: compiled, it breaks the graph (and computes the same)
_FULLGRAPH = {k: k != "moe_ffn" for k in CASES}


_LAYER_NORM_JVP = """
import torch
w = torch.randn(4)
f = lambda x, t: torch.func.jvp(lambda x: torch.nn.functional.layer_norm(x, (4,), w), (x,), (t,))
torch.compile(f, fullgraph=True)(torch.randn(2, 4), torch.randn(2, 4))
"""


@functools.lru_cache(maxsize=None)
def _torch_compiles_layer_norm_jvp() -> bool:
    # in a child process: the failure leaves this process inside a forward-AD dual level
    return subprocess.run([sys.executable, "-c", _LAYER_NORM_JVP], capture_output=True,
                          timeout=300).returncode == 0


def _skip_if_torch_cannot_compile_layer_norm_jvp():
    """torch 2.13's torch.compile of torch.func.jvp through F.layer_norm with a weight fails
    inside PyTorch (an internal assert on _fw_primal), with no op of ours involved."""
    if not _torch_compiles_layer_norm_jvp():
        pytest.skip(f"torch {torch.__version__} cannot torch.compile jvp of F.layer_norm itself")


def _central_difference(f, p, t, eps=1e-6):
    """d/de f(p + e t) at 0 in float64 (the reference backend on float64 copies)."""
    p64, t64 = p.double(), t.double()
    return (f(p64 + eps * t64, "reference") - f(p64 - eps * t64, "reference")) / (2 * eps)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("api", ["func.jvp", "forward_ad", "compiled func.jvp"])
def test_forward_mode_ad_is_exact(case, api):
    """The tangent of the default backend equals float64 central differences (a dropped tangent
    is zero and fails), and the primal equals the plain call."""
    f, p = CASES[case]()
    t = torch.randn(p.shape, generator=_g(7))
    fd = _central_difference(f, p, t).float()
    if api == "forward_ad":
        with fwAD.dual_level():
            out = f(fwAD.make_dual(p, t), None)
            primal, tangent = fwAD.unpack_dual(out)
    else:
        def jvp(p, t):
            return torch.func.jvp(lambda p: f(p, None), (p,), (t,))
        if api.startswith("compiled"):
            if case == "adaln_modulate":
                _skip_if_torch_cannot_compile_layer_norm_jvp()
            torch._dynamo.reset()
            jvp = torch.compile(jvp, fullgraph=_FULLGRAPH[case])
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            primal, tangent = jvp(p, t)
        # (moe_ffn's compiled jvp breaks the graph in the reference loop and runs the jvp
        # eagerly: dynamo must not trace the raw kernel calls of that eager path)
        assert not [w for w in seen if "vidgen_kernels._C" in str(w.message)], \
            [str(w.message)[:200] for w in seen]
    assert tangent is not None
    assert fd.abs().max() > 0.1  # the direction moves the output
    torch.testing.assert_close(tangent, fd, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(primal, f(p, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("transform", ["grad", "vjp", "compiled grad"])
def test_func_gradient_transforms_match_backward(case, transform):
    """``torch.func.grad`` / ``vjp`` of the default backend equal the kernels' ordinary
    ``.backward()`` (which the op tests check against the reference)."""
    f, p = CASES[case]()
    w = torch.randn(f(p, None).shape, generator=_g(8))
    p1 = p.detach().clone().requires_grad_()
    (f(p1, None) * w).sum().backward()
    if transform == "vjp":
        _, pull = torch.func.vjp(lambda p: f(p, None), p)
        got, = pull(w)
    else:
        g = torch.func.grad(lambda p: (f(p, None) * w).sum())
        if transform.startswith("compiled"):
            torch._dynamo.reset()
            g = torch.compile(g, fullgraph=_FULLGRAPH[case])
        got = g(p)
    torch.testing.assert_close(got, p1.grad, rtol=1e-4, atol=1e-5)


# ops whose kernels have a forward-mode derivative of their own (jvp / forward_ad alone)
_OWN_FORWARD_AD = {"rope3d_attention": "tests/test_rope3d_attention_jvp.py",
                   "moe_ffn": "tests/test_moe_jvp.py"}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("api", ["func.jvp", "forward_ad", "func.grad"])
def test_named_kernel_backend_raises_under_the_transform(case, api):
    f, p = CASES[case]()
    op = OP[case]
    if op in _OWN_FORWARD_AD and api != "func.grad":
        pytest.skip(f"{op} has its own forward-mode derivative ({_OWN_FORWARD_AD[op]})")
    with pytest.raises(vk.BackendUnavailableError, match=rf"{op}: backend 'cpu' cannot run under"):
        if api == "func.jvp":
            torch.func.jvp(lambda p: f(p, "cpu"), (p,), (torch.ones_like(p),))
        elif api == "forward_ad":
            with fwAD.dual_level():
                f(fwAD.make_dual(p, torch.ones_like(p)), "cpu")
        else:
            torch.func.grad(lambda p: f(p, "cpu").sum())(p)
    if op in _OWN_FORWARD_AD:
        return
    with vk.use_backend("cpu"), pytest.raises(vk.BackendUnavailableError, match="forward-mode AD"):
        torch.func.jvp(lambda p: f(p, None), (p,), (torch.ones_like(p),))


def _resolved(x):
    return resolve(None, x.device, x.dtype, {"cpu": (torch.float32,)}, "probe", (x,))


def test_what_stays_on_the_kernels():
    """Plain calls, reverse mode (``create_graph`` included), ``vmap``, a dual level without
    tangents on the op's inputs: the kernels. A dual tensor, jvp, grad, jacrev, hessian,
    vmap of jvp / grad: the reference."""
    x = torch.randn(3)
    seen = []

    def probe(x):
        seen.append(_resolved(x))
        return x * 2

    probe(x)
    probe(x.requires_grad_())
    torch.func.vmap(probe)(torch.randn(2, 3))
    with fwAD.dual_level():
        probe(torch.randn(3))
    assert seen == ["cpu"] * 4 and autodiff_transform((x,)) is None
    seen.clear()
    with fwAD.dual_level():
        probe(fwAD.make_dual(torch.randn(3), torch.randn(3)))
    torch.func.jvp(probe, (x.detach(),), (x.detach(),))
    torch.func.grad(lambda x: probe(x).sum())(x.detach())
    torch.func.jacrev(probe)(x.detach())
    torch.func.hessian(lambda x: probe(x).sum())(x.detach())
    torch.func.vmap(lambda x: torch.func.jvp(probe, (x,), (x,))[1])(torch.randn(2, 3))
    torch.func.vmap(torch.func.grad(lambda x: probe(x).sum()))(torch.randn(2, 3))
    torch.func.jvp(torch.func.vmap(probe), (torch.randn(2, 3),), (torch.randn(2, 3),))
    assert "cpu" not in seen and len(seen) >= 8, seen


def test_vmap_keeps_kernel_results():
    """vmap over the kernels (no gradient transform) agrees with the per-sample calls."""
    f, p = CASES["rope3d_attention"]()
    ps = torch.stack([p, 2 * p])
    got = torch.func.vmap(lambda p: f(p, "cpu"))(ps)
    torch.testing.assert_close(got, torch.stack([f(p, "cpu"), f(2 * p, "cpu")]))


# ---------------------------------------------------------------------------- double backward
# create_graph=True (gradient penalties, Hessian-vector products): the kernels' backward returns
# the reference's vector-Jacobian product as a graph. Before, the second backward raised
# "Trying to backward through vidgen_kernels.*_bwd but no autograd formula was registered".
DD64 = {"adaln_layer": lambda: _adaln_case("layer", False), "adaln_rms": lambda: _adaln_case("rms", False),
        "gated_layer": lambda: _adaln_case("layer", True), "gated_rms": lambda: _adaln_case("rms", True),
        "apply_rope": _rope_case, "moe_swiglu": lambda: _moe_case("swiglu"),
        "moe_gelu": lambda: _moe_case("gelu")}


@pytest.mark.parametrize("case", list(DD64))
def test_double_backward_gradgradcheck(case):
    """Second derivatives w.r.t. every input through the ``cpu`` kernels (float64), against
    numerical differentiation of their first derivatives (``torch.autograd.gradgradcheck``)."""
    f, args = DD64[case]()
    args = tuple(a.double().requires_grad_() for a in args)
    assert torch.autograd.gradgradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)


# (backend, device): the CPU kernels, Triton in the interpreter; the GPU backends on a GPU
_DD_BACKENDS = [("cpu", "cpu"), ("triton", "cpu")] + (  # (marked cuda: gpu.sh's -m cuda run)
    [pytest.param("triton", "cuda", marks=CUDA_MARKS), pytest.param("cuda", "cuda", marks=CUDA_MARKS)]
    if torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend,device", _DD_BACKENDS)
@pytest.mark.parametrize("kind", ["full", "causal", "temporal", "moe"])
def test_double_backward_vs_reference(kind, backend, device):
    """A gradient penalty through the attention kernels (fp32: the ``cpu`` attention has no
    float64) and through moe_ffn with its router logits: the penalty's gradients w.r.t. every
    input equal those of the reference backend (plain autograd, no custom op), and are not
    zero."""
    why = vk.backends.why_unavailable(backend, device)
    if why is not None:
        pytest.skip(why)
    if backend == "cuda" and kind != "moe":
        pytest.skip("the cuda backend has no attention (Triton serves CUDA)")
    f, args = _moe_router_case() if kind == "moe" else _attention_case(kind, device)
    args = tuple(a.to(device) for a in args)
    w = torch.randn(f(*args, "reference").shape, generator=_g(9), device="cpu").to(device)
    res = {}
    for be in (backend, "reference"):
        qkv = [a.detach().clone().requires_grad_() for a in args]
        grads = torch.autograd.grad((f(*qkv, be) * w).sum(), qkv, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        res[be] = torch.autograd.grad(penalty, qkv)
    for got, want in zip(res[backend], res["reference"]):
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _like(t, *shape, seed):
    return _rnd(*shape, seed=seed).to(t.device)


_ALIASED = {  # (fn(t, backend), shape of t): one tensor passed to several inputs of the op
    "rope3d_q=k=v": (lambda t, be: vk.rope3d_attention(
        t, t, t, *vk.rope3d_freqs(1, 2, 3, 16, device=t.device), backend=be), (1, 6, 2, 16)),
    "rope3d_k=v": (lambda t, be: vk.rope3d_attention(t.flip(1), t, t, backend=be), (1, 6, 2, 8)),
    "temporal_q=k=v": (lambda t, be: vk.temporal_attention(t, t, t, backend=be), (1, 3, 2, 2, 8)),
    "moe_w1=w2": (lambda t, be: vk.moe_ffn(_like(t, 5, 6, seed=1), _like(t, 5, 3, seed=2), t, t,
                                           backend=be).out, (3, 6, 6)),
    "adaln_weight=bias": (lambda t, be: vk.adaln_modulate(
        _like(t, 2, 5, 6, seed=1), t * 0.1, t * 0.2, weight=t, bias=t, backend=be), (6,)),
    "gated_gate=y": (lambda t, be: vk.gated_residual_adaln(
        _like(t, 2, 5, 6, seed=1), t, t, _like(t, 2, 6, seed=2), _like(t, 2, 6, seed=3),
        backend=be)[1], (2, 5, 6)),
}


@pytest.mark.parametrize("backend,device", _DD_BACKENDS)
@pytest.mark.parametrize("case", list(_ALIASED))
def test_double_backward_of_aliased_inputs(case, backend, device):
    """The same tensor passed to several inputs (self-attention on one tensor, k = v = the text
    context, w1 is w2, weight is bias) under create_graph=True: the first-order gradient equals
    the reference's (each slot's own part, summed once by autograd; it came out 2-3x too large:
    every slot got the tensor's total gradient) and so does the gradient of a penalty on it."""
    why = vk.backends.why_unavailable(backend, device)
    if why is not None:
        pytest.skip(why)
    if backend == "cuda" and not case.startswith(("moe", "adaln", "gated")):
        pytest.skip("the cuda backend has no attention (Triton serves CUDA)")
    f, shape = _ALIASED[case]
    t0 = _rnd(*shape, seed=4)
    res = {}
    for be in (backend, "reference"):
        with torch.device(device):
            t = t0.to(device).requires_grad_()
            out = f(t, be)
            w = torch.randn(out.shape, generator=_g(9), device="cpu").to(device)
            (g,) = torch.autograd.grad((out * w).sum(), t, create_graph=True)
            res[be] = (g.detach(), torch.autograd.grad(g.square().sum(), t)[0])
    for got, want in zip(res[backend], res["reference"]):
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_first_order_backward_stays_on_the_kernels(monkeypatch):
    """Only create_graph=True takes the recomputation: ordinary backward (eager and compiled)
    never calls it."""
    import vidgen_kernels.ops.adaln as adaln_ops
    import vidgen_kernels.ops.rope3d_attention as attn_ops
    calls = []

    def spy(*a):
        calls.append(a)
        raise AssertionError("differentiable_vjp called")
    for mod in (adaln_ops, attn_ops):
        monkeypatch.setattr(mod, "differentiable_vjp", spy)
    f, args = _attention_case("causal")
    fa, aargs = _adaln_case("layer", True)

    def step(*ts):
        return (f(*ts[:3], None).square().sum() + fa(*ts[3:], backend=None).square().sum())
    ts = [a.detach().clone().requires_grad_() for a in args + aargs]
    step(*ts).backward()
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True)(*ts).backward()
    assert not calls
