"""Grouped-GEMM MoE (``moe_ffn``): every backend against the seed's loop (``moe_ffn_reference``)
and a dense per-token computation in float64, forward and backward (x, router_logits, w1, w2,
b1, b2 through the output and the aux / z losses); edge cases; custom-op checks; no per-expert
Python loop; torch.compile; bad input; the ``MoEFFN`` module."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vidgen_kernels as vk
from vidgen_kernels.ops import moe as M
from helpers import (BIAS_LAYOUTS, HAS_CUDA, assert_close_rule, assert_no_host_sync, backend_params,
                     bias_layout, meta_init)

ALL_ACTS = M.ACTIVATIONS


def moe_backend_params(dtypes=None):
    """``backend_params`` restricted to the backends ``moe_ffn`` has (``M.SUPPORTED_DTYPES``)."""
    return [p for p in backend_params(dtypes) if p.values[0] in M.SUPPORTED_DTYPES]


# ----------------------------------------------------------------------------------------------
# inputs and the dense definition
# ----------------------------------------------------------------------------------------------
def make(N, C, F, E, activation, dtype, bias=True, seed=0, logits=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    gw = 2 if activation in M.GATED else 1

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    d = dict(x=r(N, C), router_logits=r(N, E, scale=2.0) if logits is None else
             logits.to(dtype).to(device),
             w1=r(E, C, gw * F, scale=C ** -0.5), w2=r(E, F, C, scale=F ** -0.5),
             b1=r(E, gw * F, scale=0.3) if bias else None, b2=r(E, C, scale=0.3) if bias else None)
    return d


def leaves(d):
    return [k for k in ("x", "router_logits", "w1", "w2", "b1", "b2") if d.get(k) is not None]


def dense_moe(x, router_logits, w1, w2, *, top_k, activation, b1=None, b2=None,
              normalize_weights=True, expert_index=None):
    """Every token through every expert (float64 math, fp32 routing as the contract says),
    masked by its routing weights."""
    C = x.shape[-1]
    N = x.numel() // C
    E = w1.shape[0]
    xd = x.reshape(N, C).double()
    if expert_index is not None:
        R = torch.nn.functional.one_hot(expert_index.long(), E).double()
        k = 1
    else:
        lf = router_logits.float()
        p = torch.softmax(lf, -1)
        idx = torch.sort(lf, dim=-1, descending=True, stable=True)[1][:, :top_k]
        w = p.gather(1, idx)
        if normalize_weights:
            w = w / w.sum(-1, keepdim=True)
        R = torch.zeros(N, E, dtype=torch.float64, device=x.device).scatter(1, idx, w.double())
        k = top_k
    h = torch.einsum("nc,ecf->enf", xd, w1.double())
    if b1 is not None:
        h = h + b1.double()[:, None]
    h = M.apply_act(h.reshape(E * N, -1), activation).reshape(E, N, -1)
    y = torch.einsum("enf,efc->enc", h, w2.double())
    if b2 is not None:
        y = y + b2.double()[:, None]
    out = torch.einsum("ne,enc->nc", R, y)
    counts = (R > 0).sum(0) if expert_index is None else R.sum(0).long()
    if expert_index is None:
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).index_add_(
            0, idx.reshape(-1), torch.ones(N * k, dtype=torch.int64, device=x.device))
    aux, zl = M._losses(router_logits, counts, N * k)
    return M.MoEOutput(out.reshape(x.shape), aux, zl, counts)


def run(fn, d, gout, **kw):
    """(out, aux, z, counts, grads of sum(out*gout) + 0.7 aux + 0.3 z w.r.t. the leaves)."""
    ls = [d[k] for k in leaves(d)]
    ins = {k: (v.detach().requires_grad_() if k in leaves(d) else v) for k, v in d.items()}
    res = fn(**ins, **kw)
    loss = (res.out.double() * gout.double()).sum() + 0.7 * res.aux_loss + 0.3 * res.z_loss
    grads = torch.autograd.grad(loss, [ins[k] for k in leaves(d)], allow_unused=True)
    del ls
    return res, grads


def backend_fn(backend):
    if backend == "torch":  # the contract in PyTorch (no user-facing backend name)
        def f(x, router_logits, w1, w2, *, top_k, activation, b1=None, b2=None,
              normalize_weights=True, expert_index=None):
            C = x.shape[-1]
            out, aux, zl, c = M.moe_pipeline(x.reshape(-1, C), router_logits, w1, w2, b1, b2,
                                             top_k, activation, normalize_weights, expert_index,
                                             "torch")
            return M.MoEOutput(out.reshape(x.shape), aux, zl, c)
        return f
    return lambda *a, **kw: vk.moe_ffn(*a, backend=backend, **kw)


CHECK_E = 4  # check()'s default number of experts


def check(backend, dtype, N=11, C=8, F=16, E=CHECK_E, top_k=2, activation="gelu", bias=True,
          seed=0, logits=None, expert_index=None, normalize_weights=True, device="cpu"):
    d = make(N, C, F, E, activation, dtype, bias, seed, logits, device)
    kw = dict(top_k=top_k, activation=activation, normalize_weights=normalize_weights,
              expert_index=expert_index)
    gout = torch.randn(N, C, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64).to(dtype).to(device)
    got, g_got = run(backend_fn(backend), d, gout, **kw)
    lo, g_lo = run(vk.moe_ffn_reference, d, gout, **kw)
    d64 = {k: (v.double() if v is not None else None) for k, v in d.items()}
    hi, g_hi = run(dense_moe, d64, gout.double(), **kw)
    assert got.out.shape == d["x"].shape and got.out.dtype == dtype
    assert torch.equal(got.tokens_per_expert.cpu(), hi.tokens_per_expert.cpu())
    assert torch.equal(lo.tokens_per_expert.cpu(), hi.tokens_per_expert.cpu())
    # floor: one ulp of the dtype at the output's scale for fp16 / bf16 (the pipeline and the
    # seed's loop round at different points: pre-activation, hidden, expert output, sum)
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}.get(dtype, 1e-5)
    assert_close_rule(got.out, hi.out.to(device), lo.out, "out", floor=ulp)
    for name in ("aux_loss", "z_loss"):
        a, h = getattr(got, name), getattr(hi, name)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), h.double().to(device), rtol=1e-5, atol=1e-6)
    for name, a, b_lo, h in zip(leaves(d), g_got, g_lo, g_hi):
        assert_close_rule(a, h.to(device), b_lo, f"d{name}",
                          floor=max(ulp, 1e-4 if name == "router_logits" else 1e-5))
    return got


# ----------------------------------------------------------------------------------------------
# backends vs reference and dense
# ----------------------------------------------------------------------------------------------
def _combo_id(a, b, k):
    return f"{a}-{'bias' if b else 'nobias'}-k{k}"


# (activation, bias, top_k) at check()'s CHECK_E experts. FULL_COMBOS: the whole grid the issue
# asks for, every activation x bias on / off x top_k in {1, 2, E}; COMBOS (a subset, for the
# slow Triton interpreter and the CUDA emulator of test_cuda_emu.py): every activation with
# bias at top-2; top-1 / top-E and no bias on a plain and a gated activation
FULL_COMBOS = [(a, b, k) for a in ALL_ACTS for b in (True, False) for k in (1, 2, CHECK_E)]
FULL_COMBO_IDS = [_combo_id(*c) for c in FULL_COMBOS]
COMBOS = [(a, True, 2) for a in ALL_ACTS] + [
    (a, b, k) for a in ("gelu", "swiglu") for b, k in ((False, 1), (True, CHECK_E), (False, 2))]
COMBO_IDS = [_combo_id(*c) for c in COMBOS]


def combo_backend_params():
    """(backend, device, dtype, activation, bias, top_k): FULL_COMBOS on the compiled backends
    (C++ on CPU, anything on CUDA: small shapes are cheap there), COMBOS on Triton's
    interpreter."""
    out = []
    for p in moe_backend_params():
        backend, device, dtype = p.values
        combos = COMBOS if (backend, device) == ("triton", "cpu") else FULL_COMBOS
        out += [pytest.param(backend, device, dtype, *c, marks=p.marks,
                             id=f"{p.id}-{_combo_id(*c)}") for c in combos]
    return out


@pytest.mark.parametrize("backend,device,dtype,activation,bias,top_k", combo_backend_params())
def test_backend_vs_reference_and_dense(backend, device, dtype, activation, bias, top_k):
    check(backend, dtype, activation=activation, bias=bias, top_k=top_k, device=device)


@pytest.mark.parametrize("activation,bias,top_k", FULL_COMBOS, ids=FULL_COMBO_IDS)
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_pure_pytorch_paths_vs_dense(backend, dtype, activation, bias, top_k):
    check(backend, dtype, activation=activation, bias=bias, top_k=top_k)


# ----------------------------------------------------------------------------------------------
# aux / z losses against their formulas, written out here (not through M._losses)
# ----------------------------------------------------------------------------------------------
def losses_by_formula(logits, assignments, E):
    """The issue's definitions in float64: Switch Transformer's load-balancing loss
    ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of the (token, slot) assignments that go
    to expert e (a count: no gradient) and ``P_e`` the mean router softmax probability of e; the
    router z-loss ``mean_n logsumexp(logits[n])^2``. ``assignments``: each token's experts."""
    lg = logits.double()
    counts = [0] * E
    for experts in assignments:
        for e in experts:
            counts[e] += 1
    f = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    P = torch.softmax(lg, dim=-1).mean(0)
    aux = E * (f * P).sum()
    z = torch.logsumexp(lg, dim=-1).pow(2).mean()
    return aux, z, counts


