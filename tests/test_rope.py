"""RoPE: ``rope3d_freqs`` against diffusers' construction, ``apply_rope`` on every backend against
the float64 reference (forward and backward), plus the custom op's plumbing.

Kernel results in the tested dtype are compared with the reference in float64 (``ref_hi``)
under flash-attention's rule, with the reference run in the tested dtype (``ref_lo``) as the
yardstick. Positions outside ``offset .. offset + L - 1`` must come back bit-identical.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import vidgen_kernels as vk
from helpers import assert_close_rule, backend_params
from vidgen_kernels.ops import rope as rope_mod

CPU_KERNELS = [b for b in ("cpu",) if b in vk.available_backends("cpu")]
HAS_TRITON_CPU = "triton" in vk.available_backends("cpu")


# ----------------------------------------------------------------------------------------------
# independent diffusers-style construction (embeddings.py, written out as NOTES.md describes)
# ----------------------------------------------------------------------------------------------
def diffusers_1d(dim: int, n: int, theta: float):
    """``get_1d_rotary_pos_embed(dim, arange(n), theta, use_real=True)``: ``[n, dim]`` cos, sin
    with each angle repeated twice (``repeat_interleave(2)``), float32 as diffusers computes."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), freqs)
    return freqs.cos().repeat_interleave(2, dim=1), freqs.sin().repeat_interleave(2, dim=1)


def diffusers_3d(T: int, Hh: int, W: int, dims, theta=10000.0):
    """``get_3d_rotary_pos_embed`` (CogVideoX): per-axis 1D tables, broadcast over the grid,
    concatenated ``[t | h | w]`` along the channel axis, flattened frame-major: ``[T*H*W, D]``."""
    dt, dh, dw = dims
    out = []
    for k in (0, 1):
        ft, fh, fw = diffusers_1d(dt, T, theta)[k], diffusers_1d(dh, Hh, theta)[k], diffusers_1d(dw, W, theta)[k]
        ft = ft[:, None, None, :].expand(-1, Hh, W, -1)
        fh = fh[None, :, None, :].expand(T, -1, W, -1)
        fw = fw[None, None, :, :].expand(T, Hh, -1, -1)
        out.append(torch.cat([ft, fh, fw], dim=-1).reshape(T * Hh * W, -1))
    return out


