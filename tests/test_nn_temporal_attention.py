"""CausalTemporalAttention against a straightforward permute-based implementation with the same
weights, streaming with a k/v cache against one full call, torch.compile(fullgraph=True)."""
from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import vidgen_kernels as vk
from test_temporal_attention import diffusers_rope, diffusers_rope_tables, kernel_missing
from vidgen_kernels.nn import CausalTemporalAttention, TemporalKVCache


def _backends():
    out = [pytest.param("reference")]
    for b in ("cpu", "triton"):
        why = kernel_missing(b)
        marks = [pytest.mark.skip(reason=f"{b}: {why}")] if why else []
        if b == "triton":
            marks.append(pytest.mark.triton)
        out.append(pytest.param(b, marks=marks))
    return out


BACKENDS = _backends()


def naive(m: CausalTemporalAttention, x, T, S):
    """The seed design: project, permute to [B, S, H, T, D], norm, RoPE (diffusers' formula on
    [T, D] tables), SDPA, permute back, project."""
    B, N, C = x.shape
    H, D = m.num_heads, m.head_dim
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(B, T, S, 3, H, D)
    q, k, v = qkv.permute(3, 0, 2, 4, 1, 5)  # each [B, S, H, T, D]
    if m.qk_norm == "layer":
        q = F.layer_norm(q, (D,), m.norm_q.weight, m.norm_q.bias, m.norm_q.eps)
        k = F.layer_norm(k, (D,), m.norm_k.weight, m.norm_k.bias, m.norm_k.eps)
    elif m.qk_norm == "rms":
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + m.norm_q.eps) * m.norm_q.weight
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + m.norm_k.eps) * m.norm_k.weight
    if m.rope:
        # the op takes float32 tables (the layer builds them in float64, rounds to float32)
        cos, sin = (t.float().to(x.dtype)
                    for t in diffusers_rope_tables(T, D, m.rope_theta, m.interleaved))
        q = diffusers_rope(q, cos, sin, m.interleaved)
        k = diffusers_rope(k, cos, sin, m.interleaved)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=m.causal)
    return F.linear(o.permute(0, 3, 1, 2, 4).reshape(B, N, C), m.proj.weight, m.proj.bias)


