"""vidgen models (video tensors are ``[B, T, C, H, W]`` throughout)."""
from .latent_dit import (
    LATENT_VIDEO_DIT_PRESETS,
    LatentVideoDiT,
    LatentVideoDiT_L,
    LatentVideoDiT_M,
    LatentVideoDiT_S,
    LatentVideoDiT_XL,
    LatentVideoDiTConfig,
)
from .cogvideox import CogVideoXConfig, CogVideoXTransformer, cogvideox_2b, cogvideox_5b, param_count, recommended_defaults
from .causal_dit import VideoCausalDiT, VideoCausalDiTConfig
from .moe import HAS_FUSED_MOE, ReferenceMoE, make_moe
from .vae import SmallVideoVAE
from .causal_vae import CausalVideoVAE
from .image_moe_dit import ImageMoEDiT, ImageMoEDiTConfig

__all__ = [
    "LATENT_VIDEO_DIT_PRESETS",
    "LatentVideoDiT",
    "LatentVideoDiTConfig",
    "LatentVideoDiT_L",
    "LatentVideoDiT_M",
    "LatentVideoDiT_S",
    "LatentVideoDiT_XL",
    "SmallVideoVAE",
    "CausalVideoVAE",
    "ImageMoEDiT",
    "ImageMoEDiTConfig",
    "CogVideoXConfig",
    "CogVideoXTransformer",
    "cogvideox_2b",
    "cogvideox_5b",
    "param_count",
    "recommended_defaults",
    "VideoCausalDiT",
    "VideoCausalDiTConfig",
    "ReferenceMoE",
    "make_moe",
    "HAS_FUSED_MOE",
]
