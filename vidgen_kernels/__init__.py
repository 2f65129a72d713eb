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
import torch

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
from .ops.adaln import SUPPORTED_DTYPES as _adaln_dtypes
from .ops.moe import BACKEND_NEEDS as _moe_needs, SUPPORTED_DTYPES as _moe_dtypes
from .ops.rope import ROPE_SUPPORTED_DTYPES as _rope_dtypes
from .ops.rope3d_attention import SUPPORTED_DTYPES as _rope3d_attention_dtypes
from .ops.temporal_attention import SUPPORTED_DTYPES as _temporal_attention_dtypes
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
    "resolved_backends",
    "rope3d_freqs",
    "temporal_attention",
    "temporal_attention_reference",
    "use_backend",
]


# The op families: (report name, op name for messages, its kernel backends' dtype table, the
# backends each of its backends also runs: backends.resolve's needs)
_OP_FAMILIES = (("AdaLN", "adaln", _adaln_dtypes, None),
                ("RoPE-3D attention", "rope3d_attention", _rope3d_attention_dtypes, None),
                ("temporal attention", "temporal_attention", _temporal_attention_dtypes, None),
                ("RoPE", "rope", _rope_dtypes, None),
                ("MoE", "moe", _moe_dtypes, _moe_needs))


def resolved_backends(device="cpu", dtype=torch.float32) -> dict:
    """The backend each op family runs when a call names none (the current default: a
    :func:`use_backend` context, ``VIDGEN_KERNELS_BACKEND``, else ``auto``) for ``dtype`` tensors
    on ``device``: ``{"AdaLN": "cpu", "RoPE-3D attention": ..., "temporal attention": ...,
    "RoPE": ..., "MoE": ...}``, as each op resolves it (``backends.resolve``). Per call, sizes
    beyond a kernel's limit (a head_dim, T_k or C) still fall back to ``reference``. A default
    that cannot run there maps to ``"unavailable: <why>"``; where ``auto`` finds no RoPE-3D
    attention kernel the value says that op runs ``rope3d_attention_sdpa``."""
    from .backends import resolve
    device = torch.device(device)
    out = {}
    for name, mod, supported, needs in _OP_FAMILIES:
        try:
            out[name] = resolve(None, device, dtype, supported, mod, needs=needs)
        except BackendUnavailableError as e:
            out[name] = f"unavailable: {e}"
        if mod == "rope3d_attention" and out[name] == "reference" and dtype != torch.float64 \
                and current_backend() != "reference":
            out[name] = "reference (no kernel here: rope3d_attention_sdpa)"
    return out


def extension_status() -> str:
    """One line on the compiled extension: built (with or without CUDA) or why not."""
    if _ext.C is None:
        return f"compiled extension not loaded ({_ext.IMPORT_ERROR}); pure-PyTorch and Triton paths only"
    cpu = "cpu kernels" if getattr(_ext.C, "with_openmp", True) else \
        "cpu kernels (built without OpenMP, the compiler had none: they run on one thread)"
    return f"compiled extension built: {cpu}" + (" + cuda kernels" if _ext.has_cuda() else "")