def topk_by_hand(logits, k):
    """Each row's k largest logits, ties to the lowest index (the documented rule), in Python."""
    return [sorted(range(len(row)), key=lambda e: (-row[e], e))[:k] for row in logits.tolist()]


def loss_backends():
    """Every backend of the file on CPU (the C++ and Triton-interpreter kernels, each dtype),
    the kernel contract in PyTorch and the seed's loop."""
    return [pytest.param(b, "cpu", torch.float32, id=f"{b}-cpu-float32")
            for b in ("reference", "torch")] + moe_backend_params()


@pytest.mark.parametrize("routing", ["top1", "top2", "topE", "expert_index"])
@pytest.mark.parametrize("backend,device,dtype", loss_backends())
def test_losses_match_their_formulas(backend, device, dtype, routing):
    """``aux_loss`` / ``z_loss`` (values and their gradients to the router logits) equal the
    Switch-Transformer / z-loss formulas computed independently, with the routing's experts
    picked by hand; N = 11 tokens over E = 4 experts (unbalanced: aux != 1 but at top-E)."""
    N, E = 11, 4
    d = make(N, 8, 16, E, "gelu", dtype, seed=5, device=device)
    logits = d["router_logits"]
    if routing == "expert_index":
        ei = torch.tensor([0, 3, 3, 1, 0, 3, 2, 3, 0, 3, 1])
        assignments, kw = [[e] for e in ei.tolist()], dict(top_k=1, expert_index=ei.to(device))
    else:
        k = {"top1": 1, "top2": 2, "topE": E}[routing]
        assignments, kw = topk_by_hand(logits.cpu(), k), dict(top_k=k)
    lg = logits.detach().requires_grad_()
    res = backend_fn(backend)(d["x"], lg, d["w1"], d["w2"], b1=d["b1"], b2=d["b2"],
                              activation="gelu", **kw)
    lg64 = logits.detach().cpu().double().requires_grad_()
    aux, z, counts = losses_by_formula(lg64, assignments, E)
    assert res.tokens_per_expert.tolist() == counts
    assert res.aux_loss.dtype == res.z_loss.dtype == torch.float32
    assert res.aux_loss.shape == res.z_loss.shape == ()
    torch.testing.assert_close(res.aux_loss.cpu().double(), aux.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.z_loss.cpu().double(), z.detach(), rtol=1e-5, atol=1e-6)
    # not the balanced value, so f and P matter (top-E sends every token to every expert:
    # f_e = 1/E and aux = sum_e P_e = 1 whatever the logits)
    assert abs(aux.item() - 1.0) > 1e-2 if routing != "topE" else abs(aux.item() - 1.0) < 1e-12
    (got,) = torch.autograd.grad(0.7 * res.aux_loss + 0.3 * res.z_loss, lg)
    (want,) = torch.autograd.grad(0.7 * aux + 0.3 * z, lg64)
    assert got.dtype == logits.dtype
    # (the gradient is rounded to the logits' dtype)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("routing", ["top1", "top2", "topE", "expert_index"])
@pytest.mark.parametrize("backend,device,dtype", loss_backends())
def test_balanced_routing_gives_aux_loss_one(backend, device, dtype, routing):
    """Perfect balance: row n of the logits is the same distinct values shifted cyclically by n
    (N = 2E rows), so each expert receives the same share of the assignments (row n's top-k is
    experts n .. n+k-1 mod E) and the mean router probability of every expert is 1/E:
    ``aux_loss = E * sum_e (1/E)(1/E) = 1``; ``z_loss = logsumexp(row)^2``."""
    E = 4
    N = 2 * E
    vals = torch.tensor([1.5, 0.5, -0.25, -1.0])  # exact in fp16 / bf16
    n, e = torch.arange(N)[:, None], torch.arange(E)[None, :]
    logits = vals[(e - n) % E]
    d = make(N, 8, 16, E, "gelu", dtype, seed=2, logits=logits, device=device)
    if routing == "expert_index":
        k, kw = 1, dict(top_k=1, expert_index=(torch.arange(N) % E).to(device))
    else:
        k = {"top1": 1, "top2": 2, "topE": E}[routing]
        kw = dict(top_k=k)
        assert topk_by_hand(logits, k) == [[(i + j) % E for j in range(k)] for i in range(N)]
    res = backend_fn(backend)(d["x"], d["router_logits"], d["w1"], d["w2"], b1=d["b1"],
                              b2=d["b2"], activation="gelu", **kw)
    assert res.tokens_per_expert.tolist() == [N * k // E] * E
    torch.testing.assert_close(res.aux_loss.cpu(), torch.tensor(1.0), rtol=1e-6, atol=1e-6)
    want_z = torch.logsumexp(vals.double(), 0).pow(2).float()
    torch.testing.assert_close(res.z_loss.cpu(), want_z, rtol=1e-6, atol=1e-6)


def test_cpu_float64():
    if "cpu" not in vk.available_backends("cpu"):
        pytest.skip("cpu backend not built")
    check("cpu", torch.float64, activation="swiglu", top_k=2)


@pytest.mark.parametrize("activation", ["gelu", "geglu"])
def test_cpu_odd_intermediate(activation):
    """F = 13: the C++ tanh-GELU pass's scalar tail (and a gated split at an odd column)."""
    if "cpu" not in vk.available_backends("cpu"):
        pytest.skip("cpu backend not built")
    check("cpu", torch.float32, N=9, C=5, F=13, E=3, activation=activation)


def _gelu_tanh64(z):
    z = z.double()
    return 0.5 * z * (1 + torch.tanh(0.7978845608028654 * (z + 0.044715 * z ** 3)))


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "geglu"])
def test_cpu_gelu_pass_vs_float64(gated):
    """The C++ tanh-GELU forward and derivative (``_CpuKernels.act`` / ``act_bwd``) against the
    float64 formula, within 2x PyTorch's fp32 error (+ a few ulp): odd widths, a row-strided
    ``pre`` read in place, large and tiny magnitudes, in-place backward."""
    if "cpu" not in vk.available_backends("cpu"):
        pytest.skip("cpu backend not built")
    K = M._CpuKernels
    act = "geglu" if gated else "gelu"
    g = torch.Generator().manual_seed(3)
    big = torch.randn(37, 2 * 29 + 5, generator=g) * 3
    big[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 100.0, -100.0])
    pre = big[:, : 2 * 29 if gated else 29]  # row stride 63: read in place
    assert not pre.is_contiguous()
    F_ = 29
    hid = K.act(pre, act)
    a, b = (pre[:, :F_], pre[:, F_:]) if gated else (pre, None)
    want = _gelu_tanh64(a) * (b.double() if gated else 1)
    ours = (hid.double() - want).abs().max().item()
    theirs = (M.apply_act(pre, act).double() - want).abs().max().item()
    assert ours <= 2 * theirs + 1e-6, (ours, theirs)

    dhid = torch.randn(37, F_, generator=g)
    z = a.double().requires_grad_(True)
    h64 = _gelu_tanh64(z) * (b.double() if gated else 1)
    (dz,) = torch.autograd.grad(h64, z, dhid.double())
    want_d = torch.cat([dz, dhid.double() * _gelu_tanh64(a)], 1) if gated else dz
    got_d = K.act_bwd(dhid.clone(), pre, act)
    theirs_d = (M.act_backward(dhid, pre, act).double() - want_d).abs().max().item()
    ours_d = (got_d.double() - want_d).abs().max().item()
    assert ours_d <= 2 * theirs_d + 1e-5, (ours_d, theirs_d)
    if not gated:  # reuse_dhid: the result is written over dhid
        buf = dhid.clone()
        out = K.act_bwd(buf, pre, act, reuse_dhid=True)
        assert out.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(out, got_d, rtol=0, atol=0)
    nan = K.act(torch.full((1, 9), float("nan")), act if not gated else "gelu")
    assert torch.isnan(nan).all()


