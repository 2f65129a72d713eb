"""Forward-mode AD of ``rope3d_attention`` on the kernels (``torch.func.jvp`` alone, or a
``torch.autograd.forward_ad`` dual level): the primal comes from the kernels' forward, the tangent
from a flash-style pass (``kernel_jvp_torch`` over blocks of queries on CPU; the Triton forward
kernel with ``JVP``), never from differentiating the reference's materialised ``S x S`` softmax.
This is what consistency-model (sCM) / MeanFlow training of a video DiT needs: jvp through the
whole network w.r.t. the latents and the time.

Checked: the contract against ``torch.func.jvp`` of the reference in float64; the Triton kernel
against it (flash-attention's 2x rule in fp16); the public op per backend under both APIs (the
reference is patched to raise, so a fallback fails); gradients of the primal *and* through the
tangent; tangents on the RoPE tables; which combinations of transforms still take the reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import vidgen_kernels as vk
import vidgen_kernels.ops.rope3d_attention as ra
from helpers import assert_close_rule, forbid, jvp_backend_params
from vidgen_kernels.backends import why_unavailable


def _rnd(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# (name, B, text tokens, frames, tokens per frame, H, D, frame_causal, interleaved, rope,
#  key length without rope or None)
CASES = [
    ("text-first", 2, 3, 3, 4, 2, 16, False, True, True, None),
    ("frame-causal", 1, 3, 3, 4, 2, 16, True, True, True, None),
    ("half-split-causal-odd-D", 1, 5, 4, 6, 3, 24, True, False, True, None),
    ("no-rope-cross", 2, 0, 1, 13, 2, 32, False, True, False, 7),
]
IDS = [c[0] for c in CASES]


def _case(case, dtype=torch.float64):
    """(q, k, v, tangents, tables) with odd sizes; k / v strided slices of a fused kv tensor and
    a transposed (non-contiguous) tangent of q."""
    _, B, text, T, tpf, H, D, fc, inter, rope, sk = case
    S = text + T * tpf
    q = _rnd(B, S, H, D, dtype=dtype)
    kv = _rnd(B, sk or S, 2, H, D, seed=1, dtype=dtype)
    k, v = kv[:, :, 0], kv[:, :, 1]
    dq = _rnd(B, H, S, D, seed=2, dtype=dtype).transpose(1, 2)
    dk, dv = _rnd(*k.shape, seed=3, dtype=dtype), _rnd(*v.shape, seed=4, dtype=dtype)
    tables = (None, None)
    if rope:
        dims = None if D % 16 == 0 else (8, 8, 8)
        tables = vk.rope3d_freqs(T, 2, tpf // 2, D, axes_dims=dims)
    kw = dict(rope_offset=text, interleaved=inter, frame_causal=fc,
              tokens_per_frame=tpf if fc else None)
    return (q, k, v), (dq, dk, dv), tables, kw


def _contract(qkv, tables, kw):
    """(cos, sin, rope_offset, interleaved, fc_start, fc_len, fc_block, scale) of the contract."""
    q, k, v = qkv
    cos, sin, off, fl, fb, scale = ra._check_inputs(
        q, k, v, *tables, kw["rope_offset"], kw["interleaved"], kw["frame_causal"],
        kw["tokens_per_frame"], 1, None, "test")
    return cos, sin, off, kw["interleaved"], off, fl, fb, scale


def _reference_jvp(qkv, tangents, tables, kw):
    """torch.func.jvp of the reference (float64)."""
    def f(q, k, v):
        return vk.rope3d_attention(q, k, v, *tables, backend="reference", **kw)
    return torch.func.jvp(f, tuple(t.double() for t in qkv),
                          tuple(t.double() for t in tangents))


@pytest.mark.parametrize("chunk_rows", [None, 1, 5])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_contract_matches_jvp_of_the_reference(case, chunk_rows):
    qkv, tangents, tables, kw = _case(case)
    _, want = _reference_jvp(qkv, tangents, tables, kw)
    got = ra.kernel_jvp_torch(*qkv, *tangents, *_contract(qkv, tables, kw), chunk_rows=chunk_rows)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _triton_cpu_skip():
    why = why_unavailable("triton", "cpu")
    if why:
        pytest.skip(f"triton on cpu: {why}")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_jvp_kernel(case, dtype):
    """The forward kernel with ``JVP`` against the float64 contract: flash-attention's rule
    against the contract run on inputs rounded to ``dtype``. A zero tangent given as a stride-0
    expanded zero is read in place."""
    _triton_cpu_skip()
    from vidgen_kernels.triton_kernels import rope3d_attention as tk
    qkv, tangents, tables, kw = _case(case)
    con = _contract(qkv, tables, kw)
    zero = qkv[0].new_zeros(()).to(dtype).expand(qkv[0].shape)
    for tans in (tangents, (zero, *tangents[1:])):
        hi = ra.kernel_jvp_torch(*qkv, *(t.double() for t in tans), *con)
        lo_in = [t.to(dtype) for t in (*qkv, *tans)]
        lo = ra.kernel_jvp_torch(*lo_in, *con)
        got = tk.rope3d_attn_jvp(*lo_in, *con, block_m=16, block_n=16)
        assert got.is_contiguous() and got.dtype == dtype
        assert_close_rule(got, hi, lo, f"triton jvp {case[0]} {dtype}")


def test_triton_jvp_checks_the_tangents():
    _triton_cpu_skip()
    from vidgen_kernels.triton_kernels import rope3d_attention as tk
    qkv, tangents, tables, kw = _case(CASES[0], torch.float32)
    bad = tangents[1][:, :-1]
    with pytest.raises(ValueError, match=r"rope3d_attn_jvp: dk must match"):
        tk.rope3d_attn_jvp(*qkv, tangents[0], bad, tangents[2], *_contract(qkv, tables, kw))


def _forbid_reference(monkeypatch):
    forbid(monkeypatch, ra, "_attend", "the reference attention")


@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
@pytest.mark.parametrize("backend", jvp_backend_params())
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jvp_runs_on_the_kernels(case, backend, api, monkeypatch):
    if backend == "auto" and "cpu" not in vk.available_backends("cpu"):
        pytest.skip("the C++ CPU kernels are not built: auto is the reference")
    qkv, tangents, tables, kw = _case(case)
    if api == "forward_ad":  # no tangent on k there: a zero one
        tangents = (tangents[0], torch.zeros_like(tangents[1]), tangents[2])
    want_out, want_tan = _reference_jvp(qkv, tangents, tables, kw)
    q, k, v = (t.float() for t in qkv)
    dq, dk, dv = (t.float() for t in tangents)
    be = None if backend == "auto" else backend

    def f(q, k, v):
        return vk.rope3d_attention(q, k, v, *tables, backend=be, **kw)
    _forbid_reference(monkeypatch)
    if api == "func.jvp":
        out, tan = torch.func.jvp(f, (q, k, v), (dq, dk, dv))
    else:
        with fwAD.dual_level():
            out, tan = fwAD.unpack_dual(f(fwAD.make_dual(q, dq), k, fwAD.make_dual(v, dv)))
    assert tan is not None and tan.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tan.double(), want_tan, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES[1:3], ids=IDS[1:3])
def test_low_precision_jvp_on_cpu(case, dtype, monkeypatch):
    """fp16 / bf16 through the ``cpu`` backend under jvp: primal and tangent in the input dtype,
    within flash-attention's rule of jvp of the reference run in that dtype."""
    if "cpu" not in vk.available_backends("cpu"):
        pytest.skip("the C++ CPU kernels are not built")
    qkv, tangents, tables, kw = _case(case)
    hi_out, hi_tan = _reference_jvp(qkv, tangents, tables, kw)
    lo_in = [t.to(dtype) for t in (*qkv, *tangents)]

    def f(be):
        return lambda q, k, v: vk.rope3d_attention(q, k, v, *tables, backend=be, **kw)
    lo_out, lo_tan = torch.func.jvp(f("reference"), tuple(lo_in[:3]), tuple(lo_in[3:]))
    _forbid_reference(monkeypatch)
    out, tan = torch.func.jvp(f("cpu"), tuple(lo_in[:3]), tuple(lo_in[3:]))
    assert_close_rule(out, hi_out, lo_out, f"primal {case[0]} {dtype}")
    assert_close_rule(tan, hi_tan, lo_tan, f"tangent {case[0]} {dtype}")


