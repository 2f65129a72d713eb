"""SmallVideoVAE: a per-frame 2D-convolution VAE (the design's teaching model).

Each frame of ``[B, T, C, H, W]`` is encoded independently (no temporal compression), with
``2**num_down`` spatial compression::

    Conv3x3(C -> ch) -> [GroupNorm, SiLU, Conv4x4 stride 2] x num_down -> GroupNorm, SiLU
        -> Conv3x3(-> 2 * latent_channels)  = (mean, logvar)
    decoder: the mirror image with ConvTranspose 4x4 stride 2.

``latents_mean`` ``[z]`` and ``scaling_factor`` (buffers, set by :meth:`fit_scaling_factor`) centre
each latent channel and rescale the latents to unit variance for the diffusion model
(``encode_scaled = (mean - latents_mean) * scaling_factor``, as Wan's latents_mean/std and the
SD VAE's 0.18215).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._random import randn
from .layers import check_sizes

__all__ = ["LatentVAE", "SmallVideoVAE"]


def gn_groups(ch: int) -> int:
    """GroupNorm groups for ``ch`` channels: 8, or the largest divisor of ``ch`` below 8 (any
    channel width works)."""
    return max(g for g in range(1, min(8, ch) + 1) if ch % g == 0)


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(gn_groups(ch), ch)


class LatentVAE(nn.Module):
    """What every vidgen video VAE shares: reparameterised sampling, ``forward``, the MSE + KL loss
    and the latent normalisation for the diffusion model (``latents_mean`` ``[z]`` and
    ``scaling_factor`` buffers, fitted by :meth:`fit_scaling_factor`). Subclasses define
    ``encode(x) -> (mean, logvar)`` and ``decode(z)`` on ``[B, T, C, H, W]`` tensors and call
    :meth:`_init_latent_norm` in ``__init__``."""

    def _init_latent_norm(self, latent_channels: int):
        self.register_buffer("scaling_factor", torch.ones(()))
        self.register_buffer("latents_mean", torch.zeros(latent_channels))

    @staticmethod
    def sample(mean: Tensor, logvar: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Reparameterised sample ``mean + exp(logvar / 2) * eps``; ``eps`` is drawn on
        ``generator``'s device (a CPU generator gives the same sample on every device)."""
        eps = randn(mean.shape, generator, mean.device, mean.dtype)
        return mean + (0.5 * logvar).exp() * eps

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None):
        """-> ``(reconstruction, mean, logvar)``."""
        mean, logvar = self.encode(x)
        return self.decode(self.sample(mean, logvar, generator)), mean, logvar

    @staticmethod
    def loss(x: Tensor, recon: Tensor, mean: Tensor, logvar: Tensor, kl_weight: float = 1e-4) -> Tensor:
        """MSE reconstruction + ``kl_weight`` * KL(q(z|x) || N(0, I)) (mean over elements)."""
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return F.mse_loss(recon, x) + kl_weight * kl

    @torch.no_grad()
    def fit_scaling_factor(self, x: Tensor, center: bool = True) -> float:
        """Fit the latent normalisation on videos ``x``: ``latents_mean`` = per-channel mean of the
        encoder means (zeros if not ``center``), ``scaling_factor = 1 / std(mean - latents_mean)``."""
        mean, _ = self.encode(x)
        if mean.numel() < 2:  # (an empty batch gave NaN statistics, and NaN decodes from then on)
            raise ValueError(f"fit_scaling_factor: needs at least one video with two latent "
                             f"values, got x of shape {tuple(x.shape)}")
        mu = mean.mean(dim=(0, 1, 3, 4)) if center else torch.zeros_like(self.latents_mean)
        self.latents_mean.copy_(mu)
        self.scaling_factor.fill_(1.0 / (mean - self._channel(mu)).std().clamp(min=1e-6).item())
        return float(self.scaling_factor)

    @staticmethod
    def _channel(v: Tensor) -> Tensor:
        return v.view(1, 1, -1, 1, 1)

    def encode_scaled(self, x: Tensor, generator: Optional[torch.Generator] = None, sample: bool = False) -> Tensor:
        """Normalised latents ``(z - latents_mean) * scaling_factor`` (``z``: the mean, or a sample)."""
        mean, logvar = self.encode(x)
        z = self.sample(mean, logvar, generator) if sample else mean
        return (z - self._channel(self.latents_mean)) * self.scaling_factor

    def decode_scaled(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`encode_scaled`, then :meth:`decode`."""
        return self.decode(z / self.scaling_factor + self._channel(self.latents_mean))


class SmallVideoVAE(LatentVAE):
    def __init__(self, in_channels: int = 1, latent_channels: int = 4, base_channels: int = 32,
                 num_down: int = 2):
        super().__init__()
        check_sizes(owner="SmallVideoVAE", in_channels=in_channels, latent_channels=latent_channels,
                    base_channels=base_channels)
        check_sizes(0, owner="SmallVideoVAE", num_down=num_down)  # 0: no spatial compression (downsample 1)
        self.in_channels, self.latent_channels, self.num_down = in_channels, latent_channels, num_down
        self.downsample = 2 ** num_down
        ch = base_channels
        enc = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        for i in range(num_down):
            nxt = base_channels * min(2 ** (i + 1), 4)
            enc += [_gn(ch), nn.SiLU(), nn.Conv2d(ch, nxt, 4, stride=2, padding=1)]
            ch = nxt
        enc += [_gn(ch), nn.SiLU(), nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(latent_channels, ch, 3, padding=1)]
        for i in reversed(range(num_down)):
            nxt = base_channels * min(2 ** i, 4)
            dec += [_gn(ch), nn.SiLU(), nn.ConvTranspose2d(ch, nxt, 4, stride=2, padding=1)]
            ch = nxt
        dec += [_gn(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self._init_latent_norm(latent_channels)

    def _check(self, x: Tensor, channels: int, what: str, multiple: int = 1):
        if x.dim() != 5 or x.shape[2] != channels:
            raise ValueError(f"{what} must be [B, T, {channels}, H, W], got shape {tuple(x.shape)}")
        if x.shape[-1] % multiple or x.shape[-2] % multiple or min(x.shape[-2:]) < 1 \
                or x.shape[1] < 1:
            raise ValueError(f"{what} H, W = {tuple(x.shape[-2:])} must be >= 1 and divisible by "
                             f"{multiple}, with T >= 1 frames (got shape {tuple(x.shape)})")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, T, C, H, W]`` in [-1, 1] -> ``(mean, logvar)`` each ``[B, T, z, H/f, W/f]``."""
        self._check(x, self.in_channels, "video", self.downsample)
        B, T = x.shape[:2]
        m = self.encoder(x.flatten(0, 1))
        mean, logvar = m.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        return mean.unflatten(0, (B, T)), logvar.unflatten(0, (B, T))

    def decode(self, z: Tensor) -> Tensor:
        """``z [B, T, z, h, w]`` (unscaled) -> video ``[B, T, C, h*f, w*f]``."""
        self._check(z, self.latent_channels, "latents")
        B, T = z.shape[:2]
        return self.decoder(z.flatten(0, 1)).unflatten(0, (B, T))
