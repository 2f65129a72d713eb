"""CogVideoXTransformer: CogVideoX-style expert transformer (diffusers
``cogvideox_transformer_3d.py`` conventions) on the vidgen_kernels ops.

    text [B, L, text_hidden] -> Linear -> [B, L, D];  video [B, T, C, H, W] -> PatchEmbed3D -> [B, N, D]
    temb = TimestepEmbedder(t)  [B, time_embed_dim]
    num_layers x block:
        LayerNormZero (shift, scale, gate for video and text)  -> full 3D attention over
            cat([text, video]) with QK LayerNorm and RoPE-3D on the video tokens only
            (``vidgen_kernels.nn.RoPE3DAttention``, rope_offset = text length)
        gated attention residual fused into LayerNormZero (``forward_residual``: one
            ``gated_residual_adaln`` per stream) -> expert FFN routed by modality: text tokens ->
            text experts, video tokens -> video experts (one ``vidgen_kernels.moe_ffn`` call; with
            several experts per modality a router picks the top-1 within the token's modality)
    final LayerNorm + AdaLN (shift, scale) -> Linear -> unpatchify -> [B, T, C_out, H, W]

:func:`param_count` gives the parameter count from the config without building the model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vidgen_kernels as vk
from vidgen_kernels.nn import LayerNormZero, RoPE3DAttention

from .layers import (CopyableLossesMixin, ModelBackend, PatchEmbed3D, TimestepEmbedder,
                     backend_scope, block_forward, check_config_backend, check_config_sizes,
                     check_ffn_width, check_input_dtype, check_input_tensor, check_patch_size,
                     check_text, check_timesteps, keeps_losses, unpatchify)

__all__ = ["CogVideoXConfig", "CogVideoXTransformer", "cogvideox_2b", "cogvideox_5b", "param_count",
           "recommended_defaults"]

FREQ_DIM = 256  # sinusoidal features of the timestep embedder
# LayerNorm eps of every norm (norm1 / norm2, norm_final, norm_out): diffusers'
# CogVideoXTransformer3DModel passes its norm_eps (default 1e-5, not exposed by CogVideoXConfig)
# to all of them, AdaLayerNorm norm_out included
NORM_EPS = 1e-5


@dataclass
class CogVideoXConfig:
    in_channels: int = 16
    out_channels: Optional[int] = None
    patch_size: tuple = (1, 2, 2)
    hidden_size: int = 1920
    num_heads: int = 30
    num_layers: int = 30
    text_hidden_size: int = 4096
    time_embed_dim: int = 512
    mlp_ratio: float = 4.0
    num_text_experts: int = 1
    num_video_experts: int = 1
    rope_theta: float = 10000.0
    backend: Optional[str] = None


def cogvideox_2b(**kw) -> CogVideoXConfig:
    """CogVideoX-2B shapes: 30 layers, 30 heads x 64 (hidden 1920), T5-XXL text (4096)."""
    return CogVideoXConfig(**{"hidden_size": 1920, "num_heads": 30, "num_layers": 30, **kw})


def cogvideox_5b(**kw) -> CogVideoXConfig:
    """CogVideoX-5B shapes: 42 layers, 48 heads x 64 (hidden 3072), T5-XXL text (4096)."""
    return CogVideoXConfig(**{"hidden_size": 3072, "num_heads": 48, "num_layers": 42, **kw})


def recommended_defaults() -> dict:
    """CogVideoX's sampling defaults (49 frames 480x720 -> latents 13 x 60 x 90; 226 T5 tokens)."""
    return {"num_frames": 49, "height": 480, "width": 720, "latent_frames": 13, "latent_height": 60,
            "latent_width": 90, "max_text_tokens": 226, "num_inference_steps": 50, "guidance_scale": 6.0,
            "fps": 8}


def _ffn_dim(c: CogVideoXConfig) -> int:
    return int(c.hidden_size * c.mlp_ratio)