@pytest.mark.parametrize("backend", jvp_backend_params())
def test_gradients_of_the_primal_and_through_the_tangent(backend):
    """MeanFlow / sCM backpropagate through the jvp's primal output (and stop the tangent);
    a regulariser on the tangent backpropagates through it too: both match the reference."""
    if backend == "auto" and "cpu" not in vk.available_backends("cpu"):
        pytest.skip("the C++ CPU kernels are not built")
    qkv, tangents, tables, kw = _case(CASES[1], torch.float32)
    w1, w2 = _rnd(*qkv[0].shape, seed=8).float(), _rnd(*qkv[0].shape, seed=9).float()

    def grads(be):
        ins = [t.detach().clone().requires_grad_() for t in (*qkv, *tangents)]
        out, tan = torch.func.jvp(
            lambda q, k, v: vk.rope3d_attention(q, k, v, *tables, backend=be, **kw),
            tuple(ins[:3]), tuple(ins[3:]))
        ((out * w1).sum() + (tan * w2).sum()).backward()
        return [t.grad for t in ins]
    got = grads(None if backend == "auto" else backend)
    want = grads("reference")
    for name, g, r in zip(("q", "k", "v", "dq", "dk", "dv"), got, want):
        assert r.abs().max() > 0.01, name
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)


