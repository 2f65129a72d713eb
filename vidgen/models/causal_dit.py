"""VideoCausalDiT: a frame-causal video DiT with per-frame timesteps.

    latents [B, T, C, H, W] --PatchEmbed3D(1, 2, 2)--> tokens [B, T*h*w, D] (frame-major)
    c_t = TimestepEmbedder(t)  (t [B] or per-frame [B, T])  + MLP(mean_L(text))   -> [B, T, D]
    N x VideoCausalDiTBlock (AdaLN-Zero modulation and gates, per frame):
        spatial attention within each frame (2D RoPE, QK RMSNorm)
        causal temporal attention across frames (1D RoPE, frame t sees frames <= t)
        cross-attention to the text tokens
        temporal MoE FFN (4 experts, top-2; the router also sees a projection of the frame's
            mean token, a causal temporal context)
    FinalLayer -> unpatchify -> velocity [B, T, C, H, W]

Every op is frame-local or frame-causal, so output frame t depends only on input frames <= t
(and their timesteps): the model can be trained with independent per-frame noise levels
(diffusion forcing) and sampled autoregressively. The MoE FFN is ``vidgen_kernels.nn.MoEFFN``
when available, else :class:`vidgen.models.moe.ReferenceMoE`; after a forward, ``model.aux_loss``
holds the summed load-balancing loss of the blocks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

import vidgen_kernels as vk
from vidgen_kernels.nn import AdaLNZero, CausalTemporalAttention, RoPE3DAttention

from .layers import (CopyableLossesMixin, CrossAttention, FinalLayer, ModelBackend, PatchEmbed3D,
                     TimestepEmbedder, backend_scope, block_forward, check_config_backend,
                     check_config_sizes, check_ffn_width, check_input_dtype, check_input_tensor,
                     check_patch_size, check_text, keeps_losses, unpatchify)
from .moe import make_moe

__all__ = ["VideoCausalDiTConfig", "VideoCausalDiT"]

MAX_FRAMES = 32


@dataclass
class VideoCausalDiTConfig:
    in_channels: int = 16
    patch_size: tuple = (1, 2, 2)
    hidden_size: int = 512
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    num_experts: int = 4
    top_k: int = 2
    text_dim: int = 512
    max_frames: int = MAX_FRAMES
    backend: Optional[str] = None


class VideoCausalDiTBlock(nn.Module):
    backend: Optional[str] = None  # the model's (ModelBackend), entered by forward

    def __init__(self, D: int, num_heads: int, text_dim: int, mlp_ratio: float, num_experts: int, top_k: int):
        super().__init__()
        self.adaln1 = AdaLNZero(D)  # msa slot: spatial attention; mlp slot: temporal attention
        self.adaln2 = AdaLNZero(D)  # msa slot: cross-attention; mlp slot: MoE FFN
        self.spatial_attn = RoPE3DAttention(D, num_heads, qk_norm="rms")
        self.temporal_attn = CausalTemporalAttention(D, num_heads, qk_norm="rms", rope=True, causal=True)
        self.cross_attn = CrossAttention(D, num_heads, text_dim)
        self.moe = make_moe(D, int(D * mlp_ratio / 2), num_experts, top_k, shared_expert=False,
                            context_router=True)

    @block_forward
    def forward(self, x, c, text, T, S, rope2d, y=None, gate=None):
        """``x`` ``[B, T*S, D]``; ``y``, ``gate``: the previous block's pending ``x + gate * y``.
        Returns ``(x, y, gate)``: this block's last residual is left pending too, for the next
        norm (the next block's or the final layer's) to fuse. Tensors in and out at the top
        level, none in a nested tuple: reentrant activation checkpointing (``use_reentrant=True``,
        DeepSpeed's) tracks only those, and dropped the gradients of a nested ``(y, gate)``."""
        B, N, D = x.shape
        p1 = self.adaln1(c)                                    # per-frame [B, T, D] parameters
        if y is None:
            h = self.adaln1.modulate_msa(x, p1)
        else:
            x, h = self.adaln1.residual_msa(x, y, gate, p1)
        a = self.spatial_attn(h.view(B * T, S, D), *rope2d).view(B, N, D)
        x, h = self.adaln1.residual_mlp(x, a, p1)
        p2 = self.adaln2(c)
        x, h = self.adaln2.residual_msa(x, self.temporal_attn(h, T, S), p1.gate_mlp, p2)
        a = self.cross_attn(h, text)
        x, h = self.adaln2.residual_mlp(x, a, p2)
        h4 = h.view(B, T, S, D)
        ctx = h4.mean(dim=2, keepdim=True)   # [B, T, 1, D]: the frame's mean token (causal), broadcast
        y = self.moe(h4, ctx).reshape(B, N, D)
        return x, y, p2.gate_mlp


class VideoCausalDiT(ModelBackend, CopyableLossesMixin, nn.Module):
    """``forward(x [B, T, C, H, W], t [B] or [B, T] in [0, 1], text [B, L, text_dim])`` ->
    velocity ``[B, T, C, H, W]``; H, W divisible by the patch, 1 <= T <= ``max_frames``."""

    def __init__(self, config: Optional[VideoCausalDiTConfig] = None, **kwargs):
        super().__init__()
        config = dataclasses.replace(config) if config is not None else VideoCausalDiTConfig(**kwargs)
        config.patch_size = check_patch_size(config.patch_size)
        check_config_sizes(config, "in_channels", "hidden_size", "depth", "num_heads", "num_experts",
                           "top_k", "text_dim", "max_frames")
        check_ffn_width("the expert width int(hidden_size * mlp_ratio / 2)",
                        int(config.hidden_size * config.mlp_ratio / 2), hidden_size=config.hidden_size,
                        mlp_ratio=config.mlp_ratio)
        if config.patch_size[0] != 1:
            raise ValueError(f"VideoCausalDiT needs a temporal patch of 1 (frame-causal): patch_size[0] "
                             f"must be 1, got patch_size={config.patch_size}")
        if config.num_heads < 1 or config.hidden_size % config.num_heads \
                or (config.hidden_size // config.num_heads) % 4:
            raise ValueError(f"hidden_size / num_heads must be a multiple of 4 (2D RoPE over h and w), got "
                             f"hidden_size={config.hidden_size}, num_heads={config.num_heads}")
        check_config_backend(config)
        self.config = config
        D = config.hidden_size
        self.head_dim = D // config.num_heads
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.text_pool = nn.Sequential(nn.Linear(config.text_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList([VideoCausalDiTBlock(D, config.num_heads, config.text_dim, config.mlp_ratio,
                                                         config.num_experts, config.top_k)
                                     for _ in range(config.depth)])
        self.backend = config.backend  # (ModelBackend: on the blocks too)
        self.final_layer = FinalLayer(D, config.patch_size[1] * config.patch_size[2] * config.in_channels)
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        check_input_tensor("x", x, "[B, T, C, H, W]")
        T, h, w = self.x_embedder.grid(x)
        B = x.shape[0]
        if not 1 <= T <= self.config.max_frames:
            raise ValueError(f"frame count {T} outside 1..{self.config.max_frames}")
        text = check_text(text, B, self.config.text_dim)
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.dim() <= 1:
            t = t.reshape(-1, 1).expand(B, T) if (t.numel() == 1 or t.numel() == B) else t
        if t.shape != (B, T):
            raise ValueError(f"t must be a scalar, [B] or per-frame [B, T] = [{B}, {T}], got {tuple(t.shape)}")
        check_input_dtype("x", x, self.x_embedder.proj.weight)
        check_input_dtype("text", text, self.text_pool[0].weight)
        with backend_scope(self.backend):
            tokens = self.x_embedder(x)
            c = self.t_embedder(t) + self.text_pool(text.mean(1))[:, None]       # [B, T, D]
            cos, sin = vk.rope3d_freqs(1, h, w, self.head_dim, axes_dims=(0, self.head_dim // 2, self.head_dim // 2),
                                       device=x.device)
            y = gate = None  # the pending residual x + gate * y
            for block in self.blocks:
                tokens, y, gate = block(tokens, c, text, T, h * w, (cos, sin), y, gate)
            if keeps_losses():
                self.aux_loss = sum(block.moe.aux_loss for block in self.blocks)
            # per-frame shift / scale: [B, T, D] rows
            out = self.final_layer(tokens, c, None if y is None else (y, gate))
        return unpatchify(out, (T, h, w), self.config.patch_size, self.config.in_channels)