@pytest.mark.parametrize("layout", BIAS_LAYOUTS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("backend,device,dtype", moe_backend_params((torch.float32,)))
def test_strided_biases(backend, device, dtype, activation, layout):
    """b1 / b2 that are not row-major ``[E, M]`` (transposed storage, a column slice, a stride-0
    broadcast over columns or experts) are read through their strides, without a copy: output
    and every gradient match the reference and the float64 dense computation, and the output
    equals the run on contiguous copies. (The triton GEMM epilogue once read the bias as if its
    column stride were 1: wrong values, and out-of-bounds reads for an expand.) Odd sizes."""
    N, C, F, E = 9, 7, 5, 3
    d = make(N, C, F, E, activation, dtype, device=device)
    d["b1"], d["b2"] = bias_layout(d["b1"], layout), bias_layout(d["b2"], layout)
    assert d["b1"].stride(1) != 1 or d["b1"].stride(0) == 0
    assert d["b2"].stride(1) != 1 or d["b2"].stride(0) == 0
    kw = dict(top_k=2, activation=activation)
    gout = torch.randn(N, C, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(dtype).to(device)
    got, g_got = run(backend_fn(backend), d, gout, **kw)
    lo, g_lo = run(vk.moe_ffn_reference, d, gout, **kw)
    hi, g_hi = run(dense_moe, {k: v.double() for k, v in d.items()}, gout.double(), **kw)
    dense_b = dict(d, b1=d["b1"].contiguous(), b2=d["b2"].contiguous())
    plain, g_plain = run(backend_fn(backend), dense_b, gout, **kw)
    assert_close_rule(got.out, hi.out.to(device), lo.out, "out")
    torch.testing.assert_close(got.out, plain.out, rtol=1e-6, atol=1e-6)
    for name, a, b_lo, h, p in zip(leaves(d), g_got, g_lo, g_hi, g_plain):
        assert_close_rule(a, h.to(device), b_lo, f"d{name}",
                          floor=1e-4 if name == "router_logits" else 1e-5)
        torch.testing.assert_close(a, p, rtol=1e-6, atol=1e-6, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend,device,dtype", moe_backend_params((torch.float16,)))
def test_weight_offsets_past_int32(backend, device, dtype):
    """A weight view whose per-expert row stride fits in int32 but whose last row does not
    (``(C - 1) * stride >= 2**31``, e.g. the experts of one ``[C, E * F]`` projection as
    ``W.view(C, E, F).permute(1, 0, 2)`` at C=3072, E=64, F=11008): output and dx match the
    reference. (The Triton grouped GEMM computed ``k * stride`` in int32: silently wrong
    output and dx, or a read before the buffer.) The storage is lazily committed: ~8.6 GB of
    address space, a few pages touched; an offset of 2**31 keeps a wrapped int32 read inside
    it, so a regression shows as wrong values, not a crash."""
    N, C, E, F, SK, OFF = 16, 64, 2, 32, 2 ** 31 // 63 + 64, 2 ** 31
    try:
        buf = torch.empty(OFF + C * SK + 64, dtype=dtype, device=device)
    except RuntimeError as e:  # no address space for it here
        pytest.skip(f"cannot reserve the lazily committed storage: {e}")
    g = torch.Generator().manual_seed(0)
    w1 = buf.as_strided((E, C, F), (F, SK, 1), OFF)
    w1.copy_(torch.randn(E, C, F, generator=g) * C ** -0.5)
    assert (C - 1) * w1.stride(1) >= 2 ** 31 > w1.stride(1)
    x = torch.randn(N, C, generator=g).to(dtype).to(device).requires_grad_()
    logits = torch.randn(N, E, generator=g).to(device)
    w2 = (torch.randn(E, F, C, generator=g) * F ** -0.5).to(dtype).to(device)
    res = vk.moe_ffn(x, logits, w1, w2, top_k=1, activation="gelu", backend=backend)
    (dx,) = torch.autograd.grad(res.out, x, torch.ones_like(res.out))
    xr = x.detach().float().requires_grad_()
    ref = vk.moe_ffn_reference(xr, logits.float(), w1.float(), w2.float(), top_k=1,
                               activation="gelu")
    (dxr,) = torch.autograd.grad(ref.out, xr, torch.ones_like(ref.out))
    torch.testing.assert_close(res.out.float(), ref.out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dx.float(), dxr, rtol=1e-2, atol=2e-2)


@pytest.mark.triton
@pytest.mark.skipif(vk.backends.why_unavailable("triton", "cpu") is not None,
                    reason="no Triton (interpreter) here")
def test_triton_grouped_gemms_operand_offsets_past_int32():
    """The raw Triton grouped GEMMs (``gmm``, ``gmm_wgrad``) take any strides of ``a``: a
    column stride that fits in int32 with ``(K - 1) * stride >= 2**31`` (a transposed buffer)
    gives what contiguous rows give. Lazily committed storage, as above."""
    from vidgen_kernels.triton_kernels import moe as TM
    P, K, M, E, SA, OFF = 32, 64, 32, 2, 2 ** 31 // 63 + 64, 2 ** 31
    try:
        buf = torch.empty(OFF + K * SA + 64, dtype=torch.float16)
    except RuntimeError as e:
        pytest.skip(f"cannot reserve the lazily committed storage: {e}")
    g = torch.Generator().manual_seed(0)
    a = buf.as_strided((P, K), (1, SA), OFF)
    a.copy_(torch.randn(P, K, generator=g))
    w = (torch.randn(E, K, M, generator=g) * K ** -0.5).half()
    dy = torch.randn(P, M, generator=g).half()
    offs = torch.tensor([12, P])
    torch.testing.assert_close(TM.gmm(a, w, offs), TM.gmm(a.contiguous(), w, offs))
    torch.testing.assert_close(TM.gmm_wgrad(a, dy, offs, E), TM.gmm_wgrad(a.contiguous(), dy, offs, E))


@pytest.mark.triton
@pytest.mark.skipif(vk.backends.why_unavailable("triton", "cpu") is not None,
                    reason="no Triton (interpreter) here")
def test_triton_gemm_tiles_by_gpu_kind_and_the_gemm_tiles_knob(monkeypatch):
    """The grouped GEMMs' tiles: 16-bit operands get tensor-core tiles by GPU kind (K step 64 on
    Hopper, 32 on the mma.sync GPUs; 64-row tiles when experts average < 128 rows; gated
    activations half the columns: two accumulators), fp32 the FMA tiles; ``gemm_tiles`` imposes
    others (the launches see them, the results do not change) and rejects bad ones."""
    from vidgen_kernels.triton_kernels import moe as TM
    bf = torch.empty(1, dtype=torch.bfloat16)
    f32 = torch.empty(1)
    assert TM._tiles("gmm", bf) == TM._TILES_INTERPRET["gmm"]  # the interpreter: small tiles
    monkeypatch.setattr(TM, "triton_interpret", lambda: False)
    for arch, bk in ((90, 64), (80, 32), (86, 32), (120, 32)):
        monkeypatch.setattr(TM, "target_arch", lambda t, arch=arch: arch)
        assert TM._tiles("gmm", bf, False, 512.0) == (128, 128, bk, 8, 3), arch
        assert TM._tiles("gmm", bf, True, 512.0) == (128, 64, bk, 8, 3), arch
        assert TM._tiles("gmm", bf, False, 64.0) == (64, 128, bk, 4, 3), arch
        assert TM._tiles("gmm", bf, True, 64.0) == (64, 64, bk, 4, 3), arch
        assert TM._tiles("gmm", bf, False, 127.9) == (64, 128, bk, 4, 3), arch
        assert TM._tiles("gmm", bf, False, 128.0) == (128, 128, bk, 8, 3), arch
        assert TM._tiles("wgrad", bf) == (128, 128, bk, 8, 3), arch
        assert TM._tiles("gmm", f32, False, 512.0) == (64, 64, 32, 4, 3)
        assert TM._tiles("gmm", f32, True, 512.0) == (64, 32, 32, 4, 3)
        assert TM._tiles("wgrad", f32) == (32, 64, 32, 4, 3)
    monkeypatch.undo()

    launches = []  # (kernel name, meta, grid) of every launch
    real_launch = TM.launch
    monkeypatch.setattr(TM, "launch", lambda k, grid, args, meta, dev: (
        launches.append((k.__name__, meta, grid)), real_launch(k, grid, args, meta, dev))[1])
    order = {"_gmm_kernel": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
             "_wgrad_kernel": ("BLOCK_K", "BLOCK_N", "BLOCK_R")}  # gemm_tiles' order

    def tiles_seen():
        out = [(name, *(meta[n] for n in order[name]), meta["num_warps"], meta["num_stages"])
               for name, meta, _ in launches]
        launches.clear()
        return out
    g = torch.Generator().manual_seed(0)
    P, K, Mo, E = 45, 40, 24, 3
    a, dy = torch.randn(P, K, generator=g), torch.randn(P, Mo, generator=g)
    w = torch.randn(E, K, Mo, generator=g)
    offs = torch.tensor([10, 10, P])
    seg = M.segment_ids(offs, P)
    want = torch.bmm(a.unsqueeze(1), w[seg]).squeeze(1)
    want_wg = torch.stack([a[seg == e].t() @ dy[seg == e] for e in range(E)])
    with TM.gemm_tiles(gmm=(32, 16, 16, 2, 1), wgrad=(16, 32, 16, 2, 1)):
        torch.testing.assert_close(TM.gmm(a, w, offs), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(TM.gmm_wgrad(a, dy, offs, E), want_wg, rtol=1e-5, atol=1e-4)
    seen = tiles_seen()
    assert seen == [("_gmm_kernel", 32, 16, 16, 2, 1), ("_wgrad_kernel", 16, 32, 16, 2, 1)], seen
    # launch orders: 5 row tiles (3 of them used) x 2 column blocks, in groups of 0 (column block
    # after column block), 1, 2 and 3 row tiles (partial last groups) and 8 (one group)
    for gm in (0, 1, 2, 3, 8):
        with TM.gemm_tiles(gmm=(32, 16, 16, 2, 1), group_m=gm):
            torch.testing.assert_close(TM.gmm(a, w, offs), want, rtol=1e-5, atol=1e-4)
    orders = [(meta["GROUP_M"], grid) for _, meta, grid in launches]
    launches.clear()
    assert orders == [(gm, (10,)) for gm in (0, 1, 2, 3, 8)], orders
    assert TM._group_m() == TM._GROUP_M == 8
    with TM.gemm_tiles(small=True):
        torch.testing.assert_close(TM.gmm(a, w, offs), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(TM.gmm_wgrad(a, dy, offs, E), want_wg, rtol=1e-5, atol=1e-4)
        assert TM._group_m() == 0  # and the first version's launch order
    seen = tiles_seen()
    assert seen == [("_gmm_kernel", 64, 64, 32, 4, 3), ("_wgrad_kernel", 32, 64, 32, 4, 3)], seen
    assert not TM._FORCED  # restored on exit
    for bad in (-1, 2.0, True, "8"):
        with pytest.raises(ValueError, match=r"gemm_tiles: group_m must be an int >= 0"):
            with TM.gemm_tiles(group_m=bad):
                pass
    for bad in ((128, 128, 48, 8, 3), (128, 128, 64, 8), (8, 128, 64, 8, 3), (128, 128, 64, 0, 3)):
        with pytest.raises(ValueError, match=r"gemm_tiles: gmm must be 5 positive ints"):
            with TM.gemm_tiles(gmm=bad):
                pass


# ----------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------
EDGE_BACKENDS = moe_backend_params((torch.float32,))


def _kernel_and_torch():
    return [pytest.param("torch", "cpu", torch.float32, id="torch-cpu-float32")] + EDGE_BACKENDS


@pytest.mark.parametrize("backend,device,dtype", _kernel_and_torch())
def test_empty_experts(backend, device, dtype):
    N, E = 12, 6
    lg = torch.randn(N, E, generator=torch.Generator().manual_seed(3))
    lg[:, 1] -= 100.0
    lg[:, 4] -= 100.0  # experts 1 and 4 receive nothing
    got = check(backend, dtype, N=N, E=E, top_k=2, logits=lg, device=device)
    assert got.tokens_per_expert[1].item() == 0 and got.tokens_per_expert[4].item() == 0


@pytest.mark.skipif(vk.backends.why_unavailable("cpu", "cpu") is not None, reason="no C++ CPU backend")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [3, 40, 700])
def test_cpu_grouped_gemm_schedules(rows, threads):
    """The C++ grouped GEMMs run small expert segments (E >= 2 threads, < 512 rows per expert
    on average) in parallel across experts, each GEMM on one thread, and large ones one after
    the other on all threads: both schedules (rows=3, 40 vs 700; one thread: always the second)
    give the per-expert products, with empty experts first, in the middle and last, and the
    whole layer's gradients match inside autograd (the worker threads must see the caller's
    grad mode: the out= GEMMs raised "functions with out=... arguments don't support automatic
    differentiation" when they did not)."""
    E, Kd, Md = 8, 16, 24
    counts = torch.tensor([0, rows, 2 * rows + 1, 0, rows, 1, rows + 2, 0])
    offs = counts.cumsum(0)
    P = int(offs[-1])
    g = torch.Generator().manual_seed(0)
    a, dy = torch.randn(P, Kd, generator=g), torch.randn(P, Md, generator=g)
    w, b = torch.randn(E, Kd, Md, generator=g), torch.randn(E, Md, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        K_ = M._CpuKernels  # the C++ kernels
        seg = M.segment_ids(offs, P)
        want = torch.bmm(a.unsqueeze(1), w[seg]).squeeze(1) + b[seg]
        torch.testing.assert_close(K_.gmm(a, w, offs, b), want, rtol=1e-5, atol=1e-5)
        want_wg = torch.stack([a[seg == e].t() @ dy[seg == e] for e in range(E)])
        torch.testing.assert_close(K_.gmm_wgrad(a, dy, offs, E), want_wg, rtol=1e-5, atol=1e-4)
        with torch.inference_mode():
            torch.testing.assert_close(K_.gmm(a, w, offs, None), want - b[seg], rtol=1e-5, atol=1e-5)
        check("cpu", torch.float32, N=max(P // 2, 1), E=E, top_k=2)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("backend,device,dtype", _kernel_and_torch())
def test_all_tokens_on_one_expert(backend, device, dtype):
    N, E = 10, 4
    lg = torch.randn(N, E, generator=torch.Generator().manual_seed(4))
    lg[:, 2] += 100.0
    got = check(backend, dtype, N=N, E=E, top_k=1, logits=lg, device=device)
    assert got.tokens_per_expert.tolist() == [0, 0, N, 0]


@pytest.mark.parametrize("backend,device,dtype", _kernel_and_torch())
def test_single_token(backend, device, dtype):
    check(backend, dtype, N=1, E=4, top_k=2, device=device)


@pytest.mark.parametrize("routing", ["router", "expert_index"])
@pytest.mark.parametrize("fn", ["moe_ffn", "moe_ffn_reference"])
@pytest.mark.parametrize("backend,device,dtype",
                         [pytest.param("reference", "cpu", torch.float32, id="reference")]
                         + EDGE_BACKENDS)
def test_empty_batch(backend, device, dtype, fn, routing):
    """Zero tokens (a batch of 0 or a sequence of length 0): an empty ``out``, losses 0, zero
    counts, and a backward that gives zero gradients to every input (an inf weight too: the
    graph goes through empty slices), on every backend and in nn.MoEFFN (it raised before)."""
    d = make(0, 8, 6, 3, "swiglu", dtype, device=device)
    with torch.no_grad():
        d["w1"][0, 0, 0] = float("inf")
    kw = {}
    if routing == "expert_index":
        d["router_logits"] = None
        kw["expert_index"] = torch.zeros(0, dtype=torch.long, device=device)
    for t in d.values():
        if t is not None:
            t.requires_grad_(True)
    x = d.pop("x").reshape(2, 0, 8)
    extra = {"backend": backend}
    if fn == "moe_ffn_reference":
        extra = {}
    fn = getattr(vk, fn)
    r = fn(x, d["router_logits"], d["w1"], d["w2"], b1=d["b1"], b2=d["b2"], top_k=2,
           activation="swiglu", **kw, **extra)
    assert r.out.shape == (2, 0, 8) and r.out.dtype == dtype
    assert r.aux_loss.item() == 0.0 and r.z_loss.item() == 0.0
    assert r.tokens_per_expert.tolist() == [0, 0, 0]
    names = [k for k in ("router_logits", "w1", "w2", "b1", "b2") if d[k] is not None]
    grads = torch.autograd.grad(r.out.sum() + r.aux_loss + r.z_loss, [x] + [d[k] for k in names])
    assert grads[0].shape == x.shape
    for k, g in zip(names, grads[1:]):
        assert g.shape == d[k].shape and not g.any(), k
    m = vk.nn.MoEFFN(8, 6, 3, 2, context_router=True, context_dim=4, device=device, dtype=dtype)
    m.backend = backend
    y = m(x.detach(), context=torch.randn(2, 1, 4, device=device, dtype=dtype))
    assert y.shape == (2, 0, 8) and m.aux_loss.item() == 0.0
    (y.sum() + m.aux_loss).backward()
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())


@pytest.mark.parametrize("backend,device,dtype", _kernel_and_torch())
def test_single_expert(backend, device, dtype):
    got = check(backend, dtype, N=7, E=1, top_k=1, device=device)
    assert got.tokens_per_expert.tolist() == [7]


@pytest.mark.parametrize("backend,device,dtype", _kernel_and_torch())
def test_tied_logits_lowest_index_wins(backend, device, dtype):
    N, E = 6, 5
    lg = torch.zeros(N, E)
    lg[0] = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0])  # three-way tie for the top: experts 1, 2
    lg[1] = torch.tensor([2.0, 2.0, 5.0, 2.0, 2.0])  # second place tied: 2, then 0
    got = check(backend, dtype, N=N, E=E, top_k=2, logits=lg, device=device)
    # all-zero rows pick experts 0 and 1: counts prove the tie-break of every row
    want = torch.zeros(E, dtype=torch.int64)
    for row in ([1, 2], [2, 0]) + ([0, 1],) * (N - 2):
        for e in row:
            want[e] += 1
    assert got.tokens_per_expert.cpu().tolist() == want.tolist()
    if backend != "torch":
        w, idx = torch.ops.vidgen_kernels.moe_route(lg.to(device), 2, True,
                                                    "torch" if backend == "reference" else backend)
        assert idx[0].tolist() == [1, 2] and idx[1].tolist() == [2, 0]
        assert idx[2].tolist() == [0, 1]


def test_tie_break_is_stable_sort_not_topk():
    """torch.topk does not promise an order among ties (on this CPU build it returned [1, 3] and
    [2, 4] below), so the implementations select with a stable descending sort: lowest index
    first."""
    lg = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [0.0] * 5])
    assert M._select(lg, 2).tolist() == [[1, 2], [0, 1]]
    assert M.kernel_route_torch(lg, 2, True)[1].tolist() == [[1, 2], [0, 1]]


@pytest.mark.parametrize("backend,device,dtype", _kernel_and_torch())
def test_expert_index_routing(backend, device, dtype):
    N, E = 9, 3
    ei = torch.tensor([0, 0, 2, 2, 2, 0, 2, 2, 0]).to(device)  # expert 1 unused
    got = check(backend, dtype, N=N, E=E, expert_index=ei, device=device)
    assert got.tokens_per_expert.tolist() == [4, 0, 5]


@pytest.mark.parametrize("backend", ["reference", "cpu", "torch"])
def test_expert_index_without_logits(backend):
    if backend == "cpu" and "cpu" not in vk.available_backends("cpu"):
        pytest.skip("cpu backend not built")
    d = make(8, 8, 16, 2, "silu", torch.float32)
    ei = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])
    res = backend_fn(backend)(d["x"], None, d["w1"], d["w2"], top_k=1, activation="silu",
                              b1=d["b1"], b2=d["b2"], expert_index=ei)
    # modality experts: each token through its own expert, weight 1
    for n in range(8):
        e = int(ei[n])
        h = torch.nn.functional.silu(d["x"][n] @ d["w1"][e] + d["b1"][e])
        torch.testing.assert_close(res.out[n], h @ d["w2"][e] + d["b2"][e], rtol=1e-5, atol=1e-5)
    assert res.aux_loss.item() == 0.0 and res.z_loss.item() == 0.0


