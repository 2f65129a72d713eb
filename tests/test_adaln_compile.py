"""The AdaLN custom ops under torch.library.opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch
from torch import nn

import vidgen_kernels as vk
from vidgen_kernels.nn import AdaLNZero

KERNEL_BACKENDS = [b for b in ("cpu",) if b in vk.available_backends("cpu")]
# "torch" is the kernel contract written in PyTorch: it exercises the custom ops' fake
# implementations and autograd without any compiled kernel.
OP_BACKENDS = ["torch"] + KERNEL_BACKENDS


def _fwd_args(gated, backend, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    B, N, C = 2, 6, 5
    x = torch.randn(B, N, C, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randn(B, N, C, generator=g, dtype=dtype, requires_grad=True) if gated else None
    gate = torch.randn(B, 3, C, generator=g, dtype=dtype, requires_grad=True) if gated else None
    mod = torch.randn(B, 2 * C, generator=g, dtype=dtype)
    shift = mod[:, :C].unsqueeze(1).requires_grad_()
    scale = torch.randn(1, N, C, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(C, generator=g, dtype=dtype, requires_grad=True)
    return (x, y, gate, shift, scale, w, None, 1e-6, False, backend)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
def test_opcheck(backend, gated):
    torch.library.opcheck(torch.ops.vidgen_kernels.adaln_fwd.default, _fwd_args(gated, backend))


class TinyDiTBlock(nn.Module):
    """A DiT block in miniature: both fused ops between two linear 'sublayers'."""

    def __init__(self, C):
        super().__init__()
        self.adaln = AdaLNZero(C, elementwise_affine=True)
        nn.init.normal_(self.adaln.linear.weight, std=0.2)  # not zero: make the test see it
        self.attn = nn.Linear(C, C)
        self.mlp = nn.Linear(C, C)

    def forward(self, x, c):
        p = self.adaln(c)
        a = self.attn(self.adaln.modulate_msa(x, p))
        x, m = self.adaln.residual_mlp(x, a, p)
        return self.adaln.residual_out(x, self.mlp(m), p)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("per_frame", [False, True])
def test_compile_fullgraph_matches_eager(backend, per_frame):
    torch.manual_seed(0)
    B, N, C = 2, 12, 24
    block = TinyDiTBlock(C)
    x = torch.randn(B, N, C, requires_grad=True)
    c = torch.randn(B, 3, C) if per_frame else torch.randn(B, C)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    with vk.use_backend(backend):
        eager_out = block(x, c)
        (gx_e,) = torch.autograd.grad(eager_out.square().sum(), x)
        comp_out = compiled(x, c)
        (gx_c,) = torch.autograd.grad(comp_out.square().sum(), x)
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5)
