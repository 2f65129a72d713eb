"""The eager fast path of the custom ops (``vidgen_kernels/ops/_eager.py``): in plain eager mode
an op's Python implementation runs directly (through a ``torch.autograd.Function`` with the op's
own backward); under a dispatch mode, compile or tracing the custom op itself runs. Both give the
same values and gradients."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vidgen_kernels as vk
from vidgen_kernels.ops import _eager, adaln


def _cpu():
    if "cpu" not in vk.available_backends("cpu"):
        pytest.skip("cpu backend not built")


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _args(requires_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 24, generator=g).requires_grad_(requires_grad)
    shift = torch.randn(2, 1, 24, generator=g).requires_grad_(requires_grad)
    scale = torch.randn(2, 1, 24, generator=g).requires_grad_(requires_grad)
    return x, shift, scale


def _fwd_bwd(call, x, shift, scale):
    out, _, mean, rstd = call(x, None, None, shift, scale, None, None, 1e-6, False, "cpu")
    grads = torch.autograd.grad(out, (x, shift, scale), torch.ones_like(out))
    return (out, mean, rstd) + grads


def test_fast_path_equals_custom_op():
    _cpu()
    fast = _fwd_bwd(adaln._adaln_fwd_call, *_args(True))
    op = _fwd_bwd(torch.ops.vidgen_kernels.adaln_fwd, *_args(True))
    for a, b in zip(fast, op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fast_path_skips_the_op_only_in_plain_eager_mode():
    _cpu()
    x, shift, scale = _args(False)
    with _Seen() as seen:  # a dispatch mode is active: the custom op runs (and is seen)
        adaln._adaln_fwd_call(x, None, None, shift, scale, None, None, 1e-6, False, "cpu")
    assert any("vidgen_kernels.adaln_fwd" in s for s in seen.ops), seen.ops

    calls = []
    probe = _eager.eager_op(lambda *a: calls.append("op") or "op",
                            lambda *a: calls.append("impl") or "impl")
    assert probe(x) == "impl"  # plain eager, no grad needed: the implementation
    with _Seen():
        assert probe(x) == "op"
    # an op without autograd (a backward kernel) asked to build a graph: the custom op, which
    # reports that it has no autograd, rather than a silently wrong graph
    assert probe(x.requires_grad_()) == "op"
    with torch.no_grad():
        assert probe(x) == "impl"
    assert calls == ["impl", "op", "op", "impl"]


def test_fast_path_under_compile_uses_the_op():
    _cpu()
    x, shift, scale = _args(True)
    f = torch.compile(lambda x, s, c: vk.adaln_modulate(x, s, c, backend="cpu"), fullgraph=True)
    out = f(x, shift, scale)
    want = vk.adaln_modulate(x, shift, scale, backend="cpu")
    torch.testing.assert_close(out, want)
    g1 = torch.autograd.grad(out.sum(), (x, shift, scale))
    g2 = torch.autograd.grad(want.sum(), (x, shift, scale))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_torch_func_transforms_go_through_the_op():
    """torch.func.grad wraps tensors: the call must not take the autograd.Function fast path."""
    _cpu()
    x, shift, scale = _args(False)
    calls = []
    probe = _eager.eager_op(lambda t: calls.append("op") or t * 2, lambda t: calls.append("impl") or t * 2)
    torch.func.grad(lambda t: probe(t).sum())(x)
    assert calls == ["op"], calls
