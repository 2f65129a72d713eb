"""Parameter initialisation that survives ``reset_parameters()``."""
from __future__ import annotations

from torch import nn


class ZeroLinear(nn.Linear):
    """``nn.Linear`` whose initialisation (and ``reset_parameters()``) is all zeros: the
    zero-initialised projections of AdaLN-Zero and of the MoE context router.

    A subclass rather than a zero fill after construction, so that the meta-device workflow
    (build on ``meta``, ``to_empty``, then ``reset_parameters()`` on every module, parents
    before children as ``model.modules()`` lists them) keeps the zeros instead of giving the
    Linear its random default. Same parameters and state_dict keys as ``nn.Linear``."""

    def reset_parameters(self) -> None:
        # Linear's random init first, only to draw the same random numbers as the plain Linear
        # + zeros_ this class replaced: a seeded model gets the same weights as before
        super().reset_parameters()
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
