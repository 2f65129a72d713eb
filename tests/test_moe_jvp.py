"""Forward-mode AD of ``moe_ffn`` on the kernels (``torch.func.jvp`` alone, or a
``torch.autograd.forward_ad`` dual level): the primal comes from the kernels' pipeline and the
tangent from the same kernels (routing-weight tangent in PyTorch, ``gmm(dx[tok], w1) +
gmm(x[tok], dw1) + db1``, the activation's tangent, the second grouped GEMM, the weighted
combine of ``dy`` and of ``y`` with the weights' tangent), never from the seed's per-expert loop
(a host sync per expert and slot on a GPU). That is what consistency-model (sCM) / MeanFlow
training of a MoE DiT runs: jvp through the whole network w.r.t. the latents and the time.

Checked: every activation and routing form against ``torch.func.jvp`` of the reference in
float64 with the reference patched to raise (a fallback fails); both APIs, tangents on a subset
of the inputs (no GEMM against a zero tangent); fp16 / bf16 by flash-attention's rule; gradients
of the primal *and* through the tangent; which combined transforms still take the reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import vidgen_kernels as vk
import vidgen_kernels.ops.moe as moe
from helpers import BIAS_LAYOUTS, assert_close_rule, bias_layout, forbid, jvp_backend_params

pytestmark = pytest.mark.skipif("cpu" not in vk.available_backends("cpu"),
                                reason="the C++ CPU kernels are not built")


def _rnd(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


B, N, C, F, E = 2, 5, 7, 5, 5  # 10 tokens, odd sizes
ROUTINGS = ["top2", "top3-unnormalised", "expert-index"]


def _case(activation, routing, dtype=torch.float64):
    """(primals, tangents, kwargs): x [B, N, C] and its tangent non-contiguous, w1 stored
    transposed (any strides), biases on both GEMMs."""
    F1 = 2 * F if activation in moe.GATED else F
    x = _rnd(B, C, N, dtype=dtype).transpose(1, 2)
    logits = _rnd(B * N, E, seed=1, dtype=dtype)
    w1 = 0.5 * _rnd(E, F1, C, seed=2, dtype=dtype).transpose(1, 2)
    w2 = 0.5 * _rnd(E, F, C, seed=3, dtype=dtype)
    b1, b2 = _rnd(E, F1, seed=4, dtype=dtype), _rnd(E, C, seed=5, dtype=dtype)
    prim = (x, logits, w1, w2, b1, b2)
    tans = tuple(_rnd(*t.shape, seed=10 + i, dtype=dtype) for i, t in enumerate(prim))
    tans = (_rnd(B, C, N, seed=9, dtype=dtype).transpose(1, 2),) + tans[1:]
    kw = dict(activation=activation, top_k=3 if routing.startswith("top3") else 2,
              normalize_weights=routing != "top3-unnormalised",
              expert_index=(torch.arange(B * N) * 3) % E if routing == "expert-index" else None)
    return prim, tans, kw


def _fn(backend, kw):
    def f(x, logits, w1, w2, b1, b2):
        r = vk.moe_ffn(x, logits, w1, w2, b1=b1, b2=b2, backend=backend, **kw)
        return r.out, r.aux_loss, r.z_loss
    return f


def _forbid_reference(monkeypatch):
    forbid(monkeypatch, moe, "moe_ffn_reference", "the reference moe_ffn")


def _run_backend(backend, monkeypatch):
    """The name to pass to moe_ffn; 'torch-contract' runs the PyTorch contract kernels (the
    oracle of the custom ops) through the cpu backend's name."""
    if backend == "torch-contract":
        monkeypatch.setattr(moe, "_kernels", lambda name: moe._TorchKernels)
        return "cpu"
    return None if backend == "auto" else backend


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
def test_jvp_matches_the_reference(activation, routing, monkeypatch):
    """Every activation and routing form, float64, all six inputs with tangents."""
    prim, tans, kw = _case(activation, routing)
    want = torch.func.jvp(_fn("reference", kw), prim, tans)
    _forbid_reference(monkeypatch)
    got = torch.func.jvp(_fn("cpu", kw), prim, tans)
    # the router's weights are float32 by definition (both paths): ~1e-7 relative
    for name, g, w in zip(("out", "aux", "z", "d out", "d aux", "d z"), got[0] + got[1],
                          want[0] + want[1]):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=name)
    assert want[1][0].abs().max() > 0.1
    if routing != "expert-index":
        assert want[1][1].abs() > 1e-3 and want[1][2].abs() > 1e-3  # the losses move too


