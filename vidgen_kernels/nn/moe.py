"""``MoEFFN``: the seed's image MoE (top-k of E experts plus an always-on shared expert) and its
temporal MoE (router input plus a projection of a temporal context), on ``moe_ffn``."""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._checks import check_backend_arg, check_flags, check_sizes
from ..ops.moe import ACTIVATIONS, GATED, _act_module_fn, moe_ffn
from ._common import check_param_dtype, in_recompute
from ._init import ZeroLinear

__all__ = ["MoEFFN"]


class MoEFFN(nn.Module):
    """Mixture-of-Experts feed-forward block.

    ``forward(x [..., hidden], context=None) -> out [..., hidden]`` (x's dtype). After each call
    the module exposes ``aux_loss`` (Switch load-balancing loss), ``z_loss`` (router z-loss) and
    ``tokens_per_expert`` (``[E]`` int64) of that call, and ``last_output`` (the full
    ``MoEOutput`` of the routed part). Add ``aux_loss`` / ``z_loss`` (scaled) to the training loss.
    These four are the last call's results (of any thread: a module called from several
    threads at once needs one copy per thread, or ``moe_ffn``'s returned ``MoEOutput``), not
    module state: ``copy.deepcopy``, pickle and
    ``torch.save(module)`` leave them out (the copy has them None until its own first call), so
    a module can be copied (an EMA copy) or saved right after a forward / backward, while they
    still hold the autograd graph. A ``torch.export`` trace leaves them as they were (the
    exported program returns the output only).

    Args:
        hidden: model width C.
        intermediate: expert hidden width F.
        num_experts: E.
        top_k: experts per token (seed: 2 of 4).
        activation: one of ``vidgen_kernels.ops.moe.ACTIVATIONS`` (gated ones double ``w1``).
        shared_expert: add an always-on dense FFN of the same shape (the seed's image MoE).
        context_router: the router sees ``x + context_proj(context)`` (the seed's temporal MoE);
            ``context`` ``[..., context_dim]`` broadcastable to x's leading dims, required in
            ``forward``. ``context_proj`` is zero-initialised (the router starts as the plain one).
        context_dim: width of the context (default ``hidden``).
        bias: expert biases ``b1`` ``[E, F]`` (``[E, 2F]``) and ``b2`` ``[E, C]``.
        normalize_weights: renormalise the top-k router weights to sum to 1.
        backend: passed to ``moe_ffn`` (None: the current default).
        device, dtype: of the parameters, as for ``nn.Linear``.

    Parameters: ``router`` (``Linear(hidden, E, bias=False)``), ``w1`` ``[E, C, F or 2F]``,
    ``w2`` ``[E, F, C]``, ``b1``, ``b2``, ``shared_fc1`` / ``shared_fc2`` (Linear), ``context_proj``.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int = 2,
                 activation: str = "gelu", shared_expert: bool = True,
                 context_router: bool = False, *, context_dim: Optional[int] = None,
                 bias: bool = True, normalize_weights: bool = True,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        check_flags("MoEFFN", shared_expert=shared_expert, context_router=context_router,
                    bias=bias, normalize_weights=normalize_weights)
        if context_dim is not None:
            check_sizes("MoEFFN", context_dim=context_dim)
            if not context_router:
                raise ValueError(f"MoEFFN: context_dim={context_dim} is the width of the router's "
                                 f"context and needs context_router=True")
        check_backend_arg("MoEFFN", backend)
        if activation not in ACTIVATIONS:
            raise ValueError(f"MoEFFN: activation must be one of {ACTIVATIONS}, got {activation!r}")
        check_sizes("MoEFFN", hidden=hidden, intermediate=intermediate, num_experts=num_experts)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEFFN: top_k must be an int in [1, num_experts={num_experts}], "
                             f"got {top_k!r}")
        self.hidden, self.intermediate, self.num_experts = hidden, intermediate, num_experts
        self.top_k, self.activation, self.backend = top_k, activation, backend
        self.normalize_weights = normalize_weights
        g = 2 if activation in GATED else 1
        E, C, F = num_experts, hidden, intermediate
        self.router = nn.Linear(C, E, bias=False, **fk)
        self.w1 = nn.Parameter(torch.randn(E, C, g * F, **fk) / math.sqrt(C))
        self.w2 = nn.Parameter(torch.randn(E, F, C, **fk) / math.sqrt(F))
        self.b1 = nn.Parameter(torch.zeros(E, g * F, **fk)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(E, C, **fk)) if bias else None
        self.shared_fc1 = nn.Linear(C, g * F, **fk) if shared_expert else None
        self.shared_fc2 = nn.Linear(F, C, **fk) if shared_expert else None
        self.context_proj = None
        self.context_dim = (context_dim or C) if context_router else None
        if context_router:  # zeros, also after a reset (a ZeroLinear)
            self.context_proj = ZeroLinear(self.context_dim, C, bias=False, **fk)
        self._act = _act_module_fn(activation)  # (module-level function / partial: picklable)
        self.aux_loss: Optional[Tensor] = None
        self.z_loss: Optional[Tensor] = None
        self.tokens_per_expert: Optional[Tensor] = None
        self.last_output = None

    def reset_parameters(self) -> None:
        """The construction-time initialisation of the expert weights: ``w1``, ``w2`` normal with
        std ``1 / sqrt(fan_in)``, biases zero (``router``, ``shared_fc1/2`` and ``context_proj``
        reset themselves)."""
        with torch.no_grad():
            self.w1.normal_(0.0, 1.0 / math.sqrt(self.w1.shape[1]))
            self.w2.normal_(0.0, 1.0 / math.sqrt(self.w2.shape[1]))
            for b in (self.b1, self.b2):
                if b is not None:
                    b.zero_()

    # the last call's results: left out of copies and pickles (see the class docstring)
    _STEP_RESULTS = ("aux_loss", "z_loss", "tokens_per_expert", "last_output")

    def _state(self) -> dict:
        """``__dict__`` (``nn.Module``'s state) with the last call's ``aux_loss``, ``z_loss``,
        ``tokens_per_expert``, ``last_output`` set to None: non-leaf tensors attached to the
        autograd graph cannot be deep-copied, and are not worth saving."""
        state = self.__dict__.copy()
        for name in self._STEP_RESULTS:
            if name in state:
                state[name] = None
        return state

    def __getstate__(self):
        return self._state()

    def __deepcopy__(self, memo):
        """``copy.deepcopy`` of :meth:`_state`, also when a parametrization (``weight_norm``,
        LoRA, ...) is registered on this module's own weights: torch then re-classes the module
        (its ``__getstate__`` raises) and copies ``__dict__`` as it is, unless the class
        defines ``__deepcopy__``."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._state(), memo))
        return new

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"MoEFFN: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.hidden:
            raise ValueError(f"MoEFFN: x must be [..., {self.hidden}], got {tuple(x.shape)}")
        check_param_dtype("MoEFFN", x, self.router.weight)
        logits = self.router(x)
        if self.context_proj is not None:
            if context is None:
                raise ValueError("MoEFFN: context_router=True needs forward(x, context=...)")
            # router(x + context_proj(c)) split by linearity: the router keeps x (which the
            # experts keep anyway) for its weight gradient, and a broadcast context (one row per
            # frame) is projected and routed once per row, not once per token
            if not isinstance(context, Tensor) or context.dim() < 1 \
                    or context.shape[-1] != self.context_dim:
                raise ValueError(f"MoEFFN: context must be [..., context_dim={self.context_dim}] "
                                 f"broadcastable to x's leading dims {tuple(x.shape[:-1])}, got "
                                 f"{tuple(getattr(context, 'shape', ()))}")
            check_param_dtype("MoEFFN", context, self.context_proj.weight, "context")
            c_logits = self.router(self.context_proj(context))
            cs, ls = c_logits.shape, logits.shape
            if not torch.compiler.is_compiling() and not (  # (eager: no guards on the sizes)
                    len(cs) <= len(ls)
                    and all(a == 1 or a == b for a, b in zip(reversed(cs), reversed(ls)))):
                raise ValueError(f"MoEFFN: context {tuple(context.shape)} does not broadcast to "
                                 f"x's leading dims {tuple(x.shape[:-1])}")
            logits = logits + c_logits
        elif context is not None:
            raise ValueError("MoEFFN: context given but the module was built with "
                             "context_router=False")
        logits = logits.reshape(-1, self.num_experts)
        res = moe_ffn(x, logits, self.w1, self.w2, top_k=self.top_k, activation=self.activation,
                      b1=self.b1, b2=self.b2, normalize_weights=self.normalize_weights,
                      backend=self.backend)
        out = res.out
        if self.shared_fc1 is not None:
            out = out + self.shared_fc2(self._act(self.shared_fc1(x)))
        if not torch.compiler.is_exporting() and not in_recompute():
            # an exported program returns the output only: what torch.export traces is run on
            # fake tensors, which it takes back out of attributes afterwards, with a warning; an
            # activation-checkpoint recompute (during backward) would replace the forward's
            # results with its own, whose autograd graph (the expert activations) nothing
            # backpropagates and which stayed alive until the next forward
            self.aux_loss, self.z_loss, self.tokens_per_expert = (res.aux_loss, res.z_loss,
                                                                  res.tokens_per_expert)
            self.last_output = res
        return out

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, intermediate={self.intermediate}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"activation={self.activation!r}, shared_expert={self.shared_fc1 is not None}, "
                f"context_router={self.context_proj is not None}"
                f"{f', context_dim={self.context_dim}' if self.context_proj is not None else ''}, "
                f"normalize_weights={self.normalize_weights}, backend={self.backend}")
