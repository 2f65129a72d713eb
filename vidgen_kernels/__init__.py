"""vidgen-kernels: fused kernels for video diffusion transformers.

Public API::

    adaln_modulate(x, shift, scale, *, weight=None, bias=None, eps=1e-6, norm="layer")
    gated_residual_adaln(x, y, gate, shift, scale, *, ...) -> (h, out)
    use_backend(name)            # context manager
    available_backends(device=None), current_backend(), extension_status()
    temporal_attention(q, k, v, *, causal=True, cos=None, sin=None, interleaved=True,
                       q_offset=0, softmax_scale=None)   # [B, T, S, H, D], along T
    rope3d_freqs(frames, height, width, head_dim, *, theta=10000.0, axes_dims=None,
                 device=None) -> (cos, sin)     # each [frames*height*width, D/2] float32
    apply_rope(x, cos, sin, *, interleaved=True, offset=0)   # x [B, S, H, D]
    rope3d_attention(q, k, v, cos=None, sin=None, *, rope_offset=0, interleaved=True,
                     frame_causal=False, tokens_per_frame=None, frames_per_block=1,
                     softmax_scale=None)   # [B, S, H, D], RoPE fused into flash attention
    rope3d_attention_sdpa(...)   # same, unfused: apply_rope + SDPA (auto's no-kernel fallback)
    moe_ffn(x, router_logits, w1, w2, *, top_k=2, activation="gelu", b1=None, b2=None,
            normalize_weights=True, expert_index=None) -> MoEOutput(out, aux_loss, z_loss,
            tokens_per_expert)     # dropless grouped-GEMM Mixture-of-Experts FFN
    vidgen_kernels.nn: AdaLNZero, LayerNormZero, HeadNorm, RoPE3DAttention,
    CausalTemporalAttention, TemporalKVCache, MoEFFN   # modules on the ops above

``python -m vidgen_kernels`` prints which backends this install has.
"""
from . import _ext
from .backends import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    current_backend,
    use_backend,
)
from .ops.adaln import (
    adaln_modulate,
    adaln_modulate_reference,
    gated_residual_adaln,
    gated_residual_adaln_reference,
)
from .ops.temporal_attention import temporal_attention, temporal_attention_reference
from .ops.rope import apply_rope, apply_rope_reference, rope3d_freqs
from .ops.rope3d_attention import (rope3d_attention, rope3d_attention_reference,
                                   rope3d_attention_sdpa)
from .ops.moe import MoEOutput, moe_ffn, moe_ffn_reference
from . import nn  # noqa: E402  (modules use the functions above)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "MoEOutput",
    "adaln_modulate",
    "adaln_modulate_reference",
    "apply_rope",
    "apply_rope_reference",
    "available_backends",
    "current_backend",
    "extension_status",
    "gated_residual_adaln",
    "gated_residual_adaln_reference",
    "moe_ffn",
    "moe_ffn_reference",
    "nn",
    "rope3d_attention",
    "rope3d_attention_reference",
    "rope3d_attention_sdpa",
    "rope3d_freqs",
    "temporal_attention",
    "temporal_attention_reference",
    "use_backend",
]


def extension_status() -> str:
    """One line on the compiled extension: built (with or without CUDA) or why not."""
    if _ext.C is None:
        return f"compiled extension not loaded ({_ext.IMPORT_ERROR}); pure-PyTorch and Triton paths only"
    cpu = "cpu kernels" if getattr(_ext.C, "with_openmp", True) else \
        "cpu kernels (built without OpenMP, the compiler had none: they run on one thread)"
    return f"compiled extension built: {cpu}" + (" + cuda kernels" if _ext.has_cuda() else "")