def make(qk_norm=None, rope=True, causal=True, interleaved=True, bias=True, C=64, H=2,
         dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = CausalTemporalAttention(C, H, qk_norm=qk_norm, rope=rope, causal=causal,
                                interleaved=interleaved, bias=bias, rope_theta=100.0, dtype=dtype)
    for mod in (m.norm_q, m.norm_k):  # not the identity init: make the test see the weights
        if mod is not None:
            torch.nn.init.normal_(mod.weight, 1.0, 0.3)
            if getattr(mod, "bias", None) is not None:
                torch.nn.init.normal_(mod.bias, 0.0, 0.3)
    return m


CONFIGS = [
    dict(qk_norm=None, rope=True, causal=True, interleaved=True),
    dict(qk_norm="rms", rope=True, causal=True, interleaved=False),
    dict(qk_norm="layer", rope=True, causal=False, interleaved=True, bias=False),
    dict(qk_norm="rms", rope=False, causal=True),
    dict(qk_norm=None, rope=False, causal=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_naive(backend, cfg):
    """Forward and gradients (input and every parameter) against the permute-based layer in
    float64 (reference backend) or float32 (kernel backends)."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    m = make(dtype=dtype, **cfg)
    B, T, S = (1, 6, 3) if backend == "triton" else (2, 6, 5)
    x = torch.randn(B, T * S, m.dim, dtype=dtype, requires_grad=True)
    with vk.use_backend(backend):
        out = m(x, T, S)
    ref = naive(m, x, T, S)
    torch.testing.assert_close(out, ref, **tol)
    cot = torch.randn_like(out)
    params = [x] + [p for p in m.parameters()]
    g = torch.autograd.grad(out, params, cot)
    gr = torch.autograd.grad(ref, params, cot)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for n, a, b in zip(names, g, gr):
        torch.testing.assert_close(a, b, **tol, msg=lambda s: f"grad {n}: {s}")


@pytest.mark.parametrize("chunks", [(1, 1, 1, 1, 1), (2, 1, 2), (3, 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_equals_full(backend, chunks):
    """Frames fed a few at a time through a TemporalKVCache give the full call's outputs, and
    the cache ends up holding every frame's keys/values."""
    m = make(qk_norm="rms", rope=True, causal=True, interleaved=False)
    B, S = 2, 3
    T = sum(chunks)
    x = torch.randn(B, T * S, m.dim)
    with vk.use_backend(backend), torch.no_grad():
        full = m(x, T, S)
        cache = TemporalKVCache()
        outs, t0 = [], 0
        for n in chunks:
            outs.append(m(x[:, t0 * S:(t0 + n) * S], n, S, kv_cache=cache))
            t0 += n
            assert cache.num_frames == t0
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.k.shape == (B, T, S, m.num_heads, m.head_dim)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(outs, dim=1), naive(m, x, T, S), rtol=2e-4, atol=2e-5)


def test_streaming_gradients_flow():
    """The cache keeps autograd history: a loss on the last chunk reaches earlier frames."""
    m = make(rope=True)
    B, S, T = 1, 2, 4
    x = torch.randn(B, T * S, m.dim, requires_grad=True)
    full = m(x, T, S)
    cache = TemporalKVCache()
    m(x[:, :3 * S], 3, S, kv_cache=cache)
    last = m(x[:, 3 * S:], 1, S, kv_cache=cache)
    (g,) = torch.autograd.grad(last.sum(), x)
    (gf,) = torch.autograd.grad(full[:, 3 * S:].sum(), x)
    torch.testing.assert_close(g, gf, rtol=1e-5, atol=1e-6)
    assert g[:, :3 * S].abs().sum() > 0


def test_streaming_under_activation_checkpointing():
    """``torch.utils.checkpoint`` (non-reentrant) around each streaming call: the recompute in
    backward reads the frames before its call's offset and leaves the cache alone, so the
    gradients equal the un-checkpointed ones exactly (the recompute used to append the frames a
    second time: CheckpointError on the saved shapes). A cache reset between forward and
    backward raises a RuntimeError naming the cache; the cache pickles without its offsets."""
    from torch.utils.checkpoint import checkpoint
    m = make(qk_norm="rms").double()
    S = 3
    xs = [torch.randn(1, n * S, m.dim, dtype=torch.float64, requires_grad=True) for n in (2, 1, 3)]

    def run(ckpt, reset=False):
        cache = TemporalKVCache()
        outs = []
        for x in xs:
            n = x.shape[1] // S
            f = lambda x, n=n: m(x, n, S, kv_cache=cache)  # noqa: E731
            outs.append(checkpoint(f, x, use_reentrant=False) if ckpt else f(x))
        assert cache.num_frames == 6
        if reset:
            cache.reset()
        loss = sum((o.sin() * (i + 1)).sum() for i, o in enumerate(outs))
        return torch.autograd.grad(loss, xs + list(m.parameters())), cache

    want, _ = run(False)
    got, cache = run(True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cache.num_frames == 6 and len(cache.offsets) == 3
    assert pickle.loads(pickle.dumps(TemporalKVCache(cache.k.detach(), cache.v.detach(),
                                                     dict(cache.offsets)))).offsets == {}
    with pytest.raises(RuntimeError, match="cache no longer holds the frames"):
        run(True, reset=True)



def test_streaming_checkpoint_of_a_block_with_context_fn():
    """The usual block layout, ``x + attn(norm(x), ...)`` under checkpoint: the attention's
    input is made inside the checkpointed function, so a recompute cannot find its call by that
    input. Without help it raises, naming the remedy; with
    ``context_fn=TemporalKVCache.checkpoint_contexts`` the recompute replays the forward's
    offsets and the gradients equal the un-checkpointed ones exactly (two layers, each with its
    own cache, in one checkpointed function)."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    m1, m2 = make(qk_norm="rms").double(), make().double()
    norm = torch.nn.LayerNorm(m1.dim).double()
    S = 3
    xs = [torch.randn(1, n * S, m1.dim, dtype=torch.float64, requires_grad=True)
          for n in (2, 1, 3)]

    def run(ckpt, **kw):
        c1, c2 = TemporalKVCache(), TemporalKVCache()
        outs = []
        for x in xs:
            n = x.shape[1] // S

            def f(x, n=n):
                h = x + m1(norm(x), n, S, kv_cache=c1)
                return h + m2(norm(h), n, S, kv_cache=c2)
            outs.append(checkpoint(f, x, use_reentrant=False, **kw) if ckpt else f(x))
        loss = sum((o.sin() * (i + 1)).sum() for i, o in enumerate(outs))
        params = xs + list(m1.parameters()) + list(m2.parameters()) + list(norm.parameters())
        return torch.autograd.grad(loss, params)

    want = run(False)
    got = run(True, context_fn=TemporalKVCache.checkpoint_contexts)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="context_fn=TemporalKVCache.checkpoint_contexts"):
        run(True)

def test_streaming_under_torch_func_grad():
    """A streaming call inside ``torch.func.grad`` (its tensors have no storage, so the
    checkpoint bookkeeping is skipped): the gradient of the new frames' output equals autograd's
    (the bookkeeping's data_ptr() raised there)."""
    m = make().double()
    S = 2
    x = torch.randn(1, 3 * S, m.dim, dtype=torch.float64)
    cache = TemporalKVCache()
    with torch.no_grad():
        m(x[:, :2 * S], 2, S, kv_cache=cache)
    got = torch.func.grad(lambda t: m(t, 1, S, kv_cache=TemporalKVCache(cache.k, cache.v)).sum())(
        x[:, 2 * S:])
    xt = x[:, 2 * S:].clone().requires_grad_(True)
    (want,) = torch.autograd.grad(m(xt, 1, S, kv_cache=TemporalKVCache(cache.k, cache.v)).sum(), xt)
    torch.testing.assert_close(got, want)


def test_rope_tables_of_an_inference_call_serve_training():
    """A first call under ``torch.inference_mode`` (sampling before more training) builds the
    layer's RoPE tables as ordinary tensors: the next training call saves them for backward
    (they were cached as inference tensors: "Inference tensors cannot be saved for
    backward"). Under a fake mode the tables are built there and not cached."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    m = CausalTemporalAttention(32, 2, rope=True)
    x = torch.randn(1, 3 * 5, 32)
    with torch.inference_mode():
        m(x, 3, 5)
    m(x, 3, 5).sum().backward()
    assert m.qkv.weight.grad is not None
    m2 = CausalTemporalAttention(32, 2, rope=True)
    with FakeTensorMode():
        assert isinstance(m2.rope_tables(4, "cpu")[0], FakeTensor)
    assert not m2._rope_cache and not isinstance(m2.rope_tables(4, "cpu")[0], FakeTensor)


def test_checkpoint_of_one_input_passed_to_two_calls():
    """The same input tensor passed to two checkpointed calls that read one cache (a repeated
    conditioning frame): the recompute cannot tell the calls apart by the input's storage. It
    raises the module's RuntimeError pointing to ``context_fn`` (it used to read the other
    call's frames: torch's CheckpointError on mismatched shapes); with ``context_fn`` the
    gradients equal the un-checkpointed ones exactly. An input whose tensor was freed and its
    storage reused by a later call is not ambiguous (its entry is replaced)."""
    from torch.utils.checkpoint import checkpoint
    m = make(qk_norm="rms").double()
    x = torch.randn(1, 2 * 3, m.dim, dtype=torch.float64, requires_grad=True)

    def run(ckpt, **kw):
        cache = TemporalKVCache()
        f = lambda x: m(x, 2, 3, kv_cache=cache)  # noqa: E731
        outs = [checkpoint(f, x, use_reentrant=False, **kw) if ckpt else f(x) for _ in range(2)]
        loss = (outs[0].sin() + 2 * outs[1].cos()).sum()
        return torch.autograd.grad(loss, [x] + list(m.parameters()))

    with pytest.raises(RuntimeError, match="cannot tell which of several calls.*context_fn"):
        run(True)
    # the attention's input a view made inside the checkpointed function: the view dies after
    # the forward but its base lives on, so the calls are still told to be ambiguous
    cache = TemporalKVCache()
    x4 = x.detach().view(1, 2, 3, m.dim).requires_grad_()
    f4 = lambda x4: m(x4.flatten(1, 2), 2, 3, kv_cache=cache)  # noqa: E731
    outs = [checkpoint(f4, x4, use_reentrant=False) for _ in range(2)]
    with pytest.raises(RuntimeError, match="cannot tell which of several calls"):
        torch.autograd.grad((outs[0].sin() + 2 * outs[1].cos()).sum(), x4)
    want = run(False)
    for a, b in zip(run(True, context_fn=TemporalKVCache.checkpoint_contexts), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cache = TemporalKVCache()
    y = torch.randn(1, 3, m.dim, dtype=torch.float64, requires_grad=True)
    key = (y.data_ptr(), tuple(y.shape), tuple(y.stride()), y.dtype, y.device)
    for _ in range(3):  # a dead owner: the entry is replaced, not marked ambiguous
        m(y, 1, 3, kv_cache=cache)
        cache.owners[key] = lambda: None  # as if y had been freed and its storage reused
    assert cache.offsets == {key: 2}


def test_cache_offsets_are_bounded():
    """The offsets recorded for checkpoint recomputes keep at most MAX_OFFSETS calls (the oldest
    forgotten), so a long grad-enabled stream does not grow the cache's bookkeeping without
    bound."""
    m = make()
    cache = TemporalKVCache()
    cache.MAX_OFFSETS = 3
    xs = [torch.randn(1, 2, m.dim, requires_grad=True) for _ in range(5)]
    for x in xs:
        m(x, 1, 2, kv_cache=cache)
    assert len(cache.offsets) == 3 and sorted(cache.offsets.values()) == [2, 3, 4]


def test_cache_rejects_mismatched_frames():
    m = make()
    cache = TemporalKVCache()
    m(torch.randn(1, 2 * 3, m.dim), 2, 3, kv_cache=cache)
    with pytest.raises(ValueError, match="TemporalKVCache: the cache holds .* S, H, D"):
        m(torch.randn(1, 1 * 4, m.dim), 1, 4, kv_cache=cache)
    cache.reset()
    assert cache.num_frames == 0


def test_cache_append_checks_v():
    """``TemporalKVCache.append`` checks v against k on every call, the first included (it
    checked only the new k against the cached k: a v of another dtype was promoted by
    ``torch.cat``, k and v frame counts diverged, and the error came from the next attention
    call), and that both are 5-D tensors; a bad call leaves the cache as it was."""
    k = torch.randn(1, 2, 3, 2, 16)
    for kk, vv, match in ((k, k[:, :1], "k and v must have one shape"),
                          (k, k.double(), r"k and v must have one shape, dtype and device, got "
                                          r"k \(1, 2, 3, 2, 16\) \(torch.float32, cpu\) and v "
                                          r"\(1, 2, 3, 2, 16\) \(torch.float64"),
                          (k[0], k[0], r"k must be a \[B, T_new, S, H, D\] tensor, got shape"),
                          (k, [1.0], r"v must be a \[B, T_new, S, H, D\] tensor, got list")):
        cache = TemporalKVCache()
        with pytest.raises(ValueError, match=match):
            cache.append(kk, vv)
        assert cache.num_frames == 0
        cache.append(k, k + 1)
        with pytest.raises(ValueError, match=match):
            cache.append(kk, vv)
        assert cache.num_frames == 2 and torch.equal(cache.v, k + 1)
    assert cache.append(k, k + 2)[1].shape == (1, 4, 3, 2, 16)
    # a cache built with frames is checked the same way (a list raised AttributeError, a lone
    # k a TypeError from torch.cat, at the layer's first call)
    for kk, vv, match in ((k, k[:, :1], "k and v must have one shape"),
                          ([1.0], [1.0], r"k must be a \[B, T_new, S, H, D\] tensor, got list"),
                          (k, None, r"v must be a \[B, T_new, S, H, D\] tensor, got NoneType"),
                          (None, k, r"k must be a \[B, T_new, S, H, D\] tensor, got NoneType")):
        with pytest.raises(ValueError, match=match):
            TemporalKVCache(kk, vv)
    assert TemporalKVCache(k, k + 1).num_frames == 2 and TemporalKVCache().num_frames == 0


def test_failed_call_leaves_the_cache_unchanged():
    """A streaming call whose attention raises (here: a named backend without float64) adds
    nothing to the cache, so a retry gives the full call's frames; the frames used to be
    appended before the attention ran, and the retry then saw them twice at shifted RoPE
    positions (error 0.2)."""
    if kernel_missing("cpu"):
        pytest.skip(kernel_missing("cpu"))
    torch.manual_seed(0)
    m = make().double()
    S = 2
    x = torch.randn(1, 3 * S, m.dim, dtype=torch.float64)
    cache = TemporalKVCache()
    with torch.no_grad():
        m(x[:, :S], 1, S, kv_cache=cache)
        with vk.use_backend("cpu"), pytest.raises(vk.BackendUnavailableError, match="float64"):
            m(x[:, S:2 * S], 1, S, kv_cache=cache)
        assert cache.num_frames == 1
        steps = [m(x[:, t * S:(t + 1) * S], 1, S, kv_cache=cache) for t in (1, 2)]
        torch.testing.assert_close(torch.cat(steps, 1), m(x, 3, S)[:, S:])
    assert cache.num_frames == 3


def test_rope_tables_built_once():
    m = make(C=32, H=2)
    c1, s1 = m.rope_tables(5, "cpu")
    c2, _ = m.rope_tables(5, "cpu")
    c3, _ = m.rope_tables(3, "cpu")
    assert c1.data_ptr() == c2.data_ptr() == c3.data_ptr(), "shorter/equal T reuse the table"
    assert c1.shape == (5, 8) and c1.dtype == torch.float32 and c1.is_contiguous()
    c4, s4 = m.rope_tables(7, "cpu")  # longer: rebuilt (doubled), same values for the prefix
    assert c4.shape == (7, 8) and m._rope_cache[("cpu", None)][0].shape[0] == 10
    assert torch.equal(c4[:5], c1) and torch.equal(s4[:5], s1)
    ang = torch.outer(torch.arange(7, dtype=torch.float64),
                      100.0 ** -(torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    torch.testing.assert_close(c4, ang.cos().float())
    torch.testing.assert_close(s4, ang.sin().float())


def test_forward_makes_no_permuted_copy():
    """Without QK norm, the layer's forward dispatches no copy op at all (the projection output
    is reshaped to views; the tables are cached)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    why = kernel_missing("cpu")
    if why:
        pytest.skip(why)
    m = make(rope=True)
    x = torch.randn(2, 4 * 3, m.dim)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with vk.use_backend("cpu"), torch.no_grad():
        m(x, 4, 3)  # builds the tables
        with Record():
            m(x, 4, 3)
    copies = [s for s in seen if any(c in s for c in ("clone", "copy", "contiguous", "_to_copy"))]
    assert not copies, copies
    assert any("temporal_attn_fwd" in s for s in seen), seen


def test_compile_fullgraph_matches_eager():
    """One compile (inductor on CPU is slow): the default backend, i.e. the C++ kernel when it is
    built (the custom op inside the graph), else the reference."""
    backend = "cpu" if kernel_missing("cpu") is None else "reference"
    m = make(qk_norm="rms", rope=True)
    B, T, S = 2, 4, 3
    x = torch.randn(B, T * S, m.dim, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    with vk.use_backend(backend):
        eager = m(x, T, S)
        ge = torch.autograd.grad(eager.square().sum(), [x, m.qkv.weight, m.norm_q.weight])
        comp = compiled(x, T, S)
        gc = torch.autograd.grad(comp.square().sum(), [x, m.qkv.weight, m.norm_q.weight])
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_construction_and_input():
    with pytest.raises(ValueError, match="dim=30 must be a multiple of num_heads=4"):
        CausalTemporalAttention(30, 4)
    with pytest.raises(ValueError, match="RoPE needs an even head_dim, got 5"):
        CausalTemporalAttention(10, 2)
    CausalTemporalAttention(10, 2, rope=False)  # fine without RoPE
    with pytest.raises(ValueError, match="qk_norm must be None, 'layer' or 'rms', got 'batch'"):
        CausalTemporalAttention(16, 2, qk_norm="batch")
    m = make()
    with pytest.raises(ValueError, match="x has 12 tokens but T\\*S = 5\\*3 = 15"):
        m(torch.randn(1, 12, m.dim), 5, 3)
    with pytest.raises(TypeError, match="CausalTemporalAttention: T must be an int, got float 4.0"):
        m(torch.randn(1, 12, m.dim), 4.0, 3)
    with pytest.raises(TypeError, match="CausalTemporalAttention: S must be an int, got bool True"):
        m(torch.randn(1, 12, m.dim), 12, True)
    with pytest.raises(ValueError, match="x must be \\[B, T\\*S, C\\] with C=64"):
        m(torch.randn(1, 12, 32), 4, 3)
    for bad in (5, {}, (torch.zeros(1), torch.zeros(1))):  # was an AttributeError on num_frames
        with pytest.raises(TypeError, match="kv_cache must be a vidgen_kernels.nn.TemporalKVCache "
                                            f"or None, got {type(bad).__name__}"):
            m(torch.randn(1, 12, m.dim), 4, 3, kv_cache=bad)


@pytest.mark.parametrize("x,exc,match", [
    ([[1.0] * 64] * 12, TypeError, "CausalTemporalAttention: x must be a torch.Tensor, got list"),
    (torch.ones(1, 12, 64, dtype=torch.int64), TypeError,
     "CausalTemporalAttention: x must be a floating tensor, got dtype torch.int64"),
    (torch.ones(1, 12, 64, dtype=torch.bool), TypeError, "x must be a floating tensor"),
    (torch.randn(12, 64), ValueError,
     "x must be \\[B, T\\*S, C\\] with C=64, got shape \\(12, 64\\)"),
    (torch.randn(1, 12, 32), ValueError, "got shape \\(1, 12, 32\\)"),
    (torch.randn(1, 12, 64, dtype=torch.float64), TypeError,
     "CausalTemporalAttention: x has dtype torch.float64 but the module's parameters are "
     "torch.float32"),
    (torch.randn(1, 12, 64, dtype=torch.bfloat16), TypeError,
     "x has dtype torch.bfloat16 but the module's parameters are torch.float32"),
], ids=["list", "int", "bool", "2-D", "channels", "float64", "bfloat16"])
def test_bad_x_raises_clear_error(x, exc, match):
    """x that is not a floating [B, T*S, C] tensor of the module's dtype: a TypeError /
    ValueError naming x at the top of forward (a list gave AttributeError "'list' object has no
    attribute 'dim'", a float64 or int x torch's "mat1 and mat2 must have the same dtype")."""
    m = make()
    with pytest.raises(exc, match=match):
        m(x, 4, 3)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_allows_mixed_dtypes(x_dtype):
    """Under torch.autocast for x's device the projections run in the autocast dtype, so an x
    whose dtype differs from the (fp32) parameters is legal there: no dtype error, a bf16
    output close to the fp32 one, fp32 gradients for the parameters."""
    m = make()
    x = torch.randn(2, 4 * 3, m.dim, generator=torch.Generator().manual_seed(0))
    want = m(x, 4, 3)
    xa = x.to(x_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(xa, 4, 3)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
    got.float().sum().backward()
    assert m.qkv.weight.grad.dtype == torch.float32 and xa.grad.dtype == x_dtype
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16"):  # autocast off again
        m(x.bfloat16(), 4, 3)


def test_state_dict_names():
    m = make(qk_norm="layer")
    assert set(m.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
                                   "norm_q.weight", "norm_q.bias", "norm_k.weight", "norm_k.bias"}
    assert math.isclose(m.rope_theta, 100.0)


@pytest.mark.parametrize("theta", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_rope_theta(theta):
    """A RoPE base that is not a finite number > 0 raises at construction (it gave NaN outputs
    on every backend), as rope3d_freqs's theta does; rope_1d_tables checks it too."""
    with pytest.raises(ValueError, match="CausalTemporalAttention: rope_theta must be a finite number > 0"):
        CausalTemporalAttention(16, 2, rope_theta=theta)
    CausalTemporalAttention(16, 2, rope=False, rope_theta=theta)  # unused without RoPE
    from vidgen_kernels.nn.temporal_attention import rope_1d_tables
    with pytest.raises(ValueError, match="rope_1d_tables: theta must be a finite number > 0"):
        rope_1d_tables(4, 8, theta)


def test_cache_holds_only_its_frames():
    """After the first call the cache's keys and values are their own contiguous tensors: they
    were views into the fused qkv output, keeping q alive too (1.5x the bytes) and giving the
    next call other strides (an extra recompile under torch.compile)."""
    m = make()
    cache = TemporalKVCache()
    m(torch.randn(1, 4 * 3, m.dim), 4, 3, kv_cache=cache)
    for t in (cache.k, cache.v):
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