def _checked_config(config: Optional[CogVideoXConfig] = None, **kwargs) -> CogVideoXConfig:
    """A checked copy of ``config`` (or ``CogVideoXConfig(**kwargs)``; the caller's config is
    not changed) with ``patch_size`` as a tuple of ints and ``out_channels`` filled in: the
    config :class:`CogVideoXTransformer` builds from and :func:`param_count` counts. Raises the
    ValueError naming the option of a config the model cannot run."""
    c = dataclasses.replace(config) if config is not None else CogVideoXConfig(**kwargs)
    c.patch_size = check_patch_size(c.patch_size)
    c.out_channels = c.out_channels or c.in_channels
    check_config_sizes(c, "hidden_size", "num_heads", "num_layers")
    check_ffn_width("the expert width int(hidden_size * mlp_ratio)", int(c.hidden_size * c.mlp_ratio),
                    hidden_size=c.hidden_size, mlp_ratio=c.mlp_ratio)
    if c.hidden_size % c.num_heads or (c.hidden_size // c.num_heads) % 16:
        # (each part of the RoPE-3D split D/4, 3D/8, 3D/8 is an even number of channels)
        raise ValueError(f"hidden_size / num_heads must be a multiple of 16 (RoPE-3D split D/4, "
                         f"3D/8, 3D/8 into even parts), got hidden_size={c.hidden_size}, "
                         f"num_heads={c.num_heads}")
    for name in ("num_text_experts", "num_video_experts"):
        n = getattr(c, name)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    check_config_backend(c)
    return c


def param_count(config: CogVideoXConfig) -> int:
    """Parameters of ``CogVideoXTransformer(config)``, computed from the config alone (checked as
    the model checks it: a config the model refuses raises the same ValueError)."""
    config = _checked_config(config)
    D, E = config.hidden_size, config.num_text_experts + config.num_video_experts
    te, Fd, hd = config.time_embed_dim, _ffn_dim(config), config.hidden_size // config.num_heads
    pt, ph, pw = config.patch_size
    c_out = config.out_channels
    n = pt * ph * pw * config.in_channels * D + D                      # patch embedding (conv)
    n += config.text_hidden_size * D + D                                # text projection
    n += FREQ_DIM * te + te + te * te + te                              # timestep MLP
    block = 2 * (te * 6 * D + 6 * D + 2 * D)                            # two LayerNormZero
    block += D * 3 * D + 3 * D + D * D + D + 2 * 2 * hd                 # attention + QK LayerNorms
    block += D * E + E * (D * Fd + Fd + Fd * D + D)                     # router + experts
    n += config.num_layers * block
    n += 2 * D + (te * 2 * D + 2 * D) + 2 * D                           # norm_final, norm_out linear + LN
    n += D * pt * ph * pw * c_out + pt * ph * pw * c_out                # proj_out
    return n


class ModalityExpertFFN(CopyableLossesMixin, nn.Module):
    """Expert FFN routed by modality, via ``vidgen_kernels.moe_ffn`` (top-1, GELU-tanh).

    A text token goes to one of the ``num_text_experts`` text experts, a video token to one of
    the video experts, chosen by a softmax router restricted to its modality; the expert's
    output is scaled by its routing probability (Switch Transformer's top-1, so the router
    learns; with one expert per modality, as in CogVideoX, the probability is exactly 1).
    ``aux_loss`` after a forward: the Switch load-balancing loss of the routing (its gradient
    balances the experts within each modality).
    """

    def __init__(self, dim: int, ffn_dim: int, num_text_experts: int, num_video_experts: int):
        super().__init__()
        self.Et, self.Ev = num_text_experts, num_video_experts
        E = self.Et + self.Ev
        self.router = nn.Linear(dim, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, dim, ffn_dim))
        self.b1 = nn.Parameter(torch.zeros(E, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(E, ffn_dim, dim))
        self.b2 = nn.Parameter(torch.zeros(E, dim))
        nn.init.normal_(self.w1, std=dim ** -0.5)
        nn.init.normal_(self.w2, std=ffn_dim ** -0.5)
        nn.init.normal_(self.router.weight, std=0.02)
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor, text_len: int) -> Tensor:
        B, S, C = x.shape
        logits = self.router(x).float()
        # token s may use expert e iff both are text or both are video; as 0/1 integers, since
        # inductor (torch 2.13) fails to lower an == between two boolean tensors
        is_text = (torch.arange(S, device=x.device) < text_len).to(torch.int8)        # [S]
        expert_is_text = (torch.arange(self.Et + self.Ev, device=x.device) < self.Et).to(torch.int8)
        allowed = is_text[:, None] == expert_is_text[None, :]                         # [S, E]
        logits = logits.masked_fill(~allowed, -1e4).reshape(B * S, self.Et + self.Ev)
        res = vk.moe_ffn(x, logits, self.w1, self.w2, top_k=1, activation="gelu", b1=self.b1, b2=self.b2,
                         normalize_weights=False)
        if keeps_losses():
            self.aux_loss = res.aux_loss
        return res.out


