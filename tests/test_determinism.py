"""Run-to-run determinism: under ``torch.use_deterministic_algorithms(True)`` every op family's
forward and backward give bitwise-identical results on a second identical call, on every kernel
backend.

The kernels themselves use no atomics; the only scatter-adds are torch's ``index_add_`` in the
MoE bias gradients (``db1`` / ``db2``) and in the AdaLN modulation gradients of per-frame
``[B, F, C]`` shift / scale / gate whose frames do not split into whole chunks. On CUDA those
are atomic (run-to-run noise) by default and deterministic in torch's deterministic mode,
which this test turns on (and which would raise if any op of ours had no deterministic
implementation). The shapes below take those paths: biases, per-frame modulation with 37
tokens per frame.
"""
from __future__ import annotations

import os

import pytest
import torch

import vidgen_kernels as vk
from helpers import backend_params


@pytest.fixture
def deterministic(monkeypatch):
    # a cuBLAS GEMM (any torch matmul on CUDA in these steps) raises under deterministic mode
    # without this setting in the torch versions that still check it (read at each call)
    if torch.cuda.is_available():
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _twice(fn, *inputs):
    """Run ``fn`` forward + backward twice on the same inputs; return both (outputs, grads)."""
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in inputs]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        outs = [o for o in outs if isinstance(o, torch.Tensor) and o.dtype.is_floating_point]
        g = torch.Generator(device="cpu").manual_seed(1)
        loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
        loss.backward()
        runs.append(([o.detach() for o in outs], [t.grad for t in leaves if t.grad is not None]))
    return runs


def _assert_bitwise(runs, what):
    (o1, g1), (o2, g2) = runs
    assert len(g1) == len(g2) and len(g1) > 0, f"{what}: no gradients"
    for i, (a, b) in enumerate(zip(o1 + g1, o2 + g2)):
        assert torch.equal(a, b), f"{what}: result {i} differs between two identical calls " \
            f"(max diff {(a.double() - b.double()).abs().max().item():.3g})"


def _rand(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend,device,dtype", backend_params((torch.float32, torch.float16)))
def test_moe_deterministic(backend, device, dtype, deterministic):
    torch.manual_seed(0)
    N, C, F, E = 37, 32, 48, 5
    x = _rand(N, C, device=device, dtype=dtype)
    logits = _rand(N, E, device=device, dtype=torch.float32)
    w1, w2 = _rand(E, C, F, device=device, dtype=dtype, scale=0.2), \
        _rand(E, F, C, device=device, dtype=dtype, scale=0.2)
    b1, b2 = _rand(E, F, device=device, dtype=dtype), _rand(E, C, device=device, dtype=dtype)

    def fn(x, logits, w1, w2, b1, b2):
        with vk.use_backend(backend):
            r = vk.moe_ffn(x, logits, w1, w2, top_k=2, b1=b1, b2=b2)
        return r.out, r.aux_loss, r.z_loss

    _assert_bitwise(_twice(fn, x, logits, w1, w2, b1, b2), f"moe_ffn {backend}")


@pytest.mark.parametrize("backend,device,dtype", backend_params((torch.float32, torch.float16)))
def test_adaln_deterministic(backend, device, dtype, deterministic):
    torch.manual_seed(0)
    B, Fr, S, C = 2, 3, 37, 40  # per-frame modulation, 37 tokens per frame
    x, y = _rand(B, Fr * S, C, device=device, dtype=dtype), _rand(B, Fr * S, C, device=device,
                                                                  dtype=dtype)
    gate, shift, scale = (_rand(B, Fr, C, device=device, dtype=dtype, scale=0.5)
                          for _ in range(3))
    w, b = _rand(C, device=device, dtype=dtype), _rand(C, device=device, dtype=dtype)

    def fn(x, y, gate, shift, scale, w, b):
        with vk.use_backend(backend):
            return vk.gated_residual_adaln(x, y, gate, shift, scale, weight=w, bias=b)

    _assert_bitwise(_twice(fn, x, y, gate, shift, scale, w, b), f"gated_residual_adaln {backend}")


@pytest.mark.parametrize("backend,device,dtype", backend_params((torch.float32, torch.float16)))
def test_attention_deterministic(backend, device, dtype, deterministic):
    if backend == "cuda":  # (use_backend("cuda") would raise BackendUnavailableError here)
        pytest.skip("the cuda backend has no attention kernels (Triton serves CUDA)")
    torch.manual_seed(0)
    B, T, S, H, D = 1, 3, 5, 2, 32
    cos, sin = vk.rope3d_freqs(T, 1, S, D, device=device)
    q, k, v = (_rand(B, T * S, H, D, device=device, dtype=dtype) for _ in range(3))

    def fn3d(q, k, v):
        with vk.use_backend(backend):
            return vk.rope3d_attention(q, k, v, cos, sin, frame_causal=True, tokens_per_frame=S)

    _assert_bitwise(_twice(fn3d, q, k, v), f"rope3d_attention {backend}")

    tc, ts = vk.rope3d_freqs(T, 1, 1, D, axes_dims=(D, 0, 0), device=device)
    q5, k5, v5 = (t.view(B, T, S, H, D) for t in (q, k, v))

    def fnt(q, k, v):
        with vk.use_backend(backend):
            return vk.temporal_attention(q, k, v, cos=tc, sin=ts)

    _assert_bitwise(_twice(fnt, q5, k5, v5), f"temporal_attention {backend}")
