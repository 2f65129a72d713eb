"""LatentVideoDiT: the latent video diffusion transformer of the design.

    latents [B, T, C, H, W] --PatchEmbed3D (+ 3D sin-cos position)--> tokens [B, T'*H'*W', D]
    c = TimestepEmbedder(t) + MLP(mean_L(text))                    # AdaLN conditioning
    N x LatentVideoDiTBlock:
        AdaLN-Zero (1) -> spatial attention within each frame (QK RMSNorm, 2D RoPE)
                       -> temporal attention across frames (QK RMSNorm, 1D RoPE, causal option)
        AdaLN-Zero (2) -> cross-attention to the text/condition tokens
                       -> GEGLU FFN
    FinalLayer (adaLN + linear) -> unpatchify -> velocity [B, T, C, H, W]

Every sublayer is gated (zero-initialised gates: each block starts as the identity). The AdaLN
modulations and residual gates run on ``vidgen_kernels.nn.AdaLNZero`` (``adaln_modulate`` /
``gated_residual_adaln``), spatial attention on ``vidgen_kernels.nn.RoPE3DAttention``, temporal
attention on ``vidgen_kernels.nn.CausalTemporalAttention``, cross-attention on
``vidgen_kernels.rope3d_attention``. ``backend="reference"`` runs the same model on the
pure-PyTorch reference kernels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

import vidgen_kernels as vk
from vidgen_kernels.nn import AdaLNZero, CausalTemporalAttention, RoPE3DAttention

from .layers import (CrossAttention, FinalLayer, GEGLU, ModelBackend, PatchEmbed3D,
                     TimestepEmbedder, backend_scope, block_forward, check_config_backend,
                     check_config_sizes, check_input_dtype, check_input_tensor, check_patch_size,
                     check_text, check_timesteps, dit_init_, sincos_pos_embed_3d, unpatchify)

__all__ = ["LatentVideoDiTConfig", "LatentVideoDiT", "LatentVideoDiT_S", "LatentVideoDiT_M",
           "LatentVideoDiT_L", "LatentVideoDiT_XL", "LATENT_VIDEO_DIT_PRESETS"]


@dataclass
class LatentVideoDiTConfig:
    in_channels: int = 4
    out_channels: Optional[int] = None  # default in_channels
    patch_size: tuple = (1, 2, 2)
    hidden_size: int = 512
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    text_dim: int = 512          # width of the text / condition embeddings
    causal_temporal: bool = True  # the seed design: frame t attends to frames <= t
    rope_theta: float = 10000.0
    pos_embed: str = "sincos"    # "sincos": fixed 3D sin-cos added to the patch tokens (DiT); "none": RoPE only
    backend: Optional[str] = None  # None: vidgen_kernels' default; "reference": pure PyTorch


# hidden / depth / heads
LATENT_VIDEO_DIT_PRESETS = {"S": (512, 8, 8), "M": (768, 12, 12), "L": (1024, 24, 16), "XL": (1536, 28, 24)}


class LatentVideoDiTBlock(nn.Module):
    backend: Optional[str] = None  # the model's (ModelBackend), entered by forward

    def __init__(self, hidden_size: int, num_heads: int, text_dim: int, mlp_ratio: float = 4.0,
                 causal_temporal: bool = True, rope_theta: float = 10000.0):
        super().__init__()
        self.adaln1 = AdaLNZero(hidden_size)  # spatial (msa slot), temporal (mlp slot)
        self.adaln2 = AdaLNZero(hidden_size)  # cross-attention (msa slot), FFN (mlp slot)
        self.spatial_attn = RoPE3DAttention(hidden_size, num_heads, qk_norm="rms")
        self.temporal_attn = CausalTemporalAttention(hidden_size, num_heads, qk_norm="rms", rope=True,
                                                     rope_theta=rope_theta, causal=causal_temporal)
        self.cross_attn = CrossAttention(hidden_size, num_heads, text_dim)
        self.ffn = GEGLU(hidden_size, mlp_ratio)

    @block_forward
    def forward(self, x: Tensor, c: Tensor, text: Tensor, grid: tuple[int, int, int],
                rope2d: tuple[Tensor, Tensor], y: Optional[Tensor] = None,
                gate: Optional[Tensor] = None):
        """``x`` ``[B, N, D]``; ``y``, ``gate``: the previous block's pending ``x + gate * y``.
        Returns ``(x, y, gate)``, this block's last residual left pending for the next norm to
        fuse (``gated_residual_adaln``). Tensors in and out at the top level, none in a nested
        tuple: reentrant activation checkpointing (``use_reentrant=True``, DeepSpeed's) tracks
        only those, and dropped the gradients of a nested ``(y, gate)``."""
        B, N, D = x.shape
        T, S = grid[0], grid[1] * grid[2]
        p1 = self.adaln1(c)
        if y is None:
            h = self.adaln1.modulate_msa(x, p1)
        else:
            x, h = self.adaln1.residual_msa(x, y, gate, p1)
        # spatial attention: every frame is a sequence of S tokens
        a = self.spatial_attn(h.view(B * T, S, D), *rope2d).view(B, N, D)
        x, h = self.adaln1.residual_mlp(x, a, p1)       # x += gate * a; h = modulate(norm(x))
        p2 = self.adaln2(c)
        x, h = self.adaln2.residual_msa(x, self.temporal_attn(h, T, S), p1.gate_mlp, p2)
        a = self.cross_attn(h, text)
        x, h = self.adaln2.residual_mlp(x, a, p2)
        return x, self.ffn(h), p2.gate_mlp


class LatentVideoDiT(ModelBackend, nn.Module):
    """Latent video DiT predicting the flow-matching velocity.

    ``forward(x [B, T, C, H, W], t [B] in [0, 1], text [B, L, text_dim]) -> [B, T, C_out, H, W]``.
    Any H, W divisible by the spatial patch and T divisible by the temporal patch.
    """

    def __init__(self, config: Optional[LatentVideoDiTConfig] = None, **kwargs):
        super().__init__()
        config = dataclasses.replace(config) if config is not None else LatentVideoDiTConfig(**kwargs)
        if config.out_channels is None:
            config.out_channels = config.in_channels
        config.patch_size = check_patch_size(config.patch_size)
        check_config_sizes(config, "in_channels", "out_channels", "hidden_size", "num_heads", "depth",
                           "text_dim")
        if config.hidden_size % config.num_heads:
            raise ValueError(f"hidden_size must be divisible by num_heads, got hidden_size="
                             f"{config.hidden_size}, num_heads={config.num_heads}")
        self.config = config
        check_config_backend(config)
        D = config.hidden_size
        self.head_dim = D // config.num_heads
        if self.head_dim % 4:
            raise ValueError(f"head_dim = hidden_size / num_heads must be divisible by 4 (2D RoPE over h "
                             f"and w), got head_dim={self.head_dim} (hidden_size={D}, "
                             f"num_heads={config.num_heads})")
        if config.pos_embed not in ("sincos", "none"):
            raise ValueError(f"pos_embed must be 'sincos' or 'none', got {config.pos_embed!r}")
        if config.pos_embed == "sincos" and D % 8:
            raise ValueError(f"pos_embed='sincos' needs hidden_size divisible by 8, got {D}")
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.text_pool = nn.Sequential(nn.Linear(config.text_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList([
            LatentVideoDiTBlock(D, config.num_heads, config.text_dim, config.mlp_ratio,
                                config.causal_temporal, config.rope_theta)
            for _ in range(config.depth)])
        self.backend = config.backend  # (ModelBackend: on the blocks too)
        pt, ph, pw = config.patch_size
        self.final_layer = FinalLayer(D, pt * ph * pw * config.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation: xavier linears, zero AdaLN/final (done in their modules)."""
        dit_init_(self, self.x_embedder, self.t_embedder)

    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        check_input_tensor("x", x, "[B, T, C, H, W]")
        grid = self.x_embedder.grid(x)
        B = x.shape[0]
        text = check_text(text, B, self.config.text_dim)
        t = check_timesteps(t, B, x.device)
        check_input_dtype("x", x, self.x_embedder.proj.weight)
        check_input_dtype("text", text, self.text_pool[0].weight)
        with backend_scope(self.backend):
            h = self.x_embedder(x)
            if self.config.pos_embed == "sincos":
                h = h + sincos_pos_embed_3d(grid, h.shape[-1], device=x.device).to(h.dtype)
            c = self.t_embedder(t) + self.text_pool(text.mean(dim=1))
            cos, sin = vk.rope3d_freqs(1, grid[1], grid[2], self.head_dim,
                                       axes_dims=(0, self.head_dim // 2, self.head_dim // 2),
                                       theta=self.config.rope_theta, device=x.device)
            y = gate = None  # the pending residual x + gate * y
            for block in self.blocks:
                h, y, gate = block(h, c, text, grid, (cos, sin), y, gate)
            h = self.final_layer(h, c, None if y is None else (y, gate))
        return unpatchify(h, grid, self.config.patch_size, self.config.out_channels)


def _preset(name: str):
    def build(**kwargs) -> LatentVideoDiT:
        hidden, depth, heads = LATENT_VIDEO_DIT_PRESETS[name]
        return LatentVideoDiT(LatentVideoDiTConfig(**{"hidden_size": hidden, "depth": depth, "num_heads": heads,
                                                      **kwargs}))
    build.__name__ = f"LatentVideoDiT_{name}"
    build.__doc__ = (f"LatentVideoDiT-{name}: hidden/depth/heads = {LATENT_VIDEO_DIT_PRESETS[name]}; keyword "
                     f"arguments override any config field (``depth=2`` for a shallow test model).")
    return build


LatentVideoDiT_S = _preset("S")
LatentVideoDiT_M = _preset("M")
LatentVideoDiT_L = _preset("L")
LatentVideoDiT_XL = _preset("XL")
