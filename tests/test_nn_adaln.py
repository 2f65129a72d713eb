"""AdaLNZero (DiT) and LayerNormZero (CogVideoX) modules against the models' own formulas."""
import pytest
import torch
import torch.nn.functional as F

import vidgen_kernels as vk
from vidgen_kernels.nn import AdaLNZero, LayerNormZero

BACKENDS = [b for b in ("reference", "cpu") if b in vk.available_backends("cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaln_zero_matches_dit(backend):
    torch.manual_seed(0)
    B, N, C = 2, 10, 16
    m = AdaLNZero(C, cond_dim=8)
    assert not m.linear.weight.any() and not m.linear.bias.any(), "AdaLN-Zero starts at zero"
    torch.nn.init.normal_(m.linear.weight, std=0.3)
    x, c, a = torch.randn(B, N, C), torch.randn(B, 8), torch.randn(B, N, C)
    # DiT models.py: chunk(6) of adaLN_modulation(c); modulate(norm(x), shift, scale),
    # norm = LayerNorm(elementwise_affine=False, eps=1e-6)
    sm, cm, gm, sp, cp, gp = m.linear(F.silu(c)).chunk(6, dim=1)
    norm = lambda t: F.layer_norm(t, (C,), eps=1e-6)  # noqa: E731
    mod = lambda t, s, k: t * (1 + k.unsqueeze(1)) + s.unsqueeze(1)  # noqa: E731
    with vk.use_backend(backend):
        p = m(c)
        torch.testing.assert_close(m.modulate_msa(x, p), mod(norm(x), sm, cm))
        h, mlp_in = m.residual_mlp(x, a, p)
        h_ref = x + gm.unsqueeze(1) * a
        torch.testing.assert_close(h, h_ref)
        torch.testing.assert_close(mlp_in, mod(norm(h_ref), sp, cp), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.residual_out(h, a, p), h_ref + gp.unsqueeze(1) * a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaln_zero_per_frame(backend):
    torch.manual_seed(1)
    B, Fr, T, C = 2, 3, 4, 8
    m = AdaLNZero(C, elementwise_affine=True, norm="rms")
    torch.nn.init.normal_(m.linear.weight, std=0.3)
    x, c = torch.randn(B, Fr * T, C), torch.randn(B, Fr, C)
    with vk.use_backend(backend):
        out = m.modulate_msa(x, m(c))
    sm, cm = m.linear(F.silu(c)).chunk(6, dim=-1)[:2]
    xr = x.view(B, Fr, T, C)
    n = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6)
    ref = (n * (1 + cm[:, :, None]) + sm[:, :, None]).view(B, Fr * T, C)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _cogvideox_layernorm_zero(mod, hidden, enc, temb):
    """diffusers CogVideoXLayerNormZero.forward, written out."""
    shift, scale, gate, e_shift, e_scale, e_gate = mod.linear(F.silu(temb)).chunk(6, dim=1)
    hidden = mod.norm(hidden) * (1 + scale)[:, None, :] + shift[:, None, :]
    enc = mod.norm(enc) * (1 + e_scale)[:, None, :] + e_shift[:, None, :]
    return hidden, enc, gate[:, None, :], e_gate[:, None, :]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layernorm_zero_matches_cogvideox(backend):
    torch.manual_seed(2)
    B, Nv, Nt, C, D = 2, 12, 5, 16, 12
    m = LayerNormZero(D, C)
    torch.nn.init.normal_(m.norm.weight, 1.0, 0.2)
    torch.nn.init.normal_(m.norm.bias, 0.0, 0.2)
    hid, enc, temb = torch.randn(B, Nv, C), torch.randn(B, Nt, C), torch.randn(B, D)
    ref = _cogvideox_layernorm_zero(m, hid, enc, temb)
    with vk.use_backend(backend):
        got = m(hid, enc, temb)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # fused residual + norm == residual then norm
    ah, ae = torch.randn(B, Nv, C), torch.randn(B, Nt, C)
    g, eg = ref[2], ref[3]
    with vk.use_backend(backend):
        h, e, nh, ne, g2, eg2 = m.forward_residual(hid, enc, ah, ae, g, eg, temb)
    h_ref, e_ref = hid + g * ah, enc + eg * ae
    ref2 = _cogvideox_layernorm_zero(m, h_ref, e_ref, temb)
    for a, b in zip((h, e, nh, ne, g2, eg2), (h_ref, e_ref) + ref2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the module's parameters are diffusers' names, so a state dict loads as is
    assert set(m.state_dict()) == {"linear.weight", "linear.bias", "norm.weight", "norm.bias"}
