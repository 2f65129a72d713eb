"""Element offsets past 2**31 - 1: every kernel backend on views whose elements lie more than
2**31 elements apart, each stride still under 2**31 (what a Triton kernel receives as int32).

A kernel that forms an offset as an int32 product (``row * stride`` with both int32) wraps
there: on a GPU that reads or writes the wrong memory (an illegal address, or silently another
tensor's elements) at large shapes only, e.g. a token stride of a few thousand elements times a
sequence of a million tokens (a batch of long videos), never at test sizes. Here the views are
small (a few dozen elements) but spread over ~4 GiB of address space with one stride of
``BIG = 2**30 + 64`` elements, so index 2 along that dimension sits past 2**31 elements; on the
CPU the storage is allocated unfilled and touched only at the view's elements (the OS commits
only those pages), so this costs a few MB of RAM; on a GPU it is ~4 GiB of device memory per
storage, one case at a time. Under Triton's interpreter the memcheck
(interp_memcheck.py) also flags any access outside the views.

Each op runs forward and backward on the huge-stride views and is compared with its reference
on the same values made contiguous (fp16 inputs, fp32 reference).
"""
from __future__ import annotations

import fcntl
import os
import tempfile

import pytest
import torch
import torch.utils.deterministic

import vidgen_kernels as vk
from helpers import backend_params

BIG = 2 ** 30 + 64  # elements: index 2 along the huge dimension is past 2**31 - 1
DT = torch.float16


def huge_views(n: int, shape: tuple, dim: int, seed: int = 0, device="cpu") -> list:
    """``n`` fp16 views of ``shape`` in one storage: dimension ``dim`` (of size <= 3) steps BIG
    elements, the other dimensions are contiguous within a slab of the n views side by side
    (every view "any strides" as far as a kernel can tell), on ``device``. Values: seeded
    normal."""
    assert shape[dim] <= 3
    others = [d for d in range(len(shape)) if d != dim]
    strides, inner = [0] * len(shape), 1
    for d in reversed(others):
        strides[d], inner = inner, inner * shape[d]
    strides[dim] = BIG
    assert n * inner <= BIG
    # Not filled (the suite's poisoning of fresh memory would commit all ~4 GiB; every element
    # of the views is written below). On a GPU the ~4 GiB are device memory all the same.
    prev = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        base = torch.empty((shape[dim] - 1) * BIG + n * inner, dtype=DT, device=device)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = prev
    g = torch.Generator().manual_seed(seed)
    views = []
    for j in range(n):
        v = base.as_strided(shape, strides, j * inner)
        v.copy_(torch.randn(shape, generator=g).to(DT))
        views.append(v)
    assert max(v.storage_offset() + sum((s - 1) * st for s, st in zip(shape, strides))
               for v in views) > 2 ** 31  # (the point of the test)
    return views


