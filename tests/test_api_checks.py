"""Checks shared by every public op: flag types, meta tensors, the backend context."""
from __future__ import annotations

import threading

import pytest
import torch

import vidgen_kernels as vk


def _ops():
    q4 = torch.randn(1, 4, 2, 8)
    t5 = torch.randn(1, 3, 2, 2, 8)
    moe = (torch.randn(3, 8), torch.randn(3, 4), torch.randn(4, 8, 6), torch.randn(4, 6, 8))
    return [
        (lambda **f: vk.rope3d_attention(q4, q4, q4, **f), ("interleaved", "frame_causal")),
        (lambda **f: vk.rope3d_attention_reference(q4, q4, q4, **f), ("interleaved", "frame_causal")),
        (lambda **f: vk.temporal_attention(t5, t5, t5, **f), ("causal", "interleaved")),
        (lambda **f: vk.temporal_attention_reference(t5, t5, t5, **f), ("causal", "interleaved")),
        (lambda **f: vk.moe_ffn(*moe, **f), ("normalize_weights",)),
        (lambda **f: vk.moe_ffn_reference(*moe, **f), ("normalize_weights",)),
    ]


@pytest.mark.parametrize("bad", ["False", 1, None])
def test_flags_must_be_bools(bad):
    """A flag given as a string ("False" is truthy), an int or None raises a TypeError naming
    it; ``causal="False"`` used to run causal attention, silently."""
    for fn, flags in _ops():
        for name in flags:
            with pytest.raises(TypeError, match=rf"{name} must be a bool, got {type(bad).__name__}"):
                fn(**{name: bad})


def test_meta_tensors_run_the_reference_or_name_the_device():
    """Tensors on the meta device (shape inference, deferred init): ``auto`` runs the reference
    there, and a meta tensor mixed with CPU ones gives the device ValueError; every op raised
    "unknown device type for autocast" before any check."""
    m = lambda *s: torch.randn(*s, device="meta")  # noqa: E731
    assert vk.adaln_modulate(m(2, 4, 8), m(2, 8), m(2, 8)).shape == (2, 4, 8)
    h, y = vk.gated_residual_adaln(m(2, 4, 8), m(2, 4, 8), m(2, 8), m(2, 8), m(2, 8))
    assert h.shape == y.shape == (2, 4, 8) and h.device.type == "meta"
    q = m(1, 6, 2, 8)
    assert vk.rope3d_attention(q, q, q).shape == (1, 6, 2, 8)
    t = m(1, 3, 2, 2, 8)
    assert vk.temporal_attention(t, t, t).device.type == "meta"
    assert vk.nn.HeadNorm(8, device="meta")(m(3, 2, 8)).shape == (3, 2, 8)
    with pytest.raises(ValueError, match="shift is on cpu but x is on meta"):
        vk.adaln_modulate(m(2, 4, 8), torch.randn(2, 8), torch.randn(2, 8))


def test_use_backend_contexts_exited_out_of_order():
    """Each ``use_backend`` context removes its own entry on exit: exiting the outer one first
    (a generator finalised late) used to pop the inner one's entry and leave the outer's in
    force."""
    outer, inner = vk.use_backend("reference"), vk.use_backend("cpu")
    outer.__enter__()
    inner.__enter__()
    assert vk.current_backend() == "cpu"
    outer.__exit__(None, None, None)
    assert vk.current_backend() == "cpu"
    inner.__exit__(None, None, None)
    assert vk.current_backend() == "auto"
    with vk.use_backend("reference"):
        with vk.use_backend("cpu"):
            assert vk.current_backend() == "cpu"
        assert vk.current_backend() == "reference"
    assert vk.current_backend() == "auto"


