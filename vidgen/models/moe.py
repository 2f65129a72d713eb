"""MoE feed-forward for the vidgen models.

:func:`make_moe` returns ``vidgen_kernels.nn.MoEFFN`` (the fused ``moe_ffn`` op) when the installed
``vidgen_kernels`` has it (``hasattr(vidgen_kernels.nn, "MoEFFN")``), else :class:`ReferenceMoE`,
a small pure-PyTorch stand-in with the same ``forward(x, context=None)`` and ``aux_loss``:
softmax top-k router (optionally seeing ``x + context_proj(context)``), a loop over experts, an
always-on shared expert, and the Switch load-balancing loss in ``aux_loss`` after each call. Not
the same parameter names (``fc1`` / ``fc2`` lists, a biased ``context_proj``: checkpoints do not
transfer between the two) and no ``z_loss`` / ``tokens_per_expert``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vidgen_kernels as vk

from .layers import CopyableLossesMixin, keeps_losses

__all__ = ["ReferenceMoE", "make_moe", "HAS_FUSED_MOE"]

HAS_FUSED_MOE = hasattr(vk.nn, "MoEFFN")


class ReferenceMoE(CopyableLossesMixin, nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int = 4, top_k: int = 2,
                 shared_expert: bool = True, context_router: bool = False):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.fc1 = nn.ModuleList([nn.Linear(hidden, intermediate) for _ in range(num_experts)])
        self.fc2 = nn.ModuleList([nn.Linear(intermediate, hidden) for _ in range(num_experts)])
        self.shared = (nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(approximate="tanh"),
                                     nn.Linear(intermediate, hidden)) if shared_expert else None)
        self.context_proj = nn.Linear(hidden, hidden) if context_router else None
        if self.context_proj is not None:
            nn.init.zeros_(self.context_proj.weight)
            nn.init.zeros_(self.context_proj.bias)
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        shape = x.shape
        r_in = x if self.context_proj is None else x + self.context_proj(context)
        xf = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(r_in).reshape(-1, self.num_experts).float(), dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(xf)
        for e in range(self.num_experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                y = self.fc2[e](F.gelu(self.fc1[e](xf[tok]), approximate="tanh"))
                out.index_add_(0, tok, y * w[tok, slot, None])
        frac = F.one_hot(idx, self.num_experts).float().sum(1).mean(0) / self.top_k
        if keeps_losses():
            self.aux_loss = self.num_experts * (frac * probs.mean(0)).sum()
        out = out.reshape(shape)
        return out + self.shared(x) if self.shared is not None else out


def make_moe(hidden: int, intermediate: int, num_experts: int = 4, top_k: int = 2,
             shared_expert: bool = True, context_router: bool = False) -> nn.Module:
    if HAS_FUSED_MOE:
        return vk.nn.MoEFFN(hidden, intermediate, num_experts, top_k, activation="gelu",
                            shared_expert=shared_expert, context_router=context_router)
    return ReferenceMoE(hidden, intermediate, num_experts, top_k, shared_expert, context_router)