@pytest.fixture(autouse=True)
def _one_huge_case_at_a_time(request):
    """On a GPU the ~4 GiB per storage are real device memory: one such case at a time across
    the xdist workers of a run (a file lock), its memory handed back to the driver after."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("device") != "cuda":
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "vidgen-huge-strides.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            torch.cuda.empty_cache()


def _fwd_bwd(fn, leaves, upcast=False):
    """``fn``'s outputs and the gradients of ``sum_i <out_i, w_i>`` (fixed weights) w.r.t.
    ``leaves`` (upcast: on contiguous fp32 copies)."""
    ls = [t.detach().float().contiguous().requires_grad_() if upcast else
          t.detach().requires_grad_() for t in leaves]
    outs = fn(*ls)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(7)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    return [o.detach().float() for o in outs] + [x.float() for x in torch.autograd.grad(loss, ls)]


def _assert_matches(fn, ref, leaves, tol):
    got = _fwd_bwd(fn, leaves)
    want = _fwd_bwd(ref, leaves, upcast=True)
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
        assert err < tol, f"result {i}: relative error {err:.3g} (huge strides)"


def _params(*backends):
    return [p for p in backend_params((DT,)) if p.values[0] in backends]


@pytest.mark.parametrize("backend,device,dtype", _params("cpu", "triton", "cuda"))
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_apply_rope(backend, device, dtype, dim):
    (x,) = huge_views(1, (3, 3, 3, 16), dim, device=device)
    ang = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)).to(device)
    cos, sin = ang.cos(), ang.sin()
    for interleaved in (True, False):
        _assert_matches(lambda t: vk.apply_rope(t, cos, sin, interleaved=interleaved, backend=backend),
                        lambda t: vk.apply_rope(t, cos, sin, interleaved=interleaved,
                                                backend="reference"), [x], 5e-3)


@pytest.mark.parametrize("backend,device,dtype", _params("cpu", "triton"))
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_rope3d_attention(backend, device, dtype, dim):
    q, k, v = huge_views(3, (3, 3, 3, 16), dim, device=device)
    cos, sin = vk.rope3d_freqs(1, 1, 3, 16, device=device)
    kw = dict(frame_causal=True, tokens_per_frame=1)  # (the kernels' mask arithmetic too)
    _assert_matches(lambda *a: vk.rope3d_attention(*a, cos, sin, backend=backend, **kw),
                    lambda *a: vk.rope3d_attention(*a, cos, sin, backend="reference", **kw),
                    [q, k, v], 2e-2)


@pytest.mark.parametrize("backend,device,dtype", _params("cpu", "triton"))
@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_temporal_attention(backend, device, dtype, dim):
    q, k, v = huge_views(3, (1, 3, 3, 3, 16) if dim else (3, 3, 2, 2, 16), dim, device=device)
    ang = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)).to(device)
    kw = dict(cos=ang.cos(), sin=ang.sin())
    _assert_matches(lambda *a: vk.temporal_attention(*a, backend=backend, **kw),
                    lambda *a: vk.temporal_attention(*a, backend="reference", **kw),
                    [q, k, v], 2e-2)


@pytest.mark.parametrize("backend,device,dtype", _params("cpu", "triton", "cuda"))
@pytest.mark.parametrize("dim", [0, 1])
def test_adaln(backend, device, dtype, dim):
    """x / y ``[B, N, C]`` and the modulation ``[B, 6C]`` with a huge batch / token stride."""
    x, y = huge_views(2, (3, 3, 40), dim, device=device)
    (mod,) = huge_views(1, (3, 6 * 40), 0, seed=1, device=device)

    def f(x, y, mod, backend):
        sh, sc, g, sh2, sc2, _ = mod.chunk(6, -1)
        h, o = vk.gated_residual_adaln(x, y, g, sh2, sc2, norm="rms", backend=backend)
        return h, o, vk.adaln_modulate(x, sh, sc, backend=backend)
    _assert_matches(lambda *a: f(*a, backend), lambda *a: f(*a, "reference"), [x, y, mod], 2e-2)


@pytest.mark.parametrize("backend,device,dtype", _params("cpu", "triton", "cuda"))
@pytest.mark.parametrize("huge", ["x", "w1", "w2"])
def test_moe(backend, device, dtype, huge):
    """Token rows / experts more than 2**31 elements apart (one argument at a time)."""
    g = torch.Generator().manual_seed(2)
    N, C, F, E = 3, 16, 24, 3
    args = {"x": torch.randn(N, C, generator=g), "w1": torch.randn(E, C, F, generator=g),
            "w2": torch.randn(E, F, C, generator=g)}
    args = {k: t.to(device, DT) for k, t in args.items()}
    (args[huge],) = huge_views(1, tuple(args[huge].shape), 0, seed=3, device=device)
    logits = torch.randn(N, E, generator=g).to(device)
    _assert_matches(
        lambda x, w1, w2: vk.moe_ffn(x, logits, w1, w2, top_k=2, backend=backend).out,
        lambda x, w1, w2: vk.moe_ffn(x, logits, w1, w2, top_k=2, backend="reference").out,
        [args["x"], args["w1"], args["w2"]], 2e-2)