def diffusers_apply(x, cos_full, sin_full, interleaved: bool):
    """diffusers' ``apply_rotary_emb``: ``x * cos + rotate(x) * sin`` on ``[S, D]`` tables, x
    ``[B, S, H, D]``. Interleaved: ``rotate = stack([-x_imag, x_real]).flatten``; half-split:
    ``cat([-x2, x1])``."""
    c, s = cos_full[None, :, None, :], sin_full[None, :, None, :]
    if interleaved:
        xr, xi = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        rot = torch.stack([-xi, xr], dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
    return x * c + rot * s


def full_table(t, interleaved: bool):
    """``[L, D/2]`` -> diffusers' ``[L, D]`` layout for the given pair convention."""
    return t.repeat_interleave(2, dim=-1) if interleaved else torch.cat([t, t], dim=-1)


# ----------------------------------------------------------------------------------------------
# rope3d_freqs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,D,dims,theta", [
    ((3, 5, 7), 64, None, 10000.0),  # CogVideoX split 16/24/24
    ((2, 4, 6), 128, (44, 42, 42), 10000.0),  # Wan
    ((2, 3, 3), 128, (16, 56, 56), 256.0),  # HunyuanVideo
    ((13, 3, 4), 32, None, 10000.0),
    ((1, 5, 7), 64, None, 10000.0),  # 2D
    ((9, 1, 1), 64, None, 10000.0),  # 1D
])
def test_rope3d_freqs_matches_diffusers(grid, D, dims, theta):
    T, Hh, W = grid
    cos, sin = vk.rope3d_freqs(T, Hh, W, D, theta=theta, axes_dims=dims)
    assert cos.shape == sin.shape == (T * Hh * W, D // 2)
    assert cos.dtype == sin.dtype == torch.float32
    assert cos.is_contiguous() and sin.is_contiguous()
    want_dims = dims or (D // 4, D // 8 * 3, D // 8 * 3)
    dc, ds = diffusers_3d(T, Hh, W, want_dims, theta)
    torch.testing.assert_close(full_table(cos, True), dc, atol=2e-5, rtol=0)
    torch.testing.assert_close(full_table(sin, True), ds, atol=2e-5, rtol=0)


def test_rope3d_freqs_layout_and_special_grids():
    D = 64
    cos, sin = vk.rope3d_freqs(3, 4, 5, D)
    # frame-major: token (t, h, w) at t*20 + h*5 + w; the first pair of each axis turns by
    # exactly the position (frequency theta^0 = 1); t pairs start at 0, h at D/8 = 8, w at 8 + 12
    t, h, w = 2, 3, 4
    r = t * 20 + h * 5 + w
    for col, pos in ((0, t), (8, h), (20, w)):
        assert cos[r, col].item() == pytest.approx(math.cos(pos), abs=1e-6)
        assert sin[r, col].item() == pytest.approx(math.sin(pos), abs=1e-6)
    # second pair of the t axis: frequency theta^(-2/16)
    assert sin[r, 1].item() == pytest.approx(math.sin(t * 10000.0 ** (-2 / 16)), abs=1e-6)
    # 1D (height = width = 1): h and w pairs at angle 0, t pairs as the 1D table
    c1, s1 = vk.rope3d_freqs(7, 1, 1, D)
    assert torch.equal(c1[:, 8:], torch.ones(7, 24)) and torch.equal(s1[:, 8:], torch.zeros(7, 24))
    torch.testing.assert_close(c1[:3, :8], cos[::20, :8])
    # 2D (frames = 1) is the first frame of the 3D grid
    c2, s2 = vk.rope3d_freqs(1, 4, 5, D)
    torch.testing.assert_close(c2, cos[:20])
    torch.testing.assert_close(s2, sin[:20])


def test_rope3d_freqs_cached_and_shared():
    a = vk.rope3d_freqs(2, 3, 4, 32)
    b = vk.rope3d_freqs(2, 3, 4, 32, theta=10000, axes_dims=[8, 12, 12], device="cpu")
    assert a[0] is b[0] and a[1] is b[1]
    c = vk.rope3d_freqs(2, 3, 4, 32, theta=500.0)
    assert c[0] is not a[0]



def test_rope3d_freqs_cache_survives_inference_and_fake_modes():
    """Tables first built under ``torch.inference_mode`` (sampling) are ordinary tensors, so a
    later training call can save them for backward; tables asked for under a dispatch mode
    (``FakeTensorMode``, ``make_fx``) are built there and not cached, so a later eager call
    gets real tensors. (Both were cached as built: an inference tensor -> "Inference tensors
    cannot be saved for backward" in every later training step at that grid; a FakeTensor ->
    an error in every later eager call.)"""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    grid = (3, 5, 7, 16)  # a grid no other test uses: the first build happens below
    with torch.inference_mode():
        cos, sin = vk.rope3d_freqs(*grid)
    assert not cos.is_inference() and not sin.is_inference()
    q = torch.randn(1, 105, 2, 16, requires_grad=True)
    vk.rope3d_attention(q, q, q, *vk.rope3d_freqs(*grid)).sum().backward()
    assert q.grad is not None

    grid = (2, 3, 5, 16)
    with FakeTensorMode():
        fake = vk.rope3d_freqs(*grid)
    assert isinstance(fake[0], FakeTensor)
    real = vk.rope3d_freqs(*grid)
    assert not isinstance(real[0], FakeTensor)
    torch.testing.assert_close(real[0], vk.ops.rope._rope3d_freqs_cached.__wrapped__(
        2, 3, 5, (4, 6, 6), 10000.0, torch.device("cpu"))[0])

    def f(x):
        c, s = vk.rope3d_freqs(2, 2, 3, 16)
        return vk.rope3d_attention(x, x, x, c, s)
    make_fx(f, tracing_mode="fake")(torch.randn(1, 12, 2, 16))
    x = torch.randn(1, 12, 2, 16)
    tables = vk.ops.rope._rope3d_freqs_cached.__wrapped__(2, 2, 3, (4, 6, 6), 10000.0,
                                                          torch.device("cpu"))
    torch.testing.assert_close(f(x), vk.rope3d_attention(x, x, x, *tables))

@pytest.mark.parametrize("kwargs,match", [
    (dict(frames=2, height=2, width=2, head_dim=64, axes_dims=(16, 24, 22)), "axes_dims.*head_dim"),
    (dict(frames=2, height=2, width=2, head_dim=64, axes_dims=(15, 25, 24)), "axes_dims"),
    (dict(frames=2, height=2, width=2, head_dim=64, axes_dims=(32, 32)), "axes_dims"),
    (dict(frames=2, height=2, width=2, head_dim=8), "axes_dims"),  # default split 2/3/3 is odd
    (dict(frames=2, height=2, width=2, head_dim=63), "head_dim"),
    # not ints: used to be truncated / parsed by int() (8.7 -> 8, "8" -> 8)
    (dict(frames=2, height=2, width=2, head_dim=32, axes_dims=(8.7, 12, 12)), "3 even ints"),
    (dict(frames=2, height=2, width=2, head_dim=32, axes_dims=("8", "12", "12")), "3 even ints"),
    (dict(frames=2, height=2, width=2, head_dim=32, axes_dims=(True, 15, 16)), "3 even ints"),
    (dict(frames=0, height=2, width=2, head_dim=64), "frames"),
    (dict(frames=2, height=2, width=2, head_dim=64, theta=-1.0), "theta"),
])
def test_rope3d_freqs_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vk.rope3d_freqs(**kwargs)


def test_rope3d_freqs_bad_device():
    """torch.device's own errors named no argument."""
    with pytest.raises(TypeError, match="rope3d_freqs: device must be .* got 3.5"):
        vk.rope3d_freqs(2, 2, 2, 64, device=3.5)
    with pytest.raises(ValueError, match="rope3d_freqs: device must be .* got 'cuda:x'"):
        vk.rope3d_freqs(2, 2, 2, 64, device="cuda:x")
    # a CUDA device this torch cannot reach (torch's AssertionError "Torch not compiled with
    # CUDA enabled" on a CPU build), or an index past the machine's devices
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for dev in (["cuda", "cuda:0", 0] if n == 0 else []) + [f"cuda:{n + 6}"]:
        with pytest.raises(ValueError, match="rope3d_freqs: device .*(no CUDA GPU|CUDA device)"):
            vk.rope3d_freqs(2, 2, 2, 64, device=dev)


# ----------------------------------------------------------------------------------------------
# apply_rope against the float64 reference
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    S: int
    H: int
    D: int
    grid: tuple = (2, 3, 4)  # rope grid: L = prod
    offset: int = 0
    interleaved: bool = True
    table: str = "half"  # half ([L, D/2]) or full (diffusers [L, D])
    layout: str = "contig"  # contig, qkv (slice of [B,S,3,H,D]), bhsd (transposed), strided_d, bcast_h

    def __str__(self):
        return "-".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items()
                        if v != Case.__dataclass_fields__[k].default or k in ("B", "S", "H", "D"))


CASES = [
    Case(2, 24, 3, 16),  # whole sequence rotated
    Case(2, 24, 3, 16, interleaved=False),
    Case(2, 24, 3, 16, table="full"),
    Case(2, 24, 3, 16, table="full", interleaved=False),
    Case(2, 29, 3, 16, offset=5),  # text prefix (CogVideoX): untouched 0..4
    Case(1, 30, 2, 16, offset=0, interleaved=False),  # text suffix (HunyuanVideo): 24..29 untouched
    Case(1, 32, 3, 16, offset=3, layout="qkv"),  # tail + prefix both untouched
    Case(2, 3 * 5 * 7 + 4, 3, 16, grid=(3, 5, 7), offset=4, layout="bhsd"),
    Case(1, 3 * 5 * 7, 3, 32, grid=(3, 5, 7), layout="qkv", interleaved=False, table="full"),
    Case(2, 26, 3, 16, offset=2, layout="strided_d"),
    Case(2, 26, 4, 16, offset=2, layout="bcast_h", interleaved=False),
    Case(1, 5, 1, 2, grid=(3, 1, 1), offset=1),  # D=2: one pair per head (custom axes below)
]


def _dims(case: Case):
    if case.D == 2:
        return (2, 0, 0)
    if case.D == 16:
        return (4, 6, 6)
    return None


def _tables(case: Case, device="cpu"):
    T, Hh, W = case.grid
    cos, sin = vk.rope3d_freqs(T, Hh, W, case.D, axes_dims=_dims(case), device=device)
    if case.table == "full":
        cos, sin = full_table(cos, case.interleaved), full_table(sin, case.interleaved)
    return cos, sin


def _layout(leaf: torch.Tensor, how: str):
    """Same values as ``leaf`` [B, S, H, D] in a non-contiguous layout (gradients flow to it)."""
    B, S, H, D = leaf.shape
    if how == "contig":
        return leaf
    if how == "qkv":  # fused projection [B, S, 3, H, D], the k slice
        z = torch.zeros_like(leaf)
        return torch.stack([z, leaf, z], dim=2)[:, :, 1]
    if how == "bhsd":  # [B, H, S, D] storage viewed [B, S, H, D]
        return leaf.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "strided_d":  # every other element of [B, S, H, 2D]: last stride 2
        return torch.stack([leaf, torch.zeros_like(leaf)], -1).view(B, S, H, 2 * D)[..., ::2]
    if how == "bcast_h":  # stride 0 over heads
        return leaf[:, :, :1].expand(B, S, H, D)
    raise AssertionError(how)


def _leaf(case: Case, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.B, case.S, case.H, case.D, generator=g, dtype=torch.float64)


def _run(x, cos, sin, case, backend):
    return vk.apply_rope(x, cos, sin, interleaved=case.interleaved, offset=case.offset,
                         backend=backend)


def _fwd_bwd(leaf64, dtype, case, backend, cot64):
    leaf = leaf64.detach().to(dtype).requires_grad_()
    x = _layout(leaf, case.layout)
    cos, sin = _tables(case, leaf64.device)
    out = _run(x, cos, sin, case, backend)
    (dx,) = torch.autograd.grad(out, leaf, cot64.to(dtype))
    return x.detach(), out.detach(), dx


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend,device,dtype", backend_params())
def test_matches_reference(backend, device, dtype, case):
    leaf = _leaf(case)
    L = case.grid[0] * case.grid[1] * case.grid[2]
    assert case.offset + L <= case.S
    cot = torch.randn(leaf.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, got, dgot = _fwd_bwd(leaf.to(device), dtype, case, backend, cot.to(device))
    _, hi, dhi = _fwd_bwd(leaf, torch.float64, case, "reference", cot)
    _, lo, dlo = _fwd_bwd(leaf, dtype, case, "reference", cot)
    assert got.is_contiguous() and got.dtype == dtype and got.shape == x.shape
    assert_close_rule(got.cpu(), hi, lo, f"{backend} out")
    assert_close_rule(dgot.cpu(), dhi, dlo, f"{backend} dx")
    # positions outside the rotated range: bit-identical to the input (forward) / cotangent
    keep = torch.ones(case.S, dtype=torch.bool)
    keep[case.offset:case.offset + L] = False
    assert torch.equal(got[:, keep], x[:, keep])
    if case.layout != "bcast_h":  # the expanded leaf sums the heads' gradients
        assert torch.equal(dgot[:, keep], cot.to(device=device, dtype=dtype)[:, keep])
    # and the rotated part really changed something
    assert not torch.equal(got[:, ~keep], x[:, ~keep])


@pytest.mark.parametrize("backend,device,dtype", backend_params())
@pytest.mark.parametrize("conj", [False, True])
def test_custom_op_matches_contract(backend, device, dtype, conj):
    """The raw op (both rotation directions) against the contract oracle ``torch``, bit for
    bit: fp32 math with each product and the sum rounded, then one rounding to the dtype. (The
    cpu kernel's half-split path and the GPU builds contracted ``a c - b s`` into FMAs: 1 ulp
    off in fp32.)"""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 13, 3, 12, generator=g).to(device=device, dtype=dtype)
    cos, sin = vk.rope3d_freqs(2, 2, 2, 12, axes_dims=(4, 4, 4), device=device)
    for inter in (True, False):
        got = torch.ops.vidgen_kernels.rope_apply(x, cos, sin, 4, inter, conj, backend)
        want = torch.ops.vidgen_kernels.rope_apply(x, cos, sin, 4, inter, conj, "torch")
        assert torch.equal(got, want), (inter, (got.float() - want.float()).abs().max().item())
    # conj undoes the rotation
    fwd = torch.ops.vidgen_kernels.rope_apply(x.float(), cos, sin, 4, True, conj, backend if dtype == torch.float32 else "torch")
    back = torch.ops.vidgen_kernels.rope_apply(fwd, cos, sin, 4, True, not conj, "torch")
    torch.testing.assert_close(back, x.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contig", "qkv", "bhsd", "strided_d", "bcast_h"])
@pytest.mark.parametrize("D", [54, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_cpu_kernel_bit_exact_vector_paths(backend, dtype, D, layout):
    """The cpu kernel's vector loops (16 / 8 pairs a step, then the scalar tail: D/2 = 27 takes
    all three), both layouts and directions, against the oracle bit for bit, values spread over
    the dtype's range (subnormal, overflowing and exactly-halfway roundings)."""
    g = torch.Generator().manual_seed(11)
    B, S, H, L, off = 2, 9, 3, 6, 2
    leaf = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    lim = {torch.float16: 12, torch.bfloat16: 120}.get(dtype, 30)  # finite inputs
    leaf = (leaf * torch.exp2(torch.randint(-lim, lim + 1, leaf.shape, generator=g).double())).to(dtype)
    x = _layout(leaf, layout)
    ang = torch.rand(L, D // 2, generator=g, dtype=torch.float64) * 7
    scale = 0.5 + torch.rand(L, 1, generator=g, dtype=torch.float64)  # not a pure rotation
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin = (ang.cos() * scale).to(tdt), (ang.sin() * scale).to(tdt)
    for inter in (True, False):
        for conj in (False, True):
            got = torch.ops.vidgen_kernels.rope_apply(x, cos, sin, off, inter, conj, backend)
            want = torch.ops.vidgen_kernels.rope_apply(x, cos, sin, off, inter, conj, "torch")
            assert torch.equal(got, want), (inter, conj, (got.double() - want.double()).abs().max().item())


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("backend", ["reference"] + CPU_KERNELS)
def test_diffusers_formula(backend, interleaved):
    """Independent check: diffusers' ``x * cos + rotate(x) * sin`` on ``[S, D]`` tables."""
    T, Hh, W, D = 2, 3, 5, 64
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, T * Hh * W, 4, D, generator=g, dtype=torch.float64)
    dc, ds = diffusers_3d(T, Hh, W, (16, 24, 24))
    if not interleaved:  # rotate_half convention: each angle at i and i + D/2
        dc, ds = torch.cat([dc[:, ::2], dc[:, ::2]], -1), torch.cat([ds[:, ::2], ds[:, ::2]], -1)
    want = diffusers_apply(x, dc.double(), ds.double(), interleaved)
    got_full = vk.apply_rope(x, dc, ds, interleaved=interleaved, backend=backend)
    cos, sin = vk.rope3d_freqs(T, Hh, W, D)
    got_half = vk.apply_rope(x, cos, sin, interleaved=interleaved, backend=backend)
    torch.testing.assert_close(got_full, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_half, want, atol=1e-4, rtol=0)  # fp64 vs fp32 angles


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("backend", ["reference"] + CPU_KERNELS)
def test_float64_tables_kept_exact(backend, interleaved):
    """fp64 x with fp64 tables rotates at fp64 precision (the tables were rounded to fp32:
    ~5e-8 error, a million times fp64's) and the backward rotates back exactly; fp32 tables
    with fp64 x keep their fp32 values."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 7, 3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    ang = torch.rand(5, 5, generator=g, dtype=torch.float64) * 30

    def full(t):  # [L, D/2] -> diffusers' [L, D] layout of the convention
        return t.repeat_interleave(2, -1) if interleaved else torch.cat([t, t], -1)

    for c, s in ((ang.cos(), ang.sin()), (ang.cos().float(), ang.sin().float())):
        want = diffusers_apply(x[:, 2:].detach(), full(c.double()), full(s.double()), interleaved)
        got = vk.apply_rope(x, c, s, interleaved=interleaved, offset=2, backend=backend)
        assert got.dtype == torch.float64
        assert (got[:, 2:] - want).abs().max().item() < 1e-14, c.dtype
        assert torch.equal(got[:, :2], x[:, :2].detach())
        x.grad = None
        got.backward(got.detach())  # R^T R x = x (c^2 + s^2 = 1 to the tables' precision)
        tol = 1e-14 if c.dtype == torch.float64 else 1e-6
        assert (x.grad - x.detach()).abs().max().item() < tol, c.dtype


@pytest.mark.parametrize("backend", ["reference"] + CPU_KERNELS)
@pytest.mark.parametrize("interleaved", [True, False])
def test_gradcheck_float64(backend, interleaved):
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 9, 3, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = vk.rope3d_freqs(2, 1, 3, 6, axes_dims=(2, 2, 2))

    def f(t):
        return vk.apply_rope(t[:, :, 1], cos, sin, interleaved=interleaved, offset=2, backend=backend)
    assert torch.autograd.gradcheck(f, (qkv,), eps=1e-6, atol=1e-6)
    if backend != "reference":
        assert torch.autograd.gradgradcheck(f, (qkv,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + CPU_KERNELS)
@pytest.mark.parametrize("interleaved", [True, False])
def test_table_gradients(backend, interleaved):
    """Tables that require grad (learned frequencies, not a pure rotation) get their gradient,
    twice differentiable (gradcheck / gradgradcheck in float64; they were detached without a
    word)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 9, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ang = torch.randn(5, 3, generator=g, dtype=torch.float64)
    c, s = (1.3 * ang.cos()).requires_grad_(), (0.7 * ang.sin()).requires_grad_()

    def f(x, c, s):
        return vk.apply_rope(x, c, s, interleaved=interleaved, offset=3, backend=backend)
    assert torch.autograd.gradcheck(f, (x, c, s), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(f, (x, c, s), eps=1e-6, atol=1e-6)
    dc, = torch.autograd.grad(f(x, c, s).square().sum(), c)
    assert dc.abs().max() > 0.1
    # diffusers' [L, D] layout: each copy of an angle gets half its gradient, so the copies stay
    # equal after an optimizer step (the second copy got 0 and the next call's check failed)
    rep = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat([t, t], -1))  # noqa: E731
    cf, sf = rep(c.detach()).requires_grad_(), rep(s.detach()).requires_grad_()
    dcf, dsf = torch.autograd.grad(f(x, cf, sf).square().sum(), (cf, sf))
    ds, = torch.autograd.grad(f(x, c, s).square().sum(), s)
    for full, half in ((dcf, dc), (dsf, ds)):
        torch.testing.assert_close(full, rep(half / 2))
    with torch.no_grad():
        cf -= 0.1 * dcf
        sf -= 0.1 * dsf
    f(x, cf, sf)  # still the repeated layout


@pytest.mark.parametrize("backend", ["torch"] + CPU_KERNELS + (["triton"] if HAS_TRITON_CPU else []))
@pytest.mark.parametrize("interleaved", [True, False])
def test_opcheck(backend, interleaved):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 7, 3, 8, generator=g, requires_grad=True)
    cos, sin = vk.rope3d_freqs(1, 2, 2, 8, axes_dims=(2, 2, 4))
    torch.library.opcheck(torch.ops.vidgen_kernels.rope_apply.default,
                          (x, cos, sin, 2, interleaved, False, backend))
    torch.library.opcheck(torch.ops.vidgen_kernels.rope_apply.default,
                          (x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(),
                           cos, sin, 3, interleaved, True, backend))


@pytest.mark.parametrize("backend", ["reference"] + CPU_KERNELS)
def test_compile_fullgraph_fwd_bwd(backend):
    torch.manual_seed(0)
    B, S, H, D, text = 2, 4 + 12, 3, 16, 4
    cos, sin = vk.rope3d_freqs(1, 3, 4, D, axes_dims=(4, 6, 6))
    proj = torch.nn.Linear(32, 3 * H * D)

    def f(h):
        qkv = proj(h).view(B, S, 3, H, D)
        q = vk.apply_rope(qkv[:, :, 0], cos, sin, offset=text, backend=backend)
        k = vk.apply_rope(qkv[:, :, 1], full_table(cos, False), full_table(sin, False),
                          interleaved=False, offset=text, backend=backend)
        return (q * k).sum(-1).square().mean()

    h = torch.randn(B, S, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(h)
    (gc,) = torch.autograd.grad(loss_c, h)
    loss_e = f(h)
    (ge,) = torch.autograd.grad(loss_e, h)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_auto_backend_and_reference_alias(monkeypatch):
    monkeypatch.delenv("VIDGEN_KERNELS_BACKEND", raising=False)
    x = torch.randn(1, 10, 2, 8)
    cos, sin = vk.rope3d_freqs(2, 2, 2, 8, axes_dims=(2, 2, 4))
    want = "cpu" if CPU_KERNELS else "reference"
    assert rope_mod._resolve_rope(None, x, "t") == want
    with vk.use_backend("reference"):
        assert rope_mod._resolve_rope(None, x, "t") == "reference"
    torch.testing.assert_close(vk.apply_rope(x, cos, sin, offset=1),
                               vk.apply_rope_reference(x, cos, sin, offset=1))
    with pytest.raises(vk.BackendUnavailableError, match="cuda"):
        vk.apply_rope(x, cos, sin, backend="cuda")


def test_empty_and_no_rotation():
    cos, sin = vk.rope3d_freqs(1, 1, 3, 8, axes_dims=(2, 2, 4))
    for backend in ["reference"] + CPU_KERNELS:
        x = torch.randn(0, 5, 2, 8)
        assert vk.apply_rope(x, cos, sin, backend=backend).shape == x.shape
        x = torch.randn(2, 5, 2, 8)
        out = vk.apply_rope(x, cos[:0], sin[:0], offset=5, backend=backend)  # L = 0: a copy
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _bad_cases():
    x = torch.randn(2, 10, 3, 8)
    c, s = vk.rope3d_freqs(2, 2, 2, 8, axes_dims=(2, 2, 4))
    return [
        ((torch.randn(2, 10, 3, 7), c, s), {}, ValueError, "even"),
        ((x, c, s), dict(offset=3), ValueError, "S - offset"),
        ((x, torch.ones(11, 4), torch.ones(11, 4)), {}, ValueError, "positions"),
        ((x, c, s), dict(offset=-1), ValueError, "offset"),
        ((x, c, s.double()), {}, TypeError, "dtype"),
        ((x.view(20, 3, 8), c, s), {}, ValueError, r"\[B, S, H, D\]"),
        ((x, c, s[:4]), {}, ValueError, "same shape"),
        ((x, c.view(4, 2, 4), s.view(4, 2, 4)), {}, ValueError, r"\[L, D/2\]"),
        ((x, torch.ones(8, 5), torch.ones(8, 5)), {}, ValueError, r"\[L, D/2\]"),
        ((x.long(), c, s), {}, TypeError, "floating"),
        ((x.numpy(), c, s), {}, TypeError, "torch.Tensor"),
        ((x, c, s.to("meta")), {}, ValueError, "meta"),
        ((x, c, s), dict(interleaved=1), TypeError, "interleaved"),
        ((x, c.long(), s.long()), {}, TypeError, "floating"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_cases())))
@pytest.mark.parametrize("backend", ["reference"] + CPU_KERNELS)
def test_bad_input_raises_clear_error(i, backend):
    args, kw, exc, match = _bad_cases()[i]
    with pytest.raises(exc, match=match):
        vk.apply_rope(*args, backend=backend, **kw)
    with pytest.raises(exc, match=match):
        vk.apply_rope_reference(*args, **kw)
