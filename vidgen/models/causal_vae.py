"""CausalVideoVAE: a 3D causal video VAE with factorized (2+1)D convolutions.

``8x`` spatial and ``4x`` temporal compression with the CogVideoX / Wan frame convention: a
video of ``1 + 4k`` frames has ``1 + k`` latent frames; latent 0 encodes frame 0 alone and
latent ``j >= 1`` encodes frames ``4j-3 .. 4j``. Internally tensors are ``[B, C, T, H, W]``::

    x [B, 1+4k, C, H, W] -> FConv(C -> ch0)
      level i = 0 .. L-1 (ch_i = base * mults[i]): blocks_per_level x ResBlock(-> ch_i)
        then, for i < L-1, Down: 3x3 conv stride 2 in H, W   [+ causal k=3 conv stride 2 in T
        for the first num_temporal_down of them:  1 + 2m -> 1 + m frames]
      ResBlock, ResBlock, GroupNorm, SiLU, FConv(-> 2z)  = (mean, logvar) [B, 1+k, z, H/8, W/8]
    decoder: the mirror image; Up = nearest 2x in H, W + 3x3 conv [+ causal temporal conv to
        2 * ch channels: frame 0 -> 1 frame, frame j >= 1 -> frames 2j-1, 2j (1 + m -> 1 + 2m)]

    FConv   = Conv3d (1, 3, 3) (spatial) then Conv3d (3, 1, 1) (temporal, causal)
    ResBlock = x + FConv(SiLU(GN(FConv(SiLU(GN(x))))))   (1x1x1 conv on the skip if ch changes)

Causality: every temporal conv is left-padded with ``k - 1`` copies of the first frame
(replicate padding: frame 0 is then encoded as a still clip of itself, and a 1-frame video is
an image), and GroupNorm takes its statistics per frame. Hence latent ``j`` depends only on
input frames ``<= 4j``, decoded frame ``t`` only on latents ``<= ceil(t / 4)``, and the
reconstruction frame ``t`` only on input frames ``<= 4 * ceil(t / 4)`` (causal at the latent
group level: changing frames ``> 4j`` leaves latents ``<= j`` and output frames ``<= 4j`` unchanged).

Sampling, ``forward``, the loss and the latent normalisation (``latents_mean``, ``scaling_factor``,
``encode_scaled`` / ``decode_scaled``) come from :class:`vidgen.models.vae.LatentVAE`, shared with
:class:`vidgen.models.vae.SmallVideoVAE`.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import check_sizes
from .vae import LatentVAE, gn_groups

__all__ = ["CausalVideoVAE"]


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with per-frame statistics on ``[B, C, T, H, W]`` (no mixing across time)."""

    def forward(self, x: Tensor) -> Tensor:
        B, C, T, H, W = x.shape
        y = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))
        return y.reshape(B, T, C, H, W).transpose(1, 2)


def _gn(ch: int) -> FrameGroupNorm:
    return FrameGroupNorm(gn_groups(ch), ch)