@pytest.mark.parametrize("backend,device,dtype", _kernel_and_torch())
def test_no_renormalisation_and_batched_x(backend, device, dtype):
    d = make(10, 8, 16, 4, "gelu", dtype, device=device)
    x3 = d["x"].reshape(2, 5, 8)
    a = backend_fn(backend)(x3, d["router_logits"], d["w1"], d["w2"], top_k=2,
                            normalize_weights=False, activation="gelu", b1=d["b1"], b2=d["b2"])
    b = dense_moe(x3.double(), d["router_logits"].double(), d["w1"].double(), d["w2"].double(),
                  top_k=2, activation="gelu", b1=d["b1"].double(), b2=d["b2"].double(),
                  normalize_weights=False)
    assert a.out.shape == (2, 5, 8)
    torch.testing.assert_close(a.out.double(), b.out.to(device), rtol=1e-4, atol=1e-5)


def test_reference_and_dense_disagree_when_routing_differs():
    """The comparisons can fail: a different top_k changes the output."""
    d = make(11, 8, 16, 4, "gelu", torch.float64)
    a = vk.moe_ffn_reference(**d, top_k=2)
    b = dense_moe(**d, top_k=1, activation="gelu")
    assert (a.out - b.out).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# no per-expert Python loop: the number of ATen ops does not grow with E
