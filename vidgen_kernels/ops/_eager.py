"""Eager fast path of the custom ops.

``torch.library.custom_op`` is what lets the ops compose with ``torch.compile`` (fake
implementations, registered autograd, opcheck), but calling one in eager mode costs a few hundred
microseconds of Python per forward + backward: the op's autograd wrapper, re-filling the schema's
defaults, the redispatch, the dynamo-disabled backend wrapper (measured on the 2-core CPU: 640 us
for a tiny ``adaln_modulate`` forward + backward against 280 us for the eager reference's five
ATen ops). A DiT block calls a dozen of them per step.

:func:`eager_op` pairs a custom op with the plain Python function it was made from. In plain
eager mode (not compiling or tracing, no dispatch or torch-function mode active, ordinary
tensors) the returned callable runs that function directly, through a ``torch.autograd.Function``
built from the op's own ``setup_context`` / ``backward`` when autograd needs the result; in every
other case it calls the custom op. Same code, same results, one layer instead of five.

:func:`differentiable_vjp` is the ops' double-backward path: under ``create_graph=True`` (grad
mode on inside backward) a kernel's gradient would be a constant to autograd, so the backward
functions recompute their forward in plain PyTorch and return its vector-Jacobian product as a
graph (gradient penalties, Hessian-vector products).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["eager_op", "differentiable_vjp", "recomputed_vjp"]

_PLAIN = (Tensor, torch.nn.Parameter)
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _plain_eager(args) -> bool:
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or \
            torch._C._is_torch_function_mode_enabled():
        return False
    # ordinary tensors only: no subclass (FakeTensor, FunctionalTensor, ...), nothing wrapped
    # by a torch.func transform (grad / vmap levels, which autograd.Functions do not join), and
    # no meta tensor (the op dispatches those to its fake implementation)
    return all(type(a) in _PLAIN and not _functorch_wrapped(a) and not a.is_meta for a in args
               if isinstance(a, Tensor))


def _needs_grad(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


def eager_op(op, impl: Callable, setup_context: Optional[Callable] = None,
             backward: Optional[Callable] = None) -> Callable:
    """``call(*args)`` equivalent to ``op(*args)`` (positional arguments only).

    Args:
        op: the custom op (``torch.library.custom_op(...)(impl)``).
        impl: the Python function the op was made from.
        setup_context, backward: the op's autograd: registered here for ``op``
            (``op.register_autograd``) and used by the fast path's ``autograd.Function``, so the
            two cannot drift apart. None for an op without autograd (a backward kernel): then a
            call that autograd would have to differentiate goes to ``op``, which reports it.
    """
    fn = None
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
        def forward(ctx, *args):
            # ctx-style forward (a separate setup_context staticmethod would make every apply()
            # bind its arguments through inspect.signature: ~25 us per call)
            out = impl(*args)
            setup_context(ctx, args, out)
            return out
        fn = type(f"{impl.__name__}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*args):
        if not _plain_eager(args):
            return op(*args)
        if _needs_grad(args):
            return fn.apply(*args) if fn is not None else op(*args)
        return impl(*args)
    call.__name__ = call.__qualname__ = f"{impl.__name__}_call"
    call.__doc__ = impl.__doc__
    return call


def differentiable_vjp(forward: Callable, inputs: Sequence[Optional[Tensor]],
                       needs: Sequence[bool], grad_outputs: Sequence[Optional[Tensor]]) -> tuple:
    """``sum_i <grad_outputs[i], d forward(*inputs)[i] / d inputs[j]>`` for each ``j`` with
    ``needs[j]`` (``None`` elsewhere), with ``create_graph=True``: what a backward returns when
    autograd is to differentiate it again.

    Args:
        forward: plain PyTorch ops (the op's reference); returns a tensor or a tuple of them.
        inputs: its arguments; those with ``needs[j]`` must require grad (a backward's saved
            tensors do under ``create_graph=True``).
        grad_outputs: one per output of ``forward``; ``None`` for an output without gradient.
    """
    return _vjp(forward, inputs, needs, grad_outputs, create_graph=True)


def recomputed_vjp(forward: Callable, inputs: Sequence[Optional[Tensor]],
                   needs: Sequence[bool], grad_outputs: Sequence[Optional[Tensor]]) -> tuple:
    """:func:`differentiable_vjp` from inside a backward in either grad mode: on
    (``create_graph=True``) the saved ``inputs`` carry the graph and so does the result; off,
    detached copies of the inputs are differentiated and the result is a plain tensor. For a
    backward that has no kernel of its own (the gradient through a forward-mode tangent, which
    recomputes the tangent in plain PyTorch)."""
    if torch.is_grad_enabled():
        return _vjp(forward, inputs, needs, grad_outputs, create_graph=True)
    ins = [t.detach().requires_grad_(n) if isinstance(t, Tensor) else t
           for t, n in zip(inputs, needs)]
    return _vjp(forward, ins, needs, grad_outputs, create_graph=False)


def _vjp(forward, inputs, needs, grad_outputs, create_graph: bool) -> tuple:
    with torch.enable_grad():
        # one alias per slot: a tensor passed to several inputs (q = k = v, w1 is w2) must get
        # each slot's own gradient here, which the caller's autograd then sums; differentiated
        # directly, every slot got the tensor's total gradient (2-3x too large). The aliases
        # also keep the gradient to the direct path: an input that reaches the outputs again
        # through a saved output of the op (gated AdaLN's h) would rerun the op's backward
        inputs = [t.view_as(t) if n and isinstance(t, Tensor) else t for t, n in zip(inputs, needs)]
        outs = forward(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
        wanted = [t for t, n in zip(inputs, needs) if n]
        if not pairs or not wanted:
            return tuple(None for _ in inputs)
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                       create_graph=create_graph, allow_unused=True))
    return tuple(next(got) if n else None for n in needs)
