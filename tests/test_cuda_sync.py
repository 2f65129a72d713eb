"""No host-device synchronisation on the GPU paths: each op family's forward and backward, and a
training step of the video models, run under ``torch.cuda.set_sync_debug_mode("error")`` after a
warm-up call (the first call may compile, autotune and ask CUDA once whether the build has code
for the device). A ``.item()``, ``bool(tensor)``, ``nonzero``, a blocking device-to-host copy or
a ``cudaStreamSynchronize`` inside the call raises there. (``moe_ffn``: ``test_moe.py``'s
``test_no_host_sync_cuda``.) CUDA only: skipped without a GPU.
"""
import pytest
import torch

import vidgen_kernels as vk
from helpers import HAS_CUDA, assert_no_host_sync

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")]


def _backend(name, op_backends):
    if name not in op_backends:
        pytest.skip(f"no {name} kernel for this op")
    if name != "auto":
        why = vk.backends.why_unavailable(name, "cuda")
        if why:
            pytest.skip(why)
    return None if name == "auto" else name


def _leaves(*shapes, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(*s, device="cuda", dtype=dtype, generator=g).requires_grad_()
            for s in shapes]


def _grad(out, leaves):
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_adaln_no_host_sync(backend):
    b = _backend(backend, ("auto", "triton", "cuda"))
    B, N, C = 2, 77, 320
    x, y = _leaves((B, N, C), (B, N, C))
    mod = _leaves((B, 6 * C), seed=1)[0]
    sh, sc, gate, sh2, sc2, _ = mod.chunk(6, -1)

    def step():
        _grad(vk.adaln_modulate(x, sh, sc, backend=b), [x, mod])
        _grad(vk.gated_residual_adaln(x, y, gate, sh2, sc2, norm="rms", backend=b), [x, y, mod])
    assert_no_host_sync(step)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_apply_rope_no_host_sync(backend):
    b = _backend(backend, ("auto", "triton", "cuda"))
    cos, sin = (t.cuda() for t in vk.rope3d_freqs(3, 4, 5, 64))
    (x,) = _leaves((2, 7 + 60, 4, 64))

    def step():
        _grad(vk.apply_rope(x, cos, sin, offset=7, backend=b), [x])
        _grad(vk.apply_rope(x, cos, sin, offset=7, interleaved=False, backend=b), [x])
    assert_no_host_sync(step)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_rope3d_attention_no_host_sync(backend):
    b = _backend(backend, ("auto", "triton"))
    cos, sin = (t.cuda() for t in vk.rope3d_freqs(3, 4, 6, 64))
    pre = 9
    q, k, v = _leaves(*[(2, pre + 72, 4, 64)] * 3)

    def step():
        _grad(vk.rope3d_attention(q, k, v, cos, sin, rope_offset=pre, backend=b), [q, k, v])
        _grad(vk.rope3d_attention(q, k, v, cos, sin, rope_offset=pre, frame_causal=True,
                                  tokens_per_frame=24, backend=b), [q, k, v])
        kx, vx = k[:, :20], v[:, :20]  # cross-attention: another key length, no tables
        _grad(vk.rope3d_attention(q, kx, vx, backend=b), [q, k, v])
    assert_no_host_sync(step)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_temporal_attention_no_host_sync(backend):
    b = _backend(backend, ("auto", "triton"))
    T, S, H, D = 9, 37, 3, 64
    q, k, v = _leaves(*[(2, T, S, H, D)] * 3)
    ang = torch.randn(T, D // 2, device="cuda")
    cos, sin = ang.cos(), ang.sin()

    def step():
        _grad(vk.temporal_attention(q, k, v, cos=cos, sin=sin, backend=b), [q, k, v])
        _grad(vk.temporal_attention(q[:, -2:], k, v, cos=cos, sin=sin, q_offset=T - 2,
                                    backend=b), [q, k, v])  # streaming: newest frames
        _grad(vk.temporal_attention(q, k, v, causal=False, backend=b), [q, k, v])
    assert_no_host_sync(step)


@pytest.mark.parametrize("model", ["video_causal_dit", "cogvideox"])
def test_model_training_step_no_host_sync(model):
    """One forward + backward of each video DiT with the default backends on the GPU (bf16)."""
    from vidgen.models import CogVideoXTransformer, VideoCausalDiT, VideoCausalDiTConfig
    from vidgen.models.cogvideox import CogVideoXConfig
    torch.manual_seed(0)
    if model == "video_causal_dit":
        m = VideoCausalDiT(VideoCausalDiTConfig(in_channels=4, hidden_size=64, depth=2, num_heads=2,
                                                text_dim=32))
        t = torch.rand(2, 3, device="cuda")  # per-frame timesteps
    else:
        m = CogVideoXTransformer(CogVideoXConfig(in_channels=4, hidden_size=64, num_heads=2,
                                                 num_layers=2, text_hidden_size=32,
                                                 time_embed_dim=16))
        t = torch.rand(2, device="cuda")
    m = m.to("cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 3, 4, 8, 12, device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(2, 5, 32, device="cuda", dtype=torch.bfloat16, generator=g)
    params = [p for p in m.parameters() if p.requires_grad]

    def step():
        out = m(x, t, text)
        torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)
    assert_no_host_sync(step)