def test_tangent_of_the_tables_is_followed():
    """A tangent on cos / sin (positions being differentiated) is exact too (that case
    differentiates the reference)."""
    qkv, tangents, (cos, sin), kw = _case(CASES[0], torch.float32)
    dcos, dsin = _rnd(*cos.shape, seed=5).float(), _rnd(*sin.shape, seed=6).float()

    def f(cos, sin, be):
        return vk.rope3d_attention(*qkv, cos, sin, backend=be, **kw)
    _, got = torch.func.jvp(lambda c, s: f(c, s, "cpu"), (cos, sin), (dcos, dsin))
    _, want = torch.func.jvp(lambda c, s: f(c, s, "reference"), (cos, sin), (dcos, dsin))
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_combined_transforms_still_take_the_reference():
    """jacfwd (vmap of jvp) and jvp of jvp have no kernel path: ``auto`` is exact there and a
    named backend raises (the forward-mode derivative covers one jvp, nothing around it)."""
    qkv, tangents, tables, kw = _case(CASES[1], torch.float32)
    q, k, v = (t[:, :6, :1, :8].contiguous() for t in qkv)
    kw = dict(kw, rope_offset=3, tokens_per_frame=1)
    cos, sin = vk.rope3d_freqs(3, 1, 1, 8, axes_dims=(8, 0, 0))

    def f(q, be):
        return vk.rope3d_attention(q, k, v, cos, sin, backend=be, **kw)
    want = torch.func.jacfwd(lambda q: f(q, "reference"))(q)
    torch.testing.assert_close(torch.func.jacfwd(lambda q: f(q, None))(q), want)
    with pytest.raises(vk.BackendUnavailableError, match="rope3d_attention: backend 'cpu'"):
        torch.func.jacfwd(lambda q: f(q, "cpu"))(q)
    t = torch.ones_like(q)

    def second(be):
        return torch.func.jvp(lambda q: torch.func.jvp(lambda q: f(q, be), (q,), (t,))[1],
                              (q,), (t,))[1]
    torch.testing.assert_close(second(None), second("reference"))


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jvp_on_gpu(case, dtype, monkeypatch):
    """``auto`` on CUDA tensors under torch.func.jvp: the Triton forward and JVP kernels (the
    reference patched to raise), against the float64 contract with flash-attention's rule."""
    qkv, tangents, tables, kw = _case(case)
    con = _contract(qkv, tables, kw)
    hi = ra.kernel_jvp_torch(*qkv, *tangents, *con)
    lo_in = [t.to(dtype) for t in (*qkv, *tangents)]
    lo = ra.kernel_jvp_torch(*lo_in, *con).cuda()
    q, k, v, dq, dk, dv = (t.cuda() for t in lo_in)
    tables = tuple(t.cuda() if t is not None else None for t in tables)
    _forbid_reference(monkeypatch)
    _, tan = torch.func.jvp(lambda q, k, v: vk.rope3d_attention(q, k, v, *tables, **kw),
                            (q, k, v), (dq, dk, dv))
    assert_close_rule(tan, hi.cuda(), lo, f"cuda jvp {case[0]} {dtype}")
