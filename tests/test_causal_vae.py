"""CausalVideoVAE at tiny configs: shapes, (latent-group) causality, bad inputs, a short
training run, the scaling factor and reproducible sampling."""
import math

import pytest
import torch
from helpers import perturb

from vidgen.models.causal_vae import CausalVideoVAE


@pytest.fixture(autouse=True)
def _one_thread():
    """These convs are tiny: intra-op threads only add overhead (and stall badly on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_vae(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(in_channels=3, latent_channels=4, base_channels=8, channel_mults=(1, 2, 2, 2))
    cfg.update(kw)
    return CausalVideoVAE(**cfg)



def video(B=2, T=5, C=3, H=16, W=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, C, H, W, generator=g) * 2 - 1


def smooth_videos(B=4, T=5, C=3, H=16, W=16, seed=0):
    """Low-frequency sinusoid patterns drifting over time, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T).view(T, 1, 1, 1).float()
    yy = torch.linspace(0, 1, H).view(1, 1, H, 1)
    xx = torch.linspace(0, 1, W).view(1, 1, 1, W)
    out = []
    for _ in range(B):
        fy, fx, phase = (torch.rand(3, C, generator=g) * 2 * math.pi).unbind(0)
        v, s = (torch.rand(2, C, generator=g) - 0.5).unbind(0)
        c = lambda a: a.view(1, C, 1, 1)  # noqa: E731
        out.append(torch.sin(c(fy) * yy + c(fx) * xx + c(phase) + c(v) * t) * (0.5 + c(s)))
    return torch.stack(out)