@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
@pytest.mark.parametrize("backend", jvp_backend_params("torch-contract"))
@pytest.mark.parametrize("activation,routing", [("gelu", "top2"), ("swiglu", "expert-index")])
def test_jvp_runs_on_the_kernels(activation, routing, backend, api, monkeypatch):
    """Each kernel backend (Triton in fp32 in the interpreter, the others in float64) under both
    APIs; forward_ad puts tangents on x, the logits and w2 only."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    prim, tans, kw = _case(activation, routing, dtype)
    if api == "forward_ad":
        tans = tuple(t if i in (0, 1, 3) else torch.zeros_like(t) for i, t in enumerate(tans))
    want_out, want_tan = torch.func.jvp(_fn("reference", kw), tuple(t.double() for t in prim),
                                        tuple(t.double() for t in tans))
    be = _run_backend(backend, monkeypatch)
    _forbid_reference(monkeypatch)
    if api == "func.jvp":
        out, tan = torch.func.jvp(_fn(be, kw), prim, tans)
    else:
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) if i in (0, 1, 3) else p
                     for i, (p, t) in enumerate(zip(prim, tans))]
            res = [fwAD.unpack_dual(o) for o in _fn(be, kw)(*duals)]
            out, tan = tuple(r.primal for r in res), tuple(r.tangent for r in res)
    assert tan[0] is not None and tan[0].dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0].double(), want_out[0], **tol)
    torch.testing.assert_close(tan[0].double(), want_tan[0], **tol)
    if routing != "expert-index":
        torch.testing.assert_close(tan[1].double(), want_tan[1].double(), **tol)


@pytest.mark.parametrize("layout", BIAS_LAYOUTS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("backend", [p for p in jvp_backend_params() if p.values[0] != "auto"])
def test_jvp_with_strided_biases(backend, activation, layout, monkeypatch):
    """Primal biases and their tangents in a layout other than row-major ``[E, M]``
    (transposed, a column slice, stride 0): the kernels' GEMM epilogues read them through their
    strides (primal ``b1`` / ``b2`` and the tangents ``db1`` / ``db2``), matching the
    reference's jvp (Triton in fp32 in the interpreter, cpu in float64)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    prim, tans, kw = _case(activation, "top2", dtype)
    prim = prim[:4] + tuple(bias_layout(t, layout) for t in prim[4:])
    tans = tans[:4] + tuple(bias_layout(t, layout) for t in tans[4:])
    want = torch.func.jvp(_fn("reference", kw), tuple(t.double() for t in prim),
                          tuple(t.double() for t in tans))
    _forbid_reference(monkeypatch)
    got = torch.func.jvp(_fn(backend, kw), prim, tans)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0][0].double(), want[0][0], **tol)
    torch.testing.assert_close(got[1][0].double(), want[1][0], **tol)


@pytest.mark.parametrize("wrt", [("b1",), ("b2",), ("w1", "b2"), ("w2",), ("logits",)],
                         ids=lambda w: "+".join(w))