# ----------------------------------------------------------------------------------------------
class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # at::mm calls made by the C++ cpu backend's grouped GEMM (its in-C++ expert loop) are
        # not counted: the check is about Python-level loops
        if func not in (torch.ops.aten.mm.out, torch.ops.aten.mm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _op_count(fn, E, backend_kw):
    d = make(16, 8, 16, E, "gelu", torch.float32, seed=2)
    ins = {k: (v.requires_grad_() if v is not None else v) for k, v in d.items()}
    with _CountOps() as m:
        res = fn(**ins, top_k=2, activation="gelu", **backend_kw)
        torch.autograd.grad(res.out.sum() + res.aux_loss, [ins["x"], ins["w1"], ins["router_logits"]])
    return m.count


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_op_count_independent_of_num_experts(backend):
    if backend != "torch":
        why = vk.backends.why_unavailable(backend, "cpu")
        if why:
            pytest.skip(why)
    f = backend_fn(backend)
    counts = [_op_count(f, E, {}) for E in (2, 4, 12)]
    assert counts[0] == counts[1] == counts[2], counts
    # the seed's loop does grow: the check can fail
    ref = [_op_count(vk.moe_ffn_reference, E, {}) for E in (2, 12)]
    assert ref[1] > ref[0]


class _ZeroFills(TorchDispatchMode):
    """Records the sizes of the tensors filled with zeros (zeros, zeros_like, zero_, fill_)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("zeros", "zeros_like", "zero_", "new_zeros", "fill_") and \
                isinstance(out, torch.Tensor):
            self.sizes.append(out.numel())
        return out


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_backward_makes_no_zero_pre_activation_gradient(backend):
    """The pre-activation is an output of the expert op only to be saved for backward: autograd
    must not materialise a [P, F] zero gradient for it (nor any buffer that large)."""
    if backend != "torch":
        why = vk.backends.why_unavailable(backend, "cpu")
        if why:
            pytest.skip(why)
    N, C, F, E = 16, 8, 24, 4
    d = make(N, C, F, E, "gelu", torch.float32, seed=4)
    ins = {k: (v.requires_grad_() if v is not None else v) for k, v in d.items()}
    res = backend_fn(backend)(**ins, top_k=2, activation="gelu")
    with _ZeroFills() as z:
        res.out.sum().backward()
    assert all(n < N * 2 * F for n in z.sizes), z.sizes


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_no_host_sync_cuda(backend):
    why = vk.backends.why_unavailable(backend, "cuda")
    if why:
        pytest.skip(why)
    d = make(64, 32, 64, 8, "swiglu", torch.bfloat16, device="cuda")
    ins = {k: (v.requires_grad_() if v is not None else v) for k, v in d.items()}
    # modality routing too (CogVideoX): its index range check is a device-side assert
    ei = torch.arange(64, device="cuda") % 8
    by_index = dict(ins, router_logits=None, expert_index=ei)

    def step():
        res = vk.moe_ffn(**ins, top_k=2, activation="swiglu", backend=backend)
        torch.autograd.grad(res.out.float().sum() + res.aux_loss + res.z_loss,
                            [ins["x"], ins["w1"], ins["w2"], ins["router_logits"]])
        res = vk.moe_ffn(**by_index, activation="swiglu", backend=backend)
        torch.autograd.grad(res.out.float().sum(), [ins["x"], ins["w1"], ins["w2"]])
    assert_no_host_sync(step)



@pytest.mark.parametrize("routing", ["router", "expert_index"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_meta_tensors(routing, activation):
    """On the meta device (model init / shape inference) ``moe_ffn`` gives every output's and
    gradient's shape, as the other ops do: ``auto`` runs the custom ops' fake implementations,
    since the reference loop needs the routing's values (it raised "Tensor.item() cannot be
    called on meta tensors"), and the ``expert_index`` range check is skipped there."""
    d = make(10, 16, 32, 4, activation, torch.float32)
    d = {k: v.to("meta").requires_grad_() for k, v in d.items()}
    kw = dict(top_k=2, activation=activation)
    if routing == "expert_index":
        d["router_logits"] = None
        kw = dict(activation=activation, expert_index=torch.zeros(10, dtype=torch.long,
                                                                  device="meta"))
    res = vk.moe_ffn(**d, **kw)
    assert res.out.shape == (10, 16) and res.out.is_meta
    assert res.tokens_per_expert.shape == (4,) and res.tokens_per_expert.dtype == torch.int64
    assert res.aux_loss.shape == () and res.z_loss.shape == ()
    (res.out.sum() + res.aux_loss + res.z_loss).backward()
    for k, v in d.items():
        if v is not None:
            assert v.grad is not None and v.grad.shape == v.shape, k
    m = vk.nn.MoEFFN(16, 32, 4, device="meta")
    assert m(torch.randn(2, 5, 16, device="meta")).shape == (2, 5, 16)
    # the reference, named or in force, and moe_ffn_reference itself (they raised the .item()
    # error: a meta-initialised MoEFFN under use_backend("reference") could not run)
    dd = {k: (v.detach() if v is not None else None) for k, v in d.items()}
    for res in (vk.moe_ffn(**dd, **kw, backend="reference"), vk.moe_ffn_reference(**dd, **kw)):
        assert res.out.shape == (10, 16) and res.out.is_meta and res.aux_loss.shape == ()
    with vk.use_backend("reference"):
        assert m(torch.randn(2, 5, 16, device="meta")).shape == (2, 5, 16)

# ----------------------------------------------------------------------------------------------
# custom ops: opcheck, torch.compile
# ----------------------------------------------------------------------------------------------
OPCHECK_BACKENDS = ["torch"] + [b for b in ("cpu",) if b in vk.available_backends("cpu")]


def _op_args(backend, activation="swiglu", bias=True):
    d = make(9, 8, 16, 3, activation, torch.float32, bias=bias, seed=5)
    w, idx = M.kernel_route_torch(d["router_logits"], 2, True)
    order, tok, pos, counts, offs = M.kernel_sort_torch(idx, 3)
    y = torch.randn(18, 8)
    return d, dict(w=w, idx=idx, order=order, tok=tok, pos=pos, offs=offs, y=y)


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(backend, bias):
    ops = torch.ops.vidgen_kernels
    d, a = _op_args(backend, bias=bias)
    rq = lambda t: t.clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(ops.moe_route.default, (rq(d["router_logits"]), 2, True, backend))
    torch.library.opcheck(ops.moe_sort.default, (a["idx"], 3, backend))
    torch.library.opcheck(ops.moe_unpermute.default,
                          (rq(a["y"]), rq(a["w"]), a["pos"], a["tok"], a["order"], backend))
    torch.library.opcheck(ops.moe_experts_fwd.default,
                          (rq(d["x"]), a["tok"], a["pos"], rq(d["w1"]),
                           rq(d["b1"]) if bias else None, rq(d["w2"]),
                           rq(d["b2"]) if bias else None, a["offs"], "swiglu", backend))


@pytest.mark.parametrize("backend", ["reference"] + OPCHECK_BACKENDS[1:])
def test_compile_fullgraph_fwd_bwd(backend):
    d = make(12, 8, 16, 4, "geglu", torch.float32, seed=6)

    def f(x, router_logits, w1, w2, b1, b2):
        res = vk.moe_ffn(x, router_logits, w1, w2, top_k=2, activation="geglu", b1=b1, b2=b2,
                         backend=backend)
        return res.out, res.aux_loss, res.z_loss

    if backend == "reference":
        pytest.skip("the seed's loop branches on mask.any() (data-dependent control flow): "
                    "not fullgraph-compilable by design")
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ins = [d[k].clone().requires_grad_() for k in leaves(d)]
    ins_c = [t.detach().clone().requires_grad_() for t in ins]
    want = f(*ins)
    got = compiled(*ins_c)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    gw = torch.autograd.grad(want[0].sum() + want[1] + want[2], ins)
    gg = torch.autograd.grad(got[0].sum() + got[1] + got[2], ins_c)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _bad(**over):
    d = make(6, 8, 16, 4, "gelu", torch.float32)
    kw = dict(top_k=2, activation="gelu")
    for k, v in over.items():
        (d if k in d else kw)[k] = v
    return d, kw


@pytest.mark.parametrize("fn", [vk.moe_ffn, vk.moe_ffn_reference], ids=["moe_ffn", "reference"])
@pytest.mark.parametrize("over,match", [
    (dict(w2=torch.randn(4, 12, 8)), "w1 must be"),
    (dict(w2=torch.randn(4, 16, 7)), "w2 must be"),
    (dict(w1=torch.randn(3, 8, 16)), "w2 must be"),
    (dict(w1=torch.randn(4, 9, 16)), "w1 must be"),
    (dict(top_k=5), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(router_logits=torch.randn(5, 4)), "router_logits must be"),
    (dict(router_logits=torch.randn(6, 3)), "router_logits must be"),
    (dict(expert_index=torch.tensor([0, 1, 2, 3, 4, 0])), "expert_index values"),
    (dict(expert_index=torch.tensor([0, 1, -1, 3, 2, 0])), "expert_index values"),
    (dict(expert_index=torch.tensor([0, 1, 2])), "expert_index must have"),
    (dict(activation="relu"), "activation"),
    (dict(b1=torch.randn(4, 8)), "b1 must be"),
    (dict(activation="swiglu"), "w1 must be"),
])
def test_bad_input(fn, over, match):
    d, kw = _bad(**over)
    with pytest.raises(ValueError, match=match):
        fn(**d, **kw)


def test_bad_types():
    d, kw = _bad()
    with pytest.raises(TypeError, match="w1 has dtype"):
        vk.moe_ffn(d["x"], d["router_logits"], d["w1"].double(), d["w2"], **kw)
    with pytest.raises(TypeError, match="expert_index must be an integer"):
        vk.moe_ffn(d["x"], d["router_logits"], d["w1"], d["w2"], expert_index=torch.zeros(6), **kw)
    with pytest.raises(ValueError, match="router_logits is required"):
        vk.moe_ffn(d["x"], None, d["w1"], d["w2"], **kw)


@pytest.mark.parametrize("N", [0, 6])
def test_backend_checked_for_any_batch(N):
    """``backend=`` is checked for an empty batch as for any other: an unknown name is a
    ValueError and a backend that cannot run here a BackendUnavailableError (zero tokens
    returned the empty result before the backend was looked at)."""
    d = make(N, 8, 16, 4, "gelu", torch.float32)
    with pytest.raises(ValueError, match=r"moe_ffn\(backend=\) must be one of"):
        vk.moe_ffn(**d, backend="bogus")
    missing = next((b for b in ("triton", "cuda") if b not in vk.available_backends("cpu")), None)
    if missing is None:
        pytest.skip("triton and cuda both run here")
    with pytest.raises(vk.BackendUnavailableError, match=f"backend '{missing}' cannot run here"):
        vk.moe_ffn(**d, backend=missing)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_expert_index_out_of_range_raises(backend):
    """Compiled, an out-of-range ``expert_index`` still raises (the eager ValueError's range
    check runs there as an assert in the graph): the compiled reference loop dropped such
    tokens silently (zero rows, ``tokens_per_expert`` with E + 1 entries)."""
    if backend not in vk.available_backends("cpu"):
        pytest.skip(f"{backend} backend not built")
    d, kw = _bad()
    torch._dynamo.reset()
    f = torch.compile(lambda x, ei: vk.moe_ffn(x, None, d["w1"], d["w2"], expert_index=ei,
                                                backend=backend, **kw),
                      fullgraph=backend != "reference")  # (the seed's loop: mask.any() breaks)
    ok = torch.tensor([0, 1, 2, 3, 1, 0])
    torch.testing.assert_close(f(d["x"], ok).out,
                               vk.moe_ffn_reference(d["x"], None, d["w1"], d["w2"],
                                                    expert_index=ok, **kw).out)
    with pytest.raises(RuntimeError, match=r"expert_index values must be in \[0, E=4\)"):
        f(d["x"], torch.tensor([0, 1, 4, 4, 1, 0]))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.bool,
                                   torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("fn", [vk.moe_ffn, vk.moe_ffn_reference], ids=["moe_ffn", "reference"])
def test_expert_index_dtype(fn, dtype):
    """expert_index of a dtype without min / max / index kernels (uint16 / uint32 / uint64,
    which once got past the check and crashed in ``min()`` with NotImplementedError), bool or
    floating: a TypeError naming the argument, the dtype and the accepted ones; every accepted
    integer dtype routes as int64 does."""
    d, kw = _bad()
    idx = torch.tensor([0, 1, 2, 3, 1, 0])
    with pytest.raises(TypeError, match=r"expert_index must be an integer tensor \[N\] of dtype "
                       r"uint8, int8, int16, int32, int64, got " + str(dtype)):
        fn(d["x"], None, d["w1"], d["w2"], expert_index=idx.to(dtype), **kw)
    want = fn(d["x"], None, d["w1"], d["w2"], expert_index=idx, **kw).out
    for ok in M.INDEX_DTYPES:
        got = fn(d["x"], None, d["w1"], d["w2"], expert_index=idx.to(ok), **kw).out
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + OPCHECK_BACKENDS[1:])
def test_moeffn_module(backend):
    torch.manual_seed(0)
    m = vk.nn.MoEFFN(8, 16, 4, 2, "gelu", shared_expert=True, backend=backend)
    x = torch.randn(2, 5, 8)
    out = m(x)
    assert out.shape == x.shape
    assert m.aux_loss.shape == () and m.z_loss.shape == () and m.tokens_per_expert.sum() == 20
    # = routed part + shared expert
    logits = m.router(x).reshape(-1, 4)
    ref = vk.moe_ffn_reference(x, logits, m.w1, m.w2, top_k=2, b1=m.b1, b2=m.b2).out
    ref = ref + m.shared_fc2(torch.nn.functional.gelu(m.shared_fc1(x), approximate="tanh"))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (out.sum() + m.aux_loss + m.z_loss).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name


