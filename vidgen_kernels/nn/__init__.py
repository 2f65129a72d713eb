"""``nn.Module`` wrappers of the fused ops, for the models."""
from .adaln import AdaLNZero, HeadNorm, LayerNormZero
from .moe import MoEFFN
from .rope3d_attention import RoPE3DAttention
from .temporal_attention import CausalTemporalAttention, TemporalKVCache

__all__ = ["AdaLNZero", "HeadNorm", "CausalTemporalAttention", "LayerNormZero", "MoEFFN", "RoPE3DAttention", "TemporalKVCache"]