def test_tangents_on_a_subset_of_the_inputs(wrt, monkeypatch):
    """Tangents on some inputs only (a dual level: the others have none), each combination of
    the GEMM tangents' terms (bias alone, weight alone, ...), against the reference's jvp with
    zero tangents elsewhere."""
    names = ("x", "logits", "w1", "w2", "b1", "b2")
    prim, tans, kw = _case("geglu", "top2")
    tans = tuple(t if n in wrt else torch.zeros_like(t) for n, t in zip(names, tans))
    _, want = torch.func.jvp(_fn("reference", kw), prim, tans)
    _forbid_reference(monkeypatch)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) if n in wrt else p for n, p, t in zip(names, prim, tans)]
        got = [fwAD.unpack_dual(o).tangent for o in _fn("cpu", kw)(*duals)]
    assert want[0].abs().max() > 1e-3
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    if "logits" in wrt:
        torch.testing.assert_close(got[1].double(), want[1].double(), rtol=1e-6, atol=1e-6)


def test_tangents_on_a_subset_cost_no_gemm_against_zeros(monkeypatch):
    """With a tangent on x only (the latent, as in sCM), the tangent takes two grouped GEMMs
    (``dx[tok] @ w1``, ``dhid @ w2``), none with a zero weight tangent."""
    prim, tans, kw = _case("gelu", "top2", torch.float32)
    x, logits, w1, w2, b1, b2 = prim
    calls = []
    real = moe._CpuKernels.gmm

    def counting(a, w, offs, bias=None):
        calls.append(w.shape)
        return real(a, w, offs, bias)
    out0 = vk.moe_ffn(x, logits, w1, w2, b1=b1, b2=b2, backend="cpu", **kw).out
    _, want = torch.func.jvp(lambda x: _fn("reference", kw)(x, *prim[1:])[0], (x,), (tans[0],))
    monkeypatch.setattr(moe._CpuKernels, "gmm", staticmethod(counting))
    out, got = torch.func.jvp(lambda x: _fn("cpu", kw)(x, *prim[1:])[0], (x,), (tans[0],))
    fwd_calls = 1  # the forward's second GEMM (the first is gmm_act's)
    assert len(calls) == fwd_calls + 2, calls
    torch.testing.assert_close(out, out0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("activation", ["gelu", "geglu"])
def test_low_precision_jvp_on_cpu(activation, dtype, monkeypatch):
    """fp16 / bf16 through the ``cpu`` backend: primal and tangent in the input dtype, within
    flash-attention's rule of jvp of the reference run in that dtype."""
    prim, tans, kw = _case(activation, "top2")
    hi_out, hi_tan = torch.func.jvp(_fn("reference", kw), prim, tans)
    lo_p, lo_t = tuple(t.to(dtype) for t in prim), tuple(t.to(dtype) for t in tans)
    lo_p = (lo_p[0], prim[1].float()) + lo_p[2:]  # fp32 logits: the same experts in every run
    lo_t = (lo_t[0], tans[1].float()) + lo_t[2:]
    lo_out, lo_tan = torch.func.jvp(_fn("reference", kw), lo_p, lo_t)
    _forbid_reference(monkeypatch)
    out, tan = torch.func.jvp(_fn("cpu", kw), lo_p, lo_t)
    assert_close_rule(out[0], hi_out[0], lo_out[0], f"primal {activation} {dtype}")
    assert_close_rule(tan[0], hi_tan[0], lo_tan[0], f"tangent {activation} {dtype}")


@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("routing", ["top2", "expert-index"])
def test_gradients_of_the_primal_and_through_the_tangent(routing, backend):
    """MeanFlow / sCM backpropagate through the jvp's primal output (and stop the tangent); a
    regulariser on the tangent backpropagates through it too: every gradient (inputs and
    tangents) matches the reference's, float64."""
    prim, tans, kw = _case("swiglu", routing)
    g = torch.Generator().manual_seed(20)
    wo, wt = torch.randn(B, N, C, generator=g, dtype=torch.float64), \
        torch.randn(B, N, C, generator=g, dtype=torch.float64)

    def grads(be):
        ins = [t.detach().clone().requires_grad_() for t in (*prim, *tans)]
        out, tan = torch.func.jvp(_fn(be, kw), tuple(ins[:6]), tuple(ins[6:]))
        ((out[0] * wo).sum() + (tan[0] * wt).sum() + out[1] + out[2] + tan[1] + tan[2]
         ).backward()
        return [t.grad for t in ins]
    got = grads(None if backend == "auto" else backend)
    want = grads("reference")
    names = ("x", "logits", "w1", "w2", "b1", "b2", "dx", "dlogits", "dw1", "dw2", "db1", "db2")
    for name, a, r in zip(names, got, want):
        if r is None or (routing == "expert-index" and "logits" in name):
            continue  # (expert_index: the logits reach only the losses, both paths alike)
        assert a is not None, name
        assert r.abs().max() > 1e-3, name
        tol = 1e-5 if "logits" in name else 1e-6  # (fp32 router math, ops in another order)
        torch.testing.assert_close(a, r, rtol=tol, atol=tol, msg=name)


def test_combined_transforms_still_take_the_reference():
    """jacfwd (vmap of jvp) and jvp of jvp have no kernel path: ``auto`` is exact there and a
    named backend raises (the forward-mode derivative covers one jvp, nothing around it)."""
    prim, tans, kw = _case("gelu", "top2")
    x = prim[0][:1, :3].contiguous()
    rest = (prim[1][:3],) + prim[2:]

    def f(x, be):
        return _fn(be, kw)(x, *rest)[0]
    want = torch.func.jacfwd(lambda x: f(x, "reference"))(x)
    torch.testing.assert_close(torch.func.jacfwd(lambda x: f(x, None))(x), want)
    with pytest.raises(vk.BackendUnavailableError, match="moe_ffn: backend 'cpu'"):
        torch.func.jacfwd(lambda x: f(x, "cpu"))(x)
    t = torch.ones_like(x)

    def second(be):
        return torch.func.jvp(lambda x: torch.func.jvp(lambda x: f(x, be), (x,), (t,))[1],
                              (x,), (t,))[1]
    torch.testing.assert_close(second(None), second("reference"))


def test_module_jvp_with_shared_expert(monkeypatch):
    """``nn.MoEFFN`` (router, experts, shared expert) under jvp on its default backend: the
    tangent of the reference module, without the reference pipeline running."""
    torch.manual_seed(0)
    layer = vk.nn.MoEFFN(C, 3 * F, E, top_k=2, activation="swiglu", shared_expert=True).double()
    x, dx = _rnd(B, N, C, seed=30), _rnd(B, N, C, seed=31)
    layer.backend = "reference"
    want = torch.func.jvp(lambda x: layer(x), (x,), (dx,))
    layer.backend = None
    _forbid_reference(monkeypatch)
    got = torch.func.jvp(lambda x: layer(x), (x,), (dx,))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("activation,routing", [("gelu", "top2"), ("swiglu", "expert-index")])
def test_jvp_on_gpu(activation, routing, dtype, monkeypatch):
    """``auto`` on CUDA tensors under torch.func.jvp: the GPU pipeline (CUDA C++ routing /
    permutes where built, Triton grouped GEMMs) with the reference patched to raise, against the
    float64 reference by flash-attention's rule."""
    prim, tans, kw = _case(activation, routing)
    hi_out, hi_tan = torch.func.jvp(_fn("reference", kw), prim, tans)

    def low(ts, logits):
        ts = tuple(t.to(dtype).cuda() for t in ts)
        return (ts[0], logits.float().cuda()) + ts[2:]
    lo_p, lo_t = low(prim, prim[1]), low(tans, tans[1])
    if kw["expert_index"] is not None:
        kw = dict(kw, expert_index=kw["expert_index"].cuda())
    lo_out, lo_tan = torch.func.jvp(_fn("reference", kw), lo_p, lo_t)
    _forbid_reference(monkeypatch)
    out, tan = torch.func.jvp(_fn(None, kw), lo_p, lo_t)
    assert_close_rule(out[0].cpu(), hi_out[0], lo_out[0].cpu(), f"cuda primal {dtype}")
    assert_close_rule(tan[0].cpu(), hi_tan[0], lo_tan[0].cpu(), f"cuda tangent {dtype}")