# ---------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("T,H,W", [(1, 16, 16), (5, 16, 24), (9, 8, 16)])
def test_shapes(T, H, W):
    v = tiny_vae()
    x = video(T=T, H=H, W=W)
    k = (T - 1) // 4
    mean, logvar = v.encode(x)
    assert mean.shape == logvar.shape == (2, 1 + k, 4, H // 8, W // 8)
    assert v.decode(mean).shape == x.shape
    recon, mean2, logvar2 = v(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape
    assert torch.equal(mean, mean2) and torch.equal(logvar, logvar2)
    v.loss(x, recon, mean, logvar).backward()
    assert all(p.grad is not None for p in v.parameters())


def test_default_config_shapes():
    v = CausalVideoVAE(base_channels=8)                 # 16 latent channels, 8x / 4x compression
    assert v.decode(torch.zeros(1, 2, 16, 1, 2)).shape == (1, 5, 3, 8, 16)
    assert v.encode(torch.zeros(1, 5, 3, 8, 16))[0].shape == (1, 2, 16, 1, 2)


# ------------------------------------------------------------------------------- causality
def _changed(a, b):
    """Per-frame max |a - b| over [B, T, ...] -> [T]."""
    return (a - b).abs().flatten(2).amax(dim=(0, 2))


@pytest.mark.parametrize("t", [0, 2, 4, 7])
def test_encoder_causal(t):
    """Latent j depends only on input frames <= 4j."""
    v = perturb(tiny_vae()).eval()
    x = video(T=9)
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    with torch.no_grad():
        d = _changed(v.encode(x)[0], v.encode(x2)[0])
    j = t // 4                                          # last latent with 4j <= t
    assert d[:j + 1].max() <= 1e-6, d
    assert d[j + 1:].min() > 1e-4, d                    # later latents do change


def test_latent_groups():
    """Latent 0 encodes frame 0 alone; latent j >= 1 sees frame 4j (the end of its group)."""
    v = perturb(tiny_vae()).eval()
    x = video(T=9)
    with torch.no_grad():
        m = v.encode(x)[0]
        for frame, first_changed in [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2)]:
            x2 = x.clone()
            x2[:, frame] += 0.5
            d = _changed(m, v.encode(x2)[0])
            assert (first_changed == 0 or d[:first_changed].max() <= 1e-6) and d[first_changed] > 1e-4, (frame, d)


@pytest.mark.parametrize("j", [0, 1])
def test_decoder_causal(j):
    """Decoded frame t depends only on latents <= ceil(t / 4)."""
    v = perturb(tiny_vae()).eval()
    z = torch.randn(2, 3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    z2 = z.clone()
    z2[:, j + 1:] = torch.randn_like(z2[:, j + 1:])
    with torch.no_grad():
        d = _changed(v.decode(z), v.decode(z2))
    assert d.shape == (9,)
    assert d[:4 * j + 1].max() <= 1e-6, d
    assert d[4 * j + 1:].min() > 1e-4, d


@pytest.mark.parametrize("t", [0, 3, 4, 6])
def test_forward_causal(t):
    """Changing frames > t leaves the reconstruction unchanged up to frame 4 * floor(t / 4)
    (the last complete latent group), on the mean path and on a seeded sampled path."""
    v = perturb(tiny_vae()).eval()
    x = video(T=9)
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    keep = 4 * (t // 4) + 1
    with torch.no_grad():
        outs = [v.decode(v.encode(x)[0]), v.decode(v.encode(x2)[0])]
        d_mean = _changed(*outs)
        d_sampled = _changed(v(x, torch.Generator().manual_seed(3))[0], v(x2, torch.Generator().manual_seed(3))[0])
    for d in (d_mean, d_sampled):
        assert d[:keep].max() <= 1e-6, d
        assert d[keep:].min() > 1e-4, d


# ------------------------------------------------------------------------------ bad inputs
def test_bad_inputs():
    v = tiny_vae()
    with pytest.raises(ValueError, match=r"x must be .*\(1, 6, 3, 16, 16\).*T=6 frames is not of the form 1 \+ 4k"):
        v.encode(torch.randn(1, 6, 3, 16, 16))
    with pytest.raises(ValueError, match=r"x must be .*\(1, 5, 3, 12, 16\).*not divisible by 8"):
        v.encode(torch.randn(1, 5, 3, 12, 16))
    with pytest.raises(ValueError, match=r"x must be .*\(1, 5, 1, 16, 16\).*1 channels, expected 3"):
        v.encode(torch.randn(1, 5, 1, 16, 16))
    with pytest.raises(ValueError, match=r"x must be 5-D .* 4-D shape \(5, 3, 16, 16\)"):
        v.encode(torch.randn(5, 3, 16, 16))
    with pytest.raises(ValueError, match=r"z must be .*\(1, 2, 16, 2, 2\).*16 channels, expected 4"):
        v.decode(torch.randn(1, 2, 16, 2, 2))
    with pytest.raises(ValueError, match=r"x must be .*\(1, 5, 3, 0, 16\).*both must be >= 1"):
        v.encode(torch.zeros(1, 5, 3, 0, 16))  # was a conv error on the padded size
    with pytest.raises(ValueError, match=r"z must be .*\(1, 2, 4, 2, 0\).*both must be >= 1"):
        v.decode(torch.zeros(1, 2, 4, 2, 0))
    with pytest.raises(ValueError, match=r"T=0 frames is not of the form 1 \+ k \(at least"):
        v.decode(torch.zeros(1, 0, 4, 2, 2))
    with pytest.raises(ValueError, match=r"z must be 5-D"):
        v.decode(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="channel_mults"):
        CausalVideoVAE(base_channels=8, channel_mults=(1, 2))
    with pytest.raises(ValueError, match="num_temporal_down"):
        CausalVideoVAE(base_channels=8, num_temporal_down=4)


@pytest.mark.parametrize("bad,match", [
    # num_spatial_down=-1 with () mults passed the length check and blamed num_temporal_down
    ({"num_spatial_down": -1, "channel_mults": ()}, "num_spatial_down must be an int >= 0, got -1"),
    # blocks_per_level=0 built a VAE whose levels all kept base_channels (channel_mults ignored)
    ({"blocks_per_level": 0}, "blocks_per_level must be an int >= 1, got 0"),
    # latent_channels=0 built, then encode failed with a raw conv error
    ({"latent_channels": 0}, "latent_channels must be an int >= 1, got 0"),
    ({"in_channels": 0}, "in_channels must be an int >= 1, got 0"),
    ({"base_channels": 0}, "base_channels must be an int >= 1, got 0"),
    ({"num_temporal_down": -1}, "num_temporal_down must be an int >= 0, got -1"),
    ({"channel_mults": (1, 2, 0, 2)}, r"channel_mults must be a sequence of ints >= 1, got \(1, 2, 0, 2\)"),
    ({"channel_mults": (1, 2.5, 2, 2)}, "channel_mults must be a sequence of ints >= 1"),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_bad_configs_name_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_vae(**bad)


def test_no_spatial_down_and_integer_sequence_mults_build():
    """num_spatial_down=0 (no compression) is legal; channel_mults may be any int sequence."""
    import numpy as np
    v = tiny_vae(channel_mults=[2], num_spatial_down=0, num_temporal_down=0)
    assert v.decode(v.encode(video(B=1, T=3, H=4, W=4))[0]).shape == (1, 3, 3, 4, 4)
    assert tiny_vae(channel_mults=np.array([1, 2]), num_spatial_down=1, num_temporal_down=1).spatial_factor == 2


def test_any_channel_width():
    """Widths that 8 does not divide (12, 6, 5) build and run: GroupNorm takes the largest
    divisor of the width up to 8 (a width of 12 raised GroupNorm's "num_channels (12) must be
    divisible by num_groups (8)", naming no argument of the VAE); 8 groups where 8 divides it."""
    from vidgen.models import SmallVideoVAE
    from vidgen.models.vae import gn_groups
    assert [gn_groups(c) for c in (12, 6, 5, 16, 3)] == [6, 6, 5, 8, 3]
    v = tiny_vae(base_channels=6)
    assert v.decode(v.encode(video(B=1, T=5))[0]).shape == (1, 5, 3, 16, 16)
    s = SmallVideoVAE(in_channels=1, base_channels=12)
    assert s.decode(s.encode(torch.randn(1, 1, 1, 8, 8))[0]).shape == (1, 1, 1, 8, 8)
    for bad in ((1, 1, 1, 0, 8), (1, 0, 1, 8, 8)):  # was a conv error on the padded size
        with pytest.raises(ValueError, match=r"video H, W = .* must be >= 1 .*T >= 1"):
            s.encode(torch.randn(*bad))


# ---------------------------------------------------------------- training, scaling, sampling
def test_short_training_run_loss_decreases():
    v = tiny_vae(latent_channels=8, channel_mults=(1, 1, 2, 2))
    x = smooth_videos(B=4, T=5)
    opt = torch.optim.AdamW(v.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        recon, mean, logvar = v(x, generator=g)
        loss = v.loss(x, recon, mean, logvar, kl_weight=1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(torch.nn.functional.mse_loss(recon, x).item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_scaling_factor_and_sampling():
    v = tiny_vae()
    x = video(B=2, T=5)
    s = v.fit_scaling_factor(x)
    assert s == pytest.approx(float(v.scaling_factor)) and s > 0
    z = v.encode_scaled(x)
    assert abs(z.std().item() - 1) < 1e-3
    assert torch.allclose(v.decode_scaled(z), v.decode(v.encode(x)[0]), atol=1e-5)
    zs = v.encode_scaled(x, generator=torch.Generator().manual_seed(0), sample=True)
    assert zs.shape == z.shape and not torch.equal(zs, z)
    mean, logvar = v.encode(x)
    a = v.sample(mean, logvar, torch.Generator().manual_seed(7))
    b = v.sample(mean, logvar, torch.Generator().manual_seed(7))
    c = v.sample(mean, logvar, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
