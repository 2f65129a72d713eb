"""ImageMoEDiT: an image DiT with dual-stream (MM-DiT) attention and a Mixture-of-Experts FFN.

    latents [B, C, H, W] (or one-frame [B, 1, C, H, W]) --PatchEmbed 2x2--> img [B, N=h*w, D]
    txt = context_embedder(text)  [B, L, D]                     # the second stream
    c = TimestepEmbedder(t) + MLP(mean_L(text))                 # AdaLN conditioning [B, D]
    N x ImageMoEDiTBlock:
        AdaLN-Zero (img; txt has its own) -> dual-stream joint self-attention:
            each stream has its own qkv projection, QK RMSNorm and output projection; attention
            runs over cat([img, txt]) so each stream attends to its own and the other stream's
            keys/values; 2D RoPE (h, w) on the image tokens only, text tokens unrotated
        AdaLN (img)  -> cross-attention of the image stream to the raw text embeddings
        AdaLN (img)  -> MoE FFN (num_experts=4, top_k=2, plus an always-on shared expert)
        the text stream gets its own gated GEGLU FFN (as SD3 / Flux); in the last block it only
        provides keys/values (SD3's ``context_pre_only``: no text output projection or FFN)
    FinalLayer (adaLN + linear) -> unpatchify -> flow-matching velocity [B, C_out, H, W]

Interpretation of "dual-stream self-attention (two parallel streams, each attending to the
other's keys/values, SD3/Flux style)": stream A is the image tokens, stream B is the text tokens
projected to ``hidden_size`` and carried through the blocks (MM-DiT joint attention). The joint
sequence is ``[img | txt]``; the RoPE table covers the ``h*w`` image positions
(``rope_offset=0``) so the trailing text tokens are left unrotated (``vidgen_kernels.
rope3d_attention``'s text-last convention). After the joint attention, the image stream
additionally cross-attends to the raw text embeddings (``text_dim`` wide) and then runs the MoE
FFN; only the image stream is decoded.

Every sublayer is gated with zero-initialised gates (AdaLN-Zero) and the final layer is
zero-initialised, so the untrained model predicts exactly 0. The AdaLN modulations and gated
residuals run on ``vidgen_kernels.nn.AdaLNZero`` / ``vidgen_kernels.gated_residual_adaln``, the
attentions on ``vidgen_kernels.rope3d_attention``, the MoE on :func:`vidgen.models.moe.make_moe`
(``vidgen_kernels.nn.MoEFFN``). ``backend="reference"`` runs the same model on the pure-PyTorch
reference kernels. After a forward, :attr:`ImageMoEDiT.aux_loss` is the sum of the MoE layers'
load-balancing losses (add it, scaled, to the training loss).

The expert width is ``int(hidden_size * mlp_ratio) // (top_k + shared_expert)``, so that the
FFN parameters active per token match a dense ``mlp_ratio`` FFN.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

import vidgen_kernels as vk
from vidgen_kernels.nn import AdaLNZero

from .layers import (CopyableLossesMixin, CrossAttention, FinalLayer, GEGLU, ModelBackend,
                     PatchEmbed3D, TimestepEmbedder, backend_scope, block_forward,
                     check_config_backend, check_config_sizes, check_input_dtype,
                     check_input_tensor, check_text, check_timesteps, dit_init_, keeps_losses,
                     unpatchify)
from .moe import make_moe

__all__ = ["ImageMoEDiTConfig", "ImageMoEDiT"]


@dataclass
class ImageMoEDiTConfig:
    in_channels: int = 4
    out_channels: Optional[int] = None  # default in_channels
    patch_size: int = 2
    hidden_size: int = 512
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    text_dim: int = 512           # width of the text / condition embeddings
    num_experts: int = 4
    top_k: int = 2
    shared_expert: bool = True
    rope_theta: float = 10000.0
    backend: Optional[str] = None  # None: vidgen_kernels' default; "reference": pure PyTorch


class DualStreamAttention(nn.Module):
    """MM-DiT joint attention of an image stream and a text stream.

    Each stream has its own ``qkv`` projection, per-head QK RMSNorm and output projection; one
    ``vidgen_kernels.rope3d_attention`` call over ``cat([img, txt])`` rotates the image tokens
    (the first ``len(cos)`` positions) and leaves the text tokens unrotated. With
    ``context_pre_only`` the text stream only contributes keys/values (its outputs are not
    projected; ``forward`` returns ``None`` for them).
    """

    def __init__(self, dim: int, num_heads: int, *, context_pre_only: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.img_qkv = nn.Linear(dim, 3 * dim)
        self.txt_qkv = nn.Linear(dim, 3 * dim)
        self.img_norm_q = vk.nn.HeadNorm(self.head_dim, "rms", 1e-6)
        self.img_norm_k = vk.nn.HeadNorm(self.head_dim, "rms", 1e-6)
        self.txt_norm_q = vk.nn.HeadNorm(self.head_dim, "rms", 1e-6)
        self.txt_norm_k = vk.nn.HeadNorm(self.head_dim, "rms", 1e-6)
        self.img_proj = nn.Linear(dim, dim)
        self.txt_proj = None if context_pre_only else nn.Linear(dim, dim)

    def forward(self, img: Tensor, txt: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        B, N, D = img.shape
        L = txt.shape[1]
        qi, ki, vi = self.img_qkv(img).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        qt, kt, vt = self.txt_qkv(txt).view(B, L, 3, self.num_heads, self.head_dim).unbind(2)
        q = torch.cat([self.img_norm_q(qi), self.txt_norm_q(qt)], dim=1)
        k = torch.cat([self.img_norm_k(ki), self.txt_norm_k(kt)], dim=1)
        v = torch.cat([vi, vt], dim=1)
        o = vk.rope3d_attention(q, k, v, cos, sin, rope_offset=0)   # [B, N + L, H, hd]
        o = o.reshape(B, N + L, D)
        out_txt = self.txt_proj(o[:, N:]) if self.txt_proj is not None else None
        return self.img_proj(o[:, :N]), out_txt


class ImageMoEDiTBlock(nn.Module):
    """AdaLN -> dual-stream attention -> AdaLN -> cross-attention -> AdaLN -> MoE FFN (image
    stream); AdaLN -> dual-stream attention -> AdaLN -> GEGLU (text stream, unless ``last``)."""

    backend: Optional[str] = None  # the model's (ModelBackend), entered by forward

    def __init__(self, D: int, num_heads: int, text_dim: int, mlp_ratio: float, num_experts: int,
                 top_k: int, shared_expert: bool, last: bool = False):
        super().__init__()
        self.last = last
        self.adaln_img = AdaLNZero(D)   # msa slot: joint attention; mlp slot: cross-attention
        # third image modulation (shift, scale, gate) for the MoE FFN, zero-initialised
        self.adaln_moe = nn.Sequential(nn.SiLU(), nn.Linear(D, 3 * D))
        nn.init.zeros_(self.adaln_moe[1].weight)
        nn.init.zeros_(self.adaln_moe[1].bias)
        if last:   # the text stream only feeds keys/values: shift/scale, no gates
            self.adaln_txt = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
            nn.init.zeros_(self.adaln_txt[1].weight)
            nn.init.zeros_(self.adaln_txt[1].bias)
            self.txt_ffn = None
        else:
            self.adaln_txt = AdaLNZero(D)   # msa slot: joint attention; mlp slot: text FFN
            self.txt_ffn = GEGLU(D, mlp_ratio)
        self.attn = DualStreamAttention(D, num_heads, context_pre_only=last)
        self.cross_attn = CrossAttention(D, num_heads, text_dim)
        intermediate = max(1, int(D * mlp_ratio) // (top_k + int(shared_expert)))
        self.moe = make_moe(D, intermediate, num_experts, top_k, shared_expert)

    @block_forward
    def forward(self, x: Tensor, txt: Tensor, c: Tensor, text: Tensor,
                rope2d: tuple[Tensor, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        p = self.adaln_img(c)
        h = self.adaln_img.modulate_msa(x, p)
        if self.last:
            shift, scale = self.adaln_txt(c).chunk(2, dim=-1)
            ht = vk.adaln_modulate(txt, shift, scale, eps=1e-6)
        else:
            pt = self.adaln_txt(c)
            ht = self.adaln_txt.modulate_msa(txt, pt)
        a, at = self.attn(h, ht, *rope2d)
        # image stream: x += gate * joint-attn; cross-attention input = modulate(norm(x))
        x, h = self.adaln_img.residual_mlp(x, a, p)
        ca = self.cross_attn(h, text)
        shift, scale, gate = self.adaln_moe(c).chunk(3, dim=-1)
        x, h = vk.gated_residual_adaln(x, ca, p.gate_mlp, shift, scale, eps=1e-6)
        x = x + gate.unsqueeze(1) * self.moe(h)
        if self.last:
            return x, None
        txt, ht = self.adaln_txt.residual_mlp(txt, at, pt)
        return x, self.adaln_txt.residual_out(txt, self.txt_ffn(ht), pt)


class ImageMoEDiT(ModelBackend, CopyableLossesMixin, nn.Module):
    """Image MoE DiT predicting the flow-matching velocity.

    ``forward(x [B, C, H, W], t [B] in [0, 1] (or a scalar), text [B or 1, L, text_dim])`` ->
    ``[B, C_out, H, W]``; a one-frame ``[B, 1, C, H, W]`` input (as
    :func:`vidgen.pipelines.generate_image` passes) gives ``[B, 1, C_out, H, W]``. Any H, W
    divisible by ``patch_size``.
    """

    def __init__(self, config: Optional[ImageMoEDiTConfig] = None, **kwargs):
        super().__init__()
        config = dataclasses.replace(config) if config is not None else ImageMoEDiTConfig(**kwargs)
        if config.out_channels is None:
            config.out_channels = config.in_channels
        p = config.patch_size
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"patch_size must be an int >= 1, got {p!r}")
        check_config_sizes(config, "in_channels", "out_channels", "hidden_size", "num_heads", "depth",
                           "text_dim", "num_experts", "top_k")
        if not isinstance(config.shared_expert, bool):
            raise TypeError(f"shared_expert must be a bool, got {config.shared_expert!r}")
        if config.hidden_size % config.num_heads:
            raise ValueError(f"hidden_size {config.hidden_size} must be divisible by num_heads {config.num_heads}")
        if config.top_k > config.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={config.num_experts}], got {config.top_k}")
        self.config = config
        check_config_backend(config)
        D = config.hidden_size
        self.head_dim = D // config.num_heads
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be divisible by 4 (2D RoPE over h and w)")
        self.x_embedder = PatchEmbed3D((1, p, p), config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.text_pool = nn.Sequential(nn.Linear(config.text_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.context_embedder = nn.Linear(config.text_dim, D)
        self.blocks = nn.ModuleList([
            ImageMoEDiTBlock(D, config.num_heads, config.text_dim, config.mlp_ratio, config.num_experts,
                             config.top_k, config.shared_expert, last=(i == config.depth - 1))
            for i in range(config.depth)])
        self.backend = config.backend  # (ModelBackend: on the blocks too)
        self.final_layer = FinalLayer(D, p * p * config.out_channels)
        self._aux_loss: Tensor = torch.zeros(())
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation: xavier linears, zero AdaLN/final (done in their modules)."""
        dit_init_(self, self.x_embedder, self.t_embedder)

    @property
    def aux_loss(self) -> Tensor:
        """Sum of the MoE layers' load-balancing losses of the last forward (0 before any)."""
        return self._aux_loss

    # ------------------------------------------------------------------------------- checks
    def _check_x(self, x: Tensor) -> tuple[int, int]:
        check_input_tensor("x", x, "of image latents [B, C, H, W] (or one-frame [B, 1, C, H, W])")
        if x.dim() not in (4, 5):
            raise ValueError(f"x must be image latents [B, C, H, W] (or one-frame [B, 1, C, H, W]), "
                             f"got {tuple(x.shape)}")
        if x.dim() == 5 and x.shape[1] != 1:
            raise ValueError(f"x: a 5D input must have one frame [B, 1, C, H, W], got {tuple(x.shape)}")
        C, H, W = x.shape[-3:]
        if C != self.config.in_channels:
            raise ValueError(f"x has {C} channels, expected in_channels={self.config.in_channels} "
                             f"(shape {tuple(x.shape)})")
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"x: latent height H={H} and width W={W} must be divisible by patch_size={p}")
        return H // p, W // p

    # ------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        h, w = self._check_x(x)
        video = x.dim() == 5
        B = x.shape[0]
        text = check_text(text, B, self.config.text_dim)
        t = check_timesteps(t, B, x.device)
        check_input_dtype("x", x, self.x_embedder.proj.weight)
        check_input_dtype("text", text, self.context_embedder.weight)
        with backend_scope(self.backend):
            img = self.x_embedder(x if video else x.unsqueeze(1))       # [B, h*w, D]
            txt = self.context_embedder(text)                            # [B, L, D]
            c = self.t_embedder(t) + self.text_pool(text.mean(dim=1))
            cos, sin = vk.rope3d_freqs(1, h, w, self.head_dim,
                                       axes_dims=(0, self.head_dim // 2, self.head_dim // 2),
                                       theta=self.config.rope_theta, device=x.device)
            for block in self.blocks:
                img, txt = block(img, txt, c, text, (cos, sin))
            if keeps_losses():
                self._aux_loss = sum(block.moe.aux_loss for block in self.blocks)
            out = self.final_layer(img, c)
        p = self.config.patch_size
        out = unpatchify(out, (1, h, w), (1, p, p), self.config.out_channels)   # [B, 1, C, H, W]
        return out if video else out[:, 0]