class CausalTimeConv(nn.Conv3d):
    """Conv3d with kernel ``(k, 1, 1)``, left-padded with ``k - 1`` copies of frame 0."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__(cin, cout, (k, 1, 1), stride=(stride, 1, 1))
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        pad = x[:, :, :1].expand(-1, -1, self.k - 1, -1, -1)
        return super().forward(torch.cat([pad, x], dim=2))


class FConv(nn.Sequential):
    """Factorized conv: spatial ``(1, 3, 3)`` then causal temporal ``(3, 1, 1)``."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1)), CausalTimeConv(cout, cout))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_gn(cin), nn.SiLU(), FConv(cin, cout), _gn(cout), nn.SiLU(), FConv(cout, cout))
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class Down(nn.Module):
    """H, W -> H/2, W/2; with ``temporal``, T = 1 + 2m -> 1 + m (out j sees frames 2j-2..2j)."""

    def __init__(self, ch: int, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv3d(ch, ch, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.time = CausalTimeConv(ch, ch, 3, stride=2) if temporal else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.time(self.spatial(x))


class Up(nn.Module):
    """H, W -> 2H, 2W; with ``temporal``, T = 1 + m -> 1 + 2m (frame j >= 1 -> frames 2j-1, 2j).

    The temporal part is a residual on nearest (repeat) upsampling, zero-initialised."""

    def __init__(self, ch: int, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv3d(ch, ch, (1, 3, 3), padding=(0, 1, 1))
        self.time = CausalTimeConv(ch, 2 * ch) if temporal else None
        if self.time is not None:
            nn.init.zeros_(self.time.weight)
            nn.init.zeros_(self.time.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        x = self.spatial(x)
        if self.time is None:
            return x
        B, C, T, H, W = x.shape
        y = self.time(x)                                            # [B, 2C, 1+m, H, W]
        first = x[:, :, :1] + y[:, :C, :1]                          # frame 0 stays alone
        rest = x[:, :, 1:].repeat_interleave(2, dim=2)              # [B, C, 2m, H, W]
        rest = rest + y[:, :, 1:].unflatten(1, (2, C)).permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * (T - 1), H, W)
        return torch.cat([first, rest], dim=2)


class CausalVideoVAE(LatentVAE):
    def __init__(self, in_channels: int = 3, latent_channels: int = 16, base_channels: int = 64,
                 channel_mults: Sequence[int] = (1, 2, 4, 4), num_spatial_down: int = 3,
                 num_temporal_down: int = 2, blocks_per_level: int = 1):
        super().__init__()
        # blocks_per_level >= 1: the level's ResBlocks are what change the width to
        # base_channels * channel_mults[i]; with 0 every level kept base_channels (channel_mults
        # silently ignored). num_spatial_down = 0 (no compression) is a valid, if odd, model.
        check_sizes(owner="CausalVideoVAE", in_channels=in_channels, latent_channels=latent_channels,
                    base_channels=base_channels, blocks_per_level=blocks_per_level)
        check_sizes(0, owner="CausalVideoVAE", num_spatial_down=num_spatial_down,
                    num_temporal_down=num_temporal_down)
        try:
            mults = tuple(operator.index(m) for m in channel_mults if not isinstance(m, bool))
            ok = not isinstance(channel_mults, str) and len(mults) == len(channel_mults) \
                and all(m >= 1 for m in mults)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"channel_mults must be a sequence of ints >= 1, got {channel_mults!r}")
        if len(mults) != num_spatial_down + 1:
            raise ValueError(f"channel_mults must have num_spatial_down + 1 = {num_spatial_down + 1} "
                             f"entries, got {mults}")
        channel_mults = mults
        if not 0 <= num_temporal_down <= num_spatial_down:
            raise ValueError(f"num_temporal_down must be in [0, num_spatial_down={num_spatial_down}], "
                             f"got {num_temporal_down}")
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.spatial_factor, self.temporal_factor = 2 ** num_spatial_down, 2 ** num_temporal_down
        chs = [base_channels * m for m in channel_mults]
        L = len(chs)

        enc: list[nn.Module] = [FConv(in_channels, chs[0])]
        ch = chs[0]
        for i in range(L):
            for _ in range(blocks_per_level):
                enc.append(ResBlock(ch, chs[i]))
                ch = chs[i]
            if i < L - 1:
                enc.append(Down(ch, temporal=i < num_temporal_down))
        enc += [ResBlock(ch, ch), ResBlock(ch, ch), _gn(ch), nn.SiLU(), FConv(ch, 2 * latent_channels)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [FConv(latent_channels, ch), ResBlock(ch, ch), ResBlock(ch, ch)]
        for i in reversed(range(L)):
            for _ in range(blocks_per_level):
                dec.append(ResBlock(ch, chs[i]))
                ch = chs[i]
            if i > 0:
                dec.append(Up(ch, temporal=i - 1 < num_temporal_down))
        dec += [_gn(ch), nn.SiLU(), FConv(ch, in_channels)]
        self.decoder = nn.Sequential(*dec)
        self._init_latent_norm(latent_channels)

    def _check(self, t: Tensor, name: str, channels: int, video: bool):
        f, s = self.temporal_factor, self.spatial_factor
        want = (f"[B, 1 + {f}k, {channels}, H, W] with H, W divisible by {s}" if video
                else f"[B, 1 + k, {channels}, h, w]")
        if t.dim() != 5:
            raise ValueError(f"{name} must be 5-D {want}, got {t.dim()}-D shape {tuple(t.shape)}")
        if t.shape[2] != channels:
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)} "
                             f"({t.shape[2]} channels, expected {channels})")
        if t.shape[1] < 1 or (video and (t.shape[1] - 1) % f):
            form = f"1 + {f}k" if video else "1 + k (at least one frame)"
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)} "
                             f"(T={t.shape[1]} frames is not of the form {form})")
        if t.shape[-1] < 1 or t.shape[-2] < 1:
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)} "
                             f"(H, W = {tuple(t.shape[-2:])}: both must be >= 1)")
        if video and (t.shape[-1] % s or t.shape[-2] % s):
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)} "
                             f"(H, W = {tuple(t.shape[-2:])} not divisible by {s})")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, 1+4k, C, H, W]`` in [-1, 1] -> ``(mean, logvar)`` each ``[B, 1+k, z, H/8, W/8]``."""
        self._check(x, "x", self.in_channels, video=True)
        m = self.encoder(x.transpose(1, 2)).transpose(1, 2)
        mean, logvar = m.chunk(2, dim=2)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """``z [B, 1+k, z, h, w]`` (unscaled) -> video ``[B, 1+4k, C, 8h, 8w]``."""
        self._check(z, "z", self.latent_channels, video=False)
        return self.decoder(z.transpose(1, 2)).transpose(1, 2)