def test_moeffn_context_router():
    torch.manual_seed(1)
    m = vk.nn.MoEFFN(8, 16, 4, 2, "swiglu", shared_expert=False, context_router=True,
                     context_dim=6)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 1, 6)
    base = m(x, ctx)
    with torch.no_grad():  # zero-initialised projection: the plain router at first
        plain = vk.moe_ffn(x, m.router(x).reshape(-1, 4), m.w1, m.w2, top_k=2,
                           activation="swiglu", b1=m.b1, b2=m.b2).out
    torch.testing.assert_close(base, plain)
    with torch.no_grad():
        m.context_proj.weight.normal_()
    moved = m(x, ctx)
    logits = m.router(x + m.context_proj(ctx)).reshape(-1, 4)
    want = vk.moe_ffn_reference(x, logits, m.w1, m.w2, top_k=2, activation="swiglu", b1=m.b1,
                                b2=m.b2).out
    torch.testing.assert_close(moved, want, rtol=1e-5, atol=1e-5)
    moved.sum().backward()
    assert m.context_proj.weight.grad is not None and m.context_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="context"):
        m(x)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_autocast_casts_operands_like_linear(backend):
    """Under ``torch.autocast`` (bf16 on CPU) x, w1, w2, b1, b2 are cast to the autocast dtype
    first, as ``F.linear``'s operands are: the result equals the call on explicitly cast
    operands, has that dtype, and the fp32 master weights get fp32 gradients (before, fp32
    weights with the bf16 activations of an autocast region raised a TypeError)."""
    if backend == "cpu" and "cpu" not in vk.available_backends(torch.device("cpu")):
        pytest.skip("cpu backend not built")
    d = make(37, 24, 40, 4, "swiglu", torch.float32)
    d["x"] = d["x"].bfloat16()  # what a bf16-autocast region hands the MoE
    lv = {k: d[k].clone().requires_grad_() for k in leaves(d)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vk.moe_ffn(**lv, top_k=2, activation="swiglu", backend=backend)
    assert got.out.dtype == torch.bfloat16
    cast = {k: (v.detach().bfloat16() if k != "router_logits" else v.detach()).requires_grad_()
            for k, v in lv.items()}
    want = vk.moe_ffn(**cast, top_k=2, activation="swiglu", backend=backend)
    torch.testing.assert_close(got.out, want.out, rtol=0, atol=0)
    cot = torch.randn(got.out.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    (got.out.float() * cot).sum().backward()
    (want.out.float() * cot).sum().backward()
    for k in lv:
        assert lv[k].grad.dtype == lv[k].dtype, k
        torch.testing.assert_close(lv[k].grad, cast[k].grad.to(lv[k].dtype), rtol=0, atol=0)


@pytest.mark.parametrize("activation", ALL_ACTS)
def test_moeffn_deepcopy_and_pickle_after_a_step(activation):
    """After a forward and backward (``aux_loss``, ``z_loss``, ``last_output`` still attached
    to the graph) the module deep-copies (an EMA copy mid-training), pickles and round-trips
    through ``torch.save`` / ``torch.load``, for every activation (the shared expert's
    activation was once a lambda / closure): each copy computes what the original does, and
    starts without the last call's results."""
    torch.manual_seed(0)
    m = vk.nn.MoEFFN(8, 6, 3, 2, activation, shared_expert=True)
    with torch.no_grad():
        m.b1.normal_()
    x = torch.randn(2, 5, 8)
    (m(x).sum() + m.aux_loss + m.z_loss).backward()
    assert m.aux_loss.grad_fn is not None  # the case that deepcopy used to reject
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    copies = {"deepcopy": copy.deepcopy(m), "pickle": pickle.loads(pickle.dumps(m)),
              "torch.save": torch.load(buf, weights_only=False)}
    want = m(x)
    for how, c in copies.items():
        assert c is not m and c.w1 is not m.w1, how
        assert c.aux_loss is None and c.z_loss is None and c.last_output is None, how
        assert c.tokens_per_expert is None, how
        for (n, p), q in zip(m.named_parameters(), c.parameters()):
            assert torch.equal(p, q), f"{how}: {n}"
        got = c(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda s: f"{how}: {s}")
        torch.testing.assert_close(c.aux_loss, m.aux_loss, rtol=0, atol=0)
        c.zero_grad(set_to_none=True)
        got.sum().backward()  # the copy trains on its own
        assert c.w1.grad is not None and c.w1.grad.abs().sum() > 0, how
    # the original keeps its own last results
    assert m.aux_loss is not None and m.last_output is not None


def test_moeffn_deepcopy_with_parametrized_experts():
    """``copy.deepcopy`` after a forward also with a parametrization on the module's own expert
    weights (``weight_norm``, LoRA): torch re-classes such a module and its ``__deepcopy__``
    copied ``__dict__`` as it was, graph-attached ``aux_loss`` included ("Only Tensors created
    explicitly by the user ... support the deepcopy protocol"). The copy computes what the
    original does and keeps its own parametrization."""
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    m = vk.nn.MoEFFN(8, 6, 3, 2, shared_expert=False)
    weight_norm(m, "w1", dim=0)
    x = torch.randn(2, 5, 8)
    (m(x).sum() + m.aux_loss).backward()
    c = copy.deepcopy(m)
    assert c.aux_loss is None and c.last_output is None
    assert c.parametrizations.w1.original0 is not m.parametrizations.w1.original0
    torch.testing.assert_close(c(x), m(x), rtol=0, atol=0)
    with torch.no_grad():
        c.parametrizations.w1.original0.mul_(2)  # the magnitude g
    assert not torch.equal(c.w1, m.w1)


def test_copyable_losses_mixin_deepcopy_with_a_parametrization():
    """The models' mixin: the same with a parametrization on a model's own parameter."""
    from torch.nn.utils import parametrize
    from vidgen.models.layers import CopyableLossesMixin

    class Tiny(CopyableLossesMixin, torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            y = x @ self.w
            self.aux_loss = y.square().mean()
            return y

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w
    m = Tiny()
    parametrize.register_parametrization(m, "w", Double())
    x = torch.randn(2, 3)
    m(x).sum().backward()
    c = copy.deepcopy(m)
    assert c.aux_loss.grad_fn is None and torch.equal(c.aux_loss, m.aux_loss.detach())
    torch.testing.assert_close(c(x), m(x), rtol=0, atol=0)

def test_moeffn_factory_kwargs_and_context_errors():
    """nn.MoEFFN takes device= / dtype= like the other modules (it raised a TypeError), and a
    context of the wrong width or one that does not broadcast to x raises a ValueError naming
    context (a RuntimeError from the projection, or a message about router_logits the user
    never passed)."""
    m = vk.nn.MoEFFN(8, 16, 4, 2, context_router=True, context_dim=6, dtype=torch.float64,
                     device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    assert m(x, torch.randn(2, 1, 6, dtype=torch.float64)).shape == x.shape
    with pytest.raises(ValueError, match="context must be \\[..., context_dim=6\\]"):
        m(x, torch.randn(2, 1, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="context \\(4, 1, 6\\) does not broadcast"):
        m(x, torch.randn(4, 1, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m([1.0])
    # x / context of another dtype than the module's: a TypeError naming them (torch's "expected
    # m1 and m2 to have the same dtype" named neither); under autocast the dtypes may differ
    with pytest.raises(TypeError, match=r"MoEFFN: x has dtype torch.float32 but the module's "
                       r"parameters are torch.float64: pass x.to\(torch.float64\)"):
        m(x.float(), torch.randn(2, 1, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"MoEFFN: context has dtype torch.float32 but"):
        m(x, torch.randn(2, 1, 6))
    m32 = vk.nn.MoEFFN(8, 16, 4, 2, context_router=True, context_dim=6)
    with torch.autocast("cpu", torch.bfloat16):
        assert m32(x.float().bfloat16(), torch.randn(2, 1, 6)).dtype == torch.bfloat16


def test_moeffn_reset_parameters_after_meta_init():
    """Build on meta, ``to_empty``, ``reset_parameters()`` on every module (parents first): the
    expert weights get the construction-time init (std 1/sqrt(fan_in), zero biases; they had no
    reset and stayed uninitialised) and ``context_proj`` stays zero (a plain Linear child was
    re-randomised after the parent's reset)."""
    make = lambda d: vk.nn.MoEFFN(64, 96, 4, 2, activation="swiglu", context_router=True,  # noqa: E731
                                  context_dim=32, device=d)
    m = meta_init(make)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert m.context_proj.weight.abs().sum() == 0 and m.b1.abs().sum() == 0 and m.b2.abs().sum() == 0
    fresh = make("cpu")
    assert set(dict(m.named_parameters())) == set(dict(fresh.named_parameters()))
    for name in ("w1", "w2"):  # std 1/sqrt(fan_in) within sampling error (49k / 25k samples)
        got, want = getattr(m, name).std().item(), getattr(fresh, name).std().item()
        assert abs(got / want - 1) < 0.05, (name, got, want)
    x = torch.randn(5, 64)
    assert torch.isfinite(m(x, torch.randn(5, 32))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_grouped_gemms_pad_instead_of_gathering(dtype, monkeypatch):
    """The PyTorch grouped GEMMs (the create_graph / forward-AD recomputation, and the cuda
    backend's fallback) at sizes whose rows are not 16-byte multiples (odd P = N * top_k, C or F
    not a multiple of 4 / 8) ran a per-row product against gathered expert matrices, an
    ``[P, K, M]`` tensor (tens of GB at N = 4097, C = 1152, F = 4608). They now run
    ``torch._grouped_mm`` on zero-padded copies: same results, no gather (segment_ids, which
    only the gather path calls without a bias, raises here)."""
    g = torch.Generator().manual_seed(0)
    P, K, Mo, E = 13, 7, 9, 3
    a, dy = torch.randn(P, K, generator=g), torch.randn(P, Mo, generator=g)
    w = torch.randn(E, K, Mo, generator=g)
    offs = torch.tensor([4, 4, P])  # an empty expert in the middle
    bounds = [(0, 4), (4, 4), (4, P)]
    want_y = torch.cat([a[s:e] @ w[i] for i, (s, e) in enumerate(bounds)])
    want_dw = torch.stack([a[s:e].t() @ dy[s:e] for s, e in bounds])
    a, dy, w = a.to(dtype), dy.to(dtype), w.to(dtype)

    def no_gather(*args):
        raise AssertionError("gathered [P, K, M] expert matrices")
    monkeypatch.setattr(M, "segment_ids", no_gather)
    y = M.kernel_gmm_torch(a, w, offs)
    dw = M.kernel_gmm_wgrad_torch(a, dy, offs, E)
    assert y.shape == (P, Mo) and y.dtype == dtype and dw.shape == (E, K, Mo) and dw.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y.float(), want_y, **tol)
    torch.testing.assert_close(dw.float(), want_dw, **tol)
    # differentiable (the create_graph path differentiates through it)
    a32, w32 = a.float().requires_grad_(), w.float().requires_grad_()
    M.kernel_gmm_torch(a32, w32, offs).mul(dy.float()).sum().backward()
    torch.testing.assert_close(w32.grad, want_dw if dtype == torch.float32 else w32.grad)
    assert a32.grad.shape == (P, K)