class CogVideoXBlock(nn.Module):
    backend: Optional[str] = None  # the model's (ModelBackend), entered by forward

    def __init__(self, c: CogVideoXConfig):
        super().__init__()
        D = c.hidden_size
        self.norm1 = LayerNormZero(c.time_embed_dim, D, eps=NORM_EPS)
        self.attn1 = RoPE3DAttention(D, c.num_heads, qk_norm="layer", bias=True)
        self.norm2 = LayerNormZero(c.time_embed_dim, D, eps=NORM_EPS)
        self.ff = ModalityExpertFFN(D, _ffn_dim(c), c.num_text_experts, c.num_video_experts)

    @block_forward
    def forward(self, hidden: Tensor, enc: Tensor, temb: Tensor, rope) -> tuple[Tensor, Tensor]:
        L = enc.shape[1]
        nh, ne, gate, egate = self.norm1(hidden, enc, temb)
        attn = self.attn1(torch.cat([ne, nh], dim=1), *rope, rope_offset=L)
        # the attention residual fused into the second norm (gated_residual_adaln)
        hidden, enc, nh, ne, gate, egate = self.norm2.forward_residual(
            hidden, enc, attn[:, L:], attn[:, :L], gate, egate, temb)
        ff = self.ff(torch.cat([ne, nh], dim=1), L)
        return hidden + gate * ff[:, L:], enc + egate * ff[:, :L]


class CogVideoXTransformer(ModelBackend, CopyableLossesMixin, nn.Module):
    """``forward(x [B, T, C, H, W], t [B] in [0, 1], text [B, L, text_hidden_size])`` ->
    ``[B, T, C_out, H, W]``.

    After a forward, ``aux_loss`` is the sum of the expert FFNs' load-balancing losses (its
    gradient is zero with one expert per modality). Text and video tokens have FFNs of their own
    (the modality experts), so a preset has more parameters than the CogVideoX model of the same
    widths, whose FFN is shared: ``param_count(cogvideox_2b())`` is 2.58e9.
    """

    def __init__(self, config: Optional[CogVideoXConfig] = None, **kwargs):
        super().__init__()
        c = _checked_config(config, **kwargs)
        self.config = c
        D = c.hidden_size
        self.head_dim = D // c.num_heads
        self.patch_embed = PatchEmbed3D(c.patch_size, c.in_channels, D)
        self.text_proj = nn.Linear(c.text_hidden_size, D)
        self.time_embedding = TimestepEmbedder(c.time_embed_dim, FREQ_DIM)
        self.blocks = nn.ModuleList([CogVideoXBlock(c) for _ in range(c.num_layers)])
        self.backend = c.backend  # (ModelBackend: on the blocks too)
        self.norm_final = nn.LayerNorm(D, eps=NORM_EPS)
        self.norm_out_linear = nn.Linear(c.time_embed_dim, 2 * D)
        self.norm_out = nn.LayerNorm(D, eps=NORM_EPS)
        pt, ph, pw = c.patch_size
        self.proj_out = nn.Linear(D, pt * ph * pw * c.out_channels)

    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        check_input_tensor("x", x, "[B, T, C, H, W]")
        T, h, w = self.patch_embed.grid(x)
        B = x.shape[0]
        c = self.config
        text = check_text(text, B, c.text_hidden_size, "text_hidden_size")
        t = check_timesteps(t, B, x.device)
        check_input_dtype("x", x, self.patch_embed.proj.weight)
        check_input_dtype("text", text, self.text_proj.weight)
        with backend_scope(self.backend):
            hidden = self.patch_embed(x)
            enc = self.text_proj(text)
            temb = self.time_embedding(t)
            rope = vk.rope3d_freqs(T, h, w, self.head_dim, theta=c.rope_theta, device=x.device)
            for block in self.blocks:
                hidden, enc = block(hidden, enc, temb, rope)
            if keeps_losses():
                self.aux_loss = sum(block.ff.aux_loss for block in self.blocks)
            hidden = self.norm_final(hidden)
            shift, scale = self.norm_out_linear(F.silu(temb)).chunk(2, dim=-1)
            hidden = vk.adaln_modulate(hidden, shift, scale, weight=self.norm_out.weight,
                                       bias=self.norm_out.bias, eps=self.norm_out.eps)
            out = self.proj_out(hidden)
        return unpatchify(out, (T, h, w), c.patch_size, c.out_channels)
