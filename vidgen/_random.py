"""Seeded draws the same on every device: vidgen draws a generator's numbers on the generator's
own device and moves them (a CPU generator gives the same noise on a CPU and on a GPU; a CUDA
``randn`` with a CPU generator raises)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def randn(shape, generator: Optional[torch.Generator], device, dtype) -> Tensor:
    """``torch.randn(shape)`` of ``dtype`` on ``device``, drawn on ``generator``'s device (on
    ``device`` without a generator)."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)
