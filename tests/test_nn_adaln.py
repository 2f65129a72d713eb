"""AdaLNZero (DiT) and LayerNormZero (CogVideoX) modules against the models' own formulas."""
import pytest
import torch
import torch.nn.functional as F

import vidgen_kernels as vk
from vidgen_kernels.nn import AdaLNZero, LayerNormZero
from vidgen_kernels.nn.adaln import AdaLNParams

from helpers import assert_close_rule, backend_params, meta_init

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_msa_equals_residual_out_then_modulate(backend):
    """AdaLNZero.residual_msa(x, y, gate, p): another AdaLN's per-frame gate (the previous
    block's gate_mlp) fused into this one's attention norm; equals residual_out with that gate
    followed by modulate_msa, forward and backward (x, y, both modulation projections)."""
    torch.manual_seed(2)
    B, Fr, T, C = 2, 3, 5, 16
    prev, m = AdaLNZero(C, norm="rms"), AdaLNZero(C, norm="rms", elementwise_affine=True)
    for mod in (prev, m):
        torch.nn.init.normal_(mod.linear.weight, std=0.3)
    x, y = torch.randn(B, Fr * T, C, requires_grad=True), torch.randn(B, Fr * T, C, requires_grad=True)
    c = torch.randn(B, Fr, C)
    params = [x, y, prev.linear.weight, m.linear.weight, m.weight]

    def run(fused):
        with vk.use_backend(backend):
            pp, p = prev(c), m(c)
            if fused:
                h, out = m.residual_msa(x, y, pp.gate_mlp, p)
            else:
                h = AdaLNZero.residual_out(x, y, pp)
                out = m.modulate_msa(h, p)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        return [h, out, *torch.autograd.grad((out * w).sum() + (h * w.flip(-1)).sum(), params)]

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_residual_out_dtype_forms_and_errors():
    """AdaLNZero.residual_out (gated_add): x + gate * y for every gate form, in x's dtype
    outside autocast (an fp32 gate used to turn a bf16 residual stream into fp32 for every
    later block), promoted under autocast like the fused ops; bad shapes raise a ValueError
    naming the argument (they raised view / broadcast RuntimeErrors)."""
    g = torch.Generator().manual_seed(0)
    B, Fr, T, C = 2, 3, 4, 8
    x, y = (torch.randn(B, Fr * T, C, generator=g) for _ in range(2))
    for gate in (torch.randn(C, generator=g), torch.randn(1, C, generator=g),
                 torch.randn(B, C, generator=g), torch.randn(B, Fr, C, generator=g),
                 torch.randn(B, Fr * T, C, generator=g)):
        gf = gate if gate.dim() != 3 else gate.repeat_interleave(Fr * T // gate.shape[1], 1)
        want = x + (gf if gf.dim() == 3 else gf.view(-1, 1, C)) * y
        torch.testing.assert_close(AdaLNZero.residual_out(x, y, AdaLNParams(*[gate] * 6)), want)
        torch.testing.assert_close(  # non-contiguous y
            AdaLNZero.residual_out(x, y.transpose(0, 1).contiguous().transpose(0, 1),
                                   AdaLNParams(*[gate] * 6)), want)
    xb, yb, gate = x.bfloat16(), y.bfloat16(), torch.randn(B, C, generator=g)
    p = AdaLNParams(*[gate] * 6)
    out = AdaLNZero.residual_out(xb, yb, p)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (xb.float() + gate[:, None] * yb.float()).bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert AdaLNZero.residual_out(xb, yb, p).dtype == torch.float32
    for bad, match in ((dict(y=y[:, :5]), "y \\(the sublayer output\\) must have x's shape"),
                       (dict(gate=torch.randn(B, 5, C)), "gate must be .* got shape \\(2, 5, 8\\)"),
                       (dict(gate=torch.randn(3, C)), "gate must be"),
                       (dict(x=x[0], y=y[0]), "x must be \\[B, N, C\\]")):
        a = dict(x=x, y=y, gate=gate)
        a.update(bad)
        with pytest.raises(ValueError, match=match):
            AdaLNZero.residual_out(a["x"], a["y"], AdaLNParams(*[a["gate"]] * 6))


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


# ----------------------------------------------------------------------------------------------
# torch.autocast: the Linear's bf16 modulation with an fp32 residual stream
# ----------------------------------------------------------------------------------------------
def _autocast_linear(lin, t):
    """What ``lin(t)`` computes under bf16 autocast: bf16 operands, bf16 result."""
    return F.linear(t.bfloat16(), lin.weight.bfloat16(),
                    lin.bias.bfloat16() if lin.bias is not None else None)


class _PromotedLinear(torch.nn.Module):
    """The autocast Linear's bf16 result explicitly promoted to fp32 (``lin``'s parameters)."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, t):
        return _autocast_linear(self.lin, t).float()


def _grads(outs, leaves, seed=7):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True)


def _assert_same(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"{what} {i}"
        if a is not None:
            torch.testing.assert_close(a.float(), b.float(), msg=lambda m: f"{what} {i}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layernorm_zero_under_autocast(backend):
    """CogVideoX's block under bf16 autocast: the Linear gives bf16 shift / scale / gate, the
    residual stream is fp32, the attention outputs bf16. The module then computes what it does
    on explicitly promoted (fp32) inputs, outputs and gradients alike (diffusers' eager formula
    promotes too)."""
    torch.manual_seed(5)
    B, Nv, Nt, C, D = 2, 12, 5, 16, 12
    m = LayerNormZero(D, C)
    torch.nn.init.normal_(m.norm.weight, 1.0, 0.2)
    torch.nn.init.normal_(m.norm.bias, 0.0, 0.2)
    promoted = LayerNormZero(D, C)  # the same parameters, the Linear's output promoted
    promoted.linear, promoted.norm = _PromotedLinear(m.linear), m.norm
    hid, enc, temb = (torch.randn(*s, requires_grad=True) for s in ((B, Nv, C), (B, Nt, C), (B, D)))
    ah, ae = (torch.randn(B, n, C).bfloat16().requires_grad_() for n in (Nv, Nt))
    g, eg = (torch.randn(B, 1, C).bfloat16().requires_grad_() for _ in range(2))
    leaves = [hid, enc, temb, ah, ae, g, eg] + list(m.parameters())
    with vk.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(hid, enc, temb)
            got_r = m.forward_residual(hid, enc, ah, ae, g, eg, temb)
        want = promoted(hid, enc, temb)
        want_r = promoted.forward_residual(hid, enc, ah.float(), ae.float(), g.float(),
                                           eg.float(), temb)
    assert [t.dtype for t in got] == [torch.float32] * 2 + [torch.bfloat16] * 2  # gates as diffusers
    assert [t.dtype for t in got_r] == [torch.float32] * 4 + [torch.bfloat16] * 2
    _assert_same(got, want, "forward output")
    _assert_same(got_r, want_r, "forward_residual output")
    _assert_same(_grads(got, leaves), _grads(want, leaves), "forward grad")
    _assert_same(_grads(got_r, leaves), _grads(want_r, leaves), "forward_residual grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaln_zero_under_autocast(backend):
    """DiT's block under bf16 autocast (bf16 modulation and sublayer outputs, fp32 residual
    stream): each AdaLNZero step equals the step on explicitly promoted inputs (residual_out is
    eager ``x + gate * y``: bf16 product, fp32 sum, under autocast as without)."""
    torch.manual_seed(6)
    B, N, C = 2, 10, 16
    m = AdaLNZero(C, cond_dim=8, elementwise_affine=True)
    torch.nn.init.normal_(m.linear.weight, std=0.3)
    torch.nn.init.normal_(m.linear.bias, std=0.3)
    with torch.no_grad():
        m.weight.normal_(1.0, 0.2)
        m.bias.normal_(0.0, 0.2)
    x, c = torch.randn(B, N, C, requires_grad=True), torch.randn(B, 8, requires_grad=True)
    a, mo = (torch.randn(B, N, C).bfloat16().requires_grad_() for _ in range(2))
    leaves = [x, c, a, mo] + list(m.parameters())
    with vk.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p = m(c)
            assert p.shift_msa.dtype == torch.bfloat16
            got = [m.modulate_msa(x, p), *m.residual_mlp(x, a, p)]
            got.append(m.residual_out(got[1], mo, p))
        pb = AdaLNParams(*_autocast_linear(m.linear, F.silu(c)).chunk(6, dim=-1))
        pf = AdaLNParams(*(t.float() for t in pb))
        want = [m.modulate_msa(x, pf), *m.residual_mlp(x, a.float(), pf)]
        want.append(m.residual_out(want[1], mo, pb))
    assert all(t.dtype == torch.float32 for t in got)
    _assert_same(got, want, "output")
    for i in range(len(got)):  # modulate_msa, residual_mlp (h, mlp_in), residual_out
        _assert_same(_grads(got[i:i + 1], leaves, seed=i), _grads(want[i:i + 1], leaves, seed=i),
                     f"grad of output {i}")


# ----------------------------------------------------------------------------------------------
# HeadNorm: the per-head QK norm on the AdaLN kernel
# ----------------------------------------------------------------------------------------------
def _head_norm_eager(x, m):
    if m.kind == "layer":
        return F.layer_norm(x.double(), (m.dim,), m.weight.double(), m.bias.double(), m.eps)
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps) * m.weight.double()


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("backend,device,dtype", backend_params())
def test_head_norm_matches_eager(kind, backend, device, dtype):
    """Forward and backward (x, weight, bias) against the fp64 formula, on the q slice of a
    fused qkv buffer (non-contiguous, read in place), odd sizes, flash-attention error rule."""
    torch.manual_seed(3)
    B, S, H, D = 2, 37, 3, 48
    m = vk.nn.HeadNorm(D, kind, eps=1e-6, backend=backend).to(device)
    with torch.no_grad():
        m.weight.normal_(1.0, 0.3)
        if m.bias is not None:
            m.bias.normal_(0.0, 0.3)
    qkv = (torch.randn(B, S, 3, H, D, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    g = torch.randn(B, S, H, D, device=device, dtype=dtype)
    params = [p for p in (m.weight, m.bias) if p is not None]

    def run(mod, dt):
        x = qkv.detach().to(dt).requires_grad_()
        out = mod(x.unbind(2)[1])
        grads = torch.autograd.grad(out, [x] + [p for p in (mod.weight, mod.bias) if p is not None],
                                    g.to(dt))
        return [out.double()] + [t.double() for t in grads]

    got = run(m, dtype)
    assert got[0].shape == (B, S, H, D)
    x64 = qkv.detach().double().requires_grad_()
    out64 = _head_norm_eager(x64.unbind(2)[1], m)
    want = [out64] + list(torch.autograd.grad(out64, [x64] + params, g.double()))
    lo = vk.nn.HeadNorm(D, kind, eps=1e-6, backend="reference").to(device)
    lo.load_state_dict(m.state_dict())
    lo.to(dtype)
    low = run(lo, dtype)  # F.rms_norm / F.layer_norm in the low precision
    names = ["out", "dx", "dweight", "dbias"]
    for i, (a, w, l_) in enumerate(zip(got, want, low)):
        assert_close_rule(a, w, l_, f"{kind} {names[i]}")


def test_head_norm_saves_less_than_eager_norm():
    """Backward keeps x (here the fused qkv buffer, kept anyway) and row statistics, not a
    normalised copy: fewer distinct bytes than nn.RMSNorm's composite."""
    if "cpu" not in vk.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    D = 64
    qkv = torch.randn(1, 256, 3, 4, D, requires_grad=True)

    def kept(mod):
        st = {}

        def pack(t):
            st[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mod(qkv.unbind(2)[0])
        params = {p.untyped_storage().data_ptr() for p in mod.parameters()}
        return sum(v for k, v in st.items() if k not in params)

    ours = kept(vk.nn.HeadNorm(D, "rms", backend="cpu"))
    eager = kept(torch.nn.RMSNorm(D, eps=1e-6))
    assert ours < eager, (ours, eager)
    assert ours <= qkv.numel() * 4 + 2 * 256 * 4 * 4 + 1024  # qkv buffer + fp32 mean / rstd


def test_head_norm_drop_in_and_errors():
    m = vk.nn.HeadNorm(8, "layer", eps=1e-5)
    ref = torch.nn.LayerNorm(8, eps=1e-5)
    assert set(m.state_dict()) == set(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 2, 8)
    with vk.use_backend("reference"):
        torch.testing.assert_close(m(x), ref(x))
    assert set(vk.nn.HeadNorm(8, "rms").state_dict()) == set(torch.nn.RMSNorm(8).state_dict())
    with pytest.raises(ValueError, match=r"HeadNorm: x must be \[\.\.\., D=8\], got \(3, 7\)"):
        m(torch.randn(3, 7))
    with pytest.raises(TypeError, match="HeadNorm: x must be a floating tensor, got dtype torch.int8"):
        m(torch.ones(3, 8, dtype=torch.int8))
    with pytest.raises(TypeError, match="HeadNorm: x must be a torch.Tensor, got list"):
        m([1.0] * 8)
    with pytest.raises(ValueError, match="kind must be one of \\('layer', 'rms'\\)"):
        vk.nn.HeadNorm(8, "batch")
    for eps in (float("nan"), -1e-6, float("inf"), "1e-6"):  # NaN gave all-NaN outputs
        with pytest.raises(ValueError, match="HeadNorm: eps must be a finite Python float / int >= 0"):
            vk.nn.HeadNorm(8, eps=eps)


def test_module_reprs_show_their_configuration():
    """repr() says what each module computes: LayerNormZero's norm_type (its ``norm`` child is
    an nn.LayerNorm holding the parameters, also for RMSNorm), AdaLNZero's norm / eps /
    affine, HeadNorm's and MoEFFN's backend and MoEFFN's normalize_weights."""
    assert "norm_type='rms'" in repr(vk.nn.LayerNormZero(8, 16, norm="rms"))
    assert "norm='rms', eps=0.001, elementwise_affine=True" in repr(
        vk.nn.AdaLNZero(16, norm="rms", eps=1e-3, elementwise_affine=True))
    assert "backend=cpu" in repr(vk.nn.HeadNorm(8, backend="cpu"))
    r = repr(vk.nn.MoEFFN(8, 16, 4, normalize_weights=False, backend="reference"))
    assert "normalize_weights=False" in r and "backend=reference" in r


def test_reset_parameters_after_meta_init():
    """AdaLNZero keeps its zero modulation projection (a plain Linear child re-randomised it
    after the parent's reset: the block no longer started as the identity), HeadNorm resets to
    ones / zeros (it had no reset_parameters: left uninitialised), LayerNormZero's children
    reset as diffusers' Linear and LayerNorm; the values equal a fresh construction's."""
    for make in (lambda d: AdaLNZero(16, cond_dim=8, elementwise_affine=True, device=d),
                 lambda d: vk.nn.HeadNorm(8, "layer", device=d),
                 lambda d: vk.nn.HeadNorm(8, "rms", device=d),
                 lambda d: vk.nn.RoPE3DAttention(16, 2, qk_norm="layer", device=d)):
        m, fresh = meta_init(make), make("cpu")
        for (name, p), q in zip(m.named_parameters(), fresh.parameters()):
            assert torch.isfinite(p).all(), name
            if (q == q.flatten()[0]).all():  # a constant init (ones / zeros): the same values
                torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    m = meta_init(lambda d: AdaLNZero(16, cond_dim=8, device=d))
    assert type(m.linear).__mro__[1] is torch.nn.Linear and m.linear.weight.abs().sum() == 0
    assert set(m.state_dict()) == {"linear.weight", "linear.bias"}
    m = meta_init(lambda d: LayerNormZero(8, 16, device=d))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert m.linear.weight.std() > 0 and (m.norm.weight == 1).all()


def test_conditioning_inputs_are_checked():
    """AdaLNZero's ``c`` and LayerNormZero's ``temb`` are checked before the modulation Linear:
    a wrong width, an integer tensor, another dtype than the module's or a non-tensor gave
    torch's "mat1 and mat2 shapes cannot be multiplied", '"silu_cpu" not implemented for
    'Long'' or "mat1 and mat2 must have the same dtype", naming neither input nor module."""
    from vidgen_kernels.nn import AdaLNZero, LayerNormZero
    ada = AdaLNZero(16, cond_dim=12)
    lnz = LayerNormZero(8, 16)
    h, e = torch.randn(2, 4, 16), torch.randn(2, 2, 16)
    for call, name, width in ((ada, "c", 12), (lambda t: lnz(h, e, t), "temb", 8)):
        owner = "AdaLNZero" if call is ada else "LayerNormZero"
        with pytest.raises(ValueError, match=rf"{owner}: {name} must be \[\.\.\., {width}\] .* got "
                                             rf"shape \(2, 17\)"):
            call(torch.randn(2, 17))
        with pytest.raises(TypeError, match=rf"{owner}: {name} must be a floating tensor, got "
                                            rf"dtype torch.int64"):
            call(torch.ones(2, width, dtype=torch.long))
        with pytest.raises(TypeError, match=rf"{owner}: {name} has dtype torch.float64 but the "
                                            rf"module's parameters are torch.float32"):
            call(torch.randn(2, width, dtype=torch.float64))
        with pytest.raises(TypeError, match=rf"{owner}: {name} must be a torch.Tensor, got list"):
            call([0.0] * width)
        call(torch.randn(2, width))  # the right input runs
        with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are autocast's
            call(torch.randn(2, width, dtype=torch.bfloat16))
    assert len(ada(torch.randn(3, 5, 12))) == 6  # per-frame [B, F, cond_dim] too