def test_first_compiled_call_in_a_fresh_thread_does_not_recompile():
    """A thread whose first op call is a compiled one: the backend stack was created lazily by
    ``_stack()`` (``if not hasattr(_local, "stack")``), which dynamo traced as a side effect and
    a guard, so the second call recompiled (the cause of a flaky recompile in CI's dynamic-shape
    test). The per-thread stack now exists before any read."""
    from torch._dynamo.utils import counters
    result = {}

    def run():
        try:
            torch._dynamo.reset()
            counters.clear()
            f = torch.compile(lambda x, s: vk.adaln_modulate(x, s, s), fullgraph=True, dynamic=True)
            for n in (5, 7, 9):
                f(torch.randn(2, n, 8), torch.randn(2, 8))
            result["graphs"] = counters["stats"]["unique_graphs"]
        except Exception as e:  # noqa: BLE001 (reported by the assert below)
            result["error"] = repr(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert result == {"graphs": 1}, result


def test_module_flags_and_sizes_are_checked():
    """The nn modules take flags as Python bools (a string "False" is truthy: it switched the
    feature ON) and sizes as ints >= 1 (a negative size failed deep in torch)."""
    nn_ = vk.nn
    for make in (lambda: nn_.CausalTemporalAttention(16, 2, causal="False"),
                 lambda: nn_.CausalTemporalAttention(16, 2, rope="False"),
                 lambda: nn_.RoPE3DAttention(16, 2, interleaved="False"),
                 lambda: nn_.MoEFFN(8, 16, 4, shared_expert="False"),
                 lambda: nn_.MoEFFN(8, 16, 4, context_router="False"),
                 lambda: nn_.AdaLNZero(16, elementwise_affine="False"),
                 lambda: nn_.LayerNormZero(8, 16, elementwise_affine=1)):
        with pytest.raises(TypeError, match="must be a bool"):
            make()
    for make, name in ((lambda: nn_.AdaLNZero(-4), "dim"), (lambda: nn_.HeadNorm(-4), "dim"),
                       (lambda: nn_.RoPE3DAttention(-8, 2), "dim"),
                       (lambda: nn_.RoPE3DAttention(32, 2.0), "num_heads"),
                       (lambda: nn_.CausalTemporalAttention(-8, 2), "dim"),
                       (lambda: nn_.LayerNormZero(-1, 8), "conditioning_dim"),
                       (lambda: nn_.MoEFFN(8, 16, 4, context_dim=-3), "context_dim")):
        with pytest.raises(ValueError, match=f"{name} must be a Python int >= 1"):
            make()
    with pytest.raises(ValueError, match="T and S must be >= 1"):
        nn_.CausalTemporalAttention(16, 2)(torch.randn(1, 4, 16), -2, -2)
    # norm kind, eps and backend name checked when the module is built, naming the module (they
    # built and failed at the first forward, naming the op; RoPE3DAttention's eps named HeadNorm)
    for make, msg in ((lambda: nn_.AdaLNZero(16, norm="batch"), "AdaLNZero: norm must be one of \\('layer', 'rms'\\), got 'batch'"),
                      (lambda: nn_.AdaLNZero(16, eps=-1.0), "AdaLNZero: eps must be a finite Python float / int >= 0, got -1.0 \\(float\\)"),
                      (lambda: nn_.AdaLNZero(16, eps=float("nan")), "AdaLNZero: eps must be a finite"),
                      (lambda: nn_.LayerNormZero(8, 16, norm="batch"), "LayerNormZero: norm must be"),
                      (lambda: nn_.LayerNormZero(8, 16, eps=-1.0), "LayerNormZero: eps must be"),
                      (lambda: nn_.RoPE3DAttention(16, 2, qk_norm="rms", eps=-1.0), "RoPE3DAttention: eps"),
                      (lambda: nn_.CausalTemporalAttention(16, 2, eps=float("inf")),
                       "CausalTemporalAttention: eps"),
                      (lambda: nn_.HeadNorm(8, kind="batch"), "HeadNorm: kind must be one of \\('layer', 'rms'\\)"),
                      (lambda: nn_.RoPE3DAttention(16, 2, backend="tritno"), "RoPE3DAttention: backend must be"),
                      (lambda: nn_.MoEFFN(8, 16, 4, backend="gpu"), "MoEFFN: backend must be None or one of"),
                      (lambda: nn_.HeadNorm(8, backend="CPU"), "HeadNorm: backend must be"),
                      (lambda: nn_.MoEFFN(8, 16, 4, context_dim=5),
                       "context_dim=5 is the width of the router's context and needs context_router=True")):
        with pytest.raises(ValueError, match=msg):
            make()
    m = nn_.MoEFFN(8, 16, 4, context_router=True, context_dim=5)
    assert m.context_dim == 5 and "context_router=True, context_dim=5" in repr(m)
    assert nn_.MoEFFN(8, 16, 4).context_dim is None


def test_gated_add_checks_dtype_and_device():
    """AdaLNZero.residual_out (gated_add) rejects integer / complex tensors and mixed devices
    as gated_residual_adaln does (int inputs were truncated to zeros, a complex y lost its
    imaginary part)."""
    from vidgen_kernels.nn.adaln import gated_add
    x = torch.randn(1, 4, 8)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        gated_add(x.long(), x.long(), torch.full((8,), 0.6))
    with pytest.raises(TypeError, match="y must be a floating tensor"):
        gated_add(x, x.to(torch.complex64), torch.ones(8))
    with pytest.raises(ValueError, match="y is on meta"):
        gated_add(x, torch.empty(1, 4, 8, device="meta"), torch.ones(8))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_repeated_table_in_the_other_layout_is_refused(backend, interleaved):
    """An ``[L, D]`` table repeated in the layout of the OTHER pairing (``cat([f, f])`` with
    ``interleaved=True``, ``repeat_interleave(2)`` with ``interleaved=False``) raises a ValueError
    naming the table and both layouts, in each op that takes tables; it used to be read as the
    flag said: every pair rotated by another pair's angle, silently. The matching layout runs
    and equals the ``[L, D/2]`` table's result; a table whose two copies are both NaN at an
    entry is not refused (NaN != NaN)."""
    if backend == "cpu" and "cpu" not in vk.available_backends("cpu"):
        pytest.skip("C++ CPU extension not built")
    D = 16
    cos, sin = vk.rope3d_freqs(2, 2, 3, D)  # [12, D/2], distinct angles per pair
    rep = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat([t, t], -1))
    other = (lambda t: torch.cat([t, t], -1)) if interleaved else (lambda t: t.repeat_interleave(2, -1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, 2, D, generator=g)
    t5 = torch.randn(1, 12, 1, 2, D, generator=g)
    calls = {
        "apply_rope": lambda c, s: vk.apply_rope(x, c, s, interleaved=interleaved),
        "rope3d_attention": lambda c, s: vk.rope3d_attention(x, x, x, c, s, interleaved=interleaved),
        "temporal_attention": lambda c, s: vk.temporal_attention(t5, t5, t5, cos=c, sin=s,
                                                                 interleaved=interleaved),
    }
    with vk.use_backend(backend):
        for name, call in calls.items():
            torch.testing.assert_close(call(rep(cos), rep(sin)), call(cos, sin), rtol=0, atol=0,
                                       msg=name)
            with pytest.raises(ValueError, match=rf"{name}: cos is \[L, D\] = \(12, 16\) but not "
                                                 rf"the repeated layout of interleaved={interleaved}"):
                call(other(cos), other(sin))
            with pytest.raises(ValueError, match=rf"{name}: sin is \[L, D\]"):
                call(rep(cos), other(sin))
            c = rep(cos).clone()
            c[3, :] = float("nan")  # both copies NaN: accepted (the output is the caller's business)
            assert torch.isnan(call(c, rep(sin))).any(), name


def test_int_arguments_name_a_numpy_or_tensor_integer_as_such():
    """An int argument given a numpy / tensor integer says so (``got np.int64(2)`` alone read as
    if the value were wrong, not its type); a float says its type."""
    import numpy as np
    q = torch.randn(1, 8, 2, 16)
    t5 = torch.randn(1, 2, 3, 2, 8)
    cases = [
        (lambda: vk.rope3d_attention(q, q, q, rope_offset=np.int64(2)),
         r"rope_offset must be a Python int >= 0, got np\.int64\(2\) of type int64 \(a numpy / tensor "
         r"integer: pass int\(\.\.\.\)\)"),
        (lambda: vk.rope3d_attention(q, q, q, frame_causal=True, tokens_per_frame=np.int32(4)),
         "tokens_per_frame, a Python int >= 1, got .* of type int32"),
        (lambda: vk.rope3d_attention(q, q, q, frame_causal=True, tokens_per_frame=4,
                                     frames_per_block=2.0),
         "frames_per_block must be a Python int >= 1, got 2.0 of type float$"),
        (lambda: vk.temporal_attention(t5, t5, t5, q_offset=torch.tensor(0)),
         "q_offset must be a Python int >= 0, got tensor\\(0\\) of type Tensor"),
        (lambda: vk.apply_rope(q, torch.ones(4, 8), torch.zeros(4, 8), offset=np.int64(1)),
         "offset must be a Python int >= 0, got .* of type int64"),
        (lambda: vk.moe_ffn(torch.randn(3, 4), torch.randn(3, 2), torch.randn(2, 4, 8),
                            torch.randn(2, 8, 4), top_k=np.int64(1)),
         r"top_k must be a Python int in \[1, E=2\], got .* of type int64"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()
